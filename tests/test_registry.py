"""pybuild's registry client (pull, push, login) against real registries: Distribution's docker-registry on
loopback, plain, HTTPS with a throwaway CA, behind basic auth and behind Bearer tokens, and a proxy in front of
one that drops connections, throttles and corrupts blobs. What pybuild pushes is read back by skopeo and podman;
what it pulls was put there by skopeo. The registries are the module's; each test uses repositories of its own.

The ``fixture`` tests at the top check the registries, the proxy and the seeded images with skopeo and curl only,
so that a failure below is pybuild's and not the harness's.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import skip_if_chrooted
from e2e import PYBUILD, Podman, read_oci_archive, run, saved_base
from registry import (
    HOST_ARCH,
    MEDIA_DOCKER_LAYER,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_LAYER_GZIP,
    MEDIA_LAYER_ZSTD,
    MEDIA_OCI_INDEX,
    OTHER_ARCH,
    PASSWORD,
    USER,
    Client,
    FaultProxy,
    Registry,
    credential_helper,
    curl,
    exists,
    inspect,
    inspect_config,
    multi_platform_layout,
    pull_digest,
    push_digest,
    require_registry_tools,
    seed,
    seed_docker_v2s2,
    seed_gzip_oci,
    seed_multi_platform,
    seed_zstd_oci,
    sha256_digest,
)
from test_as_users import LOGIN_PATH, User, installed, login_users  # noqa: F401 - fixtures used by name

pytestmark = pytest.mark.slow

BUSYBOX_SHA256 = sha256_digest(Path("/bin/busybox").read_bytes()).removeprefix("sha256:") \
    if Path("/bin/busybox").is_file() else ""
APP = """\
FROM busybox-base
RUN echo "hello from {name}" > /hello.txt
CMD ["cat", "/hello.txt"]
"""


def unique(prefix: str) -> str:
    """A repository name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox-base (zstd layers, as pybuild writes them) saved as an OCI archive."""
    require_registry_tools()
    return saved_base(tmp_path_factory, "skopeo", "docker-registry")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry-plain")) as registry:
        yield registry


@pytest.fixture(scope="module")
def module_proxy(plain: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(plain) as proxy:
        yield proxy


@pytest.fixture
def proxy(module_proxy: FaultProxy) -> FaultProxy:
    """The proxy in front of ``plain``, its log empty and no fault pending."""
    module_proxy.reset()
    return module_proxy


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """HTTPS; clients name it localhost:PORT (its certificate also names this machine's host name)."""
    with Registry(tmp_path_factory.mktemp("registry-tls"), tls=True, hostname="localhost",
                  extra_names=(socket.gethostname(),)) as registry:
        yield registry


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry-basic"), auth="basic") as registry:
        yield registry


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry-token"), auth="token") as registry:
        yield registry


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry of the test's own, which it may stop and start."""
    with Registry(tmp_path / "own-registry") as registry:
        yield registry


SEEDS = ("gzip", "v2s2", "zstd", "index")


@pytest.fixture(scope="module")
def seeded(plain: Registry, base_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """Images skopeo put into ``plain``: kind -> (repository:tag, manifest digest).

    gzip: OCI with gzip layers; v2s2: Docker schema 2 (gzip); zstd: OCI with zstd layers; index: an OCI index of
    this machine's image and another architecture's.
    """
    out = {}
    for kind, seeder in (("gzip", seed_gzip_oci), ("v2s2", seed_docker_v2s2), ("zstd", seed_zstd_oci)):
        path = f"seeded/{kind}:1"
        out[kind] = (path, seeder(plain, base_archive, f"{plain.host}/{path}"))
    multi = multi_platform_layout(base_archive, tmp_path_factory.mktemp("multi"))
    out["index"] = ("seeded/index:1", seed_multi_platform(plain, multi, f"{plain.host}/seeded/index:1"))
    assert out["index"][1] == multi.index_digest
    return out


@pytest.fixture(scope="module")
def basic_seeded(basic: Registry, base_archive: Path) -> tuple[str, str]:
    return "auth/busybox:1", seed_gzip_oci(basic, base_archive, basic.ref("auth/busybox", "1"))


@pytest.fixture
def client(tmp_path: Path) -> Client:
    """pybuild with an empty store and an empty Docker config directory of the test's own."""
    (tmp_path / "docker-config").mkdir()
    return Client(tmp_path / "store", tmp_path / "docker-config")


@pytest.fixture
def builder(tmp_path: Path, base_archive: Path) -> Client:
    """pybuild whose store holds busybox-base (loaded, not pulled)."""
    (tmp_path / "builder-config").mkdir()
    made = Client(tmp_path / "builder-store", tmp_path / "builder-config")
    made.run("load", "-i", base_archive)
    return made


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    require_registry_tools("podman")
    return Podman(tmp_path_factory.mktemp("podman"))


def app_context(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(APP.format(name=name))
    return directory


def from_context(directory: Path, base: str, run_line: str = "RUN echo built > /built") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(f"FROM {base}\n{run_line}\n")
    return directory


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pybuild: error")]


def assert_one_error(done: subprocess.CompletedProcess[str]) -> str:
    """A failed command: non-zero, one ``pybuild: error:`` line (a ``hint:`` may follow); returns it."""
    assert done.returncode != 0, done.stdout + done.stderr
    found = errors(done.stderr)
    assert len(found) == 1, done.stderr
    return found[0]


def assert_same_image(client: Client, name: str, registry: Registry, ref: str, workdir: Path | None = None) -> None:
    """The stored image has the registry's layers (diff_ids) and, saved and unpacked by umoci, busybox's bytes."""
    stored = json.loads(client.run("inspect", name).stdout)
    remote = inspect_config(registry, ref)
    assert stored["rootfs"]["diff_ids"] == remote["rootfs"]["diff_ids"]
    assert stored["architecture"] == remote["architecture"]
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        client.run("save", "-o", workdir / "saved.tar", name)
        image = read_oci_archive(workdir / "saved.tar", workdir / "read")
        assert image.files["/bin/busybox"].sha256 == BUSYBOX_SHA256


# --- the fixtures themselves, with skopeo and curl only -------------------------------------------------------------


def test_fixture_plain_registry_serves_seeded_images(plain: Registry, seeded) -> None:
    assert curl(plain, "/v2/").stdout == "200"
    gzip_image = inspect(plain, f"{plain.host}/{seeded['gzip'][0]}")
    assert gzip_image.digest == seeded["gzip"][1]
    assert set(gzip_image.layer_types) == {MEDIA_LAYER_GZIP}
    v2s2 = inspect(plain, f"{plain.host}/{seeded['v2s2'][0]}")
    assert (v2s2.digest, v2s2.media_type) == (seeded["v2s2"][1], MEDIA_DOCKER_MANIFEST)
    assert set(v2s2.layer_types) == {MEDIA_DOCKER_LAYER}
    zstd = inspect(plain, f"{plain.host}/{seeded['zstd'][0]}")  # skopeo 1.9 writes zstd layers
    assert zstd.digest == seeded["zstd"][1] and set(zstd.layer_types) == {MEDIA_LAYER_ZSTD}
    index = inspect(plain, f"{plain.host}/{seeded['index'][0]}")
    assert (index.digest, index.media_type) == (seeded["index"][1], MEDIA_OCI_INDEX)
    platforms = [entry["platform"]["architecture"] for entry in index.manifest["manifests"]]
    assert platforms == [HOST_ARCH, OTHER_ARCH]
    for entry in index.manifest["manifests"]:
        config = inspect_config(plain, f"{plain.host}/seeded/index@{entry['digest']}")
        assert config["architecture"] == entry["platform"]["architecture"]
    # the same layers under every kind: a test may compare what pybuild stored by diff_ids
    diff_ids = {kind: inspect_config(plain, f"{plain.host}/{seeded[kind][0]}")["rootfs"]["diff_ids"] for kind in SEEDS}
    assert len({json.dumps(value) for value in diff_ids.values()}) == 1


def test_fixture_tls_registry_needs_its_ca(tls: Registry, base_archive: Path) -> None:
    seed_gzip_oci(tls, base_archive, tls.ref("tls/busybox", "1"))
    assert curl(tls, "/v2/").stdout == "200"  # with --cacert
    for url in (f"https://localhost:{tls.port}/v2/", f"https://127.0.0.1:{tls.port}/v2/"):
        assert run(["curl", "-sS", "-o", "/dev/null", "--cacert", tls.ca, url], check=False).returncode == 0
        untrusted = run(["curl", "-sS", "-o", "/dev/null", url], check=False)
        assert untrusted.returncode == 60 and "certificate" in untrusted.stderr, untrusted.stderr
    plain_http = run(["curl", "-sS", f"http://localhost:{tls.port}/v2/"], check=False)
    assert "HTTP request to an HTTPS server" in plain_http.stdout
    trusted = run(["skopeo", "inspect", "--raw", f"docker://{tls.ref('tls/busybox', '1')}"], check=False,
                  env={**os.environ, "SSL_CERT_FILE": str(tls.ca)})
    assert trusted.returncode == 0, trusted.stderr


def test_fixture_basic_auth_registry(basic: Registry, basic_seeded) -> None:
    status, headers, _ = basic.request("GET", "/v2/")
    assert status == 401 and headers["www-authenticate"].startswith("Basic realm=")
    assert basic.request("GET", "/v2/", credentials=(USER, PASSWORD))[0] == 200
    assert basic.request("GET", "/v2/", credentials=(USER, "wrong"))[0] == 401
    assert inspect(basic, basic.ref(*basic_seeded[0].split(":"))).digest == basic_seeded[1]


def test_fixture_token_registry(token: Registry, base_archive: Path) -> None:
    tokens = token.tokens
    status, headers, _ = token.request("GET", "/v2/")
    assert status == 401
    challenge = headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and f'realm="{tokens.realm}"' in challenge, challenge
    tokens.reset()
    url = f"{tokens.realm}?service={tokens.service}&scope=repository:fixture/app:pull,push"
    answer = json.loads(run(["curl", "-sS", "-u", f"{USER}:{PASSWORD}", url]).stdout)
    assert answer["expires_in"] == 300 and answer["token"].count(".") == 2
    header = json.loads(base64.urlsafe_b64decode(answer["token"].split(".")[0] + "=="))
    assert header["alg"] == "RS256" and len(header["x5c"]) == 1
    bearer = {"Authorization": f"Bearer {answer['token']}"}
    assert token.request("GET", "/v2/", headers=bearer)[0] == 200
    # the token grants that repository only
    assert token.request("HEAD", "/v2/fixture/app/manifests/1", headers=bearer)[0] == 404  # allowed, absent
    assert token.request("HEAD", "/v2/fixture/other/manifests/1", headers=bearer)[0] == 401
    wrong = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-u", f"{USER}:wrong", url])
    assert wrong.stdout == "401"
    assert tokens.issued == 1 and tokens.scopes == ["repository:fixture/app:pull,push"] * 2
    # skopeo, a client that knows the protocol, pushes and reads with it
    seed_gzip_oci(token, base_archive, token.ref("fixture/app", "1"))
    assert exists(token, token.ref("fixture/app", "1"))
    assert tokens.issued > 1 and "repository:fixture/app:pull" in tokens.scopes


def test_fixture_proxy_forwards_and_logs(proxy: FaultProxy, plain: Registry, base_archive: Path) -> None:
    repository = unique("fixture/proxied")
    # skopeo pushes through it (chunked PATCH uploads, Location headers) and reads back through it
    digest = seed(plain, f"oci-archive:{base_archive}", proxy.ref(repository, "1"))
    assert inspect(plain, proxy.ref(repository, "1")).digest == digest
    assert inspect(plain, plain.ref(repository, "1")).digest == digest
    uploads = [entry for entry in proxy.requests("PUT") if entry.is_upload]
    assert uploads and all(entry.status == 201 for entry in uploads)
    for entry in uploads:
        uploaded = entry.params["digest"][0]
        heads = proxy.requests("HEAD", f"/blobs/{uploaded}$")
        assert heads and heads[0].at <= entry.at, (uploaded, proxy.requests())
    assert proxy.requests("PUT", "/manifests/1$")[0].status == 201
    # a Location header names the proxy, never the registry behind it
    status, headers, _ = plain.request("POST", f"/v2/{repository}/blobs/uploads/")
    assert status == 202
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("POST", f"/v2/{repository}/blobs/uploads/", body=b"", headers={"Host": proxy.host})
    response = connection.getresponse()
    response.read()
    connection.close()
    location = response.getheader("Location")
    assert response.status == 202 and location.startswith(f"http://{proxy.host}/v2/"), location
    # a chunked PATCH goes through whole
    data = b"chunked upload through the proxy\n" * 100
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("PATCH", location, body=iter([data[:1000], data[1000:]]), encode_chunked=True,
                       headers={"Content-Type": "application/octet-stream"})
    response = connection.getresponse()
    response.read()
    assert response.status == 202, response.status
    location = response.getheader("Location")
    separator = "&" if "?" in location else "?"
    connection.request("PUT", f"{location}{separator}digest={sha256_digest(data)}", body=b"")
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 201
    assert plain.request("GET", f"/v2/{repository}/blobs/{sha256_digest(data)}")[2] == data
    # a client trying HTTPS first is answered at once, as the registry itself answers it
    started = time.monotonic()
    assert run(["curl", "-sS", f"https://{proxy.host}/v2/"], check=False).returncode != 0
    assert time.monotonic() - started < 5
    assert proxy.counts()[("GET", "manifest")] >= 1


def test_fixture_proxy_faults(proxy: FaultProxy, plain: Registry, seeded, tmp_path: Path) -> None:
    path, _ = seeded["gzip"]
    manifest = inspect(plain, f"{plain.host}/{path}").manifest
    layer = max(manifest["layers"], key=lambda item: item["size"])
    repository = path.split(":")[0]
    url = f"{proxy.url}/v2/{repository}/blobs/{layer['digest']}"
    out = tmp_path / "blob"

    proxy.drop_next_blob_get(1000)
    cut = run(["curl", "-sS", "-o", out, url], check=False)
    assert cut.returncode == 18 and out.stat().st_size == 1000, cut.stderr  # 18: partial file
    run(["curl", "-sS", "-o", out, url])
    assert sha256_digest(out.read_bytes()) == layer["digest"]
    ranged = run(["curl", "-sS", "-r", "1000-", "-o", out, "-w", "%{http_code}", url])
    assert ranged.stdout == "206" and out.stat().st_size == layer["size"] - 1000

    proxy.throttle(1, "/blobs/")
    throttled = run(["curl", "-sS", "-i", "-o", "-", url], check=False)
    assert throttled.stdout.startswith("HTTP/1.1 429") and "Retry-After: 1" in throttled.stdout
    assert run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url]).stdout == "200"

    proxy.corrupt_blob(layer["digest"])
    run(["curl", "-sS", "-o", out, url])
    assert out.stat().st_size == layer["size"] and sha256_digest(out.read_bytes()) != layer["digest"]
    assert [entry.fault for entry in proxy.requests("GET")] == ["drop", "", "", "429", "", "corrupt"]


def test_fixture_registry_stops_mid_push_and_starts_again(own_registry: Registry, base_archive: Path) -> None:
    with FaultProxy(own_registry) as proxy:
        proxy.stop_registry_after_uploads(1)
        source = f"oci-archive:{base_archive}"
        failed = run(["skopeo", "copy", "-q", "--dest-tls-verify=false", source, f"docker://{proxy.ref('stop/app')}"],
                     check=False)
        assert failed.returncode != 0 and own_registry.process is None
        assert [entry.fault for entry in proxy.requests()].count("upstream-down") >= 1
        own_registry.start()
        digest = seed(own_registry, source, proxy.ref("stop/app"))
        assert inspect(own_registry, own_registry.ref("stop/app")).digest == digest


def test_fixture_podman_pulls_from_the_registry(podman: Podman, plain: Registry, seeded) -> None:
    skip_if_chrooted("podman")
    ref = f"{plain.host}/{seeded['gzip'][0]}"
    run(podman.command("pull", "-q", "--tls-verify=false", ref), timeout=300)
    assert podman.run(ref, "cat", "/etc/group").stdout.startswith("root:x:0:")


def test_fixture_credential_helper_answers(tmp_path: Path) -> None:
    log = credential_helper(tmp_path / "bin", "pbtest", USER, PASSWORD)
    done = subprocess.run([tmp_path / "bin" / "docker-credential-pbtest", "get"], input="127.0.0.1:5000",
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == {"ServerURL": "127.0.0.1:5000", "Username": USER, "Secret": PASSWORD}
    assert log.read_text() == "get 127.0.0.1:5000\n"


# --- pull ----------------------------------------------------------------------------------------------------------


def test_pull_prints_the_digest_stores_the_image_and_pulls_blobs_once(
        client: Client, proxy: FaultProxy, plain: Registry, seeded, tmp_path: Path) -> None:
    path, digest = seeded["gzip"]
    ref = f"{proxy.host}/{path}"
    done = client.run("pull", ref)
    assert pull_digest(done.stdout) == digest
    assert ref in client.image_names()
    assert_same_image(client, ref, plain, f"{plain.host}/{path}", tmp_path / "check")
    assert proxy.requests("GET", "/blobs/sha256:"), proxy.requests()

    proxy.reset()
    again = client.run("pull", ref)
    assert pull_digest(again.stdout) == digest
    assert proxy.requests(path="/manifests/"), "the second pull must ask the registry for the manifest again"
    assert not proxy.requests("GET", "/blobs/"), proxy.requests()


@pytest.mark.parametrize("kind", SEEDS)
def test_build_from_a_seeded_image(kind: str, client: Client, plain: Registry, seeded, tmp_path: Path) -> None:
    path, digest = seeded[kind]
    ref = f"{plain.host}/{path}"
    context = from_context(tmp_path / "ctx", ref, f"RUN echo built-on-{kind} > /built && ls /bin/busybox > /listed")
    out = tmp_path / "rootfs"
    name = f"built-{kind}:1"
    client.build(context, "-t", name, "-o", f"type=local,dest={out}")
    assert (out / "built").read_text() == f"built-on-{kind}\n"
    assert (out / "listed").read_text() == "/bin/busybox\n"
    assert sha256_digest((out / "bin" / "busybox").read_bytes()).removeprefix("sha256:") == BUSYBOX_SHA256
    built = json.loads(client.run("inspect", name).stdout)
    assert built["architecture"] == HOST_ARCH  # from an index: this machine's image was chosen
    remote = inspect_config(plain, ref)
    assert built["rootfs"]["diff_ids"][:-1] == remote["rootfs"]["diff_ids"]
    if kind == "index":
        pulled = client.run("pull", ref)
        assert pull_digest(pulled.stdout) == digest  # the index's digest, as docker prints it


def test_pull_of_another_platform_stores_it_and_a_build_refuses_it(
        client: Client, plain: Registry, seeded, tmp_path: Path) -> None:
    path, digest = seeded["index"]
    ref = f"{plain.host}/{path}"
    done = client.run("pull", "--platform", f"linux/{OTHER_ARCH}", ref)
    assert pull_digest(done.stdout) == digest
    assert json.loads(client.run("inspect", ref).stdout)["architecture"] == OTHER_ARCH
    built = client.build(from_context(tmp_path / "ctx", ref, "RUN true"), check=False)
    # a build's error names the Dockerfile line: FILE:LINE:COL: message
    assert built.returncode != 0
    assert re.search(rf"^\S*Dockerfile:1:\d+: .*linux/{OTHER_ARCH}", built.stderr, re.MULTILINE), built.stderr


def test_build_pulls_a_missing_base_once_and_again_only_with_pull(
        client: Client, proxy: FaultProxy, seeded, tmp_path: Path) -> None:
    ref = f"{proxy.host}/{seeded['gzip'][0]}"
    first = client.build(from_context(tmp_path / "one", ref))
    assert proxy.requests("GET", "/blobs/sha256:") and first.stderr.strip()
    assert ref in client.image_names()

    proxy.reset()
    client.build(from_context(tmp_path / "two", ref, "RUN echo second > /second"))
    assert proxy.requests() == [], "a stored base is used without asking the registry"

    client.build(from_context(tmp_path / "three", ref, "RUN echo third > /third"), "--pull")
    assert proxy.requests(path="/manifests/"), "--pull asks the registry for the manifest again"
    assert not proxy.requests("GET", "/blobs/"), "what the store holds is not downloaded again"


def test_from_a_digest_builds_offline_once_pulled(client: Client, own_registry: Registry, base_archive: Path,
                                                  tmp_path: Path) -> None:
    digest = seed_gzip_oci(own_registry, base_archive, own_registry.ref("offline/busybox", "1"))
    ref = f"{own_registry.host}/offline/busybox@{digest}"
    client.build(from_context(tmp_path / "online", ref))
    own_registry.stop()
    out = tmp_path / "out"
    client.build(from_context(tmp_path / "offline", ref, "RUN echo offline > /offline"), "-o",
                 f"type=local,dest={out}")
    assert (out / "offline").read_text() == "offline\n"


# --- push ----------------------------------------------------------------------------------------------------------


def test_push_round_trip_through_skopeo_and_podman(builder: Client, proxy: FaultProxy, plain: Registry,
                                                    podman: Podman, tmp_path: Path) -> None:
    repository = unique("push/app")
    ref = f"{proxy.host}/{repository}:1"
    copy_repository = unique("push/copy")
    builder.build(app_context(tmp_path / "ctx", repository), "-t", ref, "-t", f"{proxy.host}/{copy_repository}:1")
    done = builder.run("push", ref)
    digest, size = push_digest(done.stdout, "1")
    pushed = inspect(plain, plain.ref(repository, "1"))
    assert (pushed.digest, len(pushed.raw)) == (digest, size)
    assert set(pushed.layer_types) == {MEDIA_LAYER_ZSTD}
    # each blob uploaded was asked about first
    uploads = [entry for entry in proxy.requests("PUT") if entry.is_upload]
    assert len(uploads) == len(pushed.manifest["layers"]) + 1, proxy.requests()
    for entry in uploads:
        blob = entry.params["digest"][0]
        heads = proxy.requests("HEAD", f"/{re.escape(repository)}/blobs/{blob}$")
        assert heads and heads[0].at < entry.at, (blob, proxy.requests())
    assert proxy.requests("PUT", f"/{re.escape(repository)}/manifests/1$")[0].status == 201

    # podman pulls it from the registry and runs it
    skip_if_chrooted("podman")
    podman_ref = plain.ref(repository, "1")
    run(podman.command("pull", "-q", "--tls-verify=false", podman_ref), timeout=300)
    assert podman.run(podman_ref, "cat", "/hello.txt").stdout == f"hello from {repository}\n"


def test_second_push_skips_every_blob_and_another_repository_mounts(builder: Client, proxy: FaultProxy,
                                                                    plain: Registry, tmp_path: Path) -> None:
    repository, other = unique("again/app"), unique("again/other")
    ref, other_ref = f"{proxy.host}/{repository}:1", f"{proxy.host}/{other}:1"
    builder.build(app_context(tmp_path / "ctx", repository), "-t", ref, "-t", other_ref)
    digest, _ = push_digest(builder.run("push", ref).stdout, "1")

    proxy.reset()
    assert push_digest(builder.run("push", ref).stdout, "1")[0] == digest
    assert not [entry for entry in proxy.requests() if entry.is_upload], proxy.requests()
    assert not proxy.requests("GET", "/blobs/")
    assert len(proxy.requests("PUT", "/manifests/")) == 1, proxy.requests()

    proxy.reset()
    assert push_digest(builder.run("push", other_ref).stdout, "1")[0] == digest
    mounts = [entry for entry in proxy.requests("POST", f"^/v2/{re.escape(other)}/blobs/uploads/$")
              if "mount" in entry.params]
    assert mounts, proxy.requests()
    assert all(entry.params["from"] == [repository] and entry.status == 201 for entry in mounts), mounts
    layers = inspect(plain, plain.ref(other, "1")).manifest["layers"]
    assert {entry.params["mount"][0] for entry in mounts} >= {layer["digest"] for layer in layers}
    assert inspect(plain, plain.ref(other, "1")).digest == digest


def test_build_push_with_gzip_writes_the_digest_to_the_metadata_file(builder: Client, plain: Registry,
                                                                    tmp_path: Path) -> None:
    repository = unique("built/gzip")
    ref = plain.ref(repository, "1")
    metadata = tmp_path / "metadata.json"
    builder.build(app_context(tmp_path / "ctx", repository), "-t", ref, "--push", "--compression=gzip",
                  "--metadata-file", metadata)
    pushed = inspect(plain, ref)
    assert json.loads(metadata.read_text())["containerimage.digest"] == pushed.digest
    assert set(pushed.layer_types) == {MEDIA_LAYER_GZIP}


def test_build_output_type_registry_pushes_zstd(builder: Client, plain: Registry, tmp_path: Path) -> None:
    repository = unique("built/output")
    ref = plain.ref(repository, "2")
    builder.build(app_context(tmp_path / "ctx", repository), "-o", f"type=registry,name={ref}")
    pushed = inspect(plain, ref)
    assert set(pushed.layer_types) == {MEDIA_LAYER_ZSTD}
    assert len(pushed.layer_types) == 7  # busybox-base's six layers and the RUN's


# --- plain HTTP or HTTPS ---------------------------------------------------------------------------------------------


def test_https_registry_is_trusted_with_ssl_cert_file(client: Client, tls: Registry, base_archive: Path) -> None:
    digest = seed_gzip_oci(tls, base_archive, tls.ref("https/busybox", "1"))
    ref = tls.ref("https/busybox", "1")
    assert ref.startswith("localhost:")
    untrusted = client.run("pull", ref, check=False)
    assert_one_error(untrusted)
    assert "certificate" in untrusted.stderr.lower(), untrusted.stderr
    done = client.run("pull", ref, env={"SSL_CERT_FILE": str(tls.ca)})
    assert pull_digest(done.stdout) == digest
    assert ref in client.image_names()


def _loopback_host_name() -> str:
    """This machine's host name, where it resolves to a loopback address and is not localhost (Debian's
    /etc/hosts gives it 127.0.1.1): a registry pybuild must reach by HTTPS only."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        pytest.skip(f"the host name {name} does not resolve")
    if name == "localhost" or not address.startswith("127."):
        pytest.skip(f"the host name {name} is not a loopback name other than localhost ({address})")
    return name


def test_other_hosts_are_https_only_unless_insecure(client: Client, plain: Registry, tls: Registry,
                                                   base_archive: Path, seeded) -> None:
    name = _loopback_host_name()
    ref = f"{name}:{plain.port}/{seeded['gzip'][0]}"
    refused = client.run("pull", ref, check=False)  # plain HTTP, and the name is neither localhost nor 127.0.0.0/8
    assert_one_error(refused)
    assert ref not in client.image_names()
    assert not refused.stdout.strip(), refused.stdout
    done = client.run("pull", "--insecure-registry", f"{name}:{plain.port}", ref)
    assert pull_digest(done.stdout) == seeded["gzip"][1]
    # HTTPS to a name its certificate carries: trusted through SSL_CERT_FILE, refused naming the certificate without
    digest = seed_gzip_oci(tls, base_archive, tls.ref("https/by-name", "1"))
    secure = f"{name}:{tls.port}/https/by-name:1"
    untrusted = client.run("pull", secure, check=False)
    assert "certificate" in assert_one_error(untrusted).lower() or "certificate" in untrusted.stderr.lower()
    trusted = client.run("pull", secure, env={"SSL_CERT_FILE": str(tls.ca)})
    assert pull_digest(trusted.stdout) == digest


# --- login, credentials --------------------------------------------------------------------------------------------


def test_login_pull_logout_with_basic_auth(client: Client, basic: Registry, basic_seeded) -> None:
    path, digest = basic_seeded
    ref = f"{basic.host}/{path}"
    anonymous = client.run("pull", ref, check=False)
    assert_one_error(anonymous)

    wrong = client.run("login", basic.host, "-u", USER, "--password-stdin", input="not-the-password\n", check=False)
    message = assert_one_error(wrong)
    assert re.search("unauthorized|incorrect", message, re.IGNORECASE), wrong.stderr
    assert "not-the-password" not in wrong.stdout + wrong.stderr
    assert basic.host not in client.config_json().get("auths", {})

    done = client.run("login", basic.host, "-u", USER, "--password-stdin", input=PASSWORD + "\n")
    assert "Login Succeeded" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr
    config_file = client.docker_config / "config.json"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    auth = client.config_json()["auths"][basic.host]["auth"]
    assert base64.b64decode(auth).decode() == f"{USER}:{PASSWORD}"

    pulled = client.run("pull", ref)
    assert pull_digest(pulled.stdout) == digest
    assert PASSWORD not in pulled.stdout + pulled.stderr

    client.run("logout", basic.host)
    assert basic.host not in client.config_json().get("auths", {})
    assert_one_error(client.run("pull", f"{basic.host}/{path}", check=False))


def test_push_and_build_with_basic_auth(builder: Client, basic: Registry, tmp_path: Path) -> None:
    builder.run("login", basic.host, "-u", USER, "--password-stdin", input=PASSWORD)
    repository = unique("auth/app")
    ref = basic.ref(repository, "1")
    builder.build(app_context(tmp_path / "ctx", repository), "-t", ref, "--push")
    assert exists(basic, ref)
    # and a build FROM an image there pulls it with the same credentials
    fresh = Client(tmp_path / "fresh-store", builder.docker_config)
    out = tmp_path / "out"
    fresh.build(from_context(tmp_path / "from", ref, "RUN cat /hello.txt > /copied"), "-o", f"type=local,dest={out}")
    assert (out / "copied").read_text() == f"hello from {repository}\n"


def test_token_auth_login(client: Client, token: Registry) -> None:
    wrong = client.run("login", token.host, "-u", USER, "--password-stdin", input="wrong-pass", check=False)
    message = assert_one_error(wrong)
    assert re.search("unauthorized|incorrect", message, re.IGNORECASE), wrong.stderr
    assert "wrong-pass" not in wrong.stdout + wrong.stderr
    assert token.host not in client.config_json().get("auths", {})
    done = client.run("login", token.host, "-u", USER, "--password-stdin", input=PASSWORD)
    assert "Login Succeeded" in done.stdout
    assert base64.b64decode(client.config_json()["auths"][token.host]["auth"]).decode() == f"{USER}:{PASSWORD}"


def test_token_auth_push_reuses_its_token(builder: Client, token: Registry, tmp_path: Path) -> None:
    builder.run("login", token.host, "-u", USER, "--password-stdin", input=PASSWORD)
    repository = unique("token/push")
    ref = token.ref(repository, "1")
    builder.build(app_context(tmp_path / "ctx", repository), "-t", ref)
    token.tokens.reset()
    digest, _ = push_digest(builder.run("push", ref).stdout, "1")
    assert inspect(token, ref).digest == digest
    assert any(scope.startswith(f"repository:{repository}:") and "push" in scope for scope in token.tokens.scopes)
    assert_token_reused(token)  # 8 blobs and a manifest: one token serves them all


def test_token_auth_pull_reuses_its_token(client: Client, token: Registry, base_archive: Path) -> None:
    repository = unique("token/pull")
    ref = token.ref(repository, "1")
    digest = seed_gzip_oci(token, base_archive, ref)
    anonymous = client.run("pull", ref, check=False)
    assert_one_error(anonymous)
    client.run("login", token.host, "-u", USER, "--password-stdin", input=PASSWORD)
    token.tokens.reset()
    pulled = client.run("pull", ref)
    assert pull_digest(pulled.stdout) == digest
    assert f"repository:{repository}:pull" in token.tokens.scopes, token.tokens.scopes
    assert_token_reused(token)
    assert PASSWORD not in pulled.stdout + pulled.stderr
    assert ref in client.image_names()


def assert_token_reused(registry: Registry) -> None:
    """One command's tokens: none fetched twice for the same scopes, and at most two in all (a pull scope and a
    pull,push scope, say), however many requests the command made."""
    asked = [" ".join(sorted(request.scopes)) for request in registry.tokens.requests]
    assert len(asked) == len(set(asked)), f"a token was fetched again for the same scopes: {asked}"
    assert 1 <= registry.tokens.issued <= 2, asked


@pytest.mark.parametrize("key", ["credHelpers", "credsStore"])
def test_credential_helper_gives_the_credentials(key: str, client: Client, basic: Registry, basic_seeded,
                                                 tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    log = credential_helper(bindir, "pbtest", USER, PASSWORD)
    config = {"credHelpers": {basic.host: "pbtest"}} if key == "credHelpers" else {"credsStore": "pbtest"}
    (client.docker_config / "config.json").write_text(json.dumps(config))
    path, digest = basic_seeded
    done = client.run("pull", f"{basic.host}/{path}", env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert pull_digest(done.stdout) == digest
    calls = log.read_text().splitlines()
    assert calls and all(line.split()[0] == "get" and basic.host in line for line in calls), calls


# --- faults ----------------------------------------------------------------------------------------------------------


def test_pull_of_a_missing_tag_names_it(client: Client, plain: Registry, seeded) -> None:
    ref = f"{plain.host}/seeded/gzip:no-such-tag"
    done = client.run("pull", ref, check=False)
    message = assert_one_error(done)
    assert "seeded/gzip:no-such-tag" in message, done.stderr
    assert re.search("manifest unknown|not found", message, re.IGNORECASE), done.stderr
    missing_repository = client.run("pull", f"{plain.host}/{unique('nothing/here')}:1", check=False)
    assert_one_error(missing_repository)
    assert client.image_names() == set()


def test_pull_of_an_image_with_a_missing_blob_fails(client: Client, plain: Registry, base_archive: Path) -> None:
    repository = unique("faults/missing")
    ref = plain.ref(repository, "1")
    seed_gzip_oci(plain, base_archive, ref)
    layer = inspect(plain, ref).manifest["layers"][-1]["digest"]
    plain.unlink_blob(repository, layer)
    assert plain.request("HEAD", f"/v2/{repository}/blobs/{layer}")[0] == 404
    done = client.run("pull", ref, check=False)
    assert_one_error(done)
    assert not any(name.startswith(f"{plain.host}/{repository}") for name in client.image_names())


def test_pull_refuses_a_blob_that_does_not_match_its_digest(client: Client, proxy: FaultProxy, plain: Registry,
                                                            seeded) -> None:
    path, _ = seeded["gzip"]
    layers = inspect(plain, f"{plain.host}/{path}").manifest["layers"]
    proxy.corrupt_blob(max(layers, key=lambda layer: layer["size"])["digest"])
    ref = f"{proxy.host}/{path}"
    done = client.run("pull", ref, check=False)
    message = assert_one_error(done)
    assert "digest" in message.lower(), done.stderr
    assert ref not in client.image_names()
    assert any(entry.fault == "corrupt" for entry in proxy.requests())


def test_pull_survives_a_connection_dropped_mid_blob(client: Client, proxy: FaultProxy, plain: Registry, seeded,
                                                     tmp_path: Path) -> None:
    path, digest = seeded["gzip"]
    ref = f"{proxy.host}/{path}"
    proxy.drop_next_blob_get(1000)
    done = client.run("pull", ref)
    assert pull_digest(done.stdout) == digest
    dropped = [entry for entry in proxy.requests("GET") if entry.fault == "drop"]
    assert len(dropped) == 1, proxy.requests()
    again = [entry for entry in proxy.requests("GET", re.escape(dropped[0].path) + "$") if entry.at > dropped[0].at]
    assert again and again[0].status in (200, 206), proxy.requests()
    assert_same_image(client, ref, plain, f"{plain.host}/{path}", tmp_path / "check")


def test_pull_waits_out_429_with_retry_after(client: Client, proxy: FaultProxy, plain: Registry, seeded) -> None:
    path, digest = seeded["v2s2"]
    ref = f"{proxy.host}/{path}"
    proxy.throttle(2, "/blobs/sha256:")
    done = client.run("pull", ref)
    assert pull_digest(done.stdout) == digest
    throttled = [entry for entry in proxy.requests() if entry.fault == "429"]
    assert len(throttled) == 2, proxy.requests()
    for entry in throttled:
        retried = [later for later in proxy.requests(entry.method, re.escape(entry.path) + "$") if later.at > entry.at]
        assert retried, proxy.requests()
        assert retried[0].at - entry.at >= 1.0, (entry, retried[0], retried[0].at - entry.at)
    assert_same_image(client, ref, plain, f"{plain.host}/{path}")


def test_push_to_a_registry_stopped_mid_push_fails_then_completes(builder: Client, own_registry: Registry,
                                                                  tmp_path: Path) -> None:
    with FaultProxy(own_registry) as proxy:
        ref = proxy.ref("stopped/app", "1")
        builder.build(app_context(tmp_path / "ctx", "stopped"), "-t", ref)
        proxy.stop_registry_after_uploads(1)
        failed = builder.run("push", ref, check=False)
        assert_one_error(failed)
        assert own_registry.process is None and PASSWORD not in failed.stderr
        own_registry.start()
        digest, _ = push_digest(builder.run("push", ref).stdout, "1")
        assert inspect(own_registry, own_registry.ref("stopped/app", "1")).digest == digest


# --- as users run it --------------------------------------------------------------------------------------------------

ROOT_STORE = Path("/var/lib/pybuild")


def test_root_with_defaults_pulls_builds_and_pushes(plain: Registry, seeded, tmp_path: Path) -> None:
    """No PYBUILD_ROOT, no DOCKER_CONFIG: root's store /var/lib/pybuild, as root runs it from a login shell."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = User("root", 0, 0, Path("/root"), ())
    ref = f"{plain.host}/{seeded['gzip'][0]}"
    repository = unique("users/root")
    built = f"{plain.host}/{repository}:1"
    context = from_context(tmp_path / "ctx", ref, "RUN echo root > /by-root")
    tmp_path.chmod(0o755)
    names = []
    try:
        pulled = root.run(tuple(PYBUILD), "pull", ref)
        names.append(ref)
        assert pulled.returncode == 0, pulled.stderr
        assert pull_digest(pulled.stdout) == seeded["gzip"][1]
        assert ref in (ROOT_STORE / "index.json").read_text()
        made = root.run(tuple(PYBUILD), "build", "--progress=plain", "-t", built, context)
        names.append(built)
        assert made.returncode == 0, made.stderr
        pushed = root.run(tuple(PYBUILD), "push", built)
        assert pushed.returncode == 0, pushed.stderr
        assert push_digest(pushed.stdout, "1")[0] == inspect(plain, built).digest
    finally:
        for name in names:
            root.run(tuple(PYBUILD), "rmi", name)
    assert ref not in (ROOT_STORE / "index.json").read_text()


def test_user_with_ranges_logs_in_and_pulls(installed, login_users, basic: Registry,  # noqa: F811
                                           basic_seeded) -> None:
    dev = login_users["dev"]
    path, digest = basic_seeded
    ref = f"{basic.host}/{path}"
    environment = {"HOME": str(dev.home), "USER": dev.name, "LOGNAME": dev.name, "PATH": LOGIN_PATH}
    login = subprocess.run([*dev.command, *installed, "login", basic.host, "-u", USER, "--password-stdin"],
                           input=PASSWORD, env=environment, cwd="/", capture_output=True, text=True, timeout=120)
    assert login.returncode == 0 and "Login Succeeded" in login.stdout, login.stderr
    config_file = dev.home / ".docker" / "config.json"
    info = config_file.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (dev.uid, 0o600)
    auth = json.loads(config_file.read_text())["auths"][basic.host]["auth"]
    assert base64.b64decode(auth).decode() == f"{USER}:{PASSWORD}"

    pulled = dev.run(installed, "pull", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert pull_digest(pulled.stdout) == digest
    listed = dev.run(installed, "images")
    assert any(line.split()[:2] == ref.rsplit(":", 1) for line in listed.stdout.splitlines()), listed.stdout
    assert (dev.home / ".local" / "share" / "pybuild" / "index.json").is_file()
    with contextlib.suppress(FileNotFoundError):
        assert ref not in (ROOT_STORE / "index.json").read_text()


# --- the build cache through a registry ----------------------------------------------------------------------------

CACHED_APP = """\
FROM busybox-base AS tools
RUN echo tool > /tool && head -c 300000 /dev/urandom > /noise
FROM busybox-base
COPY --from=tools /tool /tool
RUN echo "{name}" > /name.txt && cat /tool >> /name.txt
CMD ["cat", "/name.txt"]
"""


def cached_context(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(CACHED_APP.format(name=name))
    return directory


def step_outcomes(stderr: str) -> list[str]:
    """For each step the plain progress names, CACHED or DONE, in order."""
    outcomes: dict[str, str] = {}
    for line in stderr.splitlines():
        match = re.match(r"#(\d+) (CACHED|DONE)", line)
        if match:
            outcomes[match.group(1)] = match.group(2)
    return [outcomes[number] for number in sorted(outcomes, key=int)]


# mode=min: the side stage is not in the cache, so runner B builds it (its noise differs); the COPY --from of
# it then runs too (its key covers the side stage's layers) and makes the same layer as runner A's, so the
# RUN after it hits. mode=max: all three steps hit.
@pytest.mark.parametrize(("mode", "cached", "layers"), [("min", 1, 2), ("max", 3, 3)])
def test_registry_cache_gives_an_empty_runner_its_hits(tmp_path: Path, base_archive: Path, plain: Registry,
                                                       proxy: FaultProxy, mode: str, cached: int, layers: int) -> None:
    """Runner A exports its cache to the registry; runner B, with an empty store, hits every step the cache has
    (mode=min: the image's stage; max: the side stage too), makes the same image, and downloads only cache layers."""
    repository = unique(f"cache/{mode}")
    context = cached_context(tmp_path / "ctx", repository)
    cache_ref = f"{proxy.host}/{repository}:cache"
    runners = {}
    for name in ("a", "b"):
        (tmp_path / f"{name}-config").mkdir()
        runners[name] = Client(tmp_path / f"{name}-store", tmp_path / f"{name}-config")
        runners[name].run("load", "-i", base_archive)
    exported = runners["a"].build(context, "-t", "app", "--cache-to", f"type=registry,ref={cache_ref},mode={mode}")
    status, _, body = plain.request("GET", f"/v2/{repository}/manifests/cache",
                                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 200
    cache_manifest = json.loads(body)
    assert cache_manifest["config"]["mediaType"] == "application/vnd.pybuild.cache.config.v1+json"
    assert len(cache_manifest["layers"]) == layers
    proxy.reset()
    hit = runners["b"].build(context, "-t", "app", "--cache-from", f"type=registry,ref={cache_ref}")
    assert step_outcomes(hit.stderr).count("CACHED") == cached, hit.stderr
    assert runners["b"].run("inspect", "app").stdout == runners["a"].run("inspect", "app").stdout
    assert hit.stderr.splitlines()[-1] == exported.stderr.splitlines()[-1]  # the image and manifest digests
    assert hit.stderr.splitlines()[-1].startswith("image sha256:")
    fetched = {request.path.rsplit("/", 1)[1] for request in proxy.requests("GET", r"/blobs/sha256:")}
    in_cache = {layer["digest"] for layer in cache_manifest["layers"]} | {cache_manifest["config"]["digest"]}
    assert fetched and fetched <= in_cache, (fetched, in_cache)


def test_registry_cache_that_is_not_there_yet_is_a_warning(builder: Client, plain: Registry, tmp_path: Path) -> None:
    done = builder.build(cached_context(tmp_path / "ctx", "first"), "--cache-from",
                         f"type=registry,ref={plain.ref(unique('cache/none'), 'x')}")
    assert any("no cache there yet" in line for line in done.stderr.splitlines()), done.stderr


def test_a_registry_cache_that_may_not_be_read_is_a_warning(builder: Client, basic: Registry,
                                                            tmp_path: Path) -> None:
    """A pull request from a fork may not read the cache its base branch pushed: the build goes on without it,
    saying why, as BuildKit does."""
    done = builder.build(cached_context(tmp_path / "ctx", "locked"), "--cache-from",
                         f"type=registry,ref={basic.ref(unique('cache/locked'), 'x')}")
    warnings = [line for line in done.stderr.splitlines() if "may not be read" in line]
    assert len(warnings) == 1 and "the build runs without it" in warnings[0], done.stderr
    assert done.stderr.splitlines()[-1].startswith("image sha256:")


def test_a_buildkit_cache_ref_is_refused_by_name(builder: Client, plain: Registry, tmp_path: Path) -> None:
    """A cache manifest BuildKit wrote (config type application/vnd.buildkit.cacheconfig.v0) is a clear error."""
    repository = unique("cache/buildkit")
    config = b'{"layers":[],"records":[]}'
    config_digest = sha256_digest(config)
    status, headers, _ = plain.request("POST", f"/v2/{repository}/blobs/uploads/")
    assert status == 202
    location = headers["location"].split(plain.host, 1)[-1]
    status, _, _ = plain.request("PUT", f"{location}{'&' if '?' in location else '?'}digest={config_digest}",
                                 body=config, headers={"Content-Type": "application/octet-stream"})
    assert status == 201
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.buildkit.cacheconfig.v0",
                                      "digest": config_digest, "size": len(config)}, "layers": []}).encode()
    status, _, _ = plain.request("PUT", f"/v2/{repository}/manifests/cache", body=manifest,
                                 headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 201
    done = builder.build(cached_context(tmp_path / "ctx", "bk"), "--cache-from",
                         f"type=registry,ref={plain.ref(repository, 'cache')}", check=False)
    line = assert_one_error(done)
    assert "is a BuildKit cache, which pybuild does not read" in line


def test_a_pulled_index_is_listed_saved_removed_and_freed(client: Client, plain: Registry, seeded,
                                                           tmp_path: Path) -> None:
    """The store keeps a pulled index as the registry gave it, with only this platform's manifest and blobs:
    `images`, `save`, `FROM name@index-digest`, `rmi` and `prune` all work on it."""
    path, digest = seeded["index"]
    ref = f"{plain.host}/{path}"
    client.run("pull", ref)
    assert f"{plain.host}/seeded/index:1" in client.image_names()
    assert_same_image(client, ref, plain, ref, tmp_path / "saved")
    client.build(from_context(tmp_path / "ctx", f"{plain.host}/seeded/index@{digest}"), "-t", "on-index",
                 "--metadata-file", tmp_path / "metadata.json")
    history = json.loads(client.run("inspect", "on-index").stdout).get("history", [])
    assert {"created_by": f"FROM {plain.host}/seeded/index@{digest}", "empty_layer": True} in [
        {key: entry[key] for key in ("created_by", "empty_layer") if key in entry} for entry in history]
    assert json.loads((tmp_path / "metadata.json").read_text())["pybuild.base-images"] == {
        f"{plain.host}/seeded/index@{digest}": f"{plain.host}/seeded/index@{digest}"}
    client.run("rmi", "on-index", ref)
    client.run("prune")
    assert client.image_names() == set()
    blobs = client.root / "blobs" / "sha256"
    assert not blobs.is_dir() or not any(blobs.iterdir())


def test_chunked_upload_of_a_large_blob(builder: Client, plain: Registry, proxy: FaultProxy, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs above the monolithic limit go up in PATCH chunks (limits made small here, in-process), and the
    registry then serves the image whole: skopeo reads the same digest."""
    from builder.oci.store import ImageStore
    from builder.registry import push as push_module

    repository = unique("chunked/app")
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM busybox-base\nRUN head -c 1500000 /dev/urandom > /noise\n")
    builder.build(context, "-t", "chunky")
    monkeypatch.setattr(push_module, "MONOLITHIC_BYTES", 1 << 20)
    monkeypatch.setattr(push_module, "CHUNK_BYTES", 400_000)
    store = ImageStore(builder.root)
    image = store.resolve("chunky")
    pushed = push_module.push(store, image, proxy.ref(repository, "1"))
    patches = proxy.requests("PATCH", rf"/v2/{repository}/blobs/uploads/")
    large = [layer.size for layer in image.image.layers if layer.size > 1 << 20]
    assert len(large) == 2  # busybox's layer and the noise
    assert len(patches) == sum(-(-size // 400_000) for size in large), [entry.path for entry in patches]
    assert inspect(plain, plain.ref(repository, "1")).digest == pushed.digest


def test_diff_and_verify_read_a_registry_reference(builder: Client, plain: Registry, tmp_path: Path) -> None:
    """An image by registry reference is read for the comparison and not named in the store."""
    repository = unique("verify/app")
    ref = plain.ref(repository, "1")
    context = app_context(tmp_path / "ctx", repository)
    builder.build(context, "-t", ref, "--push")  # --push pushes every -t name, as docker's does
    builder.run("tag", ref, "local-app")
    builder.run("rmi", ref)
    names = builder.image_names()
    done = builder.run("diff", ref, "local-app")
    assert done.stdout.startswith("identical: sha256:"), done.stdout
    done = builder.run("verify", ref, "--context", context)
    assert done.stdout.startswith("verified: sha256:"), done.stdout
    assert builder.image_names() == names
