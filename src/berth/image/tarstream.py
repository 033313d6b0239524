"""Streaming access to layer tarballs: decompression by magic bytes, canonical names, tar output.

Nothing here touches the host filesystem except to read the layer file itself: layers are
decompressed into a pipe (``pigz -dc`` / ``zstd -dc`` / ``xz -dc`` through :mod:`berth.proc`,
or Python's zlib when pigz is missing) and parsed as a stream.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from berth import proc
from berth.errors import ImageError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"

#: Read size for the decompressed stream and for copying member data.
COPY_CHUNK_BYTES = 1 << 20
#: tarfile's stream buffer: every 512-byte header read slices this buffer, so it must stay
#: small enough that slicing is cheap, yet large enough to avoid tiny pipe reads.
TARFILE_BUFSIZE_BYTES = 64 * 1024
BLOCK_BYTES = tarfile.BLOCKSIZE

#: Limits of Linux path names (PATH_MAX, NAME_MAX); longer names are refused.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255

#: xattr namespaces SquashFS can store; others (system.*, e.g. POSIX ACLs) are dropped.
SQUASHFS_XATTR_PREFIXES = ("user.", "trusted.", "security.")
PAX_XATTR_PREFIX = "SCHILY.xattr."

ENCODING = "utf-8"
ERRORS = "surrogateescape"


class NameRejected(ValueError):
    """A member name that cannot be placed inside the tree (a '..' component)."""


def sniff_compression(head: bytes) -> str | None:
    """'gzip', 'zstd', 'xz', 'bzip2' or None (plain tar) from the first bytes of a blob."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(BZIP2_MAGIC):
        return "bzip2"
    return None


def canonical_name(name: str) -> str:
    """The member name as a relative path without '.', empty components or a leading '/'.

    '' is the root directory. Raises NameRejected for a '..' component: such a name could
    only point outside the tree, and resolving it against symlinks is ambiguous.
    """
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise NameRejected(name)
        parts.append(part)
    return "/".join(parts)


def check_name_length(path: str) -> str | None:
    """Why ``path`` is absurdly long, or None when it fits Linux's limits."""
    encoded = path.encode(ENCODING, ERRORS)
    if len(encoded) > MAX_PATH_BYTES:
        return f"path is {len(encoded)} bytes long (limit {MAX_PATH_BYTES})"
    for part in encoded.split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            return f"a path component is {len(part)} bytes long (limit {MAX_NAME_BYTES})"
    return None


class StderrTail:
    """Drains a child's stderr in a thread (no pipe deadlock) and keeps its tail."""

    def __init__(self, stream: BinaryIO) -> None:
        self._chunks: deque[bytes] = deque(maxlen=64)
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: BinaryIO) -> None:
        for chunk in iter(lambda: stream.read(4096), b""):
            self._chunks.append(chunk)
        stream.close()

    def text(self) -> str:
        self._thread.join(timeout=5)
        return b"".join(self._chunks)[-proc.STDERR_TAIL_BYTES:].decode("utf-8", "replace").strip()


class GzipReader(io.RawIOBase):
    """Multi-member gzip decompression with zlib, used only when pigz is not installed."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._decomp = zlib.decompressobj(wbits=31)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._pending:
            if self._decomp.eof:
                # Next gzip member (a layer may be several concatenated members); trailing
                # zero padding after the last member is tolerated, as gzip itself does.
                rest = self._decomp.unused_data or self._raw.read(COPY_CHUNK_BYTES)
                while rest and not rest.strip(b"\0"):
                    rest = self._raw.read(COPY_CHUNK_BYTES)
                if not rest:
                    return 0
                self._decomp = zlib.decompressobj(wbits=31)
                data = rest
            else:
                data = self._decomp.unconsumed_tail or self._raw.read(COPY_CHUNK_BYTES)
                if not data:
                    raise EOFError("gzip stream ends early")
            self._pending = self._decomp.decompress(data, COPY_CHUNK_BYTES)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


_PROGRAMS = {"gzip": "pigz", "zstd": "zstd", "xz": "xz"}


@contextmanager
def open_decompressed(path: Path, what: str, *, prefer_programs: bool = True) -> Iterator[BinaryIO]:
    """Yield the decompressed byte stream of the blob at ``path``.

    The compression is detected from the magic bytes (media types lie: Docker uses one type for
    plain and gzip layers). The caller must read the stream to its end; a decompressor failure
    (truncated or corrupt data) raises ImageError naming ``what`` when the context exits.
    """
    with open(path, "rb") as raw:
        # pread, not read+seek: a buffered seek back inside the buffer leaves the descriptor's
        # offset at the end, and the decompressor child reads the descriptor.
        head = os.pread(raw.fileno(), 8, 0)
        kind = sniff_compression(head)
        if kind is None:
            yield raw
            return
        if kind == "bzip2":
            raise ImageError(f"{what} is bzip2-compressed, which OCI layers may not be",
                             hint="rebuild the image with gzip or zstd layers")
        program = _PROGRAMS[kind]
        if kind == "gzip" and not (prefer_programs and proc.has_program("pigz")):
            try:
                yield io.BufferedReader(GzipReader(raw), buffer_size=COPY_CHUNK_BYTES)
            except zlib.error as exc:
                raise ImageError(f"{what} is not valid gzip data: {exc}",
                                 hint="the layer blob is corrupt; remove it and pull again") from None
            return
        child = proc.start([program, "-dc"], stdin=raw, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        stderr = StderrTail(child.stderr)
        ok = False
        try:
            yield child.stdout
            ok = True
        finally:
            if not ok:
                child.kill()
            child.stdout.close()
            status = child.wait()
            tail = stderr.text()
        if status != 0:
            raise ImageError(
                f"{what} cannot be decompressed ({program} {proc.describe_status(status)})"
                + (f": {tail}" if tail else ""),
                hint="the layer blob is truncated or corrupt; remove it from the store and pull again",
            )


def read_exactly(stream: BinaryIO, size: int) -> Iterator[bytes]:
    """Yield ``size`` bytes from ``stream`` in large chunks; raise EOFError when it ends early."""
    remaining = size
    while remaining:
        chunk = stream.read(min(remaining, COPY_CHUNK_BYTES))
        if not chunk:
            raise EOFError(f"{remaining} of {size} bytes missing")
        remaining -= len(chunk)
        yield chunk


class TarWriter:
    """Writes a PAX tar stream with canonical names to a binary sink (tar2sqfs' stdin)."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink

    def header(self, info: tarfile.TarInfo) -> None:
        self._sink.write(info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS))

    def data(self, chunks: Iterator[bytes], size: int) -> None:
        write = self._sink.write
        for chunk in chunks:
            write(chunk)
        padding = -size % BLOCK_BYTES
        if padding:
            write(b"\0" * padding)

    def close(self) -> None:
        self._sink.write(b"\0" * (2 * BLOCK_BYTES))
        self._sink.flush()


def output_info(source: tarfile.TarInfo, name: str, *, kind: bytes | None = None,
                linkname: str = "", xattrs: dict[str, str] | None = None) -> tarfile.TarInfo:
    """A fresh header for the output stream: canonical name, numeric owner, no stale pax keys.

    The source's pax headers are *not* copied wholesale: a pax ``path`` record would override
    the canonical name. Only xattrs travel, as ``SCHILY.xattr.*`` records.
    """
    info = tarfile.TarInfo(name)
    info.type = kind if kind is not None else source.type
    info.mode = source.mode & 0o7777
    info.uid = source.uid
    info.gid = source.gid
    info.mtime = int(source.mtime) if source.mtime >= 0 else 0
    info.uname = ""
    info.gname = ""
    info.linkname = linkname
    info.devmajor = source.devmajor
    info.devminor = source.devminor
    info.size = source.size if info.type == tarfile.REGTYPE else 0
    if xattrs:
        info.pax_headers = {PAX_XATTR_PREFIX + key: value for key, value in xattrs.items()}
    return info


def member_xattrs(info: tarfile.TarInfo) -> tuple[dict[str, str], list[str]]:
    """(xattrs SquashFS can keep, names of those it cannot) from a member's pax records."""
    kept: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in info.pax_headers.items():
        if not key.startswith(PAX_XATTR_PREFIX):
            continue
        attr = key[len(PAX_XATTR_PREFIX):]
        if attr.startswith(SQUASHFS_XATTR_PREFIXES):
            kept[attr] = value
        else:
            dropped.append(attr)
    return kept, dropped
