"""berth.runtime.state: containers starting at the same moment on one node (MPI ranks) never
judge each other's fresh directory stale, and a berth killed while creating or removing its
directory leaves nothing the next berth keeps (issue 8, scenario 3)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from berth import locks, proc
from berth.runtime import state


def test_cleanup_while_another_berth_is_locking_its_new_directory(tmp_path, monkeypatch):
    real_try_acquire = locks.try_acquire
    cleaned = []

    def try_acquire_after_a_concurrent_cleanup(fd, *, shared=False):
        # Another berth of the same user runs its start-up clean-up right before this one locks.
        if not cleaned and os.readlink(f"/proc/self/fd/{fd}").endswith(".lock.new"):
            cleaned.append(None)
            cleaned[0] = state.cleanup_stale(tmp_path)
        return real_try_acquire(fd, shared=shared)

    monkeypatch.setattr(state.locks, "try_acquire", try_acquire_after_a_concurrent_cleanup)
    container = state.create(tmp_path, None)
    monkeypatch.setattr(state.locks, "try_acquire", real_try_acquire)
    assert cleaned == [[]]
    assert container.path.is_dir() and (container.path / "lock").exists()
    # And once created it is locked: a later clean-up leaves it alone too.
    assert state.cleanup_stale(tmp_path) == []
    assert container.path.is_dir()


KILLED_AT = """
import os, sys
from pathlib import Path
from berth.runtime import state
real_open, real_unlink = os.open, os.unlink
def dies_at(path, *args, **kwargs):
    if str(path).endswith(sys.argv[2]):
        os._exit(9)  # SIGKILL's effect on this process: no finally, no clean-up
    return real_open(path, *args, **kwargs)
os.open = dies_at
state.create(Path(sys.argv[1]), None)
"""


def test_a_directory_left_by_a_berth_killed_before_its_lock_goes_at_once(tmp_path):
    """kill -9 between the directory's mkdir and its lock left a directory that every clean-up
    took for "starting now" for 60 s (scenario 3's one unclean trial: `doctor --cleanup` did not
    remove it)."""
    subprocess.run([sys.executable, "-c", KILLED_AT, str(tmp_path), ".lock.new"], check=False)
    left = os.listdir(tmp_path / "containers")
    assert len(left) == 1 and not os.path.exists(tmp_path / "containers" / left[0] / "lock")
    cleaned = state.cleanup_stale(tmp_path)
    assert [c["id"] for c in cleaned] == left
    assert os.listdir(tmp_path / "containers") == []


def test_a_lockless_directory_is_left_while_a_berth_is_creating_one(tmp_path):
    """The creation lock held (shared) by a berth in its mkdir-to-lock window: a clean-up then
    leaves directories without a lock for the next command."""
    state.ensure_state_dir(tmp_path)
    (tmp_path / "containers" / "b0123456789ab").mkdir()
    with locks.file_lock(tmp_path / state.CREATION_LOCK, shared=True):
        assert state.cleanup_stale(tmp_path) == []
    assert (tmp_path / "containers" / "b0123456789ab").is_dir()
    assert [c["id"] for c in state.cleanup_stale(tmp_path)] == ["b0123456789ab"]


def test_a_stop_signal_while_creating_leaves_no_directory(tmp_path, monkeypatch):
    """A job's container child raises StopRequested at any point once its runner died: inside
    create, the half-made directory went with no lock."""
    real_rename = os.rename

    def stopped(*args):
        raise proc.StopRequested(15)

    monkeypatch.setattr(state.os, "rename", stopped)
    with pytest.raises(proc.StopRequested):
        state.create(tmp_path, None)
    monkeypatch.setattr(state.os, "rename", real_rename)
    assert os.listdir(tmp_path / "containers") == []


def test_removal_takes_the_lock_file_last(tmp_path, monkeypatch):
    """A berth killed while removing its directory must leave the lock file, whose free lock
    tells the next berth to finish the removal; removed early, the rest was "starting now"."""
    container = state.create(tmp_path, None)
    for n in range(20):
        (container.path / f"file{n}").write_text("x")
    (container.path / "rootfs" / "etc").mkdir(parents=True)
    removed = []
    real_unlink = os.unlink

    def recording_unlink(path, *args, **kwargs):
        removed.append(os.path.basename(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", recording_unlink)
    container.release()
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert removed[-1] == "lock" and len(removed) == 21, removed
    assert not container.path.exists()
