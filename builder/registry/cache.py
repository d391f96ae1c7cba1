"""The build cache through a registry: ``--cache-to type=registry,ref=REF`` and ``--cache-from type=registry,ref=REF``.

The cache is the same manifest, config and layer blobs a ``type=local`` export writes into a directory
(see ``cache.transfer``), pushed under REF as an OCI artifact. A runner with an empty store reads the
records at the start and downloads a layer only when a step hits on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from builder.oci.image import MEDIA_MANIFEST, Descriptor
from builder.oci.store import ImageStore
from builder.registry.auth import Unauthorized
from builder.registry.client import Registry, RegistryError
from builder.registry.push import _Uploader
from builder.registry.reference import insecure_hosts, parse_remote
from builder.registry.transfer import download_blob, get_manifest
from cache.blobs import BlobStore
from cache.index import LayerBlob
from cache.transfer import CachedStep, cache_documents, read_cache_documents
from parser.errors import PybuildError

MAX_CONFIG_BYTES = 64 << 20


class RegistryCacheSource:
    """The records of a cache in a registry; a blob is downloaded (and checked) when a hit needs it."""

    def __init__(self, ref: str, insecure: Iterable[str] = (), warn: Callable[[str], None] | None = None) -> None:
        self.reference = parse_remote(ref)
        self.label = f"--cache-from type=registry,ref={ref}"
        self.registry = Registry(self.reference.registry, insecure_hosts(insecure))
        self.steps: dict[str, CachedStep] = {}
        repository = self.reference.repository
        try:
            data, _, _ = get_manifest(self.registry, repository, self.reference.reference, (MEDIA_MANIFEST,))
        except RegistryError as exc:
            if "MANIFEST_UNKNOWN" in exc.codes or exc.status == 404:
                if warn is not None:
                    warn(f"[warning] {self.label}: no cache there yet; the build runs without it")
                return
            if exc.status in (401, 403) and warn is not None:
                self._unreadable(exc, warn)
                return
            raise PybuildError(f"{self.label}: {exc.message}", hint=exc.hint) from None
        except Unauthorized as exc:
            if warn is None:
                raise PybuildError(f"{self.label}: {exc.message}", hint=exc.hint) from None
            self._unreadable(exc, warn)
            return
        except PybuildError as exc:
            raise PybuildError(f"{self.label}: {exc.message}", hint=exc.hint) from None
        try:
            manifest = json.loads(data)
        except ValueError:
            raise PybuildError(f"{self.label}: the manifest there is not JSON") from None
        self.steps = read_cache_documents(manifest, self._config, self.label)

    def _unreadable(self, exc: PybuildError, warn: Callable[[str], None]) -> None:
        """A pull request from a fork may not read the cache its base branch pushed; the build still can."""
        warn(f"[warning] {self.label}: may not be read ({exc.message}); the build runs without it"
             + (f" ({exc.hint})" if exc.hint else ""))

    def _config(self, digest: str, size: int) -> object:
        if size > MAX_CONFIG_BYTES:
            raise PybuildError(f"{self.label}: the cache config is too large ({size} bytes)")
        status, _, body = self.registry.request("GET", f"/v2/{self.reference.repository}/blobs/{digest}",
                                                scope=f"repository:{self.reference.repository}:pull")
        if status != 200 or not isinstance(body, bytes):
            raise self.registry.failure(f"{self.label}: the cache config {digest}", status, body)
        import hashlib

        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise PybuildError(f"{self.label}: the cache config does not match its digest; refused")
        try:
            return json.loads(body)
        except ValueError:
            raise PybuildError(f"{self.label}: the cache config is not JSON") from None

    def has(self, blob: LayerBlob) -> bool:
        """--dry-run: a blob the cache lists is taken to be there (asking would cost a request per step)."""
        return True

    def fetch(self, blob: LayerBlob, store: BlobStore) -> bool:
        """Download a blob into the store, its digest checked; False when the registry cannot give it."""
        try:
            download_blob(self.registry, self.reference.repository,
                          Descriptor(blob.media_type, blob.digest, blob.size), store)
        except PybuildError:
            return False
        return True


def push_cache(store: ImageStore, steps: list[CachedStep], ref: str, insecure: Iterable[str] = (),
               report: Callable[[str], None] | None = None) -> str:
    """Push a build's cache records and their layer blobs under ``ref``; returns the manifest's digest."""
    reference = parse_remote(ref)
    if reference.digest:
        raise PybuildError(f"--cache-to type=registry,ref={ref}: name a tag, not a digest")
    registry = Registry(reference.registry, insecure_hosts(insecure))
    documents = cache_documents(steps)
    uploader = _Uploader(registry, store, reference, report or (lambda line: None))
    try:
        for blob in documents.blobs:
            uploader.push_blob(Descriptor(blob.media_type, blob.digest, blob.size))
        config_digest = store.blobs.put_bytes(documents.config)
        uploader.push_blob(Descriptor("application/octet-stream", config_digest, len(documents.config)))
        digest = uploader.put_manifest(documents.manifest, MEDIA_MANIFEST, reference.tag or "latest")
    finally:
        registry.close()
    return digest
