"""Two images compared: layers paired by position, the files of each differing pair, the config field by field,
and the causes recognised (a time not clamped, a time embedded in a file, a listing in another order, a moved base).

The result is plain data (``Comparison``); ``render_text`` and ``to_json`` show it. The JSON schema is in the README.
"""

from __future__ import annotations

import difflib
import gzip
import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any, BinaryIO

from builder.compare.files import FileInfo, layer_files
from builder.oci.image import Image
from parser.dataclass import dataclass

MAX_DIFF_LINES = 12


@dataclass
class Side:
    """One image of a comparison: what names it, its digests, its layers and its config JSON."""

    reference: str
    manifest: str
    config_digest: str
    image: Image
    config: dict[str, Any]
    open_blob: Callable[[str], BinaryIO]


@dataclass
class FileDifference:
    path: str
    changes: list[str]
    a: FileInfo | None
    b: FileInfo | None
    diff: str | None = None
    causes: list[str] = field(default_factory=list)


@dataclass
class LayerComparison:
    index: int
    status: str  # equal, differs, only-a, only-b
    created_by: str | None
    a: tuple[str, str] | None  # diff_id, digest
    b: tuple[str, str] | None
    line: int | None = None
    files: list[FileDifference] = field(default_factory=list)


@dataclass
class ConfigDifference:
    field: str
    a: Any
    b: Any


@dataclass
class Comparison:
    a: Side
    b: Side
    layers: list[LayerComparison]
    config: list[ConfigDifference]
    causes: list[str]
    provenance: list[str] = field(default_factory=list)  # where the source is not what a provenance names

    @property
    def identical(self) -> bool:
        return not self.provenance and (self.a.manifest == self.b.manifest or (
            all(layer.status == "equal" for layer in self.layers) and not self.config))


def _layer_steps(image: Image) -> list[str | None]:
    """The history entry that made each layer (entries without a layer skipped), or None where there is none."""
    entries = [entry.created_by for entry in image.history if not entry.empty_layer]
    return [entries[index] if index < len(entries) else None for index in range(len(image.layers))]


def compare_images(a: Side, b: Side, line_of: Callable[[str], int | None] = lambda text: None) -> Comparison:
    """Compare ``a`` and ``b``; ``line_of`` gives a history entry's Dockerfile line where it is known (verify)."""
    steps_a, steps_b = _layer_steps(a.image), _layer_steps(b.image)
    layers = []
    for index in range(max(len(a.image.layers), len(b.image.layers))):
        layer_a = a.image.layers[index] if index < len(a.image.layers) else None
        layer_b = b.image.layers[index] if index < len(b.image.layers) else None
        created_by = (steps_b[index] if layer_b is not None else None) or (
            steps_a[index] if layer_a is not None else None)
        pair_a = (layer_a.diff_id, layer_a.digest) if layer_a else None
        pair_b = (layer_b.diff_id, layer_b.digest) if layer_b else None
        if layer_a is None or layer_b is None:
            status = "only-b" if layer_a is None else "only-a"
        else:
            status = "equal" if layer_a.diff_id == layer_b.diff_id else "differs"
        files = []
        if status != "equal":
            files = compare_files(_files(a, layer_a.digest) if layer_a else {},
                                  _files(b, layer_b.digest) if layer_b else {})
        layers.append(LayerComparison(index + 1, status, created_by, pair_a, pair_b,
                                      line_of(created_by) if created_by else None, files))
    config = compare_configs(a.config, b.config)
    return Comparison(a, b, layers, config, _global_causes(a, b, config))


def _files(side: Side, digest: str) -> dict[str, FileInfo]:
    with side.open_blob(digest) as blob:
        return layer_files(blob, f"{side.reference}: layer {digest}")


def compare_files(files_a: dict[str, FileInfo], files_b: dict[str, FileInfo]) -> list[FileDifference]:
    differences = []
    for path in sorted(set(files_a) | set(files_b)):
        a, b = files_a.get(path), files_b.get(path)
        if a is None or b is None:
            differences.append(FileDifference(path, ["only-b" if a is None else "only-a"], a, b))
            continue
        changes = []
        if a.type != b.type:
            changes.append("type")
        if a.type == b.type and (a.sha256 != b.sha256 or a.size != b.size):
            changes.append("content")
        if a.mode != b.mode:
            changes.append("mode")
        if (a.uid, a.gid) != (b.uid, b.gid):
            changes.append("owner")
        if a.link != b.link:
            changes.append("link")
        if a.xattrs != b.xattrs:
            changes.append("xattrs")
        if a.mtime != b.mtime:
            changes.append("mtime")
        if changes:
            diff = _text_diff(path, a, b) if "content" in changes else None
            differences.append(FileDifference(path, changes, a, b, diff,
                                              _file_causes(path, FileDifference(path, changes, a, b))))
    return differences


def _text(info: FileInfo) -> list[str] | None:
    if info.content is None or b"\0" in info.content[:8192]:
        return None
    try:
        return info.content.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None


def _text_diff(path: str, a: FileInfo, b: FileInfo) -> str | None:
    lines_a, lines_b = _text(a), _text(b)
    if lines_a is None or lines_b is None:
        return None
    diff = list(difflib.unified_diff(lines_a, lines_b, f"A{path}", f"B{path}", lineterm="", n=1))
    if len(diff) > MAX_DIFF_LINES:
        diff = [*diff[:MAX_DIFF_LINES], f"... ({len(diff) - MAX_DIFF_LINES} more lines)"]
    return "\n".join(diff) or None


def _file_causes(path: str, difference: FileDifference) -> list[str]:
    a, b, changes = difference.a, difference.b, difference.changes
    assert a is not None and b is not None
    causes = []
    if changes == ["mtime"]:
        causes.append(f"timestamp not clamped: only the file's time differs ({a.mtime} vs {b.mtime}); a step set it "
                      "from the clock or kept a source's time (SOURCE_DATE_EPOCH, touch -d @$SOURCE_DATE_EPOCH)")
    if "content" not in changes or a.content is None or b.content is None:
        return causes
    if path.endswith(".pyc") and len(a.content) == len(b.content) and a.content[:8] == b.content[:8] \
            and a.content[16:] == b.content[16:]:
        causes.append("a .pyc embeds its source's time: its header differs, its code does not (compile with "
                      "SOURCE_DATE_EPOCH set, or --invalidation-mode checked-hash)")
    elif a.content[:2] == b.content[:2] == b"\x1f\x8b":
        try:
            same = gzip.decompress(a.content) == gzip.decompress(b.content)
        except (OSError, EOFError, zlib.error):
            same = False
        if same:
            causes.append("a gzip file embeds a time (or a name) in its header: the compressed data is the same "
                          "(use gzip -n)")
    else:
        lines_a, lines_b = _text(a), _text(b)
        if lines_a is not None and lines_b is not None and lines_a != lines_b and sorted(lines_a) == sorted(lines_b):
            causes.append("the same lines in another order: a listing in directory order, which differs between "
                          "filesystems (sort it)")
    return causes


_CONFIG_FIELDS = ("User", "Env", "Entrypoint", "Cmd", "WorkingDir", "Labels", "ExposedPorts", "Volumes",
                  "StopSignal", "Healthcheck", "Shell", "OnBuild", "ArgsEscaped")


def compare_configs(a: dict[str, Any], b: dict[str, Any]) -> list[ConfigDifference]:
    differences = []
    for key in ("architecture", "os", "variant", "created", "author"):
        if a.get(key) != b.get(key):
            differences.append(ConfigDifference(key, a.get(key), b.get(key)))
    section_a, section_b = a.get("config") or {}, b.get("config") or {}
    for key in sorted(set(section_a) | set(section_b), key=lambda name: (name not in _CONFIG_FIELDS, name)):
        if section_a.get(key) != section_b.get(key):
            differences.append(ConfigDifference(key, section_a.get(key), section_b.get(key)))
    history_a = [entry.get("created_by") for entry in a.get("history") or []]
    history_b = [entry.get("created_by") for entry in b.get("history") or []]
    if history_a != history_b:
        first = next((index for index, (x, y) in enumerate(zip(history_a, history_b, strict=False)) if x != y),
                     min(len(history_a), len(history_b)))
        differences.append(ConfigDifference(
            f"history[{first}]", history_a[first] if first < len(history_a) else None,
            history_b[first] if first < len(history_b) else None))
    return differences


def _global_causes(a: Side, b: Side, config: Sequence[ConfigDifference]) -> list[str]:
    causes = []
    from_a = [entry.created_by for entry in a.image.history if entry.created_by.startswith("FROM ")]
    from_b = [entry.created_by for entry in b.image.history if entry.created_by.startswith("FROM ")]
    for entry_a, entry_b in zip(from_a, from_b, strict=False):
        name_a, _, digest_a = entry_a.removeprefix("FROM ").partition("@")
        name_b, _, digest_b = entry_b.removeprefix("FROM ").partition("@")
        if name_a == name_b and digest_a != digest_b:
            causes.append(f"base image moved: FROM {name_a} resolved to {digest_a} in A and to {digest_b} in B")
    if any(difference.field == "created" for difference in config):
        causes.append("the images' created times differ: they were built with different SOURCE_DATE_EPOCH values")
    return causes


# Rendering


def _short(digest: str | None) -> str:
    return (digest or "")[7:19] + "…" if digest else "-"


def _size(info: FileInfo) -> str:
    return f"{info.size} bytes {info.sha256[:19] + '…' if info.sha256 else ''}".strip()


def _describe(difference: FileDifference) -> str:
    a, b = difference.a, difference.b
    if a is None:
        return "only in B"
    if b is None:
        return "only in A"
    parts = []
    for change in difference.changes:
        if change == "content":
            parts.append(f"content ({_size(a)} → {_size(b)})")
        elif change == "mode":
            parts.append(f"mode {a.mode:04o} → {b.mode:04o}")
        elif change == "owner":
            parts.append(f"owner {a.uid}:{a.gid} → {b.uid}:{b.gid}")
        elif change == "link":
            parts.append(f"link target {a.link} → {b.link}")
        elif change == "mtime":
            parts.append(f"mtime {a.mtime} → {b.mtime}")
        elif change == "type":
            parts.append(f"type {a.type} → {b.type}")
        elif change == "xattrs":
            parts.append(f"xattrs {dict(a.xattrs)} → {dict(b.xattrs)}")
    return ", ".join(parts)


def _step(layer: LayerComparison, dockerfile: str) -> str:
    text = (layer.created_by or "(no history entry)").replace("\n", " ")
    text = text if len(text) <= 100 else text[:99] + "…"
    return f"{dockerfile}:{layer.line}: {text}" if layer.line else text


def render_text(comparison: Comparison, dockerfile: str = "Dockerfile") -> list[str]:
    a, b = comparison.a, comparison.b
    lines = [f"A: {a.reference} (manifest {a.manifest})", f"B: {b.reference} (manifest {b.manifest})"]
    for layer in comparison.layers:
        where = _step(layer, dockerfile)
        if layer.status == "equal":
            lines.append(f"layer {layer.index}: equal ({_short(layer.a[0] if layer.a else None)}) {where}")
            continue
        label = {"differs": "differs", "only-a": "only in A", "only-b": "only in B"}[layer.status]
        lines.append(f"layer {layer.index}: {label} {where}")
        for difference in layer.files:
            lines.append(f"  {difference.path}: {_describe(difference)}")
            if difference.diff:
                lines.extend(f"    {line}" for line in difference.diff.splitlines())
            lines.extend(f"    cause: {cause}" for cause in difference.causes)
    for difference in comparison.config:
        lines.append(f"config: {difference.field}: {json.dumps(difference.a)} → {json.dumps(difference.b)}")
    lines.extend(f"cause: {cause}" for cause in comparison.causes)
    lines.extend(f"provenance: {mismatch}" for mismatch in comparison.provenance)
    differing = sum(layer.status != "equal" for layer in comparison.layers)
    files = sum(len(layer.files) for layer in comparison.layers)
    lines.append(f"differs: {differing} of {len(comparison.layers)} layers ({files} files), "
                 f"{len(comparison.config)} config fields")
    return lines


def to_json(comparison: Comparison) -> dict[str, Any]:
    def side(value: Side) -> dict[str, str]:
        return {"reference": value.reference, "manifest": value.manifest, "config": value.config_digest}

    def pair(value: tuple[str, str] | None) -> dict[str, str] | None:
        return None if value is None else {"diff_id": value[0], "digest": value[1]}

    return {
        "identical": comparison.identical,
        "a": side(comparison.a), "b": side(comparison.b),
        "layers": [{"index": layer.index, "status": layer.status, "created_by": layer.created_by, "line": layer.line,
                    "a": pair(layer.a), "b": pair(layer.b),
                    "files": [{"path": item.path, "changes": item.changes,
                               "a": item.a.to_json() if item.a else None, "b": item.b.to_json() if item.b else None,
                               "diff": item.diff, "causes": item.causes} for item in layer.files]}
                   for layer in comparison.layers],
        "config": [{"field": item.field, "a": item.a, "b": item.b} for item in comparison.config],
        "causes": comparison.causes,
        "provenance": comparison.provenance,
    }
