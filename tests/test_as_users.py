"""Every command as users run it: the installed `pybuild`, with its defaults, no PYBUILD_ROOT set by a harness.

Three users: root (store /var/lib/pybuild), a user made by ``useradd -m`` (Debian gives it subordinate id
ranges: its store is ~/.local/share/pybuild and its builds equal root's byte for byte), the same without
ranges (only root exists in its builds: what needs another id is refused by name, with the remedy), and
``nobody``, whose home does not exist (the store it cannot make is named, with what to do).
"""

from __future__ import annotations

import importlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BUSYBOX, SUBORDINATE_ID_FILES, readable_tempdir, skip_if_chrooted, subordinate_ids_restored
from e2e import EXAMPLES, Pybuild, build_base

pytestmark = pytest.mark.slow

SYSTEM_ROOT = Path("/var/lib/pybuild")
LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"

APP = """\
FROM busybox-base
COPY --chown=1000:1000 app.txt /home/www/app.txt
RUN echo "home=$HOME" > /root-home && id -u > /root-uid
USER 1000
RUN echo "home=$HOME" > /home/www/www-home && id -u > /home/www/www-uid
CMD ["sh"]
"""

SOLO = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox echo made > /made"]
"""

SOLO_CHOWN = """\
FROM scratch
COPY --chown=1000:1000 busybox /bin/busybox
"""


@dataclass
class User:
    """Someone who runs pybuild: ``command`` prefixes a command line with the switch to that user."""

    name: str
    uid: int
    gid: int
    home: Path
    command: tuple[str, ...]

    def run(self, pybuild: tuple[str, ...], *args: str | os.PathLike, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """pybuild as this user runs it from a login shell's environment: HOME, USER, PATH, nothing else."""
        environment = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "PATH": LOGIN_PATH,
                       **(env or {})}
        done = subprocess.run([*self.command, *pybuild, *map(str, args)], env=environment, cwd=cwd or "/",
                              capture_output=True, text=True, timeout=300)
        assert "Traceback" not in done.stderr, done.stderr
        return done


def _can_switch() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test runs pybuild as other users")
    skip_if_chrooted("rootless builds")
    for tool in ("useradd", "userdel", "setpriv", "newuidmap", "newgidmap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed (packages passwd, util-linux, uidmap)")
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} is missing: install Debian's busybox-static")


def _switch(uid: int, gid: int) -> tuple[str, ...]:
    return ("setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups" if uid != 65534 else "--clear-groups")


@pytest.fixture(scope="module")
def login_users() -> Iterator[dict[str, User]]:
    """``dev``: useradd -m, with its subordinate ranges; ``solo``: the same, its ranges removed; and nobody."""
    _can_switch()
    suffix = uuid.uuid4().hex[:6]
    names = {"dev": f"pbdev{suffix}", "solo": f"pbsolo{suffix}"}
    try:
        with subordinate_ids_restored():
            users: dict[str, User] = {}
            for role, name in names.items():
                subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
                entry = pwd.getpwnam(name)
                users[role] = User(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir),
                                   _switch(entry.pw_uid, entry.pw_gid))
            for path in SUBORDINATE_ID_FILES:
                lines = [line for line in path.read_text().splitlines() if line.split(":")[0] not in names.values()]
                taken = [int(start) + int(count) for _, start, count in (line.split(":") for line in lines if line)]
                # useradd gave dev a range where login.defs allows; give one explicitly where it did not
                lines.append(f"{names['dev']}:{max([600000, *taken])}:65536")
                path.write_text("\n".join(lines) + "\n")
            users["nobody"] = User("nobody", 65534, 65534, Path("/nonexistent"), _switch(65534, 65534))
            yield users
    finally:
        for name in names.values():
            subprocess.run(["userdel", "-r", name], capture_output=True)


@pytest.fixture(scope="module")
def installed(login_users: dict[str, User]) -> Iterator[tuple[str, ...]]:
    """The installed pybuild command. Where another user may not reach it (a venv in root's home), the same
    installed packages, copied where anyone can read them, run by the same entry point."""
    script = Path(sys.executable).with_name("pybuild")
    # the sandbox runs the interpreter again inside a user namespace, where a path another user reaches
    # only through root's privileges (a venv made from an interpreter in /root) is refused
    probe = subprocess.run([*login_users["dev"].command, "unshare", "--user", "--map-root-user", str(script),
                            "--version"], capture_output=True, env={"PATH": LOGIN_PATH, "HOME": "/"})
    if script.exists() and probe.returncode == 0:
        yield (str(script),)
        return
    top = Path(tempfile.mkdtemp(prefix="pybuild-installed-"))
    try:
        for package in ("builder", "parser", "cache", "click", "lark", "zstandard", "pathspec"):
            source = Path(importlib.import_module(package).__file__).parent
            shutil.copytree(source, top / package, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
        top.chmod(0o755)
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        yield (python, "-I", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); from builder.cli import main; "
               "main()", str(top))
    finally:
        shutil.rmtree(top)


@pytest.fixture(scope="module")
def shared(login_users: dict[str, User]) -> Iterator[Path]:
    """A directory every user may read: the base image as an archive, and the build contexts."""
    with readable_tempdir("pybuild-as-users-") as top:
        yield _fill_shared(top)


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A temporary directory other users may enter (pytest's own lies in a directory only root may)."""
    with readable_tempdir("pybuild-as-users-tmp-") as top:
        yield top


def _fill_shared(top: Path) -> Path:
    harness = Pybuild(top / "harness-store")
    build_base(harness)
    harness.save("busybox-base", top / "base.tar")
    (top / "app").mkdir()
    (top / "app" / "Dockerfile").write_text(APP)
    (top / "app" / "app.txt").write_text("app\n")
    for name, text in (("solo", SOLO), ("solo-chown", SOLO_CHOWN)):
        (top / name).mkdir()
        (top / name / "Dockerfile").write_text(text)
        shutil.copy2(BUSYBOX, top / name / "busybox")
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
    return top


def _out_dir(user: User, top: Path) -> Path:
    out = top / f"out-{user.name}"
    out.mkdir(exist_ok=True)
    os.chown(out, user.uid, user.gid)
    return out


def _layer_files(archive: Path) -> dict[str, tuple[int, int, bytes]]:
    """Each regular file of an OCI archive's image: owner and content, from the last layer holding it."""
    import zstandard

    files: dict[str, tuple[int, int, bytes]] = {}
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))
        blob = "blobs/sha256/" + index["manifests"][0]["digest"].removeprefix("sha256:")
        manifest = json.load(outer.extractfile(blob))
        for layer in manifest["layers"]:
            raw = outer.extractfile("blobs/sha256/" + layer["digest"].removeprefix("sha256:"))
            with tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(raw), mode="r|") as tar:
                for member in tar:
                    if member.isfile():
                        files[member.name] = (member.uid, member.gid, tar.extractfile(member).read())
    return files


def test_user_with_ranges_runs_every_command_in_its_own_store(installed, login_users, shared: Path) -> None:
    dev = login_users["dev"]
    store = dev.home / ".local" / "share" / "pybuild"
    system_lease = (SYSTEM_ROOT / "lease.lock").stat().st_mtime_ns if (SYSTEM_ROOT / "lease.lock").exists() else None
    out = _out_dir(dev, shared)

    loaded = dev.run(installed, "load", "-i", shared / "base.tar")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == "Loaded image: busybox-base:latest\n"
    assert store.is_dir() and store.stat().st_uid == dev.uid

    built = dev.run(installed, "build", "--progress=plain", "-t", "app:1", "-o", f"type=oci,dest={out / 'app.tar'}",
                    shared / "app", cwd=dev.home)
    assert built.returncode == 0, built.stderr
    files = _layer_files(out / "app.tar")
    assert files["home/www/app.txt"] == (1000, 1000, b"app\n")  # COPY --chown to a subordinate id
    assert files["home/www/www-uid"][:2] == (1000, 1000) and files["home/www/www-uid"][2] == b"1000\n"
    assert files["home/www/www-home"][2] == b"home=/home/www\n"  # USER 1000 is www in the image's passwd
    assert files["root-home"][2] == b"home=/root\n"
    assert built.stderr.splitlines()[0] == "isolation: namespaces (rootless: through a user namespace)"
    chrooted = dev.run(installed, "build", "--isolation=chroot", shared / "app", cwd=dev.home)
    assert chrooted.returncode == 1  # chroot is root's: a user is told, never given a weaker isolation
    assert "--isolation=chroot cannot be had: pybuild runs without root" in chrooted.stderr

    listed = dev.run(installed, "images")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == ["app", "1"] for line in listed.stdout.splitlines()), listed.stdout
    inspected = dev.run(installed, "inspect", "app:1")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["config"]["Cmd"] == ["sh"]
    saved = dev.run(installed, "save", "-o", out / "saved.tar", "app:1")
    assert saved.returncode == 0, saved.stderr
    assert _layer_files(out / "saved.tar") == files
    parsed = dev.run(installed, "debug", "ast", "-f", shared / "app" / "Dockerfile")
    assert parsed.returncode == 0 and parsed.stdout.splitlines()[0] == '(from "busybox-base")', parsed.stderr

    removed = dev.run(installed, "rmi", "app:1")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("Untagged: app:1\nDeleted: sha256:")
    pruned = dev.run(installed, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "Total reclaimed space" in pruned.stdout
    # root's store was never touched
    after = (SYSTEM_ROOT / "lease.lock").stat().st_mtime_ns if (SYSTEM_ROOT / "lease.lock").exists() else None
    assert after == system_lease

    # root builds the same source into its own default store: the very same image, byte for byte
    name = f"as-users-{uuid.uuid4().hex[:8]}"
    root = User("root", 0, 0, Path("/root"), ())
    try:
        assert root.run(installed, "load", "-i", shared / "base.tar").returncode == 0
        as_root = root.run(installed, "build", "--progress=plain", "-t", name, "-o",
                           f"type=oci,dest={out / 'root.tar'}", shared / "app")
        assert as_root.returncode == 0, as_root.stderr
        assert (SYSTEM_ROOT / "index.json").is_file()
        assert name in (SYSTEM_ROOT / "index.json").read_text()
        # the archives name the image by its tag; the image itself (manifest digest) must be the same
        assert _manifest_digest(out / "root.tar") == _manifest_digest(out / "app.tar")
        assert _layer_files(out / "root.tar") == files
        # the other commands on root's default store
        listed = root.run(installed, "images")
        assert any(line.split()[:2] == [name, "latest"] for line in listed.stdout.splitlines()), listed.stdout
        inspected = root.run(installed, "inspect", name)
        assert json.loads(inspected.stdout)["config"]["Cmd"] == ["sh"], inspected.stderr
        saved = root.run(installed, "save", "-o", out / "root-saved.tar", name)
        assert saved.returncode == 0 and _layer_files(out / "root-saved.tar") == files, saved.stderr
        parsed = root.run(installed, "debug", "ast", "-f", shared / "app" / "Dockerfile")
        assert parsed.stdout.splitlines()[0] == '(from "busybox-base")', parsed.stderr
    finally:
        removed = root.run(installed, "rmi", name)
    assert removed.stdout.startswith(f"Untagged: {name}:latest\n"), removed.stderr
    # prune removes only unnamed images and what no image uses: what a root user's store holds besides stays
    pruned = root.run(installed, "prune")
    assert pruned.returncode == 0 and "Total reclaimed space" in pruned.stdout, pruned.stderr
    assert "busybox-base:latest" in (SYSTEM_ROOT / "index.json").read_text()


def _manifest_digest(archive: Path) -> str:
    with tarfile.open(archive) as outer:
        return json.load(outer.extractfile("index.json"))["manifests"][0]["digest"]


def test_user_without_ranges_builds_as_root_and_names_the_missing_ids(installed, login_users, shared: Path) -> None:
    solo = login_users["solo"]
    out = _out_dir(solo, shared)
    built = solo.run(installed, "build", "--progress=plain", "-t", "solo:1", "-o",
                     f"type=oci,dest={out / 'solo.tar'}", shared / "solo", cwd=solo.home)
    assert built.returncode == 0, built.stderr
    assert _layer_files(out / "solo.tar")["made"] == (0, 0, b"made\n")
    assert (solo.home / ".local" / "share" / "pybuild" / "index.json").is_file()
    inspected = solo.run(installed, "inspect", "solo:1")
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["os"] == "linux", inspected.stderr
    assert solo.run(installed, "save", "-o", out / "saved.tar", "solo:1").returncode == 0
    assert solo.run(installed, "rmi", "solo:1").stdout.startswith("Untagged: solo:1\n")
    reloaded = solo.run(installed, "load", "-i", out / "saved.tar")
    assert (reloaded.returncode, reloaded.stdout) == (0, "Loaded image: solo:1\n"), reloaded.stderr
    parsed = solo.run(installed, "debug", "ast", "-f", shared / "solo" / "Dockerfile")
    assert parsed.stdout.splitlines()[0] == '(from "scratch")', parsed.stderr

    chown = solo.run(installed, "build", "--progress=plain", shared / "solo-chown", cwd=solo.home)
    assert chown.returncode == 1
    message = chown.stderr.strip().splitlines()
    assert "COPY --chown needs uid 1000, but this rootless build maps only root (0)" in chown.stderr, chown.stderr
    assert message[-1] == (f"hint: your user {solo.name} has no range in /etc/subuid and /etc/subgid: as root, add "
                           "one no other user has, e.g. usermod --add-subuids 100000-165535 --add-subgids "
                           f"100000-165535 {solo.name}")

    # busybox-base has /home/www owned by 1000: the base cannot be unpacked, and the blob is not blamed
    loaded = solo.run(installed, "load", "-i", shared / "base.tar")
    assert loaded.returncode == 1
    assert "'home/www' needs uid 1000, but this rootless build maps only root (0)" in loaded.stderr, loaded.stderr
    assert "damaged" not in loaded.stderr and "usermod --add-subuids" in loaded.stderr

    for args in (("images",), ("prune",)):
        done = solo.run(installed, *args)
        assert done.returncode == 0, done.stderr


def test_nobody_is_told_which_store_it_cannot_create(installed, login_users, shared: Path) -> None:
    nobody = login_users["nobody"]
    for args in (("images",), ("build", shared / "solo"), ("load", "-i", shared / "base.tar"), ("prune",)):
        done = nobody.run(installed, *args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.splitlines()[0].startswith(
            "pybuild: error: cannot create pybuild's store /nonexistent/.local/share/pybuild: "), done.stderr
        assert done.stderr.splitlines()[1].startswith("hint: set PYBUILD_ROOT to a directory you may write")
    # with a store it may write, nobody builds too (only root exists in its builds)
    work = shared / "nobody-work"
    work.mkdir(exist_ok=True)
    os.chown(work, 65534, 65534)
    built = nobody.run(installed, "build", "--progress=plain", "-o", f"type=oci,dest={work / 'out.tar'}",
                       shared / "solo", env={"XDG_DATA_HOME": str(work)})
    assert built.returncode == 0, built.stderr
    assert (work / "pybuild" / "index.json").is_file()
    assert _layer_files(work / "out.tar")["made"] == (0, 0, b"made\n")


def test_a_store_root_that_cannot_be_written_is_named(installed, login_users, tmp_path: Path) -> None:
    dev = login_users["dev"]
    locked = tmp_path / "locked"
    locked.mkdir()
    tmp_path.chmod(0o755)
    done = dev.run(installed, "images", env={"PYBUILD_ROOT": str(locked)})
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        f"pybuild: error: cannot write to pybuild's store {locked}: permission denied",
        "hint: set PYBUILD_ROOT to a directory you may write (root's store is /var/lib/pybuild, a user's "
        "~/.local/share/pybuild)",
    ]


def test_examples_readme_build_as_a_user(installed, login_users, shared: Path) -> None:
    """The README's quick start, as a user with ranges: base from busybox, then an example, in ~/.local/share."""
    dev = login_users["dev"]
    out = _out_dir(dev, shared)
    checkout = dev.home / "checkout"  # the user's own clone
    shutil.copytree(EXAMPLES, checkout / "examples")
    subprocess.run(["chown", "-R", f"{dev.uid}:{dev.gid}", str(checkout)], check=True)
    base = dev.run(installed, "build", "--progress=plain", "-t", "busybox-base", "--build-context", "busybox=/bin",
                   "examples/base", cwd=checkout)
    assert base.returncode == 0, base.stderr
    site = dev.run(installed, "build", "--progress=plain", "-t", "static-site", "-o",
                   f"type=oci,dest={out / 'static-site.tar'}", "examples/static-site", cwd=checkout)
    assert site.returncode == 0, site.stderr
    files = _layer_files(out / "static-site.tar")
    assert any(name.endswith("index.html") for name in files), sorted(files)


@pytest.mark.parametrize(("args", "expected"), [
    (("-o", "type=local,dest=/var/lib/pybuild-test-out"),
     "pybuild: error: --output type=local: cannot write /var/lib/pybuild-test-out: permission denied"),
    (("-o", "type=oci,dest=/var/lib/out.tar"),
     "pybuild: error: --output type=oci: cannot write /var/lib/out.tar: permission denied"),
    (("--iidfile", "/etc/pybuild-test/iid"),
     "pybuild: error: --iidfile: cannot write /etc/pybuild-test/iid: permission denied (in /etc)"),
    (("--metadata-file", "/proc/self/metadata.json"),
     "pybuild: error: --metadata-file: cannot write /proc/self/metadata.json: permission denied"),
])
def test_unwritable_outputs_are_named_before_the_build(installed, login_users, shared: Path, args, expected) -> None:
    dev = login_users["dev"]
    done = dev.run(installed, "build", "--progress=plain", *args, shared / "solo", cwd=dev.home)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", expected + "\n")
