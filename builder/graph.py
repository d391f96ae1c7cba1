"""The build graph: a parsed Dockerfile cut into stages, their dependencies, and the ones a target needs.

Global ARGs (before the first FROM) and ``--build-arg`` values are resolved here, because FROM lines and
``--from`` references must be known before anything runs.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

from parser.dataclass import dataclass
from parser.errors import PybuildError
from parser.expand import expand
from parser.instructions import Arg, ArgDefinition, Copy, Dockerfile, Env, From, Instruction, Run

# Proxy variables every build may use without an ARG line; docker keeps them out of the history.
PREDEFINED_ARGS = frozenset({
    "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy",
    "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy",
})

_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
                  "riscv64": "riscv64", "i686": "386"}


def host_platform() -> tuple[str, str, str]:
    """(os, architecture, variant) of this machine, in OCI's words."""
    machine = platform.machine()
    arch = _ARCHITECTURES.get(machine, machine)
    return "linux", arch, "v7" if arch == "arm" else ""


def platform_args() -> dict[str, str]:
    """The automatic platform ARGs; pybuild builds for the machine it runs on, so build = target."""
    os_name, arch, variant = host_platform()
    full = f"{os_name}/{arch}" + (f"/{variant}" if variant else "")
    values = {}
    for prefix in ("BUILD", "TARGET"):
        values.update({f"{prefix}PLATFORM": full, f"{prefix}OS": os_name, f"{prefix}ARCH": arch,
                       f"{prefix}VARIANT": variant})
    return values


@dataclass
class Stage:
    """One FROM and the instructions after it, up to the next FROM."""

    index: int
    name: str | None
    base: str  # the FROM image with global ARGs expanded
    from_instruction: From
    instructions: tuple[Instruction, ...]
    depends_on: tuple[int, ...]  # indexes of earlier stages this one reads from

    @property
    def label(self) -> str:
        return self.name or f"stage-{self.index}"


@dataclass
class BuildGraph:
    """The stages of a Dockerfile, the target, and which stages the target needs."""

    dockerfile: Dockerfile
    stages: tuple[Stage, ...]
    target: int
    needed: tuple[int, ...]  # stages to build for the target, in Dockerfile order
    global_args: tuple[tuple[str, str | None], ...]  # global ARGs, with the values build args gave them
    unused_build_args: tuple[str, ...]

    def stage_by_reference(self, reference: str, before: int) -> Stage | None:
        return _find_stage(self.stages[:before], reference)


def _find_stage(stages: tuple[Stage, ...], reference: str) -> Stage | None:
    lowered = reference.lower()
    for stage in stages:
        if stage.name == lowered:
            return stage
    if reference.isdigit() and int(reference) < len(stages):
        return stages[int(reference)]
    return None


def _static_env(instructions: tuple[Instruction, ...], start: Mapping[str, str], escape: str,
                upto: Instruction) -> dict[str, str]:
    """ARG and ENV values a stage has defined before ``upto``, as far as the Dockerfile alone tells."""
    env = dict(start)
    for instruction in instructions:
        if instruction is upto:
            break
        if isinstance(instruction, Arg):
            for definition in expand(instruction, env, escape).instruction.args:
                if definition.default is not None:
                    env.setdefault(definition.name, definition.default)
        elif isinstance(instruction, Env):
            for pair in expand(instruction, env, escape).instruction.pairs:
                env[pair.key] = pair.value
    return env


def _references(instruction: Instruction) -> list[str]:
    """Stage or image names an instruction reads from, unexpanded."""
    if isinstance(instruction, Copy) and instruction.from_:
        return [instruction.from_]
    if isinstance(instruction, Run):
        return [mount.from_ for mount in instruction.mounts if mount.from_]
    return []


def build_graph(dockerfile: Dockerfile, build_args: Mapping[str, str], target: str | None) -> BuildGraph:
    """Cut the Dockerfile into stages and work out which ones ``target`` (default: the last) needs."""
    instructions = dockerfile.instructions
    escape = dockerfile.escape
    global_env = platform_args()
    global_args: list[tuple[str, str | None]] = []
    used_args: set[str] = set()
    position = 0
    while position < len(instructions) and not isinstance(instructions[position], From):
        instruction = instructions[position]
        if not isinstance(instruction, Arg):
            raise PybuildError(f"{type(instruction).__name__.upper()} must come after FROM: only ARG may come "
                               "before the first FROM", instruction.location)
        for definition in expand(instruction, global_env, escape).instruction.args:
            value = build_args.get(definition.name, definition.default)
            if definition.name in build_args:
                used_args.add(definition.name)
            global_args.append((definition.name, value))
            if value is not None:
                global_env[definition.name] = value
        position += 1
    if position == len(instructions):
        raise PybuildError(f"{dockerfile.filename}: no FROM instruction: a Dockerfile must start a stage with FROM")

    chunks: list[tuple[From, tuple[Instruction, ...]]] = []
    while position < len(instructions):
        start = instructions[position]
        assert isinstance(start, From)
        end = position + 1
        while end < len(instructions) and not isinstance(instructions[end], From):
            end += 1
        chunks.append((start, instructions[position + 1:end]))
        position = end

    stages: list[Stage] = []
    for index, (from_instruction, body) in enumerate(chunks):
        expanded = expand(from_instruction, global_env, escape).instruction
        assert isinstance(expanded, From)
        if expanded.platform:
            os_name, arch, _ = host_platform()
            if expanded.platform not in (f"{os_name}/{arch}", "$BUILDPLATFORM", "$TARGETPLATFORM"):
                raise PybuildError(f"FROM --platform={expanded.platform}: pybuild only builds for this machine's "
                                   f"platform ({os_name}/{arch}) so far", from_instruction.location)
        name = from_instruction.stage_name.lower() if from_instruction.stage_name else None
        if name is not None and any(stage.name == name for stage in stages):
            raise PybuildError(f"duplicate stage name {from_instruction.stage_name!r}", from_instruction.location)
        if not expanded.image:
            raise PybuildError("FROM names no image (an ARG it uses may be empty)", from_instruction.location)
        depends: list[int] = []
        base_stage = _find_stage(tuple(stages), expanded.image) if not expanded.image.isdigit() else None
        if base_stage is not None:
            depends.append(base_stage.index)
        stage_env = dict(global_env)
        for instruction in body:
            for reference in _references(instruction):
                if "$" in reference:
                    env = _static_env(body, stage_env, escape, instruction)
                    reference = expand(_as_arg_value(instruction, reference), env, escape).instruction.args[0].default
                found = _find_stage(tuple(stages), reference)
                if found is not None and found.index not in depends:
                    depends.append(found.index)
                elif found is None and reference.lower() == name:
                    raise PybuildError(f"stage {reference!r} cannot read from itself", instruction.location)
        for instruction in body:
            if isinstance(instruction, Arg):
                used_args.update(definition.name for definition in instruction.args
                                 if definition.name in build_args)
        stages.append(Stage(index, name, expanded.image, from_instruction, body, tuple(depends)))

    if target is None:
        target_index = len(stages) - 1
    else:
        found = _find_stage(tuple(stages), target)
        if found is None or (found.name is None and not target.isdigit()):
            names = ", ".join(stage.name for stage in stages if stage.name) or "none"
            raise PybuildError(f"target stage {target!r} could not be found (named stages: {names})")
        target_index = found.index

    needed: set[int] = set()
    pending = [target_index]
    while pending:
        index = pending.pop()
        if index not in needed:
            needed.add(index)
            pending.extend(stages[index].depends_on)
    # SOURCE_DATE_EPOCH is read by pybuild itself (it sets the image's times), as BuildKit reads it.
    unused = tuple(sorted(name for name in build_args if name not in used_args and name not in PREDEFINED_ARGS
                          and name != "SOURCE_DATE_EPOCH"))
    return BuildGraph(dockerfile, tuple(stages), target_index, tuple(sorted(needed)), tuple(global_args), unused)


def _as_arg_value(instruction: Instruction, text: str) -> Arg:
    """Wrap a reference in an ARG so the shared expander expands it with the same word rules."""
    return Arg(location=instruction.location, original=text, args=(ArgDefinition("_", text),))

