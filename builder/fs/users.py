"""User and group names to numeric ids, from an image's own /etc/passwd and /etc/group (USER and --chown).

USER follows runc's lookup, as BuildKit runs it: ``uid:gid`` in numbers needs no files; otherwise
the user is looked up by name (or by uid when numeric), a numeric uid without a passwd entry gets
gid 0, and with no group given the user's supplementary groups are the groups listing it as a member.
A RUN step without HOME in its environment gets the home of the passwd entry of its uid, as runc sets it.

``--chown`` follows BuildKit's file operations: a numeric uid alone means gid = uid (the Dockerfile
reference's rule); a user name alone takes the primary gid from its passwd entry, which is the same
number for the usual user-private groups.
"""

from __future__ import annotations

import re
from pathlib import Path

from builder.fs.context import resolve_in_root
from parser.dataclass import dataclass
from parser.errors import PybuildError

MAX_ID = 2**31 - 1  # runc's limit for uids and gids
_NUMBER = re.compile(r"[0-9]+")


@dataclass
class UserIds:
    """A USER resolved in the image: numeric uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass
class _Entry:
    """One line of /etc/passwd or /etc/group: name, numeric id, and (passwd) gid and home or (group) members."""

    name: str
    id: int
    gid: int = 0
    members: tuple[str, ...] = ()
    home: str = ""


def _number(text: str, spec: str) -> int | None:
    if not _NUMBER.fullmatch(text):
        return None
    value = int(text)
    if value > MAX_ID:
        raise PybuildError(f"user {spec}: uids and gids must be in range 0-{MAX_ID}")
    return value


def _int_field(text: str) -> int:
    # runc reads a malformed number as 0; the same files must give the same ids here.
    return int(text) if _NUMBER.fullmatch(text) else 0


def _read(root: Path, path: str) -> list[list[str]] | None:
    """The colon-separated lines of a file inside ``root`` (symlinks resolved within it), or None if missing."""
    real = resolve_in_root(Path(root), path)
    try:
        data = real.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    return [line.strip().split(":") for line in lines if line.strip()]


def _passwd(root: Path) -> list[_Entry] | None:
    rows = _read(root, "/etc/passwd")
    if rows is None:
        return None
    return [_Entry(row[0], _int_field(row[2]) if len(row) > 2 else 0, _int_field(row[3]) if len(row) > 3 else 0,
                   home=row[5] if len(row) > 5 else "") for row in rows]


def _groups(root: Path) -> list[_Entry] | None:
    rows = _read(root, "/etc/group")
    if rows is None:
        return None
    return [_Entry(row[0], _int_field(row[2]) if len(row) > 2 else 0,
                   members=tuple(row[3].split(",")) if len(row) > 3 else ()) for row in rows]


def _find_user(root: Path, user: str, spec: str) -> _Entry | None:
    uid = _number(user, spec)
    for entry in _passwd(root) or ():
        if (entry.id == uid) if uid is not None else (entry.name == user):
            return entry
    return None


def _find_group(root: Path, group: str, spec: str) -> int:
    gid = _number(group, spec)
    for entry in _groups(root) or ():
        if (entry.id == gid) if gid is not None else (entry.name == group):
            return entry.id
    if gid is None:
        raise PybuildError(f"unable to find group {group}: no matching entries in group file")
    return gid


def _root_or_number(text: str, spec: str) -> int | None:
    """BuildKit's shortcut: "root" is 0 without looking it up, like any number."""
    return 0 if text == "root" else _number(text, spec)


def resolve_user(root: Path, user: str) -> UserIds:
    """The ids a RUN step (or the container) runs with for USER ``user``, looked up in ``root``'s files."""
    name, has_group, group = user.partition(":")
    uid, gid = _root_or_number(name, user), _root_or_number(group, user)
    if has_group and uid is not None and gid is not None:
        return UserIds(uid, gid)
    entry = _find_user(root, name, user) if name else None
    if entry is None:
        uid = _number(name, user) if name else 0
        if uid is None:
            raise PybuildError(f"unable to find user {name}: no matching entries in passwd file")
        primary = 0
    else:
        uid, primary = entry.id, entry.gid
    if group:
        return UserIds(uid, _find_group(root, group, user))
    if entry is None:
        return UserIds(uid, primary)
    supplementary = tuple(item.id for item in _groups(root) or () if entry.name in item.members)
    return UserIds(uid, primary, supplementary)


def user_home(root: Path, uid: int) -> str:
    """The HOME a RUN step gets when neither the image's Env nor its ARGs set one, as runc fills it in.

    BuildKit hands runc numeric ids only, so the entry is found by uid (the first with it, even when
    USER named another user sharing the uid); a uid without an entry, or an image without
    /etc/passwd, gets ``/``.
    """
    for entry in _passwd(root) or ():
        if entry.id == uid:
            return entry.home
    return "/"


def resolve_chown(root: Path, spec: str) -> tuple[int, int]:
    """The uid and gid ``COPY --chown=spec`` gives, names looked up in the destination root's files."""
    user, _, group = spec.partition(":")
    uid, gid = 0, 0
    if user:
        number = _root_or_number(user, spec)
        if number is not None:
            uid = gid = number
        else:
            entry = _find_user(root, user, spec)
            if entry is None:
                raise PybuildError(f"--chown={spec}: unable to find user {user}: no matching entries in passwd file")
            uid, gid = entry.id, entry.gid
    if group:
        number = _root_or_number(group, spec)
        if number is not None:
            gid = number
        else:
            try:
                gid = _find_group(root, group, spec)
            except PybuildError as exc:
                raise PybuildError(f"--chown={spec}: {exc.message}") from None
    return uid, gid
