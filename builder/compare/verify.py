"""``pybuild verify``: rebuild an image from its source, with no cache, in a scratch store, and compare.

The scratch store lives under the store's ``tmp/`` (so base images are hard-linked in, not copied) and is
removed afterwards, whatever happens; the user's store gains no name. The rebuild takes the image's own
``SOURCE_DATE_EPOCH`` (its ``created`` time) unless one is given, and its layers' compression.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from builder.compare.images import Comparison, Side, compare_images
from builder.oci.image import MEDIA_LAYER_GZIP
from builder.oci.store import ImageStore, StoredImage
from parser.dataclass import dataclass
from parser.errors import PybuildError
from parser.instructions import Dockerfile, From

if TYPE_CHECKING:
    from builder.solver import SecretSource, Variation


class RebuildFailed(PybuildError):
    """The rebuild itself failed: verify cannot say whether the image came from the source."""


@dataclass
class VerifyRequest:
    image: str
    context: Path
    dockerfile: Dockerfile
    dockerfile_path: Path | None
    build_args: Mapping[str, str]
    target: str | None
    named_contexts: Mapping[str, str]
    source_date_epoch: int | None
    progress: str
    secrets: Mapping[str, SecretSource] = field(default_factory=dict)
    network: str = "default"
    provenance: Path | None = None
    dockerfile_source: bytes = b""
    variation: Variation | None = None  # --check-reproducible: other conditions for the rebuild's RUN steps
    isolation: str = "auto"  # --isolation for the rebuild


def open_image(store: ImageStore, reference: str) -> StoredImage:
    """An image by store reference, archive or layout, else from its registry (read, not named in the store)."""
    from builder.oci.store import ImageNotFound
    from builder.solver import pullable

    try:
        return store.open(reference)
    except ImageNotFound:
        if not pullable(reference):
            raise
    from builder.registry.pull import pull

    try:
        return pull(store, reference, keep=False).image
    except PybuildError as exc:
        raise PybuildError(f"image {reference!r} is not in the local store, and pulling it failed: {exc.message}",
                           hint=exc.hint) from None


def side(store: ImageStore, reference: str, stored: StoredImage | None = None) -> Side:
    stored = stored or open_image(store, reference)
    config = json.loads(store.blobs.read_bytes(stored.image_id))
    return Side(reference, stored.manifest.digest, stored.image_id, stored.image, config, store.blobs.open)


def epoch_of(created: str) -> int:
    """An image's ``created`` time as seconds since the epoch (what SOURCE_DATE_EPOCH it was built with)."""
    if not created:
        return 0
    try:
        return int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise PybuildError(f"the image's created time {created!r} is not a date; give --source-date-epoch") from None


def line_finder(dockerfile: Dockerfile) -> Callable[[str], int | None]:
    """A history entry's line in the Dockerfile: the first instruction whose text it ends with."""
    candidates = []
    for instruction in dockerfile.instructions:
        text = " ".join(instruction.original.split())
        keyword, _, rest = text.partition(" ")
        candidates.append((keyword.upper(), rest, instruction.location.start_line))

    def line_of(created_by: str) -> int | None:
        normalized = " ".join(created_by.split())
        for keyword, rest, line in candidates:
            if normalized.upper().startswith(keyword) and normalized.endswith(rest):
                return line
        return None

    return line_of


def _with_provenance(request: VerifyRequest, manifest: str) -> tuple[VerifyRequest, list[str]]:
    """The rebuild's parameters from a provenance statement, and where the source given is not what it names."""
    import hashlib

    from builder.compare.provenance import context_digest, read_provenance

    assert request.provenance is not None
    statement = read_provenance(request.provenance)
    mismatches = []
    if statement.subject != manifest:
        mismatches.append(f"the image is not the provenance's subject ({manifest} vs {statement.subject})")
    dockerfile = hashlib.sha256(request.dockerfile_source).hexdigest()
    if dockerfile != statement.dockerfile_sha256:
        mismatches.append(f"the Dockerfile is not the one the provenance names (sha256:{dockerfile} vs "
                          f"sha256:{statement.dockerfile_sha256})")
    context, _ = context_digest(request.context, request.dockerfile_path, request.provenance)
    if context != statement.context_sha256:
        mismatches.append(f"the context is not the one the provenance names (sha256:{context} vs "
                          f"sha256:{statement.context_sha256})")
    return replace(request, build_args={**statement.build_args, **request.build_args},
                   target=request.target or statement.target,
                   named_contexts={**statement.named_contexts, **request.named_contexts},
                   source_date_epoch=request.source_date_epoch if request.source_date_epoch is not None
                   else statement.source_date_epoch), mismatches


def verify(store_root: Path, request: VerifyRequest) -> Comparison:
    """Rebuild ``request.image`` from its source and compare (A: the image, B: the rebuild)."""
    from builder.build import BuildRequest, run_build

    store = ImageStore(store_root)
    target = open_image(store, request.image)
    mismatches: list[str] = []
    if request.provenance is not None:
        request, mismatches = _with_provenance(request, target.manifest.digest)
    epoch = request.source_date_epoch if request.source_date_epoch is not None else epoch_of(target.created)
    from builder.fs.snapshot import Snapshots
    from builder.solver import sweep_stale_scratch

    sweep_stale_scratch(store_root / "tmp", Snapshots(store_root / "snapshots").unpacking())
    scratch = store_root / "tmp" / f"verify-{os.getpid()}-{secrets.token_hex(4)}"
    scratch.mkdir(parents=True)
    try:
        rebuilt_store = ImageStore(scratch)
        stage_names = {instruction.stage_name.lower() for instruction in request.dockerfile.instructions
                       if isinstance(instruction, From) and instruction.stage_name}
        for instruction in request.dockerfile.instructions:
            if isinstance(instruction, From) and instruction.image.lower() not in stage_names | {"scratch"} \
                    and "$" not in instruction.image:
                with contextlib.suppress(PybuildError):  # not in the store: the rebuild pulls it, or says so
                    rebuilt_store.copy_from(store, instruction.image)
        gzip = bool(target.image.layers) and all(layer.media_type == MEDIA_LAYER_GZIP
                                                 for layer in target.image.layers)
        build_args = dict(request.build_args)
        build_args.setdefault("SOURCE_DATE_EPOCH", str(epoch))
        rebuild = BuildRequest(
            dockerfile=request.dockerfile, context=request.context, dockerfile_path=request.dockerfile_path,
            build_args=build_args, target=request.target, named_contexts=request.named_contexts,
            compression="gzip" if gzip else "zstd", progress=request.progress, source_date_epoch=epoch,
            no_cache=True, variation=request.variation, secrets=request.secrets, network=request.network,
            isolation=request.isolation)
        cpus, umask = os.sched_getaffinity(0), None
        try:
            if request.variation is not None:
                umask = os.umask(0o077)  # the builder's umask must not reach a layer
                if len(cpus) > 1:
                    os.sched_setaffinity(0, {min(cpus)})  # one CPU: another parallelism
            result = run_build(rebuild, scratch)
        except PybuildError as exc:
            raise RebuildFailed(f"the rebuild failed: {exc.render().splitlines()[0]}", hint=exc.hint) from None
        finally:
            if umask is not None:
                os.umask(umask)
                os.sched_setaffinity(0, cpus)
        rebuilt = rebuilt_store.resolve(result.manifest_digest)
        comparison = compare_images(side(store, request.image, target), side(rebuilt_store, "the rebuild", rebuilt),
                                    line_finder(request.dockerfile))
        return replace(comparison, provenance=mismatches)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
