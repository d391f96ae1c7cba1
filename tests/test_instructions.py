"""Typed instructions: the conformance README section 7 checklist as tables.

Every flag of every instruction read into its field, the flag rules (booleans, `=`, duplicates, unknown names),
every argument-count rule, and for every error its message, line, column and rendering.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from parser import DockerfileSyntaxError, PybuildError, parse
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

SECOND = 1_000_000_000


def last(text: str) -> Instruction:
    """The last instruction of ``FROM base`` + ``text`` (or of ``text`` alone when it starts with FROM)."""
    source = text if text.upper().startswith("FROM") else "FROM base\n" + text
    return parse(source + "\n").instructions[-1]


def fields(instruction: Instruction) -> dict:
    return {k: v for k, v in vars(instruction).items() if k not in ("location", "original")}


# --- every flag into its field --------------------------------------------------------------------------------------
# (id, instruction line, type, the fields that must have these values)
FLAG_FIELDS = [
    # FROM
    ("FROM no flags", "FROM alpine:3.19", From, {"image": "alpine:3.19", "stage_name": None, "platform": None}),
    ("FROM --platform", "FROM --platform=linux/arm64/v8 img", From, {"image": "img", "platform": "linux/arm64/v8"}),
    (
        "FROM --platform variable kept",
        "FROM --platform=$BUILDPLATFORM golang AS build",
        From,
        {"image": "golang", "stage_name": "build", "platform": "$BUILDPLATFORM"},
    ),
    # RUN
    (
        "RUN no flags",
        "RUN make",
        Run,
        {"mounts": (), "network": None, "security": None, "devices": (), "command": Command(("make",), False)},
    ),
    ("RUN --network=none", "RUN --network=none make", Run, {"network": "none"}),
    ("RUN --network=host", "RUN --network=host make", Run, {"network": "host"}),
    ("RUN --network=default", "RUN --network=default make", Run, {"network": "default"}),
    ("RUN --security=insecure", "RUN --security=insecure make", Run, {"security": "insecure"}),
    ("RUN --security=sandbox", "RUN --security=sandbox make", Run, {"security": "sandbox"}),
    (
        "RUN --mount repeatable, in order",
        "RUN --mount=type=cache,target=/root/.cache --network=none --mount=type=secret,id=tok make",
        Run,
        {
            "mounts": (Mount(type="cache", target="/root/.cache"), Mount(type="secret", id="tok")),
            "network": "none",
        },
    ),
    (
        "RUN exec form with flags",
        'RUN --network=none ["make", "all"]',
        Run,
        {"command": Command(("make", "all"), True)},
    ),
    # COPY
    (
        "COPY defaults",
        "COPY a b /dest/",
        Copy,
        {
            "sources": ("a", "b"),
            "dest": "/dest/",
            "source_contents": (),
            "from_": None,
            "chown": None,
            "chmod": None,
            "link": False,
            "parents": False,
            "excludes": (),
        },
    ),
    ("COPY --from", "COPY --from=builder /out /app", Copy, {"from_": "builder", "sources": ("/out",)}),
    ("COPY --from an image", "COPY --from=nginx:1.25 /etc/nginx /n", Copy, {"from_": "nginx:1.25"}),
    ("COPY --chown", "COPY --chown=1000:1000 a b", Copy, {"chown": "1000:1000"}),
    ("COPY --chown quoted", 'COPY --chown="app user" a b', Copy, {"chown": "app user"}),
    ("COPY --chmod octal", "COPY --chmod=0755 a b", Copy, {"chmod": "0755"}),
    ("COPY --chmod 3 digits", "COPY --chmod=644 a b", Copy, {"chmod": "644"}),
    ("COPY --chmod symbolic", "COPY --chmod=u+x,go-w a b", Copy, {"chmod": "u+x,go-w"}),
    ("COPY --chmod variable", "COPY --chmod=$MODE a b", Copy, {"chmod": "$MODE"}),
    ("COPY --link", "COPY --link a b", Copy, {"link": True}),
    ("COPY --parents", "COPY --parents ./x/*.go /src/", Copy, {"parents": True}),
    ("COPY --exclude repeatable", "COPY --exclude=*.md --exclude=.git . /src", Copy, {"excludes": ("*.md", ".git")}),
    (
        "COPY every flag",
        "COPY --from=b --chown=u:g --chmod=600 --link=false --parents=true --exclude=x a /d",
        Copy,
        {"from_": "b", "chown": "u:g", "chmod": "600", "link": False, "parents": True, "excludes": ("x",)},
    ),
    ("COPY JSON form", 'COPY ["a b", "c d/"]', Copy, {"sources": ("a b",), "dest": "c d/"}),
    ("COPY -- ends flags", "COPY -- --link /d", Copy, {"sources": ("--link",), "link": False}),
    # ADD
    (
        "ADD defaults",
        "ADD https://example.com/a.tgz /opt/",
        Add,
        {
            "sources": ("https://example.com/a.tgz",),
            "dest": "/opt/",
            "chown": None,
            "chmod": None,
            "link": False,
            "keep_git_dir": False,
            "checksum": None,
            "unpack": None,
            "excludes": (),
        },
    ),
    ("ADD --chown", "ADD --chown=root a b", Add, {"chown": "root"}),
    ("ADD --chmod", "ADD --chmod=0444 a b", Add, {"chmod": "0444"}),
    ("ADD --link", "ADD --link a b", Add, {"link": True}),
    ("ADD --keep-git-dir", "ADD --keep-git-dir https://g/r.git /r", Add, {"keep_git_dir": True}),
    ("ADD --keep-git-dir=false", "ADD --keep-git-dir=false https://g/r.git /r", Add, {"keep_git_dir": False}),
    (
        "ADD --checksum",
        "ADD --checksum=sha256:24454f830cdb571e2c4ad15481119c43b3cafd48dd869a9b2945d1036d1dc68d u /d",
        Add,
        {"checksum": "sha256:24454f830cdb571e2c4ad15481119c43b3cafd48dd869a9b2945d1036d1dc68d"},
    ),
    ("ADD --unpack", "ADD --unpack https://x/a.tgz /d", Add, {"unpack": True}),
    ("ADD --unpack=false", "ADD --unpack=false a.tgz /d", Add, {"unpack": False}),
    ("ADD --exclude repeatable", "ADD --exclude=a --exclude=b . /d", Add, {"excludes": ("a", "b")}),
    # HEALTHCHECK: durations in nanoseconds
    (
        "HEALTHCHECK defaults",
        "HEALTHCHECK CMD curl -f http://localhost/",
        Healthcheck,
        {
            "command": Command(("curl -f http://localhost/",), False),
            "interval": None,
            "timeout": None,
            "start_period": None,
            "start_interval": None,
            "retries": None,
        },
    ),
    (
        "HEALTHCHECK every flag",
        "HEALTHCHECK --interval=30s --timeout=1m30s --start-period=0 --start-interval=500ms --retries=3 CMD true",
        Healthcheck,
        {
            "interval": 30 * SECOND,
            "timeout": 90 * SECOND,
            "start_period": 0,
            "start_interval": 500_000_000,
            "retries": 3,
        },
    ),
    ("HEALTHCHECK hours", "HEALTHCHECK --interval=1h CMD true", Healthcheck, {"interval": 3600 * SECOND}),
    ("HEALTHCHECK fraction", "HEALTHCHECK --interval=1.5s CMD true", Healthcheck, {"interval": 1_500_000_000}),
    # Go computes 2.3h exactly (integer part exact, fraction via float64); a naive float gives ...999999.
    ("HEALTHCHECK exact fraction", "HEALTHCHECK --interval=2.3h CMD true", Healthcheck, {"interval": 8_280 * SECOND}),
    ("HEALTHCHECK leading dot", "HEALTHCHECK --timeout=.5s CMD true", Healthcheck, {"timeout": 500_000_000}),
    ("HEALTHCHECK microseconds", "HEALTHCHECK --timeout=1000us CMD true", Healthcheck, {"timeout": 1_000_000}),
    ("HEALTHCHECK micro sign", "HEALTHCHECK --timeout=1500µs CMD true", Healthcheck, {"timeout": 1_500_000}),
    ("HEALTHCHECK nanoseconds", "HEALTHCHECK --timeout=1000000ns CMD true", Healthcheck, {"timeout": 1_000_000}),
    ("HEALTHCHECK compound", "HEALTHCHECK --interval=1h2m3s4ms CMD true", Healthcheck, {"interval": 3_723_004_000_000}),
    ("HEALTHCHECK exactly 1ms", "HEALTHCHECK --interval=1ms CMD true", Healthcheck, {"interval": 1_000_000}),
    ("HEALTHCHECK 0s", "HEALTHCHECK --interval=0s CMD true", Healthcheck, {"interval": 0}),
    ("HEALTHCHECK retries 0", "HEALTHCHECK --retries=0 CMD true", Healthcheck, {"retries": 0}),
    ("HEALTHCHECK retries +2", "HEALTHCHECK --retries=+2 CMD true", Healthcheck, {"retries": 2}),
    (
        "HEALTHCHECK exec form",
        'HEALTHCHECK --retries=1 CMD ["curl", "-f", "http://x/"]',
        Healthcheck,
        {"command": Command(("curl", "-f", "http://x/"), True), "retries": 1},
    ),
]


@pytest.mark.parametrize(("text", "kind", "expected"), [c[1:] for c in FLAG_FIELDS], ids=[c[0] for c in FLAG_FIELDS])
def test_flags_into_fields(text: str, kind: type, expected: dict) -> None:
    instruction = last(text)
    assert type(instruction) is kind
    assert {name: getattr(instruction, name) for name in expected} == expected


def test_run_device_needs_the_labs_syntax() -> None:
    dockerfile = parse("# syntax=docker/dockerfile:1.14-labs\nFROM a\nRUN --device=nvidia.com/gpu=all --device=x y\n")
    run = dockerfile.instructions[1]
    assert isinstance(run, Run)
    assert run.devices == ("nvidia.com/gpu=all", "x")


# --- RUN --mount: every key, its aliases, its type restrictions -----------------------------------------------------
# (id, --mount value, the Mount it reads as). readonly None means "the type's default" (bind/secret/ssh read-only).
MOUNTS = [
    ("bind is the default type", "target=/src", Mount(type="bind", target="/src")),
    ("bind every key", "type=bind,source=/a,target=/b,from=stage,ro", Mount("bind", "/b", "/a", "stage", True)),
    ("alias src", "src=a,target=/b", Mount(source="a", target="/b")),
    ("alias dst", "dst=/b", Mount(target="/b")),
    ("alias destination", "destination=/b", Mount(target="/b")),
    ("alias ro", "target=/b,ro", Mount(target="/b", readonly=True)),
    ("alias rw", "target=/b,rw", Mount(target="/b", readonly=False)),
    ("readonly bare", "target=/b,readonly", Mount(target="/b", readonly=True)),
    ("readwrite bare", "target=/b,readwrite", Mount(target="/b", readonly=False)),
    ("readonly=false", "target=/b,readonly=false", Mount(target="/b", readonly=False)),
    ("readwrite=true", "target=/b,readwrite=true", Mount(target="/b", readonly=False)),
    ("readwrite=false", "target=/b,readwrite=false", Mount(target="/b", readonly=True)),
    # BuildKit reads these with Go's strconv.ParseBool, which also takes 1/0/t/f/TRUE/True.
    ("ro=1 (Go ParseBool)", "target=/b,ro=1", Mount(target="/b", readonly=True)),
    ("ro=FALSE", "target=/b,ro=FALSE", Mount(target="/b", readonly=False)),
    (
        "keys and type are case-insensitive",
        "TYPE=CACHE,Target=/x,SHARING=locked",
        Mount("cache", "/x", sharing="locked"),
    ),
    (
        "cache every key",
        "type=cache,id=gomod,target=/go/pkg,from=deps,source=sub,sharing=private,mode=0700,uid=1,gid=2,ro",
        Mount("cache", "/go/pkg", "sub", "deps", True, "gomod", "private", mode="0700", uid="1", gid="2"),
    ),
    ("cache sharing shared", "type=cache,target=/c,sharing=shared", Mount("cache", "/c", sharing="shared")),
    ("cache sharing locked", "type=cache,target=/c,sharing=locked", Mount("cache", "/c", sharing="locked")),
    ("tmpfs size", "type=tmpfs,target=/t,size=64m", Mount("tmpfs", "/t", size="64m")),
    ("secret id", "type=secret,id=npmrc", Mount("secret", id="npmrc")),
    ("secret target only", "type=secret,target=/run/secrets/x", Mount("secret", "/run/secrets/x")),
    ("secret source only", "type=secret,source=x", Mount("secret", source="x")),
    (
        "secret every key",
        "type=secret,id=aws,target=/root/.aws/credentials,required,mode=0400,uid=0,gid=0,env=AWS",
        Mount("secret", "/root/.aws/credentials", id="aws", required=True, mode="0400", uid="0", gid="0", env="AWS"),
    ),
    ("secret required=false", "type=secret,id=x,required=false", Mount("secret", id="x", required=False)),
    ("secret env only with id", "type=secret,id=tok,env=TOKEN", Mount("secret", id="tok", env="TOKEN")),
    ("ssh bare", "type=ssh", Mount("ssh")),
    (
        "ssh every key",
        "type=ssh,id=default,target=/s,required=true,mode=0600",
        Mount("ssh", "/s", id="default", required=True, mode="0600"),
    ),
    ("from ending in $ is fine", "target=/x,from=a$", Mount(target="/x", from_="a$")),
    # The flag's own quotes are removed first (README 4.4); the inner double quotes are CSV quoting.
    ("CSV-quoted value with a comma", """'"target=/a,b",type=bind'""", Mount(target="/a,b")),
]


@pytest.mark.parametrize(("value", "mount"), [c[1:] for c in MOUNTS], ids=[c[0] for c in MOUNTS])
def test_run_mount(value: str, mount: Mount) -> None:
    run = last(f"RUN --mount={value} make")
    assert isinstance(run, Run)
    assert run.mounts == (mount,)


# (id, --mount value, message). The error points at the offending --mount flag: column 5 of `RUN --mount=...`.
MOUNT_ERRORS = [
    ("unknown type", "type=volume,target=/x", "unsupported mount type 'volume'"),
    ("unknown key", "target=/x,bogus=1", "unexpected key 'bogus' in 'bogus=1'"),
    ("key without a value", "type=bind,target", "invalid field 'target'"),
    ("bare id", "type=secret,id", "invalid field 'id'"),
    ("sharing on bind", "type=bind,target=/x,sharing=locked", "unexpected key 'sharing' for mount type bind"),
    ("sharing on tmpfs", "type=tmpfs,target=/x,sharing=locked", "unexpected key 'sharing' for mount type tmpfs"),
    ("bad sharing value", "type=cache,target=/x,sharing=exclusive", "unsupported sharing value 'exclusive'"),
    ("required on cache", "type=cache,target=/x,required", "unexpected key 'required' for mount type cache"),
    ("required on bind", "target=/x,required=true", "unexpected key 'required' for mount type bind"),
    ("size on cache", "type=cache,target=/x,size=1m", "unexpected key 'size' for mount type cache"),
    ("mode on bind", "target=/x,mode=0755", "unexpected key 'mode' for mount type bind"),
    ("uid on tmpfs", "type=tmpfs,target=/x,uid=1", "unexpected key 'uid' for mount type tmpfs"),
    ("gid on bind", "target=/x,gid=1", "unexpected key 'gid' for mount type bind"),
    ("bad boolean", "target=/x,ro=yes", "invalid value for readonly: 'yes'"),
    ("variable in from", "target=/x,from=$STAGE", "'from' doesn't support variable expansion"),
    ("secret with from", "type=secret,id=a,from=b", "secret mounts do not take 'from'"),
    ("secret without id, source or target", "type=secret,required", "a secret mount needs an id, a source or a target"),
    ("secret with source and id", "type=secret,src=a,id=b", "a secret mount cannot have both source and id"),
    ("bind without target", "type=bind,source=a", "a bind mount needs a target"),
    ("cache without target", "type=cache,id=x", "a cache mount needs a target"),
    ("unterminated CSV quote", """'"target=/x'""", "invalid mount"),
]


@pytest.mark.parametrize(("value", "message"), [c[1:] for c in MOUNT_ERRORS], ids=[c[0] for c in MOUNT_ERRORS])
def test_run_mount_errors(value: str, message: str) -> None:
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse(f"FROM a\nRUN --mount={value} make\n")
    assert caught.value.message.startswith("--mount: ")
    assert message in caught.value.message
    assert (caught.value.location.start_line, caught.value.location.column) == (2, 5)


def test_run_mount_error_points_at_the_bad_one() -> None:
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse("FROM a\nRUN --mount=type=cache,target=/a --network=none --mount=type=nope,target=/b x\n")
    assert caught.value.message == "--mount: unsupported mount type 'nope' (one of bind, cache, tmpfs, secret, ssh)"
    assert (caught.value.location.start_line, caught.value.location.column) == (2, 49)


# --- boolean flags: bare, =true/=false in any case; `=` alone and other values are errors ---------------------------
# (id, flags, expected value of link or an error message)
BOOLEAN_FLAGS = [
    ("bare", "--link", True),
    ("=true", "--link=true", True),
    ("=TRUE", "--link=TRUE", True),
    ("=True", "--link=True", True),
    ("=false", "--link=false", False),
    ("=FALSE", "--link=FALSE", False),
    ("=fAlSe", "--link=fAlSe", False),
    ("quoted", '--link="true"', True),
    ("missing value", "--link=", "missing a value on flag: --link"),
    ("not a boolean", "--link=maybe", "expecting boolean value for flag --link, not: maybe"),
    # BFlags compares with "true"/"false" only: Go's ParseBool spellings are not accepted here.
    ("1 is not a boolean flag value", "--link=1", "expecting boolean value for flag --link, not: 1"),
    ("duplicate", "--link --link=false", "duplicate flag specified: --link"),
]


@pytest.mark.parametrize(("flags", "expected"), [c[1:] for c in BOOLEAN_FLAGS], ids=[c[0] for c in BOOLEAN_FLAGS])
def test_boolean_flags(flags: str, expected: bool | str) -> None:
    text = f"FROM a\nCOPY {flags} src /dest\n"
    if isinstance(expected, bool):
        copy = parse(text).instructions[1]
        assert isinstance(copy, Copy)
        assert copy.link is expected
    else:
        with pytest.raises(DockerfileSyntaxError) as caught:
            parse(text)
        assert caught.value.message == expected
        assert caught.value.location.start_line == 2


# --- errors: message, position and rendering ------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorCase:
    id: str
    text: str
    message: str  # a substring of the message
    line: int
    column: int
    hint: str | None = None


DURATION_HINT = "write it like 30s, 1m30s or 500ms"
FROM_HINT = "FROM image [AS name]"
MOVE_HINT = "move it to the top of the file; here it would only be a comment"
SYNTAX_HINT = "remove the # syntax line or point it at docker/dockerfile:1"
COPY_HINT = "COPY <src>... <dest>"

ERRORS = [
    # string and list flags need `=`
    *[
        ErrorCase(f"{flag} needs =", f"FROM a\n{line}\n", f"missing a value on flag: --{flag}", 2, column, hint)
        for flag, line, column, hint in [
            ("from", "COPY --from builder /a /b", 6, "write --from=VALUE"),
            ("chown", "COPY --chown a b", 6, "write --chown=VALUE"),
            ("chmod", "ADD --chmod a b", 5, "write --chmod=VALUE"),
            ("checksum", "ADD --checksum a b", 5, "write --checksum=VALUE"),
            ("exclude", "COPY --exclude a b", 6, "write --exclude=VALUE"),
            ("mount", "RUN --mount make", 5, "write --mount=VALUE"),
            ("network", "RUN --network make", 5, "write --network=VALUE"),
            ("security", "RUN --security make", 5, "write --security=VALUE"),
            ("interval", "HEALTHCHECK --interval CMD x", 13, "write --interval=VALUE"),
            ("retries", "HEALTHCHECK --retries CMD x", 13, "write --retries=VALUE"),
        ]
    ],
    ErrorCase(
        "FROM --platform needs =",
        "FROM --platform img\n",
        "missing a value on flag: --platform",
        1,
        6,
        "write --platform=VALUE",
    ),
    # duplicates: the second occurrence is pointed at
    ErrorCase("duplicate --from", "FROM a\nCOPY --from=x --from=y a b\n", "duplicate flag specified: --from", 2, 15),
    ErrorCase(
        "duplicate --chown", "FROM a\nADD --chown=a --link --chown=b a b\n", "duplicate flag specified: --chown", 2, 22
    ),
    ErrorCase(
        "duplicate --network",
        "FROM a\nRUN --network=none --network=host x\n",
        "duplicate flag specified: --network",
        2,
        20,
    ),
    ErrorCase(
        "duplicate --platform", "FROM --platform=a --platform=b img\n", "duplicate flag specified: --platform", 1, 19
    ),
    ErrorCase("duplicate --retries", "FROM a\nHEALTHCHECK --retries=1 --retries=2 CMD x\n", "duplicate flag", 2, 25),
    # unknown flags, with a hint when one is close
    ErrorCase("--chwon", "FROM a\nCOPY --chwon=1 a b\n", "unknown flag: --chwon", 2, 6, "did you mean --chown?"),
    ErrorCase("--form", "FROM a\nCOPY --form=x a b\n", "unknown flag: --form", 2, 6, "did you mean --from?"),
    ErrorCase("--mnt", "FROM a\nRUN --mnt=type=cache x\n", "unknown flag: --mnt", 2, 5, "did you mean --mount?"),
    ErrorCase("--platfrom", "FROM --platfrom=x img\n", "unknown flag: --platfrom", 1, 6, "did you mean --platform?"),
    ErrorCase(
        "--intervall",
        "FROM a\nHEALTHCHECK --intervall=1s CMD x\n",
        "unknown flag: --intervall",
        2,
        13,
        "did you mean --interval?",
    ),
    ErrorCase("no close flag", "FROM a\nCOPY --zzz a b\n", "unknown flag: --zzz", 2, 6),
    ErrorCase("--from on ADD", "FROM a\nADD --from=x a b\n", "unknown flag: --from", 2, 5),
    ErrorCase("--parents on ADD", "FROM a\nADD --parents a b\n", "unknown flag: --parents", 2, 5),
    ErrorCase("--checksum on COPY", "FROM a\nCOPY --checksum=x a b\n", "unknown flag: --checksum", 2, 6),
    ErrorCase("ENV takes no flags", "FROM a\nENV --x=1 A=B\n", "unknown flag: --x", 2, 5, "ENV takes no flags"),
    ErrorCase("CMD takes no flags", "FROM a\nCMD --doit true\n", "unknown flag: --doit", 2, 5, "CMD takes no flags"),
    ErrorCase(
        "ONBUILD's own flags", "FROM a\nONBUILD --x RUN y\n", "unknown flag: --x", 2, 9, "ONBUILD takes no flags"
    ),
    ErrorCase(
        "flag of an ONBUILD trigger",
        "FROM a\nONBUILD COPY --chwon=1 a b\n",
        "unknown flag: --chwon",
        2,
        14,
        "did you mean --chown?",
    ),
    ErrorCase(
        "flag on a continuation line",
        "FROM a\nCOPY --chown=1 \\\n     --frm=b \\\n     x /y\n",
        "unknown flag: --frm",
        3,
        6,
        "did you mean --from?",
    ),
    # flag values
    ErrorCase(
        "RUN --network=bridge",
        "FROM a\nRUN --network=bridge x\n",
        "unsupported network mode 'bridge'",
        2,
        5,
        "use default, none or host",
    ),
    ErrorCase(
        "RUN --security=privileged",
        "FROM a\nRUN --security=privileged x\n",
        "unsupported security mode",
        2,
        5,
        "use sandbox or insecure",
    ),
    ErrorCase(
        "RUN --device without labs",
        "FROM a\nRUN --device=x y\n",
        "--device needs the labs syntax",
        2,
        5,
        "start the file with # syntax=docker/dockerfile:1-labs",
    ),
    ErrorCase(
        "COPY --chmod not octal",
        "FROM a\nCOPY --chmod=999 a b\n",
        "invalid --chmod value '999'",
        2,
        6,
        "an octal mode such as 0755, or symbolic such as u+x",
    ),
    ErrorCase(
        "HEALTHCHECK bad duration",
        "FROM a\nHEALTHCHECK --interval=5 CMD x\n",
        "--interval: invalid duration '5'",
        2,
        13,
        DURATION_HINT,
    ),
    ErrorCase(
        "HEALTHCHECK duration unit",
        "FROM a\nHEALTHCHECK --timeout=5d CMD x\n",
        "--timeout: invalid duration '5d'",
        2,
        13,
        DURATION_HINT,
    ),
    ErrorCase(
        "HEALTHCHECK negative duration",
        "FROM a\nHEALTHCHECK --interval=-1s CMD x\n",
        "invalid duration '-1s'",
        2,
        13,
        DURATION_HINT,
    ),
    # Go's time.ParseDuration takes ASCII digits only.
    ErrorCase(
        "HEALTHCHECK non-ASCII digit",
        "FROM a\nHEALTHCHECK --interval=\u0663s CMD x\n",
        "invalid duration",
        2,
        13,
        DURATION_HINT,
    ),
    ErrorCase(
        "HEALTHCHECK 5000-digit duration",
        f"FROM a\nHEALTHCHECK --interval={'9' * 5000}s CMD x\n",
        "invalid duration",
        2,
        13,
        DURATION_HINT,
    ),
    ErrorCase(
        "HEALTHCHECK 5000-digit retries",
        f"FROM a\nHEALTHCHECK --retries={'9' * 5000} CMD x\n",
        "--retries must be a whole number",
        2,
        13,
    ),
    ErrorCase(
        "HEALTHCHECK huge duration",
        f"FROM a\nHEALTHCHECK --interval={'9' * 40}s CMD x\n",
        "invalid duration",
        2,
        13,
        DURATION_HINT,
    ),
    ErrorCase(
        "HEALTHCHECK below 1ms",
        "FROM a\nHEALTHCHECK --start-period=999us CMD x\n",
        "--start-period cannot be less than 1ms",
        2,
        13,
    ),
    ErrorCase(
        "HEALTHCHECK start-interval below 1ms",
        "FROM a\nHEALTHCHECK --start-interval=1ns CMD x\n",
        "--start-interval cannot be less than 1ms",
        2,
        13,
    ),
    ErrorCase(
        "HEALTHCHECK negative retries",
        "FROM a\nHEALTHCHECK --retries=-1 CMD x\n",
        "--retries cannot be negative (-1)",
        2,
        13,
    ),
    ErrorCase(
        "HEALTHCHECK retries not a number",
        "FROM a\nHEALTHCHECK --retries=3x CMD x\n",
        "--retries must be a whole number, not '3x'",
        2,
        13,
    ),
    ErrorCase(
        "HEALTHCHECK retries with _",
        "FROM a\nHEALTHCHECK --retries=1_0 CMD x\n",
        "--retries must be a whole number",
        2,
        13,
    ),
    ErrorCase(
        "HEALTHCHECK retries over int32",
        "FROM a\nHEALTHCHECK --retries=2147483648 CMD x\n",
        "--retries must be a whole number",
        2,
        13,
    ),
    # argument counts
    ErrorCase("FROM without image", "FROM\n", "FROM requires either one or three arguments", 1, 1, FROM_HINT),
    ErrorCase("FROM two arguments", "FROM a b\n", "FROM requires either one or three arguments", 1, 1, FROM_HINT),
    ErrorCase("FROM AS without name", "FROM a AS\n", "FROM requires either one or three arguments", 1, 1, FROM_HINT),
    ErrorCase("FROM four arguments", "FROM a AS b c\n", "FROM requires either one or three arguments", 1, 1, FROM_HINT),
    # BuildKit says "FROM requires either one or three arguments" here too; pybuild names the real problem.
    ErrorCase("FROM 2nd argument not AS", "FROM a IS b\n", "2nd argument must be 'AS'", 1, 8),
    ErrorCase(
        "COPY one argument",
        "FROM a\nCOPY a\n",
        "COPY requires at least two arguments, but only 1 provided",
        2,
        1,
        COPY_HINT,
    ),
    ErrorCase(
        "COPY no argument",
        "FROM a\nCOPY --link\n",
        "COPY requires at least two arguments, but only 0 provided",
        2,
        1,
        COPY_HINT,
    ),
    ErrorCase(
        "ADD one argument",
        "FROM a\nADD a\n",
        "ADD requires at least two arguments, but only 1 provided",
        2,
        1,
        "ADD <src>... <dest>",
    ),
    ErrorCase("COPY JSON one element", 'FROM a\nCOPY ["a"]\n', "COPY requires at least two arguments", 2, 1, COPY_HINT),
    # pybuild's own check: BuildKit leaves an empty RUN to fail at build time.
    ErrorCase(
        "RUN nothing",
        "FROM a\nRUN\n",
        "RUN requires at least one argument",
        2,
        1,
        'RUN <command> or RUN ["executable", ...]',
    ),
    ErrorCase("ENV nothing", "FROM a\nENV\n", "ENV requires at least one argument", 2, 1, "ENV key=value ..."),
    ErrorCase("LABEL nothing", "FROM a\nLABEL\n", "LABEL requires at least one argument", 2, 1, "LABEL key=value ..."),
    ErrorCase("ARG nothing", "ARG\nFROM a\n", "ARG requires at least one argument", 1, 1, "ARG name[=default]"),
    ErrorCase(
        "EXPOSE nothing",
        "FROM a\nEXPOSE\n",
        "EXPOSE requires at least one argument",
        2,
        1,
        "EXPOSE port[/protocol] ...",
    ),
    ErrorCase("VOLUME nothing", "FROM a\nVOLUME\n", "VOLUME requires at least one argument", 2, 1),
    ErrorCase("VOLUME empty JSON", "FROM a\nVOLUME []\n", "VOLUME requires at least one argument", 2, 1),
    ErrorCase("VOLUME empty entry", 'FROM a\nVOLUME ["/a", ""]\n', "VOLUME specified can not be an empty string", 2, 8),
    ErrorCase(
        "VOLUME blank entry", 'FROM a\nVOLUME ["/a", "  "]\n', "VOLUME specified can not be an empty string", 2, 8
    ),
    ErrorCase("USER nothing", "FROM a\nUSER\n", "USER requires exactly one argument", 2, 1, "USER user[:group]"),
    ErrorCase("WORKDIR nothing", "FROM a\nWORKDIR\n", "WORKDIR requires exactly one argument", 2, 1, "WORKDIR /path"),
    ErrorCase(
        "STOPSIGNAL nothing",
        "FROM a\nSTOPSIGNAL\n",
        "STOPSIGNAL requires exactly one argument",
        2,
        1,
        "STOPSIGNAL SIGTERM",
    ),
    ErrorCase(
        "MAINTAINER nothing",
        "FROM a\nMAINTAINER\n",
        "MAINTAINER requires exactly one argument",
        2,
        1,
        "MAINTAINER name",
    ),
    ErrorCase(
        "ONBUILD nothing", "FROM a\nONBUILD\n", "ONBUILD requires at least one argument", 2, 1, "ONBUILD <instruction>"
    ),
    ErrorCase(
        "HEALTHCHECK nothing",
        "FROM a\nHEALTHCHECK\n",
        "HEALTHCHECK requires at least one argument",
        2,
        1,
        "HEALTHCHECK [options] CMD command",
    ),
    # stage names
    ErrorCase(
        "stage name starts with a digit",
        "FROM a AS 1st\n",
        "invalid name for build stage: '1st', name can't start with a number",
        1,
        11,
    ),
    ErrorCase("stage name with a slash", "FROM a AS b/c\n", "invalid name for build stage: 'b/c'", 1, 11),
    ErrorCase("stage name with a colon", "FROM a AS b:c\n", "invalid name for build stage: 'b:c'", 1, 11),
    ErrorCase("stage name starts with -", "FROM a AS -b\n", "invalid name for build stage: '-b'", 1, 11),
    ErrorCase("stage name starts with _", "FROM a as _b\n", "invalid name for build stage: '_b'", 1, 11),
    ErrorCase("stage name is a variable", "FROM a AS $NAME\n", "invalid name for build stage: '$NAME'", 1, 11),
    # SHELL is JSON only
    ErrorCase(
        "SHELL shell form",
        "FROM a\nSHELL /bin/bash -c\n",
        "SHELL requires the arguments to be in JSON form",
        2,
        1,
        'SHELL ["/bin/sh", "-c"]',
    ),
    ErrorCase(
        "SHELL invalid JSON",
        "FROM a\nSHELL ['/bin/sh']\n",
        "SHELL requires the arguments to be in JSON form",
        2,
        1,
        'SHELL ["/bin/sh", "-c"]',
    ),
    ErrorCase("SHELL empty", "FROM a\nSHELL []\n", "SHELL requires at least one argument", 2, 1),
    # HEALTHCHECK types
    ErrorCase(
        "HEALTHCHECK unknown type",
        "FROM a\nHEALTHCHECK CONNECT TCP 7000\n",
        "Unknown type 'CONNECT' in HEALTHCHECK (try CMD)",
        2,
        13,
    ),
    ErrorCase(
        "HEALTHCHECK CMD without command",
        "FROM a\nHEALTHCHECK --interval=5s CMD\n",
        "Missing command after HEALTHCHECK CMD",
        2,
        27,
    ),
    ErrorCase(
        "HEALTHCHECK CMD with empty JSON",
        "FROM a\nHEALTHCHECK CMD []\n",
        "Missing command after HEALTHCHECK CMD",
        2,
        13,
    ),
    ErrorCase(
        "HEALTHCHECK NONE with arguments", "FROM a\nHEALTHCHECK NONE x\n", "HEALTHCHECK NONE takes no arguments", 2, 18
    ),
    # ONBUILD triggers
    ErrorCase(
        "ONBUILD ONBUILD",
        "FROM a\nONBUILD ONBUILD RUN x\n",
        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
        2,
        9,
    ),
    ErrorCase("ONBUILD FROM", "FROM a\nONBUILD FROM b\n", "FROM isn't allowed as an ONBUILD trigger", 2, 9),
    ErrorCase(
        "ONBUILD MAINTAINER", "FROM a\nonbuild maintainer me\n", "MAINTAINER isn't allowed as an ONBUILD trigger", 2, 9
    ),
    ErrorCase(
        "ONBUILD unknown trigger", "FROM a\nONBUILD RUNN x\n", "unknown instruction: RUNN", 2, 9, "did you mean RUN?"
    ),
    ErrorCase(
        "ONBUILD trigger argument error",
        "FROM a\n  ONBUILD  COPY x\n",
        "COPY requires at least two arguments",
        2,
        12,
        COPY_HINT,
    ),
    # ENV and LABEL
    ErrorCase("ENV legacy without value", "FROM a\nENV PATH\n", "ENV must have two arguments", 2, 5),
    ErrorCase("LABEL legacy without value", "FROM a\nLABEL version\n", "LABEL must have two arguments", 2, 7),
    ErrorCase(
        "ENV = form word without =",
        "FROM a\nENV A=1 B C=3\n",
        "Syntax error - can't find = in 'B'. Must be of the form: name=value",
        2,
        9,
    ),
    ErrorCase("LABEL = form word without =", 'FROM a\nLABEL a=1 "b c"\n', "can't find = in '\"b c\"'", 2, 11),
    ErrorCase("ENV blank name", "FROM a\nENV =x\n", "ENV names can not be blank", 2, 5),
    ErrorCase("LABEL blank name", "FROM a\nLABEL a=b =c\n", "LABEL names can not be blank", 2, 11),
    ErrorCase("ARG blank name", "ARG =x\nFROM a\n", "ARG names can not be blank", 1, 5),
    ErrorCase("ARG second blank name", "FROM a\nARG A=1 =x\n", "ARG names can not be blank", 2, 9),
    # exec form
    ErrorCase(
        "JSON with a number",
        'FROM a\nCMD ["a", 1]\n',
        "when using JSON array syntax, arrays must be comprised of strings only",
        2,
        5,
    ),
    ErrorCase(
        "JSON nested array",
        'FROM a\nENTRYPOINT [ "echo", [ "nested" ] ]\n',
        "arrays must be comprised of strings only",
        2,
        12,
    ),
    # unknown instructions
    ErrorCase("RUNN", "FROM a\nRUNN make\n", "unknown instruction: RUNN", 2, 1, "did you mean RUN?"),
    ErrorCase("COPPY", "FROM a\nCOPPY a b\n", "unknown instruction: COPPY", 2, 1, "did you mean COPY?"),
    ErrorCase(
        "lower-case exposed", "FROM a\nexposed 80\n", "unknown instruction: EXPOSED", 2, 1, "did you mean EXPOSE?"
    ),
    ErrorCase("FRMO", "FRMO a\n", "unknown instruction: FRMO", 1, 1, "did you mean FROM?"),
    ErrorCase(
        "indented unknown", "FROM a\n\t  WORKDIRR /x\n", "unknown instruction: WORKDIRR", 2, 4, "did you mean WORKDIR?"
    ),
    ErrorCase("nothing close", "FROM a\nXYZZY plugh\n", "unknown instruction: XYZZY", 2, 1),
    ErrorCase(
        "BOM on a later line is content",
        "FROM a\n\ufeffRUN x\n",
        "unknown instruction: \ufeffRUN",
        2,
        1,
        "did you mean RUN?",
    ),
    # directives
    ErrorCase(
        "directive after the first instruction",
        "FROM a\n# escape=`\nRUN x\n",
        "parser directive 'escape' must come before the first instruction",
        2,
        1,
        MOVE_HINT,
    ),
    ErrorCase(
        "syntax after the first instruction",
        "FROM a\nRUN x\n  # syntax=docker/dockerfile:1\n",
        "parser directive 'syntax' must come before the first instruction",
        3,
        1,
        MOVE_HINT,
    ),
    ErrorCase(
        "another frontend",
        "# syntax=example.com/my/frontend:1\nFROM a\n",
        "unsupported frontend 'example.com/my/frontend:1'",
        1,
        1,
        SYNTAX_HINT,
    ),
    ErrorCase(
        "another frontend with options",
        "# syntax = tonistiigi/dockerfile:runmount // comment\nFROM a\n",
        "unsupported frontend 'tonistiigi/dockerfile:runmount'",
        1,
        1,
        SYNTAX_HINT,
    ),
    ErrorCase(
        "repeated directive", "# escape=`\n# ESCAPE=`\nFROM a\n", "only one escape parser directive can be used", 2, 1
    ),
    ErrorCase(
        "bad escape",
        "# escape=$\nFROM a\n",
        "invalid escape token '$' does not match ` or \\",
        1,
        1,
        "use # escape=` or # escape=\\",
    ),
]


def _source_line(text: str, line: int) -> str:
    return text.split("\n")[line - 1].rstrip("\r")


@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_errors(case: ErrorCase) -> None:
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse(case.text, "ctx/Dockerfile.dev")
    error = caught.value
    assert case.message in error.message
    location = error.location
    assert (location.file, location.start_line, location.column) == ("ctx/Dockerfile.dev", case.line, case.column)
    assert error.hint == case.hint
    expected = [
        f"ctx/Dockerfile.dev:{case.line}:{case.column}: {error.message}",
        "  " + _source_line(case.text, case.line).expandtabs(1),
        "  " + " " * (case.column - 1) + "^",
    ]
    if case.hint is not None:
        expected.append(f"hint: {case.hint}")
    assert error.render().splitlines() == expected


def test_error_ids_are_unique() -> None:
    assert len({c.id for c in ERRORS}) == len(ERRORS)


def test_file_with_no_instructions() -> None:
    for text in ("", "\n\n", "# just a comment\n\n# another\n", "# syntax=docker/dockerfile:1\n"):
        with pytest.raises(DockerfileSyntaxError) as caught:
            parse(text)
        assert caught.value.message == "file with no instructions"


# --- flags that BuildKit never reads (README section 7, code-derived) -----------------------------------------------
# BuildKit silently accepts any flag on ARG, STOPSIGNAL and HEALTHCHECK NONE and does nothing with it. pybuild never
# ignores a flag silently, so each of these is an error naming the flag, at the flag's column.
IGNORED_FLAGS = [
    ("ARG", "ARG --foo=1 NAME=v", "unknown flag: --foo", 5),
    ("STOPSIGNAL", "STOPSIGNAL --whatever SIGKILL", "unknown flag: --whatever", 12),
    ("HEALTHCHECK NONE", "HEALTHCHECK --interval=5s NONE", "HEALTHCHECK NONE takes no flags", 13),
    ("HEALTHCHECK NONE unknown flag", "HEALTHCHECK --bogus none", "unknown flag: --bogus", 13),
]


@pytest.mark.parametrize(
    ("text", "message", "column"), [c[1:] for c in IGNORED_FLAGS], ids=[c[0] for c in IGNORED_FLAGS]
)
def test_flags_buildkit_ignores_are_errors(text: str, message: str, column: int) -> None:
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse(f"FROM a\n{text}\n")
    assert caught.value.message == message
    assert (caught.value.location.start_line, caught.value.location.column) == (2, column)


# --- FROM forms -----------------------------------------------------------------------------------------------------
# (id, FROM line, image, stage name)
FROM_FORMS = [
    ("image", "FROM alpine", "alpine", None),
    ("tag", "FROM alpine:3.19", "alpine:3.19", None),
    ("digest", "FROM alpine@sha256:" + "a" * 64, "alpine@sha256:" + "a" * 64, None),
    ("registry and port", "FROM registry.local:5000/team/app:1", "registry.local:5000/team/app:1", None),
    ("scratch", "FROM scratch", "scratch", None),
    ("variable image", "FROM ${BASE:-alpine}", "${BASE:-alpine}", None),
    ("AS", "FROM alpine AS build", "alpine", "build"),
    ("as lower case", "FROM alpine as build", "alpine", "build"),
    ("aS mixed case", "FROM alpine aS build", "alpine", "build"),
    ("stage name lower-cased", "FROM alpine AS Build-Stage", "alpine", "build-stage"),
    ("stage name with digits . _ -", "FROM alpine AS b1.2_3-4", "alpine", "b1.2_3-4"),
    ("tabs between words", "FROM\talpine\tAS\tb", "alpine", "b"),
    ("keyword in lower case", "from alpine as b", "alpine", "b"),
]


@pytest.mark.parametrize(("text", "image", "stage"), [c[1:] for c in FROM_FORMS], ids=[c[0] for c in FROM_FORMS])
def test_from_forms(text: str, image: str, stage: str | None) -> None:
    instruction = last(text)
    assert isinstance(instruction, From)
    assert (instruction.image, instruction.stage_name) == (image, stage)


# --- SHELL, HEALTHCHECK, ONBUILD, command forms ---------------------------------------------------------------------
# (id, line, type, expected fields)
FORMS = [
    ("SHELL", 'SHELL ["/bin/bash", "-o", "pipefail", "-c"]', Shell, {"args": ("/bin/bash", "-o", "pipefail", "-c")}),
    ("SHELL one element", 'SHELL ["pwsh"]', Shell, {"args": ("pwsh",)}),
    ("HEALTHCHECK NONE", "HEALTHCHECK NONE", Healthcheck, {"command": None}),
    ("HEALTHCHECK none lower case", "HEALTHCHECK none", Healthcheck, {"command": None}),
    ("HEALTHCHECK cmd lower case", "HEALTHCHECK cmd true", Healthcheck, {"command": Command(("true",), False)}),
    ("HEALTHCHECK CMD exec", 'HEALTHCHECK CMD ["a", "b"]', Healthcheck, {"command": Command(("a", "b"), True)}),
    ("CMD shell", "CMD echo  hi", Cmd, {"command": Command(("echo  hi",), False)}),
    ("CMD exec", 'CMD ["echo", "hi"]', Cmd, {"command": Command(("echo", "hi"), True)}),
    ("CMD empty JSON", "CMD []", Cmd, {"command": Command((), True)}),
    ("CMD nothing", "CMD", Cmd, {"command": Command((), False)}),
    ("CMD invalid JSON is shell form", "CMD ['a']", Cmd, {"command": Command(("['a']",), False)}),
    ("ENTRYPOINT exec", 'ENTRYPOINT ["/init"]', Entrypoint, {"command": Command(("/init",), True)}),
    ("ENTRYPOINT shell", "ENTRYPOINT exec /init", Entrypoint, {"command": Command(("exec /init",), False)}),
    (
        "RUN shell keeps text",
        "RUN echo 'a  b' && \\\n  true",
        Run,
        {"command": Command(("echo 'a  b' &&   true",), False)},
    ),
    ("USER", "USER app:app", User, {"user": "app:app"}),
    ("USER uid", "USER 1000:1000", User, {"user": "1000:1000"}),
    ("WORKDIR keeps spaces", "WORKDIR /my app", Workdir, {"path": "/my app"}),
    ("STOPSIGNAL number", "STOPSIGNAL 9", Stopsignal, {"signal": "9"}),
    ("MAINTAINER", "MAINTAINER Jane Doe <jane@example.com>", Maintainer, {"name": "Jane Doe <jane@example.com>"}),
    ("EXPOSE", "EXPOSE 80 443/tcp 53/udp", Expose, {"ports": ("80", "443/tcp", "53/udp")}),
    ("VOLUME list", "VOLUME /a /b", Volume, {"paths": ("/a", "/b")}),
    ("VOLUME JSON", 'VOLUME ["/a b", "/c"]', Volume, {"paths": ("/a b", "/c")}),
]


@pytest.mark.parametrize(("text", "kind", "expected"), [c[1:] for c in FORMS], ids=[c[0] for c in FORMS])
def test_instruction_forms(text: str, kind: type, expected: dict) -> None:
    instruction = last(text)
    assert type(instruction) is kind
    assert {name: getattr(instruction, name) for name in expected} == expected


# (id, ONBUILD line, trigger type, expression)
ONBUILD = [
    ("RUN", "ONBUILD RUN make", Run, "RUN make"),
    ("COPY with flags", "ONBUILD COPY --chown=app . /src", Copy, "COPY --chown=app . /src"),
    ("ADD", "ONBUILD ADD a /b", Add, "ADD a /b"),
    ("ENV", "ONBUILD ENV A=1", Env, "ENV A=1"),
    ("lower case", "onbuild workdir /x", Workdir, "workdir /x"),
    ("blanks", "ONBUILD    USER   app", User, "USER   app"),
]


@pytest.mark.parametrize(("text", "kind", "expression"), [c[1:] for c in ONBUILD], ids=[c[0] for c in ONBUILD])
def test_onbuild_triggers(text: str, kind: type, expression: str) -> None:
    onbuild = last(text)
    assert isinstance(onbuild, Onbuild)
    assert type(onbuild.trigger) is kind
    assert onbuild.expression == expression
    assert onbuild.trigger.location.start_line == onbuild.location.start_line == 2
    assert onbuild.trigger.location.column == text.index(expression.split()[0]) + 1


# --- ENV, LABEL, ARG: values stay as written (quotes are removed at expansion time) ---------------------------------
# (id, line, type, pairs or ARG definitions)
KEY_VALUES = [
    ("ENV legacy", "ENV PATH /usr/bin", Env, (KeyValue("PATH", "/usr/bin"),)),
    ("ENV legacy keeps everything", 'ENV A  1 "2"  3\\ 4', Env, (KeyValue("A", '1 "2"  3\\ 4'),)),
    ("ENV = form", "ENV A=1 B=2", Env, (KeyValue("A", "1"), KeyValue("B", "2"))),
    ("ENV = form quotes kept", "ENV A=\"x y\" B='z'", Env, (KeyValue("A", '"x y"'), KeyValue("B", "'z'"))),
    ("ENV = form escape kept", "ENV A=x\\ y", Env, (KeyValue("A", "x\\ y"),)),
    ("ENV empty value", "ENV A=", Env, (KeyValue("A", ""),)),
    ("ENV value with =", "ENV A=b=c", Env, (KeyValue("A", "b=c"),)),
    ("ENV value continued in quotes", 'ENV A="x \\\n   y"', Env, (KeyValue("A", '"x    y"'),)),
    # code-derived (README 4.6 quirk): the tokenised first word has no `=`, so the raw text is split.
    ("ENV quoted legacy key quirk", 'ENV "a b" c', Env, (KeyValue('"a', 'b" c'),)),
    ("LABEL legacy", "LABEL maintainer Me <me@example.com>", Label, (KeyValue("maintainer", "Me <me@example.com>"),)),
    (
        "LABEL = form",
        'LABEL "com.example.v"="1.0" x=y',
        Label,
        (KeyValue('"com.example.v"', '"1.0"'), KeyValue("x", "y")),
    ),
]


@pytest.mark.parametrize(("text", "kind", "pairs"), [c[1:] for c in KEY_VALUES], ids=[c[0] for c in KEY_VALUES])
def test_env_and_label(text: str, kind: type, pairs: tuple) -> None:
    instruction = last(text)
    assert type(instruction) is kind
    assert instruction.pairs == pairs


# (id, ARG line, definitions)
ARGS = [
    ("name only", "ARG VERSION", (ArgDefinition("VERSION", None),)),
    ("with default", "ARG VERSION=1.0", (ArgDefinition("VERSION", "1.0"),)),
    ("empty default", "ARG VERSION=", (ArgDefinition("VERSION", ""),)),
    ("several", "ARG A B=2 C", (ArgDefinition("A"), ArgDefinition("B", "2"), ArgDefinition("C"))),
    ("quotes kept raw", "ARG A=\"x y\" B='z'", (ArgDefinition("A", '"x y"'), ArgDefinition("B", "'z'"))),
    ("default with =", "ARG A=b=c", (ArgDefinition("A", "b=c"),)),
    ("variable in default", "ARG A=${B:-x}", (ArgDefinition("A", "${B:-x}"),)),
    ("escape kept", "ARG A=x\\ y", (ArgDefinition("A", "x\\ y"),)),
]


@pytest.mark.parametrize(("text", "definitions"), [c[1:] for c in ARGS], ids=[c[0] for c in ARGS])
def test_arg_forms(text: str, definitions: tuple) -> None:
    arg = last(text)
    assert isinstance(arg, Arg)
    assert arg.args == definitions


def test_arg_before_from() -> None:
    dockerfile = parse("ARG BASE=alpine\nFROM $BASE\n")
    assert [type(i) for i in dockerfile.instructions] == [Arg, From]


# --- keywords, line endings, BOM, directives ------------------------------------------------------------------------
# (id, text) pairs that must parse to the same instructions as CANONICAL (locations aside where lines move).
CANONICAL = "FROM alpine AS b\nRUN echo hi\nCOPY --chown=a:b x /y\nENV A=1\n"
SAME_AS_CANONICAL = [
    ("lower case keywords", "from alpine AS b\nrun echo hi\ncopy --chown=a:b x /y\nenv A=1\n"),
    ("mixed case keywords", "FrOm alpine AS b\nrUn echo hi\nCoPy --chown=a:b x /y\neNv A=1\n"),
    ("CRLF", "FROM alpine AS b\r\nRUN echo hi\r\nCOPY --chown=a:b x /y\r\nENV A=1\r\n"),
    ("no final newline", "FROM alpine AS b\nRUN echo hi\nCOPY --chown=a:b x /y\nENV A=1"),
    ("UTF-8 BOM", "\ufeffFROM alpine AS b\nRUN echo hi\nCOPY --chown=a:b x /y\nENV A=1\n"),
    ("BOM and CRLF", "\ufeffFROM alpine AS b\r\nRUN echo hi\r\nCOPY --chown=a:b x /y\r\nENV A=1\r\n"),
]


def _without_original(dockerfile) -> list[tuple]:
    return [(type(i), fields(i), i.location) for i in dockerfile.instructions]


@pytest.mark.parametrize("text", [c[1] for c in SAME_AS_CANONICAL], ids=[c[0] for c in SAME_AS_CANONICAL])
def test_same_as_canonical(text: str) -> None:
    assert _without_original(parse(text)) == _without_original(parse(CANONICAL))


def test_crlf_file_parses_exactly_like_lf() -> None:
    lf = "FROM a\nRUN a \\\n  b\nLABEL x=y \\\n  z=w\nHEALTHCHECK --interval=5s CMD true\n"
    assert parse(lf.replace("\n", "\r\n")).instructions == parse(lf).instructions


def test_bom_as_bytes() -> None:
    assert parse(b"\xef\xbb\xbfFROM a\n").instructions == parse(b"FROM a\n").instructions


def test_backtick_escape_directive() -> None:
    text = "# escape=`\nFROM mcr.microsoft.com/windows\nCOPY C:\\src\\ C:\\dst\\\nRUN dir `\n    /s\nENV A=x` y\n"
    dockerfile = parse(text)
    assert dockerfile.escape == "`"
    _, copy, run, env = dockerfile.instructions
    assert isinstance(copy, Copy) and (copy.sources, copy.dest) == (("C:\\src\\",), "C:\\dst\\")
    assert isinstance(run, Run) and run.command.args == ("dir     /s",)
    assert (run.location.start_line, run.location.end_line) == (4, 5)
    assert isinstance(env, Env) and env.pairs == (KeyValue("A", "x` y"),)


def test_backslash_is_ordinary_with_backtick_escape() -> None:
    # A trailing backslash does not continue the line when the escape character is a backtick.
    dockerfile = parse("# escape=`\nFROM a\nWORKDIR C:\\\nUSER app\n")
    assert [type(i) for i in dockerfile.instructions] == [From, Workdir, User]
    assert dockerfile.instructions[1].path == "C:\\"


# (id, syntax directive value): the docker/dockerfile frontends are pybuild's own language.
ACCEPTED_SYNTAX = [
    ("major", "docker/dockerfile:1"),
    ("minor", "docker/dockerfile:1.7"),
    ("labs", "docker/dockerfile:1-labs"),
    ("docker.io", "docker.io/docker/dockerfile:1"),
    ("upstream", "docker/dockerfile-upstream:master"),
    ("no tag", "docker/dockerfile"),
    ("digest", "docker/dockerfile:1@sha256:" + "0" * 64),
]


@pytest.mark.parametrize("syntax", [c[1] for c in ACCEPTED_SYNTAX], ids=[c[0] for c in ACCEPTED_SYNTAX])
def test_syntax_directive_accepted(syntax: str) -> None:
    dockerfile = parse(f"# syntax={syntax}\nFROM a\n")
    assert [(d.name, d.value, d.line) for d in dockerfile.directives] == [("syntax", syntax, 1)]


def test_errors_are_pybuild_errors_with_exit_code() -> None:
    with pytest.raises(PybuildError) as caught:
        parse("FROM a\nRUNN x\n")
    assert caught.value.exit_code == 1
    assert str(caught.value) == caught.value.render()


def test_onbuild_onbuild_message_is_buildkits() -> None:
    with pytest.raises(DockerfileSyntaxError) as caught:
        parse("FROM a\nONBUILD ONBUILD RUN x\n")
    assert caught.value.message == "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"
