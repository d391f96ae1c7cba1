"""An image as plain values (config, layers, history) and its OCI JSON: config, manifest, index.

The JSON is written deterministically (fixed key order, no whitespace) so the same build gives
the same digests. JSON read back (from archives, layouts, the store) has every field's type checked:
a malformed document is a one-line PybuildError that names it, never a TypeError further on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import field, replace
from typing import Any

from parser.dataclass import dataclass
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
DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


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
    def from_json(cls, value: Any, label: str = "descriptor") -> Descriptor:
        """Read a descriptor, checking every field's type; ``label`` names it in errors."""
        value = json_object(value, label)
        digest = value.get("digest")
        if not isinstance(digest, str) or not DIGEST_PATTERN.fullmatch(digest):
            given = f"{digest!r:.80}" if isinstance(digest, str) else _json_type(digest)
            raise PybuildError(f'{label}: "digest" must be "sha256:" and 64 lowercase hex digits, not {given}')
        size = value.get("size")
        if not _is_int(size) or size < 0:
            given = str(size) if _is_int(size) else _json_type(size)
            raise PybuildError(f'{label}: "size" must be a non-negative integer, not {given}')
        platform = _optional_object(value, "platform", label)
        for key in ("os", "architecture", "variant"):
            if not isinstance(platform.get(key, ""), str):
                raise PybuildError(f'{label}: "platform.{key}" must be a string')
        return cls(
            media_type=_optional_string(value, "mediaType", label),
            digest=digest,
            size=size,
            annotations=_string_map(value, "annotations", label),
            # Only the string fields (os, architecture, variant, os.version) matter here; os.features lists do not.
            platform=tuple((key, item) for key, item in platform.items() if isinstance(item, str)),
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


def parse_json(data: bytes, label: str) -> Any:
    """A JSON document from outside pybuild (an archive, a layout, the store), or a PybuildError naming it."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise PybuildError(f"{label} is not valid JSON: {str(exc)[:200]}") from None


def json_object(value: Any, label: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PybuildError(f"{label} must be a JSON object, not {_json_type(value)}")
    return value


def _optional_object(value: dict[str, Any], key: str, label: str) -> dict[str, Any]:
    item = value.get(key)
    return {} if item is None else json_object(item, f'{label}: "{key}"')


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "a number"), (float, "a number"),
                       (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_string(value: dict[str, Any], key: str, label: str) -> str:
    item = value.get(key)
    if item is None:
        return ""
    if not isinstance(item, str):
        raise PybuildError(f'{label}: "{key}" must be a string, not {_json_type(item)}')
    return item


def _string_list(value: dict[str, Any], key: str, label: str) -> tuple[str, ...] | None:
    item = value.get(key)
    if item is None:
        return None
    if not isinstance(item, list) or not all(isinstance(entry, str) for entry in item):
        raise PybuildError(f'{label}: "{key}" must be a list of strings')
    return tuple(item)


def _string_map(value: dict[str, Any], key: str, label: str) -> tuple[tuple[str, str], ...]:
    item = value.get(key)
    if item is None:
        return ()
    if not isinstance(item, dict) or not all(isinstance(entry, str) for entry in item.values()):
        raise PybuildError(f'{label}: "{key}" must be an object of strings')
    return tuple(item.items())


def _key_set(value: dict[str, Any], key: str, label: str) -> tuple[str, ...]:
    """Docker's sets (ExposedPorts, Volumes): an object whose keys matter and whose values are empty objects."""
    item = value.get(key)
    if item is None:
        return ()
    if not isinstance(item, dict) or not all(isinstance(entry, dict) for entry in item.values()):
        raise PybuildError(f'{label}: "{key}" must be an object of objects')
    return tuple(item)


def _duration(value: dict[str, Any], key: str, label: str) -> int:
    item = value.get(key)
    if item is None:
        return 0
    if not _is_int(item) or item < 0:
        raise PybuildError(f'{label}: "Healthcheck.{key}" must be a non-negative integer')
    return item


def _healthcheck(section: dict[str, Any], label: str) -> Healthcheck | None:
    if section.get("Healthcheck") is None:
        return None
    health = _optional_object(section, "Healthcheck", label)
    return Healthcheck(
        test=_string_list(health, "Test", f'{label}: "Healthcheck"') or (),
        interval=_duration(health, "Interval", label),
        timeout=_duration(health, "Timeout", label),
        start_period=_duration(health, "StartPeriod", label),
        start_interval=_duration(health, "StartInterval", label),
        retries=_duration(health, "Retries", label),
    )


def _history(value: dict[str, Any], label: str) -> tuple[History, ...]:
    items = value.get("history")
    if items is None:
        return ()
    if not isinstance(items, list):
        raise PybuildError(f'{label}: "history" must be a list')
    history = []
    for number, item in enumerate(items):
        where = f"{label}: history entry {number}"
        item = json_object(item, where)
        empty_layer = item.get("empty_layer")
        if empty_layer is not None and not isinstance(empty_layer, bool):
            raise PybuildError(f'{where}: "empty_layer" must be true or false')
        history.append(History(created_by=_optional_string(item, "created_by", where), empty_layer=bool(empty_layer),
                               created=_optional_string(item, "created", where),
                               comment=_optional_string(item, "comment", where)))
    return tuple(history)


def _diff_ids(value: dict[str, Any], label: str) -> list[str]:
    rootfs = json_object(value.get("rootfs"), f'{label}: "rootfs"')
    if rootfs.get("type", "layers") != "layers":
        raise PybuildError(f'{label}: "rootfs.type" must be "layers"')
    diff_ids = rootfs.get("diff_ids")
    if diff_ids is None:
        return []
    if not isinstance(diff_ids, list) or not all(
            isinstance(diff_id, str) and DIGEST_PATTERN.fullmatch(diff_id) for diff_id in diff_ids):
        raise PybuildError(f'{label}: "rootfs.diff_ids" must be a list of sha256 digests')
    return diff_ids


def image_from_config(config: bytes, layers: tuple[Layer, ...], label: str = "image config") -> Image:
    """Read an OCI or Docker image config blob; ``layers`` come from the manifest, bottom-up.

    Every field is checked for its type, so a malformed config is a PybuildError whose message
    starts with ``label`` (which names the config and where it came from).
    """
    value = json_object(parse_json(config, label), label)
    section = _optional_object(value, "config", label)
    diff_ids = _diff_ids(value, label)
    if len(diff_ids) != len(layers):
        raise PybuildError(f"{label}: it lists {len(diff_ids)} layers but its manifest has {len(layers)}")
    layers = tuple(replace(layer, diff_id=diff_id) for layer, diff_id in zip(layers, diff_ids, strict=True))
    env = []
    for item in _string_list(section, "Env", label) or ():
        key, _, val = item.partition("=")
        env.append((key, val))
    return Image(
        config=ImageConfig(
            env=tuple(env),
            cmd=_string_list(section, "Cmd", label),
            entrypoint=_string_list(section, "Entrypoint", label),
            working_dir=_optional_string(section, "WorkingDir", label),
            user=_optional_string(section, "User", label),
            exposed_ports=_key_set(section, "ExposedPorts", label),
            volumes=_key_set(section, "Volumes", label),
            labels=tuple(sorted(_string_map(section, "Labels", label))),
            stop_signal=_optional_string(section, "StopSignal", label),
            healthcheck=_healthcheck(section, label),
            on_build=_string_list(section, "OnBuild", label) or (),
            shell=_string_list(section, "Shell", label),
        ),
        layers=layers,
        history=_history(value, label),
        os=_optional_string(value, "os", label) or "linux",
        architecture=_optional_string(value, "architecture", label) or "amd64",
        variant=_optional_string(value, "variant", label),
        created=_optional_string(value, "created", label),
        author=_optional_string(value, "author", label),
    )


def manifest_from_json(data: bytes, label: str) -> tuple[str, Descriptor, tuple[Descriptor, ...]]:
    """An image manifest's own media type (empty when it states none), its config and its layer descriptors."""
    value = json_object(parse_json(data, label), label)
    layers = value.get("layers")
    if layers is None:
        layers = []
    if not isinstance(layers, list):
        raise PybuildError(f'{label}: "layers" must be a list of descriptors, not {_json_type(layers)}')
    return (_optional_string(value, "mediaType", label), Descriptor.from_json(value.get("config"), f"{label}: config"),
            tuple(Descriptor.from_json(item, f"{label}: layer {number}") for number, item in enumerate(layers)))


def index_from_json(data: bytes, label: str) -> tuple[Descriptor, ...]:
    """The descriptors an image index (or an OCI layout's index.json) lists."""
    value = json_object(parse_json(data, label), label)
    _optional_string(value, "mediaType", label)
    manifests = value.get("manifests")
    if manifests is None:
        manifests = []
    if not isinstance(manifests, list):
        raise PybuildError(f'{label}: "manifests" must be a list of descriptors, not {_json_type(manifests)}')
    return tuple(Descriptor.from_json(item, f"{label}: entry {number}") for number, item in enumerate(manifests))


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
