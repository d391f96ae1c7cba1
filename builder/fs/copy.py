"""COPY and ADD: place files from a source tree, a URL, a local archive or a heredoc into an image's root filesystem.

Docker's rules, as BuildKit applies them:

* a directory source copies its contents; a file lands inside ``dest`` when ``dest`` ends with ``/``
  or is a directory, else it becomes ``dest``; several sources or a wildcard need a directory;
* a top-level source that is a symlink is followed, symlinks inside a copied directory are copied;
* modes and times are kept, owners become 0:0 (or ``--chown``), xattrs come only from a root
  filesystem, hardlinks within one COPY stay hardlinks;
* a directory merges into an existing one and takes the copied directory's metadata, except the
  top-level destination, which keeps its own; a file replaces a file or symlink; a file over a
  directory, or a directory over a file, is an error;
* the destination path is resolved inside the root as a chroot would (an absolute link target means
  root + target). Unlike BuildKit, which fails with "cannot copy to non-directory", a directory
  copied over a symlink to a directory merges into that directory (``/lib -> usr/lib`` images).
"""

from __future__ import annotations

import errno
import hashlib
import lzma
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Sequence
from pathlib import Path

import zstandard

from builder.fs.context import BuildContext, PathMatcher, SourceMatch, SourceTree, has_wildcards, resolve_in_root
from builder.fs.untar import extract_tar, open_archive
from builder.sandbox.namespace import check_mapped
from parser.dataclass import dataclass
from parser.errors import PybuildError

_OCTAL = re.compile(r"[0-7]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_URL_SCHEMES = ("http://", "https://")
_GIT_PREFIXES = ("git@", "git://", "ssh://")
_CHUNK = 1 << 20
_URL_MODE = 0o600  # Docker's mode for a downloaded file
_INLINE_MODE = 0o644  # BuildKit's mode for a heredoc file
_DIR_MODE = 0o755  # directories COPY creates on its own (missing parents, the destination)
_DOWNLOAD_TIMEOUT = 60


@dataclass
class PreviousLayer:
    """The snapshot of the layer a copy made in the previous build, as ``write_layer`` left it: its times
    clamped to ``source_date_epoch``, so a file there is compared with what its time becomes."""

    snapshot: Path
    source_date_epoch: int


def parse_chmod(chmod: str | None, verb: str = "COPY") -> int | None:
    """The ``--chmod`` mode; only octal modes are supported so far."""
    if chmod is None:
        return None
    if not _OCTAL.fullmatch(chmod) or int(chmod, 8) > 0o7777:
        raise PybuildError(f"{verb} --chmod={chmod}: only octal modes (such as 755) are supported, "
                           "symbolic modes are not supported yet")
    return int(chmod, 8)


def container_path(workdir: str, path: str) -> str:
    """An absolute, clean path in the image; a relative ``path`` is relative to ``workdir``."""
    cleaned = posixpath.normpath(posixpath.join("/", workdir or "/", path))
    return "/" + cleaned.lstrip("/")


def make_directory(root: Path, path: str, *, owner: tuple[int, int] | None = None) -> Path:
    """``mkdir -p`` inside ``root``: missing directories get mode 0755 and ``owner``. Returns the host path."""
    root = Path(root)
    real = resolve_in_root(root, path)
    if owner is not None:
        check_mapped(*owner, f"directory {path}")
    current = root
    for name in real.relative_to(root).parts:
        current = current / name
        try:
            os.mkdir(current, _DIR_MODE)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                shown = "/" + str(current.relative_to(root))
                raise PybuildError(f"cannot create directory {path}: {shown} exists and is not a directory") from None
            continue
        except NotADirectoryError:
            raise PybuildError(f"cannot create directory {path}: a parent of it is not a directory") from None
        os.chmod(current, _DIR_MODE)  # the umask must not decide
        if owner is not None:
            os.lchown(current, *owner)
    return real


class _Placer:
    """The writes of one COPY into the destination root: owners, modes, hardlinks, directory metadata.

    ``reuse_from`` is the layer this step made in the previous build, laid out as ``root``: a file there
    that is what the copy would write, byte for byte and in every attribute a layer records, is linked
    instead of written. A link makes no inode, and making inodes is what a copy of many small files waits
    on where the filesystem is busy; snapshots are never written to, so sharing their files is safe.
    """

    def __init__(self, root: Path, *, verb: str, owner: tuple[int, int] | None, mode: int | None,
                 copy_xattrs: bool, reuse_from: PreviousLayer | None = None) -> None:
        if owner is not None:
            check_mapped(*owner, f"{verb} --chown")
        self.root = Path(root)
        self.verb = verb
        self.owner = owner
        self.mode = mode
        self.copy_xattrs = copy_xattrs
        self.links: dict[tuple[int, int], Path] = {}
        self.reuse_from = reuse_from
        # the inodes linked so far: each serves one target, or a hardlink the previous build had would join
        # files that are separate now (names of one source file are linked by ``links``)
        self.donors: set[tuple[int, int]] = set()
        # Directory metadata is applied last: filling a directory changes its times again.
        self.dir_metadata: dict[Path, tuple[Path, os.stat_result]] = {}

    def shown(self, host: Path) -> str:
        rel = str(host.relative_to(self.root))
        return "/" if rel == "." else "/" + rel

    def resolve(self, path: str) -> Path:
        return resolve_in_root(self.root, path)

    def is_dir(self, path: str) -> bool:
        return self.resolve(path).is_dir()

    def make_dirs(self, path: str) -> Path:
        return make_directory(self.root, path, owner=self.owner)

    def destination_dir(self, path: str, what: str) -> Path:
        """The directory a directory's contents (or an archive) go into, created when missing."""
        real = self.resolve(path)
        if os.path.lexists(real) and not real.is_dir():
            raise PybuildError(f"{self.verb} failed: cannot copy {what} to {path}: it exists and is not a directory")
        return self.make_dirs(path)

    def place_file(self, src: Path, target: str) -> None:
        """A top-level file at the image path ``target`` (a symlink there is followed, as BuildKit does)."""
        real = self.resolve(target)
        self.make_dirs(self.shown(real.parent))
        self.place(src, os.lstat(src), real)

    def place(self, src: Path, st: os.stat_result, target: Path) -> Path:
        """Put one entry at host path ``target``; for a directory, returns where its contents go."""
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            existing = None
        if stat.S_ISDIR(st.st_mode):
            return self._place_dir(src, st, target, existing)
        if existing is not None:
            if stat.S_ISDIR(existing.st_mode):
                raise PybuildError(f"{self.verb} failed: cannot replace directory {self.shown(target)} with a file")
            os.unlink(target)
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in self.links:
            os.link(self.links[key], target, follow_symlinks=False)
            return target
        if stat.S_ISREG(st.st_mode):
            self._write_file(src, st, target)
            if st.st_nlink > 1:
                self.links[key] = target
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), target)
            self._set_metadata(src, st, target)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.mknod(target, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
            self._set_metadata(src, st, target)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(target, 0o600)
            self._set_metadata(src, st, target)
        else:
            raise PybuildError(f"{self.verb} failed: cannot copy {self.shown(target)}: sockets cannot be copied")
        return target

    def _place_dir(self, src: Path, st: os.stat_result, target: Path, existing: os.stat_result | None) -> Path:
        if existing is None:
            os.mkdir(target, 0o700)
        elif stat.S_ISLNK(existing.st_mode):
            followed = self.resolve(self.shown(target))
            if not followed.is_dir():
                raise PybuildError(f"{self.verb} failed: cannot copy a directory over {self.shown(target)}: "
                                   "it is not a directory")
            target = followed
        elif not stat.S_ISDIR(existing.st_mode):
            raise PybuildError(f"{self.verb} failed: cannot copy a directory over the file {self.shown(target)}")
        self.dir_metadata[target] = (src, st)
        return target

    def _mode(self, st: os.stat_result) -> int:
        return self.mode if self.mode is not None else stat.S_IMODE(st.st_mode)

    def _write_file(self, src: Path, st: os.stat_result, target: Path) -> None:
        reader = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if self.reuse_from is not None and self._link_donor(reader, st, target):
                return
            writer = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _copy_data(reader, writer)
                # chown clears setuid bits and file capabilities, so it comes before chmod and the xattrs.
                os.fchown(writer, *(self.owner or (0, 0)))
                os.fchmod(writer, self._mode(st))
                if self.copy_xattrs:
                    _copy_xattrs(reader, writer)
                os.utime(writer, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(writer)
        finally:
            os.close(reader)

    def _link_donor(self, reader: int, st: os.stat_result, target: Path) -> bool:
        """Link the previous snapshot's file to ``target`` if it is the file this copy would write."""
        assert self.reuse_from is not None
        donor = self.reuse_from.snapshot / target.relative_to(self.root)
        try:
            found = os.lstat(donor)
        except OSError:
            return False
        mtime_ns = min(st.st_mtime_ns, self.reuse_from.source_date_epoch * 1_000_000_000)
        if not (stat.S_ISREG(found.st_mode) and found.st_size == st.st_size and found.st_mtime_ns == mtime_ns
                and stat.S_IMODE(found.st_mode) == self._mode(st)
                and (found.st_uid, found.st_gid) == (self.owner or (0, 0))):
            return False
        donor_key = (found.st_dev, found.st_ino)
        if donor_key in self.donors:
            return False
        try:
            if os.listxattr(donor, follow_symlinks=False) or (self.copy_xattrs and os.listxattr(reader)):
                return False
            if not _same_content(reader, donor, st.st_size):
                return False
            os.link(donor, target, follow_symlinks=False)
        except OSError:  # gone meanwhile (pruned), another filesystem, too many links: write it
            return False
        self.donors.add(donor_key)
        return True

    def _set_metadata(self, src: Path, st: os.stat_result, target: Path) -> None:
        os.lchown(target, *(self.owner or (0, 0)))
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(target, self._mode(st))
            if self.copy_xattrs:
                _copy_xattrs(src, target)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def copy_tree(self, tree: SourceTree, src_dir: Path, tree_rel: str, target_dir: Path,
                  excludes: PathMatcher | None, landing: str = "") -> int:
        """Merge the contents of ``src_dir`` (``tree_rel`` in the tree) into ``target_dir``; returns entries placed.

        ``landing`` is where ``src_dir`` lands relative to the copy's base, which ``--exclude`` matches.
        """
        ignore = tree.ignore
        ignore_state = ignore.state_of(tree_rel) if ignore is not None and tree_rel else None
        exclude_state = excludes.state_of(landing) if excludes is not None and landing else None
        return self._copy_tree(tree, src_dir, tree_rel, target_dir, excludes, landing, ignore_state, exclude_state)

    def _copy_tree(self, tree: SourceTree, src_dir: Path, tree_rel: str, target_dir: Path,
                   excludes: PathMatcher | None, landing: str, ignore_state, exclude_state) -> int:
        with os.scandir(src_dir) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        placed = 0
        for entry in entries:
            rel = posixpath.join(tree_rel, entry.name) if tree_rel else entry.name
            lands = posixpath.join(landing, entry.name) if landing else entry.name
            st = entry.stat(follow_symlinks=False)
            is_dir = stat.S_ISDIR(st.st_mode)
            child_ignore = ignore_state if tree.ignore is None else tree.ignore.state(rel, ignore_state)
            child_exclude = exclude_state if excludes is None else excludes.state(lands, exclude_state)
            partial = False
            if tree.ignore is not None and tree.ignore.is_excluded(child_ignore):
                if not (is_dir and tree.ignore.may_reinclude_under(rel)):
                    continue
                partial = True
            if excludes is not None and excludes.is_excluded(child_exclude):
                if not (is_dir and excludes.may_reinclude_under(lands)):
                    continue
                partial = True
            target = target_dir / entry.name
            if not is_dir:
                self.place(Path(entry.path), st, target)
                placed += 1
                continue
            existed = os.path.lexists(target)
            inner = self.place(Path(entry.path), st, target)
            count = self._copy_tree(tree, Path(entry.path), rel, inner, excludes, lands, child_ignore, child_exclude)
            if partial and count == 0:
                # Only there for exceptions that matched nothing: as if never copied.
                del self.dir_metadata[inner]
                if not existed:
                    os.rmdir(inner)
                continue
            placed += 1 + count
        return placed

    def finish(self) -> None:
        """Apply directory metadata, deepest first, once nothing will be added to them."""
        for target, (src, st) in sorted(self.dir_metadata.items(), key=lambda item: -len(item[0].parts)):
            self._set_metadata(src, st, target)
        self.dir_metadata.clear()


def _copy_xattrs(src: int | Path, dst: int | Path) -> None:
    """Copy xattrs between two open files or two paths (not following a symlink)."""
    paths = {} if isinstance(src, int) else {"follow_symlinks": False}
    for name in os.listxattr(src, **paths):
        try:
            os.setxattr(dst, name, os.getxattr(src, name, **paths), **paths)
        except OSError as exc:
            # Some namespaces (trusted.*, security.* in a user namespace) are the kernel's to refuse;
            # BuildKit logs and goes on, and so does the copy here.
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise


def _same_content(reader: int, other: Path, size: int) -> bool:
    """Whether the open file ``reader`` and the file ``other`` hold the same ``size`` bytes."""
    fd = os.open(other, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        offset = 0
        while True:
            mine = os.pread(reader, _CHUNK, offset)
            if mine != os.pread(fd, _CHUNK, offset):
                return False
            if not mine:
                return offset == size
            offset += len(mine)
    finally:
        os.close(fd)


def _copy_data(reader: int, writer: int) -> None:
    offset = 0
    while True:
        sent = os.sendfile(writer, reader, offset, 1 << 30)
        if sent == 0:
            return
        offset += sent


# Sources


def _is_url(source: str) -> bool:
    return source.lower().startswith(_URL_SCHEMES)


def _is_git(source: str) -> bool:
    if source.lower().startswith(_GIT_PREFIXES):
        return True
    return _is_url(source) and urllib.parse.urlsplit(source).path.endswith(".git")


def _is_archive(path: Path) -> bool:
    """Whether a file is a tar archive, plain or compressed, judged by its content as BuildKit does."""
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=open_archive(handle), mode="r|") as archive:
            return archive.next() is not None
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError):
        return False


def _sha256(checksum: str) -> str:
    algorithm, _, digest = checksum.partition(":")
    if algorithm != "sha256":
        raise PybuildError(f"ADD --checksum={checksum}: unsupported digest algorithm {algorithm!r}; "
                           "only sha256 is supported")
    if not _SHA256_HEX.fullmatch(digest):
        raise PybuildError(f"ADD --checksum={checksum}: a sha256 digest is 64 lowercase hex digits")
    return checksum


def _download(url: str, directory: Path) -> tuple[Path, str]:
    """Stream ``url`` into a file in ``directory`` (mode 0600, mtime from Last-Modified); returns it and its digest."""
    # Only ADD of a URL needs HTTP: importing it up front (TLS, email parsing) costs every build ~10 ms.
    import email.utils
    import http.client
    import urllib.error
    import urllib.request

    path = directory / "download"
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "pybuild"})
    try:
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT) as response, open(path, "wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            modified = response.headers.get("Last-Modified")
    except urllib.error.HTTPError as exc:
        raise PybuildError(f"ADD {url}: download failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise PybuildError(f"ADD {url}: download failed: {exc.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise PybuildError(f"ADD {url}: download failed: {exc}") from None
    os.chmod(path, _URL_MODE)
    if modified:
        try:
            seconds = email.utils.parsedate_to_datetime(modified).timestamp()
        except (TypeError, ValueError):
            seconds = None
        if seconds is not None:
            os.utime(path, (seconds, seconds))
    return path, "sha256:" + digest.hexdigest()


def _url_file_name(url: str) -> str | None:
    name = urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(url).path))
    return None if name in ("", ".", "..") or "/" in name else name


def _pivot(source: str, verb: str) -> tuple[str, str]:
    """``COPY --parents a/./b/c``: the part kept under the destination starts after ``/./`` (default: all)."""
    index = source.find("/./")
    if index < 0:
        return "/", source
    rest = posixpath.normpath(source[index + 3:])
    if rest == ".." or rest.startswith("../"):
        raise PybuildError(f"{verb} {source}: the path after /./ must stay below it")
    return source[:index] or "/", rest


def copy_into(dest_root: Path, sources: Sequence[str], dest: str, *, source: SourceTree | Path, workdir: str = "/",
              chown: tuple[int, int] | None = None, chmod: str | None = None, parents: bool = False,
              excludes: Sequence[str] = (), is_add: bool = False, checksum: str | None = None,
              keep_git_dir: bool = False, reuse_from: PreviousLayer | None = None) -> None:
    """Apply one COPY (or ADD, with ``is_add``) to the root filesystem at ``dest_root``.

    ``source`` is where relative sources are read: the build context, or a stage's or image's root
    filesystem (``COPY --from``). ``chown`` comes from ``users.resolve_chown``. ``keep_git_dir`` only
    concerns git sources, which ADD does not support yet. ``reuse_from``: a snapshot whose identical
    files are linked rather than written (see ``_Placer``).
    """
    verb = "ADD" if is_add else "COPY"
    tree = source if isinstance(source, SourceTree) else SourceTree(Path(source))
    placer = _Placer(Path(dest_root), verb=verb, owner=chown, mode=parse_chmod(chmod, verb),
                     copy_xattrs=not isinstance(tree, BuildContext), reuse_from=reuse_from)
    exclude = PathMatcher(excludes, origin=f"{verb} --exclude") if excludes else None
    if is_add:
        for item in sources:
            if _is_git(item):
                raise PybuildError(f"ADD {item}: ADD from a git repository is not supported yet",
                                   hint="clone it in a RUN step, or into the build context")
    expected = None
    if checksum is not None:
        expected = _sha256(checksum)
        if len(sources) != 1:
            raise PybuildError(f"{verb} --checksum can't be specified for multiple sources")
        if not (is_add and _is_url(sources[0])):
            raise PybuildError(f"{verb} --checksum can't be specified for non-HTTP(S) sources: {sources[0]}")

    target = container_path(workdir, dest)
    wants_dir = parents or dest.endswith("/") or dest == "." or dest.endswith("/.")
    found: list[tuple[str, SourceMatch | None, str]] = []  # (source, match or None for a URL, pivot)
    several = len(sources) > 1
    for item in sources:
        if is_add and _is_url(item):
            found.append((item, None, ""))
            continue
        rel = tree.relative(item, verb)
        pivot_rel = ""
        if parents:
            pivot, rest = _pivot(item, verb)
            pivot_rel = tree.relative(pivot, verb)
            rel = tree.relative(posixpath.join("/", pivot_rel, rest), verb)
        wildcard = any(has_wildcards(segment) for segment in rel.split("/"))
        several = several or wildcard
        matches = tree.find(rel, verb=verb, source=item, recursive=parents)
        if not matches:
            if wildcard:
                raise PybuildError(f"{verb} failed: no source files were specified: nothing in the {tree.label} "
                                   f"matches {item}")
            raise PybuildError(f"{verb} failed: {tree.not_found}: {item}")
        found.extend((item, match, pivot_rel) for match in matches)
    if several and not wants_dir and not placer.is_dir(target):
        raise PybuildError(f"{verb} failed: when using {verb} with more than one source file (or a wildcard), "
                           f"the destination must be a directory and end with a /: {dest}")
    into_dir = wants_dir or placer.is_dir(target)

    with tempfile.TemporaryDirectory(prefix="pybuild-add-") as scratch:
        for item, match, pivot_rel in found:
            if match is None:
                name = _url_file_name(item)
                if into_dir and name is None:
                    raise PybuildError(f"ADD {item}: cannot tell a file name from the URL; name the destination "
                                       "file")
                path, actual = _download(item, Path(scratch))
                if expected is not None and actual != expected:
                    raise PybuildError(f"ADD {item}: checksum mismatch: expected {expected}, got {actual}")
                placer.place_file(path, posixpath.join(target, name) if into_dir and name else target)
                os.unlink(path)
            elif parents:
                _place_with_parents(placer, tree, match, pivot_rel, target, exclude)
            else:
                _place_match(placer, tree, match, target, into_dir, exclude, is_add)
        placer.finish()


def _place_match(placer: _Placer, tree: SourceTree, match: SourceMatch, target: str, into_dir: bool,
                 exclude: PathMatcher | None, is_add: bool) -> None:
    if match.real.is_dir():
        real_dir = placer.destination_dir(target, match.path or ".")
        placer.copy_tree(tree, match.real, match.real_rel, real_dir, exclude)
        return
    name = posixpath.basename(match.path)
    if exclude is not None and exclude.excluded(name):
        return
    if is_add and _is_archive(match.real):
        extract_dir = placer.destination_dir(target, match.path)
        with open(match.real, "rb") as handle:
            extract_tar(open_archive(handle), extract_dir, whiteouts="keep", owner=placer.owner,
                        label=f"ADD {match.path}")
        return
    placer.place_file(match.real, posixpath.join(target, name) if into_dir else target)


def _place_with_parents(placer: _Placer, tree: SourceTree, match: SourceMatch, pivot_rel: str, target: str,
                        exclude: PathMatcher | None) -> None:
    """``COPY --parents``: the match lands at its path below the pivot, its parent directories copied too."""
    landing = posixpath.relpath(match.path, pivot_rel) if pivot_rel else match.path
    if landing == ".":
        placer.copy_tree(tree, match.real, match.real_rel, placer.destination_dir(target, match.path or "."), exclude)
        return
    if exclude is not None and exclude.excluded(landing):
        return
    current = placer.destination_dir(target, match.path)
    parts = landing.split("/")
    for depth in range(1, len(parts)):
        parent = posixpath.join(pivot_rel, *parts[:depth])
        real = tree.resolve(parent, verb=placer.verb, source=match.path)
        current = placer.place(real, os.stat(real), current / parts[depth - 1])
    st = os.stat(match.real)
    placed = placer.place(match.real, st, current / parts[-1])
    if stat.S_ISDIR(st.st_mode):
        placer.copy_tree(tree, match.real, match.real_rel, placed, exclude, landing)


def write_inline(dest_root: Path, name: str, content: bytes, dest: str, *, workdir: str = "/",
                 chown: tuple[int, int] | None = None, chmod: str | None = None) -> None:
    """``COPY <<NAME dest``: a file named NAME (mode 0644) holding ``content``, placed like any copied file.

    ``dest`` ending in ``/`` (or naming a directory) gives ``dest/NAME``; otherwise ``dest`` is the file.
    """
    placer = _Placer(Path(dest_root), verb="COPY", owner=chown, mode=parse_chmod(chmod), copy_xattrs=False)
    target = container_path(workdir, dest)
    if dest.endswith("/") or dest == "." or dest.endswith("/.") or placer.is_dir(target):
        target = posixpath.join(target, name)
    with tempfile.TemporaryDirectory(prefix="pybuild-heredoc-") as scratch:
        path = Path(scratch) / "content"
        path.write_bytes(content)
        os.chmod(path, _INLINE_MODE)
        placer.place_file(path, target)
    placer.finish()
