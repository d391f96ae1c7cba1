"""What pybuild can tell is wrong with a stage's instructions before any step runs, one function per rule.

BuildKit finds these mistakes when it converts the whole Dockerfile, so an ``EXPOSE 80/tcpp`` after a
long RUN fails at once, not after the RUN.  ``check_graph`` applies the rules to every instruction of the
stages a build needs, to the values that read as written.  A value with a variable reference (or quotes or
escapes, which expansion changes) is known only once expanded: the steps apply the same functions to the
expanded instruction, which also covers ONBUILD triggers, parsed only when their stage builds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from builder.sandbox.parent import HEREDOC_SCRIPT_DIR
from parser.errors import PybuildError, SourceRange
from parser.flags import Mount, MountError, mount_id, mount_mode, mount_size
from parser.instructions import Add, Copy, Expose, Instruction, Run, Stopsignal, lone_heredoc

if TYPE_CHECKING:
    from builder.graph import BuildGraph

SUPPORTED_MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret")
NETWORK_MODES = ("default", "none", "host")

Known = Callable[[str], bool]


def _expanded(value: str) -> bool:
    """At step time every value is known: the instruction has been expanded."""
    return True


def check_graph(graph: BuildGraph) -> None:
    """Check the instructions of the stages ``graph`` needs, as far as the Dockerfile's text tells."""
    special = ("$", "'", '"', "\\", graph.dockerfile.escape)

    def as_written(value: str) -> bool:
        return not any(character in value for character in special)

    for index in graph.needed:
        for instruction in graph.stages[index].instructions:
            check = _CHECKS.get(type(instruction))
            if check is not None:
                check(instruction, as_written)


# RUN


def check_run(run: Run, known: Known = _expanded) -> None:
    """RUN's flags, mounts and heredocs: what pybuild does not support, and values it cannot read."""
    if run.security not in (None, "sandbox"):
        raise PybuildError(f"RUN --security={run.security} is not supported by pybuild", run.location)
    if run.devices:
        raise PybuildError("RUN --device is not supported by pybuild", run.location)
    if run.network is not None:
        check_network(run.network, run.location)
    for mount in run.mounts:
        check_mount(mount, run.location, known)
    check_run_heredocs(run)


def check_network(network: str, location: SourceRange | None) -> None:
    if network not in NETWORK_MODES:
        raise PybuildError(f"RUN --network={network} is not supported (use default, none or host)", location)


def check_mount(mount: Mount, location: SourceRange | None, known: Known = _expanded) -> None:
    """A ``--mount`` pybuild can make: its type, and its size, mode, uid and gid read as BuildKit reads them."""
    if mount.type not in SUPPORTED_MOUNT_TYPES:
        raise PybuildError(f"RUN --mount=type={mount.type} is not supported by pybuild yet (it supports "
                           f"{', '.join(SUPPORTED_MOUNT_TYPES)})", location)
    try:
        if mount.size is not None and known(mount.size):
            mount_size(mount.size)
        if mount.mode is not None and known(mount.mode):
            mount_mode(mount.mode)
        for key, value in (("uid", mount.uid), ("gid", mount.gid)):
            if value is not None and known(value):
                mount_id(key, value)
    except MountError as exc:
        raise PybuildError(f"RUN --mount: {exc}", location) from None


def check_run_heredocs(run: Run) -> None:
    """An exec-form RUN takes no heredoc; a heredoc run as a file needs a delimiter that can name it."""
    if not run.heredocs:
        return
    if run.command.exec_form:
        raise PybuildError("RUN in exec form cannot take a heredoc", run.location)
    script = lone_heredoc(run)
    if script is not None and script.content.startswith("#!"):
        name = script.name
        if "/" in name or name in ("", ".", ".."):
            raise PybuildError(f"RUN heredoc: the delimiter {name!r} cannot name the script's file in "
                               f"{HEREDOC_SCRIPT_DIR}", run.location)


# COPY and ADD


def check_copy(instruction: Copy | Add, known: Known = _expanded) -> None:
    """COPY's and ADD's flags and destination, where pybuild can judge them without the files."""
    verb = type(instruction).__name__.upper()
    location = instruction.location
    if isinstance(instruction, Add) and instruction.unpack is not None:
        raise PybuildError("ADD --unpack is not supported by pybuild yet", location)
    inline = len(instruction.source_contents)
    if inline and inline + len(instruction.sources) > 1 and known(instruction.dest) \
            and not instruction.dest.endswith("/"):
        raise PybuildError(f"{verb} with more than one source needs a destination directory ending in /",
                           location)
    if instruction.chmod is not None and known(instruction.chmod):
        from builder.fs.copy import parse_chmod

        try:
            parse_chmod(instruction.chmod, verb)
        except PybuildError as exc:
            raise PybuildError(exc.message, location, hint=exc.hint) from None
    if instruction.chown is not None and known(instruction.chown):
        check_chown_ids(instruction.chown, location)


_NUMERIC_CHOWN = re.compile(r"(?:root|[0-9]*)(?::(?:root|[0-9]*))?")


def check_chown_ids(spec: str, location: SourceRange | None) -> None:
    """A ``--chown`` of numbers (or root) needs no lookup, so its ids are checked before the build.

    Names are looked up in the image's passwd and group files when the step runs.
    """
    if _NUMERIC_CHOWN.fullmatch(spec):
        from pathlib import Path

        from builder.fs.users import resolve_chown

        try:
            resolve_chown(Path("/"), spec)  # numbers only: no file is read
        except PybuildError as exc:
            raise PybuildError(f"--chown={spec}: {exc.message}", location) from None


# Metadata


_PORT = re.compile(r"(?:[0-9.]*:)?(\d+)(?:-(\d+))?(?:/(tcp|udp|sctp))?", re.IGNORECASE)


def exposed_ports(word: str, location: SourceRange | None) -> list[str]:
    """``80``, ``80/udp``, ``8000-8002/tcp`` in docker's normalized ``port/proto`` form."""
    match = _PORT.fullmatch(word)
    if match is None:
        raise PybuildError(f"EXPOSE: invalid port {word!r} (expected PORT, PORT/PROTO or FROM-TO/PROTO)", location)
    first, last, proto = int(match[1]), int(match[2] or match[1]), (match[3] or "tcp").lower()
    if not 0 < first <= last <= 65535:
        raise PybuildError(f"EXPOSE: invalid port range {word!r}", location)
    return [f"{port}/{proto}" for port in range(first, last + 1)]


# The names moby's signal package knows on Linux, without their SIG prefix.
_SIGNALS = frozenset((
    "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL", "PIPE", "POLL",
    "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1",
    "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ", "RTMIN", "RTMAX",
)) | {f"RTMIN+{n}" for n in range(1, 16)} | {f"RTMAX-{n}" for n in range(1, 15)}


def check_signal(signal: str, location: SourceRange | None) -> None:
    """A STOPSIGNAL as BuildKit accepts it: a non-zero number, or a signal's name, with or without SIG."""
    if re.fullmatch(r"[+-]?[0-9]+", signal):
        if int(signal) != 0 and -(2**63) <= int(signal) < 2**63:
            return
    elif signal.upper().removeprefix("SIG") in _SIGNALS:
        return
    raise PybuildError(f"STOPSIGNAL: invalid signal {signal!r}", location, hint="a name such as SIGTERM, or a number")


def _check_expose(instruction: Expose, known: Known) -> None:
    for word in instruction.ports:
        if known(word):
            exposed_ports(word, instruction.location)


def _check_stopsignal(instruction: Stopsignal, known: Known) -> None:
    if known(instruction.signal):
        check_signal(instruction.signal, instruction.location)


_CHECKS: dict[type, Callable[[Instruction, Known], None]] = {
    Run: check_run,  # type: ignore[dict-item]
    Copy: check_copy,  # type: ignore[dict-item]
    Add: check_copy,  # type: ignore[dict-item]
    Expose: _check_expose,  # type: ignore[dict-item]
    Stopsignal: _check_stopsignal,  # type: ignore[dict-item]
}
