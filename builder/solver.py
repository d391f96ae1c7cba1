"""Run a build graph: stages in parallel threads, each instruction applied in order, filesystem changes as layers.

Every filesystem step mounts an overlay over the parent's snapshots, changes the merged root
(by copying, or by running a command in the sandbox), and turns the overlay's upper dir into a
layer blob and a new snapshot.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from builder.checks import check_mount, check_network
from builder.fs.pending_layers import PendingLayers
from builder.graph import PREDEFINED_ARGS, BuildGraph, Stage, host_platform, platform_args
from builder.oci import image as oci
from builder.ops import CopyOp, DirectoryOp, FilesystemOp, RunOp, WorkdirOp
from builder.progress import Progress
from builder.sandbox import parent as sandbox
from builder.sandbox.linux import mark_top_directory
from builder.sandbox.namespace import UnmappedId, check_mapped, entered
from builder.step_cache import StepCache
from builder.steps import STEPS, FilesystemStep, StageState, StepInputs, describe, heredoc_body, scratch_state
from cache.keys import MissCause, step_key
from cache.records import BuildRecords
from parser.dataclass import dataclass
from parser.errors import PybuildError, SourceRange
from parser.flags import Mount, mount_id, mount_mode, mount_size
from parser.instructions import Add, Copy, Instruction, parse

if TYPE_CHECKING:
    from builder.fs.copy import PreviousLayer

IMAGE_CONTEXT_PREFIXES = ("docker-image://", "oci-layout:", "oci-archive:")


@dataclass
class SecretSource:
    """Where a ``--secret`` comes from: a file or an environment variable of the pybuild process."""

    id: str
    path: Path | None = None
    env: str | None = None

    def read(self) -> bytes:
        if self.path is not None:
            try:
                return self.path.read_bytes()
            except OSError as exc:
                raise PybuildError(f"secret {self.id}: cannot read {self.path}: {exc.strerror}") from None
        value = os.environ.get(self.env or self.id)
        if value is None:
            raise PybuildError(f"secret {self.id}: environment variable {self.env or self.id} is not set")
        return value.encode()


@dataclass
class BuildOptions:
    """The parts of a build request the steps need while they run."""

    context: Path
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    compression: str = "zstd"
    secrets: Mapping[str, SecretSource] = field(default_factory=dict)
    network: str = "default"
    named_contexts: Mapping[str, str] = field(default_factory=dict)
    source_date_epoch: int = 0
    dockerfile_path: Path | None = None
    no_cache: bool = False
    no_cache_stages: frozenset[str] = frozenset()  # --no-cache-filter: these stages run, the others may hit
    cache_from: tuple[Mapping[str, str], ...] = ()  # --cache-from type=local,src=DIR
    cache_to: tuple[Mapping[str, str], ...] = ()  # --cache-to type=local,dest=DIR[,mode=min|max]
    dry_run: bool = False  # say which steps hit and which would run, and run none
    pull: bool = False  # --pull: ask the registry for every FROM image, even one the store has
    insecure_registries: tuple[str, ...] = ()  # --insecure-registry: hosts plain HTTP is allowed for
    variation: Variation | None = None  # --check-reproducible's second build: other conditions for RUN


@dataclass
class Variation:
    """Conditions a reproducible build must not depend on, set otherwise for RUN steps (none enters the image):
    the sandbox's host name, and environment variables the image does not set (TZ, LANG...). (The builder's
    own umask and CPUs are varied around the whole build; a RUN's umask is always 022, as runc sets it.)"""

    hostname: str
    env: tuple[tuple[str, str], ...]


def _cache_sources(specs: tuple[Mapping[str, str], ...], insecure: tuple[str, ...], progress: Progress) -> tuple:
    """The --cache-from caches, their records read at the start (the modules only load when one is given)."""
    sources = []
    for spec in specs:
        if spec["type"] == "registry":
            from builder.registry.cache import RegistryCacheSource

            sources.append(RegistryCacheSource(spec["ref"], insecure, warn=progress.message))
        else:
            from cache.transfer import CacheSource

            sources.append(CacheSource(Path(spec["src"])))
    return tuple(sources)


def epoch_timestamp(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass
class _ReadOnce:
    """File digests for a tree seen once (a mounted image under a scratch path): nothing to remember."""

    read: Callable[[str], str]

    def digest(self, path: str, st: os.stat_result) -> str:
        return self.read(path)


class _StageStopped(PybuildError):
    """A stage ended early because another stage failed; that other failure is what the build reports."""


class _StageRunsFirst(Exception):
    """--dry-run: a step reads a stage that has a step that would run, so its own key is not known yet."""


class RunFailed(PybuildError):
    """A RUN command exited non-zero; its exit code becomes pybuild's."""


class Solver:
    """Builds the stages a graph needs, sharing one store, blob store and snapshot store."""

    def __init__(self, graph: BuildGraph, options: BuildOptions, progress: Progress, state_root: Path,
                 sandbox_server: sandbox.SandboxServer | None = None) -> None:
        from builder.fs.context import BuildContext
        from builder.fs.snapshot import Snapshots, snapshotter
        from builder.oci.store import ImageStore
        from cache.blobs import BlobStore

        self.graph = graph
        self.options = options
        self.progress = progress
        self.store = ImageStore(state_root)
        self.blobs = BlobStore(state_root)
        self.snapshots = Snapshots(state_root / "snapshots")
        snapshotter(self.snapshots.root)  # chosen where the choice is remembered, before any step's scratch dir
        self.cache_mounts_root = state_root / "cache" / "mounts"
        self.tmp_root = state_root / "tmp"
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        mark_top_directory(self.tmp_root)  # each step's work dir is its own tree
        sweep_stale_scratch(self.tmp_root, self.snapshots.unpacking())
        self.context = BuildContext(options.context, dockerfile_path=options.dockerfile_path)
        self.created = epoch_timestamp(options.source_date_epoch)
        self.futures: dict[int, Future[oci.Image]] = {}
        self.unplanned_stages: set[int] = set()  # --dry-run: stages with a step that would run
        self.failed = threading.Event()
        self.base_images: dict[str, str] = {}  # FROM reference: the digest it resolved to (name@sha256:...)
        self._pull_lock = threading.Lock()
        identity = BuildRecords.identity(options.dockerfile_path, options.context, options.target)
        self.cache = StepCache(state_root / "cache", identity=identity,
                               compression=options.compression, no_cache=options.no_cache,
                               no_cache_stages=options.no_cache_stages, snapshots=self.snapshots, blobs=self.blobs,
                               progress=progress,
                               sources=_cache_sources(options.cache_from, options.insecure_registries, progress))
        self.pending_layers = PendingLayers(self.blobs, options.compression, options.source_date_epoch,
                                            on_written=self.cache.layer_written)
        global_args = platform_args()
        global_args.update((name, value) for name, value in graph.global_args if value is not None)
        self.inputs = StepInputs(graph.dockerfile.escape, options.build_args, global_args)
        self.exported_stages = self._base_chain(graph.target)
        self.sandboxes = sandbox.Sandboxes(sandbox_server)

    def scratch_dir(self) -> Path:
        """A work dir for one step, named by this process so a later build can tell it is stale."""
        return Path(tempfile.mkdtemp(dir=self.tmp_root, prefix=f"step-{os.getpid()}-"))

    def _base_chain(self, index: int) -> set[int]:
        """The stages whose layers the target's image holds: the target and the stages it is built FROM."""
        chain: set[int] = set()
        stage: Stage | None = self.graph.stages[index]
        while stage is not None and stage.index not in chain:
            chain.add(stage.index)
            stage = self.graph.stage_by_reference(stage.base, stage.index)
        return chain

    def solve(self) -> oci.Image:
        workers = max(1, min(len(self.graph.needed), os.cpu_count() or 1))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stage")
        try:
            for index in self.graph.needed:
                self.futures[index] = pool.submit(self._build_stage_guarded, self.graph.stages[index])
            image = self.futures[self.graph.target].result()
            if self.options.dry_run:  # nothing was made: no blob to write, no record to keep
                pool.shutdown(wait=True)
                return image
            image = replace(image, layers=tuple(self.pending_layers.written(layer) for layer in image.layers))
            self.cache.finish()
            for spec in self.options.cache_to:
                stages = None if spec.get("mode") == "max" else self.exported_stages
                if spec["type"] == "registry":
                    from builder.registry.cache import push_cache

                    steps = self.cache.made_steps(stages, self.pending_layers.written)
                    digest = push_cache(self.store, steps, spec["ref"], self.options.insecure_registries)
                    self.progress.message(f"cache pushed to {spec['ref']}: {digest}")
                else:
                    self.cache.export(Path(spec["dest"]), stages, self.pending_layers.written)
        except _StageStopped:
            # The target stopped because another stage failed: that stage's own error is the one to tell.
            self.failed.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self.pending_layers.close(wait=False)
            raise self._first_failure() from None
        except BaseException:
            # Do not wait for other stages' running steps: the CLI exits, and their sandboxes die with it.
            self.failed.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self.pending_layers.close(wait=False)
            raise
        finally:
            self.sandboxes.close(wait=not self.failed.is_set())
            self.cache.flush()
            self.cache.file_digests.save()
        pool.shutdown(wait=True)
        self.pending_layers.close()
        return image

    def _first_failure(self) -> BaseException:
        """The error of a stage that failed on its own (not merely stopped because another did)."""
        others = [future for index, future in self.futures.items() if index != self.graph.target]
        wait(others, timeout=5, return_when=FIRST_EXCEPTION)  # the failing stage may be just ending
        for future in self.futures.values():
            if future.done() and not future.cancelled():
                error = future.exception()
                if error is not None and not isinstance(error, _StageStopped):
                    return error
        return PybuildError("a stage failed")

    def stage_image(self, index: int) -> oci.Image:
        future = self.futures.get(index)
        if future is None:
            raise PybuildError(f"stage {self.graph.stages[index].label} is needed but was not scheduled")
        return future.result()

    def _build_stage_guarded(self, stage: Stage) -> oci.Image:
        try:
            return self._build_stage(stage)
        except BaseException:
            self.failed.set()
            raise

    def _build_stage(self, stage: Stage) -> oci.Image:
        total = len(stage.instructions) + 1
        number = self.progress.step_started(f"[{stage.label} 1/{total}] FROM {stage.base}")
        ctx = StepContext(self, stage, current_step=number)
        try:
            where = stage.from_instruction.location if stage.from_instruction else None
            state, status = ctx.base_state(stage.base, stage.index, where)
        except BaseException:
            self.progress.step_finished(number, "error")
            raise
        self.progress.step_finished(number, status)
        predefined = tuple((name, value) for name, value in self.options.build_args.items()
                           if name in PREDEFINED_ARGS)
        state = replace(state, args=predefined)
        triggers = state.image.config.on_build
        if triggers:
            state = replace(state, image=replace(state.image, config=replace(state.image.config, on_build=())))
            for position, trigger in enumerate(triggers):
                for instruction in parse(trigger.encode(), f"ONBUILD of {stage.base}").instructions:
                    state = ctx.step(state, instruction, f"[{stage.label} ONBUILD] {describe(instruction)}",
                                     f"onbuild-{position}")
        for position, instruction in enumerate(stage.instructions, start=2):
            if self.failed.is_set():
                raise _StageStopped(f"stage {stage.label} stopped because another stage failed")
            state = ctx.step(state, instruction, f"[{stage.label} {position}/{total}] {describe(instruction)}",
                             str(position))
        return state.image


@dataclass
class StepContext:
    """One stage being built: each instruction's step, its cache lookup, and its filesystem change."""

    solver: Solver
    stage: Stage
    current_step: int = 0
    base_layers: tuple[str, ...] = ()

    def step(self, state: StageState, instruction: Instruction, title: str, place: str) -> StageState:
        progress = self.solver.progress
        self.current_step = progress.step_started(title)
        status = "done"
        try:
            handler = STEPS.get(type(instruction))
            if handler is None:
                raise PybuildError(f"{type(instruction).__name__.upper()} is not supported here",
                                   instruction.location)
            outcome = handler(self.solver.inputs, state, instruction)
            if isinstance(outcome, FilesystemStep):
                state, status = self.filesystem_step(outcome, place, describe(instruction))
            else:
                state = outcome
        except PybuildError as exc:
            progress.step_finished(self.current_step, "error")
            if exc.location is None:  # what failed is this instruction: point at it
                raise type(exc)(exc.message, instruction.location, hint=exc.hint, exit_code=exc.exit_code) from None
            raise
        except BaseException:
            progress.step_finished(self.current_step, "error")
            raise
        progress.step_finished(self.current_step, status)
        return state

    def filesystem_step(self, step: FilesystemStep, place: str, text: str) -> tuple[StageState, str]:
        """Make ``step``'s change, or take it from the cache; returns the stage after it and "cached" or "done"
        (with --dry-run, "would-run" instead of making it)."""
        self.solver.cache.filesystem_steps.add(self.current_step)
        if self.solver.options.dry_run:
            return self._plan(step, place, text)
        cache = self.solver.cache
        state = step.state
        inputs = self.key_inputs(step, text)
        key = None if inputs is None else step_key(inputs)
        independent = isinstance(step.op, CopyOp) and step.op.copy.link
        lowers = () if independent else tuple(layer.diff_id for layer in state.image.layers)
        refused = cache.refused(self.stage)
        content_key = None
        if key is not None and refused is None:
            hit = cache.lookup(key)
            if hit is None and cache.rebuilding(place, self.stage):  # a first build has nothing to find by it
                content_key = self._content_key(step, inputs)
                hit = None if content_key is None else cache.lookup(content_key)
                if hit is not None:  # what it copies is as before although the stage it comes from changed
                    cache.store(key, hit.layer)
            if hit is not None:
                if hit.snapshot is not None and hit.layer is not None:  # its blob is written only if needed
                    below = None if independent else [self.solver.snapshots.path(diff_id) for diff_id in lowers]
                    self.solver.pending_layers.add(hit.layer, hit.snapshot, below,
                                                   start=self.stage.index in self.solver.exported_stages)
                cache.remember(place, self.stage, key, inputs, hit.layer)
                return self._with_layer(state, step.created_by, hit.layer), "cached"
        if inputs is not None:
            cause = refused or cache.explain(place, self.stage, key, inputs)
            if cause is not None:
                self.solver.progress.cache_miss(self.current_step, cause)
        previous = None
        if refused is None and isinstance(step.op, CopyOp | DirectoryOp):
            from builder.fs.copy import PreviousLayer

            snapshot = cache.previous_snapshot(place, self.stage)
            if snapshot is not None:
                previous = PreviousLayer(snapshot, self.solver.options.source_date_epoch)
        layer = self.execute(state, step.op, independent, previous)
        if key is not None:
            cache.store(key, layer)
            if content_key is not None:
                cache.store(content_key, layer)
            cache.remember(place, self.stage, key, inputs, layer)
        return self._with_layer(state, step.created_by, layer), "done"

    def _plan(self, step: FilesystemStep, place: str, text: str) -> tuple[StageState, str]:
        """--dry-run: whether the step would hit, and if not, why; nothing is run, unpacked or written."""
        cache = self.solver.cache
        cause = None
        if self.stage.index not in self.solver.unplanned_stages:
            try:
                inputs = self.key_inputs(step, text)
            except _StageRunsFirst as exc:
                cause = MissCause("parent", exc.args[0], {})
            else:
                key = None if inputs is None else step_key(inputs)
                cause = cache.refused(self.stage)
                if key is not None and cause is None:
                    diff_id = cache.peek(key)
                    if diff_id is not False:
                        layer = None if diff_id is None else oci.Layer(diff_id, "", 0)
                        return self._with_layer(step.state, step.created_by, layer), "cached"
                if cause is None and inputs is not None:
                    cause = cache.explain(place, self.stage, key, inputs)
                if cause is None:
                    cause = MissCause("new", "not in the cache" if key else "never cached (ADD of a URL)", {})
        else:
            cause = MissCause("parent", "a step before it runs", {})
        self.solver.progress.cache_miss(self.current_step, cause)
        self.solver.unplanned_stages.add(self.stage.index)
        return step.state, "would-run"

    @staticmethod
    def _with_layer(state: StageState, created_by: str, layer: oci.Layer | None) -> StageState:
        if layer is None:
            return replace(state, image=state.image.add_history(state.history(created_by, empty_layer=True)))
        image = replace(state.image, layers=(*state.image.layers, layer))
        return replace(state, image=image.add_history(state.history(created_by, empty_layer=False)))

    def key_inputs(self, step: FilesystemStep, text: str) -> dict | None:
        """What the step's key covers (see ``cache.keys.step_key``); None for a step that is never cached."""
        from builder.keys import TreeDigests, op_data

        solver = self.solver
        op = step.op
        if isinstance(op, CopyOp) and isinstance(op.copy, Add) and op.copy.checksum is None and any(
                source.startswith(("http://", "https://")) for source in op.copy.sources):
            solver.cache.unrecorded_inputs = True
            return None  # what a URL serves can change at any time: ADD fetches it on every build
        digests = TreeDigests(solver.cache.file_digests, solver.options.source_date_epoch, seen=solver.cache.read_paths)
        files: dict[str, str] = {}
        sources: dict[str, object] = {}
        if isinstance(op, CopyOp):
            reference = op.copy.from_ if isinstance(op.copy, Copy) else None
            tree = self._source_tree(reference, op.location)
            if tree is not None:
                digests.sources(tree, op, files, "" if reference is None else f"{reference}:")
            else:
                sources["from"] = self._source_layers(reference, op.location)
        elif isinstance(op, RunOp):
            for number, mount in enumerate(op.mounts):
                if mount.type != "bind":
                    continue
                tree = self._source_tree(mount.from_, op.location)
                if tree is None:
                    sources[f"mount{number}"] = self._source_layers(mount.from_, op.location)
                    continue
                prefix = "" if mount.from_ is None else f"{mount.from_}:"
                rel = tree.relative(mount.source or "/", "RUN --mount")
                digests.above(tree, rel + "/")  # the directories down to it, it included
                if tree.present(rel, is_dir=True) and os.path.lexists(tree.root / rel):
                    digests.walk(tree, rel, chmod=False, out=files, prefix=prefix)
            secrets = solver.options.secrets
            given = (_secret_id(mount) for mount in op.mounts if mount.type == "secret")
            sources["secrets"] = sorted(secret for secret in given if secret in secrets)
        elif isinstance(op, DirectoryOp):
            from builder.fs.context import BuildContext

            digests.walk(BuildContext(Path(op.directory)), "", chmod=False, out=files, prefix=f"{op.name}:")
        args = dict(step.state.args) if isinstance(op, RunOp) else {}
        return {
            "instruction": text,
            "base": {"ref": self.stage.base, "layers": list(self.base_layers)},
            "parent": [layer.diff_id for layer in step.state.image.layers]
            if not (isinstance(op, CopyOp) and op.copy.link) else [],
            "op": op_data(op, solver.options.network),
            "args": args,
            "files": files,
            "sources": sources,
            "env": {"epoch": solver.options.source_date_epoch, "platform": "/".join(host_platform()[:2])},
        }

    def _source_tree(self, reference: str | None, location):
        """The directory a source reads when it is one (the context, a named context); None for an image."""
        if reference is None:
            return self.solver.context
        named = self.solver.options.named_contexts.get(reference)
        if named is not None and not named.startswith(IMAGE_CONTEXT_PREFIXES):
            from builder.fs.context import BuildContext

            return BuildContext(Path(named))
        return None

    def _source_layers(self, reference: str | None, location) -> list[str]:
        """The layers of the stage or image a source reads (``--from``), by diff_id."""
        return [layer.diff_id for layer in self._source_image(reference, location).layers]

    def _source_image(self, reference: str | None, location) -> oci.Image:
        stage = self.solver.graph.stage_by_reference(reference or "", self.stage.index)
        if stage is not None:
            image = self.solver.stage_image(stage.index)
            if stage.index in self.solver.unplanned_stages:
                raise _StageRunsFirst(f"stage {stage.label} runs first")
            return image
        if (reference or "").isdigit():
            raise PybuildError(f"--from={reference}: there is no stage {reference} before this one", location)
        return self.image(reference or "", None)

    def _content_key(self, step: FilesystemStep, inputs: dict) -> str | None:
        """A second key for ``COPY --from`` a stage or image: by the content of what it copies, not by that
        image's layers. A stage that ran again and made other layers but the same files still lets it hit."""
        from builder.fs.context import SourceTree
        from builder.keys import TreeDigests
        from cache.files import sha256_file

        op = step.op
        if not (isinstance(op, CopyOp) and "from" in inputs["sources"]):
            return None
        files: dict[str, str] = {}
        image = self._source_image(op.copy.from_ if isinstance(op.copy, Copy) else None, op.location)
        with self.mounted_image(image) as root:
            digests = TreeDigests(_ReadOnce(sha256_file), self.solver.options.source_date_epoch, xattrs=True)
            digests.sources(SourceTree(root), op, files, "from:")
        sources = {name: value for name, value in inputs["sources"].items() if name != "from"}
        return step_key({**inputs, "files": {**inputs["files"], **files}, "sources": {**sources, "from": "content"}})

    def execute(self, state: StageState, op: FilesystemOp, independent: bool,
                previous: PreviousLayer | None = None) -> oci.Layer | None:
        """Carry out a filesystem step: the layer it made, or None when it changed no file.

        ``previous``: the layer a copy made in the previous build, whose unchanged files it links instead
        of writing them again.
        """
        if isinstance(op, RunOp):
            return self.run(state, op)
        if isinstance(op, CopyOp):
            return self.copy(state, op, previous)
        if isinstance(op, WorkdirOp):
            return self.make_workdir(state, op)
        return self._directory_layer(op, previous)

    # Images and sources

    def base_state(self, reference: str, before: int, where: SourceRange | None = None) -> tuple[StageState, str]:
        """The stage's FROM, and how its step ended: "done", or for a directory's files as a filesystem step's."""
        if reference == "scratch":
            return scratch_state(self.solver.created), "done"
        named = self.solver.options.named_contexts.get(reference)
        if named is not None and not named.startswith(IMAGE_CONTEXT_PREFIXES):
            if not Path(named).is_dir():
                raise PybuildError(f"--build-context {reference}={named}: no such directory")
            step = FilesystemStep(scratch_state(self.solver.created), DirectoryOp(reference, named),
                                  f"FROM {reference} (the directory {named})")
            return self.filesystem_step(step, "from", f"FROM {reference}")
        stage = self.solver.graph.stage_by_reference(reference, before)
        try:
            image = self.solver.stage_image(stage.index) if stage else self.image(reference, where)
        except _StageRunsFirst as exc:  # --dry-run of FROM an archive or layout: read only when the build runs
            self.solver.unplanned_stages.add(self.stage.index)
            self.solver.progress.cache_miss(self.current_step, MissCause("base", exc.args[0], {}))
            return scratch_state(self.solver.created), "would-run"
        if stage is not None and stage.index in self.solver.unplanned_stages:
            self.solver.unplanned_stages.add(self.stage.index)  # --dry-run: its base would be built first
        self.base_layers = tuple(layer.diff_id for layer in image.layers)
        state = StageState(image=replace(image, created=self.solver.created))
        resolved = None if stage is not None else self.solver.base_images.get(reference)
        if resolved is not None:  # which image the stage stands on, by digest, for whoever checks it later
            state = replace(state, image=state.image.add_history(state.history(f"FROM {resolved}", empty_layer=True)))
        return state, "done"

    def _directory_layer(self, op: DirectoryOp, previous: PreviousLayer | None) -> oci.Layer | None:
        """FROM a named context that is a directory: its files are the image's root filesystem."""
        from builder.fs.context import BuildContext
        from builder.fs.copy import copy_into

        def action(layer_dir: Path) -> None:
            copy_into(layer_dir, ["."], "/", source=BuildContext(Path(op.directory)), reuse_from=previous)

        return self.change(scratch_state(self.solver.created), action, direct=True)

    def image(self, reference: str, where: SourceRange | None = None) -> oci.Image:
        """An image by name from the local store, or from an OCI archive or layout on disk."""
        store = self.solver.store
        named = self.solver.options.named_contexts.get(reference)
        if named is not None:
            reference = named.removeprefix("docker-image://")
        dry_run = self.solver.options.dry_run
        if reference.startswith(("oci-archive:", "oci-layout:")):
            self.solver.cache.unrecorded_inputs = True  # a file outside the store and the context
        if dry_run and reference.startswith(("oci-archive:", "oci-layout:")):
            # reading it would bring its blobs into the store
            raise _StageRunsFirst(f"{reference} is read when the build runs")
        try:
            if reference.startswith("oci-archive:"):
                image = store.read_image_from_archive(Path(reference.removeprefix("oci-archive:")))
            elif reference.startswith("oci-layout:"):
                image = store.read_image_from_layout(reference.removeprefix("oci-layout:"))
            else:
                image = self._stored_or_pulled(reference)
            if not dry_run:
                unpack_layers(self.solver.snapshots, self.solver.blobs, image)
        except PybuildError as exc:
            raise PybuildError(exc.message, where, hint=exc.hint) from None
        os_name, arch, _ = host_platform()
        if (image.os, image.architecture) != (os_name, arch):
            raise PybuildError(f"image {reference} is for {image.os}/{image.architecture}; this machine runs "
                               f"{os_name}/{arch}", where)
        return image

    def _stored_or_pulled(self, reference: str) -> oci.Image:
        """The image the store has under ``reference``, else (or with --pull) the one its registry has."""
        from builder.oci.store import ImageNotFound

        solver = self.solver
        options = solver.options
        from_registry = pullable(reference)
        if not (options.pull and from_registry):
            try:
                digest, stored = solver.store.resolve_entry(reference)
            except ImageNotFound:
                if not from_registry:
                    raise
            else:
                if from_registry:
                    solver.base_images.setdefault(reference, _resolved(reference, digest))
                return stored.image
        if options.dry_run:
            raise _StageRunsFirst(f"{reference} is pulled when the build runs")
        from builder.registry.pull import pull
        from builder.registry.reference import insecure_hosts

        with solver._pull_lock:  # stages FROM the same image pull it once
            if reference in solver.base_images:
                return solver.store.resolve(solver.base_images[reference].rsplit("@", 1)[1]).image
            try:
                pulled = pull(solver.store, reference, insecure=insecure_hosts(options.insecure_registries),
                              report=solver.progress.message,
                              unpack=lambda image: unpack_layers(solver.snapshots, solver.blobs, image))
            except PybuildError as exc:
                local = "" if options.pull else "is not in the local store, and "
                raise PybuildError(f"image {reference!r} {local}pulling it failed: {exc.message}",
                                   hint=exc.hint) from None
            resolved = _resolved(reference, pulled.digest)
            solver.base_images[reference] = resolved
        solver.progress.message(f"FROM {reference}: {resolved}")
        return pulled.image.image

    @contextlib.contextmanager
    def mounted_image(self, image: oci.Image) -> Iterator[Path]:
        """A read-only view of an image's root filesystem (writes go to a throw-away upper dir)."""
        from builder.fs.snapshot import mounted_root

        scratch = self.solver.scratch_dir()
        try:
            lowers = [self.solver.snapshots.path(layer.diff_id) for layer in image.layers]
            with mounted_root(lowers, scratch) as root:
                yield root.merged
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @contextlib.contextmanager
    def source_root(self, reference: str | None, where: SourceRange | None):
        """Where COPY --from or a RUN bind mount reads: the context, a named context, a stage or an image."""
        if reference is None:
            yield self.solver.context
            return
        named = self.solver.options.named_contexts.get(reference)
        if named is not None and not named.startswith(IMAGE_CONTEXT_PREFIXES):
            from builder.fs.context import BuildContext

            yield BuildContext(Path(named))
            return
        stage = self.solver.graph.stage_by_reference(reference, self.stage.index)
        if stage is not None:
            image = self.solver.stage_image(stage.index)
        elif reference.isdigit():
            raise PybuildError(f"--from={reference}: there is no stage {reference} before this one", where)
        else:
            image = self.image(reference, where)
        with self.mounted_image(image) as root:
            yield root

    # Filesystem changes

    def change(self, state: StageState, action: Callable[[Path], None], *,
               independent: bool = False, direct: bool = False) -> oci.Layer | None:
        """Apply ``action`` to the stage's root; what it changed becomes a layer (None: it changed nothing).

        ``direct``: ``action`` writes only additions into an empty layer dir instead of a mounted root.
        """
        from builder.fs.diff import LowerView
        from builder.fs.layer import write_layer
        from builder.fs.snapshot import StepRoot, fit_root, mounted_root

        solver = self.solver
        layers = () if independent else state.image.layers
        lowers = [solver.snapshots.path(layer.diff_id) for layer in layers]
        scratch = solver.scratch_dir()
        try:
            if direct:
                root = StepRoot(merged=scratch / "layer", upper=scratch / "layer", lower_stat=LowerView(lowers).stat)
                root.upper.mkdir()
                fit_root(root.upper, lowers)
                action(root.upper)
            else:
                with mounted_root(lowers, scratch) as root:
                    action(root.merged)
            # Only hashed here: the blob is written in the background, and only if the image needs it.
            layer = write_layer(root.upper, None, compression=solver.options.compression,
                                source_date_epoch=solver.options.source_date_epoch,
                                lower_stat=None if independent else root.lower_stat)
            if layer is None:
                return None
            below = None if independent else lowers
            exported = self.stage.index in solver.exported_stages
            if exported and solver.snapshots.has(layer.diff_id):
                solver.pending_layers.write_now(layer, root.upper, below)
            snapshot = solver.snapshots.adopt(layer.diff_id, root.upper)
            solver.pending_layers.add(layer, snapshot, below, start=exported)
            return layer
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def make_workdir(self, state: StageState, op: WorkdirOp) -> oci.Layer | None:
        from builder.fs.copy import make_directory
        from builder.fs.diff import LowerView
        from builder.fs.users import resolve_user

        parts = op.path.split("/")
        if not op.user and "." not in parts and ".." not in parts:
            # A directory the stage already has (through no symlink) is left as it is: no root to mount.
            found = LowerView([self.solver.snapshots.path(layer.diff_id) for layer in state.image.layers]).stat(op.path)
            if found is not None and stat.S_ISDIR(found.st_mode):
                return None

        def action(root: Path) -> None:
            owner = None
            if op.user:
                ids = resolve_user(root, op.user)
                owner = (ids.uid, ids.gid)
            make_directory(root, op.path, owner=owner)

        return self.change(state, action)

    def copy(self, state: StageState, op: CopyOp, previous: PreviousLayer | None = None) -> oci.Layer | None:
        """COPY and ADD write straight into a fresh layer dir, reading the image only to place files.

        Creating files through an overlay mount costs about ten times what it costs in a plain
        directory, and a copy never deletes anything, so its change needs no overlay upper dir.
        """
        from builder.fs.context import resolve_in_root
        from builder.fs.copy import container_path, copy_into, write_inline
        from builder.fs.users import resolve_chown

        expanded = op.copy
        is_add = isinstance(expanded, Add)  # do_copy has checked the flags and destination (builder.checks)
        from_ = expanded.from_ if isinstance(expanded, Copy) else None
        below = oci.Image() if expanded.link else state.image  # --link: a layer independent of what is below

        with self.source_root(from_, op.location) as source, self.mounted_image(below) as view:
            chown = resolve_chown(view, expanded.chown) if expanded.chown else None
            target = container_path(op.workdir, expanded.dest)
            real = resolve_in_root(view, target).relative_to(view)
            is_directory = expanded.dest.endswith(("/", "/.")) or expanded.dest == "."
            dest = "/" + str(real).lstrip(".").lstrip("/") + ("/" if is_directory else "")

            def action(layer_dir: Path) -> None:
                _replicate_directories(view, layer_dir, real)
                for heredoc in expanded.source_contents:
                    write_inline(layer_dir, heredoc.name, heredoc_body(heredoc).encode(), dest, chown=chown,
                                 chmod=expanded.chmod)
                if expanded.sources:
                    copy_into(layer_dir, expanded.sources, dest, source=source, chown=chown,
                              chmod=expanded.chmod, parents=getattr(expanded, "parents", False),
                              excludes=expanded.excludes, is_add=is_add,
                              checksum=getattr(expanded, "checksum", None),
                              keep_git_dir=bool(getattr(expanded, "keep_git_dir", False)), reuse_from=previous)

            return self.change(state, action, independent=expanded.link, direct=True)

    def run(self, state: StageState, op: RunOp) -> oci.Layer | None:
        from builder.fs.users import resolve_user, user_home

        network = op.network or self.solver.options.network
        check_network(network, op.location)
        progress = self.solver.progress
        step = self.current_step

        def action(root: Path) -> None:
            from builder.fs.copy import make_directory
            from builder.sandbox.namespace import GRANT_HINT, entered

            isolation = entered()
            if isolation is not None and isolation.missing:
                raise PybuildError(isolation.missing, op.location, hint=GRANT_HINT)
            ids = resolve_user(root, op.user)
            check_mapped(ids.uid, ids.gid, f"USER {op.user}")
            make_directory(root, op.cwd)
            # Neither goes into the image's Env or the history: HOME as runc fills it in for BuildKit,
            # SOURCE_DATE_EPOCH because layers clamp file times to it, so tools that honour it (Python's
            # compileall writes hash-based .pyc) leave output that stays valid after clamping.
            env = dict(op.env)
            for name, value in (("HOME", user_home(root, ids.uid)),
                                ("SOURCE_DATE_EPOCH", str(self.solver.options.source_date_epoch))):
                env.setdefault(name, value)
            variation = self.solver.options.variation
            for name, value in variation.env if variation else ():
                env.setdefault(name, value)
            with contextlib.ExitStack() as stack:
                sandbox_mounts = [self._sandbox_mount(stack, mount, env, op.location) for mount in op.mounts]
                spec = sandbox.SandboxSpec(
                    rootfs=root, argv=op.argv, env=tuple(env.items()), cwd=op.cwd, uid=ids.uid, gid=ids.gid,
                    groups=ids.groups, network="none" if network == "none" else "host",
                    mounts=tuple(item for item in sandbox_mounts if item is not None), scripts=op.scripts,
                    **({"hostname": variation.hostname} if variation else {}),
                )
                try:
                    code = sandbox.run(spec, lambda data: progress.output(step, data),
                                       server=self.solver.sandboxes.server())
                except sandbox.SandboxError as exc:
                    raise PybuildError(f"RUN: {exc.message}", op.location, hint=exc.hint) from None
            if code != 0:
                tail = "".join(f"\n  > {line}" for line in progress.last_lines(step)[-5:])
                message = f"RUN failed with exit code {code}\ncommand: {' '.join(op.argv)}"
                raise RunFailed(message + (f"\nlast output:{tail}" if tail else ""), op.location,
                                exit_code=code if 0 < code < 256 else 1)

        return self.change(state, action)

    def _sandbox_mount(self, stack: contextlib.ExitStack, mount: Mount, env: dict[str, str],
                       location: SourceRange | None):
        check_mount(mount, location)
        kind = mount.type
        if kind == "bind":
            from builder.fs.context import BuildContext, PathEscape, SourceTree, resolve_in_root

            source = stack.enter_context(self.source_root(mount.from_, location))
            base = source.root if isinstance(source, SourceTree) else source
            try:
                path = resolve_in_root(Path(base), mount.source or "/", confined=isinstance(source, SourceTree))
            except PathEscape:
                raise PybuildError(f"RUN --mount source {mount.source!r} leads outside its root",
                                   location) from None
            if not path.exists():
                raise PybuildError(f"RUN --mount source {mount.source!r} does not exist", location)
            if isinstance(source, BuildContext) and source.ignore is not None:
                # What the ignore file drops is no more part of the context for a mount than for COPY.
                rel = source.real_rel(path)
                if not source.present(rel, is_dir=path.is_dir()):
                    raise PybuildError(f"RUN --mount source {mount.source!r} is excluded by {source.ignore_file}",
                                       location)
                if path.is_dir():
                    scratch = self.solver.scratch_dir()
                    stack.callback(shutil.rmtree, scratch, True)
                    path = source.view(rel, scratch)
            writable = mount.readonly is False
            if writable:
                # `rw`: the step may write, but what it writes is thrown away with the step.
                from builder.fs.snapshot import mounted_root

                scratch = self.solver.scratch_dir()
                stack.callback(shutil.rmtree, scratch, True)
                if path.is_dir():
                    path = stack.enter_context(mounted_root([path], scratch)).merged
                else:
                    path = Path(shutil.copy2(path, scratch / "file"))
            return sandbox.BindMount(source=path, target=_absolute(mount.target), readonly=not writable)
        if kind == "cache":
            return self._cache_mount(stack, mount, location)
        if kind == "tmpfs":
            size = mount_size(mount.size) if mount.size is not None else None
            return sandbox.TmpfsMount(target=_absolute(mount.target), size=size)
        # A secret: the last of the types check_mount lets through.
        secret_id = _secret_id(mount)
        source_spec = self.solver.options.secrets.get(secret_id)
        if source_spec is None:
            if mount.required:
                raise PybuildError(f"secret {secret_id!r} is required but was not given with --secret",
                                   location)
            return None
        value = source_spec.read()
        if mount.env:
            env[mount.env] = value.decode()
            if not mount.target:
                return None
        return sandbox.SecretMount(source=None, content=value,
                                   target=mount.target or f"/run/secrets/{secret_id}",
                                   mode=mount_mode(mount.mode) if mount.mode is not None else 0o400,
                                   uid=mount_id("uid", mount.uid) if mount.uid is not None else 0,
                                   gid=mount_id("gid", mount.gid) if mount.gid is not None else 0)


    def _cache_mount(self, stack: contextlib.ExitStack, mount: Mount, location: SourceRange | None):
        """A cache mount: a directory kept between builds, never part of a layer nor of a key.

        Its id defaults to the target, as BuildKit's does; a ``from`` seeds a new cache with that source's
        ``source`` path (which is then part of what names the cache, so two seeds never share one).
        """
        from builder.fs.context import PathEscape, SourceTree, resolve_in_root

        uid = mount_id("uid", mount.uid) if mount.uid is not None else 0
        gid = mount_id("gid", mount.gid) if mount.gid is not None else 0
        check_mapped(uid, gid, "RUN --mount=type=cache")
        mode = mount_mode(mount.mode) if mount.mode is not None else 0o755
        name = mount.id or _absolute(mount.target)
        seed = None
        if mount.from_ is not None:
            source = stack.enter_context(self.source_root(mount.from_, location))
            base = source.root if isinstance(source, SourceTree) else source
            try:
                seed = resolve_in_root(Path(base), mount.source or "/", confined=isinstance(source, SourceTree))
            except PathEscape:
                raise PybuildError(f"RUN --mount source {mount.source!r} leads outside its root", location) from None
            if not seed.is_dir():
                raise PybuildError(f"RUN --mount=type=cache: source {mount.source or '/'!r} of {mount.from_} is not "
                                   "a directory", location)
            name = f"{name}\0from={mount.from_}\0source={mount.source or '/'}"
        from cache.mounts import CacheMounts

        path = stack.enter_context(CacheMounts(self.solver.cache_mounts_root).acquire(
            name, sharing=mount.sharing or "shared", uid=uid, gid=gid, mode=mode, seed=seed))
        if mount.from_ is None and mount.source:  # a subdirectory of the cache
            from builder.fs.copy import make_directory

            path = make_directory(path, mount.source, owner=(uid, gid))
        return sandbox.BindMount(source=path, target=_absolute(mount.target), readonly=bool(mount.readonly))


def _resolved(reference: str, digest: str) -> str:
    """``registry/repository@digest``: the same whether the image was pulled now or found in the store."""
    from builder.registry.reference import parse_remote

    remote = parse_remote(reference)
    return f"{remote.registry}/{remote.repository}@{digest}"


def pullable(reference: str) -> bool:
    """A reference a registry could serve: a name (with a tag or digest), not an image ID."""
    from builder.oci.store import _HEX_PREFIX, _REFERENCE

    return bool(_REFERENCE.fullmatch(reference)) and not (
        reference.startswith("sha256:") or len(reference) == 64 and _HEX_PREFIX.fullmatch(reference))


def unpack_layers(snapshots, blobs, image: oci.Image) -> None:
    """Unpack the image's layers that have no snapshot yet, so steps can stack them as overlay lowers."""
    for layer in image.layers:
        if not snapshots.has(layer.diff_id):
            blob = blobs.path(layer.digest)
            try:
                snapshots.unpack(layer.diff_id, blob)
            except UnmappedId:
                raise  # the blob is fine: the build's user namespace is too small for it
            except PybuildError as exc:
                try:
                    blobs.verify(layer.digest)
                except PybuildError:
                    hint = f"the blob is damaged: remove {blob} and load or build the image again"
                else:  # intact as its source made it: loading it again would fail the same way
                    hint = "the layer is as its image's source made it: that image is malformed"
                    isolation = entered()
                    if os.geteuid() != 0 and isolation is not None and isolation.isolation == "none":
                        hint = ("as a user other than root without a user namespace, pybuild cannot give a layer's "
                                "files the owners it names: run it as root, or where user namespaces are allowed "
                                "(see the README, 'In a CI job's container')")
                raise PybuildError(f"cannot unpack layer blob {layer.digest}: {exc.message}", hint=hint) from None


def _replicate_directories(view: Path, layer_dir: Path, path: Path) -> None:
    """Give the layer dir the image's existing directories along ``path``, with their metadata.

    Copying then sees the destination as it is in the image (an existing directory is merged into,
    not replaced), and directories left unchanged are dropped from the layer by the layer writer.
    """
    current_view, current_layer = view, layer_dir
    for name in path.parts:
        current_view, current_layer = current_view / name, current_layer / name
        try:
            st = os.lstat(current_view)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        current_layer.mkdir()
        os.chown(current_layer, st.st_uid, st.st_gid)
        os.chmod(current_layer, stat.S_IMODE(st.st_mode))
        os.utime(current_layer, ns=(st.st_atime_ns, st.st_mtime_ns))


def sweep_stale_scratch(tmp_root: Path, unpacking: Path) -> None:
    """Remove what killed builds left half made: step dirs, blob temp files, verify's scratch stores (a step still
    running when verify was interrupted keeps its mount, and so its dir, until the process ends), snapshots being
    unpacked or removed.

    Each is named ``<kind>-<pid>-<random>`` by the process that made it; those whose process is gone go.
    """
    for pattern, directory in (("step-*-*", tmp_root), (".blob-*-*", tmp_root), ("verify-*-*", tmp_root),
                               ("unpack-*-*", unpacking), ("remove-*-*", unpacking)):
        for entry in directory.glob(pattern):
            pid = entry.name.split("-")[1]
            if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)



def _secret_id(mount: Mount) -> str:
    """A secret mount's id: given, or as BuildKit takes it, the target's last name."""
    return mount.id or posixpath.basename((mount.target or "").rstrip("/"))


def _absolute(target: str | None) -> str:
    return target if (target or "").startswith("/") else "/" + (target or "")
