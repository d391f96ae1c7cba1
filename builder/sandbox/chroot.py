"""Furnish a step's root for a RUN under chroot isolation, where nothing can be mounted, and take it all back after.

What the namespace sandbox mounts (/dev, /etc/hosts, secrets, bind and cache mounts, tmpfs) is put into the
root as plain files, copies and renamed directories instead. Whatever stood at a target is set aside and put
back, with its directory's times, so the step's change (copy-and-diff) holds only what the command did, as
under namespaces. Nothing lent stays: secrets and mounted trees are gone before the root is diffed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from builder.fs.diff import copy_metadata, materialize
from builder.sandbox.child import DEV_LINKS, DEVICES
from builder.sandbox.parent import (
    HEREDOC_SCRIPT_DIR,
    BindMount,
    SandboxError,
    SandboxSpec,
    SecretMount,
    TmpfsMount,
    depth,
    hosts_file,
    mount_point,
    remove_created,
    resolv_conf,
    resolve_inside,
)

# The numbers of the nodes the namespace sandbox binds from the host's /dev (child.DEVICES): (major, minor).
DEVICE_NUMBERS = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}


@contextlib.contextmanager
def lent_root(spec: SandboxSpec, rootfs: Path, may_mknod: bool) -> Iterator[None]:
    """The root furnished for the run of ``spec``; everything lent is taken back on exit, also on error."""
    loan = _Loan(rootfs)
    try:
        mount_point(rootfs, "/proc", True, loan.created)  # an empty /proc, as the namespace sandbox leaves one
        loan.devices(may_mknod)
        if spec.scripts:
            loan.scripts(spec.scripts)
        for name, content in (("hosts", hosts_file(spec)), ("resolv.conf", resolv_conf(spec))):
            loan.file(f"/etc/{name}", content, 0o644, 0, 0)
        for mount in sorted(spec.mounts, key=lambda item: depth(item.target)):
            if isinstance(mount, BindMount):
                if not mount.source.exists():
                    raise SandboxError(f"cannot mount {mount.source} at {mount.target}: it does not exist")
                loan.tree(mount.source, mount.target, keep=not mount.readonly)
            elif isinstance(mount, TmpfsMount):
                loan.directory(mount.target)
            elif isinstance(mount, SecretMount):
                content = mount.content
                if content is None:
                    content = mount.source.read_bytes()
                loan.file(mount.target, content, mount.mode, mount.uid, mount.gid)
        loan.lent()
        yield
    finally:
        loan.give_back()


class _Loan:
    """What was put into one root, and how to take each piece back (last lent, first returned)."""

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs
        self.created: list[Path] = []  # mount points made as the namespace sandbox makes them
        self.undo: list[Callable[[], None]] = []
        self.times: dict[Path, tuple[int, int]] = {}  # directories whose entries changed: their times before
        self.lent_mtimes: dict[Path, int] = {}
        self.holding: Path | None = None

    def _place(self, target: str, directory: bool) -> Path:
        """The host path for ``target``, empty and ready to fill: a new mount point, or what stood there set aside."""
        host = resolve_inside(self.rootfs, target)
        if not os.path.lexists(host):
            return mount_point(self.rootfs, target, directory, self.created)
        if self.holding is None:
            # Beside the root, so setting aside is a rename on the same filesystem.
            self.holding = Path(tempfile.mkdtemp(dir=self.rootfs.parent, prefix=".lent-"))
        self._keep_times(host.parent)
        held = self.holding / str(len(self.undo))
        os.rename(host, held)
        if directory:
            os.mkdir(host)
            os.chmod(host, 0o755)  # whatever the builder's umask, the step's user must be able to pass
        else:
            os.close(os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))

        def put_back() -> None:
            _remove(host)
            os.rename(held, host)

        self.undo.append(put_back)
        return host

    def _keep_times(self, directory: Path) -> None:
        if directory not in self.times:
            info = os.lstat(directory)
            self.times[directory] = (info.st_atime_ns, info.st_mtime_ns)

    def file(self, target: str, content: bytes, mode: int, uid: int, gid: int) -> None:
        host = self._place(target, directory=False)
        fd = os.open(host, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.write(fd, content)
        finally:
            os.close(fd)
        self.undo.append(lambda: _remove(host))

    def directory(self, target: str) -> None:
        """An empty directory anyone may write (a tmpfs mount's stand-in), emptied again afterwards."""
        host = self._place(target, directory=True)
        os.chmod(host, 0o1777)
        self.undo.append(lambda: _remove(host))

    def tree(self, source: Path, target: str, keep: bool) -> None:
        """A bind mount's stand-in: a writable source that must keep what the step writes (a cache mount) is
        renamed in and back out; any other is copied in and thrown away after."""
        host = self._place(target, directory=source.is_dir())
        if keep:
            try:
                os.rename(source, host)
            except OSError as error:
                raise SandboxError(f"cannot lend {source} to the step at {target}: {error.strerror}") from None
            self.undo.append(lambda: os.rename(host, source))
            return
        self.undo.append(lambda: _remove(host))
        if source.is_dir():
            materialize([source], host)
        else:
            shutil.copyfile(source, host)
            copy_metadata(os.fspath(source), os.fspath(host), os.lstat(source))

    def devices(self, may_mknod: bool) -> None:
        """The nodes programs expect in /dev; without CAP_MKNOD only /dev/null, as an empty file (reads end at
        once, writes are thrown away with it)."""
        # The namespace sandbox mounts a fresh /dev over the image's: what the image keeps there is set aside too.
        dev = self._place("/dev", directory=True)
        for name in DEVICES:
            node = dev / name
            if os.path.lexists(node):
                continue
            if may_mknod:
                os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(*DEVICE_NUMBERS[name]))
            elif name == "null":
                os.close(os.open(node, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
            else:
                continue
            os.chmod(node, 0o666)
            self.undo.append(lambda node=node: _remove(node))
        for name, mode in (("pts", 0o755), ("shm", 0o1777)):
            if not os.path.lexists(dev / name):
                os.mkdir(dev / name)
                os.chmod(dev / name, mode)
                self.undo.append(lambda path=dev / name: _remove(path))
        for name, link in DEV_LINKS:
            if not os.path.lexists(dev / name):
                os.symlink(link, dev / name)
                self.undo.append(lambda path=dev / name: _remove(path))

    def scripts(self, scripts: tuple[tuple[str, bytes], ...]) -> None:
        """A RUN heredoc's scripts where the namespace sandbox shows them."""
        directory = resolve_inside(self.rootfs, HEREDOC_SCRIPT_DIR)
        if os.path.lexists(directory):
            raise SandboxError(f"cannot make the heredoc script: {HEREDOC_SCRIPT_DIR} exists in the image")
        os.mkdir(directory)
        os.chmod(directory, 0o755)
        self.undo.append(lambda: _remove(directory))
        for name, content in scripts:
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755)
            with open(fd, "wb") as script:
                script.write(content)
                os.fchmod(fd, 0o755)

    def lent(self) -> None:
        """Everything is in place: a directory whose time moves from now on was changed by the command."""
        self.lent_mtimes = {directory: os.lstat(directory).st_mtime_ns for directory in self.times}

    def give_back(self) -> None:
        touched = {directory for directory in self.times if not os.path.lexists(directory)
                   or os.lstat(directory).st_mtime_ns != self.lent_mtimes.get(directory)}
        for action in reversed(self.undo):
            action()
        remove_created(self.created)
        if self.holding is not None:
            os.rmdir(self.holding)
        for directory, times in self.times.items():
            if directory not in touched:
                os.utime(directory, ns=times, follow_symlinks=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
