"""The build graph: stages, dependencies, --target pruning, global ARGs in FROM, and its errors."""

from __future__ import annotations

import pytest

from builder.graph import build_graph, platform_args
from parser import parse
from parser.errors import PybuildError

MULTI = """\
ARG BASE=busybox
ARG TAG
FROM ${BASE}:${TAG:-latest} AS deps
RUN echo deps
FROM scratch AS assets
COPY x /x
FROM deps AS build
COPY --from=assets /x /x
FROM build AS test
RUN false
FROM scratch AS final
ARG FROMSTAGE=build
COPY --from=$FROMSTAGE /x /x
RUN --mount=type=bind,from=assets,target=/a true
"""

GRAPH_CASES = [
    # (name, dockerfile, build args, target, expected (base per stage), expected needed stages)
    ("last stage by default", MULTI, {}, None,
     ["busybox:latest", "scratch", "deps", "build", "scratch"], (0, 1, 2, 4)),
    ("target prunes unrelated stages", MULTI, {}, "build",
     ["busybox:latest", "scratch", "deps", "build", "scratch"], (0, 1, 2)),
    ("target by index", MULTI, {}, "1", None, (1,)),
    ("target names are case-insensitive", MULTI, {}, "ASSETS", None, (1,)),
    ("build arg overrides a global ARG in FROM", MULTI, {"BASE": "alpine", "TAG": "3"}, "deps",
     ["alpine:3", "scratch", "deps", "build", "scratch"], (0,)),
    ("COPY --from by index", "FROM scratch\nFROM scratch\nCOPY --from=0 /a /a\n", {}, None, None, (0, 1)),
    ("image references are not stages", "FROM scratch\nCOPY --from=busybox /a /a\n", {}, None, None, (0,)),
    ("automatic platform args in FROM", "FROM img:$TARGETARCH\n", {}, None,
     [f"img:{platform_args()['TARGETARCH']}"], (0,)),
]


@pytest.mark.parametrize(("name", "text", "build_args", "target", "bases", "needed"), GRAPH_CASES,
                         ids=[case[0] for case in GRAPH_CASES])
def test_graph(name, text, build_args, target, bases, needed) -> None:
    graph = build_graph(parse(text), build_args, target)
    if bases is not None:
        assert [stage.base for stage in graph.stages] == bases
    assert graph.needed == needed


def test_dependencies_of_each_stage() -> None:
    graph = build_graph(parse(MULTI), {}, None)
    assert [stage.depends_on for stage in graph.stages] == [(), (), (0, 1), (2,), (2, 1)]


def test_unused_build_args_are_reported() -> None:
    args = {"USED": "1", "ALSO": "2", "NOPE": "3", "HTTP_PROXY": "x", "SOURCE_DATE_EPOCH": "1"}
    graph = build_graph(parse("ARG USED\nFROM scratch\nARG ALSO\n"), args, None)
    assert graph.unused_build_args == ("NOPE",)


ERROR_CASES = [
    ("no FROM", "ARG A=1\n", None, "no FROM instruction"),
    ("instruction before FROM", "ENV A=1\nFROM scratch\n", None, "ENV must come after FROM"),
    ("unknown target", "FROM scratch AS a\n", "b", "target stage 'b' could not be found (named stages: a)"),
    ("duplicate stage", "FROM scratch AS a\nFROM scratch AS A\n", None, "duplicate stage name 'a'"),
    ("empty FROM", "ARG B\nFROM $B\n", None, "FROM names no image"),
    ("foreign platform", "FROM --platform=linux/s390x scratch\n", None, "only builds for this machine"),
]


@pytest.mark.parametrize(("name", "text", "target", "message"), ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_graph_errors(name, text, target, message) -> None:
    with pytest.raises(PybuildError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_graph(parse(text), {}, target)
