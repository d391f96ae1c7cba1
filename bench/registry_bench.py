"""Pull and push of a ~200 MB, 5-layer image against one local registry: pybuild against skopeo, in alternating rounds.

    python3 bench/registry_bench.py "$(bench/install_pybuild.sh /tmp/pb-bench)" --state /tmp/pb-bench

A Distribution server (``docker-registry``) runs on 127.0.0.1 with its storage emptied before each push,
so every push uploads every blob. The image is built once by pybuild: five RUN steps each writing 40 MB
of random bytes (incompressible, so the blobs are ~200 MB as pushed).

- push: ``pybuild push`` from its store against ``skopeo copy oci:STORE:NAME docker://...`` (skopeo
  reads pybuild's store directly: it is an OCI layout);
- pull: ``pybuild pull`` into an empty store (download and check; layers are unpacked at first use)
  against ``skopeo copy docker://... oci:DIR``, which does the same.

Peak memory (max RSS) of each process is taken from wait4. Needs the peer benchmark's base image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Seconds and peak RSS (MB) of one command, which must succeed."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {' '.join(argv)} failed: {process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss // 1024


class Registry:
    def __init__(self, work: Path) -> None:
        self.work = work
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.storage = work / "storage"
        self.config = work / "config.yml"
        self.config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
                               f"http:\n  addr: {self.host}\nlog:\n  level: error\n")
        self.process: subprocess.Popen | None = None

    def start(self, empty: bool = False) -> None:
        if empty:
            shutil.rmtree(self.storage, ignore_errors=True)
        self.process = subprocess.Popen(["docker-registry", "serve", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).read()
                return
            except OSError:
                time.sleep(0.05)
        sys.exit("error: docker-registry did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.process = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pybuild")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("BENCH_STATE", "/tmp/peer-bench")))
    args = parser.parse_args()
    base = args.state / "fixtures" / "busybox-base.pybuild.oci.tar"
    if not base.exists():
        sys.exit(f"error: run bench/peer_bench.sh once with BENCH_STATE={args.state}")
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            sys.exit(f"error: {tool} is not installed")
    work = Path(tempfile.mkdtemp(prefix="registry-bench-", dir=args.state))
    registry = Registry(work)
    try:
        source = work / "source"
        env = {**os.environ, "PYBUILD_ROOT": str(source)}
        subprocess.run([args.pybuild, "load", "-i", str(base)], env=env, check=True, capture_output=True)
        context = work / "context"
        context.mkdir()
        (context / "Dockerfile").write_text("FROM busybox-base\n" + "".join(
            f"RUN head -c 40000000 /dev/urandom > /layer{n}\n" for n in range(5)))
        subprocess.run([args.pybuild, "build", "-q", "-t", "big", str(context)], env=env, check=True,
                       capture_output=True)
        registry.start(empty=True)
        figures: dict[str, list[tuple[float, int]]] = {name: [] for name in
                                                       ("push pybuild", "push skopeo", "pull pybuild", "pull skopeo")}
        for round_number in range(args.rounds):
            order = ["pybuild", "skopeo"] if round_number % 2 == 0 else ["skopeo", "pybuild"]
            for tool in order:
                registry.stop()
                registry.start(empty=True)
                shutil.rmtree(source / "registry", ignore_errors=True)  # no mount source remembered
                target = f"{registry.host}/bench/big:{tool}"
                if tool == "pybuild":
                    figures["push pybuild"].append(timed([args.pybuild, "push", "big", target], env))
                else:
                    figures["push skopeo"].append(timed(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                                                         f"oci:{source}:big:latest", f"docker://{target}"]))
            for tool in order:
                target = f"{registry.host}/bench/big:{order[-1]}"  # the storage holds the last push only
                destination = work / f"pull-{tool}"
                shutil.rmtree(destination, ignore_errors=True)
                if tool == "pybuild":
                    figures["pull pybuild"].append(timed([args.pybuild, "pull", target],
                                                         {**os.environ, "PYBUILD_ROOT": str(destination)}))
                else:
                    figures["pull skopeo"].append(timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                                         f"docker://{target}", f"oci:{destination}:big"]))
            print(f"round {round_number + 1}: " + "  ".join(f"{name} {values[-1][0]:.2f}s"
                                                            for name, values in figures.items()), flush=True)
        size = sum(path.stat().st_size for path in (source / "blobs" / "sha256").iterdir())
        print(f"\n~{size / 1e6:.0f} MB of blobs in the source store, {args.rounds} rounds (median seconds, peak RSS):")
        for name, values in figures.items():
            print(f"  {name:13s} {statistics.median(v[0] for v in values):6.2f} s   "
                  f"{max(v[1] for v in values):4d} MB")
        for way in ("push", "pull"):
            ratio = statistics.median(a[0] / b[0] for a, b in zip(figures[f"{way} pybuild"],
                                                                   figures[f"{way} skopeo"], strict=True))
            print(f"  {way}: pybuild / skopeo, median of per-round ratios: {ratio:.2f}")
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
