"""Run one command on a root filesystem in fresh Linux namespaces and stream its output: a RUN step's sandbox."""

from __future__ import annotations

import marshal
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from parser.errors import PybuildError

MAX_SYMLINKS = 40
HEREDOC_SCRIPT_DIR = "/dev/pipes"  # where BuildKit shows a RUN heredoc that starts with #!
# The interpreter is started isolated and without site for speed; the package is found by its own location.
_BOOT = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
         "from builder.sandbox.child import main; main()")


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


class Interpreter:
    """A sandbox process started ahead of its step: ``builder.sandbox.child`` waiting on a pipe for its plan.

    Starting the interpreter is most of a RUN's fixed cost (about 14 ms); one started while the builder
    mounts the root, or while the previous step runs, is ready when the plan is. The thread that starts
    it must outlive the step that uses it: the step's processes die with that thread.
    """

    def __init__(self) -> None:
        self._used = False
        spec_r, self.spec_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.output_r, output_w = os.pipe()
        try:
            # A session of its own: the terminal's Ctrl-C reaches only the builder, which then kills the step.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, str(spec_r), str(status_w)],
                stdin=subprocess.DEVNULL, stdout=output_w, stderr=output_w, pass_fds=(spec_r, status_w),
                start_new_session=True,
            )
        except BaseException:
            for fd in (self.spec_w, self.status_r, self.output_r):
                os.close(fd)
            raise
        finally:
            for fd in (spec_r, status_w, output_w):
                os.close(fd)

    def ready(self) -> bool:
        return not self._used and self.process.poll() is None

    def close(self) -> None:
        """End it if it was never used: it has started nothing yet, so killing it is enough."""
        if self._used:
            return
        self._used = True
        self.process.kill()
        self.process.wait()
        for fd in (self.spec_w, self.status_r, self.output_r):
            os.close(fd)

    def run(self, plan: dict, on_output: Callable[[bytes], None]) -> int:
        """Send the plan, stream the output, and return the exit code; an interpreter runs one plan."""
        self._used = True
        process = self.process
        try:
            try:
                with open(self.spec_w, "wb") as spec_pipe:
                    spec_pipe.write(marshal.dumps(plan))
            except BrokenPipeError:
                pass  # the child died early; its status pipe or exit code says why
            failure = _read_all(self.status_r)
            while chunk := os.read(self.output_r, 65536):
                on_output(chunk)
            code = process.wait()
        except BaseException:
            # The child's death takes PID 1 of the namespace with it (parent-death signal), and every process.
            process.kill()
            process.wait()
            raise
        finally:
            os.close(self.status_r)
            os.close(self.output_r)
        if failure:
            raise SandboxError(failure.decode(errors="replace"))
        return code if code >= 0 else 128 - code


class SpareInterpreters:
    """Keeps one sandbox interpreter started ahead of the next RUN, so no RUN waits for Python to start.

    The first is the one the caller ``started`` ahead, if any: a rebuild whose RUNs may all come from the
    cache starts none. Each RUN that takes one (or finds none and starts its own) starts the next while it
    runs, as long as RUNs are left. Stage threads live until the build ends, as their interpreters must.
    """

    def __init__(self, runs: int, started: Interpreter | None = None) -> None:
        self._lock = threading.Lock()
        self._runs_left = runs
        if started is not None and not runs:
            started.close()
            started = None
        self._spare = started

    def take(self) -> Interpreter | None:
        """The spare interpreter for the RUN about to start (None: it starts its own)."""
        with self._lock:
            spare, self._spare = self._spare, None
            self._runs_left -= 1
            if self._runs_left > 0:
                self._spare = Interpreter()
        return spare

    def close(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
            self._runs_left = 0
        if spare is not None:
            spare.close()


def run(spec: SandboxSpec, on_output: Callable[[bytes], None], interpreter: Interpreter | None = None) -> int:
    """Run the command and return its exit status, 128 + the signal number if a signal killed it.

    Mount points missing in the rootfs are created for the run and removed after it. The plan goes to
    ``builder.sandbox.child`` on a pipe (it may name secret files, so never on the command line or in the
    environment); all mounting happens in that child's private mount namespace, so none outlives it.
    ``interpreter``, one started ahead (it is used up), saves starting one now.
    Safe to call from several threads at once: it changes no process-wide state.
    """
    from builder.sandbox.namespace import entered

    if interpreter is not None and not interpreter.ready():
        interpreter.close()
        interpreter = None
    isolation = entered()
    created: list[Path] = []
    try:
        if not spec.argv:
            raise SandboxError("nothing to run: the command is empty")
        if spec.network not in ("none", "host"):
            raise SandboxError(f"unsupported sandbox network mode {spec.network!r} (use none or host)")
        rootfs = spec.rootfs.resolve()
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
                interpreter = interpreter or Interpreter()
                return interpreter.run(_chroot_plan(spec, rootfs), on_output)
        plan = _plan(spec, rootfs, created)
        interpreter = interpreter or Interpreter()
        return interpreter.run(plan, on_output)
    finally:
        remove_created(created)
        if interpreter is not None:
            interpreter.close()  # unless it ran the plan


def _chroot_plan(spec: SandboxSpec, rootfs: Path) -> dict:
    """The child's instructions under chroot isolation: the root is already furnished, nothing is mounted."""
    return {"isolation": "chroot", "parent": os.getpid(), "rootfs": str(rootfs), "argv": list(spec.argv),
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
        "isolation": "namespaces", "parent": os.getpid(), "rootfs": str(rootfs), "proc": str(proc), "dev": str(dev),
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


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
