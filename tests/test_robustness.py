"""Whatever the input, parsing either succeeds or raises a PybuildError: never a traceback."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parser import PybuildError, dump, parse, parse_raw

# Pieces that exercise the tricky corners: flags, heredocs, escapes, quotes, JSON, directives.
PIECES = [
    "RUN",
    "COPY",
    "FROM",
    "ENV",
    "ARG",
    "ONBUILD",
    "HEALTHCHECK",
    "CMD",
    "LABEL",
    "ADD",
    "SHELL",
    "USER",
    "--",
    "--x=1",
    "--mount=type=bind,target=/x",
    "--from=a",
    "--link",
    "<<EOF",
    "<<-'E'",
    "EOF",
    "E",
    "3<<X",
    "\n",
    "\r\n",
    " ",
    "\t",
    "\\",
    "`",
    '"',
    "'",
    "[",
    "]",
    '["a"]',
    "[1]",
    "# escape=`",
    "#",
    "a=b",
    "$X",
    "${X:-y}",
    "${",
    "\u00a0",
    "\ufeff",
    "AS",
    "x",
    "\x00",
    "\udc80",
]
quick = settings(max_examples=400, suppress_health_check=list(HealthCheck), deadline=None)


def _parse_everything(text: str | bytes) -> None:
    try:
        dump(parse_raw(text))
    except PybuildError as exc:
        assert exc.render()
    try:
        parse(text)
    except PybuildError as exc:
        assert exc.render()


@quick
@given(st.lists(st.sampled_from(PIECES), max_size=40).map("".join))
def test_dockerfile_like_text(text: str) -> None:
    _parse_everything(text)


@quick
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    _parse_everything(data)
