"""One read-only mount of an image per node and user, shared by that user's containers of the
image and reference-counted by them (DESIGN.md direction 12; issue 10, target 1).

::

    STATE_DIR/images/KEY/            0700; KEY names the image (see image_key) and the scope
      lock                           the image's mount lock (flock, exclusive, held briefly)
      root/                          the mount point: the image's SquashFS, read-only
      holders/CONTAINER_ID           one per container using the mount, flock()ed by its berth
                                     for the container's whole life
      mount.json                     the FUSE daemon's pid, program and SquashFS file; while the
                                     mount lingers, since when, for how long, and its reaper
      squashfuse.log                 the daemon's messages

Reference counting is by locks, never by a counter: a holder is a file whose flock is held,
and the kernel drops the flocks of a dead process (``kill -9`` included), so a crash cannot
leave a count wrong. The rules:

* **Joining** (:func:`acquire`): take the mount lock; create and lock this container's holder
  file; use ``root`` when it is mounted and answers, else mount it; drop the mount lock.
* **Leaving** (:meth:`ImageMount.release`): take the mount lock; remove this holder and every
  holder whose lock is free (its berth died); when none is left, unmount and wait for the
  daemon; drop the mount lock.
* **Lingering** (site or user setting ``image_mount_linger``, default 0): the last one out
  leaves the mount up for that long instead, so that the next container of the image (a job
  script calling ``berth run`` in a loop) finds its warm FUSE caches. The record gets
  ``idle_since`` and ``linger_s``; one reaper process per lingering mount (forked detached by
  berth.proc.fork_detached, named ``berth-linger``, holding none of berth's descriptors) sleeps
  until the linger ends, then, under the mount lock, unmounts as the last one out would — when
  the mount is still idle since the same moment and nobody holds it. A joiner clears
  ``idle_since``; a later last one out writes a new one and reuses a live reaper (named in the
  record by pid and start time), which sleeps on (unless the new linger is shorter than the one
  before: the reaper may be sleeping towards the longer one's end, so it is ended and another
  started); a reaper that finds the mount in use looks again every linger, and unmounts it
  once no holder is live and no linger was written (its last holder was killed). Whoever
  unmounts a lingering mount ends its reaper.
* **Stale clean-up** (:func:`cleanup_stale`, run by every ``berth run`` through
  berth.runtime.state and by ``berth doctor --cleanup``): for each image whose mount lock is free
  right now, leaving without a holder of one's own — except a mount lingering within its time
  whose daemon runs (``berth doctor --cleanup`` ends those too). A lingering mount whose time is
  up (its reaper was killed) or whose daemon is gone (Slurm's end of a step) is removed. A
  mount whose daemon lives in another mount namespace (another Slurm job's under
  job_container/tmpfs, the state directory shared) is not in this mount table and is left to
  its own namespace's berths (:func:`_elsewhere`).
  Containers are cleaned first (their runtime killed), so nothing uses a mount when its last
  holder is judged dead.

**Lock order.** A container's state lock (berth.runtime.state), then an image's mount lock;
other holders' locks are only looked at (berth.locks.is_locked), never taken or waited for, and
the mount lock is held for nothing longer than one mount or unmount (bounded by
berth.runtime.fuse's timeouts). Holders change only
under the mount lock, so a container joining while the last one leaves either joins first (the
leaver sees its holder and keeps the mount) or after the unmount (and mounts again): a mount is
never pulled from under a container, and two containers starting together mount once.

The last one out removes the image's directory, lock file included, while holding the lock. A
berth that was waiting for that lock then holds a lock on a file that has no name any more: so
every taker compares the locked file with the one the path names (device and inode) and starts
again when they differ, and creates ``holders/`` and ``root/`` only once it holds the lock.

**The daemon** must outlive the berth that started it, so it runs in its own session, without
berth's parent-death signal, its working directory ``/``; it ends when its mount is unmounted.
Within a Slurm job step the scope (see :func:`mount_scope`) keeps mounts per step, because Slurm
kills every process of a step's cgroup when the step ends, a daemon that other steps use too.

**Security.** The mount lies in the caller's private 0700 state directory, and a FUSE mount
without ``allow_other`` refuses every other user (root too), so no other user's container can
read an image through it. Site-store images are mounted per user too: sharing one mount across
users would need ``allow_other`` (``user_allow_other`` in /etc/fuse.conf), a site-wide decision
berth does not take for the site.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import signal
import time
from pathlib import Path

from berth import fsutil, locks, proc
from berth.errors import RuntimeFailure
from berth.runtime import fuse
from berth.untrusted import read_json_object

IMAGES = "images"
HOLDERS = "holders"
_SCOPE_PART = re.compile(r"[A-Za-z0-9_]{1,32}")
#: How long a leaver waits for the daemon to exit after its unmount before killing it.
DAEMON_EXIT_S = 5.0
#: How often, at least, the reaper of a lingering mount that is in use again looks whether its
#: holders live (:func:`_reap`: every linger, not more often than this): each look reads
#: /proc/locks, which holds every file lock operation of the node for an RCU grace period.
REAPER_POLL_S = 5.0


def mount_scope(environ) -> str:
    """The part of the key that keeps mounts apart where a scheduler ends processes by group:
    ``slurm-JOB.STEP`` inside a Slurm step, else empty (one mount for the whole node).

    Slurm ends a step's processes node by node (one slurmstepd per node), the mount's daemon
    too: in a step of several nodes, ``.nNODE`` (``SLURM_NODEID``) is added, so that where
    several nodes of a step share one state directory (the test cluster's slurmds on one
    machine) a node's task never reads through a daemon that another node's slurmstepd ends
    when its own task is done (seen as ENOTCONN in a 4-node step). Nodes of a real cluster have
    their own state directories; for them this changes only the name."""
    job, step = environ.get("SLURM_JOB_ID", ""), environ.get("SLURM_STEP_ID", "")
    if not (job and _SCOPE_PART.fullmatch(job)):
        return ""
    if not _SCOPE_PART.fullmatch(step):
        return f"slurm-{job}"
    nodes, node = environ.get("SLURM_STEP_NUM_NODES", ""), environ.get("SLURM_NODEID", "")
    if nodes.isascii() and nodes.isdigit() and int(nodes) > 1 and _SCOPE_PART.fullmatch(node):
        return f"slurm-{job}.{step}.n{node}"
    return f"slurm-{job}.{step}"


class ImageMount:
    """One container's hold on a shared image mount; ``root`` is the image's root directory."""

    __slots__ = ("directory", "root", "holder", "holder_fd", "lock_timeout_s", "linger_s", "process",
                 "mounted_here")

    def __init__(self, directory: Path, holder: Path, holder_fd: int, lock_timeout_s: float,
                 linger_s: int = 0) -> None:
        self.directory = directory
        self.root = directory / "root"
        self.holder = holder
        self.holder_fd = holder_fd
        self.lock_timeout_s = lock_timeout_s
        #: How long the mount stays after the last holder leaves (site/user image_mount_linger).
        self.linger_s = linger_s
        #: The daemon's Popen when this berth started it (reaped here when it unmounts).
        self.process = None
        self.mounted_here = False

    @property
    def daemon_pid(self) -> int | None:
        return _read_record(self.directory).get("pid")

    def release(self) -> bool:
        """Leave the mount; when no live holder is left, unmount it, or with ``linger_s`` leave
        it lingering (:func:`_linger`). Returns True when this call unmounted it. Never raises
        for a mount that is already gone."""
        lock_fd = _lock(self.directory, self.lock_timeout_s)
        try:
            try:
                os.unlink(self.holder)
            except FileNotFoundError:
                pass
            os.close(self.holder_fd)
            self.holder_fd = -1
            return _leave(self.directory, self.linger_s, self.lock_timeout_s, self.process)
        finally:
            os.close(lock_fd)


def _leave(directory: Path, linger_s: int, lock_timeout_s: float, process=None) -> bool:
    """What the last one out does once its holder is gone (caller holds the mount lock): keep
    the mount for live holders, let it linger, or unmount it. True when it unmounted."""
    if _live_holders(directory):
        return False
    if linger_s > 0 and _serving(directory, _read_record(directory)) and _linger(directory, linger_s,
                                                                                 lock_timeout_s):
        return False
    failure = _unmount(directory, process)
    _remove(directory)
    if failure:
        # Said, not swallowed: the mount stays (its daemon ended), and the next berth run of the
        # image meets it (acquire: removes it or says why it cannot).
        raise RuntimeFailure(_unmount_failure(directory, failure))
    return True


def leave_main(argv: list[str]) -> int:
    """``python -c '...leave_main(sys.argv[1:])' DIRECTORY LINGER_S LOCK_TIMEOUT_S``: the
    compiled front end (berth.runtime.compiledplan) has removed its holder and seen no other
    holder held, and either holder files are left (it judges none dead: removing them is
    :func:`_leave`'s, by this module's look at their locks) or it has no reaper to reuse: the
    rest of the leaving is this module's (removing dead holders, a reaper to start, or the
    unmount)."""
    directory, linger_s, lock_timeout_s = Path(argv[0]), int(argv[1]), float(argv[2])
    if directory.parent.name != IMAGES:
        return 2
    lock_fd = _lock(directory, lock_timeout_s, create=False)
    if lock_fd is None:
        return 0
    try:
        _leave(directory, linger_s, lock_timeout_s)
    except RuntimeFailure as failure:
        import sys

        print(f"berth: warning: {failure.message}", file=sys.stderr)
        return 1
    finally:
        os.close(lock_fd)
    return 0


def image_key(squashfs: Path, digest: object | None, scope: str = "") -> str:
    """The directory name of an image's mount: its digest (``sha256-HEX``), or for a SquashFS
    run by path a hash of where and what it is (:func:`source_key`), plus the scope
    (``mount_scope``)."""
    name = source_key(squashfs, digest)[0]
    return f"{name}@{scope}" if scope else name


def source_key(source: Path, digest: object | None) -> tuple[str, os.stat_result]:
    """The name an image goes by on the node (its shared mount here, its node-local copies in
    berth.runtime.localcopy) and the source's stat. Raises OSError. (Here, not in localcopy:
    every `berth run` needs it, and localcopy only for stage_to_local or unpacked images.)"""
    info = os.stat(source)
    if digest is not None:
        name = str(digest).replace(":", "-")
    else:
        # A SquashFS given by path: key it by where it is and what it is, its inode and ctime
        # too: a file rewritten in place with its size and mtime (cp -p, rsync --inplace) was
        # served from the mount of its old content that lingered (red team). (hashlib imported
        # here: loading OpenSSL costs ~4 ms of every berth run's start otherwise.)
        import hashlib

        ident = (f"{os.path.realpath(source)}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_dev}\0{info.st_ino}"
                 f"\0{info.st_ctime_ns}")
        name = "file-" + hashlib.sha256(ident.encode()).hexdigest()[:32]
    return name, info


def images_dir(state_dir: Path) -> Path:
    return Path(state_dir) / IMAGES


def acquire(state_dir: Path, key: str, squashfs: Path, holder_id: str, *, program: str | None = None,
            options: tuple[str, ...] = (), lock_timeout_s: float = locks.DEFAULT_TIMEOUT_S,
            linger_s: int = 0, log=None) -> ImageMount:
    """Join (or make) the shared mount of ``squashfs`` for the container ``holder_id``.

    ``program``/``options``: the FUSE program and its extra ``-o`` options (berth.runtime.fuse).
    ``linger_s``: how long the mount stays once this holder leaves last (image_mount_linger).
    Raises RuntimeFailure when the image cannot be mounted, LockError when the mount lock is not
    free within ``lock_timeout_s``."""
    directory = images_dir(state_dir) / key
    lock_fd = _lock(directory, lock_timeout_s)
    try:
        try:
            fsutil.make_private_dirs(directory / HOLDERS)
            os.makedirs(directory / "root", mode=0o700, exist_ok=True)
        except OSError as exc:
            raise RuntimeFailure(f"cannot create the image mount directory {directory}: {exc.strerror}",
                                 hint="check the state directory (berth doctor shows it)") from None
        holder = directory / HOLDERS / holder_id
        fd = os.open(holder, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        # A new file, which a look can only take for an instant where /proc cannot tell
        # (berth.locks.is_locked's fallback): wait for that, never run without the hold.
        try:
            locks.acquire(fd, holder, timeout_s=lock_timeout_s, purpose="a container's hold on its image mount")
        except BaseException:
            os.unlink(holder)
            os.close(fd)
            raise
        hold = ImageMount(directory, holder, fd, lock_timeout_s, linger_s)
        try:
            record = _read_record(directory)
            if _serving(directory, record):
                if "idle_since" in record:  # lingering: in use again (its reaper sees this and leaves)
                    del record["idle_since"]
                    _write_record(directory, record)
                if log:
                    log(f"sharing the image mount {hold.root}"
                        + (" (it was lingering)" if "linger_s" in record else ""), debug=True)
                return hold
            # A mount there whose daemon is gone (a kill, an unmount that failed): removed, and
            # said; mounting over it failed with fusermount3's confusing "failed to access
            # mountpoint ...: Permission denied" (seen on a GPU node).
            stale = str(hold.root) in fuse.mounted_paths()
            failure = _unmount(directory, None)
            if failure:
                raise RuntimeFailure(f"the image mount point {hold.root} still holds an earlier mount of the image "
                                     f"whose daemon is gone, and berth could not remove it: {failure}")
            if stale and log:
                log(f"note: removed a stale mount of the image at {hold.root} (its daemon was gone)")
            mount = fuse.mount_squashfs(str(squashfs), str(hold.root), str(directory / "squashfuse.log"),
                                        program=program, options=options, detached=True)
            hold.process = mount.process
            hold.mounted_here = True
            _write_record(directory, {"pid": mount.process.pid, "started": _process_start(mount.process.pid),
                                      "program": os.path.basename(mount.process.args[0]),
                                      "squashfs": str(squashfs), "mounted": time.time()})
            if log:
                log(f"mounted the image at {hold.root} (shared)", debug=True)
            return hold
        except BaseException:
            os.unlink(holder)
            os.close(fd)
            hold.holder_fd = -1
            if not _live_holders(directory):
                _unmount(directory, hold.process)
                _remove(directory)
            raise
    finally:
        os.close(lock_fd)


def _lock(directory: Path, timeout_s: float, *, create: bool = True, wait: bool = True) -> int | None:
    """A descriptor holding the mount lock of ``directory`` (made 0700 when ``create``).

    The file locked must still be the one named ``lock`` once held (the last one out removes
    the directory under the lock): otherwise start again. Without ``wait``: one try, None when
    someone holds it (the stale clean-up); with it, ``timeout_s`` bounds the wait (0, the
    user's lock_timeout_s: one try, then LockError). Without ``create``, None when the
    directory is gone. Raises LockError (the wait ran out) and RuntimeFailure (the directory
    cannot be made)."""
    path = directory / "lock"
    while True:
        if create:
            try:
                fsutil.make_private_dirs(directory)
            except FileNotFoundError:
                continue  # images/ removed by the last one out of another image between two mkdirs
            except OSError as exc:
                raise RuntimeFailure(f"cannot create the image mount directory {directory}: {exc.strerror}",
                                     hint="check the state directory (berth doctor shows it)") from None
        try:
            fd = locks.open_lock_file(path, create=create)
        except FileNotFoundError:
            if not create:
                return None
            continue  # removed between the mkdir and the open: again
        try:
            if not wait:
                if not locks.try_acquire(fd):
                    os.close(fd)
                    return None
            else:
                locks.acquire(fd, path, timeout_s=timeout_s, purpose="the image's shared mount")
            held, named = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not create:
            return None


def _remove(directory: Path) -> None:
    """Remove an image's directory whose mount is gone (caller holds its lock; the lock file
    goes last but one, then the directory, and ``images/`` when empty). Leaves it when anything is
    still mounted there."""
    if str(directory / "root") in fuse.mounted_paths():
        return
    for name in ("mount.json", "squashfuse.log"):
        try:
            os.unlink(directory / name)
        except OSError:
            pass
    for name in (HOLDERS, "root"):
        try:
            os.rmdir(directory / name)
        except OSError:
            pass
    try:
        os.unlink(directory / "lock")
        os.rmdir(directory)
        os.rmdir(directory.parent)  # images/, when this was its last entry
    except OSError:
        pass


def _answers(root: Path) -> bool:
    """Whether ``root`` is a mount point (another device than its directory) whose daemon answers."""
    try:
        return os.stat(root).st_dev != os.stat(root.parent).st_dev
    except OSError:
        return False  # ENOTCONN: the daemon is gone


def _serving(directory: Path, record: dict) -> bool:
    """Whether the mount of ``directory`` is there and its recorded daemon still runs. The
    stat of :func:`_answers` alone cannot tell: the kernel answers it from its attribute cache,
    without asking the daemon, when the daemon gives attributes without a time limit
    (squashfuse_ll), so a mount whose daemon was killed (Slurm's end of a step) still looks
    mounted until something reads through it."""
    root = directory / "root"
    pid = record.get("pid")
    return _answers(root) and _our_daemon(pid, root) and not _is_zombie(pid)


def _live_holders(directory: Path, *, remove: bool = True) -> list[str]:
    """Names of holders whose lock is held; removes those whose berth died (caller holds the
    mount lock) unless not ``remove`` (a look without the lock: ``berth doctor``). Looks at the
    holder locks without taking them (berth.locks.locked): a take, even for an instant,
    showed a dead holder as live to a leaver, the reaper or the stale clean-up that looked at the
    same moment. Removing one without its lock is safe under the mount lock: a holder is created
    and locked under it, so a holder whose lock is free then is dead.

    The directory is opened without following a link and its entries are judged and removed
    through it, a link or anything but a regular file never counting as a holder: what can
    write into the state directory (a container that sees it) could otherwise have a clean-up
    remove every file of a directory it links to."""
    live = []
    try:
        fd = fsutil.open_directory(directory / HOLDERS, nofollow=True)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return []  # none, or not a directory of berth's (a link): no holder there
        raise
    try:
        names = os.listdir(fd)
        paths = [fsutil.descriptor_path(fd, name) for name in names]
        # One read of /proc for all; a link or anything but a regular file is not locked.
        for name, held in zip(names, locks.locked(paths)):
            if held:
                live.append(name)
            elif remove:
                try:
                    os.unlink(name, dir_fd=fd)  # a link itself, never what it names
                except OSError:  # gone, or a directory planted there: never a holder
                    pass
    finally:
        os.close(fd)
    return live


def _read_record(directory: Path) -> dict:
    return read_json_object(directory / "mount.json")


def _write_record(directory: Path, record: dict) -> None:
    fsutil.write_atomically(directory / "mount.json", json.dumps(record), mode=fsutil.PRIVATE_FILE, durable=False)


#: The longest linger (the image_mount_linger setting's maximum, berth.config.load).
MAX_LINGER_S = 86400


def lingering_until(record: dict) -> float | None:
    """When a mount record's linger ends (time.time() seconds), or None when it is not
    lingering (in use, or never given a linger). The record is the user's file: a linger that
    no berth can have written (its end not a number, or later than the longest linger from
    now: it would keep the mount for good) is over (0.0)."""
    since, linger = record.get("idle_since"), record.get("linger_s")
    if not (isinstance(since, (int, float)) and not isinstance(since, bool)
            and isinstance(linger, int) and not isinstance(linger, bool)):
        return None
    try:
        until = float(since) + float(linger)
    except OverflowError:  # an integer too large for a float
        return 0.0
    return until if until <= time.time() + MAX_LINGER_S else 0.0  # NaN and infinity too


def _process_start(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot, /proc/PID/stat field 22): with the
    pid, it names one process, never a later one that reuses the pid."""
    fields = proc.stat_fields(pid)
    try:
        return None if fields is None or fields[0] == "Z" else int(fields[19])
    except (IndexError, ValueError):
        return None


def _reaper_alive(record: dict) -> bool:
    reaper = record.get("reaper")
    if not (isinstance(reaper, list) and len(reaper) == 2 and all(isinstance(v, int) for v in reaper)):
        return False
    return reaper[0] > 1 and _process_start(reaper[0]) == reaper[1]


def _linger(directory: Path, linger_s: int, lock_timeout_s: float) -> bool:
    """Leave the mount of ``directory`` mounted, idle, for ``linger_s`` (the caller holds the
    mount lock and was its last holder): the record says since when and for how long, and one
    reaper process (:func:`_reap`) unmounts it once that time has passed with no holder back.
    A live reaper of an earlier linger is reused (it reads the new time) unless this linger is
    shorter than the one before (it would wake too late): then it is ended and one is started.
    Returns False (unmount now) when no reaper can be started."""
    record = _read_record(directory)
    earlier = record.get("linger_s")
    record["idle_since"] = time.time()
    record["linger_s"] = linger_s
    alive = _reaper_alive(record)
    if alive and isinstance(earlier, int) and linger_s < earlier:
        # The setting was lowered: the live reaper may sleep towards the end of the longer linger
        # it read (it wakes no earlier than any end it read). End it (it holds nothing: the mount
        # lock is ours) and start one for this linger. Lingers that stay or grow keep it: each
        # end is then later than every end it can have read.
        reaper = record.pop("reaper")[0]
        if reaper != os.getpid():
            try:
                os.kill(reaper, signal.SIGTERM)
            except OSError:
                pass
        alive = False
    if not alive:
        try:
            pid = proc.fork_detached(lambda: _reap(directory, lock_timeout_s), name="berth-linger")
        except OSError:
            return False
        start = _process_start(pid)
        if start is None:  # it ended already (it cannot have seen this linger: the lock is ours)
            return False
        record["reaper"] = [pid, start]
    _write_record(directory, record)
    return True


def _reap(directory: Path, lock_timeout_s: float) -> None:
    """The reaper of a lingering mount (run detached by :func:`_linger`): sleep until the
    record's linger ends, then, under the mount lock, unmount and remove the mount when its
    linger (perhaps pushed by a later leaver: sleep on) is over and no holder is live. While a
    holder came back and holds it, it looks again every linger (at least :data:`REAPER_POLL_S`;
    the next last one out reuses it): a holder killed (``kill -9``) leaves no linger behind, and
    the mount then goes at most a linger after, as the stale clean-up of a later berth would
    remove it, instead of staying up until one runs (red team). When the record names another
    reaper (a new mount) it leaves it alone."""
    me = [os.getpid(), _process_start(os.getpid())]
    # A wait for the lock, even where the user set lock_timeout_s = 0: one try would end the
    # reaper on a lock someone holds for a moment, and the mount would stay up past its time.
    lock_timeout_s = lock_timeout_s if lock_timeout_s > 0 else locks.DEFAULT_TIMEOUT_S
    look_again_s = 0.0  # while the mount is in use: how long to wait before the next look
    while True:
        until = lingering_until(_read_record(directory))
        if until is not None and until > time.time():
            look_again_s = 0.0
            time.sleep(min(max(until - time.time(), 0.0) + 0.01, 86400.0))
            continue
        if look_again_s:
            time.sleep(look_again_s)
        lock_fd = _lock(directory, lock_timeout_s, create=False)
        if lock_fd is None:
            return  # gone: unmounted by someone else
        try:
            record = _read_record(directory)
            if record.get("reaper") != me:
                return  # not ours any more (a new mount in a new directory)
            until = lingering_until(record)
            if until is not None and until > time.time():
                continue  # a later leaver pushed the time: sleep on (the finally drops the lock)
            if _live_holders(directory):
                linger = record.get("linger_s")
                look_again_s = min(max(float(linger) if isinstance(linger, int) else 0.0, REAPER_POLL_S), 86400.0)
                continue  # look again (the finally drops the lock)
            _unmount(directory, None)  # its linger is over, or its last holder died holding it
            _remove(directory)
            return
        finally:
            os.close(lock_fd)


def _elsewhere(pid: int) -> bool:
    """Whether process ``pid`` lives in another mount namespace than this berth (Slurm's
    job_container/tmpfs gives each job its own, the user's state directory staying shared):
    its mounts are not in this mount table, so they are its own berths' to judge, never this
    one's. False when it cannot be told (gone, or /proc hides it)."""
    ours = _own_mount_namespace()
    try:
        theirs = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return False
    return ours is not None and (theirs.st_dev, theirs.st_ino) != ours


@functools.cache
def _own_mount_namespace() -> tuple[int, int] | None:
    """This process's mount namespace (device, inode), looked at once: berth never changes it."""
    try:
        ours = os.stat("/proc/self/ns/mnt")
    except OSError:
        return None
    return ours.st_dev, ours.st_ino


def _our_daemon(pid: object, root: Path) -> bool:
    """Whether ``pid`` is the FUSE daemon of ``root`` (never a recycled pid's program)."""
    return fuse.daemon_mountpoint(pid) == str(root)


def is_shared_daemon(pid: int) -> bool:
    """Whether process ``pid`` is the daemon of a shared image mount as its record names it:
    it serves a mount point ``images/KEY/root`` (:func:`berth.runtime.fuse.daemon_mountpoint`)
    and the ``mount.json`` beside it records this pid with this process's start time (never a
    recycled pid, nor any other FUSE daemon in a session of its own: a job's own detached mount).
    For the job runner's SIGKILL sweep, which spares only these: other containers read their
    image through it. Reads the record without the mount lock: a look, never raises."""
    mountpoint = fuse.daemon_mountpoint(pid)
    if mountpoint is None:
        return False
    root = Path(mountpoint)
    if root.name != "root" or root.parent.parent.name != IMAGES:
        return False
    record = _read_record(root.parent)
    started = record.get("started")
    return (record.get("pid") == pid and isinstance(started, int) and not isinstance(started, bool)
            and started == _process_start(pid))


def _unmount(directory: Path, process) -> str | None:
    """Unmount ``directory``'s root if mounted, then make sure its daemon is gone, and a
    lingering mount's reaper too when another process unmounts (caller holds the mount lock).
    Never raises; returns why the root is still mounted (fusermount3's words and the likely
    cause), or None."""
    root = directory / "root"
    record = _read_record(directory)
    reaper = record.get("reaper")
    if _reaper_alive(record) and reaper[0] != os.getpid() and not _elsewhere(reaper[0]):
        # a lingering mount's: nothing left to wait for
        try:
            os.kill(reaper[0], signal.SIGTERM)
        except OSError:
            pass
    failure = fuse.unmount_or_say(str(root)) if str(root) in fuse.mounted_paths() else None
    pid = record.get("pid")
    if process is not None:
        proc.wait_or_kill(process, DAEMON_EXIT_S)
    elif _our_daemon(pid, root) and not _elsewhere(pid):
        deadline = time.monotonic() + DAEMON_EXIT_S
        while _our_daemon(pid, root) and not _is_zombie(pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        if _our_daemon(pid, root) and not _is_zombie(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if failure:
        # Kept for whoever looks next (berth doctor; a detached reaper has nobody to tell).
        try:
            _write_record(directory, {"unmount_failed": _unmount_failure(directory, failure), "at": time.time()})
        except OSError:
            pass
        return failure
    try:
        os.unlink(directory / "mount.json")
    except OSError:
        pass
    return None


def _unmount_failure(directory: Path, failure: str) -> str:
    return f"could not unmount the image at {directory / 'root'}: {failure}"


def _is_zombie(pid: int) -> bool:
    fields = proc.stat_fields(pid)
    return not fields or fields[0] == "Z"


def cleanup_stale(state_dir: Path, *, lingering: bool = False) -> list[dict]:
    """Unmount and remove every shared image mount of this user whose holders are all gone
    (their berths died), except one lingering (image_mount_linger) whose time is not up and
    whose daemon answers — unless ``lingering`` (``berth doctor --cleanup``: nothing uses it).
    Images whose mount lock someone holds right now are left to that berth. Returns
    ``[{"image": KEY, "unmounted": ROOT, "lingering": bool, "failure": None or why ROOT is still
    mounted}]`` for the mounts found (the caller says a failure). Never raises for one image's
    trouble but a lock that cannot work (LockError)."""
    base = images_dir(state_dir)
    try:
        entries = [entry for entry in os.scandir(base) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    cleaned = []
    for entry in entries:
        directory = Path(entry.path)
        try:
            lock_fd = _lock(directory, 0, create=False, wait=False)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EINVAL):  # not a lock file of berth's: leave it
                continue
            raise
        if lock_fd is None:
            continue
        try:
            if _live_holders(directory):
                continue
            record = _read_record(directory)
            if _our_daemon(record.get("pid"), directory / "root") and _elsewhere(record["pid"]):
                continue  # a mount of another mount namespace (another Slurm job's): its berths judge it
            until = lingering_until(record)
            alive = until is not None and until > time.time() and _serving(directory, record)
            if alive and not lingering:
                continue  # lingering (its reaper unmounts it when the time is up)
            mounted = str(directory / "root") in fuse.mounted_paths()
            if mounted or record:  # read above, under the same lock
                failure = _unmount(directory, None)
                cleaned.append({"image": entry.name, "unmounted": str(directory / "root"), "lingering": alive,
                                "failure": _unmount_failure(directory, failure) if failure else None})
            _remove(directory)
        finally:
            os.close(lock_fd)
    return cleaned


def list_mounts(state_dir: Path) -> list[dict]:
    """This user's shared image mounts on the node, for people (``berth doctor``): ``[{"image":
    KEY, "root": ROOT, "holders": N, "lingering_until": SECONDS or None, "unmount_failed": why
    the last unmount failed (its reaper's too, which has nobody to tell) or None}]``. Takes no
    mount lock and changes nothing: a holder counts when its lock is held right now."""
    found = []
    try:
        entries = sorted((entry for entry in os.scandir(images_dir(state_dir))
                          if entry.is_dir(follow_symlinks=False)), key=lambda entry: entry.name)
    except OSError:
        return []
    for entry in entries:
        directory = Path(entry.path)
        try:
            holders = len(_live_holders(directory, remove=False))
        except OSError:
            holders = 0
        record = _read_record(directory)
        until = lingering_until(record) if not holders else None
        failed = record.get("unmount_failed")
        found.append({"image": entry.name, "root": str(directory / "root"), "holders": holders,
                      "lingering_until": until, "unmount_failed": failed if isinstance(failed, str) else None})
    return found
