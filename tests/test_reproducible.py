"""Reproducible by default: the examples give the same manifest digests whatever the machine's conditions.

Each row builds the base and every example into a fresh store under one varied condition (a single CPU, another
locale, another host name, the context on a tmpfs, whose directories list their entries in another order, a
umask of 077) and compares the digests with a plain build's; gzip layers are checked the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import EXAMPLES, PYBUILD, REPO, require_root, require_tools

pytestmark = pytest.mark.slow

ORDER = ["static-site", "checksummed-app", "worker", "cgi-service", "onbuild-tools", "onbuild-tools/child"]
TAGS = {"onbuild-tools/child": "linted-scripts"}


def build_all(root: Path, examples: Path, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
              extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The base and every example built into the store ``root``; their manifest digests by example."""
    environment = {**os.environ, "PYBUILD_ROOT": str(root), **(env or {})}
    digests = {}
    for example in ["base", *ORDER]:
        tag = "busybox-base" if example == "base" else TAGS.get(example, example)
        metadata = root.parent / f"{root.name}-{tag}.json"
        argv = [*prefix, *PYBUILD, "build", "--progress", "plain", "-t", tag, "--metadata-file", str(metadata),
                *extra, *(["--build-context", "busybox=/bin"] if example == "base" else []), str(examples / example)]
        done = subprocess.run(argv, env=environment, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{example}: {done.stderr[-3000:]}"
        digests[example] = json.loads(metadata.read_text())["containerimage.digest"]
    return digests


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require_root()
    require_tools()
    return build_all(tmp_path_factory.mktemp("reference") / "store", EXAMPLES)


@pytest.fixture
def tmpfs_examples(tmp_path: Path) -> Iterator[Path]:
    """A copy of the examples on a tmpfs: its directories list entries in another order than ext4's."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)], check=True)
    try:
        shutil.copytree(EXAMPLES, mount_point / "examples", symlinks=True)
        yield mount_point / "examples"
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _in_other_host_name(command: str = "other-host") -> tuple[str, ...]:
    return ("unshare", "--uts", "sh", "-c", f'hostname {command} && exec "$@"', "sh")


@pytest.mark.parametrize(("condition", "prefix", "env"), [
    ("one CPU", ("taskset", "-c", "0"), None),
    ("another locale and time zone", (), {"LANG": "tr_TR.UTF-8", "LC_ALL": "tr_TR.UTF-8", "TZ": "Asia/Shanghai"}),
    ("another host name", _in_other_host_name(), None),
    ("umask 077", ("sh", "-c", 'umask 077 && exec "$@"', "sh"), None),
])
def test_examples_build_the_same_under(reference: dict[str, str], tmp_path: Path, condition: str,
                                       prefix: tuple[str, ...], env: dict[str, str] | None) -> None:
    if prefix and shutil.which(prefix[0]) is None:
        pytest.skip(f"{prefix[0]} is not installed")
    assert build_all(tmp_path / "store", EXAMPLES, prefix, env) == reference, condition


def test_examples_build_the_same_from_a_tmpfs_copy(reference: dict[str, str], tmp_path: Path,
                                                   tmpfs_examples: Path) -> None:
    """Another filesystem, another directory order, another checkout path: the same digests."""
    assert build_all(tmp_path / "store", tmpfs_examples) == reference


def test_gzip_layers_are_reproducible_too(tmp_path: Path, tmpfs_examples: Path) -> None:
    require_root()
    first = build_all(tmp_path / "first", EXAMPLES, extra=("--compression=gzip",))
    second = build_all(tmp_path / "second", tmpfs_examples, prefix=("taskset", "-c", "0"),
                       extra=("--compression=gzip",))
    assert first == second


def test_the_builders_umask_never_reaches_a_step(reference: dict[str, str], tmp_path: Path) -> None:
    """A COPY writes its layer without a mounted root; the next step's root dir comes from that layer's dir, so
    a umask of 077 once showed RUN a root of mode 0700 (and locked out a USER other than root)."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "a.txt").write_text("a\n")
    (context / "Dockerfile").write_text("FROM busybox-base\nCOPY a.txt /a.txt\nRUN stat -c %a / > /root-mode\n"
                                        "USER 65534\nRUN ls / > /tmp/listing && echo listed > /tmp/ok\n")
    digests = []
    for umask in ("022", "077"):
        root = tmp_path / f"store-{umask}"
        out = tmp_path / f"out-{umask}"
        environment = {**os.environ, "PYBUILD_ROOT": str(root)}
        for argv in ([*PYBUILD, "build", "-q", "-t", "busybox-base", "--build-context", "busybox=/bin",
                      str(EXAMPLES / "base")],
                     [*PYBUILD, "build", "-q", "-t", "probe", "-o", f"type=local,dest={out}", str(context)]):
            done = subprocess.run(["sh", "-c", f'umask {umask} && exec "$@"', "sh", *argv], env=environment,
                                  cwd=REPO, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "root-mode").read_text() == "755\n", umask
        assert (out / "tmp" / "ok").read_text() == "listed\n", umask
        digests.append(done.stdout.strip())
    assert digests[0] == digests[1]


def test_a_build_does_not_depend_on_where_its_base_came_from(tmp_path: Path) -> None:
    """A base built here and the same base loaded (or pulled) give a child the same image: a step's snapshot holds
    the times its layer holds, so a RUN under a directory of the base copies up the same directory either way."""
    require_root()
    require_tools()
    built, loaded = tmp_path / "built", tmp_path / "loaded"
    context = tmp_path / "child"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM busybox-base\nRUN touch /home/www/new && ls -l --full-time /home\n")
    digests = []
    for store in (built, loaded):
        environment = {**os.environ, "PYBUILD_ROOT": str(store), "SOURCE_DATE_EPOCH": "0"}
        if store == built:
            subprocess.run([*PYBUILD, "build", "-q", "-t", "busybox-base", "--build-context", "busybox=/bin",
                            str(EXAMPLES / "base")], env=environment, check=True, capture_output=True)
            subprocess.run([*PYBUILD, "save", "-o", str(tmp_path / "base.tar"), "busybox-base"], env=environment,
                           check=True, capture_output=True)
        else:
            subprocess.run([*PYBUILD, "load", "-i", str(tmp_path / "base.tar")], env=environment, check=True,
                           capture_output=True)
        later = {**environment, "SOURCE_DATE_EPOCH": "1700000000"}  # the child's epoch is after the base's
        done = subprocess.run([*PYBUILD, "build", "-q", str(context)], env=later, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        digests.append(done.stdout.strip())
    assert digests[0] == digests[1]
