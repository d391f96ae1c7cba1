"""An image as plain values (config, layers, history) and its OCI JSON: config, manifest, index.

The JSON is written deterministically (fixed key order, no whitespace) so the same build gives
the same digests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from parser.errors import PybuildError

MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """JSON with a fixed layout, so equal values always give equal bytes and digests."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Layer:
    """One filesystem layer: ``diff_id`` hashes the uncompressed tar, ``digest`` the blob as stored.

    While a build runs, a layer's blob may not be written yet: its digest is then empty and its size 0.
    """

    diff_id: str
    digest: str
    size: int
    media_type: str = MEDIA_LAYER_ZSTD

    @property
    def pending(self) -> bool:
        return not self.digest


@dataclass
class Descriptor:
    """An OCI content descriptor: what a manifest or index says about a blob."""

    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Descriptor:
        return cls(
            media_type=value.get("mediaType", ""),
            digest=value["digest"],
            size=int(value["size"]),
            annotations=tuple((value.get("annotations") or {}).items()),
            platform=tuple((value.get("platform") or {}).items()),
        )


@dataclass
class Healthcheck:
    """Docker's Healthcheck config; durations in nanoseconds, zero meaning "inherit the default"."""

    test: tuple[str, ...]
    interval: int = 0
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@dataclass
class History:
    """One entry of the image config's history: the step that made it, and whether it made a layer."""

    created_by: str
    empty_layer: bool = False
    created: str = ""
    comment: str = ""


@dataclass
class ImageConfig:
    """The runtime part of an image config (what ``docker inspect`` shows under Config)."""

    env: tuple[tuple[str, str], ...] = ()
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    stop_signal: str = ""
    healthcheck: Healthcheck | None = None
    on_build: tuple[str, ...] = ()
    shell: tuple[str, ...] | None = None

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def with_env(self, name: str, value: str) -> ImageConfig:
        """Set one variable, keeping its position when it already exists, as docker does."""
        items = list(self.env)
        for index, (key, _) in enumerate(items):
            if key == name:
                items[index] = (name, value)
                break
        else:
            items.append((name, value))
        return replace(self, env=tuple(items))

    def with_label(self, name: str, value: str) -> ImageConfig:
        items = [(key, old) for key, old in self.labels if key != name]
        items.append((name, value))
        return replace(self, labels=tuple(sorted(items)))


@dataclass
class Image:
    """Everything needed to write an image: its config, its layers bottom-up, and its history."""

    config: ImageConfig = field(default_factory=ImageConfig)
    layers: tuple[Layer, ...] = ()
    history: tuple[History, ...] = ()
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""
    created: str = ""
    author: str = ""

    def add_history(self, entry: History) -> Image:
        return replace(self, history=(*self.history, entry))


def _config_section(config: ImageConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if config.user:
        out["User"] = config.user
    if config.exposed_ports:
        out["ExposedPorts"] = {port: {} for port in config.exposed_ports}
    if config.env:
        out["Env"] = [f"{key}={value}" for key, value in config.env]
    if config.entrypoint is not None:
        out["Entrypoint"] = list(config.entrypoint)
    if config.cmd is not None:
        out["Cmd"] = list(config.cmd)
    if config.volumes:
        out["Volumes"] = {path: {} for path in config.volumes}
    if config.working_dir:
        out["WorkingDir"] = config.working_dir
    if config.labels:
        out["Labels"] = dict(config.labels)
    if config.stop_signal:
        out["StopSignal"] = config.stop_signal
    if config.healthcheck is not None:
        check = config.healthcheck
        health: dict[str, Any] = {"Test": list(check.test)}
        for key, value in (("Interval", check.interval), ("Timeout", check.timeout),
                           ("StartPeriod", check.start_period), ("StartInterval", check.start_interval),
                           ("Retries", check.retries)):
            if value:
                health[key] = value
        out["Healthcheck"] = health
    if config.on_build:
        out["OnBuild"] = list(config.on_build)
    if config.shell is not None:
        out["Shell"] = list(config.shell)
    return out


def config_json(image: Image) -> bytes:
    """The OCI image config blob."""
    value: dict[str, Any] = {}
    if image.created:
        value["created"] = image.created
    if image.author:
        value["author"] = image.author
    value["architecture"] = image.architecture
    if image.variant:
        value["variant"] = image.variant
    value["os"] = image.os
    value["config"] = _config_section(image.config)
    value["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in image.layers]}
    history = []
    for entry in image.history:
        item: dict[str, Any] = {}
        if entry.created:
            item["created"] = entry.created
        item["created_by"] = entry.created_by
        if entry.comment:
            item["comment"] = entry.comment
        if entry.empty_layer:
            item["empty_layer"] = True
        history.append(item)
    value["history"] = history
    return canonical_json(value)


def _strings(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(item) for item in value)


def image_from_config(config: bytes, layers: tuple[Layer, ...]) -> Image:
    """Read an OCI or Docker image config blob; ``layers`` come from the manifest, bottom-up."""
    try:
        value = json.loads(config)
    except ValueError as exc:
        raise PybuildError(f"image config is not valid JSON: {exc}") from None
    section = value.get("config") or {}
    health = section.get("Healthcheck")
    diff_ids = (value.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise PybuildError(f"image config lists {len(diff_ids)} layers but its manifest has {len(layers)}")
    layers = tuple(replace(layer, diff_id=diff_id) for layer, diff_id in zip(layers, diff_ids, strict=True))
    env = []
    for item in section.get("Env") or []:
        key, _, val = str(item).partition("=")
        env.append((key, val))
    return Image(
        config=ImageConfig(
            env=tuple(env),
            cmd=_strings(section.get("Cmd")),
            entrypoint=_strings(section.get("Entrypoint")),
            working_dir=section.get("WorkingDir") or "",
            user=section.get("User") or "",
            exposed_ports=tuple(section.get("ExposedPorts") or {}),
            volumes=tuple(section.get("Volumes") or {}),
            labels=tuple(sorted((section.get("Labels") or {}).items())),
            stop_signal=section.get("StopSignal") or "",
            healthcheck=None if health is None else Healthcheck(
                test=tuple(health.get("Test") or ()),
                interval=int(health.get("Interval") or 0),
                timeout=int(health.get("Timeout") or 0),
                start_period=int(health.get("StartPeriod") or 0),
                start_interval=int(health.get("StartInterval") or 0),
                retries=int(health.get("Retries") or 0),
            ),
            on_build=tuple(section.get("OnBuild") or ()),
            shell=_strings(section.get("Shell")),
        ),
        layers=layers,
        history=tuple(
            History(
                created_by=item.get("created_by", ""),
                empty_layer=bool(item.get("empty_layer")),
                created=item.get("created", ""),
                comment=item.get("comment", ""),
            )
            for item in value.get("history") or []
        ),
        os=value.get("os", "linux"),
        architecture=value.get("architecture", "amd64"),
        variant=value.get("variant", ""),
        created=value.get("created", ""),
        author=value.get("author", ""),
    )


def manifest_json(config: Descriptor, layers: tuple[Layer, ...],
                  annotations: tuple[tuple[str, str], ...] = ()) -> bytes:
    value: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.to_json(),
        "layers": [Descriptor(layer.media_type, layer.digest, layer.size).to_json() for layer in layers],
    }
    if annotations:
        value["annotations"] = dict(annotations)
    return canonical_json(value)


def index_json(manifests: list[Descriptor]) -> bytes:
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [descriptor.to_json() for descriptor in manifests],
    })
