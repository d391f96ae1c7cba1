"""Reading OCI JSON from outside pybuild: every field's type is checked, and a bad one is a one-line PybuildError."""

from __future__ import annotations

import json
from typing import Any

import pytest

from builder.oci.image import (
    MEDIA_LAYER_ZSTD,
    Descriptor,
    Healthcheck,
    History,
    Image,
    ImageConfig,
    Layer,
    canonical_json,
    config_json,
    image_from_config,
    index_from_json,
    manifest_from_json,
)
from parser.errors import PybuildError

LABEL = "app.tar: image config sha256:ab12"
DIGEST = "sha256:" + "ab" * 32
LAYER = Layer("", DIGEST, 10, MEDIA_LAYER_ZSTD)


def config(**changes: Any) -> bytes:
    """A valid one-layer config with top-level fields (or ``config`` fields, named ``c_X``) changed."""
    value: dict[str, Any] = {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=b"]},
                             "rootfs": {"type": "layers", "diff_ids": [DIGEST]}, "history": []}
    for key, item in changes.items():
        if key.startswith("c_"):
            value["config"][key[2:]] = item
        else:
            value[key] = item
    return canonical_json(value)


def test_a_full_config_reads_back_as_written() -> None:
    image = Image(
        config=ImageConfig(env=(("PATH", "/bin"), ("A", "b=c")), cmd=("sh",), entrypoint=("/init",), working_dir="/w",
                           user="1000:1000", exposed_ports=("80/tcp",), volumes=("/data",),
                           labels=(("a", "b"),), stop_signal="SIGINT",
                           healthcheck=Healthcheck(("CMD", "true"), interval=10**9, retries=3),
                           on_build=("RUN true",), shell=("/bin/sh", "-c")),
        layers=(Layer(DIGEST, DIGEST, 10, MEDIA_LAYER_ZSTD),),
        history=(History("step", empty_layer=True, created="2024-01-01T00:00:00Z", comment="c"),),
        variant="v8", created="2024-01-01T00:00:00Z", author="me",
    )
    assert image_from_config(config_json(image), (LAYER,)) == image


@pytest.mark.parametrize(("blob", "message"), [
    (b"{not json", "is not valid JSON: "),
    (b"[" * 100_000, "is not valid JSON: maximum recursion depth exceeded"),
    (b"[]", "must be a JSON object, not a list"),
    (config(config=[]), '"config" must be a JSON object, not a list'),
    (config(c_Env=5), '"Env" must be a list of strings'),
    (config(c_Env=["A=b", 1]), '"Env" must be a list of strings'),
    (config(c_Cmd="sh"), '"Cmd" must be a list of strings'),
    (config(c_Entrypoint={}), '"Entrypoint" must be a list of strings'),
    (config(c_Shell=[None]), '"Shell" must be a list of strings'),
    (config(c_OnBuild="RUN x"), '"OnBuild" must be a list of strings'),
    (config(c_Labels={"a": 1}), '"Labels" must be an object of strings'),
    (config(c_Labels=["a"]), '"Labels" must be an object of strings'),
    (config(c_ExposedPorts=["80/tcp"]), '"ExposedPorts" must be an object of objects'),
    (config(c_Volumes={"/data": 1}), '"Volumes" must be an object of objects'),
    (config(c_User=0), '"User" must be a string, not a number'),
    (config(c_WorkingDir=["/"]), '"WorkingDir" must be a string, not a list'),
    (config(c_StopSignal=9), '"StopSignal" must be a string, not a number'),
    (config(c_Healthcheck="none"), '"Healthcheck" must be a JSON object, not a string'),
    (config(c_Healthcheck={"Test": "CMD true"}), '"Healthcheck": "Test" must be a list of strings'),
    (config(c_Healthcheck={"Interval": "30s"}), '"Healthcheck.Interval" must be a non-negative integer'),
    (config(c_Healthcheck={"Retries": -1}), '"Healthcheck.Retries" must be a non-negative integer'),
    (config(rootfs=None), '"rootfs" must be a JSON object, not null'),
    (config(rootfs={"type": "layers", "diff_ids": "sha256:x"}), '"rootfs.diff_ids" must be a list of sha256 digests'),
    (config(rootfs={"type": "layers", "diff_ids": ["sha256:x"]}), '"rootfs.diff_ids" must be a list of sha256'),
    (config(rootfs={"type": "layers", "diff_ids": [5]}), '"rootfs.diff_ids" must be a list of sha256 digests'),
    (config(rootfs={"type": "other", "diff_ids": [DIGEST]}), '"rootfs.type" must be "layers"'),
    (config(rootfs={"type": "layers", "diff_ids": [DIGEST, DIGEST]}), "it lists 2 layers but its manifest has 1"),
    (config(history={}), '"history" must be a list'),
    (config(history=["step"]), "history entry 0 must be a JSON object, not a string"),
    (config(history=[{"empty_layer": "yes"}]), 'history entry 0: "empty_layer" must be true or false'),
    (config(history=[{"created_by": 1}]), 'history entry 0: "created_by" must be a string, not a number'),
    (config(os=5), '"os" must be a string, not a number'),
    (config(architecture=[]), '"architecture" must be a string, not a list'),
    (config(variant=True), '"variant" must be a string, not a boolean'),
    (config(created={}), '"created" must be a string, not an object'),
])
def test_malformed_configs(blob: bytes, message: str) -> None:
    with pytest.raises(PybuildError) as caught:
        image_from_config(blob, (LAYER,), LABEL)
    assert caught.value.message.startswith(LABEL), caught.value.message
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def descriptor(**changes: Any) -> dict[str, Any]:
    value = {"mediaType": MEDIA_LAYER_ZSTD, "digest": DIGEST, "size": 10}
    value.update(changes)
    return {key: item for key, item in value.items() if item is not ...}


@pytest.mark.parametrize(("value", "message"), [
    ([], "layer 0 must be a JSON object, not a list"),
    (descriptor(digest=...), '"digest" must be "sha256:" and 64 lowercase hex digits, not null'),
    (descriptor(digest="sha256:" + "AB" * 32), '"digest" must be "sha256:" and 64 lowercase hex digits, not'),
    (descriptor(digest="sha512:" + "ab" * 64), '"digest" must be "sha256:"'),
    (descriptor(digest="sha256:../../etc"), '"digest" must be "sha256:"'),
    (descriptor(size=-1), '"size" must be a non-negative integer, not -1'),
    (descriptor(size=True), '"size" must be a non-negative integer, not a boolean'),
    (descriptor(size=1.5), '"size" must be a non-negative integer, not a number'),
    (descriptor(size="10"), '"size" must be a non-negative integer, not a string'),
    (descriptor(mediaType=5), '"mediaType" must be a string, not a number'),
    (descriptor(annotations={"a": 1}), '"annotations" must be an object of strings'),
    (descriptor(platform=[]), '"platform" must be a JSON object, not a list'),
    (descriptor(platform={"os": 5}), '"platform.os" must be a string'),
])
def test_malformed_descriptors(value: Any, message: str) -> None:
    manifest = canonical_json({"config": descriptor(), "layers": [value]})
    with pytest.raises(PybuildError) as caught:
        manifest_from_json(manifest, "app.tar: manifest sha256:cd")
    assert caught.value.message.startswith("app.tar: manifest sha256:cd: layer 0"), caught.value.message
    assert message in caught.value.message


def test_descriptors_keep_only_string_platform_fields() -> None:
    value = descriptor(platform={"os": "linux", "architecture": "amd64", "os.features": ["x"]},
                       annotations={"a": "b"})
    assert Descriptor.from_json(value) == Descriptor(MEDIA_LAYER_ZSTD, DIGEST, 10, annotations=(("a", "b"),),
                                                     platform=(("os", "linux"), ("architecture", "amd64")))


@pytest.mark.parametrize(("document", "message"), [
    ({"layers": {}}, '"layers" must be a list of descriptors, not an object'),
    ({"layers": []}, "config must be a JSON object, not null"),
    ({"config": descriptor(), "mediaType": []}, '"mediaType" must be a string, not a list'),
])
def test_malformed_manifests(document: dict[str, Any], message: str) -> None:
    with pytest.raises(PybuildError) as caught:
        manifest_from_json(json.dumps(document).encode(), "m")
    assert caught.value.message.startswith(f"m: {message}"), caught.value.message


@pytest.mark.parametrize(("document", "expected"), [
    ({}, ()),
    ({"manifests": None}, ()),
    ({"manifests": [descriptor()]}, (Descriptor(MEDIA_LAYER_ZSTD, DIGEST, 10),)),
    ({"manifests": {}}, 'i: "manifests" must be a list of descriptors, not an object'),
    ({"manifests": [None]}, "i: entry 0 must be a JSON object, not null"),
    ([], "i must be a JSON object, not a list"),
])
def test_indexes(document: Any, expected: tuple[Descriptor, ...] | str) -> None:
    data = json.dumps(document).encode()
    if isinstance(expected, str):
        with pytest.raises(PybuildError) as caught:
            index_from_json(data, "i")
        assert caught.value.message == expected
    else:
        assert index_from_json(data, "i") == expected
