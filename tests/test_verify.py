"""`pybuild diff` and `pybuild verify`: two real builds with one difference injected, and what the report says.

Each row of the table builds two images from contexts that differ in one way (a file, a flag, a build arg, the
base image, the time a step ran), then checks that `pybuild diff` names the file or config field, the layer and
the step that made it, in text and in JSON. A second opinion unpacks both images with umoci and compares the
trees. `pybuild verify` rebuilds a context and compares: it must say `verified:` for a reproducible image, name
the file and the Dockerfile line where the rebuild differs, fail cleanly where the rebuild fails, and leave the
user's store as it found it. The last tests run both commands with the default stores, as root and as a user.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import readable_tempdir
from e2e import EXAMPLES, PYBUILD, Pybuild, loaded, read_oci_archive, run, saved_base
from test_as_users import LOGIN_PATH, User, installed, login_users  # noqa: F401 - fixtures used by name

pytestmark = pytest.mark.slow

SYSTEM_ROOT = Path("/var/lib/pybuild")
DIGEST = r"sha256:[0-9a-f]{64}"
# the image config's runtime fields: a layer-only difference must not show up as one of these
STATUS_TEXT = {"equal": "equal", "differs": "differs", "only-a": "only in A", "only-b": "only in B"}
RUNTIME_FIELDS = {"Env", "Cmd", "Entrypoint", "Labels", "WorkingDir", "User", "ExposedPorts", "Volumes",
                  "StopSignal", "Healthcheck", "Shell", "OnBuild"}


# --- helpers ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    name: str
    image_id: str
    manifest: str


def write_context(context: Path, dockerfile: str | None, files: dict[str, str]) -> Path:
    context.mkdir(parents=True, exist_ok=True)
    for name, text in (({} if dockerfile is None else {"Dockerfile": dockerfile}) | files).items():
        path = context / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return context


def build(store: Pybuild, context: Path, name: str, *args: str | os.PathLike) -> Built:
    """A cold build (never a cache hit: two builds of one context must both run) named ``name``."""
    done = store.build(context, "--no-cache", "-t", name, *args)
    return built_from(name, done.stdout + done.stderr)


def built_from(name: str, output: str) -> Built:
    image = re.search(rf"image ({DIGEST})", output)
    manifest = re.search(rf"manifest ({DIGEST})", output)
    assert image and manifest, output
    return Built(name, image.group(1), manifest.group(1))


def diff(store: Pybuild, a: str, b: str, *, as_json: bool = False) -> subprocess.CompletedProcess:
    return store.run("diff", a, b, *(("--format", "json") if as_json else ()), check=False)


def verify(store: Pybuild, image: str, context: Path, *args: str | os.PathLike,
           as_json: bool = False) -> subprocess.CompletedProcess:
    return store.run("verify", image, "--context", context, *args, *(("--format", "json") if as_json else ()),
                     check=False)


def report(done: subprocess.CompletedProcess) -> dict:
    """The JSON report: one object, all of stdout."""
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as error:
        raise AssertionError(f"stdout is not one JSON object ({error}):\n{done.stdout}\n{done.stderr}") from None


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """Exit 2 with one error as pybuild writes every error: `pybuild: error: ...`, or for a mistake in the
    Dockerfile `FILE:LINE:COL: message` with the line and a caret under it; `hint:` lines may follow, and the
    rebuild's own progress (`#N ...`, and the isolation it runs with) may come before it."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if not line.startswith(("#", "isolation: "))]
    errors = [line for line in lines if line.startswith("pybuild: error: ") or re.match(r"\S+:\d+:\d+: ", line)]
    assert len(errors) == 1, done.stderr
    rest = lines[lines.index(errors[0]) + 1:]
    assert lines[:lines.index(errors[0])] == [], done.stderr
    assert all(line.startswith(("hint: ", "  ")) for line in rest), done.stderr
    return errors[0]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bare(digest: str | None) -> str | None:
    return digest.removeprefix("sha256:") if digest else digest


def layer_block(text: str, index: int) -> list[str]:
    """The `layer N: ...` line of a text report and the indented lines under it."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(rf"layer {index}: ", line)]
    assert len(starts) == 1, f"one line `layer {index}: ` expected:\n{text}"
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith(" "):
            break
        block.append(line)
    return block


def layer_lines(text: str) -> dict[int, str]:
    return {int(m.group(1)): line for line in text.splitlines() if (m := re.match(r"layer (\d+): ", line))}


def cause_lines(text: str, *, indented: bool = False) -> list[str]:
    """The `cause: ` lines: those under a file are indented; an image's own (a moved base) may stand alone."""
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith("cause: ") and (line.startswith(" ") or not indented)]


def all_causes(data: dict) -> list[str]:
    return [*data.get("causes", []), *(cause for layer in data["layers"] for entry in layer["files"]
                                       for cause in entry.get("causes") or [])]


def entries_for(data: dict, path: str) -> list[tuple[dict, dict]]:
    return [(layer, entry) for layer in data["layers"] for entry in layer["files"] if entry["path"] == path]


def images_listing(store: Pybuild) -> str:
    return store.run("images").stdout


def scratch_dirs(root: Path) -> list[Path]:
    return sorted((root / "tmp").glob("verify-*"))


def assert_store_untouched(store: Pybuild, listing_before: str) -> None:
    """After a verify: the same images under the same names, and no scratch store left behind."""
    assert images_listing(store) == listing_before
    assert scratch_dirs(store.root) == []


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_base(tmp_path_factory, "skopeo", "umoci")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, base_archive: Path) -> Pybuild:
    """One store for the module, holding busybox-base and busybox-alt (the same with one more user in
    /etc/passwd, the base's first layer)."""
    pybuild = loaded(tmp_path_factory.mktemp("verify-store"), base_archive)
    for command in ("diff", "verify"):
        helped = pybuild.run(command, "--help", check=False)
        assert f"Usage: pybuild {command}" in helped.stdout, f"pybuild {command} is not installed:\n{helped.stdout}"
    alt = tmp_path_factory.mktemp("busybox-alt")
    dockerfile = (EXAMPLES / "base" / "Dockerfile").read_text()
    last_user = "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    assert last_user in dockerfile
    (alt / "Dockerfile").write_text(dockerfile.replace(last_user, last_user + "extra:x:2000:2000::/:/bin/false\n", 1))
    pybuild.build(alt, "-t", "busybox-alt", "--build-context", "busybox=/bin")
    return pybuild


# --- the table of injected differences ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Two builds, A and B, differing in one way; what `pybuild diff A B` must say about it."""

    id: str
    dockerfile: str
    files: dict[str, str] = field(default_factory=dict)
    b_dockerfile: str | None = None  # B's Dockerfile where it differs from A's
    b_files: dict[str, str] | None = None  # B's context files where they differ from A's
    args: tuple[str, ...] = ()  # build args of A (and of B unless b_args)
    b_args: tuple[str, ...] | None = None
    path: str | None = None  # the one file that differs (None: the config only)
    changes: tuple[str, ...] = ()  # its "changes", exactly
    info: dict[str, tuple] = field(default_factory=dict)  # FileInfo key: (A's value, B's value)
    text: tuple[str, ...] = ()  # what its `  /path: ` line says
    diff_lines: tuple[str, ...] = ()  # unified diff lines under it (without the 4 spaces)
    step: str = ""  # part of the created_by of the layer that differs (A's and B's alike)
    layer: int | None = None  # that layer's index, where known in advance
    status: str = "differs"  # that layer's status: differs, only-a, only-b
    cause: str | None = None  # a recognised cause, in JSON and on a `cause: ` line
    config: str | None = None  # the config field that differs
    pause: bool = False  # a second between the builds (the step writes the time in seconds)
    moved_base: bool = False  # FROM moving-base, which is busybox-base for A and busybox-alt for B

    def __str__(self) -> str:
        return self.id


APP = "FROM busybox-base\n"
GZIP_WITH_TIME = (
    # a gzip stream whose header's MTIME is the time the step ran, as gzip without -n writes it (busybox's
    # gzip writes 0 there, so the header is written by hand); the rest is busybox gzip's own output
    "RUN sleep 1 && t=$(date +%s) && b() { printf \"\\\\$(printf %o $(( (t >> $1) & 255 )))\"; } && "
    "{ printf '\\037\\213\\010\\000'; b 0; b 8; b 16; b 24; printf '\\000\\003'; "
    "printf 'hello\\n' | gzip | tail -c +11; } > /g.gz && zcat /g.gz > /dev/null\n"
)

CASES = [
    Case("copy-changed-file", APP + "COPY a.txt /a.txt\n", {"a.txt": "hello\n"}, b_files={"a.txt": "hello world\n"},
         path="/a.txt", changes=("content",),
         info={"size": (6, 12), "sha256": (sha("hello\n"), sha("hello world\n")), "type": ("file", "file")},
         text=("content (6 bytes sha256:", "→ 12 bytes sha256:"), diff_lines=("-hello", "+hello world"),
         step="COPY a.txt /a.txt", layer=7),
    Case("context-extra-file", APP + "COPY . /app/\n", {"a.txt": "a\n"}, b_files={"a.txt": "a\n", "extra.txt": "x\n"},
         path="/app/extra.txt", changes=("only-b",), text=("only in B",), step="COPY . /app/", layer=7),
    Case("copy-chmod", APP + "COPY --chmod=644 a.txt /a.txt\n", {"a.txt": "a\n"},
         b_dockerfile=APP + "COPY --chmod=755 a.txt /a.txt\n", path="/a.txt", changes=("mode",),
         info={"mode": ("0644", "0755")}, text=("mode 0644 → 0755",), step="COPY --chmod=", layer=7),
    Case("run-chmod", APP + "RUN echo x > /s && chmod 600 /s\n",
         b_dockerfile=APP + "RUN echo x > /s && chmod 700 /s\n", path="/s", changes=("mode",),
         info={"mode": ("0600", "0700")}, text=("mode 0600 → 0700",), step="RUN /bin/sh -c echo x > /s", layer=7),
    Case("copy-chown", APP + "COPY a.txt /a.txt\n", {"a.txt": "a\n"},
         b_dockerfile=APP + "COPY --chown=1000:1000 a.txt /a.txt\n", path="/a.txt", changes=("owner",),
         info={"uid": (0, 1000), "gid": (0, 1000)}, text=("owner 0:0 → 1000:1000",), step="a.txt /a.txt", layer=7),
    Case("symlink-target", APP + "RUN ln -s /a /l\n", b_dockerfile=APP + "RUN ln -s /b /l\n", path="/l",
         changes=("link",), info={"link": ("/a", "/b"), "type": ("symlink", "symlink")},
         text=("link target /a → /b",), step="RUN /bin/sh -c ln -s /", layer=7),
    Case("build-arg", APP + 'ARG V\nRUN echo "$V" > /v\n', args=("--build-arg", "V=one"),
         b_args=("--build-arg", "V=two"), path="/v", changes=("content",),
         info={"size": (4, 4), "sha256": (sha("one\n"), sha("two\n"))}, text=("content (4 bytes sha256:",),
         diff_lines=("-one", "+two"), step='/bin/sh -c echo "$V" > /v', layer=7),
    Case("extra-step", APP + "RUN echo x > /x\n", b_dockerfile=APP + "RUN echo x > /x\nRUN echo y > /y\n", path="/y",
         changes=("only-b",), text=("only in B",), step="RUN /bin/sh -c echo y > /y", layer=8, status="only-b"),
    Case("label", APP + "LABEL v=1\n", b_dockerfile=APP + "LABEL v=2\n", config="Labels"),
    Case("base-image-moved", "FROM moving-base\nCOPY a.txt /a.txt\n", {"a.txt": "a\n"}, moved_base=True,
         path="/etc/passwd", changes=("content",), text=("content (",), step="COPY <<EOF /etc/passwd", layer=1),
    Case("run-writes-the-time", APP + "RUN date +%s%N > /stamp\n", pause=True, path="/stamp", changes=("content",),
         text=("content (",), step="RUN /bin/sh -c date +%s%N > /stamp", layer=7),
    Case("mtime-only", APP + "RUN touch -d @1000000000 /f\n", b_dockerfile=APP + "RUN touch -d @1100000000 /f\n",
         # both times are older than SOURCE_DATE_EPOCH, so the layers keep them (what is newer is clamped)
         args=("--build-arg", "SOURCE_DATE_EPOCH=1200000000"), path="/f", changes=("mtime",),
         info={"mtime": (1000000000, 1100000000)}, text=("mtime 1000000000 → 1100000000",),
         step="RUN /bin/sh -c touch -d @1", layer=7, cause="timestamp not clamped"),
    Case("gzip-embeds-a-time", APP + GZIP_WITH_TIME, path="/g.gz", changes=("content",), text=("content (",),
         step="RUN /bin/sh -c sleep 1", layer=7, cause="embeds a time"),
    Case("lines-reordered", APP + "ARG LINES\nRUN for w in $LINES; do echo $w; done > /list\n",
         args=("--build-arg", "LINES=a b c"), b_args=("--build-arg", "LINES=c a b"), path="/list",
         changes=("content",), text=("content (6 bytes sha256:",), step="/bin/sh -c for w in $LINES", layer=7,
         cause="same lines in another order"),
]
CASE_BY_ID = {case.id: case for case in CASES}


@pytest.fixture(scope="module")
def pairs(store: Pybuild, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], tuple[Built, Built]]:
    """Each case's two images, built once for the module (the table test and the second opinion share them)."""
    made: dict[str, tuple[Built, Built]] = {}
    top = tmp_path_factory.mktemp("diff-contexts")

    def get(case: Case) -> tuple[Built, Built]:
        if case.id not in made:
            a = write_context(top / case.id / "a", case.dockerfile, case.files)
            b = write_context(top / case.id / "b", case.b_dockerfile or case.dockerfile,
                              case.files if case.b_files is None else case.b_files)
            b_args = case.args if case.b_args is None else case.b_args
            if case.moved_base:
                store.run("tag", "busybox-base", "moving-base")
            first = build(store, a, f"vt-{case.id}-a", *case.args)
            if case.moved_base:
                store.run("tag", "busybox-alt", "moving-base")
            if case.pause:
                time.sleep(1.1)
            made[case.id] = (first, build(store, b, f"vt-{case.id}-b", *b_args))
        return made[case.id]

    return get


@pytest.mark.parametrize("case", CASES, ids=str)
def test_diff_names_the_difference(store: Pybuild, pairs, case: Case) -> None:
    a, b = pairs(case)
    assert a.manifest != b.manifest, "the two builds made the same image: the row injects no difference"

    # --- JSON ---
    done = diff(store, a.name, b.name, as_json=True)
    assert done.returncode == 1, (done.stdout, done.stderr)
    data = report(done)
    assert data["identical"] is False
    for side, image in (("a", a), ("b", b)):
        assert image.name in data[side]["reference"]
        assert data[side]["manifest"] == image.manifest
        assert re.fullmatch(DIGEST, data[side]["config"])
    assert [layer["index"] for layer in data["layers"]] == list(range(1, len(data["layers"]) + 1))
    for layer in data["layers"]:
        if layer["status"] == "equal":
            assert layer["files"] == [], layer
            assert layer["a"]["diff_id"] == layer["b"]["diff_id"], layer
        for entry in layer["files"]:
            assert entry["path"].startswith("/") and (entry["path"] == "/" or not entry["path"].endswith("/"))
    config_fields = {item["field"] for item in data["config"]}

    if case.path is None:  # config only: every layer equal
        assert {layer["status"] for layer in data["layers"]} == {"equal"}, data["layers"]
        assert case.config in config_fields, data["config"]
        item = next(item for item in data["config"] if item["field"] == case.config)
        assert item["a"] != item["b"]
    else:
        found = entries_for(data, case.path)
        assert len(found) == 1, f"{case.path} once in the report: {json.dumps(data['layers'], indent=1)}"
        differing, entry = found[0]
        assert differing["status"] == case.status, differing
        if case.layer is not None:
            assert differing["index"] == case.layer
        assert case.step in (differing["created_by"] or ""), differing["created_by"]
        assert [other["index"] for other in data["layers"] if other["status"] != "equal"] == [differing["index"]]
        if case.status == "differs":
            assert differing["a"]["diff_id"] != differing["b"]["diff_id"]
        else:
            assert differing["a" if case.status == "only-b" else "b"] is None, differing
        assert entry["changes"] == list(case.changes), entry
        if "only-b" in case.changes:
            assert entry["a"] is None and entry["b"]["type"] == "file", entry
        for key, (value_a, value_b) in case.info.items():
            got = (entry["a"][key], entry["b"][key])
            if key == "sha256":
                got = (bare(got[0]), bare(got[1]))
            assert got == (value_a, value_b), (key, entry)
        for line in case.diff_lines:
            assert line in (entry["diff"] or "").splitlines(), entry["diff"]
        assert not config_fields & RUNTIME_FIELDS, data["config"]
    causes = all_causes(data)
    if case.cause:
        assert any(case.cause in cause for cause in causes), causes

    # --- text ---
    done = diff(store, a.name, b.name)
    assert done.returncode == 1, (done.stdout, done.stderr)
    text = done.stdout
    lines = text.splitlines()
    assert lines[-1].startswith("differs:"), text
    numbered = layer_lines(text)
    assert sorted(numbered) == [layer["index"] for layer in data["layers"]], text
    for layer in data["layers"]:
        assert numbered[layer["index"]].startswith(f"layer {layer['index']}: {STATUS_TEXT[layer['status']]}"), text
    if case.path is None:
        assert any(line.startswith(f"config: {case.config}: ") and "→" in line for line in lines), text
        return
    block = layer_block(text, differing["index"])
    assert block[0].startswith(f"layer {differing['index']}: {STATUS_TEXT[case.status]}"), text
    assert case.step in block[0], text
    file_lines = [line for line in block if line.startswith(f"  {case.path}: ")]
    assert len(file_lines) == 1, text
    for words in case.text:
        assert words in file_lines[0], text
    if case.diff_lines:
        assert any(line.startswith("    --- A/") for line in block), text
        assert any(line.startswith("    +++ B/") for line in block), text
        for line in case.diff_lines:
            assert f"    {line}" in block, text
    if case.cause:  # the causes of the table's rows are a file's: on an indented line under it
        assert any(case.cause in line for line in cause_lines(text, indented=True)), text
    if case.moved_base and any("base image moved" in cause for cause in causes):
        # pybuild recognised the moved base from the history's `FROM name@digest` entries: it names the base, in
        # JSON and in text
        moved = [cause for cause in causes if "base image moved" in cause]
        assert all("moving-base" in cause for cause in moved), moved
        assert any("base image moved" in line and "moving-base" in line for line in cause_lines(text)), text


# --- identical images -----------------------------------------------------------------------------------------------

SAME = APP + "COPY a.txt /a.txt\nRUN echo made > /made\nCMD [\"cat\", \"/a.txt\"]\n"


@pytest.fixture(scope="module")
def same(store: Pybuild, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Built]:
    context = write_context(tmp_path_factory.mktemp("same"), SAME, {"a.txt": "same\n"})
    return context, build(store, context, "vt-same")


def _rebuilt(store: Pybuild, context: Path, image: Built, work: Path) -> str:
    return build(store, context, "vt-same-again").name


def _by_id(store: Pybuild, context: Path, image: Built, work: Path) -> str:
    return image.image_id


def _saved(store: Pybuild, context: Path, image: Built, work: Path) -> str:
    return f"oci-archive:{store.save(image.name, work / 'saved.tar')}"


def _build_output(store: Pybuild, context: Path, image: Built, work: Path) -> str:
    store.build(context, "-o", f"type=oci,dest={work / 'out.tar'}")
    return f"oci-archive:{work / 'out.tar'}"


def _layout(store: Pybuild, context: Path, image: Built, work: Path) -> str:
    archive = store.save(image.name, work / "saved.tar")
    run(["skopeo", "copy", "-q", f"oci-archive:{archive}", f"oci:{work / 'layout'}:v1"])
    return f"oci-layout:{work / 'layout'}:v1"


@pytest.mark.parametrize("other", [_rebuilt, _by_id, _saved, _build_output, _layout],
                         ids=["rebuilt-same-context", "image-id", "saved-oci-archive", "build-output-oci-archive",
                              "oci-layout"])
def test_identical_images(store: Pybuild, same, other, tmp_path: Path) -> None:
    context, image = same
    reference = other(store, context, image, tmp_path)
    done = diff(store, image.name, reference)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"identical: {image.manifest}" in done.stdout.splitlines(), done.stdout
    done = diff(store, image.name, reference, as_json=True)
    assert done.returncode == 0, (done.stdout, done.stderr)
    data = report(done)
    assert data["identical"] is True
    assert data["a"]["manifest"] == data["b"]["manifest"] == image.manifest
    assert data["a"]["config"] == data["b"]["config"]
    assert data["layers"] and {layer["status"] for layer in data["layers"]} == {"equal"}
    assert all(layer["files"] == [] for layer in data["layers"])
    assert data["config"] == [] and data["causes"] == []
    steps = [layer["created_by"] for layer in data["layers"]]
    assert "COPY a.txt /a.txt" in steps and "RUN /bin/sh -c echo made > /made" in steps, steps


# --- errors ---------------------------------------------------------------------------------------------------------

MISSING = "vt-no-such-image"


@pytest.mark.parametrize("argv", [
    ("diff", MISSING, "vt-same"),
    ("diff", "vt-same", MISSING),
    ("diff", "vt-same", "oci-archive:/nonexistent/image.tar"),
    ("diff", "oci-layout:/nonexistent/layout:v1", "vt-same"),
    ("diff", "vt-same", "oci-archive:{context}/a.txt"),  # a file that is no archive
    ("verify", MISSING, "--context", "{context}"),
    ("verify", "vt-same", "--context", "/nonexistent/context"),
], ids=["diff-missing-a", "diff-missing-b", "diff-missing-archive", "diff-missing-layout", "diff-not-an-archive",
        "verify-missing-image", "verify-missing-context"])
def test_errors_are_one_line(store: Pybuild, same, argv: tuple[str, ...]) -> None:
    context, _ = same
    listing = images_listing(store)
    done = store.run(*(arg.format(context=context) for arg in argv), check=False)
    one_line_error(done)
    assert_store_untouched(store, listing)


# --- a second opinion: umoci's unpacked trees ------------------------------------------------------------------------


@pytest.mark.parametrize("case", [CASE_BY_ID[name] for name in
                                  ("copy-changed-file", "context-extra-file", "copy-chown", "symlink-target",
                                   "base-image-moved")], ids=str)
def test_diff_agrees_with_umoci(store: Pybuild, pairs, case: Case, tmp_path: Path) -> None:
    """The paths whose type, content, mode, owner or link target differ between the two unpacked root
    filesystems are the paths pybuild reports with a change other than mtime (directories count only where
    their mode or owner differ: umoci shows the mtime of every directory a layer touched)."""
    a, b = pairs(case)
    trees = [read_oci_archive(store.save(image.name, tmp_path / side / "image.tar"), tmp_path / side).files
             for side, image in (("a", a), ("b", b))]
    seen = {path for path in trees[0].keys() | trees[1].keys() if trees[0].get(path) != trees[1].get(path)}
    assert seen, "umoci sees no difference"
    data = report(diff(store, a.name, b.name, as_json=True))
    reported = {entry["path"] for layer in data["layers"] for entry in layer["files"]
                if set(entry["changes"]) - {"mtime", "xattrs"}}
    assert reported == seen


# --- verify ---------------------------------------------------------------------------------------------------------

VERIFIED = """\
FROM busybox-base
COPY a.txt /a.txt
RUN echo made > /made
CMD ["cat", "/a.txt"]
"""


def test_verify_reproduces_the_image(store: Pybuild, tmp_path: Path) -> None:
    context = write_context(tmp_path / "context", VERIFIED, {"a.txt": "hello\n"})
    image = build(store, context, "vt-verified")
    listing = images_listing(store)

    done = verify(store, image.name, context)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"verified: {image.manifest}" in done.stdout.splitlines(), done.stdout
    assert_store_untouched(store, listing)

    done = verify(store, image.name, context, as_json=True)
    assert done.returncode == 0, (done.stdout, done.stderr)
    data = report(done)
    assert data["identical"] is True
    assert data["a"]["manifest"] == data["b"]["manifest"] == image.manifest
    assert {layer["status"] for layer in data["layers"]} == {"equal"}
    lines = {layer["created_by"]: layer["line"] for layer in data["layers"]}
    assert lines.get("COPY a.txt /a.txt") == 2 and lines.get("RUN /bin/sh -c echo made > /made") == 3, lines
    assert_store_untouched(store, listing)

    archive = store.save(image.name, tmp_path / "saved.tar")
    done = verify(store, f"oci-archive:{archive}", context)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"verified: {image.manifest}" in done.stdout.splitlines(), done.stdout
    assert_store_untouched(store, listing)


def _edit_file(context: Path) -> None:
    (context / "a.txt").write_text("changed\n")


def _later(context: Path) -> None:
    time.sleep(1.1)  # the step writes the time in seconds (busybox's date knows no %N)


@dataclass(frozen=True)
class Drift:
    """A context built into an image, then changed (or only rebuilt later): verify must say where it differs."""

    id: str
    dockerfile: str
    change: Callable[[Path], None]
    path: str
    line: int
    created_by: str
    changes: tuple[str, ...]
    diff_lines: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.id


DRIFTS = [
    Drift("context-file-changed", VERIFIED, _edit_file, "/a.txt", 2, "COPY a.txt /a.txt", ("content",),
          ("-hello", "+changed")),
    Drift("run-writes-the-time", "FROM busybox-base\nRUN echo made > /made\nRUN date +%s%N > /stamp\n", _later,
          "/stamp", 3, "RUN /bin/sh -c date +%s%N > /stamp", ("content",)),
]


@pytest.mark.parametrize("drift", DRIFTS, ids=str)
def test_verify_names_what_differs(store: Pybuild, tmp_path: Path, drift: Drift) -> None:
    context = write_context(tmp_path / "context", drift.dockerfile, {"a.txt": "hello\n"})
    image = build(store, context, f"vt-drift-{drift.id}")
    drift.change(context)
    listing = images_listing(store)

    done = verify(store, image.name, context)
    assert done.returncode == 1, (done.stdout, done.stderr)
    text = done.stdout
    assert text.splitlines()[-1].startswith("differs:"), text
    assert "verified:" not in text
    (index,) = [n for n, line in layer_lines(text).items() if line.startswith(f"layer {n}: differs")]
    block = layer_block(text, index)
    assert f"Dockerfile:{drift.line}: {drift.created_by}" in block[0], text
    assert any(line.startswith(f"  {drift.path}: ") for line in block), text
    for line in drift.diff_lines:
        assert f"    {line}" in block, text
    assert_store_untouched(store, listing)

    if drift.id == "run-writes-the-time":
        time.sleep(1.1)
    done = verify(store, image.name, context, as_json=True)
    assert done.returncode == 1, (done.stdout, done.stderr)
    data = report(done)
    assert data["identical"] is False
    assert data["a"]["manifest"] == image.manifest and data["b"]["manifest"] != image.manifest
    (layer,) = [layer for layer in data["layers"] if layer["status"] != "equal"]
    assert (layer["index"], layer["line"], layer["created_by"]) == (index, drift.line, drift.created_by)
    assert [(entry["path"], entry["changes"]) for entry in layer["files"]] == [(drift.path, list(drift.changes))]
    assert_store_untouched(store, listing)


@pytest.mark.parametrize(("dockerfile", "files"), [
    (VERIFIED.replace("RUN echo made > /made\n", "RUN echo made > /made\nRUN false\n"), {"a.txt": "hello\n"}),
    (VERIFIED.replace("COPY a.txt /a.txt\n", "COPY a.txt\n"), {"a.txt": "hello\n"}),  # COPY needs a destination
    (VERIFIED.replace("FROM busybox-base", "FROM busybox-base\nRUN --mount=type=nonsense true"), {"a.txt": "x\n"}),
    (VERIFIED, {}),  # a.txt has gone from the context
], ids=["run-fails", "copy-without-destination", "unknown-mount-type", "source-file-gone"])
def test_verify_of_a_failing_rebuild_is_one_error(store: Pybuild, tmp_path: Path, dockerfile: str,
                                                  files: dict[str, str]) -> None:
    context = write_context(tmp_path / "context", VERIFIED, {"a.txt": "hello\n"})
    image = build(store, context, "vt-broken")
    shutil.rmtree(context)
    write_context(context, dockerfile, files)
    listing = images_listing(store)
    for as_json in (False, True):
        one_line_error(verify(store, image.name, context, as_json=as_json))
        assert_store_untouched(store, listing)


@pytest.mark.parametrize("interrupt", [False, True], ids=["finished", "interrupted"])
def test_verify_scratch_store_lives_only_while_it_runs(base_archive: Path, tmp_path: Path, interrupt: bool) -> None:
    """The rebuild's store is <store root>/tmp/verify-* while verify runs (so that the checks above, that none is
    left, look in the right place), and is gone when verify ends, also when interrupted (Ctrl-C: SIGINT to the
    terminal's process group). A store of its own: what an interruption leaves must not fail other tests."""
    store = loaded(tmp_path / "store", base_archive)
    context = write_context(tmp_path / "context", APP + "RUN sleep 3 && echo slept > /slept\n", {})
    image = build(store, context, "vt-slow")
    listing = images_listing(store)
    process = subprocess.Popen([*PYBUILD, "verify", image.name, "--context", str(context)],
                               env={**os.environ, "PYBUILD_ROOT": str(store.root)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not scratch_dirs(store.root) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(scratch_dirs(store.root)) == 1, "no <store root>/tmp/verify-* while verify ran"
        if interrupt:
            time.sleep(0.5)
            os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "Traceback" not in stderr, stderr
    if interrupt:
        assert process.returncode != 0 and "verified:" not in stdout, (process.returncode, stdout, stderr)
        # a step still running keeps its mount, and so its dir, until the process is gone: the next command
        # that builds on the store sweeps what a dead process left
        again = store.run("verify", image.name, "--context", context, check=False)
        assert again.returncode == 0, again.stdout + again.stderr
    else:
        assert process.returncode == 0 and f"verified: {image.manifest}" in stdout.splitlines(), (stdout, stderr)
    assert_store_untouched(store, listing)


OPTIONS = """\
FROM busybox-base AS tools
ARG FLAVOUR
RUN echo "tools $FLAVOUR" > /tool
FROM busybox-base AS app
ARG FLAVOUR
COPY --from=tools /tool /tool
COPY --from=extra note.txt /note.txt
RUN echo "$FLAVOUR" > /flavour
FROM app AS debug
RUN echo debug > /debug
"""


def test_verify_takes_the_build_options(store: Pybuild, tmp_path: Path) -> None:
    """-f, --build-arg, --target and --build-context as the build had them; SOURCE_DATE_EPOCH from the image's
    created time unless --source-date-epoch says otherwise."""
    context = write_context(tmp_path / "context", None, {"ci/app.Dockerfile": OPTIONS})
    extra = write_context(tmp_path / "extra", None, {"note.txt": "note\n"})
    dockerfile = context / "ci" / "app.Dockerfile"
    options = ("-f", dockerfile, "--target", "app", "--build-arg", "FLAVOUR=mint", "--build-context", f"extra={extra}")
    image = build(store, context, "vt-options", *options, "--build-arg", "SOURCE_DATE_EPOCH=1500000000")
    created = json.loads(store.run("inspect", image.name).stdout)["created"]
    assert created.startswith("2017-07-14"), created
    listing = images_listing(store)

    for epoch in ((), ("--source-date-epoch", "1500000000")):
        done = verify(store, image.name, context, *options, *epoch)
        assert done.returncode == 0, (epoch, done.stdout, done.stderr)
        assert f"verified: {image.manifest}" in done.stdout.splitlines(), done.stdout
        assert_store_untouched(store, listing)

    # without each option, the rebuild is another image
    wrong_flavour = tuple(str(arg).replace("FLAVOUR=mint", "FLAVOUR=lime") for arg in options)
    for args, what in [(wrong_flavour, "  /flavour: "), (options[:2] + options[4:], "only in B"),
                       ((*options, "--source-date-epoch", "1400000000"), "mtime")]:
        done = verify(store, image.name, context, *args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert what in done.stdout, (args, done.stdout)
        assert done.stdout.splitlines()[-1].startswith("differs:"), done.stdout
        assert_store_untouched(store, listing)


# --- the default stores: root's, and a user's ------------------------------------------------------------------------


def _names(listing: str) -> set[tuple[str, str]]:
    return {tuple(line.split()[:2]) for line in listing.splitlines()[1:] if line.strip()}


def test_diff_and_verify_in_roots_default_store(base_archive: Path, tmp_path: Path) -> None:
    """No PYBUILD_ROOT: root's store /var/lib/pybuild; the base comes from an archive, so that the only name this
    test gives in root's store is its own image's, removed at the end."""
    environment = {key: value for key, value in os.environ.items() if key != "PYBUILD_ROOT"}

    def pybuild(*args: str | os.PathLike) -> subprocess.CompletedProcess:
        done = run([*PYBUILD, *args], env=environment, check=False)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    context = write_context(tmp_path / "context", f"FROM oci-archive:{base_archive}\nCOPY a.txt /a.txt\n",
                            {"a.txt": "root\n"})
    name = f"vt-root-{uuid.uuid4().hex[:8]}"
    before = pybuild("images")
    assert before.returncode == 0, before.stderr
    built = pybuild("build", "--progress=plain", "-t", name, context)
    assert built.returncode == 0, built.stderr
    image = built_from(name, built.stdout + built.stderr)
    try:
        listing = pybuild("images").stdout
        saved = pybuild("save", "-o", tmp_path / "saved.tar", name)
        assert saved.returncode == 0, saved.stderr
        done = pybuild("diff", name, f"oci-archive:{tmp_path / 'saved.tar'}")
        assert done.returncode == 0 and f"identical: {image.manifest}" in done.stdout.splitlines(), done
        done = pybuild("verify", name, "--context", context)
        assert done.returncode == 0 and f"verified: {image.manifest}" in done.stdout.splitlines(), done
        (context / "a.txt").write_text("root, changed\n")
        done = pybuild("verify", name, "--context", context, "--format", "json")
        assert done.returncode == 1, done
        data = report(done)
        assert data["identical"] is False
        assert [entry["path"] for layer in data["layers"] for entry in layer["files"]] == ["/a.txt"]
        assert pybuild("images").stdout == listing
        assert scratch_dirs(SYSTEM_ROOT) == []
    finally:
        removed = pybuild("rmi", name)
    assert removed.returncode == 0, removed.stderr
    assert _names(pybuild("images").stdout) == _names(before.stdout)


USER_APP = """\
FROM busybox-base
COPY --chown=1000:1000 a.txt /home/www/a.txt
RUN echo made > /home/www/made && chown 1000:1000 /home/www/made
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the test user may read (pytest's tmp_path lies where only root may)."""
    with readable_tempdir("pybuild-verify-") as top:
        yield top


def test_diff_and_verify_as_a_user_with_ranges(installed, login_users, base_archive: Path,  # noqa: F811
                                               shared_dir: Path) -> None:
    dev = login_users["dev"]
    store_root = dev.home / ".local" / "share" / "pybuild"
    shutil.copy(base_archive, shared_dir / "base.tar")
    context = write_context(shared_dir / "context", USER_APP, {"a.txt": "dev\n"})
    out = shared_dir / "out"
    out.mkdir()
    os.chown(out, dev.uid, dev.gid)
    subprocess.run(["chmod", "-R", "a+rX", str(shared_dir)], check=True)

    done = dev.run(installed, "load", "-i", shared_dir / "base.tar")
    assert done.returncode == 0, done.stderr
    done = dev.run(installed, "build", "--progress=plain", "-t", "app:1", context, cwd=dev.home)
    assert done.returncode == 0, done.stderr
    image = built_from("app:1", done.stdout + done.stderr)
    listing = dev.run(installed, "images").stdout
    assert dev.run(installed, "save", "-o", out / "app.tar", "app:1").returncode == 0

    done = dev.run(installed, "diff", "app:1", f"oci-archive:{out / 'app.tar'}")
    assert done.returncode == 0 and f"identical: {image.manifest}" in done.stdout.splitlines(), done
    done = dev.run(installed, "verify", "app:1", "--context", context, cwd=dev.home)
    assert done.returncode == 0 and f"verified: {image.manifest}" in done.stdout.splitlines(), done
    assert dev.run(installed, "images").stdout == listing
    assert scratch_dirs(store_root) == []

    (context / "a.txt").write_text("dev, changed\n")
    done = dev.run(installed, "verify", "app:1", "--context", context, cwd=dev.home)
    assert done.returncode == 1, done
    assert any(line.startswith("  /home/www/a.txt: ") for line in done.stdout.splitlines()), done.stdout
    assert "Dockerfile:2: COPY --chown=1000:1000 a.txt /home/www/a.txt" in done.stdout, done.stdout
    assert dev.run(installed, "images").stdout == listing
    assert scratch_dirs(store_root) == []
    # root's store holds none of it
    if (SYSTEM_ROOT / "index.json").exists():
        assert image.manifest not in (SYSTEM_ROOT / "index.json").read_text()
