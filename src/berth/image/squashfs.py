"""Writing a SquashFS image from a tar stream with ``tar2sqfs`` (squashfs-tools-ng).

tar2sqfs builds the whole tree in memory before writing it, so the order of entries in the
stream does not matter (a hard link may come before its target, a directory after its
children); it refuses duplicate paths, which the flattener never sends. Missing parent
directories are created with ``--defaults`` (uid 0, gid 0, mode 0755).

lz4 files are repaired after tar2sqfs (issue 9, defect 6): tar2sqfs 1.2's lz4 compressor keeps
a metadata block compressed even when that makes it larger than its content, and berth's id
table (4 bytes per owner: one for an all-root image) always is: 4 bytes become a 5-byte block.
The kernel, squashfuse and rdsquashfs accept that; unsquashfs (squashfs-tools 4.5, Debian 12)
refuses any block stored larger than the table data it holds ("read_id_table: failed to read id
table block"). :func:`repair_lz4_tables` stores such blocks of the id, fragment and xattr id
tables uncompressed, in place: each of their blocks is found through its table's index, so the
shorter block simply leaves unused bytes behind it. gzip, zstd, xz and lzo files never need it
(their compressors store a block raw when compressing does not pay); zstd would avoid the
problem too, at a cost measured in bench/RESULTS.md (pull + convert 2.4 → 4.0 s, reading every
file back through squashfuse 0.7 → 3.1 s for the debian test image).
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import threading
from pathlib import Path

from berth import fsutil, proc
from berth.errors import BerthError, ImageError, StoreError, UsageError
from berth.image.tarstream import StderrTail, enlarge_pipe

#: Compressors berth offers (the configuration's choices); squashfuse 0.1.105 mounts each
#: (tests/integration/test_flatten_vs_umoci.py proves it).
COMPRESSIONS = ("lz4", "zstd", "gzip", "xz", "lzo")
DEFAULT_COMPRESSION = "lz4"
#: Compressor options berth passes (``-X``): levels chosen for conversion speed, since pulls
#: convert on the critical path. Measured with tar2sqfs -j 2 on the 204 MB debian test rootfs:
#: zstd level 15 (tar2sqfs' default) 34 s / 62.3 MB, level 9 2.3 s / 66.5 MB, level 3 0.84 s /
#: 70.5 MB; gzip level 9 (default) 28 s / 68.1 MB, level 6 7.2 s / 68.4 MB; lz4 0.67 s / 95.7 MB.
COMPRESSOR_OPTIONS = {"zstd": "level=3", "gzip": "level=6"}

#: Two compressor threads: with one the packer waits on compression for zstd/gzip/xz; for lz4
#: on the 2-core test machine, -j 2 had the better median under load (1.74 vs 1.95 s).
DEFAULT_JOBS = 2
#: Below this much free space after a failed write, the failure is a full disk.
LOW_SPACE_BYTES = 4 << 20
#: While tar2sqfs writes, what it wrote so far is made durable this often (fdatasync from a
#: thread), so that the store's fsync before publishing (Store.publish_image) finds little
#: left to write: on the test machine that fsync of the debian image took 0.16-0.19 s after
#: tar2sqfs and 0.08 s (the SHA-256 hashed meanwhile) with this, in alternating cold pulls
#: (issue 10, target 4; bench/RESULTS.md). sync_file_range(2) alone, tried before, starts the
#: writes but not the device's cache flush, which is what the final fsync waited for.
WRITEBACK_EVERY_S = 0.05


def check_compression(compression: str) -> str:
    """Return ``compression`` or raise UsageError listing the supported ones."""
    if compression not in COMPRESSIONS:
        raise UsageError(
            f"unknown squashfs compression '{compression}'",
            hint=f"choose one of: {', '.join(COMPRESSIONS)} (setting squashfs_compression)",
        )
    return compression


#: How many bytes of SquashFS a byte of a layer's declared size is counted as, by berth's
#: compressor (estimate_bytes). lz4, berth's default, compresses less than the gzip and zstd of
#: layers: its SquashFS came out 1.09-1.38x the layers' declared sizes for every test and
#: bench image (busybox 1.38, the debian test images 1.33-1.36, bench/debian 1.25, bench/multi
#: 1.09: upper layers replace files of lower ones, which the flattened image holds once), so
#: the sum itself is a low estimate. zstd, gzip, xz and lzo compress as well as the layers or
#: better: 0.77-1.08x measured (xz 0.77 on bench/multi), so three quarters of the sum.
SIZE_PER_LAYER_BYTE = {"lz4": 1.0, "zstd": 0.75, "gzip": 0.75, "xz": 0.75, "lzo": 0.75}
#: ... and a byte of an uncompressed (plain tar) layer is a quarter of that: a root file system
#: compresses 2-4x (bench/debian: 211 MB of tar, 93 MB of gzip layer); incompressible data
#: (the store tests' random layer) makes a larger file than this counts.
UNCOMPRESSED_LAYER_SHARE = 0.25


def estimate_bytes(layers: list[tuple[str, int]], compression: str) -> int:
    """What the SquashFS of ``layers`` (media type and declared size of each, from the
    manifest) will take when berth writes it with ``compression``, estimated before any layer
    comes, for the pull's free-space check (Store.check_room).

    A low estimate on purpose, for the test and bench images (SIZE_PER_LAYER_BYTE): it makes
    the pull refuse only where the SquashFS surely does not fit besides the downloads. A
    SquashFS larger than the estimate still fails cleanly when the disk fills (the writer
    removes its output, and the store's tmp/ directory is cleaned: SquashfsWriter.finish), and
    an over-estimate would refuse pulls that fit."""
    from berth.oci.mediatypes import LAYER_COMPRESSION

    per_byte = SIZE_PER_LAYER_BYTE.get(compression, min(SIZE_PER_LAYER_BYTE.values()))
    total = 0.0
    for media_type, size_bytes in layers:
        # A media type berth does not know is refused later (parse_image_manifest); an empty one
        # (Docker schema 2 in the wild) is sniffed by the flattener: both count as compressed.
        plain = media_type in LAYER_COMPRESSION and LAYER_COMPRESSION[media_type] is None
        total += size_bytes * per_byte * (UNCOMPRESSED_LAYER_SHARE if plain else 1.0)
    return int(total)


class SquashfsWriter:
    """A running ``tar2sqfs`` writing ``output``: write a tar stream to ``stdin_fd``, then call
    :meth:`finish`.

    Use as a context manager: leaving it with an exception kills tar2sqfs and removes
    ``output``.
    """

    def __init__(self, output: Path, *, compression: str = DEFAULT_COMPRESSION,
                 jobs: int = DEFAULT_JOBS) -> None:
        self.output = Path(output)
        self.compression = compression
        argv = [
            "tar2sqfs", "--quiet", "--force", "--no-skip",
            "--compressor", check_compression(compression),
            *(["--comp-extra", COMPRESSOR_OPTIONS[compression]] if compression in COMPRESSOR_OPTIONS else []),
            "--num-jobs", str(max(1, jobs)),
            "--defaults", "uid=0,gid=0,mode=0755",
            str(self.output),
        ]
        self._child = proc.start(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        self._stderr = StderrTail(self._child.stderr)
        #: tar2sqfs' stdin; callers write the descriptor directly (ByteSink buffers and
        #: splices), so Popen's file object stays empty and is only closed.
        self.stdin_fd: int = self._child.stdin.fileno()
        enlarge_pipe(self.stdin_fd)
        self._done = False
        self._writeback_error: OSError | None = None
        self._writeback_stop = threading.Event()
        self._writeback = threading.Thread(target=self._write_back, name="berth-squashfs-writeback",
                                           daemon=True)
        self._writeback.start()

    def _write_back(self) -> None:
        """fdatasync ``output`` every WRITEBACK_EVERY_S until told to stop. An error is kept
        for :meth:`finish`: once one fsync has reported it, a later fsync of the file (the
        store's, before publishing) may not report it again."""
        fd = None
        try:
            while not self._writeback_stop.wait(WRITEBACK_EVERY_S):
                if fd is None:
                    try:
                        fd = os.open(self.output, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                    except OSError:
                        continue  # not created yet (tar2sqfs is starting), or it failed
                os.fdatasync(fd)
        except OSError as exc:
            self._writeback_error = exc
        finally:
            if fd is not None:
                os.close(fd)

    def _stop_writeback(self) -> None:
        self._writeback_stop.set()
        self._writeback.join()

    def finish(self) -> None:
        """Close the stream and wait. Raises StoreError when ``output`` could not be written
        (full disk, missing or unwritable directory), ImageError when tar2sqfs refused the
        stream; ``output`` is removed then."""
        try:
            self._child.stdin.close()
        except BrokenPipeError:
            pass
        status = self._child.wait()
        self._stop_writeback()
        tail = self._stderr.text()
        self._done = True
        if status != 0:
            error = self._failure(status, tail)  # before removing: a full disk is still full
            self._remove_output()
            raise error
        if self._writeback_error is not None:
            self._remove_output()
            error = self._writeback_error
            # Worded as tar2sqfs' own disk-full failure is (_failure): one message for one cause.
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StoreError(f"{'no space left' if full else 'a write error'} in {self.output.parent} for "
                             f"the squashfs image ({error.strerror or error})",
                             hint="free space (berth prune removes unused images and layers) or ask your site "
                             "administrator for a larger store" if full else
                             "the store's disk is failing: ask your site administrator")
        if self.compression == "lz4":
            try:
                repair_lz4_tables(self.output)
            except BaseException:
                self._remove_output()
                raise

    def _failure(self, status: int, tail: str) -> BerthError:
        what = f"tar2sqfs could not write {self.output} ({proc.describe_status(status)})" + (
            f": {tail}" if tail else "")
        try:
            free_bytes = fsutil.free_room(self.output.parent).free_bytes
        except OSError:
            free_bytes = None
        # tar2sqfs reports a failed write of its output as "I/O error" and removes the output
        # before exiting, so the space is free again by now: that message alone says the disk
        # (or quota) ran out. Found by the disk-full scenario of issue 8.
        if "No space left" in tail or "I/O error" in tail or (
                free_bytes is not None and free_bytes < LOW_SPACE_BYTES):
            return StoreError(f"no space left (or a write error) in {self.output.parent} for the "
                              f"squashfs image ({what})",
                              hint="free space (berth prune removes unused images and layers) or ask "
                              "your site administrator for a larger store")
        if free_bytes is None or "Permission denied" in tail:
            return StoreError(what, hint="the store directory is missing or not writable by you")
        return ImageError(what, hint="this is a bug in berth's flattener; report it with the image name")

    def abort(self) -> None:
        if not self._done:
            self._child.kill()
            try:
                self._child.stdin.close()
            except OSError:
                pass
            self._child.wait()
            self._stop_writeback()
            self._stderr.text()
            self._done = True
        self._remove_output()

    def _remove_output(self) -> None:
        try:
            self.output.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "SquashfsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


# -- lz4 table repair (see the module docstring) ---------------------------------------------

_SUPERBLOCK = struct.Struct("<IIIIIHHHHHHQQQQQQQQ")
_MAGIC = 0x73717368
_LZ4_ID = 5
_NO_TABLE = 0xFFFFFFFFFFFFFFFF
_METADATA_BYTES = 8192
_UNCOMPRESSED_BIT = 0x8000


def repair_lz4_tables(path: Path) -> int:
    """Rewrite, in place, every compressed block of the id, fragment and xattr id tables of the
    lz4 SquashFS ``path`` that is stored larger than its content; return how many were. Files
    with another compressor are left alone. Raises ImageError when the file does not hold
    what its superblock says (it is berth's own fresh output, so that is a bug)."""
    with open(path, "r+b") as image:
        header = image.read(_SUPERBLOCK.size)
        if len(header) < _SUPERBLOCK.size:
            raise ImageError(f"{path} is too short for a squashfs superblock")
        (magic, _inodes, _mtime, _block_size, fragments, compressor, _block_log, _flags, ids, _major, _minor,
         _root, bytes_used, id_table, xattr_table, _inode_table, _dir_table, fragment_table,
         _export_table) = _SUPERBLOCK.unpack(header)
        if magic != _MAGIC or compressor != _LZ4_ID:
            return 0
        tables = [("id", id_table, ids * 4)]
        if fragments and fragment_table != _NO_TABLE:
            tables.append(("fragment", fragment_table, fragments * 16))
        if xattr_table != _NO_TABLE:
            image.seek(xattr_table)  # header: xattr_table_start u64, xattr_ids u32, unused u32
            _start, xattr_ids, _unused = struct.unpack("<QII", _read_exactly(image, 16, path))
            tables.append(("xattr id", xattr_table + 16, xattr_ids * 16))
        repaired = 0
        for name, index_at, length in tables:
            count = -(-length // _METADATA_BYTES)
            image.seek(index_at)
            pointers = struct.unpack(f"<{count}Q", _read_exactly(image, 8 * count, path))
            for number, pointer in enumerate(pointers):
                expected = min(_METADATA_BYTES, length - number * _METADATA_BYTES)
                if not 0 < pointer < bytes_used:
                    raise ImageError(f"{path}: the {name} table points outside the file")
                image.seek(pointer)
                (stored_header,) = struct.unpack("<H", _read_exactly(image, 2, path))
                stored = stored_header & ~_UNCOMPRESSED_BIT
                if stored_header & _UNCOMPRESSED_BIT or stored <= expected:
                    continue
                data = lz4_block_decompress(_read_exactly(image, stored, path), expected)
                image.seek(pointer)
                image.write(struct.pack("<H", _UNCOMPRESSED_BIT | expected) + data)
                repaired += 1
        # No fsync here: the output is a temporary file, and the store fsyncs it (while it
        # hashes it) before publishing (Store.publish_image); a second fsync cost ~0.1 s on
        # every pull (issue 10, target 4).
    return repaired


def _read_exactly(image, size: int, path: Path) -> bytes:
    data = image.read(size)
    if len(data) != size:
        raise ImageError(f"{path} ends inside a squashfs table")
    return data


def lz4_block_decompress(source: bytes, size: int) -> bytes:
    """Decode one raw LZ4 block (the LZ4 block format, no frame) of ``size`` bytes; raises
    ImageError when ``source`` is not such a block. Meant for the few-byte table blocks that
    :func:`repair_lz4_tables` handles, not for bulk data."""
    out = bytearray()
    position = 0
    try:
        while True:
            token = source[position]
            position += 1
            literals, position = _lz4_length(source, position, token >> 4)
            out += source[position:position + literals]
            position += literals
            if position >= len(source):
                break
            offset = source[position] | source[position + 1] << 8
            position += 2
            if not 0 < offset <= len(out):
                raise ImageError("lz4 block: a match reaches before the start")
            match, position = _lz4_length(source, position, token & 0x0F)
            for _ in range(match + 4):  # byte by byte: a match may overlap its own output
                out.append(out[-offset])
            if len(out) > size:
                break
    except IndexError:
        raise ImageError("lz4 block: truncated") from None
    if len(out) != size or position != len(source):
        raise ImageError(f"lz4 block: decodes to {len(out)} bytes, expected {size}")
    return bytes(out)


def _lz4_length(source: bytes, position: int, nibble: int) -> tuple[int, int]:
    length = nibble
    if nibble == 15:
        while True:
            extra = source[position]
            position += 1
            length += extra
            if extra != 255:
                break
    return length, position
