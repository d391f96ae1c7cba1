"""Content-addressed blob store: ``ROOT/blobs/sha256/<hex>``, written atomically, safe across processes.

A blob only ever appears under its final name complete and fsynced: writers fill a private temp
file in ``ROOT/tmp`` and rename it into place, so a crash leaves at most a stray temp file. Two
processes writing the same content race harmlessly, since both renames install identical bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from parser.errors import PybuildError

CHUNK = 1 << 20
TEMP_PREFIX = ".blob-"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


class CorruptBlobError(PybuildError):
    """A stored blob's content no longer matches its digest."""


def digest_hex(digest: str) -> str:
    """The hex part of a ``sha256:<hex>`` digest; anything else is refused, so digests never become odd paths."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise PybuildError(f"{digest!r} is not a sha256 digest")
    return match.group(1)


class HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._file.write(view)
        self.size += len(view)
        return len(view)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._file.flush()

    def tell(self) -> int:
        return self.size

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class BlobWriter:
    """One blob being written: write to ``file``; ``digest`` and ``size`` are set once it is committed."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = HashingFile(file)
        self.discarded = False
        self.digest = ""
        self.size = 0

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def discard(self) -> None:
        """Drop what was written instead of storing it (the caller found it has nothing to keep)."""
        self.discarded = True


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"

    def path(self, digest: str) -> Path:
        return self.blob_dir / digest_hex(digest)

    def size_of(self, digest: str) -> int:
        """The blob's size in bytes, 0 when it is not stored."""
        try:
            return self.path(digest).stat().st_size
        except OSError:
            return 0

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def digests(self) -> Iterator[str]:
        if not self.blob_dir.is_dir():
            return
        for entry in os.scandir(self.blob_dir):
            if _DIGEST.fullmatch("sha256:" + entry.name):
                yield "sha256:" + entry.name

    def temp_file(self) -> tuple[BinaryIO, Path]:
        """A new private temp file on the store's filesystem, so committing it is a rename."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Named by this process, so a later build can tell a killed build's leftover (see sweep_stale_scratch).
        handle, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp", dir=self.tmp_dir)
        return os.fdopen(handle, "wb"), Path(name)

    @contextlib.contextmanager
    def writer(self, expect: str | None = None) -> Iterator[BlobWriter]:
        """Hash while writing, then commit atomically; with ``expect``, content with another digest is refused."""
        file, temporary = self.temp_file()
        try:
            with file:
                out = BlobWriter(file)
                yield out
                file.flush()
                if not out.discarded:
                    os.fsync(file.fileno())
            if out.discarded:
                return
            digest = out.file.digest
            if expect is not None and digest != expect:
                raise CorruptBlobError(f"blob {expect} has the wrong content (its digest is {digest})",
                                       hint="the source is damaged or was tampered with; nothing was stored")
            self._install(temporary, digest)
            out.digest, out.size = digest, out.file.size
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    def put_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        final = self.path(digest)
        if final.is_file() and final.stat().st_size == len(data):
            os.utime(final)  # wanted again: gc() spares what was just used
            return digest
        with self.writer() as out:
            out.write(data)
        return out.digest

    def put_file(self, path: Path, digest: str) -> None:
        """Move in a fully written file whose digest the caller computed while writing it."""
        with open(path, "rb") as file:
            os.fsync(file.fileno())
        try:
            self._install(Path(path), digest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Another filesystem: copy through a verifying writer instead of renaming.
            with open(path, "rb") as source, self.writer(expect=digest) as out:
                shutil.copyfileobj(source, out.file, CHUNK)
            Path(path).unlink()

    def _install(self, temporary: Path, digest: str) -> None:
        final = self.path(digest)
        if final.is_file():
            # Same content is already there; refreshing its mtime tells gc() it was just wanted again.
            os.utime(final)
            temporary.unlink()
            return
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(temporary, 0o644)
        os.replace(temporary, final)
        directory = os.open(self.blob_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def open(self, digest: str, verify: bool = False) -> BinaryIO:
        if verify:
            self.verify(digest)
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise self.missing_error(digest) from None

    def read_bytes(self, digest: str) -> bytes:
        """A small blob (a manifest, a config), checked against its digest since its JSON is trusted."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise self.missing_error(digest) from None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise self.corrupt_error(digest)
        return data

    def verify(self, digest: str) -> None:
        hasher = hashlib.sha256()
        with self.open(digest) as file:
            while chunk := file.read(CHUNK):
                hasher.update(chunk)
        if "sha256:" + hasher.hexdigest() != digest:
            raise self.corrupt_error(digest)

    def remove(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def missing_error(self, digest: str) -> PybuildError:
        return PybuildError(f"blob {digest} is missing from {self.blob_dir}",
                            hint="rebuild or reload the image that needs it")

    def corrupt_error(self, digest: str) -> CorruptBlobError:
        return CorruptBlobError(f"blob {digest} is corrupt: its content does not match its digest",
                                hint=f"remove {self.path(digest)} and rebuild or reload the image that uses it")
