"""Builds of one case by pybuild and Docker's BuildKit, taken in pairs, so both see the same moment.

On a shared machine the speed drifts by tens of percent within a minute; a whole series of one builder
and then of the other compares two different machines. Here each round cleans both, builds with one and
then with the other (the order alternating), and reports the median of the per-round ratios beside
each builder's own median.

    DOCKER_HOST=unix:///path/docker.sock .venv/bin/python bench/paired_bench.py trivial --rounds 15
    DOCKER_HOST=... .venv/bin/python bench/paired_bench.py b-srcrepo --phase warm   # rebuilds, nothing changed
    DOCKER_HOST=... .venv/bin/python bench/paired_bench.py b-srcrepo --phase incr   # one source file changed

Needs the peer benchmark's contexts and base image (run bench/peer_bench.sh once; it makes them) and
a Docker daemon with BuildKit (the same the peer benchmark starts). Cleaning is as there: pybuild's store
removed and the base loaded; docker's images removed, its build cache pruned and the base loaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import peer_state

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(argv)} failed: {done.stderr.strip().splitlines()[-1:]}")


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    run(argv, env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    peer_state.add_arguments(parser)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait after cleaning")
    parser.add_argument("--phase", choices=["cold", "warm", "incr"], default="cold",
                        help="cold: each build on a cleaned builder; warm: each builder cleaned and built once, "
                        "then every round rebuilds with nothing changed; incr (b-srcrepo): as warm, but each round "
                        "first changes one source file, as the peer benchmark's incr phase does")
    parser.add_argument("--pybuild", help="the pybuild program (default: this checkout installed into the state dir "
                        "by bench/install_pybuild.sh, as `pip install .` installs it)")
    parser.add_argument("--docker", default="/usr/bin/docker")
    args = parser.parse_args()
    peer_state.check_phase(args)

    context = args.state / "contexts" / args.case
    base_oci = args.state / "fixtures" / "busybox-base.pybuild.oci.tar"
    base_docker = args.state / "fixtures" / "busybox-base.docker.tar"
    for path in (context / "Dockerfile", base_oci, base_docker):
        if not path.exists():
            sys.exit(f"error: {path} is missing; run bench/peer_bench.sh once with BENCH_STATE={args.state}")
    if "DOCKER_HOST" not in os.environ:
        sys.exit("error: set DOCKER_HOST to the benchmark's own docker daemon (cleaning removes all its images)")
    if args.pybuild is None:
        args.pybuild = subprocess.run([str(REPO / "bench" / "install_pybuild.sh"), str(args.state)], check=True,
                                      stdout=subprocess.PIPE, text=True).stdout.strip()
    pybuild_root = args.state / "paired-pybuild-root"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYBUILD_ROOT=str(pybuild_root), DOCKER_BUILDKIT="1")
    tag = f"localhost/paired-{args.case}:latest"

    def clean_pybuild() -> None:
        shutil.rmtree(pybuild_root, ignore_errors=True)
        run([args.pybuild, "load", "-i", str(base_oci)], env)

    def clean_docker() -> None:
        images = subprocess.run([args.docker, "images", "-aq"], env=env, capture_output=True, text=True).stdout.split()
        if images:
            subprocess.run([args.docker, "rmi", "-f", *sorted(set(images))], env=env, capture_output=True)
        run([args.docker, "builder", "prune", "-af"], env)
        run([args.docker, "load", "-q", "-i", str(base_docker)], env)

    builds = {
        "pybuild": (clean_pybuild, [args.pybuild, "build", "--progress", "plain", "-t", tag, "-f",
                                    str(context / "Dockerfile"), str(context)]),
        "buildkit": (clean_docker, [args.docker, "build", "--network", "none", "-t", tag, "-f",
                                    str(context / "Dockerfile"), str(context)]),
    }
    times: dict[str, list[float]] = {name: [] for name in builds}
    try:
        if args.phase != "cold":
            for clean, argv in builds.values():
                clean()
                run(argv, env)
                run(argv, env)  # a first rebuild settles what the first build left (caches, page cache)
        for number in range(args.rounds):
            if args.phase == "incr":  # the same edit for both builders of the round
                peer_state.edit_source(args.state, f"paired{number}")
            order = list(builds) if number % 2 == 0 else list(reversed(builds))
            for name in order:
                clean, argv = builds[name]
                if args.phase == "cold":
                    clean()
                    os.sync()
                    time.sleep(args.settle)
                times[name].append(timed(argv, env))
            print(f"round {number + 1}: " + "  ".join(f"{name} {times[name][-1]:.3f}" for name in builds), flush=True)
    finally:
        if args.phase == "incr":
            peer_state.edit_source(args.state, None)
    ratios = [mine / theirs for mine, theirs in zip(times["pybuild"], times["buildkit"], strict=True)]
    print(f"\n{args.case}, {args.phase}, {args.rounds} rounds, seconds (median, min..max):")
    for name, values in times.items():
        print(f"  {name:9s} {statistics.median(values):.3f}  {min(values):.3f}..{max(values):.3f}")
    print(f"  pybuild / buildkit, median of the per-round ratios: {statistics.median(ratios):.2f} "
          f"({sum(ratio < 1 for ratio in ratios)} of {len(ratios)} rounds faster)")


if __name__ == "__main__":
    main()
