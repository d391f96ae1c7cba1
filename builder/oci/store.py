"""pybuild's local image store: an OCI image layout whose index.json names images, plus import from archives.

The store root is a plain OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256``), so
``skopeo inspect oci:ROOT:busybox:latest`` reads it. Each name is one index.json entry whose
``org.opencontainers.image.ref.name`` annotation holds the name; an image without names keeps one
entry without that annotation (docker's ``<none>:<none>``). An image ID is its config digest, as in docker.

Names are stored in docker's familiar short form, ``repository:tag``: a missing tag means
``latest``, and the ``docker.io/library/``, ``docker.io/`` and ``localhost/`` prefixes are dropped,
so ``busybox``, ``busybox:latest``, ``localhost/busybox`` and ``docker.io/library/busybox:latest`` are
one name. Other registries stay in the name (``quay.io/x/y:1``). References may also be
``name@sha256:<manifest digest>`` (the digest decides), a full ``sha256:<digest>`` of a manifest or
config, or any unique prefix of an image ID, as in docker. A reference that reads as a name is looked
up as a name first, so an image named ``abc`` wins over an image whose ID starts with ``abc``.

Every JSON document read from an archive, a layout or the store is checked for its types before use
(see ``builder.oci.image``): a malformed one is a PybuildError naming where it came from, never a traceback.

index.json is only ever replaced by a rename, so readers need no lock; writers serialize their
read-modify-write cycles with ``fcntl.flock`` on ``index.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import lzma
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from builder.fs.untar import BoundedTarInfo, DamagedArchive
from builder.graph import host_platform
from builder.oci.image import (
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER,
    MEDIA_LAYER_GZIP,
    MEDIA_LAYER_ZSTD,
    MEDIA_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    Image,
    Layer,
    config_json,
    image_from_config,
    index_from_json,
    index_json,
    json_object,
    manifest_from_json,
    manifest_json,
    parse_json,
)
from cache.blobs import CHUNK, BlobStore, CorruptBlobError, digest_hex
from parser.dataclass import dataclass
from parser.errors import PybuildError

log = logging.getLogger(__name__)

CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
# Unreferenced blobs younger than this survive gc(): a build running now may be about to reference them.
GC_GRACE_SECONDS = 3600
# index.json, manifest.json and oci-layout are read into memory; real ones are far smaller.
MAX_METADATA_BYTES = 16 << 20
# Nested image indexes deeper than this are not real.
MAX_INDEX_DEPTH = 8

# Layer blobs are kept as they are; docker's layer media types mean the same bytes as OCI's.
_LAYER_MEDIA_TYPES = {
    MEDIA_LAYER: MEDIA_LAYER, MEDIA_LAYER_GZIP: MEDIA_LAYER_GZIP, MEDIA_LAYER_ZSTD: MEDIA_LAYER_ZSTD,
    DOCKER_LAYER: MEDIA_LAYER, DOCKER_LAYER_GZIP: MEDIA_LAYER_GZIP,
}
MANIFEST_TYPES = (MEDIA_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_INDEX, DOCKER_MANIFEST_LIST)

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_REFERENCE = re.compile(
    rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
_HEX_PREFIX = re.compile(r"(?:sha256:)?([0-9a-f]{1,64})")
_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


class ImageNotFound(PybuildError):
    """The store has no image by that reference (a build may then pull it)."""


@dataclass
class Reference:
    """A parsed image reference: ``name`` in familiar ``repository:tag`` form, and/or a manifest digest."""

    name: str | None
    digest: str | None


def _is_domain(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def parse_reference(text: str) -> Reference:
    """Read ``[domain/]path[:tag][@digest]`` and shorten the name to its familiar form (see the module doc)."""
    match = _REFERENCE.fullmatch(text)
    if match is None:
        hint = "repository names must be lowercase" if text.lower() != text else None
        raise PybuildError(f"invalid image reference {text!r}", hint=hint)
    domain, path, tag, digest = match.group("domain", "path", "tag", "digest")
    if domain is not None and not _is_domain(domain):
        # "foo/bar": the first component is a path component, not a registry.
        path, domain = f"{domain}/{path}", None
    if domain in (*_DOCKER_HUB, "localhost"):
        domain = None
    if domain is None and path.startswith("library/") and path.count("/") == 1:
        path = path.removeprefix("library/")
    repository = path if domain is None else f"{domain}/{path}"
    if digest is not None and tag is None:
        return Reference(None, digest)
    return Reference(f"{repository}:{tag or 'latest'}", digest)


def normalize_name(text: str) -> str:
    """A name as the store keeps it: familiar ``repository:tag``; digests are not names."""
    reference = parse_reference(text)
    if reference.digest is not None or reference.name is None:
        raise PybuildError(f"{text!r} names a digest; an image name needs a repository and an optional tag")
    return reference.name


def full_name(name: str) -> str:
    """The fully qualified form containerd and podman expect: ``docker.io/library/busybox:latest``."""
    name = normalize_name(name)
    first = name.split("/", 1)[0]
    if "/" in name and _is_domain(first):
        return name
    return f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"


@dataclass
class StoredImage:
    """An image in the store: its manifest descriptor (no annotations), the image, and its names."""

    manifest: Descriptor
    image: Image
    names: tuple[str, ...]
    image_id: str

    @property
    def size(self) -> int:
        """Bytes of the layer blobs as stored (compressed), which is what the image costs on disk."""
        return sum(layer.size for layer in self.image.layers)

    @property
    def created(self) -> str:
        return self.image.created


def _ref_name(entry: Descriptor) -> str | None:
    return dict(entry.annotations).get(REF_NAME_ANNOTATION)


def _plain(descriptor: Descriptor) -> Descriptor:
    return Descriptor(descriptor.media_type, descriptor.digest, descriptor.size, platform=descriptor.platform)


def _named(descriptor: Descriptor, name: str | None) -> Descriptor:
    plain = _plain(descriptor)
    return plain if name is None else replace(plain, annotations=((REF_NAME_ANNOTATION, name),))


def retag(entries: Sequence[Descriptor], manifest: Descriptor, names: Sequence[str]) -> list[Descriptor]:
    """index.json entries after giving ``manifest`` these names: names move; images left nameless stay as <none>."""
    wanted = set(names)
    kept = [entry for entry in entries
            if _ref_name(entry) not in wanted and not (entry.digest == manifest.digest and _ref_name(entry) is None)]
    present = {entry.digest for entry in kept}
    for entry in entries:
        if entry.digest not in present and entry.digest != manifest.digest:
            kept.append(_named(entry, None))
            present.add(entry.digest)
    if names:
        kept.extend(_named(manifest, name) for name in dict.fromkeys(names))
    elif manifest.digest not in present:
        kept.append(_named(manifest, None))
    return kept


BlobFetcher = Callable[[Descriptor], None]
EntryNames = Callable[[Descriptor], tuple[str, ...]]


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` whole or not at all: written beside it, synced, then renamed over it."""
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise PybuildError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = BlobStore(self.root)
        self.index_path = self.root / "index.json"
        self.lock_path = self.root / "index.lock"
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "oci-layout").is_file():
            self._replace_file(self.root / "oci-layout", OCI_LAYOUT)
        if not self.index_path.is_file():
            with self._locked():
                if not self.index_path.is_file():
                    self._write_index([])

    # index.json

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _replace_file(self, path: Path, data: bytes) -> None:
        with atomic_file(path) as file:
            file.write(data)

    def entries(self) -> list[Descriptor]:
        try:
            return list(index_from_json(self.index_path.read_bytes(), "index.json"))
        except PybuildError as exc:
            raise PybuildError(f"{self.index_path} is damaged: {exc.message}",
                               hint="restore it from a backup, or remove the store directory to start over") from None

    def _write_index(self, entries: list[Descriptor]) -> None:
        self._replace_file(self.index_path, index_json(entries))

    def _update_index(self, change: Callable[[list[Descriptor]], list[Descriptor]]) -> None:
        with self._locked():
            self._write_index(change(self.entries()))

    # Writing and reading images

    def write_image(self, image: Image, names: Sequence[str]) -> Descriptor:
        """Store an image whose layer blobs are already in the blob store, and give it these names."""
        normalized = [normalize_name(name) for name in names]
        config = config_json(image)
        config_descriptor = Descriptor(MEDIA_CONFIG, self.blobs.put_bytes(config), len(config))
        manifest = manifest_json(config_descriptor, image.layers)
        platform = (("architecture", image.architecture), ("os", image.os))
        if image.variant:
            platform += (("variant", image.variant),)
        descriptor = Descriptor(MEDIA_MANIFEST, self.blobs.put_bytes(manifest), len(manifest), platform=platform)
        with self._locked():
            # Checked under the lock, which gc() holds too, so no layer can vanish before the image is named.
            for layer in image.layers:
                if not self.blobs.has(layer.digest):
                    raise PybuildError(f"layer {layer.digest} of the image is not in the blob store "
                                       f"{self.blobs.blob_dir}")
            entries = self.entries()
            retagged = retag(entries, descriptor, normalized)
            if retagged != entries:  # a rebuild of the same image under the same names changes nothing
                self._write_index(retagged)
        return _plain(descriptor)

    def _load(self, manifest: Descriptor, names: tuple[str, ...], source: str | None = None) -> StoredImage:
        """The image a manifest describes; ``source`` (an archive or layout, else the store) names it in errors.

        An index entry (a multi-platform image as pulled) stands for its manifest of this platform, or else
        of the platform that was pulled: only that one's blobs are stored.
        """
        source = source or str(self.root)
        if manifest.media_type in INDEX_TYPES:
            manifest = self._stored_platform(manifest, source)
        label = f"{source}: manifest {manifest.digest}"
        media_type, config, layer_descriptors = manifest_from_json(self._small_blob(manifest.digest, label), label)
        media_type = media_type or manifest.media_type
        if media_type not in MANIFEST_TYPES:
            raise PybuildError(f"{label} is a {media_type or 'document of unknown type'}, not an image manifest")
        layers = tuple(self._layer(descriptor, label) for descriptor in layer_descriptors)
        config_label = f"{source}: image config {config.digest}"
        image = image_from_config(self._small_blob(config.digest, config_label), layers, config_label)
        media_type = manifest.media_type or media_type
        descriptor = Descriptor(media_type, manifest.digest, manifest.size, platform=manifest.platform)
        return StoredImage(descriptor, image, names, config.digest)

    def _stored_platform(self, entry: Descriptor, source: str, depth: int = 0) -> Descriptor:
        """Of a stored image index, the manifest of this machine's platform if stored, else the one stored."""
        label = f"{source}: image index {entry.digest}"
        if depth >= MAX_INDEX_DEPTH:
            raise PybuildError(f"{label} nests more than {MAX_INDEX_DEPTH} indexes deep")
        children = [child for child in index_from_json(self._small_blob(entry.digest, label), label)
                    if self.blobs.has(child.digest)]
        if not children:
            raise PybuildError(f"{label} has none of its manifests in the store",
                               hint="pull the image again")
        os_name, arch, _ = host_platform()
        chosen = next((child for child in children if (dict(child.platform).get("os"),
                                                       dict(child.platform).get("architecture")) == (os_name, arch)),
                      children[0])
        if chosen.media_type in INDEX_TYPES:
            return self._stored_platform(chosen, source, depth + 1)
        return chosen

    def load_manifest(self, manifest: Descriptor, source: str) -> StoredImage:
        """The image of a stored manifest, not yet named (a pull unpacks it before naming it)."""
        return self._load(_plain(manifest), (), source)

    def tag(self, reference: str, name: str) -> None:
        """Give the image ``reference`` refers to the name ``name`` too (its other names stay)."""
        normalized = normalize_name(name)

        def change(entries: list[Descriptor]) -> list[Descriptor]:
            digest = self._find(reference, entries)
            target = _plain(next(entry for entry in entries if entry.digest == digest))
            kept = [entry for entry in entries if _ref_name(entry) != normalized
                    and not (entry.digest == digest and _ref_name(entry) is None)]
            return [*kept, _named(target, normalized)]

        self._update_index(change)

    def name_entry(self, entry: Descriptor, names: Sequence[str]) -> None:
        """Name a manifest or index whose blobs are all stored (an image just pulled); no names keeps it unnamed."""
        normalized = [normalize_name(name) for name in names]
        self._update_index(lambda entries: retag(entries, _plain(entry), normalized))

    @staticmethod
    def _layer(descriptor: Descriptor, label: str) -> Layer:
        media_type = _LAYER_MEDIA_TYPES.get(descriptor.media_type)
        if media_type is None:
            raise PybuildError(f"{label}: layer {descriptor.digest} has media type {descriptor.media_type!r:.100}, "
                               "which pybuild does not support (only plain, gzip and zstd tar layers)")
        return Layer(diff_id="", digest=descriptor.digest, size=descriptor.size, media_type=media_type)

    def _small_blob(self, digest: str, label: str) -> bytes:
        """A manifest, index or config blob, read whole and verified; one too large to be real is refused first."""
        with contextlib.suppress(FileNotFoundError):
            if self.blobs.path(digest).stat().st_size > MAX_METADATA_BYTES:
                raise PybuildError(f"{label} is too large to be real (over {MAX_METADATA_BYTES} bytes)")
        return self.blobs.read_bytes(digest)

    def _json_blob(self, digest: str, what: str) -> dict[str, Any]:
        label = f"{what} {digest}"
        return json_object(parse_json(self._small_blob(digest, label), label), label)

    def _names_of(self, entries: Sequence[Descriptor], digest: str) -> tuple[str, ...]:
        return tuple(name for entry in entries if entry.digest == digest and (name := _ref_name(entry)))

    def resolve(self, reference: str) -> StoredImage:
        """The image a name, a ``name@digest``, a manifest or config digest, or an image ID prefix refers to."""
        return self.resolve_entry(reference)[1]

    def resolve_entry(self, reference: str) -> tuple[str, StoredImage]:
        """``resolve``, with the digest of the index.json entry found: the manifest or index its registry gave."""
        entries = self.entries()
        digest = self._find(reference, entries)
        manifest = next(entry for entry in entries if entry.digest == digest)
        return digest, self._load(_plain(manifest), self._names_of(entries, digest))

    def image_id(self, reference: str) -> str:
        """The image ID (config digest) ``reference`` names, also where it is stored as several manifests."""
        return self._config_digest(self._one_image(reference, self.entries())[0])

    def _find(self, reference: str, entries: Sequence[Descriptor]) -> str:
        """The manifest digest of ``reference`` among index entries."""
        found = self._one_image(reference, entries)
        if len(found) > 1:  # one image ID, stored as several manifests (its layers compressed differently)
            raise PybuildError(f"image ID {self._config_digest(found[0])} is stored as {len(found)} manifests "
                               f"({', '.join(found)}); name one by its name or manifest digest")
        return found[0]

    def _one_image(self, reference: str, entries: Sequence[Descriptor]) -> list[str]:
        """The manifest digests of the one image ``reference`` names: several where that image is stored in
        several compressions; an ID prefix that several images share is an error."""
        found = self._find_all(reference, entries)
        if len(found) > 1 and (images := len({self._config_digest(digest) for digest in found})) > 1:
            raise PybuildError(f"image ID prefix {reference!r} matches {images} images; give more digits")
        return found

    def _find_all(self, reference: str, entries: Sequence[Descriptor]) -> list[str]:
        """The manifest digests ``reference`` names: one for a name or a manifest digest, every manifest whose
        image ID starts with it for an ID (prefix)."""
        parsed = parse_reference(reference) if _REFERENCE.fullmatch(reference) else None
        if parsed is not None and parsed.digest is not None:
            if any(entry.digest == parsed.digest for entry in entries):
                return [parsed.digest]
        elif parsed is not None:
            for entry in entries:
                if _ref_name(entry) == parsed.name:
                    return [entry.digest]
        prefix = _HEX_PREFIX.fullmatch(reference)
        if prefix is not None:
            wanted = prefix.group(1)
            manifests = list(dict.fromkeys(entry.digest for entry in entries))
            found = [digest for digest in manifests if digest_hex(digest) == wanted]
            if found and len(wanted) == 64:  # a whole manifest digest: no need to read every manifest for IDs
                return found
            found += [digest for digest in manifests
                      if digest not in found and self._config_digest(digest)[len("sha256:"):].startswith(wanted)]
            if found:
                return found
        if parsed is None and prefix is None:
            parse_reference(reference)  # raises the reference syntax error
        raise ImageNotFound(f"image {reference!r} is not in the local store {self.root}",
                           hint="build it with -t NAME, or `pybuild load -i ARCHIVE` (for example one made with "
                                "`skopeo copy docker://IMAGE oci-archive:FILE.tar:IMAGE`)")

    def _config_digest(self, manifest_digest: str) -> str:
        label = f"{self.root}: manifest {manifest_digest}"
        data = self._small_blob(manifest_digest, label)
        if b'"manifests"' in data and b'"config"' not in data:  # a pulled image index
            entry = Descriptor(MEDIA_INDEX, manifest_digest, len(data))
            manifest_digest = self._stored_platform(entry, str(self.root)).digest
            label = f"{self.root}: manifest {manifest_digest}"
            data = self._small_blob(manifest_digest, label)
        return manifest_from_json(data, label)[1].digest

    def list(self) -> list[StoredImage]:
        """Every image once, with all its names, newest first (for ``pybuild images``)."""
        entries = self.entries()
        images = [self._load(_plain(entry), self._names_of(entries, entry.digest))
                  for entry in {entry.digest: entry for entry in entries}.values()]
        return sorted(images, key=lambda stored: (stored.created, stored.names), reverse=True)

    def remove(self, reference: str) -> tuple[str, ...]:
        """Untag a name, or drop every name of an image given by digest or ID (each manifest stored of that ID);
        returns the names removed.

        An image whose last name goes leaves index.json; its blobs stay until ``gc()``.
        """
        removed: list[str] = []

        def change(entries: list[Descriptor]) -> list[Descriptor]:
            digests = self._one_image(reference, entries)
            parsed = parse_reference(reference) if _REFERENCE.fullmatch(reference) else None
            by_name = parsed is not None and parsed.digest is None and any(
                _ref_name(entry) == parsed.name for entry in entries)
            kept = []
            for entry in entries:
                if entry.digest in digests and (not by_name or _ref_name(entry) == parsed.name):
                    removed.append(_ref_name(entry) or entry.digest)
                else:
                    kept.append(entry)
            return kept

        self._update_index(change)
        return tuple(removed)

    def gc(self, keep: Collection[str] = (), grace_seconds: float = GC_GRACE_SECONDS) -> tuple[int, int]:
        """Delete blobs that neither index.json nor ``keep`` (e.g. the build cache's layers) reaches.

        Blobs written or re-written in the last ``grace_seconds`` are spared, because a build running
        now stores its layers before write_image() names them; a caller that holds the store's lease
        exclusively (no build runs) passes 0. Returns (blobs removed, bytes freed).
        """
        removed = freed = 0
        cutoff = time.time() - grace_seconds
        with self._locked():
            reachable = set(keep)
            for entry in self.entries():
                self._reach(entry.digest, reachable)
            for digest in list(self.blobs.digests()):
                path = self.blobs.path(digest)
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                if digest not in reachable and stat.st_mtime < cutoff:
                    self.blobs.remove(digest)
                    removed, freed = removed + 1, freed + stat.st_size
        return removed, freed

    def _reach(self, digest: str, reachable: set[str]) -> None:
        if digest in reachable:
            return
        reachable.add(digest)
        value = self._json_blob(digest, "manifest")
        for child in value.get("manifests") or []:
            if self.blobs.has(child["digest"]):  # a pulled index keeps only its own platform's manifest
                self._reach(child["digest"], reachable)
        if "config" in value:
            reachable.add(value["config"]["digest"])
        reachable.update(layer["digest"] for layer in value.get("layers") or [])

    # Import

    def load_archive(self, path: Path, repository: str | None = None, *,
                     unpack: Callable[[Image], None] | None = None) -> list[str]:
        """Load every image of an OCI archive or a ``docker save`` archive; returns names (or IDs when unnamed).

        ``repository`` names entries whose ref.name annotation is a bare tag (``latest``), as containerd's
        base name does; without it such images load unnamed. ``unpack`` is called with each image before
        any is named (``pybuild load`` unpacks its layers there), so an image it fails on is never listed.
        """
        images = self._import_archive(Path(path), repository)
        if not images:
            raise PybuildError(f"{path} holds no image")
        if unpack is not None:
            for stored in images:
                unpack(stored.image)
        return self._commit(images)

    def load_layout(self, directory: Path, repository: str | None = None) -> list[str]:
        """Load every image of an OCI image layout directory (names as in ``load_archive``)."""
        images = self._import_layout(Path(directory), repository)
        if not images:
            raise PybuildError(f"OCI layout {directory} holds no image")
        return self._commit(images)

    def read_image_from_archive(self, path: Path) -> Image:
        """The one image of an OCI or docker archive, its blobs copied into the store but left unnamed."""
        return self.stored_from_archive(path).image

    def stored_from_archive(self, path: Path) -> StoredImage:
        return _single(self._import_archive(Path(path), None), str(path))

    def open(self, reference: str) -> StoredImage:
        """An image by store reference, ``oci-archive:PATH`` or ``oci-layout:DIR[:REF]`` (blobs brought in unnamed)."""
        if reference.startswith("oci-archive:"):
            return self.stored_from_archive(Path(reference.removeprefix("oci-archive:")))
        if reference.startswith("oci-layout:"):
            return self.stored_from_layout(reference.removeprefix("oci-layout:"))
        return self.resolve(reference)

    def copy_from(self, other: ImageStore, reference: str) -> None:
        """Give this store the image ``reference`` names in ``other``, under the same name: its blobs are
        hard-linked where both stores share a filesystem, copied (and checked) elsewhere."""
        entries = other.entries()
        digest = other._find(reference, entries)
        entry = next(entry for entry in entries if entry.digest == digest)
        reachable: set[str] = set()
        other._reach(digest, reachable)
        for blob in sorted(reachable):
            if self.blobs.has(blob) or not other.blobs.has(blob):
                continue
            self.blobs.blob_dir.mkdir(parents=True, exist_ok=True)
            try:
                os.link(other.blobs.path(blob), self.blobs.path(blob))
            except OSError:
                with other.blobs.open(blob) as source, self.blobs.writer(expect=blob) as out:
                    shutil.copyfileobj(source, out.file, CHUNK)
        parsed = parse_reference(reference) if _REFERENCE.fullmatch(reference) else None
        names = [parsed.name] if parsed is not None and parsed.name and parsed.digest is None else []
        self.name_entry(entry, names)

    def read_image_from_layout(self, spec: str) -> Image:
        """The image ``DIR[:REF]`` names in an OCI layout (REF as its ref.name annotation), without naming it."""
        return self.stored_from_layout(spec).image

    def stored_from_layout(self, spec: str) -> StoredImage:
        directory, ref = spec, None
        if not Path(spec).is_dir():
            # The directory is the shortest prefix before a colon that exists; the rest names the image.
            for position in (index for index, char in enumerate(spec) if char == ":"):
                if Path(spec[:position]).is_dir():
                    directory, ref = spec[:position], spec[position + 1:]
                    break
        images = self._import_layout(Path(directory), None, names_of=_ref_names)
        if ref is not None:
            wanted = {ref, *_ref_names(Descriptor("", "", 0, annotations=((REF_NAME_ANNOTATION, ref),)))}
            images = [stored for stored in images if wanted & set(stored.names)]
            if not images:
                raise PybuildError(f"OCI layout {directory} has no image named {ref!r}")
        return _single(images, spec)

    def _commit(self, images: list[StoredImage]) -> list[str]:
        """Name every imported image in one index.json update, so a failed import shows nothing."""

        def change(entries: list[Descriptor]) -> list[Descriptor]:
            for stored in images:
                entries = retag(entries, stored.manifest, stored.names)
            return entries

        self._update_index(change)
        loaded = [name for stored in images for name in (stored.names or (stored.image_id,))]
        return list(dict.fromkeys(loaded))

    def _import_layout(self, directory: Path, repository: str | None, *,
                       names_of: EntryNames | None = None) -> list[StoredImage]:
        index = _read_layout_file(directory, "index.json")
        if (directory / "oci-layout").exists():
            _check_layout_version(_read_layout_file(directory, "oci-layout"), f"{directory}: oci-layout")

        def fetch(descriptor: Descriptor) -> None:
            if not self.blobs.has(descriptor.digest):
                source = directory / "blobs" / "sha256" / digest_hex(descriptor.digest)
                try:
                    with open(source, "rb") as file, self.blobs.writer(expect=descriptor.digest) as out:
                        shutil.copyfileobj(file, out.file, CHUNK)
                except FileNotFoundError:
                    raise PybuildError(f"OCI layout {directory} lacks blob {descriptor.digest}") from None
                except OSError as exc:
                    raise PybuildError(f"cannot read blob {descriptor.digest} of OCI layout {directory}: "
                                       f"{exc.strerror or exc}") from None
            _check_size(self.blobs, descriptor, str(directory))

        names_of = names_of or (lambda entry: _entry_names(entry, repository))
        return self._images_from_index(index, fetch, names_of, str(directory))

    def _import_archive(self, path: Path, repository: str | None) -> list[StoredImage]:
        contents = _read_archive(path, self.blobs)
        if "index.json" in contents.metadata:
            if "oci-layout" in contents.metadata:
                _check_layout_version(contents.metadata["oci-layout"], f"{path}: oci-layout")

            held = set(contents.members.values())

            def fetch(descriptor: Descriptor) -> None:
                # Only blobs this archive held count: the store may have others from earlier loads.
                if descriptor.digest not in held:
                    raise PybuildError(f"archive {path} lacks blob {descriptor.digest}")
                _check_size(self.blobs, descriptor, str(path))

            return self._images_from_index(contents.metadata["index.json"], fetch,
                                           lambda entry: _entry_names(entry, repository), str(path))
        if "manifest.json" in contents.metadata:
            return self._images_from_docker(contents, path)
        raise PybuildError(f"{path} is neither an OCI archive nor a docker save archive: it has no index.json "
                           "or manifest.json")

    def _images_from_index(self, index: bytes, fetch: BlobFetcher, names_of: EntryNames,
                           source: str) -> list[StoredImage]:
        entries = index_from_json(index, f"{source}: index.json")
        images = []
        for entry in entries:
            manifest = self._pick_platform(entry, fetch, source)
            label = f"{source}: manifest {manifest.digest}"
            _, config, layers = manifest_from_json(self._small_blob(manifest.digest, label), label)
            for child in (config, *layers):
                fetch(child)
            try:
                names = names_of(entry)
            except PybuildError as exc:
                raise PybuildError(f"{source}: index entry {entry.digest}: {exc.message}") from None
            stored = self._load(_plain(manifest), names, source)
            platform = manifest.platform or (("architecture", stored.image.architecture), ("os", stored.image.os))
            images.append(replace(stored, manifest=replace(stored.manifest, platform=platform)))
        return images

    def _pick_platform(self, entry: Descriptor, fetch: BlobFetcher, source: str, depth: int = 0) -> Descriptor:
        """A manifest descriptor; from a multi-platform index, this machine's platform (linux/amd64 here)."""
        fetch(entry)
        if entry.media_type in MANIFEST_TYPES:
            return entry
        if entry.media_type not in INDEX_TYPES:
            raise PybuildError(f"{source}: index entry {entry.digest} has unsupported media type "
                               f"{entry.media_type!r:.100}")
        if depth >= MAX_INDEX_DEPTH:
            raise PybuildError(f"{source}: image index {entry.digest} nests more than {MAX_INDEX_DEPTH} indexes deep")
        label = f"{source}: image index {entry.digest}"
        child = choose_platform(index_from_json(self._small_blob(entry.digest, label), label), host_platform(), label)
        return self._pick_platform(child, fetch, source, depth + 1)

    def _images_from_docker(self, contents: ArchiveContents, path: Path) -> list[StoredImage]:
        images = []
        for config_path, layer_paths, tags in _docker_plan(contents.metadata["manifest.json"], path):
            config_digest = contents.blob(config_path, path)
            label = f"{path}: image config {config_digest}"
            config = self._small_blob(config_digest, label)
            layers = tuple(self._docker_layer(contents.blob(member, path)) for member in layer_paths)
            image = image_from_config(config, layers, label)
            for layer in image.layers:
                if layer.media_type == MEDIA_LAYER and layer.digest != layer.diff_id:
                    raise PybuildError(f"{path}: layer {layer.digest} does not match the diff ID {layer.diff_id} "
                                       "its config records")
            # The original config blob is kept, so the image ID stays the one docker showed.
            manifest = manifest_json(Descriptor(MEDIA_CONFIG, config_digest, len(config)), layers)
            platform = (("architecture", image.architecture), ("os", image.os))
            descriptor = Descriptor(MEDIA_MANIFEST, self.blobs.put_bytes(manifest), len(manifest), platform=platform)
            try:
                names = tuple(dict.fromkeys(normalize_name(tag) for tag in tags))
            except PybuildError as exc:
                raise PybuildError(f"{path}: manifest.json: {exc.message}") from None
            images.append(StoredImage(_plain(descriptor), image, names, config_digest))
        return images

    def _docker_layer(self, digest: str) -> Layer:
        """docker save layers are plain tars, but a gzip or zstd one is recognised by its magic bytes."""
        with self.blobs.open(digest) as file:
            magic = file.read(4)
        media_type = MEDIA_LAYER_GZIP if magic[:2] == b"\x1f\x8b" else (
            MEDIA_LAYER_ZSTD if magic == b"\x28\xb5\x2f\xfd" else MEDIA_LAYER)
        return Layer(diff_id="", digest=digest, size=self.blobs.path(digest).stat().st_size, media_type=media_type)


def choose_platform(children: Sequence[Descriptor], platform: tuple[str, str, str], label: str) -> Descriptor:
    """The entry of an image index for ``platform`` (os, architecture, variant; an empty variant takes any)."""
    os_name, arch, variant = platform
    offered = []
    for child in children:
        values = dict(child.platform)
        offered.append("/".join(filter(None, (values.get("os"), values.get("architecture"), values.get("variant")))))
        if (values.get("os"), values.get("architecture")) == (os_name, arch) and (
                not variant or values.get("variant", variant) == variant):
            return child
    raise PybuildError(f"{label} has no {'/'.join(filter(None, platform))} image "
                       f"(it offers {', '.join(offered) or 'none'})")


def _single(images: list[StoredImage], source: str) -> StoredImage:
    distinct = {stored.manifest.digest: stored for stored in images}
    if len(distinct) != 1:
        raise PybuildError(f"{source} holds {len(distinct)} images; exactly one is needed here",
                           hint="load it with `pybuild load` and use the image by name" if distinct else None)
    return next(iter(distinct.values()))


def _check_size(blobs: BlobStore, descriptor: Descriptor, source: str) -> None:
    actual = blobs.path(descriptor.digest).stat().st_size
    if actual != descriptor.size:
        raise PybuildError(f"{source}: blob {descriptor.digest} has {actual} bytes but its descriptor says "
                           f"{descriptor.size}")


def _read_layout_file(directory: Path, name: str) -> bytes:
    """A layout's index.json or oci-layout; one too large to be real is refused before it is read."""
    try:
        with open(directory / name, "rb") as file:
            data = file.read(MAX_METADATA_BYTES + 1)
    except OSError as exc:
        raise PybuildError(f"{directory} is not an OCI image layout: {exc.strerror} reading {name}") from None
    except ValueError as exc:  # a NUL in the path
        raise PybuildError(f"{str(directory)!r} is not an OCI image layout: {exc}") from None
    if len(data) > MAX_METADATA_BYTES:
        raise PybuildError(f"{directory}: {name} is too large to be real (over {MAX_METADATA_BYTES} bytes)")
    return data


def _check_layout_version(data: bytes, label: str) -> None:
    value = json_object(parse_json(data, label), label)
    if not isinstance(value.get("imageLayoutVersion"), str):
        raise PybuildError(f'{label}: "imageLayoutVersion" must be a string')


def _docker_plan(data: bytes, path: Path) -> list[tuple[str, list[str], list[str]]]:
    """docker's manifest.json: for each image, its config member, its layer members and its tags."""
    label = f"{path}: manifest.json"
    entries = parse_json(data, label)
    if not isinstance(entries, list):
        raise PybuildError(f"{label} must be a JSON list")
    plan = []
    for number, entry in enumerate(entries):
        where = f"{label}: entry {number}"
        entry = json_object(entry, where)
        config, layers, tags = entry.get("Config"), entry.get("Layers"), entry.get("RepoTags") or []
        if not isinstance(config, str):
            raise PybuildError(f'{where}: "Config" must be a string')
        for key, value in (("Layers", layers), ("RepoTags", tags)):
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise PybuildError(f'{where}: "{key}" must be a list of strings')
        plan.append((config, layers, tags))
    return plan


def _entry_names(entry: Descriptor, repository: str | None) -> tuple[str, ...]:
    """The name an index entry gives: containerd's full-name annotation, else ref.name.

    A ref.name without ``:`` or ``/`` is a bare tag in OCI's sense; it gets ``repository``, or no name.
    """
    annotations = dict(entry.annotations)
    if CONTAINERD_NAME_ANNOTATION in annotations:
        return (normalize_name(annotations[CONTAINERD_NAME_ANNOTATION]),)
    ref = annotations.get(REF_NAME_ANNOTATION)
    if not ref:
        return ()
    if ":" in ref or "/" in ref:
        return (normalize_name(ref),)
    if repository is not None:
        return (normalize_name(f"{normalize_name(repository).rsplit(':', 1)[0]}:{ref}"),)
    return ()


def _ref_names(entry: Descriptor) -> tuple[str, ...]:
    """Every way a ``FROM oci-layout:DIR:REF`` may name an entry: its raw ref.name, or that as a full name."""
    ref = _ref_name(entry)
    if not ref:
        return ()
    try:
        return (ref, normalize_name(ref))
    except PybuildError:
        return (ref,)


# Reading archives

_BLOB_MEMBER = re.compile(r"blobs/sha256/([0-9a-f]{64})")
# docker save's own layout: <id>.json configs and <id>/layer.tar (or, from podman, <id>.tar) layers.
_DOCKER_MEMBER = re.compile(r"[0-9a-f]{64}(?:\.json|\.tar|/layer\.tar)")
_METADATA_MEMBERS = ("index.json", "oci-layout", "manifest.json")
# docker save's legacy per-layer metadata: present in real archives, not needed.
_QUIET_MEMBERS = re.compile(r"repositories|[0-9a-f]{64}/(?:json|VERSION)")


@dataclass
class ArchiveContents:
    """What an archive held: its small metadata files, and member name -> digest of each blob stored."""

    metadata: dict[str, bytes]
    members: dict[str, str]
    links: dict[str, str]

    def blob(self, member: str, archive: Path) -> str:
        """The digest a member name refers to, following docker's links between identical layers."""
        seen = set()
        name = posixpath.normpath(member)
        while name in self.links and name not in seen:
            seen.add(name)
            name = self.links[name]
        digest = self.members.get(name)
        if digest is None:
            raise PybuildError(f"archive {archive} lacks {member!r}, which its manifest.json lists")
        return digest


def _read_archive(path: Path, blobs: BlobStore) -> ArchiveContents:
    """Stream an archive member by member, storing blobs (verified) and keeping metadata; nothing else is written.

    Member names are only matched against fixed patterns, never used as paths, so ``..``, absolute
    names and links cannot reach outside the store; other members are skipped with a warning.
    """
    metadata: dict[str, bytes] = {}
    members: dict[str, str] = {}
    links: dict[str, str] = {}
    try:
        with tarfile.open(path, mode="r|*", tarinfo=BoundedTarInfo) as archive:
            for member in archive:
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if member.isdir() or _QUIET_MEMBERS.fullmatch(name):
                    continue
                blob = _BLOB_MEMBER.fullmatch(name)
                if (member.issym() or member.islnk()) and _DOCKER_MEMBER.fullmatch(name):
                    # docker links a layer shared by two images to the first copy; the link is only a name here.
                    base = posixpath.dirname(name) if member.issym() else ""
                    links[name] = posixpath.normpath(posixpath.join(base, member.linkname))
                elif not member.isfile():
                    log.warning("%s: ignoring member %s: not a regular file", path, member.name)
                elif name in _METADATA_MEMBERS:
                    if member.size > MAX_METADATA_BYTES:
                        raise PybuildError(f"archive {path}: {name} is {member.size} bytes, too large to be real")
                    metadata[name] = _extract(archive, member).read()
                elif blob is not None or _DOCKER_MEMBER.fullmatch(name):
                    expect = None if blob is None else "sha256:" + blob.group(1)
                    with blobs.writer(expect=expect) as out:
                        shutil.copyfileobj(_extract(archive, member), out.file, CHUNK)
                    members[name] = out.digest
                else:
                    log.warning("%s: ignoring member %s: not part of an image archive", path, member.name)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise PybuildError(f"cannot read archive {path}: {exc}") from None
    except DamagedArchive as exc:
        raise PybuildError(f"cannot read archive {path}: {exc.message}") from None
    except CorruptBlobError as exc:
        raise CorruptBlobError(f"archive {path}: {exc.message}", hint=exc.hint) from None
    except OSError as exc:
        raise PybuildError(f"cannot read archive {path}: {exc.strerror or exc}") from None
    return ArchiveContents(metadata, members, links)


def _extract(archive: tarfile.TarFile, member: tarfile.TarInfo):
    file = archive.extractfile(member)
    if file is None:
        raise PybuildError(f"archive member {member.name} has no content")
    return file

