"""The files of a layer as a comparison needs them: read from its tar, each entry's metadata and content digest."""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import field
from typing import BinaryIO

from builder.fs.untar import member_parts, open_layer
from parser.dataclass import dataclass
from parser.errors import PybuildError

# Files up to this size keep their bytes, so a difference can be shown and its cause recognised.
KEPT_BYTES = 1 << 20
_TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file", tarfile.DIRTYPE: "directory",
          tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
          tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
_XATTR = "SCHILY.xattr."


@dataclass
class FileInfo:
    """One entry of a layer: what ``verify`` and ``diff`` compare (never the entry's position in the tar)."""

    type: str
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str | None
    mtime: int
    link: str | None
    xattrs: tuple[tuple[str, str], ...] = ()
    content: bytes | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        return {"type": self.type, "mode": f"{self.mode:04o}", "uid": self.uid, "gid": self.gid, "size": self.size,
                "sha256": self.sha256, "mtime": self.mtime, "link": self.link, "xattrs": dict(self.xattrs)}


def layer_files(blob: BinaryIO, label: str) -> dict[str, FileInfo]:
    """Every entry of a layer blob (any compression) by its absolute path."""
    files: dict[str, FileInfo] = {}
    try:
        with tarfile.open(fileobj=open_layer(blob), mode="r|") as archive:
            for member in archive:
                parts = member_parts(member.name, label)
                path = "/" + "/".join(parts)
                content = digest = None
                if member.isfile():
                    reader = archive.extractfile(member)
                    hasher = hashlib.sha256()
                    kept = bytearray()
                    while chunk := reader.read(1 << 20) if reader else b"":
                        hasher.update(chunk)
                        if len(kept) + len(chunk) <= KEPT_BYTES:
                            kept += chunk
                    digest = "sha256:" + hasher.hexdigest()
                    content = bytes(kept) if member.size <= KEPT_BYTES else None
                xattrs = tuple(sorted((key[len(_XATTR):], value) for key, value in member.pax_headers.items()
                                      if key.startswith(_XATTR)))
                link = ("/" + "/".join(member_parts(member.linkname, label)) if member.islnk()
                        else member.linkname if member.issym() else None)
                files[path] = FileInfo(_TYPES.get(member.type, "other"), member.mode & 0o7777, member.uid, member.gid,
                                       member.size if member.isfile() else 0, digest, int(member.mtime), link,
                                       xattrs, content)
    except (tarfile.TarError, EOFError) as exc:
        raise PybuildError(f"{label}: cannot read the layer's tar: {exc}") from None
    return files
