"""Where a reference lives on the network: the registry host, the repository on it, and its tag or digest.

The store keeps names short (``python:3.12``); a registry wants them whole: Docker Hub's names gain
``library/`` and are served by ``registry-1.docker.io``. Which hosts may be spoken to in plain HTTP is
decided here too: loopback hosts, hosts given with ``--insecure-registry``, and those marked
``insecure`` in ``/etc/containers/registries.conf`` (which podman's users already have).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from builder.oci.store import _REFERENCE, parse_reference
from parser.dataclass import dataclass
from parser.errors import PybuildError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"  # the key docker login writes for Docker Hub
REGISTRIES_CONF = Path("/etc/containers/registries.conf")


@dataclass
class RemoteReference:
    """``registry/repository[:tag][@digest]``; ``registry`` as users write it (``docker.io``, ``host:5000``)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return api_host(self.registry)

    @property
    def reference(self) -> str:
        """What the manifest endpoint takes: the digest when given (it decides), else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def local_name(self) -> str | None:
        """The short name the local store keeps it under (None for a reference by digest alone)."""
        return parse_reference(str(self)).name

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def api_host(registry: str) -> str:
    """The host a registry's API is served from (Docker Hub's differs from its name)."""
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


def _is_domain(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def parse_remote(text: str) -> RemoteReference:
    """Read an image reference as a registry sees it; a name without a registry is Docker Hub's."""
    match = _REFERENCE.fullmatch(text)
    if match is None:
        parse_reference(text)  # raises the reference syntax error, with its hint
        raise PybuildError(f"invalid image reference {text!r}")
    domain, path, tag, digest = match.group("domain", "path", "tag", "digest")
    if domain is not None and not _is_domain(domain):
        path, domain = f"{domain}/{path}", None
    if domain in (None, "index.docker.io", DOCKER_HUB_API):
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if tag is None and digest is None:
        tag = "latest"
    return RemoteReference(domain, path, tag, digest)


def registry_of(text: str) -> str:
    """The registry a ``login``/``logout`` argument names: a host, a URL, or Docker Hub when empty."""
    host = text.strip()
    for prefix in ("https://", "http://"):
        host = host.removeprefix(prefix)
    host = host.split("/", 1)[0]
    if host in ("", "index.docker.io", DOCKER_HUB_API):
        return DOCKER_HUB
    return host


def _host_without_port(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    name = _host_without_port(host)
    if name == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def insecure_hosts(given: Iterable[str], conf: Path = REGISTRIES_CONF) -> frozenset[str]:
    """The hosts plain HTTP is allowed for beyond loopback: ``--insecure-registry`` and registries.conf."""
    hosts = {registry_of(host) for host in given}
    hosts.update(_insecure_in_conf(conf))
    return frozenset(hosts)


def _insecure_in_conf(conf: Path) -> set[str]:
    """``insecure = true`` entries of registries.conf (v2 ``[[registry]]`` tables and v1's insecure list)."""
    try:
        data = conf.read_bytes()
    except OSError:
        return set()
    import tomllib

    try:
        value = tomllib.loads(data.decode("utf-8", "replace"))
    except tomllib.TOMLDecodeError as exc:
        raise PybuildError(f"{conf} is not valid TOML: {exc}") from None
    hosts: set[str] = set()
    for entry in value.get("registry") or []:
        if isinstance(entry, dict) and entry.get("insecure") is True:
            location = entry.get("location") or entry.get("prefix")
            if isinstance(location, str):
                hosts.add(registry_of(location))
    old = (value.get("registries") or {}).get("insecure") or {}
    for location in old.get("registries") or [] if isinstance(old, dict) else []:
        if isinstance(location, str):
            hosts.add(registry_of(location))
    return hosts


def plain_http_allowed(registry: str, insecure: frozenset[str]) -> bool:
    return is_loopback(registry) or registry in insecure or _host_without_port(registry) in insecure


def docker_config_dir() -> Path:
    """Where docker keeps config.json: $DOCKER_CONFIG, else ~/.docker."""
    configured = os.environ.get("DOCKER_CONFIG")
    return Path(configured) if configured else Path.home() / ".docker"
