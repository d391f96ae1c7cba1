"""Helpers for end-to-end tests: run pybuild, Buildah and podman for real, and read images with skopeo and umoci."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from conftest import skip_if_chrooted

from parser.nodes import parse_raw

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
_SCRIPT = Path(sys.executable).with_name("pybuild")
PYBUILD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "builder"]
# podman on these hosts: crun fails on the hybrid cgroup setup, and root may not raise rlimits.
PODMAN_RUN = ["run", "--rm", "--runtime", "runc", "--network", "none",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds run in namespaces with overlayfs and chown files")


def require_tools(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            pytest.skip(f"{name} is not installed (apt-get install {name})")
    if not Path("/bin/busybox").is_file():
        pytest.skip("/bin/busybox is missing: install Debian's busybox-static, the base image is made from it")


def run(argv: Sequence[str | os.PathLike], *, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a tool; on failure show its output, since that is what explains a broken end-to-end test."""
    done = subprocess.run([str(arg) for arg in argv], env=env, cwd=cwd, capture_output=True, timeout=timeout)
    done.stdout = done.stdout.decode("utf-8", "replace")
    done.stderr = done.stderr.decode("utf-8", "replace")
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@dataclass(frozen=True)
class Pybuild:
    """pybuild as a user runs it, with its own local store in ``root``."""

    root: Path

    def run(self, *args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
        environment = {**os.environ, "PYBUILD_ROOT": str(self.root)}
        done = run([*PYBUILD, *args], env=environment, check=check, cwd=REPO)
        # a user's mistake is one clear message, never a traceback
        assert "Traceback (most recent call last)" not in done.stderr, done.stderr
        return done

    def build(self, context: Path, *args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("build", "--progress", "plain", *args, context, check=check)

    def save(self, name: str, archive: Path) -> Path:
        archive.parent.mkdir(parents=True, exist_ok=True)
        self.run("save", "-o", archive, name)
        return archive


def saved_base(tmp_path_factory: pytest.TempPathFactory, *tools: str) -> Path:
    """busybox-base built once and saved as an archive, for module fixtures: a store that loads it (``loaded``)
    starts with the base and an empty cache, without a build of its own."""
    require_root()
    require_tools(*tools)
    harness = Pybuild(tmp_path_factory.mktemp("base-store"))
    build_base(harness)
    return harness.save("busybox-base", tmp_path_factory.mktemp("base") / "busybox-base.tar")


def loaded(root: Path, archive: Path) -> Pybuild:
    """A store at ``root`` holding only the images of ``archive``: nothing in its cache."""
    store = Pybuild(root)
    store.run("load", "-i", archive)
    return store


def build_base(pybuild: Pybuild) -> None:
    """examples/base into ``pybuild``'s store as busybox-base:latest, exactly as the README says."""
    pybuild.build(EXAMPLES / "base", "-t", "busybox-base", "--build-context", "busybox=/bin")


_shared: dict[str, Pybuild] = {}


def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Pybuild:
    """One store with the base built, shared by every end-to-end test of the session (names keep tests apart)."""
    if "store" not in _shared:
        require_root()
        require_tools("skopeo")
        pybuild = Pybuild(tmp_path_factory.mktemp("pybuild-root"))
        build_base(pybuild)
        _shared["store"] = pybuild
    return _shared["store"]


@dataclass(frozen=True)
class Entry:
    """One path of an image's file tree, as far as a user can observe it (timestamps aside)."""

    kind: str  # file, dir, symlink, char, block, fifo, socket
    mode: int  # permission bits with setuid, setgid and sticky
    uid: int
    gid: int
    size: int = 0
    sha256: str = ""
    target: str = ""

    @property
    def summary(self) -> str:
        """Type, mode and owner as a test table spells them: "file 0644 0:0", "symlink -> /bin/busybox"."""
        if self.kind == "symlink":
            return f"symlink -> {self.target}"
        return f"{self.kind} {self.mode:04o} {self.uid}:{self.gid}"

    def __repr__(self) -> str:
        size = f" {self.size}B sha256:{self.sha256[:12]}" if self.kind == "file" else ""
        return f"<{self.summary}{size}>"


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def tree(root: Path) -> dict[str, Entry]:
    """Every path under ``root`` (as "/etc/passwd") with its type, mode, owner, size, content hash, link target."""
    entries = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory, name)
            info = path.lstat()
            kind = _KINDS[stat.S_IFMT(info.st_mode)]
            entry = Entry(kind, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
            if kind == "file":
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entry = Entry(kind, entry.mode, entry.uid, entry.gid, info.st_size, digest)
            elif kind == "symlink":
                entry = Entry(kind, 0o777, entry.uid, entry.gid, target=os.readlink(path))
            entries["/" + str(path.relative_to(root))] = entry
    return entries


def file_text(entries: Mapping[str, Entry], rootfs: Path, path: str) -> str:
    assert entries[path].kind == "file", f"{path} is a {entries[path].kind}"
    return (rootfs / path.lstrip("/")).read_text()


@dataclass(frozen=True)
class OciImage:
    """An image read back from an OCI archive by tools pybuild does not share code with."""

    archive: Path
    manifest: dict
    config: dict  # the whole config blob (skopeo inspect --config)
    rootfs: Path  # unpacked by umoci
    files: dict[str, Entry]

    @property
    def runtime(self) -> dict:
        """The config's runtime section (Env, Cmd, Entrypoint, ...)."""
        return self.config.get("config") or {}

    def text(self, path: str) -> str:
        return file_text(self.files, self.rootfs, path)

    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.runtime.get("Env") or [])


def archive_bytes(archive: Path) -> bytes:
    """Every blob of an OCI archive, layers decompressed: what a secret must never be part of."""
    out = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            if data.startswith(b"\x28\xb5\x2f\xfd"):
                data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
            elif data.startswith(b"\x1f\x8b"):
                data = gzip.decompress(data)
            out.append(data)
    return b"".join(out)


def skopeo_inspect(archive: Path, *, config: bool = False, raw: bool = False) -> dict:
    # --raw: the blob as written; skopeo's parsed view drops Docker's fields (Healthcheck, Shell, OnBuild)
    flags = ["--config", "--raw"] if config else ["--raw"] if raw else []
    return json.loads(run(["skopeo", "inspect", *flags, f"oci-archive:{archive}"]).stdout)


def read_oci_archive(archive: Path, workdir: Path) -> OciImage:
    """Config and manifest by skopeo; the file tree by umoci, which applies the layers and their whiteouts."""
    require_tools("skopeo", "umoci")
    workdir.mkdir(parents=True, exist_ok=True)
    layout = workdir / "layout"
    bundle = workdir / "bundle"
    # umoci 0.4 cannot read zstd layers: skopeo rewrites them as gzip (diff_ids and content unchanged).
    run(["skopeo", "copy", "-q", "--dest-compress-format", "gzip", f"oci-archive:{archive}", f"oci:{layout}:image"])
    run(["umoci", "unpack", "--image", f"{layout}:image", bundle])
    rootfs = bundle / "rootfs"
    return OciImage(archive, skopeo_inspect(archive, raw=True), skopeo_inspect(archive, config=True), rootfs,
                    tree(rootfs))


def pybuild_image(pybuild: Pybuild, name: str, workdir: Path) -> OciImage:
    """A stored image, saved as an OCI archive and read back."""
    return read_oci_archive(pybuild.save(name, workdir / "image.tar"), workdir)


@dataclass(frozen=True)
class Podman:
    """podman with a private store, to load and run the images pybuild writes."""

    root: Path

    def command(self, *args: str | os.PathLike) -> list[str | os.PathLike]:
        return ["podman", "--root", self.root / "root", "--runroot", self.root / "run", "--storage-driver", "vfs",
                "--cgroup-manager=cgroupfs", *args]

    def load(self, archive: Path) -> str:
        """Load an archive; returns the image ID podman gives it."""
        skip_if_chrooted("podman")  # checked here, so a test's other checks still run before the podman part
        done = run(self.command("load", "-q", "-i", archive))
        loaded = done.stdout.strip().splitlines()[-1].split(": ", 1)[1]
        return run(self.command("image", "inspect", "--format", "{{.Id}}", loaded.split(",")[0])).stdout.strip()

    def run(self, image: str, *argv: str, options: Sequence[str] = (), check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return run(self.command(*PODMAN_RUN, *options, image, *argv), check=check, timeout=timeout)


def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    require_tools("podman")
    return Podman(tmp_path_factory.mktemp("podman"))


@dataclass(frozen=True)
class Buildah:
    """Buildah with a private store: the reference builder the differential tests compare pybuild with."""

    root: Path

    def command(self, *args: str | os.PathLike) -> list[str | os.PathLike]:
        return ["buildah", "--root", self.root / "root", "--runroot", self.root / "run", "--storage-driver", "vfs",
                *args]

    def bud(self, context: Path, tag: str, *, dockerfile: Path | None = None,
            build_args: Mapping[str, str] | None = None, build_contexts: Mapping[str, str] | None = None) -> None:
        """Build like `pybuild build`; heredocs are rewritten first, since Buildah 1.28 cannot read them."""
        dockerfile = dockerfile or context / "Dockerfile"
        work = self.root / "dockerfiles" / tag.replace("/", "_").replace(":", "_")
        work.mkdir(parents=True, exist_ok=True)
        translated = work / "Dockerfile"
        translated.write_text(without_heredocs(dockerfile.read_text(), work / "heredocs"))
        contexts = {**(build_contexts or {}), HEREDOC_CONTEXT: str(work / "heredocs")}
        args = [arg for key, value in (build_args or {}).items() for arg in ("--build-arg", f"{key}={value}")]
        args += [arg for key, value in contexts.items() for arg in ("--build-context", f"{key}={value}")]
        # docker format: the OCI config has no Healthcheck, OnBuild, Shell; Buildah drops them for OCI
        run(self.command("bud", "--isolation", "chroot", "--layers", "--pull=never", "--format", "docker",
                         *args, "-f", translated, "-t", tag, context), timeout=900)

    def docker_config(self, tag: str) -> dict:
        """The image's Docker config blob."""
        return json.loads(run(self.command("inspect", "--type", "image", tag)).stdout)["Docker"]

    def oci_archive(self, tag: str, archive: Path) -> Path:
        """The image as an OCI archive, to unpack with umoci like pybuild's (`buildah from` would run ONBUILD)."""
        run(self.command("push", "-q", tag, f"oci-archive:{archive}"))
        return archive


HEREDOC_CONTEXT = "pybuild-heredocs"


def without_heredocs(dockerfile: str, files: Path) -> str:
    """The same Dockerfile without heredocs, for Buildah 1.28, with what BuildKit would do spelled out.

    `COPY <<EOF dest` becomes a COPY of a file with that content from an extra named context (so the
    real context stays as it is); `RUN <<EOF` alone runs the body with the current SHELL, and any other
    RUN with heredocs hands the whole text, heredocs included, to the shell, as BuildKit does.
    """
    files.mkdir(parents=True, exist_ok=True)
    lines = dockerfile.splitlines()
    shell = ["/bin/sh", "-c"]
    replacements: dict[int, tuple[int, str]] = {}
    for node in parse_raw(dockerfile).nodes:
        if node.keyword == "shell":
            shell = list(node.args)
        if not node.heredocs or node.keyword == "onbuild":
            continue
        flags = " ".join(node.flags)
        if node.keyword == "run":
            body = [_heredoc_body(heredoc) for heredoc in node.heredocs]
            command = node.args[0].strip()
            if len(node.heredocs) == 1 and command.lstrip("<-").strip("'\"") == node.heredocs[0].name:
                assert not body[0].startswith("#!"), "a heredoc with a shebang is not rewritten yet"
                script = body[0]
            else:
                script = command + "\n" + "".join(f"{text}{h.name}\n" for h, text in zip(node.heredocs, body,
                                                                                        strict=True))
            text = f"RUN {flags} {json.dumps([*shell, script])}"
        else:
            sources = []
            for word in node.args[:-1]:
                heredoc = next((h for h in node.heredocs if word.lstrip("<-").strip("'\"") == h.name), None)
                assert heredoc is not None, "a COPY mixing heredocs and context files is not rewritten yet"
                assert not (heredoc.expand and "$" in heredoc.content), "quote the delimiter: no expansion here"
                name = f"{len(list(files.iterdir()))}-{Path(node.args[-1]).name or 'file'}"
                (files / name).write_text(_heredoc_body(heredoc))
                sources.append(name)
            assert "--from" not in flags
            text = f"{node.keyword.upper()} {flags} --from={HEREDOC_CONTEXT} {json.dumps([*sources, node.args[-1]])}"
        replacements[node.start_line - 1] = (node.end_line, text)
    out, index = [], 0
    while index < len(lines):
        if index in replacements:
            end, text = replacements[index]
            out.append(text)
            index = end
        else:
            out.append(lines[index])
            index += 1
    return "\n".join(out) + "\n"


def _heredoc_body(heredoc) -> str:
    if not heredoc.chomp:
        return heredoc.content
    return "".join(line.lstrip("\t") for line in heredoc.content.splitlines(keepends=True))
