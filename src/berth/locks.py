"""File locks: the only implementation (flock(2) on a lock file), for every store, template,
container-state, local-copy and job-slot lock.

flock locks belong to an open file description: the kernel releases them when the process
dies, even by ``kill -9``, so a crashed berth never leaves anything locked. Each acquisition
opens its own file description, so they work between threads of one process too.

Rules (docs/security.md, "multi-user model"):

* A lock file is opened read-write, without following a symbolic link, and must be a regular
  file; berth creates it 0600. Taking a lock needs an open descriptor, so nobody but the owner
  of a 0600 lock file can hold it: users cannot block the site store's or the templates'
  writers (an older 0644 lock file is tightened by its owner on the next use).
* Every wait is bounded: ``timeout_s`` (settings ``lock_timeout_s`` for the callers that have
  settings); on expiry :class:`~berth.errors.LockError` names the lock file and, from
  /proc/locks, the process and user that hold it.
* ``timeout_s=0`` tries once: the block runs with ``held`` False when someone else has it,
  unless ``must_hold`` (a timeout from the settings, where 0 means "do not wait": LockError).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from berth.errors import LockError
from berth.record import Record

#: Used when no settings are at hand; settings ``lock_timeout_s`` has the same default.
DEFAULT_TIMEOUT_S = 600.0
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.25
_FLOCK_HINT = ("the file system must support flock(2) (Lustre: mounted with -o flock; NFS: with "
               "its lock service running)")


def open_lock_file(path: Path, *, mode: int = 0o600, create: bool = True) -> int:
    """A read-write descriptor of the lock file ``path`` (created with ``mode`` if missing and
    ``create``). Refuses symbolic links and anything but a regular file (OSError ELOOP or
    EINVAL); tightens a lock file of the caller's that group or others could open. Raises OSError."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, mode)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & ~mode & 0o077:
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def try_acquire(fd: int, *, shared: bool = False) -> bool:
    """Take the lock on ``fd`` if nobody conflicts; False when someone does. Raises LockError
    when the file system cannot lock."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise LockError(f"cannot lock {_fd_path(fd)}: {exc.strerror}", hint=_FLOCK_HINT) from None
    return True


def acquire(fd: int, path: Path, *, shared: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
            purpose: str = "") -> None:
    """Wait at most ``timeout_s`` for the lock on ``fd`` (the lock file ``path``).

    Raises LockError naming ``path``, ``purpose`` (what the lock protects, for the message)
    and the holders found in /proc/locks."""
    deadline = time.monotonic() + timeout_s
    delay = _POLL_FIRST_S
    while not try_acquire(fd, shared=shared):
        left = deadline - time.monotonic()
        if left <= 0:
            raise timeout_error(path, fd, timeout_s, purpose)
        time.sleep(min(delay, left))
        delay = min(delay * 2, _POLL_MAX_S)


@contextmanager
def file_lock(path: Path, *, shared: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
              mode: int = 0o600, purpose: str = "", must_hold: bool = False) -> Iterator[bool]:
    """Hold a lock on ``path`` (created with ``mode`` if missing) for the block; yields True.

    ``timeout_s=0``: one try; yields False when another holder conflicts (the block then runs
    without the lock and must check the value). Otherwise waits at most ``timeout_s`` and raises
    LockError naming the lock and its holder. ``must_hold``: the block never runs without the
    lock, a ``timeout_s`` of 0 (the user's lock_timeout_s: "do not wait") being one try, then
    LockError. Raises OSError when the lock file cannot be opened
    (callers map it: the store to PermissionDenied naming its directory)."""
    fd = open_lock_file(path, mode=mode)
    try:
        if timeout_s <= 0 and not must_hold:
            held = try_acquire(fd, shared=shared)
        else:
            acquire(fd, path, shared=shared, timeout_s=timeout_s, purpose=purpose)
            held = True
        yield held
    finally:
        os.close(fd)  # releases the lock


def is_locked(path: Path) -> bool:
    """Whether some process holds a lock on ``path`` right now (False when it does not exist)."""
    try:
        fd = open_lock_file(path, create=False)
    except FileNotFoundError:
        return False
    try:
        return not try_acquire(fd)
    finally:
        os.close(fd)


class Holder(Record):
    """A process /proc/locks shows holding a lock (its pid as this pid namespace sees it)."""

    pid: int
    kind: str  # "WRITE" (exclusive) or "READ" (shared)
    user: str | None
    command: str | None

    def describe(self) -> str:
        who = f"pid {self.pid}" + (f" of user {self.user}" if self.user else "")
        mode = "exclusive" if self.kind == "WRITE" else "shared"
        return who + (f" ({self.command})" if self.command else "") + f", {mode}"


def holders(fd: int, *, proc_locks: str = "/proc/locks") -> list[Holder]:
    """The processes holding locks on the file open as ``fd`` (empty when unknown)."""
    info = os.fstat(fd)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    found = []
    try:
        with open(proc_locks, encoding="ascii", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":  # "->": a waiter, not a holder
            continue
        if fields[5] != device or not fields[4].lstrip("-").isdigit():
            continue
        pid = int(fields[4])
        if pid > 0:
            found.append(Holder(pid, fields[3], *_process_owner(pid)))
    return found


def _process_owner(pid: int) -> tuple[str | None, str | None]:
    user = command = None
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = f"uid {uid}"
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read(4096).split(b"\0")
        command = " ".join(a.decode("utf-8", "replace") for a in argv if a)[:200] or None
    except OSError:
        pass
    return user, command


def timeout_error(path: Path, fd: int, timeout_s: float, purpose: str = "") -> LockError:
    """The LockError for a wait on ``path`` that ran out after ``timeout_s``."""
    found = holders(fd)
    what = f" ({purpose})" if purpose else ""
    if found:
        held_by = "; held by " + "; ".join(h.describe() for h in found)
        hint = ("wait for that process to finish, or stop it if it is stuck; "
                "lock_timeout_s (BERTH_LOCK_TIMEOUT_S) sets how long berth waits")
    else:
        held_by = "; the holder is not visible from here (another node, or /proc restricted)"
        hint = ("find the berth command still running on a node that uses this directory; "
                "lock_timeout_s (BERTH_LOCK_TIMEOUT_S) sets how long berth waits")
    return LockError(f"gave up waiting for the lock {path}{what} after {timeout_s:g} s{held_by}", hint=hint)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"descriptor {fd}"
