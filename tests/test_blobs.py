"""The blob store: content addressing, atomic commits, verification, and behaviour under crashes and races."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from cache.blobs import BlobStore, CorruptBlobError, digest_hex
from parser.errors import PybuildError


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def leftovers(store: BlobStore) -> list[str]:
    return sorted(os.listdir(store.tmp_dir)) if store.tmp_dir.exists() else []


def test_put_bytes_is_content_addressed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.put_bytes(b"hello")
    assert digest == sha(b"hello")
    assert store.path(digest) == tmp_path / "blobs" / "sha256" / digest_hex(digest)
    assert store.path(digest).read_bytes() == b"hello"
    assert store.path(digest).stat().st_mode & 0o777 == 0o644
    assert store.has(digest) and not store.has(sha(b"other"))
    assert store.put_bytes(b"hello") == digest
    assert list(store.digests()) == [digest]
    assert leftovers(store) == []


def test_writer_hashes_while_writing_and_commits(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with store.writer() as out:
        out.file.write(b"abc")
        out.write(memoryview(b"def"))
        assert out.file.tell() == 6
        assert not any(store.digests()), "nothing is visible before the commit"
    assert (out.digest, out.size) == (sha(b"abcdef"), 6)
    with store.open(out.digest, verify=True) as file:
        assert file.read() == b"abcdef"
    assert leftovers(store) == []


@pytest.mark.parametrize("how", ["exception", "discard", "wrong digest"])
def test_writer_that_does_not_commit_leaves_nothing(tmp_path: Path, how: str) -> None:
    store = BlobStore(tmp_path)
    if how == "exception":
        with pytest.raises(RuntimeError), store.writer() as out:
            out.write(b"partial")
            raise RuntimeError("writer failed")
    elif how == "discard":
        with store.writer() as out:
            out.write(b"unwanted")
            out.discard()
        assert out.digest == ""
    else:
        with pytest.raises(CorruptBlobError, match="wrong content"), store.writer(expect=sha(b"good")) as out:
            out.write(b"evil")
    assert list(store.digests()) == []
    assert leftovers(store) == []


def test_put_file_moves_a_written_file_in(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    file, path = store.temp_file()
    with file:
        file.write(b"layer bytes")
    store.put_file(path, sha(b"layer bytes"))
    assert not path.exists()
    assert store.path(sha(b"layer bytes")).read_bytes() == b"layer bytes"
    file, again = store.temp_file()
    with file:
        file.write(b"layer bytes")
    store.put_file(again, sha(b"layer bytes"))
    assert not again.exists() and leftovers(store) == []


def test_rewriting_a_blob_refreshes_its_mtime(tmp_path: Path) -> None:
    """gc() spares recently written blobs, so storing existing content again must count as recent."""
    store = BlobStore(tmp_path)
    digest = store.put_bytes(b"x")
    os.utime(store.path(digest), (1000, 1000))
    store.put_bytes(b"x")
    assert store.path(digest).stat().st_mtime > time.time() - 60


def test_corrupt_blob_is_reported_with_a_way_out(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.put_bytes(b"original")
    store.path(digest).write_bytes(b"bit rot!")
    for check in (store.verify, lambda d: store.open(d, verify=True), store.read_bytes):
        with pytest.raises(CorruptBlobError) as caught:
            check(digest)
        assert digest in caught.value.message
        assert f"remove {store.path(digest)}" in caught.value.hint
    with store.open(digest) as file:
        assert file.read() == b"bit rot!", "without verify, open() does not read the file twice"


def test_missing_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(PybuildError, match=f"blob {sha(b'x')} is missing"):
        store.open(sha(b"x"))
    store.remove(sha(b"x"))


@pytest.mark.parametrize("digest", [
    "sha256:../../etc/passwd",
    "sha256:" + "A" * 64,
    "sha512:" + "a" * 64,
    "sha256:" + "a" * 63,
    "a" * 64,
])
def test_only_sha256_digests_become_paths(tmp_path: Path, digest: str) -> None:
    with pytest.raises(PybuildError, match="not a sha256 digest"):
        BlobStore(tmp_path).path(digest)


def _crash_while_writing(root: Path) -> None:
    store = BlobStore(root)
    with store.writer() as out:
        out.write(b"half of a layer")
        os._exit(3)


def test_a_crash_leaves_at_most_a_temp_file(tmp_path: Path) -> None:
    process = multiprocessing.get_context("fork").Process(target=_crash_while_writing, args=(tmp_path,))
    process.start()
    process.join()
    assert process.exitcode == 3
    store = BlobStore(tmp_path)
    assert list(store.digests()) == []
    assert [name.startswith(".blob-") for name in leftovers(store)] == [True]


def _write_many(root: Path, count: int) -> None:
    store = BlobStore(root)
    for number in range(count):
        with store.writer() as out:
            for _ in range(64):
                out.write(f"block {number}\n".encode() * 256)


def test_concurrent_writers_of_the_same_content(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_write_many, args=(tmp_path, 20)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert [process.exitcode for process in processes] == [0, 0, 0]
    store = BlobStore(tmp_path)
    digests = sorted(store.digests())
    assert len(digests) == 20
    for digest in digests:
        store.verify(digest)
    assert leftovers(store) == []
