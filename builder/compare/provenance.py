"""Provenance: an in-toto statement with a SLSA provenance v1 predicate, written beside the image by
``pybuild build --provenance FILE`` and read back by ``pybuild verify --provenance FILE``.

It names what the build read: the Dockerfile's digest, a digest of the context as the build saw it (after
the ignore file: each entry's path, type, permission bits, and content digest or link target, never times
or owners, which the image does not take from the context), the base images by digest, the build args,
the target and SOURCE_DATE_EPOCH; the subject is the image's manifest digest. Secrets never enter it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parser.dataclass import dataclass
from parser.errors import PybuildError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:pybuild:dockerfile:v1"
BUILDER_ID = "urn:pybuild"


def context_digest(root: Path, dockerfile_path: Path | None, statement: Path | None = None) -> tuple[str, int]:
    """The context's content digest and its number of entries, after its ignore file.

    ``statement``, the provenance file itself, is left out where it lies in the context: it cannot be an input
    of the build it describes, and writing it there must not change what the next build or a verify sees.
    """
    from builder.fs.context import BuildContext
    from cache.files import sha256_file

    context = BuildContext(root, dockerfile_path=dockerfile_path)
    leave_out = str(statement.resolve()) if statement is not None else None
    lines = []
    for directory, dirs, files in os.walk(context.root):
        rel_dir = os.path.relpath(directory, context.root)
        rel_dir = "" if rel_dir == "." else rel_dir
        for name in sorted(dirs + files):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = os.path.join(directory, name)
            if path == leave_out:
                continue
            st = os.lstat(path)
            if not context.present(rel, is_dir=stat.S_ISDIR(st.st_mode)):
                if name in dirs:
                    dirs.remove(name)
                continue
            mode = f"{stat.S_IMODE(st.st_mode):04o}"
            if stat.S_ISREG(st.st_mode):
                lines.append(f"file {mode} {rel} {sha256_file(path)}")
            elif stat.S_ISLNK(st.st_mode):
                lines.append(f"link {mode} {rel} {os.readlink(path)}")
            elif stat.S_ISDIR(st.st_mode):
                lines.append(f"dir {mode} {rel}")
            else:
                lines.append(f"other {mode} {rel}")
    lines.sort()
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest(), len(lines)


def statement(*, manifest: str, names: tuple[str, ...], dockerfile: bytes, dockerfile_name: str, context: Path,
              dockerfile_path: Path | None, build_args: Mapping[str, str], target: str | None,
              named_contexts: Mapping[str, str], source_date_epoch: int, base_images: Mapping[str, str],
              compression: str, version: str, path: Path | None = None) -> dict[str, Any]:
    """The statement; ``path`` is where it will be written (left out of the context's digest)."""
    digest, entries = context_digest(context, dockerfile_path, path)
    dependencies: list[dict[str, Any]] = [
        {"name": "dockerfile", "digest": {"sha256": hashlib.sha256(dockerfile).hexdigest()}},
        {"name": "context", "digest": {"sha256": digest}, "annotations": {"entries": entries}},
    ]
    for reference, resolved in sorted(base_images.items()):
        name, _, base_digest = resolved.partition("@")
        dependencies.append({"name": f"base:{reference}", "uri": name,
                             "digest": {"sha256": base_digest.removeprefix("sha256:")}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": manifest.removeprefix("sha256:")}}
                    for name in (names or ("image",))],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"dockerfile": dockerfile_name, "target": target or "",
                                       "buildArgs": dict(sorted(build_args.items())),
                                       "namedContexts": dict(sorted(named_contexts.items()))},
                "internalParameters": {"sourceDateEpoch": source_date_epoch, "compression": compression},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {"builder": {"id": BUILDER_ID, "version": {"pybuild": version}}},
        },
    }


@dataclass
class Provenance:
    """What ``verify`` takes from a statement."""

    subject: str
    dockerfile_sha256: str
    context_sha256: str
    build_args: dict[str, str]
    target: str | None
    named_contexts: dict[str, str]
    source_date_epoch: int
    compression: str
    base_images: dict[str, str]


def read_provenance(path: Path) -> Provenance:
    try:
        value = json.loads(path.read_bytes())
    except OSError as exc:
        raise PybuildError(f"cannot read the provenance {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PybuildError(f"the provenance {path} is not JSON: {exc}") from None
    try:
        if value["_type"] != STATEMENT_TYPE or value["predicateType"] != PREDICATE_TYPE:
            raise PybuildError(f"{path} is not an in-toto statement of SLSA provenance v1")
        definition = value["predicate"]["buildDefinition"]
        if definition["buildType"] != BUILD_TYPE:
            raise PybuildError(f"{path} describes a build of type {definition['buildType']!r}, not a pybuild build")
        external, internal = definition["externalParameters"], definition["internalParameters"]
        dependencies = {item["name"]: item for item in definition["resolvedDependencies"]}
        return Provenance(
            subject="sha256:" + value["subject"][0]["digest"]["sha256"],
            dockerfile_sha256=dependencies["dockerfile"]["digest"]["sha256"],
            context_sha256=dependencies["context"]["digest"]["sha256"],
            build_args={str(key): str(item) for key, item in external.get("buildArgs", {}).items()},
            target=external.get("target") or None,
            named_contexts={str(key): str(item) for key, item in external.get("namedContexts", {}).items()},
            source_date_epoch=int(internal["sourceDateEpoch"]),
            compression=str(internal.get("compression", "zstd")),
            base_images={name.removeprefix("base:"): f"{item['uri']}@sha256:{item['digest']['sha256']}"
                         for name, item in dependencies.items() if name.startswith("base:")},
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise PybuildError(f"the provenance {path} lacks a field pybuild needs ({exc})") from None
