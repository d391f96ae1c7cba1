"""One `pybuild build`: namespace, graph, solver, then the image into the store and the requested outputs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.checks import check_graph
from builder.graph import build_graph, host_platform
from builder.oci.image import config_json, sha256_digest
from builder.oci.store import atomic_file
from builder.progress import make_progress
from builder.sandbox.parent import Interpreter
from builder.solver import BuildOptions, SecretSource, Solver
from cache.leases import shared_lease
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


@dataclass
class BuildResult:
    """What a build made: the image ID, the manifest digest and the names it was stored under."""

    image_id: str
    manifest_digest: str
    names: tuple[str, ...]


def run_build(request: BuildRequest, state_root: Path, interpreter: Interpreter | None = None) -> BuildResult:
    """Build what ``request`` asks into the store at ``state_root``.

    The caller chooses the store before the build enters its namespace (where every user is root);
    ``interpreter``, a sandbox started ahead by the caller, serves the first RUN.
    """
    from builder.sandbox.namespace import enter_build_namespace

    os_name, arch, _ = host_platform()
    if request.platform not in (None, f"{os_name}/{arch}"):
        raise PybuildError(f"--platform={request.platform}: pybuild builds only for this machine ({os_name}/{arch})")
    graph = build_graph(request.dockerfile, request.build_args, request.target)
    check_graph(graph)  # mistakes the Dockerfile's text shows fail the build before any step runs
    # Before any thread starts: the namespace calls need a single-threaded process.
    enter_build_namespace()
    root = state_root
    progress = make_progress(request.progress)
    with shared_lease(root):  # nothing this build unpacks or writes can be freed while it runs
        try:
            if graph.unused_build_args:
                progress.message(f"[warning] build args were not consumed: {', '.join(graph.unused_build_args)}")
            options = BuildOptions(
                context=request.context, build_args=request.build_args, target=request.target,
                compression=request.compression, secrets=request.secrets, network=request.network,
                named_contexts=request.named_contexts, source_date_epoch=request.source_date_epoch,
                dockerfile_path=request.dockerfile_path, no_cache=request.no_cache,
                no_cache_stages=request.no_cache_stages,
            )
            solver = Solver(graph, options, progress, root, interpreter)
            image = solver.solve()
            names = tuple(request.tags)
            for output in request.outputs:
                if output.get("type") == "image" and output.get("name"):
                    names += tuple(output["name"].split(","))
            manifest = solver.store.write_image(image, names)
            image_id = sha256_digest(config_json(image))  # docker's image ID: the config blob write_image stored
            for output in request.outputs:
                from builder.oci.exporter import with_gzip_layers, write_oci_archive, write_rootfs

                kind = output["type"]
                if kind == "oci":
                    write_oci_archive(solver.store, [(manifest, names)], Path(output["dest"]))
                elif kind == "docker":
                    gzipped = solver.store.write_image(with_gzip_layers(solver.store, image), ())
                    write_oci_archive(solver.store, [(gzipped, names)], Path(output["dest"]))
                elif kind == "local":
                    write_rootfs(solver.store, image, Path(output["dest"]))
            if request.iidfile:
                _write_text(request.iidfile, image_id)
            if request.metadata_file:
                metadata = {"containerimage.config.digest": image_id, "containerimage.digest": manifest.digest,
                            "containerimage.descriptor": manifest.to_json()}
                if names:
                    metadata["image.name"] = ",".join(names)
                _write_text(request.metadata_file, json.dumps(metadata, indent=2))
            progress.result(image_id, manifest.digest, names)
            return BuildResult(image_id, manifest.digest, names)
        finally:
            progress.close()


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as file:
        file.write(text.encode())
