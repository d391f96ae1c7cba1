"""The store's lease: what keeps a running build's layers from being freed under it.

Whatever writes to the store (a build, `pybuild load`) or reads a named image's blobs (`pybuild save`) holds
the lease, shared, while it runs. Freeing space takes it exclusively, so a layer a running build has
unpacked, mounted as a lower dir or written but not named yet can never go from under it.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

LEASE_FILE = "lease.lock"
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
