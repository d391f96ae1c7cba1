"""The build process's namespace: private mounts as root, a user namespace (with and without /etc/subuid) otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_busybox_rootfs, readable_tempdir, skip_if_chrooted, subordinate_ids_restored

from builder.sandbox.namespace import _map_arguments, read_id_map, subordinate_ranges

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users and editing /etc/subuid need root")
TEST_USER = "pybuild-nstest"

# (id, file text, user, uid, expected ranges)
SUBORDINATE_CASES = [
    ("by-name", "alice:100000:65536\n", "alice", 1000, [(100000, 65536)]),
    ("by-number", "1000:200000:10\n", "alice", 1000, [(200000, 10)]),
    ("several", "alice:100000:10\nbob:5:5\nalice:300000:20\n", "alice", 1000, [(100000, 10), (300000, 20)]),
    ("other-users-only", "bob:100000:65536\n", "alice", 1000, []),
    ("malformed-lines-skipped", "alice:x:1\nalice:1\n\n# alice:1:2\nalice:7:8\n", "alice", 1000, [(7, 8)]),
    ("no-name", "1000:9:9\n", None, 1000, [(9, 9)]),
]


@pytest.mark.parametrize(("text", "user", "uid", "expected"), [case[1:] for case in SUBORDINATE_CASES],
                         ids=[case[0] for case in SUBORDINATE_CASES])
def test_subordinate_ranges(tmp_path: Path, text: str, user: str | None, uid: int, expected) -> None:
    path = tmp_path / "subuid"
    path.write_text(text)
    assert subordinate_ranges(path, user, uid) == expected


def test_subordinate_ranges_without_the_file(tmp_path: Path) -> None:
    assert subordinate_ranges(tmp_path / "missing", "alice", 1000) == []


def test_map_arguments_put_root_on_the_caller_and_ranges_after_it() -> None:
    assert _map_arguments(1000, [(100000, 10), (300000, 20)]) == [
        "0", "1000", "1", "1", "100000", "10", "11", "300000", "20"]


def test_read_id_map(tmp_path: Path) -> None:
    path = tmp_path / "uid_map"
    path.write_text("         0       1000          1\n         1     100000      65536\n")
    assert read_id_map(path) == [(0, 1000, 1), (1, 100000, 65536)]


AS_ROOT = """
import dataclasses, json, os, sys
from builder.sandbox import linux
from builder.sandbox.namespace import enter_build_namespace
namespace = enter_build_namespace()
entered = os.readlink("/proc/self/ns/mnt")
linux.mount("tmpfs", sys.argv[1], "tmpfs", 0)
again = enter_build_namespace()  # the CLI enters early, the build again: the second call changes nothing
mountinfo = open("/proc/self/mountinfo").read().splitlines()
tags = sorted({tag for line in mountinfo for tag in line.split(" - ")[0].split()[6:]})
print(json.dumps({"namespace": dataclasses.asdict(namespace), "mnt": os.readlink("/proc/self/ns/mnt"),
                  "same": again is namespace and os.readlink("/proc/self/ns/mnt") == entered,
                  "mounted": any(line.split()[4] == sys.argv[1] for line in mountinfo), "propagation": tags}))
"""


@needs_root
def test_as_root_mounts_are_private_to_the_process(tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.mkdir()
    result = subprocess.run([sys.executable, "-c", AS_ROOT, str(target)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["namespace"] == {"rootless": False, "id_ranges": 4294967296 - 1, "overlay_userxattr": False,
                                   "gid_ranges": 4294967296 - 1, "missing_ids": None, "isolation": "namespaces",
                                   "reason": "root: mount, PID, IPC, UTS and network namespaces", "may_mknod": False,
                                   "missing": None}
    assert report["mnt"] != os.readlink("/proc/self/ns/mnt")
    assert report["same"]
    assert report["mounted"]
    assert report["propagation"] == []  # no shared: or master: tag on any mount: nothing propagates either way
    assert str(target) not in Path("/proc/self/mountinfo").read_text()


ROOTLESS = """
import dataclasses, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from builder.sandbox.namespace import enter_build_namespace
from builder.sandbox import parent as sandbox
namespace = enter_build_namespace()
results = []
for argv, fields in json.loads(sys.argv[3]):
    chunks = []
    fields["groups"] = tuple(fields.get("groups", ()))
    spec = sandbox.SandboxSpec(rootfs=Path(sys.argv[2]), argv=tuple(argv), env=(("PATH", "/bin"),), **fields)
    try:
        results.append([sandbox.run(spec, chunks.append), b"".join(chunks).decode()])
    except sandbox.SandboxError as error:
        results.append(["error", error.message])
print(json.dumps({"namespace": dataclasses.asdict(namespace), "results": results}))
"""


def user_ids(name: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def shared_tree() -> Iterator[Path]:
    """A copy of the packages any user can read (the checkout and its venv may sit in root's home)."""
    skip_if_chrooted("a user namespace")
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("setpriv and unshare (util-linux) are needed to run a test as another user")
    with readable_tempdir("pybuild-ns-") as top:
        for package in ("builder", "parser"):
            shutil.copytree(REPO_ROOT / package, top / package, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
        yield top


def run_as(uid: int, gid: int, tree: Path, checks: list) -> dict:
    """Run ROOTLESS as ``uid``: enter the build namespace, then each (argv, spec fields) in the sandbox."""
    rootfs = make_busybox_rootfs(tree / f"rootfs-{uid}")
    subprocess.run(["chown", "-R", f"{uid}:{gid}", str(rootfs)], check=True)
    switch = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    # Tried from inside a user namespace, as the build will start it: host permissions may differ there.
    probe = ["unshare", "--user", "--map-root-user"]
    python = next((candidate for candidate in (sys.executable, "/usr/bin/python3")
                   if subprocess.run([*switch, *probe, candidate, "-I", "-c",
                                      "import sys; assert sys.version_info >= (3, 11)"],
                                     capture_output=True).returncode == 0), None)
    if python is None:
        pytest.skip(f"no Python 3.11+ that uid {uid} may run (the venv's lies in root's home)")
    result = subprocess.run([*switch, python, "-I", "-c", ROOTLESS, str(tree), str(rootfs), json.dumps(checks)],
                            capture_output=True, text=True, cwd=tree)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@needs_root
def test_rootless_single_id(shared_tree: Path) -> None:
    checks = [
        (["id", "-u"], {}),
        (["hostname"], {}),
        (["ls", "/proc"], {}),
        (["ip", "-o", "link"], {}),
        (["touch", "/tmp/made"], {}),
        (["id"], {"uid": 1000, "gid": 1000}),
    ]
    report = run_as(65534, 65534, shared_tree, checks)
    namespace = report["namespace"]
    assert namespace.pop("missing_ids").startswith("your user nobody has no range in /etc/subuid and /etc/subgid")
    assert namespace == {"rootless": True, "id_ranges": 1, "overlay_userxattr": True, "gid_ranges": 1,
                         "isolation": "namespaces", "reason": "rootless: through a user namespace", "may_mknod": False,
                         "missing": None}
    uid, hostname, proc, links, touched, other_user = report["results"]
    assert uid == [0, "0\n"]
    assert hostname == [0, "pybuild\n"]
    assert proc[0] == 0 and [name for name in proc[1].split() if name.isdigit()] == ["1"]
    assert links[0] == 0 and [line.split()[1] for line in links[1].splitlines()] == ["lo:"]
    assert ",UP," in links[1]
    assert touched == [0, ""]
    made = (shared_tree / "rootfs-65534" / "tmp" / "made").stat()
    assert (made.st_uid, made.st_gid) == (65534, 65534)
    assert other_user[0] == "error" and "/etc/subuid" in other_user[1]


@pytest.fixture
def user_with_subordinate_ids() -> Iterator[tuple[int, int, int]]:
    """A system user with 65536 subordinate uids and gids; /etc/subuid and /etc/subgid are restored afterwards."""
    if not (shutil.which("useradd") and shutil.which("newuidmap") and shutil.which("newgidmap")):
        pytest.skip("useradd, newuidmap and newgidmap (the uidmap package) are needed for the subuid mapping")
    created = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                             capture_output=True, text=True)
    if created.returncode not in (0, 9):  # 9: the user exists already
        pytest.skip(f"cannot create a test user: {created.stderr.strip()}")
    try:
        with subordinate_ids_restored() as saved:
            ends = [int(start) + int(count) for text in saved.values() if text
                    for _, start, count in (line.split(":") for line in text.decode().split() if line.count(":") == 2)]
            start = max([400000, *ends])
            for path, text in saved.items():
                path.write_bytes((text or b"") + f"{TEST_USER}:{start}:65536\n".encode())
            uid, gid = user_ids(TEST_USER)
            yield uid, gid, start
    finally:
        if created.returncode == 0:
            subprocess.run(["userdel", TEST_USER], check=True)


@needs_root
def test_rootless_with_subordinate_ids(shared_tree: Path, user_with_subordinate_ids: tuple[int, int, int]) -> None:
    uid, gid, start = user_with_subordinate_ids
    as_www = {"uid": 1000, "gid": 1000, "groups": [50]}
    report = run_as(uid, gid, shared_tree, [(["id"], as_www), (["touch", "/tmp/by-www"], as_www), (["id", "-u"], {})])
    assert report["namespace"] == {"rootless": True, "id_ranges": 65537, "overlay_userxattr": True,
                                   "gid_ranges": 65537, "missing_ids": None, "isolation": "namespaces",
                                   "reason": "rootless: through a user namespace", "may_mknod": False,
                                   "missing": None}
    assert report["results"] == [[0, "uid=1000(www) gid=1000(www) groups=50(staff)\n"], [0, ""], [0, "0\n"]]
    made = (shared_tree / f"rootfs-{uid}" / "tmp" / "by-www").stat()
    # Inside id 1000 is the 1000th subordinate id (id 1 inside is the range's start).
    assert (made.st_uid, made.st_gid) == (start + 999, start + 999)
