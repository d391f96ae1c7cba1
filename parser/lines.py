"""Physical lines to logical lines: directives, continuations, comments and heredoc bodies.

This is the small pre-pass in front of the grammar. The Dockerfile language is line-based in
ways a context-free grammar cannot express (the escape character is chosen by a comment at
the top, and a heredoc body ends at a delimiter chosen on the line above it), so those are
settled here, and the grammar sees one instruction per line.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from parser.dataclass import dataclass
from parser.errors import DockerfileSyntaxError, ShellExpansionError, SourceRange
from parser.shell import UNICODE_SPACE, ShellLexer, split_heredoc_words

MAX_LINE_BYTES = 65535
KNOWN_DIRECTIVES = ("syntax", "escape", "check")

_DIRECTIVE = re.compile(r"#[\t\n\f\r ]*([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.+?)[\t\n\f\r ]*$", re.S)
_HEREDOC_WORD = re.compile(r"([0-9]*)<<(-?)[\t\n\f\r ]*([^<]*)", re.S)  # Go's \d and \s are ASCII


@dataclass
class Heredoc:
    """A here-document: its delimiter, body (with its line endings) and how to treat it."""

    name: str
    content: str
    fd: int = 0
    chomp: bool = False  # `<<-`: leading tabs are stripped from the body at build time
    expand: bool = True  # an unquoted delimiter: `$VAR` in the body is expanded


@dataclass
class LogicalLine:
    """One instruction's text after continuations are joined, with where its pieces came from."""

    text: str
    start_line: int
    end_line: int
    heredocs: tuple[Heredoc, ...]
    # (offset in text, physical line, column) for each joined piece, to point errors back.
    origins: tuple[tuple[int, int, int], ...]

    def position(self, offset: int) -> tuple[int, int]:
        """The physical (line, column) of a character offset in ``text``."""
        line, column, base = self.start_line, 1, 0
        for piece_offset, piece_line, piece_column in self.origins:
            if piece_offset > offset:
                break
            line, column, base = piece_line, piece_column, piece_offset
        return line, column + offset - base


@dataclass
class Directive:
    """A parser directive (``# syntax=``, ``# escape=``, ``# check=``) from the file's head."""

    name: str
    value: str
    line: int


@dataclass
class ParseWarning:
    """Something accepted but worth telling the user, with its line."""

    message: str
    line: int


@dataclass
class SourceLines:
    """A Dockerfile cut into physical lines, with the directives read from its top."""

    filename: str
    physical: tuple[str, ...]  # each with its line terminator, BOM removed
    directives: tuple[Directive, ...]
    first_body_line: int  # index of the first physical line after the directives

    @property
    def escape(self) -> str:
        for directive in self.directives:
            if directive.name == "escape":
                return directive.value
        return "\\"

    def text_of(self, line: int) -> str:
        """Physical line ``line`` (1-based) without its terminator, for error snippets."""
        if 1 <= line <= len(self.physical):
            return _trim_newline(self.physical[line - 1])
        return ""

    def error(self, message: str, line: int, column: int = 1, hint: str | None = None) -> DockerfileSyntaxError:
        return DockerfileSyntaxError(
            message,
            SourceRange(self.filename, line, line, column),
            source_line=self.text_of(line),
            hint=hint,
        )


def read_source(source: bytes | str, filename: str = "Dockerfile") -> SourceLines:
    """Split into physical lines and read the parser directives at the top."""
    text = source.decode("utf-8", "surrogateescape") if isinstance(source, bytes) else source
    physical = _split_on_newline(text)
    if physical and physical[0].startswith("\ufeff"):
        physical[0] = physical[0][1:]
    lines = SourceLines(filename, tuple(physical), (), 0)
    for number, line in enumerate(physical, 1):
        if len(line.encode("utf-8", "surrogateescape").rstrip(b"\r\n")) > MAX_LINE_BYTES:
            raise lines.error(f"line is longer than the maximum of {MAX_LINE_BYTES} bytes", number)
    directives: list[Directive] = []
    index = 0
    for index, line in enumerate(physical):  # noqa: B007 - index is used after the loop
        directive = _directive(line)
        if directive is None or directive[0] not in KNOWN_DIRECTIVES:
            break
        name, value = directive
        if any(d.name == name for d in directives):
            raise lines.error(f"only one {name} parser directive can be used", index + 1)
        if name == "escape" and value not in ("\\", "`"):
            raise lines.error(
                f"invalid escape token {value!r} does not match ` or \\",
                index + 1,
                hint="use # escape=` or # escape=\\",
            )
        directives.append(Directive(name, value, index + 1))
    else:
        index = len(physical)
    return SourceLines(filename, tuple(physical), tuple(directives), index)


def _split_on_newline(text: str) -> list[str]:
    """Split on "\\n" only, keeping it (str.splitlines would also split on \\r, \\v, \\f...)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _directive(line: str) -> tuple[str, str] | None:
    match = _DIRECTIVE.match(_trim_newline(line).lstrip(UNICODE_SPACE))
    return (match.group(1).lower(), match.group(2)) if match else None


def _trim_newline(line: str) -> str:
    return line.rstrip("\r\n")


def _is_comment(line: str) -> bool:
    return _trim_newline(line).lstrip(UNICODE_SPACE).startswith("#")


def _continues(line: str, escape: str) -> tuple[str, bool]:
    """Remove a trailing escape character (and blanks after it); say whether the line goes on.

    Two or more escape characters at the end are literal text, as in BuildKit.
    """
    stripped = line.rstrip(" \t")
    if stripped.endswith(escape) and (len(stripped) == 1 or stripped[-2] != escape):
        return stripped[:-1], True
    return line, False


@dataclass
class LineSplit:
    """A file cut into logical lines, with the warnings and the directives found out of place on the way."""

    lines: list[LogicalLine]
    warnings: list[ParseWarning]
    misplaced_directives: list[Directive]


def logical_lines(source: SourceLines, can_hold_heredoc: Callable[[str], bool]) -> LineSplit:
    """Join continuation lines, skip comments and blanks, and collect heredoc bodies.

    ``can_hold_heredoc(text)`` tells whether a logical line is an instruction whose heredocs
    are read (RUN, COPY, ADD in shell form, or ONBUILD of one); the grammar knows that.
    """
    physical = source.physical
    escape = source.escape
    result = LineSplit([], [], [])
    index = source.first_body_line
    while index < len(physical):
        raw = physical[index]
        index += 1
        start = index
        first = _trim_newline(raw)
        stripped = first.lstrip(UNICODE_SPACE)
        if stripped.startswith("#"):
            directive = _directive(raw)
            if directive and directive[0] in KNOWN_DIRECTIVES:
                result.misplaced_directives.append(Directive(directive[0], directive[1], start))
            continue
        text, goes_on = _continues(stripped, escape)
        if not goes_on and not text:
            continue
        origins = [(0, start, len(first) - len(stripped) + 1)]
        had_empty = False
        while goes_on and index < len(physical):
            raw = physical[index]
            index += 1
            if _is_comment(raw):
                continue
            piece = _trim_newline(raw)
            if not piece.lstrip(UNICODE_SPACE):
                had_empty = True
                continue
            piece, goes_on = _continues(piece, escape)
            origins.append((len(text), index, 1))
            text += piece
        if had_empty:
            result.warnings.append(
                ParseWarning(f"Empty continuation line found in: {text.strip(UNICODE_SPACE)}", start)
            )
        heredocs: tuple[Heredoc, ...] = ()
        if "<<" in text and can_hold_heredoc(text.strip(UNICODE_SPACE)):
            heredocs, index = _read_heredocs(source, text, start, index)
        lead = len(text) - len(text.lstrip(UNICODE_SPACE))
        result.lines.append(
            LogicalLine(
                text=text.strip(UNICODE_SPACE),
                start_line=start,
                end_line=index,
                heredocs=heredocs,
                origins=tuple(
                    (max(offset - lead, 0), line, col + (lead if offset == 0 else 0)) for offset, line, col in origins
                ),
            )
        )
    return result


def parse_heredoc_word(word: str) -> tuple[int, bool, str, bool] | None:
    """``(fd, chomp, name, expand)`` when a raw word such as ``3<<-'EOF'`` starts a heredoc."""
    match = _HEREDOC_WORD.fullmatch(word)
    if not match or not match.group(3):
        return None
    fd, chomp, rest = match.groups()
    words = ShellLexer(skip_unset=True).process_words(rest, {})
    if len(words) != 1:
        return None
    raw = ShellLexer(skip_unset=True, raw_quotes=True).process_words(rest, {})
    name = words[0]
    quotes = name.count("'") + name.count('"')
    raw_quotes = raw[0].count("'") + raw[0].count('"')
    # Go's ParseUint saturates at the largest uint64 (and its error is ignored); no huge int() here.
    return min(int(fd.lstrip("0")[:21] or 0), 2**64 - 1), chomp == "-", name, quotes == raw_quotes


def _read_heredocs(source: SourceLines, text: str, start: int, index: int) -> tuple[tuple[Heredoc, ...], int]:
    words = split_heredoc_words(text)
    if not words:
        return (), index
    physical = source.physical
    heredocs = []
    for word in words:
        try:
            found = parse_heredoc_word(word)
        except ShellExpansionError as exc:
            raise source.error(f"invalid heredoc delimiter {word!r}: {exc.message}", start) from None
        if found is None:
            continue
        fd, chomp, name, expand = found
        body = []
        while True:
            if index >= len(physical):
                first = source.text_of(start)
                raise source.error(
                    f"unterminated heredoc: no line {name!r} before the end of the file",
                    start,
                    first.find(word) + 1 or first.find("<<") + 1 or 1,
                    hint=f"end the heredoc with a line holding only {name}",
                )
            line = physical[index]
            index += 1
            candidate = _trim_newline(line)
            if chomp:
                candidate = candidate.lstrip("\t")
            if candidate == name:
                break
            body.append(line)
        heredocs.append(Heredoc(name=name, content="".join(body), fd=fd, chomp=chomp, expand=expand))
    return tuple(heredocs), index
