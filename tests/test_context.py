"""The build context: .dockerignore rules, which ignore file applies, pattern syntax, and paths resolved in a root."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from builder.fs.context import (
    BuildContext,
    PathEscape,
    PathMatcher,
    SourceTree,
    has_wildcards,
    read_ignore_file,
    resolve_in_root,
    translate,
)
from parser.errors import PybuildError

# (patterns, path, excluded)
IGNORE_CASES = [
    (["*.txt"], "a.txt", True),
    (["*.txt"], "dir/a.txt", False),  # no implicit "any depth", unlike .gitignore
    (["**/*.txt"], "dir/sub/a.txt", True),
    (["**/*.txt"], "a.txt", True),
    (["dir"], "dir/sub/a.txt", True),  # a parent matched
    (["dir/"], "dir/a", True),  # cleaned: trailing slash dropped
    (["/dir"], "dir/a", True),  # leading slash ignored
    (["./dir/../other"], "other", True),  # cleaned
    (["dir/**"], "dir/a/b", True),
    (["dir/**"], "dir", False),
    (["**"], "anything/at/all", True),
    (["a?c"], "abc", True),
    (["a?c"], "a/c", False),  # ? never matches a separator
    (["[a-c]x"], "bx", True),
    (["[^a-c]x"], "dx", True),
    (["[^a-c]x"], "ax", False),
    (["\\*x"], "*x", True),
    (["\\*x"], "ax", False),
    (["*", "!keep"], "keep", False),
    (["*", "!keep"], "drop", True),
    (["!keep", "*"], "keep", True),  # the last match wins
    (["logs", "!logs/keep"], "logs/keep/f", False),
    (["logs", "!logs/keep"], "logs/other", True),
    (["a/c", "!a"], "a/c", False),  # "!a" matches a parent, and comes last
    (["  spaced.txt  "], "spaced.txt", True),
    (["! neg", "neg"], "neg", True),
    (["*/tmp"], "d/tmp/x", True),
    (["*/tmp"], "tmp", False),
    (["a**b"], "a/x/b", True),  # ** not followed by / still spans directories
    ([".*"], ".env", True),
    ([".*"], "dir/.env", False),
    # exceptions below an excluded directory
    (["build", "!build/keep"], "build", True),  # the directory itself stays excluded, only searched
    (["build", "!build/keep"], "build/keep/deep/f", False),  # re-included with everything below it
    (["build", "!build/*.txt"], "build/a.txt", False),
    (["build", "!build/*.txt"], "build/sub/a.txt", True),  # * stays within one segment
    (["build", "!build/keep", "build/keep/*.tmp"], "build/keep/x.tmp", True),  # excluded again, later
    (["build", "!build/keep", "build/keep/*.tmp"], "build/keep/x", False),
    (["!build/keep", "build"], "build/keep/f", True),  # an exception before what it should beat loses
    (["**/*.log", "!important.log"], "important.log", False),
    (["**/*.log", "!important.log"], "d/important.log", True),  # exceptions get no implicit depth either
    (["*", "!src", "src/*.tmp"], "src/a.tmp", True),
    (["*", "!src", "src/*.tmp"], "src/a.py", False),
    (["a", "  ", "!a"], "a", False),  # a blank pattern is skipped, not counted
    # ** forms
    (["**/node_modules"], "node_modules/x", True),
    (["**/node_modules"], "a/b/node_modules/x", True),
    (["**/node_modules"], "a/xnode_modules", False),
    (["a/**/b"], "a/b", True),  # ** may match no segment at all
    (["a/**/b"], "a/x/y/b", True),
    (["a/**/b"], "a/xb", False),
    (["**/"], "x/y", True),  # cleaned to **
    (["a/**/"], "a/b", True),
    (["a/**/"], "a", False),
    (["**/**/x"], "a/x", True),
    (["**/*.py[co]"], "x/y/m.pyc", True),
    # character classes, as Go's filepath.Match reads them
    (["[abc].txt"], "b.txt", True),
    (["[abc].txt"], "d.txt", False),
    (["[!a].txt"], "!.txt", True),  # ! is a member here, not a negation as in .gitignore
    (["[!a].txt"], "b.txt", False),
    (["[^a].txt"], "b.txt", True),
    (["file[0-9]"], "file7", True),
    (["file[0-9]"], "filex", False),
    (["[a-c]/x"], "b/x/y", True),
    # escaped characters
    (["\\[x\\]"], "[x]", True),
    (["\\[x\\]"], "x", False),
    (["a\\?"], "a?", True),
    (["a\\?"], "ab", False),
    (["\\!keep"], "!keep", True),  # a pattern, not an exception
    (["\\#note"], "#note", True),  # a line starting with # would be a comment
    (["a\\\\b"], "a\\b", True),
    (["sp\\ ace"], "sp ace", True),
    # leading / or ./, and other paths to clean
    (["/a/b"], "a/b/c", True),
    (["//a"], "a", True),
    (["./a"], "a", True),
    (["./*.txt"], "x.txt", True),
    (["./*.txt"], "d/x.txt", False),
    (["a/./b/../c"], "a/c", True),
    (["build", "!/build/keep"], "build/keep", False),
    (["build", "!./build/keep/"], "build/keep/f", False),
    (["/"], "a", False),  # the root itself is never a path below it
]


@pytest.mark.parametrize(("patterns", "path", "excluded"), IGNORE_CASES)
def test_ignore_rules(patterns: list[str], path: str, excluded: bool) -> None:
    assert PathMatcher(patterns, origin=".dockerignore").excluded(path) is excluded


@pytest.mark.parametrize(("patterns", "path", "excluded"), IGNORE_CASES)
def test_walking_down_with_parent_states_agrees(patterns: list[str], path: str, excluded: bool) -> None:
    """A tree walk passes each directory's state to its entries: the same answer as matching the path alone."""
    matcher = PathMatcher(patterns, origin=".dockerignore")
    state = None
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        state = matcher.state("/".join(parts[:depth]), state)
    assert state == matcher.state_of(path)
    assert matcher.is_excluded(state) is excluded


@pytest.mark.parametrize(("patterns", "truth"), [([], False), (["", "  "], False), (["a"], True)])
def test_a_matcher_without_patterns_is_false(patterns: list[str], truth: bool) -> None:
    """Callers drop a false matcher and skip matching altogether."""
    assert bool(PathMatcher(patterns, origin=".dockerignore")) is truth


@pytest.mark.parametrize(("patterns", "directory", "reinclude"), [
    (["build", "!build/out/keep"], "build", True),
    (["build", "!build/out/keep"], "build/out", True),
    (["build", "!build/out/keep"], "other", False),
    (["build", "!**/keep"], "build", False),  # BuildKit only looks for a literal prefix
    (["build", "!/build/keep"], "build", True),  # exceptions are cleaned before the prefix test
    (["build", "!./build/keep/"], "build", True),
])
def test_excluded_directories_searched_only_for_named_exceptions(patterns: list[str], directory: str,
                                                                 reinclude: bool) -> None:
    assert PathMatcher(patterns, origin=".dockerignore").may_reinclude_under(directory) is reinclude


def test_ignore_file_syntax() -> None:
    text = "\ufeff# comment\n\n  a  \n #not a comment\n!b\r\n"
    assert read_ignore_file(text.encode()) == ["  a  ", " #not a comment", "!b"]


def test_bad_ignore_pattern_is_one_clear_error() -> None:
    with pytest.raises(PybuildError, match=r"\.dockerignore: invalid pattern '\[a': syntax error in pattern"):
        PathMatcher(["[a"], origin=".dockerignore")


@pytest.mark.parametrize(("pattern", "shown"), [("  ![a  ", "![a"), ("a\\", "a\\\\"), ("[c-a]", "[c-a]"),
                                                ("x/[]a]", "x/[]a]")])
def test_each_bad_pattern_is_named_with_its_origin(pattern: str, shown: str) -> None:
    message = f"COPY --exclude: invalid pattern '{shown}': syntax error in pattern"
    with pytest.raises(PybuildError, match=re.escape(message)):
        PathMatcher(["ok", pattern], origin="COPY --exclude")


@pytest.mark.parametrize(("pattern", "double_star", "matches", "misses"), [
    ("*.go", False, ["a.go", ".go"], ["a/b.go", "a.goo"]),
    ("**/x", False, ["b/x"], ["a/b/x", "x"]),  # without double_star, ** is two stars in one segment
    ("**/x", True, ["x", "a/x", "a/b/x"], ["ax"]),
    ("a[\\]]b", False, ["a]b"], ["ab"]),
    ("[a-c][!]", False, ["b!"], ["d!", "a]"]),
])
def test_translate(pattern: str, double_star: bool, matches: list[str], misses: list[str]) -> None:
    regex = re.compile(translate(pattern, double_star=double_star))
    assert all(regex.fullmatch(path) for path in matches)
    assert not any(regex.fullmatch(path) for path in misses)


@pytest.mark.parametrize("pattern", ["[a-]", "[", "a\\", "[]a]", "[c-a]"])
def test_translate_refuses_malformed_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="syntax error in pattern"):
        translate(pattern, double_star=False)


@pytest.mark.parametrize(("segment", "wildcard"), [
    ("a.txt", False), ("*.txt", True), ("a?", True), ("[ab]", True), ("a\\*", False), ("a\\\\*", True),
])
def test_has_wildcards(segment: str, wildcard: bool) -> None:
    assert has_wildcards(segment) is wildcard


def test_dockerfile_specific_ignore_file_wins(tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    (context / "sub").mkdir(parents=True)
    (context / ".dockerignore").write_text("a\n")
    (context / "a").write_text("a")
    (context / "b").write_text("b")
    dockerfile = context / "sub" / "app.Dockerfile"
    dockerfile.write_text("FROM scratch\n")
    assert BuildContext(context).ignore_file == context / ".dockerignore"
    assert not BuildContext(context).present("a", is_dir=False)
    (context / "sub" / "app.Dockerfile.dockerignore").write_text("b\n")
    specific = BuildContext(context, dockerfile_path=dockerfile)
    assert specific.ignore_file == context / "sub" / "app.Dockerfile.dockerignore"
    assert specific.present("a", is_dir=False)
    assert not specific.present("b", is_dir=False)


def test_no_ignore_file(tmp_path: Path) -> None:
    context = BuildContext(tmp_path)
    assert context.ignore_file is None
    assert context.ignore is None
    assert context.root == tmp_path.resolve()


def test_find_sorted_and_honouring_ignores(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "c.md", "d/e.txt", "skip.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / ".dockerignore").write_text("skip.txt\n")
    context = BuildContext(tmp_path)
    assert [match.path for match in context.find("*.txt", verb="COPY", source="*.txt")] == ["a.txt", "b.txt"]
    assert [match.path for match in context.find("*/*.txt", verb="COPY", source="x")] == ["d/e.txt"]
    assert [match.path for match in context.find("**/*.txt", verb="COPY", source="x", recursive=True)] == [
        "a.txt", "b.txt", "d/e.txt"]
    assert context.find("skip.txt", verb="COPY", source="skip.txt") == []


# (links to create, path, expected result relative to root)
RESOLVE_CASES = [
    ({}, "/a/b", "a/b"),
    ({"l": "/real"}, "/l/x", "real/x"),
    ({"l": "real"}, "/l/x", "real/x"),
    ({"l": "../../../../real"}, "/l", "real"),  # .. stops at the root
    ({"d/l": "../t"}, "/d/l/x", "t/x"),
    ({"a": "b", "b": "c"}, "/a", "c"),
    ({"x": "/y", "y": "z"}, "x/f", "z/f"),
    ({}, "/../../etc", "etc"),
]


@pytest.mark.parametrize(("links", "path", "expect"), RESOLVE_CASES)
def test_resolve_in_root(links: dict[str, str], path: str, expect: str, tmp_path: Path) -> None:
    for name, target in links.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(target)
    assert resolve_in_root(tmp_path, path) == tmp_path / expect


def test_resolve_without_following_the_last_link(tmp_path: Path) -> None:
    (tmp_path / "l").symlink_to("/elsewhere")
    assert resolve_in_root(tmp_path, "/l", follow_last=False) == tmp_path / "l"


def test_link_loops_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(PybuildError, match="too many levels of symbolic links"):
        resolve_in_root(tmp_path, "/a")


@pytest.mark.parametrize(("link", "target"), [("up", "../outside"), ("abs", "/etc"), ("deep/l", "../../x")])
def test_confined_resolution_refuses_escapes(link: str, target: str, tmp_path: Path) -> None:
    (tmp_path / link).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / link).symlink_to(target)
    with pytest.raises(PathEscape) as caught:
        resolve_in_root(tmp_path, f"/{link}/f", confined=True)
    assert caught.value.link == link


def test_context_refuses_paths_out_but_a_root_filesystem_clamps(tmp_path: Path) -> None:
    with pytest.raises(PybuildError, match="COPY ../x: forbidden path outside the build context"):
        BuildContext(tmp_path).relative("../x", "COPY")
    assert BuildContext(tmp_path).relative("/x/./y/", "COPY") == "x/y"
    assert SourceTree(tmp_path).relative("../x", "COPY") == "x"
    os.symlink("/etc", tmp_path / "etc-link")
    with pytest.raises(PybuildError, match="ADD etc-link/passwd: symlink etc-link leads outside the build context"):
        BuildContext(tmp_path).find("etc-link/passwd", verb="ADD", source="etc-link/passwd")


# (.dockerignore, files of the context, what a view of "src" holds)
VIEW_CASES = [
    ("other\n", ["src/a", "src/d/b"], None),  # nothing below src is dropped: the directory itself is mounted
    ("src/*.log\n", ["src/a", "src/x.log", "src/d/y.log"], ["a", "d", "d/y.log"]),
    ("**/*.log\n", ["src/a", "src/d/y.log"], ["a", "d"]),
    ("src/d\n!src/d/keep\n", ["src/a", "src/d/keep", "src/d/drop"], ["a", "d", "d/keep"]),
    ("src/d\n!src/d/keep\n", ["src/a", "src/d/drop"], ["a"]),  # a dropped dir without its exception is gone
]


def _tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.mark.parametrize(("ignore", "files", "expected"), VIEW_CASES)
def test_view_of_a_context_directory_leaves_out_what_the_ignore_file_drops(
        tmp_path: Path, ignore: str, files: list[str], expected: list[str] | None) -> None:
    context = tmp_path / "context"
    for name in files:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(name)
    (context / ".dockerignore").write_text(ignore)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    view = BuildContext(context).view("src", scratch)
    if expected is None:
        assert view == (context / "src").resolve()
        assert not list(scratch.iterdir())
        return
    assert view.parent == scratch
    assert _tree(view) == expected
    kept = [name for name in expected if (view / name).is_file()]
    # files are hard links to the context's own (same inode), so a large context costs little
    assert all((view / name).stat().st_ino == (context / "src" / name).stat().st_ino for name in kept)


def test_view_keeps_metadata_and_links_and_copies_across_filesystems(tmp_path: Path) -> None:
    context = tmp_path / "context"
    (context / "src" / "d").mkdir(parents=True)
    (context / "src" / "run.sh").write_text("#!/bin/sh\n")
    (context / "src" / "run.sh").chmod(0o750)
    (context / "src" / "link").symlink_to("run.sh")
    (context / "src" / "x.log").write_text("log")
    (context / "src" / "d").chmod(0o700)
    os.utime(context / "src" / "d", ns=(1_000_000_000, 1_000_000_000))
    (context / ".dockerignore").write_text("**/*.log\n")
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own, to make the view there")
    scratch = Path(os.path.realpath(shm)) / f"view-test-{os.getpid()}"
    scratch.mkdir()
    try:
        view = BuildContext(context).view("src", scratch)
        assert _tree(view) == ["d", "link", "run.sh"]
        assert (view / "run.sh").read_text() == "#!/bin/sh\n"
        assert (view / "run.sh").stat().st_mode & 0o7777 == 0o750
        assert os.readlink(view / "link") == "run.sh"
        assert (view / "d").stat().st_mode & 0o7777 == 0o700
        assert (view / "d").stat().st_mtime_ns == 1_000_000_000
    finally:
        shutil.rmtree(scratch)
