"""Pushing a stored image to a registry: blobs the registry lacks (mounted from another repository of it when
pybuild knows one that holds them, else uploaded whole or in chunks), then the manifest, last, so a push cut
short publishes nothing and the next one completes it."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from builder.oci.image import Descriptor, manifest_from_json
from builder.oci.store import ImageStore, StoredImage
from builder.registry.client import Registry, RegistryError
from builder.registry.reference import RemoteReference, insecure_hosts, parse_remote
from builder.registry.transfer import BlobLocations, rate_text
from parser.dataclass import dataclass
from parser.errors import PybuildError

# Blobs up to this size go in one PUT; larger ones in PATCH chunks of CHUNK_BYTES (under a proxy's body
# limit, and a failure costs one chunk, not the blob). Both stream from the blob file.
MONOLITHIC_BYTES = 256 << 20
CHUNK_BYTES = 64 << 20
PARALLEL_UPLOADS = 3


class _Slice:
    """``size`` bytes of a file from where it stands: a request body that never sits whole in memory."""

    def __init__(self, file, size: int) -> None:
        self.file, self.start, self.size = file, file.tell(), size

    def read(self, amount: int = -1) -> bytes:
        left = self.start + self.size - self.file.tell()
        return self.file.read(left if amount < 0 else min(amount, left)) if left > 0 else b""

    def tell(self) -> int:
        return self.file.tell() - self.start

    def seek(self, offset: int) -> None:
        self.file.seek(self.start + offset)


@dataclass
class Pushed:
    digest: str
    size: int
    reference: RemoteReference
    uploaded: int


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), *params.items()])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _location(registry: Registry, headers, what: str) -> str:
    location = headers.get("Location")
    if not location:
        raise PybuildError(f"{registry.registry}: {what}: the registry gave no upload location")
    return location


class _Uploader:
    def __init__(self, registry: Registry, store: ImageStore, reference: RemoteReference,
                 say: Callable[[str], None]) -> None:
        self.registry, self.store, self.reference, self.say = registry, store, reference, say
        self.repository = reference.repository
        self.scope = f"repository:{self.repository}:pull,push"
        self.locations = BlobLocations(store.root, reference.registry)

    def has(self, digest: str) -> bool:
        status, _, body = self.registry.request("HEAD", f"/v2/{self.repository}/blobs/{digest}", scope=self.scope)
        if status == 200:
            return True
        if status == 404:
            return False
        raise self.registry.failure(f"{self.reference}: blob {digest}", status, body)

    def push_blob(self, blob: Descriptor) -> int:
        """Make the blob present in the repository; returns the bytes uploaded (0: it was there, or mounted)."""
        if self.has(blob.digest):
            self.say(f"{blob.digest[7:19]}: already there")
            return 0
        for source in self.locations.of(blob.digest):
            if source == self.repository:
                continue
            scope = f"{self.scope} repository:{source}:pull"
            status, headers, body = self.registry.request(
                "POST", f"/v2/{self.repository}/blobs/uploads/?{urlencode({'mount': blob.digest, 'from': source})}",
                scope=scope, body=b"")
            if status == 201:
                self.say(f"{blob.digest[7:19]}: mounted from {source}")
                return 0
            if status == 202:  # not mounted; the registry opened an upload instead
                return self._upload(blob, _location(self.registry, headers, f"blob {blob.digest}"))
            break
        return self._upload(blob, None)

    def _start(self, digest: str) -> str:
        status, headers, body = self.registry.request("POST", f"/v2/{self.repository}/blobs/uploads/",
                                                      scope=self.scope, body=b"")
        if status != 202:
            raise self.registry.failure(f"{self.reference}: starting the upload of blob {digest}", status, body)
        return _location(self.registry, headers, f"blob {digest}")

    def _upload(self, blob: Descriptor, location: str | None) -> int:
        started = time.monotonic()
        for attempt in (0, 1):  # an upload the registry lost track of starts over once
            location = location or self._start(blob.digest)
            try:
                with self.store.blobs.open(blob.digest) as file:
                    if blob.size <= MONOLITHIC_BYTES:
                        self._put(blob, _with_query(location, digest=blob.digest), file, blob.size)
                    else:
                        self._chunks(blob, location, file)
                break
            except RegistryError as exc:
                if attempt or exc.status not in (400, 404, 416):
                    raise
                location = None
        self.say(f"{blob.digest[7:19]}: pushed {rate_text(blob.size, time.monotonic() - started)}")
        return blob.size

    def _put(self, blob: Descriptor, url: str, body, size: int) -> None:
        status, _, response = self.registry.request(
            "PUT", url, scope=self.scope, body=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        if status not in (201, 204):
            raise self.registry.failure(f"{self.reference}: uploading blob {blob.digest}", status, response)

    def _chunks(self, blob: Descriptor, location: str, file) -> None:
        offset = 0
        while offset < blob.size:
            length = min(CHUNK_BYTES, blob.size - offset)
            file.seek(offset)
            status, headers, response = self.registry.request(
                "PATCH", location, scope=self.scope, body=_Slice(file, length),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(length),
                         "Content-Range": f"{offset}-{offset + length - 1}"})
            if status != 202:
                raise self.registry.failure(f"{self.reference}: uploading blob {blob.digest} at byte {offset}",
                                            status, response)
            location = _location(self.registry, headers, f"blob {blob.digest}")
            offset += length
        self._put(blob, _with_query(location, digest=blob.digest), b"", 0)

    def put_manifest(self, data: bytes, media_type: str, tag: str) -> str:
        status, headers, body = self.registry.request(
            "PUT", f"/v2/{self.repository}/manifests/{tag}", scope=self.scope, body=data,
            headers={"Content-Type": media_type, "Content-Length": str(len(data))})
        if status not in (200, 201):
            raise self.registry.failure(f"{self.reference}: the manifest", status, body)
        return headers.get("Docker-Content-Digest") or ""


def push(store: ImageStore, image: StoredImage, text: str, *, insecure: frozenset[str] | None = None,
         report: Callable[[str], None] | None = None, registry: Registry | None = None) -> Pushed:
    """Push a stored image under the reference ``text`` (a tag; latest when none is given)."""
    reference = parse_remote(text)
    if reference.digest:
        raise PybuildError(f"cannot push to {text}: a push names a tag, not a digest")
    registry = registry or Registry(reference.registry,
                                    insecure if insecure is not None else insecure_hosts(()))
    say = report or (lambda line: None)
    manifest = image.manifest
    data = store.blobs.read_bytes(manifest.digest)
    layers = [Descriptor(layer.media_type, layer.digest, layer.size) for layer in image.image.layers]
    _, config, _ = manifest_from_json(data, f"manifest {manifest.digest}")
    uploader = _Uploader(registry, store, reference, say)
    try:
        with ThreadPoolExecutor(max_workers=PARALLEL_UPLOADS, thread_name_prefix="push") as pool:
            futures = [pool.submit(uploader.push_blob, blob) for blob in [*layers, config]]
            try:
                uploaded = sum(future.result() for future in futures)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # what has not started does not start
                raise
        stated = uploader.put_manifest(data, manifest.media_type, reference.tag or "latest")
    finally:
        registry.close()
    if stated and stated != manifest.digest:
        raise PybuildError(f"{reference}: the registry stored the manifest as {stated}, not {manifest.digest}")
    uploader.locations.add(reference.repository, [blob.digest for blob in [*layers, config]])
    return Pushed(manifest.digest, len(data), reference, uploaded)
