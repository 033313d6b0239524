"""Helpers shared by the flatten tests: layer tarballs built in memory, SquashFS read back.

The SquashFS is read back with ``sqfs2tar`` (every compression, xattrs included) and listed
with ``unsquashfs -lln`` where numeric ``ls -l`` output is what a test compares.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from berth.image.flatten import Layer
from berth.oci.digest import Digest


@dataclass
class E:
    """One tar member to put in a test layer."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    link: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)
    size: int | None = None  # a lying size, for hostile members
    mtime: float = 1_700_000_000


def f(name: str, data: bytes | str = b"", **kw) -> E:
    return E(name, tarfile.REGTYPE, data.encode() if isinstance(data, str) else data, **kw)


def d(name: str, **kw) -> E:
    return E(name, tarfile.DIRTYPE, **kw)


def sym(name: str, target: str, **kw) -> E:
    return E(name, tarfile.SYMTYPE, link=target, **kw)


def hard(name: str, target: str, **kw) -> E:
    return E(name, tarfile.LNKTYPE, link=target, **kw)


def layer_tar(entries: list[E]) -> bytes:
    """A PAX tar holding ``entries`` in order, names exactly as given (no normalization)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.kind
            default = 0o755 if entry.kind == tarfile.DIRTYPE else 0o644
            info.mode = default if entry.mode is None else entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.linkname = entry.link
            info.devmajor, info.devminor = entry.devmajor, entry.devminor
            info.mtime = entry.mtime
            info.pax_headers = dict(entry.pax)
            if entry.kind == tarfile.REGTYPE:
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    return out.getvalue()


def write_layer(directory: Path, entries: list[E] | bytes, compression: str = "gzip") -> Layer:
    data = entries if isinstance(entries, bytes) else layer_tar(entries)
    if compression == "gzip":
        blob, media = gzip.compress(data, compresslevel=1), "application/vnd.oci.image.layer.v1.tar+gzip"
    elif compression == "zstd":
        blob = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
        media = "application/vnd.oci.image.layer.v1.tar+zstd"
    else:
        blob, media = data, "application/vnd.oci.image.layer.v1.tar"
    digest = Digest("sha256", hashlib.sha256(blob).hexdigest())
    path = directory / f"{digest.hex}.blob"
    path.write_bytes(blob)
    return Layer(path, media, digest)


@dataclass
class Node:
    kind: str
    mode: int
    uid: int
    gid: int
    data: bytes = b""
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    #: For a hard link: the first name of the same inode (as sqfs2tar lists it).
    inode_of: str = ""
    mtime: int = 0


_KIND = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
         tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def read_tree(image: Path) -> dict[str, Node]:
    """Every path of the SquashFS (root as '.') with type, mode, owner, contents, xattrs.

    A hard link reads as a file with its inode's contents and ``inode_of`` naming the first
    name of that inode (both names then have ``inode_of`` set, the first to itself).
    """
    tar = subprocess.run(["sqfs2tar", "--root-becomes", ".", str(image)], capture_output=True, check=True).stdout
    tree: dict[str, Node] = {}
    with tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8", errors="surrogateescape") as archive:
        for info in archive:
            name = info.name[2:] if info.name.startswith("./") else info.name
            name = name.rstrip("/") or "."
            xattrs = {key[len("SCHILY.xattr."):]: value.encode("utf-8", "surrogateescape")
                      for key, value in info.pax_headers.items() if key.startswith("SCHILY.xattr.")}
            node = Node(_KIND[info.type], info.mode, info.uid, info.gid, link=info.linkname,
                        dev=(info.devmajor, info.devminor), xattrs=xattrs, mtime=int(info.mtime))
            if info.isreg():
                node.data = archive.extractfile(info).read()
            if info.islnk():
                first = info.linkname[2:] if info.linkname.startswith("./") else info.linkname
                target = tree[first]
                node.kind, node.data, node.inode_of, node.link = "file", target.data, first, ""
                target.inode_of = first
            tree[name] = node
    return tree


def lln(image: Path) -> dict[str, str]:
    """``unsquashfs -lln`` as {path: 'perms owner'}: numeric owners, from squashfs-tools itself."""
    out = subprocess.run(["unsquashfs", "-lln", str(image)], capture_output=True, text=True, check=True).stdout
    listing = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6 or "squashfs-root" not in line:
            continue
        path = line[line.index("squashfs-root"):].split(" -> ")[0]
        path = path[len("squashfs-root"):].lstrip("/") or "."
        listing[path] = f"{fields[0]} {fields[1]}"
    return listing


def cat(image: Path, path: str) -> bytes:
    return subprocess.run(["unsquashfs", "-cat", str(image), path], capture_output=True, check=True).stdout
