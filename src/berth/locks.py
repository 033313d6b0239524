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
* Code that only looks whether a lock is held (doctor, ps, "busy" checks) calls
  :func:`is_locked` (:func:`locked` for many at once), which reads /proc/locks and takes nothing;
  code that removes what a lock guards takes the lock and holds it while it removes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from berth.errors import LockError
from berth.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Used when no settings are at hand; settings ``lock_timeout_s`` has the same default.
DEFAULT_TIMEOUT_S = 600.0
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.25
_FLOCK_HINT = ("the file system must support flock(2) (Lustre: mounted with -o flock; NFS: with "
               "its lock service running)")


def open_lock_file(path: Path, *, mode: int = 0o600, create: bool = True, tighten: bool = True) -> int:
    """A read-write descriptor of the lock file ``path`` (created with ``mode`` if missing and
    ``create``). Refuses symbolic links and anything but a regular file (OSError ELOOP or
    EINVAL); with ``tighten``, tightens a lock file of the caller's that group or others could
    open (not for a file the caller has yet to judge as its own). Raises OSError."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, mode)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if tighten and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & ~mode & 0o077:
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


def is_locked(path: Path, *, proc: str = "/proc") -> bool:
    """Whether some process holds a flock on ``path`` right now, found without taking it (False
    when ``path`` does not exist). For the looks (``berth doctor``, ``berth ps``, the GPU
    ledger's "busy", a mount's live holders): a look that took the lock, even for an instant,
    made a concurrent one-try taker fail ("GPU in use") or a cleaner see a dead holder as live.

    The answer comes from ``/proc/locks``: the FLOCK lines (waiters, ``->``, skipped) naming the
    file's device and inode as the kernel prints them (the superblock's device from
    ``/proc/self/mountinfo`` and the inode from ``/proc/self/fdinfo`` of a descriptor of it,
    not fstat: btrfs and overlayfs report other numbers there). Where /proc cannot tell, this
    falls back to one try of the lock (the old way, which takes it for an instant): /proc/locks
    or fdinfo unreadable; a /proc of another PID namespace than the first (the kernel leaves
    out locks whose holder it cannot see there, checked on 6.18); a file system whose locks
    other nodes may hold (NFS, Lustre, FUSE...: only the local ones are in /proc/locks); on
    btrfs, a lock /proc/locks shows for the file's numbers that another user's process holds
    (subvolumes repeat inode numbers; the caller's own holders are told apart by their
    descriptors, :meth:`_ProcLocks._held_here`).

    A symbolic link, or anything else than a regular file, at ``path`` is not locked (False):
    berth takes its locks only through :func:`open_lock_file`, which refuses those, so no berth
    can hold a lock by that name, and the entry is not one of berth's (the cleaners, which look
    at entries others can plant or swap, then treat it as dead). The link is never followed.
    A file the caller may not even read is looked at in /proc through a path descriptor; raises
    OSError (EACCES) only when /proc cannot tell for it, LockError (in the fallback) when the
    file system cannot lock."""
    return locked([path], proc=proc)[0]


def locked(paths: Iterable[Path], *, proc: str = "/proc") -> list[bool]:
    """:func:`is_locked` for each of ``paths``, in one look: /proc's namespace check,
    ``/proc/self/mountinfo`` and ``/proc/locks`` are read once for all of them (at the first
    path that needs them), not once per path (a mount's live holders, the GPU ledger). The
    fallbacks are is_locked's, path by path; a link or non-regular entry is not locked, as
    there; raises as it does, at the first such path."""
    look = _ProcLocks(proc)
    return [_is_locked(path, look) for path in paths]


def _is_locked(path: Path, look: "_ProcLocks") -> bool:
    # Read-write where the caller may write it, as open_lock_file: the fallback's exclusive try
    # needs it on NFS (flock emulated by byte-range locks: EBADF on a read-only descriptor).
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    unreadable = None
    try:
        try:
            fd = os.open(path, os.O_RDWR | flags)
        except OSError as exc:  # not writable by the caller, or a directory (judged below)
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY, errno.EISDIR):
                raise
            try:
                fd = os.open(path, os.O_RDONLY | flags)
            except PermissionError as denied:  # mode 000: /proc can still tell, from a path descriptor
                unreadable = denied
                fd = os.open(path, os.O_PATH | flags)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:  # a symbolic link (never followed), a socket: no lock of berth's
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            return False
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory, a FIFO, a link: no lock of berth's
            return False
        seen = look.seen(fd, can_try=unreadable is None)
        if seen is None and unreadable is not None:
            raise unreadable  # no descriptor to try the lock with
        return seen if seen is not None else not try_acquire(fd)
    finally:
        os.close(fd)


#: File systems whose flocks are all in this node's /proc/locks (others may be held elsewhere).
_LOCAL_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "overlay"})
#: Local file systems whose /proc/locks names do not tell one file from another: btrfs's
#: subvolumes share the device /proc/locks prints, and each numbers its inodes from 256, so a
#: lock on another subvolume's file of the same number reads as this file's. A FLOCK seen there
#: is looked for in its holders' descriptors (_ProcLocks._held_here); none seen is none held.
_REPEATED_INODES = frozenset({"btrfs"})
_PF_KTHREAD = 0x00200000


class LockLine(Record):
    """One lock of /proc/locks (``N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF``)."""

    type: str  # FLOCK, POSIX, OFDLCK, LEASE...
    kind: str  # WRITE, READ
    pid: int  # 0: a holder this /proc's PID namespace cannot see; -1: an OFD lock
    major: int
    minor: int
    inode: int


def parse_proc_locks(text: str) -> list[LockLine]:
    """The held locks of /proc/locks ``text``: blocked waiters (``->``) and lines that do not
    parse are left out. The device is ``%02x:%02x`` (hex) in the kernel's format."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            found.append(LockLine(fields[1], fields[3], int(fields[4]), int(major, 16), int(minor, 16),
                                  int(inode)))
        except ValueError:
            continue
    return found


class _ProcLocks:
    """What /proc tells of flocks, for one look: whether this /proc is of the first PID
    namespace, the local file systems' devices by mount id, and the FLOCKs held, each read
    once, when first needed; None for what could not be read (the caller then tries the lock).
    Only the file's own fdinfo is read per file. One rule with its twin in C, berth-front.c's
    ``lock_state`` (the compiled front end's looks at holders and container locks): keep the
    two alike."""

    def __init__(self, proc: str) -> None:
        self.proc = proc
        self._read: dict[str, Any] = {}

    def _once(self, name: str, read: Callable[[], Any]) -> Any:
        if name not in self._read:
            try:
                self._read[name] = read()
            except (OSError, LookupError, ValueError):
                self._read[name] = None
        return self._read[name]

    def _first_namespace(self) -> bool:
        with open(f"{self.proc}/2/stat", "rb") as handle:  # pid 2 is kthreadd only in the first namespace
            return bool(int(handle.read().rsplit(b")", 1)[1].split()[6]) & _PF_KTHREAD)

    def _local_devices(self) -> dict[str, tuple[int, int, bool] | None]:
        """mount id -> the superblock's device and whether its inode numbers repeat
        (:data:`_REPEATED_INODES`); None: a file system whose locks other nodes may hold."""
        devices: dict[str, tuple[int, int, bool] | None] = {}
        with open(f"{self.proc}/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if fields:
                    kind = fields[fields.index("-") + 1]
                    major, minor = (int(n) for n in fields[2].split(":"))
                    local = kind in _LOCAL_FILE_SYSTEMS
                    devices[fields[0]] = (major, minor, kind in _REPEATED_INODES) if local else None
        return devices

    def _held(self) -> dict[tuple[int, int, int], list[int]]:
        """The FLOCKs held: (major, minor, inode) -> the pids /proc/locks names for them."""
        held: dict[tuple[int, int, int], list[int]] = {}
        with open(f"{self.proc}/locks", encoding="ascii", errors="replace") as handle:
            for line in parse_proc_locks(handle.read()):
                if line.type == "FLOCK":
                    held.setdefault((line.major, line.minor, line.inode), []).append(line.pid)
        return held

    def _held_here(self, fd: int, key: tuple[int, int, int], pids: list[int]) -> bool | None:
        """On btrfs (:data:`_REPEATED_INODES`), whether a FLOCK /proc/locks names as ``key`` is
        on the file open as ``fd`` or on another subvolume's file of that number, told without
        taking the lock: each holder's ``/proc/PID/fdinfo`` shows the locks held through each of
        its descriptors, and ``/proc/PID/fd/N``'s status has the subvolume's own device, as our
        ``fstat`` has. True: one holds it on this file, or one we can look at holds it still
        though we did not find where (it released it and took it again meanwhile: counted held,
        never tried); False: every one holds it elsewhere, or /proc/locks no longer shows it;
        None: a holder we cannot look at (another user's, gone, another PID namespace's) still
        holds one (the caller then tries the lock, as where /proc cannot tell)."""
        own = os.fstat(fd)
        name = f" {key[0]:02x}:{key[1]:02x}:{key[2]} "
        unplaced: set[int] = set()  # looked at, the lock not found: released (and taken again?)
        hidden: set[int] = set()  # cannot be looked at
        for pid in pids:
            located = False
            try:
                entries = os.listdir(f"{self.proc}/{pid}/fdinfo") if pid > 0 else None
            except OSError:
                entries = None
            if entries is None:
                hidden.add(pid)
                continue
            for entry in entries:
                try:
                    with open(f"{self.proc}/{pid}/fdinfo/{entry}", encoding="ascii", errors="replace") as handle:
                        if not any(line.startswith("lock:") and name in line for line in handle):
                            continue
                    info = os.stat(f"{self.proc}/{pid}/fd/{entry}")
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) == (own.st_dev, own.st_ino):
                    return True
                located = True
            if not located:
                unplaced.add(pid)
        if not unplaced and not hidden:
            return False
        # A holder that shows no such lock may have released it since /proc/locks was read:
        # read it again (rarely: only here).
        still = set(self._held().get(key, ()))
        if unplaced & still:
            return True
        return None if hidden & still else False

    def identity(self, fd: int) -> tuple[int, int, int] | None:
        """The file open as ``fd`` as /proc/locks names it (major, minor, inode: the superblock's
        device from mountinfo, the inode from fdinfo, not fstat, whose device differs on btrfs
        and overlayfs); None on a file system whose locks other nodes may hold, or unreadable.
        On btrfs the name may also be another subvolume's file's (:data:`_REPEATED_INODES`)."""
        found = self._identity(fd)
        return None if found is None else found[:3]

    def _identity(self, fd: int) -> tuple[int, int, int, bool] | None:
        try:
            with open(f"{self.proc}/self/fdinfo/{fd}", encoding="ascii", errors="replace") as handle:
                info = dict(line.split(":", 1) for line in handle.read().splitlines() if ":" in line)
            mount_id, inode = info["mnt_id"].strip(), int(info["ino"])
        except (OSError, LookupError, ValueError):
            return None
        devices = self._once("mountinfo", self._local_devices)
        device = devices.get(mount_id) if devices is not None else None
        return None if device is None else (device[0], device[1], inode, device[2])

    def seen(self, fd: int, *, can_try: bool = True) -> bool | None:
        """Whether /proc/locks shows a FLOCK on the file open as ``fd``; None when it cannot tell.
        On btrfs a FLOCK seen is looked for in its holders' descriptors (:meth:`_held_here`);
        only one held by a process we cannot look at (another user's) gives None, where the
        caller ``can_try`` the lock (without a descriptor to try it with, it counts: a live
        holder taken for dead is the worse mistake). A try takes a free lock for an instant,
        which makes a concurrent one-try taker fail (review 11: 3,606 of 200,000 takes failed
        while 91dabca tried every FLOCK seen on btrfs)."""
        if not self._once("namespace", self._first_namespace):
            return None
        found = self._identity(fd)
        held = self._once("locks", self._held) if found is not None else None
        if held is None:
            return None
        pids = held.get(found[:3])
        if not pids or not found[3]:
            return bool(pids)
        try:  # btrfs: maybe another subvolume's file's
            here = self._held_here(fd, found[:3], pids)
        except OSError:
            here = None
        if here is None:
            return None if can_try else True
        return here


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
    device = _ProcLocks(os.path.dirname(proc_locks)).identity(fd)
    if device is None:  # not a local file system's, or /proc unreadable: fstat's numbers
        info = os.fstat(fd)
        device = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    try:
        with open(proc_locks, encoding="ascii", errors="replace") as handle:
            lines = parse_proc_locks(handle.read())
    except OSError:
        return []
    return [Holder(line.pid, line.kind, *_process_owner(line.pid)) for line in lines
            if (line.major, line.minor, line.inode) == device and line.pid > 0]


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
