"""berth.runtime.state: containers starting at the same moment on one node (MPI ranks) never
judge each other's fresh directory stale."""

from __future__ import annotations

from berth import locks
from berth.runtime import state


def test_cleanup_while_another_berth_is_locking_its_new_directory(tmp_path, monkeypatch):
    real_try_acquire = locks.try_acquire
    cleaned = []

    def try_acquire_after_a_concurrent_cleanup(fd, *, shared=False):
        # Another berth of the same user runs its start-up clean-up right before this one locks.
        if not cleaned:
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
