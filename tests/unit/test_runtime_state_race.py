"""berth.runtime.state: containers starting at the same moment on one node (MPI ranks) never
judge each other's fresh directory stale."""

from __future__ import annotations

import fcntl

from berth.runtime import state


def test_cleanup_while_another_berth_is_locking_its_new_directory(tmp_path, monkeypatch):
    real_flock = fcntl.flock
    cleaned = []

    def flock_after_a_concurrent_cleanup(fd, operation):
        # Another berth of the same user runs its start-up clean-up right before this one locks.
        if operation == fcntl.LOCK_EX and not cleaned:
            cleaned.append(state.cleanup_stale(tmp_path))
        return real_flock(fd, operation)

    monkeypatch.setattr(state.fcntl, "flock", flock_after_a_concurrent_cleanup)
    container = state.create(tmp_path, None)
    monkeypatch.setattr(state.fcntl, "flock", real_flock)
    assert cleaned == [[]]
    assert container.path.is_dir() and (container.path / "lock").exists()
    # And once created it is locked: a later clean-up leaves it alone too.
    assert state.cleanup_stale(tmp_path) == []
    assert container.path.is_dir()
