"""Expand ``$VAR`` / ``${...}`` and remove quotes in one Dockerfile word, as BuildKit's ``shell.Lex`` does.

The parser uses it to find heredocs and the builder to evaluate ENV, ARG, COPY, WORKDIR and the like.
The behaviour follows the BuildKit conformance guide (``shared/conformance/README.md``, sections 4.8 and 5).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache, lru_cache

from parser.errors import ShellExpansionError

# Go's unicode.IsSpace; Python's str.isspace() also accepts U+001C..U+001F, which BuildKit does not split on.
UNICODE_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_SPACE_SET = frozenset(UNICODE_SPACE)
_SPACE_CLASS = "".join(map(re.escape, UNICODE_SPACE))
_RUNS = re.compile(f"[{_SPACE_CLASS}]+|[^{_SPACE_CLASS}]+")
_HEREDOC_BLANKS = " \t"
_SPECIAL_PARAMS = frozenset("@*#?-$!0")
_BOM = "\ufeff"
_PATTERN_UNITS = re.compile(r"\\.|.", re.DOTALL)  # reversing a pattern keeps each escape before its character
_MISSING_BRACE = "syntax error: missing '}'"
_UNCLOSED = "unexpected end of statement while looking for matching {}"


class ShellLexer:
    """BuildKit's word lexer; the options are Lex's RawQuotes, RawEscapes, SkipUnsetEnv, SkipProcessQuotes.

    A lexer holds only settings, so one instance can be shared and reused for any number of words.
    """

    def __init__(
        self,
        escape: str = "\\",
        *,
        raw_quotes: bool = False,
        raw_escapes: bool = False,
        skip_unset: bool = False,
        skip_process_quotes: bool = False,
    ) -> None:
        if len(escape) != 1:
            raise ValueError(f"the escape character must be one character, not {escape!r}")
        self.escape = escape
        self.raw_quotes = raw_quotes
        self.raw_escapes = raw_escapes
        self.skip_unset = skip_unset
        self.skip_process_quotes = skip_process_quotes
        quotes = "" if skip_process_quotes else "'\""
        # Runs of characters that need no attention, per stop character, so plain text is copied in one step.
        self._plain = {stop: _plain_run("$" + escape + quotes + stop) for stop in ("", "}", "/")}
        self._plain_in_double_quotes = _plain_run('"$' + escape)

    def process_word(self, word: str, env: Mapping[str, str]) -> str:
        """The word expanded and unquoted, as one string (whitespace kept)."""
        return _Scanner(self, word, env).run(None)

    def process_words(self, word: str, env: Mapping[str, str]) -> list[str]:
        """The word expanded, then split on unquoted whitespace (also whitespace a variable brought in)."""
        words = _Words()
        _Scanner(self, word, env).run(words)
        return words.finish()

    def process_word_with_matches(self, word: str, env: Mapping[str, str]) -> tuple[str, set[str], set[str]]:
        """Returns (result, names that were set and used, names that were used but unset)."""
        scanner = _Scanner(self, word, env)
        result = scanner.run(None)
        return result, scanner.matched, scanner.unmatched


def expand_word(word: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """``ShellLexer(escape).process_word(word, env)``."""
    return _default_lexer(escape).process_word(word, env)


def expand_words(word: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """``ShellLexer(escape).process_words(word, env)``."""
    return _default_lexer(escape).process_words(word, env)


def split_heredoc_words(line: str) -> list[str] | None:
    """Split a whole logical Dockerfile line into words the way BuildKit looks for heredocs.

    Raw mode: quotes and escape characters are kept in the words, $VAR is left unexpanded and unset
    variables are kept as written. The escape character is always backslash, and `<<` followed by
    spaces/tabs is glued to the next word (so `a << b` gives ['a', '<< b']). Returns None when lexing
    fails (e.g. an unbalanced quote anywhere), which means: no heredoc on this line.
    """
    try:
        return _HEREDOC_LEXER.process_words(line, {})
    except ShellExpansionError:
        return None


def _is_name_char(ch: str) -> bool:
    """Go's unicode.IsLetter or unicode.IsDigit (Nd only; str.isdigit() would also take ``²``), or ``_``."""
    return ch.isalpha() or ch.isdecimal() or ch == "_"


@cache
def _default_lexer(escape: str) -> ShellLexer:
    return ShellLexer(escape)


@cache
def _plain_run(specials: str) -> re.Pattern[str]:
    return re.compile(f"[^{re.escape(specials)}]+")


class _Words:
    """Collects the words of ProcessWords: unquoted whitespace ends a word, quoted text never does.

    A word only ends if it has text, so whitespace never makes empty words, and a bare ``""`` leaves none.
    Spaces and tabs right after ``<<`` stay in the word, so ``<< EOF`` is one word for heredoc detection.
    """

    __slots__ = ("in_word", "word", "words")

    def __init__(self) -> None:
        self.words: list[str] = []
        self.word = ""
        self.in_word = False

    def add_raw(self, text: str) -> None:
        """Quoted or escaped text: part of the current word whatever it contains."""
        self.word += text
        self.in_word = True

    def add_text(self, text: str) -> None:
        """Unquoted text, literal or from a ``$`` expansion: its whitespace separates words."""
        for run in _RUNS.findall(text):
            if run[0] not in _SPACE_SET:
                self.word += run
                self.in_word = True
                continue
            if self.word.rstrip(_HEREDOC_BLANKS).endswith("<<"):
                glued = len(run) - len(run.lstrip(_HEREDOC_BLANKS))
                self.word += run[:glued]
                run = run[glued:]
                if not run:
                    continue
            if self.in_word and self.word:
                self.words.append(self.word)
                self.word = ""
                self.in_word = False

    def finish(self) -> list[str]:
        if self.word:
            self.words.append(self.word)
            self.word = ""
        return self.words


class _Scanner:
    """One pass over one word: a cursor, the variables looked up so far, and the escape mode in force."""

    __slots__ = ("env", "lexer", "matched", "pos", "raw_escapes", "text", "unmatched")

    def __init__(self, lexer: ShellLexer, text: str, env: Mapping[str, str]) -> None:
        self.lexer = lexer
        self.text = text
        # Go's text/scanner ignores a byte-order mark as the very first character.
        self.pos = 1 if text.startswith(_BOM) else 0
        self.env = env
        self.raw_escapes = lexer.raw_escapes
        self.matched: set[str] = set()
        self.unmatched: set[str] = set()

    def run(self, words: _Words | None) -> str:
        try:
            return self.until("", self.lexer.raw_escapes, words)
        except ShellExpansionError as exc:
            quoted = json.dumps(self.text, ensure_ascii=False)
            raise ShellExpansionError(f"failed to process {quoted}: {exc.message}") from None

    def until(self, stop: str, raw_escapes: bool, words: _Words | None) -> str:
        """Process up to ``stop`` (consumed) or, when ``stop`` is empty, to the end.

        ``raw_escapes`` keeps escape characters in the output; it holds for everything nested inside too,
        which is how ``${v#p}`` and ``${v/p/r}`` hand their glob patterns over with escapes intact.
        """
        outer_raw_escapes, self.raw_escapes = self.raw_escapes, raw_escapes
        lexer = self.lexer
        text, end = self.text, len(self.text)
        escape = lexer.escape
        plain = lexer._plain[stop]
        quotes = "" if lexer.skip_process_quotes else "'\""
        out: list[str] = []
        while self.pos < end:
            ch = text[self.pos]
            if ch == stop:
                self.pos += 1
                self.raw_escapes = outer_raw_escapes
                return "".join(out)
            if ch == "$":
                piece = self.dollar()
                out.append(piece)
                if words is not None:
                    words.add_text(piece)
            elif ch in quotes:
                piece = self.single_quoted() if ch == "'" else self.double_quoted()
                out.append(piece)
                if words is not None:
                    words.add_raw(piece)
            elif ch == escape:
                self.pos += 1
                if raw_escapes:
                    out.append(escape)
                    if words is not None:
                        words.add_raw(escape)
                if self.pos == end:
                    break
                ch = text[self.pos]
                self.pos += 1
                out.append(ch)
                if words is not None:
                    words.add_raw(ch)
            else:
                match = plain.match(text, self.pos)
                assert match is not None
                self.pos = match.end()
                out.append(match.group())
                if words is not None:
                    words.add_text(match.group())
        if stop:
            raise ShellExpansionError(_UNCLOSED.format(stop))
        self.raw_escapes = outer_raw_escapes
        return "".join(out)

    def single_quoted(self) -> str:
        """Everything up to the next ``'`` is literal; there is no way to escape a quote."""
        start = self.pos + 1
        close = self.text.find("'", start)
        if close < 0:
            raise ShellExpansionError(_UNCLOSED.format("single-quote"))
        self.pos = close + 1
        body = self.text[start:close]
        return f"'{body}'" if self.lexer.raw_quotes else body

    def double_quoted(self) -> str:
        """``$`` expands; the escape character escapes only ``"``, ``$`` and itself, and stays before others.

        In raw-escapes mode an escape that escapes something is kept too, so the text reads as written.
        """
        lexer = self.lexer
        text, end = self.text, len(self.text)
        escape = lexer.escape
        self.pos += 1
        out = ['"'] if lexer.raw_quotes else []
        while True:
            if self.pos >= end:
                raise ShellExpansionError(_UNCLOSED.format("double-quote"))
            ch = text[self.pos]
            if ch == '"':
                self.pos += 1
                if lexer.raw_quotes:
                    out.append('"')
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
            elif ch == escape:
                self.pos += 1
                if self.pos < end and text[self.pos] in ('"', "$", escape):
                    if self.raw_escapes:
                        out.append(escape)
                    out.append(text[self.pos])
                    self.pos += 1
                else:
                    out.append(escape)
            else:
                match = lexer._plain_in_double_quotes.match(text, self.pos)
                assert match is not None
                self.pos = match.end()
                out.append(match.group())

    def lookup(self, name: str) -> tuple[str, bool]:
        if name in self.env:
            self.matched.add(name)
            return self.env[name], True
        self.unmatched.add(name)
        return "", False

    def name(self) -> str:
        """The name after ``$``: digits (positional), one special character, or letters, digits and ``_``."""
        text, end, start = self.text, len(self.text), self.pos
        if start == end:
            return ""
        first = text[start]
        if first.isdecimal():
            while self.pos < end and text[self.pos].isdecimal():
                self.pos += 1
        elif first in _SPECIAL_PARAMS:
            self.pos += 1
        else:
            while self.pos < end and _is_name_char(text[self.pos]):
                self.pos += 1
        return text[start : self.pos]

    def dollar(self) -> str:
        """Expand the ``$name`` or ``${...}`` at the cursor."""
        text, end = self.text, len(self.text)
        skip_unset = self.lexer.skip_unset
        self.pos += 1
        if self.pos == end or text[self.pos] != "{":
            name = self.name()
            if not name:
                return "$"
            value, found = self.lookup(name)
            return "$" + name if skip_unset and not found else value

        self.pos += 1
        if self.pos == end:
            raise ShellExpansionError(_MISSING_BRACE)
        if text[self.pos] in "{}:":
            raise ShellExpansionError("syntax error: bad substitution")
        name = self.name()
        if self.pos == end:
            raise ShellExpansionError(_MISSING_BRACE)
        operator = text[self.pos]
        self.pos += 1
        if operator == "}":
            value, found = self.lookup(name)
            return f"${{{name}}}" if skip_unset and not found else value
        if operator == "/":
            return self.substitute(name)
        if operator not in ":+-?#%":
            raise ShellExpansionError(f"unsupported modifier ({operator}) in substitution")

        modifier = operator
        null_is_unset = operator == ":"
        if null_is_unset:
            if self.pos == end:
                raise ShellExpansionError(_MISSING_BRACE)
            operator = text[self.pos]
            self.pos += 1
            modifier += operator
            if operator in "#%":
                raise ShellExpansionError(f"unsupported modifier ({modifier}) in substitution")
        word = self.nested_word("}", operator in "#%", _MISSING_BRACE)
        value, found = self.lookup(name)
        if skip_unset and not found:
            return f"${{{name}{modifier}{word}}}"
        empty = not found or (null_is_unset and value == "")
        if operator == "-":
            return word if empty else value
        if operator == "+":
            return "" if empty else word
        if operator == "?":
            if not found:
                raise ShellExpansionError(f"{name}: {word or 'is not allowed to be unset'}")
            if empty:
                raise ShellExpansionError(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if operator in "#%":
            greedy = word.startswith(operator)
            pattern = word[1:] if greedy else word
            try:
                if operator == "#":
                    return _trim_prefix(pattern, value, greedy)
                return _trim_suffix(pattern, value, greedy)
            except ValueError as exc:
                raise ShellExpansionError(f"invalid pattern ({pattern}) in substitution: {exc}") from None
        raise ShellExpansionError(f"unsupported modifier ({modifier}) in substitution")

    def substitute(self, name: str) -> str:
        """``${name/pattern/replacement}`` (first match) or ``${name//pattern/replacement}`` (every match)."""
        replace_all = self.text.startswith("/", self.pos)
        if replace_all:
            self.pos += 1
        pattern = self.nested_word("/", True, "syntax error: missing '/' in ${}")
        replacement = self.nested_word("}", True, _MISSING_BRACE)
        value, found = self.lookup(name)
        if self.lexer.skip_unset and not found:
            slashes = "//" if replace_all else "/"
            return f"${{{name}{slashes}{pattern}/{replacement}}}"
        try:
            regex = _glob_regex(pattern, True)
        except ValueError as exc:
            raise ShellExpansionError(f"invalid pattern ({pattern}) in substitution: {exc}") from None
        if replace_all:
            return _replace_all(regex, value, replacement)
        match = regex.search(value)
        return value if match is None else value[: match.start()] + replacement + value[match.end() :]

    def nested_word(self, stop: str, raw_escapes: bool, at_end: str) -> str:
        """The word inside ``${...}`` up to ``stop``; running out of input reports ``at_end`` instead."""
        try:
            return self.until(stop, raw_escapes, None)
        except ShellExpansionError:
            if self.pos >= len(self.text):
                raise ShellExpansionError(at_end) from None
            raise


_HEREDOC_LEXER = ShellLexer("\\", raw_quotes=True, raw_escapes=True, skip_unset=True)


@lru_cache(maxsize=1024)
def _glob_regex(pattern: str, greedy: bool) -> re.Pattern[str]:
    """BuildKit's shell pattern as a regex: ``*`` any run (longest if greedy), ``?`` one character.

    ``\\*``, ``\\?`` and ``\\\\`` are literal; ``\\}`` and ``\\/`` are the bare delimiter; any other escape
    is a ValueError. The escape is always a backslash here, whatever the lexer's escape character is.
    """
    if pattern.startswith(_BOM):  # BuildKit scans the pattern with Go's text/scanner too
        pattern = pattern[1:]
    star = ".*" if greedy else ".*?"
    out = []
    i, end = 0, len(pattern)
    while i < end:
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append(star)
        elif ch == "?":
            out.append(".")
        elif ch != "\\":
            out.append(re.escape(ch))
        elif i < end and pattern[i] in "}/":
            continue
        elif i < end and pattern[i] in "*?\\":
            out.append(re.escape(pattern[i]))
            i += 1
        else:
            raise ValueError(f"invalid escape '\\{pattern[i] if i < end else ''}'")
    return re.compile("".join(out))


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    match = _glob_regex(pattern, greedy).match(value)
    return value if match is None else value[match.end() :]


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    """The shortest or longest matching suffix, found as a prefix of the reversed value and pattern."""
    units = _PATTERN_UNITS.findall(pattern)
    return _trim_prefix("".join(reversed(units)), value[::-1], greedy)[::-1]


def _replace_all(regex: re.Pattern[str], value: str, template: str) -> str:
    """Go's ``Regexp.ReplaceAllString``: an empty match right after a previous match is not replaced
    (Python's ``re.sub`` would replace it), and ``$`` references in the template are expanded."""
    out = []
    last = pos = 0
    while pos <= len(value):
        match = regex.search(value, pos)
        if match is None:
            break
        start, stop = match.span()
        out.append(value[last:start])
        if stop > last or start == 0:
            out.append(_expand_template(template, match.group()))
        last = stop
        pos = max(pos + 1, stop)
    out.append(value[last:])
    return "".join(out)


def _expand_template(template: str, matched: str) -> str:
    """Go's ``Regexp.Expand`` for a pattern without groups: ``$$`` is ``$``, ``$0`` or ``${0}`` the match,
    any other well-formed ``$name`` or ``${name}`` is empty, and a ``$`` starting neither stays as it is."""
    out = []
    i = 0
    while (dollar := template.find("$", i)) >= 0:
        out.append(template[i:dollar])
        i = dollar + 1
        if template.startswith("$", i):
            out.append("$")
            i += 1
            continue
        brace = template.startswith("{", i)
        start = stop = i + 1 if brace else i
        while stop < len(template) and _is_name_char(template[stop]):
            stop += 1
        if stop == start or (brace and not template.startswith("}", stop)):
            out.append("$")
            continue
        if template[start:stop] == "0":
            out.append(matched)
        i = stop + 1 if brace else stop
    out.append(template[i:])
    return "".join(out)
