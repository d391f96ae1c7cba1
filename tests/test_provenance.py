"""Provenance statements, their attestation in OCI archives, verify --provenance, and build --check-reproducible."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from e2e import Podman, Pybuild, loaded, require_tools, run, saved_base

pytestmark = pytest.mark.slow

DOCKERFILE = """\
FROM busybox-base
ARG VERSION=1
COPY app.txt /app/app.txt
RUN --mount=type=secret,id=token cat /run/secrets/token > /dev/null && echo "$VERSION" > /app/version
"""
SECRET = "s3cr3t-value-never-stored"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_base(tmp_path_factory, "skopeo")


@pytest.fixture
def store(tmp_path: Path, base: Path) -> Pybuild:
    return loaded(tmp_path / "store", base)


def context(directory: Path, dockerfile: str = DOCKERFILE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(dockerfile)
    (directory / "app.txt").write_text("the app\n")
    (directory / ".dockerignore").write_text("ignored.txt\n")
    (directory / "ignored.txt").write_text("not part of the context\n")
    return directory


def build_with_provenance(store: Pybuild, tmp_path: Path, *args: str) -> tuple[dict, dict, Path]:
    (tmp_path / "token").write_text(SECRET)
    source = context(tmp_path / "ctx")
    provenance = tmp_path / "provenance.json"
    metadata = tmp_path / "metadata.json"
    done = store.build(source, "-t", "app", "--build-arg", "VERSION=7", "--build-arg", "SOURCE_DATE_EPOCH=1700000000",
                       "--secret", f"id=token,src={tmp_path / 'token'}", "--provenance", provenance,
                       "--metadata-file", metadata, *args)
    assert SECRET not in done.stdout + done.stderr
    return json.loads(provenance.read_text()), json.loads(metadata.read_text()), source


def test_provenance_names_what_the_build_read(store: Pybuild, tmp_path: Path) -> None:
    statement, metadata, source = build_with_provenance(store, tmp_path)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"] == [{"name": "app",
                                     "digest": {"sha256": metadata["containerimage.digest"].removeprefix("sha256:")}}]
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["buildArgs"] == {"VERSION": "7", "SOURCE_DATE_EPOCH": "1700000000"}
    assert definition["externalParameters"]["dockerfile"] == "Dockerfile"
    assert definition["internalParameters"]["sourceDateEpoch"] == 1700000000
    dependencies = {item["name"]: item for item in definition["resolvedDependencies"]}
    assert dependencies["dockerfile"]["digest"]["sha256"] == hashlib.sha256(
        (source / "Dockerfile").read_bytes()).hexdigest()
    assert dependencies["context"]["annotations"]["entries"] == 3  # Dockerfile, app.txt, .dockerignore
    assert dependencies["base:busybox-base"]["uri"] == "docker.io/library/busybox-base"
    text = json.dumps(statement)
    assert SECRET not in text and "token" not in text, "a secret's value and id stay out of the provenance"
    assert str(source) not in text, "never the checkout's own path"


def test_an_ignored_file_does_not_change_the_context_digest(store: Pybuild, tmp_path: Path) -> None:
    first, _, source = build_with_provenance(store, tmp_path)
    (source / "ignored.txt").write_text("changed, but ignored\n")
    (source / "app.txt").touch()
    store.build(source, "-t", "app", "--build-arg", "VERSION=7", "--build-arg", "SOURCE_DATE_EPOCH=1700000000",
                "--secret", f"id=token,src={tmp_path / 'token'}", "--provenance", tmp_path / "again.json")
    second = json.loads((tmp_path / "again.json").read_text())
    assert second == first


def test_a_provenance_written_into_the_context_verifies(store: Pybuild, tmp_path: Path) -> None:
    """Written beside the Dockerfile, as users do, and built again over an older one: the statement is no input of
    the build it describes, so the context it names is the one verify finds."""
    source = context(tmp_path / "ctx", "FROM busybox-base\nCOPY app.txt /app.txt\n")
    for _ in range(2):
        store.build(source, "-t", "beside", "--provenance", source / "provenance.json")
    done = store.run("verify", "beside", "--context", source, "--provenance", source / "provenance.json",
                     check=False)
    assert (done.returncode, done.stdout.split(":")[0]) == (0, "verified"), done.stdout + done.stderr
    (source / "extra.txt").write_text("an input the statement does not know\n")
    done = store.run("verify", "beside", "--context", source, "--provenance", source / "provenance.json",
                     check=False)
    assert done.returncode == 1
    assert any(line.startswith("provenance: the context is not the one the provenance names")
               for line in done.stdout.splitlines()), done.stdout


def test_verify_with_provenance(store: Pybuild, tmp_path: Path) -> None:
    _, metadata, source = build_with_provenance(store, tmp_path)
    secret = ("--secret", f"id=token,src={tmp_path / 'token'}")
    done = store.run("verify", "app", "--context", source, "--provenance", tmp_path / "provenance.json", check=False)
    assert done.returncode == 2, "the rebuild needs the secret the build had"  # secrets are never in provenance
    assert "token" in done.stderr
    done = store.run("verify", "app", "--context", source, "--provenance", tmp_path / "provenance.json", *secret)
    assert done.stdout == f"verified: {metadata['containerimage.digest']}\n"
    assert SECRET not in done.stdout + done.stderr
    # a Dockerfile without secrets:
    plain = context(tmp_path / "plain", DOCKERFILE.replace("--mount=type=secret,id=token cat /run/secrets/token > "
                                                           "/dev/null && ", ""))
    store.build(plain, "-t", "plain", "--build-arg", "VERSION=3", "--provenance", tmp_path / "plain.json")
    done = store.run("verify", "plain", "--context", plain, "--provenance", tmp_path / "plain.json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("verified: sha256:")
    (plain / "app.txt").write_text("edited\n")
    done = store.run("verify", "plain", "--context", plain, "--provenance", tmp_path / "plain.json", check=False)
    assert done.returncode == 1
    assert any(line.startswith("provenance: the context is not the one the provenance names")
               for line in done.stdout.splitlines()), done.stdout
    assert any(line.startswith("  /app/app.txt: content") for line in done.stdout.splitlines()), done.stdout


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    require_tools("podman")
    return Podman(tmp_path_factory.mktemp("podman"))  # a short path: podman refuses a long runroot


def test_an_oci_archive_carries_the_provenance_as_an_attestation(store: Pybuild, tmp_path: Path,
                                                                 base: Path, pod: Podman) -> None:
    require_tools("skopeo")
    archive = tmp_path / "app.tar"
    build_with_provenance(store, tmp_path, "-o", f"type=oci,dest={archive}")
    statement_bytes = (tmp_path / "provenance.json").read_bytes()
    index = json.loads(run(["skopeo", "inspect", "--raw", f"oci-archive:{archive}:app:latest"]).stdout)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    image, attestation = index["manifests"]
    assert image["platform"] == {"architecture": "amd64", "os": "linux"} or image["platform"]["os"] == "linux"
    assert attestation["platform"] == {"architecture": "unknown", "os": "unknown"}
    assert attestation["annotations"] == {"vnd.docker.reference.digest": image["digest"],
                                          "vnd.docker.reference.type": "attestation-manifest"}
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile(f"blobs/sha256/{attestation['digest'][7:]}").read())
        layer = manifest["layers"][0]
        assert layer["mediaType"] == "application/vnd.in-toto+json"
        assert layer["annotations"] == {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v1"}
        assert tar.extractfile(f"blobs/sha256/{layer['digest'][7:]}").read() == statement_bytes
    # still an image every client loads: skopeo picks this platform, podman and pybuild load it
    assert json.loads(run(["skopeo", "inspect", "--config", f"oci-archive:{archive}:app:latest"]).stdout)[
        "architecture"] == "amd64"
    other = loaded(tmp_path / "other", base)
    other.run("load", "-i", archive)
    assert json.loads(other.run("inspect", "app").stdout)["rootfs"] == json.loads(
        store.run("inspect", "app").stdout)["rootfs"]
    pod.load(archive)


def test_check_reproducible_names_the_file_and_the_step(store: Pybuild, tmp_path: Path) -> None:
    steady = context(tmp_path / "steady", "FROM busybox-base\nCOPY app.txt /app.txt\nRUN echo built > /built\n")
    done = store.build(steady, "-t", "steady", "--check-reproducible")
    assert any(line.startswith("reproducible: sha256:") for line in done.stderr.splitlines()), done.stderr
    clock = context(tmp_path / "clock", "FROM busybox-base\nCOPY app.txt /app.txt\nRUN echo built > /built\n"
                                        "RUN date > /built-at\n")
    done = store.build(clock, "-t", "clock", "--check-reproducible", check=False)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith("layer ") and line.endswith(": differs Dockerfile:4: RUN /bin/sh -c date > /built-at")
               for line in lines), done.stderr
    assert any(line.startswith("  /built-at: content") for line in lines), done.stderr
    assert not any("differs Dockerfile:3:" in line for line in lines), "the steady RUN is reproducible"
    assert "clock:latest" in store.run("images").stdout or "clock" in store.run("images").stdout
    assert not list((store.root / "tmp").glob("verify-*")), "the second build's scratch store is gone"
