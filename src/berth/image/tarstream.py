"""Streaming access to layer tarballs: decompression by magic bytes, canonical names, tar output.

Nothing here touches the host filesystem except to read the layer file itself: layers are
decompressed into a pipe (``pigz -dc`` / ``zstd -dc`` / ``xz -dc`` through :mod:`berth.proc`,
or Python's zlib when pigz is missing) and parsed as a stream.
"""

from __future__ import annotations

import fcntl
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
#: Members up to this size are copied through Python's buffer (one read, no extra syscalls);
#: larger ones are spliced pipe to pipe by the kernel.
SMALL_MEMBER_BYTES = 64 * 1024
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


def check_name_length(path: str, *, components: bool = True) -> str | None:
    """Why ``path`` is absurdly long, or None when it fits Linux's limits (PATH_MAX, and
    NAME_MAX per component unless ``components`` is false, as for symlink targets)."""
    encoded = path.encode(ENCODING, ERRORS)
    if len(encoded) > MAX_PATH_BYTES:
        return f"path is {len(encoded)} bytes long (limit {MAX_PATH_BYTES})"
    if not components:
        return None
    for part in encoded.split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            return f"a path component is {len(part)} bytes long (limit {MAX_NAME_BYTES})"
    return None


#: Pipes between the stages (decompressor → berth → tar2sqfs) are enlarged to this, so
#: that the three processes run side by side instead of waking each other per 64 KiB.
PIPE_BYTES = 1 << 20


def enlarge_pipe(fd: int, size_bytes: int = PIPE_BYTES) -> None:
    """Best effort F_SETPIPE_SZ (Linux); an unprivileged caller is capped at pipe-max-size."""
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size_bytes)
    except OSError:
        pass


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


class ByteSource:
    """A byte stream read exactly, from a descriptor when there is one (then member data can
    be spliced to the output pipe without passing through Python) or from a file object.

    Also the ``fileobj`` of the shim handed to :meth:`tarfile.TarInfo.fromtarfile`, which
    needs only ``read`` and ``tell``.
    """

    def __init__(self, fileobj: BinaryIO | None = None, fd: int | None = None) -> None:
        self._fileobj = fileobj
        self._fd = fd
        self._position = 0
        self._scratch = bytearray(COPY_CHUNK_BYTES)

    def tell(self) -> int:
        return self._position

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the stream."""
        if self._fd is None:
            data = self._fileobj.read(size)
        else:
            data = os.read(self._fd, size)
        if data and len(data) < size:
            parts = [data]
            got = len(data)
            while got < size:
                more = os.read(self._fd, size - got) if self._fd is not None \
                    else self._fileobj.read(size - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self._position += len(data)
        return data

    def copy_to(self, sink: "ByteSink", size: int) -> None:
        """Copy ``size`` bytes to ``sink``; raise EOFError when the stream ends first."""
        if size <= SMALL_MEMBER_BYTES or self._fd is None or sink.fd is None:
            remaining = size
            while remaining:
                chunk = self.read(min(remaining, COPY_CHUNK_BYTES))
                if not chunk:
                    raise EOFError(f"{remaining} of {size} bytes of data missing")
                sink.write(chunk)
                remaining -= len(chunk)
            return
        sink.flush()
        remaining = size
        while remaining:
            moved = os.splice(self._fd, sink.fd, remaining)
            if moved == 0:
                raise EOFError(f"{remaining} of {size} bytes of data missing")
            remaining -= moved
            self._position += moved

    def skip(self, size: int) -> None:
        """Discard ``size`` bytes (member data nobody wants)."""
        view = memoryview(self._scratch)
        remaining = size
        while remaining:
            step = min(remaining, len(view))
            if self._fd is not None:
                got = os.readv(self._fd, [view[:step]])
            else:
                got = self._fileobj.readinto(view[:step])
            if not got:
                raise EOFError(f"{remaining} of {size} bytes of data missing")
            remaining -= got
            self._position += got

    def drain(self) -> None:
        """Read to the end (the zero blocks after the archive), so a decompressor exits cleanly."""
        while self.read(COPY_CHUNK_BYTES):
            pass


class ByteSink:
    """A buffered writer on a descriptor (tar2sqfs' stdin) that can also take spliced data."""

    def __init__(self, fd: int | None = None, fileobj: BinaryIO | None = None) -> None:
        self.fd = fd
        self._fileobj = fileobj
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= COPY_CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        if self.fd is None:
            self._fileobj.write(self._buffer)
        else:
            data = bytes(self._buffer)
            written = 0
            while written < len(data):
                written += os.write(self.fd, data[written:] if written else data)
        self._buffer.clear()


_PROGRAMS = {"gzip": "pigz", "zstd": "zstd", "xz": "xz"}


@contextmanager
def open_decompressed(path: Path, what: str, *, prefer_programs: bool = True) -> Iterator[ByteSource]:
    """Yield the decompressed bytes of the blob at ``path`` as a :class:`ByteSource`.

    The compression is detected from the magic bytes (media types lie: Docker uses one type for
    plain and gzip layers). The caller must read the stream to its end; a decompressor failure
    (truncated or corrupt data) raises ImageError naming ``what`` when the context exits.
    """
    with open(path, "rb", buffering=0) as raw:
        head = os.pread(raw.fileno(), 8, 0)
        kind = sniff_compression(head)
        if kind is None:
            yield ByteSource(fd=raw.fileno())
            return
        if kind == "bzip2":
            raise ImageError(f"{what} is bzip2-compressed, which OCI layers may not be",
                             hint="rebuild the image with gzip or zstd layers")
        program = _PROGRAMS[kind]
        if kind == "gzip" and not (prefer_programs and proc.has_program("pigz")):
            try:
                yield ByteSource(io.BufferedReader(GzipReader(raw), buffer_size=COPY_CHUNK_BYTES))
            except zlib.error as exc:
                raise ImageError(f"{what} is not valid gzip data: {exc}",
                                 hint="the layer blob is corrupt; remove it and pull again") from None
            return
        child = proc.start([program, "-dc"], stdin=raw, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        stderr = StderrTail(child.stderr)
        enlarge_pipe(child.stdout.fileno())
        ok = False
        try:
            yield ByteSource(fd=child.stdout.fileno())
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


class _ShimArchive:
    """What :meth:`tarfile.TarInfo.fromtarfile` (TarInfo's documented way to read one member)
    needs of a TarFile, without TarFile's buffer copies and ever-growing member list."""

    def __init__(self, source: ByteSource) -> None:
        self.fileobj = source
        self.encoding = ENCODING
        self.errors = ERRORS
        self.pax_headers: dict[str, str] = {}  # global pax records ('g' members) accumulate here
        self.offset = 0


def iter_members(source: ByteSource) -> Iterator[tarfile.TarInfo]:
    """Yield each member's header; its data follows at ``source.tell()``.

    After each yield the consumer may read (``copy_to``) up to the member's data size; what it
    left unread, and the padding, is skipped here. Raises tarfile.HeaderError subclasses and
    EOFError for corrupt or truncated input; a zero-length input is an empty archive.
    """
    archive = _ShimArchive(source)
    while True:
        archive.offset = source.tell()
        try:
            info = tarfile.TarInfo.fromtarfile(archive)
        except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
            break
        except tarfile.EmptyHeaderError:  # the input ends at a block boundary
            break
        data_start = source.tell()
        yield info
        data_blocks = archive.offset - data_start  # set by tarfile: data plus padding
        consumed = source.tell() - data_start
        if consumed > data_blocks:
            raise EOFError("member data read past its end")
        source.skip(data_blocks - consumed)
    source.drain()


def write_member(sink: ByteSink, info: tarfile.TarInfo, source: ByteSource | None = None) -> None:
    """Write ``info``'s header to ``sink``, then its data (``info.size`` bytes) from ``source``."""
    header = fast_ustar_header(info)
    sink.write(header if header is not None else info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS))
    if source is not None and info.size:
        source.copy_to(sink, info.size)
        padding = -info.size % BLOCK_BYTES
        if padding:
            sink.write(bytes(padding))


def end_archive(sink: ByteSink) -> None:
    sink.write(bytes(2 * BLOCK_BYTES))
    sink.flush()


_OCTAL7 = 8 ** 7
_OCTAL11 = 8 ** 11
_USTAR_MAGIC = b"ustar\x0000"


def fast_ustar_header(info: tarfile.TarInfo) -> bytes | None:
    """A plain ustar header for the common member (short ASCII names, small numbers, no pax
    records), about ten times cheaper than ``TarInfo.tobuf``; None when PAX is needed."""
    if info.pax_headers:
        return None
    name = info.name + "/" if info.type == tarfile.DIRTYPE and not info.name.endswith("/") else info.name
    if len(name) > 100 or len(info.linkname) > 100 or not name.isascii() or not info.linkname.isascii():
        return None
    if not (0 <= info.uid < _OCTAL7 and 0 <= info.gid < _OCTAL7 and 0 <= info.size < _OCTAL11
            and 0 <= info.mtime < _OCTAL11 and 0 <= info.devmajor < _OCTAL7 and 0 <= info.devminor < _OCTAL7):
        return None
    header = bytearray(512)
    header[0:len(name)] = name.encode("ascii")
    header[100:148] = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (
        info.mode & 0o7777, info.uid, info.gid, info.size, int(info.mtime))
    header[148:156] = b"        "
    header[156:157] = info.type
    header[157:157 + len(info.linkname)] = info.linkname.encode("ascii")
    header[257:265] = _USTAR_MAGIC
    header[329:345] = b"%07o\0%07o\0" % (info.devmajor, info.devminor)
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)



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
