"""Garbage collection: free the blobs and unpacked layers that no stored image and no kept cache entry uses.

The stores are passed in (``cache`` does not know how images or snapshots are stored); what is kept is
decided here: the layers of every stored image and, unless the cache is being dropped, every layer a
step cache entry names, with its blobs. The caller holds the lease exclusively (``cache.leases``), so no
build is running and no grace period is needed for blobs a build has written but not named yet.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cache.index import LayerBlobs, StepIndex
from cache.mounts import CacheMounts
from cache.records import BuildRecords


class ImageStoreLike(Protocol):
    def list(self) -> list: ...
    def remove(self, reference: str) -> tuple[str, ...]: ...
    def gc(self, keep: Collection[str] = (), grace_seconds: float = ...) -> tuple[int, int]: ...


class SnapshotsLike(Protocol):
    def remove_unused(self, used: Collection[str]) -> tuple[int, int]: ...


@dataclass
class Freed:
    """What one pass removed: unnamed images (by ID), cache entries, blob files, unpacked layers, bytes."""

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


def free_unused(images: ImageStoreLike, snapshots: SnapshotsLike, cache_root: Path, *,
                unnamed_images: bool = False, drop_cache: bool = False) -> Freed:
    """Remove what neither a stored image nor (unless ``drop_cache``) the step cache uses.

    With ``unnamed_images``, images without a name (built without -t) go first, as `docker image prune`
    removes dangling images.
    """
    unnamed = tuple(stored.image_id for stored in images.list() if not stored.names) if unnamed_images else ()
    for image_id in unnamed:
        images.remove(image_id)
    dropped = 0
    mount_bytes = 0
    if drop_cache:
        dropped = StepIndex(cache_root).remove_all()
        BuildRecords(cache_root).remove_all()
        removed_mounts, mount_bytes = CacheMounts(cache_root / "mounts").remove_all()
        dropped += removed_mounts
    kept_layers, kept_blobs = cached_layers(cache_root)
    blobs, blob_bytes = images.gc(keep=kept_blobs, grace_seconds=0)
    used = {layer.diff_id for stored in images.list() for layer in stored.image.layers} | kept_layers
    removed, snapshot_bytes = snapshots.remove_unused(used)
    return Freed(unnamed, dropped, blobs, removed, blob_bytes + snapshot_bytes + mount_bytes)
