"""The local image store: names, index.json, gc, and importing archives made by pybuild, skopeo, podman or by hand."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import skip_if_chrooted

from builder.fs.snapshot import Snapshots
from builder.graph import host_platform
from builder.oci.exporter import write_oci_archive
from builder.oci.image import (
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER,
    MEDIA_LAYER_GZIP,
    MEDIA_LAYER_ZSTD,
    MEDIA_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    History,
    Image,
    ImageConfig,
    Layer,
    canonical_json,
    config_json,
    index_json,
    manifest_json,
)
from builder.oci.store import (
    GC_GRACE_SECONDS,
    MAX_INDEX_DEPTH,
    ImageStore,
    full_name,
    normalize_name,
    parse_reference,
)
from cache.blobs import CorruptBlobError
from cache.gc import free_unused
from parser.errors import PybuildError

# Helpers shared with test_exporter.py: layers and images made by hand.


def tar_bytes(entries: list[tuple]) -> bytes:
    """A layer tar from (kind, name, content, mode, uid, gid) tuples; kind is file, dir or symlink."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for kind, name, content, mode, uid, gid in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, 0
            if kind == "file":
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.type, info.linkname = tarfile.SYMTYPE, content
                archive.addfile(info)
    return buffer.getvalue()


def file_entry(name: str, content: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> tuple:
    return ("file", name, content, mode, uid, gid)


def store_layer(store: ImageStore, raw: bytes, compression: str = "zstd") -> Layer:
    blob, media_type = {
        "zstd": lambda: (zstandard.ZstdCompressor().compress(raw), MEDIA_LAYER_ZSTD),
        "gzip": lambda: (gzip.compress(raw, mtime=0), MEDIA_LAYER_GZIP),
        "none": lambda: (raw, MEDIA_LAYER),
    }[compression]()
    digest = store.blobs.put_bytes(blob)
    return Layer("sha256:" + hashlib.sha256(raw).hexdigest(), digest, len(blob), media_type)


def make_image(store: ImageStore, layer_entries: list[list[tuple]], compression: str = "zstd",
               **config: object) -> Image:
    layers = tuple(store_layer(store, tar_bytes(entries), compression) for entries in layer_entries)
    return Image(config=ImageConfig(**config), layers=layers, created="2024-01-02T03:04:05Z",
                 history=tuple(History(f"layer {number}") for number in range(len(layers))))


def busybox_layer() -> list[tuple]:
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("/bin/busybox is missing: install Debian's busybox-static")
    return [("dir", "bin", None, 0o755, 0, 0), file_entry("bin/busybox", busybox.read_bytes(), 0o755),
            ("symlink", "bin/sh", "busybox", 0o777, 0, 0), ("symlink", "bin/cat", "busybox", 0o777, 0, 0)]


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (podman and umoci write files owned by other users)")


def private_podman() -> Iterator[list[str]]:
    """podman with a private store (its runroot path must stay under 50 characters, hence /tmp)."""
    need_tool("podman")
    need_root()
    skip_if_chrooted("podman")
    state = Path(tempfile.mkdtemp(prefix="pbpod-", dir="/tmp"))
    yield ["podman", "--root", str(state / "root"), "--runroot", str(state / "run"), "--storage-driver", "vfs",
           "--cgroup-manager=cgroupfs"]
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def podman() -> Iterator[list[str]]:
    yield from private_podman()


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{command} failed: {done.stderr}"
    return done.stdout


# References


@pytest.mark.parametrize(("text", "name", "digest"), [
    ("busybox", "busybox:latest", None),
    ("busybox:1.36", "busybox:1.36", None),
    ("library/busybox", "busybox:latest", None),
    ("docker.io/library/busybox:1.36", "busybox:1.36", None),
    ("index.docker.io/library/busybox", "busybox:latest", None),
    ("docker.io/someone/app:v2", "someone/app:v2", None),
    ("localhost/app", "app:latest", None),
    ("localhost/team/app:x", "team/app:x", None),
    ("localhost:5000/app", "localhost:5000/app:latest", None),
    ("quay.io/org/app:1.0", "quay.io/org/app:1.0", None),
    ("someone/app", "someone/app:latest", None),
    ("app@sha256:" + "a" * 64, None, "sha256:" + "a" * 64),
    ("app:1@sha256:" + "b" * 64, "app:1", "sha256:" + "b" * 64),
])
def test_references_are_shortened_to_their_familiar_form(text: str, name: str | None, digest: str | None) -> None:
    reference = parse_reference(text)
    assert (reference.name, reference.digest) == (name, digest)


@pytest.mark.parametrize(("text", "message"), [
    ("Busybox", "invalid image reference"),
    ("app:", "invalid image reference"),
    ("app@sha256:123", "invalid image reference"),
    ("-app", "invalid image reference"),
    ("app@sha256:" + "a" * 64, "names a digest"),
])
def test_bad_names(text: str, message: str) -> None:
    with pytest.raises(PybuildError, match=message):
        normalize_name(text)


@pytest.mark.parametrize(("name", "full"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("someone/app:1", "docker.io/someone/app:1"),
    ("localhost/app", "docker.io/library/app:latest"),
    ("quay.io/org/app:1", "quay.io/org/app:1"),
    ("localhost:5000/app", "localhost:5000/app:latest"),
])
def test_full_names(name: str, full: str) -> None:
    assert full_name(name) == full


# Writing, resolving, naming


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def demo_image(store: ImageStore, text: bytes = b"hello\n") -> Image:
    return make_image(store, [[file_entry("hello", text)]], env=(("PATH", "/bin"),), cmd=("cat", "/hello"),
                      labels=(("a", "b"),))


def test_store_root_is_an_oci_layout(store: ImageStore) -> None:
    assert json.loads((store.root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads(store.index_path.read_bytes())["manifests"] == []


def test_written_image_resolves_by_every_form_of_its_name(store: ImageStore) -> None:
    image = demo_image(store)
    manifest = store.write_image(image, ["demo", "localhost/demo:v1"])
    config = config_json(image)
    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    assert store.blobs.read_bytes(image_id) == config
    stored_manifest = json.loads(store.blobs.read_bytes(manifest.digest))
    assert stored_manifest["config"] == {"mediaType": MEDIA_CONFIG, "digest": image_id, "size": len(config)}
    for reference in ("demo", "demo:latest", "localhost/demo", "docker.io/library/demo:latest", "library/demo",
                      "demo:v1", image_id, image_id[7:], image_id[7:19], manifest.digest,
                      "demo@" + manifest.digest):
        stored = store.resolve(reference)
        assert stored.manifest == manifest, reference
        assert stored.image_id == image_id
        assert stored.names == ("demo:latest", "demo:v1")
        assert config_json(stored.image) == config
        assert stored.image.layers == image.layers
    entries = json.loads(store.index_path.read_bytes())["manifests"]
    assert [entry["annotations"] for entry in entries] == [{REF_NAME_ANNOTATION: "demo:latest"},
                                                          {REF_NAME_ANNOTATION: "demo:v1"}]
    assert entries[0]["platform"] == {"architecture": "amd64", "os": "linux"}


@pytest.mark.parametrize("reference", ["other", "demo:v2", "sha256:" + "0" * 64, "0123456789ab",
                                       "demo@sha256:" + "0" * 64])
def test_unknown_references(store: ImageStore, reference: str) -> None:
    store.write_image(demo_image(store), ["demo"])
    with pytest.raises(PybuildError, match="is not in the local store") as caught:
        store.resolve(reference)
    assert "pybuild load" in caught.value.hint


@pytest.fixture
def id_prefixes(store: ImageStore) -> dict[str, str]:
    """Images "a" and "b" whose IDs share a prefix, and one whose name is a prefix of a's ID.

    Returns each image's ID hex, ``shared`` (the longest prefix a's and b's IDs have in common),
    ``absent`` (two hex digits no ID starts with).
    """
    seen: dict[str, str] = {}
    for number in range(17):  # 17 IDs: two of them start with the same hex digit
        image = demo_image(store, str(number).encode())
        image_id = hashlib.sha256(config_json(image)).hexdigest()
        first = next((other for other in seen.values() if other[0] == image_id[0]), None)
        if first is not None:
            store.write_image(store.resolve(first).image, ["a"])
            store.write_image(image, ["b"])
            break
        store.write_image(image, [])
        seen[image_id] = image_id
    a, b = store.resolve("a").image_id[7:], store.resolve("b").image_id[7:]
    shared = os.path.commonprefix([a, b])
    for number in range(20):  # its own ID starts elsewhere, so only a and b share a prefix
        named = demo_image(store, b"named %d" % number)
        named_id = hashlib.sha256(config_json(named)).hexdigest()
        if named_id[0] != a[0]:
            break
    store.write_image(named, [a[:len(shared) + 1]])
    starts = {stored.image_id[7:9] for stored in store.list()}
    return {"a": a, "b": b, "named": named_id, "shared": shared,
            "absent": next(f"{number:02x}" for number in range(256) if f"{number:02x}" not in starts)}


@pytest.mark.parametrize(("reference", "expected"), [
    ("{a:.{n2}}", "a"),  # the shortest prefix only a's ID has, beyond the one "named" takes
    ("sha256:{a:.{n2}}", "a"),
    ("{a}", "a"),
    ("sha256:{a}", "a"),
    ("{b:.{n1}}", "b"),
    ("{a:.{n1}}", "named"),  # a reference that reads as a name is a name first, as in docker
    ("{shared}", "matches 2 images"),
    ("sha256:{shared}", "matches 2 images"),
    ("{absent}", "is not in the local store"),
    ("{a:.{n2}}F", "invalid image reference"),
    ("", "invalid image reference"),
])
def test_image_id_prefixes(store: ImageStore, id_prefixes: dict[str, str], reference: str, expected: str) -> None:
    shared = len(id_prefixes["shared"])
    text = reference.format(**id_prefixes, n1=shared + 1, n2=shared + 2)
    if expected in ("a", "b", "named"):
        assert store.resolve(text).image_id == "sha256:" + id_prefixes[expected]
        return
    with pytest.raises(PybuildError, match=expected):
        store.resolve(text)
    with pytest.raises(PybuildError, match=expected):
        store.remove(text)
    assert len(store.list()) >= 3, "a failed rmi removes nothing"


def test_rmi_by_a_short_prefix_removes_every_name(store: ImageStore, id_prefixes: dict[str, str]) -> None:
    prefix = id_prefixes["b"][:len(id_prefixes["shared"]) + 1]
    assert store.remove(prefix) == ("b:latest",)
    assert store.resolve(id_prefixes["a"][:len(id_prefixes["shared"])]).names == ("a:latest",)


def test_moving_a_tag_leaves_the_old_image_unnamed(store: ImageStore) -> None:
    first = store.write_image(demo_image(store, b"one"), ["demo"])
    second = store.write_image(demo_image(store, b"two"), ["demo", "demo:2"])
    assert store.resolve("demo").manifest == second
    assert store.resolve(first.digest).names == ()
    listed = {stored.manifest.digest: stored.names for stored in store.list()}
    assert listed == {first.digest: (), second.digest: ("demo:latest", "demo:2")}
    # Writing the same image again with no names keeps its names and adds no entry.
    store.write_image(demo_image(store, b"two"), [])
    assert len(store.entries()) == 3


def test_image_without_names_is_kept_once(store: ImageStore) -> None:
    manifest = store.write_image(demo_image(store), [])
    store.write_image(demo_image(store), [])
    assert [entry.digest for entry in store.entries()] == [manifest.digest]
    assert store.resolve(manifest.digest).names == ()
    store.write_image(demo_image(store), ["named"])
    assert [dict(entry.annotations) for entry in store.entries()] == [{REF_NAME_ANNOTATION: "named:latest"}]


def test_write_image_needs_its_layer_blobs(store: ImageStore) -> None:
    image = demo_image(store)
    store.blobs.remove(image.layers[0].digest)
    with pytest.raises(PybuildError, match=f"layer {image.layers[0].digest} .*not in the blob store"):
        store.write_image(image, ["demo"])
    assert store.entries() == []


def test_list_reports_id_size_and_created(store: ImageStore) -> None:
    image = demo_image(store)
    store.write_image(image, ["demo"])
    [stored] = store.list()
    assert stored.image_id == "sha256:" + hashlib.sha256(config_json(image)).hexdigest()
    assert stored.size == image.layers[0].size
    assert stored.created == "2024-01-02T03:04:05Z"


def test_remove_untags_then_drops_the_image(store: ImageStore) -> None:
    manifest = store.write_image(demo_image(store), ["demo", "demo:v1"])
    assert store.remove("localhost/demo") == ("demo:latest",)
    assert store.resolve("demo:v1").names == ("demo:v1",)
    assert store.remove("demo:v1") == ("demo:v1",)
    assert store.entries() == []
    with pytest.raises(PybuildError, match="not in the local store"):
        store.resolve(manifest.digest)
    other = store.write_image(demo_image(store, b"x"), ["x", "y"])
    assert store.remove(store.resolve("x").image_id) == ("x:latest", "y:latest")
    assert store.entries() == [] and store.blobs.has(other.digest)


def test_gc_deletes_only_old_unreachable_blobs(store: ImageStore) -> None:
    kept = demo_image(store, b"kept")
    store.write_image(kept, ["kept"])
    dropped = store.write_image(demo_image(store, b"dropped"), ["dropped"])
    dropped_image = store.resolve("dropped")
    store.remove("dropped")
    cached = store.blobs.put_bytes(b"a layer the build cache still wants")
    young = store.blobs.put_bytes(b"written by a build running now")
    old = os.path.getmtime(store.blobs.path(young)) - GC_GRACE_SECONDS - 60
    for digest in store.blobs.digests():
        if digest != young:
            os.utime(store.blobs.path(digest), (old, old))
    gone = {dropped.digest, dropped_image.image_id, dropped_image.image.layers[0].digest}
    size = sum(store.blobs.path(digest).stat().st_size for digest in gone)
    before = set(store.blobs.digests())
    assert store.gc(keep={cached}) == (3, size)
    assert set(store.blobs.digests()) == before - gone
    assert store.resolve("kept").image.layers == kept.layers


def _write_names(root: Path, prefix: str, count: int) -> None:
    store = ImageStore(root)
    for number in range(count):
        store.write_image(demo_image(store, f"{prefix}{number}".encode()), [f"{prefix}:{number}"])


def test_concurrent_writers_keep_every_name(tmp_path: Path) -> None:
    ImageStore(tmp_path)
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_write_names, args=(tmp_path, prefix, 15)) for prefix in ("left", "right")]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert [process.exitcode for process in processes] == [0, 0]
    store = ImageStore(tmp_path)
    names = {name for stored in store.list() for name in stored.names}
    assert names == {f"{prefix}:{number}" for prefix in ("left", "right") for number in range(15)}
    assert store.resolve("left:7").image.layers[0].size > 0


def test_damaged_index_is_reported(store: ImageStore) -> None:
    store.index_path.write_text("{not json")
    with pytest.raises(PybuildError, match="index.json is damaged"):
        store.resolve("demo")


def test_corrupt_manifest_blob_is_detected(store: ImageStore) -> None:
    manifest = store.write_image(demo_image(store), ["demo"])
    store.blobs.path(manifest.digest).write_bytes(b"{}")
    with pytest.raises(CorruptBlobError, match=f"blob {manifest.digest} is corrupt"):
        store.resolve("demo")


def test_skopeo_reads_the_store_as_an_oci_layout(store: ImageStore) -> None:
    need_tool("skopeo")
    image = demo_image(store)
    manifest = store.write_image(image, ["demo:v1"])
    info = json.loads(run(["skopeo", "inspect", f"oci:{store.root}:demo:v1"]))
    assert info["Digest"] == manifest.digest
    assert info["Layers"] == [image.layers[0].digest]
    assert info["Env"] == ["PATH=/bin"] and info["Labels"] == {"a": "b"}


# Import


def export(store: ImageStore, names: dict[str, list[str]], dest: Path) -> Path:
    write_oci_archive(store, [(store.resolve(name).manifest, tags) for name, tags in names.items()], dest)
    return dest


def test_load_our_own_archive(tmp_path: Path, store: ImageStore) -> None:
    image = demo_image(store)
    store.write_image(image, ["demo", "demo:v1"])
    archive = export(store, {"demo": ["demo", "demo:v1", "quay.io/x/demo:2"]}, tmp_path / "out.tar")
    target = ImageStore(tmp_path / "other")
    assert target.load_archive(archive) == ["demo:latest", "demo:v1", "quay.io/x/demo:2"]
    stored = target.resolve("quay.io/x/demo:2")
    assert config_json(stored.image) == config_json(image)
    assert stored.image.layers == image.layers
    for digest in (stored.manifest.digest, stored.image_id, image.layers[0].digest):
        target.blobs.verify(digest)


def test_read_image_without_naming_it(tmp_path: Path, store: ImageStore) -> None:
    image = demo_image(store)
    store.write_image(image, ["demo:v1"])
    archive = export(store, {"demo:v1": ["demo:v1"]}, tmp_path / "out.tar")
    target = ImageStore(tmp_path / "other")
    assert target.read_image_from_archive(archive).layers == image.layers
    assert target.entries() == [] and target.blobs.has(image.layers[0].digest)
    layout = tmp_path / "layout"
    with tarfile.open(archive) as opened:
        opened.extractall(layout)  # an archive this test wrote
    for number, spec in enumerate((str(layout), f"{layout}:demo:v1", f"{layout}:docker.io/library/demo:v1")):
        assert ImageStore(tmp_path / f"fresh{number}").read_image_from_layout(spec).layers == image.layers
    with pytest.raises(PybuildError, match="has no image named 'demo:v2'"):
        target.read_image_from_layout(f"{layout}:demo:v2")
    assert target.load_layout(layout) == ["demo:v1"]


def write_layout(directory: Path, blobs: list[bytes], entries: list[Descriptor]) -> None:
    (directory / "blobs" / "sha256").mkdir(parents=True)
    for blob in blobs:
        (directory / "blobs" / "sha256" / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    (directory / "oci-layout").write_bytes(b'{"imageLayoutVersion":"1.0.0"}')
    (directory / "index.json").write_bytes(index_json(entries))


def descriptor(media_type: str, blob: bytes, **fields: object) -> Descriptor:
    return Descriptor(media_type, "sha256:" + hashlib.sha256(blob).hexdigest(), len(blob), **fields)


def platform_image(store: ImageStore, architecture: str) -> tuple[list[bytes], Descriptor]:
    image = make_image(store, [[file_entry("arch", architecture.encode())]])
    image = Image(config=image.config, layers=image.layers, architecture=architecture)
    layer = store.blobs.path(image.layers[0].digest).read_bytes()
    config = config_json(image)
    manifest = manifest_json(descriptor(MEDIA_CONFIG, config), image.layers)
    platform = (("architecture", architecture), ("os", "linux"))
    return [layer, config, manifest], descriptor(MEDIA_MANIFEST, manifest, platform=platform)


@pytest.mark.parametrize(("architectures", "expected"), [
    (["arm64", host_platform()[1]], host_platform()[1]),
    (["arm64", "s390x"], "no linux/amd64 image"),
])
def test_multi_platform_index_picks_this_machine(tmp_path: Path, store: ImageStore, architectures: list[str],
                                                 expected: str) -> None:
    blobs, children = [], []
    for architecture in architectures:
        some, child = platform_image(store, architecture)
        blobs += some
        children.append(child)
    nested = index_json(children)
    write_layout(tmp_path / "layout", [*blobs, nested],
                 [descriptor(MEDIA_INDEX, nested, annotations=((REF_NAME_ANNOTATION, "multi:1"),))])
    target = ImageStore(tmp_path / "target")
    if expected.startswith("no "):
        with pytest.raises(PybuildError, match=f"{expected} .*offers linux/arm64, linux/s390x"):
            target.load_layout(tmp_path / "layout")
        assert target.entries() == []
        return
    assert target.load_layout(tmp_path / "layout") == ["multi:1"]
    stored = target.resolve("multi:1")
    assert stored.image.architecture == expected
    assert not target.blobs.has(children[0].digest), "the other platform's blobs are not copied"


@pytest.mark.parametrize(("repository", "loaded"), [("base", ["base:latest"]), (None, None)])
def test_bare_tag_names(tmp_path: Path, store: ImageStore, repository: str | None, loaded: list[str] | None) -> None:
    image = demo_image(store)
    config = config_json(image)
    manifest = manifest_json(descriptor(MEDIA_CONFIG, config), image.layers)
    layer = store.blobs.path(image.layers[0].digest).read_bytes()
    write_layout(tmp_path / "layout", [layer, config, manifest],
                 [descriptor(MEDIA_MANIFEST, manifest, annotations=((REF_NAME_ANNOTATION, "latest"),))])
    target = ImageStore(tmp_path / "target")
    image_id = descriptor(MEDIA_CONFIG, config).digest
    assert target.load_layout(tmp_path / "layout", repository) == (loaded or [image_id])
    assert target.resolve(image_id).names == tuple(loaded or ())


def docker_archive(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return path


def test_load_docker_save_archive(tmp_path: Path, store: ImageStore) -> None:
    raw = tar_bytes([file_entry("hello", b"from docker")])
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    config = canonical_json({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                             "rootfs": {"type": "layers", "diff_ids": [diff_id, diff_id]}})
    config_hex = hashlib.sha256(config).hexdigest()
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": ["docker.io/library/old:1", "localhost/old:2"],
                 "Layers": ["aaaa" * 16 + "/layer.tar", "bbbb" * 16 + "/layer.tar"]}]
    archive = docker_archive(tmp_path / "docker.tar", {
        "repositories": b"{}", "aaaa" * 16 + "/VERSION": b"1.0", "aaaa" * 16 + "/layer.tar": raw,
        f"{config_hex}.json": config, "manifest.json": json.dumps(manifest).encode(),
    }, links={"bbbb" * 16 + "/layer.tar": "../" + "aaaa" * 16 + "/layer.tar"})
    assert store.load_archive(archive) == ["old:1", "old:2"]
    stored = store.resolve("old:2")
    assert stored.image_id == "sha256:" + config_hex, "the config blob is kept as it was"
    assert stored.image.config.cmd == ("sh",)
    assert [(layer.digest, layer.diff_id, layer.media_type) for layer in stored.image.layers] == [
        (diff_id, diff_id, MEDIA_LAYER)] * 2
    assert store.blobs.path(diff_id).read_bytes() == raw


@pytest.mark.parametrize("source", ["podman oci-archive", "podman docker-archive", "skopeo oci-archive",
                                    "skopeo docker-archive"])
def test_import_archives_other_tools_wrote(tmp_path: Path, store: ImageStore, source: str,
                                          request: pytest.FixtureRequest) -> None:
    tool, form = source.split()
    # docker archives cannot hold zstd layers, so those images are made with gzip.
    compression = "gzip" if form == "docker-archive" else "zstd"
    image = make_image(store, [[file_entry("hello", source.encode())]], compression, cmd=("cat", "/hello"))
    store.write_image(image, ["demo:src"])
    ours = export(store, {"demo:src": ["demo:src"]}, tmp_path / "ours.tar")
    theirs = tmp_path / "theirs.tar"
    if tool == "podman":
        command = request.getfixturevalue("podman")
        run([*command, "load", "-q", "-i", str(ours)])
        run([*command, "save", "-q", "--format", form, "-o", str(theirs), "demo:src"])
    else:
        need_tool("skopeo")
        run(["skopeo", "copy", "-q", f"oci-archive:{ours}", f"{form}:{theirs}:copied/demo:v9"])
    target = ImageStore(tmp_path / "target")
    expected = "demo:src" if tool == "podman" else "copied/demo:v9"
    assert target.load_archive(theirs) == [expected]
    stored = target.resolve(expected)
    assert stored.image.config == image.config
    assert [layer.diff_id for layer in stored.image.layers] == [layer.diff_id for layer in image.layers]
    for layer in stored.image.layers:
        target.blobs.verify(layer.digest)


# Hostile archives: nothing outside the store is written, and a bad blob makes nothing visible.


def hostile(path: Path, base: Path, extra: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]],
            drop: str | None = None) -> Path:
    """Our archive ``base`` with members appended (or one dropped)."""
    with tarfile.open(base) as source, tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for member in source.getmembers():
            if member.name != drop:
                archive.addfile(member, source.extractfile(member) if member.isfile() else None)
        for item in extra:
            info, data = item if isinstance(item, tuple) else (item, b"")
            archive.addfile(info, io.BytesIO(data))
    return path


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo,
                                                                                                   bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data


HOSTILE = {
    "parent path": ([member("../escaped", b"x")], None, None),
    "absolute path": ([member("/tmp/pybuild-escaped-file", b"x")], None, None),
    "dot dot blob": ([member("blobs/sha256/../../escaped", b"x")], None, None),
    "symlink out": ([member("escape-link", kind=tarfile.SYMTYPE, link="/etc")], None, None),
    "device": ([member("dev-null", kind=tarfile.CHRTYPE)], None, None),
    "blob as symlink": ([member("blobs/sha256/{layer}", kind=tarfile.SYMTYPE, link="/etc/passwd")],
                        "blobs/sha256/{layer}",
                        "lacks blob"),
    # Without index.json, docker's manifest.json (which our archives carry too) is used.
    "index as hard link": ([member("index.json", kind=tarfile.LNKTYPE, link="/etc/shadow")], "index.json", None),
    "wrong blob content": ([member("blobs/sha256/{layer}", b"evil")], "blobs/sha256/{layer}",
                           "wrong content"),
    "huge index": ([member("index.json", b" " * (17 << 20))], "index.json", "too large"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_archives(tmp_path: Path, store: ImageStore, case: str, caplog: pytest.LogCaptureFixture) -> None:
    image = demo_image(store)
    store.write_image(image, ["demo"])
    base = export(store, {"demo": ["demo"]}, tmp_path / "base.tar")
    layer = image.layers[0].digest.removeprefix("sha256:")
    extra, drop, error = HOSTILE[case]
    extra = [(_renamed(info, info.name.format(layer=layer)), data) for info, data in extra]
    work = tmp_path / "work"
    work.mkdir()
    archive = hostile(tmp_path / "hostile.tar", base, extra, drop and drop.format(layer=layer))
    target = ImageStore(work / "store")
    before = sorted(tmp_path.iterdir())
    if error is None:
        assert target.load_archive(archive) == ["demo:latest"]
        assert f"ignoring member {extra[0][0].name}:" in caplog.text
    else:
        with pytest.raises(PybuildError, match=error):
            target.load_archive(archive)
        assert target.entries() == [], "a failed import names nothing"
    assert sorted(tmp_path.iterdir()) == before
    assert not Path("/tmp/pybuild-escaped-file").exists()
    assert {path.name for path in work.iterdir()} == {"store"}
    assert {path.name for path in (work / "store").iterdir()} <= {"blobs", "tmp", "index.json", "index.lock",
                                                                   "oci-layout"}
    assert os.listdir(target.blobs.tmp_dir) == []


@pytest.mark.parametrize(("content", "error"), [
    (b"not a tar at all", "cannot read archive"),
    (None, "unexpected end of data"),
])
def test_unreadable_archives(tmp_path: Path, store: ImageStore, content: bytes | None, error: str) -> None:
    store.write_image(demo_image(store), ["demo"])
    path = tmp_path / "broken.tar"
    if content is None:
        good = export(store, {"demo": ["demo"]}, tmp_path / "good.tar")
        with tarfile.open(good) as opened:
            cut = opened.getmember(f"blobs/sha256/{store.resolve('demo').image.layers[0].digest[7:]}").offset_data
        content = good.read_bytes()[:cut + 10]
    path.write_bytes(content)
    target = ImageStore(tmp_path / "target")
    with pytest.raises(PybuildError, match=error):
        target.load_archive(path)
    assert target.entries() == []


def test_docker_layer_must_match_its_diff_id(tmp_path: Path, store: ImageStore) -> None:
    raw = tar_bytes([file_entry("hello", b"real")])
    config = canonical_json({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}})
    manifest = [{"Config": "c.json", "RepoTags": ["bad:1"], "Layers": ["l.tar"]}]
    archive = docker_archive(tmp_path / "docker.tar", {
        "a" * 64 + ".json": config, "b" * 64 + ".tar": raw,
        "manifest.json": json.dumps(manifest).replace("c.json", "a" * 64 + ".json")
                                             .replace("l.tar", "b" * 64 + ".tar").encode(),
    })
    with pytest.raises(PybuildError, match="does not match the diff ID sha256:0000"):
        store.load_archive(archive)
    assert store.entries() == []


def test_reading_one_image_from_an_archive_of_two(tmp_path: Path, store: ImageStore) -> None:
    store.write_image(demo_image(store, b"1"), ["one"])
    store.write_image(demo_image(store, b"2"), ["two"])
    archive = export(store, {"one": ["one"], "two": ["two"]}, tmp_path / "out.tar")
    with pytest.raises(PybuildError, match="holds 2 images; exactly one is needed"):
        ImageStore(tmp_path / "other").read_image_from_archive(archive)


def _renamed(info: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    renamed = copy.copy(info)
    renamed.name = name
    return renamed


def test_an_image_that_fails_to_unpack_is_not_named(tmp_path: Path, store: ImageStore) -> None:
    store.write_image(demo_image(store), ["demo"])
    archive = export(store, {"demo": ["demo"]}, tmp_path / "out.tar")
    target = ImageStore(tmp_path / "target")

    def unpack(image: Image) -> None:
        raise PybuildError(f"cannot unpack layer blob {image.layers[0].digest}")

    with pytest.raises(PybuildError, match="cannot unpack layer blob"):
        target.load_archive(archive, unpack=unpack)
    assert target.entries() == []
    unpacked = []
    assert target.load_archive(archive, unpack=unpacked.append) == ["demo:latest"]
    assert unpacked == [target.resolve("demo").image]


def test_an_archive_must_hold_the_blobs_it_names(tmp_path: Path, store: ImageStore) -> None:
    image = demo_image(store)
    store.write_image(image, ["demo"])
    layer = image.layers[0].digest
    archive = hostile(tmp_path / "partial.tar", export(store, {"demo": ["demo"]}, tmp_path / "out.tar"), [],
                      drop=f"blobs/sha256/{layer[7:]}")
    # The store holding the blob already does not make the archive whole.
    with pytest.raises(PybuildError, match=f"archive {archive} lacks blob {layer}"):
        store.load_archive(archive)


@pytest.mark.parametrize(("index", "error"), [
    ({"manifests": []}, "holds no image"),
    ({"manifests": 5}, r'index.json: "manifests" must be a list of descriptors, not a number'),
    ({"manifests": [{"mediaType": MEDIA_MANIFEST, "digest": "sha256:../../x", "size": 1}]},
     r'index.json: entry 0: "digest" must be "sha256:" and 64 lowercase hex digits'),
    ([], "index.json must be a JSON object, not a list"),
])
def test_malformed_layout_index(tmp_path: Path, store: ImageStore, index: Any, error: str) -> None:
    write_layout(tmp_path / "layout", [], [])
    (tmp_path / "layout" / "index.json").write_text(json.dumps(index))
    with pytest.raises(PybuildError) as caught:
        store.load_layout(tmp_path / "layout")
    assert re.search(error, caught.value.message) and str(tmp_path / "layout") in caught.value.message
    assert store.entries() == []


def test_nested_indexes_have_a_depth_limit(tmp_path: Path, store: ImageStore) -> None:
    blobs, child = platform_image(store, host_platform()[1])
    for _ in range(MAX_INDEX_DEPTH + 1):
        nested = index_json([child])
        blobs.append(nested)
        child = descriptor(MEDIA_INDEX, nested, platform=(("architecture", host_platform()[1]), ("os", "linux")))
    write_layout(tmp_path / "layout", blobs, [child])
    with pytest.raises(PybuildError, match=f"nests more than {MAX_INDEX_DEPTH} indexes deep"):
        ImageStore(tmp_path / "target").load_layout(tmp_path / "layout")


def test_store_index_of_wrong_types_is_damaged(store: ImageStore) -> None:
    store.index_path.write_text('{"manifests": [{"digest": 5}]}')
    with pytest.raises(PybuildError, match="index.json is damaged: index.json: entry 0: \"digest\" must be"):
        store.resolve("demo")


def test_one_image_stored_in_two_compressions_keeps_one_id(store: ImageStore, tmp_path: Path) -> None:
    """The same build exported with another --compression is another manifest of the same image ID (config)."""
    entries = [[file_entry("hello", b"hello\n")]]
    named = store.write_image(make_image(store, entries, cmd=("cat", "/hello")), ["app"])
    unnamed = store.write_image(make_image(store, entries, "gzip", cmd=("cat", "/hello")), [])
    image_id = store.resolve("app").image_id
    assert named.digest != unnamed.digest and store.resolve(unnamed.digest).image_id == image_id
    assert store.image_id(image_id[7:19]) == image_id
    for reference in (image_id, image_id[7:19]):  # which of the two, only the user can say
        with pytest.raises(PybuildError, match=rf"image ID {image_id} is stored as 2 manifests \(.*"
                                               rf"{unnamed.digest}.*\); name one by its name or manifest digest"):
            store.resolve(reference)

    # prune drops the unnamed manifest only, and reports it by its digest, as the image ID stays
    freed = free_unused(store, Snapshots(tmp_path / "snapshots"), tmp_path / "cache", unnamed_images=True)
    assert freed.images == (unnamed.digest,)
    assert [(stored.manifest, stored.names) for stored in store.list()] == [(named, ("app:latest",))]

    # rmi by ID removes every manifest of it
    store.write_image(make_image(store, entries, "gzip", cmd=("cat", "/hello")), [])
    assert sorted(store.remove(image_id[7:19])) == sorted(["app:latest", unnamed.digest])
    assert store.list() == []
