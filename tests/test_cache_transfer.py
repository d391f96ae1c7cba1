"""A build cache carried between stores (--cache-to / --cache-from type=local), and --dry-run, end to end.

One cold build writes the cache of a two-stage project twice, mode=min and mode=max; fresh stores, which
hold nothing but the base image, then build the same project from either directory. Whatever a step took
from the directory, the image must be the cold build's, digest for digest. A dry run must say what a build
would do (``#N CACHED``, or ``#N cache miss: <why>`` and ``#N WOULD RUN``) and leave the store as it was.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e import Pybuild, loaded, require_root, run, saved_base
from test_cache_build import (
    HIT,
    PARENT,
    RUN,
    assert_outcomes,
    dockerfile_order,
    keyword,
    manifest_digest,
    miss,
    parse_plain,
    write_files,
)

from cache.transfer import CACHE_CONFIG_TYPE, CACHE_NAME, DIFF_ID_ANNOTATION, CacheSource

pytestmark = pytest.mark.slow

# Two stages; the image is the last one's, so mode=min leaves out the steps of "build".
DOCKERFILE = """\
FROM busybox-base AS build
COPY tool.txt /tool.txt
RUN cat /tool.txt > /built
FROM busybox-base AS final
COPY app.txt /app/app.txt
ENV MODE=a
RUN cat /app/app.txt > /app/out
RUN true
COPY --from=build /built /app/built
"""
FILES = {"Dockerfile": DOCKERFILE, "tool.txt": "tool\n", "app.txt": "app\n"}
TARGET = ("--target", "final")
# the filesystem steps in Dockerfile order: build's COPY and RUN, then final's COPY, RUN, RUN true, COPY --from
BUILD_STEPS, FINAL_STEPS = 2, 4


@pytest.fixture(scope="module")
def base_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox-base built once and saved, loaded into each fresh store (as test_cache_build does)."""
    return saved_base(tmp_path_factory, "skopeo")


@dataclass(frozen=True)
class Exported:
    """The cold build every test compares with, and the two cache directories it wrote."""

    context: Path
    digest: str  # the image's manifest digest
    diff_ids: tuple[str, ...]  # the image's layers: the base's, then final's COPY, RUN, COPY --from
    min_dir: Path
    max_dir: Path


@pytest.fixture(scope="module")
def exported(base_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    work = tmp_path_factory.mktemp("transfer-cold")
    context = work / "context"
    context.mkdir()
    write_files(context, FILES)
    store = loaded(work / "store", base_archive)
    min_dir, max_dir = work / "cache-min", work / "cache-max"
    done = store.build(context, *TARGET, "-t", "app", "--cache-to", f"type=local,dest={min_dir}",
                       "--cache-to", f"type=local,dest={max_dir},mode=max")
    assert_outcomes(done, DOCKERFILE, (RUN,) * (BUILD_STEPS + FINAL_STEPS))
    config = json.loads(store.run("inspect", "app").stdout)
    return Exported(context, manifest_digest(done), tuple(config["rootfs"]["diff_ids"]), min_dir, max_dir)


def cache_manifest(directory: Path) -> dict:
    return json.loads(run(["skopeo", "inspect", "--raw", f"oci:{directory}:{CACHE_NAME}"]).stdout)


def blob_of(directory: Path, diff_id: str) -> Path:
    """The file in a cache directory that holds the blob of layer ``diff_id``."""
    digests = [entry["digest"] for entry in cache_manifest(directory)["layers"]
               if entry["annotations"][DIFF_ID_ANNOTATION] == diff_id]
    assert len(digests) == 1, f"{diff_id} is not in {directory}"
    return directory / "blobs" / "sha256" / digests[0].removeprefix("sha256:")


# --- --cache-to, then --cache-from on a fresh store -----------------------------------------------------------

@pytest.mark.parametrize(("mode", "expected"), [
    # min: only the image's stage; build's steps run, and make the same layers, so the COPY --from hits
    ("min", (RUN,) * BUILD_STEPS + (HIT,) * FINAL_STEPS),
    ("max", (HIT,) * (BUILD_STEPS + FINAL_STEPS)),
])
def test_a_fresh_store_builds_from_the_cache_dir(exported: Exported, base_archive: Path, tmp_path: Path,
                                                 mode: str, expected: tuple[str, ...]) -> None:
    store = loaded(tmp_path / "store", base_archive)
    directory = exported.min_dir if mode == "min" else exported.max_dir
    done = store.build(exported.context, *TARGET, "--cache-from", f"type=local,src={directory}")
    assert_outcomes(done, DOCKERFILE, expected)
    assert manifest_digest(done) == exported.digest, "a build from the cache dir differs from the cold build"
    # what it took from the directory is the store's own now
    again = store.build(exported.context, *TARGET)
    assert_outcomes(again, DOCKERFILE, (HIT,) * (BUILD_STEPS + FINAL_STEPS))
    assert manifest_digest(again) == exported.digest


@pytest.mark.parametrize("mode", ["min", "max"])
def test_the_cache_dir_is_an_oci_layout_skopeo_reads_and_copies(exported: Exported, tmp_path: Path,
                                                                mode: str) -> None:
    directory = exported.min_dir if mode == "min" else exported.max_dir
    manifest = cache_manifest(directory)
    assert manifest["config"]["mediaType"] == CACHE_CONFIG_TYPE
    layers = [entry["annotations"][DIFF_ID_ANNOTATION] for entry in manifest["layers"]]
    final_layers = set(exported.diff_ids[-3:])  # final's COPY, RUN, COPY --from; RUN true made none
    if mode == "min":
        assert set(layers) == final_layers
    else:
        assert final_layers < set(layers) and len(set(layers)) == len(layers) == 5
    records = json.loads(run(["skopeo", "inspect", "--raw", "--config", f"oci:{directory}:{CACHE_NAME}"]).stdout)
    assert len(records["steps"]) == (FINAL_STEPS if mode == "min" else BUILD_STEPS + FINAL_STEPS)
    assert [record["diff_id"] for record in records["steps"]].count(None) == 1  # RUN true
    # skopeo copies it blob by blob, checking each digest, and the copy is the same cache
    copy = tmp_path / "copy"
    run(["skopeo", "copy", "-q", f"oci:{directory}:{CACHE_NAME}", f"oci:{copy}:{CACHE_NAME}"])
    assert CacheSource(copy).steps == CacheSource(directory).steps


def _delete(path: Path) -> None:
    path.unlink()


def _damage(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # a new file: never write through what may be a hard link into another store
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))


@pytest.mark.parametrize("change", [_delete, _damage], ids=["deleted", "damaged"])
def test_a_blob_gone_from_the_cache_dir_warns_and_its_step_runs(exported: Exported, base_archive: Path,
                                                                tmp_path: Path, change) -> None:
    directory = Path(shutil.copytree(exported.max_dir, tmp_path / "cache"))
    copied = exported.diff_ids[-3]  # the layer of final's COPY app.txt
    change(blob_of(directory, copied))
    store = loaded(tmp_path / "store", base_archive)
    done = store.build(exported.context, *TARGET, "--cache-from", f"type=local,src={directory}")
    warning = (f"[warning] --cache-from {directory}: the blob of layer {copied} is missing or damaged there; "
               "the step runs")
    assert warning in done.stderr.splitlines(), done.stderr
    # the COPY ran and made the same layer, so what follows it still hits
    assert_outcomes(done, DOCKERFILE, (HIT, HIT, RUN, HIT, HIT, HIT))
    assert manifest_digest(done) == exported.digest


# --- flags pybuild does not take --------------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--cache-from", "type=gha,scope=x", "type=gha is not supported by pybuild"),
    ("--cache-from", "type=registry", "ref= is required"),
    ("--cache-from", "type=registry,ref=localhost:9/cache", "cannot reach registry localhost:9"),
    ("--cache-to", "type=registry,ref=x,compression=zstd", "option 'compression' is not supported"),
    ("--cache-from", "type=local", "src= is required"),
    ("--cache-from", "type=local,src={work}/cache,mode=max", "option 'mode' is not supported"),
    ("--cache-from", "type=local,src={work}/missing", "no such directory"),
    ("--cache-from", "type=local,src={work}", "index.json is missing"),  # a directory, but no cache
    ("--cache-to", "type=local", "dest= is required"),
    ("--cache-to", "type=local,dest={work}/cache,mode=all", "mode must be min or max"),
    ("--cache-to", "type=local,dest={work}/cache,compression=zstd", "option 'compression' is not supported"),
    ("--cache-to", "type=local,dest={work}/Dockerfile", "is not a directory"),
])
def test_a_bad_cache_flag_is_a_one_line_error(tmp_path: Path, flag: str, value: str, message: str) -> None:
    require_root()  # the last checks are made where the build runs, in its namespace
    work = tmp_path / "context"
    work.mkdir()
    write_files(work, {"Dockerfile": "FROM busybox-base\nRUN true\n"})
    done = Pybuild(tmp_path / "store").build(work, flag, value.format(work=work), check=False)
    assert done.returncode != 0
    first, *rest = [line for line in done.stderr.splitlines() if not line.startswith("isolation: ")]
    assert first.startswith(f"pybuild: error: {flag}") and message in first, done.stderr
    assert all(line.startswith("hint: ") for line in rest), done.stderr
    assert done.stdout == "" and not (work / "cache").exists()


# --- --dry-run ----------------------------------------------------------------------------------------------------

CACHED = "cached"
WOULD_RUN = re.compile(r"#(\d+) WOULD RUN")


def would_run(cause: str) -> str:
    return f"would-run:{cause}"


def planned(done: subprocess.CompletedProcess, dockerfile: str) -> list[str]:
    """Each filesystem step of a dry run in Dockerfile order: "cached", or "would-run:<its cause>".

    A step that would run says why, first, then ``#N WOULD RUN`` and nothing else; none is DONE.
    """
    steps = parse_plain(done.stderr)
    would = {int(match[1]) for line in done.stderr.splitlines() if (match := WOULD_RUN.fullmatch(line))}
    number_of = {report: number for number, report in steps.items()}
    out = []
    for report in dockerfile_order(steps, dockerfile):
        kind = keyword(report.title)
        if kind == "FROM":
            continue
        if kind not in ("RUN", "COPY", "ADD", "WORKDIR"):
            assert (report.outcome, report.cause) == ("done", None), f"config-only step {report}\n{done.stderr}"
        elif number_of[report] in would and report.outcome is None and report.cause is not None:
            out.append(would_run(report.cause))
        elif report.outcome == "cached" and report.cause is None and number_of[report] not in would:
            out.append(CACHED)
        else:
            out.append(f"unexpected {report.outcome}, cause {report.cause}")
    return out


def summary(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def store_state(root: Path) -> dict[str, object]:
    """What a build leaves in a store: images, blobs, step and layer records, build records, snapshots.

    Not the memo caches that change no build's result: parsed Dockerfiles and remembered file digests.
    """
    def names(path: Path) -> list[str]:
        return sorted(str(entry.relative_to(path)) for entry in path.rglob("*") if entry.is_file())

    return {"index.json": (root / "index.json").read_bytes() if (root / "index.json").exists() else None,
            "blobs": names(root / "blobs"), "steps": names(root / "cache" / "steps"),
            "layers": names(root / "cache" / "layers"), "builds": names(root / "cache" / "builds"),
            "snapshots": sorted(entry.name for entry in (root / "snapshots" / "overlay").iterdir())
            if (root / "snapshots" / "overlay").is_dir() else []}


def test_a_dry_run_on_a_fresh_store_would_run_every_step_and_writes_nothing(exported: Exported, base_archive: Path,
                                                                          tmp_path: Path) -> None:
    store = loaded(tmp_path / "store", base_archive)
    before, images = store_state(store.root), store.run("images").stdout
    out = tmp_path / "out"
    done = store.build(exported.context, *TARGET, "--dry-run", "-t", "dry:1", "-o", f"type=oci,dest={out}/image.tar",
                       "-o", f"type=local,dest={out}/rootfs", "--iidfile", out / "iid",
                       "--metadata-file", out / "metadata.json", "--cache-to", f"type=local,dest={out}/cache")
    # the first step of each stage is not in the cache; after it, no key is known: a step before it runs
    assert planned(done, DOCKERFILE) == [
        would_run("not in the cache"), would_run("a step before it runs"),
        would_run("not in the cache"), *[would_run("a step before it runs")] * 3,
    ], done.stderr
    assert summary(done) == "dry run: 0 steps cached, 6 would run; nothing was run or stored"
    assert not out.exists(), sorted(out.rglob("*"))
    assert store.run("images").stdout == images
    assert store_state(store.root) == before


def test_a_dry_run_after_a_build_says_what_hits_and_why_the_rest_would_run(base_archive: Path,
                                                                          tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    write_files(context, FILES)
    store = loaded(tmp_path / "store", base_archive)
    store.build(context, *TARGET)
    done = store.build(context, *TARGET, "--dry-run")
    assert planned(done, DOCKERFILE) == [CACHED] * 6, done.stderr
    assert summary(done) == "dry run: 6 steps cached, 0 would run; nothing was run or stored"

    (context / "tool.txt").write_text("tool, edited\n")
    before = store_state(store.root)
    done = store.build(context, *TARGET, "--dry-run")
    assert planned(done, DOCKERFILE) == [
        would_run("file tool.txt changed"), would_run("a step before it runs"),
        CACHED, CACHED, CACHED, would_run("stage build runs first"),
    ], done.stderr
    assert summary(done) == "dry run: 3 steps cached, 3 would run; nothing was run or stored"
    assert store_state(store.root) == before
    # the build then does what the dry run said, and still explains against the build before the dry run
    built = store.build(context, *TARGET)
    assert_outcomes(built, DOCKERFILE, (miss("file tool.txt changed"), PARENT, HIT, HIT, HIT, PARENT))


def test_a_dry_run_from_a_cache_dir_brings_nothing_in(exported: Exported, base_archive: Path,
                                                      tmp_path: Path) -> None:
    store = loaded(tmp_path / "store", base_archive)
    before = store_state(store.root)
    done = store.build(exported.context, *TARGET, "--dry-run", "--cache-from", f"type=local,src={exported.max_dir}")
    assert planned(done, DOCKERFILE) == [CACHED] * 6, done.stderr
    assert store_state(store.root) == before


def test_a_dry_run_does_not_count_on_a_blob_gone_from_the_cache_dir(exported: Exported, base_archive: Path,
                                                                    tmp_path: Path) -> None:
    """The build warns and runs the step whose blob the directory lost; the dry run must not call it cached."""
    directory = Path(shutil.copytree(exported.max_dir, tmp_path / "cache"))
    blob_of(directory, exported.diff_ids[-3]).unlink()  # final's COPY app.txt
    store = loaded(tmp_path / "store", base_archive)
    plan = planned(store.build(exported.context, *TARGET, "--dry-run", "--cache-from", f"type=local,src={directory}"),
                   DOCKERFILE)
    built = store.build(exported.context, *TARGET, "--cache-from", f"type=local,src={directory}")
    assert_outcomes(built, DOCKERFILE, (HIT, HIT, RUN, HIT, HIT, HIT))
    assert plan[:2] == [CACHED, CACHED], plan
    assert plan[2].startswith("would-run:"), f"the dry run said {plan}; the build ran final's COPY app.txt"


def test_a_dry_run_from_an_oci_archive_adds_no_blobs(base_archive: Path, tmp_path: Path) -> None:
    """FROM oci-archive: the dry run reads the image; a build would store its blobs, a dry run must not."""
    context = tmp_path / "context"
    context.mkdir()
    dockerfile = f"FROM oci-archive:{base_archive}\nRUN echo hi > /hi\n"
    write_files(context, {"Dockerfile": dockerfile})
    store = Pybuild(tmp_path / "store")
    done = store.build(context, "--dry-run")
    # the archive is read only when the build runs, so the FROM says so and the RUN's key waits for it
    assert f"#1 cache miss: oci-archive:{base_archive} is read when the build runs" in done.stderr, done.stderr
    assert planned(done, dockerfile) == [would_run("a step before it runs")], done.stderr
    assert store.run("images").stdout.splitlines()[1:] == []
    added = store_state(store.root)["blobs"]
    assert added == [], f"a dry run stored {len(added)} blobs: {added}"
