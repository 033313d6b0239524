"""Unprivileged FUSE mounts of images: squashfuse (read-only) and fuse-overlayfs on top.

Both daemons run in the foreground as children of berth with a parent-death signal
(SIGTERM, :func:`berth.proc.start`'s ``parent_death``), so that they cannot outlive a berth
killed with SIGKILL by more than the time libfuse needs to unmount; whatever a kill leaves (a busy mount whose
daemon is gone) is removed by berth.runtime.state's stale cleanup with ``fusermount3 -u -z``. A clean-up that
cannot unmount says why (:func:`unmount_or_say`), never silently.
Unmounting the overlay first, waiting for its daemon, then the SquashFS avoids the EBUSY seen
with daemonized mounts (TESTBED.md).
"""

from __future__ import annotations

import os
import signal
import time

from berth import fsutil, proc
from berth.errors import ProgramFailed, RuntimeFailure

MOUNT_TIMEOUT_S = 10.0
#: The programs berth runs as FUSE daemons (mount_squashfs, mount_overlay).
DAEMON_PROGRAMS = ("squashfuse", "squashfuse_ll", "fuse-overlayfs")


class FuseMount:
    """A running FUSE daemon and its mount point."""

    __slots__ = ("mountpoint", "process", "what", "log_path")

    def __init__(self, mountpoint: str, process: proc.Child, what: str, log_path: str) -> None:
        self.mountpoint = mountpoint
        self.process = process
        self.what = what
        self.log_path = log_path


def _log_tail(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 2000))
            return handle.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _start(argv: list[str], mountpoint: str, what: str, log_path: str, *, detached: bool = False) -> FuseMount:
    """``detached``: the daemon outlives berth (own session, working directory /, no
    parent-death signal): a shared image mount (berth.runtime.imagemount)."""
    before = os.stat(mountpoint).st_dev
    with open(log_path, "ab") as log:
        if detached:
            process = proc.start(argv, stdout=log, stderr=log, cwd="/", new_session=True)
        else:
            process = proc.start(argv, stdout=log, stderr=log, parent_death=signal.SIGTERM)
    mount = FuseMount(mountpoint, process, what, log_path)
    try:
        return _wait_mounted(mount, before, what, log_path)
    except RuntimeFailure:
        if process.poll() is None:  # it did not mount in time
            stop(mount)
        raise
    except BaseException:
        _abandon(mount, before)
        raise


def _abandon(mount: FuseMount, before: int) -> None:
    """Stop a daemon whose mount berth gave up waiting for (a stop signal raised in the wait):
    first let it finish mounting or fail (bounded), then unmount and end it. A
    daemon left to itself mounted after berth had cleaned up, with no record and nobody to
    unmount it (seen: a SIGTERM to a ``--scope node`` task while its container started left
    the image mounted). A second stop signal meanwhile does not cut this short."""
    try:
        held = proc.ignore_stop()
    except ValueError:  # not the main thread: no signal handlers to change
        held = {}
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while mount.process.poll() is None and time.monotonic() < deadline:
            try:
                if os.stat(mount.mountpoint).st_dev != before:
                    break
            except OSError:
                break
            time.sleep(0.001)
        if mount.process.poll() is None or is_mounted(mount.mountpoint):
            stop(mount)
    finally:
        proc.restore_handlers(held)


def _wait_mounted(mount: FuseMount, before: int, what: str, log_path: str) -> FuseMount:
    """Until ``mount``'s mount point is another device than ``before``; RuntimeFailure when
    its process exits first or MOUNT_TIMEOUT_S passes.

    Woken by the events themselves (:class:`_MountEvents`): a change of this process's mount
    table, or the daemon's exit. The sleeps with a growing delay that this replaced woke ~0.6 ms
    after a ~2 ms mount on average, on every container start and every job step's node."""
    mountpoint, process = mount.mountpoint, mount.process
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    with _MountEvents(process.pid) as events:
        while True:
            try:
                if os.stat(mountpoint).st_dev != before:
                    return mount
            except OSError:
                pass
            if process.poll() is not None:
                from berth.runtime import hostcheck

                found = hostcheck.fuse_restriction()
                raise RuntimeFailure(f"{what} failed ({proc.describe_status(process.returncode)}): "
                                     f"{_log_tail(log_path) or 'no message'}"
                                     + (f"; {found.found}" if found else ""),
                                     hint=f"ask your site administrator to fix FUSE: {found.fix}" if found
                                     else "run 'berth doctor' to check FUSE on this node")
            remaining = deadline - time.monotonic()
            if remaining < 0:
                raise RuntimeFailure(f"{what} did not mount within {MOUNT_TIMEOUT_S:g} s",
                                     hint="run 'berth doctor' to check FUSE on this node")
            events.wait(remaining)


class _MountEvents:
    """Waits for what ends the wait for a mount: a change of this process's mount table
    (``/proc/self/mountinfo`` polls POLLPRI after a mount or unmount in its namespace, proc(5)),
    or the exit of process ``pid`` (its pidfd polls readable; Linux 5.3). Either may come from
    elsewhere (another mount of the node, a spurious wake-up): the caller looks again each time.
    Where a descriptor cannot be had (an old kernel, no /proc), waits are short sleeps growing
    to 1 ms, as before."""

    __slots__ = ("_pid", "_fds", "_poll", "_delay")

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._fds: list[int] = []
        self._poll = None
        self._delay = 0.0002

    def __enter__(self) -> _MountEvents:
        import select

        try:
            self._fds.append(os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC))
            self._fds.append(os.pidfd_open(self._pid))
        except (OSError, AttributeError):
            self.__exit__()
            return self
        self._poll = select.poll()
        self._poll.register(self._fds[0], select.POLLPRI)
        self._poll.register(self._fds[1], select.POLLIN)
        return self

    def wait(self, timeout_s: float) -> None:
        if self._poll is not None:
            self._poll.poll(max(1, int(timeout_s * 1000) + 1))
            return
        time.sleep(min(self._delay, max(timeout_s, 0)))
        # Capped at 1 ms: a mount takes 4-6 ms here, and a 2 ms cap overshot it by ~1 ms on
        # average (measured: median mount wait 5.9 ms with a 2 ms cap, 4.7 ms with 1 ms).
        self._delay = min(self._delay * 2, 0.001)

    def __exit__(self, *exc) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._poll = None


#: ``-o`` options that let the kernel cache an immutable image: entries, attributes and
#: negative lookups for a day, file pages across opens. Only squashfuse (libfuse's high-level
#: API) takes them; squashfuse_ll rejects them ("unknown option") because it already answers
#: every lookup and getattr with an unlimited timeout and opens files with keep_cache
#: (squashfuse 0.1.105's ll.c: SQFS_TIMEOUT = DBL_MAX, fi->keep_cache = 1).
IMMUTABLE_CACHE_OPTIONS = ("kernel_cache", "entry_timeout=86400", "attr_timeout=86400", "negative_timeout=86400")


def squashfs_program(choice: str = "auto") -> tuple[str, tuple[str, ...]]:
    """The FUSE program for SquashFS images and its extra ``-o`` options, from the site's
    ``image_fuse`` (``auto``: squashfuse_ll when installed)."""
    # squashfuse_ll (libfuse's low-level API, same package) serves lookups and reads with far
    # less overhead: an import storm of 3000 modules took 396 ms on it and 699 ms on squashfuse
    # (bench/RESULTS.md, import storm, host python on each mount).
    if choice == "auto":
        choice = "squashfuse_ll" if proc.has_program("squashfuse_ll") else "squashfuse"
    return choice, (IMMUTABLE_CACHE_OPTIONS if choice == "squashfuse" else ())


def mount_squashfs(image: str, mountpoint: str, log_path: str, *, program: str | None = None,
                   options: tuple[str, ...] | None = None, detached: bool = False) -> FuseMount:
    """Mount SquashFS file ``image`` read-only at ``mountpoint`` with ``program`` (default: as
    :func:`squashfs_program` picks) and extra ``options``; ``detached``: see ``_start``.
    Raises RuntimeFailure."""
    if not os.access(image, os.R_OK):
        raise RuntimeFailure(f"cannot read the image file {image}",
                             hint="check its permissions (site store images must be world-readable)")
    if program is None:
        program, default_options = squashfs_program()
        options = default_options if options is None else options
    mount_options = ",".join(("ro", *(options or ())))
    return _start([program, "-f", "-o", mount_options, image, mountpoint], mountpoint, f"{program} of {image}",
                  log_path, detached=detached)


def mount_overlay(lower: str, upper: str, work: str, mountpoint: str, log_path: str, *,
                  squash_to: tuple[int, int] | None = None) -> FuseMount:
    """fuse-overlayfs of ``lower`` (read-only) + ``upper`` at ``mountpoint``.

    ``squash_to=(uid, gid)`` shows every file as owned by the caller, so a ``--writable`` root
    is writable everywhere (TESTBED.md: root-owned lower directories otherwise refuse writes).
    """
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if squash_to is not None:
        options += f",squash_to_uid={squash_to[0]},squash_to_gid={squash_to[1]}"
    return _start(["fuse-overlayfs", "-f", "-o", options, mountpoint], mountpoint, "fuse-overlayfs", log_path)


def daemon_mountpoint(pid: object) -> str | None:
    """The mount point that process ``pid`` serves when it is a FUSE daemon as berth starts them
    (:func:`mount_squashfs`, :func:`mount_overlay`, detached or not: one of DAEMON_PROGRAMS
    first in its command line, the mount point last), else None: not a pid, gone, a zombie (no
    command line), or a recycled pid that runs anything else.

    The one test of "this pid is our daemon": compare the answer with the mount point (never
    the program name alone: a recorded pid recycled into another squashfuse of the same user, a
    shared image mount serving other containers, passes a test of the name). The command line,
    not ``comm``: any process may rename itself with prctl(PR_SET_NAME). A daemon that has
    not exec'd yet is not one (its command line is still berth's)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return None
    if argv and argv[-1] == b"":
        argv.pop()  # the terminating NUL
    if len(argv) < 2 or os.fsdecode(os.path.basename(argv[0])) not in DAEMON_PROGRAMS:
        return None
    return os.fsdecode(argv[-1])


def is_mounted(mountpoint: str) -> bool:
    """True when ``mountpoint`` appears in this process's mount table."""
    return mountpoint in mounted_paths()


def mounted_paths() -> set[str]:
    paths = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                fields = line.split(" ")
                if len(fields) > 4:
                    paths.add(fsutil.mountinfo_path(fields[4]))
    except OSError:
        pass
    return paths


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """fusermount3 -u (or -u -z); ignores 'not mounted'. Raises ProgramFailed otherwise, with
    the likely cause in its hint (:func:`fusermount_hint`). Root unmounts itself (umount2): it
    needs no setuid helper, and libfuse mounts for root without one, so a node without fuse3
    (seen: a bare GPU node) let root mount and then left every mount behind."""
    if os.geteuid() == 0:
        failure = _umount2(mountpoint, lazy)
        if failure is not None and is_mounted(mountpoint):
            raise ProgramFailed(f"umount {mountpoint} failed: {failure}", hint=fusermount_hint())
        return
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), "--", mountpoint]
    result = proc.run(argv, check=False)
    if result.returncode != 0 and is_mounted(mountpoint):
        detail = (result.stderr or b"").decode("utf-8", "replace").strip()[-500:]
        raise ProgramFailed(f"fusermount3 -u {mountpoint} failed: {detail}", hint=fusermount_hint())


def _umount2(mountpoint: str, lazy: bool) -> str | None:
    """umount2(2) of ``mountpoint``, not following a final symbolic link (UMOUNT_NOFOLLOW, as
    fusermount3 does not either), lazily (MNT_DETACH) with ``lazy``; the error's words, or None."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), 0x8 | (0x2 if lazy else 0)) == 0:  # UMOUNT_NOFOLLOW, MNT_DETACH
        return None
    return os.strerror(ctypes.get_errno())


def fusermount_hint() -> str:
    """Why an unprivileged ``fusermount3`` may fail, for an error's hint: seen on a GPU node, a
    fusermount3 first on PATH that is not setuid root (a copy in a software environment), which
    cannot unmount a user's FUSE mount while libfuse's own (by its absolute path) could mount."""
    import stat

    try:
        path = proc.find_program("fusermount3")
        setuid = bool(os.stat(path).st_mode & stat.S_ISUID)
    except Exception:  # noqa: BLE001 - not installed (ProgramNotFound), unreadable: no better hint
        return "run 'berth doctor' to check FUSE on this node"
    if not setuid and os.geteuid() != 0:
        return (f"the fusermount3 first on PATH ({path}) is not setuid root, so it cannot unmount your FUSE "
                f"mounts: put the system's (/usr/bin) first on PATH or remove that one; 'berth doctor' checks it")
    return "run 'berth doctor' to check FUSE on this node"


def unmount_or_say(mountpoint: str, *, lazy_only: bool = False) -> str | None:
    """Unmount ``mountpoint`` for a clean-up that must not raise: plainly, then lazily (EBUSY;
    ``lazy_only``: lazily at once). None when it is not mounted any more, else why it still is,
    for the user: fusermount3's words and the likely cause (:func:`fusermount_hint`). The one
    rule of every clean-up path (the last one out, stale clean-up, the lingering mount's reaper,
    ``berth doctor --cleanup``, teardown): a failed unmount is said, never dropped."""
    failure = None
    for lazy in (True,) if lazy_only else (False, True):
        try:
            unmount(mountpoint, lazy=lazy)
            return None
        except Exception as exc:  # noqa: BLE001 - EBUSY: retry lazily; fusermount3 missing: said too
            hint = getattr(exc, "hint", None)
            failure = getattr(exc, "message", str(exc)) + (f" ({hint})" if hint else "")
            time.sleep(0.02)
    return failure


def stop(mount: FuseMount, *, timeout_s: float = 5.0) -> str | None:
    """Unmount and wait for the daemon; retry lazily on EBUSY; never raises. Returns why the
    mount point is still mounted (:func:`unmount_or_say`), or None."""
    failure = unmount_or_say(mount.mountpoint)
    proc.wait_or_kill(mount.process, timeout_s)
    return failure
