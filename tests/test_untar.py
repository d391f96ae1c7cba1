"""Safe streaming extraction: compressions, metadata, whiteout modes, replacement rules, hostile archives."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from builder.fs.untar import extract_tar, open_archive, open_layer
from parser.errors import PybuildError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set owners and create device nodes")


@dataclass(frozen=True)
class M:
    """One member of a test archive."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_000_000
    linkname: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


def make_tar(*members: M) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type, info.mode, info.uid, info.gid = member.type, member.mode, member.uid, member.gid
            info.mtime, info.linkname = member.mtime, member.linkname
            info.devmajor, info.devminor = member.dev
            info.size = len(member.data)
            info.pax_headers = {f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
                                for key, value in member.xattrs.items()}
            archive.addfile(info, io.BytesIO(member.data))
    return buffer.getvalue()


def extract(tar: bytes, dest: Path, whiteouts: str = "overlay", **options) -> Path:
    dest.mkdir(exist_ok=True)
    extract_tar(io.BytesIO(tar), dest, whiteouts=whiteouts, **options)
    return dest


def tree(root: Path) -> dict[str, str]:
    """Every path under root with a short description: type, mode and content or target."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISDIR(st.st_mode):
            out[rel] = f"dir {stat.S_IMODE(st.st_mode):o}"
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = f"link {os.readlink(path)}"
        elif stat.S_ISCHR(st.st_mode):
            out[rel] = f"chr {os.major(st.st_rdev)}/{os.minor(st.st_rdev)}"
        else:
            out[rel] = f"file {stat.S_IMODE(st.st_mode):o} {path.read_bytes().decode()}"
    return out


SAMPLE = make_tar(M("etc", tarfile.DIRTYPE, mode=0o755), M("etc/hosts", data=b"127.0.0.1 localhost\n"))


@pytest.mark.parametrize("compress", [
    lambda data: data,
    gzip.compress,
    lambda data: zstandard.ZstdCompressor(level=3).compress(data),
], ids=["plain", "gzip", "zstd"])
def test_open_layer_detects_compression(compress, tmp_path: Path) -> None:
    stream = open_layer(io.BytesIO(compress(SAMPLE)))
    assert stream.read() == SAMPLE


@pytest.mark.parametrize("compress", [bz2.compress, lzma.compress, gzip.compress], ids=["bzip2", "xz", "gzip"])
def test_open_archive_also_reads_bzip2_and_xz(compress, tmp_path: Path) -> None:
    extract_tar(open_archive(io.BytesIO(compress(SAMPLE))), tmp_path, whiteouts="keep")
    assert (tmp_path / "etc" / "hosts").read_text() == "127.0.0.1 localhost\n"


def test_multi_frame_zstd_is_read_whole() -> None:
    frames = b"".join(zstandard.ZstdCompressor().compress(SAMPLE[start:start + 1000])
                      for start in range(0, len(SAMPLE), 1000))
    assert open_layer(io.BytesIO(frames)).read() == SAMPLE


@needs_root
def test_preserves_metadata_of_every_type(tmp_path: Path) -> None:
    tar = make_tar(
        M("bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=50, mtime=1234,
          xattrs={"user.note": b"\xff\x00binary", "trusted.overlay.opaque": b"y"}),
        M("tmp", tarfile.DIRTYPE, mode=0o1777, mtime=99),
        M("tmp/link", tarfile.SYMTYPE, linkname="../bin/tool", uid=7, gid=8, mtime=55),
        M("bin/hard", tarfile.LNKTYPE, linkname="bin/tool"),
        M("run/fifo", tarfile.FIFOTYPE, mode=0o620, mtime=77),
        M("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        M("dev/sda", tarfile.BLKTYPE, mode=0o660, dev=(8, 0), gid=6),
    )
    root = extract(tar, tmp_path / "root")
    tool = (root / "bin/tool").lstat()
    assert (stat.S_IMODE(tool.st_mode), tool.st_uid, tool.st_gid, tool.st_mtime) == (0o4755, 1000, 50, 1234)
    assert os.getxattr(root / "bin/tool", "user.note") == b"\xff\x00binary"
    # An archive may not set overlayfs' own xattrs.
    assert "trusted.overlay.opaque" not in os.listxattr(root / "bin/tool")
    assert (root / "bin/hard").lstat().st_ino == tool.st_ino and tool.st_nlink == 2
    tmp = (root / "tmp").lstat()
    assert (stat.S_IMODE(tmp.st_mode), tmp.st_mtime) == (0o1777, 99)
    link = (root / "tmp/link").lstat()
    assert (os.readlink(root / "tmp/link"), link.st_uid, link.st_gid, link.st_mtime) == ("../bin/tool", 7, 8, 55)
    fifo = (root / "run/fifo").lstat()
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620 and fifo.st_mtime == 77
    null = (root / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3) and stat.S_IMODE(null.st_mode) == 0o666
    sda = (root / "dev/sda").lstat()
    assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 0) and sda.st_gid == 6
    # Parents missing from the archive are made 0755, owned by root.
    for implicit in ("bin", "run", "dev"):
        st = (root / implicit).lstat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)


@needs_root
def test_owner_replaces_every_owner(tmp_path: Path) -> None:
    tar = make_tar(M("d", tarfile.DIRTYPE, uid=5), M("d/f", uid=6, gid=6), M("x/l", tarfile.SYMTYPE, linkname="f"))
    root = extract(tar, tmp_path / "root", "keep", owner=(1000, 1000))
    for rel in ("d", "d/f", "x", "x/l"):
        st = (root / rel).lstat()
        assert (st.st_uid, st.st_gid) == (1000, 1000), rel


def prepared(dest: Path) -> Path:
    """A tree as earlier layers left it."""
    (dest / "keep").mkdir(parents=True)
    (dest / "keep/old").write_text("old")
    (dest / "gone").write_text("bye")
    (dest / "gonedir/sub").mkdir(parents=True)
    (dest / "opq/sub").mkdir(parents=True)
    (dest / "opq/old").write_text("old")
    (dest / "opq/sub/old").write_text("old")
    return dest


WHITEOUT_LAYER = make_tar(
    M(".wh.gone"),
    M(".wh.gonedir"),
    M("opq", tarfile.DIRTYPE, mode=0o755),
    M("opq/.wh..wh..opq"),
    M("opq/new", data=b"new"),
    M("opq/sub", tarfile.DIRTYPE, mode=0o755),
    M("opq/sub/new", data=b"new"),
    M("keep/.wh..wh.plnk", tarfile.DIRTYPE),
)


@pytest.mark.parametrize(("whiteouts", "expected"), [
    ("overlay", {
        "gone": "chr 0/0", "gonedir": "chr 0/0", "keep": "dir 755", "keep/old": "file 644 old",
        "opq": "dir 755", "opq/new": "file 644 new", "opq/old": "file 644 old", "opq/sub": "dir 755",
        "opq/sub/new": "file 644 new", "opq/sub/old": "file 644 old",
    }),
    ("apply", {
        "keep": "dir 755", "keep/old": "file 644 old", "opq": "dir 755", "opq/new": "file 644 new",
        "opq/sub": "dir 755", "opq/sub/new": "file 644 new",
    }),
    ("keep", {
        ".wh.gone": "file 644 ", ".wh.gonedir": "file 644 ", "gone": "file 644 bye", "gonedir": "dir 755",
        "gonedir/sub": "dir 755", "keep": "dir 755", "keep/.wh..wh.plnk": "dir 644", "keep/old": "file 644 old",
        "opq": "dir 755", "opq/.wh..wh..opq": "file 644 ", "opq/new": "file 644 new", "opq/old": "file 644 old",
        "opq/sub": "dir 755", "opq/sub/new": "file 644 new", "opq/sub/old": "file 644 old",
    }),
])
def test_whiteout_modes(whiteouts: str, expected: dict[str, str], tmp_path: Path) -> None:
    root = prepared(tmp_path / "root")
    os.umask(0o022)
    extract(WHITEOUT_LAYER, root, whiteouts)
    assert tree(root) == expected
    if whiteouts == "overlay":
        assert os.getxattr(root / "opq", "trusted.overlay.opaque") == b"y"
        assert "trusted.overlay.opaque" not in os.listxattr(root / "keep")


def test_overlay_mode_uses_the_given_opaque_xattr(tmp_path: Path) -> None:
    root = extract(make_tar(M("d", tarfile.DIRTYPE), M("d/.wh..wh..opq")), tmp_path / "root",
                   opaque_xattr="user.overlay.opaque")
    assert os.getxattr(root / "d", "user.overlay.opaque") == b"y"


def test_apply_opaque_marker_after_the_new_children_spares_them(tmp_path: Path) -> None:
    root = prepared(tmp_path / "root")
    extract(make_tar(M("opq/new", data=b"new"), M("opq/.wh..wh..opq")), root, "apply")
    assert sorted(path.name for path in (root / "opq").iterdir()) == ["new"]


def test_replacing_entries(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dir/child").mkdir(parents=True)
    (root / "file").write_text("old")
    (root / "becomes_file/deep").mkdir(parents=True)
    (root / "link").symlink_to("file")
    tar = make_tar(
        M("dir", tarfile.DIRTYPE, mode=0o700, mtime=5),  # a dir over a dir: metadata only
        M("file", data=b"new"),  # a file over a file
        M("becomes_file", data=b"was a dir"),  # a file over a dir: the dir goes
        M("link", tarfile.DIRTYPE, mode=0o755),  # a dir over a symlink
    )
    extract(tar, root, "apply")
    assert tree(root) == {
        "becomes_file": "file 644 was a dir", "dir": "dir 700", "dir/child": f"dir {0o777 & ~current_umask():o}",
        "file": "file 644 new", "link": "dir 755",
    }
    assert (root / "dir").stat().st_mtime == 5


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_root_entry_sets_the_root_metadata(tmp_path: Path) -> None:
    root = extract(make_tar(M("./", tarfile.DIRTYPE, mode=0o750, mtime=42), M("./a", data=b"a")), tmp_path / "r")
    st = root.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o750, 42)


def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret").write_text("secret")
    return directory


# Each hostile archive either fails with a clear error or is confined; nothing outside changes.
HOSTILE = [
    ("dotdot", lambda out: [M("../outside/secret", data=b"pwned")], "escapes the root"),
    ("dotdot_inside", lambda out: [M("a/../../outside/x", data=b"pwned")], "escapes the root"),
    ("absolute", lambda out: [M(f"{out}/secret", data=b"pwned")], None),
    ("symlink_then_write", lambda out: [M("a", tarfile.SYMTYPE, linkname=str(out)), M("a/secret", data=b"pwned")],
     None),
    ("relative_symlink_then_write",
     lambda out: [M("a/b", tarfile.SYMTYPE, linkname="../../../../../../.." + str(out)),
                  M("a/b/secret", data=b"pwned")], None),
    ("symlink_chain", lambda out: [M("a", tarfile.SYMTYPE, linkname="b"), M("b", tarfile.SYMTYPE, linkname=str(out)),
                                   M("a/new", data=b"pwned")], None),
    ("hardlink_outside_absolute", lambda out: [M("h", tarfile.LNKTYPE, linkname=f"{out}/secret")],
     "which is not in the archive before it"),
    ("hardlink_outside_dotdot", lambda out: [M("h", tarfile.LNKTYPE, linkname="../outside/secret")],
     "escapes the root"),
    ("hardlink_through_symlink", lambda out: [M("a", tarfile.SYMTYPE, linkname=str(out)),
                                              M("h", tarfile.LNKTYPE, linkname="a/secret")],
     "which is not in the archive before it"),
    ("hardlink_to_etc_passwd", lambda out: [M("h", tarfile.LNKTYPE, linkname="/etc/passwd")],
     "which is not in the archive before it"),
    ("symlink_loop", lambda out: [M("a", tarfile.SYMTYPE, linkname="b"), M("b", tarfile.SYMTYPE, linkname="a"),
                                  M("a/x", data=b"x")], "too many levels of symbolic links"),
]


@pytest.mark.parametrize(("members", "error"), [(case[1], case[2]) for case in HOSTILE],
                         ids=[case[0] for case in HOSTILE])
@pytest.mark.parametrize("whiteouts", ["overlay", "apply", "keep"])
def test_hostile_archives_never_write_outside(members, error, whiteouts: str, tmp_path: Path) -> None:
    out = outside(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    tar = make_tar(*members(out))
    if error:
        with pytest.raises(PybuildError, match=error):
            extract(tar, dest, whiteouts, label="layer sha256:abc")
    else:
        extract(tar, dest, whiteouts)
        # Confined: the write landed at the same path below dest.
        landed = [path for path in dest.rglob("*") if path.is_file() and not path.is_symlink()]
        assert landed and all(path.read_bytes() == b"pwned" for path in landed)
        assert all(str(path).startswith(str(dest) + "/") for path in landed)
    assert sorted(path.name for path in out.iterdir()) == ["secret"]
    assert (out / "secret").read_text() == "secret"


def test_error_names_the_archive_and_member(tmp_path: Path) -> None:
    with pytest.raises(PybuildError) as caught:
        extract(make_tar(M("../x")), tmp_path / "d", label="layer sha256:abc")
    assert caught.value.message == "layer sha256:abc: member '../x' escapes the root"


def test_symlink_left_by_an_earlier_layer_is_confined(tmp_path: Path) -> None:
    out = outside(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "lib").symlink_to(out)  # from an earlier layer
    (dest / "secret").symlink_to(out / "secret")
    extract(make_tar(M("lib/evil", data=b"pwned"), M("secret", data=b"replaced")), dest, "apply")
    assert (dest / str(out).lstrip("/") / "evil").read_bytes() == b"pwned"
    # A member replaces a symlink; it never writes through it.
    assert not (dest / "secret").is_symlink() and (dest / "secret").read_text() == "replaced"
    assert sorted(path.name for path in out.iterdir()) == ["secret"] and (out / "secret").read_text() == "secret"


def test_file_in_place_of_a_parent_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PybuildError, match="'f' is not a directory"):
        extract(make_tar(M("f", data=b"x"), M("f/g", data=b"y")), tmp_path / "d")


def test_hardlink_to_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PybuildError, match="member 'h' links to 'nothere'"):
        extract(make_tar(M("h", tarfile.LNKTYPE, linkname="nothere")), tmp_path / "d")


def test_corrupt_archive_is_an_error(tmp_path: Path) -> None:
    corrupt = gzip.compress(SAMPLE)[:-30] + b"\x00" * 30
    with pytest.raises(PybuildError, match="layer x is not a readable tar archive"):
        extract_tar(open_layer(io.BytesIO(corrupt)), tmp_path, whiteouts="overlay", label="layer x")


def test_device_that_may_not_be_made_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "mknod", refuse)
    with pytest.raises(PybuildError, match="member 'dev/null' needs a device node"):
        extract(make_tar(M("dev/null", tarfile.CHRTYPE, dev=(1, 3))), tmp_path / "d")
    with pytest.raises(PybuildError, match=r"member '.wh.x' needs a whiteout \(character device 0/0\)"):
        extract(make_tar(M(".wh.x")), tmp_path / "e")


def test_large_file_streams_through(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    extract(make_tar(M("big", data=data)), tmp_path / "d", "keep")
    assert (tmp_path / "d/big").read_bytes() == data


def pax_member(name: str, headers: dict[str, str], kind: bytes = tarfile.REGTYPE) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.type, info.pax_headers = kind, headers
        info.size = 1 if kind == tarfile.REGTYPE else 0
        archive.addfile(info, io.BytesIO(b"x"))
    return buffer.getvalue()


@pytest.mark.parametrize(("tar", "error"), [
    (pax_member("huge", {"comment": "y" * (2 << 20)}), "layer x is not a readable tar archive: member .* has a "
                                                        r"\d+-byte extended header, too large to be real"),
    (pax_member("nul", {"path": "a\0b"}), r"layer x: member 'a\\x00b' has a NUL byte in its name"),
    (pax_member("ids", {"uid": str(2**70)}), "layer x: cannot extract member 'ids': "),
    (pax_member("time", {"mtime": "1e400"}), "layer x: cannot extract member 'time': "),
    (pax_member("link", {"linkpath": "a\0b"}, tarfile.SYMTYPE), "layer x: cannot extract member 'link': "),
])
def test_impossible_headers_are_errors(tmp_path: Path, tar: bytes, error: str) -> None:
    with pytest.raises(PybuildError) as caught:
        extract_tar(io.BytesIO(tar), tmp_path, whiteouts="overlay", label="layer x")
    assert re.search(error, caught.value.message), caught.value.message


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_cut_streams_are_errors_even_after_the_tar_ends(compression: str) -> None:
    whole = gzip.compress(SAMPLE) if compression == "gzip" else zstandard.ZstdCompressor().compress(SAMPLE)
    stream = open_layer(io.BytesIO(whole[:-3]))
    if compression == "gzip":
        with pytest.raises(PybuildError, match="gzip stream is damaged or cut short"):
            while stream.read(1 << 16):
                pass
    else:
        # zstd reads a cut stream as shorter content, which the layer's diff_id check then refuses.
        content = b""
        while chunk := stream.read(1 << 16):
            content += chunk
        assert content != SAMPLE
