"""A rebuild with nothing changed: the previous build's image, found without loading the builder.

After a build, what it read is remembered per Dockerfile and target: the options that can change the
image, the stat of every context entry a step read (and of the directories above them, whose times
change when an entry is added, removed or renamed), the store's index.json and pybuild's own files.
When all of that is as it was, every step would hit and make the same image again, so the command
replays the previous build's progress and prints its result: no parsing, no graph, no keys.

Anything else (another option, a touched file, a new tag elsewhere in the store) takes the full path,
which still hits wherever the step keys allow. So this can cost a full path, never a wrong image.
The records are written only where no input escapes them: no named contexts, no archives as bases,
no outputs but the store, no ADD of a URL, and no entry changed within two seconds of being read.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from parser.dataclass import dataclass

RACY_NS = 2_000_000_000
NOTHING_CHANGED = "nothing this build reads changed since its last build: its image is given again"
_PACKAGES = ("builder", "parser", "cache")


@dataclass
class RebuildOptions:
    """What the command line says that can change the image (outputs that need the builder are refused)."""

    dockerfile: bytes
    dockerfile_path: str
    context: str
    target: str
    build_args: Mapping[str, str]
    network: str
    compression: str
    platform: str
    tags: Sequence[str]

    def fingerprint(self) -> str:
        data = {"dockerfile": hashlib.sha256(self.dockerfile).hexdigest(), "path": self.dockerfile_path,
                "context": self.context, "target": self.target, "args": sorted(self.build_args.items()),
                "network": self.network, "compression": self.compression,
                "platform": self.platform, "tags": sorted(self.tags), "epoch": os.environ.get("SOURCE_DATE_EPOCH"),
                "program": _program_stamp()}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8", "surrogateescape")).hexdigest()


def _program_stamp() -> str:
    """pybuild's own source files: another version, a reinstall or an edit takes the full path."""
    from cache.files import source_stamp

    here = Path(__file__).resolve().parents[1]
    return hashlib.sha256(source_stamp(*(here / package for package in _PACKAGES))).hexdigest()


def _stat(path: str) -> list[int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _record_path(root: Path, identity: str) -> Path:
    return root / "cache" / "rebuilds" / identity


def record(root: Path, identity: str, options: RebuildOptions, entries: Mapping[str, Sequence[int] | None],
           keys: Iterable[str],
           steps: Sequence[tuple[str, str]], result: Mapping[str, Any],
           layers: Sequence[tuple[str, str, int]]) -> None:
    """Remember a successful build for ``fast_rebuild``, unless an entry it read changed too recently to trust
    its stat (then there is nothing to remember, and any earlier record goes). ``layers``: the image's, each
    as its snapshot's path, its blob's digest and size."""
    path = _record_path(root, identity)
    now = time.time_ns()
    stats = {}
    for entry, taken in entries.items():  # ``taken``: the stat the walk saw; else taken now
        stat = _stat(entry) if taken is None else list(taken)
        if stat is not None and max(stat[2], stat[3]) >= now - RACY_NS:
            path.unlink(missing_ok=True)
            return
        stats[entry] = stat
    index = root / "index.json"
    from cache.index import write_atomically

    # marshal, not JSON: a record of thousands of entries is read and written in a fraction of the time
    memo = {"options": options.fingerprint(), "index": _index_stamp(index), "entries": stats,
            "keys": sorted(set(keys)), "steps": [list(step) for step in steps], "result": dict(result),
            "layers": [list(layer) for layer in layers]}
    write_atomically(path, marshal.dumps(memo))


def _layers_in_place(root: Path, layers: Sequence[Sequence]) -> bool:
    """The image's layers as the last build left them: unpacked where it unpacked them, and their blobs at
    their sizes."""
    for snapshot, digest, size in layers:
        if not os.path.isdir(snapshot):
            return False
        try:
            if (root / "blobs" / "sha256" / digest.removeprefix("sha256:")).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _index_stamp(index: Path) -> list:
    try:
        data = index.read_bytes()
    except OSError:
        return []
    return [len(data), hashlib.sha256(data).hexdigest()]


def fast_rebuild(root: Path, identity: str, options: RebuildOptions, progress_mode: str) -> bool:
    """Show and give the previous build's image when nothing it read changed; False to build in full."""
    path = _record_path(root, identity)
    try:
        with open(path, "rb") as file:
            memo = marshal.load(file)
        if memo["options"] != options.fingerprint():
            return False
        if any(_stat(entry) != stat for entry, stat in memo["entries"].items()):
            return False
        steps, result, keys = memo["steps"], memo["result"], memo["keys"]
        if not _layers_in_place(root, memo["layers"]):
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError):
        return False
    from cache.leases import shared_lease

    with shared_lease(root):  # prune waits; index.json compared under it
        if _index_stamp(root / "index.json") != memo["index"]:
            return False
        for key in keys:  # each entry still whole, and used now: the cache's eviction goes by last use
            entry = root / "cache" / "steps" / key[:2] / key
            try:
                if "diff_id" not in json.loads(entry.read_bytes()):
                    return False
                os.utime(entry)
            except (OSError, ValueError, TypeError):
                return False  # evicted or damaged: the full path checks every step
    from builder.progress import make_progress

    progress = make_progress(progress_mode)
    try:
        for name, state in steps:
            progress.step_finished(progress.step_started(name), state)
        progress.message(NOTHING_CHANGED)
        progress.result(result["image_id"], result["manifest"], tuple(result["names"]))
    finally:
        progress.close()
    return True
