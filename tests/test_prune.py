"""Freeing the store: `pybuild rmi` frees what only the removed image used, `pybuild prune` what nothing uses.

Neither may take anything from under a running build: builds, loads and saves hold the store's lease.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from e2e import PYBUILD, REPO, Pybuild, build_base, require_root

from builder.fs import snapshot
from builder.fs.snapshot import Snapshots
from builder.oci.store import ImageStore
from builder.solver import sweep_stale_scratch
from cache.leases import LEASE_FILE, exclusive_lease, shared_lease


def fake_snapshot(store: Path, seed: str) -> str:
    """A snapshot dir holding one file; returns its diff_id."""
    diff_id = "sha256:" + hashlib.sha256(seed.encode()).hexdigest()
    tree = store / diff_id.removeprefix("sha256:")
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "data").write_bytes(seed.encode() * 5000)
    return diff_id


def test_unused_snapshots_of_every_snapshotter_go_and_nothing_else(tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path / "snapshots")
    used = fake_snapshot(tmp_path / "snapshots" / "overlay", "used")
    unused_overlay = fake_snapshot(tmp_path / "snapshots" / "overlay", "unused")
    unused_copy = fake_snapshot(tmp_path / "snapshots" / "copy", "copied")
    (tmp_path / "snapshots" / "overlay" / "not-a-layer").mkdir()
    (tmp_path / "snapshots" / ".overlay-mounts").write_text("yes\n")

    removed, freed = snapshots.remove_unused({used})

    assert removed == 2
    assert freed >= 2 * 5000 * len("copied")  # at least the two files' bytes
    remaining = sorted(str(path.relative_to(tmp_path / "snapshots")) for path in (tmp_path / "snapshots").rglob("*"))
    used_hex = used.removeprefix("sha256:")
    assert remaining == [".overlay-mounts", ".unpacking", "copy", "overlay", f"overlay/{used_hex}",
                         f"overlay/{used_hex}/etc", f"overlay/{used_hex}/etc/data", "overlay/not-a-layer"]
    assert not snapshots.has(unused_overlay)
    assert not (tmp_path / "snapshots" / "copy" / unused_copy.removeprefix("sha256:")).exists()


def _disk(*trees: Path) -> int:
    """Bytes the trees take together: each inode's blocks once."""
    blocks = {}
    for tree in trees:
        for path in (tree, *tree.rglob("*")):
            st = path.lstat()
            blocks[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(blocks.values())


def test_a_file_two_snapshots_share_counts_once_and_removing_both_frees_it(tmp_path: Path) -> None:
    """A copy links unchanged files from the layer it made before: the snapshots' sizes add up to the disk they
    take, and removing them reports what it freed."""
    snapshots = Snapshots(tmp_path / "snapshots")
    first = fake_snapshot(tmp_path / "snapshots" / "overlay", "first")
    second = fake_snapshot(tmp_path / "snapshots" / "overlay", "second")
    data = snapshots.path(first) / "etc" / "data"
    os.link(data, snapshots.path(first) / "etc" / "alias")  # a hardlink within the layer
    os.link(data, snapshots.path(second) / "etc" / "shared")
    taken = _disk(snapshots.path(first), snapshots.path(second))
    data_bytes = data.stat().st_blocks * 512
    assert data_bytes > 0

    # (a share is rounded down to a whole byte)
    assert taken - 1 <= snapshots.size(first) + snapshots.size(second) <= taken
    assert snapshots.size(second) == _disk(snapshots.path(second)) - data_bytes + data_bytes // 3
    assert snapshots.remove_unused(set()) == (2, taken)


def test_a_removal_cut_short_leaves_no_partial_layer_under_its_name(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer is renamed away before its tree is deleted; what a killed removal leaves, the next sweep clears."""
    snapshots = Snapshots(tmp_path / "snapshots")
    doomed = fake_snapshot(tmp_path / "snapshots" / "overlay", "doomed")

    def killed(path: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(snapshot.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        snapshots.remove_unused(set())
    monkeypatch.undo()

    assert not snapshots.has(doomed)
    [left] = snapshots.unpacking().iterdir()
    assert left.name == f"remove-{os.getpid()}-{doomed.removeprefix('sha256:')}"
    # as the process that made it had died: the next build's sweep removes it
    left.rename(left.with_name(f"remove-{2**22 + 1}-{doomed.removeprefix('sha256:')}"))
    (tmp_path / "tmp").mkdir()
    sweep_stale_scratch(tmp_path / "tmp", snapshots.unpacking())
    assert list(snapshots.unpacking().iterdir()) == []


def test_freeing_never_runs_while_a_command_holds_the_lease(tmp_path: Path) -> None:
    # any number of builds at once, and no freeing beside them
    with shared_lease(tmp_path), shared_lease(tmp_path), exclusive_lease(tmp_path, wait=False) as held:
        assert held is False
    with exclusive_lease(tmp_path, wait=False) as held:
        assert held is True
        with exclusive_lease(tmp_path, wait=False) as second:
            assert second is False


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Pybuild:
    require_root()
    pybuild = Pybuild(tmp_path / "root")
    build_base(pybuild)
    return pybuild


def build(pybuild: Pybuild, tmp_path: Path, name: str, dockerfile: str) -> None:
    context = tmp_path / f"context-{name}"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    pybuild.build(context, "-t", name)


def blobs_of(pybuild: Pybuild, name: str) -> set[str]:
    stored = ImageStore(pybuild.root).resolve(name)
    return {stored.manifest.digest, stored.image_id, *(layer.digest for layer in stored.image.layers)}


def diff_ids_of(pybuild: Pybuild, name: str) -> set[str]:
    return {layer.diff_id for layer in ImageStore(pybuild.root).resolve(name).image.layers}


def stored_blobs(pybuild: Pybuild) -> set[str]:
    return {"sha256:" + path.name for path in (pybuild.root / "blobs" / "sha256").iterdir()}


def stored_snapshots(pybuild: Pybuild) -> set[str]:
    return {"sha256:" + path.name for path in (pybuild.root / "snapshots" / "overlay").iterdir()}


@pytest.mark.slow
def test_rmi_frees_exactly_what_only_the_removed_image_used(store: Pybuild, tmp_path: Path) -> None:
    build(store, tmp_path, "app-a", "FROM busybox-base\nRUN head -c 300000 /dev/urandom > /a\n")
    build(store, tmp_path, "app-b", "FROM busybox-base\nRUN echo b > /b\n")
    base, a, b = (blobs_of(store, name) for name in ("busybox-base", "app-a", "app-b"))
    only_a = a - base
    assert only_a and stored_blobs(store) >= base | a | b
    a_layer = diff_ids_of(store, "app-a") - diff_ids_of(store, "busybox-base")
    assert a_layer <= stored_snapshots(store)

    a_id = ImageStore(store.root).resolve("app-a").image_id
    a_layer_blobs = {layer.digest for layer in ImageStore(store.root).resolve("app-a").image.layers} & only_a
    done = store.run("rmi", "app-a")

    assert done.stdout.splitlines()[0] == "Untagged: app-a:latest"
    assert done.stdout.splitlines()[1] == f"Deleted: {a_id}"
    # a's config and manifest went; its layer stays for the build cache, as docker rmi leaves the build cache
    assert stored_blobs(store) == base | b | a_layer_blobs
    kept = diff_ids_of(store, "busybox-base") | diff_ids_of(store, "app-b")
    assert stored_snapshots(store) == kept | a_layer
    # the same build again is a hit: nothing runs
    again = store.build(tmp_path / "context-app-a", "-t", "app-a")
    assert "#2 CACHED" in again.stderr, again.stderr
    store.run("rmi", "app-a")
    cleared = store.run("cache", "prune")
    assert cleared.stdout.splitlines()[0].startswith("Deleted ") and "build cache entries" in cleared.stdout
    assert stored_blobs(store) == base | b  # now a's layer went too; the base stayed
    assert stored_snapshots(store) == kept

    # what stayed still builds: a child of app-b sees b's file and the base's busybox
    build(store, tmp_path, "child", "FROM app-b\nRUN cat /b > /copied && /bin/busybox true\n")
    out = tmp_path / "child-rootfs"
    context = tmp_path / "context-child"
    store.build(context, "--output", f"type=local,dest={out}")
    assert (out / "copied").read_text() == "b\n"

    # removing every image and the build cache leaves nothing behind
    store.run("rmi", "child", "app-b", "busybox-base")
    store.run("cache", "prune")
    assert stored_blobs(store) == set()
    assert stored_snapshots(store) == set()
    assert store.run("images").stdout.splitlines()[1:] == []


@pytest.mark.slow
def test_a_running_build_keeps_its_layers_until_prune_runs_after_it(store: Pybuild, tmp_path: Path) -> None:
    build(store, tmp_path, "app-a", "FROM busybox-base\nRUN echo a > /a\n")
    a_only = blobs_of(store, "app-a") - blobs_of(store, "busybox-base")
    environment = {**os.environ, "PYBUILD_ROOT": str(store.root)}
    with open(store.root / LEASE_FILE, "a") as lease:
        fcntl.flock(lease, fcntl.LOCK_SH)  # as a build running now holds it

        done = store.run("rmi", "app-a")
        assert "Untagged: app-a:latest" in done.stdout
        assert "`pybuild prune` frees them after it" in done.stderr
        assert stored_blobs(store) >= a_only  # nothing freed under the running build

        prune = subprocess.Popen([*PYBUILD, "prune"], env=environment, cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.5)
        assert prune.poll() is None  # it waits for the build
        assert stored_blobs(store) >= a_only
    stdout, stderr = prune.communicate(timeout=60)
    assert prune.returncode == 0, stderr
    assert "Waiting for the builds running on this store to end" in stderr
    assert stdout.splitlines()[-1].startswith("Total reclaimed space: ")
    assert stored_blobs(store) == blobs_of(store, "busybox-base")
    assert stored_snapshots(store) == diff_ids_of(store, "busybox-base")

    again = store.run("prune")
    assert again.stdout.splitlines() == ["Deleted 0 blobs and 0 unpacked layers", "Total reclaimed space: 0B"]
