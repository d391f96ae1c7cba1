"""Table-driven tests of the registry client's pure parts: references, plain-HTTP hosts, credentials, challenges."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from builder.registry.auth import (
    Authenticator,
    Credentials,
    erase_credentials,
    lookup_credentials,
    parse_challenge,
    store_credentials,
)
from builder.registry.client import _retry_after
from builder.registry.reference import insecure_hosts, is_loopback, parse_remote, plain_http_allowed, registry_of
from parser.errors import PybuildError

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest", "local"), [
    ("python", "docker.io", "library/python", "latest", None, "python:latest"),
    ("python:3.12-slim", "docker.io", "library/python", "3.12-slim", None, "python:3.12-slim"),
    ("docker.io/library/python:3", "docker.io", "library/python", "3", None, "python:3"),
    ("index.docker.io/org/app", "docker.io", "org/app", "latest", None, "org/app:latest"),
    ("registry-1.docker.io/org/app:1", "docker.io", "org/app", "1", None, "org/app:1"),
    ("org/app:1", "docker.io", "org/app", "1", None, "org/app:1"),
    ("ghcr.io/org/base:1", "ghcr.io", "org/base", "1", None, "ghcr.io/org/base:1"),
    ("localhost:5000/app", "localhost:5000", "app", "latest", None, "localhost:5000/app:latest"),
    ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000", "a/b/c", "t", None, "127.0.0.1:5000/a/b/c:t"),
    (f"python@{DIGEST}", "docker.io", "library/python", None, DIGEST, None),
    (f"ghcr.io/org/base:1@{DIGEST}", "ghcr.io", "org/base", "1", DIGEST, "ghcr.io/org/base:1"),
])
def test_remote_references(text: str, registry: str, repository: str, tag: str | None, digest: str | None,
                           local: str | None) -> None:
    reference = parse_remote(text)
    assert (reference.registry, reference.repository, reference.tag, reference.digest) == (
        registry, repository, tag, digest)
    assert reference.local_name == local
    assert reference.reference == (digest or tag)
    assert reference.api_host == ("registry-1.docker.io" if registry == "docker.io" else registry)


@pytest.mark.parametrize("text", ["Python", "a//b", "app:", "-app", f"app@{DIGEST[:20]}"])
def test_bad_references_are_errors(text: str) -> None:
    with pytest.raises(PybuildError, match="invalid image reference"):
        parse_remote(text)


@pytest.mark.parametrize(("text", "registry"), [
    ("", "docker.io"), ("https://index.docker.io/v1/", "docker.io"), ("registry-1.docker.io", "docker.io"),
    ("ghcr.io", "ghcr.io"), ("https://ghcr.io/v2/", "ghcr.io"), ("http://127.0.0.1:5000", "127.0.0.1:5000"),
])
def test_login_arguments_name_registries(text: str, registry: str) -> None:
    assert registry_of(text) == registry


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("localhost:5000", True), ("127.0.0.1:80", True), ("127.9.9.9", True), ("[::1]:5000", True),
    ("10.0.0.1:5000", False), ("registry.local", False), ("ghcr.io", False), ("localhost.example.com", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    assert plain_http_allowed(host, frozenset()) is loopback


REGISTRIES_CONF_V2 = """
unqualified-search-registries = ["docker.io"]

[[registry]]
location = "registry.lan:5000"
insecure = true

[[registry]]
location = "secure.example"
insecure = false

[[registry]]
prefix = "mirror.lan/team"
location = "mirror.lan"
insecure = true
"""
REGISTRIES_CONF_V1 = """
[registries.insecure]
registries = ["old.lan", "other.lan:8080"]
"""


@pytest.mark.parametrize(("conf", "given", "expected"), [
    (REGISTRIES_CONF_V2, (), {"registry.lan:5000", "mirror.lan"}),
    (REGISTRIES_CONF_V1, ("https://cli.lan/",), {"old.lan", "other.lan:8080", "cli.lan"}),
    ("", ("a.lan:1",), {"a.lan:1"}),
    (None, (), set()),
])
def test_insecure_hosts_from_flags_and_registries_conf(tmp_path: Path, conf: str | None, given: tuple[str, ...],
                                                       expected: set[str]) -> None:
    path = tmp_path / "registries.conf"
    if conf is not None:
        path.write_text(conf)
    assert insecure_hosts(given, path) == expected


def test_a_broken_registries_conf_is_named(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text("[[registry]\n")
    with pytest.raises(PybuildError, match="registries.conf is not valid TOML"):
        insecure_hosts((), path)


@pytest.mark.parametrize(("header", "scheme", "params"), [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull"',
     "bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                "scope": "repository:library/python:pull"}),
    ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
    ('bearer realm=https://x/token, service=x', "bearer", {"realm": "https://x/token", "service": "x"}),
])
def test_challenges(header: str, scheme: str, params: dict[str, str]) -> None:
    challenge = parse_challenge(header)
    assert challenge is not None and (challenge.scheme, challenge.params) == (scheme, params)


@pytest.mark.parametrize(("value", "attempt", "pause"), [("1", 0, 1.0), ("0", 3, 0.0), ("3600", 0, 30.0),
                                                         (None, 0, 0.5), (None, 2, 2.0), ("soon", 1, 1.0)])
def test_retry_after(value: str | None, attempt: int, pause: float) -> None:
    assert _retry_after(value, attempt) == pause


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    return tmp_path / "docker" / "config.json"


def test_login_is_kept_as_docker_keeps_it(docker_config: Path) -> None:
    docker_config.parent.mkdir()
    docker_config.write_text(json.dumps({"auths": {"https://other.example/v1/": {"auth": "eDp5"}},
                                         "HttpHeaders": {"X-Kept": "1"}}))
    store_credentials("127.0.0.1:5000", Credentials("me", "pa:ss"))
    store_credentials("docker.io", Credentials("hub", "secret"))
    value = json.loads(docker_config.read_text())
    assert value["auths"]["127.0.0.1:5000"]["auth"] == base64.b64encode(b"me:pa:ss").decode()
    assert value["auths"]["https://index.docker.io/v1/"]["auth"] == base64.b64encode(b"hub:secret").decode()
    assert value["HttpHeaders"] == {"X-Kept": "1"} and "https://other.example/v1/" in value["auths"]
    assert stat.S_IMODE(docker_config.stat().st_mode) == 0o600
    assert lookup_credentials("127.0.0.1:5000") == Credentials("me", "pa:ss")
    assert lookup_credentials("docker.io") == Credentials("hub", "secret")
    assert lookup_credentials("other.example") == Credentials("x", "y")
    assert lookup_credentials("nowhere.example") is None
    assert erase_credentials("127.0.0.1:5000") and not erase_credentials("127.0.0.1:5000")
    assert lookup_credentials("127.0.0.1:5000") is None


def test_credential_helpers_are_asked(docker_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = tmp_path / "bin" / "docker-credential-unit"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread server\n[ "$1" = get ] && [ "$server" = reg.example ] && '
                      'echo \'{"ServerURL":"reg.example","Username":"u","Secret":"s"}\' && exit 0\n'
                      'echo "credentials not found in native keychain"; exit 1\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
    docker_config.parent.mkdir()
    docker_config.write_text(json.dumps({"credHelpers": {"reg.example": "unit"}, "credsStore": "unit"}))
    assert lookup_credentials("reg.example") == Credentials("u", "s")
    assert lookup_credentials("elsewhere.example") is None  # credsStore: the helper has none for it
    docker_config.write_text(json.dumps({"credsStore": "missing"}))
    with pytest.raises(PybuildError, match="docker-credential-missing is not installed"):
        lookup_credentials("reg.example")


def test_a_token_is_fetched_once_per_scope_and_the_password_never_shows() -> None:
    fetched: list[tuple[str, dict[str, str]]] = []

    def fetch(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        fetched.append((url, headers))
        return 200, json.dumps({"token": f"t{len(fetched)}", "expires_in": 300}).encode()

    auth = Authenticator("reg.example", fetch, Credentials("me", "hunter2"))
    challenge = 'Bearer realm="https://reg.example/token",service="reg"'
    assert auth.answer(challenge, "repository:a:pull") == "Bearer t1"
    assert auth.header("repository:a:pull") == "Bearer t1"
    assert auth.header("repository:b:pull") == "Bearer t2"  # a scheme known: another scope's token at once
    assert len(fetched) == 2
    assert fetched[0][0] == "https://reg.example/token?service=reg&scope=repository%3Aa%3Apull"
    assert fetched[0][1]["Authorization"] == "Basic " + base64.b64encode(b"me:hunter2").decode()
    assert "hunter2" not in repr(auth.credentials)
    refused = Authenticator("reg.example", lambda url, headers: (401, b""), Credentials("me", "hunter2"))
    with pytest.raises(PybuildError) as caught:
        refused.answer(challenge, "repository:a:pull")
    assert "unauthorized" in caught.value.message and "hunter2" not in str(caught.value.render())
