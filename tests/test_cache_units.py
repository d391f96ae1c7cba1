"""The step cache's parts on their own, without a build: keys, miss causes, records, file digests, cache dirs.

Each part is held to what the README's "The build cache" promises of it: a key covers what can change a
layer and nothing else, a miss names its first cause, a record is whole or absent, a file is read again
whenever its stat cannot vouch for it, and a cache directory brings in only blobs whose digest checks.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cache.files
from builder.fs.context import BuildContext
from builder.keys import TreeDigests
from builder.ops import CopyOp
from cache.blobs import BlobStore
from cache.files import RACY_NS, FileDigests
from cache.index import TEMP_PREFIX, LayerBlob, LayerBlobs, StepIndex, StepResult, read_record, write_record
from cache.keys import miss_cause, step_key
from cache.transfer import CACHE_NAME, DIFF_ID_ANNOTATION, CachedStep, CacheSource, write_cache
from parser.errors import PybuildError
from parser.instructions import Copy, parse

ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def sha(data: bytes | str) -> str:
    return "sha256:" + hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def layer(name: str) -> str:
    """A made-up diff_id, told apart by ``name``."""
    return sha(f"layer {name}")


# --- cache.keys: what a step's inputs look like, and how two of them differ ----------------------------------

BASE = [layer("base-1"), layer("base-2")]


def inputs(**sections: Any) -> dict[str, Any]:
    """A RUN step's inputs as the builder gives them, directly on its base, with ``sections`` replaced."""
    value: dict[str, Any] = {
        "instruction": "RUN make",
        "base": {"ref": "base:1", "layers": BASE},
        "parent": BASE,
        "op": {"kind": "run", "argv": ["/bin/sh", "-c", "make"], "env": [["PATH", "/bin"], ["MODE", "a"]],
               "user": "", "cwd": "/", "network": "default", "mounts": [], "scripts": []},
        "args": {"V": "1"},
        "files": {"src/a.txt": "f:644:" + "a" * 64},
        "sources": {},
        "env": {"epoch": 0, "platform": "linux/amd64"},
    }
    value.update(sections)
    return value


def op(**fields: Any) -> dict[str, Any]:
    return {**inputs()["op"], **fields}


NEW_BASE = {"ref": "base:1", "layers": [layer("base-1"), layer("base-2-rebuilt")]}
AFTER_A_STEP = [*BASE, layer("step")]

# (id, old inputs, new inputs, kind, text, details): each cause alone, then pairs that show which comes first
MISS_CAUSES = [
    ("instruction", inputs(), inputs(instruction="RUN make all"), "instruction", "the instruction changed", {}),
    ("instruction-before-build-arg", inputs(), inputs(instruction="RUN make all", args={"V": "2"}),
     "instruction", "the instruction changed", {}),
    ("build-arg-changed", inputs(), inputs(args={"V": "2"}),
     "build-arg", "build arg V changed: 1 -> 2", {"arg": "V", "old": "1", "new": "2"}),
    ("build-arg-set", inputs(args={}), inputs(),
     "build-arg", "build arg V changed: (unset) -> 1", {"arg": "V", "old": "(unset)", "new": "1"}),
    ("build-arg-unset", inputs(), inputs(args={}),
     "build-arg", "build arg V changed: 1 -> (unset)", {"arg": "V", "old": "1", "new": "(unset)"}),
    ("build-args-by-name", inputs(args={"B": "1", "A": "1"}), inputs(args={"B": "2", "A": "2"}),
     "build-arg", "build arg A changed: 1 -> 2", {"arg": "A", "old": "1", "new": "2"}),
    ("build-arg-before-file", inputs(), inputs(args={"V": "2"}, files={}),
     "build-arg", "build arg V changed: 1 -> 2", {"arg": "V", "old": "1", "new": "2"}),
    ("file-changed", inputs(), inputs(files={"src/a.txt": "f:644:" + "b" * 64}),
     "file", "file src/a.txt changed", {"path": "src/a.txt"}),
    ("file-added", inputs(), inputs(files={**inputs()["files"], "src/b.txt": "f:644:" + "b" * 64}),
     "file", "file src/b.txt was added", {"path": "src/b.txt"}),
    ("file-removed", inputs(), inputs(files={}), "file", "file src/a.txt was removed", {"path": "src/a.txt"}),
    ("files-by-path", inputs(files={"z": "f:1", "m": "f:1"}), inputs(files={"z": "f:2", "m": "f:2"}),
     "file", "file m changed", {"path": "m"}),
    ("file-before-base", inputs(), inputs(files={}, base=NEW_BASE, parent=NEW_BASE["layers"]),
     "file", "file src/a.txt was removed", {"path": "src/a.txt"}),
    ("base", inputs(), inputs(base=NEW_BASE, parent=NEW_BASE["layers"]),
     "base", "base image base:1 changed", {"ref": "base:1"}),
    # a step after another one: the one before it made another layer, whatever the base did
    ("parent-after-a-step", inputs(parent=AFTER_A_STEP), inputs(parent=[*BASE, layer("other step")]),
     "parent", "a step before it changed", {}),
    ("parent-after-a-step-on-a-new-base", inputs(parent=AFTER_A_STEP),
     inputs(base=NEW_BASE, parent=[*NEW_BASE["layers"], layer("step")]), "parent", "a step before it changed", {}),
    ("parent-on-the-same-base", inputs(), inputs(parent=[*BASE, layer("copy --link")]),
     "parent", "a step before it changed", {}),
    ("base-before-sources", inputs(), inputs(base=NEW_BASE, parent=NEW_BASE["layers"], sources={"from": ["x"]}),
     "base", "base image base:1 changed", {"ref": "base:1"}),
    ("sources", inputs(sources={"from": [layer("stage")]}), inputs(sources={"from": [layer("stage rebuilt")]}),
     "parent", "a step before it changed", {}),
    ("sources-before-env", inputs(), inputs(sources={"secrets": ["token"]}, op=op(env=[["MODE", "b"]])),
     "parent", "a step before it changed", {}),
    ("env-changed", inputs(), inputs(op=op(env=[["PATH", "/bin"], ["MODE", "b"]])),
     "env", "environment variable MODE changed: a -> b", {"name": "MODE"}),
    ("env-added", inputs(), inputs(op=op(env=[["PATH", "/bin"], ["MODE", "a"], ["DEBUG", "1"]])),
     "env", "environment variable DEBUG changed: (unset) -> 1", {"name": "DEBUG"}),
    ("env-removed", inputs(), inputs(op=op(env=[["PATH", "/bin"]])),
     "env", "environment variable MODE changed: a -> (unset)", {"name": "MODE"}),
    ("env-before-other-op-field", inputs(), inputs(op=op(env=[["MODE", "a"]], cwd="/app")),
     "env", "environment variable PATH changed: /bin -> (unset)", {"name": "PATH"}),
    ("op-field", inputs(), inputs(op=op(cwd="/app")), "instruction", "the step's cwd changed", {"field": "cwd"}),
    ("op-fields-by-name", inputs(), inputs(op=op(user="www", argv=["make"])),
     "instruction", "the step's argv changed", {"field": "argv"}),
    ("op-field-before-build-env", inputs(), inputs(op=op(network="none"), env={"epoch": 1, "platform": "linux/amd64"}),
     "instruction", "the step's network changed", {"field": "network"}),
    ("build-env", inputs(), inputs(env={"epoch": 1, "platform": "linux/amd64"}),
     "build", "the build's epoch or platform changed", {}),
    ("removed", inputs(), inputs(), "removed", "its cached result was removed", {}),
]


@pytest.mark.parametrize(("old", "new", "kind", "text", "details"),
                         [pytest.param(*row[1:], id=row[0]) for row in MISS_CAUSES])
def test_miss_cause_names_the_first_difference(old: dict, new: dict, kind: str, text: str, details: dict) -> None:
    cause = miss_cause(old, new)
    assert (cause.kind, cause.text, dict(cause.details)) == (kind, text, details)


def test_step_key_ignores_what_is_only_shown() -> None:
    """The instruction's text and the base's name are for explanations: a comment or a retag must not miss."""
    key = step_key(inputs())
    assert key == step_key(inputs(instruction="RUN   make  # reformatted"))
    assert key == step_key(inputs(base={"ref": "another-name:2", "layers": [layer("unrelated")]}))
    assert key == step_key({name: value for name, value in inputs().items() if name not in ("instruction", "base")})
    assert len(key) == 64 and int(key, 16) >= 0


def _reordered(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse insertion order."""
    if isinstance(value, dict):
        return {name: _reordered(value[name]) for name in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(item) for item in value]
    return value


def test_step_key_does_not_depend_on_dict_order() -> None:
    many = inputs(args={"A": "1", "B": "2", "C": "3"}, files={"b": "f:1", "a": "f:2"}, sources={"x": [], "y": [1]})
    assert list(_reordered(many)) != list(many)
    assert step_key(_reordered(many)) == step_key(many)


KEYED_CHANGES = [
    ("parent", {"parent": [*BASE, layer("another")]}),
    ("op", {"op": op(cwd="/app")}),
    ("op-env", {"op": op(env=[["MODE", "b"]])}),
    ("args", {"args": {"V": "2"}}),
    ("args-declared-unset", {"args": {"V": "1", "W": ""}}),
    ("files", {"files": {"src/a.txt": "f:755:" + "a" * 64}}),
    ("files-renamed", {"files": {"src/b.txt": "f:644:" + "a" * 64}}),
    ("sources", {"sources": {"from": [layer("stage")]}}),
    ("env-epoch", {"env": {"epoch": 1, "platform": "linux/amd64"}}),
    ("env-platform", {"env": {"epoch": 0, "platform": "linux/arm64"}}),
]


def test_step_key_changes_with_each_keyed_section() -> None:
    keys = {"unchanged": step_key(inputs())}
    for name, change in KEYED_CHANGES:
        keys[name] = step_key(inputs(**change))
    same = [name for name, key in keys.items() if list(keys.values()).count(key) > 1]
    assert not same, f"these inputs give the same key: {same}"


def test_step_key_takes_file_names_that_are_not_utf8() -> None:
    """A context file named in another encoding (read as surrogate escapes) has a key of its own."""
    latin1 = inputs(files={"caf\udce9.txt": "f:644:1"})
    assert step_key(latin1) != step_key(inputs(files={"café.txt": "f:644:1"}))


def test_step_key_is_pinned() -> None:
    """Keys outlive a pybuild version (stores, --cache-to dirs): a change to them must be deliberate
    (bump cache.keys.KEY_VERSION, then this pin)."""
    assert step_key(inputs()) == "e0bfb22374e9612807d30de0fe5db268b94d08612d58b9caabd62162fefa72f9"


# --- cache.index: records whole or absent ---------------------------------------------------------------------

KEY = "ab" + "0" * 62


def test_step_index_round_trip(tmp_path: Path) -> None:
    index = StepIndex(tmp_path)
    assert index.get(KEY) is None
    index.put(KEY, StepResult(layer("made")))
    other = "cd" + "1" * 62
    index.put(other, StepResult(None))  # a step that changed no file
    assert StepIndex(tmp_path).get(KEY) == StepResult(layer("made"))
    assert StepIndex(tmp_path).get(other) == StepResult(None)
    assert sorted(index.stored_keys()) == sorted([KEY, other])
    index.forget(KEY)
    assert index.get(KEY) is None
    assert index.remove_all() == 1 and index.stored_keys() == []


def test_layer_blobs_round_trip(tmp_path: Path) -> None:
    blobs = LayerBlobs(tmp_path)
    diff_id = layer("made")
    zstd = LayerBlob(sha("zstd blob"), 10, ZSTD)
    gzip = LayerBlob(sha("gzip blob"), 12, "application/vnd.oci.image.layer.v1.tar+gzip")
    assert blobs.get(diff_id, ZSTD) is None and blobs.all_of(diff_id) == []
    blobs.put(diff_id, zstd)
    blobs.put(diff_id, gzip)
    blobs.put(diff_id, zstd)  # again: nothing changes
    again = LayerBlobs(tmp_path)
    assert again.get(diff_id, ZSTD) == zstd and again.get(diff_id, gzip.media_type) == gzip
    assert sorted(again.all_of(diff_id), key=lambda blob: blob.size) == [zstd, gzip]
    assert again.digests() == {zstd.digest, gzip.digest}


GOOD_STEP = json.dumps({"diff_id": layer("made")}).encode()
DAMAGED_RECORDS = [
    ("garbage", b"\x00\xff not json at all"),
    ("empty", b""),
    ("truncated", GOOD_STEP[: len(GOOD_STEP) // 2]),
    ("not-an-object", b"[1, 2, 3]"),
    ("diff-id-not-a-digest", json.dumps({"diff_id": "sha256:1234"}).encode()),
    ("diff-id-another-algorithm", json.dumps({"diff_id": "md5:" + "0" * 32}).encode()),
    ("diff-id-a-number", json.dumps({"diff_id": 7}).encode()),
    ("no-diff-id", b"{}"),  # not a step that changed no file: that one is {"diff_id": null}
]


@pytest.mark.parametrize("data", [pytest.param(data, id=name) for name, data in DAMAGED_RECORDS])
def test_a_damaged_step_record_is_absent_and_removed(tmp_path: Path, data: bytes) -> None:
    index = StepIndex(tmp_path)
    index.put(KEY, StepResult(layer("made")))
    path = tmp_path / "steps" / KEY[:2] / KEY
    assert path.is_file()
    path.write_bytes(data)
    assert index.get(KEY) is None
    assert not path.exists(), "a record that cannot be used must go, so the step runs and writes a good one"
    index.put(KEY, StepResult(layer("again")))
    assert index.get(KEY) == StepResult(layer("again"))


@pytest.mark.parametrize("data", [pytest.param(data, id=name) for name, data in DAMAGED_RECORDS[:3]])
def test_a_damaged_layer_record_is_absent_and_removed(tmp_path: Path, data: bytes) -> None:
    blobs = LayerBlobs(tmp_path)
    diff_id = layer("made")
    blobs.put(diff_id, LayerBlob(sha("blob"), 10, ZSTD))
    path = tmp_path / "layers" / diff_id.removeprefix("sha256:")
    path.write_bytes(data)
    assert blobs.get(diff_id, ZSTD) is None
    assert not path.exists()
    blobs.put(diff_id, LayerBlob(sha("blob"), 10, ZSTD))
    assert blobs.get(diff_id, ZSTD) == LayerBlob(sha("blob"), 10, ZSTD)


@pytest.mark.parametrize("entry", [["sha256:short", 10], [sha("blob"), "10"], [sha("blob")], "text", None])
def test_a_layer_record_entry_of_the_wrong_shape_is_not_served(tmp_path: Path, entry: Any) -> None:
    blobs = LayerBlobs(tmp_path)
    diff_id = layer("made")
    write_record(tmp_path / "layers" / diff_id.removeprefix("sha256:"), {ZSTD: entry})
    assert blobs.get(diff_id, ZSTD) is None
    assert blobs.all_of(diff_id) == []


@pytest.mark.parametrize("bad", ["", "sha256:" + "0" * 63, "sha256:" + "G" * 64, "0" * 64, "sha512:" + "0" * 64,
                                 "sha256:../../" + "0" * 58, "sha256:" + "0" * 64 + "/x"])
def test_an_invalid_diff_id_is_refused(tmp_path: Path, bad: str) -> None:
    """A diff_id becomes a file name: anything but sha256:<hex> could name another file."""
    blobs = LayerBlobs(tmp_path)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        blobs.put(bad, LayerBlob(sha("blob"), 1, ZSTD))
    with pytest.raises(ValueError, match="not a sha256 digest"):
        blobs.get(bad, ZSTD)
    assert not (tmp_path / "layers").exists() or not any((tmp_path / "layers").iterdir())


@pytest.mark.parametrize("bad", ["", "0" * 63, "../" + "0" * 61, "sha256:" + "0" * 64, "A" * 64])
def test_an_invalid_step_key_is_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        StepIndex(tmp_path).put(bad, StepResult(None))


PAD = "x" * (256 << 10)  # large enough that a write in place would be seen half done


def _write_records(path: Path, writer: int, count: int) -> None:
    for number in range(count):
        write_record(path, {"writer": writer, "number": number, "pad": PAD})
        StepIndex(path.parent).put(KEY, StepResult(layer(f"{writer}-{number}")))


def test_concurrent_writers_never_leave_a_partial_record(tmp_path: Path) -> None:
    """Several processes rewrite the same records while this one reads them: every read is whole."""
    path = tmp_path / "records" / "shared"
    step = tmp_path / "records" / "steps" / KEY[:2] / KEY
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_write_records, args=(path, writer, 40)) for writer in range(4)]
    for process in processes:
        process.start()
    reads = 0
    while any(process.is_alive() for process in processes) or reads == 0:
        # raw reads, not read_record: that one would hide a partial file by removing it
        try:
            value, result = json.loads(path.read_bytes()), json.loads(step.read_bytes())
        except FileNotFoundError:
            continue
        assert value["pad"] == PAD and set(value) == {"writer", "number", "pad"}
        assert set(result) == {"diff_id"} and result["diff_id"].startswith("sha256:")
        reads += 1
    for process in processes:
        process.join()
    assert [process.exitcode for process in processes] == [0] * 4
    final = read_record(path)
    assert final["number"] == 39 and final["pad"] == PAD
    assert StepIndex(path.parent).get(KEY) in [StepResult(layer(f"{writer}-39")) for writer in range(4)]
    leftovers = [entry.name for entry in path.parent.rglob("*") if entry.name.startswith(TEMP_PREFIX)]
    assert leftovers == []


# --- cache.files: digests remembered by stat, and the racy window --------------------------------------------

class Reads:
    """Counts the files FileDigests actually reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real = cache.files.sha256_file

        def counting(path: str | Path) -> str:
            self.paths.append(str(path))
            return real(path)

        monkeypatch.setattr(cache.files, "sha256_file", counting)


def clock_at(monkeypatch: pytest.MonkeyPatch, now_ns: int) -> None:
    """FileDigests' clock set to ``now_ns``, so the racy window is tested without waiting it out."""
    monkeypatch.setattr(cache.files, "time", types.SimpleNamespace(time_ns=lambda: now_ns))


def later(path: Path) -> int:
    """A time well past the racy window of ``path``'s last change."""
    st = os.lstat(path)
    return max(st.st_mtime_ns, st.st_ctime_ns) + 10 * RACY_NS


def digest_once(root: Path, path: Path) -> str:
    """A digest by a FileDigests of its own, saved, as one build does it."""
    digests = FileDigests(root)
    value = digests.digest(str(path), os.lstat(path))
    digests.save()
    return value


def test_a_digest_is_remembered_while_the_stat_is_unchanged(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "a.txt"
    file.write_text("one\n")
    clock_at(monkeypatch, later(file))
    reads = Reads(monkeypatch)
    expected = hashlib.sha256(b"one\n").hexdigest()
    assert digest_once(tmp_path / "cache", file) == expected
    assert digest_once(tmp_path / "cache", file) == expected
    assert digest_once(tmp_path / "cache", file) == expected
    assert reads.paths == [str(file)], "read again although nothing about it changed"


def _same_size_new_content(file: Path) -> None:
    st = os.lstat(file)
    time.sleep(0.02)  # past the clock tick of the first write, so the ctime can tell
    file.write_text("two\n")
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replaced_by_rename(file: Path) -> None:
    """A new inode with the same size, mtime; an editor that saves by renaming does this."""
    st = os.lstat(file)
    other = file.with_name("new")
    other.write_text("two\n")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, file)


@pytest.mark.parametrize("change", [_same_size_new_content, _replaced_by_rename])
def test_content_changed_behind_size_and_mtime_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             change: Callable[[Path], None]) -> None:
    file = tmp_path / "a.txt"
    file.write_text("one\n")
    before = os.lstat(file)
    clock_at(monkeypatch, later(file))
    digest_once(tmp_path / "cache", file)
    change(file)
    after = os.lstat(file)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert (after.st_ctime_ns, after.st_ino) != (before.st_ctime_ns, before.st_ino)
    clock_at(monkeypatch, later(file))
    assert digest_once(tmp_path / "cache", file) == hashlib.sha256(b"two\n").hexdigest()


@pytest.mark.parametrize(("age_ns", "remembered"), [
    (0, False),
    (RACY_NS // 2, False),
    (RACY_NS - 1, False),
    (RACY_NS + 1, True),
    (10 * RACY_NS, True),
])
def test_a_file_changed_within_the_racy_window_is_not_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 age_ns: int, remembered: bool) -> None:
    """A change in the same moment as the read could leave the stat as it was: such a digest is not kept."""
    file = tmp_path / "a.txt"
    file.write_text("one\n")
    st = os.lstat(file)
    clock_at(monkeypatch, max(st.st_mtime_ns, st.st_ctime_ns) + age_ns)
    reads = Reads(monkeypatch)
    digest_once(tmp_path / "cache", file)
    digest_once(tmp_path / "cache", file)
    assert len(reads.paths) == (1 if remembered else 2)


def test_a_file_just_written_is_read_again_on_the_real_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "a.txt"
    file.write_text("one\n")
    reads = Reads(monkeypatch)
    digest_once(tmp_path / "cache", file)
    digest_once(tmp_path / "cache", file)
    assert len(reads.paths) == 2


def _stamp_for(file: Path) -> tuple[int, int, int, int]:
    st = os.lstat(file)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


CORRUPT_DIGEST_FILES: list[tuple[str, Callable[[Path], bytes]]] = [
    ("garbage", lambda file: b"\x00\xffnot marshal data" * 8),
    ("empty", lambda file: b""),
    ("truncated", lambda file: marshal.dumps({str(file): (*_stamp_for(file), "0" * 64), "x": (1, 2, 3, 4, "y")})[:20]),
    ("a-list", lambda file: marshal.dumps([1, 2, 3])),
    ("an-entry-too-short", lambda file: marshal.dumps({str(file): (1,)})),
    ("an-entry-not-a-tuple", lambda file: marshal.dumps({str(file): 5})),
    ("an-entry-of-none", lambda file: marshal.dumps({str(file): None})),
]


@pytest.mark.parametrize("content", [pytest.param(make, id=name) for name, make in CORRUPT_DIGEST_FILES])
def test_a_corrupt_digests_file_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           content: Callable[[Path], bytes]) -> None:
    file = tmp_path / "a.txt"
    file.write_text("one\n")
    clock_at(monkeypatch, later(file))
    root = tmp_path / "cache"
    root.mkdir()
    (root / "file-digests").write_bytes(content(file))
    assert digest_once(root, file) == hashlib.sha256(b"one\n").hexdigest()
    reads = Reads(monkeypatch)
    assert digest_once(root, file) == hashlib.sha256(b"one\n").hexdigest()
    assert reads.paths == [], "the good digest saved over the corrupt file is remembered"


# --- builder.keys.TreeDigests: what a step reads from a tree, and what of it enters the key ------------------

def make_tree(root: Path) -> Path:
    """A small context: files, a directory, a symlink, a hard link, a file outside src/, ignored files."""
    (root / "src" / "sub").mkdir(parents=True)
    (root / "src" / "a.txt").write_text("a\n")
    (root / "src" / "b.txt").write_text("a\n")  # the same content as a.txt, another file
    (root / "src" / "sub" / "c.txt").write_text("c\n")
    (root / "src" / "link").symlink_to("a.txt")
    os.link(root / "src" / "a.txt", root / "src" / "hard.txt")
    (root / "other.txt").write_text("outside src\n")
    (root / "src" / "debug.log").write_text("ignored\n")
    (root / "secret").mkdir()
    (root / "secret" / "key").write_text("ignored\n")
    (root / ".dockerignore").write_text("**/*.log\nsecret\n")
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def tree_digests(root: Path, *, rel: str = "", epoch: int = 0, chmod: bool = False) -> dict[str, str]:
    out: dict[str, str] = {}
    TreeDigests(FileDigests(root.parent / "cache"), epoch).walk(BuildContext(root), rel, chmod=chmod, out=out)
    return out


def copy_sources(root: Path, line: str = "COPY src/ /dst/") -> dict[str, str]:
    """The entries a COPY reads from the context ``root``, as the solver takes them for its key."""
    copy = next(item for item in parse(f"FROM scratch\n{line}\n").instructions if isinstance(item, Copy))
    out: dict[str, str] = {}
    TreeDigests(FileDigests(root.parent / "cache"), 0).sources(BuildContext(root), CopyOp(copy, "/"), out)
    return out


def test_the_mode_enters_unless_chmod_sets_it(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ctx")
    plain, chmodded = tree_digests(root), tree_digests(root, chmod=True)
    (root / "src" / "a.txt").chmod(0o600)
    (root / "src" / "sub").chmod(0o700)
    assert tree_digests(root, chmod=True) == chmodded
    changed = tree_digests(root)
    assert {path for path in plain if plain[path] != changed[path]} == {"src/a.txt", "src/sub"}


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
@pytest.mark.parametrize(("epoch", "before", "after", "enters"), [
    (0, 1_000, 2_000, False),  # the default epoch clamps every time away
    (5_000, 1_000, 2_000, True),  # both older than the epoch: the layer keeps them
    (5_000, 6_000, 7_000, False),  # both newer: both clamped to the epoch
    (5_000, 1_000, 6_000, True),  # from kept to clamped
    (5_000, 6_000, 5_000, False),  # clamped to the epoch, or at it: the same time in the layer
])
def test_an_mtime_enters_only_where_the_layer_keeps_it(tmp_path: Path, kind: str, epoch: int, before: int,
                                                       after: int, enters: bool) -> None:
    root = make_tree(tmp_path / "ctx")
    path = {"file": root / "src" / "a.txt", "directory": root / "src" / "sub", "symlink": root / "src" / "link"}[kind]
    os.utime(path, (before, before), follow_symlinks=False)
    first = tree_digests(root, epoch=epoch)
    os.utime(path, (after, after), follow_symlinks=False)
    second = tree_digests(root, epoch=epoch)
    rel = str(path.relative_to(root))
    assert (first[rel] != second[rel]) == enters
    assert {name for name in first if first[name] != second[name]} <= {rel}


def test_a_symlink_is_keyed_by_its_target(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ctx")
    first = tree_digests(root)
    (root / "src" / "link").unlink()
    (root / "src" / "link").symlink_to("b.txt")  # same content behind it, another target
    second = tree_digests(root)
    assert first["src/link"] != second["src/link"]
    (root / "src" / "link").unlink()
    (root / "src" / "link").symlink_to("nowhere")  # dangling: still an entry
    assert tree_digests(root)["src/link"] not in (first["src/link"], second["src/link"])


def test_a_hard_link_is_keyed_by_the_path_it_links_to_not_its_inode(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ctx")
    first = tree_digests(root)
    elsewhere = make_tree(tmp_path / "elsewhere" / "ctx")  # other inodes, another absolute path
    assert os.lstat(elsewhere / "src" / "hard.txt").st_ino != os.lstat(root / "src" / "hard.txt").st_ino
    assert tree_digests(elsewhere) == first
    # the same content, hard-linked to b.txt instead of a.txt: the copy links other files
    (root / "src" / "hard.txt").unlink()
    os.link(root / "src" / "b.txt", root / "src" / "hard.txt")
    relinked = tree_digests(root)
    assert relinked["src/hard.txt"] != first["src/hard.txt"]
    # no longer a hard link at all: a file of its own
    (root / "src" / "hard.txt").unlink()
    (root / "src" / "hard.txt").write_text("a\n")
    (root / "src" / "hard.txt").chmod(0o644)
    assert tree_digests(root)["src/hard.txt"] not in (first["src/hard.txt"], relinked["src/hard.txt"])


def test_files_the_ignore_file_drops_never_appear(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ctx")
    first = tree_digests(root)
    assert not [path for path in first if path.endswith(".log") or path.startswith("secret")]
    (root / "src" / "debug.log").write_text("edited\n")
    (root / "secret" / "key").write_text("edited\n")
    (root / "src" / "more.log").write_text("added\n")
    (root / "secret" / "new").write_text("added\n")
    assert tree_digests(root) == first
    assert not [path for path in copy_sources(root) if path.endswith(".log")]
    (root / ".dockerignore").write_text("secret\n")  # logs are wanted now
    assert {"src/debug.log", "src/more.log"} <= set(tree_digests(root))


def test_a_file_outside_the_copied_sources_changes_nothing(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ctx")
    first = copy_sources(root)
    assert set(first) == {"src", "src/a.txt", "src/b.txt", "src/hard.txt", "src/link", "src/sub", "src/sub/c.txt"}
    (root / "other.txt").write_text("edited\n")
    (root / "other.txt").chmod(0o600)
    (root / "added.txt").write_text("new\n")
    os.utime(root, (1, 1))
    assert copy_sources(root) == first
    (root / "src" / "sub" / "c.txt").write_text("edited\n")
    assert copy_sources(root)["src/sub/c.txt"] != first["src/sub/c.txt"]


def test_the_tree_s_place_and_its_inodes_never_enter(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ctx")
    copied = Path(shutil.copytree(root, tmp_path / "moved" / "ctx", symlinks=True))
    os.unlink(copied / "src" / "hard.txt")
    os.link(copied / "src" / "a.txt", copied / "src" / "hard.txt")  # copytree does not keep hard links
    assert copy_sources(copied) == copy_sources(root)


# --- cache.transfer: a cache directory written and read back ---------------------------------------------------

def stored_blob(store: BlobStore, data: bytes) -> LayerBlob:
    return LayerBlob(store.put_bytes(data), len(data), ZSTD)


def cached_steps(store: BlobStore) -> list[CachedStep]:
    first, second = stored_blob(store, b"layer one" * 100), stored_blob(store, b"layer two" * 100)
    return [
        CachedStep("1" * 64, layer("one"), first),
        CachedStep("2" * 64, None, None),  # a step that changed no file
        CachedStep("3" * 64, layer("two"), second),
        CachedStep("4" * 64, layer("one"), first),  # another step that made the same layer
    ]


def test_a_cache_dir_round_trips_its_records_and_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    steps = cached_steps(store)
    write_cache(tmp_path / "cache", steps, store)
    source = CacheSource(tmp_path / "cache")
    assert source.steps == {step.key: step for step in steps}
    manifest = json.loads((tmp_path / "cache" / "index.json").read_text())["manifests"]
    assert [entry["annotations"]["org.opencontainers.image.ref.name"] for entry in manifest] == [CACHE_NAME]

    fresh = BlobStore(tmp_path / "fresh")
    for step in steps:
        if step.blob is not None:
            assert source.fetch(step.blob, fresh)
            assert fresh.path(step.blob.digest).read_bytes() == store.path(step.blob.digest).read_bytes()
    assert sorted(fresh.digests()) == sorted({step.blob.digest for step in steps if step.blob is not None})


def test_a_cache_dir_written_again_holds_only_the_new_records(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    steps = cached_steps(store)
    write_cache(tmp_path / "cache", steps, store)
    write_cache(tmp_path / "cache", steps[2:3], store)
    assert CacheSource(tmp_path / "cache").steps == {steps[2].key: steps[2]}


def _replace_file(path: Path, data: bytes) -> None:
    """New content under the name, on a new inode: the cache dir's blobs may be hard links into the store."""
    path.unlink()
    path.write_bytes(data)


@pytest.mark.parametrize("damage", ["deleted", "other-content", "truncated", "grown"])
def test_a_damaged_blob_is_not_fetched(tmp_path: Path, damage: str) -> None:
    store = BlobStore(tmp_path / "store")
    steps = cached_steps(store)
    write_cache(tmp_path / "cache", steps, store)
    blob = steps[0].blob
    assert blob is not None
    path = tmp_path / "cache" / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
    data = path.read_bytes()
    if damage == "deleted":
        path.unlink()
    else:
        _replace_file(path, {"other-content": data[:-1] + b"!", "truncated": data[:-1], "grown": data + b"!"}[damage])
    source = CacheSource(tmp_path / "cache")
    fresh = BlobStore(tmp_path / "fresh")
    assert source.fetch(blob, fresh) is False
    assert list(fresh.digests()) == []
    assert store.path(blob.digest).read_bytes() == data, "the store's own blob is untouched"
    assert steps[2].blob is not None and source.fetch(steps[2].blob, fresh)  # the other blobs still serve


def _image_layout(directory: Path) -> None:
    """An OCI layout holding an ordinary image (as skopeo copy writes one), not a pybuild cache."""
    store = BlobStore(directory)
    config = store.put_bytes(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                                      "size": 10}, "layers": []}).encode()
    digest = store.put_bytes(manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))


def test_a_layout_without_a_pybuild_cache_is_one_line(tmp_path: Path) -> None:
    _image_layout(tmp_path / "image")
    with pytest.raises(PybuildError) as caught:
        CacheSource(tmp_path / "image")
    assert str(caught.value) == f"error: --cache-from {tmp_path / 'image'}: the layout holds no pybuild cache"


def _cache_then(change: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(directory: Path) -> None:
        store = BlobStore(directory.parent / "store")
        write_cache(directory, cached_steps(store), store)
        change(directory)
    return make


def _manifest_blob(directory: Path) -> Path:
    digest = json.loads((directory / "index.json").read_text())["manifests"][0]["digest"]
    return directory / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _config_of_another_type(directory: Path) -> None:
    path = _manifest_blob(directory)
    manifest = json.loads(path.read_text())
    manifest["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json"
    _replace_file(path, json.dumps(manifest).encode())


BROKEN_LAYOUTS: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing", lambda directory: None, "no such directory"),
    ("empty-directory", lambda directory: directory.mkdir(), "index.json is missing"),
    ("index-garbage", _cache_then(lambda directory: _replace_file(directory / "index.json", b"{not json")),
     "cannot read index.json"),
    ("index-not-an-object", _cache_then(lambda directory: _replace_file(directory / "index.json", b"[]")),
     "holds no pybuild cache"),
    ("an-image-layout", _image_layout, "holds no pybuild cache"),
    ("manifest-missing", _cache_then(lambda directory: _manifest_blob(directory).unlink()),
     "the cache manifest is missing"),
    ("config-of-another-type", _cache_then(_config_of_another_type), "has no pybuild cache config"),
]


@pytest.mark.parametrize(("make", "message"), [pytest.param(make, message, id=name)
                                               for name, make, message in BROKEN_LAYOUTS])
def test_a_directory_that_is_no_cache_is_a_one_line_error(tmp_path: Path, make: Callable[[Path], None],
                                                          message: str) -> None:
    directory = tmp_path / "cache"
    make(directory)
    with pytest.raises(PybuildError) as caught:
        CacheSource(directory)
    error = caught.value
    assert message in error.message and "--cache-from" in error.message
    assert "\n" not in error.message
    assert all(line.startswith("hint: ") for line in str(error).splitlines()[1:])


def test_a_record_whose_layer_is_not_in_the_manifest_is_dropped(tmp_path: Path) -> None:
    """A record naming a layer the cache holds no blob for cannot hit: the step runs instead."""
    store = BlobStore(tmp_path / "store")
    steps = cached_steps(store)
    write_cache(tmp_path / "cache", steps, store)
    path = _manifest_blob(tmp_path / "cache")
    manifest = json.loads(path.read_text())
    manifest["layers"] = [entry for entry in manifest["layers"]
                          if entry["annotations"][DIFF_ID_ANNOTATION] != layer("two")]
    _replace_file(path, json.dumps(manifest).encode())
    assert set(CacheSource(tmp_path / "cache").steps) == {"1" * 64, "2" * 64, "4" * 64}


def test_source_stamp_follows_the_sources_and_nothing_else(tmp_path: Path) -> None:
    from cache.files import source_stamp

    package = tmp_path / "pkg"
    (package / "sub" / "__pycache__").mkdir(parents=True)
    (package / "a.py").write_text("a = 1\n")
    (package / "sub" / "grammar.lark").write_text("start: A\n")
    (package / "sub" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")
    (package / "notes.txt").write_text("not code\n")

    def stamp() -> bytes:
        source_stamp.cache_clear()  # taken once per process: a new process sees an edit
        return source_stamp(package)

    first = stamp()
    assert b"a.py" in first and b"grammar.lark" in first
    assert b"__pycache__" not in first and b"notes.txt" not in first
    (package / "sub" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled again")
    (package / "notes.txt").write_text("still not code, longer\n")
    assert stamp() == first
    (package / "a.py").write_text("a = 22\n")  # another size
    second = stamp()
    assert second != first
    os.utime(package / "sub" / "grammar.lark", ns=(1, 1))  # another mtime
    assert stamp() != second


def test_a_dockerfile_parsed_before_is_read_back_without_the_grammar_library(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from cache.parsed import parsed; "
            f"found = parsed(b'FROM scratch\\nRUN true\\n', 'Dockerfile', Path({str(tmp_path)!r})); "
            "print(type(found).__name__, len(found.instructions), 'lark' in sys.modules)")
    outputs = [subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
               for _ in range(2)]
    assert outputs == ["Dockerfile 2 True\n", "Dockerfile 2 False\n"]
