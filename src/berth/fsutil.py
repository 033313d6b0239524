"""Writing small files so that readers see the old or the new content, never a part.

One implementation for every configuration, credential, job-record and status file berth
replaces (the store has its own for blobs and images, which stage in its tmp/ directory so that
prune finds crash leftovers). The temporary file is created exclusively (``O_EXCL|O_NOFOLLOW``)
in the target's directory and renamed over the target: a symbolic link planted at the target
or at the temporary name is replaced or refused, never followed.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_in_directory(directory_fd: int, name: str, data: bytes, mode: int) -> None:
    """Atomically replace ``name`` inside the directory open as ``directory_fd`` with ``data``.

    The file gets exactly ``mode`` whatever the umask. The data and the directory entry are
    fsynced before returning. On any failure the temporary file is removed and the old content
    stays. Raises OSError.
    """
    tmp = f".{name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=directory_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=directory_fd)
        except FileNotFoundError:
            pass
        raise
    os.fsync(directory_fd)


def write_atomically(path: Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data`` (str is written as UTF-8). Raises OSError."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        replace_in_directory(directory, path.name, data, mode)
    finally:
        os.close(directory)


def fsync_directory(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
