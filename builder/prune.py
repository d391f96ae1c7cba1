"""Free the store's space that no stored image uses: blobs and unpacked layers, as `docker rmi` frees layers.

Whatever writes to the store (a build, `pybuild load`) or reads a named image's blobs (`pybuild save`) holds
the store's lease, shared, while it runs. Freeing takes the lease exclusively, so a layer a running build has
unpacked, mounted as a lower dir or written but not named yet can never go from under it.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from builder.fs.snapshot import Snapshots
from builder.oci.store import ImageStore

LEASE_FILE = "lease.lock"


@dataclass
class Freed:
    """What one pass removed: unnamed images (by ID), blob files, unpacked layers, and the bytes they took."""

    images: tuple[str, ...]
    blobs: int
    snapshots: int
    bytes: int


@contextlib.contextmanager
def shared_lease(root: Path) -> Iterator[None]:
    """Held while a command writes to the store or reads its images; any number may hold it at once."""
    with _lease(root, fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def exclusive_lease(root: Path, wait: bool) -> Iterator[bool]:
    """Held while space is freed; yields False at once, without waiting, when ``wait`` is off and it is taken."""
    with _lease(root, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB) as held:
        yield held


@contextlib.contextmanager
def _lease(root: Path, operation: int) -> Iterator[bool]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LEASE_FILE, "a") as lock:
        try:
            fcntl.flock(lock, operation)
        except BlockingIOError:
            yield False
            return
        yield True  # closing the file releases the lock, also when the process is killed


def free_unused(root: Path, unnamed_images: bool = False) -> Freed:
    """Remove the blobs index.json does not reach and the snapshots of layers no stored image has.

    With ``unnamed_images``, images without a name (built without -t) go first, as `docker image prune`
    removes dangling images. The caller holds the exclusive lease: no build is running, so no grace period
    is needed for blobs a build has written but not named yet.
    """
    store = ImageStore(root)
    unnamed = tuple(stored.image_id for stored in store.list() if not stored.names) if unnamed_images else ()
    for image_id in unnamed:
        store.remove(image_id)
    blobs, blob_bytes = store.gc(grace_seconds=0)
    used = {layer.diff_id for stored in store.list() for layer in stored.image.layers}
    snapshots, snapshot_bytes = Snapshots(root / "snapshots").remove_unused(used)
    return Freed(unnamed, blobs, snapshots, blob_bytes + snapshot_bytes)
