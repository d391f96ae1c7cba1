"""Dockerfile text to raw instruction nodes, exactly as BuildKit's parser sees them, and their dump.

A raw node is an instruction before its meaning is checked: the keyword, the flags as
written, and the argument strings.  ``dump`` prints nodes in BuildKit's own test format, so
pybuild's reading of a Dockerfile can be compared with BuildKit's line by line.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import replace
from functools import cache
from pathlib import Path

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedInput

from parser.dataclass import dataclass
from parser.errors import DockerfileSyntaxError, PybuildError, SourceRange
from parser.lines import (
    Directive,
    Heredoc,
    LogicalLine,
    ParseWarning,
    SourceLines,
    logical_lines,
    read_source,
)
from parser.shell import UNICODE_SPACE

HEREDOC_KEYWORDS = frozenset({"run", "copy", "add"})
_ASCII_BLANKS = re.compile(r"[ \t\v\f\r]+")
_JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class RawNode:
    """One instruction as written: keyword (lower case), flags, argument strings.

    Columns are 0-based offsets into the logical line (``line.text``), kept so that later
    checks can point at the exact flag or argument.
    """

    keyword: str
    flags: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    json_form: bool = False
    next: RawNode | None = None  # ONBUILD's trigger
    keyword_offset: int = 0
    flag_offsets: tuple[int, ...] = ()
    arg_offsets: tuple[int, ...] = ()
    line: LogicalLine | None = None

    @property
    def heredocs(self) -> tuple[Heredoc, ...]:
        return self.line.heredocs if self.line else ()

    @property
    def start_line(self) -> int:
        return self.line.start_line if self.line else 0

    @property
    def end_line(self) -> int:
        return self.line.end_line if self.line else 0

    def can_hold_heredoc(self) -> bool:
        node = self.next if self.keyword == "onbuild" and self.next else self
        return node.keyword in HEREDOC_KEYWORDS and not node.json_form


@dataclass
class RawDockerfile:
    """Every instruction of a file, plus what the pre-pass noticed along the way."""

    source: SourceLines
    nodes: tuple[RawNode, ...]
    warnings: tuple[ParseWarning, ...]
    misplaced_directives: tuple[Directive, ...]

    @property
    def escape(self) -> str:
        return self.source.escape

    def error(self, node: RawNode, message: str, offset: int | None = None, hint: str | None = None) -> PybuildError:
        """An error pointing at ``offset`` in ``node``'s logical line (its keyword by default)."""
        assert node.line is not None
        line, column = node.line.position(node.keyword_offset if offset is None else offset)
        return self.source.error(message, line, column, hint)


def parse_raw(source: bytes | str, filename: str = "Dockerfile") -> RawDockerfile:
    """Parse Dockerfile text into raw nodes; raises DockerfileSyntaxError on malformed text."""
    lines = read_source(source, filename)
    grammar = _grammar(lines.escape)

    def can_hold_heredoc(text: str) -> bool:
        try:
            node = grammar.parse_line(text)
        except PybuildError:
            return False
        return node.can_hold_heredoc()

    split = logical_lines(lines, can_hold_heredoc)
    if not split.lines:
        raise DockerfileSyntaxError(
            "file with no instructions", SourceRange(filename, max(len(lines.physical), 1), max(len(lines.physical), 1))
        )
    nodes = grammar.parse_file(split.lines, lines)
    return RawDockerfile(
        source=lines,
        nodes=tuple(replace(node, line=line) for node, line in zip(nodes, split.lines, strict=True)),
        warnings=tuple(split.warnings),
        misplaced_directives=tuple(split.misplaced_directives),
    )


# --- the grammar --------------------------------------------------------------------------


class _Grammar:
    """The compiled grammar for one escape character, with the node-building callbacks."""

    def __init__(self, escape: str) -> None:
        # Beside this module in every install; importlib.resources would cost each build ~2 ms of imports.
        text = Path(__file__).with_name("dockerfile.lark").read_text(encoding="utf-8")
        space = UNICODE_SPACE.replace("\n", "")
        text = (
            text.replace("@WS@", "".join(f"\\u{ord(c):04x}" for c in space))
            .replace("@ESC@", "\\\\" if escape == "\\" else escape)
            .replace("@JSON_STRING@", _JSON_STRING)
        )
        self._lock = threading.Lock()
        self._builder = _NodeBuilder(escape)
        self._lark = Lark(
            text,
            parser="lalr",
            lexer="contextual",
            start=["start", "line"],
            transformer=self._builder,
            cache=True,
            maybe_placeholders=False,
        )

    def parse_line(self, text: str) -> RawNode:
        with self._lock:
            self._builder.source = text + "\n"
            try:
                return self._lark.parse(text + "\n", start="line")
            except (UnexpectedInput, _NodeError) as exc:
                raise DockerfileSyntaxError(str(exc)) from None

    def parse_file(self, lines: list[LogicalLine], source: SourceLines) -> list[RawNode]:
        text = "".join(line.text + "\n" for line in lines)
        with self._lock:
            self._builder.source = text
            try:
                return self._lark.parse(text, start="start")
            except _NodeError as exc:
                raise source.error(exc.message, *lines[exc.line - 1].position(exc.offset)) from None
            except UnexpectedInput as exc:
                message = (
                    f"cannot read this line: unexpected {text[exc.pos_in_stream]!r}"
                    if exc.pos_in_stream < len(text)
                    else "unexpected end of line"
                )
                raise source.error(message, *lines[exc.line - 1].position(exc.column - 1)) from None


class _NodeError(Exception):
    """A malformed line found while building a node; ``line`` is the logical line number."""

    def __init__(self, message: str, token: Token) -> None:
        super().__init__(message)
        self.message, self.line, self.offset = message, token.line, token.column - 1


@cache
def _grammar(escape: str) -> _Grammar:
    return _Grammar(escape)


@dataclass
class _Args:
    """An argument form as parsed: values, their offsets, exec form or not, the tokens."""

    values: list[str]
    offsets: list[int]
    json_form: bool
    tokens: list[Token]


class _NodeBuilder(Transformer):
    """Lark callbacks: each rule of the grammar becomes part of a RawNode."""

    def __init__(self, escape: str) -> None:
        super().__init__()
        self.escape = escape
        self.source = ""

    # -- whole lines
    def start(self, nodes: list[RawNode]) -> list[RawNode]:
        return nodes

    def line(self, nodes: list[RawNode]) -> RawNode:
        return nodes[0]

    # -- instructions: [KEYWORD, flag..., DASHDASH?, args?]
    def _make_node(self, children: list) -> RawNode:
        keyword: Token = children[0]
        flags, flag_offsets, args = [], [], None
        for child in children[1:]:
            if isinstance(child, tuple):
                flags.append(child[0])
                flag_offsets.append(child[1])
            elif isinstance(child, _Args):
                args = child
        return RawNode(
            keyword=keyword.value.lower(),
            flags=tuple(flags),
            args=tuple(args.values) if args else (),
            json_form=args.json_form if args else False,
            keyword_offset=keyword.column - 1,
            flag_offsets=tuple(flag_offsets),
            arg_offsets=tuple(args.offsets) if args else (),
        )

    from_ = expose = copy = add = volume = _make_node
    run = cmd = entrypoint = shell = healthcheck = _make_node
    user = workdir = stopsignal = maintainer = arg = _make_node

    def env(self, children: list) -> RawNode:
        """ENV and LABEL: ``k=v ...`` gives (k, v, "=") triples; the legacy ``k v`` form one (k, v, "")."""
        node = self._make_node(children)
        args = next((c for c in children if isinstance(c, _Args)), None)
        if args is None:
            return node
        words, offsets = args.values, args.offsets
        if "=" not in words[0]:
            parts = _ASCII_BLANKS.split("".join(t.value for t in args.tokens), maxsplit=1)
            if len(parts) < 2:
                raise _NodeError(f"{node.keyword.upper()} must have two arguments", args.tokens[0])
            triples, triple_offsets = parts + [""], [offsets[0]] * 3
        else:
            triples, triple_offsets = [], []
            word_tokens = [t for t in args.tokens if t.type == "SHELL_WORD"]
            for word, offset, token in zip(words, offsets, word_tokens, strict=True):
                key, sep, value = word.partition("=")
                if not sep:
                    raise _NodeError(f"Syntax error - can't find = in {word!r}. Must be of the form: name=value", token)
                triples += [key, value, "="]
                triple_offsets += [offset] * 3
        return replace(node, args=tuple(triples), arg_offsets=tuple(triple_offsets))

    label = env

    def unknown(self, children: list) -> RawNode:
        node = self._make_node(children)
        return replace(node, args=("",), arg_offsets=(node.keyword_offset,))

    def onbuild(self, children: list) -> RawNode:
        trigger = children[-1] if children and isinstance(children[-1], RawNode) else None
        node = self._make_node(children[:-1] if trigger else children)
        return replace(node, next=trigger)

    def flag(self, children: list[Token]) -> tuple[str, int]:
        (token,) = children
        return _flag_text(token.value, self.escape), token.column - 1

    # -- argument forms
    def words(self, tokens: list[Token]) -> _Args:
        return _Args([t.value for t in tokens], [t.column - 1 for t in tokens], False, tokens)

    def paths(self, children: list) -> _Args:
        (child,) = children
        if isinstance(child, Token):
            return self._json(child)
        self._reject_other_json(child.tokens[0])
        return child

    def command(self, children: list[Token]) -> _Args:
        (token,) = children
        if token.type == "JSON_ARRAY":
            return self._json(token)
        self._reject_other_json(token)
        return _Args([token.value], [token.column - 1], False, [token])

    def health(self, children: list) -> _Args:
        kind: Token = children[0]
        rest = children[1] if len(children) > 1 else _Args([], [], False, [])
        return _Args([kind.value, *rest.values], [kind.column - 1, *rest.offsets], rest.json_form, [kind, *rest.tokens])

    def shell_words(self, tokens: list[Token]) -> _Args:
        words = [t for t in tokens if t.type == "SHELL_WORD"]
        values = [t.value for t in words]
        values[-1] = _drop_lone_escape(values[-1], self.escape)
        return _Args(values, [t.column - 1 for t in words], False, tokens)

    def text(self, tokens: list[Token]) -> _Args:
        (token,) = tokens
        return _Args([token.value], [token.column - 1], False, tokens)

    # -- helpers
    def _json(self, token: Token) -> _Args:
        values = [_SURROGATE.sub("\ufffd", v) for v in json.loads(token.value)]
        return _Args(values, [token.column - 1] * len(values), True, [token])

    def _reject_other_json(self, first: Token) -> None:
        """Text starting with "[" that is not an array of strings is shell form, unless it is
        valid JSON of another shape: that is an error, as in BuildKit."""
        if not first.value.startswith("["):
            return
        rest = self.source[first.start_pos : self.source.index("\n", first.start_pos)]
        try:
            json.loads(rest, parse_constant=_no_constants)
        except (ValueError, RecursionError):
            return
        raise _NodeError("when using JSON array syntax, arrays must be comprised of strings only", first)


def _no_constants(name: str) -> None:
    raise ValueError(name)


def _flag_text(flag: str, escape: str) -> str:
    """A flag word with its quotes removed and escape characters applied (inside quotes too)."""
    out, quote, i = [], "", 0
    while i < len(flag):
        ch = flag[i]
        if ch == escape:
            i += 1
            out.append(flag[i : i + 1])  # an escape at the very end is dropped
        elif quote and ch == quote:
            quote = ""
        elif not quote and ch in "'\"":
            quote = ch
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _drop_lone_escape(word: str, escape: str) -> str:
    """BuildKit's word splitter drops an escape character that ends the line."""
    quote = ""
    i = 0
    while i < len(word):
        ch = word[i]
        if quote:
            if ch == quote:
                quote = ""
            elif ch == escape and quote == '"':
                if i + 1 == len(word):
                    return word[:-1]
                i += 1
        elif ch in "'\"":
            quote = ch
        elif ch == escape:
            if i + 1 == len(word):
                return word[:-1]
            i += 1
        i += 1
    return word


# --- BuildKit's dump format -----------------------------------------------------------------


def dump(dockerfile: RawDockerfile) -> str:
    """The whole file in BuildKit's dump format: one ``(keyword [flags] "arg"...)`` per line."""
    return "\n".join(f"({dump_node(node)})" for node in dockerfile.nodes)


def dump_node(node: RawNode) -> str:
    parts = [node.keyword]
    if node.flags:
        parts.append("[" + " ".join(go_quote(f) for f in node.flags) + "]")
    if node.next is not None:
        parts.append(f"({dump_node(node.next)})")
    else:
        parts.extend(go_quote(a) for a in node.args)
    return " ".join(parts)


_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    '"': '\\"',
    "\\": "\\\\",
}


def go_quote(value: str) -> str:
    """Quote a string as Go's strconv.Quote does (which is neither JSON nor repr)."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)
