"""Step cache keys, and why a key differs from the one a previous build had.

A key hashes the step's inputs: a JSON value of fixed sections (see ``step_key``) that the builder fills
from the step's operation. The same sections, kept per build, let a rerun name its first cause.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from parser.dataclass import dataclass

KEY_VERSION = 1  # bumped when what a step makes from the same inputs changes


def step_key(inputs: Mapping[str, Any]) -> str:
    """The key of a step: a sha256 over its inputs, minus ``instruction`` (text shown, not an input).

    Sections: ``parent`` (the diff_ids below the step), ``op`` (the normalised operation), ``args``
    (the ARGs in scope, for RUN), ``files`` (path to digest of every context file the step reads),
    ``sources`` (other stages' and images' layers it reads), ``env`` (the build's epoch and platform).
    """
    keyed = {name: value for name, value in inputs.items() if name not in ("instruction", "base")}
    data = json.dumps({"version": KEY_VERSION, **keyed}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class MissCause:
    """Why a step ran although the previous build had it cached: a kind, a line for people, details."""

    kind: str
    text: str
    details: Mapping[str, str]


def _shown(value: str | None) -> str:
    return "(unset)" if value is None else value


def miss_cause(old: Mapping[str, Any], new: Mapping[str, Any]) -> MissCause:
    """The first difference between the inputs a step had in the previous build and has now."""
    if old.get("instruction") != new.get("instruction"):
        return MissCause("instruction", "the instruction changed", {})
    old_args, new_args = old.get("args") or {}, new.get("args") or {}
    for name in sorted(set(old_args) | set(new_args)):
        if old_args.get(name) != new_args.get(name):
            before, after = _shown(old_args.get(name)), _shown(new_args.get(name))
            return MissCause("build-arg", f"build arg {name} changed: {before} -> {after}",
                             {"arg": name, "old": before, "new": after})
    old_files, new_files = old.get("files") or {}, new.get("files") or {}
    for path in sorted(set(old_files) | set(new_files)):
        if old_files.get(path) != new_files.get(path):
            how = "was added" if path not in old_files else "was removed" if path not in new_files else "changed"
            return MissCause("file", f"file {path} {how}", {"path": path})
    if old.get("parent") != new.get("parent"):
        old_base, new_base = old.get("base") or {}, new.get("base") or {}
        if old.get("parent") == old_base.get("layers") and old_base.get("layers") != new_base.get("layers"):
            reference = new_base.get("ref", "")
            return MissCause("base", f"base image {reference} changed", {"ref": reference})
        return MissCause("parent", "a step before it changed", {})
    if old.get("sources") != new.get("sources"):
        return MissCause("parent", "a step before it changed", {})
    old_op, new_op = old.get("op") or {}, new.get("op") or {}
    old_env, new_env = dict(old_op.get("env") or ()), dict(new_op.get("env") or ())
    for name in sorted(set(old_env) | set(new_env)):
        if old_env.get(name) != new_env.get(name):
            before, after = _shown(old_env.get(name)), _shown(new_env.get(name))
            return MissCause("env", f"environment variable {name} changed: {before} -> {after}", {"name": name})
    for field in sorted(set(old_op) | set(new_op)):
        if old_op.get(field) != new_op.get(field):
            return MissCause("instruction", f"the step's {field} changed", {"field": field})
    if old.get("env") != new.get("env"):
        return MissCause("build", "the build's epoch or platform changed", {})
    return MissCause("removed", "its cached result was removed", {})
