"""Parsed Dockerfiles remembered by their bytes, so a rebuild need not load the grammar library at all.

The key is the file's name and bytes and the parser's own files (their names, sizes and times): a
changed or reinstalled parser parses again. Entries are pickles of the parser's dataclasses, written
atomically into the user's own store, which nobody else writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from pathlib import Path

import parser as parser_package
from cache.files import source_stamp
from cache.index import write_atomically
from parser.instructions import Dockerfile, parse

_PARSER_DIR = Path(parser_package.__file__).parent


def parsed(source: bytes, filename: str, root: Path) -> Dockerfile:
    """``parse(source, filename)``, from ``ROOT/parsed`` when these bytes were parsed before."""
    name = filename.encode("utf-8", "surrogateescape")
    key = hashlib.sha256(source_stamp(_PARSER_DIR) + b"\0" + name + b"\0" + source)
    path = root / "parsed" / key.hexdigest()
    try:
        with open(path, "rb") as file:
            found = pickle.load(file)
        if isinstance(found, Dockerfile):
            return found
    except Exception:  # absent, damaged or from another version: any failure means parsing again
        pass
    dockerfile = parse(source, filename)  # a syntax error raises here, and nothing is remembered
    with contextlib.suppress(OSError):
        write_atomically(path, pickle.dumps(dockerfile, protocol=pickle.HIGHEST_PROTOCOL))
    return dockerfile
