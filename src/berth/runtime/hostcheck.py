"""Host restrictions that keep unprivileged containers from working, each with its fix (issue 8).

Used by ``berth doctor`` and by the errors of a run that fails for one of these reasons, so
both say the same thing. Only reads (``/proc/sys``, ``/dev/fuse``) and one flock probe; the
paths are parameters so that tests can point them at a fake tree.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from berth.record import Record

PROC_SYS = Path("/proc/sys")
FUSE_DEVICE = Path("/dev/fuse")
_PERSIST = " (and in a file under /etc/sysctl.d/ to keep it after a reboot)"


class Restriction(Record):
    """One restriction found: what (``found``) and what an administrator does about it."""

    found: str
    fix: str


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def userns_restrictions(proc_sys: Path = PROC_SYS) -> list[Restriction]:
    """The sysctls that forbid unprivileged user namespaces, as set on this host."""
    found = []
    if _read(proc_sys / "kernel" / "apparmor_restrict_unprivileged_userns") == "1":
        found.append(Restriction(
            "kernel.apparmor_restrict_unprivileged_userns=1 (Ubuntu 23.10 and later: AppArmor "
            "denies user namespaces to programs without a profile that allows them)",
            "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0" + _PERSIST + ", or load "
            "an AppArmor profile with 'userns,' for runc, unshare and berth's interpreter"))
    if _read(proc_sys / "user" / "max_user_namespaces") == "0":
        found.append(Restriction("user.max_user_namespaces=0 (user namespaces switched off)",
                                 "sysctl -w user.max_user_namespaces=15000" + _PERSIST))
    if _read(proc_sys / "kernel" / "unprivileged_userns_clone") == "0":
        found.append(Restriction("kernel.unprivileged_userns_clone=0 (Debian/Ubuntu kernels: "
                                 "only root may create user namespaces)",
                                 "sysctl -w kernel.unprivileged_userns_clone=1" + _PERSIST))
    return found


def fuse_restriction(device: Path = FUSE_DEVICE) -> Restriction | None:
    """Why ``device`` cannot be opened for reading and writing by this user, or None."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return Restriction(f"{device} does not exist (the fuse kernel module is not loaded, or "
                           "the container this runs in has no FUSE device)",
                           "modprobe fuse (and add 'fuse' to /etc/modules), or pass /dev/fuse "
                           "into the container or VM berth runs in")
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return Restriction(f"{device} is not accessible to you ({exc.strerror})",
                               f"chmod 0666 {device} (the Debian default; a udev rule "
                               "KERNEL==\"fuse\", MODE=\"0666\" keeps it)")
        return Restriction(f"{device} cannot be opened: {exc.strerror}",
                           "check that the fuse kernel module works (dmesg)")
    os.close(fd)
    return None


def lock_restriction(directory: Path) -> Restriction | None:
    """Whether flock(2) works in ``directory`` (probed on a temporary file); None when it does
    or when the directory cannot be written (then nothing is locked there by this user)."""
    probe = directory / f".berth-lock-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            return Restriction(
                f"flock(2) does not work in {directory}: {exc.strerror}",
                "mount that file system with working locks (Lustre: -o flock; NFS: with the lock "
                "service running, not -o nolock), or move the store to one that has them "
                "(user_store / site_store settings)")
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


def userns_hint(proc_sys: Path = PROC_SYS) -> str | None:
    """The administrator's fix for the user namespace restrictions of this host, or None."""
    found = userns_restrictions(proc_sys)
    if not found:
        return None
    return "ask your site administrator to allow unprivileged user namespaces: " + "; ".join(
        f"{r.found}: {r.fix}" for r in found)
