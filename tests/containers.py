"""Run the installed pybuild inside unprivileged containers (podman, docker) as a CI job would, offline.

A container's root filesystem is the host's own Debian userland: a directory of the top-level links a merged-/usr
system has, with the host's /usr bind-mounted read-only at run time. pybuild goes in from a wheel of the checkout,
into a venv whose dependencies come from the host venv (a read-only mount named by a .pth file), so nothing is
downloaded. Each container start runs one shell script of many pybuild commands; each command's exit code, output
and build metadata land in a mounted directory the host reads back (``Outcome``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
import zstandard
from conftest import skip_if_chrooted
from e2e import EXAMPLES, PODMAN_RUN, PYBUILD, REPO, Podman, require_root, require_tools, run

DOCKER = "/usr/bin/docker"  # Debian's CLI, matching its dockerd; a newer docker on PATH may not talk to it
DOCKERD = Path("/usr/sbin/dockerd")
EPOCH = "1700000000"  # SOURCE_DATE_EPOCH for every build, in containers and on the host
HOST_SITE_PACKAGES = Path(zstandard.__file__).resolve().parent.parent
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"  # the same interpreter as the host venv's

# where things are inside a container; Step arguments name them as {examples}, {contexts}, {out}
GUEST = {"examples": "/examples", "contexts": "/contexts", "out": "/out"}
GUEST_STORE = "/var/lib/pybuild"  # pybuild's default store as root: no PYBUILD_ROOT in the container
GUEST_PYBUILD = "/opt/pybuild/bin/pybuild"

# Sets pybuild up; a failure here is the harness's: it stops the script, whose output says why, before any step.
PRELUDE = f"""\
set -eu
{PYTHON} -m venv /opt/pybuild
/opt/pybuild/bin/pip install -q --no-index --no-deps /wheels/pybuild-*.whl
echo /deps > "$(/opt/pybuild/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/host-deps.pth"
# the wheel's packages, not the host venv's copy of pybuild, which /deps holds too
/opt/pybuild/bin/python -c 'import builder, sys; sys.exit(not builder.__file__.startswith("/opt/pybuild/"))'
export SOURCE_DATE_EPOCH={EPOCH}
set +e
step() {{ name=$1; shift; {GUEST_PYBUILD} "$@" > "/out/$name.out" 2> "/out/$name.err"; echo $? > "/out/$name.rc"; }}
"""


def require_host_python() -> None:
    """The container runs the host's /usr python with the host venv's compiled packages: they must match."""
    if not Path(sys.base_prefix).resolve().is_relative_to("/usr"):
        pytest.skip(f"the tests' venv is made from {sys.base_prefix}, not the system python under /usr that "
                    "containers get: make it with /usr/bin/python3 -m venv")
    if shutil.which(PYTHON, path="/usr/bin") is None:
        pytest.skip(f"/usr/bin/{PYTHON} is missing")


def short_tempdir(prefix: str) -> Path:
    """A directory under /tmp: podman's run root and dockerd's socket need short paths."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _mounts_under(path: Path) -> list[str]:
    mounted = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((point for point in mounted if Path(point).is_relative_to(path)), reverse=True)


def remove_tree(path: Path) -> None:
    """Remove ``path``, unless something is still mounted under it (then removing would reach into the mount)."""
    if not _mounts_under(path):
        shutil.rmtree(path, ignore_errors=True)


# A python that can build a wheel offline: the tests' venv, if it has `wheel` (or a setuptools with bdist_wheel
# built in), else Debian's, whose python3-pip brings python3-setuptools and python3-wheel.
_CAN_BUILD_WHEELS = ("import importlib.util as u, sys; sys.exit(not u.find_spec('pip') or not (u.find_spec('wheel') "
                     "or u.find_spec('setuptools.command.bdist_wheel')))")


def build_wheel(dest: Path) -> Path:
    """The checkout as a wheel, built without the network, from a copy (a stale build/ in the checkout could
    bring deleted modules back)."""
    require_host_python()
    builder = next((python for python in (sys.executable, "/usr/bin/python3")
                    if run([python, "-c", _CAN_BUILD_WHEELS], check=False).returncode == 0), None)
    if builder is None:
        pytest.skip("no python here builds a wheel offline: the tests' venv lacks `wheel` and /usr/bin/python3 "
                    "lacks pip, setuptools or wheel (apt-get install python3-pip)")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    source = dest / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy(REPO / name, source / name)
    for package in {name.split(".")[0] for name in project["tool"]["setuptools"]["packages"]}:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = dest / "wheels"
    run([builder, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels,
         source], timeout=300)
    found = list(wheels.glob("pybuild-*.whl"))
    assert len(found) == 1, found
    return found[0]


def make_rootfs(root: Path) -> Path:
    """A root filesystem that is the host's Debian userland once the host's /usr is mounted on its empty usr/."""
    for name in ("usr", "etc", "root", "var/tmp", "proc", "dev", "sys", "run", "tmp"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    for name in ("bin", "lib", "lib64", "sbin"):
        (root / name).symlink_to(f"usr/{name}")
    for name in ("passwd", "group"):
        shutil.copy(Path("/etc") / name, root / "etc" / name)
    return root


@dataclass(frozen=True)
class Step:
    """One pybuild command of a scenario; its outcome is kept as ``name``."""

    name: str
    argv: tuple[str, ...]  # pybuild's arguments; {examples}, {contexts} and {out} say where those are

    def filled(self, places: Mapping[str, str]) -> list[str]:
        return [arg.format(**places) for arg in self.argv]

    def with_options(self, *options: str) -> Step:
        """The same command with ``options`` right after its subcommand (``build``)."""
        return Step(self.name, (self.argv[0], *options, *self.argv[1:]))


def build(name: str, *args: str) -> Step:
    """`pybuild build` with plain progress and its metadata (digests) written to {out}/NAME.json."""
    return Step(name, ("build", "--progress", "plain", "--metadata-file", f"{{out}}/{name}.json", *args))


@dataclass(frozen=True)
class Outcome:
    """What one pybuild command did."""

    returncode: int
    stdout: str
    stderr: str
    metadata: dict = field(default_factory=dict)

    @property
    def digest(self) -> str | None:
        """The image's manifest digest, from --metadata-file."""
        return self.metadata.get("containerimage.digest")

    @property
    def isolation(self) -> str:
        """The line naming the isolation the build picked and why: "isolation: chroot (...)"; "" when absent."""
        found = re.search(r"^isolation: .*$", self.stderr, re.MULTILINE)
        return found.group(0) if found else ""

    @property
    def isolation_kind(self) -> str:
        """The kind the isolation line names ("namespaces", "chroot", "none"), if it gives a reason too."""
        found = re.fullmatch(r"isolation: (\w+)\W+\w.*", self.isolation)
        return found.group(1) if found else ""

    @property
    def messages(self) -> list[str]:
        """stderr without progress lines ("#3 ...") and the isolation line: the errors and hints pybuild printed."""
        return [line for line in self.stderr.splitlines() if not line.startswith(("#", "isolation: "))]

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def read_outcomes(steps: Sequence[Step], out: Path) -> dict[str, Outcome]:
    outcomes = {}
    for step in steps:
        rc = out / f"{step.name}.rc"
        assert rc.is_file(), f"{step.name} did not run"
        metadata = out / f"{step.name}.json"
        outcomes[step.name] = Outcome(int(rc.read_text()), (out / f"{step.name}.out").read_text(errors="replace"),
                                      (out / f"{step.name}.err").read_text(errors="replace"),
                                      json.loads(metadata.read_text()) if metadata.is_file() else {})
    return outcomes


def run_on_host(steps: Sequence[Step], contexts: Path, workdir: Path) -> dict[str, Outcome]:
    """The same steps with the installed pybuild on the host, in a private store: what the containers must match."""
    out, store = workdir / "out", workdir / "store"
    out.mkdir(parents=True)
    environment = {**os.environ, "PYBUILD_ROOT": str(store), "SOURCE_DATE_EPOCH": EPOCH}
    places = {"examples": str(EXAMPLES), "contexts": str(contexts), "out": str(out)}
    for step in steps:
        done = run([*PYBUILD, *step.filled(places)], env=environment, check=False, cwd=REPO)
        for suffix, text in (("rc", str(done.returncode)), ("out", done.stdout), ("err", done.stderr)):
            (out / f"{step.name}.{suffix}").write_text(text)
    return read_outcomes(steps, out)


class Engine(Protocol):
    """A container engine that runs one shell script in a fresh container of the host-userland root."""

    name: str

    def run_script(self, script: str, mounts: Sequence[tuple[Path, str, bool]], workdir: Path,
                   timeout: float) -> subprocess.CompletedProcess: ...


def _volume_flags(mounts: Sequence[tuple[Path, str, bool]]) -> list[str]:
    return [flag for host, guest, writable in mounts for flag in ("-v", f"{host}:{guest}:{'rw' if writable else 'ro'}")]


def _with_network(run_args: Sequence[str], network: str) -> list[str]:
    """``run_args`` with the value of their --network replaced (the engines take one network mode only)."""
    args = list(run_args)
    args[args.index("--network") + 1] = network
    return args


@dataclass(frozen=True)
class PodmanEngine:
    """Rootful podman with its default capabilities and seccomp profile, plus ``options`` (as --cap-drop=ALL).
    ``network``: none, or host to reach a registry on the host's loopback."""

    podman: Podman
    options: tuple[str, ...] = ()
    name: str = "podman"
    network: str = "none"

    def run_script(self, script: str, mounts: Sequence[tuple[Path, str, bool]], workdir: Path,
                   timeout: float) -> subprocess.CompletedProcess:
        rootfs = make_rootfs(workdir / "rootfs")  # podman writes into --rootfs: one per container
        return run(self.podman.command(*_with_network(PODMAN_RUN, self.network), *self.options,
                                       *_volume_flags(mounts), "--rootfs", rootfs, "sh", "-c", script),
                   check=False, timeout=timeout)


@dataclass(frozen=True)
class Docker:
    """The docker CLI talking to a private dockerd."""

    socket: Path

    def command(self, *args: str | os.PathLike) -> list[str | os.PathLike]:
        return [DOCKER, "-H", f"unix://{self.socket}", *args]

    def import_rootfs(self, root: Path, tag: str) -> str:
        archive = root.with_suffix(".tar")
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        run(self.command("import", archive, tag))
        return tag


@dataclass(frozen=True)
class DockerEngine:
    """`docker run` with Docker's defaults: its seccomp profile, its capabilities, no --privileged. ``network``: none,
    or host to reach a registry on the host's loopback."""

    docker: Docker
    image: str
    options: tuple[str, ...] = ()
    name: str = "docker"
    network: str = "none"

    def run_script(self, script: str, mounts: Sequence[tuple[Path, str, bool]], workdir: Path,
                   timeout: float) -> subprocess.CompletedProcess:
        return run(self.docker.command("run", "--rm", "--network", self.network, *self.options,
                                       *_volume_flags(mounts), self.image, "sh", "-c", script),
                   check=False, timeout=timeout)


@contextlib.contextmanager
def podman_engine(*options: str, network: str = "none") -> Iterator[PodmanEngine]:
    """podman with a private store under a short /tmp path, removed afterwards."""
    require_root()
    require_tools("podman", "runc")
    skip_if_chrooted("podman")
    top = short_tempdir("pbci-pm")
    try:
        yield PodmanEngine(Podman(top), options, network=network)
    finally:
        remove_tree(top)


@contextlib.contextmanager
def docker_daemon() -> Iterator[Docker]:
    """A private dockerd: its own data root and socket, no bridge, no iptables rules; stopped afterwards."""
    require_root()
    if not DOCKERD.exists() or not Path(DOCKER).exists():
        pytest.skip(f"{DOCKERD} or {DOCKER} is missing: install Debian's docker.io for the docker tests")
    top = short_tempdir("pbci-dk")
    docker = Docker(top / "sock")
    log = top / "dockerd.log"
    daemon = None
    try:
        for driver in ("overlay2", "vfs"):
            with log.open("a") as output:
                daemon = subprocess.Popen(
                    [DOCKERD, "--data-root", top / f"data-{driver}", "--exec-root", top / "exec", "--pidfile",
                     top / "dockerd.pid", "-H", f"unix://{docker.socket}", "--bridge=none", "--iptables=false",
                     "--ip-forward=false", "--ip-masq=false", "--storage-driver", driver],
                    stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if _answers(docker, daemon):
                break
            _stop(daemon)
            daemon = None
        if daemon is None:
            raise AssertionError(f"dockerd did not start with overlay2 or vfs:\n{log.read_text()[-4000:]}")
        yield docker
    finally:
        if daemon is not None:
            _stop(daemon)
        # dockerd leaves its network namespace file bound under its exec root; what it left is ours to undo.
        for point in _mounts_under(top):
            subprocess.run(["umount", "-l", point], check=False)
        remove_tree(top)


def _answers(docker: Docker, daemon: subprocess.Popen, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and daemon.poll() is None:
        if run(docker.command("version"), check=False, timeout=10).returncode == 0:
            return True
        time.sleep(0.3)
    return False


def _stop(daemon: subprocess.Popen) -> None:
    daemon.terminate()
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait(timeout=30)


def run_in_container(engine: Engine, steps: Sequence[Step], wheel: Path, contexts: Path, workdir: Path,
                     timeout: float = 900) -> dict[str, Outcome]:
    """Start one container, set pybuild up in it, run every step; each step's outcome, read back on the host."""
    out, store = workdir / "out", workdir / "store"
    out.mkdir(parents=True)
    store.mkdir()
    mounts = [(Path("/usr"), "/usr", False), (wheel.parent, "/wheels", False), (HOST_SITE_PACKAGES, "/deps", False),
              (EXAMPLES, GUEST["examples"], False), (contexts, GUEST["contexts"], False), (out, GUEST["out"], True),
              (store, GUEST_STORE, True)]
    script = PRELUDE + "".join(f"step {shlex.join([step.name, *step.filled(GUEST)])}\n" for step in steps)
    done = engine.run_script(script, mounts, workdir, timeout)
    assert done.returncode == 0, f"{engine.name}: setting pybuild up failed ({done.returncode})\n{done.stderr}"
    return read_outcomes(steps, out)
