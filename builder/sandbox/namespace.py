"""Put the pybuild process in a private mount namespace (inside a new user namespace when not run as root)."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.sandbox import linux
from parser.errors import PybuildError

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
INITIAL_MAP = [(0, 0, 4294967295)]


@dataclass
class BuildNamespace:
    """What the build may do in its namespace.

    ``id_ranges`` and ``gid_ranges`` count the user and group ids that exist (1 means only root, so
    USER must be root); ``overlay_userxattr`` is set when overlay must keep its metadata in user.*
    xattrs, as it does whenever it is mounted inside a user namespace; ``missing_ids`` says, when only
    root exists, why and how to get more.
    """

    rootless: bool
    id_ranges: int
    overlay_userxattr: bool
    gid_ranges: int = 0
    missing_ids: str | None = None


class UnmappedId(PybuildError):
    """An image or instruction needs a user or group id this rootless build does not have."""


_entered: BuildNamespace | None = None


def enter_build_namespace() -> BuildNamespace:
    """Enter the build's namespaces while the process is still single-threaded; later calls return the first's.

    The builder's overlay and bind mounts then stay private to the process and vanish with it. A non-root
    user becomes root of a new user namespace: with ranges in /etc/subuid and /etc/subgid (and the setuid
    newuidmap/newgidmap) image users other than root exist too; without them only root does.
    """
    global _entered
    if _entered is not None:
        return _entered
    missing_ids = None
    if os.geteuid() == 0:
        _unshare(linux.CLONE_NEWNS, "a mount namespace")
    else:
        missing_ids = _enter_user_namespace()
    # Mounts copied from the parent namespace may propagate back; cut every link.
    try:
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise PybuildError(f"cannot make the build's mounts private: {error.strerror}") from None
        _make_visible_mounts_private()
    ids = read_id_map(Path("/proc/self/uid_map"))
    gids = read_id_map(Path("/proc/self/gid_map"))
    in_user_namespace = ids != INITIAL_MAP
    _entered = BuildNamespace(rootless=in_user_namespace, id_ranges=sum(count for _, _, count in ids),
                              overlay_userxattr=in_user_namespace, gid_ranges=sum(count for _, _, count in gids),
                              missing_ids=missing_ids)
    return _entered


def check_mapped(uid: int, gid: int, what: str) -> None:
    """Fail with the remedy when ``what`` needs a uid or gid the build's user namespace does not map.

    Without this the kernel's answer is a bare EINVAL from chown, which says nothing of the cause.
    """
    namespace = _entered
    if namespace is None or not namespace.rootless:
        return
    for kind, number, count in (("uid", uid, namespace.id_ranges), ("gid", gid, namespace.gid_ranges)):
        if number >= count:
            mapped = "only root (0)" if count == 1 else f"only ids 0 to {count - 1}"
            raise UnmappedId(f"{what} needs {kind} {number}, but this rootless build maps {mapped}",
                             hint=namespace.missing_ids or "widen your user's ranges in /etc/subuid and /etc/subgid")


def _make_visible_mounts_private() -> None:
    """Under a chroot, / is no mount point: make each mount the process can see private instead.

    The mount holding the chroot itself is out of reach; pybuild relies on whoever set up the chroot
    (a container runtime, ``unshare --mount``) having made it private, as they do by default.
    """
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        try:
            linux.mount(None, mount_point, None, linux.MS_PRIVATE)
        except OSError as error:
            raise PybuildError(f"cannot make the mount {mount_point} private: {error.strerror}") from None


def read_id_map(path: Path) -> list[tuple[int, int, int]]:
    """The lines of a /proc uid_map or gid_map: (inside, outside, count)."""
    entries = []
    for line in path.read_text().splitlines():
        inside, outside, count = (int(field) for field in line.split())
        entries.append((inside, outside, count))
    return entries


def subordinate_ranges(path: Path, user: str | None, uid: int) -> list[tuple[int, int]]:
    """The (start, count) ranges /etc/subuid or /etc/subgid grants ``user`` (by name or by number)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    ranges = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user, str(uid)) and fields[1].isdigit() and fields[2].isdigit():
            ranges.append((int(fields[1]), int(fields[2])))
    return ranges


def _enter_user_namespace() -> str | None:
    """Become root of a new user namespace; returns why only root exists in it, with the remedy, or None."""
    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    uid_ranges = subordinate_ranges(SUBUID, user, uid)
    gid_ranges = subordinate_ranges(SUBGID, user, uid)
    tools = shutil.which("newuidmap"), shutil.which("newgidmap")
    if uid_ranges and gid_ranges and all(tools):
        _map_with_helper([tools[0], str(os.getpid()), *_map_arguments(uid, uid_ranges)],
                         [tools[1], str(os.getpid()), *_map_arguments(gid, gid_ranges)])
        return None
    if uid_ranges and gid_ranges:
        missing = ("newuidmap and newgidmap are not installed: install them (Debian: apt-get install uidmap) "
                   f"so pybuild can use your ranges in {SUBUID} and {SUBGID}")
    else:
        name = user or str(uid)
        missing = (f"your user {name} has no range in {SUBUID} and {SUBGID}: as root, add one no other user has, "
                   f"e.g. usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}")
    _unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS, "a user namespace")
    # Without the setuid helpers an unprivileged process may map only itself, and only after giving up setgroups.
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1\n")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1\n")
    return missing


def _map_arguments(own_id: int, ranges: list[tuple[int, int]]) -> list[str]:
    """Root inside is the caller; ids from 1 on are the subordinate ranges, one after another."""
    arguments = ["0", str(own_id), "1"]
    inside = 1
    for start, count in ranges:
        arguments += [str(inside), str(start), str(count)]
        inside += count
    return arguments


def _map_with_helper(uid_command: list[str], gid_command: list[str]) -> None:
    """Unshare, and have a child forked beforehand (so still outside) write our maps with the setuid tools."""
    import subprocess  # only rootless builds with subordinate ids pay for it

    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        os.close(report_r)
        code = 1
        try:
            if os.read(go_r, 1) == b"1":
                for command in (uid_command, gid_command):
                    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True)
                    if result.returncode != 0:
                        message = result.stderr.decode(errors="replace").strip() or f"exit code {result.returncode}"
                        os.write(report_w, f"{Path(command[0]).name}: {message}".encode())
                        break
                else:
                    code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(report_w)
    try:
        _unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS, "a user namespace")
        os.write(go_w, b"1")
    finally:
        os.close(go_w)
        _, status = os.waitpid(helper, 0)
        with os.fdopen(report_r, "rb") as report:
            message = report.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise PybuildError(f"cannot map user ids for the build: {message or 'the id mapping helper failed'}",
                           hint=f"check your user's ranges in {SUBUID} and {SUBGID}")


def _unshare(flags: int, what: str) -> None:
    try:
        linux.unshare(flags)
    except OSError as error:
        hint = None
        if flags & linux.CLONE_NEWUSER:
            hint = ("unprivileged user namespaces may be disabled here (see the sysctls "
                    "user.max_user_namespaces and kernel.unprivileged_userns_clone), or run pybuild as root")
        raise PybuildError(f"cannot create {what}: {error.strerror}", hint=hint) from None
