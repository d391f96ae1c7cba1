"""Inside the sandbox: enter new namespaces, build the container's mounts, become the step's user, exec the command."""

from __future__ import annotations

import _signal  # the public ``signal`` module imports enum, a few ms on every RUN
import _socket  # likewise ``socket``
import errno
import fcntl
import marshal
import os
import stat
import struct
import sys

from builder.sandbox import linux

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SIGKILL = 9
SIGPIPE = 13
SIGXFSZ = 25
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sH22x"  # struct ifreq: the interface name, then the flags in a 24-byte union

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))

# What a step may still do as root: the set Docker grants a container, less CAP_MKNOD (without a device
# cgroup a new device node would reach the host's disks). The rest (mounting, modules, raw I/O...) is dropped.
KEPT_CAPABILITIES = frozenset({
    0,  # CAP_CHOWN
    1,  # CAP_DAC_OVERRIDE
    3,  # CAP_FOWNER
    4,  # CAP_FSETID
    5,  # CAP_KILL
    6,  # CAP_SETGID
    7,  # CAP_SETUID
    8,  # CAP_SETPCAP
    10,  # CAP_NET_BIND_SERVICE
    13,  # CAP_NET_RAW
    18,  # CAP_SYS_CHROOT
    29,  # CAP_AUDIT_WRITE
    31,  # CAP_SETFCAP
})
# Host-wide kernel knobs under /proc that root in the step must not change (core_pattern, sysrq, ...).
PROC_READ_ONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")

# A read-only remount inside a user namespace must repeat the flags the kernel locked on the source mount.
LOCKED_FLAGS = ((os.ST_NOSUID, linux.MS_NOSUID), (os.ST_NODEV, linux.MS_NODEV), (os.ST_NOEXEC, linux.MS_NOEXEC),
                (os.ST_NOATIME, linux.MS_NOATIME), (os.ST_NODIRATIME, linux.MS_NODIRATIME),
                (os.ST_RELATIME, linux.MS_RELATIME))


class SetupError(Exception):
    """A reason the command could not be started, in words for the user."""


FDS_PER_RUN = 4  # plan (read), status (write), output (write), exit (write)


def serve() -> None:
    """The sandbox server: one interpreter per build, which forks a waiter for each RUN.

    Started by ``builder.sandbox.parent.SandboxServer`` with its end of a socket pair and the builder's pid.
    Each message on the socket carries a run's four pipes; a fork costs about a millisecond where a fresh
    interpreter costs fifteen of CPU. Each waiter tells its exit status on its exit pipe; the server reaps the
    waiters all the same (between messages, and all of them at the end), so the CPU and memory their steps
    used count as the builder's, as ``time`` or a benchmark reads them. The server ends when the builder
    closes the socket, or dies with it.
    """
    channel_fd, builder = int(sys.argv[1]), int(sys.argv[2])
    linux.set_parent_death_signal(SIGKILL)
    if os.getppid() != builder:
        os._exit(1)  # the builder died before the signal was armed
    server = os.getpid()
    channel = _socket.socket(fileno=channel_fd)
    while True:
        message, ancillary, _, _ = channel.recvmsg(1, _socket.CMSG_SPACE(4 * FDS_PER_RUN))
        _reap(block=not message)
        if not message:
            os._exit(0)
        fds = [fd for level, kind, data in ancillary if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
               for fd in struct.unpack(f"{len(data) // 4}i", data[:len(data) // 4 * 4])]
        for fd in fds:
            os.set_inheritable(fd, False)  # received descriptors are inheritable: none may reach the command
        pid = -1
        if len(fds) == FDS_PER_RUN:
            try:
                pid = os.fork()
            except OSError as error:
                os.write(fds[1], f"cannot start the sandbox: {error.strerror}".encode())
        if pid == 0:
            channel.close()
            _wait_for_command(*fds, server)
        for fd in fds:
            os.close(fd)


def _reap(block: bool) -> None:
    """Collect the waiters that have ended; with ``block``, wait for every one still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _wait_for_command(spec_fd: int, status_fd: int, output_fd: int, exit_fd: int, server: int) -> None:
    """A RUN's waiter: reads the plan, makes the namespaces, forks the command and tells its exit status.

    Its child is PID 1 of the new PID namespace and becomes the command. Setup failures go, one line, to the
    status pipe; that pipe is close-on-exec, so it ends without data exactly when the command started. The
    exit pipe carries this process's pid first (the builder kills it to stop the step), then the command's
    status, written once the whole PID namespace is gone; the mount namespace is the command's own, so it
    is gone too and the builder may take the step's root apart.
    """
    os.setsid()  # a session of its own: the terminal's Ctrl-C reaches only the builder, which then kills the step
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    os.write(exit_fd, struct.pack("=i", os.getpid()))
    try:
        plan = marshal.loads(_read_all(spec_fd))
        linux.set_parent_death_signal(SIGKILL)
        if os.getppid() != server:
            os._exit(1)  # the server died before the signal was armed
        chrooted = plan["isolation"] == "chroot"
        with open("/proc/sys/kernel/cap_last_cap", "rb") as handle:  # read while the builder's /proc is in view
            plan["last_capability"] = int(handle.read())
        if chrooted:
            plan["setgroups_denied"] = _setgroups_denied()  # a chroot has no /proc to ask later
        if not chrooted:
            flags = linux.CLONE_NEWPID | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC
            if plan["network"] == "none":
                flags |= linux.CLONE_NEWNET
            linux.unshare(flags)
        alive_r, alive_w = os.pipe()
        pid = os.fork()
    except Exception as error:
        _fail(status_fd, f"cannot create the sandbox's namespaces: {error}")
    if pid == 0:
        os.close(alive_w)
        _become_command(plan, status_fd, alive_r)
    os.close(status_fd)
    os.close(alive_r)
    _, status = os.waitpid(pid, 0)
    if chrooted:
        # No PID namespace ends what the command left running: its process group goes instead.
        try:  # noqa: SIM105 (contextlib is one import more on every RUN)
            os.killpg(pid, SIGKILL)
        except OSError:
            pass
    code = os.waitstatus_to_exitcode(status)
    code = code if code >= 0 else 128 - code
    os.write(exit_fd, struct.pack("=i", code))
    os._exit(code)


def _become_command(plan: dict, status_fd: int, alive_r: int) -> None:
    """PID 1 of the new namespace (or, under chroot isolation, a process group's leader): set up, then exec."""
    try:
        if plan["isolation"] == "chroot":
            os.setpgid(0, 0)
            try:
                os.chroot(plan["rootfs"])
            except OSError as error:
                raise SetupError(f"cannot chroot into the step's root: {error.strerror}") from None
            os.chdir("/")
        else:
            try:
                linux.unshare(linux.CLONE_NEWNS)
            except OSError as error:
                raise SetupError(f"cannot create the sandbox's mount namespace: {error.strerror}") from None
            _build_root(plan)
        _drop_to_user(plan)
        env = dict(plan["env"])
        path = _find_executable(plan["argv"][0], env.get("PATH", DEFAULT_PATH))
        # The interpreter ignores these two; ignored signals would stay ignored across exec.
        _signal.signal(SIGPIPE, _signal.SIG_DFL)
        _signal.signal(SIGXFSZ, _signal.SIG_DFL)
        # Armed last: changing uid or gid clears it.
        linux.set_parent_death_signal(SIGKILL)
        os.set_blocking(alive_r, False)
        try:
            if os.read(alive_r, 1) == b"":
                os._exit(1)  # the waiting parent is gone already
        except BlockingIOError:
            pass
        os.set_inheritable(status_fd, False)
        _exec(path, plan["argv"], env)
    except SetupError as error:
        _fail(status_fd, str(error))
    except BaseException as error:
        _fail(status_fd, f"cannot set up the sandbox: {error}")


def _build_root(plan: dict) -> None:
    rootfs = plan["rootfs"]
    try:
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    except OSError as error:
        # Chrooted builder: / is no mount point, and the build namespace already made its mounts private.
        if error.errno != errno.EINVAL:
            raise
    linux.mount(rootfs, rootfs, None, linux.MS_BIND | linux.MS_REC)  # pivot_root needs a mount point
    _mount_proc(plan["proc"])
    _mount_dev(plan["dev"])
    if plan["scripts"]:
        _add_scripts(plan["script_dir"], plan["scripts"])
    # Files made for the step (/etc/hosts, secrets) live in a tmpfs of this namespace only: nothing is left on
    # the host even if the builder is killed. Detaching it afterwards hides it; the files bound from it stay.
    staging = f"{plan['dev']}/.staging"
    os.mkdir(staging, 0o700)
    _mount_or_fail("staging", "tmpfs", staging, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                   "mode=700")
    for index, mount in enumerate(plan["mounts"]):
        try:
            _mount(mount, f"{staging}/{index}")
        except OSError as error:
            raise SetupError(f"cannot mount {mount['kind']} at {mount['shown']}: {error.strerror}") from None
    linux.umount(staging, linux.MNT_DETACH)
    os.rmdir(staging)
    try:  # noqa: SIM105 (contextlib is one import more on every RUN)
        linux.sethostname(plan["hostname"])
    except PermissionError:
        pass  # a container's seccomp profile may refuse it; the step then sees the container's name
    if plan["network"] == "none":
        _loopback_up()
    os.chdir(rootfs)
    try:
        # Pivoting onto the same directory stacks the old root above the new one; detaching it leaves only the image.
        linux.pivot_root(".", ".")
        linux.umount(".", linux.MNT_DETACH)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        # The builder itself runs chrooted (its root is no mount point), where pivot_root is refused. Moving the
        # image's mount over / in this private namespace, then chrooting into it, leaves no path back out.
        linux.mount(".", "/", None, linux.MS_MOVE)
        os.chroot(".")
    os.chdir("/")


def _mount_or_fail(shown: str, source: str | None, target: str, fstype: str | None, flags: int,
                   data: str | None = None) -> None:
    try:
        linux.mount(source, target, fstype, flags, data)
    except OSError as error:
        raise SetupError(f"cannot mount {shown} in the sandbox: {error.strerror}") from None


def _mount_proc(proc: str) -> None:
    try:
        linux.mount("proc", proc, "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    except PermissionError:
        # In a container the kernel refuses a new proc where the runtime masked parts of its own; the
        # container's, bound whole with its masks, is the best /proc there (it shows the container's processes).
        _mount_or_fail("/proc", "/proc", proc, None, linux.MS_BIND | linux.MS_REC)
    except OSError as error:
        raise SetupError(f"cannot mount /proc in the sandbox: {error.strerror}") from None
    for name in PROC_READ_ONLY:
        path = f"{proc}/{name}"
        if os.path.lexists(path):
            try:
                linux.mount(path, path, None, linux.MS_BIND)
                _remount_readonly(path)
            except OSError as error:
                raise SetupError(f"cannot make /proc/{name} read-only in the sandbox: {error.strerror}") from None


def _mount_dev(dev: str) -> None:
    """A /dev with just what programs expect; nodes are the host's, as mknod is refused in a user namespace."""
    _mount_or_fail("/dev", "tmpfs", dev, "tmpfs", linux.MS_NOSUID | linux.MS_STRICTATIME, "mode=755,size=65536k")
    for name in DEVICES:
        node = f"{dev}/{name}"
        os.close(os.open(node, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
        _mount_or_fail(f"/dev/{name}", f"/dev/{name}", node, None, linux.MS_BIND)
    os.mkdir(f"{dev}/pts", 0o755)
    _mount_or_fail("/dev/pts", "devpts", f"{dev}/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                   "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir(f"{dev}/shm", 0o1777)
    _mount_or_fail("/dev/shm", "shm", f"{dev}/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                   "mode=1777,size=65536k")
    for name, target in DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")


def _add_scripts(directory: str, scripts: list[tuple[str, bytes]]) -> None:
    """Executable files in a read-only directory of the sandbox's /dev, which is no part of any layer."""
    try:
        os.mkdir(directory, 0o755)
        for name, content in scripts:
            fd = os.open(f"{directory}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755)
            with open(fd, "wb") as script:
                script.write(content)
                os.fchmod(fd, 0o755)  # whatever the umask
        linux.mount(directory, directory, None, linux.MS_BIND)
        _remount_readonly(directory)
    except OSError as error:
        raise SetupError(f"cannot make the heredoc script in the sandbox: {error.strerror}") from None


def _mount(mount: dict, staged: str) -> None:
    target = mount["target"]
    kind = mount["kind"]
    if kind == "bind":
        linux.mount(mount["source"], target, None, linux.MS_BIND | (0 if mount["readonly"] else linux.MS_REC))
        if mount["readonly"]:
            _remount_readonly(target)
    elif kind == "tmpfs":
        size = mount["size"]
        linux.mount("tmpfs", target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                    "mode=1777" + (f",size={size}" if size is not None else ""))
    elif kind == "file":
        _bind_staged_copy(mount["content"], staged, target, 0o644, 0, 0)
    else:
        # A copy gets the requested owner and mode without touching the builder's file.
        content = mount["content"]
        if content is None:
            with open(mount["source"], "rb") as handle:
                content = handle.read()
        _bind_staged_copy(content, staged, target, mount["mode"], mount["uid"], mount["gid"])


def _bind_staged_copy(content: bytes, staged: str, target: str, mode: int, uid: int, gid: int) -> None:
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, content)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    linux.mount(staged, target, None, linux.MS_BIND)
    _remount_readonly(target)


def _remount_readonly(target: str) -> None:
    current = os.statvfs(target).f_flag
    flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
    for statvfs_flag, mount_flag in LOCKED_FLAGS:
        if current & statvfs_flag:
            flags |= mount_flag
    linux.mount(None, target, None, flags)


def _loopback_up() -> None:
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        current = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0))
        flags = struct.unpack(IFREQ, current)[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))
    finally:
        sock.close()


def _drop_to_user(plan: dict) -> None:
    uid, gid, groups, cwd = plan["uid"], plan["gid"], plan["groups"], plan["cwd"]
    for capability in range(plan["last_capability"] + 1):
        if capability not in KEPT_CAPABILITIES:
            try:
                linux.drop_bounding_capability(capability)
            except PermissionError:
                if plan["isolation"] != "chroot":
                    raise
                break  # a container without CAP_SETPCAP: its own bounding set is all the step gets
    try:
        # With a single mapped id the kernel forbids setgroups; there is nothing to drop then.
        denied = plan["setgroups_denied"] if "setgroups_denied" in plan else _setgroups_denied()
        if groups or not denied:
            os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError:
        raise SetupError(f"cannot run as uid {uid}, gid {gid}, groups {list(groups)}: these ids are not mapped in "
                         "this rootless build (give your user ranges in /etc/subuid and /etc/subgid)") from None
    os.umask(0o022)
    try:
        os.chdir(cwd)
    except FileNotFoundError:
        raise SetupError(f"working directory {cwd} does not exist in the image") from None
    except NotADirectoryError:
        raise SetupError(f"working directory {cwd} is not a directory in the image") from None
    except PermissionError:
        raise SetupError(f"working directory {cwd} is not accessible to uid {uid}") from None


def _setgroups_denied() -> bool:
    with open("/proc/self/setgroups", "rb") as handle:
        return handle.read().strip() == b"deny"


def _find_executable(name: str, search_path: str) -> str:
    """Look ``name`` up as execvp would, but in the image's PATH, so a miss is reported before exec."""
    if "/" in name:
        if not os.path.lexists(name):
            raise SetupError(f"cannot run {name}: no such file in the image")
        return name
    for directory in search_path.split(":"):
        candidate = f"{directory or '.'}/{name}"
        try:
            mode = os.stat(candidate).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) and os.access(candidate, os.X_OK):
            return candidate
    raise SetupError(f"cannot run {name}: not found in the image's PATH ({search_path})")


def _exec(path: str, argv: list[str], env: dict[str, str]) -> None:
    try:
        os.execve(path, argv, env)
    except FileNotFoundError:
        raise SetupError(f"cannot run {path}: its interpreter or dynamic loader is missing in the image") from None
    except PermissionError:
        raise SetupError(f"cannot run {path}: permission denied") from None
    except OSError as error:
        raise SetupError(f"cannot run {path}: {error.strerror}") from None


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _fail(status_fd: int, message: str) -> None:
    try:
        os.write(status_fd, message.replace("\n", " ").encode(errors="replace"))
    finally:
        os._exit(127)


if __name__ == "__main__":
    serve()
