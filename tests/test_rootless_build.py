"""Whole builds as an unprivileged user (rootless, through a user namespace), and with the copy snapshotter.

Each build's image is read back from its OCI archive: the owners recorded in the layers are the ids
inside the image, not the subordinate ids they have on the host.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from conftest import BUSYBOX, skip_if_chrooted
from test_namespace import needs_root, user_with_subordinate_ids  # noqa: F401  (a fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, needs_root]

DOCKERFILE = """\
FROM scratch
COPY --from=tools busybox /bin/busybox
COPY <<EOF /etc/passwd
root:x:0:0:root:/root:/bin/sh
www:x:1000:1000:www:/home/www:/bin/sh
EOF
COPY <<EOF /etc/group
root:x:0:
www:x:1000:
EOF
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN --mount=type=bind,target=/ctx ls -A /ctx > /ctx-listing
RUN mkdir -p /home/www /tmp && chown www:www /home/www && chmod 1777 /tmp && echo root > /by-root \\
    && rm /etc/group && mkdir -p /gone && rmdir /gone
USER www
RUN echo www > /home/www/by-www && id > /home/www/id
RUN <<EOF
#!/bin/sh
id -u > /home/www/script-uid
EOF
"""


@pytest.fixture
def readable_tree() -> Iterator[Path]:
    """pybuild and its four dependencies copied where any user can read them (the venv may be in root's home)."""
    top = Path(tempfile.mkdtemp(prefix="pybuild-rootless-"))
    try:
        top.chmod(0o755)
        for package in ("builder", "parser", "cache"):
            shutil.copytree(REPO_ROOT / package, top / package, ignore=shutil.ignore_patterns("__pycache__"))
        for dependency in ("click", "lark", "zstandard", "pathspec"):
            source = Path(importlib.import_module(dependency).__file__).parent
            shutil.copytree(source, top / dependency, ignore=shutil.ignore_patterns("__pycache__"))
        tools = top / "tools"
        tools.mkdir()
        shutil.copy2(BUSYBOX, tools / "busybox")
        (top / "context").mkdir()
        (top / "context" / "Dockerfile").write_text(DOCKERFILE)
        (top / "context" / ".dockerignore").write_text("*.secret\n")
        (top / "context" / "token.secret").write_text("s3cret\n")
        (top / "context" / "kept.txt").write_text("kept\n")
        subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
        yield top
    finally:
        shutil.rmtree(top)


def build_as(uid: int, gid: int, tree: Path, context: str = "context") -> subprocess.CompletedProcess[str]:
    work = tree / f"work-{uid}"
    work.mkdir()
    os.chown(work, uid, gid)
    return pybuild_as(uid, gid, tree, "build", "--progress=plain", "--build-context", f"tools={tree / 'tools'}",
                      "-o", f"type=oci,dest={work / 'image.tar'}", str(tree / context))


def pybuild_as(uid: int, gid: int, tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pybuild run by ``uid`` with its own store in the tree's ``work-<uid>``."""
    work = tree / f"work-{uid}"
    if uid:
        skip_if_chrooted("a rootless build")
    switch = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"] if uid else []
    # Tried from inside a user namespace, as the build runs: host permissions may differ there.
    probe = [*switch, "unshare", "--user", "--map-root-user"] if uid else []
    python = next((candidate for candidate in (sys.executable, "/usr/bin/python3")
                   if subprocess.run([*probe, candidate, "-I", "-c", "import sys; assert sys.version_info >= (3, 11)"],
                                     capture_output=True).returncode == 0), None)
    if python is None:
        pytest.skip(f"no Python 3.11+ that uid {uid} may run")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from builder.cli import main; "
              "sys.exit(main(sys.argv[2:]))")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(work), "PYBUILD_ROOT": str(work / "store")}
    env.update({key: value for key, value in os.environ.items() if key == "PYBUILD_SNAPSHOTTER"})
    return subprocess.run(
        [*switch, python, "-I", "-c", script, str(tree), *args],
        capture_output=True, text=True, cwd=work, env=env, timeout=300)


def layers(archive: Path) -> list[list[tarfile.TarInfo]]:
    """Each layer's members, bottom-up, read straight from the archive's blobs."""
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))
        manifest_path = "blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(outer.extractfile(manifest_path))
        result = []
        for descriptor in manifest["layers"]:
            blob = outer.extractfile("blobs/sha256/" + descriptor["digest"].split(":")[1])
            stream = zstandard.ZstdDecompressor().stream_reader(blob)
            with tarfile.open(fileobj=stream, mode="r|") as layer:
                result.append(list(layer))
        return result


def file_text(archive: Path, name: str) -> str:
    """A file's content in the image's last layer that holds it."""
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))
        manifest = json.load(outer.extractfile("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
        text = None
        for descriptor in manifest["layers"]:
            blob = outer.extractfile("blobs/sha256/" + descriptor["digest"].split(":")[1])
            with tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(blob), mode="r|") as layer:
                for member in layer:
                    if member.name == name and member.isfile():
                        text = layer.extractfile(member).read().decode()
        assert text is not None, f"{name} is in no layer"
        return text


def owners(archive: Path) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for members in layers(archive):
        for member in members:
            found[member.name.rstrip("/")] = (member.uid, member.gid)
    return found


def test_rootless_build_with_subordinate_ids(readable_tree: Path, user_with_subordinate_ids) -> None:  # noqa: F811
    uid, gid, start = user_with_subordinate_ids
    result = build_as(uid, gid, readable_tree)
    assert result.returncode == 0, result.stderr
    archive = readable_tree / f"work-{uid}" / "image.tar"
    found = owners(archive)
    assert found["by-root"] == (0, 0)
    assert found["home/www"] == (1000, 1000)
    assert found["home/www/by-www"] == (1000, 1000)
    names = [member.name for members in layers(archive) for member in members]
    assert "etc/.wh.group" in names  # a deletion, as an OCI whiteout
    # the context's bind mount leaves out what .dockerignore drops, made from files this user does not own
    assert file_text(archive, "ctx-listing") == ".dockerignore\nDockerfile\nkept.txt\n"
    assert not any(name.startswith("gone") for name in names)
    assert file_text(archive, "home/www/script-uid") == "1000\n"  # a heredoc script, run from the sandbox's /dev
    # Its unpacked layers hold files of the namespace's users and whiteout devices; the same user frees them.
    snapshots = readable_tree / f"work-{uid}" / "store" / "snapshots" / "overlay-userxattr"
    assert len(list(snapshots.iterdir())) == len(layers(archive))
    pruned = pybuild_as(uid, gid, readable_tree, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert list(snapshots.iterdir()) == []
    # the build named no image, so prune removed it first, as `docker image prune` removes dangling images
    count = len(layers(archive))
    assert pruned.stdout.splitlines()[0].startswith("Deleted: sha256:")
    # each layer, the config and the manifest
    # then the build cache (prune clears it, as docker system prune does), then what only they used
    assert pruned.stdout.splitlines()[1].endswith(" build cache entries"), pruned.stdout
    assert pruned.stdout.splitlines()[2] == f"Deleted {count + 2} blobs and {count} unpacked layers"
    # The same build as root gives the very same image: ids and whiteouts do not depend on who builds.
    as_root = build_as(0, 0, readable_tree)
    assert as_root.returncode == 0, as_root.stderr
    assert (readable_tree / "work-0" / "image.tar").read_bytes() == archive.read_bytes()


def test_rootless_single_id_runs_root_steps_and_names_subuid_for_others(readable_tree: Path) -> None:
    # With only the caller's own id mapped, only root exists in the namespace: no chown to www, no USER www.
    single = readable_tree / "single-id"
    single.mkdir()
    (single / "Dockerfile").write_text(DOCKERFILE.replace("chown www:www /home/www && ", ""))
    single.chmod(0o755)
    (single / "Dockerfile").chmod(0o644)
    result = build_as(65534, 65534, readable_tree, "single-id")
    assert result.returncode != 0
    assert "#7 DONE" in result.stderr  # the root RUN steps ran
    assert "/etc/subuid" in result.stderr.splitlines()[-1] or "/etc/subuid" in result.stderr
    # USER www's RUN, the first step needing a 2nd id
    assert ("single-id/Dockerfile:16:1: USER www needs uid 1000, but this rootless build maps only root (0)"
            in result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_copy_snapshotter_builds_the_same_image(readable_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = build_as(0, 0, readable_tree)
    assert overlay.returncode == 0, overlay.stderr
    first = (readable_tree / "work-0" / "image.tar").read_bytes()
    shutil.rmtree(readable_tree / "work-0")
    monkeypatch.setenv("PYBUILD_SNAPSHOTTER", "copy")
    copied = build_as(0, 0, readable_tree)
    assert copied.returncode == 0, copied.stderr
    assert (readable_tree / "work-0" / "image.tar").read_bytes() == first
