"""Real registries for the registry client's tests: Distribution's ``docker-registry`` on loopback, in four kinds
(plain HTTP; HTTPS with a throwaway CA; basic auth from an htpasswd file; Bearer tokens from a small token server
written here), a reverse proxy that injects faults and logs every request, and helpers that seed images with skopeo.

Everything listens on 127.0.0.1 on a free port and keeps its files in a directory the caller gives (a pytest tmp
dir), so tests may run side by side. Nothing here uses pybuild's code: it is what pybuild's client is checked with.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import http.server
import json
import os
import platform
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from e2e import PYBUILD, REPO, run

USER = "pbuser"
PASSWORD = "pb-Secr3t-Pass"  # distinctive, so a test can look for it in pybuild's output
SERVICE = "pybuild-test-registry"
ISSUER = "pybuild-test-issuer"

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
HOST_ARCH = _GOARCH.get(platform.machine(), platform.machine())
OTHER_ARCH = "arm64" if HOST_ARCH == "amd64" else "amd64"  # an architecture this machine cannot run


def require_registry_tools(*extra: str) -> None:
    """Skip, saying what to install, where the registry or its helpers are missing."""
    from e2e import require_tools

    require_tools("docker-registry", "skopeo", "openssl", "curl", *extra)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def basic_auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _openssl(*args: str | os.PathLike, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *map(str, args)], input=data, capture_output=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(map(str, args))} failed:\n{done.stderr.decode(errors='replace')}")
    return done.stdout


# --- certificates -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """A throwaway CA (``ca``: the file a client trusts, as SSL_CERT_FILE) and a server certificate it signed."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: Path, names: Sequence[str] = ("localhost",),
                      addresses: Sequence[str] = ("127.0.0.1",)) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "3",
             "-subj", "/CN=pybuild test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    key, request, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, "-subj", f"/CN={names[0]}")
    san = ",".join([*(f"IP:{address}" for address in addresses), *(f"DNS:{name}" for name in names)])
    extensions = directory / "server.ext"
    extensions.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,"
                          "keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", extensions)
    return Certificates(ca, cert, key)


# --- token server ------------------------------------------------------------------------------------------------


@dataclass
class TokenRequest:
    method: str
    account: str | None  # the user the credentials named (None: anonymous)
    scopes: list[str]
    status: int


class TokenServer:
    """The Docker token protocol's auth server: ``GET /token?service=S&scope=repository:NAME:pull,push`` with basic
    credentials (or the OAuth2 ``POST /token`` password grant) answers ``{"token": JWT, "expires_in": 300}``.

    The JWT is signed RS256 with a key whose self-signed certificate is the registry's ``rootcertbundle`` and
    rides in the header's ``x5c``. Valid credentials get every action they ask for; anything else gets 401.
    ``issued`` counts the tokens given, ``requests`` records each request (account, scopes, status).
    """

    def __init__(self, directory: Path, users: Mapping[str, str], *, service: str = SERVICE,
                 issuer: str = ISSUER, expires_in: int = 300) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = directory / "token.key", directory / "token.pem"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", self.cert,
                 "-days", "3", "-subj", "/CN=pybuild test token signer")
        self.x5c = "".join(line for line in self.cert.read_text().splitlines() if not line.startswith("-----"))
        self.users, self.service, self.issuer, self.expires_in = dict(users), service, issuer, expires_in
        self.lock = threading.Lock()
        self.issued = 0
        self.requests: list[TokenRequest] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
        self._server.daemon_threads = True
        self._server.tokens = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-server", daemon=True)
        self._thread.start()

    @property
    def scopes(self) -> list[str]:
        """Every scope asked for, in order (of requests that got a token or not)."""
        with self.lock:
            return [scope for request in self.requests for scope in request.scopes]

    def reset(self) -> None:
        with self.lock:
            self.issued = 0
            self.requests.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def token(self, account: str, scopes: Sequence[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": account, "aud": self.service, "exp": now + self.expires_in,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(16), "access": access}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = _openssl("dgst", "-sha256", "-sign", self.key, data=signing_input.encode())
        return f"{signing_input}.{b64url(signature)}"


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: http.server.ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _answer(self, status: int, body: dict, headers: Mapping[str, str] = {}) -> None:  # noqa: B006
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _issue(self, account: str | None, password: str | None, scopes: list[str], *, oauth: bool) -> None:
        tokens: TokenServer = self.server.tokens  # type: ignore[attr-defined]
        valid = account is not None and tokens.users.get(account) == password
        with tokens.lock:
            tokens.requests.append(TokenRequest(self.command, account, scopes, 200 if valid else 401))
            if valid:
                tokens.issued += 1
        if not valid:
            self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"
                                           if account is None else "incorrect username or password"}]},
                         {"WWW-Authenticate": 'Basic realm="pybuild test token server"'})
            return
        token = tokens.token(account, scopes)
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"access_token": token} if oauth else {"token": token}
        self._answer(200, {**body, "expires_in": tokens.expires_in, "issued_at": issued_at})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            self._answer(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        query = urllib.parse.parse_qs(url.query)
        scopes = [scope for value in query.get("scope", []) for scope in value.split()]
        account = password = None
        header = self.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                account, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
            except ValueError:
                account = password = None
        self._issue(account, password, scopes, oauth=False)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        scopes = [scope for value in form.get("scope", []) for scope in value.split()]
        if form.get("grant_type", [""])[0] != "password":
            with self.server.tokens.lock:  # type: ignore[attr-defined]
                self.server.tokens.requests.append(TokenRequest("POST", None, scopes, 400))  # type: ignore
            self._answer(400, {"error": "unsupported_grant_type"})
            return
        self._issue(form.get("username", [None])[0], form.get("password", [None])[0], scopes, oauth=True)


# --- the registry ------------------------------------------------------------------------------------------------


class Registry:
    """``docker-registry serve`` on 127.0.0.1, storage and config in ``directory``.

    ``tls``: HTTPS with a throwaway CA (``ca`` is its file); ``auth``: None, "basic" (htpasswd, bcrypt) or
    "token" (a ``TokenServer``, ``tokens``). ``stop()`` ends the process, ``start()`` starts it again on the same
    port with the same storage. Use as a context manager (``close()`` also stops the token server).
    """

    def __init__(self, directory: Path, *, tls: bool = False, auth: str | None = None,
                 users: Mapping[str, str] | None = None, hostname: str = "127.0.0.1",
                 extra_names: Sequence[str] = ()) -> None:
        require_registry_tools("htpasswd") if auth == "basic" else require_registry_tools()
        assert auth in (None, "basic", "token"), auth
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.storage = directory / "storage"
        self.users = dict(users or {USER: PASSWORD})
        self.auth, self.tls = auth, tls
        self.port = free_port()
        self.hostname = hostname  # how clients name it: 127.0.0.1, or localhost for the HTTPS registry
        self.certificates = make_certificates(directory / "tls", ("localhost", *extra_names)) if tls else None
        self.tokens = TokenServer(directory / "token", self.users) if auth == "token" else None
        self.log = directory / "registry.log"
        self.process: subprocess.Popen | None = None
        self.config = directory / "config.yml"
        self.config.write_text(json.dumps(self._config(), indent=2))  # YAML is a superset of JSON

    @property
    def host(self) -> str:
        return f"{self.hostname}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def ca(self) -> Path | None:
        return self.certificates.ca if self.certificates else None

    @property
    def credentials(self) -> tuple[str, str]:
        return next(iter(self.users.items()))

    def ref(self, repository: str, tag: str = "latest") -> str:
        return f"{self.host}/{repository}:{tag}"

    def _config(self) -> dict:
        config: dict = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            # a fixed secret: an upload begun before a restart may go on after it
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "pybuild-test-registry-secret"},
        }
        if self.certificates:
            config["http"]["tls"] = {"certificate": str(self.certificates.cert), "key": str(self.certificates.key)}
        if self.auth == "basic":
            lines = [run(["htpasswd", "-Bbn", user, password]).stdout.strip() for user, password in self.users.items()]
            htpasswd = self.directory / "htpasswd"
            htpasswd.write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "pybuild-test", "path": str(htpasswd)}}
        elif self.tokens:
            config["auth"] = {"token": {"realm": self.tokens.realm, "service": self.tokens.service,
                                        "issuer": self.tokens.issuer, "rootcertbundle": str(self.tokens.cert)}}
        return config

    def start(self, timeout: float = 30) -> Registry:
        assert self.process is None, "already running"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.process = None
                raise AssertionError(f"docker-registry exited at start:\n{self.log.read_text()[-3000:]}")
            if self.answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"docker-registry did not answer on {self.url}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def answers(self) -> bool:
        """Whether /v2/ answers at all (200, or 401 for an authenticating registry)."""
        try:
            status, _, _ = self.request("GET", "/v2/", timeout=2)
        except OSError:
            return False
        return status in (200, 401)

    def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None, body: bytes | None = None,
                timeout: float = 30, credentials: tuple[str, str] | None = None) -> tuple[int, dict, bytes]:
        """One request to the registry itself (no auth dance): status, headers (lower-case names), body."""
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        connection = (http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=context)
                      if self.tls else http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout))
        if self.tls:
            context.check_hostname = False  # type: ignore[union-attr]  # the certificate names localhost as well
        sent = dict(headers or {})
        if credentials:
            sent["Authorization"] = "Basic " + basic_auth(*credentials)
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self.tokens:
            self.tokens.close()

    def __enter__(self) -> Registry:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the storage, as Distribution 2.8's filesystem driver lays it out

    def repository_dir(self, repository: str) -> Path:
        return self.storage / "docker" / "registry" / "v2" / "repositories" / repository

    def unlink_blob(self, repository: str, digest: str) -> None:
        """Make a blob unknown to a repository (its manifest still names it): GET and HEAD then answer 404."""
        link = self.repository_dir(repository) / "_layers" / "sha256" / digest.removeprefix("sha256:")
        assert link.is_dir(), f"{repository} has no layer link {digest}"
        shutil.rmtree(link)

    def skopeo_auth(self, prefix: str) -> list[str]:
        """skopeo's flags for this registry: ``prefix`` is "src", "dest" or "" (inspect)."""
        flag = f"--{prefix}-" if prefix else "--"
        args = [f"{flag}tls-verify=false"]
        if self.auth:
            args.append(f"{flag}creds={':'.join(self.credentials)}")
        return args


@dataclass(frozen=True)
class RegistryImage:
    """What the registry holds for a reference, read by skopeo: the manifest's bytes, digest and parsed JSON."""

    ref: str
    raw: bytes
    digest: str

    @property
    def manifest(self) -> dict:
        return json.loads(self.raw)

    @property
    def media_type(self) -> str:
        return self.manifest.get("mediaType", "")

    @property
    def layer_types(self) -> list[str]:
        return [layer["mediaType"] for layer in self.manifest.get("layers", [])]


def inspect(registry: Registry, ref: str) -> RegistryImage:
    """The manifest ``ref`` (host/repo:tag or @digest) resolves to, as skopeo reads it."""
    raw = subprocess.run(["skopeo", "inspect", "--raw", *registry.skopeo_auth(""), f"docker://{ref}"],
                         capture_output=True, timeout=120)
    if raw.returncode != 0:
        raise AssertionError(f"skopeo inspect --raw docker://{ref} failed:\n{raw.stderr.decode(errors='replace')}")
    return RegistryImage(ref, raw.stdout, sha256_digest(raw.stdout))


def inspect_config(registry: Registry, ref: str) -> dict:
    """The config blob of ``ref`` (for an index, that of this machine's platform, as skopeo picks it)."""
    return json.loads(run(["skopeo", "inspect", "--config", "--raw", *registry.skopeo_auth(""),
                           f"docker://{ref}"]).stdout)


def exists(registry: Registry, ref: str) -> bool:
    done = subprocess.run(["skopeo", "inspect", "--raw", *registry.skopeo_auth(""), f"docker://{ref}"],
                          capture_output=True, timeout=120)
    return done.returncode == 0


# --- seeding -----------------------------------------------------------------------------------------------------


def seed(registry: Registry, source: str, ref: str, *args: str, workdir: Path | None = None) -> str:
    """``skopeo copy SOURCE docker://REF`` (SOURCE such as ``oci-archive:FILE``); returns the manifest digest the
    registry stores. ``args``: skopeo's own flags, e.g. ``--format v2s2``, ``--dest-compress-format zstd``, ``--all``.
    """
    digestfile = (workdir or registry.directory) / f"digest-{secrets.token_hex(4)}"
    run(["skopeo", "copy", "-q", "--digestfile", digestfile, *registry.skopeo_auth("dest"), *args, source,
         f"docker://{ref}"], timeout=300)
    digest = digestfile.read_text().strip()
    digestfile.unlink()
    return digest


def seed_gzip_oci(registry: Registry, archive: Path, ref: str) -> str:
    """An OCI image with gzip layers (what most registries serve)."""
    return seed(registry, f"oci-archive:{archive}", ref, "--format", "oci", "--dest-compress",
                "--dest-compress-format", "gzip")


def seed_docker_v2s2(registry: Registry, archive: Path, ref: str) -> str:
    """A Docker schema 2 image: gzip layers of type vnd.docker.image.rootfs.diff.tar.gzip."""
    # skopeo 1.9 will not turn zstd layers into a v2s2 image in one copy: gzip them into a layout first
    layout = gzip_layout(archive, registry.directory / f"v2s2-{secrets.token_hex(4)}")
    try:
        return seed(registry, f"oci:{layout}:image", ref, "--format", "v2s2")
    finally:
        shutil.rmtree(layout)


def gzip_layout(archive: Path, layout: Path) -> Path:
    """An OCI layout (tag "image") holding the archive's image with its layers recompressed as gzip."""
    layout.parent.mkdir(parents=True, exist_ok=True)
    run(["skopeo", "copy", "-q", "--format", "oci", "--dest-compress", "--dest-compress-format", "gzip",
         f"oci-archive:{archive}", f"oci:{layout}:image"])
    return layout


def seed_zstd_oci(registry: Registry, archive: Path, ref: str) -> str:
    """An OCI image with zstd layers: ``archive``'s as they are (pybuild writes zstd).

    Copied unchanged (--preserve-digests): asked to recompress, skopeo 1.9 reuses the gzip blobs of the same
    layers that its blob-info cache knows the registry has, and the image would have gzip layers after all.
    """
    return seed(registry, f"oci-archive:{archive}", ref, "--preserve-digests")


@dataclass(frozen=True)
class MultiPlatform:
    """An OCI layout holding an index of two images: this machine's (``HOST_ARCH``) and ``OTHER_ARCH``'s, the latter
    with the same layers (so not runnable here) and a config naming its architecture."""

    layout: Path
    tag: str
    index_digest: str
    manifests: dict[str, str]  # architecture -> manifest digest
    configs: dict[str, str]  # architecture -> config digest


def _write_blob(layout: Path, data: bytes) -> dict:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def multi_platform_layout(archive: Path, directory: Path, tag: str = "multi") -> MultiPlatform:
    """Build the index from an OCI archive of one image (gzip layers, so every client reads them)."""
    directory.mkdir(parents=True, exist_ok=True)
    layout = gzip_layout(archive, directory / "layout")
    index = json.loads((layout / "index.json").read_text())
    (single,) = index["manifests"]

    def blob(digest: str) -> bytes:
        return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()

    manifest = json.loads(blob(single["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    assert config.get("architecture") == HOST_ARCH, config.get("architecture")
    other_config = {**config, "architecture": OTHER_ARCH}
    if OTHER_ARCH == "arm64":
        other_config["variant"] = "v8"
    other_config_desc = {"mediaType": MEDIA_OCI_CONFIG,
                         **_write_blob(layout, json.dumps(other_config, separators=(",", ":")).encode())}
    other_manifest = {**manifest, "config": other_config_desc}
    other_desc = _write_blob(layout, json.dumps(other_manifest, separators=(",", ":")).encode())
    host_platform = {"architecture": HOST_ARCH, "os": "linux"}
    other_platform = {"architecture": OTHER_ARCH, "os": "linux", **({"variant": "v8"} if OTHER_ARCH == "arm64" else {})}
    image_index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [
        {"mediaType": MEDIA_OCI_MANIFEST, "digest": single["digest"], "size": single["size"],
         "platform": host_platform},
        {"mediaType": MEDIA_OCI_MANIFEST, **other_desc, "platform": other_platform},
    ]}
    index_desc = _write_blob(layout, json.dumps(image_index, separators=(",", ":")).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": MEDIA_OCI_INDEX, **index_desc, "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return MultiPlatform(layout, tag, index_desc["digest"],
                         {HOST_ARCH: single["digest"], OTHER_ARCH: other_desc["digest"]},
                         {HOST_ARCH: manifest["config"]["digest"], OTHER_ARCH: other_config_desc["digest"]})


def seed_multi_platform(registry: Registry, multi: MultiPlatform, ref: str) -> str:
    """The index and both images, unchanged (``skopeo copy --all``): returns the index's digest on the registry."""
    return seed(registry, f"oci:{multi.layout}:{multi.tag}", ref, "--all", "--preserve-digests")


# --- the fault-injecting proxy ------------------------------------------------------------------------------------


@dataclass
class Logged:
    """One request the proxy saw: ``at`` is time.monotonic() on arrival; ``status`` 0 when no answer was given."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    at: float
    status: int = 0
    fault: str = ""  # "429", "drop", "corrupt", "upstream-down" when the proxy interfered

    @property
    def params(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(self.query)

    @property
    def is_blob(self) -> bool:
        return "/blobs/sha256:" in self.path

    @property
    def is_upload(self) -> bool:
        return "/blobs/uploads/" in self.path

    @property
    def is_manifest(self) -> bool:
        return "/manifests/" in self.path

    def __repr__(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"<{self.method} {self.path}{query} {self.status}{' ' + self.fault if self.fault else ''}>"


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "expect", "proxy-connection"}


class FaultProxy:
    """A reverse proxy in front of a registry (plain HTTP), on its own port, logging every request.

    Faults, each for the requests to come: ``drop_next_blob_get(n)`` (once: send the headers and n bytes of the
    next blob GET's body, then cut the connection); ``throttle(k, match)`` (the next k requests whose path matches
    answer 429 with Retry-After: 1, unforwarded); ``corrupt_blob(digest)`` (every GET of that blob gets other bytes
    of the same length); ``stop_registry_after_uploads(n, registry)`` (stop the registry once n blob uploads
    completed). While the registry is down the proxy closes the client's connection without an answer.
    """

    def __init__(self, upstream: Registry) -> None:
        assert not upstream.tls, "the proxy speaks plain HTTP to its registry"
        self.upstream = upstream
        self.lock = threading.Lock()
        self.log: list[Logged] = []
        self._drop_after: int | None = None
        self._throttle: list = [0, None]  # remaining, compiled pattern
        self._corrupt: set[str] = set()
        self._stop_after: tuple[int, Registry] | None = None
        self._uploads = 0
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def ref(self, repository: str, tag: str = "latest") -> str:
        return f"{self.host}/{repository}:{tag}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # faults

    def reset(self) -> None:
        """Forget the log and every pending fault."""
        with self.lock:
            self.log.clear()
            self._drop_after = None
            self._throttle = [0, None]
            self._corrupt.clear()
            self._stop_after = None
            self._uploads = 0

    def drop_next_blob_get(self, after_bytes: int) -> None:
        with self.lock:
            self._drop_after = after_bytes

    def throttle(self, count: int, match: str = "") -> None:
        with self.lock:
            self._throttle = [count, re.compile(match)]

    def corrupt_blob(self, digest: str) -> None:
        with self.lock:
            self._corrupt.add(digest)

    def stop_registry_after_uploads(self, count: int, registry: Registry | None = None) -> None:
        with self.lock:
            self._uploads = 0
            self._stop_after = (count, registry or self.upstream)

    # the log

    def requests(self, method: str | None = None, path: str | None = None) -> list[Logged]:
        """Logged requests, optionally of one method and whose path matches the regex ``path`` (re.search)."""
        with self.lock:
            entries = list(self.log)
        return [entry for entry in entries if (method is None or entry.method == method)
                and (path is None or re.search(path, entry.path))]

    def counts(self) -> dict[tuple[str, str], int]:
        """How many requests per (method, kind), kind one of blob, upload, manifest, base (/v2/), other."""
        out: dict[tuple[str, str], int] = {}
        for entry in self.requests():
            kind = ("blob" if entry.is_blob else "upload" if entry.is_upload else "manifest" if entry.is_manifest
                    else "base" if entry.path == "/v2/" else "other")
            out[(entry.method, kind)] = out.get((entry.method, kind), 0) + 1
        return out

    # used by the handler

    def _take_throttle(self, path: str) -> bool:
        with self.lock:
            remaining, pattern = self._throttle
            if remaining > 0 and pattern is not None and pattern.search(path):
                self._throttle[0] -= 1
                return True
            return False

    def _take_drop(self) -> int | None:
        with self.lock:
            after, self._drop_after = self._drop_after, None
            return after

    def _upload_done(self) -> None:
        with self.lock:
            self._uploads += 1
            stop = self._stop_after
            if stop is None or self._uploads < stop[0]:
                return
            self._stop_after = None
        stop[1].stop()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: http.server.ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def handle(self) -> None:
        # a client trying HTTPS first: answer as Go's server does (garbage to TLS, at once), not wait for a line
        try:
            first = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if first == b"\x16":
            with contextlib.suppress(OSError):
                self.connection.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTPS request to an "
                                        b"HTTP server.\n")
            return
        super().handle()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        url = urllib.parse.urlsplit(self.path)
        seen: dict[str, str] = {}
        for key, value in self.headers.items():
            seen[key.lower()] = f"{seen[key.lower()]}, {value}" if key.lower() in seen else value
        entry = Logged(self.command, url.path, url.query, seen, time.monotonic())
        with proxy.lock:
            proxy.log.append(entry)
        body = self._read_body()
        if proxy._take_throttle(url.path):
            entry.status, entry.fault = 429, "429"
            data = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"too many requests: slow down"}]}'
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        # every header line as sent: a client may send several Accept lines
        headers = [(key, value) for key, value in self.headers.items() if key.lower() not in _HOP_BY_HOP
                   and key.lower() != "content-length"]
        if body or self.command in ("PUT", "POST", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream.port, timeout=120)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in headers:
                upstream.putheader(key, value)
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            data = response.read()
        except OSError:
            entry.fault = "upstream-down"
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        finally:
            upstream.close()
        entry.status = response.status
        digest = url.path.rpartition("/blobs/")[2] if entry.is_blob else ""
        blob_get = self.command == "GET" and entry.is_blob and response.status in (200, 206)
        if blob_get and digest in proxy._corrupt and data:
            entry.fault = "corrupt"
            data = bytes(byte ^ 0x5A for byte in data)
        drop = proxy._take_drop() if blob_get and response.status == 200 else None
        if drop is not None and drop >= len(data):
            with proxy.lock:  # too short to cut: keep the fault for the next blob
                if proxy._drop_after is None:
                    proxy._drop_after = drop
            drop = None
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            lower = key.lower()
            if lower in _HOP_BY_HOP or (lower == "content-length" and self.command != "HEAD"):
                continue
            if lower == "location":
                value = value.replace(f"//127.0.0.1:{proxy.upstream.port}", f"//{proxy.host}")
                value = value.replace(f"//localhost:{proxy.upstream.port}", f"//{proxy.host}")
            self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if drop is not None:
            entry.fault = "drop"
            self.wfile.write(data[:drop])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)
        self.wfile.flush()
        if self.command == "PUT" and entry.is_upload and response.status == 201:
            proxy._upload_done()

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward  # noqa: N815


# --- pybuild as a user runs it --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """pybuild with its own store (``root``) and its own Docker config directory (``docker_config``), never the
    real ~/.docker; ``env`` adds to (or, with a None value, removes from) the environment."""

    root: Path
    docker_config: Path
    env: Mapping[str, str | None] = field(default_factory=dict)

    def environment(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        environment = {**os.environ, "PYBUILD_ROOT": str(self.root), "DOCKER_CONFIG": str(self.docker_config)}
        for key, value in {**self.env, **(extra or {})}.items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        return environment

    def run(self, *args: str | os.PathLike, input: str | None = None, check: bool = True,  # noqa: A002
            timeout: float = 300, env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [*PYBUILD, *map(str, args)]
        done = subprocess.run(argv, env=self.environment(env), cwd=REPO, input=input, capture_output=True, text=True,
                              timeout=timeout)
        # a user's mistake, or a registry's, is one clear message, never a traceback
        assert "Traceback (most recent call last)" not in done.stderr, done.stderr
        if check and done.returncode != 0:
            raise AssertionError(f"pybuild {' '.join(map(str, args))} exited {done.returncode}\n{done.stdout}\n"
                                 f"{done.stderr}")
        return done

    def build(self, context: Path, *args: str | os.PathLike, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("build", "--progress", "plain", *args, context, **kwargs)

    def image_names(self) -> set[str]:
        """``pybuild images`` as REPOSITORY:TAG names."""
        lines = self.run("images").stdout.splitlines()[1:]
        return {f"{line.split()[0]}:{line.split()[1]}" for line in lines if line.strip()}

    def config_json(self) -> dict:
        path = self.docker_config / "config.json"
        return json.loads(path.read_text()) if path.exists() else {}


def pull_digest(stdout: str) -> str:
    """The ``Digest: sha256:...`` line of ``pybuild pull``."""
    found = re.findall(r"^Digest: (sha256:[0-9a-f]{64})$", stdout, re.MULTILINE)
    assert len(found) == 1, f"no single 'Digest: sha256:...' line in:\n{stdout}"
    return found[0]


def push_digest(stdout: str, tag: str) -> tuple[str, int]:
    """``<tag>: digest: sha256:<d> size: <n>`` of ``pybuild push``: digest and size."""
    found = re.findall(rf"^{re.escape(tag)}: digest: (sha256:[0-9a-f]{{64}}) size: (\d+)$", stdout, re.MULTILINE)
    assert len(found) == 1, f"no single '{tag}: digest: sha256:... size: N' line in:\n{stdout}"
    return found[0][0], int(found[0][1])


def credential_helper(bindir: Path, name: str, user: str, secret: str) -> Path:
    """``docker-credential-NAME`` in ``bindir``: answers ``get`` with the credentials, and logs each call
    (its action and the server it was asked about) to ``bindir/NAME.log``."""
    bindir.mkdir(parents=True, exist_ok=True)
    log = bindir / f"{name}.log"
    script = bindir / f"docker-credential-{name}"
    script.write_text(f"""#!/bin/sh
read -r server || true
echo "$1 $server" >> '{log}'
case "$1" in
  get) printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}\\n' "$server" ;;
  *) echo "unsupported action $1" >&2; exit 1 ;;
esac
""")
    script.chmod(0o755)
    return log


def wait_for(condition: Callable[[], bool], timeout: float = 20, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def curl(registry: Registry, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """curl on the registry (TLS checked against its CA), to check fixtures with a tool besides skopeo."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *args]
    if registry.ca:
        argv += ["--cacert", str(registry.ca)]
    return run([*argv, f"{registry.url}{path}"], check=False, timeout=60)
