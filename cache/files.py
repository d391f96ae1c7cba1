"""File content digests remembered by stat, so a file whose stat did not change is not read again.

A remembered digest is used only while the file's size, mtime, ctime and inode are all unchanged. As git
does for its index ("racy git"), a file changed within a moment of being hashed may change again without
its stat showing it, so such a digest is not remembered: the next build reads that file again.
"""

from __future__ import annotations

import functools
import hashlib
import marshal
import os
import time
from pathlib import Path

CHUNK = 1 << 20
RACY_NS = 2_000_000_000  # a file changed this recently when hashed is hashed again next time


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def source_stamp(*packages: Path) -> bytes:
    """The source files of ``packages`` (and of packages below them) by name, size and mtime: what a cache of
    results this code computed keys on, so that another version, a reinstall or an edit computes afresh.
    Taken once per process; ``os.scandir`` gives names and types without a call per path."""
    entries: list[tuple[str, int, int]] = []
    for package in packages:
        _stamp_directory(os.fspath(package), entries)
    return repr(entries).encode()


def _stamp_directory(directory: str, entries: list[tuple[str, int, int]]) -> None:
    with os.scandir(directory) as scan:
        found = sorted(scan, key=lambda entry: entry.name)
    for entry in found:
        if entry.is_dir(follow_symlinks=False):
            if entry.name != "__pycache__":
                _stamp_directory(entry.path, entries)
        elif entry.name.endswith((".py", ".lark")):
            st = entry.stat()
            entries.append((entry.path, st.st_size, st.st_mtime_ns))


class FileDigests:
    """Digests by absolute path and stat, loaded from and saved to one file (``ROOT/file-digests``)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "file-digests"
        self.known: dict[str, tuple[int, int, int, int, str]] = {}
        self.fresh: dict[str, tuple[int, int, int, int, str]] = {}
        self.loaded = False

    def _load(self) -> None:
        self.loaded = True
        try:
            with open(self.path, "rb") as file:
                value = marshal.load(file)
        except (OSError, EOFError, ValueError, TypeError):
            return
        if isinstance(value, dict):  # entries of another shape (another version, a damaged file) are dropped
            self.known = {path: entry for path, entry in value.items() if isinstance(path, str)
                          and type(entry) is tuple and len(entry) == 5 and isinstance(entry[4], str)}

    def digest(self, path: str, st: os.stat_result) -> str:
        """The sha256 (hex) of the regular file at ``path`` whose lstat is ``st``."""
        if not self.loaded:
            self._load()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        known = self.known.get(path)
        if known is not None and known[:4] == stamp:
            self.fresh[path] = known
            return known[4]
        value = sha256_file(path)
        if max(st.st_mtime_ns, st.st_ctime_ns) < time.time_ns() - RACY_NS:
            self.fresh[path] = (*stamp, value)
        return value

    def save(self) -> None:
        """Remember the digests used by this build, and the others still known (concurrent builds: last wins)."""
        if not self.fresh or all(self.known.get(path) == entry for path, entry in self.fresh.items()):
            return
        from cache.index import write_atomically

        write_atomically(self.path, marshal.dumps({**self.known, **self.fresh}))
