"""Cache mount directories: sharing modes between real processes, creation, seeding, crashes and housekeeping."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cache.mounts import CacheMounts
from parser.errors import PybuildError

# A cache user in its own process. "hold": take the cache, say where it is, give it back on a line of stdin.
# "work": say "ready", wait for "go", then ROUNDS times take the cache for SECONDS, logging start and end to LOG,
# and pause as long.
# "die-creating": take the cache with a seed, and be killed by SIGKILL halfway through copying it.
HELPER = r"""
import os, signal, sys, time
from pathlib import Path
import cache.mounts
from cache.mounts import CacheMounts

root, cache_id, sharing, action = sys.argv[1:5]
mounts = CacheMounts(Path(root))
if action == "hold":
    with mounts.acquire(cache_id, sharing=sharing) as path:
        (path / f"held-by-{os.getpid()}").touch()
        print(path, flush=True)
        sys.stdin.readline()
elif action == "work":
    rounds, seconds, log = int(sys.argv[5]), float(sys.argv[6]), os.open(sys.argv[7], os.O_WRONLY | os.O_APPEND)
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(rounds):
        with mounts.acquire(cache_id, sharing=sharing):
            os.write(log, f"start {os.getpid()}\n".encode())
            time.sleep(seconds)
            os.write(log, f"end {os.getpid()}\n".encode())
        time.sleep(seconds)
elif action == "die-creating":
    copy = cache.mounts._copy_tree
    def copy_then_die(source, destination):
        copy(source, destination)
        os.kill(os.getpid(), signal.SIGKILL)
    cache.mounts._copy_tree = copy_then_die
    with mounts.acquire(cache_id, sharing=sharing, seed=Path(sys.argv[5])):
        pass
"""

Spawn = Callable[..., subprocess.Popen]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start helper processes on the cache root ``tmp_path / "mounts"``; any still running is killed afterwards."""
    started: list[subprocess.Popen] = []

    def start(cache_id: str, sharing: str, action: str, *extra: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HELPER, str(tmp_path / "mounts"), cache_id, sharing,
                                    action, *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def mounts(tmp_path: Path) -> CacheMounts:
    return CacheMounts(tmp_path / "mounts")


def read_line(process: subprocess.Popen, timeout: float) -> str | None:
    """The helper's next line, or None if none came within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        chunk = os.read(process.stdout.fileno(), 1)  # type: ignore[union-attr]
        if not chunk:
            return None
        data += chunk
    return data.decode().rstrip("\n")


def held_path(process: subprocess.Popen, timeout: float = 10.0) -> Path:
    line = read_line(process, timeout)
    assert line, f"the helper did not take the cache (exit code {process.poll()})"
    return Path(line)


def give_back(process: subprocess.Popen) -> None:
    process.stdin.write(b"\n")  # type: ignore[union-attr]
    process.stdin.flush()  # type: ignore[union-attr]
    assert process.wait(timeout=10) == 0


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def dead_pid() -> int:
    """A pid no process can have: above the kernel's largest."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def test_ids_never_become_paths(tmp_path: Path, mounts: CacheMounts) -> None:
    ids = ["/root/.cache/go-build", "..", "../../etc", "/", "a b", "x/../y", "", "new\nline", "ünïcödé", "\udcff"]
    paths = []
    for cache_id in ids:
        with mounts.acquire(cache_id, sharing="shared") as path:
            assert path == tmp_path / "mounts" / sha(cache_id) / "0"
            assert path.is_dir() and path.resolve().is_relative_to(tmp_path / "mounts")
            paths.append(path)
    assert len(set(paths)) == len(ids)
    assert sorted(os.listdir(tmp_path)) == ["mounts"]
    assert mounts.id_directory("a b") == tmp_path / "mounts" / sha("a b")


def test_unknown_sharing_is_refused(mounts: CacheMounts) -> None:
    with pytest.raises(ValueError, match="'exclusive'"), mounts.acquire("x", sharing="exclusive"):
        pass
    assert not mounts.root.exists()


def test_shared_gives_concurrent_users_the_same_directory(mounts: CacheMounts, spawn: Spawn) -> None:
    holder = spawn("go", "shared", "hold")
    held = held_path(holder)
    with mounts.acquire("go", sharing="shared") as path:
        assert path == held
        assert (path / f"held-by-{holder.pid}").exists()
    give_back(holder)


@pytest.mark.parametrize("holder_sharing", ["private", "shared", "locked"])
def test_private_gets_its_own_directory_while_another_is_busy(mounts: CacheMounts, spawn: Spawn,
                                                              holder_sharing: str) -> None:
    holder = spawn("apt", holder_sharing, "hold")
    busy = held_path(holder)
    with mounts.acquire("apt", sharing="private") as own:
        assert own != busy and own.parent == busy.parent
        assert os.listdir(own) == [], "a new instance starts empty"
        (own / "mine").touch()
    with mounts.acquire("apt", sharing="private") as again:
        assert again == own and (again / "mine").exists(), "the extra instance is reused once free"
    give_back(holder)
    with mounts.acquire("apt", sharing="private") as freed:
        assert freed == busy, "the first instance again once its holder is gone"


def test_private_instances_made_meanwhile_are_seeded(tmp_path: Path, mounts: CacheMounts) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "index").write_text("v1")
    with mounts.acquire("pip", sharing="private", seed=seed) as first, \
            mounts.acquire("pip", sharing="private", seed=seed) as second:
        assert first != second
        assert (first / "index").read_text() == (second / "index").read_text() == "v1"


def run_workers(spawn: Spawn, log: Path, sharing: str, count: int, rounds: int, seconds: float,
                meanwhile: Callable[[], object] = lambda: None) -> bool:
    """Start ``count`` workers together on one cache; whether any two uses of it overlapped.

    ``meanwhile`` is called over and over until the workers are done.
    """
    log.touch()
    workers = [spawn("apt-lists", sharing, "work", str(rounds), str(seconds), str(log)) for _ in range(count)]
    for worker in workers:
        assert read_line(worker, 10) == "ready"
    for worker in workers:
        worker.stdin.write(b"go\n")  # type: ignore[union-attr]
        worker.stdin.flush()  # type: ignore[union-attr]
    while any(worker.poll() is None for worker in workers):
        meanwhile()
    assert [worker.wait() for worker in workers] == [0] * count
    lines = [line.split() for line in log.read_text().splitlines()]
    assert len(lines) == 2 * count * rounds
    in_use: set[str] = set()
    overlapped = False
    for kind, pid in lines:
        if kind == "start":
            overlapped |= bool(in_use)
            in_use.add(pid)
        else:
            in_use.remove(pid)
    return overlapped


@pytest.mark.parametrize(("sharing", "overlap_expected"), [("locked", False), ("shared", True)])
def test_locked_serialises_processes(tmp_path: Path, spawn: Spawn, sharing: str, overlap_expected: bool) -> None:
    """Three processes start together; with ``locked`` their uses never overlap (``shared``, the control, does)."""
    assert run_workers(spawn, tmp_path / "log", sharing, count=3, rounds=3, seconds=0.05) == overlap_expected


@pytest.mark.slow
def test_locked_stays_exclusive_while_caches_are_removed(tmp_path: Path, mounts: CacheMounts, spawn: Spawn) -> None:
    """Removal deletes the lock files of an unused id; users waiting on a deleted one must not slip through."""
    assert not run_workers(spawn, tmp_path / "log", "locked", count=4, rounds=150, seconds=0.0005,
                           meanwhile=mounts.remove_all)


@pytest.mark.parametrize("release", ["exit", "SIGKILL"])
def test_locked_waits_for_the_holder_until_it_ends_even_killed(mounts: CacheMounts, spawn: Spawn,
                                                               release: str) -> None:
    first = spawn("cargo", "locked", "hold")
    path = held_path(first)
    second = spawn("cargo", "locked", "hold")
    assert read_line(second, 0.3) is None, "the second user waits while the first holds the lock"
    if release == "exit":
        give_back(first)
    else:
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
    assert held_path(second) == path
    assert (path / f"held-by-{first.pid}").exists(), "the cache outlives its holder"
    give_back(second)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another owner needs root")
@pytest.mark.parametrize(("uid", "gid", "mode"), [
    (0, 0, 0o755),
    (1000, 1000, 0o700),
    (65534, 50, 0o2775),
    (0, 0, 0o1777),
])
def test_a_new_cache_gets_owner_and_mode_and_keeps_them(mounts: CacheMounts, uid: int, gid: int, mode: int) -> None:
    with mounts.acquire("build", sharing="locked", uid=uid, gid=gid, mode=mode) as path:
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, gid, mode)
    with mounts.acquire("build", sharing="shared", uid=4242, gid=4242, mode=0o711) as path:
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, gid, mode), "only set on creation"


def test_the_seed_is_copied_on_creation_only(tmp_path: Path, mounts: CacheMounts) -> None:
    seed = tmp_path / "seed"
    (seed / "sub").mkdir(parents=True)
    (seed / "data").write_text("seeded")
    (seed / "data").chmod(0o640)
    (seed / "sub" / "deep").write_text("deep")
    (seed / "sub").chmod(0o555)
    (seed / "link").symlink_to("data")
    os.mkfifo(seed / "pipe")
    os.utime(seed / "data", (1_000_000, 1_000_000))
    owner = 1000 if os.geteuid() == 0 else os.geteuid()
    os.lchown(seed / "data", owner, owner)
    with mounts.acquire("node", sharing="shared", mode=0o750, seed=seed) as path:
        assert sorted(os.listdir(path)) == ["data", "link", "pipe", "sub"]
        info = (path / "data").stat()
        assert (path / "data").read_text() == "seeded"
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_mtime) == (0o640, owner, 1_000_000)
        assert stat.S_IMODE((path / "sub").stat().st_mode) == 0o555
        assert (path / "sub" / "deep").read_text() == "deep"
        assert os.readlink(path / "link") == "data"
        assert stat.S_ISFIFO((path / "pipe").lstat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o750, "the cache's own mode is the mount's"
        (path / "data").unlink()
        (path / "built").write_text("output")
    (seed / "later").write_text("not copied")
    with mounts.acquire("node", sharing="shared", seed=seed) as path:
        assert sorted(os.listdir(path)) == ["built", "link", "pipe", "sub"], "an existing cache is never reseeded"


def test_a_seed_that_is_not_a_directory_is_refused(tmp_path: Path, mounts: CacheMounts) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(PybuildError, match="not a directory"), mounts.acquire("x", seed=tmp_path / "file"):
        pass
    assert sorted(os.listdir(mounts.id_directory("x"))) == ["0.holders", "instances.lock"]
    assert mounts.remove_all() == (0, 0), "the failed claim's holders file is no cache"
    assert not mounts.id_directory("x").exists()


def test_a_cache_killed_while_being_made_never_appears(tmp_path: Path, mounts: CacheMounts, spawn: Spawn) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "big").write_bytes(b"x" * 100_000)
    creator = spawn("gradle", "shared", "die-creating", str(seed))
    assert creator.wait(timeout=10) == -signal.SIGKILL
    directory = mounts.id_directory("gradle")
    leftovers = [name for name in os.listdir(directory) if name.startswith("new-")]
    assert leftovers == [name for name in leftovers if name.startswith(f"new-{creator.pid}-")] != []
    assert not (directory / "0").exists()
    with mounts.acquire("gradle", seed=seed) as path:
        assert path == directory / "0" and (path / "big").stat().st_size == 100_000
        assert not any(name.startswith("new-") for name in os.listdir(directory)), "the dead one's was swept"


def test_temp_entries_of_dead_processes_are_swept(mounts: CacheMounts) -> None:
    directory = mounts.id_directory("ccache")
    dead, alive = dead_pid(), os.getppid()
    stale = [directory / f"new-{dead}-abc", directory / f"remove-{dead}-def", mounts.root / f"remove-{dead}-ghi"]
    kept = [directory / f"new-{os.getpid()}-jkl", directory / f"remove-{alive}-mno", directory / "new-x-y"]
    for entry in stale + kept:
        (entry / "content").mkdir(parents=True)
    (directory / f"new-{dead}-file").touch()
    with mounts.acquire("ccache", sharing="shared"):
        pass
    assert [entry.exists() for entry in stale] == [False, False, True], "the root's are swept by housekeeping"
    assert not (directory / f"new-{dead}-file").exists()
    mounts.remove(older_than_seconds=3600)
    assert [entry.exists() for entry in stale + kept] == [False] * 3 + [True] * 3


def test_usage_and_removal_of_caches_unused_for_a_while(mounts: CacheMounts) -> None:
    assert mounts.usage() == [] and mounts.remove_all() == (0, 0)
    for cache_id in ("old", "recent"):
        with mounts.acquire(cache_id) as path:
            (path / "blob").write_bytes(b"x" * 50_000)
    usage = {entry.directory: entry for entry in mounts.usage()}
    assert set(usage) == {mounts.id_directory("old"), mounts.id_directory("recent")}
    assert all(entry.size >= 50_000 and entry.last_used > time.time() - 60 for entry in usage.values())
    os.utime(mounts.id_directory("old") / "0.holders", (time.time() - 7200,) * 2)
    assert [entry.last_used < time.time() - 3600 for entry in mounts.usage()] == [
        directory == mounts.id_directory("old") for directory in sorted(usage)]
    removed, freed = mounts.remove(older_than_seconds=3600)
    assert removed == 1 and 50_000 <= freed <= usage[mounts.id_directory("old")].size
    assert not mounts.id_directory("old").exists(), "an id left without instances goes too"
    assert [entry.directory for entry in mounts.usage()] == [mounts.id_directory("recent")]


def test_caches_in_use_are_never_removed(mounts: CacheMounts, spawn: Spawn) -> None:
    holder = spawn("maven", "locked", "hold")
    held = held_path(holder)
    with mounts.acquire("maven", sharing="private") as own:
        (own / "blob").write_bytes(b"y" * 10_000)
    with mounts.acquire("sbt") as free:
        (free / "blob").write_bytes(b"z" * 10_000)
    with mounts.acquire("ivy") as in_use:
        os.utime(in_use.parent / "0.holders", (0, 0))
        removed, freed = mounts.remove_all()
        assert removed == 2 and freed >= 20_000, "maven's private instance and sbt's"
        assert in_use.is_dir() and held.is_dir() and not own.exists() and not free.exists()
        assert not mounts.id_directory("sbt").exists()
        assert mounts.remove(older_than_seconds=0) == (0, 0)
    give_back(holder)
    removed, freed = mounts.remove_all()
    assert removed == 2 and freed > 0, "maven's first instance and ivy's, both given back"
    assert os.listdir(mounts.root) == []
