"""COPY and ADD semantics: a table of context trees, COPY arguments and the complete resulting tree."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.server
import io
import lzma
import os
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard

from builder.fs.context import BuildContext, SourceTree
from builder.fs.copy import PreviousLayer, container_path, copy_into, make_directory, parse_chmod, write_inline
from builder.fs.layer import write_layer
from parser.errors import PybuildError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="COPY sets owners (lchown), which needs root")

CONTEXT_OWNER = (4242, 4242)  # context files belong to someone else: COPY must not keep that
MTIME = 1_000_000


@dataclass(frozen=True)
class F:
    content: str
    mode: int = 0o644


@dataclass(frozen=True)
class D:
    mode: int = 0o755


@dataclass(frozen=True)
class L:
    target: str


@dataclass(frozen=True)
class H:
    """A hardlink to another path of the same tree."""

    target: str


Spec = Mapping[str, "str | F | D | L | H"]


def make_tree(root: Path, spec: Spec, owner: tuple[int, int] = CONTEXT_OWNER) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, item in spec.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(item, str):
            item = F(item)
        if isinstance(item, F):
            path.write_text(item.content)
            path.chmod(item.mode)
        elif isinstance(item, D):
            path.mkdir(exist_ok=True)
            path.chmod(item.mode)
        elif isinstance(item, L):
            path.symlink_to(item.target)
        else:
            os.link(root / item.target, path)
        os.lchown(path, *owner)
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return root


def listing(root: Path) -> dict[str, str]:
    """Every path below ``root``: type, mode, owner, and content or link target."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            st = path.lstat()
            key = "/" + str(path.relative_to(root))
            owner = f"{st.st_uid}:{st.st_gid}"
            mode = f"{st.st_mode & 0o7777:04o}"
            if path.is_symlink():
                out[key] = f"link {owner} -> {os.readlink(path)}"
            elif path.is_dir():
                out[key] = f"dir {mode} {owner}"
            elif path.is_fifo():
                out[key] = f"fifo {mode} {owner}"
            else:
                out[key] = f"file {mode} {owner} {path.read_bytes().decode(errors='replace')}"
    return out


@dataclass(frozen=True)
class Case:
    id: str
    context: Spec
    sources: tuple[str, ...]
    dest: str
    expect: Mapping[str, str] | None = None  # the complete tree of the destination root afterwards
    error: str | None = None  # or what the error message must say
    before: Spec = field(default_factory=dict)  # the destination root beforehand (owned by 0:0)
    options: Mapping[str, Any] = field(default_factory=dict)
    rootfs: bool = False  # read from a root filesystem (COPY --from), not a build context


ROOT = "dir 0755 0:0"

CASES = [
    # Destinations
    Case("file-to-file", {"a.txt": "a"}, ("a.txt",), "/b.txt", {"/b.txt": "file 0644 0:0 a"}),
    Case("file-into-dir-slash", {"a.txt": "a"}, ("a.txt",), "/d/", {"/d": ROOT, "/d/a.txt": "file 0644 0:0 a"}),
    Case("file-into-existing-dir", {"a.txt": "a"}, ("a.txt",), "/d", {"/d": "dir 0700 0:0",
                                                                      "/d/a.txt": "file 0644 0:0 a"},
         before={"d": D(0o700)}),
    Case("missing-parents-created", {"a.txt": "a"}, ("a.txt",), "/x/y/z.txt",
         {"/x": ROOT, "/x/y": ROOT, "/x/y/z.txt": "file 0644 0:0 a"}),
    Case("relative-dest-uses-workdir", {"a.txt": "a"}, ("a.txt",), "rel/",
         {"/app": ROOT, "/app/rel": ROOT, "/app/rel/a.txt": "file 0644 0:0 a"}, options={"workdir": "/app"}),
    Case("dot-dest-is-workdir", {"a.txt": "a"}, ("a.txt",), ".", {"/app": ROOT, "/app/a.txt": "file 0644 0:0 a"},
         before={"app": D()}, options={"workdir": "/app"}),
    Case("dest-root", {"a.txt": "a"}, ("a.txt",), "/", {"/a.txt": "file 0644 0:0 a"}),
    # Directory sources copy their contents
    Case("dir-contents", {"dir/in": "i", "dir/sub/deep": "d"}, ("dir",), "/d",
         {"/d": ROOT, "/d/in": "file 0644 0:0 i", "/d/sub": ROOT, "/d/sub/deep": "file 0644 0:0 d"}),
    Case("dir-trailing-slash-source", {"dir/in": "i"}, ("dir/",), "/e/", {"/e": ROOT, "/e/in": "file 0644 0:0 i"}),
    Case("whole-context", {"a": "a", "s/b": "b"}, (".",), "/c/",
         {"/c": ROOT, "/c/a": "file 0644 0:0 a", "/c/s": ROOT, "/c/s/b": "file 0644 0:0 b"}),
    Case("dir-keeps-modes", {"dir/x": F("x", 0o755), "dir/p": F("p", 0o600), "dir/priv": D(0o700),
                             "dir/priv/f": "f"}, ("dir",), "/d",
         {"/d": ROOT, "/d/p": "file 0600 0:0 p", "/d/priv": "dir 0700 0:0", "/d/priv/f": "file 0644 0:0 f",
          "/d/x": "file 0755 0:0 x"}),
    # Wildcards
    Case("star", {"a.txt": "a", "b.txt": "b", "c.md": "c"}, ("*.txt",), "/w/",
         {"/w": ROOT, "/w/a.txt": "file 0644 0:0 a", "/w/b.txt": "file 0644 0:0 b"}),
    Case("question-mark", {"index.js": "j", "index.ts": "t", "index.jsx": "x"}, ("index.?s",), "/w/",
         {"/w": ROOT, "/w/index.js": "file 0644 0:0 j", "/w/index.ts": "file 0644 0:0 t"}),
    Case("char-class", {"a.txt": "a", "b.txt": "b", "c.txt": "c"}, ("[ab].txt",), "/w/",
         {"/w": ROOT, "/w/a.txt": "file 0644 0:0 a", "/w/b.txt": "file 0644 0:0 b"}),
    Case("negated-class-and-range", {"a1": "1", "a2": "2", "ax": "x"}, ("a[^0-1]",), "/w/",
         {"/w": ROOT, "/w/a2": "file 0644 0:0 2", "/w/ax": "file 0644 0:0 x"}),
    Case("escaped-bracket", {"arr[0].txt": "0", "arr0.txt": "n"}, ("arr[[]0].txt",), "/w/",
         {"/w": ROOT, "/w/arr[0].txt": "file 0644 0:0 0"}),
    Case("star-matches-hidden-files", {".env": "e", "x": "x"}, ("*",), "/w/",
         {"/w": ROOT, "/w/.env": "file 0644 0:0 e", "/w/x": "file 0644 0:0 x"}),
    Case("wildcard-dirs-merge-contents", {"dir1/a": "a", "dir2/b": "b", "other/c": "c"}, ("dir*",), "/m/",
         {"/m": ROOT, "/m/a": "file 0644 0:0 a", "/m/b": "file 0644 0:0 b"}),
    Case("wildcard-middle-segment-last-wins", {"x/f.txt": "x", "y/f.txt": "y", "y/g": "g"}, ("*/f.txt",), "/m/",
         {"/m": ROOT, "/m/f.txt": "file 0644 0:0 y"}),
    Case("several-sources", {"a.txt": "a", "b.txt": "b"}, ("a.txt", "b.txt"), "/m/",
         {"/m": ROOT, "/m/a.txt": "file 0644 0:0 a", "/m/b.txt": "file 0644 0:0 b"}),
    Case("several-sources-existing-dir", {"a.txt": "a", "b.txt": "b"}, ("a.txt", "b.txt"), "/m",
         {"/m": ROOT, "/m/a.txt": "file 0644 0:0 a", "/m/b.txt": "file 0644 0:0 b"}, before={"m": D()}),
    Case("several-sources-need-dir", {"a.txt": "a", "b.txt": "b"}, ("a.txt", "b.txt"), "/m",
         error="destination must be a directory and end with a /: /m"),
    Case("wildcard-needs-dir", {"a.txt": "a"}, ("*.txt",), "/m", error="destination must be a directory"),
    Case("missing-source", {"a.txt": "a"}, ("nope.txt",), "/x",
         error="COPY failed: file not found in build context or excluded by .dockerignore: nope.txt"),
    Case("no-wildcard-match", {"a.txt": "a"}, ("*.md",), "/x/", error="no source files were specified"),
    Case("bad-pattern", {"a.txt": "a"}, ("[a",), "/x/", error="COPY [a: syntax error in pattern"),
    Case("parent-of-context", {"a.txt": "a"}, ("../a.txt",), "/x",
         error="COPY ../a.txt: forbidden path outside the build context"),
    Case("absolute-source-is-in-context", {"a.txt": "a"}, ("/a.txt",), "/x", {"/x": "file 0644 0:0 a"}),
    Case("source-path-cleaned", {"a.txt": "a", "s/b": "b"}, ("s/../a.txt",), "/x", {"/x": "file 0644 0:0 a"}),
    # Symlinks
    Case("top-level-link-followed", {"a.txt": "a", "link": L("a.txt")}, ("link",), "/l",
         {"/l": "file 0644 0:0 a"}),
    Case("top-level-link-keeps-its-name", {"a.txt": "a", "link": L("a.txt")}, ("link",), "/d/",
         {"/d": ROOT, "/d/link": "file 0644 0:0 a"}),
    Case("link-to-dir-copies-contents", {"real/f": "f", "alias": L("real")}, ("alias",), "/d",
         {"/d": ROOT, "/d/f": "file 0644 0:0 f"}),
    Case("links-inside-dir-stay-links", {"dir/f": "f", "dir/rel": L("f"), "dir/abs": L("/etc/passwd"),
                                         "dir/out": L("../../outside")}, ("dir",), "/d",
         {"/d": ROOT, "/d/abs": "link 0:0 -> /etc/passwd", "/d/f": "file 0644 0:0 f",
          "/d/out": "link 0:0 -> ../../outside", "/d/rel": "link 0:0 -> f"}),
    Case("link-leading-out-refused", {"escape": L("../../../../etc")}, ("escape/passwd",), "/x",
         error="COPY escape/passwd: symlink escape leads outside the build context"),
    Case("absolute-link-refused", {"abs": L("/etc/hostname")}, ("abs",), "/x",
         error="COPY abs: symlink abs leads outside the build context"),
    Case("dangling-link-source", {"gone": L("missing")}, ("gone",), "/x", error="file not found"),
    # Metadata
    Case("chown-everything", {"dir/f": "f", "dir/l": L("f"), "dir/s": D()}, ("dir",), "/o/p",
         {"/o": "dir 0755 1000:50", "/o/p": "dir 0755 1000:50", "/o/p/f": "file 0644 1000:50 f",
          "/o/p/l": "link 1000:50 -> f", "/o/p/s": "dir 0755 1000:50"}, options={"chown": (1000, 50)}),
    Case("chmod-files-and-dirs", {"dir/f": F("f", 0o600), "dir/s": D(0o700), "dir/l": L("f")}, ("dir",), "/c",
         {"/c": ROOT, "/c/f": "file 0640 0:0 f", "/c/l": "link 0:0 -> f", "/c/s": "dir 0640 0:0"},
         options={"chmod": "0640"}),
    Case("chmod-setuid", {"tool": F("t", 0o755)}, ("tool",), "/t", {"/t": "file 4755 1000:1000 t"},
         options={"chmod": "4755", "chown": (1000, 1000)}),
    Case("chmod-symbolic-unsupported", {"a": "a"}, ("a",), "/x",
         error="--chmod=u+x: only octal modes (such as 755) are supported", options={"chmod": "u+x"}),
    Case("hardlinks-kept", {"dir/a": "same", "dir/b": H("dir/a"), "dir/c": "other"}, ("dir",), "/h",
         {"/h": ROOT, "/h/a": "file 0644 0:0 same", "/h/b": "file 0644 0:0 same", "/h/c": "file 0644 0:0 other"}),
    # Replacing and merging
    Case("file-replaces-file", {"a.txt": "new"}, ("a.txt",), "/a.txt", {"/a.txt": "file 0644 0:0 new"},
         before={"a.txt": F("old", 0o600)}),
    Case("file-replaces-link-in-tree", {"dir/x": "new"}, ("dir",), "/d", {"/d": ROOT, "/d/x": "file 0644 0:0 new",
                                                                          "/target": "file 0644 0:0 kept"},
         before={"d": D(), "d/x": L("/target"), "target": "kept"}),
    Case("file-over-dir-in-tree", {"dir/x": "f"}, ("dir",), "/d", error="cannot replace directory /d/x with a file",
         before={"d/x": D()}),
    Case("dir-over-file-in-tree", {"dir/x/y": "f"}, ("dir",), "/d",
         error="cannot copy a directory over the file /d/x", before={"d/x": "file"}),
    Case("dir-over-existing-file", {"dir/y": "f"}, ("dir",), "/d",
         error="cannot copy dir to /d: it exists and is not a directory", before={"d": "file"}),
    Case("dirs-merge-and-take-source-metadata", {"dir/sub": D(0o750), "dir/sub/new": "n"}, ("dir",), "/d",
         {"/d": "dir 0711 0:0", "/d/sub": "dir 0750 0:0", "/d/sub/new": "file 0644 0:0 n",
          "/d/sub/old": "file 0644 0:0 o"}, before={"d": D(0o711), "d/sub": D(0o777), "d/sub/old": "o"}),
    Case("dest-link-to-dir-followed", {"a.txt": "a"}, ("a.txt",), "/link", {"/link": "link 0:0 -> /real",
                                                                            "/real": ROOT,
                                                                            "/real/a.txt": "file 0644 0:0 a"},
         before={"real": D(), "link": L("/real")}),
    Case("dest-link-as-file-written-through", {"a.txt": "a"}, ("a.txt",), "/link",
         {"/link": "link 0:0 -> etc/conf", "/etc": ROOT, "/etc/conf": "file 0644 0:0 a"},
         before={"etc/conf": "old", "link": L("etc/conf")}),
    Case("dest-link-escape-stays-in-root", {"a.txt": "a"}, ("a.txt",), "/up/",
         {"/up": "link 0:0 -> ../../../../tmp/x", "/tmp": ROOT, "/tmp/x": ROOT, "/tmp/x/a.txt": "file 0644 0:0 a"},
         before={"up": L("../../../../tmp/x")}),
    Case("dir-merges-through-link-to-dir", {"rootfs/lib/x.so": "so"}, ("rootfs",), "/",
         {"/lib": "link 0:0 -> usr/lib", "/usr": ROOT, "/usr/lib": ROOT, "/usr/lib/x.so": "file 0644 0:0 so"},
         before={"usr/lib": D(), "lib": L("usr/lib")}),
    # --exclude
    Case("exclude-top-level-only", {"a.md": "a", "s/b.md": "b", "k": "k"}, (".",), "/e/",
         {"/e": ROOT, "/e/k": "file 0644 0:0 k", "/e/s": ROOT, "/e/s/b.md": "file 0644 0:0 b"},
         options={"excludes": ("*.md",)}),
    Case("exclude-any-depth", {"a.md": "a", "s/b.md": "b", "k": "k", "skip/x": "x"}, (".",), "/e/",
         {"/e": ROOT, "/e/k": "file 0644 0:0 k", "/e/s": ROOT}, options={"excludes": ("**/*.md", "skip")}),
    Case("exclude-relative-to-copied-dir", {"src/a.bak": "a", "src/b": "b"}, ("src",), "/e",
         {"/e": ROOT, "/e/b": "file 0644 0:0 b"}, options={"excludes": ("*.bak",)}),
    Case("exclude-with-exception", {"logs/a": "a", "logs/keep": "k", "x": "x"}, (".",), "/e/",
         {"/e": ROOT, "/e/logs": ROOT, "/e/logs/keep": "file 0644 0:0 k", "/e/x": "file 0644 0:0 x"},
         options={"excludes": ("logs", "!logs/keep")}),
    Case("exclude-wildcard-matches", {"home.txt": "t", "homer.md": "m", "hom.sh": "s"}, ("hom*",), "/mydir/",
         {"/mydir": ROOT, "/mydir/hom.sh": "file 0644 0:0 s", "/mydir/homer.md": "file 0644 0:0 m"},
         options={"excludes": ("*.txt",)}),
    # --parents
    Case("parents", {"x/a.txt": "x", "y/a.txt": "y"}, ("./x/a.txt", "./y/a.txt"), "/p/",
         {"/p": ROOT, "/p/x": ROOT, "/p/x/a.txt": "file 0644 0:0 x", "/p/y": ROOT, "/p/y/a.txt": "file 0644 0:0 y"},
         options={"parents": True}),
    Case("parents-copy-source-dir-modes", {"x": D(0o750), "x/y/f": "f"}, ("x/*/f",), "/p/",
         {"/p": ROOT, "/p/x": "dir 0750 0:0", "/p/x/y": ROOT, "/p/x/y/f": "file 0644 0:0 f"},
         options={"parents": True}),
    Case("parents-pivot", {"x/y/a.txt": "a", "x/y/b.txt": "b"}, ("./x/./y/*.txt",), "/p/",
         {"/p": ROOT, "/p/y": ROOT, "/p/y/a.txt": "file 0644 0:0 a", "/p/y/b.txt": "file 0644 0:0 b"},
         options={"parents": True}),
    Case("parents-pivot-dir", {"a/b/c/f": "f"}, ("./a/./b/c",), "/dst",
         {"/dst": ROOT, "/dst/b": ROOT, "/dst/b/c": ROOT, "/dst/b/c/f": "file 0644 0:0 f"},
         options={"parents": True}),
    Case("parents-double-star", {"src/a.txt": "a", "src/x/b.txt": "b", "src/x/y/c.txt": "c", "src/x/n.md": "n"},
         ("./src/**/*.txt",), "/p/",
         {"/p": ROOT, "/p/src": ROOT, "/p/src/a.txt": "file 0644 0:0 a", "/p/src/x": ROOT,
          "/p/src/x/b.txt": "file 0644 0:0 b", "/p/src/x/y": ROOT, "/p/src/x/y/c.txt": "file 0644 0:0 c"},
         options={"parents": True}),
    Case("parents-with-exclude", {"x/a.txt": "a", "x/b.log": "b"}, ("x",), "/p/",
         {"/p": ROOT, "/p/x": ROOT, "/p/x/a.txt": "file 0644 0:0 a"},
         options={"parents": True, "excludes": ("**/*.log",)}),
    # .dockerignore
    Case("dockerignore-filters-tree", {".dockerignore": "secret*\n!secret-ok\n*/tmp\n", "secret-a": "no",
                                       "secret-ok": "yes", "plain": "p", "d/tmp": "t", "d/keep": "k"}, (".",), "/c/",
         {"/c": ROOT, "/c/.dockerignore": "file 0644 0:0 secret*\n!secret-ok\n*/tmp\n", "/c/d": ROOT,
          "/c/d/keep": "file 0644 0:0 k", "/c/plain": "file 0644 0:0 p", "/c/secret-ok": "file 0644 0:0 yes"}),
    Case("dockerignore-hides-literal", {".dockerignore": "hidden\n", "hidden": "h"}, ("hidden",), "/x",
         error="file not found in build context or excluded by .dockerignore: hidden"),
    Case("dockerignore-dir-with-exception", {".dockerignore": "build\n!build/out/keep\n", "build/a": "a",
                                             "build/out/keep": "k", "build/out/drop": "d"}, ("build",), "/b",
         {"/b": ROOT, "/b/out": ROOT, "/b/out/keep": "file 0644 0:0 k"}),
    Case("dockerignore-wildcard-skips-ignored", {".dockerignore": "b.txt\n", "a.txt": "a", "b.txt": "b"},
         ("*.txt",), "/w/", {"/w": ROOT, "/w/a.txt": "file 0644 0:0 a"}),
    # A root filesystem (COPY --from) resolves links as a chroot would
    Case("rootfs-absolute-link-in-root", {"etc/real": "r", "etc/link": L("/etc/real")}, ("/etc/link",), "/x",
         {"/x": "file 0644 0:0 r"}, rootfs=True),
    Case("rootfs-parent-path-clamped", {"a": "a"}, ("../../a",), "/x", {"/x": "file 0644 0:0 a"}, rootfs=True),
    Case("rootfs-missing", {"a": "a"}, ("/nope",), "/x", error="file not found in the --from source: /nope",
         rootfs=True),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_copy(case: Case, tmp_path: Path) -> None:
    source_root = make_tree(tmp_path / "context", case.context)
    source = SourceTree(source_root) if case.rootfs else BuildContext(source_root)
    dest_root = make_tree(tmp_path / "root", case.before, owner=(0, 0))
    if case.error is not None:
        with pytest.raises(PybuildError) as caught:
            copy_into(dest_root, case.sources, case.dest, source=source, **case.options)
        assert case.error in caught.value.message
        assert "\n" not in caught.value.message
        return
    copy_into(dest_root, case.sources, case.dest, source=source, **case.options)
    got = listing(dest_root)
    assert got == dict(case.expect or {})


def test_times_and_hardlinks_are_kept(tmp_path: Path) -> None:
    context = make_tree(tmp_path / "ctx", {"dir/a": "x", "dir/b": H("dir/a"), "dir/sub/c": "c"})
    os.utime(context / "dir" / "sub", (MTIME + 5, MTIME + 5))
    root = tmp_path / "root"
    root.mkdir()
    copy_into(root, ["dir"], "/d", source=BuildContext(context))
    assert (root / "d/a").stat().st_mtime == MTIME
    assert (root / "d/sub").stat().st_mtime == MTIME + 5  # set after its contents were written
    assert (root / "d/a").stat().st_ino == (root / "d/b").stat().st_ino
    assert (root / "d/a").stat().st_nlink == 2


# --- a copy that links what the previous build's layer already holds ----------------------------------------

AFTER = MTIME + 100  # a time the clamp to an epoch at MTIME brings back to MTIME


def _edit_same_size(context: Path) -> None:
    (context / "a").write_text("z")
    os.utime(context / "a", (MTIME, MTIME))


def _split_link(context: Path) -> None:
    """b stops being a hardlink of a: a file of its own, with the same content, owner and time."""
    (context / "b").unlink()
    make_tree(context, {"b": "x"})


def _join(snapshot: Path) -> None:
    """d/b made a second name of a, which it equals in every attribute."""
    (snapshot / "d" / "b").unlink()
    os.link(snapshot / "a", snapshot / "d" / "b")


def _set_xattr(snapshot: Path) -> None:
    if not _xattrs_supported(snapshot / "a"):  # which leaves an xattr on it
        pytest.skip("the temporary directory's filesystem has no user xattrs")


@dataclass(frozen=True)
class Reuse:
    """A copy made and clamped as a build's layer, ``change`` to the context (and ``tamper`` to that layer), then
    the same copy again linking from it: which files it linked, and that it made the layer a fresh copy makes."""

    id: str
    linked: frozenset[str]
    change: Callable[[Path], object] = lambda context: None
    tamper: Callable[[Path], object] = lambda snapshot: None
    context: Spec = field(default_factory=lambda: {"a": "x", "d/b": "y"})
    before: Mapping[str, Any] = field(default_factory=dict)  # copy_into options of the previous build
    options: Mapping[str, Any] = field(default_factory=dict)  # and of this one
    epoch: int = MTIME + 1_000  # source_date_epoch: above the files' times, which stay as they are


REUSES = [
    Reuse("unchanged", frozenset({"a", "d/b"})),
    Reuse("edited-same-size-and-time", frozenset({"d/b"}), change=_edit_same_size),
    Reuse("mode-changed", frozenset({"d/b"}), change=lambda context: (context / "a").chmod(0o755)),
    Reuse("chmod-sets-the-mode", frozenset({"a", "d/b"}), change=lambda context: (context / "a").chmod(0o755),
          before={"chmod": "600"}, options={"chmod": "600"}),
    Reuse("chmod-changed", frozenset(), before={"chmod": "600"}, options={"chmod": "640"}),
    Reuse("chown-changed", frozenset(), before={"chown": (1, 1)}, options={"chown": (2, 2)}),
    Reuse("touched", frozenset({"d/b"}), change=lambda context: os.utime(context / "a", (AFTER, AFTER))),
    Reuse("touched-past-the-epoch", frozenset({"a", "d/b"}),
          change=lambda context: os.utime(context / "a", (AFTER, AFTER)), epoch=MTIME),
    Reuse("hardlink-kept", frozenset({"a", "b"}), context={"a": "x", "b": H("a")}),
    Reuse("hardlink-split", frozenset({"a"}), change=_split_link, context={"a": "x", "b": H("a")}),
    Reuse("one-file-for-two-before", frozenset({"a"}), tamper=_join, context={"a": "x", "d/b": "x"}),
    Reuse("file-became-symlink", frozenset({"d/b"}), change=lambda context: (
        (context / "a").unlink(), (context / "a").symlink_to("d/b"))),
    Reuse("gone-from-the-snapshot", frozenset({"d/b"}), tamper=lambda snapshot: (snapshot / "a").unlink()),
    Reuse("xattr-in-the-snapshot", frozenset({"d/b"}), tamper=_set_xattr),
]


def _regular_files(root: Path) -> dict[str, tuple[int, int]]:
    """Each regular file below ``root``, by its path there, with its device and inode."""
    return {str(path.relative_to(root)): (st.st_dev, st.st_ino)
            for path in root.rglob("*") if stat.S_ISREG((st := path.lstat()).st_mode)}


def _hardlinked(files: Mapping[str, tuple[int, int]]) -> set[frozenset[str]]:
    """The groups of names that are one file."""
    groups: dict[tuple[int, int], set[str]] = {}
    for name, inode in files.items():
        groups.setdefault(inode, set()).add(name)
    return {frozenset(names) for names in groups.values() if len(names) > 1}


def _layer(root: Path, epoch: int) -> str:
    layer = write_layer(root, None, compression="zstd", source_date_epoch=epoch)
    assert layer is not None
    return layer.diff_id


@pytest.mark.parametrize("case", REUSES, ids=[case.id for case in REUSES])
def test_copy_links_the_previous_layers_identical_files(case: Reuse, tmp_path: Path) -> None:
    context = make_tree(tmp_path / "context", case.context)
    previous = make_tree(tmp_path / "previous", {}, owner=(0, 0))
    copy_into(previous, ["."], "/app", source=BuildContext(context), **case.before)
    _layer(previous, case.epoch)  # clamps its times, as a step's layer dir is before it becomes a snapshot
    case.change(context)
    case.tamper(previous / "app")

    fresh = make_tree(tmp_path / "fresh", {}, owner=(0, 0))
    copy_into(fresh, ["."], "/app", source=BuildContext(context), **case.options)
    reusing = make_tree(tmp_path / "reusing", {}, owner=(0, 0))
    copy_into(reusing, ["."], "/app", source=BuildContext(context), **case.options,
              reuse_from=PreviousLayer(previous, case.epoch))

    donors = set(_regular_files(previous).values())
    reused, made = _regular_files(reusing / "app"), _regular_files(fresh / "app")
    assert {name for name, inode in reused.items() if inode in donors} == case.linked
    assert listing(reusing) == listing(fresh)
    # a hardlink the previous build had joins no files that are separate now, and one kept stays
    assert _hardlinked(reused) == _hardlinked(made)
    assert _layer(reusing, case.epoch) == _layer(fresh, case.epoch)


def _xattrs_supported(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
    except OSError:
        return False
    return True


def test_xattrs_come_from_a_root_filesystem_not_the_context(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", {"f": "f"})
    if not _xattrs_supported(tree / "f"):
        pytest.skip("the temporary directory's filesystem has no user xattrs")
    os.setxattr(tree / "f", "user.origin", b"kept")
    root = make_tree(tmp_path / "root", {}, owner=(0, 0))
    copy_into(root, ["f"], "/from-context", source=BuildContext(tree))
    copy_into(root, ["/f"], "/from-rootfs", source=tree)
    assert "user.origin" not in os.listxattr(root / "from-context")
    assert os.getxattr(root / "from-rootfs", "user.origin") == b"kept"


def test_fifo_from_a_root_filesystem(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", {})
    os.mkfifo(tree / "pipe", 0o640)
    root = make_tree(tmp_path / "root", {}, owner=(0, 0))
    copy_into(root, ["/pipe"], "/p", source=tree)
    assert listing(root) == {"/p": "fifo 0640 0:0"}


# ADD


def _tar(files: Mapping[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o640, MTIME, 7, 8
            archive.addfile(info, io.BytesIO(data))
    return raw.getvalue()


ARCHIVE = _tar({"pkg/README": b"vendored", "pkg/lib/util.sh": b"util"})
COMPRESSIONS = {
    "plain": lambda data: data,
    "gzip": lambda data: gzip.compress(data, mtime=0),
    "bzip2": bz2.compress,
    "xz": lzma.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
@pytest.mark.parametrize("dest", ["/opt/", "/opt"])
def test_add_extracts_local_archives(compression: str, dest: str, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    # The name says nothing: the content decides.
    (context / "vendor.bin").write_bytes(COMPRESSIONS[compression](ARCHIVE))
    root = make_tree(tmp_path / "root", {}, owner=(0, 0))
    copy_into(root, ["vendor.bin"], dest, source=BuildContext(context), is_add=True)
    assert listing(root) == {"/opt": ROOT, "/opt/pkg": ROOT, "/opt/pkg/README": "file 0640 7:8 vendored",
                             "/opt/pkg/lib": ROOT, "/opt/pkg/lib/util.sh": "file 0640 7:8 util"}


def test_add_archive_with_chown_and_copy_does_not_extract(tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "v.tar.gz").write_bytes(gzip.compress(ARCHIVE))
    (context / "empty.tar.gz").write_bytes(b"")
    (context / "notar.gz").write_bytes(gzip.compress(b"just text"))
    root = make_tree(tmp_path / "root", {}, owner=(0, 0))
    copy_into(root, ["v.tar.gz"], "/x/", source=BuildContext(context), is_add=True, chown=(1, 2))
    copy_into(root, ["empty.tar.gz", "notar.gz"], "/plain/", source=BuildContext(context), is_add=True)
    copy_into(root, ["v.tar.gz"], "/copied/", source=BuildContext(context))
    got = listing(root)
    assert got["/x/pkg/README"] == "file 0640 1:2 vendored"
    assert got["/plain/empty.tar.gz"] == "file 0644 0:0 "
    assert (root / "plain/notar.gz").read_bytes() == (context / "notar.gz").read_bytes()
    assert (root / "copied/v.tar.gz").read_bytes() == (context / "v.tar.gz").read_bytes()


SERVED = {"/files/served.txt": b"fetched over http\n", "/files/archive.tar.gz": gzip.compress(ARCHIVE)}
SERVED_SHA256 = "sha256:" + hashlib.sha256(SERVED["/files/served.txt"]).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        body = SERVED.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", "Sun, 12 Jan 1970 13:46:40 GMT")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class UrlCase:
    id: str
    path: str
    dest: str
    expect: Mapping[str, str] | None = None
    error: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


URL_CASES = [
    UrlCase("into-dir", "/files/served.txt", "/dl/",
            {"/dl": ROOT, "/dl/served.txt": "file 0600 0:0 fetched over http\n"}),
    UrlCase("as-file", "/files/served.txt", "/named", {"/named": "file 0600 0:0 fetched over http\n"}),
    UrlCase("checksum-ok", "/files/served.txt", "/c", {"/c": "file 0600 0:0 fetched over http\n"},
            options={"checksum": SERVED_SHA256}),
    UrlCase("chmod-and-chown", "/files/served.txt", "/c", {"/c": "file 0755 5:6 fetched over http\n"},
            options={"chmod": "755", "chown": (5, 6)}),
    UrlCase("checksum-mismatch", "/files/served.txt", "/c",
            error=f"checksum mismatch: expected sha256:{'0' * 64}, got {SERVED_SHA256}",
            options={"checksum": "sha256:" + "0" * 64}),
    UrlCase("checksum-other-algorithm", "/files/served.txt", "/c", error="unsupported digest algorithm 'sha512'",
            options={"checksum": "sha512:" + "0" * 128}),
    UrlCase("not-found", "/files/missing", "/c", error="download failed: HTTP 404"),
    UrlCase("no-file-name", "/", "/dl/", error="cannot tell a file name from the URL"),
]


@pytest.mark.parametrize("case", URL_CASES, ids=[case.id for case in URL_CASES])
def test_add_url(case: UrlCase, http_base: str, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", {}, owner=(0, 0))
    context = BuildContext(make_tree(tmp_path / "ctx", {}))
    if case.error is not None:
        with pytest.raises(PybuildError, match=None) as caught:
            copy_into(root, [http_base + case.path], case.dest, source=context, is_add=True, **case.options)
        assert case.error in caught.value.message
        return
    copy_into(root, [http_base + case.path], case.dest, source=context, is_add=True, **case.options)
    assert listing(root) == dict(case.expect or {})


def test_add_url_archive_is_not_extracted_and_gets_last_modified(http_base: str, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", {}, owner=(0, 0))
    copy_into(root, [http_base + "/files/archive.tar.gz"], "/dl/", source=BuildContext(tmp_path), is_add=True)
    assert (root / "dl/archive.tar.gz").read_bytes() == SERVED["/files/archive.tar.gz"]
    assert (root / "dl/archive.tar.gz").stat().st_mtime == MTIME


ADD_ERRORS = [
    (("https://github.com/moby/buildkit.git#v0.10.1",), {}, "ADD from a git repository is not supported yet"),
    (("git@github.com:user/repo.git",), {}, "ADD from a git repository is not supported yet"),
    (("a",), {"checksum": "sha256:" + "0" * 64}, "--checksum can't be specified for non-HTTP(S) sources"),
    (("http://127.0.0.1:9/a", "http://127.0.0.1:9/b"), {"checksum": "sha256:" + "0" * 64},
     "--checksum can't be specified for multiple sources"),
]


@pytest.mark.parametrize(("sources", "options", "error"), ADD_ERRORS)
def test_add_errors(sources: tuple[str, ...], options: dict[str, Any], error: str, tmp_path: Path) -> None:
    context = BuildContext(make_tree(tmp_path / "ctx", {"a": "a"}))
    with pytest.raises(PybuildError) as caught:
        copy_into(tmp_path, sources, "/x/", source=context, is_add=True, **options)
    assert error in caught.value.message


# Heredocs, directories, small helpers


INLINE_CASES = [
    ("/x", {}, {}, {"/x": "file 0644 0:0 hello\n"}),
    ("/dir/", {}, {}, {"/dir": ROOT, "/dir/EOF": "file 0644 0:0 hello\n"}),
    ("/dir", {"dir": D()}, {}, {"/dir": ROOT, "/dir/EOF": "file 0644 0:0 hello\n"}),
    ("rel", {"w": D()}, {"workdir": "/w"}, {"/w": ROOT, "/w/rel": "file 0644 0:0 hello\n"}),
    ("/s", {}, {"chmod": "755", "chown": (1000, 50)}, {"/s": "file 0755 1000:50 hello\n"}),
]


@pytest.mark.parametrize(("dest", "before", "options", "expect"), INLINE_CASES)
def test_write_inline(dest: str, before: Spec, options: dict[str, Any], expect: dict[str, str],
                      tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", before, owner=(0, 0))
    write_inline(root, "EOF", b"hello\n", dest, **options)
    assert listing(root) == expect


def test_make_directory(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", {"var/run": L("/run"), "file": "f"}, owner=(0, 0))
    assert make_directory(root, "/var/run/app", owner=(3, 4)) == root / "run/app"
    assert listing(root)["/run/app"] == "dir 0755 3:4"
    assert listing(root)["/run"] == "dir 0755 3:4"
    with pytest.raises(PybuildError, match="/file exists and is not a directory"):
        make_directory(root, "/file/sub")


@pytest.mark.parametrize(("chmod", "mode"), [(None, None), ("755", 0o755), ("0644", 0o644), ("4755", 0o4755)])
def test_parse_chmod(chmod: str | None, mode: int | None) -> None:
    assert parse_chmod(chmod) == mode


@pytest.mark.parametrize("chmod", ["u+x", "g=u", "99", "77777"])
def test_parse_chmod_refuses(chmod: str) -> None:
    with pytest.raises(PybuildError, match="only octal modes"):
        parse_chmod(chmod)


@pytest.mark.parametrize(("workdir", "path", "expect"), [
    ("/", "a", "/a"), ("/app", "a/b/", "/app/a/b"), ("/app", "/abs", "/abs"), ("/app", "../..", "/"),
    ("", ".", "/"), ("/app", "//x", "/x"),
])
def test_container_path(workdir: str, path: str, expect: str) -> None:
    assert container_path(workdir, path) == expect


def test_copy_timing_for_a_3000_file_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    context = tmp_path / "ctx"
    for index in range(3000):
        path = context / f"d{index % 30}" / f"s{index % 7}" / f"f{index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {index}\n")
    (context / ".dockerignore").write_text("**/f1*.txt\n!d11/s0/f1001.txt\n")
    root = tmp_path / "root"
    root.mkdir()
    started = time.perf_counter()
    copy_into(root, ["."], "/app", source=BuildContext(context))
    elapsed = time.perf_counter() - started
    copied = sum(len(files) for _, _, files in os.walk(root))
    with capsys.disabled():
        print(f"\nCOPY of a 3000-file context: {copied} files in {elapsed:.2f}s")
    expected = sum(1 for index in range(3000) if not str(index).startswith("1")) + 2  # f1001 and .dockerignore
    assert copied == expected
