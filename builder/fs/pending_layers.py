"""Layer blobs written off the steps' path: a step hashes its change, the compressing happens beside the next steps.

A step needs only its layer's diff_id (to name the snapshot its successors stand on); the compressed blob
is needed only when the image is stored. So a step hashes its tar, and the blob is written on a
background thread from the adopted snapshot, which no later step changes. Layers that never reach the
final image (those of a stage only copied from) are never compressed at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from builder.oci.image import Layer
from cache.blobs import BlobStore
from parser.dataclass import dataclass
from parser.errors import PybuildError


@dataclass
class LayerSource:
    """What writing a pending layer's blob needs: its snapshot and the snapshots below it (None: none count)."""

    snapshot: Path
    lowers: tuple[Path, ...] | None


class PendingLayers:
    """Writes the blobs of layers made by this build, one at a time, in the order they were started."""

    def __init__(self, blobs: BlobStore, compression: Literal["zstd", "gzip"], source_date_epoch: int,
                 on_written: Callable[[Layer], None] | None = None) -> None:
        """``on_written`` is told of each blob written (the step cache records it for later builds)."""
        self.blobs = blobs
        self.on_written = on_written
        self.compression = compression
        self.source_date_epoch = source_date_epoch
        self._lock = threading.Lock()
        self._sources: dict[str, LayerSource] = {}
        self._written: dict[str, Future[Layer]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer")

    def add(self, layer: Layer, snapshot: Path, lowers: Sequence[Path] | None, *, start: bool) -> None:
        """Record where a pending layer's content is; ``start`` begins writing its blob now."""
        with self._lock:
            self._sources.setdefault(layer.diff_id, LayerSource(snapshot, None if lowers is None else tuple(lowers)))
        if start:
            self._future(layer)

    def write_now(self, layer: Layer, upper: Path, lowers: Sequence[Path] | None) -> None:
        """Write the blob from a step's own upper dir, before it goes: for a layer whose snapshot exists already.

        That snapshot may come from a step over other lowers, and directories only copied up there would
        count as changes over this step's lowers: its tar could differ from this one.
        """
        future: Future[Layer] = Future()
        future.set_result(self._write(layer.diff_id, LayerSource(upper, None if lowers is None else tuple(lowers))))
        with self._lock:
            self._written.setdefault(layer.diff_id, future)

    def _future(self, layer: Layer) -> Future[Layer]:
        with self._lock:
            future = self._written.get(layer.diff_id)
            if future is None:
                source = self._sources.get(layer.diff_id)
                if source is None:
                    raise PybuildError(f"layer {layer.diff_id} has no blob and was not made by this build")
                future = self._pool.submit(self._write, layer.diff_id, source)
                self._written[layer.diff_id] = future
            return future

    def written(self, layer: Layer) -> Layer:
        """The layer with its blob in the store (waiting for it, or writing it now)."""
        return self._future(layer).result() if layer.pending else layer

    def _write(self, diff_id: str, source: LayerSource) -> Layer:
        from builder.fs.diff import LowerView
        from builder.fs.layer import write_layer

        lower_stat = None if source.lowers is None else LowerView(source.lowers).stat
        with self.blobs.writer() as out:
            layer = write_layer(source.snapshot, out.file, compression=self.compression,
                                source_date_epoch=self.source_date_epoch, lower_stat=lower_stat)
            if layer is None:
                out.discard()
        if layer is None or layer.diff_id != diff_id:
            raise PybuildError(f"the snapshot of layer {diff_id} changed before its blob was written",
                               hint=f"something else modified {source.snapshot}; build again")
        if self.on_written is not None:
            self.on_written(layer)
        return layer

    def close(self, wait: bool = True) -> None:
        """Stop taking work; ``wait`` False drops the queued blobs (a failed build) instead of writing them."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
