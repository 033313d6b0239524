"""flock(2)-based locks on files under a store's locks/ directory.

flock locks belong to an open file description: they are released by the kernel when the
process dies, even by ``kill -9``, so a crashed pull never leaves a store locked. They work
between processes and, because each acquisition opens its own file description, between
threads of one process too.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from berth.errors import StoreError


@contextmanager
def file_lock(path: Path, *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold an flock on ``path`` (created if missing) for the duration of the block.

    Yields True when the lock is held. With ``blocking=False`` it yields False instead of
    waiting when another holder conflicts; the block then runs without the lock and must
    check the value. Raises StoreError when the lock file cannot be opened (the caller maps
    permission problems to PermissionDenied before getting here: see Store.require_writable).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot open lock file {path}: {exc.strerror}",
                         hint=f"check that {path.parent} is a directory you can write") from None
    try:
        operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking:
            operation |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, operation)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and not blocking:
                yield False
                return
            raise StoreError(f"cannot lock {path}: {exc.strerror}",
                             hint="the store must be on a file system with working flock(2) "
                             "(Lustre: mounted with -o flock; NFS: with its lock service running)") from None
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_locked(path: Path) -> bool:
    """Whether some process holds a lock on ``path`` right now (False when it does not exist)."""
    if not path.exists():
        return False
    with file_lock(path, blocking=False) as held:
        return not held
