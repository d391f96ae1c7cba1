"""Builds of one case by two pybuild programs (say, the last commit and this one) in alternating pairs.

What a change costs is a few milliseconds on a build of a few hundred; a series of one program and then
of the other compares two moments of a drifting machine. Each round builds with one program and then the
other, the order alternating; the result is the median of the per-round ratios B/A beside each program's
own median, and the median CPU (user, system) of its builds as wait4 reads it: the build and every
process it reaped. Cold (the default): each round wipes both stores and loads the base (untimed) first.
``--phase incr`` (b-srcrepo): each program's store builds the case twice (untimed), then each round
changes one source file, as the peer benchmark's incr phase does, and both programs rebuild it.

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
    parser.add_argument("--phase", choices=["cold", "incr"], default="cold")
    args = parser.parse_args()
    peer_state.check_phase(args)
    context, base = peer_state.case_inputs(args)
    programs = {"A": args.a, "B": args.b}
    seconds: dict[str, list[float]] = {"A": [], "B": []}
    cpu: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}  # user, system
    work = Path(tempfile.mkdtemp(prefix="pybuild-ab-"))

    def fresh_store(name: str) -> None:
        shutil.rmtree(work / name, ignore_errors=True)
        subprocess.run([programs[name], "load", "-i", str(base)], env=environment(name), check=True,
                       capture_output=True)

    def environment(name: str) -> dict[str, str]:
        return {**os.environ, "PYBUILD_ROOT": str(work / name)}

    def build(name: str) -> tuple[float, float, float]:
        """Seconds, user and system CPU of one build."""
        start = time.perf_counter()
        process = subprocess.Popen([programs[name], "build", "--progress", "plain", "-t", "ab", str(context)],
                                   env=environment(name), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)  # the build's CPU with every process it reaped
        elapsed = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"error: {programs[name]} build {context} exited {os.waitstatus_to_exitcode(status)}")
        return elapsed, usage.ru_utime, usage.ru_stime

    try:
        if args.phase == "incr":
            for name in programs:
                fresh_store(name)
                build(name)
                build(name)  # the first rebuild settles what the first build left
        for round_number in range(args.rounds):
            if args.phase == "incr":  # the same edit for both programs of the round
                peer_state.edit_source(args.state, f"ab{round_number}")
            order = ["A", "B"] if round_number % 2 == 0 else ["B", "A"]
            for name in order:
                if args.phase == "cold":
                    fresh_store(name)
                    time.sleep(0.5)
                elapsed, user, system = build(name)
                seconds[name].append(elapsed)
                cpu[name].append((user, system))
            print(f"round {round_number + 1}: A {seconds['A'][-1]:.3f}  B {seconds['B'][-1]:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.phase == "incr":
            peer_state.edit_source(args.state, None)
    ratios = [b / a for a, b in zip(seconds["A"], seconds["B"], strict=True)]
    print(f"\n{args.case}, {args.phase}, {args.rounds} rounds, seconds (median, min..max):")
    for name, values in seconds.items():
        user = statistics.median(entry[0] for entry in cpu[name])
        system = statistics.median(entry[1] for entry in cpu[name])
        print(f"  {name}  {statistics.median(values):.3f}  {min(values):.3f}..{max(values):.3f}  "
              f"(CPU user {user:.3f}, system {system:.3f})  {programs[name]}")
    print(f"  B / A, median of the per-round ratios: {statistics.median(ratios):.3f} "
          f"({sum(ratio < 1 for ratio in ratios)} of {len(ratios)} rounds faster)")


if __name__ == "__main__":
    main()
