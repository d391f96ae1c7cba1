"""What enters a step's cache key: the operation as plain data, and digests of the files it reads.

The rule is the result's: an input enters when it can change the layer the step makes, and only then.
File times enter only where the layer keeps them (older than SOURCE_DATE_EPOCH; the default epoch, 0,
clamps every time away); a source file's owner never does (COPY writes root or ``--chown``), nor its mode
under ``--chmod``; absolute paths and inode numbers never do. A superset is safe (it costs a hit, never a
wrong result): the files a COPY reads are taken with whole directories, before ``--exclude``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from builder.fs.context import SourceTree
from builder.ops import CopyOp, DirectoryOp, RunOp, WorkdirOp
from cache.files import FileDigests
from parser.flags import Mount


def op_data(op: RunOp | CopyOp | WorkdirOp | DirectoryOp, network: str) -> dict[str, Any]:
    """The operation as JSON data (lists, never tuples, so a record read back compares equal): every field
    that can change the result, none that cannot."""
    if isinstance(op, RunOp):
        return {"kind": "run", "argv": list(op.argv), "env": [list(pair) for pair in op.env], "user": op.user,
                "cwd": op.cwd, "network": op.network or network, "mounts": [_mount_data(mount) for mount in op.mounts],
                "scripts": [[name, hashlib.sha256(body).hexdigest()] for name, body in op.scripts]}
    if isinstance(op, CopyOp):
        copy = op.copy
        fields = {field.name: _plain(getattr(copy, field.name)) for field in dataclass_fields(copy)
                  if field.name not in ("location", "original", "source_contents")}
        inline = [[heredoc.name, heredoc.chomp, hashlib.sha256(heredoc.content.encode()).hexdigest()]
                  for heredoc in copy.source_contents]
        return {"kind": type(copy).__name__.lower(), **fields, "inline": inline, "workdir": op.workdir}
    if isinstance(op, WorkdirOp):
        return {"kind": "workdir", "path": op.path, "user": op.user}
    return {"kind": "directory"}


def _mount_data(mount: Mount) -> dict[str, Any]:
    """A mount's options; a secret is named by its id and where it goes, never by its value."""
    return {field.name: value for field in dataclass_fields(mount) if (value := getattr(mount, field.name)) is not None}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class TreeDigests:
    """Digests of the entries a step reads from a source tree, by their path in it.

    An entry's digest holds what the copy keeps of it: its kind, its mode (unless ``--chmod`` sets it),
    its content or link target, the path it is a hard link of, and its time where the layer keeps one.
    """

    def __init__(self, files: FileDigests, epoch: int, *, xattrs: bool = False,
                 seen: dict[str, tuple[int, ...] | None] | None = None) -> None:
        """``xattrs``: the copy keeps extended attributes (from a stage or image, not from the context).
        ``seen`` collects the host path of every entry read and of the directories above them, with their stat
        (``stat_stamp``; None for a directory's whose stat is still to be taken)."""
        self.files = files
        self.epoch = epoch
        self.xattrs = xattrs
        self.seen = seen

    def _entry(self, path: str, st: os.stat_result, chmod: bool, links: dict[tuple[int, int], str],
               rel: str) -> str:
        text = self._kept(path, st, chmod, links, rel)
        if self.xattrs and not stat.S_ISLNK(st.st_mode):
            try:
                names = sorted(os.listxattr(path, follow_symlinks=False))
            except OSError:
                names = []
            for name in names:
                with contextlib.suppress(OSError):
                    text += f":x{name}={hashlib.sha256(os.getxattr(path, name, follow_symlinks=False)).hexdigest()}"
        return text

    def _kept(self, path: str, st: os.stat_result, chmod: bool, links: dict[tuple[int, int], str],
              rel: str) -> str:
        mode = "" if chmod else format(stat.S_IMODE(st.st_mode), "o")
        kept_time = f":{min(st.st_mtime_ns // 1_000_000_000, self.epoch)}" if self.epoch else ""
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            return f"d:{mode}{kept_time}"
        if kind == stat.S_IFLNK:
            return f"l:{os.readlink(path)}{kept_time}"
        if st.st_nlink > 1:
            first = links.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                return f"h:{first}"
        if kind == stat.S_IFREG:
            return f"f:{mode}:{self.files.digest(path, st)}{kept_time}"
        return f"o:{mode}:{kind}:{st.st_rdev}{kept_time}"

    def walk(self, tree: SourceTree, rel: str, *, chmod: bool, out: dict[str, str], prefix: str = "") -> None:
        """Add ``rel`` (a path in ``tree``, "" for its root) and, for a directory, all it holds that the
        tree's ignore rules keep; keys are ``prefix`` + the path in the tree."""
        links: dict[tuple[int, int], str] = {}
        top = tree.root / rel if rel else tree.root
        st = os.lstat(top)
        out[prefix + (rel or ".")] = self._entry(str(top), st, chmod, links, rel or ".")
        seen = self.seen
        if seen is not None:
            seen[str(top)] = stat_stamp(st)
            self.above(tree, rel)
        if stat.S_ISDIR(st.st_mode):
            start = tree.ignore.state_of(rel) if tree.ignore is not None and rel else None
            for path, child_rel, child_st in _below(tree, top, rel, start):
                out[prefix + child_rel] = self._entry(path, child_st, chmod, links, child_rel)
                if seen is not None:
                    seen[path] = stat_stamp(child_st)

    def above(self, tree: SourceTree, rel: str) -> None:
        """The directories from the tree's root down to ``rel``: adding or renaming an entry changes their times."""
        if self.seen is None:
            return
        current = tree.root
        self.seen.setdefault(str(current), None)
        for part in rel.split("/")[:-1] if rel else ():
            current = current / part
            self.seen.setdefault(str(current), None)

    def sources(self, tree: SourceTree, copy: CopyOp, out: dict[str, str], prefix: str = "") -> None:
        """Every entry a COPY or ADD reads from ``tree``: what its sources match, whole."""
        verb = "ADD" if type(copy.copy).__name__ == "Add" else "COPY"
        chmod = copy.copy.chmod is not None
        parents = bool(getattr(copy.copy, "parents", False))
        for source in copy.copy.sources:
            if source.startswith(("http://", "https://")):
                continue  # keyed by its checksum, or not cached at all (builder.solver)
            rel = tree.relative(source.replace("/./", "/") if parents else source, verb)
            for match in tree.find(rel, verb=verb, source=source, recursive=parents):
                if parents:  # the directories above each match are copied too
                    parts = match.path.split("/")[:-1]
                    for depth in range(1, len(parts) + 1):
                        above = "/".join(parts[:depth])
                        real = tree.resolve(above, verb=verb, source=source)
                        out[prefix + above] = self._entry(str(real), os.stat(real), chmod, {}, above)
                if match.path != match.real_rel:  # reached through a symlink: the name used is an input too
                    out[prefix + match.path + " ->"] = match.real_rel
                    self.above(tree, match.path)
                    if self.seen is not None:
                        self.seen.setdefault(str(tree.root / match.path), None)
                self.walk(tree, match.real_rel, chmod=chmod, out=out, prefix=prefix)


def stat_stamp(st: os.stat_result) -> tuple[int, ...]:
    """What of a stat shows a change: type and mode, size, mtime, ctime (no write escapes it), inode."""
    return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _below(tree: SourceTree, directory: Path | str, rel: str, parent: Any) -> Iterator[tuple[str, str, os.stat_result]]:
    """Entries below ``directory`` that the tree's ignore rules keep, in name order, depth first.

    ``parent`` is the ignore rules' state of ``rel``: each entry's state follows from its parent's.
    """
    ignore = tree.ignore
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        child = f"{rel}/{entry.name}" if rel else entry.name
        st = entry.stat(follow_symlinks=False)
        is_dir = stat.S_ISDIR(st.st_mode)
        state = None
        if ignore is not None:
            state = ignore.state(child, parent)
            if ignore.is_excluded(state) and not (is_dir and ignore.may_reinclude_under(child)):
                continue
        yield entry.path, child, st
        if is_dir:
            yield from _below(tree, entry.path, child, state)
