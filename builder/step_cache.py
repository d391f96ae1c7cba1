"""The step cache as a build uses it: lookups that make sure the layer is still there, stores, explanations.

The index (``cache.index``) says which layer a key made; a hit needs that layer's files (its snapshot, or
a blob to unpack it from). What is gone or damaged is forgotten and the step runs again, with a warning
for damage: the cache may cost a rerun, never a wrong layer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.fs.snapshot import Snapshots
from builder.graph import Stage
from builder.oci.image import MEDIA_LAYER_GZIP, MEDIA_LAYER_ZSTD, Layer
from builder.progress import Progress
from cache.blobs import BlobStore
from cache.files import FileDigests
from cache.index import LayerBlob, LayerBlobs, StepIndex, StepResult
from cache.keys import MissCause, miss_cause
from cache.records import BuildRecords
from parser.dataclass import dataclass
from parser.errors import PybuildError

if TYPE_CHECKING:
    from cache.transfer import CachedStep, CacheSource


@dataclass
class Hit:
    """A cached step's layer (None: the step changed no file); ``snapshot`` is set when its blob is still
    to be written from it, over the snapshots of ``lowers`` (None: a --link layer, over nothing)."""

    layer: Layer | None
    snapshot: Path | None = None


class StepCache:
    def __init__(self, root: Path, *, identity: str, compression: str, no_cache: bool,
                 no_cache_stages: frozenset[str], snapshots: Snapshots, blobs: BlobStore, progress: Progress,
                 sources: tuple[CacheSource, ...] = ()) -> None:
        """``sources``: caches given with --cache-from, asked after the store's own index."""
        self.index = StepIndex(root)
        self.layer_blobs = LayerBlobs(root)
        self.file_digests = FileDigests(root)
        self.records = BuildRecords(root)
        self.identity = identity
        self.media_type = MEDIA_LAYER_GZIP if compression == "gzip" else MEDIA_LAYER_ZSTD
        self.no_cache = no_cache
        self.no_cache_stages = no_cache_stages
        self.snapshots = snapshots
        self.blobs = blobs
        self.progress = progress
        self._previous: dict[str, Any] | None = None
        self.sources = sources
        # every context entry the keys read, and the directories above them, with their stat where taken
        self.read_paths: dict[str, tuple[int, ...] | None] = {}
        self.filesystem_steps: set[int] = set()  # progress numbers of the steps that have keys
        self.unrecorded_inputs = False  # a step read what no key or record covers (a URL, an archive)
        self._current: dict[str, Any] = {}
        self._made: dict[str, tuple[int, str, Layer | None]] = {}  # place: stage index, key, layer
        self._lock = threading.Lock()
        # Step records are written off the steps' path; until written, lookups find them here.
        self._unwritten: dict[str, StepResult] = {}
        self._writes: list[Future[None]] = []
        self._writer: ThreadPoolExecutor | None = None

    def refused(self, stage: Stage) -> MissCause | None:
        """Why this stage may not use the cache, if the command line says so."""
        if self.no_cache:
            return MissCause("no-cache", "--no-cache", {})
        if stage.name in self.no_cache_stages or str(stage.index) in self.no_cache_stages:
            return MissCause("no-cache", "--no-cache-filter", {})
        return None

    def lookup(self, key: str) -> Hit | None:
        with self._lock:
            result = self._unwritten.get(key)
        if result is None:
            result = self.index.get(key)
        if result is None:
            result = self._from_sources(key)
        if result is None:
            return None
        self.index.touch(key)
        if result.diff_id is None:
            return Hit(None)
        diff_id = result.diff_id
        blob = self.layer_blobs.get(diff_id, self.media_type)
        if blob is not None and not self._blob_intact(blob):
            blob = None
        if self.snapshots.has(diff_id):
            if blob is not None:
                return Hit(Layer(diff_id, blob.digest, blob.size, blob.media_type))
            return Hit(Layer(diff_id, "", 0, self.media_type), self.snapshots.path(diff_id))
        if blob is None:
            self.index.forget(key)  # neither its files nor its blob are left (pruned): run it again
            return None
        try:
            self.snapshots.unpack(diff_id, self.blobs.path(blob.digest))
        except PybuildError as exc:
            self.progress.message(f"[warning] the cached layer {diff_id} is damaged ({exc.message}); "
                                  "removed, the step runs again")
            self.blobs.remove(blob.digest)
            self.index.forget(key)
            return None
        return Hit(Layer(diff_id, blob.digest, blob.size, blob.media_type))

    def peek(self, key: str) -> str | None | bool:
        """--dry-run: the diff_id a hit would give (None: a step that changed nothing); False for a miss.

        Nothing is unpacked or brought in: a layer whose files or blob are there would hit.
        """
        result = self.index.get(key)
        if result is None:
            for source in self.sources:
                step = source.steps.get(key)
                if step is not None and (step.blob is None or self.snapshots.has(step.diff_id or "")
                                         or source.has(step.blob)):
                    return step.diff_id
            return False
        if result.diff_id is None:
            return None
        blob = self.layer_blobs.get(result.diff_id, self.media_type)
        if self.snapshots.has(result.diff_id) or (blob is not None and self._blob_intact(blob)):
            return result.diff_id
        return False

    def _from_sources(self, key: str) -> StepResult | None:
        """A record of a --cache-from cache, its blob brought into the store and both recorded here."""
        for source in self.sources:
            step = source.steps.get(key)
            if step is None:
                continue
            if step.diff_id is not None and step.blob is not None:
                if not self.snapshots.has(step.diff_id) and not source.fetch(step.blob, self.blobs):
                    self.progress.message(f"[warning] {source.label}: the blob of layer "
                                          f"{step.diff_id} is missing or damaged there; the step runs")
                    continue
                if self.blobs.has(step.blob.digest):
                    self.layer_blobs.put(step.diff_id, step.blob)
            result = StepResult(step.diff_id)
            self.index.put(key, result)
            return result
        return None

    def _blob_intact(self, blob: LayerBlob) -> bool:
        """A blob present at its recorded size (its digest is checked whenever it is read)."""
        try:
            return self.blobs.path(blob.digest).stat().st_size == blob.size
        except OSError:
            return False

    def store(self, key: str, layer: Layer | None) -> None:
        """Record what a step made; written on a thread of its own (``flush`` waits for it), so a cold build's
        many small steps do not each wait for a file to be made and renamed."""
        result = StepResult(None if layer is None else layer.diff_id)
        with self._lock:
            self._unwritten[key] = result
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records")
            self._writes.append(self._writer.submit(self._write_step, key, result))

    def _write_step(self, key: str, result: StepResult) -> None:
        self.index.put(key, result)
        with self._lock:
            self._unwritten.pop(key, None)

    def flush(self) -> None:
        """Wait until every step record of this build is written (also after a failed build: the steps that
        succeeded stay cached); the first error writing one is raised."""
        with self._lock:
            writer, writes, self._writer, self._writes = self._writer, self._writes, None, []
        if writer is not None:
            writer.shutdown(wait=True)
        for write in writes:
            write.result()

    def layer_written(self, layer: Layer) -> None:
        """A layer's blob is in the blob store: later hits on it need not write it again."""
        self.layer_blobs.put(layer.diff_id, LayerBlob(layer.digest, layer.size, layer.media_type))

    def _place(self, stage: Stage, place: str) -> str:
        return f"{stage.label}/{place}"

    def remember(self, place: str, stage: Stage, key: str, inputs: dict[str, Any], layer: Layer | None) -> None:
        with self._lock:
            self._current[self._place(stage, place)] = {"key": key, "inputs": inputs}
            self._made[self._place(stage, place)] = (stage.index, key, layer)

    def used_keys(self) -> list[str]:
        return [key for _, key, _ in self._made.values()]

    def export(self, directory: Path, stages: set[int] | None, written: Callable[[Layer], Layer]) -> None:
        """Write this build's steps (only those of ``stages``, unless None) as a cache directory."""
        from cache.transfer import write_cache

        write_cache(directory, self.made_steps(stages, written), self.blobs)

    def made_steps(self, stages: set[int] | None, written: Callable[[Layer], Layer]) -> list[CachedStep]:
        """This build's steps (only those of ``stages``, unless None) as cache records with their blobs.

        ``written`` gives a layer with its blob in the store, writing the blob now when it is pending.
        """
        from cache.transfer import CachedStep

        steps = []
        for stage_index, key, layer in self._made.values():
            if stages is not None and stage_index not in stages:
                continue
            if layer is None:
                steps.append(CachedStep(key, None, None))
                continue
            stored = written(layer)
            steps.append(CachedStep(key, stored.diff_id, LayerBlob(stored.digest, stored.size, stored.media_type)))
        return steps

    def _previous_steps(self) -> dict[str, Any]:
        """The previous build's record, read once, when first needed."""
        with self._lock:
            if self._previous is None:
                self._previous = self.records.load(self.identity)
            return self._previous

    def _previous_step(self, place: str, stage: Stage) -> Any:
        return self._previous_steps().get(self._place(stage, place))

    def rebuilding(self, place: str, stage: Stage) -> bool:
        """Whether the previous build of this Dockerfile and target had this step (a rebuild, not a first build)."""
        return self._previous_step(place, stage) is not None

    def previous_snapshot(self, place: str, stage: Stage) -> Path | None:
        """The files of the layer this step made in the previous build of this Dockerfile and target, where the
        store still has them unpacked (a copy links what did not change from there)."""
        previous = self._previous_step(place, stage)
        key = previous.get("key") if isinstance(previous, dict) else None
        try:
            result = self.index.get(key) if isinstance(key, str) else None
        except ValueError:  # a record of another shape
            return None
        if result is None or result.diff_id is None or not self.snapshots.has(result.diff_id):
            return None
        return self.snapshots.path(result.diff_id)

    def explain(self, place: str, stage: Stage, key: str | None, inputs: dict[str, Any]) -> MissCause | None:
        """Why a step runs that the previous build of this Dockerfile and target had cached; None if it had not."""
        previous = self._previous_step(place, stage)
        if not isinstance(previous, dict) or not isinstance(previous.get("inputs"), dict):
            return None
        if previous.get("key") == key:
            return MissCause("removed", "its cached result was removed", {})
        try:
            return miss_cause(previous["inputs"], inputs)
        except (TypeError, AttributeError, ValueError):  # a record of another shape: no explanation, no failure
            return None

    def finish(self) -> None:
        """The build succeeded: its steps become what the next build of the same target compares with."""
        previous = self._previous_steps()
        with self._lock:
            steps, unchanged = self._current, self._current == previous
        if not unchanged:  # a rebuild that hit every step need not write the same record again
            self.records.save(self.identity, steps)
