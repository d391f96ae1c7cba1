"""Shared test fixtures: where BuildKit's conformance data lives."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = REPO_ROOT.parent / "shared" / "conformance"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"BuildKit conformance data not found at {CONFORMANCE}; it lives beside the checkout")
    return CONFORMANCE


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout built as a wheel once per session, for the tests that install it into containers."""
    from containers import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@contextlib.contextmanager
def readable_tempdir(prefix: str) -> Iterator[Path]:
    """A temporary directory other users may enter (pytest's own lie where only root may), removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        top.chmod(0o755)
        yield top
    finally:
        shutil.rmtree(top)


BUSYBOX = Path("/bin/busybox")
PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
www:x:1000:1000:web server:/home/www:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
www:x:1000:
staff:x:50:www
nogroup:x:65534:
"""


def make_busybox_rootfs(root: Path) -> Path:
    """A tiny root filesystem: the static busybox, its applet links, and users root, daemon, www, nobody."""
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} is missing: install Debian's busybox-static (the README's test command does)")
    for name in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "home/www"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    target = root / "bin" / "busybox"
    target.write_bytes(BUSYBOX.read_bytes())
    target.chmod(0o755)
    for applet in ("sh", "ls", "cat", "echo", "id", "hostname", "mount", "ps", "touch", "rm", "mkdir", "sleep",
                   "env", "pwd", "true", "false", "ip", "stat", "umask", "readlink", "chmod", "chown", "ln", "wc",
                   "sha256sum", "tar", "test", "printf", "grep", "kill", "head"):
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


@pytest.fixture
def busybox_rootfs(tmp_path: Path) -> Path:
    return make_busybox_rootfs(tmp_path / "rootfs")


def root_is_a_mount_point() -> bool:
    """False when the tests run chrooted into a directory (as a fresh-machine check does)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return True
    return any(line.split()[4] == "/" for line in lines)


CHROOTED = not root_is_a_mount_point()
CHROOT_REASON = ("podman and buildah apply layers by remounting /, and the kernel refuses user namespaces, "
                 "when / is not a mount point: these tests run chrooted here")


def skip_if_chrooted(what: str) -> None:
    if CHROOTED:
        pytest.skip(f"{what}: {CHROOT_REASON}")


SUBORDINATE_ID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


@contextlib.contextmanager
def subordinate_ids_restored() -> Iterator[dict[Path, bytes | None]]:
    """/etc/subuid and /etc/subgid as they were (None: absent), put back as they were afterwards."""
    saved = {path: path.read_bytes() if path.exists() else None for path in SUBORDINATE_ID_FILES}
    try:
        yield saved
    finally:
        for path, text in saved.items():
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(text)


def process_command_lines() -> list[str]:
    """Every process's command line, from /proc (procps' ps may not be installed)."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return lines
