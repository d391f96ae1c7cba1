"""The step cache under what real stores go through: SIGKILL at any moment, damaged entries, builds racing on
one store, cache mounts shared by concurrent builds, and `pybuild cache prune`.

Whatever happened, a build afterwards must give the image a cold build on a fresh store gives, digest for
digest: a cache that serves a wrong layer shows up nowhere else. Each test works on stores of its own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import marshal
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from e2e import PYBUILD, Pybuild, loaded, run, saved_base

pytestmark = pytest.mark.slow

SEED = 20240611  # the kill moments and the context's data; a failure names the moment to replay it

# Two stages: `gen` writes a few MB the final stage copies. The final stage has WORKDIR, COPY (plain and
# --link), RUN, a RUN with a cache mount and COPY --from, so a kill can land in every kind of step.
DOCKERFILE = """\
FROM busybox-base AS gen
COPY data.bin /src/data.bin
RUN cat /src/data.bin /src/data.bin > /gen.bin && sha256sum /gen.bin > /gen.sum
RUN echo generated > /gen.txt

FROM busybox-base
WORKDIR /app
COPY a.txt b.txt ./
COPY --link b.txt /linked/b.txt
RUN cat a.txt b.txt > ab.txt
RUN --mount=type=cache,target=/var/cache/app echo run >> /var/cache/app/runs && echo mounted > mounted.txt
COPY --from=gen /gen.bin /gen.sum /app/
RUN wc -c gen.bin > size.txt
"""
FINAL, GEN = "", "gen"  # the targets: the last stage (no --target), and the first

FILESYSTEM = {"RUN", "COPY", "ADD", "WORKDIR"}
HEX = re.compile(r"[0-9a-f]{64}")
HEADER = re.compile(r"#(\d+) \[[^\]]+\] (\S+).*")
FINISHED = re.compile(r"#(\d+) (CACHED|DONE|ERROR)\b.*")
RESULT = re.compile(r"image (sha256:[0-9a-f]{64}) manifest (sha256:[0-9a-f]{64})")


@dataclass(frozen=True)
class Reference:
    """The base image as an archive, the project, and what cold builds of each target give on a fresh store."""

    archive: Path
    context: Path
    digests: dict[str, tuple[str, str]]  # target -> (image ID, manifest digest)
    seconds: float  # how long a cold build of the final target took


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    archive = saved_base(tmp_path_factory)
    context = tmp_path_factory.mktemp("crash-project")
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "a.txt").write_text("alpha\n")
    (context / "b.txt").write_text("beta\n")
    (context / "data.bin").write_bytes(random.Random(SEED).randbytes(3 << 20))  # incompressible: slow to pack
    digests, seconds = {}, {}
    for target in (GEN, FINAL):  # each on a fresh store, so nothing is cached
        store = loaded(tmp_path_factory.mktemp("crash-cold"), archive)
        started = time.monotonic()
        digests[target] = result(store.build(context, *target_args(target)))
        seconds[target] = time.monotonic() - started
    # Files changed in the last 2 s are not remembered in cache/file-digests ("racy git"): let them age.
    time.sleep(max(0.0, (context / "data.bin").stat().st_ctime + 2.1 - time.time()))
    return Reference(archive, context, digests, seconds[FINAL])




def target_args(target: str) -> list[str]:
    return ["--target", target] if target else []


def result(done: subprocess.CompletedProcess) -> tuple[str, str]:
    """(image ID, manifest digest) from plain progress's result line."""
    found = RESULT.findall(done.stderr)
    assert found, f"no result line:\n{done.stderr}"
    return found[-1]


def outcomes(stderr: str) -> dict[str, str]:
    """Each filesystem step's instruction -> CACHED, DONE, ERROR or unfinished, from plain progress."""
    steps: dict[str, tuple[str, str]] = {}  # number -> (instruction, keyword)
    ends: dict[str, str] = {}
    for line in stderr.splitlines():
        if (header := HEADER.fullmatch(line)) and header[1] not in steps:
            steps[header[1]] = (line.split("] ", 1)[1], header[2])
        elif finished := FINISHED.fullmatch(line):
            ends[finished[1]] = finished[2]
    return {instruction: ends.get(number, "unfinished") for number, (instruction, keyword) in steps.items()
            if keyword in FILESYSTEM}


def assert_all(done: subprocess.CompletedProcess, outcome: str) -> None:
    steps = outcomes(done.stderr)
    assert steps and set(steps.values()) == {outcome}, f"expected every filesystem step {outcome}:\n{done.stderr}"


def outcome_of(done: subprocess.CompletedProcess, instruction: str) -> str:
    """The outcome of the one step whose instruction starts with ``instruction``."""
    found = [outcome for step, outcome in outcomes(done.stderr).items() if step.startswith(instruction)]
    assert len(found) == 1, f"{instruction!r} names {len(found)} steps:\n{done.stderr}"
    return found[0]


def build_or_explain(store: Pybuild, context: Path, *args: str) -> subprocess.CompletedProcess:
    """A build that must succeed; when it fails, the failure shows where, from a rerun with PYBUILD_DEBUG=1."""
    done = store.build(context, *args, check=False)
    if done.returncode != 0:
        environment = {**os.environ, "PYBUILD_ROOT": str(store.root), "PYBUILD_DEBUG": "1"}
        debug = run([*PYBUILD, "build", "--progress", "plain", *args, context], env=environment, check=False)
        raise AssertionError(f"the build failed:\n{done.stderr}\nagain with PYBUILD_DEBUG=1:\n{debug.stderr}")
    return done


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def snapshot_stores(root: Path) -> list[Path]:
    """The snapshotters' directories of unpacked layers (``snapshots/overlay``...), not their work dirs."""
    return [path for path in entries(root / "snapshots") if path.is_dir() and not path.name.startswith(".")]


def check_store(root: Path, when: str) -> None:
    """What the store must look like at any moment, a crash included: blobs whose content is their name,
    records whole and naming what is there, temp files only under temp names (a dot and the writer's pid)."""
    problems: list[str] = []

    def read_marshal(path: Path):
        try:
            return marshal.loads(path.read_bytes())
        except (EOFError, ValueError, TypeError) as exc:
            problems.append(f"{path.relative_to(root)} is not a marshal record ({exc})")
            return None

    def read_json(path: Path):
        try:
            return json.loads(path.read_bytes())
        except ValueError as exc:
            problems.append(f"{path.relative_to(root)} is not JSON ({exc}): {path.read_bytes()[:80]!r}")
            return None

    blobs: dict[str, int] = {}
    for path in entries(root / "blobs" / "sha256"):
        if not HEX.fullmatch(path.name):
            problems.append(f"blobs/sha256/{path.name}: not a digest, yet among the blobs")
        elif sha256_of(path) != path.name:
            problems.append(f"blob {path.name} ({path.stat().st_size} bytes) does not hash to its name")
        else:
            blobs["sha256:" + path.name] = path.stat().st_size

    snapshots = set()
    for store in snapshot_stores(root):
        for path in entries(store):
            if HEX.fullmatch(path.name) and path.is_dir():
                snapshots.add(path.name)
            elif not path.name.startswith("."):
                problems.append(f"{path.relative_to(root)}: neither a layer's snapshot nor a temp name")

    layer_blobs: dict[str, list[tuple[str, int]]] = {}
    for path in entries(root / "cache" / "layers"):
        if path.name.startswith("."):
            continue
        value = read_json(path)
        if value is None:
            continue
        if not HEX.fullmatch(path.name) or not isinstance(value, dict):
            problems.append(f"cache/layers/{path.name}: {value!r} is no layer record")
            continue
        layer_blobs[path.name] = []
        for media_type, entry in value.items():
            if not (isinstance(entry, list) and len(entry) == 2):
                problems.append(f"cache/layers/{path.name}: {media_type} -> {entry!r} is no [digest, size]")
                continue
            digest, size = entry
            if digest in blobs and blobs[digest] != size:  # an absent one may have been freed since
                problems.append(f"cache/layers/{path.name} names {media_type} blob {digest} of {size} bytes; "
                                f"it has {blobs[digest]}")
            layer_blobs[path.name].append((digest, size))

    for directory in entries(root / "cache" / "steps"):
        for path in entries(directory):
            if path.name.startswith("."):
                continue
            where = f"cache/steps/{directory.name}/{path.name}"
            if not (HEX.fullmatch(path.name) and path.name.startswith(directory.name)):
                problems.append(f"{where}: not a step key in its directory")
            value = read_json(path)
            if value is None:
                continue
            diff_id = value.get("diff_id", "absent") if isinstance(value, dict) else "absent"
            if diff_id is None:
                continue  # a step that changed no file
            if not (isinstance(diff_id, str) and HEX.fullmatch(diff_id.removeprefix("sha256:"))):
                problems.append(f"{where}: {value!r} names no layer")
            elif (name := diff_id.removeprefix("sha256:")) not in snapshots and not any(
                    blobs.get(digest) == size for digest, size in layer_blobs.get(name, ())):
                problems.append(f"{where}: layer {diff_id} has neither a snapshot nor an intact blob")

    for path in entries(root / "cache" / "builds"):
        if not path.name.startswith(".") and (value := read_marshal(path)) is not None and not isinstance(
                value.get("steps") if isinstance(value, dict) else None, dict):
            problems.append(f"cache/builds/{path.name}: {value!r} is no build record")
    for path in entries(root / "cache" / "parsed"):
        if not path.name.startswith("."):
            try:
                pickle.loads(path.read_bytes())
            except Exception as exc:  # whatever it raises, the entry is not whole
                problems.append(f"cache/parsed/{path.name} does not load: {exc!r}")
    if (root / "cache" / "file-digests").exists():
        try:
            marshal.loads((root / "cache" / "file-digests").read_bytes())
        except (ValueError, EOFError, TypeError) as exc:
            problems.append(f"cache/file-digests does not load: {exc!r}")
    index = read_json(root / "index.json") if (root / "index.json").exists() else {"manifests": []}
    for manifest in (index or {}).get("manifests", []):
        if manifest["digest"] not in blobs:
            problems.append(f"index.json names manifest {manifest['digest']}, which is not a whole blob")
    assert not problems, f"{when}:\n" + "\n".join(problems)


def start_build(store: Pybuild, context: Path, *args: str, log: Path) -> subprocess.Popen:
    """A build in a process group of its own, its output to ``log`` (a pipe nobody reads could stall it)."""
    environment = {**os.environ, "PYBUILD_ROOT": str(store.root)}
    with open(log, "wb") as output:
        return subprocess.Popen([*PYBUILD, "build", "--progress", "plain", *args, str(context)], env=environment,
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def group_members(group: int) -> list[int]:
    """The processes still in process group ``group``, from /proc (the third field after the command name)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def kill_after(process: subprocess.Popen, seconds: float, started: float) -> int:
    """SIGKILL the build ``seconds`` after ``started`` (only its main process, as the OOM killer would) and
    wait until nothing of it is left; its exit status (-9, or 0 when it had finished first)."""
    time.sleep(max(0.0, started + seconds - time.monotonic()))
    process.send_signal(signal.SIGKILL)
    status = process.wait()
    deadline = time.monotonic() + 10
    while group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_members(process.pid), "processes of a killed build outlived it and may still write the store"
    return status


def kill_moments(rng: random.Random, end: float, count: int) -> list[float]:
    """``count`` moments from 0.05 s to ``end``, one at random in each of as many equal spans."""
    span = (end - 0.05) / count
    return [0.05 + span * (number + rng.random()) for number in range(count)]


def test_sigkill_at_random_moments_leaves_a_store_that_builds_the_right_image(reference: Reference,
                                                                                tmp_path: Path) -> None:
    """Each kill on a store of its own: a cold build that writes the cache, killed at one moment of its run."""
    rng = random.Random(SEED)
    statuses = []
    for number, moment in enumerate(kill_moments(rng, reference.seconds, 8)):
        store = loaded(tmp_path / f"store-{number}", reference.archive)
        started = time.monotonic()
        process = start_build(store, reference.context, "-t", "crash", log=tmp_path / f"killed-{number}.log")
        statuses.append(kill_after(process, moment, started))
        when = f"after a SIGKILL {moment:.3f}s into the build (seed {SEED}, kill {number})"
        check_store(store.root, when)

        recovered = store.build(reference.context, "-t", "crash")
        assert result(recovered) == reference.digests[FINAL], f"{when}: the next build differs\n{recovered.stderr}"
        check_store(store.root, f"{when}, then a whole build")
        leftovers = [*(store.root / "tmp").glob(f"*-{process.pid}-*"),
                     *(store.root / "snapshots" / ".unpacking").glob(f"*-{process.pid}-*")]
        assert not leftovers, f"{when}: the next build did not sweep what the killed one left"
        again = store.build(reference.context, "-t", "crash")
        assert_all(again, "CACHED")
        assert result(again) == reference.digests[FINAL], again.stderr
    assert statuses.count(-signal.SIGKILL) >= 4, f"too few kills landed while a build ran: {statuses}"


@pytest.fixture
def warm(reference: Reference, tmp_path: Path) -> Pybuild:
    """A store where the project was built once: every step is in its cache."""
    store = loaded(tmp_path / "warm", reference.archive)
    store.build(reference.context, "-t", "crash")
    return store


def layer_holding(store: Pybuild, path: str) -> str:
    """The diff_id of the one unpacked layer that holds ``path`` (as a step's snapshot has it)."""
    found = [snapshot.name for directory in snapshot_stores(store.root) for snapshot in entries(directory)
             if HEX.fullmatch(snapshot.name) and os.path.lexists(snapshot / path)]
    assert len(found) == 1, f"{path} is in {len(found)} snapshots"
    return "sha256:" + found[0]


def records_naming(store: Pybuild, diff_id: str) -> list[Path]:
    """The step records whose step made the layer ``diff_id``."""
    return [path for path in (store.root / "cache" / "steps").glob("*/*")
            if HEX.fullmatch(path.name) and json.loads(path.read_bytes()).get("diff_id") == diff_id]


def test_a_damaged_layer_blob_is_named_and_its_step_runs_again(reference: Reference, warm: Pybuild) -> None:
    """Its snapshot removed first, so the hit has to unpack the blob, and finds it does not match."""
    diff_id = layer_holding(warm, "app/ab.txt")
    for directory in snapshot_stores(warm.root):
        shutil.rmtree(directory / diff_id.removeprefix("sha256:"), ignore_errors=True)
    record = json.loads((warm.root / "cache" / "layers" / diff_id.removeprefix("sha256:")).read_bytes())
    (digest, _), = record.values()
    blob = warm.root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(byte ^ 0xFF for byte in data[middle:middle + 8])  # same size, other bytes
    blob.write_bytes(bytes(data))

    done = warm.build(reference.context, "-t", "crash")
    warnings = [line for line in done.stderr.splitlines() if "[warning]" in line]
    assert any(diff_id in line for line in warnings), f"no warning names {diff_id}:\n{done.stderr}"
    assert outcome_of(done, "RUN cat a.txt b.txt") == "DONE", done.stderr
    assert outcome_of(done, "COPY a.txt b.txt") == "CACHED", done.stderr
    assert result(done) == reference.digests[FINAL]
    check_store(warm.root, "after the damaged blob was found")
    assert_all(warm.build(reference.context), "CACHED")


def test_unreadable_step_records_are_misses(reference: Reference, warm: Pybuild) -> None:
    """Cut short, binary junk, JSON of another shape: each its own step's, which runs again; the rest hit."""
    damage = {"COPY a.txt b.txt": lambda text: b"\x00\xffnot json at all\x00",
              "RUN cat a.txt b.txt": lambda text: text[:len(text) // 2],
              "RUN wc -c gen.bin": lambda text: b'{"diff_id": 7}'}
    records = [records_naming(warm, layer_holding(warm, path)) for path in ("app/a.txt", "app/ab.txt", "app/size.txt")]
    for change, (record,) in zip(damage.values(), records, strict=True):
        record.write_bytes(change(record.read_bytes()))

    done = warm.build(reference.context, "-t", "crash")
    expected = {step: "DONE" if step.startswith(tuple(damage)) else "CACHED" for step in outcomes(done.stderr)}
    assert outcomes(done.stderr) == expected, done.stderr
    assert result(done) == reference.digests[FINAL]
    check_store(warm.root, "after damaged step records were read")
    assert_all(warm.build(reference.context), "CACHED")


FILE_DIGESTS_DAMAGE = {
    "random bytes": lambda data: random.Random(SEED).randbytes(4096),
    "cut short": lambda data: data[:len(data) // 2],
    "empty": lambda data: b"",
    "not a dict": lambda data: marshal.dumps(["a", "list"]),
    "entries of another shape": lambda data: marshal.dumps(dict.fromkeys(marshal.loads(data), 0)),
}


@pytest.mark.parametrize("damage", list(FILE_DIGESTS_DAMAGE))
def test_a_garbage_file_digest_memo_costs_only_hashing_again(reference: Reference, warm: Pybuild,
                                                             damage: str) -> None:
    memo = warm.root / "cache" / "file-digests"
    assert memo.exists(), "the warm build remembered no file digest"
    memo.write_bytes(FILE_DIGESTS_DAMAGE[damage](memo.read_bytes()))
    # The one-stage target first: when another stage fails, the final stage's error hides the first one's.
    for target in (GEN, FINAL):
        done = build_or_explain(warm, reference.context, *target_args(target))
        assert_all(done, "CACHED")
        assert result(done) == reference.digests[target]
    check_store(warm.root, f"after a file-digests memo of {damage}")


PARSED_DAMAGE = {
    "cut short": lambda data: data[:len(data) // 2],
    "empty": lambda data: b"",
    "zeros": lambda data: bytes(len(data)),
    "a line of text": lambda data: b"garbage\n",  # pickle reads 'g' as its GET opcode: ValueError, not Unpickling
    "another pickled value": lambda data: pickle.dumps({"not": "a Dockerfile"}),
}


@pytest.mark.parametrize("damage", list(PARSED_DAMAGE))
def test_a_garbage_parsed_dockerfile_is_parsed_again(reference: Reference, warm: Pybuild, damage: str) -> None:
    parsed = [path for path in entries(warm.root / "cache" / "parsed") if not path.name.startswith(".")]
    assert parsed, "the warm build left no parsed Dockerfile"
    for path in parsed:
        path.write_bytes(PARSED_DAMAGE[damage](path.read_bytes()))
    # The Dockerfile's stat changes, its bytes do not: the rebuild cannot be given without the builder
    # (builder.rebuild), so the full path reads the damaged entry, the case this test is about.
    dockerfile = reference.context / "Dockerfile"
    os.utime(dockerfile, ns=(dockerfile.stat().st_atime_ns, dockerfile.stat().st_mtime_ns + 1))
    done = build_or_explain(warm, reference.context, "-t", "crash")
    assert_all(done, "CACHED")
    assert result(done) == reference.digests[FINAL]
    check_store(warm.root, f"after a parsed Dockerfile of {damage}")  # the entry is whole again


BUILD_RECORD_DAMAGE = {
    "cut short": lambda record: marshal.dumps(record)[:100],
    "binary junk": lambda record: b"\x00\x01 no record here",
    "steps of another shape": lambda record: marshal.dumps({"steps": ["a", "list"]}),
    "inputs of another shape": lambda record: marshal.dumps({"steps": {
        place: {"key": "0" * 64, "inputs": {"instruction": step["inputs"]["instruction"], "args": 1, "files": 2}}
        for place, step in record["steps"].items()}}),
}


@pytest.mark.parametrize("damage", list(BUILD_RECORD_DAMAGE))
def test_a_garbage_previous_build_record_only_loses_the_explanation(reference: Reference, warm: Pybuild,
                                                                    damage: str) -> None:
    """The record explains a miss: one step's cache entry is dropped, so that step misses and reads it."""
    record_path, = [path for path in entries(warm.root / "cache" / "builds") if HEX.fullmatch(path.name)]
    record_path.write_bytes(BUILD_RECORD_DAMAGE[damage](marshal.loads(record_path.read_bytes())))
    record, = records_naming(warm, layer_holding(warm, "app/ab.txt"))
    record.unlink()
    done = build_or_explain(warm, reference.context, "-t", "crash")
    expected = {step: "DONE" if step.startswith("RUN cat a.txt b.txt") else "CACHED" for step in outcomes(done.stderr)}
    assert outcomes(done.stderr) == expected, done.stderr
    assert result(done) == reference.digests[FINAL]
    check_store(warm.root, f"after a previous-build record of {damage}")


def run_together(store: Pybuild, context: Path, targets: Sequence[str], logs: Path) -> list[str]:
    """Builds of ``targets`` started at once on one store; each one's output, once all have ended."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = [start_build(store, context, "-t", f"race:{target or 'final'}", *target_args(target),
                             log=logs / f"{number}.log") for number, target in enumerate(targets)]
    for process in processes:
        process.wait(timeout=300)
    texts = [(logs / f"{number}.log").read_text() for number in range(len(targets))]
    for process, text in zip(processes, texts, strict=True):
        assert process.returncode == 0, f"a concurrent build failed ({process.returncode}):\n{text}"
        assert "Traceback" not in text, text
    return texts


@pytest.mark.parametrize("targets", [(FINAL, FINAL), (FINAL, GEN, FINAL), (FINAL, GEN, FINAL, GEN)],
                         ids=["two-same", "three-mixed", "four-mixed"])
def test_builds_at_once_on_one_store_all_give_the_cold_image(reference: Reference, tmp_path: Path,
                                                              targets: tuple[str, ...]) -> None:
    store = loaded(tmp_path / "store", reference.archive)
    texts = run_together(store, reference.context, targets, tmp_path / "logs")
    for target, text in zip(targets, texts, strict=True):
        assert RESULT.findall(text)[-1] == reference.digests[target], text
    check_store(store.root, f"after {len(targets)} builds at once")
    after = store.build(reference.context)
    assert_all(after, "CACHED")
    assert result(after) == reference.digests[FINAL]


MOUNT_DOCKERFILE = """\
FROM busybox-base
ARG WHO
RUN --mount=type=cache,target=/cache,sharing={sharing} \\
    read up idle < /proc/uptime && echo "start $WHO $up" >> /cache/log && sleep 1 && \\
    read up idle < /proc/uptime && echo "end $WHO $up" >> /cache/log && echo "$WHO" > /who
"""


def intervals(log: str) -> dict[str, list[tuple[float, float]]]:
    """Each builder's (start, end) times in the cache's log, in the order written."""
    starts: dict[str, list[float]] = {}
    found: dict[str, list[tuple[float, float]]] = {}
    for line in log.splitlines():
        event, who, uptime = line.split()
        if event == "start":
            starts.setdefault(who, []).append(float(uptime))
        else:
            found.setdefault(who, []).append((starts[who].pop(0), float(uptime)))
    return found


def layer_members(archive: Path) -> list[tuple[str, bytes]]:
    """(name, content) of every file in the image's layers, read from an OCI archive."""
    members = []
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))
        manifest = json.load(outer.extractfile("blobs/sha256/" + index["manifests"][0]["digest"][7:]))
        for layer in manifest["layers"]:
            data = outer.extractfile("blobs/sha256/" + layer["digest"][7:]).read()
            if layer["mediaType"].endswith("zstd"):
                data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
            elif layer["mediaType"].endswith("gzip"):
                data = gzip.decompress(data)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                members += [(member.name.removeprefix("./").lstrip("/"),
                             tar.extractfile(member).read() if member.isfile() else b"") for member in tar]
    return members


@pytest.mark.parametrize("sharing", ["locked", "shared"])
def test_cache_mounts_shared_by_concurrent_builds(reference: Reference, tmp_path: Path, sharing: str) -> None:
    """locked: one build's RUN at a time; shared: both at once. The content stays between builds, out of images."""
    store = loaded(tmp_path / "store", reference.archive)
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(MOUNT_DOCKERFILE.format(sharing=sharing))
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = [start_build(store, context, "--build-arg", f"WHO={who}", log=logs / who)
                 for who in ("one", "two")]
    for process in processes:
        process.wait(timeout=120)
    for process, who in zip(processes, ("one", "two"), strict=True):
        assert process.returncode == 0, (logs / who).read_text()

    cache_log, = (store.root / "cache" / "mounts").glob("*/*/log")
    seen = intervals(cache_log.read_text())
    (one,), (two,) = seen["one"], seen["two"]
    assert all(end - start >= 0.9 for start, end in (one, two)), seen
    overlap = max(one[0], two[0]) < min(one[1], two[1])
    assert overlap == (sharing == "shared"), f"sharing={sharing}: {seen}"

    again = store.build(context, "--build-arg", "WHO=one", "--no-cache", "-t", "mounted")
    assert outcome_of(again, "RUN --mount=type=cache") == "DONE", again.stderr
    runs = {who: len(found) for who, found in intervals(cache_log.read_text()).items()}
    assert runs == {"one": 2, "two": 1}, cache_log.read_text()
    members = layer_members(store.save("mounted", tmp_path / "mounted.tar"))
    assert ("who", b"one\n") in members
    assert not [name for name, data in members if name.startswith("cache/") or b"start one" in data], members


def mount_instances(store: Pybuild) -> list[Path]:
    return [path for path in (store.root / "cache" / "mounts").glob("*/*") if path.is_dir()]


@pytest.mark.parametrize("flags", [(), ("--all",)], ids=["cache-prune", "cache-prune-all"])
def test_cache_prune_empties_the_cache_and_the_next_build_runs_every_step(reference: Reference, warm: Pybuild,
                                                                           flags: tuple[str, ...]) -> None:
    """Only `--all` empties the cache mounts too (the CLI's choice): the mount RUN then finds its cache empty."""
    assert list((warm.root / "cache" / "steps").glob("*/*")) and mount_instances(warm)
    warm.run("cache", "prune", *flags)
    assert not [path for path in (warm.root / "cache" / "steps").glob("*/*") if HEX.fullmatch(path.name)]
    assert bool(mount_instances(warm)) == (not flags), mount_instances(warm)
    assert re.search(r"cache entries\s+0\b", warm.run("cache", "du").stdout)

    done = warm.build(reference.context, "-t", "crash")
    assert "CACHED" not in done.stderr, done.stderr
    assert_all(done, "DONE")
    assert result(done) == reference.digests[FINAL]
    runs, = (warm.root / "cache" / "mounts").glob("*/*/runs")
    assert runs.read_text() == "run\n" * (1 if flags else 2)
    check_store(warm.root, "after cache prune and a build")
