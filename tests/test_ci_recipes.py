"""The CI recipes of examples/ci work as their users run them: each recipe's own commands, read from the file, run in
an unprivileged container (docker as GitLab's Docker executor and a GitHub container job, podman as a Kubernetes
pod) against a registry with basic auth on 127.0.0.1, and push an image and a layer cache there.

Only the lines that install pybuild are left out (the tests are offline: tests/containers.py puts the checkout's
wheel at /opt/pybuild instead), and only ghcr.io is rewritten, to the local registry. Each job runs as its runner
starts it: a fresh container, an empty pybuild store, the CI system's variables and working directory, nothing else
of the host's environment.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shlex
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from containers import (
    GUEST_STORE,
    HOST_SITE_PACKAGES,
    PRELUDE,
    DockerEngine,
    Engine,
    Outcome,
    docker_daemon,
    make_rootfs,
    podman_engine,
)
from e2e import REPO, archive_bytes, run, saved_base
from registry import PASSWORD, USER, Registry, exists, inspect, inspect_config, seed_zstd_oci

RECIPES = REPO / "examples" / "ci"
GITHUB, GITLAB, KUBERNETES = "github-actions.yml", "gitlab-ci.yml", "kubernetes-job.yaml"

# The recipes' lines that install pybuild, each to be found exactly once per recipe and dropped: the harness has
# installed the checkout's wheel at /opt/pybuild already, and the tests have no network to install from.
INSTALL_LINES = {
    "apt-get update": re.compile(r"apt-get update"),
    "apt-get install": re.compile(r"DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends"
                                  r"(?P<packages>( [a-z0-9][a-z0-9.+-]*)+)"),
    "venv": re.compile(r"python3 -m venv /opt/pybuild"),
    "pip install": re.compile(r"/opt/pybuild/bin/pip install pybuild"),
}
INSTALLING = re.compile(r"\bapt-get\b|\bapt\b|\bpip3? install\b|-m venv\b")

DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # debian:12's ENV PATH
ISOLATION = {"podman": "namespaces", "docker": "chroot"}  # what --isolation=auto picks in each engine's defaults

# The application repository a job builds: its Dockerfile is FROM {base}, a busybox base in the job's registry.
GREETING = "hello from the test repository"
APP_FILES = {
    "Dockerfile": "FROM {base}\n"
                  "COPY greet.sh /usr/local/bin/greet\n"
                  "RUN chmod 755 /usr/local/bin/greet && greet | tr a-z A-Z > /greeting\n"
                  "RUN wc -c < /greeting > /greeting.size\n"
                  'CMD ["greet"]\n',
    "greet.sh": f"#!/bin/sh\necho '{GREETING}'\n",
}
BUILT_GREETING = GREETING.upper().encode()  # what only the RUN step writes: the image's layers must hold it
FAILING_DOCKERFILE = "FROM {base}\nCOPY greet.sh /greet.sh\nRUN sh /greet.sh\nRUN test -f /no-such-file\n"
# an offset east of UTC: the recipes must turn it into the same epoch as git's %ct
COMMIT_DATE = "2024-05-04T05:02:01+02:00"
COMMIT_CREATED = "2024-05-04T03:02:01Z"  # the image's "created": SOURCE_DATE_EPOCH from the commit
BRANCH = "main"
GITLAB_REF, GITLAB_REF_SLUG = "feature/Registry-Cache", "feature-registry-cache"


def recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


# --- reading the recipes ---------------------------------------------------------------------------------------


def without_installs(scripts: Sequence[str]) -> list[str]:
    """The recipe's scripts minus the lines that install pybuild, everything else verbatim.

    Each install line must be there once: a recipe whose install lines change shape fails here, rather than having
    them silently run (apt-get could reach a mirror through the host's network) or something else dropped.
    """
    kept, dropped = [], []
    for script in scripts:
        lines = []
        for line in script.splitlines():
            name = next((name for name, pattern in INSTALL_LINES.items() if pattern.fullmatch(line.strip())), None)
            if name is None:
                lines.append(line)
            else:
                dropped.append(name)
        kept.append("".join(f"{line}\n" for line in lines) if lines else "")
    assert sorted(dropped) == sorted(INSTALL_LINES), f"the install lines changed shape: found {dropped} in {scripts}"
    left = [line for script in kept for line in script.splitlines() if INSTALLING.search(line)]
    assert not left, f"install lines the test does not know, which would run: {left}"
    return kept


def installed_packages(scripts: Sequence[str]) -> set[str]:
    """The Debian packages the recipe's apt-get install line names."""
    for line in (line.strip() for script in scripts for line in script.splitlines()):
        found = INSTALL_LINES["apt-get install"].fullmatch(line)
        if found:
            return set(found["packages"].split())
    raise AssertionError(f"no apt-get install line in {scripts}")


def gitlab_job(document: dict) -> dict:
    jobs = [job for job in document.values() if isinstance(job, dict) and "script" in job]
    assert len(jobs) == 1, document
    return jobs[0]


def gitlab_scripts(document: dict) -> list[str]:
    job = gitlab_job(document)
    return [*job.get("before_script", []), *job["script"]]


def github_job(document: dict) -> dict:
    (job,) = document["jobs"].values()
    return job


def github_scripts(document: dict) -> list[str]:
    return [step["run"] for step in github_job(document)["steps"] if "run" in step]


def kubernetes_container(document: dict) -> dict:
    (container,) = document["spec"]["template"]["spec"]["containers"]
    return container


def kubernetes_scripts(document: dict) -> list[str]:
    container = kubernetes_container(document)
    assert container["command"][0] in ("/bin/sh", "sh", "/bin/bash", "bash"), container["command"]
    (script,) = container["args"]
    return [script]


SCRIPTS = {GITHUB: github_scripts, GITLAB: gitlab_scripts, KUBERNETES: kubernetes_scripts}


def substitute_github(text: str, context: Mapping[str, str], registry_host: str) -> str:
    """``${{ expr }}`` replaced as GitHub does before the runner sees the text; ghcr.io is the local registry."""
    def value(match: re.Match) -> str:
        assert match[1] in context, f"the test does not know the expression {match[0]!r}"
        return context[match[1]]

    return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", value, text).replace("ghcr.io", registry_host)


def github_condition(text: str, context: Mapping[str, str]) -> bool:
    """A step's ``if:``; only the ``name == 'value'`` comparisons the recipe uses are known."""
    found = re.fullmatch(r"\s*(?:\$\{\{)?\s*([\w.]+)\s*==\s*'([^']*)'\s*(?:\}\})?\s*", text)
    assert found and found[1] in context, f"the test does not know the condition {text!r}"
    return context[found[1]] == found[2]


# --- what a job leaves ----------------------------------------------------------------------------------------


def step_states(stderr: str) -> dict[str, str]:
    """Each step of pybuild's plain progress by its name ("[stage-0 2/5] COPY ..."): DONE, CACHED or ERROR."""
    names: dict[str, str] = {}
    states: dict[str, str] = {}
    for line in stderr.splitlines():
        if found := re.fullmatch(r"#(\d+) (\[[^\]]+\] .*)", line):
            names.setdefault(found[1], found[2])
        elif found := re.match(r"#(\d+) (DONE|CACHED|ERROR)\b", line):
            states[found[1]] = found[2]
    return {name: states.get(number, "") for number, name in names.items()}


def built_steps(stderr: str) -> dict[str, str]:
    """The states of the steps that make layers: the Dockerfile's COPY and RUN."""
    return {name: state for name, state in step_states(stderr).items() if re.search(r"\] (COPY|RUN) ", name)}


def pushed(stderr: str) -> dict[str, str]:
    """``pushed REF: DIGEST (N bytes)`` lines of `build --push`: reference -> manifest digest."""
    return dict(re.findall(r"^pushed (\S+): (sha256:[0-9a-f]{64}) \(\d+ bytes\)$", stderr, re.MULTILINE))


def succeeded(outcome: Outcome) -> Outcome:
    assert outcome.returncode == 0, str(outcome)
    assert "Traceback (most recent call last)" not in outcome.stderr, outcome.stderr
    return outcome


# --- running a job --------------------------------------------------------------------------------------------


def run_job(engine: Engine, wheel: Path, workdir: Path, commands: Mapping[str, Sequence[str]],
            env: Mapping[str, str], cwd: str, mounts: Sequence[tuple[Path, str, bool]],
            timeout: float = 600) -> dict[str, Outcome]:
    """One job in a fresh container: pybuild set up from the wheel (tests/containers.py's PRELUDE), then each
    command in ``cwd`` with only ``env`` as its environment, stopping at the first that fails, as CI runners do.
    Returns the outcome of each command that ran, by name."""
    out = workdir / "out"
    out.mkdir(parents=True)
    environment = shlex.join(["env", "-i", *(f"{key}={value}" for key, value in env.items())])
    script = [PRELUDE]
    for number, argv in enumerate(commands.values()):
        result = f"/out/{number}"
        script.append(f"cd {shlex.quote(cwd)} && {environment} {shlex.join(argv)} > {result}.out 2> {result}.err; "
                      f"echo $? > {result}.rc")
        script.append(f'[ "$(cat {result}.rc)" = 0 ] || exit 0')
    harness = [(Path("/usr"), "/usr", False), (wheel.parent, "/wheels", False), (HOST_SITE_PACKAGES, "/deps", False),
               (out, "/out", True)]
    done = engine.run_script("\n".join(script) + "\n", [*harness, *mounts], workdir, timeout)
    assert done.returncode == 0, f"{engine.name}: setting pybuild up failed ({done.returncode})\n{done.stderr}"
    outcomes = {}
    for number, name in enumerate(commands):
        rc = out / f"{number}.rc"
        if rc.is_file():
            outcomes[name] = Outcome(int(rc.read_text()), (out / f"{number}.out").read_text(errors="replace"),
                                     (out / f"{number}.err").read_text(errors="replace"))
    return outcomes


def empty_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# --- the application repository ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Repository:
    """The application a job builds: a git repository with one commit on ``BRANCH``, made at ``COMMIT_DATE``."""

    path: Path
    sha: str
    short_sha: str

    @property
    def timestamp(self) -> str:
        """The commit's time in ISO 8601, as GitLab's CI_COMMIT_TIMESTAMP gives it."""
        return git(self.path, "log", "-1", "--format=%cI")


def git(path: Path, *args: str) -> str:
    environment = {"PATH": DEBIAN_PATH, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
                   "GIT_AUTHOR_NAME": "CI Test", "GIT_AUTHOR_EMAIL": "ci@example.com", "GIT_AUTHOR_DATE": COMMIT_DATE,
                   "GIT_COMMITTER_NAME": "CI Test", "GIT_COMMITTER_EMAIL": "ci@example.com",
                   "GIT_COMMITTER_DATE": COMMIT_DATE}
    return run(["git", "-C", path, *args], env=environment).stdout.strip()


def commit_all(path: Path, message: str) -> Repository:
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message)
    return Repository(path, git(path, "rev-parse", "HEAD"), git(path, "rev-parse", "--short", "HEAD"))


def make_repository(path: Path, base: str) -> Repository:
    path.mkdir(parents=True)
    for name, text in APP_FILES.items():
        (path / name).write_text(text.format(base=base))
    git(path, "init", "-q", "-b", BRANCH)
    return commit_all(path, "the application")


def first_line_of(text: str, prefix: str) -> int:
    return next(number for number, line in enumerate(text.splitlines(), 1) if line.startswith(prefix))


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox-base built from examples/base on the host, saved to seed each recipe's registry with."""
    return saved_base(tmp_path_factory, "skopeo", "docker-registry", "htpasswd", "git")


@contextlib.contextmanager
def registry_with_base(directory: Path, base_archive: Path,
                       auth: str | None = "basic") -> Iterator[tuple[Registry, str]]:
    """A registry of the recipe's own (basic auth unless ``auth`` is None), holding the base image to build FROM."""
    with Registry(directory, auth=auth) as registry:
        base = registry.ref("base/busybox", "1")
        seed_zstd_oci(registry, base_archive, base)
        yield registry, base


@pytest.fixture(scope="module")
def docker_job_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """`docker run` with Docker's defaults, on the host's network (to reach the registry): a CI job's container."""
    workdir = tmp_path_factory.mktemp("docker-userland")
    with docker_daemon() as daemon:
        image = daemon.import_rootfs(make_rootfs(workdir / "rootfs"), "pybuild-ci-recipes:latest")
        yield DockerEngine(daemon, image, network="host")


# --- GitLab CI: the Docker executor ------------------------------------------------------------------------------

GITLAB_PROJECT = "group/app"
GITLAB_PROJECT_DIR = f"/builds/{GITLAB_PROJECT}"


@dataclass(frozen=True)
class GitLabRuns:
    registry: Registry
    repository: Repository
    runs: list[Outcome]  # the job, run by two runners one after the other

    @property
    def image(self) -> str:
        return f"{self.registry.host}/{GITLAB_PROJECT}"


def run_gitlab_job(engine: DockerEngine, wheel: Path, workdir: Path, registry: Registry,
                   repository: Repository) -> Outcome:
    """before_script and script as one bash script (as the runner joins them), in a copy of the checkout."""
    job = gitlab_job(recipe(GITLAB))
    script = "".join(without_installs(gitlab_scripts(recipe(GITLAB))))
    (workdir / "job").mkdir(parents=True)
    (workdir / "job" / "script.sh").write_text("set -eo pipefail\n" + script)
    checkout = workdir / "checkout"
    shutil.copytree(repository.path, checkout, symlinks=True)
    env = {
        "PATH": DEBIAN_PATH, "HOME": "/root", "CI": "true", "GITLAB_CI": "true",
        "CI_PROJECT_DIR": GITLAB_PROJECT_DIR, "CI_PROJECT_PATH": GITLAB_PROJECT,
        "CI_REGISTRY": registry.host, "CI_REGISTRY_USER": USER, "CI_REGISTRY_PASSWORD": PASSWORD,
        "CI_REGISTRY_IMAGE": f"{registry.host}/{GITLAB_PROJECT}",
        "CI_COMMIT_SHA": repository.sha, "CI_COMMIT_SHORT_SHA": repository.short_sha,
        "CI_COMMIT_REF_NAME": GITLAB_REF, "CI_COMMIT_REF_SLUG": GITLAB_REF_SLUG,
        "CI_COMMIT_TIMESTAMP": repository.timestamp,
        **{name: str(value) for name, value in job.get("variables", {}).items()},
    }
    mounts = [(workdir / "job", "/job", False), (checkout, GITLAB_PROJECT_DIR, True),
              (empty_dir(workdir / "store"), GUEST_STORE, True)]
    outcomes = run_job(engine, wheel, workdir, {"job": ["bash", "/job/script.sh"]}, env, GITLAB_PROJECT_DIR, mounts)
    return outcomes["job"]


@pytest.fixture(scope="module")
def gitlab(docker_job_engine: DockerEngine, wheel: Path, base_archive: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitLabRuns]:
    """The GitLab job run twice, for the same commit, each time in a fresh container with an empty store."""
    top = tmp_path_factory.mktemp("gitlab")
    with registry_with_base(top / "registry", base_archive) as (registry, base):
        repository = make_repository(top / "repository", base)
        runs = [run_gitlab_job(docker_job_engine, wheel, top / f"runner-{number}", registry, repository)
                for number in (1, 2)]
        yield GitLabRuns(registry, repository, runs)


@pytest.mark.slow
def test_gitlab_job_pushes_the_commit_and_branch_tags(gitlab: GitLabRuns) -> None:
    """CI_COMMIT_SHA and CI_COMMIT_REF_SLUG name the same image, made at the commit's time, the RUN's output in it."""
    first = succeeded(gitlab.runs[0])
    assert first.isolation_kind == ISOLATION["docker"], first.stderr
    sha_ref = f"{gitlab.image}:{gitlab.repository.sha}"
    slug_ref = f"{gitlab.image}:{GITLAB_REF_SLUG}"
    assert set(pushed(first.stderr)) == {sha_ref, slug_ref}, first.stderr
    assert inspect(gitlab.registry, sha_ref).digest == inspect(gitlab.registry, slug_ref).digest
    config = inspect_config(gitlab.registry, sha_ref)
    assert config["created"] == COMMIT_CREATED, "SOURCE_DATE_EPOCH comes from CI_COMMIT_TIMESTAMP"
    assert config["config"]["Cmd"] == ["greet"]
    archive = gitlab.registry.directory / "pulled.tar"
    run(["skopeo", "copy", "-q", *gitlab.registry.skopeo_auth("src"), f"docker://{sha_ref}",
         f"oci-archive:{archive}"])
    assert BUILT_GREETING in archive_bytes(archive), "the RUN step's output is in the pushed layers"


@pytest.mark.slow
def test_gitlab_second_runner_takes_its_steps_from_the_registry_cache(gitlab: GitLabRuns) -> None:
    """The first runner finds no cache and builds every step; the second, with an empty store, hits every one
    through --cache-from, so all it had was the registry."""
    first, second = (succeeded(outcome) for outcome in gitlab.runs)
    cache_missing = f"--cache-from type=registry,ref={gitlab.image}:buildcache: no cache there yet"
    assert cache_missing in first.stderr, first.stderr
    assert cache_missing not in second.stderr, second.stderr
    steps = built_steps(first.stderr)
    assert len(steps) == 3 and set(steps.values()) == {"DONE"}, first.stderr
    assert built_steps(second.stderr) == dict.fromkeys(steps, "CACHED"), second.stderr
    assert exists(gitlab.registry, f"{gitlab.image}:buildcache")


@pytest.mark.slow
def test_gitlab_runners_push_the_same_digest(gitlab: GitLabRuns) -> None:
    """Built from the registry cache or not, the same commit is the same image, byte for byte."""
    first, second = (pushed(succeeded(outcome).stderr) for outcome in gitlab.runs)
    assert first == second and len(set(first.values())) == 1, (first, second)
    assert inspect(gitlab.registry, f"{gitlab.image}:{gitlab.repository.sha}").digest == next(iter(first.values()))


# --- GitHub Actions: a container job ------------------------------------------------------------------------------

GITHUB_REPOSITORY = "Group/App"  # the image name is this, lowercased by the recipe
GITHUB_WORKSPACE = "/__w/App/App"  # where the runner mounts the checkout in a container job
GITHUB_HOME = "/github/home"


@dataclass(frozen=True)
class GitHubRun:
    repository: Repository
    steps: dict[str, Outcome]  # by step name, the steps that ran, in order
    build_step: str  # the step that runs `$PYBUILD build`

    @property
    def build(self) -> Outcome:
        return self.steps[self.build_step]


def run_github_job(engine: DockerEngine, wheel: Path, workdir: Path, registry: Registry, repository: Repository,
                   event: str = "push") -> GitHubRun:
    """The job on ``event``: its run: steps, each a script of its own that GitHub's default shell (`bash -e`) runs
    in the workspace with the job's env and GitHub's variables. actions/checkout is the repository copied in as the
    workspace; a step left empty once its install lines are dropped, or whose if: is false, does not run."""
    job = github_job(recipe(GITHUB))
    context = {"github.event_name": event, "github.repository": GITHUB_REPOSITORY, "github.actor": USER,
               "github.sha": repository.sha, "secrets.GITHUB_TOKEN": PASSWORD}
    ref = f"refs/heads/{BRANCH}" if event == "push" else "refs/pull/1/merge"
    env = {
        "PATH": DEBIAN_PATH, "HOME": GITHUB_HOME, "CI": "true", "GITHUB_ACTIONS": "true",
        "GITHUB_WORKSPACE": GITHUB_WORKSPACE, "GITHUB_REPOSITORY": GITHUB_REPOSITORY, "GITHUB_ACTOR": USER,
        "GITHUB_SHA": repository.sha, "GITHUB_EVENT_NAME": event, "GITHUB_REF": ref,
        **{name: substitute_github(str(value), context, registry.host) for name, value in job["env"].items()},
    }
    run_steps = [step for step in job["steps"] if "run" in step]
    scripts = dict(zip([step["name"] for step in run_steps], without_installs(github_scripts(recipe(GITHUB))),
                       strict=True))
    for step in job["steps"]:
        assert "run" in step or step["uses"].startswith("actions/checkout@"), f"the test is checkout only: {step}"
    temp = empty_dir(workdir / "temp")
    commands = {}
    for step in run_steps:
        if scripts[step["name"]].strip() and ("if" not in step or github_condition(step["if"], context)):
            script = f"{len(commands)}.sh"
            (temp / script).write_text(substitute_github(scripts[step["name"]], context, registry.host))
            commands[step["name"]] = ["bash", "-e", f"/__w/_temp/{script}"]
    (build_step,) = [name for name, script in scripts.items() if "$PYBUILD build " in script]
    workspace = workdir / "workspace"
    shutil.copytree(repository.path, workspace, symlinks=True)
    mounts = [(temp, "/__w/_temp", False), (workspace, GITHUB_WORKSPACE, True),
              (empty_dir(workdir / "home"), GITHUB_HOME, True), (empty_dir(workdir / "store"), GUEST_STORE, True)]
    return GitHubRun(repository, run_job(engine, wheel, workdir, commands, env, GITHUB_WORKSPACE, mounts), build_step)


@dataclass(frozen=True)
class GitHubRuns:
    registry: Registry  # ghcr.io: basic auth, as a package that is private (GHCR's default for a new one) asks
    passing: GitHubRun
    failing: GitHubRun  # a later commit whose Dockerfile has a RUN that fails
    failing_run_line: int
    pull_request: GitHubRun  # a later commit, built for a pull request

    @property
    def image(self) -> str:
        return f"{self.registry.host}/{GITHUB_REPOSITORY.lower()}"


@pytest.fixture(scope="module")
def github(docker_job_engine: DockerEngine, wheel: Path, base_archive: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHubRuns]:
    """Three runs of the job: a push to main, a push of a commit whose RUN fails, and a pull request. The base image
    comes from a registry without auth, as Docker Hub's would: the pull request's run has no login."""
    top = tmp_path_factory.mktemp("github")
    with registry_with_base(top / "hub", base_archive, auth=None) as (_, base), \
            Registry(top / "ghcr", auth="basic") as registry:
        repository = make_repository(top / "repository", base)
        passing = run_github_job(docker_job_engine, wheel, top / "passing", registry, repository)
        broken = top / "broken"
        shutil.copytree(repository.path, broken, symlinks=True)
        dockerfile = FAILING_DOCKERFILE.format(base=base)
        (broken / "Dockerfile").write_text(dockerfile)
        failing = run_github_job(docker_job_engine, wheel, top / "failing", registry,
                                 commit_all(broken, "a RUN that fails"))
        proposed = top / "proposed"
        shutil.copytree(repository.path, proposed, symlinks=True)
        (proposed / "CHANGES").write_text("a change for review\n")
        pull_request = run_github_job(docker_job_engine, wheel, top / "pull-request", registry,
                                      commit_all(proposed, "a change for review"), event="pull_request")
        yield GitHubRuns(registry, passing, failing, first_line_of(dockerfile, "RUN test -f"), pull_request)


@pytest.mark.slow
def test_github_job_pushes_the_lowercased_image(github: GitHubRuns) -> None:
    """On push: login, then the build pushes github.sha and latest to ghcr.io/<owner/repo, lowercased>."""
    run = github.passing
    login, build = (succeeded(outcome) for outcome in run.steps.values())  # the install step is all installs
    assert "Login Succeeded" in login.stdout, str(login)
    assert build.stderr.splitlines()[0] == build.isolation, "pybuild's first line says how RUN steps are isolated"
    assert build.isolation_kind == ISOLATION["docker"], build.stderr
    sha_ref = f"{github.image}:{run.repository.sha}"
    latest_ref = f"{github.image}:latest"
    digests = pushed(build.stderr)
    assert set(digests) == {sha_ref, latest_ref}, build.stderr
    assert inspect(github.registry, sha_ref).digest == inspect(github.registry, latest_ref).digest == digests[sha_ref]
    assert inspect_config(github.registry, sha_ref)["created"] == COMMIT_CREATED, "SOURCE_DATE_EPOCH is git's %ct"
    assert exists(github.registry, f"{github.image}:buildcache")


@pytest.mark.slow
def test_github_job_annotates_the_failing_run_line(github: GitHubRuns) -> None:
    """A RUN that fails is a workflow command on the Dockerfile's line (relative to the workspace), and nothing is
    pushed for that commit."""
    build = github.failing.build
    assert build.returncode != 0, str(build)
    assert "Traceback (most recent call last)" not in build.stderr, build.stderr
    annotations = [line for line in build.stdout.splitlines() if line.startswith("::error ")]
    assert len(annotations) == 1, build.stdout
    assert annotations[0].startswith(f"::error file=Dockerfile,line={github.failing_run_line},"), annotations
    assert not exists(github.registry, f"{github.image}:{github.failing.repository.sha}")


@pytest.mark.slow
def test_github_pull_request_builds_and_pushes_nothing(github: GitHubRuns) -> None:
    """The workflow runs on pull_request too: there the build, which still reads the cache (--cache-from) in the
    repository's package, must succeed without pushing. The package is private (GHCR's default for a new one), as
    the registry's basic auth makes it here."""
    run = github.pull_request
    for outcome in run.steps.values():
        succeeded(outcome)
    assert pushed(run.build.stderr) == {}, run.build.stderr
    assert not exists(github.registry, f"{github.image}:{run.repository.sha}")


# --- Kubernetes: a Job's pod ---------------------------------------------------------------------------------------

KUBERNETES_IMAGE = "team/app"
BARE_REPOSITORY = "/srv/git/app.git"


@dataclass(frozen=True)
class KubernetesRun:
    registry: Registry
    repository: Repository
    outcome: Outcome
    volumes: dict[str, Path]  # each volume the pod mounts, by name: the host directory it was


def pod_volumes(workdir: Path, pod: dict, container: dict, registry: Registry) -> tuple[list, dict[str, Path]]:
    """The pod's volumes as mounts: the registry-login Secret a directory with config.json (docker's format, as
    ``kubectl create secret generic --from-file=config.json`` makes it), an emptyDir an empty directory."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts, made = [], {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        directory = empty_dir(workdir / "volumes" / mount["name"])
        if "secret" in volume:
            assert volume["secret"]["secretName"] == "registry-login", volume
            auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            (directory / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
        else:
            assert volume == {"name": mount["name"], "emptyDir": {}}, f"the test knows no such volume: {volume}"
        mounts.append((directory, mount["mountPath"], not mount.get("readOnly", False)))
        made[mount["name"]] = directory
    return mounts, made


@pytest.fixture(scope="module")
def kubernetes(wheel: Path, base_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubernetesRun]:
    """The Job's container as podman runs a pod: its command and args, its env with REPOSITORY (a bare repository
    made from the test's), REVISION and IMAGE set, its volumes, and no privilege escalation when it says so."""
    top = tmp_path_factory.mktemp("kubernetes")
    document = recipe(KUBERNETES)
    pod = document["spec"]["template"]["spec"]
    container = kubernetes_container(document)
    (script,) = without_installs(kubernetes_scripts(document))
    with registry_with_base(top / "registry", base_archive) as (registry, base):
        repository = make_repository(top / "repository", base)
        bare = top / "app.git"
        run(["git", "clone", "-q", "--bare", repository.path, bare])
        env = {"PATH": DEBIAN_PATH, "HOME": "/root", **{item["name"]: item["value"] for item in container["env"]}}
        replaced = {"REPOSITORY": f"file://{BARE_REPOSITORY}", "REVISION": BRANCH,
                    "IMAGE": f"{registry.host}/{KUBERNETES_IMAGE}"}
        assert set(replaced) <= set(env), container["env"]
        env.update(replaced)
        mounts, volumes = pod_volumes(top, pod, container, registry)
        security = container.get("securityContext", {})
        options = ("--security-opt", "no-new-privileges") if security.get("allowPrivilegeEscalation") is False else ()
        with podman_engine(*options, network="host") as engine:
            outcomes = run_job(engine, wheel, top, {"pod": [*container["command"], script]}, env, "/",
                               [(bare, BARE_REPOSITORY, False), *mounts])
        yield KubernetesRun(registry, repository, outcomes["pod"], volumes)


@pytest.mark.slow
def test_kubernetes_job_pushes_the_short_commit_tag(kubernetes: KubernetesRun) -> None:
    """The pod clones REVISION of REPOSITORY and pushes IMAGE:<short commit>, logged in by the Secret's config.json."""
    outcome = succeeded(kubernetes.outcome)
    assert outcome.isolation_kind == ISOLATION["podman"], outcome.stderr
    image = f"{kubernetes.registry.host}/{KUBERNETES_IMAGE}"
    ref = f"{image}:{kubernetes.repository.short_sha}"
    assert list(pushed(outcome.stderr)) == [ref], outcome.stderr
    assert inspect(kubernetes.registry, ref).digest == pushed(outcome.stderr)[ref]
    assert inspect_config(kubernetes.registry, ref)["created"] == COMMIT_CREATED, "SOURCE_DATE_EPOCH is git's %ct"
    assert exists(kubernetes.registry, f"{image}:buildcache")


@pytest.mark.slow
def test_kubernetes_store_is_on_its_volume(kubernetes: KubernetesRun) -> None:
    """pybuild's store is on the volume the recipe mounts for it, not in the container's writable layer."""
    succeeded(kubernetes.outcome)
    assert (kubernetes.volumes["store"] / "index.json").is_file()
    assert any((kubernetes.volumes["store"] / "blobs" / "sha256").iterdir())


# --- the recipes as files ---------------------------------------------------------------------------------------

PRIVILEGED_TEXT = re.compile(r"--privileged|--cap-add|\bdind\b|docker:[\w.-]*dind")


def scalars(node: object, key: str = "") -> Iterator[tuple[str, object]]:
    """Every (key, value) pair of a parsed document, depth first; list items carry their list's key."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield str(name), value
            yield from scalars(value, str(name))
    elif isinstance(node, list):
        for item in node:
            yield key, item
            yield from scalars(item, key)


@pytest.mark.parametrize("name", [GITHUB, GITLAB, KUBERNETES])
def test_recipe_pushes_and_shares_its_cache_without_privileges(name: str) -> None:
    """Parsed (comments aside): it pushes, reads and writes the layer cache in the registry, and asks for no
    privileged mode, added capability or Docker-in-Docker service."""
    document = recipe(name)
    commands = " ".join(without_installs(SCRIPTS[name](document)))
    assert re.search(r"--push\b", commands), commands
    assert re.search(r'--cache-from "type=registry,ref=[^",]+:buildcache"', commands), commands
    assert re.search(r'--cache-to "type=registry,ref=[^",]+:buildcache,mode=max"', commands), commands
    for key, value in scalars(document):
        assert not (key.lower() == "privileged" and value), f"{name}: {key}: {value}"
        assert key.lower() not in ("cap_add", "add"), f"{name}: {key}: {value}"  # compose's and securityContext's
        assert not (isinstance(value, str) and PRIVILEGED_TEXT.search(value)), f"{name}: {key}: {value}"
        assert not (key == "services" and value), f"{name}: a service container ({value})"


@pytest.mark.parametrize("name", [GITHUB, GITLAB, KUBERNETES])
def test_recipe_installs_what_its_commands_run(name: str) -> None:
    """The install lines the slow tests drop name what the rest needs on a bare debian:12: git where it runs git,
    certificates for an HTTPS registry, python3-venv for the venv."""
    scripts = SCRIPTS[name](recipe(name))
    packages = installed_packages(scripts)
    assert {"ca-certificates", "python3-venv"} <= packages, packages
    uses_git = any(re.search(r"(^|[\s;&|(])git\s", script, re.MULTILINE) for script in without_installs(scripts))
    assert ("git" in packages) == uses_git, (packages, uses_git)


def test_readme_links_every_recipe() -> None:
    readme = (REPO / "README.md").read_text()
    recipes = sorted(path.name for path in RECIPES.iterdir())
    assert recipes == sorted([GITHUB, GITLAB, KUBERNETES])
    for name in recipes:
        assert f"](examples/ci/{name})" in readme, name
