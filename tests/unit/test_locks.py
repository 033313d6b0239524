"""berth.locks: the one lock implementation. Locks die with their holder, every wait is bounded
and names the holder, and lock files cannot be used by anyone but their owner."""

import errno
import os
import stat
import subprocess
import sys
import time

import pytest

from berth import locks
from berth.errors import LockError

HOLD = ("import sys, time; from pathlib import Path; from berth.locks import file_lock\n"
        "with file_lock(Path(sys.argv[1]), shared=sys.argv[2] == 'shared'):\n"
        "    print('held', flush=True); time.sleep(60)")


@pytest.fixture
def started():
    """Starts ``python -c SCRIPT ARGS...`` and returns once it printed ``ready``; kills them all."""
    processes = []

    def start(script, ready, *args):
        process = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout.readline().strip() == ready
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait(10)


@pytest.fixture
def holder(started):
    return lambda path, mode="exclusive": started(HOLD, "held", path, mode)


def test_flock_excludes_other_processes_and_dies_with_them(tmp_path, holder):
    lock = tmp_path / "x.lock"
    process = holder(lock)
    assert locks.is_locked(lock)
    with locks.file_lock(lock, timeout_s=0) as held:
        assert held is False
    process.kill()  # kill -9: the kernel drops the lock
    process.wait(10)
    with locks.file_lock(lock, timeout_s=0) as held:
        assert held is True
    assert not locks.is_locked(lock)


def test_a_wait_is_bounded_and_names_the_lock_and_its_holder(tmp_path, holder):
    lock = tmp_path / "gc.lock"
    process = holder(lock)
    started = time.monotonic()
    with pytest.raises(LockError) as info:
        with locks.file_lock(lock, timeout_s=0.3, purpose="prune against writers"):
            pass
    waited = time.monotonic() - started
    assert 0.3 <= waited < 3
    message = info.value.message
    assert str(lock) in message and "prune against writers" in message and "after 0.3 s" in message
    assert f"pid {process.pid}" in message and "exclusive" in message
    assert "berth.locks" in message  # the holder's command line
    assert "lock_timeout_s" in info.value.hint


def test_shared_holders_share_and_exclude_exclusive_waiters(tmp_path, holder):
    lock = tmp_path / "gc.lock"
    holder(lock, "shared")
    with locks.file_lock(lock, shared=True, timeout_s=1) as held:
        assert held is True
    with pytest.raises(LockError, match="shared"):
        with locks.file_lock(lock, timeout_s=0.05):
            pass


def test_lock_files_are_created_private_and_an_open_one_of_ours_is_tightened(tmp_path):
    old_umask = os.umask(0)
    try:
        with locks.file_lock(tmp_path / "new.lock"):
            pass
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new.lock").stat().st_mode) == 0o600
    legacy = tmp_path / "legacy.lock"
    legacy.write_text("")
    legacy.chmod(0o644)
    with locks.file_lock(legacy):
        pass
    assert stat.S_IMODE(legacy.stat().st_mode) == 0o600


def test_a_link_or_a_fifo_at_a_lock_path_is_refused_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "link.lock").symlink_to(victim)
    with pytest.raises(OSError):
        with locks.file_lock(tmp_path / "link.lock"):
            pass
    os.mkfifo(tmp_path / "fifo.lock")
    started = time.monotonic()
    with pytest.raises(OSError):
        with locks.file_lock(tmp_path / "fifo.lock"):
            pass
    assert time.monotonic() - started < 2
    assert victim.read_text() == "precious"


def test_holders_parses_proc_locks_and_skips_waiters(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("")
    info = lock.stat()
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    table = tmp_path / "locks"
    table.write_text(f"1: POSIX  ADVISORY  WRITE 77 fe:00:1 0 EOF\n"
                     f"2: FLOCK  ADVISORY  READ {os.getpid()} {device} 0 EOF\n"
                     f"2: -> FLOCK  ADVISORY  WRITE 999999 {device} 0 EOF\n")
    fd = os.open(lock, os.O_RDONLY)
    try:
        found = locks.holders(fd, proc_locks=str(table))
    finally:
        os.close(fd)
    assert [(h.pid, h.kind) for h in found] == [(os.getpid(), "READ")]
    assert found[0].command and "python" in found[0].command


# --- Looking at a lock does not take it (is_locked reads /proc/locks) --------------------------

CAPTURED = """\
1: FLOCK  ADVISORY  WRITE 6724 fe:00:2147362 0 EOF
1: -> FLOCK  ADVISORY  WRITE 7001 fe:00:2147362 0 EOF
2: FLOCK  ADVISORY  READ 0 00:1f:18446744073709551615 0 EOF
2:  -> FLOCK  ADVISORY  WRITE 0 00:1f:18446744073709551615 0 EOF
3: POSIX  ADVISORY  WRITE 21297 103:02:4294967296 0 EOF
4: OFDLCK ADVISORY  READ -1 fe:00:12 0 EOF
garbage line
"""


def test_proc_locks_parser_keeps_holders_of_every_namespace_and_skips_waiters():
    lines = locks.parse_proc_locks(CAPTURED)
    assert [(line.type, line.kind, line.pid) for line in lines] == [
        ("FLOCK", "WRITE", 6724), ("FLOCK", "READ", 0), ("POSIX", "WRITE", 21297), ("OFDLCK", "READ", -1)]
    # The device is %02x:%02x (hex): 00:1f is minor 31, 103:02 major 259; inodes are unsigned long.
    assert (lines[0].major, lines[0].minor, lines[0].inode) == (0xfe, 0, 2147362)
    assert (lines[1].major, lines[1].minor, lines[1].inode) == (0, 31, 2**64 - 1)
    assert (lines[2].major, lines[2].minor, lines[2].inode) == (259, 2, 2**32)


def _fake_proc(tmp_path, fd, *, kthread=True, fstype="tmpfs", device="0:31", inode=2**64 - 1, locks_text=CAPTURED):
    proc = tmp_path / "proc"
    (proc / "2").mkdir(parents=True)
    (proc / "self" / "fdinfo").mkdir(parents=True)
    flags = 0x00208040 if kthread else 0x00400100
    (proc / "2" / "stat").write_text(f"2 (kthreadd) S 0 0 0 0 -1 {flags} 0 0 0 0\n")
    (proc / "self" / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t0100000\nmnt_id:\t41\nino:\t{inode}\n")
    (proc / "self" / "mountinfo").write_text(
        f"27 1 254:0 / / rw - ext4 /dev/vda rw\n41 27 {device} / /tmp/berth-1000 rw - {fstype} tmpfs rw\n")
    (proc / "locks").write_text(locks_text)
    return str(proc)


def _seen(fd, proc):
    return locks._ProcLocks(proc).seen(fd)


def test_the_look_matches_the_kernels_device_and_inode_and_says_when_it_cannot_tell(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert _seen(fd, _fake_proc(tmp_path / "a", fd)) is True  # a holder of another namespace (pid 0)
        assert _seen(fd, _fake_proc(tmp_path / "b", fd, inode=2147362, device="254:0")) is True
        assert _seen(fd, _fake_proc(tmp_path / "c", fd, inode=12, device="254:0")) is False  # OFD only
        assert _seen(fd, _fake_proc(tmp_path / "d", fd, inode=7, device="254:0")) is False
        # A waiter alone is no holder.
        waiter_only = "1: FLOCK  ADVISORY  WRITE 5 fe:00:9 0 EOF\n1: -> FLOCK  ADVISORY  WRITE 6 fe:00:8 0 EOF\n"
        assert _seen(fd, _fake_proc(tmp_path / "e", fd, inode=8, device="254:0",
                                                locks_text=waiter_only)) is False
        # Cannot tell: /proc of a child PID namespace (holders outside it are left out), a
        # network file system (other nodes' holders are not listed), no /proc/locks.
        assert _seen(fd, _fake_proc(tmp_path / "f", fd, kthread=False)) is None
        assert _seen(fd, _fake_proc(tmp_path / "g", fd, fstype="nfs4")) is None
        assert _seen(fd, _fake_proc(tmp_path / "h", fd, fstype="fuse.sshfs")) is None
        proc = _fake_proc(tmp_path / "i", fd)
        os.unlink(os.path.join(proc, "locks"))
        assert _seen(fd, proc) is None
    finally:
        os.close(fd)


def test_holders_name_the_file_as_proc_locks_does_not_by_fstat(tmp_path):
    """btrfs and overlayfs report another device in fstat than /proc/locks prints: the holders
    (the pids a lock wait names, and whom --scope node's last task may signal, state.berth_pid)
    are found by the superblock's device from mountinfo, as the look does."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        # 00:4d is 0:77 in mountinfo, another device than fstat gives (as btrfs's subvolumes).
        info = os.fstat(fd)
        assert (os.major(info.st_dev), os.minor(info.st_dev)) != (0, 77)
        table = ("1: FLOCK  ADVISORY  WRITE 6724 00:4d:2147362 0 EOF\n"
                 "1: -> FLOCK  ADVISORY  WRITE 7001 00:4d:2147362 0 EOF\n")
        proc = _fake_proc(tmp_path / "p", fd, inode=2147362, device="0:77", fstype="btrfs", locks_text=table)
        found = locks.holders(fd, proc_locks=os.path.join(proc, "locks"))
    finally:
        os.close(fd)
    assert [holder.pid for holder in found] == [6724]  # the waiter 7001 is no holder


def test_the_fallback_try_works_where_an_exclusive_lock_needs_a_file_open_for_writing(tmp_path, holder,
                                                                                     monkeypatch):
    """NFS emulates flock with byte-range locks: an exclusive one needs the file open for
    writing (flock(2)), else EBADF. The look's one try (NFS is a fallback file system) used its
    read-only descriptor, so every look at a lock on NFS failed with LockError ("cannot lock:
    Bad file descriptor"): berth ps, a shared mount's leaver, the GPU ledger."""
    import fcntl

    real_flock = fcntl.flock

    def nfs_flock(fd, operation):
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real_flock(fd, operation)

    lock = tmp_path / "x.lock"
    lock.touch()
    monkeypatch.setattr(locks.fcntl, "flock", nfs_flock)
    no_proc = str(tmp_path / "no-proc")  # /proc cannot tell, as for NFS: one try
    assert locks.is_locked(lock, proc=no_proc) is False
    process = holder(lock)
    assert locks.is_locked(lock, proc=no_proc) is True
    process.kill()
    process.wait(10)
    assert locks.is_locked(lock, proc=no_proc) is False


def test_is_locked_falls_back_to_one_try_where_proc_cannot_tell(tmp_path, holder):
    lock = tmp_path / "x.lock"
    lock.touch()
    assert locks.is_locked(lock, proc=str(tmp_path / "no-proc")) is False
    process = holder(lock)
    assert locks.is_locked(lock, proc=str(tmp_path / "no-proc")) is True
    assert locks.is_locked(lock) is True
    process.kill()
    process.wait(10)
    assert locks.is_locked(lock) is False


def test_a_look_at_many_locks_reads_proc_once_for_all(tmp_path, holder, monkeypatch):
    """A mount's live-holder scan looks at every holder file: /proc/self/mountinfo (hundreds of
    lines on a node with many mounts) and /proc/locks were read again for each one. One look
    (locks.locked) reads each once, and tells each path apart: held, free, missing."""
    paths = [tmp_path / f"{n}.lock" for n in range(6)]
    for path in paths[:5]:
        path.touch()
    holder(paths[1])
    holder(paths[3], "shared")
    opened: list[str] = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(locks, "open", counting_open, raising=False)
    assert locks.locked(paths) == [False, True, False, True, False, False]
    assert [opened.count(name) for name in ("/proc/self/mountinfo", "/proc/locks", "/proc/2/stat")] == [1, 1, 1]
    assert len([name for name in opened if "/fdinfo/" in name]) == 5  # one per existing file
    assert locks.locked([]) == []


def test_a_link_or_anything_but_a_regular_file_is_not_locked_and_the_look_goes_on(tmp_path, holder):
    """locked() raised ELOOP for a link and EINVAL for a directory, so every caller that looks
    at entries others can plant (berth ps, a mount's holders) had its own way around it, and a
    holder swapped for a link between imagemount's lstat and its look raised out of every
    berth run's clean-up. No berth lock is held by such a name (open_lock_file refuses them):
    not locked, the link never followed (its target is held here), the other paths still told."""
    import socket

    target = tmp_path / "target"
    holder(target)
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "directory").mkdir()
    os.mkfifo(tmp_path / "fifo")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "socket"))
        paths = [tmp_path / name for name in ("link", "directory", "fifo", "socket", "target")]
        assert locks.locked(paths) == [False, False, False, False, True]
        assert locks.locked(paths, proc=str(tmp_path / "no-proc")) == [False, False, False, False, True]
    assert locks.is_locked(tmp_path / "link") is False


def test_a_lock_file_the_caller_may_not_open_is_looked_at_in_proc(tmp_path, holder, monkeypatch):
    """A lock file of mode 000 (what can write into the state directory may chmod one): /proc
    still tells from a path descriptor; where /proc cannot tell, the look says it cannot open it."""
    lock = tmp_path / "x.lock"
    holder(lock)
    real_open = os.open

    def mode_000(path, flags, *args, **kwargs):  # as for a non-root caller (tests run as root)
        if os.fspath(path) == str(lock) and not flags & os.O_PATH:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(locks.os, "open", mode_000)
    assert locks.is_locked(lock) is True
    with pytest.raises(PermissionError):
        locks.is_locked(lock, proc=str(tmp_path / "no-proc"))


LOOKER = ("import sys; from pathlib import Path\n"
          "what, path = sys.argv[1], Path(sys.argv[2])\n"
          "if what == 'is_locked':\n"
          "    from berth.locks import is_locked as look\n"
          "elif what == 'gpus':\n"
          "    from berth.runtime.devices.gpus import Gpu, Ledger\n"
          "    ledger, gpu = Ledger(path), [Gpu('nvidia', 0, '/dev/nvidia0')]\n"
          "    look = lambda _: ledger.busy(gpu)\n"
          "else:\n"
          "    from berth.runtime.imagemount import list_mounts as look\n"
          "look(path); print('looking', flush=True)\n"
          "while True:\n"
          "    look(path)\n")


@pytest.fixture
def looker(started):
    return lambda what, path: started(LOOKER, "looking", what, path)


TRIES = 3000


def test_a_look_never_makes_a_one_try_taker_fail(tmp_path, looker):
    lock = tmp_path / "x.lock"
    lock.touch()
    looker("is_locked", lock)
    failed = 0
    for _ in range(TRIES):
        with locks.file_lock(lock, timeout_s=0) as held:
            failed += not held
    assert failed == 0, f"{failed} of {TRIES} one-try takes failed while another process only looked"


def test_berth_doctors_look_at_the_gpu_ledger_never_makes_a_gpu_busy(tmp_path, looker):
    from contextlib import ExitStack

    from berth.errors import PolicyError
    from berth.runtime.devices.gpus import Gpu, Ledger

    ledger, gpu = Ledger(tmp_path), Gpu("nvidia", 0, "/dev/nvidia0")
    with ExitStack() as stack:
        ledger.take(stack, [gpu], 1, what="--gpus")  # makes the lock file the looker watches
    looker("gpus", tmp_path)
    failed = 0
    for _ in range(TRIES):
        with ExitStack() as stack:
            try:
                ledger.take(stack, [gpu], 1, what="--gpus")
            except PolicyError:
                failed += 1
    assert failed == 0, f"'berth run --gpus' found the GPU in use {failed} times in {TRIES} while doctor looked"


def test_berth_doctors_look_at_image_mounts_never_shows_a_dead_holder_as_live(tmp_path, looker):
    from berth.runtime import imagemount

    directory = imagemount.images_dir(tmp_path) / "sha256-abc"
    (directory / imagemount.HOLDERS).mkdir(parents=True)
    (directory / imagemount.HOLDERS / "bdead").touch(mode=0o600)  # its berth died: no lock
    looker("mounts", tmp_path)
    live = 0
    for _ in range(TRIES):
        live += len(imagemount._live_holders(directory, remove=False))
    assert live == 0, f"a dead holder looked live {live} times in {TRIES} while doctor listed the mounts"


def test_a_look_at_a_directory_or_a_read_only_lock_file_still_answers(tmp_path, holder, monkeypatch):
    """The look opens read-write where it can (the NFS fallback) and read-only otherwise: a lock
    file the caller may only read is looked at as before, a directory is no lock."""
    directory = tmp_path / "d"
    directory.mkdir()
    assert locks.is_locked(directory) is False
    lock = tmp_path / "ro.lock"
    lock.touch()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # as for a 0444 file of someone else's (tests run as root)
        if os.fspath(path) == str(lock) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(locks.os, "open", read_only)
    process = holder(lock)
    assert locks.is_locked(lock) is True and locks.is_locked(lock, proc=str(tmp_path / "no-proc")) is True
    process.kill()
    process.wait(10)
    assert locks.is_locked(lock) is False and locks.is_locked(lock, proc=str(tmp_path / "no-proc")) is False


def test_a_flock_seen_on_btrfs_that_no_holder_can_place_is_tried(tmp_path):
    """btrfs's subvolumes share the device /proc/locks names and number their inodes alike: a
    FLOCK seen there may be another subvolume's file's. Its holders' descriptors tell (see
    tests/integration/test_plan_cache.py on a real btrfs); where a holder cannot be looked at
    (here: a /proc without them) the caller tries the lock, or counts it held when it cannot
    try (review 11). None seen is none held."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        seen_btrfs = _fake_proc(tmp_path / "a", fd, inode=2147362, device="254:0", fstype="btrfs")
        assert locks._ProcLocks(seen_btrfs).seen(fd) is None
        assert locks._ProcLocks(seen_btrfs).seen(fd, can_try=False) is True
        assert _seen(fd, _fake_proc(tmp_path / "b", fd, inode=7, device="254:0", fstype="btrfs")) is False
        assert _seen(fd, _fake_proc(tmp_path / "c", fd, inode=2147362, device="254:0", fstype="xfs")) is True
    finally:
        os.close(fd)
