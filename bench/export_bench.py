"""Layer export speed (pybuild's layer writer against `tar | zstd -3`) and the peak memory of a build with a 1 GB layer.

    .venv/bin/python bench/export_bench.py                 # 500 MB tree, 3 reps, then the 1 GB builds
    .venv/bin/python bench/export_bench.py --size-mb 100 --reps 1 --skip-rss

Both exporters read the same tree, warm in the page cache, in the same run; throughput is input MB
(uncompressed tree bytes) per second of wall time, median of the reps. Peak RSS comes from GNU time
(`/usr/bin/time -v`): the largest resident set among pybuild and the processes it waited for.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.fs.layer import write_layer  # noqa: E402

MB = 1_000_000
WORDS = b"layer tar zstd image build cache stage copy run file tree docker oci digest manifest config ".split()


def text_bytes(rng: random.Random, size: int) -> bytes:
    """Compressible, source-code-like bytes."""
    line = b" ".join(rng.choice(WORDS) for _ in range(12)) + b"\n"
    return (line * (size // len(line) + 1))[:size]


def make_tree(root: Path, size_mb: int) -> int:
    """A mixed tree of about ``size_mb``: 30% small text files, 30% medium mixed files, 40% large random files."""
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == str(size_mb):
        return sum(path.stat().st_size for path in root.rglob("*") if path.is_file() and path != marker)
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(size_mb)
    budget = size_mb * MB
    plans = [(0.3 * budget, 1_024, 16_384, "src"), (0.3 * budget, 256_000, 2_000_000, "assets"),
             (0.4 * budget, 32 * MB, 32 * MB, "data")]
    total = 0
    for share, low, high, kind in plans:
        written, index = 0, 0
        while written < share:
            size = min(rng.randint(low, high), int(share - written) or 1)
            path = root / kind / f"d{index // 200:03d}" / f"f{index:06d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            compressible = kind == "src" or (kind == "assets" and index % 2 == 0)
            path.write_bytes(text_bytes(rng, size) if compressible else os.urandom(size))
            written += size
            index += 1
        total += written
    marker.write_text(str(size_mb))
    return total


def time_pybuild(tree: Path) -> tuple[float, int]:
    with open(os.devnull, "wb") as sink:
        start = time.perf_counter()
        layer = write_layer(tree, sink, compression="zstd", source_date_epoch=0)
        elapsed = time.perf_counter() - start
    assert layer is not None
    return elapsed, layer.size


def time_tar_zstd(tree: Path) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(["bash", "-o", "pipefail", "-c", 'tar -C "$0" -cf - . | zstd -3 -q -c | wc -c', tree],
                          check=True, capture_output=True, text=True)
    return time.perf_counter() - start, int(done.stdout)


def export_throughput(tree: Path, tree_bytes: int, reps: int) -> None:
    time_tar_zstd(tree)  # warm the page cache for both
    results: dict[str, list[tuple[float, int]]] = {"pybuild write_layer (zstd 3)": [], "tar | zstd -3": []}
    for _ in range(reps):
        results["tar | zstd -3"].append(time_tar_zstd(tree))
        results["pybuild write_layer (zstd 3)"].append(time_pybuild(tree))
    print(f"\nlayer export of {tree_bytes / MB:.0f} MB ({tree}), median of {reps}:")
    print(f"  {'exporter':30} {'seconds':>8} {'MB/s':>8} {'out MB':>8}")
    for name, runs in results.items():
        seconds = statistics.median(elapsed for elapsed, _ in runs)
        print(f"  {name:30} {seconds:8.2f} {tree_bytes / MB / seconds:8.1f} {runs[-1][1] / MB:8.1f}")


def pybuild_command() -> list[str]:
    script = Path(sys.executable).with_name("pybuild")
    return [str(script)] if script.exists() else [sys.executable, "-m", "builder"]


def peak_rss(workdir: Path, gigabytes: int) -> None:
    """Max RSS of a whole `pybuild build` whose one layer holds a ``gigabytes`` file, made by RUN and by COPY."""
    env = {**os.environ, "PYBUILD_ROOT": str(workdir / "root")}
    pybuild = pybuild_command()
    subprocess.run([*pybuild, "build", "-q", "-t", "busybox-base", "--build-context", "busybox=/bin",
                    REPO / "examples" / "base"], check=True, env=env, stdout=subprocess.DEVNULL)
    cases = {"RUN dd (1 MB blocks)": workdir / "run", "COPY of a context file": workdir / "copy"}
    count = gigabytes * 1024
    (cases["RUN dd (1 MB blocks)"]).mkdir(exist_ok=True)
    (cases["RUN dd (1 MB blocks)"] / "Dockerfile").write_text(
        f"FROM busybox-base\nRUN dd if=/dev/urandom of=/big bs=1M count={count} 2>/dev/null\n")
    copy = cases["COPY of a context file"]
    copy.mkdir(exist_ok=True)
    (copy / "Dockerfile").write_text("FROM busybox-base\nCOPY big /big\n")
    if not (copy / "big").is_file() or (copy / "big").stat().st_size != count << 20:
        subprocess.run(["dd", "if=/dev/urandom", f"of={copy / 'big'}", "bs=1M", f"count={count}"], check=True,
                       stderr=subprocess.DEVNULL)
    print(f"\npeak memory of `pybuild build --no-cache` with a {gigabytes} GB layer:")
    print(f"  {'case':26} {'seconds':>8} {'max RSS MB':>11}")
    for name, context in cases.items():
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-v", *pybuild, "build", "--no-cache", "-q", "-t", "big", context],
                              env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            print(f"  {name:26} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
        print(f"  {name:26} {elapsed:8.1f} {rss_kb / 1024:11.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=500, help="size of the tree to export (default 500)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each exporter (default 3)")
    parser.add_argument("--rss-gb", type=int, default=1, help="size of the big layer for the memory runs")
    parser.add_argument("--skip-rss", action="store_true", help="only measure export throughput")
    parser.add_argument("--workdir", type=Path, help="keep the generated tree and contexts here (reused)")
    args = parser.parse_args()
    for tool in ("tar", "zstd", "/usr/bin/time"):
        if not shutil.which(tool):
            sys.exit(f"export_bench: {tool} is missing (apt-get install tar zstd time)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pybuild-export-bench."))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"host: {os.cpu_count()} cpus, {os.uname().release}; workdir {workdir}")
    tree = workdir / "tree"
    export_throughput(tree, make_tree(tree, args.size_mb), args.reps)
    if not args.skip_rss:
        if os.geteuid() != 0:
            sys.exit("export_bench: the memory runs build images and need root")
        peak_rss(workdir, args.rss_gb)
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
