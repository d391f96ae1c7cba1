"""The disk a tree of the store takes (an unpacked layer, a cache mount's directory), and what removing it frees.

Counted in allocated blocks. A file with several names counts for the share of them the tree holds: a copy
links the unchanged files of the layer it made before, so two layers may hold one file, and the sizes of
all trees then add up to the disk they take. Removing a tree frees only the files that have no name
elsewhere.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from parser.dataclass import dataclass


@dataclass
class TreeUsage:
    taken: int  # bytes, shared files by this tree's share of their names
    freed: int  # bytes removing the tree would free


def tree_usage(top: Path) -> TreeUsage:
    """What ``top`` takes and would free; entries removed while it is measured count as gone."""
    shared: dict[tuple[int, int], list] = {}  # inode: [its stat, its names here]
    taken = 0
    pending = [os.fspath(top)]
    while pending:
        path = pending.pop()
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                with os.scandir(path) as entries:
                    pending.extend(entry.path for entry in entries)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
            taken += st.st_blocks * 512
        else:
            shared.setdefault((st.st_dev, st.st_ino), [st, 0])[1] += 1
    freed = taken
    for st, names in shared.values():
        taken += st.st_blocks * 512 * min(names, st.st_nlink) // st.st_nlink
        freed += st.st_blocks * 512 if names >= st.st_nlink else 0
    return TreeUsage(taken, freed)
