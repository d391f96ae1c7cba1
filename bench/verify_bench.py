"""What verifying costs: ``pybuild verify`` against a plain cold build of the same case, and ``pybuild diff`` of
two ~500 MB images against diffoscope (Debian's diffoscope-minimal) on the same pair, in one run.

    python3 bench/verify_bench.py "$(bench/install_pybuild.sh /tmp/pb-bench)" --state /tmp/pb-bench

verify: each round, a fresh store with the base builds the case cold (timed), then verifies the image it
built against the same context (timed: a rebuild with no cache in a scratch store, and the comparison).
diff: five RUN steps of 100 MB of random bytes and a last small step; B is A with another build arg for the
last step (its five large layers come from the cache: one layer differs), and C is built with --no-cache
(every layer differs). diffoscope compares the images saved as OCI archives, each with a time limit.
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


def timed(argv: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,),
          timeout: float | None = None) -> float:
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return float("inf")
    if done.returncode not in ok:
        sys.exit(f"error: {' '.join(argv)} exited {done.returncode}:\n{done.stderr.decode()[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pybuild")
    parser.add_argument("--case", default="b-srcrepo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--diffoscope-timeout", type=float, default=900)
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("BENCH_STATE", "/tmp/peer-bench")))
    args = parser.parse_args()
    base = args.state / "fixtures" / "busybox-base.pybuild.oci.tar"
    context = args.state / "contexts" / args.case
    work = Path(tempfile.mkdtemp(prefix="verify-bench-", dir=args.state))
    try:
        cold, verify = [], []
        for _ in range(args.rounds):
            root = work / "store"
            shutil.rmtree(root, ignore_errors=True)
            env = {**os.environ, "PYBUILD_ROOT": str(root)}
            subprocess.run([args.pybuild, "load", "-i", str(base)], env=env, check=True, capture_output=True)
            cold.append(timed([args.pybuild, "build", "-q", "-t", "case", str(context)], env))
            verify.append(timed([args.pybuild, "verify", "case", "--context", str(context), "--progress", "plain"],
                                env))
        print(f"{args.case}: cold build {statistics.median(cold):.2f} s, verify {statistics.median(verify):.2f} s "
              f"(verify / cold build {statistics.median(v / c for v, c in zip(verify, cold, strict=True)):.2f}); "
              f"{args.rounds} rounds")

        root = work / "diff-store"
        env = {**os.environ, "PYBUILD_ROOT": str(root)}
        subprocess.run([args.pybuild, "load", "-i", str(base)], env=env, check=True, capture_output=True)
        big = work / "big"
        big.mkdir()
        (big / "Dockerfile").write_text("FROM busybox-base\n" + "".join(
            f"RUN head -c 100000000 /dev/urandom > /part{n}\n" for n in range(5)) + "ARG V\nRUN echo $V > /v\n")
        for tag, extra in (("a", ["--build-arg", "V=1"]), ("b", ["--build-arg", "V=2"]),
                           ("c", ["--build-arg", "V=1", "--no-cache"])):
            subprocess.run([args.pybuild, "build", "-q", "-t", tag, *extra, str(big)], env=env, check=True,
                           capture_output=True)
            subprocess.run([args.pybuild, "save", "-o", str(work / f"{tag}.tar"), tag], env=env, check=True,
                           capture_output=True)
        have_diffoscope = shutil.which("diffoscope") is not None
        for pair, what in ((("a", "b"), "one layer differs"), (("a", "c"), "every layer differs")):
            ours = statistics.median(timed([args.pybuild, "diff", *pair], env, ok=(1,)) for _ in range(3))
            line = f"diff of two ~500 MB images, {what}: pybuild diff {ours:.2f} s"
            if have_diffoscope:
                theirs = timed(["diffoscope", "--no-progress", "--text", "/dev/null", str(work / f"{pair[0]}.tar"),
                                str(work / f"{pair[1]}.tar")], ok=(0, 1), timeout=args.diffoscope_timeout)
                line += (f", diffoscope {theirs:.2f} s (pybuild / diffoscope {ours / theirs:.3f})" if theirs < 1e9
                         else f", diffoscope did not finish within {args.diffoscope_timeout:.0f} s")
            else:
                line += " (diffoscope is not installed: apt-get install diffoscope-minimal)"
            print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
