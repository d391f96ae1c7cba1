"""Every Dockerfile instruction built for real by pybuild, checked through skopeo (config), umoci (files) and podman."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import re
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
from e2e import (
    OciImage,
    Podman,
    Pybuild,
    archive_bytes,
    podman,
    read_oci_archive,
    shared_store,
)

pytestmark = pytest.mark.slow

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SERVED = b"fetched over http\n"
SERVED_SHA256 = hashlib.sha256(SERVED).hexdigest()
SECRET = "s3cr3t-t0ken-do-not-store"


def tar_gz(files: Mapping[str, bytes]) -> bytes:
    """A small, fixed tar.gz (ADD unpacks local ones, not downloaded ones)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o640, 1_000_000
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


VENDOR_TAR_GZ = tar_gz({"pkg/README": b"vendored\n", "pkg/lib/util.sh": b"util() { :; }\n"})


@dataclass(frozen=True)
class Executable:
    content: str


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Case:
    """One build and what must hold of its image; @HTTP@, @BASE_ARCHIVE@ and @PARENT@ are filled in."""

    id: str
    dockerfile: str
    context: Mapping[str, str | bytes | Executable | Symlink] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    parent: str = ""  # a Dockerfile built first, as the image @PARENT@ names
    config: Mapping[str, Any] = field(default_factory=dict)  # runtime config fields; None means unset
    top_level: Mapping[str, Any] = field(default_factory=dict)  # fields beside "config" (author, ...)
    files: Mapping[str, str] = field(default_factory=dict)  # path -> Entry.summary
    contents: Mapping[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    runs: tuple[tuple[tuple[str, ...], str], ...] = ()  # podman run argv -> stdout


B = "FROM busybox-base\n"


def stage(name: str) -> str:
    return f"FROM busybox-base AS {name}\n"


CASES = [
    # FROM
    Case("from-scratch", "FROM scratch\nCOPY a.txt /a.txt\n", {"a.txt": "a\n"},
         files={"/a.txt": "file 0644 0:0"}, absent=("/bin", "/etc"), config={"Cmd": None, "Entrypoint": None}),
    # without a USER, RUN runs as root (0:0) whether or not the image has an /etc/passwd
    Case("from-scratch-run-without-passwd", "FROM scratch\nCOPY --from=busybox-base /bin/busybox /busybox\n"
         'RUN ["/busybox", "sh", "-c", "/busybox id -u > /uid"]\n', contents={"/uid": "0\n"}),
    Case("from-store-name", B + "RUN echo ok > /ok\n", contents={"/ok": "ok\n"},
         config={"Cmd": ["sh"], "Env": [f"PATH={BASE_PATH}"]}, files={"/bin/busybox": "file 0755 0:0"}),
    Case("from-stage", stage("one") + "RUN echo 1 > /one\nFROM one AS two\nRUN echo 2 > /two\n",
         contents={"/one": "1\n", "/two": "2\n"}),
    Case("from-oci-archive", "FROM oci-archive:@BASE_ARCHIVE@\nRUN echo archived > /from-archive\n",
         contents={"/from-archive": "archived\n"}, config={"Cmd": ["sh"]}),
    Case("from-global-arg", "ARG BASE=busybox-base\nARG TAG=latest\nFROM ${BASE}:${TAG}\n"
         'RUN echo "[$TAG]" > /before\nARG TAG\nRUN echo "[$TAG]" > /after\n',
         contents={"/before": "[]\n", "/after": "[latest]\n"}),
    # RUN
    Case("run-shell-form", B + 'RUN echo "$0" > /argv0 && echo one two | wc -w > /words\n',
         contents={"/argv0": "/bin/sh\n", "/words": "2\n"}),
    Case("run-exec-form", B + 'RUN ["/bin/busybox", "touch", "/exec $HOME"]\n',
         files={"/exec $HOME": "file 0644 0:0"}),
    Case("run-heredoc", B + "RUN <<EOF\necho one > /heredoc\necho two >> /heredoc\nEOF\n",
         contents={"/heredoc": "one\ntwo\n"}),
    Case("run-heredoc-shebang", B + "RUN <<EOF\n#!/usr/bin/awk -f\nBEGIN { print 6 * 7 > \"/awk\" }\nEOF\n",
         contents={"/awk": "42\n"}),
    # BuildKit runs a lone heredoc starting with #! as the executable file /dev/pipes/<delimiter>, read-only,
    # with the step's own stdin; /dev is the sandbox's, so the script lands in no layer
    Case("run-heredoc-shebang-is-a-file", B + "RUN <<-SCRIPT\n#!/bin/sh -e\n\techo \"$0\" > /argv0\n"
         "\tstat -c '%a %u' \"$0\" > /mode\n\tcat > /stdin\n\t(echo changed >> \"$0\") 2>/dev/null || "
         "echo read-only > /ro\n\tSCRIPT\n",
         contents={"/argv0": "/dev/pipes/SCRIPT\n", "/mode": "755 0\n", "/stdin": "", "/ro": "read-only\n"},
         absent=("/dev/pipes", "/dev/pipes/SCRIPT")),
    # BuildKit looks for the #! before <<- strips the tabs: an indented one is a comment of a shell script
    Case("run-heredoc-indented-shebang-is-a-shell-script", B + "RUN <<-SCRIPT\n\t#!/bin/false\n"
         "\techo \"$0\" > /argv0\n\tSCRIPT\n", contents={"/argv0": "/bin/sh\n"}),
    Case("run-heredoc-shebang-as-user", B + "USER 1000:1000\nWORKDIR /tmp\n"
         "RUN <<EOF\n#!/bin/sh\nid -u > /tmp/uid\nEOF\n", contents={"/tmp/uid": "1000\n"}),
    Case("run-heredoc-as-stdin", B + "RUN cat > /fed <<EOF\nfed $((1 + 1))\nEOF\n", contents={"/fed": "fed 2\n"}),
    # Docker's SHELL reference: it sets the shell of the shell forms of RUN, CMD and ENTRYPOINT
    Case("run-shell-instruction", B + 'SHELL ["/bin/busybox", "env", "SHELLED=yes", "/bin/sh", "-c"]\n'
         "RUN echo $SHELLED > /shelled\nCMD echo hi\n",
         contents={"/shelled": "yes\n"},
         config={"Shell": ["/bin/busybox", "env", "SHELLED=yes", "/bin/sh", "-c"],
                 "Cmd": ["/bin/busybox", "env", "SHELLED=yes", "/bin/sh", "-c", "echo hi"]}),
    Case("run-network-none-flag", B + "RUN --network=none tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > /if\n",
         contents={"/if": "lo\n"}),
    Case("run-network-none-option", B + "RUN tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > /if\n",
         args=("--network", "none"), contents={"/if": "lo\n"}),
    Case("run-mount-bind-context", B + "RUN --mount=type=bind,source=data,target=/mnt/data "
         "cat /mnt/data/hello.txt > /bound && (touch /mnt/data/new 2>/dev/null && echo rw || echo ro) >> /bound\n",
         {"data/hello.txt": "hello from the context\n"},
         contents={"/bound": "hello from the context\nro\n"}, absent=("/mnt/data/hello.txt", "/mnt/data/new")),
    # Docker's .dockerignore reference: ignored files are not sent with the context, so no mount of it shows them
    Case("run-mount-bind-context-ignore-file", B + "RUN --mount=type=bind,source=data,target=/mnt/data "
         "cd /mnt/data && find . | sort > /listing && cat link secrets/public.pem > /through\n",
         {"data/hello.txt": "hello\n", "data/.env": "TOKEN=x\n", "data/sub/drop.log": "log\n",
          "data/sub/keep.txt": "keep\n", "data/secrets/public.pem": "pem\n", "data/secrets/private.key": "key\n",
          "data/link": Symlink("hello.txt"),
          ".dockerignore": "data/.env\n**/*.log\ndata/secrets\n!data/secrets/*.pem\n"},
         contents={"/listing": ".\n./hello.txt\n./link\n./secrets\n./secrets/public.pem\n./sub\n./sub/keep.txt\n",
                   "/through": "hello\npem\n"}),
    Case("run-mount-bind-stage", stage("gen") + "RUN echo generated > /gen.txt\n" + B
         + "RUN --mount=type=bind,from=gen,source=/gen.txt,target=/g.txt cat /g.txt > /from-stage\n",
         contents={"/from-stage": "generated\n"}, absent=("/gen.txt",)),
    Case("run-mount-tmpfs", B + "RUN --mount=type=tmpfs,target=/scratch echo x > /scratch/f && "
         "grep ' /scratch ' /proc/mounts | cut -d' ' -f3 > /fstype\n",
         contents={"/fstype": "tmpfs\n"}, absent=("/scratch/f",)),
    Case("run-mount-tmpfs-size", B + "RUN --mount=type=tmpfs,target=/scratch,size=64m "
         "grep ' /scratch ' /proc/mounts | grep -o 'size=[0-9]*k' > /size\n", contents={"/size": "size=65536k\n"}),
    Case("run-mount-secret-mode-and-owner", B + "RUN --mount=type=secret,id=home,mode=0440,uid=1,gid=2 "
         "stat -c '%a %u %g' /run/secrets/home > /secret-stat\n", args=("--secret", "id=home,env=HOME"),
         contents={"/secret-stat": "440 1 2\n"}),
    # COPY and ADD
    Case("copy-wildcard", B + "COPY *.txt /w/\n", {"a.txt": "a\n", "b.txt": "b\n", "c.md": "c\n"},
         files={"/w/a.txt": "file 0644 0:0", "/w/b.txt": "file 0644 0:0"}, absent=("/w/c.md",)),
    Case("copy-directory-contents", B + "COPY dir /d\nCOPY dir/ /e/\n",
         {"dir/inner.txt": "in\n", "dir/sub/deep.txt": "deep\n"},
         contents={"/d/inner.txt": "in\n", "/d/sub/deep.txt": "deep\n", "/e/inner.txt": "in\n"},
         absent=("/d/dir", "/e/dir")),
    Case("copy-trailing-slash", B + "COPY a.txt /into/\nCOPY a.txt /as-file\n", {"a.txt": "a\n"},
         files={"/into": "dir 0755 0:0", "/into/a.txt": "file 0644 0:0", "/as-file": "file 0644 0:0"}),
    # a symlink inside a copied directory stays a symlink; a source named directly is followed
    Case("copy-keeps-mode-and-symlinks", B + "COPY tree/ /t/\nCOPY tree/link /named\n",
         {"tree/tool": Executable("#!/bin/sh\necho tool\n"), "tree/link": Symlink("tool")},
         files={"/t/tool": "file 0755 0:0", "/t/link": "symlink -> tool", "/named": "file 0755 0:0"},
         contents={"/named": "#!/bin/sh\necho tool\n"}),
    Case("copy-from-stage-and-image", stage("gen") + "RUN echo made > /made\n" + B
         + "COPY --from=gen /made /copied\nCOPY --from=busybox-base /etc/group /group-copy\n",
         contents={"/copied": "made\n"}, files={"/group-copy": "file 0644 0:0"}),
    Case("copy-chown-by-name", B + "COPY --chown=www:staff a.txt /owned/\nCOPY --chown=1000 a.txt /uid-only\n",
         {"a.txt": "a\n"}, files={"/owned/a.txt": "file 0644 1000:50", "/uid-only": "file 0644 1000:1000"}),
    Case("copy-chmod", B + "COPY --chmod=0600 a.txt /private\nCOPY --chmod=755 a.txt /exe\n", {"a.txt": "a\n"},
         files={"/private": "file 0600 0:0", "/exe": "file 0755 0:0"}),
    Case("copy-link", B + "COPY --link a.txt /linked/\nRUN cat /linked/a.txt > /seen\n", {"a.txt": "a\n"},
         contents={"/linked/a.txt": "a\n", "/seen": "a\n"}),
    Case("copy-parents", B + "COPY --parents x/*/f.txt /p/\n", {"x/y/f.txt": "y\n", "x/z/f.txt": "z\n"},
         contents={"/p/x/y/f.txt": "y\n", "/p/x/z/f.txt": "z\n"}, absent=("/p/f.txt", "/p/y")),
    Case("copy-exclude", B + "COPY --exclude=**/*.md --exclude=skip . /e/\n",
         {"keep.txt": "k\n", "drop.md": "d\n", "skip/x": "x\n", "sub/also.md": "d\n"},
         files={"/e/keep.txt": "file 0644 0:0"}, absent=("/e/drop.md", "/e/skip/x", "/e/sub/also.md")),
    Case("copy-dockerignore", B + "COPY . /ctx/\n", {".dockerignore": "secret*\n!secret-ok\n", "secret-a": "no\n",
         "secret-ok": "yes\n", "plain": "p\n"},
         files={"/ctx/plain": "file 0644 0:0", "/ctx/secret-ok": "file 0644 0:0"}, absent=("/ctx/secret-a",)),
    Case("copy-heredoc", B + "ARG NAME=world\nCOPY <<EOF /expanded\nhello $NAME\nEOF\n"
         "COPY <<'EOF' /literal\nhello $NAME\nEOF\n",
         contents={"/expanded": "hello world\n", "/literal": "hello $NAME\n"},
         files={"/expanded": "file 0644 0:0"}),
    Case("add-local-tar-gz-is-unpacked", B + "ADD vendor.tar.gz /opt/\nCOPY vendor.tar.gz /copied/\n",
         {"vendor.tar.gz": VENDOR_TAR_GZ},
         contents={"/opt/pkg/README": "vendored\n", "/opt/pkg/lib/util.sh": "util() { :; }\n"},
         files={"/opt/pkg/README": "file 0640 0:0", "/copied/vendor.tar.gz": "file 0644 0:0"}),
    # Docker's ADD reference: a file from a URL gets mode 600 and is never unpacked
    Case("add-url-with-checksum", B + f"ADD --checksum=sha256:{SERVED_SHA256} @HTTP@/served.txt /dl/\n"
         "ADD @HTTP@/served.tar.gz /dl/\n",
         contents={"/dl/served.txt": SERVED.decode()},
         files={"/dl/served.txt": "file 0600 0:0", "/dl/served.tar.gz": "file 0600 0:0"}),
    # config instructions
    # redefining a variable keeps its place in Env, as BuildKit does
    Case("env", B + 'ENV GREETING="hello world" EMPTY= \\\n    NUM=42\nENV PATH=/opt/bin:$PATH\n'
         'RUN echo "$GREETING/$NUM" > /env\n',
         config={"Env": [f"PATH=/opt/bin:{BASE_PATH}", "GREETING=hello world", "EMPTY=", "NUM=42"]},
         contents={"/env": "hello world/42\n"}, runs=((("sh", "-c", "echo $GREETING"), "hello world\n"),)),
    Case("arg-and-build-arg", B + 'ARG FLAVOUR=plain\nARG FROM_CLI\nRUN echo "$FLAVOUR $FROM_CLI" > /args\n',
         args=("--build-arg", "FROM_CLI=given"), contents={"/args": "plain given\n"},
         config={"Env": [f"PATH={BASE_PATH}"]}),
    Case("arg-targetarch", B + "ARG TARGETOS\nARG TARGETARCH\nRUN echo $TARGETOS/$TARGETARCH > /platform\n",
         contents={"/platform": "linux/amd64\n"}),
    Case("label", B + 'LABEL a=1 "b c"="d e"\nLABEL a=2\n', config={"Labels": {"a": "2", "b c": "d e"}}),
    Case("expose", B + "EXPOSE 80 53/udp 8080/tcp\n",
         config={"ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080/tcp": {}}}),
    Case("volume", B + 'VOLUME /data\nVOLUME ["/logs", "/cache"]\n',
         config={"Volumes": {"/data": {}, "/logs": {}, "/cache": {}}}),
    # Docker's WORKDIR reference: a missing WORKDIR is created, even if nothing uses it
    Case("workdir", B + "WORKDIR /a/b\nWORKDIR c\nRUN pwd > /pwd\nWORKDIR /unused\n",
         config={"WorkingDir": "/unused"}, contents={"/pwd": "/a/b/c\n"},
         files={"/a/b/c": "dir 0755 0:0", "/unused": "dir 0755 0:0"}),
    Case("user-by-name", B + "USER www\nRUN id -u > /home/www/id && id -un >> /home/www/id\n",
         config={"User": "www"}, contents={"/home/www/id": "1000\nwww\n"},
         files={"/home/www/id": "file 0644 1000:1000"}, runs=((("id", "-un"), "www\n"),)),
    Case("user-uid-gid", B + "USER 1000:50\nRUN id -u > /tmp/ug && id -g >> /tmp/ug\n",
         config={"User": "1000:50"}, contents={"/tmp/ug": "1000\n50\n"}),
    # Docker's CMD/ENTRYPOINT table
    Case("cmd-exec-alone", B + 'CMD ["echo", "from-cmd"]\n', config={"Cmd": ["echo", "from-cmd"], "Entrypoint": None},
         runs=(((), "from-cmd\n"),)),
    Case("cmd-shell-form", B + "CMD echo $HOME\n", config={"Cmd": ["/bin/sh", "-c", "echo $HOME"]},
         runs=(((), "/root\n"),)),
    Case("entrypoint-and-cmd", B + 'ENTRYPOINT ["echo", "entry"]\nCMD ["cmd"]\n',
         config={"Entrypoint": ["echo", "entry"], "Cmd": ["cmd"]},
         runs=(((), "entry cmd\n"), (("given",), "entry given\n"))),
    # "If CMD is defined from the base image, setting ENTRYPOINT will reset CMD to an empty value."
    Case("entrypoint-resets-inherited-cmd", B + 'ENTRYPOINT ["echo", "only"]\n',
         config={"Entrypoint": ["echo", "only"], "Cmd": None}, runs=(((), "only\n"),)),
    Case("entrypoint-shell-form-ignores-cmd", B + "ENTRYPOINT echo shell-entry\nCMD [\"ignored\"]\n",
         config={"Entrypoint": ["/bin/sh", "-c", "echo shell-entry"], "Cmd": ["ignored"]},
         runs=(((), "shell-entry\n"),)),
    Case("stopsignal", B + "STOPSIGNAL SIGUSR1\n", config={"StopSignal": "SIGUSR1"}),
    Case("healthcheck-exec", B + 'HEALTHCHECK --interval=5s --timeout=2s --start-period=1s --retries=4 CMD ["true"]\n',
         config={"Healthcheck": {"Test": ["CMD", "true"], "Interval": 5_000_000_000, "Timeout": 2_000_000_000,
                                 "StartPeriod": 1_000_000_000, "Retries": 4}}),
    Case("healthcheck-shell", B + "HEALTHCHECK CMD wget -q localhost || exit 1\n",
         config={"Healthcheck": {"Test": ["CMD-SHELL", "wget -q localhost || exit 1"]}}),
    Case("healthcheck-none-disables-inherited", "FROM @PARENT@\nHEALTHCHECK NONE\n",
         parent=B + "HEALTHCHECK CMD true\n", config={"Healthcheck": {"Test": ["NONE"]}}),
    Case("maintainer", B + "MAINTAINER Jane Doe <jane@example.com>\n",
         top_level={"author": "Jane Doe <jane@example.com>"}),
    Case("onbuild", "FROM @PARENT@\nRUN cat /triggered > /child-saw\n",
         parent=B + "ONBUILD RUN echo triggered > /triggered\nONBUILD ENV FROM_TRIGGER=yes\n",
         contents={"/triggered": "triggered\n", "/child-saw": "triggered\n"},
         config={"OnBuild": None, "Env": [f"PATH={BASE_PATH}", "FROM_TRIGGER=yes"]}),
    # --target builds only what the target needs: the broken stage never runs
    Case("target", stage("broken") + "RUN exit 7\n" + stage("wanted") + "RUN echo wanted > /wanted\nFROM broken\n",
         args=("--target", "wanted"), contents={"/wanted": "wanted\n"}),
    # a later layer's deletions hide files of the earlier ones (whiteouts, opaque directories)
    Case("deletions", B + "RUN mkdir -p /d/sub /opq && echo a > /d/a && echo b > /d/sub/b && echo k > /d/keep "
         "&& echo old > /opq/old\nRUN rm -r /d/a /d/sub /bin/vi && rm -rf /opq && mkdir /opq && echo new > /opq/new\n",
         contents={"/d/keep": "k\n", "/opq/new": "new\n"}, absent=("/d/a", "/d/sub", "/bin/vi", "/opq/old")),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Pybuild:
    return shared_store(tmp_path_factory)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return podman(tmp_path_factory)


@pytest.fixture(scope="module")
def http_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A web server on loopback for ADD <url>: tests never reach the internet."""
    served = tmp_path_factory.mktemp("served")
    (served / "served.txt").write_bytes(SERVED)
    (served / "served.tar.gz").write_bytes(VENDOR_TAR_GZ)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args) -> None:  # keep the test output for failures
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def base_archive(store: Pybuild, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return store.save("busybox-base", tmp_path_factory.mktemp("archive") / "busybox-base.tar")


def write_context(directory: Path, files: Mapping[str, str | bytes | Executable | Symlink]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Symlink):
            path.symlink_to(value.target)
        elif isinstance(value, Executable):
            path.write_text(value.content)
            path.chmod(0o755)
        else:
            path.write_bytes(value if isinstance(value, bytes) else value.encode())


class Built:
    """One case's image: built once, read lazily through skopeo and umoci, run with podman when asked."""

    def __init__(self, store: Pybuild, tag: str, workdir: Path, returncode: int, output: str) -> None:
        self.store, self.tag, self.workdir = store, tag, workdir
        self.returncode, self.output = returncode, output

    @cached_property
    def image(self) -> OciImage:
        return read_oci_archive(self.store.save(self.tag, self.workdir / "image.tar"), self.workdir)


@pytest.fixture
def build(store: Pybuild, http_url: str, base_archive: Path, tmp_path: Path):
    def build(case: Case, check: bool = True) -> Built:
        def fill(text: str) -> str:
            return (text.replace("@HTTP@", http_url).replace("@BASE_ARCHIVE@", str(base_archive))
                    .replace("@PARENT@", f"case-{case.id}-parent"))

        context = tmp_path / "context"
        write_context(context, {**case.context, "Dockerfile": fill(case.dockerfile)})
        if case.parent:
            parent = tmp_path / "parent"
            write_context(parent, {"Dockerfile": case.parent})
            store.build(parent, "-t", f"case-{case.id}-parent")
        done = store.build(context, "-t", f"case-{case.id}", *[fill(arg) for arg in case.args], check=check)
        return Built(store, f"case-{case.id}", tmp_path / "image", done.returncode, done.stdout + done.stderr)

    return build


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_instruction(case: Case, build, pod: Podman) -> None:
    image = build(case).image
    for key, expected in case.config.items():
        assert image.runtime.get(key) == expected, key
    for key, expected in case.top_level.items():
        assert image.config.get(key) == expected, key
    for path, expected in case.files.items():
        assert path in image.files, f"{path} is missing"
        assert image.files[path].summary == expected, path
    for path, expected in case.contents.items():
        assert image.text(path) == expected, path
    for path in case.absent:
        assert path not in image.files, f"{path} should not be in the image"
    if case.runs:
        image_id = pod.load(image.archive)
        for argv, expected in case.runs:
            assert pod.run(image_id, *argv, options=("--no-healthcheck",)).stdout == expected, argv


def test_secret_mount_reaches_run_and_nothing_else(build, tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRET)
    case = Case("secret", B + "RUN --mount=type=secret,id=token sha256sum /run/secrets/token | cut -d' ' -f1 "
                "> /secret-sha && ls /run/secrets > /secrets-seen\nRUN ls /run/secrets > /after 2>&1 || true\n",
                args=("--secret", f"id=token,src={secret_file}"))
    built = build(case)
    image = built.image
    assert image.text("/secret-sha") == hashlib.sha256(SECRET.encode()).hexdigest() + "\n"
    assert image.text("/secrets-seen") == "token\n"
    assert "/run/secrets/token" not in image.files
    assert "token" not in image.text("/after"), "the secret is mounted for its RUN only"
    assert SECRET.encode() not in archive_bytes(image.archive), "layers, config and history hold no secret"
    assert SECRET not in built.output, "pybuild's output does not show the secret"


@dataclass(frozen=True)
class Failure:
    id: str
    dockerfile: str
    context: Mapping[str, str | bytes | Executable | Symlink] = field(default_factory=dict)
    says: tuple[str, ...] = ()  # what the error message must name


FAILURES = [
    Failure("missing-copy-source", B + "COPY missing.txt /x\n", says=("missing.txt",)),
    Failure("copy-parent-of-context", B + "COPY ../outside.txt /x\n", says=("outside.txt",)),
    Failure("symlink-out-of-context", B + "COPY escape/passwd /x\n", {"escape": Symlink("../../../../../etc")},
            says=("escape",)),
    Failure("unsupported-mount-type", B + "RUN --mount=type=ssh true\n", says=("type=ssh",)),
    Failure("heredoc-script-name-with-slash", B + "RUN <<'a/b'\n#!/bin/sh\ntrue\na/b\n", says=("'a/b'",)),
    Failure("add-checksum-mismatch", B + f"ADD --checksum=sha256:{'0' * 64} @HTTP@/served.txt /x\n",
            says=("checksum",)),
]


@pytest.mark.parametrize("failure", FAILURES, ids=[failure.id for failure in FAILURES])
def test_user_error_is_one_clear_message(failure: Failure, build) -> None:
    built = build(Case(failure.id, failure.dockerfile, failure.context), check=False)
    assert built.returncode != 0
    for word in failure.says:
        assert word in built.output
    assert "Traceback" not in built.output
    assert "root:x:0:0" not in built.output, "nothing of the host leaks into the message"


@pytest.mark.parametrize("mistake", ["EXPOSE 80/tcpp", "RUN --mount=type=ssh true",
                                     "RUN --mount=type=tmpfs,target=/t,size=64x true", "STOPSIGNAL SIGFOO"])
def test_mistake_in_the_text_fails_before_the_first_step(mistake: str, build) -> None:
    started = time.monotonic()
    built = build(Case("early-" + mistake.split()[0].lower(),
                       B + "RUN echo first-step-ran && sleep 5\n" + mistake + "\n"), check=False)
    assert built.returncode != 0
    assert re.search(r"Dockerfile:3\b", built.output), built.output
    assert "first-step-ran" not in built.output, "no step was started, not even shown"
    assert time.monotonic() - started < 5, "the build did not wait for the RUN before it"


def test_failing_run_shows_line_command_exit_code_and_output(build) -> None:
    command = "echo step-output-line && exit 42"
    built = build(Case("failing-run", B + f"RUN echo preparing\nRUN {command}\nRUN echo never > /never\n"),
                  check=False)
    assert built.returncode != 0
    output = built.output
    assert re.search(r"Dockerfile:3\b", output), output
    assert command in output
    assert "step-output-line" in output
    assert "42" in output.replace(command, ""), "the exit code is shown, not only the command"
    assert "never" not in output.replace("echo never > /never", "")
