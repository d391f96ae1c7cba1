"""Blobs between a registry and the local blob store, each checked against its digest before it is kept."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from builder.oci.image import Descriptor
from builder.progress import size_text
from builder.registry.client import ATTEMPTS, TRANSIENT_ERRORS, Registry, RegistryError
from cache.blobs import CHUNK, BlobStore
from cache.index import read_record, write_record
from parser.errors import PybuildError

Report = Callable[[str], None]


def rate_text(size: int, seconds: float) -> str:
    return f"{size_text(size)} in {seconds:.1f} s ({size_text(size / max(seconds, 1e-3))}/s)"


def download_blob(registry: Registry, repository: str, descriptor: Descriptor, blobs: BlobStore,
                  report: Report | None = None) -> int:
    """Bring a blob into the store unless it is there; returns the bytes downloaded.

    A connection lost on the way resumes where it stopped (a Range request) when the server allows it, else
    starts over; bytes that do not hash to the digest are refused and nothing is stored.
    """
    digest, size = descriptor.digest, descriptor.size
    if blobs.size_of(digest) == size and size:
        return 0
    scope = f"repository:{repository}:pull"
    started = time.monotonic()
    file, temporary = blobs.temp_file()
    hasher, received = hashlib.sha256(), 0
    try:
        with file:
            for attempt in range(ATTEMPTS):
                headers = {"Range": f"bytes={received}-"} if received else {}
                status, response_headers, response = registry.request(
                    "GET", f"/v2/{repository}/blobs/{digest}", scope=scope, headers=headers, stream=True)
                if status == 206 and response_headers.get("Content-Range", "").startswith(f"bytes {received}-"):
                    pass  # resumed
                elif status == 200:
                    if received:  # the server ignored the range: start over
                        file.seek(0)
                        file.truncate()
                        hasher, received = hashlib.sha256(), 0
                else:
                    body = response.read() if hasattr(response, "read") else response
                    if status == 404:
                        raise RegistryError(f"{registry.registry}/{repository}: blob {digest} is missing there "
                                            "(BLOB_UNKNOWN)", status, ("BLOB_UNKNOWN",))
                    raise registry.failure(f"{registry.registry}/{repository}: blob {digest}", status, body)
                try:
                    while chunk := response.read(CHUNK):
                        received += len(chunk)
                        if received > size:
                            raise RegistryError(f"{registry.registry}/{repository}: blob {digest} is larger than "
                                                f"the {size} bytes its descriptor says; nothing was stored")
                        file.write(chunk)
                        hasher.update(chunk)
                except TRANSIENT_ERRORS + (OSError,):
                    registry.close()
                if received == size:
                    break
                registry.close()  # the server closed early: resume on a new connection
                registry.pause(min(0.5 * 2 ** attempt, 10))
            else:
                raise PybuildError(f"{registry.registry}/{repository}: blob {digest} came short "
                                   f"({received} of {size} bytes) after {ATTEMPTS} tries")
            file.flush()
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise RegistryError(f"{registry.registry}/{repository}: blob {digest} does not match its digest "
                                f"(its content hashes to {actual}); refused, nothing was stored")
        blobs.put_file(temporary, digest)
    finally:
        temporary.unlink(missing_ok=True)
    if report is not None:
        report(f"{digest[7:19]}: {rate_text(size, time.monotonic() - started)}")
    return size


def get_manifest(registry: Registry, repository: str, reference: str, accept: tuple[str, ...],
                 max_bytes: int = 4 << 20) -> tuple[bytes, str, str]:
    """A manifest or index by tag or digest: (bytes, media type, digest), the digest checked when it was asked."""
    status, headers, body = registry.request(
        "GET", f"/v2/{repository}/manifests/{reference}", scope=f"repository:{repository}:pull",
        headers={"Accept": ", ".join(accept)})
    where = f"{registry.registry}/{repository}{'@' if reference.startswith('sha256:') else ':'}{reference}"
    if status == 404:
        raise RegistryError(f"{where}: manifest unknown (no such image on the registry)", status, ("MANIFEST_UNKNOWN",))
    if status != 200:
        raise registry.failure(f"{where}: manifest", status, body)
    assert isinstance(body, bytes)
    if len(body) > max_bytes:
        raise PybuildError(f"{where}: the manifest is too large to be real ({len(body)} bytes)")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if reference.startswith("sha256:") and digest != reference:
        raise RegistryError(f"{where}: the manifest the registry sent does not match its digest (it hashes to "
                            f"{digest}); refused, nothing was stored")
    stated = headers.get("Docker-Content-Digest")
    if stated and stated.startswith("sha256:") and stated != digest:
        raise RegistryError(f"{where}: the manifest the registry sent does not match the digest it states "
                            f"({stated}; it hashes to {digest}); refused, nothing was stored")
    media_type = (headers.get("Content-Type") or "").split(";", 1)[0].strip()
    return body, media_type, digest


class BlobLocations:
    """Which repositories of a registry are known to hold a blob (pulled from or pushed to), so a push to
    another repository there can mount it instead of uploading it again."""

    def __init__(self, store_root: Path, registry: str) -> None:
        self.path = store_root / "registry" / "locations" / registry.replace("/", "_")

    def of(self, digest: str) -> list[str]:
        value = read_record(self.path)
        repositories = value.get(digest) if isinstance(value, dict) else None
        return [repository for repository in repositories or [] if isinstance(repository, str)]

    def add(self, repository: str, digests: list[str]) -> None:
        value = read_record(self.path)
        value = value if isinstance(value, dict) else {}
        changed = False
        for digest in digests:
            known = value.get(digest) if isinstance(value.get(digest), list) else []
            if repository not in known:
                value[digest] = [repository, *known][:8]
                changed = True
        if changed:
            write_record(self.path, value)
