"""The line pre-pass: directives, continuations, warnings, and where errors point."""

from __future__ import annotations

import pytest

from parser import DockerfileSyntaxError, dump, parse, parse_raw
from parser.lines import read_source

# (name, Dockerfile text, expected directives as {name: value}, expected escape character)
DIRECTIVE_CASES = [
    ("none", "FROM a\n", {}, "\\"),
    ("escape backtick", "# escape=`\nFROM a\n", {"escape": "`"}, "`"),
    ("spaces around", "#  escape =  `  \nFROM a\n", {"escape": "`"}, "`"),
    ("key case-insensitive", "# ESCAPE=`\nFROM a\n", {"escape": "`"}, "`"),
    ("leading blanks", "   # escape=`\nFROM a\n", {"escape": "`"}, "`"),
    (
        "syntax then escape",
        "# syntax=docker/dockerfile:1\n# escape=`\nFROM a\n",
        {"syntax": "docker/dockerfile:1", "escape": "`"},
        "`",
    ),
    (
        "check",
        "# check=skip=JSONArgsRecommended;error=true\nFROM a\n",
        {"check": "skip=JSONArgsRecommended;error=true"},
        "\\",
    ),
    ("after a comment it is a comment", "# hello\n# escape=`\nFROM a\n", {}, "\\"),
    ("after a blank line it is a comment", "\n# escape=`\nFROM a\n", {}, "\\"),
    ("unknown key ends the block", "# key=value\n# escape=`\nFROM a\n", {}, "\\"),
    ("empty value is no directive", "# escape=\n# syntax=x\nFROM a\n", {}, "\\"),
    ("shebang ends the block", "#!/usr/bin/env pybuild\n# escape=`\nFROM a\n", {}, "\\"),
    ("BOM before the directive", "\ufeff# escape=`\nFROM a\n", {"escape": "`"}, "`"),
    ("CRLF", "# escape=`\r\nFROM a\r\n", {"escape": "`"}, "`"),
]


@pytest.mark.parametrize(
    ("text", "expected", "escape"), [c[1:] for c in DIRECTIVE_CASES], ids=[c[0] for c in DIRECTIVE_CASES]
)
def test_directives(text: str, expected: dict[str, str], escape: str) -> None:
    source = read_source(text)
    assert {d.name: d.value for d in source.directives} == expected
    assert source.escape == escape


# (name, text, message fragment, line, column)
DIRECTIVE_ERRORS = [
    ("repeated", "# escape=`\n# escape=\\\nFROM a\n", "only one escape parser directive can be used", 2, 1),
    ("bad escape", "# escape=x\nFROM a\n", "invalid escape token 'x'", 1, 1),
    ("after the first instruction", "FROM a\n# escape=`\nRUN b\n", "must come before the first instruction", 2, 1),
    ("foreign frontend", "# syntax=example.com/my/frontend:1\nFROM a\n", "unsupported frontend", 1, 1),
]


@pytest.mark.parametrize(
    ("text", "message", "line", "column"), [c[1:] for c in DIRECTIVE_ERRORS], ids=[c[0] for c in DIRECTIVE_ERRORS]
)
def test_directive_errors(text: str, message: str, line: int, column: int) -> None:
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse(text)
    assert message in caught.value.message
    assert (caught.value.location.start_line, caught.value.location.column) == (line, column)


def test_docker_frontends_are_accepted() -> None:
    for syntax in (
        "docker/dockerfile:1",
        "docker/dockerfile:1.7-labs",
        "docker.io/docker/dockerfile:1",
        "docker/dockerfile-upstream:master",
    ):
        assert parse(f"# syntax={syntax}\nFROM a\n").directives[0].value == syntax


def test_directive_after_leading_comment_warns() -> None:
    dockerfile = parse("# a licence header\n# syntax=docker/dockerfile:1\nFROM a\n")
    assert dockerfile.directives == ()
    assert [(w.line, "is a comment, not a directive" in w.message) for w in dockerfile.warnings] == [(2, True)]


def test_empty_continuation_lines_warn_once_per_instruction() -> None:
    # BuildKit's own parser test: exactly two warnings, naming each whole logical line.
    text = (
        "FROM busybox\n\nRUN something \\\n\n    following \\\n\n    more\n\n"
        "RUN another \\\n\n    thing\nRUN non-indented \\\n# this is a comment\n   after-comment\n\n"
        "RUN indented \\\n    # this is an indented comment\n   comment\n"
    )
    raw = parse_raw(text)
    assert [w.message for w in raw.warnings] == [
        "Empty continuation line found in: RUN something     following     more",
        "Empty continuation line found in: RUN another     thing",
    ]
    assert dump(raw).splitlines()[-2:] == ['(run "non-indented    after-comment")', '(run "indented    comment")']


def test_line_longer_than_buildkit_allows() -> None:
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse_raw("FROM a\nRUN " + "x" * 65536 + "\n")
    assert caught.value.location.start_line == 2
    assert "longer than the maximum of 65535 bytes" in caught.value.message


def test_error_column_in_a_continuation_line() -> None:
    text = "FROM a\nCOPY --chown=1 \\\n     --frm=b \\\n     x /y\n"
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse(text)
    error = caught.value
    assert error.message == "unknown flag: --frm"
    assert (error.location.start_line, error.location.column) == (3, 6)
    assert error.render().splitlines() == [
        "Dockerfile:3:6: unknown flag: --frm",
        "       --frm=b \\",
        "       ^",
        "hint: did you mean --from?",
    ]


def test_instruction_lines_span_continuations_and_heredocs() -> None:
    text = "FROM a\n\nRUN a \\\n  # note\n  b\nCOPY <<EOF /x\nbody\nEOF\nCMD c\n"
    raw = parse_raw(text)
    assert [(n.start_line, n.end_line) for n in raw.nodes] == [(1, 1), (3, 5), (6, 8), (9, 9)]


def test_undecodable_bytes_survive_to_the_dump() -> None:
    # Invalid UTF-8 is kept byte for byte and dumped as \\xHH, as Go's strconv.Quote does.
    assert dump(parse_raw(b"FROM a\nRUN echo \xff\xfe\n")) == '(from "a")\n(run "echo \\xff\\xfe")'
