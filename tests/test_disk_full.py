"""A full disk: the build fails with one clear message, the store stays consistent, the next build succeeds.

The store lives on a small tmpfs of the test's own; a filler file takes the room a layer blob needs,
so it is pybuild's own write (not the RUN's) that meets ENOSPC.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import Pybuild, build_base, require_root

pytestmark = pytest.mark.slow

SIZE_MB = 48
# Random bytes do not compress: the layer blob needs about as much room as the file itself.
DOCKERFILE = """\
FROM busybox-base
RUN head -c 14000000 /dev/urandom > /random && echo written
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require_root()
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_a_full_disk_fails_the_build_clearly_and_loses_nothing(small_disk: Path, tmp_path: Path) -> None:
    store = Pybuild(small_disk / "store")
    build_base(store)
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    # Leave room for the RUN's file in the step's upper dir (14 MB), not for its blob as well.
    filler = small_disk / "filler"
    with open(filler, "wb") as out:
        out.truncate(0)
        remaining = _free_bytes(small_disk) - 22_000_000
        out.write(b"\0" * max(remaining, 0))

    failed = store.build(context, "-t", "big", check=False)
    assert failed.returncode == 1, failed.stderr
    last = failed.stderr.strip().splitlines()
    assert "written" in failed.stderr  # the RUN itself succeeded: the disk filled while pybuild wrote
    errors = [line for line in last if "error" in line]
    assert errors and errors[-1] == f"pybuild: error: no space left on the device for {small_disk / 'store'}", \
        failed.stderr
    assert last[-1].startswith("hint: free some space"), failed.stderr

    # Consistent: the base is listed and complete, the failed image is not, no step's leftovers remain.
    rows = [line.split()[:2] for line in store.run("images").stdout.splitlines()[1:]]
    assert rows == [["busybox-base", "latest"]]
    assert list((small_disk / "store" / "tmp").iterdir()) == []
    index = json.loads((small_disk / "store" / "index.json").read_text())
    assert [entry["annotations"]["org.opencontainers.image.ref.name"] for entry in index["manifests"]] == [
        "busybox-base:latest"]
    saved = store.run("save", "-o", tmp_path / "base.tar", "busybox-base", check=False)
    assert saved.returncode == 0, saved.stderr  # every blob it names is there and verifies

    # Space freed, the same build succeeds on the same store.
    filler.unlink()
    again = store.build(context, "-t", "big", check=False)
    assert again.returncode == 0, again.stderr
    rows = sorted(line.split()[:2] for line in store.run("images").stdout.splitlines()[1:])
    assert rows == [["big", "latest"], ["busybox-base", "latest"]]
    fresh = Pybuild(tmp_path / "fresh-store")
    store.save("big", tmp_path / "big.tar")
    loaded = fresh.run("load", "-i", tmp_path / "big.tar")
    assert loaded.stdout == "Loaded image: big:latest\n"
