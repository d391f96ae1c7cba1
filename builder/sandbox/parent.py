"""Run one command on a root filesystem in fresh Linux namespaces and stream its output: a RUN step's sandbox."""

from __future__ import annotations

import _socket  # the public ``socket`` module builds its enums at import, 2 ms of every build
import contextlib
import marshal
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from parser.dataclass import dataclass
from parser.errors import PybuildError

MAX_SYMLINKS = 40
HEREDOC_SCRIPT_DIR = "/dev/pipes"  # where BuildKit shows a RUN heredoc that starts with #!
# The interpreter is started isolated and without site for speed; the package is found by its own location.
_BOOT = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
         "from builder.sandbox.child import serve; serve()")


@dataclass
class BindMount:
    """A host file or directory shown at ``target``."""

    source: Path
    target: str
    readonly: bool = True


@dataclass
class TmpfsMount:
    """An empty memory-backed directory at ``target``; ``size`` in bytes."""

    target: str
    size: int | None = None


@dataclass
class SecretMount:
    """A secret shown read-only at ``target``, never copied into the rootfs.

    ``content`` travels to the sandbox on its private pipe, so a secret from an environment variable
    never touches a disk; otherwise the sandbox copies ``source``.
    """

    source: Path | None
    target: str
    mode: int = 0o400
    uid: int = 0
    gid: int = 0
    content: bytes | None = None


@dataclass
class SandboxSpec:
    """One command to run: ids are numbers (the builder resolves USER names) and network is already decided."""

    rootfs: Path
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    hostname: str = "pybuild"
    network: Literal["none", "host"] = "none"
    mounts: tuple[BindMount | TmpfsMount | SecretMount, ...] = ()
    resolv_conf: bytes | None = None
    hosts: bytes | None = None
    scripts: tuple[tuple[str, bytes], ...] = ()  # (name, content): executable, read-only in HEREDOC_SCRIPT_DIR


class SandboxError(PybuildError):
    """The command could not be started (setup failed); its own failures are exit codes instead."""


class SandboxServer:
    """The process that forks each RUN's sandbox: ``builder.sandbox.child.serve``, one interpreter per build.

    Starting an interpreter is most of a RUN's fixed cost (about 15 ms of CPU); forking one that has loaded
    the sandbox code costs about one. A run sends the server its pipes on a socket pair; the server forks a
    waiter that reads the plan from one, runs the command and tells its status on another. The thread that
    starts the server must outlive every step that uses it: the server dies with that thread, and the
    steps' processes with the server. Safe to use from several threads at once.
    """

    def __init__(self) -> None:
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        try:
            # A session of its own: the terminal's Ctrl-C reaches only the builder, which then kills the steps.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._channel = ours

    def close(self, wait: bool = True) -> None:
        """End the server: it ends when its socket does, once its steps have. ``wait`` reaps it, so that what the
        steps used counts as this process's own; a failed build does not wait for another stage's step."""
        self._channel.close()
        if wait:
            self.process.wait()

    def run(self, plan: dict, on_output: Callable[[bytes], None]) -> int:
        """Send the plan, stream the output, and return the exit code."""
        spec_r, spec_w = os.pipe()
        status_r, status_w = os.pipe()
        output_r, output_w = os.pipe()
        exit_r, exit_w = os.pipe()
        pid = None
        try:
            try:
                fds = struct.pack("4i", spec_r, status_w, output_w, exit_w)
                self._channel.sendmsg([b"r"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
            except OSError:
                raise SandboxError("the sandbox server has ended (was it killed?)") from None
            finally:
                for fd in (spec_r, status_w, output_w, exit_w):
                    os.close(fd)
            try:  # before the waiter is known to run: it reads the plan once it has told its pid
                with open(spec_w, "wb", closefd=False) as spec_pipe:
                    spec_pipe.write(marshal.dumps(plan))
            except BrokenPipeError:
                pass  # the waiter died early, or never started; its status pipe says why
            os.close(spec_w)
            spec_w = -1
            pid = _read_number(exit_r)
            failure = _read_all(status_r)
            while chunk := os.read(output_r, 65536):
                on_output(chunk)
            code = _read_number(exit_r)
            if failure:
                raise SandboxError(failure.decode(errors="replace"))
            if code is None:
                raise SandboxError("the sandbox ended without an exit status (was it killed?)")
            pid = None  # it has ended: nothing to kill
            return code
        finally:
            if pid is not None:  # stopped half way (an error, Ctrl-C): the command's namespace dies with its waiter
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for fd in (spec_w, status_r, output_r, exit_r):
                if fd >= 0:
                    os.close(fd)


class Sandboxes:
    """The build's sandbox server, started when the first RUN needs one (a rebuild whose RUNs all hit starts
    none), or given ahead by the caller, who started it while the builder loaded."""

    def __init__(self, started: SandboxServer | None = None) -> None:
        self._lock = threading.Lock()
        self._server = started

    def server(self) -> SandboxServer:
        with self._lock:
            if self._server is None or self._server.process.poll() is not None:
                self._server = SandboxServer()
            return self._server

    def close(self, wait: bool = True) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.close(wait)


def run(spec: SandboxSpec, on_output: Callable[[bytes], None], server: SandboxServer | None = None) -> int:
    """Run the command and return its exit status, 128 + the signal number if a signal killed it.

    Mount points missing in the rootfs are created for the run and removed after it. The plan goes to
    ``builder.sandbox.child`` on a pipe (it may name secret files, so never on the command line or in the
    environment); all mounting happens in that child's private mount namespace, so none outlives it.
    ``server``, the build's sandbox server; without one, a server is started for this run alone.
    Safe to call from several threads at once: it changes no process-wide state.
    """
    from builder.sandbox.namespace import entered

    isolation = entered()
    created: list[Path] = []
    own_server = None
    try:
        if not spec.argv:
            raise SandboxError("nothing to run: the command is empty")
        if spec.network not in ("none", "host"):
            raise SandboxError(f"unsupported sandbox network mode {spec.network!r} (use none or host)")
        rootfs = spec.rootfs.resolve()
        if server is None:
            server = own_server = SandboxServer()
        if isolation is not None and isolation.isolation == "chroot":
            from builder.sandbox.chroot import lent_root

            if spec.network == "none":
                raise SandboxError("a network of its own (--network=none) needs a network namespace, which chroot "
                                   "isolation cannot make")
            for mount in spec.mounts:
                if isinstance(mount, TmpfsMount) and mount.size is not None:
                    on_output(f"[warning] --mount=type=tmpfs,target={mount.target}: its size limit cannot be kept "
                              "under chroot isolation (a plain directory stands in for the tmpfs)\n".encode())
            with lent_root(spec, rootfs, isolation.may_mknod):
                return server.run(_chroot_plan(spec, rootfs), on_output)
        return server.run(_plan(spec, rootfs, created), on_output)
    finally:
        remove_created(created)
        if own_server is not None:
            own_server.close()


def _chroot_plan(spec: SandboxSpec, rootfs: Path) -> dict:
    """The child's instructions under chroot isolation: the root is already furnished, nothing is mounted."""
    return {"isolation": "chroot", "rootfs": str(rootfs), "argv": list(spec.argv),
            "env": list(spec.env), "cwd": spec.cwd, "uid": spec.uid, "gid": spec.gid, "groups": list(spec.groups)}


def _plan(spec: SandboxSpec, rootfs: Path, created: list[Path]) -> dict:
    """The child's instructions, with every target already resolved to a host path inside ``rootfs``."""
    proc = mount_point(rootfs, "/proc", True, created)
    dev = mount_point(rootfs, "/dev", True, created)
    mounts = []
    for name, content in (("hosts", hosts_file(spec)), ("resolv.conf", resolv_conf(spec))):
        target = mount_point(rootfs, f"/etc/{name}", False, created)
        mounts.append({"kind": "file", "shown": f"/etc/{name}", "content": content, "target": str(target)})
    # Parents before children, as the user may nest one mount inside another.
    for mount in sorted(spec.mounts, key=lambda item: depth(item.target)):
        if isinstance(mount, BindMount):
            if not mount.source.exists():
                raise SandboxError(f"cannot mount {mount.source} at {mount.target}: it does not exist")
            target = mount_point(rootfs, mount.target, mount.source.is_dir(), created)
            mounts.append({"kind": "bind", "shown": mount.target, "source": str(mount.source),
                           "target": str(target), "readonly": mount.readonly})
        elif isinstance(mount, TmpfsMount):
            target = mount_point(rootfs, mount.target, True, created)
            mounts.append({"kind": "tmpfs", "shown": mount.target, "target": str(target), "size": mount.size})
        else:
            target = mount_point(rootfs, mount.target, False, created)
            mounts.append({"kind": "secret", "shown": mount.target, "source": str(mount.source),
                           "content": mount.content,
                           "target": str(target), "mode": mount.mode, "uid": mount.uid, "gid": mount.gid})
    return {
        "isolation": "namespaces", "rootfs": str(rootfs), "proc": str(proc), "dev": str(dev),
        "mounts": mounts,
        "argv": list(spec.argv), "env": list(spec.env),
        "cwd": spec.cwd, "uid": spec.uid, "gid": spec.gid, "groups": list(spec.groups),
        "hostname": spec.hostname, "network": spec.network,
        "scripts": list(spec.scripts),
        "script_dir": str(dev / HEREDOC_SCRIPT_DIR.removeprefix("/dev/")),
    }


def hosts_file(spec: SandboxSpec) -> bytes:
    if spec.hosts is not None:
        return spec.hosts
    return f"127.0.0.1\tlocalhost {spec.hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n".encode()


def resolv_conf(spec: SandboxSpec) -> bytes:
    if spec.resolv_conf is not None:
        return spec.resolv_conf
    if spec.network == "none":
        return b""
    try:
        return Path("/etc/resolv.conf").read_bytes()
    except FileNotFoundError:
        return b""


def depth(target: str) -> int:
    return len([part for part in target.split("/") if part])


def resolve_inside(rootfs: Path, path: str) -> Path:
    """``path`` as the sandbox will see it: symlinks followed relative to ``rootfs``, never leading out of it.

    Components from the first missing one on are taken literally.
    """
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    links = 0
    missing = False
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = rootfs.joinpath(*resolved, part)
        if not missing:
            try:
                is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
            except FileNotFoundError:
                missing = True
                is_link = False
            except NotADirectoryError:
                shown = "/" + "/".join(resolved)
                raise SandboxError(f"cannot mount at {path}: {shown} is not a directory in the image") from None
            if is_link:
                links += 1
                if links > MAX_SYMLINKS:
                    raise SandboxError(f"cannot mount at {path}: too many levels of symbolic links in the image")
                link = os.readlink(candidate)
                if link.startswith("/"):
                    resolved = []
                pending[:0] = [item for item in link.split("/") if item not in ("", ".")]
                continue
        resolved.append(part)
    return rootfs.joinpath(*resolved)


def mount_point(rootfs: Path, target: str, directory: bool, created: list[Path]) -> Path:
    """The host path to mount on for ``target``, creating it and its missing parents (recorded in ``created``)."""
    host = resolve_inside(rootfs, target)
    missing = []
    current = host
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    try:
        for path in reversed(missing):
            if path == host and not directory:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
            else:
                os.mkdir(path)
                path.chmod(0o755)  # whatever the builder's umask, the step's user must be able to pass
            created.append(path)
    except OSError as error:
        raise SandboxError(f"cannot create the mount point {target} in the image: {error.strerror}") from None
    return host


def remove_created(created: list[Path]) -> None:
    """Remove the mount points made for this run, deepest first.

    One the command filled (it wrote beside a mount) is its output, so it stays.
    """
    for path in reversed(created):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            elif path.stat().st_size == 0:
                path.unlink()
        except OSError:
            continue


def _read_number(fd: int) -> int | None:
    """The next native int on a waiter's exit pipe; None when the pipe ended first."""
    data = b""
    while len(data) < 4 and (chunk := os.read(fd, 4 - len(data))):
        data += chunk
    return struct.unpack("=i", data)[0] if len(data) == 4 else None


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
