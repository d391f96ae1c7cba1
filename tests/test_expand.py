"""Build-time `$VAR` expansion, instruction by instruction and field by field (conformance README section 7).

Which words BuildKit expands: ADD, COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR and ARG, and
flag values such as --platform, --from, --chown, --chmod and RUN --mount's; never RUN/CMD/ENTRYPOINT text.
"""

from __future__ import annotations

import pytest

from parser import DockerfileSyntaxError, ShellExpansionError, parse
from parser.expand import expand, expands
from parser.flags import Mount
from parser.instructions import (
    Add,
    Arg,
    ArgDefinition,
    Cmd,
    Command,
    Copy,
    Entrypoint,
    Env,
    Expose,
    From,
    Healthcheck,
    Instruction,
    KeyValue,
    Label,
    Maintainer,
    Onbuild,
    Run,
    Shell,
    Stopsignal,
    User,
    Volume,
    Workdir,
)
from parser.lines import Heredoc

ENV = {
    "IMG": "alpine",
    "TAG": "3.19",
    "PLATFORM": "linux/arm64",
    "K": "key",
    "V": "val",
    "SPACED": "a  b",
    "PORTS": "80 443/udp",
    "STAGE": "builder",
    "U": "app",
    "G": "staff",
    "MODE": "0644",
    "SUM": "sha256:abc",
    "DIR": "data",
    "SIG": "SIGQUIT",
    "EMPTY": "",
}


def last(text: str) -> Instruction:
    source = text if text.startswith(("FROM", "#")) else "FROM base\n" + text
    return parse(source + "\n").instructions[-1]


# (id, instruction line, type, expected fields after expansion, names reported as used)
EXPANDED = [
    # FROM: image and --platform, never the stage name
    ("FROM image", "FROM $IMG:${TAG}", From, {"image": "alpine:3.19"}, {"IMG", "TAG"}),
    ("FROM default", "FROM ${BASE:-debian}", From, {"image": "debian"}, {"BASE"}),
    ("FROM quotes removed", 'FROM "$IMG"', From, {"image": "alpine"}, {"IMG"}),
    (
        "FROM --platform, not the stage name",
        "FROM --platform=$PLATFORM $IMG AS build",
        From,
        {"image": "alpine", "platform": "linux/arm64", "stage_name": "build"},
        {"PLATFORM", "IMG"},
    ),
    # ENV and LABEL: keys and values, quotes removed
    ("ENV key and value", "ENV $K=$V", Env, {"pairs": (KeyValue("key", "val"),)}, {"K", "V"}),
    (
        "ENV quotes",
        "ENV A=\"x $V\" B='$V' C=\\$V D=${NOPE:-dflt}",
        Env,
        {"pairs": (KeyValue("A", "x val"), KeyValue("B", "$V"), KeyValue("C", "$V"), KeyValue("D", "dflt"))},
        {"V", "NOPE"},
    ),
    ("ENV legacy value", 'ENV A $V  "q"', Env, {"pairs": (KeyValue("A", "val  q"),)}, {"V"}),
    ("ENV value keeps spaces of a variable", "ENV A=$SPACED", Env, {"pairs": (KeyValue("A", "a  b"),)}, {"SPACED"}),
    (
        "ENV set but empty",
        "ENV A=${EMPTY:-x} B=${EMPTY-x}",
        Env,
        {"pairs": (KeyValue("A", "x"), KeyValue("B", ""))},
        {"EMPTY"},
    ),
    ("ENV unset is empty", "ENV A=$NOPE.", Env, {"pairs": (KeyValue("A", "."),)}, {"NOPE"}),
    ("LABEL key and value", 'LABEL "com.$K"="v $V"', Label, {"pairs": (KeyValue("com.key", "v val"),)}, {"K", "V"}),
    ("LABEL legacy", "LABEL version ${TAG}", Label, {"pairs": (KeyValue("version", "3.19"),)}, {"TAG"}),
    # ARG: name and default
    ("ARG name and default", "ARG $K=${V}", Arg, {"args": (ArgDefinition("key", "val"),)}, {"K", "V"}),
    ("ARG without default", "ARG NAME", Arg, {"args": (ArgDefinition("NAME", None),)}, set()),
    ("ARG empty default", "ARG NAME=", Arg, {"args": (ArgDefinition("NAME", ""),)}, set()),
    ("ARG quoted default", 'ARG NAME="a $V"', Arg, {"args": (ArgDefinition("NAME", "a val"),)}, {"V"}),
    # COPY: sources, dest and flags
    (
        "COPY everything",
        'COPY --from=$STAGE --chown=$U:$G --chmod=$MODE $DIR "${DIR}/x" /dst/$DIR/',
        Copy,
        {
            "from_": "builder",
            "chown": "app:staff",
            "chmod": "0644",
            "sources": ("data", "data/x"),
            "dest": "/dst/data/",
        },
        {"STAGE", "U", "G", "MODE", "DIR"},
    ),
    ("COPY JSON form", 'COPY ["$DIR", "/$DIR"]', Copy, {"sources": ("data",), "dest": "/data"}, {"DIR"}),
    ("COPY escaped dollar", "COPY \\$DIR /x", Copy, {"sources": ("$DIR",)}, set()),
    ("COPY --link untouched", "COPY --link $DIR /x", Copy, {"link": True, "sources": ("data",)}, {"DIR"}),
    # ADD: sources, dest, --chown, --chmod, --checksum
    (
        "ADD everything",
        "ADD --chown=$U --chmod=$MODE --checksum=$SUM https://x/$TAG.tgz /opt/$DIR",
        Add,
        {
            "chown": "app",
            "chmod": "0644",
            "checksum": "sha256:abc",
            "sources": ("https://x/3.19.tgz",),
            "dest": "/opt/data",
        },
        {"U", "MODE", "SUM", "TAG", "DIR"},
    ),
    # EXPOSE splits an expanded value into several ports
    ("EXPOSE splits", "EXPOSE $PORTS 22", Expose, {"ports": ("80", "443/udp", "22")}, {"PORTS"}),
    ("EXPOSE default", "EXPOSE ${HTTP:-8080}/tcp", Expose, {"ports": ("8080/tcp",)}, {"HTTP"}),
    ("EXPOSE quoted is one word", 'EXPOSE "$PORTS"', Expose, {"ports": ("80 443/udp",)}, {"PORTS"}),
    # VOLUME, WORKDIR, USER, STOPSIGNAL
    ("VOLUME list", "VOLUME /$DIR /b", Volume, {"paths": ("/data", "/b")}, {"DIR"}),
    ("VOLUME JSON", 'VOLUME ["/$DIR"]', Volume, {"paths": ("/data",)}, {"DIR"}),
    ("WORKDIR", "WORKDIR /srv/$DIR", Workdir, {"path": "/srv/data"}, {"DIR"}),
    ("WORKDIR keeps a variable's spaces", "WORKDIR /x/$SPACED", Workdir, {"path": "/x/a  b"}, {"SPACED"}),
    ("USER", "USER $U:$G", User, {"user": "app:staff"}, {"U", "G"}),
    ("STOPSIGNAL", "STOPSIGNAL $SIG", Stopsignal, {"signal": "SIGQUIT"}, {"SIG"}),
    # RUN: only --mount values; the command is the shell's business
    (
        "RUN --mount values",
        "RUN --mount=type=cache,target=/root/$DIR,id=$K,source=$V echo $V",
        Run,
        {
            "mounts": (Mount("cache", "/root/data", source="val", id="key"),),
            "command": Command(("echo $V",), False),
        },
        {"DIR", "K", "V"},
    ),
    (
        "RUN several mounts",
        "RUN --mount=type=secret,id=$K,env=$V --mount=type=tmpfs,target=/$DIR,size=$TAG true",
        Run,
        {"mounts": (Mount("secret", id="key", env="val"), Mount("tmpfs", "/data", size="3.19"))},
        {"K", "V", "DIR", "TAG"},
    ),
]


@pytest.mark.parametrize(("text", "kind", "expected", "used"), [c[1:] for c in EXPANDED], ids=[c[0] for c in EXPANDED])
def test_expanded_fields(text: str, kind: type, expected: dict, used: set[str]) -> None:
    instruction = last(text)
    assert type(instruction) is kind
    assert expands(kind)
    result = expand(instruction, ENV)
    assert {name: getattr(result.instruction, name) for name in expected} == expected
    assert result.used == frozenset(used)
    # location and the text as written are kept
    assert (result.instruction.location, result.instruction.original) == (instruction.location, instruction.original)


def test_mount_from_with_a_variable_is_refused_at_parse_time() -> None:
    # BuildKit: "'from' doesn't support variable expansion, define alias stage instead" (only a final `$` is fine).
    with pytest.raises(DockerfileSyntaxError, match="doesn.t support variable expansion"):
        last("RUN --mount=from=$STAGE,target=/x true")


# (id, instruction line, type): BuildKit never expands these; the shell in the container (or nobody) does.
UNTOUCHED = [
    ("RUN shell form", "RUN echo $V ${K:-x}", Run),
    ("RUN exec form", 'RUN ["echo", "$V"]', Run),
    ("RUN heredoc body", "RUN <<EOF\necho $V\nEOF", Run),
    ("RUN flags other than --mount", "RUN --network=none echo $V", Run),
    ("CMD shell form", "CMD echo $V", Cmd),
    ("CMD exec form", 'CMD ["$V"]', Cmd),
    ("ENTRYPOINT", "ENTRYPOINT $V", Entrypoint),
    ("SHELL", 'SHELL ["/bin/$V", "-c"]', Shell),
    ("HEALTHCHECK", "HEALTHCHECK --interval=5s CMD curl $V", Healthcheck),
    ("MAINTAINER", "MAINTAINER $V", Maintainer),
    # An ONBUILD trigger is stored as written and expanded only when it fires in a child build.
    ("ONBUILD COPY", "ONBUILD COPY $DIR /x", Onbuild),
    ("ONBUILD ENV", "ONBUILD ENV A=$V", Onbuild),
]


@pytest.mark.parametrize(("text", "kind"), [c[1:] for c in UNTOUCHED], ids=[c[0] for c in UNTOUCHED])
def test_untouched(text: str, kind: type) -> None:
    instruction = last(text)
    assert type(instruction) is kind
    result = expand(instruction, ENV)
    assert result.instruction == instruction
    assert result.used == frozenset()


@pytest.mark.parametrize("kind", [Cmd, Entrypoint, Shell, Healthcheck, Maintainer, Onbuild])
def test_never_expanded_types(kind: type) -> None:
    assert not expands(kind)


def test_onbuild_trigger_expands_when_it_fires() -> None:
    onbuild = last("ONBUILD COPY --chown=$U $DIR /x/$DIR")
    assert isinstance(onbuild, Onbuild)
    fired = expand(onbuild.trigger, ENV)
    assert isinstance(fired.instruction, Copy)
    assert (fired.instruction.chown, fired.instruction.sources, fired.instruction.dest) == ("app", ("data",), "/x/data")
    assert fired.used == {"U", "DIR"}


# --- heredoc content: expanded only when the delimiter is unquoted --------------------------------------------------
# (id, COPY/ADD text with a heredoc, expected content after expansion, used)
HEREDOC_CONTENT = [
    ("unquoted", "COPY <<EOF /x\nhello $U\nEOF", "hello app\n", {"U"}),
    # BuildKit expands a body with a lexer that skips quote processing: quotes are plain text (so `'$G'` is
    # expanded too) and stay in the file.
    ("quotes are plain text", "COPY <<EOF /x\n\"$U\" '$G'\nEOF", "\"app\" 'staff'\n", {"U", "G"}),
    # ...but a backslash still escapes the next character and is removed: `\$V` gives a literal `$V`.
    ("backslash escapes and is removed", "COPY <<EOF /x\n\\$V \\\\ a\\nb\nEOF", "$V \\ anb\n", set()),
    # A backslash before the line end is removed too (the newline stays): BuildKit's known limitation.
    ("backslash at a line end", "COPY <<EOF /x\napk add \\\n  curl\nEOF", "apk add \n  curl\n", set()),
    ("default values keep their quotes", 'COPY <<EOF /x\n${NOPE:-"a b"}\nEOF', '"a b"\n', {"NOPE"}),
    ("braces and defaults", "COPY <<EOF /x\n${U}-${NOPE:-none}\nEOF", "app-none\n", {"U", "NOPE"}),
    ("unset is empty", "COPY <<EOF /x\n[$NOPE]\nEOF", "[]\n", {"NOPE"}),
    ("single-quoted delimiter", "COPY <<'EOF' /x\nhello $U\nEOF", "hello $U\n", set()),
    ("double-quoted delimiter", 'COPY <<"EOF" /x\nhello $U\nEOF', "hello $U\n", set()),
    ("partly quoted delimiter", 'COPY <<E"OF" /x\nhello $U\nEOF', "hello $U\n", set()),
    # With <<- the tabs are still there: they are stripped when the file is written.
    ("chomp keeps tabs", "COPY <<-EOF /x\n\t$U\n\tEOF", "\tapp\n", {"U"}),
    ("ADD", "ADD <<EOF /x\n$G\nEOF", "staff\n", {"G"}),
    ("CRLF body", "COPY <<EOF /x\r\n$U\r\nEOF\r\n", "app\r\n", {"U"}),
]


@pytest.mark.parametrize(
    ("text", "content", "used"), [c[1:] for c in HEREDOC_CONTENT], ids=[c[0] for c in HEREDOC_CONTENT]
)
def test_heredoc_content(text: str, content: str, used: set[str]) -> None:
    instruction = last(text)
    assert isinstance(instruction, Copy | Add)
    (before,) = instruction.source_contents
    result = expand(instruction, ENV)
    (after,) = result.instruction.source_contents
    assert after.content == content
    assert (after.name, after.chomp, after.expand, after.fd) == (before.name, before.chomp, before.expand, before.fd)
    assert result.used == frozenset(used)


def test_two_heredocs_one_quoted() -> None:
    copy = last("COPY <<A <<'B' /d/\n$U\nA\n$U\nB")
    result = expand(copy, ENV)
    assert result.instruction.source_contents == (
        Heredoc("A", "app\n"),
        Heredoc("B", "$U\n", expand=False),
    )


# --- the escape directive -------------------------------------------------------------------------------------------
# (id, Dockerfile, type, expected fields, used)
ESCAPE = [
    ("backslash is literal", "# escape=`\nFROM a\nWORKDIR C:\\$DIR", Workdir, {"path": "C:\\data"}, {"DIR"}),
    (
        "backtick escapes $",
        "# escape=`\nFROM a\nENV A=`$V B=x`\\y",
        Env,
        {"pairs": (KeyValue("A", "$V"), KeyValue("B", "x\\y"))},
        set(),
    ),
    (
        "backtick in COPY",
        "# escape=`\nFROM a\nCOPY `$DIR C:\\$DIR",
        Copy,
        {"sources": ("$DIR",), "dest": "C:\\data"},
        {"DIR"},
    ),
    (
        "default escape",
        "FROM a\nENV A=\\$V B=x\\\\y",
        Env,
        {"pairs": (KeyValue("A", "$V"), KeyValue("B", "x\\y"))},
        set(),
    ),
]


@pytest.mark.parametrize(("text", "kind", "expected", "used"), [c[1:] for c in ESCAPE], ids=[c[0] for c in ESCAPE])
def test_escape_directive(text: str, kind: type, expected: dict, used: set[str]) -> None:
    dockerfile = parse(text + "\n")
    instruction = dockerfile.instructions[-1]
    assert type(instruction) is kind
    result = expand(instruction, ENV, dockerfile.escape)
    assert {name: getattr(result.instruction, name) for name in expected} == expected
    assert result.used == frozenset(used)


# --- errors carry the instruction's position ------------------------------------------------------------------------
# (id, instruction line (line 2 of the file), message fragment, column)
ERRORS = [
    ("required variable", "WORKDIR ${DEST:?set DEST first}", "DEST: set DEST first", 1),
    ("required and non-empty", "USER ${EMPTY:?}", "EMPTY: is not allowed to be empty", 1),
    ("missing brace", "ENV A=${V", "missing '}'", 1),
    ("bad substitution", "LABEL a=${}", "bad substitution", 1),
    # COPY splits on blanks without quote processing, so `"a` is a word of its own: an unterminated quote.
    ("quote split by COPY", 'COPY "a b" /x', "unexpected end of statement while looking for matching double-quote", 1),
    ("indented", "   STOPSIGNAL ${SIGNAL:?no signal}", "SIGNAL: no signal", 4),
    # EXPOSE words are split on blanks at parse time, so `${P:?no` lacks its brace.
    ("EXPOSE splits before expanding", "EXPOSE ${P:?no port}", "missing '}'", 1),
    ("heredoc body", "COPY <<EOF /x\n${U:?}${NOPE:?unset}\nEOF", "NOPE: unset", 1),
]


@pytest.mark.parametrize(("text", "message", "column"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_expansion_errors(text: str, message: str, column: int) -> None:
    instruction = parse(f"FROM a\n{text}\n", "app/Dockerfile").instructions[1]
    with pytest.raises(ShellExpansionError) as caught:
        expand(instruction, ENV)
    error = caught.value
    assert message in error.message
    assert (error.location.file, error.location.start_line, error.location.column) == ("app/Dockerfile", 2, column)
    assert error.location == instruction.location
    assert error.render().splitlines()[0] == f"app/Dockerfile:2:{column}: {error.message}"


def test_expand_does_not_change_the_parsed_instruction() -> None:
    copy = last("COPY $DIR /x")
    expand(copy, ENV)
    assert isinstance(copy, Copy)
    assert copy.sources == ("$DIR",)


def test_heredoc_body_escape_is_always_backslash() -> None:
    # BuildKit expands bodies with a fresh backslash lexer, whatever the file's escape directive says.
    dockerfile = parse("# escape=`\nFROM a\nCOPY <<EOF C:\\x\n\\$U `$U\nEOF\n")
    copy = dockerfile.instructions[1]
    result = expand(copy, ENV, dockerfile.escape)
    assert isinstance(result.instruction, Copy)
    assert result.instruction.dest == "C:\\x"
    assert result.instruction.source_contents[0].content == "$U `app\n"
    assert result.used == {"U"}
