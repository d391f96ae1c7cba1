"""What each Dockerfile instruction does to a stage: one small function per instruction, found by table.

Metadata instructions only edit the image config and add a history entry with no layer. COPY, ADD, RUN
and WORKDIR return a ``FilesystemStep``: the operation as a value (``builder.ops``), which the solver
keys for the cache and, on a miss, carries out.
"""

from __future__ import annotations

import posixpath
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import field, replace

from builder.checks import check_copy, check_run, check_signal, exposed_ports
from builder.graph import PREDEFINED_ARGS
from builder.oci import image as oci
from builder.ops import CopyOp, FilesystemOp, RunOp, WorkdirOp
from builder.sandbox.parent import HEREDOC_SCRIPT_DIR
from parser.dataclass import dataclass
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
    lone_heredoc,
)
from parser.lines import Heredoc

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

    def run_env(self, defaults: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
        """A RUN step's env: the image's Env, then the ARGs in scope, then ``defaults`` for what neither sets."""
        env = dict(self.image.config.env)
        for name, value in (*self.args, *(defaults or {}).items()):
            env.setdefault(name, value)
        return tuple(env.items())

    def with_config(self, created_by: str, **changes: object) -> StageState:
        image = replace(self.image, config=replace(self.image.config, **changes))
        return replace(self, image=image.add_history(self.history(created_by, empty_layer=True)))

    def history(self, created_by: str, *, empty_layer: bool) -> oci.History:
        return oci.History(created_by=created_by, empty_layer=empty_layer, created=self.image.created,
                           comment="pybuild.dockerfile.v0")


@dataclass
class StepInputs:
    """What the handlers read besides the stage: the escape character and the ARG values given."""

    escape: str = "\\"
    build_args: Mapping[str, str] = field(default_factory=dict)
    global_args: Mapping[str, str] = field(default_factory=dict)  # what ``ARG NAME`` without a value takes


@dataclass
class FilesystemStep:
    """A step that changes files: the stage with its config changes made, and the change still to make.

    The solver makes ``op`` and adds the history entry ``created_by`` (with a layer when files changed).
    """

    state: StageState
    op: FilesystemOp
    created_by: str


def shell_command(state: StageState, command: Command) -> tuple[str, ...]:
    if command.exec_form:
        return command.args
    return (*(state.image.config.shell or DEFAULT_SHELL), *command.args)


def _expanded(state: StageState, instruction: Instruction, escape: str) -> Instruction:
    return expand(instruction, state.expansion_env(), escape).instruction


def describe(instruction: Instruction) -> str:
    """The instruction as the history shows it: its keyword and its arguments, flags and all."""
    return " ".join(instruction.original.split()) if "\n" not in instruction.original else instruction.original


# History text as BuildKit writes it, with Go's fmt verbs: %v of a string list is ``[a b]``, %q is
# ``["a" "b"]`` with each string quoted as Go's strconv.Quote does, and a duration prints as ``1m30s``.

_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
               "\v": "\\v", '"': '\\"', "\\": "\\\\"}


def go_quote(text: str) -> str:
    """``text`` as Go's %q writes a string: printable characters as they are, the rest escaped."""
    out = []
    for character in text:
        code = ord(character)
        if character in _GO_ESCAPES:
            out.append(_GO_ESCAPES[character])
        elif character == " " or (code > 0x20 and unicodedata.category(character)[0] in "LMNPS"):
            out.append(character)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def go_list(items: tuple[str, ...] | list[str], *, quoted: bool = False) -> str:
    """A list of strings as Go's %v (``[a b]``) or, with ``quoted``, %q (``["a" "b"]``) writes it."""
    return "[" + " ".join(go_quote(item) if quoted else item for item in items) + "]"


def go_duration(nanoseconds: int) -> str:
    """A duration as Go's time.Duration prints it: ``0s``, ``500ms``, ``1.5s``, ``1m30s``, ``1h0m0s``."""
    sign, value = ("-" if nanoseconds < 0 else ""), abs(nanoseconds)
    if value == 0:
        return "0s"
    if value < 10**9:
        for limit, unit, scale in ((10**3, "ns", 1), (10**6, "µs", 10**3), (10**9, "ms", 10**6)):
            if value < limit:
                return sign + _decimal(value, scale) + unit
    text = _decimal(value % (60 * 10**9), 10**9) + "s"
    minutes = value // (60 * 10**9)
    if minutes:
        text = f"{minutes % 60}m" + text
        if minutes >= 60:
            text = f"{minutes // 60}h" + text
    return sign + text


def _decimal(value: int, scale: int) -> str:
    whole, fraction = divmod(value, scale)
    if not fraction:
        return str(whole)
    return f"{whole}." + str(fraction).rjust(len(str(scale)) - 1, "0").rstrip("0")


def do_env(inputs: StepInputs, state: StageState, instruction: Env) -> StageState:
    expanded = _expanded(state, instruction, inputs.escape)
    config = state.image.config
    for pair in expanded.pairs:
        config = config.with_env(pair.key, pair.value)
    words = " ".join(f"{pair.key}={pair.value}" for pair in expanded.pairs)
    return state.with_config(f"ENV {words}", env=config.env)


def do_label(inputs: StepInputs, state: StageState, instruction: Label) -> StageState:
    expanded = _expanded(state, instruction, inputs.escape)
    config = state.image.config
    for pair in expanded.pairs:
        config = config.with_label(pair.key, pair.value)
    words = " ".join(f"{pair.key}={pair.value}" for pair in expanded.pairs)
    return state.with_config(f"LABEL {words}", labels=config.labels)


def do_arg(inputs: StepInputs, state: StageState, instruction: Arg) -> StageState:
    args = dict(state.args)
    words = []
    for definition in _expanded(state, instruction, inputs.escape).args:
        if definition.name in inputs.build_args:
            value: str | None = inputs.build_args[definition.name]
        elif definition.default is not None:
            value = definition.default
        else:
            value = inputs.global_args.get(definition.name)
        if value is not None:
            args.pop(definition.name, None)
            args[definition.name] = value
        words.append(definition.name if value is None else f"{definition.name}={value}")
    state = replace(state, args=tuple(args.items()))
    return replace(state, image=state.image.add_history(state.history(f"ARG {' '.join(words)}", empty_layer=True)))


def do_expose(inputs: StepInputs, state: StageState, instruction: Expose) -> StageState:
    ports = list(state.image.config.exposed_ports)
    given = [port for word in _expanded(state, instruction, inputs.escape).ports
             for port in exposed_ports(word, instruction.location)]
    for port in given:
        if port not in ports:
            ports.append(port)
    return state.with_config(f"EXPOSE {go_list(given)}", exposed_ports=tuple(ports))


def do_volume(inputs: StepInputs, state: StageState, instruction: Volume) -> StageState:
    volumes = list(state.image.config.volumes)
    paths = _expanded(state, instruction, inputs.escape).paths
    for path in paths:
        if not path:
            raise PybuildError("VOLUME specified can not be an empty string", instruction.location)
        if path not in volumes:
            volumes.append(path)
    return state.with_config(f"VOLUME {go_list(paths)}", volumes=tuple(volumes))


def do_user(inputs: StepInputs, state: StageState, instruction: User) -> StageState:
    user = _expanded(state, instruction, inputs.escape).user
    return state.with_config(f"USER {user}", user=user)


def do_stopsignal(inputs: StepInputs, state: StageState, instruction: Stopsignal) -> StageState:
    signal = _expanded(state, instruction, inputs.escape).signal
    check_signal(signal, instruction.location)
    return state.with_config(f"STOPSIGNAL {signal}", stop_signal=signal)


def do_maintainer(inputs: StepInputs, state: StageState, instruction: Maintainer) -> StageState:
    image = replace(state.image, author=instruction.name)
    return replace(state, image=image.add_history(state.history(f"MAINTAINER {instruction.name}",
                                                                 empty_layer=True)))


def do_shell(inputs: StepInputs, state: StageState, instruction: Shell) -> StageState:
    return state.with_config(f"SHELL {go_list(instruction.args)}", shell=tuple(instruction.args))


def do_cmd(inputs: StepInputs, state: StageState, instruction: Cmd) -> StageState:
    cmd = shell_command(state, instruction.command)
    new = state.with_config(f"CMD {go_list(cmd, quoted=True)}", cmd=cmd)
    return replace(new, cmd_set=True)


def do_entrypoint(inputs: StepInputs, state: StageState, instruction: Entrypoint) -> StageState:
    entrypoint = shell_command(state, instruction.command)
    # Docker: an ENTRYPOINT drops a CMD inherited from the base image, but keeps one set in this stage.
    cmd = state.image.config.cmd if state.cmd_set else None
    return state.with_config(f"ENTRYPOINT {go_list(entrypoint, quoted=True)}", entrypoint=entrypoint, cmd=cmd)


def do_healthcheck(inputs: StepInputs, state: StageState, instruction: Healthcheck) -> StageState:
    if instruction.command is None:
        check = oci.Healthcheck(test=("NONE",))
    else:
        command = instruction.command
        test = ("CMD", *command.args) if command.exec_form else ("CMD-SHELL", *command.args)
        check = oci.Healthcheck(test=test, interval=instruction.interval or 0, timeout=instruction.timeout or 0,
                                start_period=instruction.start_period or 0,
                                start_interval=instruction.start_interval or 0, retries=instruction.retries or 0)
    # BuildKit writes the config's struct with Go's %+v.
    text = (f"{{Test:{go_list(check.test)} Interval:{go_duration(check.interval)} Timeout:{go_duration(check.timeout)}"
            f" StartPeriod:{go_duration(check.start_period)} StartInterval:{go_duration(check.start_interval)}"
            f" Retries:{check.retries}}}")
    return state.with_config(f"HEALTHCHECK {text}", healthcheck=check)


def do_onbuild(inputs: StepInputs, state: StageState, instruction: Onbuild) -> StageState:
    # As in BuildKit, the trigger is kept in the config without a history entry.
    triggers = (*state.image.config.on_build, instruction.expression)
    image = replace(state.image, config=replace(state.image.config, on_build=triggers))
    return replace(state, image=image)


def do_workdir(inputs: StepInputs, state: StageState, instruction: Workdir) -> FilesystemStep:
    path = _expanded(state, instruction, inputs.escape).path
    path = posixpath.normpath(posixpath.join(state.image.config.working_dir or "/", path))
    if path.startswith("//"):
        path = path[1:]
    changed = replace(state, image=replace(state.image, config=replace(state.image.config, working_dir=path)))
    return FilesystemStep(changed, WorkdirOp(path, state.image.config.user), f"WORKDIR {path}")


def heredoc_body(heredoc: Heredoc) -> str:
    """A heredoc's body, with ``<<-``'s leading tabs stripped."""
    if not heredoc.chomp:
        return heredoc.content
    return "".join(line.lstrip("\t") for line in heredoc.content.splitlines(keepends=True))


def do_run(inputs: StepInputs, state: StageState, instruction: Run) -> FilesystemStep:
    expanded = _expanded(state, instruction, inputs.escape)
    assert isinstance(expanded, Run)
    check_run(expanded)
    command = expanded.command
    scripts: tuple[tuple[str, bytes], ...] = ()
    if expanded.heredocs:
        argv, scripts = _heredoc_argv(state, expanded)
    else:
        argv = shell_command(state, command)
    args = [(name, value) for name, value in state.args if name not in PREDEFINED_ARGS]
    prefix = f"|{len(args)} " + " ".join(f"{name}={value}" for name, value in args) + " " if args else ""
    shown = " ".join(argv) if not expanded.heredocs else " ".join(shell_command(state, instruction.command))
    config = state.image.config
    op = RunOp(argv=argv, env=state.run_env(), user=config.user, cwd=config.working_dir or "/",
               network=expanded.network, mounts=expanded.mounts, scripts=scripts, location=instruction.location)
    return FilesystemStep(state, op, f"RUN {prefix}{shown}")


def _heredoc_argv(state: StageState, run: Run) -> tuple[tuple[str, ...], tuple[tuple[str, bytes], ...]]:
    """BuildKit's rule: a lone heredoc is the script; otherwise the shell reads the heredocs itself.

    A lone heredoc that starts with ``#!`` becomes an executable file, /dev/pipes/<delimiter>, run as
    it is: its interpreter reads it from there, and its standard input stays the step's own. As in
    BuildKit, the ``#!`` is looked for before ``<<-`` strips tabs: a tab-indented one leaves a shell script.
    """
    heredocs = run.heredocs
    bodies = [heredoc_body(heredoc) for heredoc in heredocs]
    shell = state.image.config.shell or DEFAULT_SHELL
    if lone_heredoc(run) is not None:
        if heredocs[0].content.startswith("#!"):
            name = heredocs[0].name  # check_run made sure it can name a file
            return (f"{HEREDOC_SCRIPT_DIR}/{name}",), ((name, bodies[0].encode()),)
        return (*shell, bodies[0]), ()
    script = run.command.args[0] if run.command.args else ""
    for heredoc, body in zip(heredocs, bodies, strict=True):
        script += "\n" + body + ("" if body.endswith("\n") or not body else "\n") + heredoc.name
    return (*shell, script), ()


def do_copy(inputs: StepInputs, state: StageState, instruction: Copy | Add) -> FilesystemStep:
    expanded = _expanded(state, instruction, inputs.escape)
    assert isinstance(expanded, Copy | Add)
    check_copy(expanded)
    op = CopyOp(expanded, state.image.config.working_dir or "/", instruction.location)
    return FilesystemStep(state, op, describe(instruction).split("\n")[0])


Step = Callable[[StepInputs, StageState, Instruction], "StageState | FilesystemStep"]

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

