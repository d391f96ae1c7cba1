"""Each example built by pybuild and by Buildah: same file trees and same runtime config, or Docker's docs decide."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import skip_if_chrooted
from e2e import EXAMPLES, Buildah, Entry, Pybuild, pybuild_image, read_oci_archive, require_tools, shared_store

pytestmark = pytest.mark.slow

# example directory -> tag; the child is built FROM onbuild-tools, so that one comes first
EXAMPLE_TAGS = {
    "base": "busybox-base",
    "static-site": "static-site",
    "checksummed-app": "checksummed-app",
    "worker": "worker",
    "cgi-service": "cgi-service",
    "onbuild-tools": "onbuild-tools",
    "onbuild-tools/child": "linted-scripts",
}
PARENT = {"onbuild-tools/child": "onbuild-tools"}
CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Volumes", "Labels", "StopSignal",
               "Healthcheck", "OnBuild", "Shell")
# Mount points a RUN sandbox needs; Buildah's chroot isolation leaves them behind, empty, in the layer.
# They carry no content of the build, so an empty one is left out on both sides.
SANDBOX_MOUNT_POINTS = ("/dev", "/proc", "/sys", "/run", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf")

# Where Buildah 1.28 and Docker's documented behaviour differ, pybuild follows Docker: path -> pybuild's entry.
# Docker's WORKDIR reference: "If the WORKDIR doesn't exist, it will be created even if it's not used in any
# subsequent Dockerfile instruction." Buildah creates a WORKDIR only when a later step needs it.
ROOT_DIR = Entry("dir", 0o755, 0, 0)
DOCKER_DOCS = {
    # `WORKDIR /srv/cgi` makes /srv and /srv/cgi as root, before `COPY --chown=root:www` puts cgi-bin in it;
    # Buildah's COPY creates them itself and gives them the --chown owner.
    "cgi-service": {"/srv": ROOT_DIR, "/srv/cgi": ROOT_DIR},
    # `WORKDIR /workspace` with nothing copied there yet: Buildah's image has no /workspace at all.
    "onbuild-tools": {"/workspace": ROOT_DIR},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Pybuild:
    return shared_store(tmp_path_factory)


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Buildah:
    """Buildah with its own store, holding busybox-base built by Buildah from the same examples/base."""
    require_tools("buildah", "skopeo", "umoci")
    skip_if_chrooted("buildah")
    buildah = Buildah(tmp_path_factory.mktemp("buildah"))
    buildah.bud(EXAMPLES / "base", "localhost/busybox-base:latest", build_contexts={"busybox": "/bin"})
    return buildah


def runtime_config(config: dict) -> dict:
    """The fields a user of the image sees, with "empty" spelled one way (Buildah writes [] and {} for unset)."""
    out = {key: config[key] for key in CONFIG_KEYS if config.get(key)}
    labels = {key: value for key, value in out.get("Labels", {}).items() if key != "io.buildah.version"}
    if labels:
        out["Labels"] = labels
    else:
        out.pop("Labels", None)
    return out


def content(files: dict[str, Entry]) -> dict[str, Entry]:
    empty = {path for path in SANDBOX_MOUNT_POINTS if path in files and files[path].size == 0
             and not any(other.startswith(path + "/") for other in files)}
    return {path: entry for path, entry in files.items() if path not in empty}


class Builds:
    """Builds each example once with each builder, parents first (the ONBUILD child needs its parent image)."""

    def __init__(self, store: Pybuild, buildah: Buildah) -> None:
        self.store, self.buildah = store, buildah
        self.done = {"base"}  # the shared store and the buildah fixture start with the base built

    def build(self, example: str) -> None:
        if example in self.done:
            return
        if example in PARENT:
            self.build(PARENT[example])
        tag = EXAMPLE_TAGS[example]
        self.store.build(EXAMPLES / example, "-t", tag)
        self.buildah.bud(EXAMPLES / example, f"localhost/{tag}:latest")
        self.done.add(example)


@pytest.fixture(scope="module")
def builds(store: Pybuild, buildah: Buildah) -> Builds:
    return Builds(store, buildah)


@pytest.mark.parametrize("example", list(EXAMPLE_TAGS))
def test_pybuild_and_buildah_build_the_same_image(example: str, builds: Builds, tmp_path: Path) -> None:
    builds.build(example)
    tag = EXAMPLE_TAGS[example]
    ours = pybuild_image(builds.store, tag, tmp_path / "pybuild")
    (tmp_path / "buildah").mkdir()
    theirs = read_oci_archive(builds.buildah.oci_archive(tag, tmp_path / "buildah.tar"), tmp_path / "buildah")

    assert "/bin/busybox" in ours.files, "the trees compared are whole images"
    assert runtime_config(ours.runtime) == runtime_config(builds.buildah.docker_config(tag)["config"])

    ours_files, theirs_files = content(ours.files), content(theirs.files)
    for path, expected in DOCKER_DOCS.get(example, {}).items():
        assert ours_files.pop(path, None) == expected, f"{path}: as Docker's docs say"
        theirs_files.pop(path, None)
    assert sorted(ours_files.keys() - theirs_files.keys()) == [], "only in pybuild's image"
    assert sorted(theirs_files.keys() - ours_files.keys()) == [], "only in Buildah's image"
    different = {path: (ours_files[path], theirs_files[path]) for path in ours_files
                 if ours_files[path] != theirs_files[path]}
    assert different == {}, "(pybuild, Buildah)"
