"""Snapshot store and step roots: round trips, overlay and copy giving the same layers, deep stacks, corrupt blobs."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import skip_if_chrooted

from builder.fs import snapshot
from builder.fs.layer import write_layer
from builder.fs.pending_layers import PendingLayers
from builder.fs.snapshot import Snapshots, Snapshotter, StepRoot, mounted_root
from builder.oci.image import Layer
from builder.sandbox import linux
from cache.blobs import BlobStore
from parser.errors import PybuildError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount overlayfs and keep file owners")
EPOCH = 1_000


@pytest.fixture(params=["overlay", "copy"])
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the given snapshotter, as if detection had chosen it."""
    monkeypatch.setattr(snapshot, "_detected", Snapshotter(request.param))
    return request.param


def use(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(snapshot, "_detected", Snapshotter(kind))


class Store:
    """A snapshot store with a scratch area beside it, as the builder lays them out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = Snapshots(root / "snapshots")
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True)
        self.count = 0

    def scratch(self) -> Path:
        self.count += 1
        path = self.root / f"scratch{self.count}"
        path.mkdir()
        return path

    def step(self, layers: list[Layer], action: Callable[[Path], None]) -> Layer | None:
        """One build step: mount, change, write the layer, adopt the upper dir as its snapshot."""
        scratch = self.scratch()
        lowers = [self.snapshots.path(layer.diff_id) for layer in layers]
        with mounted_root(lowers, scratch) as root:
            action(root.merged)
        blob = self.blobs / f"{self.count}.tar.zst"
        with open(blob, "wb") as out:
            layer = write_layer(root.upper, out, compression="zstd", source_date_epoch=EPOCH,
                                lower_stat=root.lower_stat)
        if layer is not None:
            self.snapshots.adopt(layer.diff_id, root.upper)
            os.rename(blob, self.blobs / layer.digest)
        shutil.rmtree(scratch)
        return layer

    def read(self, layers: list[Layer]) -> dict[str, str]:
        result: dict[str, str] = {}
        self.step(layers, lambda merged: result.update(describe(merged)))
        return result


def describe(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        mode = f"{stat.S_IMODE(st.st_mode):o} {st.st_uid}"
        if stat.S_ISDIR(st.st_mode):
            out[rel] = f"dir {mode}"
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = f"link {os.readlink(path)}"
        else:
            out[rel] = f"file {mode} {path.read_text()}"
    return out


def base(merged: Path) -> None:
    (merged / "etc").mkdir()
    (merged / "etc/passwd").write_text("root:x:0:0\n")
    (merged / "etc/motd").write_text("hello")
    (merged / "data/sub").mkdir(parents=True)
    (merged / "data/sub/a").write_text("a")
    (merged / "data/b").write_text("b")
    (merged / "gone").mkdir()
    (merged / "gone/x").write_text("x")
    (merged / "becomes_file").mkdir()
    (merged / "becomes_file/y").write_text("y")
    (merged / "mode").write_text("m")
    (merged / "link").symlink_to("etc/motd")
    os.chown(merged / "data/b", 1000, 1000)


def change(merged: Path) -> None:
    (merged / "new").write_text("created")
    (merged / "etc/motd").write_text("HELLO")
    os.chmod(merged / "mode", 0o600)
    os.unlink(merged / "etc/passwd")
    shutil.rmtree(merged / "gone")
    shutil.rmtree(merged / "becomes_file")
    (merged / "becomes_file").write_text("file now")
    shutil.rmtree(merged / "data")
    (merged / "data").mkdir()
    (merged / "data/new").write_text("fresh")
    (merged / "link").unlink()
    (merged / "link").symlink_to("new")


AFTER = {
    "becomes_file": "file 644 0 file now",
    "data": "dir 755 0",
    "data/new": "file 644 0 fresh",
    "etc": "dir 755 0",
    "etc/motd": "file 644 0 HELLO",
    "link": "link new",
    "mode": "file 600 0 m",
    "new": "file 644 0 created",
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    old = os.umask(0o022)
    yield Store(tmp_path)
    os.umask(old)


def test_round_trip(kind: str, store: Store) -> None:
    first = store.step([], base)
    assert first is not None
    assert store.read([first])["data/b"] == "file 644 1000 b"
    second = store.step([first], change)
    assert second is not None
    assert store.read([first, second]) == AFTER
    # The same changes unpacked from the blobs (as a pulled image would be) read the same.
    other = Store(store.root / "pulled")
    for layer in (first, second):
        other.snapshots.unpack(layer.diff_id, store.blobs / layer.digest)
    assert other.read([first, second]) == AFTER
    assert sorted(path.name for path in (other.root / "snapshots" / kind).iterdir()) == sorted(
        layer.diff_id.removeprefix("sha256:") for layer in (first, second))


def test_overlay_and_copy_write_identical_layers(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    results = {}
    for kind in ("overlay", "copy"):
        use(monkeypatch, kind)
        own = Store(store.root / kind)
        first = own.step([], base)
        assert first is not None
        second = own.step([first], change)
        assert second is not None
        results[kind] = (first, second, (own.blobs / second.digest).read_bytes())
    assert results["overlay"] == results["copy"]
    with tarfile.open(fileobj=io.BytesIO(_plain(results["copy"][2]))) as archive:
        names = archive.getnames()
    assert names == [".wh.gone", "becomes_file", "data", "data/.wh..wh..opq", "data/new", "etc", "etc/.wh.passwd",
                     "etc/motd", "link", "mode", "new"]


def _plain(blob: bytes) -> bytes:
    from builder.fs.untar import open_layer

    return open_layer(io.BytesIO(blob)).read()


def test_no_change_gives_no_layer(kind: str, store: Store) -> None:
    first = store.step([], base)
    assert first is not None

    def mount_point_made_and_removed(merged: Path) -> None:
        (merged / "data/mnt").mkdir()
        (merged / "data/mnt").rmdir()
        (merged / "etc/motd").read_text()

    assert store.step([first], mount_point_made_and_removed) is None


def test_lower_stat_honours_whiteouts_and_opaque_dirs(kind: str, store: Store) -> None:
    first = store.step([], base)
    second = store.step([first], change)
    scratch = store.scratch()
    lowers = [store.snapshots.path(layer.diff_id) for layer in (first, second)]
    with mounted_root(lowers, scratch) as root:
        assert isinstance(root, StepRoot)
        lookup = root.lower_stat
        assert lookup("etc/passwd") is None and lookup("gone") is None and lookup("gone/x") is None
        assert lookup("data/sub") is None and lookup("data/new") is not None
        assert stat.S_ISREG(lookup("becomes_file").st_mode) and lookup("becomes_file/y") is None
        assert stat.S_ISDIR(lookup("/etc").st_mode) and lookup("nothing/here") is None


def test_hardlinks_made_by_a_step_stay_hardlinks(kind: str, store: Store) -> None:
    first = store.step([], base)

    def link(merged: Path) -> None:
        (merged / "one").write_text("shared")
        os.link(merged / "one", merged / "two")

    second = store.step([first], link)
    with tarfile.open(fileobj=io.BytesIO(_plain((store.blobs / second.digest).read_bytes()))) as archive:
        entries = {member.name: (member.type, member.linkname) for member in archive}
    assert entries == {"one": (tarfile.REGTYPE, ""), "two": (tarfile.LNKTYPE, "one")}


@pytest.mark.slow
def test_130_lowers(kind: str, store: Store) -> None:
    layers = []
    for index in range(130):
        def add(merged: Path, index: int = index) -> None:
            (merged / f"f{index}").write_text(str(index))
            (merged / "top").write_text(str(index))
            if index == 129:
                (merged / "f0").unlink()

        layer = store.step(layers, add)
        assert layer is not None
        layers.append(layer)
    seen = store.read(layers)
    assert seen["top"] == "file 644 0 129" and seen["f1"] == "file 644 0 1" and "f0" not in seen
    assert len(seen) == 130


def test_no_lowers_root_is_0755(kind: str, store: Store) -> None:
    scratch = store.scratch()
    with mounted_root([], scratch) as root:
        assert stat.S_IMODE(root.merged.stat().st_mode) == 0o755
        assert not any(root.merged.iterdir())


def test_mount_is_gone_after_an_error(kind: str, store: Store) -> None:
    scratch = store.scratch()
    with pytest.raises(RuntimeError), mounted_root([], scratch) as root:
        (root.merged / "x").write_text("x")
        raise RuntimeError("step failed")
    assert str(scratch / "merged") not in Path("/proc/self/mountinfo").read_text()


def _mount_options(merged: Path) -> list[str]:
    """The super options of the mount on ``merged`` (/proc/self/mountinfo's last field)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(merged):
            return line.split(" - ")[1].split()[2].split(",")
    raise AssertionError(f"{merged} is not mounted")


def test_a_step_root_is_mounted_volatile(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its unmount does not sync the whole filesystem the upper dir lives on, and the step's files are all
    there once it is unmounted."""
    use(monkeypatch, "overlay")
    scratch = store.scratch()
    with mounted_root([], scratch) as root:
        assert {"volatile", "fsync=volatile"} & set(_mount_options(root.merged))  # newer kernels show the latter
        (root.merged / "made").write_text("made")
    assert (root.upper / "made").read_text() == "made"
    shutil.rmtree(scratch)  # what overlayfs leaves in a volatile mount's work dir goes with it
    assert not scratch.exists()


def test_a_kernel_without_volatile_mounts_mounts_without(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, "overlay")
    monkeypatch.setattr(snapshot, "_volatile", True)
    tried: list[str] = []

    def old_kernel(source: str, target: Path, kind: str, flags: int, options: str) -> None:
        tried.append(options)
        if "volatile" in options.split(","):
            raise OSError(errno.EINVAL, "Invalid argument")
        linux.mount(source, target, kind, flags, options)

    monkeypatch.setattr(snapshot, "mount", old_kernel)
    for _ in range(2):
        scratch = store.scratch()
        with mounted_root([], scratch) as root:
            assert not {"volatile", "fsync=volatile"} & set(_mount_options(root.merged))
    assert ["volatile" in options.split(",") for options in tried] == [True, False, False]  # asked once


def test_corrupt_blob_is_rejected_and_leaves_nothing(kind: str, store: Store) -> None:
    layer = store.step([], base)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(PybuildError, match=f"layer {wrong} is corrupt: its content hashes to {layer.diff_id}"):
        store.snapshots.unpack(wrong, store.blobs / layer.digest)
    assert not store.snapshots.has(wrong)
    assert sorted(path.name for path in store.snapshots.path(wrong).parent.iterdir()) == [
        layer.diff_id.removeprefix("sha256:")]


def test_bad_diff_id_is_refused(store: Store) -> None:
    with pytest.raises(PybuildError, match="is not a sha256 digest"):
        store.snapshots.path("sha256:../../etc")


def test_concurrent_unpacks_of_one_layer(kind: str, store: Store) -> None:
    layer = store.step([], base)
    other = Snapshots(store.root / "other")
    errors = []

    def unpack() -> None:
        try:
            other.unpack(layer.diff_id, store.blobs / layer.digest)
        except Exception as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=unpack) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [path.name for path in other.path(layer.diff_id).parent.iterdir()] == [
        layer.diff_id.removeprefix("sha256:")]
    assert (other.path(layer.diff_id) / "etc/motd").read_text() == "hello"


@pytest.mark.parametrize(("value", "expected"), [("copy", Snapshotter("copy")), ("overlay", Snapshotter("overlay"))])
def test_environment_forces_the_snapshotter(value: str, expected: Snapshotter, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(snapshot.SNAPSHOTTER_ENV, value)
    assert snapshot._choose(tmp_path) == expected


def test_unknown_snapshotter_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(snapshot.SNAPSHOTTER_ENV, "zfs")
    with pytest.raises(PybuildError, match="PYBUILD_SNAPSHOTTER=zfs is not a snapshotter"):
        snapshot._choose(tmp_path)


ROOTLESS = """
import io, os, shutil, sys, tarfile
from pathlib import Path
from builder.fs import snapshot
from builder.fs.layer import write_layer
from builder.fs.snapshot import Snapshots, mounted_root
from builder.fs.untar import open_layer

state = Path(sys.argv[1])
snapshots = Snapshots(state / "snapshots")
print(snapshot.in_user_namespace(), snapshot.snapshotter(state).store_name)

def step(number, layers, action):
    scratch = state / f"scratch{number}"
    scratch.mkdir()
    with mounted_root([snapshots.path(layer.diff_id) for layer in layers], scratch) as root:
        action(root.merged)
    out = io.BytesIO()
    layer = write_layer(root.upper, out, compression="zstd", source_date_epoch=0, lower_stat=root.lower_stat)
    snapshots.adopt(layer.diff_id, root.upper)
    return layer, out.getvalue()

def first(merged):
    (merged / "d").mkdir()
    (merged / "d/old").write_text("old")
    (merged / "f").write_text("f")

def second(merged):
    shutil.rmtree(merged / "d")
    (merged / "d").mkdir()
    (merged / "d/new").write_text("new")
    (merged / "f").unlink()

one, _ = step(1, [], first)
two, blob = step(2, [one], second)
with tarfile.open(fileobj=open_layer(io.BytesIO(blob)), mode="r|") as archive:
    print(" ".join(member.name for member in archive))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["overlay", "copy"])
def test_rootless_in_a_user_namespace(kind: str, tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    skip_if_chrooted("a user namespace")
    env = {**os.environ, snapshot.SNAPSHOTTER_ENV: kind}
    result = subprocess.run([unshare, "-Urm", sys.executable, "-c", ROOTLESS, str(tmp_path)], capture_output=True,
                            text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    store = "overlay-userxattr" if kind == "overlay" else "copy"
    assert result.stdout.splitlines() == [f"True {store}", ".wh.f d d/.wh..wh..opq d/new"]


def hashed_step(store: Store, layers: list[Layer], action: Callable[[Path], None]) -> tuple[Layer, Layer, list[Path]]:
    """A step as the builder makes it: only hashed, then adopted; also the layer written at once, to compare."""
    scratch = store.scratch()
    lowers = [store.snapshots.path(layer.diff_id) for layer in layers]
    with mounted_root(lowers, scratch) as root:
        action(root.merged)
    with open(store.root / "direct.tar.zst", "wb") as out:
        direct = write_layer(root.upper, out, compression="zstd", source_date_epoch=EPOCH, lower_stat=root.lower_stat)
    pending = write_layer(root.upper, None, compression="zstd", source_date_epoch=EPOCH, lower_stat=root.lower_stat)
    assert direct is not None and pending is not None
    store.snapshots.adopt(pending.diff_id, root.upper)
    shutil.rmtree(scratch)
    return pending, direct, lowers


@pytest.mark.parametrize("start", [True, False])
def test_a_pending_layer_gets_the_blob_writing_it_at_once_gives(kind: str, store: Store, start: bool) -> None:
    first = store.step([], base)
    assert first is not None
    pending, direct, lowers = hashed_step(store, [first], change)
    assert pending.pending and (pending.digest, pending.size) == ("", 0)
    assert pending.diff_id == direct.diff_id and pending.media_type == direct.media_type
    blobs = BlobStore(store.root / "store")
    layers = PendingLayers(blobs, "zstd", EPOCH)
    layers.add(pending, store.snapshots.path(pending.diff_id), lowers, start=start)
    written = layers.written(pending)
    layers.close()
    assert written == direct  # same diff_id, digest, size and media type
    assert blobs.path(written.digest).read_bytes() == (store.root / "direct.tar.zst").read_bytes()


def test_a_pending_layer_whose_snapshot_changed_is_refused(kind: str, store: Store) -> None:
    pending, _, lowers = hashed_step(store, [], base)
    snapshot_dir = store.snapshots.path(pending.diff_id)
    (snapshot_dir / "etc" / "motd").write_text("tampered")
    layers = PendingLayers(BlobStore(store.root / "store"), "zstd", EPOCH)
    layers.add(pending, snapshot_dir, lowers, start=False)
    with pytest.raises(PybuildError, match="changed before its blob was written"):
        layers.written(pending)
    layers.close()


def test_a_layer_not_made_by_this_build_has_no_source(store: Store) -> None:
    layers = PendingLayers(BlobStore(store.root / "store"), "zstd", EPOCH)
    with pytest.raises(PybuildError, match="not made by this build"):
        layers.written(Layer(diff_id="sha256:" + "0" * 64, digest="", size=0))
    layers.close()


def inode_flags(path: Path) -> int | None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, linux.FS_IOC_GETFLAGS, b"\0" * 4))[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def test_the_snapshot_store_spreads_its_snapshots(kind: str, tmp_path: Path) -> None:
    """Each snapshot is its own tree: the store asks ext4 to place them apart (chattr +T) where it can."""
    store = Snapshots(tmp_path / "snapshots").directory()
    if not linux.mark_top_directory(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem keeps no top-directory flag (tmpfs, for one)")
    flags = inode_flags(store)
    assert flags is not None and flags & linux.FS_TOPDIR_FL
    assert linux.mark_top_directory(store)  # marking again is harmless


def test_marking_a_top_directory_where_unsupported_is_no_error() -> None:
    assert linux.mark_top_directory("/proc") is False


def test_detection_finds_overlay_here_and_remembers_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(snapshot.SNAPSHOTTER_ENV, raising=False)
    chosen = snapshot._choose(tmp_path)
    assert chosen == Snapshotter("overlay")
    memo = tmp_path / ".overlay-mounts"
    assert memo.read_text() == f"{chosen.store_name} {os.uname().release}\n"
    assert [path.name for path in tmp_path.iterdir()] == [memo.name]  # the probe's dirs are gone

    def no_mount(*args: object) -> None:
        raise AssertionError("probed again")

    monkeypatch.setattr(snapshot, "_overlay", no_mount)
    assert snapshot._choose(tmp_path) == chosen
    memo.write_text(f"{chosen.store_name} another-kernel\n")
    with pytest.raises(AssertionError, match="probed again"):
        snapshot._choose(tmp_path)


def test_what_killed_builds_left_is_swept(tmp_path: Path) -> None:
    from builder.solver import sweep_stale_scratch

    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp_root, unpacking = tmp_path / "tmp", tmp_path / "snapshots" / ".unpacking"
    for directory in (tmp_root, unpacking):
        directory.mkdir(parents=True)
    leftovers = [tmp_root / f"step-{dead.pid}-abc", unpacking / f"unpack-{dead.pid}-abc"]
    kept = [tmp_root / f"step-{os.getpid()}-abc", unpacking / f"unpack-{os.getpid()}-abc"]
    for directory in leftovers + kept:
        (directory / "sub").mkdir(parents=True)
    (tmp_root / f".blob-{dead.pid}-abc.tmp").write_bytes(b"half a blob")
    (tmp_root / f".blob-{os.getpid()}-abc.tmp").write_bytes(b"a blob being written")
    sweep_stale_scratch(tmp_root, unpacking)
    own = os.getpid()
    assert sorted(path.name for path in tmp_root.iterdir()) == [f".blob-{own}-abc.tmp", f"step-{own}-abc"]
    assert [path.name for path in unpacking.iterdir()] == [f"unpack-{own}-abc"]
