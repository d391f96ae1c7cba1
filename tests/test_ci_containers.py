"""pybuild builds inside unprivileged CI containers, picking the strongest isolation each allows, and its images are
byte-identical to the host's.

podman's defaults leave a user namespace (namespaces), Docker's seccomp profile refuses unshare (chroot), and
--cap-drop=ALL leaves neither (none: only builds without RUN). Each container is started once, for a script of
many builds (tests/containers.py); the tests then read each build's outcome.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from containers import (
    Docker,
    DockerEngine,
    Outcome,
    Step,
    build,
    docker_daemon,
    make_rootfs,
    podman_engine,
    run_in_container,
    run_on_host,
)
from e2e import EXAMPLES, REPO, archive_bytes
from test_e2e_examples import EXAMPLES_BUILT

pytestmark = pytest.mark.slow

SECRET = "ci-token-7f3a91-never-in-a-layer"
CACHE_NOTE = "written by the first build"
FAILING_COMMAND = "echo before-the-failure && exit 42"

CONTEXTS = {
    "scratch/Dockerfile": "FROM scratch\nCOPY hello.txt /hello.txt\nCOPY --chmod=0755 tool.sh /usr/local/bin/tool\n"
                          "ENV GREETING=hello\n",
    "scratch/hello.txt": "hello from the build context\n",
    "scratch/tool.sh": "#!/bin/sh\necho tool\n",
    "failing-run/Dockerfile": f"FROM busybox-base\nRUN echo preparing\nRUN {FAILING_COMMAND}\n",
    "run-ok/Dockerfile": "FROM busybox-base\nRUN echo ok > /ok\n",
    "tok": SECRET,  # the secret's file, outside the context that uses it
    # /dev/null too: chroot isolation makes the devices itself
    "secret/Dockerfile": "FROM busybox-base\nRUN --mount=type=secret,id=tok cat /run/secrets/tok > /dev/null && "
                         "sha256sum /run/secrets/tok | cut -d' ' -f1 > /tok.sha256\n",
    "cache/write.Dockerfile": f"FROM busybox-base\nRUN --mount=type=cache,target=/cache echo '{CACHE_NOTE}' "
                              "> /cache/note\n",
    "cache/read.Dockerfile": "FROM busybox-base\nRUN --mount=type=cache,target=/cache cat /cache/note > /seen\n",
    "network-none/Dockerfile": "FROM busybox-base\nRUN --network=none echo offline > /offline\n",
}

BASE = build("busybox-base", "-t", "busybox-base", "--build-context", "busybox=/bin", "{examples}/base")
# the base first, then every example as tests/test_e2e_examples.py tags it (onbuild-tools before its child)
EXAMPLE_STEPS = [BASE, *(build(tag, "-t", tag, f"{{examples}}/{example}") for example, tag in EXAMPLES_BUILT.items())]
EXAMPLE_NAMES = [step.name for step in EXAMPLE_STEPS]
SCRATCH = build("scratch", "-t", "scratch-copy", "{contexts}/scratch")

# what every container that can run RUN steps does, after the examples
COMMON_STEPS = [
    Step("version", ("--version",)),
    *EXAMPLE_STEPS,
    SCRATCH,
    build("failing-run", "-t", "failing-run", "{contexts}/failing-run"),
    build("secret", "-t", "secret-user", "--secret", "id=tok,src={contexts}/tok",
          "-o", "type=oci,dest={out}/secret.tar", "{contexts}/secret"),
    build("cache-write", "-f", "{contexts}/cache/write.Dockerfile", "{contexts}/cache"),
    build("cache-read", "-f", "{contexts}/cache/read.Dockerfile", "-o", "type=local,dest={out}/cache-read",
          "{contexts}/cache"),
]
# chroot cannot give a RUN a network of its own, and namespaces are not to be had in docker run
DOCKER_STEPS = [
    build("explicit-namespaces", "--isolation=namespaces", "{contexts}/run-ok"),
    build("run-network-none", "{contexts}/network-none"),
    build("option-network-none", "--network", "none", "{contexts}/run-ok"),
]
NO_CAPS_STEPS = [SCRATCH, BASE]
ISOLATION = {"podman": "namespaces", "docker": "chroot"}


@dataclass(frozen=True)
class Ran:
    """One container start: its engine and every step's outcome; ``workdir`` holds its out/ and store/ mounts."""

    engine: str
    outcomes: Mapping[str, Outcome]
    workdir: Path

    @property
    def out(self) -> Path:
        return self.workdir / "out"

    def __getitem__(self, name: str) -> Outcome:
        return self.outcomes[name]


@pytest.fixture(scope="session")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("contexts")
    for name, text in CONTEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def host(contexts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """The examples and the scratch build on the host, with namespaces: the digests every container must match."""
    return run_on_host([*EXAMPLE_STEPS, SCRATCH], contexts, tmp_path_factory.mktemp("host"))


@pytest.fixture(scope="session")
def host_chroot(contexts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    steps = [step.with_options("--isolation=chroot") for step in EXAMPLE_STEPS]
    return run_on_host(steps, contexts, tmp_path_factory.mktemp("host-chroot"))


def in_podman(options: Sequence[str], steps: Sequence[Step], wheel: Path, contexts: Path, workdir: Path) -> Ran:
    with podman_engine(*options) as engine:
        return Ran("podman", run_in_container(engine, steps, wheel, contexts, workdir), workdir)


@pytest.fixture(scope="module")
def podman_default(wheel: Path, contexts: Path, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    return in_podman((), COMMON_STEPS, wheel, contexts, tmp_path_factory.mktemp("podman-default"))


@pytest.fixture(scope="module")
def podman_no_caps(wheel: Path, contexts: Path, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    return in_podman(("--cap-drop=ALL",), NO_CAPS_STEPS, wheel, contexts, tmp_path_factory.mktemp("podman-no-caps"))


@pytest.fixture(scope="module")
def docker_default(wheel: Path, contexts: Path, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    workdir = tmp_path_factory.mktemp("docker-default")
    with docker_daemon() as daemon:
        engine = DockerEngine(daemon, import_host_userland(daemon, workdir))
        outcomes = run_in_container(engine, [*COMMON_STEPS, *DOCKER_STEPS], wheel, contexts, workdir)
    return Ran("docker", outcomes, workdir)


def import_host_userland(docker: Docker, workdir: Path) -> str:
    return docker.import_rootfs(make_rootfs(workdir / "rootfs"), "pybuild-ci-userland:latest")


@pytest.fixture(params=sorted(ISOLATION))
def inside(request: pytest.FixtureRequest) -> Ran:
    """The default container of each engine: podman's and Docker's default capabilities and seccomp profile."""
    return request.getfixturevalue(f"{request.param}_default")


def succeeded(outcome: Outcome) -> Outcome:
    assert outcome.returncode == 0, str(outcome)
    assert "Traceback (most recent call last)" not in outcome.stderr, outcome.stderr
    return outcome


def failed_clearly(outcome: Outcome) -> Outcome:
    """A non-zero exit with a message, not a Python traceback."""
    assert outcome.returncode != 0, str(outcome)
    assert "Traceback (most recent call last)" not in outcome.stderr, outcome.stderr
    return outcome


def test_pybuild_starts_inside_with_its_default_store(inside: Ran) -> None:
    """The checkout's own pybuild runs, and keeps its images where root's go: /var/lib/pybuild (mounted from here)."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version in succeeded(inside["version"]).stdout
    assert (inside.workdir / "store" / "index.json").is_file()


def test_isolation_line_names_the_kind_the_container_allows(inside: Ran) -> None:
    outcome = succeeded(inside["busybox-base"])
    assert outcome.isolation_kind == ISOLATION[inside.engine], outcome.stderr


@pytest.mark.parametrize("name", [*EXAMPLE_NAMES, SCRATCH.name])
def test_image_is_the_hosts(inside: Ran, host: dict[str, Outcome], name: str) -> None:
    """Same Dockerfile, same SOURCE_DATE_EPOCH: the same bytes, whatever isolation ran the RUN steps."""
    digest = succeeded(inside[name]).digest
    assert digest is not None and digest == succeeded(host[name]).digest


def test_failing_run_names_its_exit_code(inside: Ran) -> None:
    outcome = failed_clearly(inside["failing-run"])
    assert "before-the-failure" in outcome.stderr, "the RUN's output is shown"
    assert re.search(r"\b42\b", "\n".join(outcome.messages).replace(FAILING_COMMAND, "")), outcome.stderr


def test_secret_reaches_its_run_and_no_layer(inside: Ran) -> None:
    outcome = succeeded(inside["secret"])
    blobs = archive_bytes(inside.out / "secret.tar")
    assert hashlib.sha256(SECRET.encode()).hexdigest().encode() in blobs, "the RUN read the secret"
    assert SECRET.encode() not in blobs
    assert SECRET not in outcome.stdout + outcome.stderr


def test_cache_mount_outlives_its_build(inside: Ran) -> None:
    """The second build's changed step reads what the first build's step left in the cache mount."""
    succeeded(inside["cache-write"])
    succeeded(inside["cache-read"])
    assert (inside.out / "cache-read" / "seen").read_text() == CACHE_NOTE + "\n"


def test_docker_refuses_explicit_namespaces(docker_default: Ran) -> None:
    outcome = failed_clearly(docker_default["explicit-namespaces"])
    assert "namespaces" in "\n".join(outcome.messages), outcome.stderr


@pytest.mark.parametrize("name", ["run-network-none", "option-network-none"])
def test_docker_refuses_a_network_of_its_own(docker_default: Ran, name: str) -> None:
    """A chroot shares the container's network: a RUN cannot be cut off from it, so pybuild says so."""
    outcome = failed_clearly(docker_default[name])
    message = "\n".join(outcome.messages)
    assert "network" in message and "none" in message, outcome.stderr


def test_without_capabilities_copy_only_builds_match_the_host(podman_no_caps: Ran, host: dict[str, Outcome]) -> None:
    outcome = succeeded(podman_no_caps["scratch"])
    assert outcome.isolation_kind == "none", outcome.stderr
    assert outcome.digest is not None and outcome.digest == succeeded(host["scratch"]).digest


def test_without_capabilities_run_fails_with_one_clear_line(podman_no_caps: Ran) -> None:
    """One error, at the first RUN, naming what is missing; and a hint at the container option that grants it."""
    outcome = failed_clearly(podman_no_caps["busybox-base"])
    errors = [line for line in outcome.messages if re.match(r"\S*Dockerfile:\d+:\d+: ", line)]
    assert len(errors) == 1, outcome.stderr
    lines = (EXAMPLES / "base" / "Dockerfile").read_text().splitlines()
    first_run = next(number for number, line in enumerate(lines, 1) if line.startswith("RUN "))
    assert errors[0].startswith(f"/examples/base/Dockerfile:{first_run}:"), "it stops at the first RUN"
    assert "chroot" in errors[0] or "CAP_" in errors[0], outcome.stderr
    assert re.search(r"--cap-add|--security-opt|--privileged", outcome.stderr), outcome.stderr


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_chroot_on_the_host_builds_the_namespaces_image(host: dict[str, Outcome],
                                                        host_chroot: dict[str, Outcome], name: str) -> None:
    assert succeeded(host[name]).isolation_kind == "namespaces", host[name].stderr
    assert succeeded(host_chroot[name]).isolation_kind == "chroot", host_chroot[name].stderr
    assert host_chroot[name].digest is not None and host_chroot[name].digest == host[name].digest
