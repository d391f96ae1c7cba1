"""Raw nodes to typed instructions: one dataclass per instruction, every flag read and checked.

Values stay as written (``$VAR`` unexpanded); ``parser.expand`` expands them at build time,
with each stage's ARG and ENV values.
"""

from __future__ import annotations

import re
from dataclasses import field, replace
from typing import TYPE_CHECKING

from parser.dataclass import dataclass
from parser.errors import DockerfileSyntaxError, PybuildError, SourceRange
from parser.flags import FlagError, FlagValues, Mount, MountError, parse_mount, read_flags
from parser.lines import Directive, Heredoc, ParseWarning, parse_heredoc_word

if TYPE_CHECKING:
    from parser.nodes import RawDockerfile, RawNode


@dataclass(kw_only=True)
class Instruction:
    """What every instruction carries: where it is, and its text as written."""

    location: SourceRange
    original: str


@dataclass
class Command:
    """A command line: exec form runs ``args`` as they are; shell form's one arg goes to the SHELL."""

    args: tuple[str, ...]
    exec_form: bool


@dataclass(kw_only=True)
class From(Instruction):
    """``FROM image [AS name]``: the base of a stage."""

    image: str
    stage_name: str | None = None
    platform: str | None = None


@dataclass(kw_only=True)
class Run(Instruction):
    """``RUN``: a command in the sandbox, with its mounts, network and heredoc bodies."""

    command: Command
    heredocs: tuple[Heredoc, ...] = ()
    mounts: tuple[Mount, ...] = ()
    network: str | None = None
    security: str | None = None
    devices: tuple[str, ...] = ()


@dataclass(kw_only=True)
class Cmd(Instruction):
    """``CMD``: the image's default command or ENTRYPOINT arguments."""

    command: Command


@dataclass(kw_only=True)
class Entrypoint(Instruction):
    """``ENTRYPOINT``: the program the image runs, with CMD as its arguments."""

    command: Command


@dataclass(kw_only=True)
class Shell(Instruction):
    """``SHELL``: the argv prefix for later shell-form commands."""

    args: tuple[str, ...]


@dataclass(kw_only=True)
class Copy(Instruction):
    """``COPY``: files from the context, a stage, an image or inline heredocs into the image."""

    sources: tuple[str, ...]
    dest: str
    source_contents: tuple[Heredoc, ...] = ()  # inline files: `COPY <<EOF /dest`
    from_: str | None = None
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    parents: bool = False
    excludes: tuple[str, ...] = ()


@dataclass(kw_only=True)
class Add(Instruction):
    """``ADD``: COPY plus local archive extraction and URL downloads."""

    sources: tuple[str, ...]
    dest: str
    source_contents: tuple[Heredoc, ...] = ()
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    keep_git_dir: bool = False
    checksum: str | None = None
    unpack: bool | None = None  # None: unpack local archives, not downloads
    excludes: tuple[str, ...] = ()


@dataclass
class KeyValue:
    """One ``key=value`` pair of ENV or LABEL."""

    key: str
    value: str


@dataclass(kw_only=True)
class Env(Instruction):
    """``ENV``: variables for later steps and the image."""

    pairs: tuple[KeyValue, ...]


@dataclass(kw_only=True)
class Label(Instruction):
    """``LABEL``: metadata in the image config."""

    pairs: tuple[KeyValue, ...]


@dataclass
class ArgDefinition:
    """One name of an ARG, with its default if it has one."""

    name: str
    default: str | None = None  # None: no default given (`ARG NAME`)


@dataclass(kw_only=True)
class Arg(Instruction):
    """``ARG``: build arguments declared for the stage (or globally, before the first FROM)."""

    args: tuple[ArgDefinition, ...]


@dataclass(kw_only=True)
class Expose(Instruction):
    """``EXPOSE``: ports, as written (expanded later)."""

    ports: tuple[str, ...]


@dataclass(kw_only=True)
class Volume(Instruction):
    """``VOLUME``: mount points recorded in the image config."""

    paths: tuple[str, ...]


@dataclass(kw_only=True)
class Workdir(Instruction):
    """``WORKDIR``: the working directory, created when missing."""

    path: str


@dataclass(kw_only=True)
class User(Instruction):
    """``USER``: the user (and group) later steps and the image run as."""

    user: str


@dataclass(kw_only=True)
class Stopsignal(Instruction):
    """``STOPSIGNAL``: the signal that stops a container of the image."""

    signal: str


@dataclass(kw_only=True)
class Maintainer(Instruction):
    """``MAINTAINER``: the deprecated author field."""

    name: str


@dataclass(kw_only=True)
class Healthcheck(Instruction):
    """``command`` None is ``HEALTHCHECK NONE``; durations are nanoseconds, as in the image config."""

    command: Command | None
    interval: int | None = None
    timeout: int | None = None
    start_period: int | None = None
    start_interval: int | None = None
    retries: int | None = None


@dataclass(kw_only=True)
class Onbuild(Instruction):
    """``expression`` is the trigger as written; it is what an image config's OnBuild holds."""

    trigger: Instruction
    expression: str


@dataclass
class Dockerfile:
    """A parsed Dockerfile: its instructions, parser directives and warnings."""

    filename: str
    instructions: tuple[Instruction, ...]
    escape: str = "\\"
    directives: tuple[Directive, ...] = ()
    warnings: tuple[ParseWarning, ...] = field(default=())


def parse(source: bytes | str, filename: str = "Dockerfile") -> Dockerfile:
    """Parse and check a whole Dockerfile; any mistake raises a PybuildError with its position."""
    # Imported here: the typed instructions load without the grammar library, so the commands that
    # read no Dockerfile (images, rmi, inspect, save, load) do not pay for loading it.
    from parser.nodes import parse_raw

    raw = parse_raw(source, filename)
    syntax = next((d for d in raw.source.directives if d.name == "syntax"), None)
    if syntax is not None:
        _check_syntax_directive(raw, syntax)
    instructions = tuple(_Converter(raw).instruction(node) for node in raw.nodes)
    first_line = raw.nodes[0].start_line
    warnings = list(raw.warnings)
    for directive in raw.misplaced_directives:
        if directive.line > first_line:
            raise raw.source.error(
                f"parser directive '{directive.name}' must come before the first instruction",
                directive.line,
                hint="move it to the top of the file; here it would only be a comment",
            )
        warnings.append(
            ParseWarning(
                f"'# {directive.name}=' after a comment or blank line is a comment, not a directive", directive.line
            )
        )
    return Dockerfile(raw.source.filename, instructions, raw.escape, raw.source.directives, tuple(warnings))


# The frontends whose language pybuild implements; anything else is someone else's language.
_DOCKERFILE_FRONTEND = re.compile(
    r"^(?:docker\.io/)?docker/dockerfile(?:-upstream)?(?::[\w.-]+)?(?:@sha256:[0-9a-f]{64})?$"
)


def _check_syntax_directive(raw: RawDockerfile, syntax: Directive) -> None:
    reference = syntax.value.split()[0]
    if not _DOCKERFILE_FRONTEND.match(reference):
        raise raw.source.error(
            f"unsupported frontend {reference!r}: pybuild implements the docker/dockerfile syntax only",
            syntax.line,
            hint="remove the # syntax line or point it at docker/dockerfile:1",
        )


KEYWORDS = [
    "from",
    "run",
    "cmd",
    "entrypoint",
    "shell",
    "healthcheck",
    "copy",
    "add",
    "volume",
    "expose",
    "env",
    "label",
    "arg",
    "user",
    "workdir",
    "stopsignal",
    "maintainer",
    "onbuild",
]
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9}
_DURATION_UNITS["h"] = 3600 * 10**9


class _Converter:
    """Turns raw nodes into typed instructions, raising errors that point into the file."""

    def __init__(self, raw: RawDockerfile) -> None:
        self.raw = raw
        self.labs = any(d.name == "syntax" and "labs" in d.value for d in raw.source.directives)

    def error(self, node: RawNode, message: str, offset: int | None = None, hint: str | None = None) -> PybuildError:
        return self.raw.error(node, message, offset, hint)

    def arg_error(self, node: RawNode, index: int, message: str, hint: str | None = None) -> PybuildError:
        offset = node.arg_offsets[index] if index < len(node.arg_offsets) else None
        return self.error(node, message, offset, hint)

    def instruction(self, node: RawNode) -> Instruction:
        convert = getattr(self, f"_{node.keyword}", None)
        if node.keyword not in KEYWORDS or convert is None:
            import difflib  # only for a mistake: the import costs every build ~1 ms

            close = difflib.get_close_matches(node.keyword, KEYWORDS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0].upper()}?" if close else None
            raise self.error(node, f"unknown instruction: {node.keyword.upper()}", hint=hint)
        try:
            flags = read_flags(node.keyword, node.flags)
        except FlagError as exc:
            raise self.error(node, exc.message, node.flag_offsets[exc.index], exc.hint) from None
        line = node.line
        assert line is not None
        location = SourceRange(
            self.raw.source.filename, line.start_line, line.end_line, line.position(node.keyword_offset)[1]
        )
        return convert(node, flags, location=location, original=line.text[node.keyword_offset :])

    def flag_error(
        self, node: RawNode, flags: FlagValues, name: str, message: str, hint: str | None = None, occurrence: int = 0
    ) -> PybuildError:
        return self.error(node, message, node.flag_offsets[flags.index[name][occurrence]], hint)

    # -- one function per instruction
    def _from(self, node: RawNode, flags: FlagValues, **common) -> From:
        args = node.args
        if len(args) not in (1, 3):
            raise self.error(node, "FROM requires either one or three arguments", hint="FROM image [AS name]")
        name = None
        if len(args) == 3:
            if args[1].lower() != "as":
                raise self.arg_error(node, 1, "When using FROM with 3 arguments, 2nd argument must be 'AS'")
            name = args[2].lower()
            if not _STAGE_NAME.match(name):
                raise self.arg_error(
                    node,
                    2,
                    f"invalid name for build stage: {args[2]!r}, name can't start with a number or contain symbols",
                )
        return From(image=args[0], stage_name=name, platform=flags.get("platform"), **common)

    def _run(self, node: RawNode, flags: FlagValues, **common) -> Run:
        if not node.args:
            raise self.error(
                node, "RUN requires at least one argument", hint='RUN <command> or RUN ["executable", ...]'
            )
        mounts = []
        for occurrence, value in enumerate(flags.get("mount", [])):
            try:
                mounts.append(parse_mount(value))
            except MountError as exc:
                raise self.flag_error(node, flags, "mount", f"--mount: {exc}", occurrence=occurrence) from None
        network = flags.get("network")
        if network is not None and network not in ("default", "none", "host"):
            raise self.flag_error(
                node, flags, "network", f"unsupported network mode {network!r}", "use default, none or host"
            )
        security = flags.get("security")
        if security is not None and security not in ("sandbox", "insecure"):
            raise self.flag_error(
                node, flags, "security", f"unsupported security mode {security!r}", "use sandbox or insecure"
            )
        if flags.get("device") and not self.labs:
            raise self.flag_error(
                node,
                flags,
                "device",
                "--device needs the labs syntax",
                "start the file with # syntax=docker/dockerfile:1-labs",
            )
        return Run(
            command=Command(node.args, node.json_form),
            heredocs=node.heredocs,
            mounts=tuple(mounts),
            network=network,
            security=security,
            devices=tuple(flags.get("device", [])),
            **common,
        )

    def _cmd(self, node: RawNode, flags: FlagValues, **common) -> Cmd:
        return Cmd(command=Command(node.args, node.json_form), **common)

    def _entrypoint(self, node: RawNode, flags: FlagValues, **common) -> Entrypoint:
        return Entrypoint(command=Command(node.args, node.json_form), **common)

    def _shell(self, node: RawNode, flags: FlagValues, **common) -> Shell:
        if not node.json_form:
            raise self.error(node, "SHELL requires the arguments to be in JSON form", hint='SHELL ["/bin/sh", "-c"]')
        if not node.args:
            raise self.error(node, "SHELL requires at least one argument")
        return Shell(args=node.args, **common)

    def _sources_and_dest(self, node: RawNode) -> tuple[tuple[str, ...], str, tuple[Heredoc, ...]]:
        keyword = node.keyword.upper()
        if len(node.args) < 2:
            raise self.error(
                node,
                f"{keyword} requires at least two arguments, but only {len(node.args)} provided",
                hint=f"{keyword} <src>... <dest>",
            )
        heredocs = {h.name: h for h in node.heredocs}
        paths, contents = [], []
        for index, word in enumerate(node.args):
            found = parse_heredoc_word(word) if heredocs and not node.json_form else None
            if found is not None and found[2] in heredocs:
                if index == len(node.args) - 1:
                    raise self.arg_error(node, index, f"{keyword} cannot use a heredoc as its destination")
                contents.append(heredocs[found[2]])
            elif index < len(node.args) - 1:
                paths.append(word)
        return tuple(paths), node.args[-1], tuple(contents)

    def _copy(self, node: RawNode, flags: FlagValues, **common) -> Copy:
        sources, dest, contents = self._sources_and_dest(node)
        return Copy(
            sources=sources,
            dest=dest,
            source_contents=contents,
            from_=flags.get("from"),
            chown=flags.get("chown"),
            chmod=self._chmod(node, flags),
            link=flags.get("link", False),
            parents=flags.get("parents", False),
            excludes=tuple(flags.get("exclude", [])),
            **common,
        )

    def _add(self, node: RawNode, flags: FlagValues, **common) -> Add:
        sources, dest, contents = self._sources_and_dest(node)
        return Add(
            sources=sources,
            dest=dest,
            source_contents=contents,
            chown=flags.get("chown"),
            chmod=self._chmod(node, flags),
            link=flags.get("link", False),
            keep_git_dir=flags.get("keep-git-dir", False),
            checksum=flags.get("checksum"),
            unpack=flags.get("unpack"),
            excludes=tuple(flags.get("exclude", [])),
            **common,
        )

    def _chmod(self, node: RawNode, flags: FlagValues) -> str | None:
        value = flags.get("chmod")
        if value is not None and "$" not in value and not _valid_chmod(value):
            raise self.flag_error(
                node,
                flags,
                "chmod",
                f"invalid --chmod value {value!r}",
                "an octal mode such as 0755, or symbolic such as u+x",
            )
        return value

    def _env(self, node: RawNode, flags: FlagValues, **common) -> Env:
        return Env(pairs=self._pairs(node), **common)

    def _label(self, node: RawNode, flags: FlagValues, **common) -> Label:
        return Label(pairs=self._pairs(node), **common)

    def _pairs(self, node: RawNode) -> tuple[KeyValue, ...]:
        keyword = node.keyword.upper()
        if not node.args:
            raise self.error(node, f"{keyword} requires at least one argument", hint=f"{keyword} key=value ...")
        pairs = []
        for index in range(0, len(node.args), 3):
            key, value = node.args[index], node.args[index + 1]
            if not key:
                raise self.arg_error(node, index, f"{keyword} names can not be blank")
            pairs.append(KeyValue(key, value))
        return tuple(pairs)

    def _arg(self, node: RawNode, flags: FlagValues, **common) -> Arg:
        if not node.args:
            raise self.error(node, "ARG requires at least one argument", hint="ARG name[=default]")
        definitions = []
        for index, word in enumerate(node.args):
            name, has_default, default = word.partition("=")
            if not name:
                raise self.arg_error(node, index, "ARG names can not be blank")
            definitions.append(ArgDefinition(name, default if has_default else None))
        return Arg(args=tuple(definitions), **common)

    def _expose(self, node: RawNode, flags: FlagValues, **common) -> Expose:
        if not node.args:
            raise self.error(node, "EXPOSE requires at least one argument", hint="EXPOSE port[/protocol] ...")
        return Expose(ports=node.args, **common)

    def _volume(self, node: RawNode, flags: FlagValues, **common) -> Volume:
        if not node.args:
            raise self.error(node, "VOLUME requires at least one argument")
        for index, path in enumerate(node.args):
            if not path.strip():
                raise self.arg_error(node, index, "VOLUME specified can not be an empty string")
        return Volume(paths=node.args, **common)

    def _one_argument(self, node: RawNode, what: str) -> str:
        if len(node.args) != 1:
            raise self.error(
                node, f"{node.keyword.upper()} requires exactly one argument", hint=f"{node.keyword.upper()} {what}"
            )
        return node.args[0]

    def _workdir(self, node: RawNode, flags: FlagValues, **common) -> Workdir:
        return Workdir(path=self._one_argument(node, "/path"), **common)

    def _user(self, node: RawNode, flags: FlagValues, **common) -> User:
        return User(user=self._one_argument(node, "user[:group]"), **common)

    def _stopsignal(self, node: RawNode, flags: FlagValues, **common) -> Stopsignal:
        return Stopsignal(signal=self._one_argument(node, "SIGTERM"), **common)

    def _maintainer(self, node: RawNode, flags: FlagValues, **common) -> Maintainer:
        return Maintainer(name=self._one_argument(node, "name"), **common)

    def _healthcheck(self, node: RawNode, flags: FlagValues, **common) -> Healthcheck:
        if not node.args:
            raise self.error(
                node, "HEALTHCHECK requires at least one argument", hint="HEALTHCHECK [options] CMD command"
            )
        kind = node.args[0].upper()
        if kind == "NONE":
            if len(node.args) > 1:
                raise self.arg_error(node, 1, "HEALTHCHECK NONE takes no arguments")
            if node.flags:  # BuildKit ignores them; a flag that does nothing is an error here
                raise self.error(node, "HEALTHCHECK NONE takes no flags", node.flag_offsets[0])
            return Healthcheck(command=None, **common)
        if kind != "CMD":
            raise self.arg_error(node, 0, f"Unknown type {node.args[0]!r} in HEALTHCHECK (try CMD)")
        if len(node.args) == 1:
            raise self.arg_error(node, 0, "Missing command after HEALTHCHECK CMD")
        durations = {}
        for name in ("interval", "timeout", "start-period", "start-interval"):
            if name in flags:
                durations[name.replace("-", "_")] = self._duration(node, flags, name)
        retries = None
        if "retries" in flags:
            value = flags["retries"]  # as Go's strconv.ParseInt(value, 10, 32)
            if not re.fullmatch(r"[+-]?0*[0-9]{1,10}", value) or not -(2**31) <= int(value) < 2**31:
                raise self.flag_error(node, flags, "retries", f"--retries must be a whole number, not {value!r}")
            retries = int(value)
            if retries < 0:
                raise self.flag_error(node, flags, "retries", f"--retries cannot be negative ({retries})")
        return Healthcheck(command=Command(node.args[1:], node.json_form), retries=retries, **durations, **common)

    def _duration(self, node: RawNode, flags: FlagValues, name: str) -> int:
        value = flags[name]
        nanoseconds = parse_duration(value)
        if nanoseconds is None:
            raise self.flag_error(
                node, flags, name, f"--{name}: invalid duration {value!r}", "write it like 30s, 1m30s or 500ms"
            )
        if nanoseconds != 0 and nanoseconds < 1_000_000:
            raise self.flag_error(node, flags, name, f"--{name} cannot be less than 1ms")
        return nanoseconds

    def _onbuild(self, node: RawNode, flags: FlagValues, **common) -> Onbuild:
        trigger = node.next
        if trigger is None:
            raise self.error(node, "ONBUILD requires at least one argument", hint="ONBUILD <instruction>")
        if trigger.keyword in ("onbuild", "from", "maintainer"):
            message = (
                "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"
                if trigger.keyword == "onbuild"
                else f"{trigger.keyword.upper()} isn't allowed as an ONBUILD trigger"
            )
            raise self.error(node, message, trigger.keyword_offset)
        assert node.line is not None
        trigger = replace(trigger, line=node.line)
        return Onbuild(
            trigger=self.instruction(trigger),
            expression=node.line.text[trigger.keyword_offset :]
            + "".join(f"\n{h.content}{h.name}" for h in node.line.heredocs),
            **common,
        )


def lone_heredoc(run: Run) -> Heredoc | None:
    """The heredoc a shell-form RUN consists of, if its command line is nothing but that one heredoc.

    BuildKit runs such a heredoc's body itself (as a file when it starts with ``#!``) instead of handing
    the shell a command line that reads it.
    """
    if len(run.heredocs) != 1 or run.command.exec_form:
        return None
    line = run.command.args[0] if run.command.args else ""
    name = re.escape(run.heredocs[0].name)
    return run.heredocs[0] if re.fullmatch(r"\s*<<-?\s*['\"]?" + name + r"['\"]?\s*", line) else None


def parse_duration(text: str) -> int | None:
    """A Go duration (``1m30s``, ``500ms``, ``0``) in nanoseconds, or None if malformed."""
    if text == "0":
        return 0
    total, position = 0, 0
    for match in _DURATION_PART.finditer(text):
        whole, fraction, unit = match.groups()
        if match.start() != position or not (whole or fraction) or len(whole.lstrip("0")) > 19:
            return None
        scale = _DURATION_UNITS[unit]
        total += int(whole or 0) * scale
        if fraction:  # as Go does: integer digits exactly, the fraction through a float64
            fraction = fraction[:18]
            total += int(int(fraction) * (scale / 10 ** len(fraction)))
        position = match.end()
    if position != len(text) or position == 0 or total > 2**63 - 1:
        return None
    return total


_SYMBOLIC_MODE = re.compile(r"^[ugoa]*[-+=][rwxXst]*(?:,[ugoa]*[-+=][rwxXst]*)*$")


def _valid_chmod(value: str) -> bool:
    return bool(re.fullmatch(r"[0-7]{3,4}", value) or _SYMBOLIC_MODE.match(value))


__all__ = [
    "Add",
    "Arg",
    "ArgDefinition",
    "Cmd",
    "Command",
    "Copy",
    "Dockerfile",
    "DockerfileSyntaxError",
    "Entrypoint",
    "Env",
    "Expose",
    "From",
    "Healthcheck",
    "Heredoc",
    "Instruction",
    "KeyValue",
    "Label",
    "Maintainer",
    "Mount",
    "Onbuild",
    "Run",
    "Shell",
    "Stopsignal",
    "User",
    "Volume",
    "Workdir",
    "parse",
]
