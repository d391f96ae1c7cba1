"""Pulling an image from a registry into the local store: the manifest (this platform's, from an index), its
config and layers, each verified, downloaded side by side, and named only once all are stored."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from builder.graph import host_platform
from builder.oci.image import (
    MEDIA_INDEX,
    MEDIA_MANIFEST,
    Descriptor,
    Image,
    Layer,
    image_from_config,
    index_from_json,
    json_object,
    manifest_from_json,
    parse_json,
)
from builder.oci.store import INDEX_TYPES, MANIFEST_TYPES, ImageStore, StoredImage, choose_platform
from builder.progress import size_text
from builder.registry.client import Registry
from builder.registry.reference import RemoteReference, insecure_hosts, parse_remote
from builder.registry.transfer import BlobLocations, download_blob, get_manifest
from parser.dataclass import dataclass
from parser.errors import PybuildError

ACCEPT = (*INDEX_TYPES, *MANIFEST_TYPES)
PARALLEL_DOWNLOADS = 3
MAX_INDEX_DEPTH = 4


@dataclass
class Pulled:
    """What a pull gave: the stored image, and the digest the reference resolved to on the registry."""

    image: StoredImage
    digest: str
    reference: RemoteReference
    downloaded: int


def _media_type(data: bytes, stated: str, label: str) -> str:
    value = json_object(parse_json(data, label), label)
    media_type = value.get("mediaType") if isinstance(value.get("mediaType"), str) else ""
    if media_type in (*INDEX_TYPES, *MANIFEST_TYPES):
        return media_type
    if stated in (*INDEX_TYPES, *MANIFEST_TYPES):
        return stated
    if "manifests" in value:
        return MEDIA_INDEX
    if value.get("schemaVersion") == 1:
        raise PybuildError(f"{label} is a Docker schema 1 manifest, which pybuild does not read",
                           hint="the image is very old; push it again with a current client")
    if "config" in value:
        return MEDIA_MANIFEST
    raise PybuildError(f"{label} is a {stated or media_type or 'document of unknown type'}, not an image")


def parse_platform(text: str | None) -> tuple[str, str, str]:
    """``os/arch[/variant]``; None means this machine's."""
    if not text:
        return host_platform()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise PybuildError(f"--platform={text}: write it as os/arch or os/arch/variant (e.g. linux/amd64)")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def pull(store: ImageStore, text: str, *, insecure: frozenset[str] | None = None, platform: str | None = None,
         report: Callable[[str], None] | None = None, registry: Registry | None = None,
         unpack: Callable[[Image], None] | None = None, keep: bool = True) -> Pulled:
    """Pull ``text`` (a reference) into ``store`` and name it there; returns the image and its registry digest.

    ``unpack`` is given the image before it is named (``pybuild pull`` unpacks its layers there), so an image
    whose layers cannot be unpacked is never listed. ``keep`` False leaves it out of the store's names and list
    (``verify`` and ``diff`` read it and leave its blobs to garbage collection).
    """
    reference = parse_remote(text)
    wanted = parse_platform(platform)
    if registry is None:
        registry = Registry(reference.registry,
                            insecure if insecure is not None else insecure_hosts(()))
    say = report or (lambda line: None)
    started = time.monotonic()
    try:
        data, stated, digest = get_manifest(registry, reference.repository, reference.reference, ACCEPT)
        label = f"{reference}"
        media_type = _media_type(data, stated, label)
        entry = Descriptor(media_type, digest, len(data))
        stored_manifests = [data]
        manifest, manifest_data = entry, data
        for _ in range(MAX_INDEX_DEPTH):
            if manifest.media_type not in INDEX_TYPES:
                break
            child = choose_platform(index_from_json(manifest_data, label), wanted, f"{label} (index {manifest.digest})")
            manifest_data, stated, _ = get_manifest(registry, reference.repository, child.digest, ACCEPT)
            manifest = Descriptor(_media_type(manifest_data, stated, label), child.digest, len(manifest_data),
                                  platform=child.platform)
            stored_manifests.append(manifest_data)
        else:
            raise PybuildError(f"{label}: image indexes nest more than {MAX_INDEX_DEPTH} deep")
        _, config, layers = manifest_from_json(manifest_data, f"{label}: manifest {manifest.digest}")
        # an unsupported layer type fails before anything is downloaded
        stored_layers = tuple(store._layer(layer, f"{label}: manifest {manifest.digest}") for layer in layers)
        blobs = [config, *layers]
        missing = [blob for blob in blobs if store.blobs.size_of(blob.digest) != blob.size]
        if missing:
            say(f"pulling {reference}: {len(missing)} of {len(blobs)} blobs "
                f"({size_text(sum(blob.size for blob in missing))}) to download")
        downloaded = download_blob(registry, reference.repository, config, store.blobs, say)
        config_label = f"{label}: image config {config.digest}"
        image = image_from_config(store.blobs.read_bytes(config.digest), stored_layers, config_label)

        def bring(layer: Layer) -> int:
            """Download a layer and unpack it at once, beside the other layers' downloads."""
            size = download_blob(registry, reference.repository, Descriptor(layer.media_type, layer.digest,
                                                                            layer.size), store.blobs, say)
            if unpack is not None:
                unpack(replace(image, layers=(layer,)))
            return size

        with ThreadPoolExecutor(max_workers=PARALLEL_DOWNLOADS, thread_name_prefix="pull") as pool:
            results = [pool.submit(bring, layer) for layer in image.layers]
            downloaded += sum(result.result() for result in results)
        for manifest_bytes in stored_manifests:  # last: a manifest in the store means its blobs are there
            store.blobs.put_bytes(manifest_bytes)
        names = [reference.local_name] if reference.tag and reference.local_name else []
        if keep:
            store.name_entry(entry, names)
        BlobLocations(store.root, reference.registry).add(reference.repository, [blob.digest for blob in blobs])
    finally:
        registry.close()
    image = store.resolve(digest) if keep else store.load_manifest(manifest, str(reference))
    if missing:
        say(f"pulled {reference}: {size_text(downloaded)} in {time.monotonic() - started:.1f} s")
    return Pulled(image, digest, reference, downloaded)
