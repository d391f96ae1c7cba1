"""The RUN sandbox: isolation checked from inside with busybox, mounts, exit codes, setup errors, process lifetime."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_busybox_rootfs, process_command_lines

from builder.sandbox import parent as sandbox
from builder.sandbox.parent import BindMount, SandboxError, SandboxSpec, SecretMount, TmpfsMount

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root (or pybuild's user namespace)")
PATH_ENV = (("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),)
DEV_ENTRIES = ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom",
               "zero"]


def run(rootfs: Path, argv: tuple[str, ...], **fields) -> tuple[int, str]:
    chunks: list[bytes] = []
    spec = SandboxSpec(rootfs=rootfs, argv=argv, env=fields.pop("env", PATH_ENV), **fields)
    code = sandbox.run(spec, chunks.append)
    return code, b"".join(chunks).decode()


def host_namespace(kind: str) -> str:
    return os.readlink(f"/proc/self/ns/{kind}")


def sleeper() -> tuple[str, bytes]:
    """A sleep duration no other test uses, and the cmdline that sleep shows: leftovers cannot confuse a check."""
    seconds = str(random.randrange(100000, 999999))
    return seconds, b"sleep\x00" + seconds.encode() + b"\x00"


def processes_with(cmdline: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes() == cmdline:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def wait_until_gone(cmdline: bytes, seconds: float = 1.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_with(cmdline)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def interfaces(ip_link_output: str) -> dict[str, str]:
    """Interface name -> its flags, from busybox `ip link`."""
    found = {}
    for line in ip_link_output.splitlines():
        if not line.startswith(" "):
            _, name, flags = line.split(" ", 3)[:3]
            found[name.rstrip(":")] = flags
    return found


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything lstat and the content tell about a tree, except directory times (mount points touch them)."""
    listing = {}
    for directory, names, files in os.walk(root):
        for name in [".", *names, *files]:
            path = Path(directory) / name
            info = os.lstat(path)
            entry: tuple = (info.st_mode, info.st_uid, info.st_gid, info.st_nlink)
            if stat.S_ISLNK(info.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISREG(info.st_mode):
                entry += (info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            listing[str(path.relative_to(root))] = entry
    return listing


# (id, argv, spec fields, expected output: a string, or a check on the output)
INSIDE_CHECKS = [
    ("id-root", ("id",), {}, "uid=0(root) gid=0(root)\n"),
    ("id-user", ("id",), {"uid": 1000, "gid": 1000, "groups": (50,)}, "uid=1000(www) gid=1000(www) groups=50(staff)\n"),
    ("hostname", ("hostname",), {"hostname": "box"}, "box\n"),
    ("pid-1-is-the-command", ("cat", "/proc/1/cmdline"), {}, "cat\0/proc/1/cmdline\0"),
    ("proc-has-only-the-step", ("ls", "/proc"), {}, lambda out: [n for n in out.split() if n.isdigit()] == ["1"]),
    ("minimal-dev", ("ls", "/dev"), {}, "\n".join(DEV_ENTRIES) + "\n"),
    ("dev-null-writable", ("sh", "-c", "echo x > /dev/null && echo ok"), {"uid": 1000, "gid": 1000}, "ok\n"),
    ("devices-are-the-host-nodes", ("sh", "-c", "head -c 4 /dev/zero | wc -c; head -c 8 /dev/urandom | wc -c"), {},
     "4\n8\n"),
    ("stdin-is-dev-null", ("sh", "-c", "cat; stat -L -c %F,%t,%T /proc/self/fd/0"), {}, "character special file,1,3\n"),
    ("umask", ("sh", "-c", "umask"), {}, "0022\n"),
    ("env-is-exactly-the-spec", ("env",), {"env": (("B", "two words"), ("PATH", "/bin"), ("A", ""))},
     "B=two words\nPATH=/bin\nA=\n"),
    ("cwd", ("pwd",), {"cwd": "/home/www"}, "/home/www\n"),
    ("path-lookup-uses-the-spec-path", ("busybox", "echo", "found"), {"env": (("PATH", "/nowhere:/bin"),)},
     "found\n"),
    ("network-none-has-only-lo-up", ("ip", "link"), {},
     lambda out: list(interfaces(out)) == ["lo"] and ",UP," in interfaces(out)["lo"]),
    ("network-host-sees-host-interfaces", ("ip", "link"), {"network": "host"},
     lambda out: set(interfaces(out)) == set(os.listdir("/sys/class/net"))),
    ("own-ipc-mnt-uts-pid-net-namespaces",
     ("sh", "-c", "for n in ipc mnt uts pid net; do readlink /proc/self/ns/$n; done"), {},
     lambda out: all(a != host_namespace(b) for a, b in zip(out.split(), ["ipc", "mnt", "uts", "pid", "net"],
                                                               strict=True))),
    ("host-network-shares-net-namespace", ("readlink", "/proc/self/ns/net"), {"network": "host"},
     lambda out: out.strip() == host_namespace("net")),
    ("default-hosts", ("cat", "/etc/hosts"), {"hostname": "box"},
     "127.0.0.1\tlocalhost box\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    ("given-hosts-and-resolv-conf", ("cat", "/etc/hosts", "/etc/resolv.conf"),
     {"hosts": b"10.0.0.1 db\n", "resolv_conf": b"nameserver 10.0.0.2\n"}, "10.0.0.1 db\nnameserver 10.0.0.2\n"),
    ("resolv-conf-empty-without-network", ("wc", "-c", "/etc/resolv.conf"), {}, "0 /etc/resolv.conf\n"),
    ("resolv-conf-from-host-with-host-network", ("cat", "/etc/resolv.conf"), {"network": "host"},
     lambda out: out == (Path("/etc/resolv.conf").read_text() if Path("/etc/resolv.conf").exists() else "")),
    ("hosts-file-read-only", ("sh", "-c", "echo x >> /etc/hosts || echo refused"), {},
     lambda out: "Read-only file system" in out and out.endswith("refused\n")),
    ("interleaved-output-keeps-order", ("sh", "-c", "echo 1; echo 2 >&2; echo 3; echo 4 >&2; echo 5"), {},
     "1\n2\n3\n4\n5\n"),
    ("pipes-get-sigpipe", ("sh", "-c", "yes | head -n 2"), {}, "y\ny\n"),
    ("new-pty-instance", ("stat", "-c", "%a", "/dev/pts/ptmx"), {}, "666\n"),
    ("root-keeps-only-container-capabilities", ("grep", "CapBnd", "/proc/self/status"), {},
     "CapBnd:\t00000000a00425fb\n"),
    ("root-cannot-mount", ("sh", "-c", "mount -t tmpfs none /tmp || echo refused"), {},
     lambda out: out.endswith("refused\n")),
    ("proc-sys-read-only", ("sh", "-c", "cat /proc/sys/vm/swappiness > /proc/sys/vm/swappiness || echo refused"), {},
     lambda out: "Read-only file system" in out and out.endswith("refused\n")),
    ("proc-knobs-mounted-read-only", ("grep", "-E", " /proc/(sys|sysrq-trigger|bus|fs|irq) ", "/proc/mounts"), {},
     lambda out: len(out.splitlines()) >= 4 and all(" ro," in line for line in out.splitlines())),
]


@needs_root
@pytest.mark.parametrize(("argv", "fields", "expected"), [case[1:] for case in INSIDE_CHECKS],
                         ids=[case[0] for case in INSIDE_CHECKS])
def test_inside_the_sandbox(busybox_rootfs: Path, argv, fields, expected) -> None:
    code, output = run(busybox_rootfs, argv, **fields)
    assert code == 0, output
    if callable(expected):
        assert expected(output), output
    else:
        assert output == expected


EXIT_CODES = [
    (("true",), 0),
    (("false",), 1),
    (("sh", "-c", "exit 7"), 7),
    (("sh", "-c", "exit 255"), 255),
    (("sh", "-c", "sh -c 'kill -9 $$'; exit $?"), 137),  # a child killed: the shell reports 128 + 9
]


@needs_root
@pytest.mark.parametrize(("argv", "expected"), EXIT_CODES, ids=[" ".join(argv) for argv, _ in EXIT_CODES])
def test_exit_codes_pass_through(busybox_rootfs: Path, argv, expected: int) -> None:
    assert run(busybox_rootfs, argv)[0] == expected


@needs_root
def test_command_killed_by_a_signal_reports_128_plus_signal(busybox_rootfs: Path) -> None:
    seconds, marker = sleeper()

    def kill_when_started() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for pid in processes_with(marker):
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    code, _ = run(busybox_rootfs, ("sleep", seconds))
    killer.join()
    assert code == 128 + signal.SIGKILL


SETUP_ERRORS = [
    ("missing-absolute", {"argv": ("/bin/nope",)}, "cannot run /bin/nope: no such file in the image"),
    ("missing-in-path", {"argv": ("nope",)}, "cannot run nope: not found in the image's PATH (/usr/sbin:/usr/bin"),
    ("not-executable", {"argv": ("/etc/passwd",)}, "cannot run /etc/passwd: permission denied"),
    ("missing-cwd", {"argv": ("true",), "cwd": "/missing"}, "working directory /missing does not exist in the image"),
    ("cwd-not-a-directory", {"argv": ("true",), "cwd": "/etc/passwd"}, "/etc/passwd is not a directory"),
    ("cwd-not-accessible", {"argv": ("true",), "cwd": "/root", "uid": 1000, "gid": 1000},
     "working directory /root is not accessible to uid 1000"),
    ("empty-command", {"argv": ()}, "nothing to run"),
    ("bad-network", {"argv": ("true",), "network": "bridge"}, "unsupported sandbox network mode 'bridge'"),
    ("mount-under-a-file", {"argv": ("true",), "mounts": (TmpfsMount("/etc/passwd/x"),)},
     "cannot mount at /etc/passwd/x: /etc/passwd is not a directory in the image"),
    ("bind-source-missing", {"argv": ("true",), "mounts": (BindMount(Path("/nonexistent/src"), "/src"),)},
     "cannot mount /nonexistent/src at /src: it does not exist"),
]


@needs_root
@pytest.mark.parametrize(("fields", "message"), [case[1:] for case in SETUP_ERRORS],
                         ids=[case[0] for case in SETUP_ERRORS])
def test_setup_errors_are_sandbox_errors(busybox_rootfs: Path, fields, message: str) -> None:
    before = snapshot(busybox_rootfs)
    argv = fields.pop("argv")
    with pytest.raises(SandboxError) as caught:
        run(busybox_rootfs, argv, **fields)
    assert message in caught.value.message
    assert "\n" not in caught.value.message
    assert snapshot(busybox_rootfs) == before


@needs_root
def test_script_with_a_missing_interpreter(busybox_rootfs: Path) -> None:
    script = busybox_rootfs / "bin" / "script"
    script.write_text("#!/usr/bin/python3\nprint('hi')\n")
    script.chmod(0o755)
    with pytest.raises(SandboxError, match="cannot run /bin/script: its interpreter or dynamic loader is missing"):
        run(busybox_rootfs, ("script",))


@needs_root
def test_scripts_run_from_a_read_only_dir_of_the_sandboxs_dev(busybox_rootfs: Path) -> None:
    """A RUN heredoc with #! runs as a file, as BuildKit's; /dev is the sandbox's, so no trace reaches the root."""
    before = snapshot(busybox_rootfs)
    scripts = (("first", b"#!/bin/sh\necho \"first $0 $1\"\n"), ("second", b"#!/bin/sh\nls -l /dev/pipes\n"))
    code, output = run(busybox_rootfs, ("/dev/pipes/first", "arg"), scripts=scripts)
    assert (code, output) == (0, "first /dev/pipes/first arg\n")
    code, output = run(busybox_rootfs, ("/dev/pipes/second",), scripts=scripts)
    assert code == 0
    assert [(line.split()[0], line.split()[-1]) for line in output.splitlines()[-2:]] == [
        ("-rwxr-xr-x", "first"), ("-rwxr-xr-x", "second")]
    code, output = run(busybox_rootfs, ("sh", "-c", "echo x > /dev/pipes/first"), scripts=scripts)
    assert code != 0 and "Read-only file system" in output
    code, output = run(busybox_rootfs, ("sh", "-c", "ls /dev/pipes"))
    assert code != 0, "without scripts there is no such directory"
    assert snapshot(busybox_rootfs) == before


@needs_root
def test_read_only_bind_mount_refuses_writes(busybox_rootfs: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("data\n")
    code, output = run(busybox_rootfs, ("sh", "-c", "cat /mnt/src/f; touch /mnt/src/new"),
                       mounts=(BindMount(source, "/mnt/src"),))
    assert code == 1
    assert output.startswith("data\n") and "Read-only file system" in output
    assert sorted(os.listdir(source)) == ["f"]


@needs_root
def test_writable_bind_mount_writes_through(busybox_rootfs: Path, tmp_path: Path) -> None:
    source = tmp_path / "cache"
    source.mkdir()
    code, _ = run(busybox_rootfs, ("sh", "-c", "echo hi > /var/cache/app/new"),
                  mounts=(BindMount(source, "/var/cache/app", readonly=False),))
    assert code == 0
    assert (source / "new").read_text() == "hi\n"
    assert not (busybox_rootfs / "var").exists()


@needs_root
def test_tmpfs_mount(busybox_rootfs: Path) -> None:
    script = "echo hi > /cache/deep/a && cat /cache/deep/a && stat -c %a /cache/deep && grep /cache/deep /proc/mounts"
    code, output = run(busybox_rootfs, ("sh", "-c", script), mounts=(TmpfsMount("/cache/deep", size=1 << 20),))
    assert code == 0, output
    lines = output.splitlines()
    assert lines[:2] == ["hi", "1777"]
    assert lines[2].startswith("tmpfs /cache/deep tmpfs rw,nosuid,nodev") and "size=1024k" in lines[2]
    assert not (busybox_rootfs / "cache").exists()


@needs_root
def test_secret_is_shown_with_its_mode_and_owner_and_never_lands_in_the_rootfs(busybox_rootfs: Path,
                                                                              tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret")
    secret.chmod(0o400)
    script = "stat -c '%a %u %g' /run/secrets/token; cat /run/secrets/token; echo; echo x > /run/secrets/token"
    code, output = run(busybox_rootfs, ("sh", "-c", script), uid=1000, gid=1000,
                       mounts=(SecretMount(secret, "/run/secrets/token", mode=0o440, uid=1000, gid=50),))
    assert code != 0
    assert output.startswith("440 1000 50\ns3cret\n") and "Read-only file system" in output
    assert not (busybox_rootfs / "run").exists()
    assert secret.read_bytes() == b"s3cret" and stat.S_IMODE(secret.stat().st_mode) == 0o400


@needs_root
def test_run_leaves_the_rootfs_exactly_as_it_was(busybox_rootfs: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    (busybox_rootfs / "data").mkdir()
    before = snapshot(busybox_rootfs)
    mounts = (TmpfsMount("/a/b/c"), BindMount(tmp_path, "/data/ctx"), SecretMount(secret, "/run/secrets/s"),
              BindMount(secret, "/opt/file"))
    assert run(busybox_rootfs, ("true",), mounts=mounts)[0] == 0
    assert snapshot(busybox_rootfs) == before


@needs_root
def test_symlinked_mount_targets_stay_inside_the_rootfs(busybox_rootfs: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shown = tmp_path / "shown"
    shown.write_text("bound\n")
    (busybox_rootfs / "etc" / "resolv.conf").symlink_to("/run/resolved/resolv.conf")
    (busybox_rootfs / "escape").symlink_to("../../../../../../../.." + str(outside))
    code, output = run(busybox_rootfs, ("cat", "/etc/resolv.conf", "/escape/f"), resolv_conf=b"nameserver 9.9.9.9\n",
                       mounts=(BindMount(shown, "/escape/f"),))
    assert (code, output) == (0, "nameserver 9.9.9.9\nbound\n")
    assert not outside.exists()
    assert not (busybox_rootfs / "run").exists() and not (busybox_rootfs / str(outside).lstrip("/")).exists()
    assert os.readlink(busybox_rootfs / "etc" / "resolv.conf") == "/run/resolved/resolv.conf"


@needs_root
def test_background_processes_die_with_the_step(busybox_rootfs: Path) -> None:
    seconds, marker = sleeper()
    code, output = run(busybox_rootfs, ("sh", "-c", f"sleep {seconds} & echo started"))
    assert (code, output) == (0, "started\n")
    assert processes_with(marker) == []


@needs_root
def test_interrupted_run_kills_the_step(busybox_rootfs: Path) -> None:
    (background, background_marker), (foreground, foreground_marker) = sleeper(), sleeper()

    def interrupt(data: bytes) -> None:
        if b"ready" in data:
            raise KeyboardInterrupt

    before = snapshot(busybox_rootfs)
    spec = SandboxSpec(rootfs=busybox_rootfs, argv=("sh", "-c", f"sleep {background} & echo ready; sleep {foreground}"),
                       env=PATH_ENV)
    with pytest.raises(KeyboardInterrupt):
        sandbox.run(spec, interrupt)
    assert wait_until_gone(background_marker) == [] and wait_until_gone(foreground_marker) == []
    assert snapshot(busybox_rootfs) == before


DRIVER = """
import json, sys
from pathlib import Path
from builder.sandbox import parent as sandbox
spec = sandbox.SandboxSpec(rootfs=Path(sys.argv[1]), argv=tuple(json.loads(sys.argv[2])), env=(("PATH", "/bin"),))
sandbox.run(spec, lambda data: (sys.stdout.buffer.write(data), sys.stdout.flush()))
"""


@needs_root
def test_killing_the_builder_takes_the_sandbox_down(busybox_rootfs: Path) -> None:
    (background, background_marker), (foreground, foreground_marker) = sleeper(), sleeper()
    argv = json.dumps(["sh", "-c", f"sleep {background} & echo ready; sleep {foreground}"])
    builder = subprocess.Popen([sys.executable, "-c", DRIVER, str(busybox_rootfs), argv], stdout=subprocess.PIPE)
    try:
        assert builder.stdout is not None
        assert builder.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 5
        # "ready" may come before either sleep has been exec'd.
        while not (processes_with(background_marker) and processes_with(foreground_marker)):
            assert time.monotonic() < deadline, "the step's sleeps never started"
            time.sleep(0.01)
    finally:
        builder.kill()
        builder.wait()
    assert wait_until_gone(background_marker) == [] and wait_until_gone(foreground_marker) == []


@needs_root
def test_concurrent_runs_stay_apart(tmp_path: Path) -> None:
    results: dict[int, tuple[int, str]] = {}

    def one(index: int) -> None:
        rootfs = make_busybox_rootfs(tmp_path / f"rootfs{index}")
        results[index] = run(rootfs, ("sh", "-c", "hostname; echo $N; echo $$"),
                             hostname=f"host{index}", env=(("PATH", "/bin"), ("N", str(index))))

    threads = [threading.Thread(target=one, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {index: (0, f"host{index}\n{index}\n1\n") for index in range(4)}


# (id, path inside, links to create {path: target}, expected path relative to the rootfs)
RESOLVE_CASES = [
    ("plain", "/etc/hosts", {}, "etc/hosts"),
    ("dots", "/./etc/../etc//hosts", {}, "etc/hosts"),
    ("dotdot-above-root", "/../../etc/hosts", {}, "etc/hosts"),
    ("absolute-link", "/etc/resolv.conf", {"etc/resolv.conf": "/run/stub.conf"}, "run/stub.conf"),
    ("relative-link-escaping", "/x/file", {"x": "../../../../tmp"}, "tmp/file"),
    ("link-in-the-middle", "/var/run/app", {"var/run": "/run"}, "run/app"),
    ("link-chain", "/a", {"a": "b", "b": "/c/d"}, "c/d"),
    ("missing-rest-is-literal", "/new/../other/x", {}, "other/x"),
]


@pytest.mark.parametrize(("path", "links", "expected"), [case[1:] for case in RESOLVE_CASES],
                         ids=[case[0] for case in RESOLVE_CASES])
def test_mount_targets_resolve_inside_the_rootfs(tmp_path: Path, path: str, links: dict[str, str],
                                                  expected: str) -> None:
    for directory in ("etc", "var", "tmp"):
        (tmp_path / directory).mkdir()
    for link, target in links.items():
        (tmp_path / link).symlink_to(target)
    assert sandbox.resolve_inside(tmp_path, path) == tmp_path / expected


def test_symlink_loops_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(SandboxError, match="too many levels of symbolic links"):
        sandbox.resolve_inside(tmp_path, "/a/x")


@needs_root
def test_one_server_forks_every_run_each_in_its_own_namespaces(busybox_rootfs: Path) -> None:
    server = sandbox.SandboxServer()
    try:
        outputs = []
        for _ in range(3):
            chunks: list[bytes] = []
            spec = SandboxSpec(rootfs=busybox_rootfs, argv=("sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'"),
                               env=PATH_ENV)
            assert sandbox.run(spec, chunks.append, server=server) == 0
            outputs.append(b"".join(chunks))
        # PID 1 of a namespace of its own each time, which holds only it and its ls and grep
        assert outputs == [b"1\n3\n"] * 3
        assert server.process.poll() is None  # the same server served all three
    finally:
        server.close()
    assert server.process.wait(timeout=5) == 0


@needs_root
def test_exit_codes_and_signals_come_back_through_the_server(busybox_rootfs: Path) -> None:
    server = sandbox.SandboxServer()
    try:
        for argv, code in ((("true",), 0), (("sh", "-c", "exit 3"), 3), (("sh", "-c", "exit 200"), 200)):
            spec = SandboxSpec(rootfs=busybox_rootfs, argv=argv, env=PATH_ENV)
            assert sandbox.run(spec, lambda data: None, server=server) == code, argv
    finally:
        server.close()


@needs_root
def test_no_descriptor_of_the_server_or_the_builder_reaches_the_command(busybox_rootfs: Path) -> None:
    chunks: list[bytes] = []
    spec = SandboxSpec(rootfs=busybox_rootfs, argv=("ls", "/proc/self/fd"), env=PATH_ENV)
    assert sandbox.run(spec, chunks.append) == 0
    assert b"".join(chunks).split() == [b"0", b"1", b"2", b"3"]  # 3: ls's own listing of the directory


@needs_root
def test_runs_from_several_threads_share_one_server(busybox_rootfs: Path) -> None:
    server = sandbox.SandboxServer()
    results: dict[int, tuple[int, bytes]] = {}

    def one(number: int) -> None:
        chunks: list[bytes] = []
        spec = SandboxSpec(rootfs=busybox_rootfs, argv=("sh", "-c", f"sleep 0.2; echo {number}"), env=PATH_ENV)
        results[number] = (sandbox.run(spec, chunks.append, server=server), b"".join(chunks))

    try:
        threads = [threading.Thread(target=one, args=(number,)) for number in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert time.monotonic() - started < 0.2 * 4  # they ran at once, not one after another
    finally:
        server.close()
    assert results == {number: (0, f"{number}\n".encode()) for number in range(4)}


@needs_root
def test_a_step_stopped_half_way_leaves_no_process(busybox_rootfs: Path, tmp_path: Path) -> None:
    """An error in the builder while a command runs (here: in its output handler) kills the command."""
    server = sandbox.SandboxServer()
    marker = "sandbox-stop-test-" + str(os.getpid())

    def fail(data: bytes) -> None:
        raise RuntimeError("the builder stops")

    try:
        spec = SandboxSpec(rootfs=busybox_rootfs, argv=("sh", "-c", f"echo go; exec sleep 30 {marker}"),
                           env=PATH_ENV)
        with pytest.raises(RuntimeError, match="the builder stops"):
            sandbox.run(spec, fail, server=server)
        deadline = time.monotonic() + 5
        while [line for line in process_command_lines() if marker in line]:
            assert time.monotonic() < deadline, "the command outlived its step"
            time.sleep(0.05)
        spec = SandboxSpec(rootfs=busybox_rootfs, argv=("echo", "after"), env=PATH_ENV)
        chunks: list[bytes] = []
        assert sandbox.run(spec, chunks.append, server=server) == 0 and b"".join(chunks) == b"after\n"
    finally:
        server.close()


@needs_root
def test_a_killed_server_is_an_error_and_the_build_starts_another(busybox_rootfs: Path) -> None:
    sandboxes = sandbox.Sandboxes(sandbox.SandboxServer())
    try:
        first = sandboxes.server()
        first.process.kill()
        first.process.wait()
        spec = SandboxSpec(rootfs=busybox_rootfs, argv=("echo", "fresh"), env=PATH_ENV)
        with pytest.raises(SandboxError, match="the sandbox server has ended"):
            sandbox.run(spec, lambda data: None, server=first)
        second = sandboxes.server()
        assert second is not first
        chunks: list[bytes] = []
        assert sandbox.run(spec, chunks.append, server=second) == 0
        assert b"".join(chunks) == b"fresh\n"
    finally:
        sandboxes.close()


def test_a_closed_server_ends() -> None:
    server = sandbox.SandboxServer()
    pid = server.process.pid
    server.close()
    assert server.process.wait(timeout=5) == 0
    assert not Path(f"/proc/{pid}").exists()


def test_the_server_ends_with_the_builder() -> None:
    """It dies with the process that started it, even one killed without a chance to close it."""
    script = ("import sys, time; from builder.sandbox.parent import SandboxServer; "
              "server = SandboxServer(); print(server.process.pid, flush=True); time.sleep(30)")
    builder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(builder.stdout.readline())
        assert Path(f"/proc/{server_pid}").exists()
    finally:
        builder.kill()
        builder.wait()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{server_pid}").exists() and b"Z" not in Path(f"/proc/{server_pid}/stat").read_bytes().split()[2]:
        assert time.monotonic() < deadline, "the sandbox server outlived its builder"
        time.sleep(0.05)


@needs_root
def test_a_failed_plan_leaves_the_server_serving(busybox_rootfs: Path) -> None:
    server = sandbox.SandboxServer()
    try:
        spec = SandboxSpec(rootfs=busybox_rootfs, argv=("no-such-command",), env=PATH_ENV)
        with pytest.raises(SandboxError, match="no-such-command"):
            sandbox.run(spec, lambda data: None, server=server)
        chunks: list[bytes] = []
        spec = SandboxSpec(rootfs=busybox_rootfs, argv=("echo", "still"), env=PATH_ENV)
        assert sandbox.run(spec, chunks.append, server=server) == 0 and b"".join(chunks) == b"still\n"
    finally:
        server.close()


@needs_root
def test_what_a_step_used_counts_as_the_builders_own(busybox_rootfs: Path) -> None:
    """The server reaps its waiters and the builder reaps the server: `time` and benchmarks see the steps' CPU."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = sandbox.SandboxServer()
    spec = SandboxSpec(rootfs=busybox_rootfs, argv=("sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"),
                       env=PATH_ENV)
    try:
        assert sandbox.run(spec, lambda data: None, server=server) == 0
    finally:
        server.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) > 0.1
