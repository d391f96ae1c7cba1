"""Every example under examples/ builds with pybuild, runs under podman and does its job, and builds reproducibly."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import pytest
from e2e import (
    EXAMPLES,
    PODMAN_RUN,
    OciImage,
    Podman,
    Pybuild,
    build_base,
    podman,
    pybuild_image,
    run,
    shared_store,
)

pytestmark = pytest.mark.slow

# example directory -> tag; onbuild-tools/child is built FROM the onbuild-tools image
EXAMPLES_BUILT = {
    "static-site": "static-site",
    "checksummed-app": "checksummed-app",
    "worker": "worker",
    "cgi-service": "cgi-service",
    "onbuild-tools": "onbuild-tools",
    "onbuild-tools/child": "linted-scripts",
}
PARENT = {"onbuild-tools/child": "onbuild-tools"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Pybuild:
    return shared_store(tmp_path_factory)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return podman(tmp_path_factory)


def test_every_example_is_covered() -> None:
    found = {str(path.parent.relative_to(EXAMPLES)) for path in EXAMPLES.rglob("Dockerfile")}
    assert found == {*EXAMPLES_BUILT, "base"}


def test_every_example_says_what_it_shows_and_how_to_run_it() -> None:
    for dockerfile in EXAMPLES.rglob("Dockerfile"):
        first = dockerfile.read_text().splitlines()[0]
        assert first.startswith("# ") and ": " in first, f"{dockerfile}: the first line says what it shows"
        assert "pybuild build" in dockerfile.read_text(), f"{dockerfile}: the header says how to build it"


class Built:
    """The examples built into the shared store, each once, read back through skopeo and umoci, loaded into podman."""

    def __init__(self, store: Pybuild, pod: Podman, workdir: Path) -> None:
        self.store, self.pod, self.workdir = store, pod, workdir
        self.images: dict[str, OciImage] = {}
        self.podman_ids: dict[str, str] = {}

    def base(self) -> OciImage:
        if "base" not in self.images:
            self.images["base"] = pybuild_image(self.store, "busybox-base", self.workdir / "base")
        return self.images["base"]

    def image(self, example: str) -> OciImage:
        if example not in self.images:
            if example in PARENT:
                self.image(PARENT[example])
            self.store.build(EXAMPLES / example, "-t", EXAMPLES_BUILT[example])
            self.images[example] = pybuild_image(self.store, EXAMPLES_BUILT[example],
                                                 self.workdir / example.replace("/", "-"))
        return self.images[example]

    def run(self, example: str, *argv: str, options: tuple[str, ...] = ()) -> str:
        if example not in self.podman_ids:
            self.podman_ids[example] = self.pod.load(self.image(example).archive)
        return self.pod.run(self.podman_ids[example], *argv, options=("--no-healthcheck", *options)).stdout

    def serve_and_fetch(self, example: str, script: str) -> str:
        """Start the image's own ENTRYPOINT + CMD in the background, then run ``script`` beside it."""
        runtime = self.image(example).runtime
        server = shlex.join([*(runtime.get("Entrypoint") or []), *(runtime.get("Cmd") or [])])
        return self.run(example, "-c", f"{server} & sleep 1; {script}", options=("--entrypoint", "sh"))


@pytest.fixture(scope="module")
def built(store: Pybuild, pod: Podman, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(store, pod, tmp_path_factory.mktemp("examples"))


@pytest.mark.parametrize("example", list(EXAMPLES_BUILT))
def test_example_builds_on_the_base_layers(built: Built, store: Pybuild, example: str) -> None:
    image = built.image(example)
    base = built.base()
    assert image.config["rootfs"]["diff_ids"][:len(base.config["rootfs"]["diff_ids"])] == \
        base.config["rootfs"]["diff_ids"]
    assert image.manifest["layers"][0] == base.manifest["layers"][0]
    assert image.files["/bin/busybox"] == base.files["/bin/busybox"]


def test_base_is_made_from_the_host_busybox(built: Built) -> None:
    image = built.base()
    files = image.files
    assert files["/bin/busybox"].sha256 == _sha256(Path("/bin/busybox"))
    assert files["/bin/sh"].target == "/bin/busybox"
    assert files["/tmp"].mode == 0o1777
    assert files["/root"].mode == 0o700
    assert (files["/home/www"].uid, files["/home/www"].gid) == (1000, 1000)
    assert "www:x:1000:1000:www:/home/www:/bin/sh" in image.text("/etc/passwd").splitlines()
    assert "staff:x:50:www" in image.text("/etc/group").splitlines()
    assert image.runtime["Cmd"] == ["sh"]
    assert image.env()["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_static_site_serves_its_rendered_pages_as_www(built: Built) -> None:
    image = built.image("static-site")
    runtime = image.runtime
    assert runtime["User"] == "www"
    assert runtime["ExposedPorts"] == {"8080/tcp": {}}
    assert runtime["Entrypoint"] == ["httpd", "-f", "-c", "/etc/httpd.conf", "-h", "/srv/www"]
    assert runtime["Cmd"] == ["-p", "8080"]
    assert runtime["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1"],
        "Interval": 30_000_000_000, "Timeout": 3_000_000_000, "Retries": 3,
    }
    assert runtime["Labels"]["org.opencontainers.image.title"] == "static-site"
    pages = {path: entry for path, entry in image.files.items() if path.startswith("/srv/www/")}
    assert sorted(pages) == ["/srv/www/about.html", "/srv/www/index.html", "/srv/www/pages.txt", "/srv/www/style.css"]
    assert {(entry.uid, entry.gid, entry.mode) for entry in pages.values()} == {(1000, 1000, 0o644)}
    assert (image.files["/srv/www"].uid, image.files["/srv/www"].gid) == (1000, 1000)
    # the render stage's tools and the .dockerignore'd drafts stay out of the final image
    assert not any("render.sh" in path or "launch-plan" in path or ".swp" in path for path in image.files)

    served = built.serve_and_fetch("static-site", "wget -q -O- http://127.0.0.1:8080/; id -un")
    assert "<h1>Welcome</h1>" in served
    assert "rendered in a build stage &amp; copied" in served
    assert served.splitlines()[-1] == "www"


def test_checksummed_app_greets_and_verifies_its_files(built: Built) -> None:
    image = built.image("checksummed-app")
    runtime = image.runtime
    assert runtime["Entrypoint"] == ["/opt/app/bin/app"]
    assert runtime["Cmd"] == ["greet", "world"]
    assert runtime["WorkingDir"] == "/opt/app"
    assert runtime["Labels"]["org.opencontainers.image.version"] == "1.0.0"
    assert image.env()["APP_VERSION"] == "1.0.0"
    assert "Shell" not in runtime, "SHELL was set in the build stage only"
    assert image.files["/opt/app/bin/app"].mode == 0o755
    # the ADDed tar.gz was unpacked in the build stage: its file arrives byte for byte
    assert image.text("/opt/app/lib/greet.sh").startswith("# libgreet: greetings for shell apps\n")
    assert "vendor" not in "".join(image.files), "the build stage's files stay behind"
    assert image.text("/opt/app/SHA256SUMS").count("\n") == 4

    assert built.run("checksummed-app") == "Hello, world! (app 1.0.0)\n"
    assert built.run("checksummed-app", "verify") == "OK: 4 files match\n"
    assert built.run("checksummed-app", "version") == "app 1.0.0 (libgreet 1.2)\n"


def test_checksummed_app_takes_its_version_from_a_build_arg(store: Pybuild, tmp_path: Path) -> None:
    store.build(EXAMPLES / "checksummed-app", "-t", "checksummed-app:2", "--build-arg", "VERSION=2.0.0")
    image = pybuild_image(store, "checksummed-app:2", tmp_path)
    assert image.runtime["Labels"]["org.opencontainers.image.version"] == "2.0.0"
    assert image.env()["APP_VERSION"] == "2.0.0"
    assert image.text("/opt/app/share/VERSION") == "2.0.0\n"


def test_worker_runs_its_jobs_as_its_own_user(built: Built) -> None:
    image = built.image("worker")
    runtime = image.runtime
    assert runtime["User"] == "worker:worker"
    assert runtime["Volumes"] == {"/var/spool/worker": {}}
    assert runtime["StopSignal"] == "SIGINT"
    assert runtime["WorkingDir"] == "/var/spool/worker"
    assert runtime["Healthcheck"]["StartPeriod"] == 10_000_000_000
    assert "worker:x:2000:2000:job runner:/var/spool/worker:/bin/sh" in image.text("/etc/passwd").splitlines()
    assert image.files["/usr/local/bin/worker"].mode == 0o755
    jobs = {path: entry.mode for path, entry in image.files.items() if path.startswith("/etc/worker/jobs.d/")}
    assert jobs == {"/etc/worker/jobs.d/10-disk.sh": 0o644, "/etc/worker/jobs.d/20-report.sh": 0o644}
    spool = image.files["/var/spool/worker/done"]
    assert (spool.uid, spool.gid) == (2000, 2000)

    assert built.run("worker", "--once").splitlines() == [
        "worker: 10-disk ok", "worker: 20-report ok", "worker: ran 2 jobs as worker(2000)"]


def test_worker_stops_cleanly_on_its_stop_signal(built: Built) -> None:
    image_id = built.podman_ids.get("worker") or built.pod.load(built.image("worker").archive)
    detached = [arg for arg in PODMAN_RUN if arg != "--rm"]
    container = run(built.pod.command(*detached, "-d", "--no-healthcheck", image_id)).stdout.strip()
    try:
        run(built.pod.command("exec", container, "sh", "-c", "until test -e heartbeat; do sleep 0.1; done"))
        run(built.pod.command("stop", "-t", "10", container))
        state = json.loads(run(built.pod.command("inspect", container)).stdout)[0]
        logs = run(built.pod.command("logs", container)).stdout
    finally:
        run(built.pod.command("rm", "-f", container), check=False)
    assert state["State"]["ExitCode"] == 0, "SIGINT reached the worker's trap, no SIGKILL was needed"
    assert logs.splitlines()[-1] == "worker: stopping"


def test_cgi_service_answers_as_www(built: Built) -> None:
    image = built.image("cgi-service")
    greet = image.files["/srv/cgi/cgi-bin/greet"]
    assert (greet.uid, greet.gid, greet.mode) == (0, 1000, 0o750)
    assert image.files["/srv/cgi/index.html"].mode == 0o644
    assert (image.files["/var/log/cgi"].uid, image.files["/var/log/cgi"].gid) == (1000, 1000)
    assert image.runtime["ExposedPorts"] == {"8081/tcp": {}}
    assert image.env()["GREETING"] == "Hello"

    served = built.serve_and_fetch("cgi-service", " ; ".join([
        "wget -q -O- 'http://127.0.0.1:8081/cgi-bin/greet?name=pybuild'",
        "wget -q -O- http://127.0.0.1:8081/cgi-bin/env",
        "cut -d' ' -f2- /var/log/cgi/access.log",
    ]))
    assert served.splitlines() == ["Hello, pybuild!", "user=www uid=1000", "method=GET script=/cgi-bin/env",
                                   "greet pybuild"]


def test_onbuild_triggers_lint_the_child_image_scripts(built: Built) -> None:
    parent = built.image("onbuild-tools")
    assert parent.runtime["OnBuild"] == ["COPY . /workspace/", "RUN lint-sh /workspace > /workspace/LINT-REPORT"]
    assert not any(path.startswith("/workspace/") for path in parent.files), ".dockerignore keeps child/ out"

    child = built.image("onbuild-tools/child")
    assert not child.runtime.get("OnBuild"), "triggers run in the child and are not passed on to grandchildren"
    assert {"/workspace/Dockerfile", "/workspace/scripts/backup.sh", "/workspace/scripts/greet.sh",
            "/workspace/LINT-REPORT"} <= set(child.files)
    assert built.run("onbuild-tools/child") == "ok: scripts/backup.sh\nok: scripts/greet.sh\n"


def test_two_cold_builds_give_the_same_digests(tmp_path: Path) -> None:
    """Reproducible builds: fresh stores, same inputs, same manifest digests; every mtime clamped to the epoch."""
    digests = []
    for attempt in ("first", "second"):
        pybuild = Pybuild(tmp_path / attempt)
        build_base(pybuild)
        found = {}
        for example, tag in EXAMPLES_BUILT.items():
            metadata = tmp_path / f"{attempt}-{tag}.json"
            pybuild.build(EXAMPLES / example, "-t", tag, "--metadata-file", metadata)
            found[tag] = json.loads(metadata.read_text())["containerimage.digest"]
        digests.append(found)
    assert digests[0] == digests[1]

    image = pybuild_image(Pybuild(tmp_path / "first"), "static-site", tmp_path / "unpacked")
    late = [path for path in image.files if (image.rootfs / path.lstrip("/")).lstat().st_mtime > 0]
    assert late == [], "SOURCE_DATE_EPOCH defaults to 0: no file is newer"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
