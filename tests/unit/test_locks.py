"""berth.locks: the one lock implementation. Locks die with their holder, every wait is bounded
and names the holder, and lock files cannot be used by anyone but their owner."""

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
def holder(tmp_path):
    started = []

    def start(path, mode="exclusive"):
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode], stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait(10)


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
