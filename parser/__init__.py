"""The Dockerfile language: text to typed instructions, BuildKit's dump format, `$VAR` expansion.

Names are imported on first use, so that `import parser.errors` (as the CLI does at start-up)
does not pay for the grammar and the typed AST.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DockerfileSyntaxError": "parser.errors",
    "PybuildError": "parser.errors",
    "ShellExpansionError": "parser.errors",
    "SourceRange": "parser.errors",
    "Dockerfile": "parser.instructions",
    "parse": "parser.instructions",
    "dump": "parser.nodes",
    "parse_raw": "parser.nodes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parser' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
