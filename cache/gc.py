"""Garbage collection: free the blobs and unpacked layers that no stored image and no kept cache entry uses.

The stores are passed in (``cache`` does not know how images or snapshots are stored); what is kept is
decided here: the layers of every stored image and, unless the cache is being dropped, every layer a
step cache entry names, with its blobs. The caller holds the lease exclusively (``cache.leases``), so no
build is running and no grace period is needed for blobs a build has written but not named yet.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

from cache.index import LayerBlobs, StepIndex
from cache.mounts import CacheMounts, process_alive
from cache.records import BuildRecords
from parser.dataclass import dataclass


class ImageStoreLike(Protocol):
    def list(self) -> list: ...
    def remove(self, reference: str) -> tuple[str, ...]: ...
    def gc(self, keep: Collection[str] = (), grace_seconds: float = ...) -> tuple[int, int]: ...


class SnapshotsLike(Protocol):
    def remove_unused(self, used: Collection[str]) -> tuple[int, int]: ...
    def has(self, diff_id: str) -> bool: ...
    def size(self, diff_id: str) -> int: ...


@dataclass
class Freed:
    """What one pass removed: unnamed images (by ID, or by manifest digest where a named image keeps the ID),
    cache entries, blob files, unpacked layers, bytes."""

    images: tuple[str, ...]
    cache_entries: int
    blobs: int
    snapshots: int
    bytes: int


def cached_layers(cache_root: Path) -> tuple[set[str], set[str]]:
    """The diff_ids the step cache names, and the blobs recorded for them."""
    index = StepIndex(cache_root)
    diff_ids = {result.diff_id for key in index.stored_keys() if (result := index.get(key)) and result.diff_id}
    blobs = LayerBlobs(cache_root)
    digests = {blob.digest for diff_id in diff_ids for blob in blobs.all_of(diff_id)}
    return diff_ids, digests


@dataclass
class CacheUsage:
    """Bytes the cache alone keeps (unpacked layers and blobs no image uses), per step entry, oldest first."""

    entries: list[tuple[str, float, int]]  # key, last use, bytes only that entry's layer keeps (shared: once)
    total: int


def cache_usage(images: ImageStoreLike, snapshots: SnapshotsLike, blob_size, cache_root: Path) -> CacheUsage:
    """What evicting each entry, oldest first, would free: its layer's snapshot and blobs unless an image or
    a newer entry keeps them. ``blob_size`` gives a blob's size (0 when absent)."""
    index, layer_blobs = StepIndex(cache_root), LayerBlobs(cache_root)
    used_by_images = {layer.diff_id for stored in images.list() for layer in stored.image.layers}
    newest_first = sorted(((key, index.last_used(key)) for key in index.stored_keys()), key=lambda item: -item[1])
    counted: set[str] = set()
    entries = []
    for key, last_used in newest_first:
        result = index.get(key)
        size = 0
        diff_id = result.diff_id if result else None
        if diff_id and diff_id not in used_by_images and diff_id not in counted:
            counted.add(diff_id)
            size = (snapshots.size(diff_id) if snapshots.has(diff_id) else 0) + sum(
                blob_size(blob.digest) for blob in layer_blobs.all_of(diff_id))
        entries.append((key, last_used, size))
    entries.reverse()  # a layer shared by several entries is counted with the newest, which goes last
    return CacheUsage(entries, sum(size for _, _, size in entries))


def evict(images: ImageStoreLike, snapshots: SnapshotsLike, blob_size, cache_root: Path, *,
          keep_bytes: int | None = None, unused_for: float | None = None) -> int:
    """Forget the least recently used step entries: those unused for ``unused_for`` seconds, then more until
    what the cache alone keeps is at most ``keep_bytes``. Returns how many went; ``free_unused`` frees."""
    import time

    usage = cache_usage(images, snapshots, blob_size, cache_root)
    index, total, removed = StepIndex(cache_root), usage.total, 0
    now = time.time()
    for key, last_used, size in usage.entries:
        old = unused_for is not None and now - last_used >= unused_for
        over = keep_bytes is not None and total > keep_bytes and size > 0  # forgetting it must free something
        if not (old or over):
            continue
        index.forget(key)
        total -= size
        removed += 1
    return removed


_TEMP = re.compile(r"\.(?:record|file-digests|parsed)-([0-9]+)-")


def sweep_temp_files(cache_root: Path) -> int:
    """Remove the temp files that killed processes left beside the cache's records (named with their pid)."""
    removed = 0
    for directory, _, names in os.walk(cache_root):
        if directory.startswith(str(cache_root / "mounts")):
            continue  # the mounts sweep their own
        for name in names:
            match = _TEMP.match(name)
            if match and not process_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                    removed += 1
    return removed


def free_unused(images: ImageStoreLike, snapshots: SnapshotsLike, cache_root: Path, *,
                unnamed_images: bool = False, drop_cache: bool = False, drop_mounts: bool = False,
                evicted: int = 0) -> Freed:
    """Remove what neither a stored image nor (unless ``drop_cache``) the step cache uses; with ``drop_mounts``,
    the cache mounts' directories too. ``evicted``: entries the caller already forgot, to report them.

    With ``unnamed_images``, images without a name (built without -t) go first, as `docker image prune`
    removes dangling images.
    """
    sweep_temp_files(cache_root)
    # by manifest digest: a named image may share its ID (config) with an unnamed one stored in another compression;
    # such a manifest is reported by its digest, as its ID stays
    stored_images = images.list() if unnamed_images else []
    named_ids = {stored.image_id for stored in stored_images if stored.names}
    removed_images = []
    for stored in stored_images:
        if not stored.names:
            images.remove(stored.manifest.digest)
            removed_images.append(stored.manifest.digest if stored.image_id in named_ids else stored.image_id)
    dropped = evicted
    mount_bytes = 0
    if drop_cache:
        dropped += StepIndex(cache_root).remove_all()
        BuildRecords(cache_root).remove_all()
    if drop_mounts:
        removed_mounts, mount_bytes = CacheMounts(cache_root / "mounts").remove_all()
        dropped += removed_mounts
    kept_layers, kept_blobs = cached_layers(cache_root)
    blobs, blob_bytes = images.gc(keep=kept_blobs, grace_seconds=0)
    used = {layer.diff_id for stored in images.list() for layer in stored.image.layers} | kept_layers
    removed, snapshot_bytes = snapshots.remove_unused(used)
    return Freed(tuple(removed_images), dropped, blobs, removed, blob_bytes + snapshot_bytes + mount_bytes)
