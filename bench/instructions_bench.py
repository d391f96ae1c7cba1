"""Instructions the builder process runs for one build of a case, counted by valgrind, for two pybuild programs.

A few milliseconds of CPU are below what this machine's timing resolves, while an instruction count repeats
to 0.1%: it tells what a change costs in CPU work (not in waiting), without the noise. Each round builds the
case on a fresh store holding the loaded base (a cold build), or with ``--warm`` builds it once untimed and
counts the rebuild; the builder process's threads count, its children (the sandbox server, RUN commands) do
not. Needs valgrind (Debian's ``valgrind``); a build runs about 50 times slower under it.

    python3 bench/instructions_bench.py trivial /tmp/pybuild-a/.venv/bin/pybuild \\
        "$(bench/install_pybuild.sh /tmp/pb)" --state /tmp/pb
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import peer_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    peer_state.add_arguments(parser)
    parser.add_argument("programs", nargs="+", help="pybuild programs to count (the first is the baseline)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm", action="store_true", help="count a rebuild with nothing changed")
    args = parser.parse_args()
    context, base = peer_state.case_inputs(args)
    if shutil.which("valgrind") is None:
        sys.exit("error: valgrind is not installed (apt-get install valgrind)")
    counts: dict[str, list[int]] = {program: [] for program in args.programs}
    for _ in range(args.rounds):
        for program in args.programs:
            counts[program].append(_count(program, context, base, args.warm))
    baseline = statistics.median(counts[args.programs[0]])
    phase = "warm" if args.warm else "cold"
    print(f"{args.case}, {phase}, {args.rounds} rounds, instructions of the builder process (median, min..max):")
    for program, values in counts.items():
        middle = statistics.median(values)
        print(f"  {middle / 1e6:9.1f}M  {min(values) / 1e6:.1f}..{max(values) / 1e6:.1f}M  "
              f"{middle / baseline:.3f}x  {program}")


def _count(program: str, context: Path, base: Path, warm: bool) -> int:
    """One build under callgrind, on a fresh store; returns its instruction total."""
    work = Path(tempfile.mkdtemp(prefix="pybuild-instructions-"))
    try:
        env = {**os.environ, "PYBUILD_ROOT": str(work / "store")}
        build = [program, "build", "--progress", "plain", "-t", "counted", str(context)]
        subprocess.run([program, "load", "-i", str(base)], env=env, check=True, capture_output=True)
        if warm:
            subprocess.run(build, env=env, check=True, capture_output=True)
        # The console script is a Python file: valgrind runs its interpreter, as the kernel would.
        interpreter = Path(program).read_text(encoding="utf-8").splitlines()[0].removeprefix("#!").strip()
        out = work / "callgrind.out"
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "-q",
                               interpreter, *build], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: {program} build {context} exited {done.returncode}: {done.stderr[-2000:]}")
        totals = [line for line in out.read_text().splitlines() if line.startswith("totals:")]
        return int(totals[0].split()[1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
