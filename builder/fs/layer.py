"""Turn a step's upper directory into a deterministic, compressed OCI layer blob, streamed to a file.

The upper dir may mark deletions either way a snapshot does: overlayfs-native (0/0 character
devices, the ``*.overlay.opaque=y`` xattr) or OCI-native (empty mode-0 files ``.wh.NAME`` and
``.wh..wh..opq``, the copy snapshotter's form). Both give the same tar bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import queue
import stat
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal

import zstandard

from builder.fs.untar import (
    OPAQUE_MARKER,
    OVERLAY_XATTR_PREFIXES,
    WHITEOUT_PREFIX,
    XATTR_PAX_PREFIX,
    is_overlay_whiteout,
)
from builder.oci.image import MEDIA_LAYER_GZIP, MEDIA_LAYER_ZSTD, Layer
from parser.dataclass import dataclass
from parser.errors import PybuildError

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
ZSTD_LEVEL = 3
# Smaller than zstd's default (8 MiB at level 3) to keep memory near 40 MB, for a 0.5% larger blob.
ZSTD_JOB_SIZE = 4 << 20
GZIP_LEVEL = 6
_BUFFER = 1 << 20
_BUFFERS = 4  # in flight between the tar and the threads that hash and compress it
_BLOCK = tarfile.BLOCKSIZE

LowerStat = Callable[[str], "os.stat_result | None"]


@dataclass
class _Entry:
    """One tar member to write: ``path`` is its source in the upper dir (None for a whiteout marker)."""

    name: str
    path: str | None
    st: os.stat_result | None


def is_oci_whiteout_file(name: str, st: os.stat_result) -> bool:
    """Whether a ``.wh.``-named entry is a marker the copy snapshotter wrote (an empty mode-0 file)."""
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_mode & 0o7777 == 0


def is_opaque_dir(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _sort_key(entry: os.DirEntry[str]) -> bytes:
    name = entry.name
    if is_overlay_whiteout(entry.stat(follow_symlinks=False)):
        name = WHITEOUT_PREFIX + name
    return os.fsencode(name)


class _Collector:
    """Walks the upper dir into the ordered member list, deciding which directories are needed."""

    def __init__(self, lower_stat: LowerStat | None) -> None:
        self.lower_stat = lower_stat

    def children(self, directory: str, prefix: str) -> tuple[list[_Entry], bool]:
        """The members below ``directory`` (tar names under ``prefix``) and whether it is opaque."""
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=_sort_key)
        members: list[_Entry] = []
        opaque = False
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            name = prefix + entry.name
            if is_overlay_whiteout(st):
                members.append(_Entry(prefix + WHITEOUT_PREFIX + entry.name, None, None))
            elif entry.name.startswith(WHITEOUT_PREFIX):
                if not is_oci_whiteout_file(entry.name, st):
                    raise PybuildError(f"cannot store '/{name}' in a layer: names starting with '{WHITEOUT_PREFIX}' "
                                       "mark deletions in OCI layers")
                if entry.name == OPAQUE_MARKER:
                    opaque = True
                else:
                    members.append(_Entry(name, None, None))
            elif stat.S_ISDIR(st.st_mode):
                members.extend(self.directory(entry.path, name, st))
            else:
                members.append(_Entry(name, entry.path, st))
        return members, opaque or is_opaque_dir(directory)

    def directory(self, path: str, name: str, st: os.stat_result) -> list[_Entry]:
        below, opaque = self.children(path, name + "/")
        if not below and not opaque and self._unchanged_in_lower(name, st):
            return []
        head = [_Entry(name, path, st)]
        if opaque:
            head.append(_Entry(f"{name}/{OPAQUE_MARKER}", None, None))
        return head + below

    def _unchanged_in_lower(self, name: str, st: os.stat_result) -> bool:
        """A directory only copied up (say, a mountpoint created and removed again) is no change."""
        if self.lower_stat is None:
            return False
        lower = self.lower_stat(name)
        return (lower is not None and stat.S_ISDIR(lower.st_mode)
                and (lower.st_mode, lower.st_uid, lower.st_gid) == (st.st_mode, st.st_uid, st.st_gid))


def zstd_parameters(threads: int) -> zstandard.ZstdCompressionParameters:
    """Multi-threaded zstd: its output depends on the job size, never on ``threads`` (>= 1), so any
    machine writes the same blob."""
    return zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, threads=threads, job_size=ZSTD_JOB_SIZE)


class _HashingWriter:
    """Counts and hashes the compressed bytes on their way to the blob file."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


class _TarStream:
    """Tar bytes -> sha256 (diff_id) and compressor, through a few reusable buffers; ``out`` None: only hashed.

    The caller's thread makes the tar (headers, file reads). One thread of the stream's own hashes each
    filled buffer; another feeds it to the compressor, whose output is hashed on its way to ``out``. A
    buffer is reused once both have released it. The two hashes cost as much CPU as the tar itself, so
    on two cores they must not wait for each other behind the compressor.
    """

    def __init__(self, out: BinaryIO | None, compression: Literal["zstd", "gzip"]) -> None:
        self.blob = _HashingWriter(out) if out is not None else None
        self.sha256 = hashlib.sha256()
        if compression not in ("zstd", "gzip"):
            raise PybuildError(f"unsupported layer compression {compression!r} (use zstd or gzip)")
        self.media_type = MEDIA_LAYER_ZSTD if compression == "zstd" else MEDIA_LAYER_GZIP
        self.compressor: zstandard.ZstdCompressionWriter | gzip.GzipFile | None
        if self.blob is None:
            self.compressor = None
        elif compression == "zstd":
            compressor = zstandard.ZstdCompressor(compression_params=zstd_parameters(threads=-1))
            self.compressor = compressor.stream_writer(self.blob, closefd=False)
        else:
            self.compressor = gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL,
                                            fileobj=self.blob, mtime=0)
        self.spare = [bytearray(_BUFFER) for _ in range(_BUFFERS - 1)]
        self.error: BaseException | None = None
        self.buffer = bytearray(_BUFFER)
        self.view = memoryview(self.buffer)
        self.used = 0
        consumers = [("layer-hash", self.sha256.update)]
        if self.compressor is not None:
            consumers.append(("layer-compress", self.compressor.write))
        self.lanes: list[tuple[queue.SimpleQueue[tuple[bytearray, int] | None], queue.SimpleQueue[bytearray]]] = []
        self.workers = []
        for name, consume in consumers:
            filled: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
            released: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
            self.lanes.append((filled, released))
            worker = threading.Thread(target=self._consume, args=(consume, filled, released), name=name, daemon=True)
            self.workers.append(worker)
            worker.start()

    def _consume(self, consume: Callable[[memoryview], object], filled: queue.SimpleQueue[tuple[bytearray, int] | None],
                 released: queue.SimpleQueue[bytearray]) -> None:
        """Pass the filled buffers in order to ``consume``; after an error only release them."""
        while (item := filled.get()) is not None:
            buffer, used = item
            if self.error is None:
                try:
                    consume(memoryview(buffer)[:used])
                except BaseException as error:  # raised again in the caller's thread
                    self.error = error
            released.put(buffer)

    def _next_buffer(self) -> bytearray:
        """A buffer no thread reads any more: a spare one, or the oldest once every lane has released it."""
        if self.spare:
            return self.spare.pop()
        buffers = [released.get() for _, released in self.lanes]  # the lanes release in the same order
        return buffers[0]

    def flush(self) -> None:
        if self.used:
            for filled, _ in self.lanes:
                filled.put((self.buffer, self.used))
            self.buffer = self._next_buffer()
            self.view = memoryview(self.buffer)
            self.used = 0
        if self.error is not None:
            raise self.error

    def write(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            if self.used == _BUFFER:
                self.flush()
            count = min(_BUFFER - self.used, len(data) - offset)
            self.view[self.used: self.used + count] = data[offset: offset + count]
            self.used += count
            offset += count

    def write_file(self, path: str, size: int) -> None:
        """Copy exactly ``size`` bytes of a file and the padding to a whole tar block."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            remaining = size
            while remaining:
                if self.used == _BUFFER:
                    self.flush()
                count = os.readv(fd, [self.view[self.used: self.used + min(_BUFFER - self.used, remaining)]])
                if count == 0:
                    raise PybuildError(f"'{path}' shrank while its layer was being written")
                self.used += count
                remaining -= count
        finally:
            os.close(fd)
        if size % _BLOCK:
            self.write(bytes(_BLOCK - size % _BLOCK))

    def stop(self) -> None:
        """Let the stream's threads end (after what they were given); safe to call more than once."""
        for (filled, _), worker in zip(self.lanes, self.workers, strict=True):
            if worker.is_alive():
                filled.put(None)
                worker.join()

    def finish(self) -> Layer:
        self.write(bytes(2 * _BLOCK))
        self.flush()
        self.stop()
        if self.error is not None:
            raise self.error
        diff_id = "sha256:" + self.sha256.hexdigest()
        if self.compressor is None or self.blob is None:
            return Layer(diff_id=diff_id, digest="", size=0, media_type=self.media_type)
        self.compressor.close()
        self.blob.flush()
        return Layer(diff_id=diff_id, digest="sha256:" + self.blob.sha256.hexdigest(), size=self.blob.size,
                     media_type=self.media_type)


def _xattr_headers(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}  # a filesystem without xattrs has none to keep
    headers = {}
    for name in sorted(names):
        if not name.startswith(OVERLAY_XATTR_PREFIXES):
            value = os.getxattr(path, name, follow_symlinks=False)
            headers[XATTR_PAX_PREFIX + name] = value.decode("utf-8", "surrogateescape")
    return headers


def _header(entry: _Entry, epoch: int, links: dict[tuple[int, int], str]) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.uname = info.gname = ""
    if entry.st is None or entry.path is None:  # a whiteout: an empty file, owned by root, mode 0
        info.mode = 0
        info.mtime = epoch
        return info
    st = entry.st
    info.mode = st.st_mode & 0o7777
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = min(st.st_mtime_ns // 1_000_000_000, epoch)
    kind = stat.S_IFMT(st.st_mode)
    if kind != stat.S_IFDIR and st.st_nlink > 1:
        first = links.setdefault((st.st_dev, st.st_ino), entry.name)
        if first != entry.name:
            info.type, info.linkname = tarfile.LNKTYPE, first
            return info
    info.pax_headers = _xattr_headers(entry.path)
    if kind == stat.S_IFREG:
        info.size = st.st_size
    elif kind == stat.S_IFDIR:
        info.type = tarfile.DIRTYPE
    elif kind == stat.S_IFLNK:
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(entry.path)
    elif kind == stat.S_IFIFO:
        info.type = tarfile.FIFOTYPE
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        info.type = tarfile.CHRTYPE if kind == stat.S_IFCHR else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        raise PybuildError(f"cannot store '/{entry.name}' in a layer: unsupported file type")
    return info


def _ustar_header(info: tarfile.TarInfo) -> bytes | None:
    """The header ``tarfile`` writes for a member that needs no PAX record, built without its per-field work.

    Most members of a layer are plain ASCII paths with small numbers; for them this gives the very same
    512 bytes about five times faster. Anything else (xattrs, long or non-ASCII names, big numbers) is
    None, and ``tarfile`` writes it.
    """
    name = info.name + "/" if info.type == tarfile.DIRTYPE and not info.name.endswith("/") else info.name
    if (info.pax_headers or len(name) > 100 or len(info.linkname) > 100 or not name.isascii()
            or not info.linkname.isascii() or not isinstance(info.mtime, int)
            or not (0 <= info.uid < 8**7 and 0 <= info.gid < 8**7 and 0 <= info.devmajor < 8**7
                    and 0 <= info.devminor < 8**7 and 0 <= info.size < 8**11 and 0 <= info.mtime < 8**11)):
        return None
    header = b"".join((
        name.encode().ljust(100, b"\0"), b"%07o\0" % (info.mode & 0o7777), b"%07o\0" % info.uid,
        b"%07o\0" % info.gid, b"%011o\0" % info.size, b"%011o\0" % info.mtime, b" " * 8, info.type,
        info.linkname.encode().ljust(100, b"\0"), tarfile.POSIX_MAGIC, b"\0" * 64,
        # tarfile leaves the device fields empty for members that are no devices
        b"%07o\0%07o\0" % (info.devmajor, info.devminor) if info.ischr() or info.isblk() else b"\0" * 16,
    )).ljust(_BLOCK, b"\0")
    # The checksum counts its own field as eight spaces, and is written as six octal digits, NUL, space.
    return header[:148] + b"%06o\0" % sum(header) + header[155:]


def write_layer(upper: Path, out: BinaryIO | None, *, compression: Literal["zstd", "gzip"],
                source_date_epoch: int, lower_stat: LowerStat | None = None) -> Layer | None:
    """Write the changes in ``upper`` as a layer blob to ``out``; None (and nothing written) when there are none.

    Members are sorted by path components, with an opaque dir's ``.wh..wh..opq`` right after the dir;
    mtimes are clamped to ``source_date_epoch``; owners are numeric only; overlayfs xattrs are dropped.
    The clamp is applied to ``upper`` too, as the snapshot it becomes must hold what the tar holds: a step on it
    then sees the very times it would see on the same layer pulled, so its own layer cannot depend on whether
    the layer below was built here or came from a registry.
    ``lower_stat(path)`` looks a root-relative path up in the layers below, so directories that are
    only copied up, with nothing changed in or below them, are left out.

    With ``out`` None the tar is only hashed: the layer's diff_id, with an empty digest and size 0 (a
    pending layer), at a fraction of the cost; writing its blob later gives the same diff_id.
    """
    entries, _ = _Collector(lower_stat).children(os.fspath(upper), "")
    if not entries:
        return None
    stream = _TarStream(out, compression)
    try:
        links: dict[tuple[int, int], str] = {}
        limit = source_date_epoch * 1_000_000_000
        for entry in entries:
            info = _header(entry, source_date_epoch, links)
            if entry.st is not None and entry.path is not None and entry.st.st_mtime_ns > limit:
                os.utime(entry.path, ns=(entry.st.st_atime_ns, limit), follow_symlinks=False)
            stream.write(_ustar_header(info) or info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            if info.type == tarfile.REGTYPE and info.size:
                assert entry.path is not None
                stream.write_file(entry.path, info.size)
        return stream.finish()
    finally:
        stream.stop()
