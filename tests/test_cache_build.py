"""The step cache end to end: which rebuilds hit and which miss, why a miss happened, and that a hit is honest.

Each row of the table is a real pair of builds on a store of its own: a cold build, a change to the project
(a file, a build arg, the base image, a flag), a rebuild. The rebuild's filesystem steps (RUN, COPY, ADD,
WORKDIR) must each be served from the cache (``#N CACHED``) or run with the one ``#N cache miss: <cause>``
line naming why; config-only steps (ENV, LABEL, ARG...) are neither. Whatever the cache did, the rebuilt
image must be the image a cold build of the changed project gives on a fresh store, digest for digest:
a key that misses something that matters shows up there as a stale hit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
from e2e import PYBUILD, Pybuild, loaded, saved_base

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox-base built once and saved: each row loads it into a store of its own, which costs no build."""
    return saved_base(tmp_path_factory)




# --- reading plain progress ---------------------------------------------------------------------------------

class StepReport(NamedTuple):
    """One step as plain progress told it: ``outcome`` is cached, done or error (None: never finished)."""

    title: str  # "[stage-0 2/3] COPY app.txt ./"
    outcome: str | None
    cause: str | None  # the text of its "cache miss:" line


HEADER = re.compile(r"#(\d+) (\[\S+ \d+/\d+\] .*)")
FINISHED = re.compile(r"#(\d+) (CACHED|DONE \d+\.\d+s|ERROR.*)")
CAUSE = re.compile(r"#(\d+) cache miss: (.*)")
NUMBERED = re.compile(r"#(\d+) ")
RESULT = re.compile(r"image (sha256:[0-9a-f]{64}) manifest (sha256:[0-9a-f]{64})")


def parse_plain(text: str) -> dict[int, StepReport]:
    """{step number: (title, outcome, cause)} from ``--progress plain``, holding the output to the contract's form.

    Lines of parallel stages interleave, so a step is followed by its number; the cause line must be the
    first line of its step after the header, at most one, and a cached step prints exactly ``#N CACHED``.
    """
    titles: dict[int, str] = {}
    outcomes: dict[int, str] = {}
    causes: dict[int, str] = {}
    lines_after_header: dict[int, int] = {}
    for line in text.splitlines():
        if header := HEADER.fullmatch(line):
            number = int(header[1])
            if number not in titles:
                titles[number], lines_after_header[number] = header[2], 0
                continue
        numbered = NUMBERED.match(line)
        if not numbered or int(numbered[1]) not in titles:
            continue
        number = int(numbered[1])
        lines_after_header[number] += 1
        if cause := CAUSE.fullmatch(line):
            assert number not in causes, f"step {number} printed two causes:\n{text}"
            assert lines_after_header[number] == 1, f"step {number}'s cause is not right after its header:\n{text}"
            causes[number] = cause[2]
        elif finished := FINISHED.fullmatch(line):
            assert number not in outcomes, f"step {number} finished twice:\n{text}"
            outcomes[number] = finished[2].split()[0].lower()
        else:
            assert not line.startswith(f"#{number} CACHED"), f"a cached step prints exactly '#N CACHED': {line!r}"
    return {number: StepReport(title, outcomes.get(number), causes.get(number)) for number, title in titles.items()}


def keyword(title: str) -> str:
    return title.split("] ", 1)[1].split()[0].upper()


FILESYSTEM = {"RUN", "COPY", "ADD", "WORKDIR"}  # the table's WORKDIRs all create their directory
NO_OUTCOME = {"FROM"}  # the contract says nothing of how FROM is reported


def stage_order(dockerfile: str) -> dict[str, int]:
    """Stage names as progress titles spell them ("build", "stage-1") -> their place in the Dockerfile."""
    order = {}
    froms = [line.split() for line in dockerfile.splitlines() if line.split()[:1] in (["FROM"], ["from"])]
    for index, words in enumerate(froms):
        named = len(words) >= 4 and words[-2].upper() == "AS"
        order[words[-1].lower() if named else f"stage-{index}"] = index
    return order


def dockerfile_order(steps: Mapping[int, StepReport], dockerfile: str) -> list[StepReport]:
    """The steps in Dockerfile order: independent stages start in any order, so step numbers vary."""
    stages = stage_order(dockerfile)

    def place(report: StepReport) -> tuple[int, int]:
        stage, position = report.title[1:].split("]", 1)[0].split()
        return stages[stage], int(position.split("/")[0])

    return sorted(steps.values(), key=place)


def outcome_of(report: StepReport) -> str:
    """A filesystem step in the table's words: hit, run (no cause given), miss:<cause>, or what went wrong."""
    if report.outcome == "cached":
        assert report.cause is None, f"{report.title}: cached, yet it names a cache miss"
        return HIT
    if report.outcome == "done":
        return f"miss:{report.cause}" if report.cause is not None else RUN
    return f"{report.outcome or 'unfinished'}"


def filesystem_outcomes(done: subprocess.CompletedProcess, dockerfile: str) -> list[tuple[str, str]]:
    """(title, outcome) of each filesystem step in Dockerfile order; config-only steps are checked on the way."""
    steps = parse_plain(done.stderr)
    out = []
    for report in dockerfile_order(steps, dockerfile):
        kind = keyword(report.title)
        if kind in FILESYSTEM:
            out.append((report.title, outcome_of(report)))
        elif kind not in NO_OUTCOME:
            # no layer, so nothing to cache or miss: the header and DONE, always
            assert (report.outcome, report.cause) == ("done", None), f"config-only step {report}\n{done.stderr}"
    return out


def manifest_digest(done: subprocess.CompletedProcess) -> str:
    """The manifest digest of the image built, from plain progress's last line."""
    last = done.stderr.strip().splitlines()[-1]
    result = RESULT.fullmatch(last)
    assert result, f"no 'image ... manifest ...' line at the end:\n{done.stderr}"
    return result[2]


# --- what the table expects ---------------------------------------------------------------------------------

HIT = "hit"
RUN = "run"  # ran, naming no cause: every step of a first build
MISS = "miss"  # ran and named some cause, whichever
Outcome = str | frozenset[str]


def miss(cause: str, *alternatives: str) -> Outcome:
    """A miss naming ``cause`` (or one of ``alternatives``, where the contract leaves the choice open)."""
    return frozenset(f"miss:{text}" for text in (cause, *alternatives)) if alternatives else f"miss:{cause}"


PARENT = miss("a step before it changed")
NO_CACHE = miss("--no-cache")
NO_CACHE_FILTER = miss("--no-cache-filter", "--no-cache")


def either(*outcomes: Outcome) -> Outcome:
    """Any of ``outcomes``: where the contract allows a hit but does not require one."""
    return frozenset(text for outcome in outcomes for text in ([outcome] if isinstance(outcome, str) else outcome))


def matches(expected: Outcome, actual: str) -> bool:
    if isinstance(expected, frozenset):
        return any(matches(one, actual) for one in expected)
    return actual.startswith("miss:") if expected == MISS else actual == expected


def assert_outcomes(done: subprocess.CompletedProcess, dockerfile: str, expected: tuple[Outcome, ...]) -> None:
    """Every filesystem step as expected, shown as a table of all of them when one is not."""
    actual = filesystem_outcomes(done, dockerfile)
    if len(actual) != len(expected) or not all(
            matches(want, got) for want, (_, got) in zip(expected, actual, strict=True)):
        shown = [" or ".join(sorted(want)) if isinstance(want, frozenset) else want for want in expected]
        shown += ["(nothing)"] * (len(actual) - len(shown))
        rows = "\n".join(f"  {title}: expected {want}, got {got}"
                         for (title, got), want in zip(actual, shown[:len(actual)], strict=True))
        raise AssertionError(f"step outcomes differ ({len(expected)} expected):\n{rows}\n\n{done.stderr}")


def assert_all_ran(done: subprocess.CompletedProcess, dockerfile: str) -> None:
    """A cold build: every filesystem step runs, and with nothing before it there is no miss to explain."""
    actual = filesystem_outcomes(done, dockerfile)
    assert actual and all(got == RUN for _, got in actual), f"{actual}\n{done.stderr}"


# --- projects and their changes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class File:
    """A context file with its mode (files are written 0644 otherwise, whatever the umask) and mtime."""

    text: str
    mode: int = 0o644
    mtime: float | None = None


@dataclass(frozen=True)
class Symlink:
    """A context symlink: its target is part of what COPY copies."""

    target: str


@dataclass(frozen=True)
class Project:
    """A row's world: its store, its build context, and a directory beside it (secrets, the base's Dockerfile)."""

    store: Pybuild
    context: Path
    outside: Path


Change = Callable[[Project], Path | None]  # returns the directory to rebuild when the context moved


def write_files(directory: Path, files: Mapping[str, str | File | Symlink]) -> None:
    for name, value in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Symlink):
            path.symlink_to(value.target)
            continue
        spec = value if isinstance(value, File) else File(value)
        path.write_text(spec.text)
        path.chmod(spec.mode)
        if spec.mtime is not None:
            os.utime(path, (spec.mtime, spec.mtime))


def in_context(action: Callable[[Path], object]) -> Change:
    """A change to the context in place: ``action`` is given the context directory."""
    def change(project: Project) -> None:
        action(project.context)
    return change


def unchanged(project: Project) -> None:
    return None


def edit(name: str, text: str) -> Change:
    return in_context(lambda context: (context / name).write_text(text))


def add(name: str, text: str) -> Change:
    return in_context(lambda context: write_files(context, {name: text}))


def mkdir(name: str) -> Change:
    return in_context(lambda context: (context / name).mkdir())


def relink(name: str, target: str) -> Change:
    def replace(context: Path) -> None:
        (context / name).unlink()
        (context / name).symlink_to(target)
    return in_context(replace)


def remove(name: str) -> Change:
    return in_context(lambda context: (context / name).unlink())


def rename(name: str, new: str) -> Change:
    return in_context(lambda context: (context / name).rename(context / new))


def touch(name: str, mtime: float) -> Change:
    return in_context(lambda context: os.utime(context / name, (mtime, mtime)))


def chmod(name: str, mode: int) -> Change:
    return in_context(lambda context: (context / name).chmod(mode))


def chown(name: str, uid: int, gid: int) -> Change:
    return in_context(lambda context: os.chown(context / name, uid, gid))


def edit_dockerfile(old: str, new: str) -> Change:
    def replace(context: Path) -> None:
        text = (context / "Dockerfile").read_text()
        assert old in text, f"{old!r} is not in the row's Dockerfile"
        (context / "Dockerfile").write_text(text.replace(old, new, 1))
    return in_context(replace)


def edit_outside(name: str, text: str) -> Change:
    def change(project: Project) -> None:
        (project.outside / name).write_text(text)
    return change


def moved(project: Project) -> Path:
    """The whole context renamed to another directory, as a checkout moved elsewhere."""
    target = project.context.parent / "elsewhere" / "moved-context"
    target.parent.mkdir()
    return project.context.rename(target)


def copied(project: Project) -> Path:
    """The whole context copied elsewhere: other inodes and fresh mtimes, the same content and modes."""
    target = project.context.parent / "copied-context"
    return Path(shutil.copytree(project.context, target, symlinks=True, copy_function=shutil.copy))


ROW_BASE = "row-base:1"


def build_row_base(project: Project, dockerfile: str, *args: str) -> None:
    directory = project.outside / "base"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(dockerfile)
    project.store.build(directory, "-t", ROW_BASE, *args)


def rebuild_base(dockerfile: str, *, removed_first: bool = False) -> Change:
    """The row's base image made again: after `pybuild rmi`, and with --no-cache so its layers are made anew."""
    def change(project: Project) -> None:
        if removed_first:
            project.store.run("rmi", ROW_BASE)
        build_row_base(project, dockerfile, "--no-cache")
    return change


@dataclass(frozen=True)
class Row:
    """Two builds of one project with ``change`` between them, and what each filesystem step of the second does.

    Arguments may name ``{outside}``, the directory beside the context (secrets live there).
    """

    name: str
    dockerfile: str
    files: Mapping[str, str | File | Symlink]
    change: Change
    expected: tuple[Outcome, ...]  # the rebuild's RUN, COPY, ADD and WORKDIR steps, in Dockerfile order
    args: tuple[str, ...] = ()  # every build
    first: tuple[str, ...] = ()  # the first build only
    second: tuple[str, ...] = ()  # the rebuild and the cold build it is compared with
    flags: tuple[str, ...] = ()  # the rebuild only: cache control, which a cold build has no use for
    outside: Mapping[str, str] = field(default_factory=dict)
    base: str = ""  # a Dockerfile built as row-base:1 before the first build


APP = """FROM busybox-base
WORKDIR /app
COPY app.txt ./
RUN cat app.txt > /out
"""
APP_FILES = {"app.txt": "one\n", "other.txt": "no COPY selects me\n"}
APP_TWO_RUNS = APP + "RUN wc -c /out > /size\n"
APP_LABEL = APP.replace("RUN", "LABEL version=1\nRUN")
APP_ENV = APP.replace("RUN", "ENV MODE=a\nRUN")
APP_USER = APP.replace("RUN cat app.txt > /out", "USER root\nRUN id -u > /tmp/uid")
ADD_APP = """FROM busybox-base
ADD app.txt /added.txt
RUN cat /added.txt > /out
"""

TREE = """FROM busybox-base
COPY src/ /src/
RUN find /src | sort > /list
"""
TREE_FILES = {"src/a.txt": "a\n", "src/b.txt": "b\n", "src/sub/deep.txt": "deep\n", "src/debug.log": "log\n",
              "src/link": Symlink("a.txt"), ".dockerignore": "src/*.log\n", "notes.md": "not copied\n"}
TREE_CHMOD = TREE.replace("COPY", "COPY --chmod=0755")
TREE_CHOWN = TREE.replace("COPY", "COPY --chown=www")

ARGS = """FROM busybox-base
COPY app.txt /app.txt
RUN echo before > /before
ARG V
RUN echo static > /static
RUN echo "[$V]" > /v
"""
ARGS_DEFAULT = ARGS.replace("ARG V", "ARG V=1")
ARG_STEPS = (HIT, HIT)  # COPY and the RUN before the ARG
ARG_THEN_COPY = 'FROM busybox-base\nARG V\nCOPY app.txt /app.txt\nRUN echo "[$V]" > /v\n'

BIND = """FROM busybox-base
RUN --mount=type=bind,source=data,target=/data cat /data/d.txt > /d
RUN wc -c /d > /size
"""
BIND_FILES = {"data/d.txt": "d\n", "other.txt": "not mounted\n"}

SECRET = """FROM busybox-base
RUN --mount=type=secret,id=s test -s /run/secrets/s && echo ok > /ok
RUN cat /ok > /ok-again
"""
SECRET_ARGS = ("--secret", "id=s,src={outside}/s.txt")

BASE_V1 = "FROM busybox-base\nRUN echo v1 > /base-version\n"
ON_BASE = f"""FROM {ROW_BASE}
RUN cat /base-version > /seen
RUN echo after > /after
"""

STAGES = """FROM busybox-base AS build
RUN echo built > /artifact
FROM busybox-base AS final
RUN echo final > /final
COPY --from=build /artifact /artifact
RUN cat /artifact > /seen
"""
CUT_STAGES = STAGES.replace("RUN echo built > /artifact", "COPY app.txt /app.txt\nRUN cut -c1 /app.txt > /artifact")

OLD = 1_000_000_000  # 2001
EPOCH = 1_500_000_000  # 2017: newer than OLD, older than any file written today and any step run today
LATER = 1_200_000_000  # 2008: still older than EPOCH
FUTURE = 4_000_000_000

ROWS = [
    # the context
    Row("nothing-changed", APP, APP_FILES, unchanged, (HIT, HIT, HIT)),
    Row("copied-file-touched", APP, APP_FILES, touch("app.txt", FUTURE), (HIT, HIT, HIT)),
    Row("copied-file-touched-newer-than-epoch", APP, APP_FILES, touch("app.txt", FUTURE), (HIT, HIT, HIT),
        args=("--build-arg", f"SOURCE_DATE_EPOCH={EPOCH}")),
    # an mtime older than SOURCE_DATE_EPOCH is kept in the layer, so it is part of the file
    Row("copied-file-touched-older-than-epoch", APP, {**APP_FILES, "app.txt": File("one\n", mtime=OLD)},
        touch("app.txt", LATER), (HIT, miss("file app.txt changed"), PARENT),
        args=("--build-arg", f"SOURCE_DATE_EPOCH={EPOCH}")),
    Row("copied-file-edited", APP, APP_FILES, edit("app.txt", "two\n"),
        (HIT, miss("file app.txt changed"), PARENT)),
    Row("added-file-edited", ADD_APP, APP_FILES, edit("app.txt", "two\n"), (miss("file app.txt changed"), PARENT)),
    Row("uncopied-file-edited", APP, APP_FILES, edit("other.txt", "edited\n"), (HIT, HIT, HIT)),
    Row("uncopied-file-added", APP, APP_FILES, add("new.txt", "new\n"), (HIT, HIT, HIT)),
    Row("context-moved", APP, APP_FILES, moved, (HIT, HIT, HIT)),
    Row("context-copied", APP, APP_FILES, copied, (HIT, HIT, HIT)),
    Row("copied-file-owner", APP, APP_FILES, chown("app.txt", 1000, 1000), (HIT, HIT, HIT)),
    Row("deep-file-edited", TREE, TREE_FILES, edit("src/sub/deep.txt", "deeper\n"),
        (miss("file src/sub/deep.txt changed"), PARENT)),
    Row("file-added", TREE, TREE_FILES, add("src/c.txt", "c\n"), (miss("file src/c.txt was added"), PARENT)),
    Row("file-removed", TREE, TREE_FILES, remove("src/b.txt"), (miss("file src/b.txt was removed"), PARENT)),
    # the same bytes under another name: kaniko's hole
    Row("file-renamed", TREE, TREE_FILES, rename("src/b.txt", "src/e.txt"),
        (miss("file src/b.txt was removed", "file src/e.txt was added"), PARENT)),
    Row("ignored-file-added", TREE, TREE_FILES, add("src/new.log", "log\n"), (HIT, HIT)),
    Row("ignore-file-comment", TREE, TREE_FILES, edit(".dockerignore", "# logs stay out\nsrc/*.log\n"), (HIT, HIT)),
    Row("ignore-file-selects-more", TREE, TREE_FILES, edit(".dockerignore", "# logs are wanted now\n"),
        (miss("file src/debug.log was added"), PARENT)),
    Row("symlink-retargeted", TREE, TREE_FILES, relink("src/link", "b.txt"), (miss("file src/link changed"), PARENT)),
    Row("directory-added", TREE, TREE_FILES, mkdir("src/empty"), (miss("file src/empty was added"), PARENT)),
    Row("file-chmod", TREE, TREE_FILES, chmod("src/a.txt", 0o755), (miss("file src/a.txt changed"), PARENT)),
    Row("file-chmod-under-copy-chmod", TREE_CHMOD, TREE_FILES, chmod("src/a.txt", 0o600), (HIT, HIT)),
    Row("file-owner", TREE, TREE_FILES, chown("src/a.txt", 1000, 1000), (HIT, HIT)),
    Row("file-owner-under-copy-chown", TREE_CHOWN, TREE_FILES, chown("src/a.txt", 0, 1000), (HIT, HIT)),
    Row("bind-mounted-file-edited", BIND, BIND_FILES, edit("data/d.txt", "d2\n"),
        (miss("file data/d.txt changed"), PARENT)),
    Row("unmounted-file-edited", BIND, BIND_FILES, edit("other.txt", "edited\n"), (HIT, HIT)),
    # the Dockerfile
    Row("dockerfile-comment", APP, APP_FILES, edit_dockerfile("WORKDIR", "# where the app lives\nWORKDIR"),
        (HIT, HIT, HIT)),
    Row("instruction-changed", APP_TWO_RUNS, APP_FILES, edit_dockerfile("cat app.txt", "cat app.txt app.txt"),
        (HIT, HIT, miss("the instruction changed"), PARENT)),
    # the COPY's destination moved with the WORKDIR; whether that is "the instruction" is left open
    Row("workdir-changed", APP, APP_FILES, edit_dockerfile("WORKDIR /app", "WORKDIR /srv"),
        (miss("the instruction changed"), MISS, PARENT)),
    Row("label-before-run", APP_LABEL, APP_FILES, edit_dockerfile("version=1", "version=2"), (HIT, HIT, HIT)),
    # the RUN's environment changed; which cause is named is left open
    Row("env-before-run", APP_ENV, APP_FILES, edit_dockerfile("MODE=a", "MODE=b"), (HIT, HIT, MISS)),
    Row("user-before-run", APP_USER, APP_FILES, edit_dockerfile("USER root", "USER www"), (HIT, HIT, MISS)),
    # build args: in scope, they reach every RUN after their ARG, used or not
    Row("build-arg-changed", ARGS, APP_FILES, unchanged, (*ARG_STEPS, *[miss("build arg V changed: 1 -> 2")] * 2),
        first=("--build-arg", "V=1"), second=("--build-arg", "V=2")),
    Row("build-arg-set", ARGS, APP_FILES, unchanged, (*ARG_STEPS, *[miss("build arg V changed: (unset) -> 2")] * 2),
        second=("--build-arg", "V=2")),
    Row("build-arg-unset", ARGS, APP_FILES, unchanged, (*ARG_STEPS, *[miss("build arg V changed: 1 -> (unset)")] * 2),
        first=("--build-arg", "V=1")),
    Row("build-arg-skips-copy", ARG_THEN_COPY, APP_FILES, unchanged, (HIT, miss("build arg V changed: 1 -> 2")),
        first=("--build-arg", "V=1"), second=("--build-arg", "V=2")),
    Row("build-arg-undeclared", ARGS, APP_FILES, unchanged, (HIT,) * 4, second=("--build-arg", "NOT_DECLARED=1")),
    Row("build-arg-given-its-default", ARGS_DEFAULT, APP_FILES, unchanged, (HIT,) * 4, second=("--build-arg", "V=1")),
    # secret values are never inputs
    Row("secret-changed", SECRET, {}, edit_outside("s.txt", "another value\n"), (HIT, HIT),
        args=SECRET_ARGS, outside={"s.txt": "a value\n"}),
    # the base image: keys follow its layers' content, not its ID
    Row("base-rebuilt-identical", ON_BASE, {}, rebuild_base(BASE_V1, removed_first=True), (HIT, HIT), base=BASE_V1),
    Row("base-label-changed", ON_BASE, {}, rebuild_base(BASE_V1 + "LABEL note=relabelled\n"), (HIT, HIT),
        base=BASE_V1),
    Row("base-content-changed", ON_BASE, {}, rebuild_base(BASE_V1.replace("v1", "v2")),
        (miss(f"base image {ROW_BASE} changed"), MISS), base=BASE_V1),
    # a stage rerun for a change its output does not show: what copies from it may hit
    Row("stage-output-unchanged", CUT_STAGES, APP_FILES, edit("app.txt", "oops\n"),
        (miss("file app.txt changed"), PARENT, HIT, either(HIT, PARENT), either(HIT, PARENT))),
    # cache control
    Row("no-cache", APP, APP_FILES, unchanged, (NO_CACHE,) * 3, flags=("--no-cache",)),
    # a stage rerun with the same output: what copies from it is keyed by that content and hits
    Row("no-cache-filter-first-stage", STAGES, {}, unchanged, (NO_CACHE_FILTER, HIT, HIT, HIT),
        flags=("--no-cache-filter", "build")),
    Row("no-cache-filter-last-stage", STAGES, {}, unchanged, (HIT, *[NO_CACHE_FILTER] * 3),
        flags=("--no-cache-filter", "final")),
]


def new_project(tmp_path: Path, row: Row, archive: Path) -> Project:
    project = Project(loaded(tmp_path / "store", archive), tmp_path / "context", tmp_path / "outside")
    project.context.mkdir()
    project.outside.mkdir()
    write_files(project.context, {"Dockerfile": row.dockerfile, **row.files})
    write_files(project.outside, row.outside)
    if row.base:
        build_row_base(project, row.base)
    return project


def cold_build(project: Project, context: Path, tmp_path: Path, images: tuple[str, ...],
               *args: str) -> subprocess.CompletedProcess:
    """``context`` built on a fresh store holding the same images as the row's store (its base as changed)."""
    saved = tmp_path / "cold-images.tar"
    project.store.run("save", "-o", saved, *images)
    return loaded(tmp_path / "cold-store", saved).build(context, *args)


@pytest.mark.parametrize("row", [pytest.param(row, id=row.name) for row in ROWS])
def test_rebuild_hits_what_did_not_change_and_explains_each_miss(row: Row, base_archive: Path,
                                                                 tmp_path: Path) -> None:
    project = new_project(tmp_path, row, base_archive)
    args = tuple(arg.format(outside=project.outside) for arg in row.args)
    first = project.store.build(project.context, *args, *row.first)
    assert_all_ran(first, row.dockerfile)

    context = row.change(project) or project.context
    dockerfile = (context / "Dockerfile").read_text()
    images = ("busybox-base", ROW_BASE) if row.base else ("busybox-base",)
    cold = cold_build(project, context, tmp_path, images, *args, *row.second)
    assert_all_ran(cold, dockerfile)

    rebuilt = project.store.build(context, *args, *row.second, *row.flags)
    assert manifest_digest(rebuilt) == manifest_digest(cold), "the rebuild differs from a cold build of the same"
    assert_outcomes(rebuilt, dockerfile, row.expected)


# --- beyond the table ---------------------------------------------------------------------------------------

CONTRACT_FORM = """#1 [build 1/2] FROM busybox-base
#2 [final 1/4] FROM busybox-base
#1 DONE 0.0s
#3 [build 2/2] RUN echo built > /artifact
#2 DONE 0.0s
#3 cache miss: --no-cache-filter
#4 [final 2/4] ENV A=1
#3 0.012 cache miss: this is the step's output
#4 DONE 0.0s
#5 [final 3/4] RUN echo final > /final
#5 CACHED
#3 DONE 0.1s
#6 [final 4/4] COPY --from=build /artifact /artifact
#6 CACHED
image sha256:{zeros} manifest sha256:{ones}
""".format(zeros="0" * 64, ones="1" * 64)
CONTRACT_DOCKERFILE = ("FROM busybox-base AS build\nRUN echo built > /artifact\nFROM busybox-base AS final\n"
                       "ENV A=1\nRUN echo final > /final\nCOPY --from=build /artifact /artifact\n")


def test_the_progress_reader_reads_the_contract_form() -> None:
    """The reader itself, on what the contract says a rebuild prints: interleaved stages, a cause, hits."""
    done = subprocess.CompletedProcess([], 0, "", CONTRACT_FORM)
    steps = parse_plain(done.stderr)
    assert steps[3] == StepReport("[build 2/2] RUN echo built > /artifact", "done", "--no-cache-filter")
    assert steps[5] == StepReport("[final 3/4] RUN echo final > /final", "cached", None)
    assert manifest_digest(done) == "sha256:" + "1" * 64
    assert_outcomes(done, CONTRACT_DOCKERFILE, (NO_CACHE_FILTER, HIT, HIT))
    with pytest.raises(AssertionError, match="expected hit, got miss:--no-cache-filter"):
        assert_outcomes(done, CONTRACT_DOCKERFILE, (HIT, HIT, HIT))
    with pytest.raises(AssertionError, match="exactly '#N CACHED'"):
        parse_plain(CONTRACT_FORM.replace("#5 CACHED", "#5 CACHED 0.0s"))
    with pytest.raises(AssertionError, match="not right after its header"):
        parse_plain(CONTRACT_FORM.replace("#3 cache miss: --no-cache-filter\n", "").replace(
            "#3 DONE", "#3 cache miss: --no-cache-filter\n#3 DONE"))

def app_project(tmp_path: Path, archive: Path, dockerfile: str = APP, **files: str) -> Project:
    row = Row("app", dockerfile, {**APP_FILES, **files}, unchanged, ())
    return new_project(tmp_path, row, archive)


def test_no_cache_reruns_every_step_and_builds_the_same_image(base_archive: Path, tmp_path: Path) -> None:
    project = app_project(tmp_path, base_archive)
    first = project.store.build(project.context)
    forced = project.store.build(project.context, "--no-cache")
    assert manifest_digest(forced) == manifest_digest(first)
    assert_outcomes(forced, APP, (NO_CACHE,) * 3)
    # and what it made serves the next build
    again = project.store.build(project.context)
    assert manifest_digest(again) == manifest_digest(first)
    assert_outcomes(again, APP, (HIT,) * 3)


def _store_files(store: Pybuild) -> dict[Path, tuple[int, int]]:
    """Every regular file of the store's snapshots, with its device and inode."""
    return {path: (st.st_dev, st.st_ino) for path in (store.root / "snapshots").rglob("*")
            if stat.S_ISREG((st := path.lstat()).st_mode)}


def _layer_with(store: Pybuild, name: str, text: str) -> Path:
    """The snapshot holding ``name`` with ``text``: the layer a copy made."""
    found = [path.parents[len(Path(name).parts) - 1] for path in (store.root / "snapshots").rglob(Path(name).name)
             if str(path).endswith(name) and path.read_text() == text]
    assert len(found) == 1, found
    return found[0]


def test_a_copy_that_reruns_links_the_files_its_previous_layer_holds(base_archive: Path, tmp_path: Path) -> None:
    """One file of a copied tree edited: the new layer links the others from the one the previous build made,
    so it makes no inode for them, and the image is still the one a cold build makes; --no-cache links none."""
    dockerfile = "FROM busybox-base\nCOPY src /src\nRUN cat /src/* > /all\n"
    project = app_project(tmp_path, base_archive, dockerfile, **{f"src/f{n}.txt": f"file {n}\n" for n in range(20)})
    project.store.build(project.context)
    before = set(_store_files(project.store).values())

    (project.context / "src" / "f3.txt").write_text("edited\n")
    rebuilt = project.store.build(project.context)
    assert_outcomes(rebuilt, dockerfile, (miss("file src/f3.txt changed"), PARENT))
    layer = _layer_with(project.store, "src/f3.txt", "edited\n")
    linked = {str(path.relative_to(layer)) for path, inode in _store_files(project.store).items()
              if path.is_relative_to(layer) and inode in before}
    assert linked == {f"src/f{n}.txt" for n in range(20) if n != 3}
    cold = cold_build(project, project.context, tmp_path, ("busybox-base",))
    assert manifest_digest(rebuilt) == manifest_digest(cold)

    before = set(_store_files(project.store).values())
    (project.context / "src" / "f4.txt").write_text("edited too\n")
    forced = project.store.build(project.context, "--no-cache")
    assert_outcomes(forced, dockerfile, (NO_CACHE, NO_CACHE))
    layer = _layer_with(project.store, "src/f4.txt", "edited too\n")
    assert not any(path.is_relative_to(layer) and inode in before
                   for path, inode in _store_files(project.store).items())


def test_json_progress_reports_hits_and_the_cause_of_each_miss(base_archive: Path, tmp_path: Path) -> None:
    dockerfile = 'FROM busybox-base\nCOPY app.txt /app.txt\nARG V\nRUN echo "[$V]" > /v\n'
    project = app_project(tmp_path, base_archive, dockerfile)

    def build(*args: str) -> tuple[dict[str, str], dict[str, dict]]:
        """(instruction -> final status, instruction -> its cache event) of a JSON-progress build."""
        done = project.store.run("build", "--progress", "json", *args, project.context)
        events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        names = {event["step"]: event["name"].split("] ", 1)[1] for event in events if event["event"] == "step"}
        status = {names[event["step"]]: event["status"] for event in events
                  if event["event"] == "step" and event["status"] != "started"}
        caches = {names[event["step"]]: event for event in events if event["event"] == "cache"}
        for event in caches.values():
            assert KINDS[event["cause"]](event["text"]), event
        assert [event for event in events if event["event"] == "result"], done.stderr
        return status, caches

    copy, run_step = "COPY app.txt /app.txt", 'RUN echo "[$V]" > /v'
    build("--build-arg", "V=1")
    status, caches = build("--build-arg", "V=1")
    assert (status[copy], status[run_step]) == ("cached", "cached")
    assert not [event for event in caches.values() if event["hit"] is False]

    (project.context / "app.txt").write_text("two\n")
    status, caches = build("--build-arg", "V=1")
    assert (status[copy], status[run_step]) == ("done", "done")
    assert strip(caches[copy]) == {"event": "cache", "hit": False, "cause": "file", "path": "app.txt",
                                   "text": "file app.txt changed"}
    assert strip(caches[run_step]) == {"event": "cache", "hit": False, "cause": "parent",
                                       "text": "a step before it changed"}

    status, caches = build("--build-arg", "V=2")
    assert (status[copy], status[run_step]) == ("cached", "done")
    assert strip(caches[run_step]) == {"event": "cache", "hit": False, "cause": "build-arg", "arg": "V", "old": "1",
                                       "new": "2", "text": "build arg V changed: 1 -> 2"}

    (project.context / "Dockerfile").write_text(dockerfile.replace("/v", "/w"))
    status, caches = build("--build-arg", "V=2")
    changed = run_step.replace("/v", "/w")
    assert (status[copy], status[changed]) == ("cached", "done")
    assert strip(caches[changed])["cause"] == "instruction"

    status, caches = build("--build-arg", "V=2", "--no-cache")
    assert [caches[name]["cause"] for name in (copy, changed)] == ["no-cache", "no-cache"]


KINDS: dict[str, Callable[[str], bool]] = {
    "file": lambda text: re.fullmatch(r"file .+ (changed|was added|was removed)", text) is not None,
    "build-arg": lambda text: text.startswith("build arg "),
    "instruction": lambda text: text == "the instruction changed",
    "base": lambda text: re.fullmatch(r"base image .+ changed", text) is not None,
    "parent": lambda text: text == "a step before it changed",
    "no-cache": lambda text: text in ("--no-cache", "--no-cache-filter"),
}


def strip(event: dict) -> dict:
    """A cache event without what varies from run to run (its time) or is checked elsewhere (its step number)."""
    return {key: value for key, value in event.items() if key not in ("time", "step")}


def test_two_builds_at_once_on_one_store_both_succeed_and_fill_one_cache(base_archive: Path,
                                                                          tmp_path: Path) -> None:
    dockerfile = ("FROM busybox-base\nCOPY app.txt /app.txt\nRUN sleep 1 && cat /app.txt > /out\n"
                  "RUN echo done > /done\n")
    project = app_project(tmp_path, base_archive, dockerfile)
    environment = {**os.environ, "PYBUILD_ROOT": str(project.store.root)}
    argv = [*PYBUILD, "build", "--progress", "plain", str(project.context)]
    processes = [subprocess.Popen(argv, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0 and "Traceback" not in stderr, stderr
    digests = {manifest_digest(subprocess.CompletedProcess(argv, 0, stdout, stderr)) for stdout, stderr in outputs}
    assert len(digests) == 1, outputs

    third = project.store.build(project.context)
    assert manifest_digest(third) in digests
    assert_outcomes(third, dockerfile, (HIT,) * 3)


def test_the_previous_build_is_remembered_per_dockerfile_and_target(base_archive: Path, tmp_path: Path) -> None:
    """Builds of other targets and other Dockerfiles in between do not lose the explanation of a miss."""
    dockerfile = ("FROM busybox-base AS a\nCOPY app.txt /app.txt\nRUN cat /app.txt > /a\n"
                  "FROM busybox-base AS b\nRUN echo b > /b\n")
    other = "FROM busybox-base\nCOPY app.txt /other.txt\n"  # another key than a's COPY: it caches nothing for a
    project = app_project(tmp_path, base_archive, dockerfile, **{"Other.Dockerfile": other})
    first = project.store.build(project.context, "--target", "a")
    assert_all_ran(first, dockerfile)

    (project.context / "app.txt").write_text("two\n")
    assert_all_ran(project.store.build(project.context, "--target", "b"), dockerfile)
    assert_all_ran(project.store.build(project.context, "-f", project.context / "Other.Dockerfile"), other)

    again = project.store.build(project.context, "--target", "a")
    assert_outcomes(again, dockerfile, (miss("file app.txt changed"), PARENT))
    assert_outcomes(project.store.build(project.context, "--target", "b"), dockerfile, (HIT,))
