"""What the pybuild-against-pybuild benchmarks take from the peer benchmark's state dir: a case's context and
the loaded base image's archive (bench/peer_bench.sh makes both)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The case to build and ``--state``, the peer benchmark's state dir."""
    parser.add_argument("case", help="a case of the peer benchmark: trivial, a-multistage, b-srcrepo, c-manysteps")
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("BENCH_STATE", "/tmp/peer-bench")),
                        help="the peer benchmark's state dir (contexts, fixtures)")


def case_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """The case's context and the base archive; ends the program when the state dir lacks them."""
    context = args.state / "contexts" / args.case
    base = args.state / "fixtures" / "busybox-base.pybuild.oci.tar"
    for path in (context, base):
        if not path.exists():
            sys.exit(f"error: {path} is missing: run bench/peer_bench.sh once to make the contexts and the base")
    return context, base
