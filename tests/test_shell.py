"""The shell-word lexer against BuildKit's own expansion tables, plus the behaviour those tables leave out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parser.errors import PybuildError, ShellExpansionError
from parser.shell import ShellLexer, expand_word, expand_words, split_heredoc_words

CONFORMANCE = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
MISSING = f"BuildKit conformance data not found at {CONFORMANCE}; it lives beside the checkout"

# Go's unicode.IsSpace, which strings.TrimSpace in BuildKit's table loaders uses (README 4.1).
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

TABLE_ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}


def table_lines(name: str) -> list[tuple[int, str]]:
    """Numbered lines the way Go's line scanner gives them (README 5.1): split on LF only, one CR dropped."""
    lines = (CONFORMANCE / "shell" / name).read_bytes().decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [(number, line.removesuffix("\r")) for number, line in enumerate(lines, 1)]


def missing_data_param(count: int) -> list:
    return [pytest.param(*[None] * count, id="no-conformance-data", marks=pytest.mark.skip(reason=MISSING))]


def env_var_rows(platforms: str) -> list:
    """envVarTest rows for the given platform tags, as (line, source, expected) (README 5.2)."""
    if not CONFORMANCE.is_dir():
        return missing_data_param(3)
    rows = []
    for number, line in table_lines("envVarTest"):
        if line.startswith("#") or not line.strip(GO_SPACE):
            continue
        fields = [field.strip(GO_SPACE) for field in line.strip(GO_SPACE).split("|")]
        assert len(fields) == 3, f"envVarTest:{number} should have exactly 3 fields: {line!r}"
        platform, source, expected = fields
        assert platform in ("A", "U", "W"), f"envVarTest:{number} has an invalid platform tag {platform!r}"
        if platform in platforms:
            rows.append(pytest.param(number, source, expected, id=f"envVarTest:{number}"))
    return rows


def words_rows() -> list:
    """wordsTest rows as (line, source, expected words, env so far) (README 5.3)."""
    if not CONFORMANCE.is_dir():
        return missing_data_param(4)
    env: dict[str, str] = {}
    rows = []
    for number, line in table_lines("wordsTest"):
        if line.startswith("#"):
            continue
        if line.startswith("ENV "):
            name, _, value = line[3:].lstrip(" ").partition("=")
            env[name] = value
            continue
        fields = line.split("|")
        assert len(fields) == 2, f"wordsTest:{number} should have exactly one '|': {line!r}"
        source = fields[0].strip(GO_SPACE)
        expected = fields[1].lstrip(" ").split(",")
        rows.append(pytest.param(number, source, expected, dict(env), id=f"wordsTest:{number}"))
    return rows


class WindowsEnv(Mapping[str, str]):
    """Variable names compared upper-cased, as BuildKit does on Windows."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = {name.upper(): value for name, value in values.items()}

    def __getitem__(self, name: str) -> str:
        return self._values[name.upper()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def expand_or_error(word: str, env: Mapping[str, str]) -> str:
    try:
        return ShellLexer().process_word(word, env)
    except ShellExpansionError:
        return "error"


# --- BuildKit's tables ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("number", "source", "expected"), env_var_rows("AU"))
def test_env_var_table_unix(number: int, source: str, expected: str) -> None:
    assert expand_or_error(source, TABLE_ENV) == expected, f"envVarTest line {number}: {source!r}"


@pytest.mark.parametrize(("number", "source", "expected"), env_var_rows("AW"))
def test_env_var_table_windows(number: int, source: str, expected: str) -> None:
    assert expand_or_error(source, WindowsEnv(TABLE_ENV)) == expected, f"envVarTest line {number}: {source!r}"


@pytest.mark.parametrize(("number", "source", "expected", "env"), words_rows())
def test_words_table(number: int, source: str, expected: list[str], env: dict[str, str]) -> None:
    try:
        words = ShellLexer().process_words(source, env)
    except ShellExpansionError:
        words = ["error"]
    assert words == expected, f"wordsTest line {number}: {source!r}"


def test_tables_have_every_row() -> None:
    if not CONFORMANCE.is_dir():
        pytest.skip(MISSING)
    assert len(env_var_rows("AU")) == 228
    assert len(env_var_rows("AW")) == 228
    assert len(words_rows()) == 24


# --- Glob operators ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "env", "expected"),
    [
        # shortest and longest prefix
        ("${F#*/}", {"F": "usr/local/bin"}, "local/bin"),
        ("${F##*/}", {"F": "usr/local/bin"}, "bin"),
        ("${F#x}", {"F": "usr"}, "usr"),
        ("${F#}", {"F": "usr"}, "usr"),
        ("${F##}", {"F": "usr"}, "usr"),
        ("${F#*}", {"F": "usr"}, "usr"),
        ("${F##*}", {"F": "usr"}, ""),
        ("${F#?}", {"F": "usr"}, "sr"),
        ("${F#*s*r}", {"F": "ussrr"}, "r"),
        # shortest and longest suffix
        ("${F%.*}", {"F": "app.tar.gz"}, "app.tar"),
        ("${F%%.*}", {"F": "app.tar.gz"}, "app"),
        ("${F%}", {"F": "app"}, "app"),
        ("${F%%$E}", {"F": "app", "E": ""}, "app"),
        ("${F%p?}", {"F": "apple"}, "apple"),
        ("${F%?p}", {"F": "app"}, "a"),
        # escaped glob characters are literal, regex characters need no escape
        ("${F#\\*}", {"F": "**x"}, "*x"),
        ("${F##\\**}", {"F": "*a*b"}, ""),
        ("${F%%\\**}", {"F": "ab**"}, "ab"),
        ("${F%\\*\\?}", {"F": "a*?"}, "a"),
        ("${F#\\\\}", {"F": "\\x"}, "x"),
        ("${F#a.b}", {"F": "a.bc"}, "c"),
        ("${F#a.b}", {"F": "axbc"}, "axbc"),
        ("${F#(|)[^$]+{\\}}", {"F": "(|)[^$]+{}!"}, "!"),
        # the pattern is expanded first, and may come from a variable
        ("${F#$P}", {"F": "v1.2.3", "P": "v"}, "1.2.3"),
        ("${F%$P}", {"F": "v1.2.3", "P": ".*"}, "v1.2"),
        ("${F#*$P}", {"F": "a-b-c", "P": "-"}, "b-c"),
        # non-ASCII text is handled by characters
        ("${F#안}", {"F": "안녕하세요"}, "녕하세요"),
        ("${F%?}", {"F": "한국어"}, "한국"),
        # replace first / every match
        ("${F/o/0}", {"F": "foo boo"}, "f0o boo"),
        ("${F//o/0}", {"F": "foo boo"}, "f00 b00"),
        ("${F/o*/X}", {"F": "foo boo"}, "fX"),
        ("${F//?o/X}", {"F": "foo boo"}, "Xo Xo"),
        ("${F//\\//-}", {"F": "/a/b"}, "-a-b"),
        ("${F//a/\\/}", {"F": "aa"}, "\\/\\/"),
        ("${F//x/y}", {"F": "abc"}, "abc"),
        ("${F/$P/X}", {"F": "abc", "P": ""}, "Xabc"),
        ("${F///}", {"F": "abc"}, "abc"),
        ("${F/b/}", {"F": "abc"}, "ac"),
        ("${F/\\*/+}", {"F": "a*b*"}, "a+b*"),
        ("${F/*/X}", {}, "X"),
        ("${F/b/$R}", {"F": "abc", "R": "[$0]"}, "a[$0]c"),
        # Go's ReplaceAllString: $0 is the match, and no empty match right after another one is replaced
        ("${F//b/$R}", {"F": "abc", "R": "[$0|${0}|$$|$1|$}"}, "a[b|b|$||$}c"),
        ("${F//*/X}", {"F": "abc"}, "X"),
        ("${F//*/X}", {"F": ""}, "X"),
    ],
)
def test_glob_operators(word: str, env: dict[str, str], expected: str) -> None:
    assert ShellLexer().process_word(word, env) == expected


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("${F#\\x}", "invalid pattern (\\x) in substitution: invalid escape '\\x'"),
        ("${F%a\\}", "syntax error: missing '}'"),
        ("${F/\\x/y}", "invalid pattern (\\x) in substitution: invalid escape '\\x'"),
        ("${F:#a}", "unsupported modifier (:#) in substitution"),
        ("${F:##a}", "unsupported modifier (:#) in substitution"),
        ("${F:%a}", "unsupported modifier (:%) in substitution"),
        ("${F/a}", "syntax error: missing '/' in ${}"),
        ("${F//a}", "syntax error: missing '/' in ${}"),
        ("${F/a/b", "syntax error: missing '}'"),
    ],
)
def test_glob_operator_errors(word: str, message: str) -> None:
    with pytest.raises(ShellExpansionError) as caught:
        ShellLexer().process_word(word, {"F": "abc"})
    assert caught.value.message.endswith(message)


# --- ${v?msg} and ${v:?msg} ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "env", "expected"),
    [
        ("${V?}", {"V": "plain"}, "plain"),
        ("${V:?}", {"V": "plain"}, "plain"),
        ("${V?}", {"V": ""}, ""),
        ("${V?oops}", {"V": ""}, ""),
        ("${V:?oops $A}", {"V": "plain", "A": "x"}, "plain"),
    ],
)
def test_mandatory_variables_present(word: str, env: dict[str, str], expected: str) -> None:
    assert ShellLexer().process_word(word, env) == expected


@pytest.mark.parametrize(
    ("word", "env", "message"),
    [
        ("${V?}", {}, "V: is not allowed to be unset"),
        ("${V:?}", {}, "V: is not allowed to be unset"),
        ("${V:?}", {"V": ""}, "V: is not allowed to be empty"),
        ("${V?message here$A}", {"A": "x"}, "V: message herex"),
        ("${V:?message here$A}", {"A": "x"}, "V: message herex"),
        ("${V:?message here$A}", {"V": "", "A": "x"}, "V: message herex"),
        ("${NULL:?}", {"NULL": ""}, "NULL: is not allowed to be empty"),
    ],
)
def test_mandatory_variable_messages(word: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ShellExpansionError) as caught:
        ShellLexer().process_word(word, env)
    assert str(caught.value) == f'error: failed to process "{word}": {message}'


# --- Other errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("${}", "syntax error: bad substitution"),
        ("${:-x}", "syntax error: bad substitution"),
        ("${{x}", "syntax error: bad substitution"),
        ("${", "syntax error: missing '}'"),
        ("${x", "syntax error: missing '}'"),
        ("${x:", "syntax error: missing '}'"),
        ("${x:-${y}", "syntax error: missing '}'"),
        ("${x:=y}", "unsupported modifier (:=) in substitution"),
        ("${x=y}", "unsupported modifier (=) in substitution"),
        ("${.}", "unsupported modifier (.) in substitution"),
        ("'abc", "unexpected end of statement while looking for matching single-quote"),
        ('"abc', "unexpected end of statement while looking for matching double-quote"),
        ('"abc\\"', "unexpected end of statement while looking for matching double-quote"),
    ],
)
def test_error_messages(word: str, message: str) -> None:
    with pytest.raises(ShellExpansionError) as caught:
        ShellLexer().process_word(word, {})
    assert caught.value.message.endswith(": " + message)
    assert isinstance(caught.value, PybuildError)


# --- Matched and unmatched names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "env", "result", "matched", "unmatched"),
    [
        ("x", {"DUMMY": "d"}, "x", set(), set()),
        ("x ${UNUSED}", {"DUMMY": "d"}, "x ", set(), {"UNUSED"}),
        ("x $FOO", {"FOO": "y"}, "x y", {"FOO"}, set()),
        ("${A-a} ${B-b} ${C-c}", {"A": "x", "B": ""}, "x  c", {"A", "B"}, {"C"}),
        ("${A:-a} ${B:-b} ${C:-c}", {"A": "x", "B": ""}, "x b c", {"A", "B"}, {"C"}),
        ("${A+a} ${B+b} ${C+c}", {"A": "x", "B": ""}, "a b ", {"A", "B"}, {"C"}),
        ("${A:+a} ${B:+b} ${C:+c}", {"A": "x", "B": ""}, "a  ", {"A", "B"}, {"C"}),
        # the word is expanded even when it is not used
        ("${A:-$B}", {"A": "x"}, "x", {"A"}, {"B"}),
        ("${C:-${D:-d}}", {}, "d", set(), {"C", "D"}),
        ("${A#$B}", {"A": "xy", "B": "x"}, "y", {"A", "B"}, set()),
        ("${A//$B/$C}", {"A": "xx", "B": "x"}, "", {"A", "B"}, {"C"}),
        ("'$A' \"$B\"", {"B": "b"}, "$A b", {"B"}, set()),
        ("\\$A", {"A": "a"}, "$A", set(), set()),
        # positional and special parameters are looked up, and never set
        ("$1 ${@} $$", {}, "  ", set(), {"1", "@", "$"}),
        (
            "v${VERSION}-${TARGETOS}${TARGETVARIANT:+-${TARGETVARIANT}}",
            {"VERSION": "1.2", "TARGETOS": "linux", "TARGETVARIANT": "v7"},
            "v1.2-linux-v7",
            {"VERSION", "TARGETOS", "TARGETVARIANT"},
            set(),
        ),
    ],
)
def test_matches(word: str, env: dict[str, str], result: str, matched: set[str], unmatched: set[str]) -> None:
    assert ShellLexer().process_word_with_matches(word, env) == (result, matched, unmatched)


# --- Escape character ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("C:\\path\\$V", "C:\\path\\v"),
        ("a`$V", "a$V"),
        ("a` b", "a b"),
        ("a``b", "a`b"),
        ("a`", "a"),
        ('"a`"b"', 'a"b'),
        ('"a`$V"', "a$V"),
        ('"a``b"', "a`b"),
        ('"a`tb"', "a`tb"),
        ('"a\\"', "a\\"),
        ("'a`'", "a`"),
        ("${X:-`}}", "}"),
        # glob patterns always escape with a backslash
        ("${S#\\*}", "s"),
        ("${S#`*}", "*s"),
    ],
)
def test_backtick_escape(word: str, expected: str) -> None:
    assert ShellLexer("`").process_word(word, {"V": "v", "S": "*s"}) == expected


def test_backtick_escape_splits_words() -> None:
    assert ShellLexer("`").process_words("a` b c\\ d", {}) == ["a b", "c\\", "d"]


def test_escape_must_be_one_character() -> None:
    with pytest.raises(ValueError, match="one character"):
        ShellLexer("")


# --- Word splitting and the small quirks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "env", "expected"),
    [
        ('""', {}, []),
        ("a \"\" ''", {}, ["a"]),
        ('a""b', {}, ["ab"]),
        ("  a  ", {}, ["a"]),
        ("$E a", {"E": ""}, ["a"]),
        ("$S", {"S": "  "}, []),
        ("a$S", {"S": "\t\n"}, ["a"]),
        # Go's whitespace: ideographic space and NBSP split, the U+001C..U+001F separators do not
        ("a\u3000b\xa0c", {}, ["a", "b", "c"]),
        ("a\x1cb", {}, ["a\x1cb"]),
        ("a\u200bb", {}, ["a\u200bb"]),
        # a byte-order mark is skipped only at the very start
        ("\ufeffa b", {}, ["a", "b"]),
        ("a \ufeffb", {}, ["a", "\ufeffb"]),
        # `<<` keeps the spaces and tabs after it in the same word
        ("a << b", {}, ["a", "<< b"]),
        ("a <<\t \tb c", {}, ["a", "<<\t \tb", "c"]),
        ("a <<- b", {}, ["a", "<<-", "b"]),
        ("a < < b", {}, ["a", "<", "<", "b"]),
    ],
)
def test_process_words(word: str, env: dict[str, str], expected: list[str]) -> None:
    assert ShellLexer().process_words(word, env) == expected


def test_process_word_keeps_whitespace_and_skips_only_a_leading_bom() -> None:
    assert ShellLexer().process_word("\ufeff a  $S\ufeff", {"S": " b "}) == " a   b \ufeff"


def test_lexer_options() -> None:
    env = {"SET": "v"}
    word = "'q $SET' \"d\\$ $SET\" \\x $UNSET ${UNSET:-a} ${SET}"
    assert ShellLexer().process_word(word, env) == "q $SET d$ v x  a v"
    assert ShellLexer(raw_quotes=True).process_word(word, env) == "'q $SET' \"d$ v\" x  a v"
    assert ShellLexer(raw_escapes=True).process_word(word, env) == "q $SET d\\$ v \\x  a v"
    assert ShellLexer(skip_unset=True).process_word(word, env) == "q $SET d$ v x $UNSET ${UNSET:-a} v"
    assert ShellLexer(skip_process_quotes=True).process_word("'a b' \"$SET\"", env) == "'a b' \"v\""


def test_skip_unset_keeps_every_operator() -> None:
    lexer = ShellLexer(skip_unset=True)
    for word in ("${U}", "$U", "${U:?}", "${U#a}", "${U%%b}", "${U/a/b}", "${U//a/b}", "${U:=x}"):
        assert lexer.process_word(word, {}) == word


def test_convenience_functions() -> None:
    assert expand_word("$A-'$A'", {"A": "a b"}) == "a b-$A"
    assert expand_words("$A-'$A'", {"A": "a b"}) == ["a", "b-$A"]
    assert expand_word("`$A", {"A": "x"}, escape="`") == "$A"
    assert expand_words("x`  y", {}, escape="`") == ["x ", "y"]


@given(st.text(alphabet="ab $${}:-+?#%/\\`'\"\t*<\u3000\ufeff", max_size=24))
def test_any_text_expands_or_fails_with_a_shell_error(word: str) -> None:
    env = {"a": "x y", "b": ""}
    heredoc_mode = ShellLexer(raw_quotes=True, raw_escapes=True, skip_unset=True)
    for lexer in (ShellLexer(), ShellLexer("`"), heredoc_mode):
        try:
            result = lexer.process_word(word, env)
            words = lexer.process_words(word, env)
        except ShellExpansionError:
            continue
        assert "" not in words
        assert lexer.process_word_with_matches(word, env)[0] == result


# --- Heredoc detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("RUN <<EOF", ["RUN", "<<EOF"]),
        ("COPY <<F1 <<F2 /dest", ["COPY", "<<F1", "<<F2", "/dest"]),
        ("RUN --mount=type=cache,target=/foo <<MOUNT", ["RUN", "--mount=type=cache,target=/foo", "<<MOUNT"]),
        ("RUN echo it's <<EOF", None),
        ('RUN <<"EOF', None),
        ("RUN ${", None),
        ("a << b", ["a", "<< b"]),
        ("RUN cat <<  EOF  > foo", ["RUN", "cat", "<<  EOF", ">", "foo"]),
        ("RUN <<- EOF", ["RUN", "<<-", "EOF"]),
        ("RUN 3<<EOF cat", ["RUN", "3<<EOF", "cat"]),
        # quotes, escapes and variables are kept as written
        ("RUN <<'EOF' <<\"E2\"", ["RUN", "<<'EOF'", '<<"E2"']),
        ("RUN <<eo\\'f", ["RUN", "<<eo\\'f"]),
        ("RUN <<'e'o\\'f", ["RUN", "<<'e'o\\'f"]),
        ("RUN <<'one two' x", ["RUN", "<<'one two'", "x"]),
        ("RUN \"<<NOHEREDOC\" '<<EOF'", ["RUN", '"<<NOHEREDOC"', "'<<EOF'"]),
        ('RUN echo "a\\"b" \\$HOME', ["RUN", "echo", '"a\\"b"', "\\$HOME"]),
        ("RUN <<$EOF ${X} ${Y:-z}", ["RUN", "<<$EOF", "${X}", "${Y:-z}"]),
        ("RUN echo \\", ["RUN", "echo", "\\"]),
    ],
)
def test_split_heredoc_words(line: str, expected: list[str] | None) -> None:
    assert split_heredoc_words(line) == expected
