"""A rebuild with nothing changed gives the previous image without loading the builder; any change takes
the full path, whose steps still hit where their keys allow. Each row: a real build, a change, a rebuild,
and the rebuilt image's digest compared with a cold build of the changed source on a fresh store."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e import Pybuild, loaded, saved_base

from builder.rebuild import NOTHING_CHANGED

pytestmark = pytest.mark.slow

OLD = 1_000_000_000  # 2001: every file older than the two seconds a stat cannot be trusted within

DOCKERFILE = """FROM busybox-base
WORKDIR /app
COPY src/ /app/src/
COPY *.txt /app/
RUN cat /app/a.txt /app/src/main.c > /app/all
"""
FILES = {"src/main.c": "int main;\n", "src/util/u.c": "u\n", "a.txt": "a\n", "notes.md": "not copied\n"}


@pytest.fixture(scope="module")
def base_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_base(tmp_path_factory)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One context per test, all written at once and then left alone for the two seconds within which a stat
    is not trusted (a checkout is older than that by the time anyone builds it)."""
    top = tmp_path_factory.mktemp("contexts")
    made = {}
    for name in [row.name for row in ROWS] + ["outputs"]:
        made[name] = top / name.replace(" ", "-")
        write_context(made[name], FILES)
    time.sleep(2.1)
    return made




def write_context(context: Path, files: dict[str, str], dockerfile: str = DOCKERFILE) -> None:
    for name, text in {"Dockerfile": dockerfile, **files}.items():
        path = context / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    age(context)


def age(context: Path) -> None:
    """Every entry written long ago, as in a checkout: the rebuild record trusts their stat."""
    for directory, names, files in os.walk(context):
        for name in [*names, *files]:
            os.utime(os.path.join(directory, name), (OLD, OLD), follow_symlinks=False)
    os.utime(context, (OLD, OLD))


def manifest(done) -> str:
    return re.search(r"manifest (sha256:[0-9a-f]{64})", done.stderr).group(1)


def edit(name: str, text: str) -> Callable[[Path, Pybuild], None]:
    def change(context: Path, store: Pybuild) -> None:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(text)
    return change


def rewrite_keeping_mtime(name: str) -> Callable[[Path, Pybuild], None]:
    def change(context: Path, store: Pybuild) -> None:
        path = context / name
        before = path.stat()
        path.write_text(path.read_text().upper())  # same size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # only its ctime tells
    return change


def touch(name: str) -> Callable[[Path, Pybuild], None]:
    def change(context: Path, store: Pybuild) -> None:
        os.utime(context / name, (OLD + 5, OLD + 5))
    return change


def remove(name: str) -> Callable[[Path, Pybuild], None]:
    def change(context: Path, store: Pybuild) -> None:
        (context / name).unlink()
    return change


def retag_base(context: Path, store: Pybuild) -> None:
    other = store.root.parent / "other-base"
    write_context(other, {}, "FROM busybox-base\nRUN echo other > /other\n")
    store.build(other, "-t", "busybox-base")


def nothing(context: Path, store: Pybuild) -> None:
    pass


@dataclass
class Row:
    name: str
    change: Callable[[Path, Pybuild], None]
    fast: bool  # the rebuild gives the last image without the builder
    args: tuple[str, ...] = ()


ROWS = [
    Row("nothing changed", nothing, True),
    Row("a file no step reads", edit("notes.md", "edited\n"), True),
    Row("a copied file edited", edit("src/main.c", "int main(void);\n"), False),
    Row("a copied file touched", touch("a.txt"), False),
    Row("a copied file rewritten, its mtime put back", rewrite_keeping_mtime("a.txt"), False),
    Row("a file added to a copied directory", edit("src/util/new.c", "new\n"), False),
    Row("a file added that a wildcard matches", edit("b.txt", "b\n"), False),
    Row("a copied file removed", remove("src/util/u.c"), False),
    Row("an ignore file added", edit(".dockerignore", "src/util\n"), False),
    Row("the base image retagged", retag_base, False),
    Row("another build arg", nothing, False, ("--build-arg", "X=1")),
    Row("another tag", nothing, False, ("-t", "extra")),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_a_rebuild_is_fast_only_when_nothing_it_reads_changed(row: Row, base_archive: Path, contexts: dict[str, Path],
                                                             tmp_path: Path) -> None:
    context = contexts[row.name]
    store = loaded(tmp_path / "store", base_archive)
    store.build(context, "-t", "app")
    again = store.build(context, "-t", "app")
    assert NOTHING_CHANGED in again.stderr, again.stderr  # the record of the first build serves the second
    assert again.stderr.count(" CACHED") == 4

    row.change(context, store)
    rebuilt = store.build(context, "-t", "app", *row.args)
    assert (NOTHING_CHANGED in rebuilt.stderr) == row.fast, rebuilt.stderr

    cold_store = loaded(tmp_path / "cold-store", base_archive)
    if row.change is retag_base:
        retag_base(context, cold_store)
    cold = cold_store.build(context, "-t", "app", *row.args)
    assert manifest(rebuilt) == manifest(cold)


def test_a_fresh_checkout_is_not_trusted_by_stat(base_archive: Path, tmp_path: Path) -> None:
    """Files written within two seconds of a build may change again without their stat showing it."""
    context = tmp_path / "context"
    write_context(context, FILES)  # written now: even with old mtimes, their ctime is now
    store = loaded(tmp_path / "store", base_archive)
    store.build(context, "-t", "app")
    again = store.build(context, "-t", "app")
    assert NOTHING_CHANGED not in again.stderr and again.stderr.count(" CACHED") == 4


def test_outputs_and_no_cache_always_take_the_full_path(base_archive: Path, contexts: dict[str, Path],
                                                        tmp_path: Path) -> None:
    context = contexts["outputs"]
    store = loaded(tmp_path / "store", base_archive)
    store.build(context, "-t", "app")
    for args in (("--no-cache",), ("-o", f"type=oci,dest={tmp_path / 'out.tar'}"),
                 ("--iidfile", str(tmp_path / "iid")), ("--secret", f"id=s,src={context / 'a.txt'}")):
        done = store.build(context, "-t", "app", *args)
        assert NOTHING_CHANGED not in done.stderr, args
    assert (tmp_path / "out.tar").is_file() and (tmp_path / "iid").read_text().startswith("sha256:")
