"""Writing a SquashFS image from a tar stream with ``tar2sqfs`` (squashfs-tools-ng).

tar2sqfs builds the whole tree in memory before writing it, so the order of entries in the
stream does not matter (a hard link may come before its target, a directory after its
children); it refuses duplicate paths, which the flattener never sends. Missing parent
directories are created with ``--defaults`` (uid 0, gid 0, mode 0755).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from berth import proc
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


def check_compression(compression: str) -> str:
    """Return ``compression`` or raise UsageError listing the supported ones."""
    if compression not in COMPRESSIONS:
        raise UsageError(
            f"unknown squashfs compression '{compression}'",
            hint=f"choose one of: {', '.join(COMPRESSIONS)} (setting squashfs_compression)",
        )
    return compression


class SquashfsWriter:
    """A running ``tar2sqfs`` writing ``output``: write a tar stream to ``stdin_fd``, then call
    :meth:`finish`.

    Use as a context manager: leaving it with an exception kills tar2sqfs and removes
    ``output``.
    """

    def __init__(self, output: Path, *, compression: str = DEFAULT_COMPRESSION,
                 jobs: int = DEFAULT_JOBS) -> None:
        self.output = Path(output)
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

    def finish(self) -> None:
        """Close the stream and wait. Raises StoreError when ``output`` could not be written
        (full disk, missing or unwritable directory), ImageError when tar2sqfs refused the
        stream; ``output`` is removed then."""
        try:
            self._child.stdin.close()
        except BrokenPipeError:
            pass
        status = self._child.wait()
        tail = self._stderr.text()
        self._done = True
        if status != 0:
            error = self._failure(status, tail)  # before removing: a full disk is still full
            self._remove_output()
            raise error

    def _failure(self, status: int, tail: str) -> BerthError:
        what = f"tar2sqfs could not write {self.output} ({proc.describe_status(status)})" + (
            f": {tail}" if tail else "")
        try:
            stats = os.statvfs(self.output.parent)
            free_bytes = stats.f_bavail * stats.f_frsize
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
