"""The step cache's index: from a step's key to the layer it made, and from a layer to its blobs.

``ROOT/steps/<key>``: which layer (diff_id) a step made, or that it changed nothing.
``ROOT/layers/<diff_id>``: the blob of that layer per media type, so a layer made again by another
step, or asked for in another compression, reuses what is stored.

Each record is a small JSON file that appears whole or not at all (written beside it, then renamed),
so concurrent builds and a SIGKILL at any point leave only complete records. A record that cannot be
read is treated as absent and removed: the cache may lose an entry, never serve a wrong one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parser.dataclass import dataclass

_HEX = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
TEMP_PREFIX = ".record-"


@dataclass
class StepResult:
    """What a cached step made: the diff_id of its layer, or None when it changed no file."""

    diff_id: str | None


@dataclass
class LayerBlob:
    """A stored blob of a layer in one media type."""

    digest: str
    size: int
    media_type: str


_NAMES = itertools.count()


def write_record(path: Path, value: Any) -> None:
    """Put ``value`` at ``path`` as JSON, atomically; creates the directory."""
    write_atomically(path, json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def write_atomically(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` whole or not at all (written beside it, then renamed); creates the directory.

    Every file the cache writes goes through here or ``copy_atomically``. The temp file is named by the
    process, the thread and a counter (unique without mkstemp's tries); its name carries the pid, so a
    sweep (``cache.gc.sweep_temp_files``) can tell a killed writer's leftover.
    """
    with _beside(path) as handle:
        os.write(handle, data)


def copy_atomically(source: Path, path: Path) -> None:
    """Copy the file ``source`` to ``path``, whole or not at all."""
    with _beside(path) as handle, open(source, "rb") as reader:
        while chunk := reader.read(1 << 20):
            os.write(handle, chunk)


@contextlib.contextmanager
def _beside(path: Path) -> Iterator[int]:
    name = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{next(_NAMES)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        handle = os.open(name, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(name, flags, 0o644)
    try:
        try:
            yield handle
        finally:
            os.close(handle)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def read_record(path: Path) -> Any:
    """The JSON at ``path``; None when absent or unreadable (an unreadable one is removed)."""
    try:
        with open(path, "rb") as file:
            return json.loads(file.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None


class StepIndex:
    """Keys of steps to their results, under ``ROOT/steps``; safe to share between processes."""

    def __init__(self, root: Path) -> None:
        self.root = root / "steps"

    def _path(self, key: str) -> Path:
        if not _HEX.fullmatch(key):
            raise ValueError(f"step key {key!r} is not a sha256 hex digest")
        return self.root / key[:2] / key

    def get(self, key: str) -> StepResult | None:
        value = self.read(key)
        if value is None:
            return None
        diff_id = value.get("diff_id", "") if isinstance(value, dict) else ""
        if diff_id is not None and not (isinstance(diff_id, str) and _DIGEST.fullmatch(diff_id)):
            self.forget(key)
            return None
        return StepResult(diff_id)

    def read(self, key: str) -> Any:
        return read_record(self._path(key))

    def put(self, key: str, result: StepResult) -> None:
        write_record(self._path(key), {"diff_id": result.diff_id})

    def touch(self, key: str) -> None:
        """Mark a record used now: eviction goes by last use (the record file's mtime)."""
        with contextlib.suppress(OSError):
            os.utime(self._path(key))

    def last_used(self, key: str) -> float:
        try:
            return self._path(key).stat().st_mtime
        except OSError:
            return 0.0

    def forget(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def stored_keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [entry.name for directory in self.root.iterdir() if directory.is_dir()
                for entry in directory.iterdir() if _HEX.fullmatch(entry.name)]

    def remove_all(self) -> int:
        keys = self.stored_keys()
        for key in keys:
            self.forget(key)
        return len(keys)


class LayerBlobs:
    """For each layer (by diff_id), the blobs stored for it per media type, under ``ROOT/layers``."""

    def __init__(self, root: Path) -> None:
        self.root = root / "layers"

    def _path(self, diff_id: str) -> Path:
        if not _DIGEST.fullmatch(diff_id):
            raise ValueError(f"layer diff_id {diff_id!r} is not a sha256 digest")
        return self.root / diff_id.removeprefix("sha256:")

    def get(self, diff_id: str, media_type: str) -> LayerBlob | None:
        value = read_record(self._path(diff_id))
        entry = value.get(media_type) if isinstance(value, dict) else None
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and _DIGEST.fullmatch(entry[0]) and isinstance(entry[1], int)):
            return None
        return LayerBlob(entry[0], entry[1], media_type)

    def put(self, diff_id: str, blob: LayerBlob) -> None:
        path = self._path(diff_id)
        value = read_record(path)
        value = value if isinstance(value, dict) else {}
        if value.get(blob.media_type) == [blob.digest, blob.size]:
            return
        value[blob.media_type] = [blob.digest, blob.size]
        write_record(path, value)

    def all_of(self, diff_id: str) -> list[LayerBlob]:
        value = read_record(self._path(diff_id))
        if not isinstance(value, dict):
            return []
        return [blob for media_type in value if (blob := self.get(diff_id, media_type)) is not None]

    def digests(self) -> set[str]:
        """Every blob digest a record names (what garbage collection must keep while the record lives)."""
        found: set[str] = set()
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            value = read_record(entry) if _HEX.fullmatch(entry.name) else None
            if isinstance(value, dict):
                found.update(item[0] for item in value.values() if isinstance(item, list) and item)
        return found
