"""Heredocs at parse time (conformance README 4.8): which words start one, how bodies are read, what they hold.

Re-creates the essence of BuildKit's parser_heredoc_test.go and instructions/parse_heredoc_test.go as tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from parser import DockerfileSyntaxError, dump, parse, parse_raw
from parser.instructions import Add, Copy, Onbuild, Run
from parser.lines import Heredoc
from parser.nodes import go_quote


def H(name: str, content: str, *, fd: int = 0, chomp: bool = False, expand: bool = True) -> Heredoc:  # noqa: N802
    return Heredoc(name=name, content=content, fd=fd, chomp=chomp, expand=expand)


# --- the delimiter word ---------------------------------------------------------------------------------------------
# (id, heredoc word as written after `RUN cat `, name, expand, chomp, fd): README 4.8's delimiter table.
DELIMITERS = [
    ("plain", "<<EOF", "EOF", True, False, 0),
    ("chomp", "<<-EOF", "EOF", True, True, 0),
    ("single-quoted", "<<'EOF'", "EOF", False, False, 0),
    ("double-quoted", '<<"EOF"', "EOF", False, False, 0),
    ("chomp single-quoted", "<<-'EOF'", "EOF", False, True, 0),
    ("chomp double-quoted", '<<-"EOF"', "EOF", False, True, 0),
    ('part quoted E"OF"', '<<E"OF"', "EOF", False, False, 0),
    ('part quoted EO"F"', '<<EO"F"', "EOF", False, False, 0),
    ("part quoted eo'f'", "<<eo'f'", "eof", False, False, 0),
    ("escaped quote keeps expand", "<<eo\\'f", "eo'f", True, False, 0),
    ("quoted and escaped", "<<'e'o\\'f", "eo'f", False, False, 0),
    ("quoted with a space", "<<'one two'", "one two", False, False, 0),
    ("dollar is literal", "<<$EOF", "$EOF", True, False, 0),
    ("blanks after <<", "<<  EOF  > foo", "EOF", True, False, 0),
    ("tab after <<", "<<\tEOF", "EOF", True, False, 0),
    ("space before the dash: no chomp", "<< -EOF", "-EOF", True, False, 0),
    ("fd 3", "3<<EOF", "EOF", True, False, 3),
    ("fd 4 with chomp", "4<<-EOF", "EOF", True, True, 4),
    ("fd with leading zeros", "007<<EOF", "EOF", True, False, 7),
    # Go's ParseUint saturates (its error is ignored): a huge fd is the largest uint64, not a crash.
    ("huge fd", "9" * 5000 + "<<EOF", "EOF", True, False, 2**64 - 1),
    ("dotted name", "<<file.txt", "file.txt", True, False, 0),
]


@pytest.mark.parametrize(
    ("word", "name", "expand", "chomp", "fd"), [c[1:] for c in DELIMITERS], ids=[c[0] for c in DELIMITERS]
)
def test_heredoc_delimiter(word: str, name: str, expand: bool, chomp: bool, fd: int) -> None:
    text = f"FROM a\nRUN cat {word}\nbody $X\n{name}\nCMD done\n"
    raw = parse_raw(text)
    run = raw.nodes[1]
    assert run.heredocs == (H(name, "body $X\n", fd=fd, chomp=chomp, expand=expand),)
    assert (run.start_line, run.end_line) == (2, 4)
    # The heredoc token stays an ordinary argument; the body is never dumped.
    assert dump(raw) == f'(from "a")\n(run {go_quote("cat " + word)})\n(cmd "done")'
    assert raw.nodes[2].start_line == 5


# (id, heredoc-looking text after `RUN `, dump of that RUN line): README 4.8 "These are not heredocs".
# The next line, `EOF`, is then an instruction of its own: `(eof "")`.
NOT_HEREDOCS = [
    ("double-quoted word", '"<<EOF"', '(run "\\"<<EOF\\"")'),
    ("single-quoted word", "'<<EOF'", "(run \"'<<EOF'\")"),
    ("bare <<", "cat <<", '(run "cat <<")'),
    ("bare <<-", "cat <<-", '(run "cat <<-")'),
    ("single <", "cat <EOF", '(run "cat <EOF")'),
    ("here-string <<<", "cat <<<EOF", '(run "cat <<<EOF")'),
    # code-derived (README 4.8): the whole-line lexer gives the word `<<-` and then `EOF`, so no heredoc,
    # although BuildKit's standalone-helper table lists `<<- EOF` as valid.
    ("space after the dash", "cat <<- EOF", '(run "cat <<- EOF")'),
    ("glued to a command word", "cat<<EOF", '(run "cat<<EOF")'),
    ("inside a word", "echo a<<EOF", '(run "echo a<<EOF")'),
    # Go's regexp \d is ASCII: a non-ASCII digit is not a file descriptor.
    ("non-ASCII digit before <<", "cat \u0663<<EOF", '(run "cat \u0663<<EOF")'),
    # An unbalanced quote anywhere on the line makes the whole-line lexing fail: no heredoc, no error.
    ("unbalanced quote before it", "echo it's <<EOF", '(run "echo it\'s <<EOF")'),
    ("unterminated quoted delimiter", '<<"EOF', '(run "<<\\"EOF")'),
    ("unterminated single-quoted delimiter", "<<'EOF", '(run "<<\'EOF")'),
    ("JSON form", '["cat", "<<EOF"]', '(run "cat" "<<EOF")'),
    ("JSON form, quoted delimiter", "[\"<<'EOF'\"]", "(run \"<<'EOF'\")"),
]


@pytest.mark.parametrize(("rest", "expected"), [c[1:] for c in NOT_HEREDOCS], ids=[c[0] for c in NOT_HEREDOCS])
def test_not_a_heredoc(rest: str, expected: str) -> None:
    raw = parse_raw(f"FROM a\nRUN {rest}\nEOF\n")
    assert dump(raw) == f'(from "a")\n{expected}\n(eof "")'
    assert [n.heredocs for n in raw.nodes] == [(), (), ()]
    assert [(n.start_line, n.end_line) for n in raw.nodes] == [(1, 1), (2, 2), (3, 3)]


# --- whole files: per instruction its dump line, heredocs and (start, end) lines ------------------------------------
@dataclass(frozen=True)
class FileCase:
    id: str
    text: str
    expected: list[tuple[str, tuple[Heredoc, ...], tuple[int, int]]]


FILES = [
    FileCase(
        "run body",
        "FROM a\nRUN <<EOF\necho hello\necho $HOME\nEOF\nCMD x\n",
        [
            ('(from "a")', (), (1, 1)),
            ('(run "<<EOF")', (H("EOF", "echo hello\necho $HOME\n"),), (2, 5)),
            ('(cmd "x")', (), (6, 6)),
        ],
    ),
    FileCase(
        "chomp keeps tabs, terminator may be tab-indented",
        "FROM a\nRUN <<-EOF\n\tbaz\n\t\tquux\n\tEOF\n",
        [('(from "a")', (), (1, 1)), ('(run "<<-EOF")', (H("EOF", "\tbaz\n\t\tquux\n", chomp=True),), (2, 5))],
    ),
    FileCase(
        "chomp with an unindented terminator",
        "FROM a\nRUN <<-EOF\n\tbaz\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(run "<<-EOF")', (H("EOF", "\tbaz\n", chomp=True),), (2, 4))],
    ),
    FileCase(
        "chomp strips tabs, not spaces, before comparing",
        "FROM a\nRUN <<-EOF\n  EOF\n\t \tEOF\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(run "<<-EOF")', (H("EOF", "  EOF\n\t \tEOF\n", chomp=True),), (2, 5))],
    ),
    FileCase(
        "without chomp a tab-indented terminator is body",
        "FROM a\nRUN <<EOF\n\tfoo\n\tEOF\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(run "<<EOF")', (H("EOF", "\tfoo\n\tEOF\n"),), (2, 5))],
    ),
    FileCase(
        "trailing blanks make a line body, not the terminator",
        "FROM a\nRUN <<EOF\nEOF \nEOF\t\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(run "<<EOF")', (H("EOF", "EOF \nEOF\t\n"),), (2, 5))],
    ),
    FileCase(
        "terminator is case-sensitive",
        "FROM a\nRUN <<EOF\neof\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(run "<<EOF")', (H("EOF", "eof\n"),), (2, 4))],
    ),
    FileCase(
        "empty body",
        "FROM a\nRUN <<EMPTY\nEMPTY\nRUN 3<<EMPTY2\nEMPTY2\n",
        [
            ('(from "a")', (), (1, 1)),
            ('(run "<<EMPTY")', (H("EMPTY", ""),), (2, 3)),
            ('(run "3<<EMPTY2")', (H("EMPTY2", "", fd=3),), (4, 5)),
        ],
    ),
    FileCase(
        "comment, escape, blank, directive and instruction lines are body",
        "FROM a\nRUN <<COMMENT\n# internal comment\n# escape=`\necho foo \\\n\n  bar # trailing\nFROM x\n"
        "RUN <<NESTED\nCOMMENT\n",
        [
            ('(from "a")', (), (1, 1)),
            (
                '(run "<<COMMENT")',
                (
                    H(
                        "COMMENT",
                        "# internal comment\n# escape=`\necho foo \\\n\n  bar # trailing\nFROM x\nRUN <<NESTED\n",
                    ),
                ),
                (2, 10),
            ),
        ],
    ),
    FileCase(
        "CRLF bodies keep their line endings",
        "FROM a\r\nRUN <<EOF\r\nline1\r\nline2\r\nEOF\r\nCMD x\r\n",
        [
            ('(from "a")', (), (1, 1)),
            ('(run "<<EOF")', (H("EOF", "line1\r\nline2\r\n"),), (2, 5)),
            ('(cmd "x")', (), (6, 6)),
        ],
    ),
    FileCase(
        "mixed line endings are kept as they are",
        "FROM a\nRUN <<EOF\r\none\r\ntwo\nEOF\r\n",
        [('(from "a")', (), (1, 1)), ('(run "<<EOF")', (H("EOF", "one\r\ntwo\n"),), (2, 5))],
    ),
    FileCase(
        "terminator at end of file without a newline",
        "FROM a\nRUN <<EOF\nx\nEOF",
        [('(from "a")', (), (1, 1)), ('(run "<<EOF")', (H("EOF", "x\n"),), (2, 4))],
    ),
    FileCase(
        "two heredocs on one RUN line, bodies in order",
        "FROM a\nRUN <<F1 cat > a && <<F2 cat > b\none\nF1\ntwo\nF2\nCMD x\n",
        [
            ('(from "a")', (), (1, 1)),
            ('(run "<<F1 cat > a && <<F2 cat > b")', (H("F1", "one\n"), H("F2", "two\n")), (2, 6)),
            ('(cmd "x")', (), (7, 7)),
        ],
    ),
    FileCase(
        "COPY two files",
        "FROM a\nCOPY <<FILE1 <<FILE2 /dest\ncontent 1\nFILE1\ncontent 2\nFILE2\n",
        [
            ('(from "a")', (), (1, 1)),
            ('(copy "<<FILE1" "<<FILE2" "/dest")', (H("FILE1", "content 1\n"), H("FILE2", "content 2\n")), (2, 6)),
        ],
    ),
    FileCase(
        "swapped delimiters",
        "FROM a\nCOPY <<X <<Y /dest\nY\nX\nX\nY\n",
        [('(from "a")', (), (1, 1)), ('(copy "<<X" "<<Y" "/dest")', (H("X", "Y\n"), H("Y", "X\n")), (2, 6))],
    ),
    FileCase(
        "quotes in a COPY body stay",
        "FROM a\nCOPY <<EOF /quotes\n\"foo\"\n'bar'\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(copy "<<EOF" "/quotes")', (H("EOF", "\"foo\"\n'bar'\n"),), (2, 5))],
    ),
    FileCase(
        "heredoc with a program after it",
        "FROM a\nRUN <<COMPLEX python3\nprint('hello world')\nCOMPLEX\n",
        [('(from "a")', (), (1, 1)), ('(run "<<COMPLEX python3")', (H("COMPLEX", "print('hello world')\n"),), (2, 4))],
    ),
    FileCase(
        "RUN --mount then a heredoc",
        "FROM a\nRUN --mount=type=cache,target=/foo <<MOUNT\necho hello\nMOUNT\n",
        [
            ('(from "a")', (), (1, 1)),
            ('(run ["--mount=type=cache,target=/foo"] "<<MOUNT")', (H("MOUNT", "echo hello\n"),), (2, 4)),
        ],
    ),
    FileCase(
        "ADD",
        "FROM a\nADD <<EOF /etc/motd\nhi\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(add "<<EOF" "/etc/motd")', (H("EOF", "hi\n"),), (2, 4))],
    ),
    FileCase(
        "lower-case keyword",
        "from a\nrun <<eof\nx\neof\n",
        [('(from "a")', (), (1, 1)), ('(run "<<eof")', (H("eof", "x\n"),), (2, 4))],
    ),
    FileCase(
        "ONBUILD RUN",
        "FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(onbuild (run "<<EOF"))', (H("EOF", "echo hi\n"),), (2, 4))],
    ),
    FileCase(
        "ONBUILD COPY",
        "FROM a\nONBUILD COPY <<EOF /x\nhi\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(onbuild (copy "<<EOF" "/x"))', (H("EOF", "hi\n"),), (2, 4))],
    ),
    FileCase(
        "heredoc on a continuation line: body after the last joined line",
        "FROM a\nRUN cat \\\n  <<EOF\nbody\nEOF\nCMD x\n",
        [
            ('(from "a")', (), (1, 1)),
            ('(run "cat   <<EOF")', (H("EOF", "body\n"),), (2, 5)),
            ('(cmd "x")', (), (6, 6)),
        ],
    ),
    FileCase(
        # README 4.3: heredoc detection always uses backslash, whatever the escape directive says.
        "backtick escape directive: heredoc lexing still uses backslash",
        "# escape=`\nFROM a\nRUN <<eo\\'f\nx\neo'f\n",
        [('(from "a")', (), (2, 2)), ('(run "<<eo\\\\\'f")', (H("eo'f", "x\n"),), (3, 5))],
    ),
    FileCase(
        "USER is no heredoc instruction: the next line is an instruction",
        "FROM a\nUSER <<X\nX\n",
        [('(from "a")', (), (1, 1)), ('(user "<<X")', (), (2, 2)), ('(x "")', (), (3, 3))],
    ),
    FileCase(
        "CMD is no heredoc instruction",
        "FROM a\nCMD cat <<EOF\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(cmd "cat <<EOF")', (), (2, 2)), ('(eof "")', (), (3, 3))],
    ),
    FileCase(
        "ONBUILD of a non-heredoc instruction",
        "FROM a\nONBUILD CMD <<EOF\nEOF\n",
        [('(from "a")', (), (1, 1)), ('(onbuild (cmd "<<EOF"))', (), (2, 2)), ('(eof "")', (), (3, 3))],
    ),
    FileCase(
        "COPY in JSON form",
        'FROM a\nCOPY ["<<EOF", "/d"]\nEOF\n',
        [('(from "a")', (), (1, 1)), ('(copy "<<EOF" "/d")', (), (2, 2)), ('(eof "")', (), (3, 3))],
    ),
    FileCase(
        "blank and comment lines after the terminator are not part of the instruction",
        "FROM a\nRUN <<EOF\nx\nEOF\n\n# c\n\nCMD y\n\n",
        [('(from "a")', (), (1, 1)), ('(run "<<EOF")', (H("EOF", "x\n"),), (2, 4)), ('(cmd "y")', (), (8, 8))],
    ),
]


@pytest.mark.parametrize("case", FILES, ids=[c.id for c in FILES])
def test_heredoc_files(case: FileCase) -> None:
    raw = parse_raw(case.text)
    assert dump(raw) == "\n".join(e[0] for e in case.expected)
    assert [n.heredocs for n in raw.nodes] == [e[1] for e in case.expected]
    assert [(n.start_line, n.end_line) for n in raw.nodes] == [e[2] for e in case.expected]


def test_heredoc_end_line_reaches_the_typed_instruction() -> None:
    dockerfile = parse("FROM a\nRUN <<A <<B\na\nA\nb\nB\nCMD x\n")
    run = dockerfile.instructions[1]
    assert isinstance(run, Run)
    assert (run.location.start_line, run.location.end_line, run.location.column) == (2, 6, 1)
    assert run.heredocs == (H("A", "a\n"), H("B", "b\n"))
    assert run.command.args == ("<<A <<B",)
    assert dockerfile.instructions[2].location.start_line == 7


# --- COPY/ADD: heredocs as sources (typed instructions) -------------------------------------------------------------
# (id, text after FROM, expected sources, dest, source_contents)
COPY_SOURCES = [
    ("heredoc only", "COPY <<EOF /dest\nhi\nEOF\n", (), "/dest", (H("EOF", "hi\n"),)),
    (
        "paths and heredocs mixed",
        "COPY a <<F1 b <<-'F2' /dest/\none\nF1\n\ttwo\n\tF2\n",
        ("a", "b"),
        "/dest/",
        (H("F1", "one\n"), H("F2", "\ttwo\n", chomp=True, expand=False)),
    ),
    ("ADD heredoc", "ADD <<EOF /etc/motd\n$GREETING\nEOF\n", (), "/etc/motd", (H("EOF", "$GREETING\n"),)),
    ("quoted word is a path", 'COPY "<<EOF" /dest\n', ('"<<EOF"',), "/dest", ()),
    ("flags before the heredoc", "COPY --chmod=0644 <<EOF /dest\nx\nEOF\n", (), "/dest", (H("EOF", "x\n"),)),
]


@pytest.mark.parametrize(
    ("text", "sources", "dest", "contents"), [c[1:] for c in COPY_SOURCES], ids=[c[0] for c in COPY_SOURCES]
)
def test_copy_heredoc_sources(text: str, sources: tuple, dest: str, contents: tuple) -> None:
    instruction = parse("FROM a\n" + text).instructions[1]
    assert isinstance(instruction, Copy | Add)
    assert (instruction.sources, instruction.dest, instruction.source_contents) == (sources, dest, contents)


def test_onbuild_run_heredoc_keeps_its_body() -> None:
    onbuild = parse("FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\n").instructions[1]
    assert isinstance(onbuild, Onbuild)
    assert isinstance(onbuild.trigger, Run)
    assert onbuild.trigger.heredocs == (H("EOF", "echo hi\n"),)
    assert onbuild.trigger.command.args == ("<<EOF",)
    # BuildKit stores the trigger with each body and terminator appended, so it can be parsed again later.
    assert onbuild.expression == "RUN <<EOF\necho hi\nEOF"
    assert parse_raw("FROM b\n" + onbuild.expression + "\n").nodes[1].heredocs == onbuild.trigger.heredocs


# --- errors ---------------------------------------------------------------------------------------------------------
# (id, text, message fragment, line, column)
ERRORS = [
    ("unterminated", "FROM a\nRUN <<EOF\necho hi\n", "unterminated heredoc: no line 'EOF' before the end", 2, 5),
    ("unterminated at end of file", "FROM a\nRUN <<EOF", "unterminated heredoc", 2, 5),
    ("terminator with trailing space", "FROM a\nRUN <<EOF\nx\nEOF \n", "unterminated heredoc", 2, 5),
    ("indented terminator without chomp", "FROM a\nRUN <<EOF\nx\n\tEOF\n", "unterminated heredoc", 2, 5),
    ("second of two unterminated", "FROM a\nCOPY <<A <<B /d\na\nA\nb\n", "no line 'B'", 2, 10),
    ("unterminated with fd", "FROM a\nRUN cat 3<<EOF\n", "unterminated heredoc", 2, 9),
    ("unterminated in ONBUILD", "FROM a\nONBUILD RUN <<X\n", "unterminated heredoc: no line 'X'", 2, 13),
    # BuildKit says "COPY cannot accept a heredoc as a destination".
    ("COPY heredoc destination", "FROM a\nCOPY foo <<EOF\nhi\nEOF\n", "COPY cannot use a heredoc as its dest", 2, 10),
    ("ADD heredoc destination", "FROM a\nADD <<A <<B\na\nA\nb\nB\n", "ADD cannot use a heredoc as its dest", 2, 9),
]


@pytest.mark.parametrize(("text", "message", "line", "column"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_heredoc_errors(text: str, message: str, line: int, column: int) -> None:
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse(text)
    error = caught.value
    assert message in error.message
    assert (error.location.file, error.location.start_line, error.location.column) == ("Dockerfile", line, column)
    rendered = error.render().splitlines()
    assert rendered[0] == f"Dockerfile:{line}:{column}: {error.message}"
    assert rendered[1] == "  " + text.split("\n")[line - 1]
    assert rendered[2] == "  " + " " * (column - 1) + "^"


def test_unterminated_heredoc_hint() -> None:
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse_raw("FROM a\nRUN <<EOF\nx\n")
    assert caught.value.hint == "end the heredoc with a line holding only EOF"
    assert caught.value.render().splitlines()[-1] == "hint: end the heredoc with a line holding only EOF"
