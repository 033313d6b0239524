"""Writing a SquashFS image from a tar stream with ``tar2sqfs`` (squashfs-tools-ng).

tar2sqfs builds the whole tree in memory before writing it, so the order of entries in the
stream does not matter (a hard link may come before its target, a directory after its
children); it refuses duplicate paths, which the flattener never sends. Missing parent
directories are created with ``--defaults`` (uid 0, gid 0, mode 0755).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from berth import proc
from berth.errors import ImageError, UsageError
from berth.image.tarstream import StderrTail, enlarge_pipe

#: Compressors berth offers; all are mountable by squashfuse 0.1.105 (tests prove it).
COMPRESSIONS = ("lz4", "zstd", "gzip", "xz")
DEFAULT_COMPRESSION = "lz4"

#: Two compressor threads: the machines berth targets have cores to spare during a pull, and
#: with one the packer waits on compression for gzip/zstd/xz.
DEFAULT_JOBS = 2


def check_compression(compression: str) -> str:
    """Return ``compression`` or raise UsageError listing the supported ones."""
    if compression not in COMPRESSIONS:
        raise UsageError(
            f"unknown squashfs compression '{compression}'",
            hint=f"choose one of: {', '.join(COMPRESSIONS)} (setting squashfs_compression)",
        )
    return compression


class SquashfsWriter:
    """A running ``tar2sqfs`` writing ``output``; feed ``stdin`` a tar stream, then ``finish``.

    Use as a context manager: leaving it with an exception kills tar2sqfs and removes
    ``output``.
    """

    def __init__(self, output: Path, *, compression: str = DEFAULT_COMPRESSION,
                 jobs: int = DEFAULT_JOBS) -> None:
        self.output = Path(output)
        argv = [
            "tar2sqfs", "--quiet", "--force", "--no-skip",
            "--compressor", check_compression(compression),
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
        """Close the stream and wait; raise ImageError when tar2sqfs refused the stream."""
        try:
            self._child.stdin.close()
        except BrokenPipeError:
            pass
        status = self._child.wait()
        tail = self._stderr.text()
        self._done = True
        if status != 0:
            self._remove_output()
            raise ImageError(
                f"tar2sqfs could not build {self.output.name} ({proc.describe_status(status)})"
                + (f": {tail}" if tail else ""),
                hint="this is a bug in berth's flattener or a full disk; report it with the image name",
            )

    def broken(self) -> str | None:
        """When tar2sqfs has died early (broken pipe), its stderr tail; else None."""
        if self._child.poll() is None:
            return None
        return self._stderr.text() or proc.describe_status(self._child.returncode)

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
