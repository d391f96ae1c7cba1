"""Where COPY reads: the build context (with its .dockerignore) or a root filesystem; paths, patterns and matches.

Patterns follow Docker: sources use Go's ``filepath.Match`` per path segment (``*``, ``?``, ``[...]``,
``\\`` escapes); ``.dockerignore`` and ``--exclude`` add ``**`` (any number of segments) and ``!``
exceptions, the last matching pattern deciding. Where this differs from Docker's own code it says so
on the function that decides.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from parser.dataclass import dataclass
from parser.errors import PybuildError

if TYPE_CHECKING:
    from pathspec import PathSpec
    from pathspec.pattern import RegexPattern

MAX_SYMLINKS = 40  # what Linux allows while resolving one path


class PathEscape(Exception):
    """A symlink led above the root of a confined tree; ``link`` is that symlink, relative to the root."""

    def __init__(self, link: str) -> None:
        super().__init__(link)
        self.link = link


def resolve_in_root(root: Path, path: str, *, follow_last: bool = True, confined: bool = False) -> Path:
    """The host path of ``path`` inside ``root``, following symlinks as a chroot at ``root`` would.

    An absolute link target starts again at ``root``; ``..`` stops at ``root``. With ``confined``,
    either of those, when a symlink causes it, raises ``PathEscape`` instead (the build context must
    not reach out of its directory). Missing components are kept as they are, so the result may not
    exist. The result never leaves ``root``.
    """
    pending = [part for part in reversed(path.split("/")) if part not in ("", ".")]
    resolved: list[str] = []
    links = 0
    link_name = ""  # the last symlink followed: only a link target can climb out once ``path`` is clean
    while pending:
        name = pending.pop()
        if name == "..":
            if resolved:
                resolved.pop()
            elif confined:
                raise PathEscape(link_name)
            continue
        if not pending and not follow_last:
            resolved.append(name)
            break
        candidate = os.path.join(root, *resolved, name)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(name)
            continue
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(name)
            continue
        links += 1
        link_name = "/".join((*resolved, name))
        if links > MAX_SYMLINKS:
            raise PybuildError(f"{link_name}: too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            if confined:
                raise PathEscape(link_name)
            resolved.clear()
        pending.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
    return root.joinpath(*resolved)


# Patterns


def has_wildcards(segment: str) -> bool:
    """Whether a path segment is a pattern (Go's rule: ``*``, ``?`` or ``[`` not escaped by ``\\``)."""
    index = 0
    while index < len(segment):
        char = segment[index]
        if char == "\\":
            index += 2
            continue
        if char in "*?[":
            return True
        index += 1
    return False


def _class(pattern: str, index: int) -> tuple[str, int]:
    """A Go character class starting after its ``[``: the regex for it and the index after its ``]``."""
    out = "["
    if index < len(pattern) and pattern[index] == "^":
        out += "^"
        index += 1
    ranges = 0
    while True:
        if index < len(pattern) and pattern[index] == "]" and ranges:
            return out + "]", index + 1
        low, index = _class_char(pattern, index)
        out += re.escape(low)
        if index < len(pattern) and pattern[index] == "-":
            high, index = _class_char(pattern, index + 1)
            if high < low:
                raise ValueError("syntax error in pattern")
            out += "-" + re.escape(high)
        ranges += 1


def _class_char(pattern: str, index: int) -> tuple[str, int]:
    if index >= len(pattern) or pattern[index] in "-]":
        raise ValueError("syntax error in pattern")
    if pattern[index] == "\\":
        index += 1
        if index >= len(pattern):
            raise ValueError("syntax error in pattern")
    return pattern[index], index + 1


def translate(pattern: str, *, double_star: bool) -> str:
    """A regex (to be used with ``fullmatch``) for a Go pattern; ``double_star`` gives ``**`` Docker's meaning.

    ``**`` followed by ``/`` or at the end matches any number of segments, as in .dockerignore;
    without ``double_star`` it is two ``*`` (Go's ``filepath.Match`` has no ``**``).
    Raises ``ValueError`` for a malformed pattern (an unclosed class, a trailing ``\\``).
    """
    out = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*":
            if double_star and index < len(pattern) and pattern[index] == "*":
                index += 1
                if index < len(pattern) and pattern[index] == "/":
                    index += 1
                out.append(".*" if index >= len(pattern) else "(?:.*/)?")
            else:
                out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            regex, index = _class(pattern, index)
            out.append(regex)
        elif char == "\\":
            if index >= len(pattern):
                raise ValueError("syntax error in pattern")
            out.append(re.escape(pattern[index]))
            index += 1
        else:
            out.append(re.escape(char))
    return "".join(out)


def _clean_ignore_pattern(line: str) -> tuple[str, bool]:
    """One pattern line as BuildKit reads it: the pattern cleaned, and whether it is a ``!`` exception.

    Spaces around the line and after ``!`` go, the path is cleaned (``./a/../b/`` is ``b``) and a
    leading ``/`` dropped: every pattern is relative to the tree's root anyway.
    """
    text = line.strip()
    exception = text.startswith("!")
    if exception:
        text = text[1:].strip()
    if text:
        text = posixpath.normpath(text)
        if len(text) > 1:
            text = text.lstrip("/")
    return text, exception


@functools.cache
def _ignore_pattern_class() -> type[RegexPattern]:
    """pathspec's pattern class for one .dockerignore line, defined on first use.

    Importing pathspec adds about 7 ms to start-up, which only builds with ignore or ``--exclude``
    patterns should pay.
    """
    from pathspec.pattern import RegexPattern

    class DockerIgnorePattern(RegexPattern):
        """One .dockerignore (or ``--exclude``) line. The spec holds what is excluded, so ``!`` is ``include=False``.

        The regex also matches everything below a match, as a pattern naming a directory excludes its
        contents. None of pathspec's own classes would do: gitignore patterns match at any depth unless
        anchored, read ``[!...]`` as a negated class where Go reads ``!`` literally, accept malformed
        classes, and let ``**`` cross directories only as a whole segment (``a**b`` does in Docker).
        """

        __slots__ = ()

        @classmethod
        def pattern_to_regex(cls, pattern: str) -> tuple[str | None, bool | None]:
            text, exception = _clean_ignore_pattern(pattern)
            if not text:
                return None, None  # a blank pattern is pathspec's no-op
            # (?s): a file name may hold a newline, which ** must cross too.
            return rf"(?s)\A(?:{translate(text, double_star=True)})(?:/.*)?\Z", not exception

    return DockerIgnorePattern


MatchState = int
"""For a ``PathMatcher``: the index of the last pattern matching a path or one of its parents (-1: none)."""

NO_MATCH: MatchState = -1


class PathMatcher:
    """Docker's exclusion rules (.dockerignore, ``COPY --exclude``) for paths relative to a tree root.

    A pattern excludes a path when it matches the path or any parent directory of it, and the last
    pattern that matches decides (``!`` patterns re-include): pathspec's last-match-wins over one
    ``DockerIgnorePattern`` per line. This is BuildKit's ``MatchesUsingParentResults`` without its
    skipping shortcut, which can leave a child excluded although an earlier ``!`` pattern matched its parent.
    """

    def __init__(self, patterns: Sequence[str], *, origin: str) -> None:
        rules = []
        for line in patterns:
            try:
                rule = _ignore_pattern_class()(line)
            except (ValueError, re.error):
                raise PybuildError(f"{origin}: invalid pattern {line.strip()!r}: syntax error in pattern") from None
            if rule.include is not None:
                rules.append(rule)
        self.rules = tuple(rules)
        self.exception_prefixes = tuple(_clean_ignore_pattern(rule.pattern)[0] + "/"
                                        for rule in rules if not rule.include)
        self._regexes = tuple(rule.regex for rule in rules)
        self._spec: PathSpec | None = None
        if rules:
            from pathspec import PathSpec  # here, not at the top: see _ignore_pattern_class

            # pathspec's plain backend: the optional re2 and hyperscan ones read regexes in their own dialects.
            self._spec = PathSpec(rules, backend="simple")

    def __bool__(self) -> bool:
        return bool(self.rules)

    def state(self, rel: str, parent: MatchState | None = None) -> MatchState:
        """The match state of ``rel`` given its parent's (``None`` for a top-level path, or to try every pattern).

        Whatever matched the parent matches ``rel`` too, so only the patterns after the parent's
        deciding one are tried: a path below an excluded directory costs only the patterns that follow.
        """
        decided = NO_MATCH if parent is None else parent
        # PathSpec.check_file's last-match-wins, done on the patterns' own regexes: this runs once per
        # entry of a walk, where check_file's path normalising costs five times the matching.
        for index in range(len(self.rules) - 1, decided, -1):
            if self._regexes[index].match(rel):
                return index
        return decided

    def state_of(self, rel: str) -> MatchState:
        """The match state of any path: each pattern matches below what it names, so no walk from the top."""
        if self._spec is None:
            return NO_MATCH
        index = self._spec.check_file(rel).index
        return NO_MATCH if index is None else index

    def is_excluded(self, state: MatchState) -> bool:
        return state != NO_MATCH and bool(self.rules[state].include)

    def excluded(self, rel: str) -> bool:
        return self.is_excluded(self.state_of(rel))

    def may_reinclude_under(self, rel_dir: str) -> bool:
        """Whether an excluded directory must still be searched: a ``!`` pattern names something in it.

        BuildKit's rule, literally: some exception pattern starts with ``rel_dir/``. (A pattern such
        as ``!**/keep`` therefore does not bring files back from an excluded directory, as in Docker.)
        """
        prefix = rel_dir + "/"
        return any(text.startswith(prefix) for text in self.exception_prefixes)


# .dockerignore


def read_ignore_file(data: bytes) -> list[str]:
    """The patterns of a .dockerignore file: comment lines (``#`` first) and blank lines dropped."""
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    return [line for line in text.splitlines() if not line.startswith("#") and line.strip()]


def ignore_file_for(root: Path, dockerfile_path: Path | None) -> Path | None:
    """Which ignore file applies: ``<Dockerfile>.dockerignore`` beside the Dockerfile first, as BuildKit does."""
    candidates = []
    if dockerfile_path is not None:
        candidates.append(dockerfile_path.parent / f"{dockerfile_path.name}.dockerignore")
    candidates.append(root / ".dockerignore")
    return next((path for path in candidates if path.is_file()), None)


# Trees


@dataclass
class SourceMatch:
    """One source COPY found: ``path`` as matched (relative to the tree root, "" for the root itself),
    ``real`` the host path after following symlinks, ``real_rel`` that path relative to the root."""

    path: str
    real: Path
    real_rel: str


class SourceTree:
    """A directory COPY reads from. A root filesystem (``COPY --from``) resolves links as a chroot would."""

    label = "the --from source"
    not_found = "file not found in the --from source"

    def __init__(self, root: Path, *, ignore: PathMatcher | None = None, confined: bool = False) -> None:
        self.root = Path(root).resolve()
        self.ignore = ignore if ignore else None
        self.confined = confined

    def relative(self, source: str, verb: str) -> str:
        """A source path as a clean path relative to the root ("" for the root); absolute means the root."""
        cleaned = posixpath.normpath(source)
        if self.confined and (cleaned == ".." or cleaned.startswith("../")):
            raise PybuildError(f"{verb} {source}: forbidden path outside the {self.label}")
        return posixpath.normpath("/" + source).lstrip("/")

    def resolve(self, rel: str, *, verb: str, source: str) -> Path:
        try:
            return resolve_in_root(self.root, rel, confined=self.confined)
        except PathEscape as escape:
            raise PybuildError(f"{verb} {source}: symlink {escape.link} leads outside the {self.label}") from None

    def real_rel(self, real: Path) -> str:
        rel = str(real.relative_to(self.root))
        return "" if rel == "." else rel

    def present(self, rel: str, *, is_dir: bool) -> bool:
        """Whether ``rel`` is part of the tree after the ignore rules (a directory may be, for its exceptions)."""
        if self.ignore is None or not rel:
            return True
        parts = rel.split("/")
        state: MatchState | None = None
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            state = self.ignore.state(sub, state)
            if self.ignore.is_excluded(state):
                if depth == len(parts) and not is_dir:
                    return False
                if not self.ignore.may_reinclude_under(sub):
                    return False
        return True

    def view(self, rel: str, scratch: Path) -> Path:
        """The directory ``rel`` as a bind mount must show it: without what the ignore rules drop.

        That is the directory itself when they drop nothing below it. Otherwise a copy is made under
        ``scratch``: directories recreated with their metadata, everything else hard-linked (copied
        across filesystems), so it costs little even for a large context. BuildKit's bind mounts of the
        context show what was sent to it, which the ignore file has already filtered.
        """
        directory = self.root / rel if rel else self.root
        if self.ignore is None or not self._drops_below(directory, rel):
            return directory
        view = scratch / "view"
        view.mkdir()
        self._fill_view(directory, rel, view, _Linker())
        _copy_directory_metadata(os.lstat(directory), view)
        return view

    def _drops_below(self, directory: Path, rel: str) -> bool:
        with os.scandir(directory) as entries:
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                is_dir = entry.is_dir(follow_symlinks=False)
                # A directory is dropped itself even when it is kept for exceptions below it.
                if not self.present(child, is_dir=False) or (is_dir and self._drops_below(Path(entry.path), child)):
                    return True
        return False

    def _fill_view(self, directory: Path, rel: str, target: Path, linker: _Linker) -> bool:
        """Copy what the rules keep of ``directory`` into ``target``; whether anything was kept."""
        kept = False
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            destination = target / entry.name
            if stat.S_ISDIR(st.st_mode):
                if not self.present(child, is_dir=True):
                    continue
                destination.mkdir()
                # A dropped directory kept for its exceptions appears only if one of them is there.
                if not self._fill_view(Path(entry.path), child, destination, linker) and not self.present(
                        child, is_dir=False):
                    destination.rmdir()
                    continue
                _copy_directory_metadata(st, destination)
            elif not self.present(child, is_dir=False):
                continue
            else:
                linker.place(Path(entry.path), st, destination)
            kept = True
        return kept

    def find(self, rel_pattern: str, *, verb: str, source: str, recursive: bool = False) -> list[SourceMatch]:
        """What a source names: the path itself, or every path its wildcards match (sorted).

        Segments before the first wildcard are taken literally (following symlinks); the rest is
        matched against paths below them, not entering symlinked directories, and a matching
        directory is not searched further, as BuildKit does. ``recursive`` gives ``**`` its
        .dockerignore meaning (``COPY --parents``).
        """
        segments = rel_pattern.split("/") if rel_pattern else []
        first = next((index for index, segment in enumerate(segments) if has_wildcards(segment)), None)
        if first is None:
            match = self._match(rel_pattern, verb=verb, source=source)
            return [] if match is None else [match]
        prefix = "/".join(segments[:first])
        rest = "/".join(segments[first:])
        try:
            regex = re.compile(translate(rest, double_star=recursive), re.DOTALL)
        except (ValueError, re.error):
            raise PybuildError(f"{verb} {source}: syntax error in pattern") from None
        base = self.resolve(prefix, verb=verb, source=source)
        if not base.is_dir():
            return []
        depth = None if recursive and "**" in rest else len(segments) - first
        matches = []
        for below in self._walk_for(regex, base, self.real_rel(base), depth):
            match = self._match(posixpath.join(prefix, below), verb=verb, source=source)
            if match is not None:
                matches.append(match)
        return matches

    def _match(self, rel: str, *, verb: str, source: str) -> SourceMatch | None:
        real = self.resolve(rel, verb=verb, source=source)
        try:
            st = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            return None
        real_rel = self.real_rel(real)
        is_dir = stat.S_ISDIR(st.st_mode)
        # Both the name used and what it leads to must have survived the ignore rules.
        if not (self.present(rel, is_dir=is_dir) and self.present(real_rel, is_dir=is_dir)):
            return None
        return SourceMatch(rel, real, real_rel)

    def _walk_for(self, regex: re.Pattern[str], base: Path, base_rel: str, depth: int | None,
                  below: str = "") -> Iterator[str]:
        try:
            entries = sorted(os.scandir(base / below if below else base), key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            rel = posixpath.join(below, entry.name) if below else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if not self.present(posixpath.join(base_rel, rel) if base_rel else rel, is_dir=is_dir):
                continue
            if regex.fullmatch(rel):
                yield rel
            elif is_dir and (depth is None or rel.count("/") + 1 < depth):
                yield from self._walk_for(regex, base, base_rel, depth, rel)


def _copy_directory_metadata(st: os.stat_result, directory: Path) -> None:
    _keep_owner(directory, st)
    os.chmod(directory, stat.S_IMODE(st.st_mode))
    os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns))


def _keep_owner(path: Path, st: os.stat_result) -> None:
    """Owners are kept where the process may set them; a rootless build may not set every owner."""
    try:
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EINVAL):
            raise


class _Linker:
    """Places a file of a view: a hard link, or a copy once the view turns out to be on another filesystem."""

    def __init__(self) -> None:
        self.can_link = True

    def place(self, source: Path, st: os.stat_result, destination: Path) -> None:
        if self.can_link:
            try:
                os.link(source, destination, follow_symlinks=False)
                return
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                self.can_link = error.errno != errno.EXDEV
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), destination)
            os.utime(destination, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(source, destination)
        else:
            return  # a socket, pipe or device node cannot be copied: across filesystems the view leaves it out
        _keep_owner(destination, st)


class BuildContext(SourceTree):
    """The build context directory, with its ignore file applied; nothing in it may lead outside it."""

    label = "build context"
    not_found = "file not found in build context or excluded by .dockerignore"

    def __init__(self, root: Path, dockerfile_path: Path | None = None) -> None:
        root = Path(root)
        ignore_file = ignore_file_for(root, dockerfile_path)
        patterns = read_ignore_file(ignore_file.read_bytes()) if ignore_file is not None else []
        super().__init__(root, ignore=PathMatcher(patterns, origin=str(ignore_file)), confined=True)
        self.ignore_file = ignore_file
