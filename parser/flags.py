"""Instruction flags: which flags each instruction takes, and reading their values.

BuildKit's rules: a boolean flag may be bare (`--link`) or `=true|false`; a string flag
needs `=value`; only list flags may repeat.  Anything else is an error naming the flag.
"""

from __future__ import annotations

import csv
import enum
import re

from parser.dataclass import dataclass


class Kind(enum.Enum):
    BOOL = "boolean"
    STRING = "string"
    LIST = "list"


FLAGS: dict[str, dict[str, Kind]] = {
    "from": {"platform": Kind.STRING},
    "run": {"mount": Kind.LIST, "network": Kind.STRING, "security": Kind.STRING, "device": Kind.LIST},
    "copy": {
        "from": Kind.STRING,
        "chown": Kind.STRING,
        "chmod": Kind.STRING,
        "link": Kind.BOOL,
        "parents": Kind.BOOL,
        "exclude": Kind.LIST,
    },
    "add": {
        "chown": Kind.STRING,
        "chmod": Kind.STRING,
        "link": Kind.BOOL,
        "keep-git-dir": Kind.BOOL,
        "checksum": Kind.STRING,
        "unpack": Kind.BOOL,
        "exclude": Kind.LIST,
    },
    "healthcheck": {
        "interval": Kind.STRING,
        "timeout": Kind.STRING,
        "start-period": Kind.STRING,
        "start-interval": Kind.STRING,
        "retries": Kind.STRING,
    },
}


class FlagError(Exception):
    """A bad flag; ``index`` says which of the instruction's flags, for the error position."""

    def __init__(self, message: str, index: int, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.index, self.hint = message, index, hint


@dataclass
class FlagValues:
    """The flags an instruction was given: ``values`` by name, and where each occurrence of a name
    stands among the flags (several for a list flag), for error positions."""

    values: dict[str, bool | str | list[str]]
    index: dict[str, list[int]]

    def get(self, name: str, default=None):
        return self.values.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def __getitem__(self, name: str):
        return self.values[name]


def read_flags(keyword: str, flags: tuple[str, ...]) -> FlagValues:
    """The values of ``flags`` (each ``--name[=value]``) for ``keyword``."""
    allowed = FLAGS.get(keyword, {})
    values: dict[str, bool | str | list[str]] = {}
    where: dict[str, list[int]] = {}
    for index, flag in enumerate(flags):
        name, has_value, value = flag[2:].partition("=")
        kind = allowed.get(name)
        if kind is None:
            import difflib  # only for a mistake: the import costs every build ~1 ms

            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean --{close[0]}?" if close else None
            if not allowed:
                hint = f"{keyword.upper()} takes no flags"
            raise FlagError(f"unknown flag: --{name}", index, hint)
        if name in values and kind is not Kind.LIST:
            raise FlagError(f"duplicate flag specified: --{name}", index)
        where.setdefault(name, []).append(index)
        if kind is Kind.BOOL:
            if not has_value:
                values[name] = True
            elif value.lower() in ("true", "false"):
                values[name] = value.lower() == "true"
            elif not value:
                raise FlagError(f"missing a value on flag: --{name}", index)
            else:
                raise FlagError(f"expecting boolean value for flag --{name}, not: {value}", index)
        elif not has_value:
            raise FlagError(f"missing a value on flag: --{name}", index, hint=f"write --{name}=VALUE")
        elif kind is Kind.LIST:
            values.setdefault(name, [])
            values[name].append(value)  # type: ignore[union-attr]
        else:
            values[name] = value
    return FlagValues(values, where)


# --- RUN --mount -------------------------------------------------------------------------

MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
_MOUNT_KEY_ALIASES = {
    "src": "source",
    "dst": "target",
    "destination": "target",
    "ro": "readonly",
    "rw": "readwrite",
}
_MOUNT_KEYS = {"type", "target", "source", "from", "readonly", "readwrite", "id", "sharing", "required", "size"}
_MOUNT_KEYS |= {"mode", "uid", "gid", "env"}
_BARE_MOUNT_KEYS = {"readonly", "readwrite", "required"}
# The values Go's strconv.ParseBool accepts, which BuildKit uses for these keys.
_GO_BOOLS = {v: True for v in ("1", "t", "T", "TRUE", "true", "True")} | {
    v: False for v in ("0", "f", "F", "FALSE", "false", "False")
}
# Keys BuildKit accepts only for some mount types.
_MOUNT_KEY_TYPES = {
    "sharing": ("cache",),
    "required": ("secret", "ssh"),
    "size": ("tmpfs",),
    "mode": ("secret", "ssh", "cache"),
    "uid": ("secret", "ssh", "cache"),
    "gid": ("secret", "ssh", "cache"),
}


@dataclass
class Mount:
    """One `RUN --mount=...`. Values are as written; `$VAR` in them is expanded at build time."""

    type: str = "bind"
    target: str | None = None
    source: str | None = None
    from_: str | None = None
    readonly: bool | None = None  # None: the type's default (bind, secret, ssh read-only)
    id: str | None = None
    sharing: str | None = None
    required: bool | None = None
    size: str | None = None
    mode: str | None = None
    uid: str | None = None
    gid: str | None = None
    env: str | None = None


class MountError(ValueError):
    pass


# --- mount option values, read as BuildKit reads them -------------------------------------

_SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_GO_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def mount_size(text: str) -> int:
    """A tmpfs ``size`` in bytes, read as docker/go-units' RAMInBytes reads it (BuildKit uses it).

    A decimal number (``1.5`` too), then an optional unit k, m, g, t or p in multiples of 1024,
    optionally followed by ``b`` or ``ib``, in any case and after at most one space: ``64m``, ``1.5GiB``,
    ``10kb``, ``100``, ``100b``.  The fraction of a byte is dropped.
    """
    end = max(text.rfind(character) for character in "0123456789. ")
    number, suffix = (text[:end], text[end + 1:]) if end >= 0 and text[end] == " " else (text[:end + 1],
                                                                                           text[end + 1:])
    suffix = suffix.lower()
    valid_suffix = suffix in ("", "b") or (suffix[:1] in _SIZE_UNITS and suffix[1:] in ("", "b", "ib"))
    if end < 0 or not _GO_FLOAT.fullmatch(number) or not valid_suffix:
        raise MountError(f"invalid value {text!r} for size: write a size such as 64m, 1g or 1.5GiB")
    size = float(number) * _SIZE_UNITS.get(suffix[:1], 1)
    if not 0 <= size < 2**63:
        raise MountError(f"invalid value {text!r} for size: it must be at least 0 and below 8 EiB")
    return int(size)


def mount_mode(text: str) -> int:
    """A secret, ssh or cache mount's ``mode``: an octal number (Go's ParseUint(text, 8, 32))."""
    if not re.fullmatch(r"[0-7]+", text) or int(text, 8) >= 2**32:
        raise MountError(f"invalid value {text!r} for mode: write an octal number such as 0400")
    return int(text, 8)


def mount_id(key: str, text: str) -> int:
    """A secret, ssh or cache mount's ``uid`` or ``gid``: a decimal number (Go's ParseUint(text, 10, 32))."""
    if not re.fullmatch(r"[0-9]+", text) or int(text) >= 2**32:
        raise MountError(f"invalid value {text!r} for {key}: write a number from 0 to {2**32 - 1}")
    return int(text)


def parse_mount(value: str) -> Mount:
    """Read a `--mount` CSV value such as ``type=cache,target=/root/.cache,sharing=locked``."""
    try:
        fields = next(csv.reader([value], strict=True), [])  # Go rejects an unclosed quote too
    except csv.Error as exc:
        raise MountError(f"invalid mount {value!r}: {exc}") from None
    options: dict[str, str | bool] = {}
    for field in fields:
        key, has_value, val = field.partition("=")
        key = _MOUNT_KEY_ALIASES.get(key.strip().lower(), key.strip().lower())
        if key not in _MOUNT_KEYS:
            raise MountError(f"unexpected key {key!r} in {field!r}")
        if not has_value and key not in _BARE_MOUNT_KEYS:
            raise MountError(f"invalid field {field!r}: mount options need key=value")
        if key in _BARE_MOUNT_KEYS:
            if not has_value:
                options[key] = True
            elif val in _GO_BOOLS:
                options[key] = _GO_BOOLS[val]
            else:
                raise MountError(f"invalid value for {key}: {val!r} (expected true or false)")
        else:
            options[key] = val
    mount_type = str(options.pop("type", "bind")).lower()
    if mount_type not in MOUNT_TYPES:
        raise MountError(f"unsupported mount type {mount_type!r} (one of {', '.join(MOUNT_TYPES)})")
    for key, types in _MOUNT_KEY_TYPES.items():
        if key in options and mount_type not in types:
            raise MountError(f"unexpected key {key!r} for mount type {mount_type}")
    if "readwrite" in options:
        if "readonly" in options:
            raise MountError("a mount cannot be both readonly and readwrite")
        options["readonly"] = not options.pop("readwrite")
    if "sharing" in options and options["sharing"] not in ("shared", "private", "locked"):
        raise MountError(f"unsupported sharing value {options['sharing']!r} (shared, private or locked)")
    source_from = options.get("from")
    if isinstance(source_from, str) and "$" in source_from[:-1]:
        raise MountError("'from' doesn't support variable expansion, define an alias stage instead")
    if mount_type == "secret":
        if "from" in options:
            raise MountError("secret mounts do not take 'from'")
        if not ({"source", "target", "id"} & options.keys()):
            raise MountError("a secret mount needs an id, a source or a target")
        if "source" in options and "id" in options:
            raise MountError("a secret mount cannot have both source and id")
    elif mount_type != "ssh" and not options.get("target"):
        raise MountError(f"a {mount_type} mount needs a target")
    if "from" in options:
        options["from_"] = options.pop("from")
    return Mount(type=mount_type, **options)  # type: ignore[arg-type]
