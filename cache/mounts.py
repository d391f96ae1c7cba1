"""The persistent directories behind ``RUN --mount=type=cache``, shared safely between concurrent builds.

Layout under the root the caller gives (the build store passes ``<store root>/cache/mounts``)::

    <sha256 of the id>/          one per cache id; ids are arbitrary text, so never a path themselves
        0/  1/ ...               instances: 0 is the one shared and locked users get; more are made
                                 for private users who find the others busy
        0.holders  1.holders     every user of an instance holds a shared flock on its file
        instances.lock           held briefly to choose, create or remove instances
        locked.lock              held through a ``sharing=locked`` user's whole RUN
        new-<pid>-<random>/      an instance being made, renamed into place once complete
        remove-<pid>-<random>/   an instance being deleted, renamed away first

The lock files sit beside the instances, never inside, so a RUN that empties its cache cannot break
them. flock locks belong to an open file, so they also work between threads, and the kernel drops
them when a process dies, even by SIGKILL. An instance only ever appears under its name complete,
and disappears from it at once; what a killed process leaves behind carries its pid and is swept
once that process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cache.usage import tree_usage
from parser.dataclass import dataclass
from parser.errors import PybuildError

SHARING_MODES = ("shared", "private", "locked")
_MUTEX = "instances.lock"
_LOCKED = "locked.lock"
_ID_DIRECTORY = re.compile(r"[0-9a-f]{64}")
_INSTANCE = re.compile(r"([0-9]+)(?:\.holders)?")
_TEMP = re.compile(r"(?:new|remove)-([0-9]+)-.*", re.DOTALL)


@dataclass
class MountUsage:
    """One cache id's directory, the bytes it takes on disk, and when one of its instances was last used."""

    directory: Path
    size: int
    last_used: float


class CacheMounts:
    """The cache mount directories under ``root``; one object may be used from several threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def id_directory(self, id: str) -> Path:
        """Where the instances of cache ``id`` live: named by its sha256, so ``/``, ``..`` or spaces are harmless."""
        return self.root / hashlib.sha256(id.encode("utf-8", "surrogateescape")).hexdigest()

    @contextlib.contextmanager
    def acquire(self, id: str, *, sharing: str = "shared", uid: int = 0, gid: int = 0, mode: int = 0o755,
                seed: Path | None = None) -> Iterator[Path]:
        """The host directory to bind-mount for cache ``id`` while the block runs (one RUN step).

        ``shared``: every concurrent user gets instance 0. ``locked``: instance 0, but users of the id
        with ``locked`` wait for each other, across processes. ``private``: the first instance no one
        else holds, a new one if all are busy. The defaults are BuildKit's. An instance made now is
        owned by ``uid``:``gid`` with ``mode`` and, with ``seed``, holds a copy of that directory's
        content; an existing one is used as it is, whatever these say.

        The locks belong to this call's own descriptors (closed on exec), so threads exclude each other
        as processes do: one RUN that mounts a ``locked`` id twice must take it once, or it waits on itself.
        """
        if sharing not in SHARING_MODES:
            raise ValueError(f"cache sharing {sharing!r} is not one of {', '.join(SHARING_MODES)}")
        directory = self.id_directory(id)
        with contextlib.ExitStack() as held:
            if sharing == "locked":
                held.callback(os.close, _lock(directory / _LOCKED, fcntl.LOCK_EX))
            with _holding(directory / _MUTEX, fcntl.LOCK_EX):
                _sweep(directory)
                holders, instance = _claim(directory, private=sharing == "private")
                held.callback(os.close, holders)
                held.callback(os.utime, holders)  # runs first on the way out: its time is the last use
                os.utime(holders)
                if not instance.is_dir():
                    _create(instance, uid, gid, mode, seed)
            yield instance

    def usage(self) -> list[MountUsage]:
        """Each cache id's directory with the disk it takes (``cache.usage``)."""
        found = []
        for directory in self._ids():
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                found.append(MountUsage(directory, tree_usage(directory).taken, _last_used(directory)))
        return found

    def remove(self, older_than_seconds: float) -> tuple[int, int]:
        """Remove the instances not used for ``older_than_seconds``; returns (instances removed, bytes freed).

        An instance someone holds is never removed, however old; an id left without instances goes too.
        """
        return self._remove(time.time() - older_than_seconds)

    def remove_all(self) -> tuple[int, int]:
        """Remove every instance no one holds, and the id directories left empty; returns (removed, bytes freed)."""
        return self._remove(math.inf)

    def _ids(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(entry for entry in self.root.iterdir() if _ID_DIRECTORY.fullmatch(entry.name) and entry.is_dir())

    def _remove(self, cutoff: float) -> tuple[int, int]:
        _sweep(self.root)
        removed = freed = 0
        for directory in self._ids():
            with _holding(directory / _MUTEX, fcntl.LOCK_EX):
                _sweep(directory)
                for number in _instance_numbers(directory):
                    size = _remove_instance(directory, number, cutoff)
                    if size is not None:
                        removed, freed = removed + 1, freed + size
                if not _instance_numbers(directory):
                    _remove_id_directory(directory, self.root)
        return removed, freed


def _lock(path: Path, operation: int) -> int | None:
    """An open descriptor of ``path`` (created if missing) holding the flock ``operation``.

    None when a non-blocking lock is taken by someone else. A file deleted while we waited for its
    lock is no lock at all (the next user makes a new one), so then the lock is taken again.
    """
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the id's directory was removed between mkdir and open
            continue
        try:
            fcntl.flock(descriptor, operation)
            opened = os.fstat(descriptor)
            current = os.stat(path)
        except BlockingIOError:
            os.close(descriptor)
            return None
        except FileNotFoundError:
            os.close(descriptor)
            continue
        except BaseException:
            os.close(descriptor)
            raise
        if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
            return descriptor
        os.close(descriptor)


@contextlib.contextmanager
def _holding(path: Path, operation: int) -> Iterator[None]:
    descriptor = _lock(path, operation)
    assert descriptor is not None, "a blocking lock is always taken"
    try:
        yield
    finally:
        os.close(descriptor)


def _holders(directory: Path, number: int) -> Path:
    return directory / f"{number}.holders"


def _claim(directory: Path, *, private: bool) -> tuple[int, Path]:
    """A descriptor holding a shared lock on an instance's holders file, and that instance; under the mutex.

    A private user takes the first instance whose holders file it can lock exclusively (no one holds it),
    then turns that lock into a shared one. Exclusive locks on holders files are only ever tried under
    the mutex, so no one can slip in while the lock changes kind.
    """
    if not private:
        descriptor = _lock(_holders(directory, 0), fcntl.LOCK_SH)
        assert descriptor is not None
        return descriptor, directory / "0"
    for number in itertools.count():
        descriptor = _lock(_holders(directory, number), fcntl.LOCK_EX | fcntl.LOCK_NB)
        if descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH)
            except BaseException:
                os.close(descriptor)
                raise
            return descriptor, directory / str(number)
    raise AssertionError("unreachable")


def _create(instance: Path, uid: int, gid: int, mode: int, seed: Path | None) -> None:
    """Make the instance in a temp directory and rename it into place, so it appears complete or not at all."""
    if seed is not None and not seed.is_dir():
        raise PybuildError(f"cannot seed cache mount from {seed}: it is not a directory",
                           hint="a cache mount's from= and source= must name a directory")
    temporary = Path(tempfile.mkdtemp(prefix=f"new-{os.getpid()}-", dir=instance.parent))
    try:
        if seed is not None:
            _copy_tree(seed, temporary)
        try:
            os.chown(temporary, uid, gid)
        except PermissionError:
            raise PybuildError(f"cannot make the cache mount {instance} owned by {uid}:{gid}: permission denied",
                               hint="only root, or the build's user namespace, can give files to other users") from None
        os.chmod(temporary, mode & 0o7777)  # after chown, which may clear set-id bits
        os.rename(temporary, instance)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _copy_tree(source: Path, destination: Path) -> None:
    """Copy the entries of ``source`` into the existing ``destination``, keeping types, owners, modes and times.

    Directories get their mode and times once filled (the deepest first), so a read-only one is still
    filled and its time is not that of the copy. A loop rather than recursion: trees can be deep.
    """
    directories: list[tuple[str, os.stat_result]] = []
    pending = [(os.fspath(source), os.fspath(destination))]
    while pending:
        from_directory, to_directory = pending.pop()
        with os.scandir(from_directory) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                target = os.path.join(to_directory, entry.name)
                if stat.S_ISDIR(info.st_mode):
                    os.mkdir(target, 0o700)
                    pending.append((entry.path, target))
                    directories.append((target, info))
                elif stat.S_ISREG(info.st_mode):
                    shutil.copyfile(entry.path, target, follow_symlinks=False)
                elif stat.S_ISLNK(info.st_mode):
                    os.symlink(os.readlink(entry.path), target)
                else:
                    os.mknod(target, info.st_mode, info.st_rdev)
                os.lchown(target, info.st_uid, info.st_gid)
                if not stat.S_ISDIR(info.st_mode):
                    _finish(target, info)
    for target, info in reversed(directories):  # a directory is listed after its parent
        _finish(target, info)


def _finish(target: str, info: os.stat_result) -> None:
    """Give a copied entry its source's mode (after its owner: chown clears set-id bits) and times."""
    if not stat.S_ISLNK(info.st_mode):
        os.chmod(target, stat.S_IMODE(info.st_mode))
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)


def _sweep(directory: Path) -> None:
    """Delete the temp entries (``new-<pid>-*``, ``remove-<pid>-*``) of processes that are gone."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match and not process_alive(int(match.group(1))):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending; no need for /proc)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's
        return True
    return True


def _instance_numbers(directory: Path) -> list[int]:
    """The instances an id has, by their directories or their holders files (a claim whose creation failed)."""
    with os.scandir(directory) as entries:
        return sorted({int(match.group(1)) for entry in entries if (match := _INSTANCE.fullmatch(entry.name))})


def _remove_instance(directory: Path, number: int, cutoff: float) -> int | None:
    """Delete an instance no one holds and last used before ``cutoff``; its size, or None if it stays.

    Under the id's mutex, so no one can start holding it meanwhile.
    """
    holders = _holders(directory, number)
    descriptor = _lock(holders, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if descriptor is None:
        return None
    try:
        if os.fstat(descriptor).st_mtime >= cutoff:
            return None
        instance = directory / str(number)
        if not instance.is_dir():  # a claim whose creation failed: only its holders file is left
            os.unlink(holders)
            return None
        size = tree_usage(instance).freed
        doomed = directory / f"remove-{os.getpid()}-{secrets.token_hex(8)}"
        os.rename(instance, doomed)
        os.unlink(holders)
        shutil.rmtree(doomed)
        return size
    finally:
        os.close(descriptor)


def _remove_id_directory(directory: Path, root: Path) -> None:
    """Delete an id's directory left without instances, unless a ``locked`` user is between its locks."""
    descriptor = _lock(directory / _LOCKED, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if descriptor is None:
        return
    try:
        doomed = root / f"remove-{os.getpid()}-{secrets.token_hex(8)}"
        os.rename(directory, doomed)
        shutil.rmtree(doomed)
    finally:
        os.close(descriptor)


def _last_used(directory: Path) -> float:
    """When an instance of the id was last taken or given back: its holders files are touched then."""
    with os.scandir(directory) as entries:
        return max((entry.stat().st_mtime for entry in entries if entry.name.endswith(".holders")), default=0.0)
