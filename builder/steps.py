"""What each Dockerfile instruction does to a stage: one small function per instruction, found by table.

Metadata instructions only edit the image config and add a history entry with no layer; COPY, ADD,
RUN and WORKDIR ask the step context (the solver) to change the filesystem.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from builder import image as oci
from builder.graph import PREDEFINED_ARGS
from builder.sandbox import HEREDOC_SCRIPT_DIR
from parser.errors import PybuildError
from parser.expand import expand
from parser.instructions import (
    Add,
    Arg,
    Cmd,
    Command,
    Copy,
    Entrypoint,
    Env,
    Expose,
    Healthcheck,
    Instruction,
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

if TYPE_CHECKING:
    from builder.solver import StepContext

DEFAULT_SHELL = ("/bin/sh", "-c")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class StageState:
    """A stage between two instructions: the image so far and the ARGs in scope."""

    image: oci.Image
    args: tuple[tuple[str, str], ...] = ()
    cmd_set: bool = False  # CMD given in this stage: a later ENTRYPOINT keeps it

    def expansion_env(self) -> dict[str, str]:
        """ENV values win over ARG values of the same name, as docker documents."""
        env = dict(self.args)
        env.update(self.image.config.env)
        return env

    def run_env(self) -> tuple[tuple[str, str], ...]:
        env = dict(self.image.config.env)
        for name, value in self.args:
            env.setdefault(name, value)
        return tuple(env.items())

    def with_config(self, created_by: str, **changes: object) -> StageState:
        image = replace(self.image, config=replace(self.image.config, **changes))
        return replace(self, image=image.add_history(self.history(created_by, empty_layer=True)))

    def history(self, created_by: str, *, empty_layer: bool) -> oci.History:
        return oci.History(created_by=created_by, empty_layer=empty_layer, created=self.image.created,
                           comment="pybuild.dockerfile.v0")


def shell_command(state: StageState, command: Command) -> tuple[str, ...]:
    if command.exec_form:
        return command.args
    return (*(state.image.config.shell or DEFAULT_SHELL), *command.args)


def _expanded(state: StageState, instruction: Instruction, escape: str) -> Instruction:
    return expand(instruction, state.expansion_env(), escape).instruction


def describe(instruction: Instruction) -> str:
    """The instruction as the history shows it: its keyword and its arguments, flags and all."""
    return " ".join(instruction.original.split()) if "\n" not in instruction.original else instruction.original


def do_env(ctx: StepContext, state: StageState, instruction: Env) -> StageState:
    expanded = _expanded(state, instruction, ctx.escape)
    config = state.image.config
    for pair in expanded.pairs:
        config = config.with_env(pair.key, pair.value)
    words = " ".join(f"{pair.key}={pair.value}" for pair in expanded.pairs)
    return state.with_config(f"ENV {words}", env=config.env)


def do_label(ctx: StepContext, state: StageState, instruction: Label) -> StageState:
    expanded = _expanded(state, instruction, ctx.escape)
    config = state.image.config
    for pair in expanded.pairs:
        config = config.with_label(pair.key, pair.value)
    words = " ".join(f"{pair.key}={pair.value}" for pair in expanded.pairs)
    return state.with_config(f"LABEL {words}", labels=config.labels)


def do_arg(ctx: StepContext, state: StageState, instruction: Arg) -> StageState:
    args = dict(state.args)
    for definition in _expanded(state, instruction, ctx.escape).args:
        if definition.name in ctx.build_args:
            value: str | None = ctx.build_args[definition.name]
        elif definition.default is not None:
            value = definition.default
        else:
            value = ctx.global_args.get(definition.name)
        if value is not None:
            args.pop(definition.name, None)
            args[definition.name] = value
    return replace(state, args=tuple(args.items()))


def do_expose(ctx: StepContext, state: StageState, instruction: Expose) -> StageState:
    ports = list(state.image.config.exposed_ports)
    for word in _expanded(state, instruction, ctx.escape).ports:
        for port in _ports(word, instruction):
            if port not in ports:
                ports.append(port)
    return state.with_config(f"EXPOSE {' '.join(instruction.ports)}", exposed_ports=tuple(ports))


def _ports(word: str, instruction: Instruction) -> list[str]:
    """``80``, ``80/udp``, ``8000-8002/tcp`` in docker's normalized ``port/proto`` form."""
    match = re.fullmatch(r"(?:[0-9.]*:)?(\d+)(?:-(\d+))?(?:/(tcp|udp|sctp))?", word, re.IGNORECASE)
    if match is None:
        raise PybuildError(f"EXPOSE: invalid port {word!r} (expected PORT, PORT/PROTO or FROM-TO/PROTO)",
                           instruction.location)
    first, last, proto = int(match[1]), int(match[2] or match[1]), (match[3] or "tcp").lower()
    if not 0 < first <= last <= 65535:
        raise PybuildError(f"EXPOSE: invalid port range {word!r}", instruction.location)
    return [f"{port}/{proto}" for port in range(first, last + 1)]


def do_volume(ctx: StepContext, state: StageState, instruction: Volume) -> StageState:
    volumes = list(state.image.config.volumes)
    for path in _expanded(state, instruction, ctx.escape).paths:
        if not path:
            raise PybuildError("VOLUME specified can not be an empty string", instruction.location)
        if path not in volumes:
            volumes.append(path)
    return state.with_config(f"VOLUME {list(volumes)}", volumes=tuple(volumes))


def do_user(ctx: StepContext, state: StageState, instruction: User) -> StageState:
    user = _expanded(state, instruction, ctx.escape).user
    return state.with_config(f"USER {user}", user=user)


def do_stopsignal(ctx: StepContext, state: StageState, instruction: Stopsignal) -> StageState:
    signal = _expanded(state, instruction, ctx.escape).signal
    if not re.fullmatch(r"(SIG)?[A-Z0-9+-]+|\d+", signal):
        raise PybuildError(f"STOPSIGNAL: invalid signal {signal!r}", instruction.location)
    return state.with_config(f"STOPSIGNAL {signal}", stop_signal=signal)


def do_maintainer(ctx: StepContext, state: StageState, instruction: Maintainer) -> StageState:
    image = replace(state.image, author=instruction.name)
    return replace(state, image=image.add_history(state.history(f"MAINTAINER {instruction.name}",
                                                                 empty_layer=True)))


def do_shell(ctx: StepContext, state: StageState, instruction: Shell) -> StageState:
    return state.with_config(f"SHELL {list(instruction.args)}", shell=tuple(instruction.args))


def do_cmd(ctx: StepContext, state: StageState, instruction: Cmd) -> StageState:
    cmd = shell_command(state, instruction.command)
    new = state.with_config(f"CMD {list(cmd)}", cmd=cmd)
    return replace(new, cmd_set=True)


def do_entrypoint(ctx: StepContext, state: StageState, instruction: Entrypoint) -> StageState:
    entrypoint = shell_command(state, instruction.command)
    # Docker: an ENTRYPOINT drops a CMD inherited from the base image, but keeps one set in this stage.
    cmd = state.image.config.cmd if state.cmd_set else None
    return state.with_config(f"ENTRYPOINT {list(entrypoint)}", entrypoint=entrypoint, cmd=cmd)


def do_healthcheck(ctx: StepContext, state: StageState, instruction: Healthcheck) -> StageState:
    if instruction.command is None:
        check = oci.Healthcheck(test=("NONE",))
    else:
        command = instruction.command
        test = ("CMD", *command.args) if command.exec_form else ("CMD-SHELL", *command.args)
        check = oci.Healthcheck(test=test, interval=instruction.interval or 0, timeout=instruction.timeout or 0,
                                start_period=instruction.start_period or 0,
                                start_interval=instruction.start_interval or 0, retries=instruction.retries or 0)
    return state.with_config(f"HEALTHCHECK {list(check.test)}", healthcheck=check)


def do_onbuild(ctx: StepContext, state: StageState, instruction: Onbuild) -> StageState:
    triggers = (*state.image.config.on_build, instruction.expression)
    return state.with_config(f"ONBUILD {instruction.expression}", on_build=triggers)


def do_workdir(ctx: StepContext, state: StageState, instruction: Workdir) -> StageState:
    path = _expanded(state, instruction, ctx.escape).path
    path = posixpath.normpath(posixpath.join(state.image.config.working_dir or "/", path))
    if path.startswith("//"):
        path = path[1:]
    state = state.with_config(f"WORKDIR {path}", working_dir=path)
    return ctx.make_workdir(state, path)


def heredoc_body(heredoc: Heredoc) -> str:
    """A heredoc's body, with ``<<-``'s leading tabs stripped."""
    if not heredoc.chomp:
        return heredoc.content
    return "".join(line.lstrip("\t") for line in heredoc.content.splitlines(keepends=True))


def do_run(ctx: StepContext, state: StageState, instruction: Run) -> StageState:
    expanded = _expanded(state, instruction, ctx.escape)
    assert isinstance(expanded, Run)
    if expanded.security not in (None, "sandbox"):
        raise PybuildError(f"RUN --security={expanded.security} is not supported by pybuild",
                           instruction.location)
    if expanded.devices:
        raise PybuildError("RUN --device is not supported by pybuild", instruction.location)
    command = expanded.command
    scripts: tuple[tuple[str, bytes], ...] = ()
    if expanded.heredocs:
        argv, scripts = _heredoc_argv(state, command, expanded.heredocs, instruction)
    else:
        argv = shell_command(state, command)
    args = [(name, value) for name, value in state.args if name not in PREDEFINED_ARGS]
    prefix = f"|{len(args)} " + " ".join(f"{name}={value}" for name, value in args) + " " if args else ""
    shown = " ".join(argv) if not expanded.heredocs else " ".join(shell_command(state, instruction.command))
    created_by = f"RUN {prefix}{shown}"
    return ctx.run(state, instruction, argv, created_by, expanded.mounts, expanded.network, scripts)


def _heredoc_argv(state: StageState, command: Command, heredocs: tuple[Heredoc, ...],
                  instruction: Run) -> tuple[tuple[str, ...], tuple[tuple[str, bytes], ...]]:
    """BuildKit's rule: a lone heredoc is the script; otherwise the shell reads the heredocs itself.

    A lone heredoc that starts with ``#!`` becomes an executable file, /dev/pipes/<delimiter>, run as
    it is: its interpreter reads it from there, and its standard input stays the step's own. As in
    BuildKit, the ``#!`` is looked for before ``<<-`` strips tabs: a tab-indented one leaves a shell script.
    """
    if command.exec_form:
        raise PybuildError("RUN in exec form cannot take a heredoc", instruction.location)
    line = command.args[0] if command.args else ""
    bodies = [heredoc_body(heredoc) for heredoc in heredocs]
    shell = state.image.config.shell or DEFAULT_SHELL
    if len(heredocs) == 1 and re.fullmatch(r"\s*<<-?\s*['\"]?" + re.escape(heredocs[0].name) + r"['\"]?\s*", line):
        if heredocs[0].content.startswith("#!"):
            name = heredocs[0].name
            if "/" in name or name in ("", ".", ".."):
                raise PybuildError(f"RUN heredoc: the delimiter {name!r} cannot name the script's file in "
                                   f"{HEREDOC_SCRIPT_DIR}", instruction.location)
            return (f"{HEREDOC_SCRIPT_DIR}/{name}",), ((name, bodies[0].encode()),)
        return (*shell, bodies[0]), ()
    script = line
    for heredoc, body in zip(heredocs, bodies, strict=True):
        script += "\n" + body + ("" if body.endswith("\n") or not body else "\n") + heredoc.name
    return (*shell, script), ()


def do_copy(ctx: StepContext, state: StageState, instruction: Copy | Add) -> StageState:
    expanded = _expanded(state, instruction, ctx.escape)
    assert isinstance(expanded, Copy | Add)
    return ctx.copy(state, instruction, expanded)


Step = Callable[["StepContext", StageState, Instruction], StageState]

STEPS: dict[type, Step] = {
    Env: do_env,
    Label: do_label,
    Arg: do_arg,
    Expose: do_expose,
    Volume: do_volume,
    User: do_user,
    Stopsignal: do_stopsignal,
    Maintainer: do_maintainer,
    Shell: do_shell,
    Cmd: do_cmd,
    Entrypoint: do_entrypoint,
    Healthcheck: do_healthcheck,
    Onbuild: do_onbuild,
    Workdir: do_workdir,
    Run: do_run,
    Copy: do_copy,
    Add: do_copy,
}

def scratch_state(created: str) -> StageState:
    """FROM scratch: no layers, and the PATH every docker build gives an image that sets none."""
    config = oci.ImageConfig(env=(("PATH", DEFAULT_PATH),))
    return StageState(image=oci.Image(config=config, created=created))

