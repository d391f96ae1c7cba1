"""Exported archives: deterministic bytes, atomic writes, and read back by skopeo, umoci and podman."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_store import (
    busybox_layer,
    file_entry,
    make_image,
    need_root,
    need_tool,
    private_podman,
    run,
)

from builder.oci.exporter import write_oci_archive, write_rootfs
from builder.oci.image import MEDIA_LAYER_GZIP, MEDIA_MANIFEST, Image
from builder.oci.store import ImageStore
from cache.blobs import CorruptBlobError
from parser.errors import PybuildError


@pytest.fixture
def podman() -> Iterator[list[str]]:
    yield from private_podman()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def two_layer_image(store: ImageStore, compression: str = "gzip") -> Image:
    """Layer 1 has files with odd modes and owners; layer 2 deletes one file and replaces a directory."""
    first = [
        ("dir", "etc", None, 0o755, 0, 0),
        file_entry("etc/secret", b"s3cret\n", 0o600, 1000, 50),
        file_entry("gone", b"deleted in layer 2\n"),
        ("dir", "data", None, 0o750, 1000, 1000),
        file_entry("data/old", b"old\n"),
        ("symlink", "link", "etc/secret", 0o777, 0, 0),
    ]
    second = [
        file_entry(".wh.gone", b""),
        ("dir", "data", None, 0o750, 1000, 1000),
        file_entry("data/.wh..wh..opq", b""),
        file_entry("data/new", b"new\n", 0o640, 1000, 1000),
        file_entry("hello", b"hello from layer 2\n", 0o4755),
    ]
    return make_image(store, [first, second], compression, env=(("PATH", "/bin"), ("A", "b=c")),
                      entrypoint=("/bin/sh", "-c"), cmd=("cat /hello",), labels=(("org.test", "yes"),))


# What two_layer_image() looks like unpacked: "gone" and "data/old" were deleted by layer 2.
TWO_LAYER_TREE = {
    "data": ("drwxr-x---", 1000, 1000),
    "data/new": ("-rw-r-----", 1000, 1000),
    "etc": ("drwxr-xr-x", 0, 0),
    "etc/secret": ("-rw-------", 1000, 50),
    "hello": ("-rwsr-xr-x", 0, 0),
    "link": ("lrwxrwxrwx", 0, 0),
}


def file_tree(root: Path) -> dict[str, tuple[str, int, int]]:
    tree = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        tree[str(path.relative_to(root))] = (stat.filemode(info.st_mode), info.st_uid, info.st_gid)
    return tree


def tar_members(path: Path) -> list[tuple]:
    with tarfile.open(path) as archive:
        return [(info.name, info.type, info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime)
                for info in archive.getmembers()]


def test_archive_layout_and_names(tmp_path: Path, store: ImageStore) -> None:
    image = two_layer_image(store)
    manifest = store.write_image(image, ["demo"])
    unnamed = store.write_image(make_image(store, [[file_entry("x", b"x")]]), [])
    dest = tmp_path / "out.tar"
    write_oci_archive(store, [(manifest, ["demo", "quay.io/org/demo:2"]), (unnamed, [])], dest)
    with tarfile.open(dest) as archive:
        index = json.load(archive.extractfile("index.json"))
        docker = json.load(archive.extractfile("manifest.json"))
        layout = json.load(archive.extractfile("oci-layout"))
        names = archive.getnames()
    assert layout == {"imageLayoutVersion": "1.0.0"}
    assert [(entry["digest"], entry.get("annotations")) for entry in index["manifests"]] == [
        (manifest.digest, {"io.containerd.image.name": "docker.io/library/demo:latest",
                           "org.opencontainers.image.ref.name": "demo:latest"}),
        (manifest.digest, {"io.containerd.image.name": "quay.io/org/demo:2",
                           "org.opencontainers.image.ref.name": "quay.io/org/demo:2"}),
        (unnamed.digest, None),
    ]
    assert index["manifests"][0]["mediaType"] == MEDIA_MANIFEST
    stored = store.resolve("demo")
    assert docker[0] == {"Config": f"blobs/sha256/{stored.image_id[7:]}",
                         "RepoTags": ["demo:latest", "quay.io/org/demo:2"],
                         "Layers": [f"blobs/sha256/{layer.digest[7:]}" for layer in image.layers]}
    assert docker[1]["RepoTags"] == []
    blob_names = {f"blobs/sha256/{digest[7:]}" for digest in store.blobs.digests()}
    assert names == ["blobs", "blobs/sha256", *sorted(blob_names), "index.json", "manifest.json", "oci-layout"]


def test_archive_is_deterministic(tmp_path: Path) -> None:
    archives = []
    for attempt in ("a", "b"):
        store = ImageStore(tmp_path / f"store-{attempt}")
        manifest = store.write_image(two_layer_image(store), ["demo"])
        dest = tmp_path / f"{attempt}.tar"
        write_oci_archive(store, [(manifest, ["demo", "demo:1"])], dest)
        archives.append(dest)
    assert archives[0].read_bytes() == archives[1].read_bytes()
    for name, kind, mode, uid, gid, uname, gname, mtime in tar_members(archives[0]):
        assert (uid, gid, uname, gname, mtime) == (0, 0, "", "", 0), name
        assert (kind, mode) == ((tarfile.DIRTYPE, 0o755) if name.count("/") < 2 and name.startswith("blobs")
                                else (tarfile.REGTYPE, 0o644)), name
    assert stat.S_IMODE(archives[0].stat().st_mode) == 0o644


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated"])
def test_a_failed_export_leaves_nothing(tmp_path: Path, store: ImageStore, damage: str) -> None:
    image = two_layer_image(store)
    manifest = store.write_image(image, ["demo"])
    blob = store.blobs.path(image.layers[1].digest)
    if damage == "missing":
        blob.unlink()
    elif damage == "corrupt":
        blob.write_bytes(bytes(len(blob.read_bytes())))
    else:
        blob.write_bytes(blob.read_bytes()[:-1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.tar").write_bytes(b"previous archive")
    error = CorruptBlobError if damage == "corrupt" else PybuildError
    with pytest.raises(error, match=image.layers[1].digest):
        write_oci_archive(store, [(manifest, ["demo"])], out / "keep.tar")
    assert os.listdir(out) == ["keep.tar"]
    assert (out / "keep.tar").read_bytes() == b"previous archive"


def test_skopeo_inspects_the_archive(tmp_path: Path, store: ImageStore) -> None:
    need_tool("skopeo")
    image = two_layer_image(store, "zstd")
    manifest = store.write_image(image, ["demo:v1"])
    dest = tmp_path / "out.tar"
    write_oci_archive(store, [(manifest, ["demo:v1"])], dest)
    for reference in (f"oci-archive:{dest}", f"oci-archive:{dest}:demo:v1"):
        info = json.loads(run(["skopeo", "inspect", reference]))
        assert info["Digest"] == manifest.digest
        assert info["Layers"] == [layer.digest for layer in image.layers]
        assert info["Env"] == ["PATH=/bin", "A=b=c"]
        assert info["Labels"] == {"org.test": "yes"}
        config = json.loads(run(["skopeo", "inspect", "--config", reference]))["config"]
        assert (config["Entrypoint"], config["Cmd"]) == (["/bin/sh", "-c"], ["cat /hello"])


def test_umoci_unpacks_layers_with_whiteouts(tmp_path: Path, store: ImageStore) -> None:
    """umoci 0.4.7 refuses zstd layers ("blob is not correct mediatype"), so this image is gzip."""
    need_tool("umoci")
    need_root()
    image = two_layer_image(store, "gzip")
    assert {layer.media_type for layer in image.layers} == {MEDIA_LAYER_GZIP}
    dest = tmp_path / "out.tar"
    write_oci_archive(store, [(store.write_image(image, ["demo:v1"]), ["demo:v1"])], dest)
    layout = tmp_path / "layout"
    with tarfile.open(dest) as archive:
        archive.extractall(layout)  # an archive this test wrote
    run(["umoci", "unpack", "--image", f"{layout}:demo:v1", str(tmp_path / "bundle")])
    rootfs = tmp_path / "bundle" / "rootfs"
    assert file_tree(rootfs) == TWO_LAYER_TREE
    assert (rootfs / "etc" / "secret").read_bytes() == b"s3cret\n"
    assert os.readlink(rootfs / "link") == "etc/secret"


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_podman_loads_and_runs_the_archive(tmp_path: Path, store: ImageStore, podman: list[str],
                                           compression: str) -> None:
    image = make_image(store, [busybox_layer(), [file_entry("hello", f"hello {compression}\n".encode())]],
                       compression, cmd=("/bin/cat", "/hello"))
    dest = tmp_path / "out.tar"
    write_oci_archive(store, [(store.write_image(image, ["demo:v1"]), ["demo:v1"])], dest)
    assert "Loaded image: docker.io/library/demo:v1" in run([*podman, "load", "-i", str(dest)])
    output = subprocess.run([*podman, "run", "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit",
                             "nproc=1024:1024", "--rm", "--network", "none", "demo:v1"],
                            capture_output=True, text=True)
    assert (output.returncode, output.stdout) == (0, f"hello {compression}\n"), output.stderr


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_write_rootfs_flattens_layers(tmp_path: Path, store: ImageStore, compression: str) -> None:
    need_root()
    image = two_layer_image(store, compression)
    dest = tmp_path / "rootfs"
    write_rootfs(store, image, dest)
    assert file_tree(dest) == TWO_LAYER_TREE
    assert (dest / "data" / "new").read_bytes() == b"new\n"


def test_one_image_named_twice_is_written_once(tmp_path: Path, store: ImageStore) -> None:
    manifest = store.write_image(two_layer_image(store), ["a", "b"])
    dest = tmp_path / "out.tar"
    write_oci_archive(store, [(manifest, ["a"]), (manifest, ["b"])], dest)
    with tarfile.open(dest) as archive:
        docker = json.load(archive.extractfile("manifest.json"))
    assert [entry["RepoTags"] for entry in docker] == [["a:latest", "b:latest"]]
    assert ImageStore(tmp_path / "other").load_archive(dest) == ["a:latest", "b:latest"]


def test_destination_directory_must_exist(tmp_path: Path, store: ImageStore) -> None:
    manifest = store.write_image(two_layer_image(store), ["a"])
    with pytest.raises(PybuildError, match="cannot write .*No such file or directory"):
        write_oci_archive(store, [(manifest, ["a"])], tmp_path / "missing" / "out.tar")
