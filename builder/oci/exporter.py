"""Write stored images out: as a deterministic OCI archive that podman, skopeo and docker load, or as a root tree.

The archive is an OCI image layout tar (``oci-layout``, ``index.json``, ``blobs/sha256/*``) plus
docker's ``manifest.json``. Every member has mtime 0, owner 0:0, no user names and mode 0644
(directories 0755), in sorted order, so the same images always give the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from builder.fs.untar import extract_tar, open_layer
from builder.oci.image import (
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    Image,
    canonical_json,
    index_json,
)
from builder.oci.store import CONTAINERD_NAME_ANNOTATION, OCI_LAYOUT, ImageStore, atomic_file, full_name, normalize_name
from parser.errors import PybuildError


class _HashingReader:
    """Hashes what tarfile reads from a blob, so a blob damaged on disk is caught before the archive is kept."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.hash.update(data)
        return data


def _member(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    return info


def _blob_member(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


ATTESTATION_TYPE = "application/vnd.in-toto+json"
PREDICATE_ANNOTATION = "in-toto.io/predicate-type"


def attestation_index(store: ImageStore, manifest: Descriptor, statement: bytes, predicate_type: str) -> Descriptor:
    """An image index of the image's manifest and an attestation manifest carrying ``statement``, as BuildKit
    attaches provenance (the attestation's platform unknown/unknown, its annotations naming the image's digest),
    so registries and skopeo copy it with the image. Its blobs go into the store."""
    statement_digest = store.blobs.put_bytes(statement)
    config = canonical_json({"architecture": "unknown", "os": "unknown", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [statement_digest]}})
    config_digest = store.blobs.put_bytes(config)
    attestation = canonical_json({
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": ATTESTATION_TYPE, "digest": statement_digest, "size": len(statement),
                    "annotations": {PREDICATE_ANNOTATION: predicate_type}}]})
    attestation_descriptor = Descriptor(
        MEDIA_MANIFEST, store.blobs.put_bytes(attestation), len(attestation),
        annotations=(("vnd.docker.reference.digest", manifest.digest),
                     ("vnd.docker.reference.type", "attestation-manifest")),
        platform=(("architecture", "unknown"), ("os", "unknown")))
    index = index_json([manifest, attestation_descriptor])
    return Descriptor(MEDIA_INDEX, store.blobs.put_bytes(index), len(index))


def write_oci_archive(store: ImageStore, images: Sequence[tuple[Descriptor, Sequence[str]]], dest: Path,
                      attestations: dict[str, Descriptor] | None = None) -> None:
    """Write ``images`` (manifest descriptor, names) to ``dest`` atomically: a failure leaves no partial file.

    ``attestations``: for a manifest digest, the image index (``attestation_index``) to name instead of it.
    """
    dest = Path(dest)
    attestations = attestations or {}
    # One image given twice (say, by two of its names) is one image with both names.
    named: dict[str, tuple[Descriptor, list[str]]] = {}
    for descriptor, names in images:
        named.setdefault(descriptor.digest, (descriptor, []))[1].extend(names)
    entries: list[Descriptor] = []
    docker_manifest = []
    blobs: dict[str, int] = {}
    for descriptor, names in named.values():
        stored_manifest = json.loads(store.blobs.read_bytes(descriptor.digest))
        config = stored_manifest["config"]
        layers = stored_manifest.get("layers") or []
        for item in (descriptor.to_json(), config, *layers):
            blobs[item["digest"]] = int(item["size"])
        plain = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size, platform=descriptor.platform)
        if descriptor.digest in attestations:
            plain = attestations[descriptor.digest]
            for item in json.loads(store.blobs.read_bytes(plain.digest))["manifests"][1:]:
                attestation = json.loads(store.blobs.read_bytes(item["digest"]))
                for part in (item, attestation["config"], *attestation["layers"]):
                    blobs[part["digest"]] = int(part["size"])
            blobs[plain.digest] = plain.size
        short_names = list(dict.fromkeys(normalize_name(name) for name in names))
        # ref.name carries the familiar name (skopeo's oci-archive:FILE:NAME and podman read it);
        # containerd reads its own annotation, which wants the fully qualified name.
        entries.extend(Descriptor(plain.media_type, plain.digest, plain.size, platform=plain.platform,
                                  annotations=((CONTAINERD_NAME_ANNOTATION, full_name(name)),
                                               (REF_NAME_ANNOTATION, name)))
                       for name in short_names)
        if not short_names:
            entries.append(plain)
        docker_manifest.append({"Config": _blob_member(config["digest"]), "RepoTags": short_names,
                                "Layers": [_blob_member(layer["digest"]) for layer in layers]})
    small_files = {"oci-layout": OCI_LAYOUT, "index.json": index_json(entries),
                   "manifest.json": canonical_json(docker_manifest)}
    members = sorted(["blobs", "blobs/sha256", *map(_blob_member, blobs), *small_files])
    with atomic_file(dest) as file, tarfile.open(fileobj=file, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for name in members:
            if name in ("blobs", "blobs/sha256"):
                archive.addfile(_member(name, directory=True))
            elif name in small_files:
                data = small_files[name]
                archive.addfile(_member(name, len(data)), io.BytesIO(data))
            else:
                _add_blob(store, archive, "sha256:" + name.rsplit("/", 1)[1], blobs)


def _add_blob(store: ImageStore, archive: tarfile.TarFile, digest: str, sizes: dict[str, int]) -> None:
    with store.blobs.open(digest) as file:
        if os.fstat(file.fileno()).st_size != sizes[digest]:
            raise store.blobs.corrupt_error(digest)
        reader = _HashingReader(file)
        archive.addfile(_member(_blob_member(digest), sizes[digest]), reader)
    if "sha256:" + reader.hash.hexdigest() != digest:
        raise store.blobs.corrupt_error(digest)


def write_rootfs(store: ImageStore, image: Image, dest: Path) -> None:
    """Flatten the image's layers into ``dest``, applying each layer's whiteouts to those below it."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PybuildError(f"cannot write the output directory {dest}: {exc.strerror}") from None
    for layer in image.layers:
        with store.blobs.open(layer.digest) as file:
            extract_tar(open_layer(file), dest, whiteouts="apply", label=f"layer {layer.digest}")


def with_gzip_layers(store: ImageStore, image: Image) -> Image:
    """The same image with every layer stored gzip-compressed, for clients that read no zstd (docker load).

    The diff IDs, and so the config and the image ID, stay the same; only the manifest changes.
    """
    layers = []
    for layer in image.layers:
        if layer.media_type in (MEDIA_LAYER_GZIP, MEDIA_LAYER):
            layers.append(layer)
            continue
        with store.blobs.open(layer.digest) as source, store.blobs.writer() as out, \
                gzip.GzipFile(fileobj=out.file, mode="wb", compresslevel=6, mtime=0, filename="") as compressed:
            shutil.copyfileobj(open_layer(source), compressed, 1 << 20)
        layers.append(replace(layer, digest=out.digest, size=out.size, media_type=MEDIA_LAYER_GZIP))
    return replace(image, layers=tuple(layers))
