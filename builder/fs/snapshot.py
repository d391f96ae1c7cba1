"""The snapshot store (every layer kept unpacked) and the writable root a build step works in.

A step's root is an overlayfs mount of the parent's snapshots with a fresh upper dir. Where
overlayfs cannot be mounted, the copy snapshotter stands in: it copies the snapshots into a plain
directory and afterwards diffs it back into an upper dir, so what follows cannot tell the difference.
The two keep snapshots in different whiteout forms (overlay markers, OCI ``.wh.`` files), so the
store keeps them apart in a subdirectory per form.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Literal

from builder.fs.diff import LowerView, diff_tree, materialize
from builder.fs.untar import extract_tar, open_layer
from builder.sandbox.linux import MNT_DETACH, mark_top_directory, mount, umount
from parser.dataclass import dataclass
from parser.errors import PybuildError

SNAPSHOTTER_ENV = "PYBUILD_SNAPSHOTTER"
# A mount's option string must fit in one page; the kernel stops at 500 layers anyway.
_PAGE = 4096
# Overlay mounts are volatile (Linux 5.10 and later): unmounting one otherwise syncs the whole filesystem
# its upper dir lives on, every dirty page of every process, so a step's end waited on all the machine's
# writes. What a step made goes on as a layer blob (written and fsynced) and a snapshot, which is a cache
# as an unpacked layer is; a RUN's fsync calls cost nothing either, as in Buildah's build containers.
_volatile = True  # cleared when this kernel refuses the option
_DIFF_ID = re.compile(r"sha256:[0-9a-f]{64}")
# Where each kind of snapshotter keeps its snapshots (Snapshotter.store_name): one store may hold several.
_STORE_NAMES = ("overlay", "overlay-userxattr", "copy")
_CHUNK = 1 << 20
_PROBE_MEMO = ".overlay-mounts"


@dataclass
class Snapshotter:
    """How step roots are made here: ``kind`` overlay or copy, and the xattr marking opaque dirs."""

    kind: Literal["overlay", "copy"]
    userxattr: bool = False  # in a user namespace overlayfs keeps its xattrs in user.*, not trusted.*

    @property
    def opaque_xattr(self) -> str:
        return "user.overlay.opaque" if self.userxattr else "trusted.overlay.opaque"

    @property
    def store_name(self) -> str:
        if self.kind == "copy":
            return "copy"
        return "overlay-userxattr" if self.userxattr else "overlay"


@dataclass
class StepRoot:
    """A mounted step root: write in ``merged``; after the mount is gone ``upper`` holds the changes."""

    merged: Path
    upper: Path
    lower_stat: Callable[[str], os.stat_result | None]


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace (its uid map is not the whole identity map)."""
    try:
        uid_map = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return uid_map != ["0", "0", "4294967295"]


def _overlay_options(lowers: Sequence[int], upper: int, work: int, userxattr: bool, volatile: bool) -> str:
    # Paths through /proc/self/fd keep each layer to ~18 bytes of the one-page option string, and
    # need no escaping of ':' or ','. Renamed dirs must be copied (redirect_dir=off) and files copied
    # whole (metacopy=off), or the upper dir would not hold the complete change; userxattr implies
    # both (and refuses them spelled out).
    lowerdir = ":".join(f"/proc/self/fd/{fd}" for fd in lowers)
    options = f"lowerdir={lowerdir},upperdir=/proc/self/fd/{upper},workdir=/proc/self/fd/{work},index=off"
    options += ",userxattr" if userxattr else ",redirect_dir=off,metacopy=off"
    return options + (",volatile" if volatile else "")


@contextlib.contextmanager
def _overlay(lowers: Sequence[Path], upper: Path, work: Path, merged: Path, userxattr: bool) -> Iterator[None]:
    """Overlayfs of ``lowers`` (bottom-up) and ``upper`` mounted on ``merged``, unmounted on exit."""
    global _volatile
    fds: list[int] = []
    try:
        for path in (*reversed(lowers), upper, work):
            fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        while True:
            volatile = _volatile
            options = _overlay_options(fds[:-2], fds[-2], fds[-1], userxattr, volatile)
            if len(options) >= _PAGE:
                raise PybuildError(f"an image with {len(lowers)} layers is too deep to mount here")
            try:
                mount("overlay", merged, "overlay", 0, options)
                break
            except OSError as exc:
                if volatile and exc.errno == errno.EINVAL:  # a kernel before 5.10: mount as it knows how
                    _volatile = False
                    continue
                raise PybuildError(f"cannot mount overlayfs on {merged}: {exc.strerror}",
                                   hint=f"set {SNAPSHOTTER_ENV}=copy to copy layers instead") from None
    finally:
        for fd in fds:
            os.close(fd)
    try:
        yield
    finally:
        try:
            umount(merged)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            umount(merged, MNT_DETACH)  # something still uses it; it goes once that lets go


_detected: Snapshotter | None = None
_detect_lock = threading.Lock()


def snapshotter(probe_dir: Path) -> Snapshotter:
    """The snapshotter for this process: from $PYBUILD_SNAPSHOTTER, else by trying an overlay mount once."""
    global _detected
    with _detect_lock:
        if _detected is None:
            _detected = _choose(probe_dir)
        return _detected


def _choose(probe_dir: Path) -> Snapshotter:
    from builder.sandbox.namespace import entered

    userxattr = in_user_namespace()
    choice = os.environ.get(SNAPSHOTTER_ENV, "")
    isolation = entered()
    if isolation is not None and not isolation.may_mount:
        if choice == "overlay":
            raise PybuildError(f"{SNAPSHOTTER_ENV}=overlay cannot be had with {isolation.isolation} isolation, "
                               "which mounts nothing")
        return Snapshotter("copy")
    if choice == "copy":
        return Snapshotter("copy")
    if choice == "overlay":
        return Snapshotter("overlay", userxattr)
    if choice:
        raise PybuildError(f"{SNAPSHOTTER_ENV}={choice} is not a snapshotter", hint="use overlay or copy")
    overlay = Snapshotter("overlay", userxattr)
    # A probe that mounted is remembered, per kernel and kind of namespace: probing costs a build ~3 ms.
    memo = probe_dir / _PROBE_MEMO
    works = f"{overlay.store_name} {os.uname().release}\n"
    with contextlib.suppress(OSError):
        if memo.read_text() == works:
            return overlay
    probe_dir.mkdir(parents=True, exist_ok=True)
    probe = Path(tempfile.mkdtemp(dir=probe_dir, prefix=".probe-"))
    try:
        for name in ("lower", "upper", "work", "merged"):
            (probe / name).mkdir()
        with _overlay([probe / "lower"], probe / "upper", probe / "work", probe / "merged", userxattr):
            pass
    except PybuildError:
        return Snapshotter("copy")
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    temporary = probe_dir / f"{_PROBE_MEMO}.{os.getpid()}"
    with contextlib.suppress(OSError):  # renamed into place, so a concurrent build never reads half a memo
        temporary.write_text(works)
        os.replace(temporary, memo)
    return overlay


def fit_root(upper: Path, lowers: Sequence[Path]) -> None:
    """Give a new layer dir the image root's mode and owner, which the root dir shows (and the next step's root
    takes from it): the top lower's, 0755 over nothing; never what the builder's umask made."""
    if lowers:
        top = os.lstat(lowers[-1])
        os.chown(upper, top.st_uid, top.st_gid)
        os.chmod(upper, top.st_mode & 0o7777)
    else:
        os.chmod(upper, 0o755)


@contextlib.contextmanager
def mounted_root(lowers: Sequence[Path], scratch: Path) -> Iterator[StepRoot]:
    """A writable root over ``lowers`` (snapshot dirs, bottom-up), its pieces kept in the empty dir ``scratch``.

    On exit (also on error) the root is taken down; after a normal exit ``upper`` holds the changes
    in the snapshot form, ready for ``write_layer`` and ``Snapshots.adopt``. ``scratch`` must be on
    the snapshot store's filesystem for ``adopt`` to rename ``upper`` in.
    """
    mode = snapshotter(scratch)
    merged, upper = scratch / "merged", scratch / "upper"
    merged.mkdir()
    upper.mkdir()
    fit_root(upper, lowers)  # in overlay mode the root dir shows it; in either, the next step's root comes from it
    root = StepRoot(merged=merged, upper=upper, lower_stat=LowerView(lowers).stat)
    if mode.kind == "copy":
        originals = materialize(lowers, merged)
        try:
            yield root
            diff_tree(merged, lowers, upper, originals)
        finally:
            shutil.rmtree(merged)
        return
    work = scratch / "work"
    work.mkdir()
    bottom = list(lowers)
    if not bottom:
        bottom = [scratch / "empty"]
        bottom[0].mkdir()
    try:
        with _overlay(bottom, upper, work, merged, mode.userxattr):
            yield root
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _HashingReader:
    """Hashes the uncompressed tar as extraction reads it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        """Read what tar left unread (padding after the end marker): the diff_id covers it too."""
        while self.read(_CHUNK):
            pass


class Snapshots:
    """Unpacked layers by diff_id under ``root``; adding one is a rename, so concurrent builders are safe."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self) -> Path:
        """Where this snapshotter's snapshots live (created on first use)."""
        store = self.root / snapshotter(self.root).store_name
        if not store.is_dir():
            store.mkdir(parents=True, exist_ok=True)
            mark_top_directory(store)  # each snapshot is its own tree
        return store

    def unpacking(self) -> Path:
        """Where layers are unpacked before they are renamed into the store: one small dir to sweep."""
        directory = self.root / ".unpacking"
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            mark_top_directory(directory)
        return directory

    def path(self, diff_id: str) -> Path:
        if not _DIFF_ID.fullmatch(diff_id):
            raise PybuildError(f"layer diff_id {diff_id!r} is not a sha256 digest")
        return self.directory() / diff_id.removeprefix("sha256:")

    def has(self, diff_id: str) -> bool:
        return self.path(diff_id).is_dir()

    def unpack(self, diff_id: str, blob: Path | BinaryIO) -> Path:
        """Unpack a layer blob (any compression), checking its content against ``diff_id``."""
        final = self.path(diff_id)
        if final.is_dir():
            return final
        mode = snapshotter(self.root)
        temp = Path(tempfile.mkdtemp(dir=self.unpacking(), prefix=f"unpack-{os.getpid()}-"))
        try:
            os.chmod(temp, 0o755)
            with open(blob, "rb") if isinstance(blob, Path) else contextlib.nullcontext(blob) as raw:
                tar = _HashingReader(open_layer(raw))
                extract_tar(tar, temp, whiteouts="overlay" if mode.kind == "overlay" else "keep",
                            opaque_xattr=mode.opaque_xattr, label=f"layer {diff_id}")
                tar.drain()
            actual = "sha256:" + tar.sha256.hexdigest()
            if actual != diff_id:
                raise PybuildError(f"layer {diff_id} is corrupt: its content hashes to {actual}")
            return self._commit(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    def adopt(self, diff_id: str, upper: Path) -> Path:
        """Move a step's upper dir into the store (if another builder got there first, ours goes)."""
        final = self.path(diff_id)
        if final.is_dir():
            shutil.rmtree(upper)
            return final
        try:
            return self._commit(upper, final)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise PybuildError(f"cannot move {upper} into the snapshot store {self.root}: they are on different "
                                   "filesystems") from None
            raise

    def size(self, diff_id: str) -> int:
        """Bytes the layer's snapshot takes on disk."""
        from cache.usage import tree_usage  # only for the cache's housekeeping

        return tree_usage(self.path(diff_id)).taken

    def remove_unused(self, used: Collection[str]) -> tuple[int, int]:
        """Remove every snapshot, of any snapshotter, whose diff_id is not in ``used``; returns (count, bytes).

        Each is first renamed out of the store, so a crash halfway never leaves a partial tree under a layer's
        name for a later build to mount; the next build's sweep removes what such a crash left.
        """
        from cache.usage import tree_usage

        removed = freed = 0
        stores = [self.root / name for name in _STORE_NAMES if (self.root / name).is_dir()]
        for store in stores:
            for snapshot in sorted(store.iterdir()):
                if not _DIFF_ID.fullmatch("sha256:" + snapshot.name) or "sha256:" + snapshot.name in used:
                    continue
                size = tree_usage(snapshot).freed
                doomed = self.unpacking() / f"remove-{os.getpid()}-{snapshot.name}"
                os.rename(snapshot, doomed)
                shutil.rmtree(doomed)
                removed, freed = removed + 1, freed + size
        return removed, freed

    @staticmethod
    def _commit(source: Path, final: Path) -> Path:
        try:
            os.rename(source, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                raise
            shutil.rmtree(source)  # the same layer, committed by someone else meanwhile
        return final
