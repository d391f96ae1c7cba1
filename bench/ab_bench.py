"""Cold builds of one case by two pybuild programs (say, the last commit and this one) in alternating pairs.

What a change costs is a few milliseconds on a build of a few hundred; a series of one program and then
of the other compares two moments of a drifting machine. Each round wipes both stores, loads the base
(untimed), and builds with one program and then the other, the order alternating; the result is the
median of the per-round ratios B/A beside each program's own median, and the median CPU (user,
system) of its builds as wait4 reads it: the build and every process it reaped.

    git worktree add /tmp/pybuild-a HEAD~1 && python3 -m venv /tmp/pybuild-a/.venv \\
        && /tmp/pybuild-a/.venv/bin/pip install /tmp/pybuild-a
    python3 bench/ab_bench.py c-manysteps /tmp/pybuild-a/.venv/bin/pybuild "$(bench/install_pybuild.sh /tmp/pb)"

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

import peer_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    peer_state.add_arguments(parser)
    parser.add_argument("a", help="the first pybuild program (the baseline)")
    parser.add_argument("b", help="the second pybuild program")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    context, base = peer_state.case_inputs(args)
    programs = {"A": args.a, "B": args.b}
    seconds: dict[str, list[float]] = {"A": [], "B": []}
    cpu: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}  # user, system
    work = Path(tempfile.mkdtemp(prefix="pybuild-ab-"))
    try:
        for round_number in range(args.rounds):
            order = ["A", "B"] if round_number % 2 == 0 else ["B", "A"]
            for name in order:
                root = work / name
                shutil.rmtree(root, ignore_errors=True)
                env = {**os.environ, "PYBUILD_ROOT": str(root)}
                subprocess.run([programs[name], "load", "-i", str(base)], env=env, check=True, capture_output=True)
                time.sleep(0.5)
                start = time.perf_counter()
                build = subprocess.Popen([programs[name], "build", "--progress", "plain", "-t", "ab", str(context)],
                                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _, status, usage = os.wait4(build.pid, 0)  # the build's CPU with every process it reaped
                seconds[name].append(time.perf_counter() - start)
                build.returncode = os.waitstatus_to_exitcode(status)
                if build.returncode != 0:
                    sys.exit(f"error: {programs[name]} build {context} exited {build.returncode}")
                cpu[name].append((usage.ru_utime, usage.ru_stime))
            print(f"round {round_number + 1}: A {seconds['A'][-1]:.3f}  B {seconds['B'][-1]:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [b / a for a, b in zip(seconds["A"], seconds["B"], strict=True)]
    print(f"\n{args.case}, {args.rounds} rounds, seconds (median, min..max):")
    for name, values in seconds.items():
        user = statistics.median(entry[0] for entry in cpu[name])
        system = statistics.median(entry[1] for entry in cpu[name])
        print(f"  {name}  {statistics.median(values):.3f}  {min(values):.3f}..{max(values):.3f}  "
              f"(CPU user {user:.3f}, system {system:.3f})  {programs[name]}")
    print(f"  B / A, median of the per-round ratios: {statistics.median(ratios):.3f} "
          f"({sum(ratio < 1 for ratio in ratios)} of {len(ratios)} rounds faster)")


if __name__ == "__main__":
    main()
