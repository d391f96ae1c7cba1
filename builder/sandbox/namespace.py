"""Put the pybuild process in a private mount namespace (inside a new user namespace when not run as root).

Where the environment refuses namespaces (a CI job in an unprivileged container), the build still runs:
``enter_build_namespace`` picks the strongest isolation that is left, and says which and why.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from builder.sandbox import linux
from parser.dataclass import dataclass
from parser.errors import PybuildError

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
INITIAL_MAP = [(0, 0, 4294967295)]
ISOLATIONS = ("auto", "namespaces", "chroot", "none")
APPARMOR_USERNS = Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
CAP_SYS_CHROOT = 18
CAP_MKNOD = 27
# How to grant what a RUN step needs, in the words of the tools CI jobs are started with.
GRANT_HINT = ("run the job's container with user namespaces allowed (podman's default; for docker: "
              "--security-opt seccomp=unconfined), or at least with CAP_SYS_CHROOT (--cap-add=SYS_CHROOT) "
              "for --isolation=chroot")
APPARMOR_HINT = ("allow them for pybuild with an AppArmor profile that grants `userns,` to the pybuild executable "
                 "(as podman's and buildah's packages ship for theirs), or lift the restriction with "
                 "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`, or run pybuild as root with "
                 "--isolation=chroot")


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
    isolation: str = "namespaces"  # or "chroot" (RUN in a chroot, no mounts) or "none" (no RUN at all)
    reason: str = ""  # why this isolation, in one line for the build's output
    may_mknod: bool = False  # chroot: device nodes can be made for a step's /dev
    missing: str | None = None  # none: what a RUN step lacks, and how to grant it

    @property
    def may_mount(self) -> bool:
        """Whether the builder may mount (overlay step roots, the sandbox's /proc and /dev)."""
        return self.isolation == "namespaces"

    def describe(self) -> str:
        return f"isolation: {self.isolation} ({self.reason})"


class UnmappedId(PybuildError):
    """An image or instruction needs a user or group id this rootless build does not have."""


_entered: BuildNamespace | None = None


def enter_build_namespace(isolation: str = "auto") -> BuildNamespace:
    """Enter the build's namespaces while the process is still single-threaded; later calls return the first's.

    The builder's overlay and bind mounts then stay private to the process and vanish with it. A non-root
    user becomes root of a new user namespace: with ranges in /etc/subuid and /etc/subgid (and the setuid
    newuidmap/newgidmap) image users other than root exist too; without them only root does. Root that may
    not make a mount namespace (a container without CAP_SYS_ADMIN) goes through a user namespace mapping
    its own ids; where that is refused too, ``auto`` falls back to chroot, then to none, and says why.
    An isolation asked for by name is had or is an error: it is never weakened.
    """
    global _entered
    if isolation not in ISOLATIONS:
        raise PybuildError(f"--isolation={isolation} is not an isolation", hint=f"use one of {', '.join(ISOLATIONS)}")
    if _entered is not None:
        if isolation not in ("auto", _entered.isolation):
            raise PybuildError(f"--isolation={isolation}: this process already runs with {_entered.isolation}")
        return _entered
    if isolation in ("chroot", "none"):
        _entered = _without_namespaces(isolation, f"--isolation={isolation} asked for")
        return _entered
    missing_ids = None
    if os.geteuid() == 0:
        try:
            linux.unshare(linux.CLONE_NEWNS)
            reason = "root: mount, PID, IPC, UTS and network namespaces"
        except OSError as error:
            refused = f"no mount namespace ({error.strerror}: no CAP_SYS_ADMIN, as in a container)"
            problem = _enter_own_user_namespace()
            if problem is not None:
                if isolation == "namespaces":
                    raise PybuildError(f"--isolation=namespaces cannot be had: {refused}; {problem}",
                                       hint=GRANT_HINT + ", or use --isolation=auto") from None
                _entered = _without_namespaces("auto", f"{refused}; {problem}")
                return _entered
            reason = f"{refused}; through a user namespace of the container's own ids instead"
    else:
        missing_ids = _enter_user_namespace()
        reason = "rootless: through a user namespace"
    # Mounts copied from the parent namespace may propagate back; cut every link.
    try:
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise _refused("cannot make the build's mounts private", error.strerror,
                           apparmor=error.errno == errno.EPERM) from None
        _make_visible_mounts_private()
    ids = read_id_map(Path("/proc/self/uid_map"))
    gids = read_id_map(Path("/proc/self/gid_map"))
    in_user_namespace = ids != INITIAL_MAP
    _entered = BuildNamespace(rootless=in_user_namespace, id_ranges=sum(count for _, _, count in ids),
                              overlay_userxattr=in_user_namespace, gid_ranges=sum(count for _, _, count in gids),
                              missing_ids=missing_ids, reason=reason)
    return _entered


def entered() -> BuildNamespace | None:
    """The isolation this process chose, or None before ``enter_build_namespace``."""
    return _entered


def _without_namespaces(asked: str, reason: str) -> BuildNamespace:
    """Chroot where root may chroot, else none; ``asked`` chroot that cannot be had is an error.

    No namespace is entered: the process keeps the ids it has, all of them real.
    """
    whole = INITIAL_MAP[0][2]
    effective = _effective_capabilities()
    if asked != "none":
        if os.geteuid() == 0 and effective & (1 << CAP_SYS_CHROOT):
            return BuildNamespace(rootless=False, id_ranges=whole, overlay_userxattr=False, gid_ranges=whole,
                                  isolation="chroot",
                                  reason=f"{reason}; RUN steps run in a chroot and share the container's network",
                                  may_mknod=bool(effective & (1 << CAP_MKNOD)))
        lack = "root" if os.geteuid() != 0 else "CAP_SYS_CHROOT"
        if asked == "chroot":
            raise PybuildError(f"--isolation=chroot cannot be had: pybuild runs without {lack}",
                               hint="run pybuild as root with CAP_SYS_CHROOT (a container's default)")
        reason = f"{reason}; no chroot without {lack}"
    return BuildNamespace(rootless=False, id_ranges=whole, overlay_userxattr=False, gid_ranges=whole,
                          isolation="none", reason=f"{reason}; RUN steps cannot run, everything else can",
                          missing=f"RUN needs a sandbox, and this environment allows none ({reason})")


def _effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


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
        pid = str(os.getpid())
        _map_with_helper(_newidmap([tools[0], pid, *_map_arguments(uid, uid_ranges)],
                                   [tools[1], pid, *_map_arguments(gid, gid_ranges)]))
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
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1\n")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1\n")
    except PermissionError as error:
        raise _refused("cannot map user ids for the build", error.strerror) from None
    return missing


def _map_arguments(own_id: int, ranges: list[tuple[int, int]]) -> list[str]:
    """Root inside is the caller; ids from 1 on are the subordinate ranges, one after another."""
    arguments = ["0", str(own_id), "1"]
    inside = 1
    for start, count in ranges:
        arguments += [str(inside), str(start), str(count)]
        inside += count
    return arguments


def _enter_own_user_namespace() -> str | None:
    """Root without CAP_SYS_ADMIN: become root of a user namespace that maps the ids this process has.

    With CAP_SETUID and CAP_SETGID the maps are written directly, no helper tool needed, so the build's
    files keep the very owners they would have on the host. A forked probe tries it first: a namespace
    entered with no map could not be left again. Returns None once inside, else why not.
    """
    uid_map, gid_map = _own_map(Path("/proc/self/uid_map")), _own_map(Path("/proc/self/gid_map"))
    problem = _probe_user_namespace(uid_map, gid_map)
    if problem is not None:
        return problem
    _map_with_helper(lambda pid: _write_maps(pid, uid_map, gid_map))
    return None


def _own_map(path: Path) -> str:
    """Each id this process has, mapped to itself. One id short of the whole range, so the namespace stays
    recognisable as one (overlayfs must keep its metadata in user.* xattrs there)."""
    entries = [(inside, inside, count) for inside, _, count in read_id_map(path)]
    if entries == INITIAL_MAP:
        entries = [(0, 0, INITIAL_MAP[0][2] - 1)]
    return "".join(f"{inside} {outside} {count}\n" for inside, outside, count in entries)


def _write_maps(pid: int, uid_map: str, gid_map: str) -> None:
    Path(f"/proc/{pid}/uid_map").write_text(uid_map)
    Path(f"/proc/{pid}/gid_map").write_text(gid_map)


def _probe_user_namespace(uid_map: str, gid_map: str) -> str | None:
    """In a throwaway child: may a user namespace be made, mapped, and mount a tmpfs? None if so, else why."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 3
        try:
            os.close(ready_r)
            os.close(go_w)
            try:
                linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS)
            except OSError:
                code = 1
                return
            os.write(ready_w, b"1")
            if os.read(go_r, 1) != b"1":
                return
            try:
                linux.mount("tmpfs", tempfile.gettempdir(), "tmpfs", 0, "size=4k")
                code = 0
            except OSError:
                code = 2
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    mapped = None
    try:
        if os.read(ready_r, 1) == b"1":
            try:
                _write_maps(child, uid_map, gid_map)
                mapped = True
            except OSError as error:
                mapped = error.strerror
            os.write(go_w, b"1" if mapped is True else b"0")
    finally:
        os.close(ready_r)
        os.close(go_w)
        _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    if code == 1:
        return "no user namespace (seccomp forbids unshare, as docker's default profile does)"
    if isinstance(mapped, str):
        return f"no user namespace (its id map is refused: {mapped}; no CAP_SETUID, CAP_SETGID or CAP_SETFCAP)"
    return "no user namespace that may mount (" + (_apparmor_restriction() or "refused by a security module") + ")"


def _apparmor_restriction() -> str | None:
    """Why unprivileged user namespaces are powerless here, where AppArmor restricts them (Ubuntu 23.10 on)."""
    try:
        restricted = APPARMOR_USERNS.read_text().strip() == "1"
    except OSError:
        return None
    if not restricted:
        return None
    return f"AppArmor restricts unprivileged user namespaces (kernel.{APPARMOR_USERNS.name}=1)"


def _refused(what: str, cause: str, hint: str | None = None, apparmor: bool = True) -> PybuildError:
    """A refusal in making the build's user namespace; where AppArmor restricts such namespaces, that is the cause
    named, with what to do about it, rather than the bare error."""
    restriction = _apparmor_restriction() if apparmor else None
    if restriction:
        return PybuildError(f"{what}: {restriction}", hint=APPARMOR_HINT)
    return PybuildError(f"{what}: {cause}", hint=hint)


def _newidmap(uid_command: list[str], gid_command: list[str]) -> Callable[[int], None]:
    """Writing the maps through the setuid newuidmap and newgidmap, which check /etc/subuid and /etc/subgid."""
    import subprocess  # only rootless builds with subordinate ids pay for it

    def write(pid: int) -> None:
        for command in (uid_command, gid_command):
            result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True)
            if result.returncode != 0:
                message = result.stderr.decode(errors="replace").strip() or f"exit code {result.returncode}"
                raise OSError(errno.EPERM, f"{Path(command[0]).name}: {message}")

    return write


def _map_with_helper(write_maps: Callable[[int], None]) -> None:
    """Unshare, and have a child forked beforehand (so still outside) write our maps."""
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.getpid()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        os.close(report_r)
        code = 1
        try:
            if os.read(go_r, 1) == b"1":
                try:
                    write_maps(pid)
                    code = 0
                except OSError as error:
                    os.write(report_w, str(error.strerror or error).encode())
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
        raise _refused("cannot map user ids for the build", message or "the id mapping helper failed",
                       hint=f"check your user's ranges in {SUBUID} and {SUBGID}")


def _unshare(flags: int, what: str) -> None:
    try:
        linux.unshare(flags)
    except OSError as error:
        if not flags & linux.CLONE_NEWUSER:
            raise PybuildError(f"cannot create {what}: {error.strerror}") from None
        raise _refused(f"cannot create {what}", error.strerror,
                       hint="unprivileged user namespaces may be disabled here (see the sysctls "
                            "user.max_user_namespaces and kernel.unprivileged_userns_clone), or run pybuild as root"
                       ) from None
