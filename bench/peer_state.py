"""What the benchmarks of one case take from the peer benchmark's state dir: the case as arguments, its context
and the loaded base image's archive (bench/peer_bench.sh makes both), and its tool's edit of b-srcrepo for the
incr phase."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER = Path(os.environ.get("PEER_BENCH_DIR", REPO.parent / "shared" / "bench"))  # its gen-contexts.sh edits b-srcrepo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The case to build and ``--state``, the peer benchmark's state dir."""
    parser.add_argument("case", help="a case of the peer benchmark: trivial, a-multistage, b-srcrepo, c-manysteps")
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("BENCH_STATE", "/tmp/peer-bench")),
                        help="the peer benchmark's state dir (contexts, fixtures)")


def check_phase(args: argparse.Namespace) -> None:
    """``--phase incr`` edits a source file of b-srcrepo: the other cases have none."""
    if args.phase == "incr" and args.case != "b-srcrepo":
        sys.exit("error: --phase incr changes a file of b-srcrepo; the other cases have no sources")


def case_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """The case's context and the base archive; ends the program when the state dir lacks them."""
    context = args.state / "contexts" / args.case
    base = args.state / "fixtures" / "busybox-base.pybuild.oci.tar"
    for path in (context, base):
        if not path.exists():
            sys.exit(f"error: {path} is missing: run bench/peer_bench.sh once to make the contexts and the base")
    return context, base


def edit_source(state: Path, tag: str | None) -> None:
    """Change one source file of b-srcrepo as the peer benchmark's incr phase does (``tag`` makes the edit
    differ from the last); None puts the context back as it was."""
    command = ["mutate", tag] if tag is not None else ["restore"]
    subprocess.run([str(PEER / "gen-contexts.sh"), *command], env={**os.environ, "BENCH_STATE": str(state)},
                   check=True, stdout=subprocess.DEVNULL)
