"""Stream-extract (possibly compressed) tar archives into a directory, never writing outside it.

Hostile archives are handled per case:

* a member name with a ``..`` component is refused (no honest layer has one): ``PybuildError``;
* absolute member and hardlink names are confined: ``/etc/x`` means ``DEST/etc/x``, as container
  runtimes read them;
* symlinks met while resolving a member's parent directories (from earlier layers or earlier in the
  same archive) are followed as if ``dest`` were ``/``: ``a -> /etc`` then ``a/passwd`` writes
  ``DEST/etc/passwd``. Every directory is opened with ``O_NOFOLLOW`` relative to its verified parent,
  so no write or link can land outside ``dest``.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import zstandard

from builder.sandbox.namespace import check_mapped
from parser.errors import PybuildError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_PAX_PREFIX = "SCHILY.xattr."
# Overlayfs keeps its own bookkeeping in these namespaces; they are never image content.
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_CHUNK = 1 << 20
_MAX_SYMLINKS = 40
# Long names and pax headers are read whole into memory; real ones are a few KiB (xattrs at most 64 KiB each).
MAX_HEADER_BYTES = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Whiteouts = Literal["overlay", "apply", "keep"]


class _Prefixed(io.RawIOBase):
    """A stream whose first bytes were already read (to sniff its format), put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class DamagedArchive(PybuildError):
    """A tar stream that cannot be read: damaged compression, a cut-off stream, an impossible header."""


class BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended parts (GNU long names, pax records) are refused when too large to be real,
    before tarfile reads them into memory."""

    def _proc_member(self, tarfile):
        if self.type in _EXTENDED_HEADERS and self.size > MAX_HEADER_BYTES:
            raise DamagedArchive(f"member '{self.name}' has a {self.size}-byte extended header, too large to be real")
        return super()._proc_member(tarfile)


_EXTENDED_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)


class _Decompressed(io.RawIOBase):
    """A decompressing stream whose damage (a bad or cut-off gzip or zstd stream) is a PybuildError."""

    def __init__(self, stream: BinaryIO, kind: str) -> None:
        self._stream = stream
        self._kind = kind

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
            raise DamagedArchive(f"the {self._kind} stream is damaged or cut short: {exc}") from None

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _sniff(fileobj: BinaryIO) -> tuple[bytes, BinaryIO]:
    head = b""
    while len(head) < 6:
        more = fileobj.read(6 - len(head))
        if not more:
            break
        head += more
    return head, io.BufferedReader(_Prefixed(head, fileobj), _CHUNK)


def open_layer(fileobj: BinaryIO) -> BinaryIO:
    """The uncompressed tar stream of a layer blob: gzip, zstd or plain, told apart by magic bytes."""
    head, stream = _sniff(fileobj)
    if head.startswith(_GZIP_MAGIC):
        return _Decompressed(gzip.GzipFile(fileobj=stream, mode="rb"), "gzip")
    if head.startswith(_ZSTD_MAGIC):
        # A zstd stream cut at a frame boundary reads as shorter content: the layer's diff_id check catches it.
        return _Decompressed(zstandard.ZstdDecompressor().stream_reader(stream, read_size=_CHUNK,
                                                                          read_across_frames=True), "zstd")
    return stream


def open_archive(fileobj: BinaryIO) -> BinaryIO:
    """Like ``open_layer``, also accepting the bzip2 and xz compressions that ADD unpacks."""
    head, stream = _sniff(fileobj)
    if head.startswith(_BZIP2_MAGIC):
        return bz2.BZ2File(stream)
    if head.startswith(_XZ_MAGIC):
        return lzma.LZMAFile(stream)
    return open_layer(stream)


def member_parts(name: str, label: str) -> tuple[str, ...]:
    """The path components of a member name; absolute names are confined, ``..`` is refused."""
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise PybuildError(f"{label}: member '{name}' escapes the root")
    if "\0" in name:
        raise PybuildError(f"{label}: member {name!r} has a NUL byte in its name")
    return parts


def is_overlay_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


class _Extractor:
    """The state of one extraction: the open destination root, a cached parent dir, deferred dir times."""

    def __init__(self, dest: Path, whiteouts: Whiteouts, owner: tuple[int, int] | None, opaque_xattr: str,
                 label: str) -> None:
        self.root_fd = os.open(dest, _DIR_FLAGS)
        self.whiteouts = whiteouts
        self.owner = owner
        self.opaque_xattr = opaque_xattr
        self.label = label
        # Tar members come grouped by directory, so the last resolved parent is usually the next one.
        self.cached: tuple[tuple[str, ...], int, tuple[str, ...]] | None = None
        # Directory times are set last: creating their children would change them again.
        self.dir_times: dict[tuple[str, ...], int] = {}
        # "apply" mode: what this archive wrote, so an opaque marker spares it.
        self.written: set[tuple[str, ...]] = set()

    def close(self) -> None:
        self._drop_cache()
        os.close(self.root_fd)

    def _drop_cache(self) -> None:
        if self.cached is not None:
            os.close(self.cached[1])
            self.cached = None

    # Resolving paths inside the root

    def _walk(self, parts: tuple[str, ...], *, create: bool, member: str) -> tuple[int, tuple[str, ...]]:
        """Open the directory ``parts`` names, following symlinks as if the root were ``/``.

        Returns a new fd and the real (symlink-free) components of the directory. Missing directories
        are created (0755, root or ``owner``) when ``create`` is set.
        """
        fds = [os.dup(self.root_fd)]
        names: list[str] = []
        pending = list(reversed(parts))
        links = 0
        try:
            while pending:
                name = pending.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if names:
                        os.close(fds.pop())
                        names.pop()
                    continue
                current = fds[-1]
                try:
                    st = os.lstat(name, dir_fd=current)
                except FileNotFoundError:
                    if not create:
                        raise
                    self._make_implicit_dir(name, current)
                    st = os.lstat(name, dir_fd=current)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise PybuildError(f"{self.label}: member '{member}': too many levels of symbolic links")
                    target = os.readlink(name, dir_fd=current)
                    if target.startswith("/"):
                        for fd in fds[1:]:
                            os.close(fd)
                        del fds[1:]
                        names.clear()
                    pending.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise PybuildError(f"{self.label}: member '{member}': '{'/'.join((*names, name))}' is not a "
                                       "directory")
                fds.append(os.open(name, _DIR_FLAGS, dir_fd=current))
                names.append(name)
            return fds.pop(), tuple(names)
        finally:
            for fd in fds:
                os.close(fd)

    def _make_implicit_dir(self, name: str, dir_fd: int) -> None:
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        os.chmod(name, 0o755, dir_fd=dir_fd)  # the umask must not decide the mode
        if self.owner is not None:
            os.chown(name, *self.owner, dir_fd=dir_fd, follow_symlinks=False)

    def _parent(self, parts: tuple[str, ...], member: str) -> tuple[int, tuple[str, ...]]:
        """An fd (owned by the cache, do not close) of the parent of ``parts``, and its real path."""
        parent = parts[:-1]
        if self.cached is None or self.cached[0] != parent:
            fd, real = self._walk(parent, create=True, member=member)
            self._drop_cache()
            self.cached = (parent, fd, real)
        return self.cached[1], self.cached[2]

    @staticmethod
    def _remove(name: str, dir_fd: int, st: os.stat_result) -> None:
        # Only children of the cached parent are ever removed, so its fd stays valid and inside the root.
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    # Members

    def extract(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = member_parts(member.name, self.label)
        if not parts:
            if member.isdir():
                self._set_dir_metadata(self.root_fd, (), member)
                return
            raise PybuildError(f"{self.label}: member '{member.name}' would replace the root directory")
        leaf = parts[-1]
        if self.whiteouts != "keep" and leaf.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, member)
            return
        dir_fd, real_parent = self._parent(parts, member.name)
        real = (*real_parent, leaf)
        if self.whiteouts == "apply":
            self.written.add(real)
        try:
            existing = os.lstat(leaf, dir_fd=dir_fd)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
            if member.islnk() and self._is_link_target(member, existing):
                return
            self._remove(leaf, dir_fd, existing)
            existing = None
        if member.isreg():
            self._write_file(archive, member, leaf, dir_fd)
        elif member.isdir():
            if existing is None:
                os.mkdir(leaf, 0o700, dir_fd=dir_fd)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                self._set_dir_metadata(fd, real, member)
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname, leaf, dir_fd=dir_fd)
            self._set_metadata_at(leaf, dir_fd, member, symlink=True)
        elif member.islnk():
            self._hardlink(member, leaf, dir_fd)
        elif member.isfifo():
            os.mkfifo(leaf, 0o600, dir_fd=dir_fd)
            self._set_metadata_at(leaf, dir_fd, member)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            self._mknod(leaf, dir_fd, kind | 0o600, os.makedev(member.devmajor, member.devminor), member.name)
            self._set_metadata_at(leaf, dir_fd, member)
        else:
            raise PybuildError(f"{self.label}: member '{member.name}' has an unsupported tar type {member.type!r}")

    def _write_file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, leaf: str, dir_fd: int) -> None:
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            source = archive.extractfile(member)
            assert source is not None  # a regular member always has data
            with open(fd, "wb", buffering=0, closefd=False) as out:
                shutil.copyfileobj(source, out, _CHUNK)
            self._set_metadata_fd(fd, member)
        finally:
            os.close(fd)

    def _is_link_target(self, member: tarfile.TarInfo, existing: os.stat_result) -> bool:
        """Whether a hardlink member names a file that already is its target (nothing to do)."""
        target_fd, target_leaf = self._link_target(member)
        try:
            target = os.lstat(target_leaf, dir_fd=target_fd)
        except FileNotFoundError:
            return False
        finally:
            os.close(target_fd)
        return (target.st_dev, target.st_ino) == (existing.st_dev, existing.st_ino)

    def _link_target(self, member: tarfile.TarInfo) -> tuple[int, str]:
        parts = member_parts(member.linkname, self.label)
        if not parts:
            raise PybuildError(f"{self.label}: member '{member.name}' is a hardlink to the root directory")
        fd, _ = self._walk(parts[:-1], create=False, member=member.name)
        return fd, parts[-1]

    def _hardlink(self, member: tarfile.TarInfo, leaf: str, dir_fd: int) -> None:
        try:
            target_fd, target_leaf = self._link_target(member)
        except (FileNotFoundError, NotADirectoryError):
            raise PybuildError(f"{self.label}: member '{member.name}' links to '{member.linkname}', which is not "
                               "in the archive before it") from None
        try:
            target = os.lstat(target_leaf, dir_fd=target_fd)
            if stat.S_ISDIR(target.st_mode):
                raise PybuildError(f"{self.label}: member '{member.name}' is a hardlink to a directory")
            os.link(target_leaf, leaf, src_dir_fd=target_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise PybuildError(f"{self.label}: member '{member.name}' links to '{member.linkname}', which is not "
                               "in the archive before it") from None
        finally:
            os.close(target_fd)

    def _mknod(self, leaf: str, dir_fd: int, mode: int, device: int, name: str) -> None:
        try:
            os.mknod(leaf, mode, device, dir_fd=dir_fd)
        except PermissionError:
            what = "a whiteout (character device 0/0)" if device == 0 and stat.S_ISCHR(mode) else "a device node"
            raise PybuildError(f"{self.label}: member '{name}' needs {what}, which this process may not create",
                               hint="device nodes need root outside a user namespace") from None

    # Whiteouts

    def _whiteout(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        leaf = parts[-1]
        if leaf != OPAQUE_MARKER and leaf.startswith(WHITEOUT_PREFIX * 2):
            return  # aufs bookkeeping (.wh..wh.plnk and friends): not content, and meaningless here
        dir_fd, real_parent = self._parent(parts, member.name)
        if leaf == OPAQUE_MARKER:
            if self.whiteouts == "overlay":
                os.setxattr(dir_fd, self.opaque_xattr, b"y")
            else:
                self._purge_older(dir_fd, real_parent)
            return
        name = leaf[len(WHITEOUT_PREFIX):]
        if not name or name in (".", ".."):
            raise PybuildError(f"{self.label}: member '{member.name}' is not a valid whiteout")
        try:
            existing = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            self._remove(name, dir_fd, existing)
        if self.whiteouts == "overlay":
            self._mknod(name, dir_fd, stat.S_IFCHR, 0, member.name)

    def _purge_older(self, dir_fd: int, real: tuple[str, ...]) -> None:
        """Delete what earlier layers left in a directory this archive marks opaque."""
        for entry in list(_scan(dir_fd)):
            path = (*real, entry.name)
            st = entry.stat(follow_symlinks=False)
            if path not in self.written:
                self._remove(entry.name, dir_fd, st)
            elif stat.S_ISDIR(st.st_mode):
                child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self._purge_older(child, path)
                finally:
                    os.close(child)

    # Metadata

    def _ids(self, member: tarfile.TarInfo) -> tuple[int, int]:
        if self.owner is not None:
            return self.owner
        check_mapped(member.uid, member.gid, f"{self.label}: '{member.name}'")
        return member.uid, member.gid

    def _xattrs(self, member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
        for key, value in member.pax_headers.items():
            if key.startswith(XATTR_PAX_PREFIX):
                name = key[len(XATTR_PAX_PREFIX):]
                # An archive must not steer overlayfs (opaque dirs, redirects) through its bookkeeping xattrs.
                if not name.startswith(OVERLAY_XATTR_PREFIXES):
                    yield name, value.encode("utf-8", "surrogateescape")

    def _set_metadata_fd(self, fd: int, member: tarfile.TarInfo) -> None:
        # chown clears setuid bits and file capabilities, so it comes before chmod and the xattrs.
        os.fchown(fd, *self._ids(member))
        os.fchmod(fd, member.mode & 0o7777)
        for name, value in self._xattrs(member):
            os.setxattr(fd, name, value)
        mtime = _mtime_ns(member)
        os.utime(fd, ns=(mtime, mtime))

    def _set_dir_metadata(self, fd: int, real: tuple[str, ...], member: tarfile.TarInfo) -> None:
        os.fchown(fd, *self._ids(member))
        os.fchmod(fd, member.mode & 0o7777)
        for name, value in self._xattrs(member):
            os.setxattr(fd, name, value)
        self.dir_times[real] = _mtime_ns(member)

    def _set_metadata_at(self, leaf: str, dir_fd: int, member: tarfile.TarInfo, *, symlink: bool = False) -> None:
        """Metadata of something that cannot be opened for writing: a symlink, fifo or device."""
        os.chown(leaf, *self._ids(member), dir_fd=dir_fd, follow_symlinks=False)
        if not symlink:
            os.chmod(leaf, member.mode & 0o7777, dir_fd=dir_fd)
        for name, value in self._xattrs(member):
            os.setxattr(f"/proc/self/fd/{dir_fd}/{leaf}", name, value, follow_symlinks=False)
        mtime = _mtime_ns(member)
        os.utime(leaf, ns=(mtime, mtime), dir_fd=dir_fd, follow_symlinks=False)

    def finish(self) -> None:
        for real, mtime in self.dir_times.items():
            fd = self._open_real(real)
            if fd is None:
                continue  # a later member replaced or removed the directory
            try:
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)

    def _open_real(self, real: tuple[str, ...]) -> int | None:
        """The directory at a symlink-free path, or None when it is no longer a directory there."""
        fd = os.dup(self.root_fd)
        for name in real:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                child = None
            os.close(fd)
            if child is None:
                return None
            fd = child
        return fd


def _scan(dir_fd: int) -> list[os.DirEntry[str]]:
    with os.scandir(dir_fd) as entries:
        return list(entries)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    return int(member.mtime * 1_000_000_000) if isinstance(member.mtime, float) else member.mtime * 1_000_000_000


def extract_tar(stream: BinaryIO, dest: Path, *, whiteouts: Whiteouts, owner: tuple[int, int] | None = None,
                opaque_xattr: str = "trusted.overlay.opaque", label: str = "archive") -> None:
    """Extract an uncompressed tar stream into the existing directory ``dest``.

    ``whiteouts`` says what OCI whiteouts become: "overlay" markers (0/0 character devices and the
    ``opaque_xattr`` on opaque dirs, for snapshots), "apply" (delete what they hide in ``dest``), or
    "keep" (ordinary files, for ADD). ``owner`` replaces every member's uid/gid. ``label`` names the
    archive in errors (e.g. "layer sha256:...").
    """
    extractor = _Extractor(dest, whiteouts, owner, opaque_xattr, label)
    member_name = ""
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=_CHUNK, tarinfo=BoundedTarInfo) as archive:
            for member in archive:
                member_name = member.name
                extractor.extract(archive, member)
            member_name = ""
            extractor.finish()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, lzma.LZMAError) as exc:
        raise PybuildError(f"{label} is not a readable tar archive: {exc}") from None
    except DamagedArchive as exc:
        raise PybuildError(f"{label} is not a readable tar archive: {exc.message}") from None
    except (OSError, ValueError, OverflowError) as exc:
        # ValueError and OverflowError: a NUL in a link target or xattr name, an id or time out of range.
        where = f"member '{member_name}'" if member_name else "finishing"
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PybuildError(f"{label}: cannot extract {where}: {message}") from None
    finally:
        with contextlib.suppress(OSError):
            extractor.close()
