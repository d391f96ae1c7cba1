"""What each step of the last build of a Dockerfile and target had as inputs, to explain the next build's misses.

One record per (Dockerfile, target), keyed by a hash of both, under ``ROOT/builds``; it maps a step's place
(stage and position) to its key and inputs. A build reads the previous record before it starts and writes
its own at the end, so a build of another target in between does not lose the comparison.
"""

from __future__ import annotations

import hashlib
import marshal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cache.index import write_atomically


class BuildRecords:
    def __init__(self, root: Path) -> None:
        self.root = root / "builds"

    @staticmethod
    def identity(dockerfile: Path | None, context: Path, target: str | None) -> str:
        """Which Dockerfile and target a record is of: the file's absolute path (a Dockerfile read from
        stdin counts as the context's ``Dockerfile``) and the target's name."""
        path = str(dockerfile or context.resolve() / "Dockerfile")
        return hashlib.sha256(f"{path}\0{target or ''}".encode("utf-8", "surrogateescape")).hexdigest()

    def has(self, identity: str) -> bool:
        """Whether a build of that Dockerfile and target left a record here."""
        return (self.root / identity).is_file()

    def load(self, identity: str) -> dict[str, Any]:
        """The previous build's steps: place to {"key": ..., "inputs": ...}; empty when there was none."""
        try:
            with open(self.root / identity, "rb") as file:
                value = marshal.load(file)
        except (OSError, EOFError, ValueError, TypeError):
            return {}
        steps = value.get("steps") if isinstance(value, dict) else None
        return steps if isinstance(steps, dict) else {}

    def save(self, identity: str, steps: Mapping[str, Any]) -> None:
        """Written whole or not at all; marshal, as a record holds a digest per context file read."""
        write_atomically(self.root / identity, marshal.dumps({"steps": dict(steps)}))

    def remove_all(self) -> int:
        if not self.root.is_dir():
            return 0
        removed = 0
        for entry in self.root.iterdir():
            entry.unlink(missing_ok=True)
            removed += 1
        return removed
