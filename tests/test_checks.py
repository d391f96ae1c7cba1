"""Mistakes the Dockerfile's text shows are found before any step runs; mount values are read as BuildKit reads them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from builder.checks import check_graph
from builder.graph import build_graph
from builder.steps import STEPS, FilesystemStep, StepInputs, scratch_state
from parser import parse
from parser.errors import PybuildError
from parser.flags import MountError, mount_id, mount_mode, mount_size

RUN_FIRST = "FROM scratch\nRUN sleep 5\n"  # every case fails on line 3, after a RUN that must not run first


@dataclass
class Case:
    id: str
    text: str  # follows RUN_FIRST
    message: str


ERRORS = [
    Case("EXPOSE protocol", "EXPOSE 80/tcpp\n", "EXPOSE: invalid port '80/tcpp'"),
    Case("EXPOSE range", "EXPOSE 9000-8000\n", "EXPOSE: invalid port range '9000-8000'"),
    Case("EXPOSE one bad word of several", "EXPOSE 80 http\n", "invalid port 'http'"),
    Case("STOPSIGNAL unknown name", "STOPSIGNAL SIGFOO\n", "STOPSIGNAL: invalid signal 'SIGFOO'"),
    Case("STOPSIGNAL zero", "STOPSIGNAL 0\n", "invalid signal '0'"),
    Case("cache mode symbolic", "RUN --mount=type=cache,target=/c,mode=u+rw true\n", "invalid value 'u+rw' for mode"),
    Case("mount type ssh", "RUN --mount=type=ssh true\n", "RUN --mount=type=ssh is not supported"),
    Case("tmpfs size", "RUN --mount=type=tmpfs,target=/t,size=64x true\n", "invalid value '64x' for size"),
    Case("tmpfs negative size", "RUN --mount=type=tmpfs,target=/t,size=-1 true\n", "invalid value '-1' for size"),
    Case("secret symbolic mode", "RUN --mount=type=secret,id=s,mode=u+r true\n", "invalid value 'u+r' for mode"),
    Case("secret mode not octal", "RUN --mount=type=secret,id=s,mode=0999 true\n", "invalid value '0999' for mode"),
    Case("secret uid", "RUN --mount=type=secret,id=s,uid=nobody true\n", "invalid value 'nobody' for uid"),
    Case("secret gid too large", "RUN --mount=type=secret,id=s,gid=4294967296 true\n",
         "invalid value '4294967296' for gid"),
    Case("second mount of a RUN", "RUN --mount=type=tmpfs,target=/a --mount=type=ssh,target=/b true\n",
         "type=ssh"),
    Case("security insecure", "RUN --security=insecure true\n", "RUN --security=insecure is not supported"),
    Case("device", "RUN --device=/dev/fuse true\n", "RUN --device is not supported", ),
    Case("heredoc script name", "RUN <<'a/b'\n#!/bin/sh\ntrue\na/b\n", "the delimiter 'a/b' cannot name"),
    Case("ADD --unpack", "ADD --unpack=true a.tar /x/\n", "ADD --unpack is not supported"),
    Case("COPY symbolic chmod", "COPY --chmod=u+x a /a\n", "COPY --chmod=u+x: only octal modes"),
    Case("ADD symbolic chmod", "ADD --chmod=g-w a /a\n", "ADD --chmod=g-w: only octal modes"),
    Case("COPY chown id out of range", "COPY --chown=4294967296:0 a /a\n", "uids and gids must be in range"),
    Case("COPY inline sources need a directory", "COPY <<one <<two /dest\n1\none\n2\ntwo\n",
         "more than one source needs a destination directory ending in /"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[case.id for case in ERRORS])
def test_error_before_any_step(case: Case) -> None:
    dockerfile = parse(("# syntax=docker/dockerfile:1-labs\n" if "--device" in case.text else "")
                       + RUN_FIRST + case.text)
    graph = build_graph(dockerfile, {}, None)
    with pytest.raises(PybuildError, match=re.escape(case.message)) as caught:
        check_graph(graph)
    assert caught.value.location is not None
    assert caught.value.location.start_line == 3 + ("--device" in case.text)
    assert caught.value.location.column == 1


ACCEPTED = [
    "EXPOSE 80 53/udp 8000-8002/TCP 8080:80\n",
    "STOPSIGNAL sigterm\nSTOPSIGNAL SIGRTMIN+3\nSTOPSIGNAL 9\n",
    "RUN --mount=type=tmpfs,target=/t,size=1.5GiB --mount=type=secret,id=s,mode=0440,uid=1000,gid=0 true\n",
    "RUN --mount=type=bind,source=a,target=/a,rw true\n",
    "RUN --security=sandbox --network=none true\n",
    "RUN <<EOF\n#!/bin/sh\ntrue\nEOF\n",
    "COPY --chmod=0755 --chown=1000:root a /a\nCOPY --chown=app:staff a /a\nADD --chmod=644 a /a\n",
    "COPY <<one <<two /dest/\n1\none\n2\ntwo\n",
    # Values with a variable reference are known only once expanded, when their step runs.
    "ARG P=80/tcpp\nEXPOSE $P\nSTOPSIGNAL ${S}\nCOPY --chmod=$M a /a\n",
    "RUN --mount=type=tmpfs,target=/t,size=$SIZE --mount=type=secret,id=s,mode=${MODE},uid=$U true\n",
    "COPY <<one <<two $DEST\n1\none\n2\ntwo\n",
    # Quotes and escapes change a value when it is expanded.
    "EXPOSE '80'\nSTOPSIGNAL \"SIGTERM\"\n",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_accepted_as_written(text: str) -> None:
    check_graph(build_graph(parse(RUN_FIRST + text), {}, None))


def test_only_the_stages_the_target_needs() -> None:
    text = "FROM scratch AS broken\nEXPOSE 80/tcpp\nFROM scratch AS app\nRUN true\nFROM app\nEXPOSE 80\n"
    check_graph(build_graph(parse(text), {}, None))
    with pytest.raises(PybuildError, match="80/tcpp"):
        check_graph(build_graph(parse(text), {}, "broken"))
    needed_through_copy = text.replace("RUN true", "COPY --from=broken /x /x")
    with pytest.raises(PybuildError, match="80/tcpp"):
        check_graph(build_graph(parse(needed_through_copy), {}, None))


@pytest.mark.parametrize(("text", "message"), [
    ("ARG P=80/tcpp\nEXPOSE $P\n", "invalid port '80/tcpp'"),
    ("ARG S=SIGFOO\nSTOPSIGNAL $S\n", "invalid signal 'SIGFOO'"),
    ("ARG SIZE=1x\nRUN --mount=type=tmpfs,target=/t,size=$SIZE true\n", "invalid value '1x' for size"),
    ("ARG MODE=u+r\nRUN --mount=type=secret,id=s,mode=$MODE true\n", "invalid value 'u+r' for mode"),
    ("ARG M=u+x\nCOPY --chmod=$M a /a\n", "only octal modes"),
    ("ARG DEST=/dest\nCOPY <<one <<two $DEST\n1\none\n2\ntwo\n", "destination directory ending in /"),
])
def test_expanded_values_are_checked_by_their_step(text: str, message: str) -> None:
    dockerfile = parse("FROM scratch\n" + text)
    check_graph(build_graph(dockerfile, {}, None))  # nothing to say before expansion
    state = scratch_state("1970-01-01T00:00:00Z")
    with pytest.raises(PybuildError, match=re.escape(message)) as caught:
        for instruction in dockerfile.instructions[1:]:
            outcome = STEPS[type(instruction)](StepInputs(), state, instruction)
            assert not isinstance(outcome, FilesystemStep), "the step must fail before it runs anything"
            state = outcome
    assert caught.value.location is not None and caught.value.location.start_line == 3


@pytest.mark.parametrize(("text", "size"), [
    ("64m", 64 << 20), ("1g", 1 << 30), ("1.5GiB", 3 << 29), ("100", 100), ("10kb", 10 << 10), ("10KB", 10 << 10),
    ("2t", 2 << 40), ("1p", 1 << 50), ("100b", 100), ("1 k", 1024), ("0", 0), (".5k", 512), ("1.9", 1),
])
def test_mount_size(text: str, size: int) -> None:
    assert mount_size(text) == size


@pytest.mark.parametrize("text", ["-1", "1x", "", "m", "1ib", "1kbb", "1 2", "1_000", "nan", "1e400", "64 mb "])
def test_mount_size_rejects(text: str) -> None:
    with pytest.raises(MountError, match="for size"):
        mount_size(text)


@pytest.mark.parametrize(("text", "mode"), [("0400", 0o400), ("755", 0o755), ("0", 0), ("37777777777", 2**32 - 1)])
def test_mount_mode(text: str, mode: int) -> None:
    assert mount_mode(text) == mode


@pytest.mark.parametrize("text", ["u+r", "0999", "", "-1", "0o400", "40000000000", " 400"])
def test_mount_mode_rejects(text: str) -> None:
    with pytest.raises(MountError, match=re.escape(f"invalid value {text!r} for mode")):
        mount_mode(text)


@pytest.mark.parametrize(("text", "valid"), [("0", True), ("1000", True), ("4294967295", True),
                                             ("4294967296", False), ("-1", False), ("root", False), ("", False),
                                             ("1e3", False), ("١٢", False)])
def test_mount_ids(text: str, valid: bool) -> None:
    if valid:
        assert mount_id("uid", text) == int(text)
    else:
        with pytest.raises(MountError, match=re.escape(f"invalid value {text!r} for uid")):
            mount_id("uid", text)
