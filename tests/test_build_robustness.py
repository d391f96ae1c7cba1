"""Bad input and interrupted builds lose nothing; the other outputs (local tree, iidfile, metadata) hold real content.

Covered here: a hostile base-image layer, a corrupt blob in the store, SIGKILL in the middle of a RUN,
Ctrl-C, `--output type=local`, `--iidfile`, `--metadata-file`, `--build-context NAME=docker-image://REF`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from conftest import process_command_lines
from e2e import PYBUILD, Pybuild, build_base, require_root

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Pybuild:
    """A store of this module's own: these tests damage and kill things."""
    require_root()
    pybuild = Pybuild(tmp_path_factory.mktemp("robust-root"))
    build_base(pybuild)
    return pybuild


def context(tmp_path: Path, dockerfile: str, **files: str) -> Path:
    directory = tmp_path / "context"
    directory.mkdir(parents=True)
    (directory / "Dockerfile").write_text(dockerfile)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def oci_archive_with_layer(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    """An OCI archive holding one image, ``hostile:latest``, whose single layer has exactly ``members``."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    blobs = {"config": config, "layer": layer_bytes}
    digests = {key: "sha256:" + hashlib.sha256(value).hexdigest() for key, value in blobs.items()}
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digests["config"],
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digests["layer"],
                    "size": len(layer_bytes)}]}).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "hostile:latest"}}]}).encode()
    with tarfile.open(path, "w") as archive:
        for name, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index),
                           (f"blobs/sha256/{manifest_digest[7:]}", manifest),
                           *[(f"blobs/sha256/{digests[key][7:]}", value) for key, value in blobs.items()]]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def member(name: str, data: bytes = b"", **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


HOSTILE_LAYERS = [
    ("dot-dot", [member("../../../../tmp/pybuild-escaped", b"x")], "escapes the root"),
    ("symlink-then-write", [member("evil", type=tarfile.SYMTYPE, linkname="/tmp"),
                            member("evil/pybuild-escaped", b"x")], None),
    ("hardlink-out", [member("passwd", type=tarfile.LNKTYPE, linkname="../../../../etc/passwd")], "escapes"),
]


@pytest.mark.parametrize(("members", "message"), [case[1:] for case in HOSTILE_LAYERS],
                         ids=[case[0] for case in HOSTILE_LAYERS])
def test_hostile_base_layer_never_writes_outside(store: Pybuild, tmp_path: Path, members, message) -> None:
    escaped = Path("/tmp/pybuild-escaped")
    escaped.unlink(missing_ok=True)
    archive = tmp_path / "hostile.tar"
    oci_archive_with_layer(archive, members)
    directory = context(tmp_path, f"FROM oci-archive:{archive}\nCOPY Dockerfile /copied\n")
    done = store.build(directory, check=False)
    assert not escaped.exists()
    if message is None:  # confined: the write lands inside the image, under its own /tmp
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 1
        assert message in done.stderr
        assert f"{directory}/Dockerfile:1:1:" in done.stderr


def test_corrupt_blobs_are_reported(tmp_path: Path) -> None:
    require_root()
    pybuild = Pybuild(tmp_path / "root")
    build_base(pybuild)
    base_archive = pybuild.save("busybox-base", tmp_path / "base.tar")
    layer_blob = max((pybuild.root / "blobs" / "sha256").iterdir(), key=lambda path: path.stat().st_size)

    # A damaged archive: load refuses it and the store shows nothing of it.
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(base_archive) as source, tarfile.open(damaged, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read() if member.isfile() else None
            if member.name.endswith(layer_blob.name):
                data = data[:-100] + b"\0" * 100
            target.addfile(member, io.BytesIO(data) if data is not None else None)
    fresh = Pybuild(tmp_path / "fresh")
    refused = fresh.run("load", "-i", damaged, check=False)
    assert refused.returncode == 1
    assert layer_blob.name in refused.stderr
    assert "busybox-base" not in fresh.run("images").stdout

    # A blob damaged in the store after loading, before its layer was unpacked again: the build names it.
    fresh.run("load", "-i", base_archive)
    assert list((fresh.root / "snapshots").glob("*/*/bin/busybox"))  # load unpacked the layer, as docker load does
    stored = fresh.root / "blobs" / "sha256" / layer_blob.name
    stored.write_bytes(stored.read_bytes()[:-100] + b"\0" * 100)
    shutil.rmtree(fresh.root / "snapshots")
    done = fresh.build(context(tmp_path, "FROM busybox-base\nRUN true\n"), check=False)
    assert done.returncode == 1
    assert layer_blob.name in done.stderr
    assert "Traceback" not in done.stderr


def test_sigkill_mid_build_leaves_a_usable_store(store: Pybuild, tmp_path: Path) -> None:
    directory = context(tmp_path, "FROM busybox-base\nRUN echo started; sleep 60\n")
    environment = {**os.environ, "PYBUILD_ROOT": str(store.root)}
    process = subprocess.Popen([*PYBUILD, "build", "--progress", "plain", "-t", "killed", directory],
                               env=environment, stderr=subprocess.PIPE, text=True)
    assert "started" in _read_until(process, "started")
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(0.5)
    assert not [line for line in process_command_lines() if "sleep 60" in line]
    json.loads((store.root / "index.json").read_text())  # still whole
    assert "killed" not in store.run("images").stdout
    # The next build works and sweeps the killed build's step dirs.
    rebuilt = store.build(context(tmp_path / "again", "FROM busybox-base\nRUN echo ok > /ok\n"), "-t", "after-kill")
    assert rebuilt.returncode == 0
    assert not [entry for entry in (store.root / "tmp").glob(f"step-{process.pid}-*")]


def test_ctrl_c_stops_the_build_and_its_processes(store: Pybuild, tmp_path: Path) -> None:
    directory = context(tmp_path, "FROM busybox-base\nRUN echo started; sleep 61\n")
    environment = {**os.environ, "PYBUILD_ROOT": str(store.root)}
    # As at a terminal: a test run started in the background inherits SIGINT ignored, and Python keeps that.
    process = subprocess.Popen([*PYBUILD, "build", "--progress", "plain", directory], env=environment,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _read_until(process, "started")
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=10) == 130
    assert time.monotonic() - started < 5
    rest = process.stderr.read()
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "pybuild: interrupted", rest
    time.sleep(0.5)
    assert not [line for line in process_command_lines() if "sleep 61" in line]


def test_a_failed_stage_ends_the_build_without_waiting_for_another_stages_step(store: Pybuild,
                                                                              tmp_path: Path) -> None:
    """Stages run in parallel: when one fails, another's long RUN is stopped, not waited for."""
    directory = context(tmp_path, "FROM busybox-base AS slow\nRUN echo started; sleep 62\n"
                                  "FROM busybox-base AS broken\nRUN sleep 1; exit 3\n"
                                  "FROM busybox-base\nCOPY --from=slow /etc/passwd /a\n"
                                  "COPY --from=broken /etc/passwd /b\n")
    started = time.monotonic()
    done = store.build(directory, check=False)
    assert done.returncode == 3, done.stderr
    assert time.monotonic() - started < 20
    assert "RUN failed with exit code 3" in done.stderr and "Traceback" not in done.stderr
    time.sleep(0.5)
    assert not [line for line in process_command_lines() if "sleep 62" in line]


def _read_until(process: subprocess.Popen, text: str) -> str:
    seen = ""
    deadline = time.monotonic() + 60
    while text not in seen and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen += line
    return seen


def test_outputs_local_iidfile_metadata_and_image_context(store: Pybuild, tmp_path: Path) -> None:
    directory = context(tmp_path, "FROM base AS b\nRUN echo hi > /hi && rm /etc/group\nUSER www\n",
                        extra="x")
    out = tmp_path / "rootfs"
    done = store.build(directory, "--build-context", "base=docker-image://busybox-base:latest",
                       "-o", f"type=local,dest={out}", "--iidfile", tmp_path / "iid",
                       "--metadata-file", tmp_path / "meta.json", "-t", "outputs:1")
    assert (out / "hi").read_text() == "hi\n"
    assert not (out / "etc" / "group").exists()  # the deletion is applied, not shipped as a whiteout file
    assert not list(out.rglob(".wh.*"))
    assert (out / "bin" / "busybox").stat().st_mode & 0o777 == 0o755
    image_id = (tmp_path / "iid").read_text()
    assert image_id.startswith("sha256:") and image_id in done.stderr
    metadata = json.loads((tmp_path / "meta.json").read_text())
    assert metadata["containerimage.config.digest"] == image_id
    assert metadata["image.name"] == "outputs:1"
    inspected = json.loads(store.run("inspect", "outputs:1").stdout)
    assert inspected["config"]["User"] == "www"
    assert store.run("build", "-q", directory, "--build-context",
                     "base=docker-image://busybox-base:latest").stdout.strip() == image_id


def test_rw_bind_mount_writes_are_thrown_away(store: Pybuild, tmp_path: Path) -> None:
    directory = context(tmp_path, "FROM busybox-base\n"
                        "RUN --mount=type=bind,source=data,target=/data,rw "
                        "echo changed >> /data/f && cat /data/f > /seen\n"
                        "RUN --mount=type=bind,source=data,target=/data test ! -w /data/f || touch /data/f 2>/dev/null;"
                        " cat /data/f > /again\n")
    (directory / "data").mkdir()
    (directory / "data" / "f").write_text("original\n")
    store.build(directory, "-t", "rw-bind")
    out = tmp_path / "rootfs"
    store.build(directory, "-o", f"type=local,dest={out}")
    assert (out / "seen").read_text() == "original\nchanged\n"
    assert (out / "again").read_text() == "original\n"
    assert (directory / "data" / "f").read_text() == "original\n"  # the context is untouched
    assert not (out / "data").exists()


def test_bind_mounts_of_the_context_follow_its_ignore_file(store: Pybuild, tmp_path: Path) -> None:
    directory = context(tmp_path, "FROM busybox-base\n"
                        "RUN --mount=type=bind,target=/ctx,rw cd /ctx && find . | sort > /seen && touch new data/f\n",
                        **{".dockerignore": "*.secret\n"}, keep="kept\n")
    (directory / "data").mkdir()
    (directory / "data" / "f").write_text("original\n")
    (directory / "token.secret").write_text("s3cret\n")
    out = tmp_path / "rootfs"
    store.build(directory, "-o", f"type=local,dest={out}")
    assert (out / "seen").read_text() == ".\n./.dockerignore\n./Dockerfile\n./data\n./data/f\n./keep\n"
    # the view's hard links are gone with the step, and writes through the rw mount reached nothing
    assert (directory / "data" / "f").stat().st_nlink == 1
    assert (directory / "data" / "f").read_text() == "original\n"
    assert not (directory / "new").exists()
    assert not [path for path in (store.root / "tmp").iterdir() if path.name.startswith("step-")]

    (directory / "Dockerfile").write_text("FROM busybox-base\n"
                                          "RUN --mount=type=bind,source=token.secret,target=/t cat /t\n")
    failed = store.build(directory, check=False)
    assert failed.returncode != 0
    assert f"RUN --mount source 'token.secret' is excluded by {directory / '.dockerignore'}" in failed.stderr
    assert "s3cret" not in failed.stdout + failed.stderr


def test_concurrent_builds_share_one_store(store: Pybuild, tmp_path: Path) -> None:
    environment = {**os.environ, "PYBUILD_ROOT": str(store.root)}
    processes = []
    for number in range(3):
        directory = context(tmp_path / str(number), f"FROM busybox-base\nRUN echo {number} > /n\nCOPY Dockerfile /\n")
        processes.append(subprocess.Popen([*PYBUILD, "build", "-q", "-t", f"parallel:{number}", directory],
                                          env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [process.communicate() + (process.returncode,) for process in processes]
    assert [code for _, _, code in results] == [0, 0, 0], results
    rows = [line.split() for line in store.run("images").stdout.splitlines()[1:]]
    assert {row[1] for row in rows if row[0] == "parallel"} == {"0", "1", "2"}
    image_ids = {stdout.strip() for stdout, _, _ in results}
    assert len(image_ids) == 3  # three different images, each named by its own build
    for number in range(3):
        out = tmp_path / f"out{number}"
        store.run("save", "-o", out.with_suffix(".tar"), f"parallel:{number}")
        with tarfile.open(out.with_suffix(".tar")) as archive:
            assert "manifest.json" in archive.getnames()


def test_from_a_named_directory_context(store: Pybuild, tmp_path: Path) -> None:
    rootfs = tmp_path / "tree"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "motd").write_text("from a directory\n")
    directory = context(tmp_path, "FROM tree\nCOPY --from=tree /etc/motd /copied\n")
    out = tmp_path / "out"
    store.build(directory, "--build-context", f"tree={rootfs}", "-o", f"type=local,dest={out}")
    assert (out / "etc" / "motd").read_text() == "from a directory\n"
    assert (out / "copied").read_text() == "from a directory\n"
    assert sorted(path.name for path in out.iterdir()) == ["copied", "etc"]


def test_docker_output_has_gzip_layers_and_the_same_image_id(store: Pybuild, tmp_path: Path) -> None:
    directory = context(tmp_path, "FROM busybox-base\nRUN echo docker > /d\n")
    archive = tmp_path / "docker.tar"
    done = store.build(directory, "-o", f"type=docker,dest={archive}", "-t", "for-docker:1")
    zstd_build = store.run("build", "-q", directory).stdout.strip()
    inspected = json.loads(subprocess.run(["skopeo", "inspect", "--raw", f"docker-archive:{archive}"],
                                          capture_output=True, text=True, check=True).stdout)
    assert {layer["mediaType"] for layer in inspected["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"}
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))
        assert manifest[0]["RepoTags"] == ["for-docker:1"]
        for layer in manifest[0]["Layers"]:
            assert outer.extractfile(layer).read(2) == b"\x1f\x8b"  # gzip magic: what docker load reads
    assert zstd_build in done.stderr  # the image ID does not depend on the layers' compression


def test_only_the_built_images_layers_are_stored_as_blobs(store: Pybuild, tmp_path: Path) -> None:
    """A stage that is only copied from keeps its snapshots but never has its layers compressed into blobs."""
    fresh = Pybuild(tmp_path / "fresh-root")
    fresh.run("load", "-i", store.save("busybox-base", tmp_path / "base.tar"))
    directory = context(tmp_path, "FROM busybox-base AS gen\nRUN echo made > /g && head -c 9999 /dev/urandom > /r\n"
                        "FROM busybox-base AS final\nCOPY --from=gen /g /copied\nRUN cat /copied > /again\n")
    fresh.build(directory, "-t", "copied-only")
    from builder.oci.store import ImageStore

    images = ImageStore(fresh.root).list()
    referenced = {digest for stored in images
                  for digest in (stored.manifest.digest, stored.image_id,
                                 *(layer.digest for layer in stored.image.layers))}
    stored = {"sha256:" + path.name for path in (fresh.root / "blobs" / "sha256").iterdir()}
    assert stored == referenced  # no blob of the gen stage's layer
    built, = (image for image in images if "copied-only:latest" in image.names)
    base, = (image for image in images if "busybox-base:latest" in image.names)
    assert built.image.layers[:-2] == base.image.layers  # and the layers of COPY and RUN
    snapshots = [path for path in (fresh.root / "snapshots").glob("*/*") if not path.name.startswith(".")]
    assert len(snapshots) == len(built.image.layers) + 1  # and the gen stage's layer, as a snapshot only
