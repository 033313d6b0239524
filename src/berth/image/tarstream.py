"""Streaming access to layer tarballs: decompression by magic bytes, canonical names, tar output.

Nothing here touches the host filesystem except to read the layer file itself: layers are
decompressed into a pipe (``igzip -dc`` or ``pigz -dc`` / ``zstd -dc`` / ``xz -dc`` through
:mod:`berth.proc`, or Python's zlib when neither gzip program is installed) and parsed as a
stream.
"""

from __future__ import annotations

import fcntl
import io
import os
import stat
import struct
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
#: Read-ahead from the decompressor: many headers and small members per system call.
READ_AHEAD_BYTES = 256 * 1024
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
    if head.startswith(ZSTD_MAGIC) or _is_zstd_skippable(head):
        return "zstd"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(BZIP2_MAGIC):
        return "bzip2"
    return None


def _is_zstd_skippable(head: bytes) -> bool:
    """A zstd skippable frame (magic 0x184D2A50-0x184D2A5F, little-endian; RFC 8878 3.1.2):
    a zstd stream may begin with one (metadata frames), and ``zstd -d`` skips it. A plain tar
    would need a first member name with the control byte 0x18 as its fourth character; such a
    layer fails as corrupt zstd, which is all it could deserve."""
    return len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


def canonical_name(name: str) -> str:
    """The member name as a relative path without '.', empty components or a leading '/'.

    '' is the root directory. Raises NameRejected for a '..' component: such a name could
    only point outside the tree, and resolving it against symlinks is ambiguous.
    """
    parts = name.split("/")
    if "" not in parts and "." not in parts and ".." not in parts:
        return name  # already canonical (nearly every name): no loop in Python (issue 10)
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise NameRejected(name)
        parts.append(part)
    return "/".join(parts)


#: A name of at most this many characters fits NAME_MAX even in its longest encoding: UTF-8
#: takes at most 4 bytes per character, surrogateescape 1 per undecodable byte.
_SHORT_NAME_CHARS = MAX_NAME_BYTES // 4


def check_name_length(path: str, *, components: bool = True) -> str | None:
    """Why ``path`` is absurdly long, or None when it fits Linux's limits (PATH_MAX, and
    NAME_MAX per component unless ``components`` is false, as for symlink targets)."""
    if len(path) <= _SHORT_NAME_CHARS:
        return None  # fits both limits whatever it holds (the common case: no encoding, issue 10)
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


class ByteSource:
    """A byte stream read exactly, through a read-ahead buffer: headers and small members come
    out of the buffer without a system call each; the rest of a large member is spliced from
    the descriptor to the output pipe by the kernel, never passing through Python.

    Built on a descriptor (``fd``: a pipe from the decompressor, or the layer file) or on a
    file object (Python's gzip fallback, streams handed to :func:`tar_to_squashfs`). Also the
    ``fileobj`` of the shim handed to :meth:`tarfile.TarInfo.fromtarfile` (``read``, ``tell``).
    """

    def __init__(self, fileobj: BinaryIO | None = None, fd: int | None = None) -> None:
        self._fileobj = fileobj
        self._fd = fd
        self._buffer = b""
        self._offset = 0  # of the next unread byte in _buffer
        self._position = 0  # of the next unread byte in the stream
        self._seekable = fd is not None and stat.S_ISREG(os.fstat(fd).st_mode)  # a plain layer file

    def tell(self) -> int:
        return self._position

    def _fill(self, size: int) -> bytes:
        """Read at least one byte more from the stream (b"" at its end)."""
        if self._fd is not None:
            return os.read(self._fd, max(size, READ_AHEAD_BYTES))
        return self._fileobj.read(max(size, READ_AHEAD_BYTES))

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the stream."""
        end = self._offset + size
        if end <= len(self._buffer):
            data = self._buffer[self._offset:end]
            self._offset = end
            self._position += size
            return data
        parts = [self._buffer[self._offset:]]
        got = len(parts[0])
        self._buffer, self._offset = b"", 0
        while got < size:
            more = self._fill(size - got)
            if not more:
                break
            need = size - got
            if len(more) > need:
                parts.append(more[:need])
                self._buffer, self._offset = more, need
                got = size
                break
            parts.append(more)
            got += len(more)
        self._position += got
        return b"".join(parts)

    def peek(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer at the end of the stream), without consuming them."""
        while len(self._buffer) - self._offset < size:
            more = self._fill(size)
            if not more:
                break
            self._buffer = self._buffer[self._offset:] + more
            self._offset = 0
        return self._buffer[self._offset:self._offset + size]

    def advance(self, size: int) -> None:
        """Consume ``size`` bytes that :meth:`peek` returned."""
        self._offset += size
        self._position += size

    def copy_to(self, sink: "ByteSink", size: int) -> None:
        """Copy ``size`` bytes to ``sink``; raise EOFError when the stream ends first."""
        buffered = min(size, len(self._buffer) - self._offset)
        if buffered:
            # A view: the sink copies the bytes once, into its buffer.
            sink.write(memoryview(self._buffer)[self._offset:self._offset + buffered])
            self._offset += buffered
            self._position += buffered
        remaining = size - buffered
        if not remaining:
            return
        if remaining <= SMALL_MEMBER_BYTES or self._fd is None or sink.fd is None:
            while remaining:
                chunk = self.read(min(remaining, COPY_CHUNK_BYTES))
                if not chunk:
                    raise EOFError(f"{remaining} of {size} bytes of data missing")
                sink.write(chunk)
                remaining -= len(chunk)
            return
        sink.flush()
        while remaining:
            moved = os.splice(self._fd, sink.fd, remaining)
            if moved == 0:
                raise EOFError(f"{remaining} of {size} bytes of data missing")
            remaining -= moved
            self._position += moved

    def skip(self, size: int) -> None:
        """Discard ``size`` bytes (member data nobody wants): seek past them in a plain layer
        file, splice them to /dev/null from a pipe, never copying large data into Python."""
        buffered = min(size, len(self._buffer) - self._offset)
        self._offset += buffered
        self._position += buffered
        remaining = size - buffered
        if remaining and self._seekable:
            end = os.fstat(self._fd).st_size
            here = os.lseek(self._fd, 0, os.SEEK_CUR)
            if here + remaining > end:
                raise EOFError(f"{here + remaining - end} of {size} bytes of data missing")
            os.lseek(self._fd, remaining, os.SEEK_CUR)
            self._position += remaining
            return
        if remaining > SMALL_MEMBER_BYTES and self._fd is not None:
            with open(os.devnull, "wb") as devnull:
                while remaining:
                    moved = os.splice(self._fd, devnull.fileno(), remaining)
                    if moved == 0:
                        raise EOFError(f"{remaining} of {size} bytes of data missing")
                    remaining -= moved
                    self._position += moved
            return
        while remaining:
            chunk = self.read(min(remaining, COPY_CHUNK_BYTES))
            if not chunk:
                raise EOFError(f"{remaining} of {size} bytes of data missing")
            remaining -= len(chunk)

    def drain(self) -> None:
        """Read to the end (the zero blocks after the archive), so a decompressor exits cleanly."""
        while self.read(COPY_CHUNK_BYTES):
            pass


class ByteSink:
    """A buffered writer on a descriptor (tar2sqfs' stdin) that can also take spliced data.

    The buffer is allocated once and written into (one copy of each byte, no reallocation as
    it fills); a flush writes it as it is. Growing a fresh bytearray for every megabyte and
    copying it out again to write it took a third of the tar pass' own time (issue 10, target 4)."""

    def __init__(self, fd: int | None = None, fileobj: BinaryIO | None = None) -> None:
        self.fd = fd
        self._fileobj = fileobj
        self._buffer = bytearray(COPY_CHUNK_BYTES)
        self._view = memoryview(self._buffer)
        self._used = 0

    def write(self, data: bytes | memoryview) -> None:
        used = self._used
        end = used + len(data)
        if end > COPY_CHUNK_BYTES:
            self.flush()
            if len(data) >= COPY_CHUNK_BYTES:
                self._write_out(data)
                return
            used, end = 0, len(data)
        self._view[used:end] = data
        self._used = end

    def flush(self) -> None:
        if self._used:
            self._write_out(self._view[:self._used])
            self._used = 0

    def _write_out(self, data: bytes | memoryview) -> None:
        if self.fd is None:
            self._fileobj.write(bytes(data))
            return
        written = 0
        with memoryview(data) as view:
            while written < len(view):
                written += os.write(self.fd, view[written:] if written else view)


#: Decompressors by preference. For gzip, igzip (ISA-L, Debian package isal) inflates about
#: 2.5x faster than pigz -d per CPU second (0.31 vs 0.85 CPU-s for the 69 MB debian test
#: layer), which matters on a 2-core node where decompression, berth and tar2sqfs share the
#: CPUs; pigz is the fallback, then Python's zlib. bench/inflate.py (RESULTS.md, 1b) compared
#: them with the isal and zlib-ng Python bindings in process: igzip took the least CPU (isal
#: +4%, zlib-ng +13%, pigz 2.4x, zlib 2.1x), and a program inflates on the other core while
#: berth parses tar, which an in-process inflater would do under the GIL.
_PROGRAMS = {"gzip": ("igzip", "pigz"), "zstd": ("zstd",), "xz": ("xz",)}
#: What a decompressor may allocate: a zstd frame or an xz stream names the window it needs,
#: and a hostile registry's xz layer declaring a 1.5 GiB dictionary made ``xz -dc`` (which has
#: no limit by default) hold that much while it expanded a few hundred KB of zeros. 128 MiB is
#: zstd's own default (window log 27, stated here so that it stays); ``xz -9`` needs 65 MiB.
_MEMORY_LIMITS = {"zstd": ("--memory=128MiB",), "xz": ("--memlimit-decompress=128MiB",)}


def decompressor(kind: str, *, prefer_programs: bool = True) -> str | None:
    """The program that will decompress ``kind``, or None for Python's zlib (gzip only)."""
    candidates = _PROGRAMS[kind]
    if kind == "gzip":
        found = [name for name in candidates if prefer_programs and proc.has_program(name)]
        return found[0] if found else None
    return candidates[0]


@contextmanager
def open_decompressed(path: Path, what: str, *, prefer_programs: bool = True,
                      stream: tuple[bytes, BinaryIO] | None = None) -> Iterator[ByteSource]:
    """Yield the decompressed bytes of the blob at ``path`` as a :class:`ByteSource`.

    ``prefer_programs=False`` forces Python's zlib for gzip (tests of the fallback).
    ``stream`` = (first bytes, unbuffered pipe): read the blob from the pipe instead of
    ``path`` (a pull converting a layer while it downloads; the first bytes, at least 8
    unless the blob is shorter, say the compression and are also the pipe's first bytes).
    The compression is detected from the magic bytes (media types lie: Docker uses one type for
    plain and gzip layers). The caller must read the stream to its end; a decompressor failure
    (truncated or corrupt data) raises ImageError naming ``what`` when the context exits.
    """
    if stream is not None:
        head, raw = stream
        with _decompressed(raw, head[:8], what, prefer_programs) as source:
            yield source
        return
    with open(path, "rb", buffering=0) as raw:
        with _decompressed(raw, os.pread(raw.fileno(), 8, 0), what, prefer_programs) as source:
            yield source


@contextmanager
def _decompressed(raw: BinaryIO, head: bytes, what: str, prefer_programs: bool) -> Iterator[ByteSource]:
    kind = sniff_compression(head)
    if kind is None:
        yield ByteSource(fd=raw.fileno())
        return
    if kind == "bzip2":
        raise ImageError(f"{what} is bzip2-compressed, which OCI layers may not be",
                         hint="rebuild the image with gzip or zstd layers")
    program = decompressor(kind, prefer_programs=prefer_programs)
    if program is None:
        try:
            yield ByteSource(io.BufferedReader(GzipReader(raw), buffer_size=COPY_CHUNK_BYTES))
        except zlib.error as exc:
            raise ImageError(f"{what} is not valid gzip data: {exc}",
                             hint="the layer blob is corrupt; remove it and pull again") from None
        return
    child = proc.start([program, "-dc", *_MEMORY_LIMITS.get(kind, ())], stdin=raw, stdout=subprocess.PIPE,
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
        memory = "memory usage limit" in tail.lower() or "too much memory" in tail.lower()
        raise ImageError(
            f"{what} cannot be decompressed ({program} {proc.describe_status(status)})"
            + (f": {tail}" if tail else ""),
            hint="the layer asks for more memory to decompress than berth allows (128 MiB, zstd's default): "
                 "tell the image's maintainer to rebuild it with default compression settings" if memory else
                 "the layer blob is truncated or corrupt; remove it from the store and pull again",
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
        start = source.tell()
        # The common member (one plain ustar/GNU header) is parsed here; anything else (pax
        # records, GNU long names, sparse members, base-256 numbers, end of archive, damage)
        # goes through tarfile's own reader, which also applies global pax records.
        info, header_bytes = (None, 0) if archive.pax_headers else _parse_fast(source)
        if info is not None:
            source.advance(header_bytes)
            info.offset = start
            info.offset_data = data_start = start + header_bytes
            archive.offset = data_start + (-(-info.size // BLOCK_BYTES) * BLOCK_BYTES
                                           if info.type in tarfile.REGULAR_TYPES else 0)
        else:
            _check_extension_size(source.peek(BLOCK_BYTES))
            archive.offset = start
            try:
                info = tarfile.TarInfo.fromtarfile(archive)
            except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
                break
            except tarfile.EmptyHeaderError:  # the input ends at a block boundary
                break
            data_start = source.tell()
        yield info
        data_blocks = archive.offset - data_start  # data plus padding
        consumed = source.tell() - data_start
        if consumed > data_blocks:
            raise EOFError("member data read past its end")
        source.skip(data_blocks - consumed)
    source.drain()


_PLAIN_TYPES = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE,
                          tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE))
_POSIX_MAGIC = b"ustar\x00"
_GNU_MAGIC = b"ustar  \x00"
#: The octal fields of a header in offset order: mode, uid, gid, size, mtime, checksum,
#: devmajor, devminor.
_NUMBERS = struct.Struct("100x 8s 8s 8s 12s 12s 8s 173x 8s 8s")


def parse_plain_header(buf: bytes) -> tarfile.TarInfo | None:
    """A TarInfo for a plain ustar or GNU header (no extension records), exactly as
    :meth:`tarfile.TarInfo.frombuf` would build it, at a fifth of its cost; None for
    anything else (then tarfile decides, and raises on damage)."""
    kind = buf[156:157]
    if kind not in _PLAIN_TYPES:
        return None
    numbers = _plain_numbers(buf)
    if numbers is None:
        return None
    mode, uid, gid, size, mtime, devmajor, devminor, checksum = numbers
    name = buf[0:100].split(b"\0", 1)[0].decode(ENCODING, ERRORS)
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE
    if kind == tarfile.DIRTYPE:
        name = name.rstrip("/")
    prefix = buf[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix.decode(ENCODING, ERRORS) + "/" + name
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid, info.size, info.mtime = mode, uid, gid, size, mtime
    info.chksum, info.type = checksum, kind
    info.linkname = buf[157:257].split(b"\0", 1)[0].decode(ENCODING, ERRORS)
    info.uname = buf[265:297].split(b"\0", 1)[0].decode(ENCODING, ERRORS)
    info.gname = buf[297:329].split(b"\0", 1)[0].decode(ENCODING, ERRORS)
    info.devmajor, info.devminor = devmajor, devminor
    return info


#: pax keywords the fast path understands (tarfile handles every other, e.g. GNU.sparse.*,
#: hdrcharset, comment); xattr records are kept as they are.
_PAX_SIMPLE = frozenset(("path", "linkpath", "size", "uid", "gid", "mtime", "atime", "ctime", "uname", "gname"))
_PAX_INT = ("size", "uid", "gid")
#: Largest pax extension the fast path reads (long names and xattrs fit easily).
_PAX_FAST_MAX_BYTES = 16 * 1024


def _pax_records(data: bytes) -> dict[str, str] | None:
    """The records of a pax extended header ("LEN KEY=VALUE\n"...), or None when anything
    about them is unusual."""
    records: dict[str, str] = {}
    position, end = 0, len(data)
    while position < end and data[position] != 0:
        space = data.find(b" ", position, position + 20)
        if space < 0:
            return None
        try:
            length = int(data[position:space])
        except ValueError:
            return None
        if length < 5 or position + length > end or data[position + length - 1] != 0x0A:
            return None
        keyword, equals, value = data[space + 1:position + length - 1].partition(b"=")
        if not equals:
            return None
        try:
            key = keyword.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if key not in _PAX_SIMPLE and not key.startswith("SCHILY.xattr."):
            return None
        records[key] = value.decode(ENCODING, ERRORS)
        position += length
    return records


def _parse_fast(source: "ByteSource") -> tuple[tarfile.TarInfo | None, int]:
    """(member, bytes of headers) for a plain header, or a pax 'x' header with simple
    records followed by a plain header; (None, 0) for anything tarfile must read."""
    head = source.peek(BLOCK_BYTES)
    if head[156:157] != tarfile.XHDTYPE:
        return parse_plain_header(head), BLOCK_BYTES
    extension = _plain_numbers(head)
    if extension is None or extension[3] > _PAX_FAST_MAX_BYTES:
        return None, 0
    data_blocks = -(-extension[3] // BLOCK_BYTES) * BLOCK_BYTES
    total = BLOCK_BYTES + data_blocks + BLOCK_BYTES
    block = source.peek(total)
    if len(block) != total:
        return None, 0
    records = _pax_records(block[BLOCK_BYTES:BLOCK_BYTES + extension[3]])
    info = parse_plain_header(block[total - BLOCK_BYTES:]) if records is not None else None
    if info is None:
        return None, 0
    # As tarfile's _apply_pax_info does (a number that does not parse becomes 0 there;
    # here it sends the member to tarfile).
    try:
        for key in _PAX_INT:
            if key in records:
                setattr(info, key, int(records[key]))
        if "mtime" in records:
            info.mtime = float(records["mtime"])
    except ValueError:
        return None, 0
    if "path" in records:
        info.name = records["path"].rstrip("/")
    if "linkpath" in records:
        info.linkname = records["linkpath"]
    if "uname" in records:
        info.uname = records["uname"]
    if "gname" in records:
        info.gname = records["gname"]
    info.pax_headers = records
    return info, total


def _plain_numbers(buf: bytes) -> list[int] | None:
    """The octal fields (mode, uid, gid, size, mtime, devmajor, devminor, checksum) of a
    ustar/GNU header with valid magic and checksum, else None.

    A field that is not plain octal up to NULs or spaces (base-256, a NUL inside, garbage)
    makes ``int`` fail, and tarfile's own reader gets the member.
    """
    if len(buf) != BLOCK_BYTES or (buf[257:263] != _POSIX_MAGIC and buf[257:265] != _GNU_MAGIC):
        return None
    try:
        mode, uid, gid, size, mtime, checksum, devmajor, devminor = [
            int(field.rstrip(b"\0 ") or b"0", 8) for field in _NUMBERS.unpack_from(buf)]
    except ValueError:
        return None
    if checksum != header_checksum(buf):
        return None  # tarfile also accepts signed checksums, and reports real damage
    return [mode, uid, gid, size, mtime, devmajor, devminor, checksum]


#: Largest pax or GNU long-name extension accepted: tarfile reads one whole into memory.
MAX_EXTENSION_BYTES = 1 << 20
_EXTENSION_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)


class ExtensionTooLarge(tarfile.HeaderError):
    """A pax or GNU extension header larger than any honest one (a memory bomb)."""


def _check_extension_size(head: bytes) -> None:
    if len(head) == BLOCK_BYTES and head[156:157] in _EXTENSION_TYPES:
        try:
            size = tarfile.nti(head[124:136])
        except tarfile.HeaderError:
            return  # tarfile reports the damage itself
        if size > MAX_EXTENSION_BYTES:
            raise ExtensionTooLarge(f"an extension header of {size} bytes (limit {MAX_EXTENSION_BYTES})")


def write_member(sink: ByteSink, info: tarfile.TarInfo, source: ByteSource | None = None) -> None:
    """Write ``info``'s header to ``sink``, then its data (``info.size`` bytes) from ``source``."""
    header = fast_ustar_header(info)
    sink.write(header if header is not None else info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS))
    _write_data(sink, source, info.size)


def _write_data(sink: ByteSink, source: ByteSource | None, size: int) -> None:
    """A member's ``size`` bytes of data from ``source``, padded to whole blocks."""
    if source is not None and size:
        source.copy_to(sink, size)
        padding = -size % BLOCK_BYTES
        if padding:
            sink.write(_ZERO_BLOCK[:padding])


_ZERO_BLOCK = bytes(BLOCK_BYTES)


def end_archive(sink: ByteSink) -> None:
    sink.write(bytes(2 * BLOCK_BYTES))
    sink.flush()


_MAX_MTIME = 2**32 - 1
_OCTAL7 = 8 ** 7
_OCTAL11 = 8 ** 11
_USTAR_MAGIC = b"ustar\x0000"


_NO_DEVICE = bytes(16)
_DEVICE_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE)
#: uname and gname (empty: berth writes numeric owners only), then after the device numbers
#: the empty prefix and the header's padding.
_OWNER_NAMES = bytes(64)
_HEADER_END = bytes(167)
_adler32 = zlib.adler32


def header_checksum(header: bytes) -> int:
    """The (unsigned) checksum of a 512-byte tar header: the sum of its bytes with the checksum
    field counted as eight spaces (POSIX ustar).

    Adler-32 keeps 1 + the byte sum modulo 65521 in its low 16 bits, which is the exact byte
    sum of a piece of at most 256 bytes (256 * 255 + 1 < 65521): three pieces in C instead of
    Python's ``sum`` over 512 ints, twice per member read and once per member written (issue 10).
    """
    return _checksum(header[0:148], header[156:404], header[404:512])


def _checksum(a: bytes, b: bytes, c: bytes) -> int:
    """The ustar checksum of a header whose bytes outside the checksum field are ``a``, ``b``
    and ``c``, each at most 256 bytes long (see header_checksum)."""
    return (_adler32(a) & 0xFFFF) + (_adler32(b) & 0xFFFF) + (_adler32(c) & 0xFFFF) - 3 + 256


def ustar_header(name: str, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: float,
                 linkname: str = "", devmajor: int = 0, devminor: int = 0) -> bytes | None:
    """A plain ustar header (short ASCII names, small numbers, numeric owner only), byte for
    byte what ``TarInfo.tobuf(USTAR_FORMAT)`` writes for such a member with empty owner names,
    about ten times cheaper; None when it does not fit (then PAX is needed)."""
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    if len(name) > 100 or len(linkname) > 100 or not name.isascii() or not linkname.isascii():
        return None
    if not (0 <= uid < _OCTAL7 and 0 <= gid < _OCTAL7 and 0 <= size < _OCTAL11
            and 0 <= mtime < _OCTAL11 and 0 <= devmajor < _OCTAL7 and 0 <= devminor < _OCTAL7):
        return None
    head = name.encode("ascii").ljust(100, b"\0") + b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (
        mode & 0o7777, uid, gid, size, int(mtime))
    tail = (kind + linkname.encode("ascii").ljust(100, b"\0") + _USTAR_MAGIC + _OWNER_NAMES
            # NULs for other types, as tarfile writes
            + (b"%07o\0%07o\0" % (devmajor, devminor) if kind in _DEVICE_TYPES else _NO_DEVICE)
            + _HEADER_END)
    return head + b"%06o\0 " % _checksum(head, tail[:248], tail[248:]) + tail


def fast_ustar_header(info: tarfile.TarInfo) -> bytes | None:
    """:func:`ustar_header` for ``info``; None when it has pax records or does not fit."""
    if info.pax_headers or info.uname or info.gname:
        return None
    return ustar_header(info.name, info.type, info.mode, info.uid, info.gid, info.size, info.mtime,
                        info.linkname, info.devmajor, info.devminor)


def write_output(sink: ByteSink, source: tarfile.TarInfo, name: str, *, kind: bytes | None = None,
                 linkname: str = "", xattrs: dict[str, str] | None = None,
                 data: ByteSource | None = None) -> None:
    """``write_member(sink, output_info(source, name, ...), data)``, without building the
    output TarInfo when a plain ustar header holds the member (the hot path: issue 10)."""
    kind = source.type if kind is None else kind
    if not xattrs:
        size = source.size if kind == tarfile.REGTYPE else 0
        header = ustar_header(name, kind, source.mode, source.uid, source.gid, size,
                              min(max(int(source.mtime), 0), _MAX_MTIME), linkname,
                              source.devmajor, source.devminor)
        if header is not None:
            sink.write(header)
            _write_data(sink, data, size)
            return
    write_member(sink, output_info(source, name, kind=kind, linkname=linkname, xattrs=xattrs), data)



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
    info.mtime = min(max(int(source.mtime), 0), _MAX_MTIME)  # SquashFS times are 32-bit
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
