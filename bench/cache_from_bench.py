"""A cold build on an empty store with --cache-from a cache another build exported, against a warm rebuild
and a plain cold build, in alternating rounds.

    python3 bench/cache_from_bench.py b-srcrepo "$(bench/install_pybuild.sh /tmp/pb-bench)" --state /tmp/pb-bench

Each round: a fresh store loaded with the base (untimed) builds with --cache-from (timed), a fresh store
builds cold (timed), and the exporting store rebuilds with nothing changed (timed). The cache directory is
written once, by a build with --cache-to type=local,mode=max on its own store.
Needs the peer benchmark's contexts and base image (bench/peer_bench.sh makes them in its state dir).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case")
    parser.add_argument("pybuild")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("BENCH_STATE", "/tmp/peer-bench")))
    args = parser.parse_args()
    context = args.state / "contexts" / args.case
    base = args.state / "fixtures" / "busybox-base.pybuild.oci.tar"
    if not (context / "Dockerfile").exists() or not base.exists():
        sys.exit(f"error: run bench/peer_bench.sh once with BENCH_STATE={args.state}")
    work = Path(tempfile.mkdtemp(prefix="cache-from-bench-", dir=args.state))
    try:
        def store(name: str, fresh: bool) -> dict[str, str]:
            root = work / name
            if fresh:
                shutil.rmtree(root, ignore_errors=True)
                env = {**os.environ, "PYBUILD_ROOT": str(root)}
                subprocess.run([args.pybuild, "load", "-i", str(base)], env=env, check=True, capture_output=True)
            return {**os.environ, "PYBUILD_ROOT": str(root)}

        def timed(env: dict[str, str], *extra: str) -> float:
            start = time.perf_counter()
            subprocess.run([args.pybuild, "build", "-q", "-t", "bench", *extra, str(context)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            return time.perf_counter() - start

        exporter = store("exporter", fresh=True)
        cache_dir = work / "cache"
        timed(exporter, "--cache-to", f"type=local,dest={cache_dir},mode=max")
        timed(exporter)
        times: dict[str, list[float]] = {"cache-from": [], "cold": [], "warm": []}
        for _ in range(args.rounds):
            times["cache-from"].append(timed(store("importer", fresh=True), "--cache-from",
                                             f"type=local,src={cache_dir}"))
            times["cold"].append(timed(store("cold", fresh=True)))
            times["warm"].append(timed(exporter))
        print(f"{args.case}, {args.rounds} rounds, seconds (median, min..max):")
        for name, values in times.items():
            print(f"  {name:10s} {statistics.median(values):.3f}  {min(values):.3f}..{max(values):.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
