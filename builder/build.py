"""One `pybuild build`: namespace, graph, solver, then the image into the store and the requested outputs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path

from builder.checks import check_graph
from builder.graph import build_graph, host_platform
from builder.oci.image import config_json, sha256_digest
from builder.oci.store import atomic_file
from builder.progress import make_progress
from builder.rebuild import RebuildOptions
from builder.sandbox.parent import SandboxServer
from builder.solver import BuildOptions, SecretSource, Solver, Variation
from cache.leases import shared_lease
from parser.dataclass import dataclass
from parser.errors import PybuildError
from parser.instructions import Dockerfile


@dataclass
class BuildRequest:
    """Everything one ``pybuild build`` asks for, as the CLI read it."""

    dockerfile: Dockerfile
    context: Path
    dockerfile_path: Path | None = None
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    outputs: Sequence[Mapping[str, str]] = ()
    iidfile: Path | None = None
    metadata_file: Path | None = None
    secrets: Mapping[str, SecretSource] = field(default_factory=dict)
    network: str = "default"
    named_contexts: Mapping[str, str] = field(default_factory=dict)
    compression: str = "zstd"
    platform: str | None = None
    progress: str = "auto"
    source_date_epoch: int = 0
    no_cache: bool = False
    no_cache_stages: frozenset[str] = frozenset()
    cache_from: tuple[Mapping[str, str], ...] = ()
    cache_to: tuple[Mapping[str, str], ...] = ()
    dry_run: bool = False
    pull: bool = False
    push: bool = False  # --push: every name (-t, and type=image's) is pushed to its registry
    insecure_registries: tuple[str, ...] = ()  # --insecure-registry hosts
    provenance: Path | None = None  # --provenance FILE: an in-toto statement of SLSA provenance v1
    dockerfile_source: bytes = b""  # the Dockerfile's bytes, for the provenance's digest of it
    variation: Variation | None = None  # conditions varied for RUN (--check-reproducible's second build)
    rebuild: RebuildOptions | None = None  # set where a rebuild with nothing changed may skip the builder
    isolation: str = "auto"  # --isolation: how RUN steps are isolated (builder.sandbox.namespace.ISOLATIONS)


@dataclass
class BuildResult:
    """What a build made: the image ID, the manifest digest and the names it was stored under."""

    image_id: str
    manifest_digest: str
    names: tuple[str, ...]


def run_build(request: BuildRequest, state_root: Path, sandbox_server: SandboxServer | None = None) -> BuildResult:
    """Build what ``request`` asks into the store at ``state_root``.

    The caller chooses the store before the build enters its namespace (where every user is root);
    ``sandbox_server``, started ahead by the caller, serves the RUN steps (the build closes it).
    """
    from builder.sandbox.namespace import enter_build_namespace

    os_name, arch, _ = host_platform()
    if request.platform not in (None, f"{os_name}/{arch}"):
        raise PybuildError(f"--platform={request.platform}: pybuild builds only for this machine ({os_name}/{arch})")
    graph = build_graph(request.dockerfile, request.build_args, request.target)
    check_graph(graph)  # mistakes the Dockerfile's text shows fail the build before any step runs
    # Before any thread starts: the namespace calls need a single-threaded process.
    isolation = enter_build_namespace(request.isolation)
    root = state_root
    progress = make_progress(request.progress)
    progress.message(isolation.describe())
    with shared_lease(root):  # nothing this build unpacks or writes can be freed while it runs
        try:
            if graph.unused_build_args:
                progress.message(f"[warning] build args were not consumed: {', '.join(graph.unused_build_args)}")
            options = BuildOptions(
                context=request.context, build_args=request.build_args, target=request.target,
                compression=request.compression, secrets=request.secrets, network=request.network,
                named_contexts=request.named_contexts, source_date_epoch=request.source_date_epoch,
                dockerfile_path=request.dockerfile_path, no_cache=request.no_cache,
                no_cache_stages=request.no_cache_stages, cache_from=request.cache_from, cache_to=request.cache_to,
                dry_run=request.dry_run, pull=request.pull, insecure_registries=request.insecure_registries,
                variation=request.variation,
            )
            solver = Solver(graph, options, progress, root, sandbox_server)
            image = solver.solve()
            if request.dry_run:
                planned = [step.state for step in progress.steps]
                progress.message(f"dry run: {planned.count('cached')} steps cached, {planned.count('would-run')} "
                                 "would run; nothing was run or stored")
                return BuildResult("", "", ())
            names = tuple(request.tags)
            pushed_names = names if request.push else ()
            for output in request.outputs:
                if output.get("type") in ("image", "registry") and output.get("name"):
                    names += tuple(output["name"].split(","))
                    if output["type"] == "registry" or output.get("push") == "true":
                        pushed_names += tuple(output["name"].split(","))
            if request.compression == "gzip":
                image = _gzip_throughout(solver, image)
            manifest = solver.store.write_image(image, names)
            image_id = sha256_digest(config_json(image))  # docker's image ID: the config blob write_image stored
            statement = _write_provenance(request, solver, manifest.digest, names) if request.provenance else None
            for output in request.outputs:
                from builder.oci.exporter import attestation_index, with_gzip_layers, write_oci_archive, write_rootfs

                kind = output["type"]
                if kind == "oci":
                    attached = {}
                    if statement is not None:  # the provenance travels with the image, as BuildKit attaches it
                        from builder.compare.provenance import PREDICATE_TYPE

                        attached[manifest.digest] = attestation_index(solver.store, manifest, statement,
                                                                      PREDICATE_TYPE)
                    write_oci_archive(solver.store, [(manifest, names)], Path(output["dest"]), attached)
                elif kind == "docker":
                    gzipped = solver.store.write_image(with_gzip_layers(solver.store, image), ())
                    write_oci_archive(solver.store, [(gzipped, names)], Path(output["dest"]))
                elif kind == "local":
                    write_rootfs(solver.store, image, Path(output["dest"]))
            pushed = None
            if pushed_names:
                from builder.registry.push import push
                from builder.registry.reference import insecure_hosts

                stored = solver.store.resolve(manifest.digest)
                insecure = insecure_hosts(request.insecure_registries)
                for name in dict.fromkeys(pushed_names):
                    pushed = push(solver.store, stored, name, insecure=insecure, report=progress.message)
                    progress.message(f"pushed {pushed.reference}: {pushed.digest} ({pushed.size} bytes)")
            if request.iidfile:
                _write_text(request.iidfile, image_id)
            if request.metadata_file:
                metadata = {"containerimage.config.digest": image_id, "containerimage.digest": manifest.digest,
                            "containerimage.descriptor": manifest.to_json()}
                if names:
                    metadata["image.name"] = ",".join(names)
                if solver.base_images:
                    metadata["pybuild.base-images"] = dict(solver.base_images)
                if pushed is not None:
                    from builder.registry.reference import parse_remote

                    metadata["containerimage.pushed"] = ",".join(str(parse_remote(name)) for name in pushed_names)
                _write_text(request.metadata_file, json.dumps(metadata, indent=2))
            progress.result(image_id, manifest.digest, names)
            if request.rebuild is not None and not solver.cache.unrecorded_inputs:
                _remember_for_rebuild(root, request, solver, progress, image, image_id, manifest.digest, names)
        finally:
            progress.close()
    keep_cache_in_bounds(root)
    return BuildResult(image_id, manifest.digest, names)


def _write_provenance(request: BuildRequest, solver: Solver, manifest: str, names: tuple[str, ...]) -> bytes:
    """Write the provenance statement to its file; returns its bytes (an OCI output attaches them too)."""
    from importlib.metadata import version

    from builder.compare.provenance import statement

    assert request.provenance is not None
    name = request.dockerfile.filename
    if request.dockerfile_path is not None and request.dockerfile_path.is_relative_to(request.context):
        name = str(request.dockerfile_path.relative_to(request.context))  # never the checkout's own path
    value = statement(manifest=manifest, names=names, dockerfile=request.dockerfile_source,
                      dockerfile_name=name, context=request.context,
                      dockerfile_path=request.dockerfile_path, build_args=request.build_args, target=request.target,
                      named_contexts=request.named_contexts, source_date_epoch=request.source_date_epoch,
                      base_images=solver.base_images, compression=request.compression, version=version("pybuild"),
                      path=request.provenance)
    text = json.dumps(value, indent=2) + "\n"
    _write_text(request.provenance, text)
    return text.encode()


def _gzip_throughout(solver: Solver, image):
    """--compression=gzip: the base image's layers too, for registries and clients that read no zstd.

    A layer converted once is recorded with the cache's layer blobs, so the next build reuses it.
    """
    from dataclasses import replace

    from builder.oci.exporter import with_gzip_layers
    from builder.oci.image import MEDIA_LAYER, MEDIA_LAYER_GZIP

    layers = []
    for layer in image.layers:
        if layer.media_type in (MEDIA_LAYER_GZIP, MEDIA_LAYER):
            layers.append(layer)
            continue
        known = solver.cache.layer_blobs.get(layer.diff_id, MEDIA_LAYER_GZIP)
        if known is not None and solver.blobs.size_of(known.digest) == known.size:
            layers.append(replace(layer, digest=known.digest, size=known.size, media_type=MEDIA_LAYER_GZIP))
            continue
        converted = with_gzip_layers(solver.store, replace(image, layers=(layer,))).layers[0]
        solver.cache.layer_written(converted)
        layers.append(converted)
    return replace(image, layers=tuple(layers))


def _remember_for_rebuild(root: Path, request: BuildRequest, solver: Solver, progress, image, image_id: str,
                          manifest: str, names: tuple[str, ...]) -> None:
    """What ``builder.rebuild.fast_rebuild`` needs to give this image again while nothing it read changes."""
    from builder.fs.context import ignore_file_for
    from builder.rebuild import record
    from cache.records import BuildRecords

    assert request.rebuild is not None
    dockerfile = Path(request.rebuild.dockerfile_path)
    entries = dict(solver.cache.read_paths)
    ignore = ignore_file_for(request.context, request.dockerfile_path)
    for path in (request.context, dockerfile, dockerfile.parent, ignore):
        if path is not None:
            entries.setdefault(str(path), None)
    steps = [(step.name, "cached" if step.number in solver.cache.filesystem_steps else "done")
             for step in progress.steps]
    identity = BuildRecords.identity(request.dockerfile_path, request.context, request.target)
    record(root, identity, request.rebuild, entries, solver.cache.used_keys(), steps,
           {"image_id": image_id, "manifest": manifest, "names": list(names)},
           [(str(solver.snapshots.path(layer.diff_id)), layer.digest, layer.size) for layer in image.layers])


CACHE_LIMIT_ENV = "PYBUILD_CACHE_LIMIT"
COLLECT_EVERY_SECONDS = 600


def cache_limit(root: Path) -> int | None:
    """How many bytes the build cache may keep beyond what images use: $PYBUILD_CACHE_LIMIT (a size such as
    20GB, 0 for no limit), by default a tenth of the store's filesystem, as BuildKit's default keeps."""
    import os

    from parser.flags import MountError, mount_size

    text = os.environ.get(CACHE_LIMIT_ENV)
    if text is None:
        stats = os.statvfs(root)
        return stats.f_blocks * stats.f_frsize // 10
    try:
        limit = mount_size(text)
    except MountError:
        raise PybuildError(f"{CACHE_LIMIT_ENV}={text!r}: write a size such as 20GB, or 0 for no limit") from None
    return limit or None


def keep_cache_in_bounds(root: Path) -> None:
    """After a build, at most every ten minutes: when the cache keeps more than its limit, forget its least
    recently used entries down to 80% of it, and free their layers. Only when no other build runs."""
    import time

    from cache.leases import exclusive_lease

    marker = root / "cache" / "last-collection"
    try:
        if time.time() - marker.stat().st_mtime < COLLECT_EVERY_SECONDS:
            return
    except FileNotFoundError:  # a new store: its first check comes ten minutes on
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return
    limit = cache_limit(root)
    with exclusive_lease(root, wait=False) as held:
        if not held:
            return
        marker.touch()
        if limit is None:
            return
        from builder.fs.snapshot import Snapshots
        from builder.oci.store import ImageStore
        from cache.gc import cache_usage, evict, free_unused

        images, snapshots = ImageStore(root), Snapshots(root / "snapshots")
        if cache_usage(images, snapshots, images.blobs.size_of, root / "cache").total <= limit:
            return
        evicted = evict(images, snapshots, images.blobs.size_of, root / "cache", keep_bytes=limit * 8 // 10)
        free_unused(images, snapshots, root / "cache", evicted=evicted)


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as file:
        file.write(text.encode())
