"""Deterministic layer tars: exact members and headers, whiteout forms, skipping, compression, streaming."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import zstandard

from builder.fs.layer import write_layer, zstd_parameters
from builder.fs.untar import open_layer
from builder.oci.image import MEDIA_LAYER_GZIP, MEDIA_LAYER_ZSTD
from parser.errors import PybuildError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set owners, devices and trusted xattrs")
EPOCH = 1_700_000_000
OLD = 1_000_000_000  # before EPOCH: kept
NEW = 1_800_000_000  # after EPOCH: clamped


def set_times(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime), follow_symlinks=False)


def make_upper(root: Path, *, oci_whiteouts: bool = False) -> Path:
    """An upper dir with every kind of change; whiteouts as overlayfs markers or as OCI files."""
    root.mkdir()
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"x" * 1000)
    os.chown(root / "usr/bin/tool", 1000, 50)
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.setxattr(root / "usr/bin/tool", "user.note", b"\xffbinary")
    os.setxattr(root / "usr/bin/tool", "trusted.overlay.origin", b"junk")
    os.link(root / "usr/bin/tool", root / "usr/bin/alias")
    (root / "usr/bin/zlink").symlink_to("tool")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    os.mkfifo(root / "tmp/fifo", 0o600)
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o20666, os.makedev(1, 3))
    os.chmod(root / "dev/null", 0o666)
    (root / "opq").mkdir()
    (root / "opq/-first").write_text("")
    (root / "opq/new").write_text("new")
    if oci_whiteouts:
        for marker in ("gone", "opq/.wh..wh..opq"):
            target = root / (marker if "/" in marker else ".wh." + marker)
            target.touch()
            os.chmod(target, 0)
    else:
        os.mknod(root / "gone", 0o20000, 0)
        os.setxattr(root / "opq", "trusted.overlay.opaque", b"y")
    for path in sorted(root.rglob("*"), reverse=True):
        set_times(path, NEW if path.name in ("tool", "alias", "opq") else OLD)
    return root


def members(blob: bytes) -> list[tuple]:
    with tarfile.open(fileobj=open_layer(io.BytesIO(blob)), mode="r|") as archive:
        return [(m.name, m.type, oct(m.mode), m.uid, m.gid, m.uname, m.gname, m.mtime, m.size, m.linkname,
                 (m.devmajor, m.devminor) if m.ischr() else None,
                 {key: value for key, value in m.pax_headers.items() if key.startswith("SCHILY.")})
                for m in archive]


def write(upper: Path, compression: str = "zstd", **options) -> tuple[bytes, object]:
    out = io.BytesIO()
    layer = write_layer(upper, out, compression=compression, source_date_epoch=EPOCH, **options)
    return out.getvalue(), layer


GOLDEN = [
    (".wh.gone", tarfile.REGTYPE, "0o0", 0, 0, "", "", EPOCH, 0, "", None, {}),
    ("dev", tarfile.DIRTYPE, "0o755", 0, 0, "", "", OLD, 0, "", None, {}),
    ("dev/null", tarfile.CHRTYPE, "0o666", 0, 0, "", "", OLD, 0, "", (1, 3), {}),
    ("opq", tarfile.DIRTYPE, "0o755", 0, 0, "", "", EPOCH, 0, "", None, {}),
    ("opq/.wh..wh..opq", tarfile.REGTYPE, "0o0", 0, 0, "", "", EPOCH, 0, "", None, {}),
    ("opq/-first", tarfile.REGTYPE, "0o644", 0, 0, "", "", OLD, 0, "", None, {}),
    ("opq/new", tarfile.REGTYPE, "0o644", 0, 0, "", "", OLD, 3, "", None, {}),
    ("tmp", tarfile.DIRTYPE, "0o1777", 0, 0, "", "", OLD, 0, "", None, {}),
    ("tmp/fifo", tarfile.FIFOTYPE, "0o600", 0, 0, "", "", OLD, 0, "", None, {}),
    ("usr", tarfile.DIRTYPE, "0o755", 0, 0, "", "", OLD, 0, "", None, {}),
    ("usr/bin", tarfile.DIRTYPE, "0o755", 0, 0, "", "", OLD, 0, "", None, {}),
    ("usr/bin/alias", tarfile.REGTYPE, "0o4755", 1000, 50, "", "", EPOCH, 1000, "", None,
     {"SCHILY.xattr.user.note": "\udcffbinary"}),
    ("usr/bin/tool", tarfile.LNKTYPE, "0o4755", 1000, 50, "", "", EPOCH, 0, "usr/bin/alias", None, {}),
    ("usr/bin/zlink", tarfile.SYMTYPE, "0o777", 0, 0, "", "", OLD, 0, "tool", None, {}),
]


@needs_root
def test_golden_members_and_headers(tmp_path: Path) -> None:
    os.umask(0o022)
    blob, layer = write(make_upper(tmp_path / "upper"))
    assert members(blob) == GOLDEN
    raw = open_layer(io.BytesIO(blob)).read()
    assert layer.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert layer.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert (layer.size, layer.media_type) == (len(blob), MEDIA_LAYER_ZSTD)
    # Names are relative, directories end in '/', no atime/ctime in PAX headers.
    assert b"./" not in raw[:100] and b"dev/\x00" in raw
    assert b"atime" not in raw and b"ctime" not in raw


@needs_root
def test_both_whiteout_forms_give_the_same_bytes(tmp_path: Path) -> None:
    os.umask(0o022)
    overlay, _ = write(make_upper(tmp_path / "overlay"))
    oci, _ = write(make_upper(tmp_path / "oci", oci_whiteouts=True))
    assert overlay == oci


@needs_root
def test_deterministic_across_copies_and_compressions(tmp_path: Path) -> None:
    os.umask(0o022)
    upper = make_upper(tmp_path / "upper")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(upper), str(copy)], check=True)
    for compression in ("zstd", "gzip"):
        first, layer = write(upper, compression)
        second, again = write(copy, compression)
        assert first == second and layer == again
    gz, layer = write(upper, "gzip")
    assert layer.media_type == MEDIA_LAYER_GZIP
    assert gz[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0
    assert gzip.decompress(gz) == open_layer(io.BytesIO(write(upper)[0])).read()


def test_zstd_output_does_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "data").write_bytes(os.urandom(1 << 20) * 6 + bytes(12 << 20))
    blob, _ = write(upper)
    raw = open_layer(io.BytesIO(blob)).read()
    for threads in (1, 2, 4):
        out = io.BytesIO()
        compressor = zstandard.ZstdCompressor(compression_params=zstd_parameters(threads))
        with compressor.stream_writer(out, closefd=False) as writer:
            writer.write(raw)
        assert out.getvalue() == blob, threads


def test_empty_upper_gives_no_layer(tmp_path: Path) -> None:
    out = io.BytesIO()
    assert write_layer(tmp_path, out, compression="zstd", source_date_epoch=0) is None
    assert out.getvalue() == b""


def test_unchanged_directories_are_skipped_with_lower_stat(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "srv/mnt").mkdir(parents=True)
    (lower / "etc").mkdir()
    upper = tmp_path / "upper"
    (upper / "srv/mnt").mkdir(parents=True)  # a mountpoint made and removed again
    (upper / "etc").mkdir()
    (upper / "etc/new").write_text("new")
    os.chmod(lower / "srv", 0o700)  # srv changed mode: kept

    def lower_stat(path: str) -> os.stat_result | None:
        try:
            return (lower / path).lstat()
        except FileNotFoundError:
            return None

    blob, _ = write(upper, lower_stat=lower_stat)
    assert [member[0] for member in members(blob)] == ["etc", "etc/new", "srv"]
    blob, _ = write(upper)
    assert [member[0] for member in members(blob)] == ["etc", "etc/new", "srv", "srv/mnt"]
    shutil.rmtree(upper / "etc")
    os.chmod(lower / "srv", 0o755)
    assert write_layer(upper, io.BytesIO(), compression="zstd", source_date_epoch=0, lower_stat=lower_stat) is None


def test_reserved_whiteout_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/.wh.thing").write_text("user data")
    with pytest.raises(PybuildError, match=r"cannot store '/d/.wh.thing' in a layer"):
        write(tmp_path)


def test_gnu_tar_lists_the_same_members(tmp_path: Path) -> None:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("GNU tar is not installed")
    upper = tmp_path / "upper"
    (upper / "a/b").mkdir(parents=True)
    (upper / "a/b/file").write_text("x")
    (upper / ("long" * 40)).write_text("long name")
    os.setxattr(upper / "a/b/file", "user.k", b"v")
    blob, _ = write(upper)
    (tmp_path / "layer.tar").write_bytes(open_layer(io.BytesIO(blob)).read())
    listed = subprocess.run([tar, "-tf", str(tmp_path / "layer.tar")], capture_output=True, text=True, check=True)
    assert listed.stdout.splitlines() == ["a/", "a/b/", "a/b/file", "long" * 40]
    extracted = tmp_path / "out"
    extracted.mkdir()
    subprocess.run([tar, "--xattrs", "--xattrs-include=user.*", "-xf", str(tmp_path / "layer.tar"), "-C",
                    str(extracted)], check=True)
    assert os.getxattr(extracted / "a/b/file", "user.k") == b"v"


MEASURE = """
import io, os, resource, sys
from pathlib import Path
from builder.fs.layer import write_layer, zstd_parameters
upper = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open(os.devnull, "wb") as out:
    layer = write_layer(upper, out, compression="zstd", source_date_epoch=0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, layer.size)
"""


@pytest.mark.slow
def test_memory_stays_flat_for_a_large_file(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    with open(upper / "zeros", "wb") as sparse:
        sparse.truncate(200 << 20)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(upper)], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    grown_kib, size = map(int, result.stdout.split())
    assert grown_kib < 50 * 1024
    assert size < 1 << 20  # zeros compress: the data really went through zstd


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.uname = info.gname = ""
    for key, value in fields.items():
        setattr(info, key, value)
    return info


# Members the fast header path must write exactly as tarfile does, or leave to tarfile (None).
HEADER_CASES = [
    ("file", _member("usr/bin/tool", mode=0o4755, uid=1000, gid=50, size=12345, mtime=1_700_000_000), True),
    ("directory gets its slash", _member("etc", tarfile.DIRTYPE, mode=0o755), True),
    ("whiteout", _member("etc/.wh.group", mode=0), True),
    ("symlink", _member("bin/sh", tarfile.SYMTYPE, linkname="busybox", mode=0o777), True),
    ("hardlink", _member("bin/ls", tarfile.LNKTYPE, linkname="bin/busybox"), True),
    ("device", _member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), True),
    ("fifo", _member("run/pipe", tarfile.FIFOTYPE, mode=0o600), True),
    ("100-character name", _member("n" * 100), True),
    ("long name needs PAX", _member("n" * 101), False),
    ("non-ASCII name needs PAX", _member("caf\u00e9"), False),
    ("long link target needs PAX", _member("l", tarfile.SYMTYPE, linkname="t" * 101), False),
    ("xattr needs PAX", _member("cap", pax_headers={"SCHILY.xattr.security.capability": "x"}), False),
    ("big uid needs PAX", _member("u", uid=8**7), False),
    ("big file needs PAX", _member("big", size=8**11), False),
]


@pytest.mark.parametrize(("info", "fast"), [case[1:] for case in HEADER_CASES], ids=[case[0] for case in HEADER_CASES])
def test_fast_headers_equal_tarfiles(info: tarfile.TarInfo, fast: bool) -> None:
    from builder.fs.layer import _ustar_header

    header = _ustar_header(info)
    if fast:
        assert header == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    else:
        assert header is None


class _FullDisk(io.RawIOBase):
    """A blob file on a disk that fills up after ``room`` bytes."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001
        self.room -= len(data)
        if self.room < 0:
            raise OSError(28, "No space left on device")
        return len(data)


def _stream_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name in ("layer-hash", "layer-compress")]


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_a_failing_blob_write_is_raised_and_the_stream_threads_end(tmp_path: Path, compression: str) -> None:
    """The blob is written from a thread of the stream's own; its error reaches the caller, and both threads end."""
    upper = tmp_path / "upper"
    upper.mkdir()
    for index in range(12):
        (upper / f"random-{index}").write_bytes(os.urandom(1 << 20))  # incompressible: the disk fills mid-way
    with pytest.raises(OSError, match="No space left on device"):
        write_layer(upper, _FullDisk(3 << 20), compression=compression, source_date_epoch=0)
    assert _stream_threads() == []


def test_a_file_that_shrinks_stops_the_stream_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "big").write_bytes(b"x" * (3 << 20))
    real_readv = os.readv
    monkeypatch.setattr(os, "readv", lambda fd, buffers: 0)  # as if the file were cut while being read
    with pytest.raises(PybuildError, match="shrank while its layer was being written"):
        write_layer(upper, io.BytesIO(), compression="zstd", source_date_epoch=0)
    monkeypatch.setattr(os, "readv", real_readv)
    assert _stream_threads() == []
