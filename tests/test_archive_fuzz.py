"""Damaged and hostile archives for `pybuild load` and `FROM oci-archive:`: a PybuildError or a sound image, never more.

Each example starts from a small valid OCI archive (two layers, made here) and damages it once: wrong
JSON types at random paths of a document, broken JSON, descriptors whose digest or size lie, diff_ids
that do not match, missing, extra or wrong blobs, hostile tar members in a layer or in the archive
itself, cut gzip and zstd layer streams, a cut archive. The archive is then loaded as ``pybuild load``
does and read as ``FROM oci-archive:`` does, each into a fresh store beside an empty sentinel
directory that every hostile path points into.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run
from test_store import file_entry, tar_bytes

from builder.fs.snapshot import Snapshots
from builder.oci.image import (
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER,
    MEDIA_LAYER_GZIP,
    MEDIA_LAYER_ZSTD,
    MEDIA_MANIFEST,
    REF_NAME_ANNOTATION,
    canonical_json,
)
from builder.oci.store import ImageStore
from builder.solver import unpack_layers
from parser.errors import PybuildError

LAYERS = [
    [("dir", "etc", None, 0o755, 0, 0), file_entry("etc/hello", b"hello\n"), file_entry("gone", b"x")],
    [file_entry(".wh.gone", b""), file_entry("etc/second", b"two\n", 0o600, 1000, 1000),
     ("symlink", "link", "etc/hello", 0o777, 0, 0)],
]
MEDIA_TYPES = {"zstd": MEDIA_LAYER_ZSTD, "gzip": MEDIA_LAYER_GZIP, "none": MEDIA_LAYER}
KINDS = ("none", "config", "manifest", "index", "oci-layout", "docker manifest", "broken json", "descriptor",
         "diff_ids", "drop member", "extra blob", "wrong blob", "hostile layer", "cut layer", "cut archive",
         "hostile member")
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["", "sha256:" + "0" * 64, "sha256:abc", "/", "a=b", "../x", "linux", "amd64"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return gzip.compress(raw, mtime=0) if compression == "gzip" else raw


def mutate_json(draw: Any, value: Any) -> Any:
    """``value`` with one spot, reached by a random path, replaced by any JSON value or deleted."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["descend", "delete", "replace"]))
        if action == "delete":
            return {name: item for name, item in value.items() if name != key}
        if action == "descend":
            return {**value, key: mutate_json(draw, value[key])}
    elif isinstance(value, list) and value:
        index = draw(st.integers(0, len(value) - 1))
        action = draw(st.sampled_from(["descend", "delete", "replace"]))
        if action == "delete":
            return value[:index] + value[index + 1:]
        if action == "descend":
            return [*value[:index], mutate_json(draw, value[index]), *value[index + 1:]]
    return draw(JSON_VALUES)


def broken_json(draw: Any, data: bytes) -> bytes:
    return draw(st.sampled_from([data[:len(data) // 2], b"", b"\xff\xfe{", b"[" * 100_000, b"{}" * 2, b"null"]))


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]], form: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=form) as archive:
        for info, data in members:
            if info.isreg() and info.size != len(data):
                # A header that claims more data than follows: written by hand, as tarfile refuses to.
                archive.fileobj.write(info.tobuf(form, archive.encoding, archive.errors) + data)
                archive.offset += len(info.tobuf(form, archive.encoding, archive.errors) + data)
                continue
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "",
           **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, link, len(data) if kind == tarfile.REGTYPE else 0, 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def hostile_members(outside: Path, archive: Path) -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """Members that try to write outside the root, each list one attempt (names under ``outside``)."""
    return [
        [member("../escaped", b"x")],
        [member("etc/../../escaped", b"x")],
        [member(f"{outside}/absolute", b"x")],
        [member("out", kind=tarfile.SYMTYPE, link=str(outside)), member("out/through", b"x")],
        [member("up", kind=tarfile.SYMTYPE, link="../../../../../../../.."), member(f"up{outside}/through", b"x")],
        [member("out", kind=tarfile.SYMTYPE, link=str(outside)), member("out", b"replaces the link")],
        [member("hard", kind=tarfile.LNKTYPE, link=str(archive))],
        [member("hard", kind=tarfile.LNKTYPE, link="../" * 8 + str(archive))],
        [member("out", kind=tarfile.SYMTYPE, link=str(archive.parent)),
         member("hard", kind=tarfile.LNKTYPE, link=f"out/{archive.name}")],
        [member("loop", kind=tarfile.SYMTYPE, link="loop"), member("loop/x", b"x")],
        [member("null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)],
        [member("disk", kind=tarfile.BLKTYPE, devmajor=7, devminor=0)],
        [member("fifo", kind=tarfile.FIFOTYPE)],
        [member(".", b"a file as the root")],
        [member(".wh..", b"")],
        [member("x" * 300 + "/long", b"long names are fine")],
        [member("huge", b"x", pax_headers={"comment": "y" * (2 << 20)})],
        [member("nul", b"x", pax_headers={"path": "a\0b"})],
        [member("ids", b"x", pax_headers={"uid": str(2**70), "gid": "-5"})],
        [member("time", b"x", pax_headers={"mtime": "1e400"})],
        [member("xattr", b"x", pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y",
                                            "SCHILY.xattr.user.\0bad": "v"})],
        [member("sparse", b"x" * 10, kind=tarfile.GNUTYPE_SPARSE)],
        [member("big", b"x", size=1 << 40)],
    ]


def build_archive(draw: Any, kind: str, outside: Path, path: Path) -> bool:
    """Write the archive for one example; returns whether it must fail to load (else it may load or fail)."""
    raws = [tar_bytes(entries) for entries in LAYERS[:draw(st.integers(1, 2))]]
    if kind == "hostile layer":
        attempt = draw(st.sampled_from(hostile_members(outside, path)))
        index = draw(st.integers(0, len(raws) - 1))
        form = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
        with tarfile.open(fileobj=io.BytesIO(raws[index])) as layer:
            kept = [(info, layer.extractfile(info).read() if info.isreg() else b"") for info in layer.getmembers()]
        position = draw(st.integers(0, len(kept)))
        try:
            raws[index] = tar_of(kept[:position] + attempt + kept[position:], form)
        except (ValueError, OverflowError, tarfile.TarError):
            raws[index] = tar_of(kept[:position] + attempt + kept[position:], tarfile.PAX_FORMAT)
    compressions = [draw(st.sampled_from(sorted(MEDIA_TYPES))) for _ in raws]
    blobs = [compress(raw, compression) for raw, compression in zip(raws, compressions, strict=True)]
    must_fail = False
    if kind == "cut layer":
        index = draw(st.integers(0, len(blobs) - 1))
        blobs[index] = blobs[index][:draw(st.integers(0, len(blobs[index]) - 1))]
        must_fail = True  # still named by its own digest, so only the content can tell
    diff_ids = [sha256(raw) for raw in raws]
    if kind == "diff_ids":
        change = draw(st.sampled_from(["drop", "add", "other"]))
        diff_ids = (diff_ids[1:] if change == "drop" else [*diff_ids, diff_ids[0]] if change == "add"
                    else [sha256(b"other"), *diff_ids[1:]])
        must_fail = True
    config_value: Any = {
        "created": "2024-01-02T03:04:05Z", "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "Entrypoint": None, "Labels": {"a": "b"},
                   "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/data": {}}, "User": "1000", "WorkingDir": "/",
                   "StopSignal": "SIGTERM", "Shell": ["/bin/sh", "-c"], "OnBuild": ["RUN true"],
                   "Healthcheck": {"Test": ["CMD", "true"], "Interval": 10**9, "Retries": 3}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {number}", "created": "2024-01-02T03:04:05Z"} for number in range(2)],
    }
    if kind == "config":
        config_value = mutate_json(draw, config_value)
    documents = {}
    documents["config"] = canonical_json(config_value)
    layer_descriptors = [{"mediaType": MEDIA_TYPES[compression], "digest": sha256(blob), "size": len(blob)}
                         for compression, blob in zip(compressions, blobs, strict=True)]
    manifest_value: Any = {
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": sha256(documents["config"]), "size": len(documents["config"])},
        "layers": layer_descriptors,
    }
    if kind == "descriptor":
        target = draw(st.sampled_from([manifest_value["config"], *layer_descriptors]))
        field = draw(st.sampled_from(["digest", "size"]))
        target[field] = (draw(st.sampled_from([target["size"] + 1, target["size"] - 1, 0]))
                         if field == "size" else sha256(draw(st.binary(max_size=4))))
        must_fail = True
    if kind == "manifest":
        manifest_value = mutate_json(draw, manifest_value)
    documents["manifest"] = canonical_json(manifest_value)
    index_value: Any = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [
        {"mediaType": MEDIA_MANIFEST, "digest": sha256(documents["manifest"]), "size": len(documents["manifest"]),
         "annotations": {REF_NAME_ANNOTATION: "fuzz:1"}, "platform": {"architecture": "amd64", "os": "linux"}}]}
    if kind == "index":
        index_value = mutate_json(draw, index_value)
    documents["index.json"] = canonical_json(index_value)
    layout_value: Any = {"imageLayoutVersion": "1.0.0"}
    if kind == "oci-layout":
        layout_value = mutate_json(draw, layout_value)
    documents["oci-layout"] = canonical_json(layout_value)
    docker_value: Any = [{"Config": f"blobs/sha256/{sha256(documents['config'])[7:]}", "RepoTags": ["fuzz:1"],
                          "Layers": [f"blobs/sha256/{sha256(blob)[7:]}" for blob in blobs]}]
    if kind == "docker manifest":
        docker_value = mutate_json(draw, docker_value)
    documents["manifest.json"] = canonical_json(docker_value)
    if kind == "broken json":
        name = draw(st.sampled_from(sorted(documents)))
        documents[name] = broken_json(draw, documents[name])
    members = {name: documents[name] for name in ("oci-layout", "index.json", "manifest.json")}
    if kind == "docker manifest":
        del members["index.json"]  # so docker's manifest.json is what is read
    for blob in (documents["config"], documents["manifest"], *blobs):
        members[f"blobs/sha256/{sha256(blob)[7:]}"] = blob
    referenced = [name for name in members if name.startswith("blobs/")]
    if kind == "drop member":
        del members[draw(st.sampled_from(sorted(members)))]
    if kind == "extra blob":
        extra = draw(st.binary(max_size=64))
        name = draw(st.sampled_from([sha256(extra)[7:], "0" * 64, sha256(extra)[7:].upper(), "junk"]))
        members[f"blobs/sha256/{name}"] = extra
    if kind == "wrong blob":
        name = draw(st.sampled_from(referenced))
        members[name] = draw(st.binary(max_size=64).filter(lambda data: data != members[name]))
        must_fail = True
    entries = [member(name, data) for name, data in members.items()]
    if kind == "hostile member":
        blob = draw(st.sampled_from(referenced))
        entries.append(draw(st.sampled_from([
            member("../escaped", b"x"), member(f"{outside}/absolute", b"x"), member(f"blobs/sha256/../../{outside}"),
            member("blobs", kind=tarfile.SYMTYPE, link=str(outside)), member(f"blobs/sha256/{'1' * 64}", b"x"),
            member("escape", kind=tarfile.SYMTYPE, link=str(outside)), member("escape/x", b"x"),
            member("index.json", kind=tarfile.LNKTYPE, link=str(path)),
            member(blob, kind=tarfile.SYMTYPE, link=str(outside)), member("null", kind=tarfile.CHRTYPE),
            member("huge", b"x", pax_headers={"comment": "y" * (2 << 20)}),
        ])))
    data = tar_of(entries)
    if kind == "cut archive":
        data = data[:draw(st.integers(0, len(data) - 1))]
    path.write_bytes(data)
    return must_fail


def check_sound(store: ImageStore, snapshots: Snapshots, image: Any) -> None:
    """Every layer's blob matches its digest and size, and its snapshot exists (unpacked and diff_id checked)."""
    assert image.layers
    for layer in image.layers:
        store.blobs.verify(layer.digest)
        assert store.blobs.path(layer.digest).stat().st_size == layer.size
        assert snapshots.has(layer.diff_id)


def load_both_ways(work: Path, archive: Path) -> tuple[bool, bool]:
    """Load as `pybuild load` does and read as `FROM oci-archive:` does; whether each succeeded."""
    outcomes = []
    store = ImageStore(work / "load")
    snapshots = Snapshots(work / "load" / "snapshots")
    try:
        names = store.load_archive(archive, unpack=lambda image: unpack_layers(snapshots, store.blobs, image))
    except PybuildError as exc:
        assert "\n" not in exc.message and exc.message, exc.message
        assert store.entries() == [], "a failed load names nothing"
        outcomes.append(False)
    else:
        assert names
        for name in names:
            check_sound(store, snapshots, store.resolve(name).image)
        outcomes.append(True)
    store = ImageStore(work / "from")
    snapshots = Snapshots(work / "from" / "snapshots")
    try:
        image = store.read_image_from_archive(archive)
        unpack_layers(snapshots, store.blobs, image)
    except PybuildError as exc:
        assert "\n" not in exc.message and exc.message, exc.message
        outcomes.append(False)
    else:
        check_sound(store, snapshots, image)
        outcomes.append(True)
    assert store.entries() == []
    return outcomes[0], outcomes[1]


def check_nothing_escaped(work: Path, outside: Path, archive: Path) -> None:
    assert os.listdir(outside) == []
    assert {entry.name for entry in work.iterdir()} <= {"load", "from", "outside", "archive.tar"}
    assert archive.stat().st_nlink == 1
    for name in ("load", "from"):
        tmp = work / name / "tmp"
        assert not tmp.is_dir() or os.listdir(tmp) == [], "no blob is left half written"


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_damaged_archives_fail_cleanly_or_load_soundly(kind: str, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        outside = work / "outside"
        outside.mkdir()
        archive = work / "archive.tar"
        must_fail = build_archive(data.draw, kind, outside, archive)
        loaded, read = load_both_ways(work, archive)
        check_nothing_escaped(work, outside, archive)
        if kind == "none":
            assert loaded and read, "the undamaged archive loads"
        if must_fail:
            assert not loaded and not read, kind


# The real command: an error message, never a traceback.


def write_case(path: Path, case: str) -> None:
    raw = tar_bytes(LAYERS[0])
    blob = zstandard.ZstdCompressor().compress(raw)
    config: dict[str, Any] = {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=b"]},
                              "rootfs": {"type": "layers", "diff_ids": [sha256(raw)]}}
    if case == "env is a number":
        config["config"]["Env"] = 5
    if case == "cut zstd layer":
        blob = blob[:-5]
    if case == "parent path in a layer":
        raw = tar_of([member("../escaped", b"x")])
        blob = zstandard.ZstdCompressor().compress(raw)
        config["rootfs"]["diff_ids"] = [sha256(raw)]
    config_blob = canonical_json(config)
    manifest = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                               "config": {"mediaType": MEDIA_CONFIG, "digest": sha256(config_blob),
                                          "size": len(config_blob)},
                               "layers": [{"mediaType": MEDIA_LAYER_ZSTD, "digest": sha256(blob), "size": len(blob)}]})
    index = {"schemaVersion": 2, "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": sha256(manifest),
                                                "size": len(manifest),
                                                "annotations": {REF_NAME_ANNOTATION: "fuzz:1"}}]}
    if case == "manifests is null":
        index["manifests"] = [None]
    members = [member("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
               member("index.json", json.dumps(index).encode())]
    members += [member(f"blobs/sha256/{sha256(data)[7:]}", data) for data in (config_blob, manifest, blob)]
    path.write_bytes(tar_of(members))


@pytest.mark.parametrize(("case", "error"), [
    ("valid", None),
    ("env is a number", r'image config sha256:[0-9a-f]{64}: "Env" must be a list of strings'),
    ("manifests is null", r"index.json: entry 0 must be a JSON object, not null"),
    ("cut zstd layer", r"cannot unpack layer blob sha256:"),
    ("parent path in a layer", r"member '../escaped' escapes the root"),
])
def test_pybuild_load_reports_damage_without_a_traceback(tmp_path: Path, case: str, error: str | None) -> None:
    write_case(tmp_path / "app.tar", case)
    result = run("load", "-i", "app.tar", cwd=tmp_path)
    if error is None:
        assert result.code == 0, result.stderr
        assert "Loaded image: fuzz:1" in result.stdout
        return
    assert result.code == 1, result.stderr
    assert result.stderr.startswith("pybuild: error: "), result.stderr
    assert re.search(error, result.stderr.splitlines()[0]), result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == [".pybuild-store", "app.tar"]
