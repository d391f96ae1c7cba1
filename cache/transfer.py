"""A build cache as files: ``--cache-to type=local,dest=DIR`` writes one, ``--cache-from type=local,src=DIR`` reads it.

DIR is an OCI image layout, so it travels as any directory does (rsync, a CI artifact) and registry
tools can copy it. Its index names one manifest (``org.opencontainers.image.ref.name`` = ``pybuild-cache``)
whose config blob lists the step records (key -> diff_id, or none for a step that changed nothing)
and whose layers are the blobs of those diff_ids, each annotated with its diff_id.

Reading is lazy: the records are loaded at the start; a blob is copied into the store, its digest
checked, only when a step hits on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cache.blobs import TEMP_PREFIX, BlobStore
from cache.files import sha256_file
from cache.index import LayerBlob, copy_atomically, write_atomically
from parser.dataclass import dataclass
from parser.errors import PybuildError

CACHE_CONFIG_TYPE = "application/vnd.pybuild.cache.config.v1+json"
BUILDKIT_CACHE_TYPE = "application/vnd.buildkit.cacheconfig.v0"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
DIFF_ID_ANNOTATION = "dev.pybuild.diff-id"
CACHE_NAME = "pybuild-cache"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_JSON = 64 << 20


@dataclass
class CachedStep:
    """One step record of an exported cache, with the layer blob it names."""

    key: str
    diff_id: str | None
    blob: LayerBlob | None


class CacheSource:
    """The records of a cache directory, and its blobs brought into the store when a hit needs them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.label = f"--cache-from {directory}"
        self.steps: dict[str, CachedStep] = {}
        self._read()

    def _json(self, path: Path, what: str) -> Any:
        try:
            if path.stat().st_size > _MAX_JSON:
                raise PybuildError(f"--cache-from {self.directory}: {what} is too large")
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            raise PybuildError(f"--cache-from {self.directory}: {what} is missing",
                               hint="name a directory --cache-to type=local,dest=... wrote") from None
        except (OSError, ValueError) as exc:
            raise PybuildError(f"--cache-from {self.directory}: cannot read {what}: {exc}") from None

    def _blob_path(self, digest: str) -> Path:
        return self.directory / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def _read(self) -> None:
        if not self.directory.is_dir():
            raise PybuildError(f"--cache-from type=local,src={self.directory}: no such directory")
        index = self._json(self.directory / "index.json", "index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        entry = next((item for item in manifests or [] if isinstance(item, dict)
                      and (item.get("annotations") or {}).get(REF_NAME) == CACHE_NAME), None)
        if entry is None or not _DIGEST.fullmatch(str(entry.get("digest"))):
            raise PybuildError(f"--cache-from {self.directory}: the layout holds no pybuild cache")
        manifest = self._json(self._blob_path(entry["digest"]), "the cache manifest")
        self.steps = read_cache_documents(
            manifest, lambda digest, size: self._json(self._blob_path(digest), "the cache config"),
            f"--cache-from {self.directory}")

    def has(self, blob: LayerBlob) -> bool:
        """Whether the directory still holds the blob, at its size (its digest is checked when fetched)."""
        try:
            return self._blob_path(blob.digest).stat().st_size == blob.size
        except OSError:
            return False

    def fetch(self, blob: LayerBlob, store: BlobStore) -> bool:
        """Bring a blob into ``store``, its digest checked; False when it is missing or damaged here.

        On the store's filesystem the file is hard-linked after its digest is checked (blobs are never
        changed in place, and --cache-to links them the other way); elsewhere it is copied and checked.
        """
        if store.has(blob.digest):
            return True
        source = self._blob_path(blob.digest)
        try:
            if "sha256:" + sha256_file(source) != blob.digest:
                return False
            store.tmp_dir.mkdir(parents=True, exist_ok=True)
            linked = store.tmp_dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}.tmp"
            try:
                os.link(source, linked)
            except OSError:
                with open(source, "rb") as file, store.writer(expect=blob.digest) as out:
                    shutil.copyfileobj(file, out.file, 1 << 20)
                return True
            store.put_file(linked, blob.digest)
        except (OSError, PybuildError):
            return False
        return True


def write_cache(directory: Path, steps: Iterable[CachedStep], blobs: BlobStore) -> None:
    """Write ``steps`` and their layer blobs as an OCI layout at ``directory``, replacing a cache there.

    Blobs go in first and index.json last, each file renamed into place, so a reader never sees an index
    naming what is not there yet; an existing cache's blobs are kept (a later run may share them).
    """
    directory.mkdir(parents=True, exist_ok=True)
    blob_dir = directory / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    documents = cache_documents(steps)
    for blob in documents.blobs:
        _copy_blob(blobs.path(blob.digest), blob_dir / blob.digest.removeprefix("sha256:"))
    _put_json(blob_dir, documents.config)
    manifest = _put_json(blob_dir, documents.manifest)
    write_atomically(directory / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": INDEX_TYPE,
             "manifests": [{"mediaType": MANIFEST_TYPE, **manifest, "annotations": {REF_NAME: CACHE_NAME}}]}
    write_atomically(directory / "index.json", json.dumps(index, indent=2).encode())


@dataclass
class CacheDocuments:
    """A cache as its three parts: the config's JSON (the records), the manifest's JSON, the layer blobs."""

    config: bytes
    manifest: bytes
    blobs: list[LayerBlob]


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def cache_documents(steps: Iterable[CachedStep]) -> CacheDocuments:
    """The manifest, config and blobs of a cache: the same whether written as a directory or to a registry."""
    records, layers, blobs, seen = [], [], [], set()
    for step in steps:
        records.append({"key": step.key, "diff_id": step.diff_id})
        if step.blob is not None and step.blob.digest not in seen:
            seen.add(step.blob.digest)
            blobs.append(step.blob)
            layers.append({"mediaType": step.blob.media_type, "digest": step.blob.digest, "size": step.blob.size,
                           "annotations": {DIFF_ID_ANNOTATION: step.diff_id}})
    config = _json_bytes({"steps": sorted(records, key=lambda record: record["key"])})
    config_descriptor = {"mediaType": CACHE_CONFIG_TYPE, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                         "size": len(config)}
    manifest = _json_bytes({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config_descriptor,
                            "layers": layers})
    return CacheDocuments(config, manifest, blobs)


def read_cache_documents(manifest: Any, read_config: Callable[[str, int], Any], where: str) -> dict[str, CachedStep]:
    """The step records a cache manifest and its config hold; ``read_config(digest, size)`` gives the config's
    JSON. What is malformed is skipped, record by record: a cache may cost a rerun, never a wrong layer."""
    config = manifest.get("config") if isinstance(manifest, dict) else None
    if isinstance(config, dict) and config.get("mediaType") == BUILDKIT_CACHE_TYPE:
        raise PybuildError(f"{where} is a BuildKit cache, which pybuild does not read",
                           hint="write a pybuild cache there with --cache-to, or name another ref")
    if not isinstance(config, dict) or config.get("mediaType") != CACHE_CONFIG_TYPE:
        raise PybuildError(f"{where}: the cache manifest has no pybuild cache config")
    if not _DIGEST.fullmatch(str(config.get("digest"))) or not isinstance(config.get("size"), int):
        raise PybuildError(f"{where}: the cache manifest's config descriptor is malformed")
    records = read_config(config["digest"], config["size"])
    blobs: dict[str, LayerBlob] = {}
    for layer in manifest.get("layers") or []:
        diff_id = (layer.get("annotations") or {}).get(DIFF_ID_ANNOTATION) if isinstance(layer, dict) else None
        if (isinstance(diff_id, str) and _DIGEST.fullmatch(diff_id) and _DIGEST.fullmatch(str(layer.get("digest")))
                and isinstance(layer.get("size"), int)):
            blobs[diff_id] = LayerBlob(layer["digest"], layer["size"], str(layer.get("mediaType")))
    steps: dict[str, CachedStep] = {}
    for record in (records.get("steps") if isinstance(records, dict) else None) or []:
        if not isinstance(record, dict) or not _HEX.fullmatch(str(record.get("key"))):
            continue
        diff_id = record.get("diff_id")
        if diff_id is None:
            steps[record["key"]] = CachedStep(record["key"], None, None)
        elif isinstance(diff_id, str) and diff_id in blobs:
            steps[record["key"]] = CachedStep(record["key"], diff_id, blobs[diff_id])
    return steps


def _put_json(blob_dir: Path, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    write_atomically(blob_dir / digest.removeprefix("sha256:"), data)
    return {"digest": digest, "size": len(data)}


def _copy_blob(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)  # same filesystem: no copy at all, and the link appears whole
    except OSError:
        copy_atomically(source, target)
