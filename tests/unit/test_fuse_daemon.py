"""berth.runtime.fuse.daemon_mountpoint, the one test of "this pid is our FUSE daemon", and its
three users: the shared image mount's leaver (imagemount), the stale container clean-up
(state) and the job runner's SIGTERM (jobs.runner). Processes that look like the daemons stand in
for them (a renamed argv[0]); the real squashfuse_ll, squashfuse and fuse-overlayfs:
tests/integration/test_shared_mounts.py, test_kill_run.py, test_jobs_local.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from berth.jobs import runner
from berth.runtime import fuse, imagemount, state

SLEEP = "import time; time.sleep(60)"


def _start(argv0: str, *rest: str) -> subprocess.Popen:
    """A process whose command line is ``argv0 -c SLEEP *rest`` (python under another name)."""
    process = subprocess.Popen([argv0, "-c", SLEEP, *rest], executable=sys.executable)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the exec shows: the cmdline of the fork is python's
        with open(f"/proc/{process.pid}/cmdline", "rb") as handle:
            if handle.read().split(b"\0", 1)[0] == os.fsencode(argv0):
                return process
        time.sleep(0.001)
    raise AssertionError("the stand-in did not start")


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield lambda *argv: started.append(_start(*argv)) or started[-1]
    for process in started:
        process.kill()
        process.wait()


@pytest.mark.parametrize("program", fuse.DAEMON_PROGRAMS)
def test_a_daemon_as_berth_starts_it_serves_its_last_argument(processes, program, tmp_path):
    root = str(tmp_path / "root")
    daemon = processes(f"/usr/bin/{program}", "-o", "ro", root)
    assert fuse.daemon_mountpoint(daemon.pid) == root
    assert imagemount._our_daemon(daemon.pid, Path(root))


def test_a_recycled_pid_running_something_else_is_not_ours(processes, tmp_path):
    root = str(tmp_path / "root")
    other = processes("python3", root)  # even with the mount point in its command line
    assert fuse.daemon_mountpoint(other.pid) is None
    assert not imagemount._our_daemon(other.pid, Path(root))


def test_a_recycled_pid_running_another_mounts_daemon_is_not_that_mounts(processes, tmp_path):
    other = processes("squashfuse_ll", "-o", "ro", str(tmp_path / "image.sqfs"), str(tmp_path / "other"))
    assert fuse.daemon_mountpoint(other.pid) == str(tmp_path / "other")
    assert not imagemount._our_daemon(other.pid, tmp_path / "root")


@pytest.mark.parametrize("pid", [None, "123", 1.5, True, 0, 1, -5, 2**40])
def test_no_pid_no_process_is_no_daemon(pid):
    assert fuse.daemon_mountpoint(pid) is None


def test_a_zombie_is_no_daemon(tmp_path):
    process = _start("squashfuse_ll", str(tmp_path / "root"))
    os.kill(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not imagemount._is_zombie(process.pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    try:
        assert fuse.daemon_mountpoint(process.pid) is None
    finally:
        process.wait()


def test_stale_cleanup_kills_the_containers_daemons_and_spares_a_recycled_pid(processes, tmp_path):
    # Before: any process named like a daemon was killed, here the user's shared image mount
    # whose daemon got a dead container's recorded pid.
    container = tmp_path / "containers" / "c1"
    lower = processes("squashfuse_ll", "-f", "-o", "ro", str(tmp_path / "image.sqfs"), str(container / "lower"))
    overlay = processes("fuse-overlayfs", "-f", "-o", "lowerdir=x", str(container / "rootfs"))
    shared = processes("squashfuse_ll", "-f", "-o", "ro", str(tmp_path / "image.sqfs"), str(tmp_path / "images/a/root"))
    stranger = processes("python3", str(container / "lower"))
    state._kill_daemons(container, {"daemon_pids": [lower.pid, overlay.pid, shared.pid, stranger.pid, "x"]})
    assert lower.wait(timeout=10) == -signal.SIGTERM and overlay.wait(timeout=10) == -signal.SIGTERM
    assert shared.poll() is None and stranger.poll() is None


def test_stale_cleanup_ignores_a_malformed_pid_list(tmp_path):
    state._kill_daemons(tmp_path, {"daemon_pids": "1234"})  # no TypeError, nothing killed


def test_sigterm_to_a_steps_tree_spares_its_fuse_daemons(processes, tmp_path, monkeypatch):
    step = processes("python3")
    daemon = processes("fuse-overlayfs", "-f", "-o", "lowerdir=x", str(tmp_path / "rootfs"))
    monkeypatch.setattr(runner, "_descendants", {step.pid: [step.pid, daemon.pid]}.__getitem__)
    runner.signal_tree(step.pid, signal.SIGTERM)
    assert step.wait(timeout=10) == -signal.SIGTERM and daemon.poll() is None
    runner.signal_tree(step.pid, signal.SIGKILL)
    assert daemon.wait(timeout=10) == -signal.SIGKILL


def _detached(mountpoint: Path) -> subprocess.Popen:
    """A stand-in squashfuse_ll serving ``mountpoint``, in a session of its own (as berth
    starts a shared image mount's daemon), once its exec shows."""
    mountpoint.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(["squashfuse_ll", "-c", SLEEP, "-o", "ro", str(mountpoint)],
                               executable=sys.executable, start_new_session=True)
    deadline = time.monotonic() + 10
    while fuse.daemon_mountpoint(process.pid) is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return process


def test_sigkill_to_a_steps_tree_spares_only_the_shared_image_mounts_recorded_daemon(tmp_path, monkeypatch):
    """A shared image mount's daemon is the berth's child, in a session of its own (detached),
    while that berth lives, and serves every container of the user's that joined the mount,
    other jobs' too: a job's SIGKILL (its berth still tearing down past the grace) killed it and
    those containers lost their image. The berth's hold dies with it, so the next berth removes
    the mount once nobody holds it. Only the daemon the mount's record names (pid and start
    time) is spared: the sweep spared every FUSE daemon leading a session, so a job's own
    detached squashfuse outlived the job's kill, as did one whose pid a record names from an
    earlier process. A daemon of the container's own (not detached) still goes."""
    import json

    step = _start("python3")
    shared = _detached(tmp_path / "images" / "a" / "root")
    (tmp_path / "images" / "a" / "mount.json").write_text(json.dumps(
        {"pid": shared.pid, "started": imagemount._process_start(shared.pid)}))
    own = _start("squashfuse_ll", "-o", "ro", str(tmp_path / "containers/c1/lower"))
    jobs = _detached(tmp_path / "job" / "mnt")  # the job's own mount, no record
    recycled = _detached(tmp_path / "images" / "b" / "root")  # the record names another process
    (tmp_path / "images" / "b" / "mount.json").write_text(json.dumps(
        {"pid": recycled.pid, "started": imagemount._process_start(recycled.pid) - 1}))
    everyone = (step, shared, own, jobs, recycled)
    try:
        monkeypatch.setattr(runner, "_descendants", {step.pid: [p.pid for p in everyone]}.__getitem__)
        runner.signal_tree(step.pid, signal.SIGKILL)
        for process in (step, own, jobs, recycled):
            assert process.wait(timeout=10) == -signal.SIGKILL
        assert shared.poll() is None  # its SIGKILL would have been sent before the others'
    finally:
        for process in everyone:
            process.kill()
            process.wait()


def test_a_shared_mounts_record_names_its_daemon_by_pid_and_start_time(tmp_path, monkeypatch):
    """acquire records the daemon's start time beside its pid (the sweep's test)."""
    monkeypatch.setattr(fuse, "mount_squashfs", lambda image, mountpoint, log_path, **kwargs:
                        fuse.FuseMount(mountpoint, _detached(Path(mountpoint)), "fake", log_path))
    monkeypatch.setattr(fuse, "unmount", lambda mountpoint, lazy=False: None)
    image = tmp_path / "image.sqfs"
    image.write_bytes(b"hsqs")
    hold = imagemount.acquire(tmp_path, "sha256-abc", image, "b1")
    try:
        assert imagemount.is_shared_daemon(hold.process.pid)
        record = imagemount._read_record(hold.directory)
        assert record["started"] == imagemount._process_start(hold.process.pid)
    finally:
        hold.process.kill()
        hold.process.wait()
        hold.release()
