"""What a filesystem step will do, as a plain value: the seam between the instructions and the solver.

An instruction handler (``steps.py``) turns an instruction into one of these; the solver computes the
step's cache key from it and, on a miss, carries it out. Everything that can change the step's result
is a field here or lies below the step (its parent layers), so nothing the key needs is found elsewhere.
"""

from __future__ import annotations

from parser.dataclass import dataclass
from parser.errors import SourceRange
from parser.flags import Mount
from parser.instructions import Add, Copy


@dataclass
class RunOp:
    """RUN: a command in the sandbox. ``env`` is the image's Env then the ARGs in scope; HOME and
    SOURCE_DATE_EPOCH are added where they are not set, when the step runs."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    user: str
    cwd: str
    network: str | None  # None: the build's --network
    mounts: tuple[Mount, ...]
    scripts: tuple[tuple[str, bytes], ...]  # heredoc files run as programs, by name
    location: SourceRange | None = None


@dataclass
class CopyOp:
    """COPY or ADD, with every ``$VAR`` already expanded; ``workdir`` places relative destinations."""

    copy: Copy | Add
    workdir: str
    location: SourceRange | None = None


@dataclass
class WorkdirOp:
    """WORKDIR: the directory made when missing, owned by the stage's USER."""

    path: str
    user: str


@dataclass
class DirectoryOp:
    """FROM a named context that is a directory: its files become the image's root filesystem."""

    name: str
    directory: str


FilesystemOp = RunOp | CopyOp | WorkdirOp | DirectoryOp
