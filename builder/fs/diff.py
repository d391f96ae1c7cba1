"""The copy snapshotter's tree work: read stacked snapshots as one tree, copy it out, and diff a copy against it.

Snapshots are read in either whiteout form (overlayfs markers, or the OCI ``.wh.`` files the copy
snapshotter stores). ``diff_tree`` writes its changes in the OCI form, as empty mode-0 files, which
``write_layer`` understands and which need no privilege or xattr support: the copy snapshotter runs
exactly where overlayfs (and with it 0/0 devices, trusted xattrs) may be unavailable.

A directory that was removed and made again must become an opaque directory, as overlayfs makes it.
It is recognised by its inode number and generation (where the filesystem reports one) differing
from the copy's; should a filesystem without generations hand out the same number again, the change
is written as whiteouts of the old entries instead: the same tree, a larger layer.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

from builder.fs.layer import is_opaque_dir
from builder.fs.untar import OPAQUE_MARKER, OVERLAY_XATTR_PREFIXES, WHITEOUT_PREFIX, is_overlay_whiteout
from parser.errors import PybuildError

_CHUNK = 1 << 20
# _IOR('v', 1, long): the inode generation, which changes when an inode number is reused.
_FS_IOC_GETVERSION = (2 << 30) | (struct.calcsize("l") << 16) | (ord("v") << 8) | 1

Entry = tuple[str, os.stat_result]
DirIdentity = tuple[int, int]


def dir_identity(path: str) -> DirIdentity:
    """Inode number and generation (0 where the filesystem has none) of a directory."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            generation = struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETVERSION, bytes(struct.calcsize("l"))))[0]
        except OSError:
            generation = 0
        return os.fstat(fd).st_ino, generation
    finally:
        os.close(fd)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_opaque(path: str) -> bool:
    return os.path.lexists(os.path.join(path, OPAQUE_MARKER)) or is_opaque_dir(path)


class LowerView:
    """Snapshot directories (given bottom-up) seen as the one tree overlayfs would show."""

    def __init__(self, lowers: Sequence[Path]) -> None:
        self.roots = [os.fspath(lower) for lower in reversed(lowers)]

    def stat(self, path: str) -> os.stat_result | None:
        """The stat of a root-relative path as the stacked lowers show it, or None when it is not there."""
        dirs = self.roots
        parts = [part for part in path.split("/") if part]
        if not parts:
            return _lstat(dirs[0]) if dirs else None
        for part in parts[:-1]:
            _, dirs = resolve(dirs, part)
            if not dirs:
                return None
        top, _ = resolve(dirs, parts[-1])
        return None if top is None else top[1]


def resolve(dirs: Sequence[str], name: str) -> tuple[Entry | None, list[str]]:
    """The topmost ``name`` in one directory's layers (top-first), and the layers of it if it is a directory.

    Whiteouts, opaque directories and non-directories hide what lies below them.
    """
    top: Entry | None = None
    below: list[str] = []
    for directory in dirs:
        path = os.path.join(directory, name)
        st = _lstat(path)
        if st is None:
            if os.path.lexists(os.path.join(directory, WHITEOUT_PREFIX + name)):
                break
            continue
        if is_overlay_whiteout(st):
            break
        if top is None:
            top = (path, st)
        if not stat.S_ISDIR(st.st_mode):
            break
        below.append(path)
        if _is_opaque(path):
            break
    if top is not None and not stat.S_ISDIR(top[1].st_mode):
        below = []
    return top, below


def visible_names(dirs: Sequence[str]) -> list[str]:
    """The names one directory shows through its layers (top-first), sorted."""
    shown: set[str] = set()
    hidden: set[str] = set()
    for directory in dirs:
        layer_hidden = set()
        with os.scandir(directory) as scan:
            for entry in scan:
                name = entry.name
                if name.startswith(WHITEOUT_PREFIX):
                    layer_hidden.add(name[len(WHITEOUT_PREFIX):])
                elif is_overlay_whiteout(entry.stat(follow_symlinks=False)):
                    layer_hidden.add(name)
                elif name not in hidden:
                    shown.add(name)
        hidden |= layer_hidden
    return sorted(shown)


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {name: os.getxattr(path, name, follow_symlinks=False)
            for name in names if not name.startswith(OVERLAY_XATTR_PREFIXES)}


def copy_metadata(source: str, target: str, st: os.stat_result) -> None:
    """Owner, mode, xattrs and times of ``source`` onto ``target`` (in the order that keeps setuid bits)."""
    os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target, stat.S_IMODE(st.st_mode))
    for name, value in _xattrs(source).items():
        os.setxattr(target, name, value, follow_symlinks=False)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_node(source: str, target: str, st: os.stat_result) -> None:
    """Copy one non-directory, metadata included."""
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        shutil.copyfile(source, target, follow_symlinks=False)
    elif kind == stat.S_IFLNK:
        os.symlink(os.readlink(source), target)
    elif kind == stat.S_IFIFO:
        os.mkfifo(target, 0o600)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        try:
            os.mknod(target, kind | 0o600, st.st_rdev)
        except PermissionError:
            raise PybuildError(f"cannot copy device node {source}: this process may not create devices") from None
    else:
        raise PybuildError(f"cannot copy {source}: unsupported file type")
    copy_metadata(source, target, st)


def materialize(lowers: Sequence[Path], dest: Path) -> dict[tuple[str, ...], DirIdentity]:
    """Copy the stacked lowers into the empty ``dest``; returns the identity of every directory made."""
    view = LowerView(lowers)
    made: dict[tuple[str, ...], DirIdentity] = {}

    def copy_dir(dirs: list[str], target: str, rel: tuple[str, ...]) -> None:
        for name in visible_names(dirs):
            top, below = resolve(dirs, name)
            assert top is not None  # visible names resolve
            path = os.path.join(target, name)
            if below:
                os.mkdir(path, 0o700)
                made[(*rel, name)] = dir_identity(path)
                copy_dir(below, path, (*rel, name))
            else:
                _copy_node(top[0], path, top[1])
            if below:  # times last: filling the directory changed them
                copy_metadata(top[0], path, top[1])

    if view.roots:
        copy_dir(view.roots, os.fspath(dest), ())
        copy_metadata(view.roots[0], os.fspath(dest), os.lstat(view.roots[0]))
    return made


def _same_content(first: str, second: str) -> bool:
    with open(first, "rb", buffering=0) as one, open(second, "rb", buffering=0) as two:
        while True:
            chunk = one.read(_CHUNK)
            if chunk != two.read(_CHUNK):
                return False
            if not chunk:
                return True


def _differs(lower: Entry, current: Entry) -> bool:
    (lower_path, old), (path, new) = lower, current
    if (old.st_mode, old.st_uid, old.st_gid, old.st_mtime_ns) != (new.st_mode, new.st_uid, new.st_gid,
                                                                   new.st_mtime_ns):
        return True
    kind = stat.S_IFMT(new.st_mode)
    if kind == stat.S_IFREG and old.st_size != new.st_size:
        return True
    if kind == stat.S_IFLNK and os.readlink(lower_path) != os.readlink(path):
        return True
    if kind in (stat.S_IFCHR, stat.S_IFBLK) and old.st_rdev != new.st_rdev:
        return True
    if _xattrs(lower_path) != _xattrs(path):
        return True
    return kind == stat.S_IFREG and not _same_content(lower_path, path)


class _Differ:
    """Moves what changed in ``merged`` (relative to the lowers) into ``upper``: merged is thrown away after, so a
    new or changed entry is renamed across rather than copied, a whole new directory in one rename. Only an
    inode with several names is copied, so each of its names can be linked to the one copy, as overlayfs does."""

    def __init__(self, merged: Path, upper: Path, originals: dict[tuple[str, ...], DirIdentity]) -> None:
        self.merged = os.fspath(merged)
        self.upper = os.fspath(upper)
        self.originals = originals
        # Directories made in upper, with their merged stat from before anything was moved out of them.
        self.made: dict[tuple[str, ...], os.stat_result] = {}
        self.moved: set[tuple[str, ...]] = set()  # whole directories renamed into upper
        self.root_stat = os.lstat(self.merged)
        # Hardlinks: the upper copy of each linked inode, and unchanged names sharing an inode.
        self.copied: dict[tuple[int, int], str] = {}
        self.linked: dict[tuple[int, int], list[tuple[str, ...]]] = {}

    def _upper(self, rel: tuple[str, ...]) -> str:
        return os.path.join(self.upper, *rel)

    def _merged(self, rel: tuple[str, ...]) -> str:
        return os.path.join(self.merged, *rel)

    def ensure(self, rel: tuple[str, ...]) -> None:
        """Make the upper directory ``rel`` (metadata follows in ``finish``)."""
        if not rel or rel in self.made or rel in self.moved:
            return
        self.ensure(rel[:-1])
        os.mkdir(self._upper(rel), 0o700)
        self.made[rel] = os.lstat(self._merged(rel))

    def marker(self, rel: tuple[str, ...], name: str) -> None:
        self.ensure(rel)
        fd = os.open(os.path.join(self._upper(rel), name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
        os.fchmod(fd, 0)
        os.close(fd)

    def copy(self, rel: tuple[str, ...], st: os.stat_result) -> None:
        """Move a merged entry (a whole tree for a directory) into upper."""
        self.ensure(rel[:-1])
        source, target = self._merged(rel), self._upper(rel)
        if stat.S_ISDIR(st.st_mode):
            if _no_linked_files(source):
                os.rename(source, target)
                self.moved.add(rel)
                return
            self.ensure(rel)
            with os.scandir(source) as scan:
                for entry in sorted(scan, key=lambda entry: entry.name):
                    self.copy((*rel, entry.name), entry.stat(follow_symlinks=False))
            return
        if st.st_nlink == 1:
            os.rename(source, target)
            return
        key = (st.st_dev, st.st_ino)
        if key in self.copied:
            os.link(self.copied[key], target)
            return
        _copy_node(source, target, st)
        self.copied[key] = target

    def directory(self, rel: tuple[str, ...], dirs: list[str]) -> None:
        lower_names = set(visible_names(dirs)) if dirs else set()
        with os.scandir(self._merged(rel)) as scan:
            current = {entry.name: entry.stat(follow_symlinks=False) for entry in scan}
        for name in sorted(lower_names - current.keys()):
            self.marker(rel, WHITEOUT_PREFIX + name)
        for name in sorted(current):
            child, st = (*rel, name), current[name]
            top, below = resolve(dirs, name) if name in lower_names else (None, [])
            if top is None:
                self.copy(child, st)
            elif stat.S_ISDIR(st.st_mode):
                if below and self.originals.get(child) == dir_identity(self._merged(child)):
                    self.directory(child, below)
                    if _differs(top, (self._merged(child), st)):
                        self.ensure(child)
                else:  # made anew where something was: only the new content shows
                    self.copy(child, st)
                    self.marker(child, OPAQUE_MARKER)
            elif stat.S_ISDIR(top[1].st_mode) or _differs(top, (self._merged(child), st)):
                self.copy(child, st)
            elif st.st_nlink > 1:
                self.linked.setdefault((st.st_dev, st.st_ino), []).append(child)

    def finish(self) -> None:
        for key, names in self.linked.items():
            if key in self.copied:
                for rel in names:
                    self.ensure(rel[:-1])
                    os.link(self.copied[key], self._upper(rel))
        for rel in sorted(self.made, key=len, reverse=True):
            copy_metadata(self._merged(rel), self._upper(rel), self.made[rel])
        copy_metadata(self.merged, self.upper, self.root_stat)


def _no_linked_files(top: str) -> bool:
    """Whether no file under ``top`` has a name elsewhere (a tree that can move into upper as it is)."""
    pending = [top]
    while pending:
        with os.scandir(pending.pop()) as scan:
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.stat(follow_symlinks=False).st_nlink > 1:
                    return False
    return True


def diff_tree(merged: Path, lowers: Sequence[Path], upper: Path,
              originals: dict[tuple[str, ...], DirIdentity]) -> None:
    """Move into the empty ``upper`` what differs between ``merged`` and the stacked ``lowers``.

    ``originals`` is what ``materialize`` returned when it made ``merged``; ``merged`` is left unusable (what
    changed has left it), to be removed, and must be on ``upper``'s filesystem.
    """
    differ = _Differ(merged, upper, originals)
    differ.directory((), LowerView(lowers).roots)
    differ.finish()
