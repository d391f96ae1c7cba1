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
