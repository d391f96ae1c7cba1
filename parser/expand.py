"""Build-time `$VAR` expansion, applied to exactly the instructions and fields Docker expands.

RUN, CMD, ENTRYPOINT, SHELL, HEALTHCHECK and MAINTAINER are never expanded here (the shell
in the container does that, or nobody); ONBUILD triggers are expanded when they fire.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from parser.dataclass import dataclass
from parser.errors import ShellExpansionError
from parser.flags import Mount
from parser.instructions import (
    Add,
    Arg,
    ArgDefinition,
    Copy,
    Env,
    Expose,
    From,
    Instruction,
    KeyValue,
    Label,
    Run,
    Stopsignal,
    User,
    Volume,
    Workdir,
)
from parser.lines import Heredoc
from parser.shell import ShellLexer


@dataclass
class Expanded:
    """The instruction with its words expanded, and the variable names those words used."""

    instruction: Instruction
    used: frozenset[str]


class _Expander:
    def __init__(self, env: Mapping[str, str], escape: str) -> None:
        self.env = env
        self.lexer = ShellLexer(escape)
        self.escape = escape
        self.used: set[str] = set()

    def word(self, text: str) -> str:
        result, matched, unmatched = self.lexer.process_word_with_matches(text, self.env)
        self.used |= matched | unmatched
        return result

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self.word(text)

    def words(self, text: str) -> list[str]:
        self.word(text)  # records the names used
        return self.lexer.process_words(text, self.env)

    def heredoc(self, heredoc: Heredoc) -> Heredoc:
        """An inline file's body: `$VAR` expanded unless the delimiter was quoted.

        As BuildKit's ExpandRaw: quotes are ordinary characters (`'$X'` is expanded too), and a backslash,
        whatever the escape directive says, escapes the next character and is removed (`\\$X` gives `$X`).
        """
        if not heredoc.expand:
            return heredoc
        lexer = ShellLexer("\\", skip_process_quotes=True)
        content, matched, unmatched = lexer.process_word_with_matches(heredoc.content, self.env)
        self.used |= matched | unmatched
        return replace(heredoc, content=content)

    def pairs(self, pairs: tuple[KeyValue, ...]) -> tuple[KeyValue, ...]:
        return tuple(KeyValue(self.word(p.key), self.word(p.value)) for p in pairs)

    def mount(self, mount: Mount) -> Mount:
        fields = {
            name: self.word(value) for name, value in vars(mount).items() if isinstance(value, str) and name != "type"
        }
        return replace(mount, **fields)


def _from(x: _Expander, i: From) -> From:
    return replace(i, image=x.word(i.image), platform=x.optional(i.platform))


def _file_fields(x: _Expander, i: Copy | Add) -> dict:
    """The fields COPY and ADD share."""
    return {
        "sources": tuple(x.word(s) for s in i.sources),
        "dest": x.word(i.dest),
        "source_contents": tuple(x.heredoc(h) for h in i.source_contents),
        "chown": x.optional(i.chown),
        "chmod": x.optional(i.chmod),
        "excludes": tuple(x.word(e) for e in i.excludes),
    }


def _copy(x: _Expander, i: Copy) -> Copy:
    return replace(i, **_file_fields(x, i), from_=x.optional(i.from_))


def _add(x: _Expander, i: Add) -> Add:
    return replace(i, **_file_fields(x, i), checksum=x.optional(i.checksum))


def _arg(x: _Expander, i: Arg) -> Arg:
    return replace(i, args=tuple(ArgDefinition(x.word(a.name), x.optional(a.default)) for a in i.args))


def _expose(x: _Expander, i: Expose) -> Expose:
    return replace(i, ports=tuple(port for text in i.ports for port in x.words(text)))


_EXPANDERS: dict[type, Callable] = {
    From: _from,
    Copy: _copy,
    Add: _add,
    Env: lambda x, i: replace(i, pairs=x.pairs(i.pairs)),
    Label: lambda x, i: replace(i, pairs=x.pairs(i.pairs)),
    Arg: _arg,
    Expose: _expose,
    Volume: lambda x, i: replace(i, paths=tuple(x.word(p) for p in i.paths)),
    Workdir: lambda x, i: replace(i, path=x.word(i.path)),
    User: lambda x, i: replace(i, user=x.word(i.user)),
    Stopsignal: lambda x, i: replace(i, signal=x.word(i.signal)),
    Run: lambda x, i: replace(i, mounts=tuple(x.mount(m) for m in i.mounts)),
}


def expand(instruction: Instruction, env: Mapping[str, str], escape: str = "\\") -> Expanded:
    """Expand ``instruction``'s words with ``env`` (the stage's ARG and ENV values at that point)."""
    expander = _EXPANDERS.get(type(instruction))
    if expander is None:
        return Expanded(instruction, frozenset())
    state = _Expander(env, escape)
    try:
        return Expanded(expander(state, instruction), frozenset(state.used))
    except ShellExpansionError as exc:
        if exc.location is not None:
            raise
        raise ShellExpansionError(exc.message, instruction.location, hint=exc.hint) from None


def expands(instruction_type: type) -> bool:
    """Whether Docker expands variables in this kind of instruction at all."""
    return instruction_type in _EXPANDERS
