"""berth.runtime.fuse's wait for a FUSE mount: woken by the mount itself (a change of the mount
table) or by the daemon's exit, not by sleeps (issue 10: every container start and every job
step's node waits for one). The real squashfuse_ll mounts: tests/integration/test_run*.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from berth.errors import RuntimeFailure
from berth.runtime import fuse


def _process(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_daemon_that_exits_ends_the_wait_at_once(tmp_path):
    log = tmp_path / "daemon.log"
    log.write_text("fuse: device not found\n")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2); raise SystemExit(3)"])
    mount = fuse.FuseMount(str(tmp_path), process, "squashfuse_ll of x.sqfs", str(log))
    started = time.monotonic()
    with pytest.raises(RuntimeFailure) as failure:
        fuse._wait_mounted(mount, os.stat(tmp_path).st_dev, mount.what, str(log))
    assert time.monotonic() - started < fuse.MOUNT_TIMEOUT_S / 2
    assert "squashfuse_ll of x.sqfs failed (exit status 3): fuse: device not found" in failure.value.message


def test_without_descriptors_to_wait_on_it_still_sees_the_daemon_exit(tmp_path, monkeypatch):
    """Kernels before 5.3 have no pidfd_open: short sleeps, as before."""
    def no_pidfd(pid):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    mount = fuse.FuseMount(str(tmp_path), process, "squashfuse_ll of y.sqfs", str(tmp_path / "none.log"))
    with pytest.raises(RuntimeFailure, match=r"failed \(exit status 4\): no message"):
        fuse._wait_mounted(mount, os.stat(tmp_path).st_dev, mount.what, mount.log_path)


def _wakes_until(events, done) -> int:
    """How many waits of ``events`` it takes until ``done()``: a few, woken by the event (and by
    other mounts of this shared machine, which change the same mount table), not hundreds of
    the fallback's 0.2 ms sleeps."""
    wakes, deadline = 0, time.monotonic() + 15
    while not done() and time.monotonic() < deadline:
        events.wait(30)
        wakes += 1
    assert done(), "the event never came"
    return wakes


def test_the_wait_wakes_when_the_daemon_exits():
    process = _process(0.1)
    try:
        with fuse._MountEvents(process.pid) as events:
            assert events._poll is not None  # descriptors to wait on, not the fallback's sleeps
            started = time.monotonic()
            # Woken by the exit, ~0.1 s on: not by the fallback's 0.2 ms sleeps, nor the timeout.
            assert _wakes_until(events, lambda: process.poll() is not None) < 50
            assert 0.05 <= time.monotonic() - started < 15
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to mount a tmpfs in the test's own mount namespace")
def test_the_wait_wakes_when_the_mount_table_changes(tmp_path):
    point = tmp_path / "point"
    point.mkdir()
    daemon = _process(60)  # a daemon that neither mounts nor exits: only the mount wakes the wait
    mounter = threading.Timer(0.1, subprocess.run, (["mount", "-t", "tmpfs", "berth-test", str(point)],),
                              {"check": True})
    try:
        with fuse._MountEvents(daemon.pid) as events:
            assert events._poll is not None
            mounter.start()
            started = time.monotonic()
            mounted = lambda: os.stat(point).st_dev != os.stat(tmp_path).st_dev  # noqa: E731
            assert _wakes_until(events, mounted) < 50  # woken by the mount, 0.1 s on
            assert 0.05 <= time.monotonic() - started < 15
        mounter.join()
    finally:
        mounter.join()
        subprocess.run(["umount", str(point)], check=False)
        daemon.kill()
        daemon.wait()
