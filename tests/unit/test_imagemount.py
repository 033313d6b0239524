"""berth.runtime.imagemount's reference counting and lock rules, with the FUSE mount faked
(the real squashfuse, runc and kill -9: tests/integration/test_shared_mounts.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from berth import locks
from berth.runtime import fuse, imagemount


class FakeDaemon:
    def __init__(self) -> None:
        self.pid = 999_999_999
        self.args = ["/usr/bin/squashfuse_ll"]

    def wait(self, timeout=None):
        return 0

    def kill(self):
        pass


@pytest.fixture
def mounts(monkeypatch, tmp_path) -> list:
    """The fake node's mount table; every mount_squashfs call is recorded in ``calls``."""
    mounted: set[str] = set()
    calls: list = []

    def mount_squashfs(image, mountpoint, log_path, *, program=None, options=None, detached=False):
        assert detached, "a shared mount's daemon must outlive its berth"
        # Mounting happens under the image's mount lock, as the file named "lock" now.
        assert locks.is_locked(Path(mountpoint).parent / "lock"), "mounting without holding the lock"
        calls.append(mountpoint)
        mounted.add(mountpoint)
        return fuse.FuseMount(mountpoint, FakeDaemon(), "fake", log_path)

    def unmount(mountpoint, *, lazy=False):
        mounted.discard(mountpoint)

    monkeypatch.setattr(fuse, "mount_squashfs", mount_squashfs)
    monkeypatch.setattr(fuse, "unmount", unmount)
    monkeypatch.setattr(fuse, "mounted_paths", lambda: set(mounted))
    monkeypatch.setattr(imagemount, "_answers", lambda root: str(root) in mounted)
    # No daemon process to look at: a mount serves while it is in the fake table.
    monkeypatch.setattr(imagemount, "_serving", lambda directory, record: str(directory / "root") in mounted)
    image = tmp_path / "image.sqfs"
    image.write_bytes(b"hsqs")
    return [mounted, calls, image]


def test_the_first_container_mounts_later_ones_share_and_the_last_one_out_unmounts(tmp_path, mounts):
    mounted, calls, image = mounts
    first = imagemount.acquire(tmp_path, "sha256-abc", image, "b1")
    second = imagemount.acquire(tmp_path, "sha256-abc", image, "b2")
    assert calls == [str(first.root)] and first.root == second.root
    assert sorted(os.listdir(first.directory / "holders")) == ["b1", "b2"]
    assert first.release() is False and mounted == {str(first.root)}
    assert second.release() is True and mounted == set()
    assert not (tmp_path / "images").exists()


def test_a_holder_whose_berth_died_does_not_keep_the_mount(tmp_path, mounts):
    mounted, calls, image = mounts
    live = imagemount.acquire(tmp_path, "sha256-abc", image, "b1")
    (live.directory / "holders" / "b-dead").write_bytes(b"")  # its flock went with its berth
    assert live.release() is True and mounted == set()


def test_stale_cleanup_unmounts_only_mounts_nobody_holds(tmp_path, mounts):
    mounted, calls, image = mounts
    kept = imagemount.acquire(tmp_path, "sha256-kept", image, "b1")
    dead = imagemount.acquire(tmp_path, "sha256-dead", image, "b2")
    os.close(dead.holder_fd)  # what kill -9 of its berth does to the holder's lock
    cleaned = imagemount.cleanup_stale(tmp_path)
    assert cleaned == [{"image": "sha256-dead", "unmounted": str(dead.root), "lingering": False, "failure": None}]
    assert mounted == {str(kept.root)} and not dead.directory.exists()
    assert imagemount.cleanup_stale(tmp_path) == []
    kept.release()


def test_stale_cleanup_leaves_an_image_whose_lock_someone_holds(tmp_path, mounts):
    mounted, calls, image = mounts
    dead = imagemount.acquire(tmp_path, "sha256-dead", image, "b2")
    os.close(dead.holder_fd)
    with locks.file_lock(dead.directory / "lock", timeout_s=0) as held:
        assert held
        assert imagemount.cleanup_stale(tmp_path) == [] and mounted == {str(dead.root)}
    assert len(imagemount.cleanup_stale(tmp_path)) == 1 and mounted == set()


def test_a_container_waiting_while_the_last_one_leaves_mounts_again(tmp_path, mounts):
    """The leaver removes the directory (lock file included) under the lock; the joiner that
    waited on the old lock file must notice and lock the new one, then mount anew."""
    mounted, calls, image = mounts
    leaver = imagemount.acquire(tmp_path, "sha256-abc", image, "b1")
    lock_fd = locks.open_lock_file(leaver.directory / "lock")
    locks.acquire(lock_fd, leaver.directory / "lock", timeout_s=5)
    joined = []
    thread = threading.Thread(target=lambda: joined.append(
        imagemount.acquire(tmp_path, "sha256-abc", image, "b2", lock_timeout_s=10)))
    thread.start()
    time.sleep(0.2)  # the joiner now waits on the old lock file
    assert not joined
    # What release() does under the lock: the holder goes, the mount goes, the directory goes.
    os.unlink(leaver.holder)
    os.close(leaver.holder_fd)
    imagemount._unmount(leaver.directory, None)
    imagemount._remove(leaver.directory)
    assert not leaver.directory.exists()
    os.close(lock_fd)
    thread.join(10)
    (joiner,) = joined
    assert mounted == {str(joiner.root)} and len(calls) == 2
    assert os.stat(joiner.directory / "lock").st_ino != 0 and joiner.holder.exists()
    assert joiner.release() is True and mounted == set()


def test_a_failed_mount_leaves_no_holder_and_no_directory(tmp_path, mounts, monkeypatch):
    from berth.errors import RuntimeFailure

    def refuse(*args, **kwargs):
        raise RuntimeFailure("squashfuse_ll failed")

    monkeypatch.setattr(fuse, "mount_squashfs", refuse)
    with pytest.raises(RuntimeFailure):
        imagemount.acquire(tmp_path, "sha256-abc", mounts[2], "b1")
    assert not (tmp_path / "images").exists()


def test_mount_scope_keeps_slurm_steps_apart_and_refuses_odd_values():
    assert imagemount.mount_scope({}) == ""
    assert imagemount.mount_scope({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0"}) == "slurm-42.0"
    assert imagemount.mount_scope({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "batch"}) == "slurm-42.batch"
    assert imagemount.mount_scope({"SLURM_JOB_ID": "../x"}) == ""
    assert imagemount.mount_scope({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "a/b"}) == "slurm-42"


def test_mount_scope_keeps_the_nodes_of_a_step_apart():
    """Each node's slurmstepd ends the processes of its part of a step, the mount's daemon too:
    nodes of one step sharing a state directory (the test cluster) must not share a mount."""
    step = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_NODES": "4"}
    assert imagemount.mount_scope({**step, "SLURM_NODEID": "0"}) == "slurm-42.3.n0"
    assert imagemount.mount_scope({**step, "SLURM_NODEID": "3"}) == "slurm-42.3.n3"
    assert imagemount.mount_scope({**step, "SLURM_STEP_NUM_NODES": "1", "SLURM_NODEID": "0"}) == "slurm-42.3"
    assert imagemount.mount_scope({**step, "SLURM_NODEID": "../1"}) == "slurm-42.3"
    assert imagemount.mount_scope({**step, "SLURM_STEP_NUM_NODES": "x", "SLURM_NODEID": "1"}) == "slurm-42.3"
    assert imagemount.mount_scope({"SLURM_JOB_ID": "42", "SLURM_NODEID": "1", "SLURM_STEP_NUM_NODES": "2"}) == "slurm-42"


def test_image_key_names_the_digest_and_scope(tmp_path):
    image = tmp_path / "i.sqfs"
    image.write_bytes(b"x")
    assert imagemount.image_key(image, "sha256:ab", "slurm-1.0") == "sha256-ab@slurm-1.0"
    by_path = imagemount.image_key(image, None)
    assert by_path.startswith("file-") and by_path == imagemount.image_key(Path(str(image)), None)


def test_squashfs_program_gives_squashfuse_the_caching_options_and_squashfuse_ll_none():
    assert fuse.squashfs_program("squashfuse") == ("squashfuse", fuse.IMMUTABLE_CACHE_OPTIONS)
    assert "kernel_cache" in fuse.IMMUTABLE_CACHE_OPTIONS
    # squashfuse_ll refuses them ("unknown option"): it caches without a time limit by itself
    assert fuse.squashfs_program("squashfuse_ll") == ("squashfuse_ll", ())


# ---------------------------------------------------------------- lingering mounts (image_mount_linger)


_monotonic = time.monotonic


class Clock:
    """time.time() and time.sleep() of berth.runtime.imagemount: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    monotonic = staticmethod(_monotonic)


@pytest.fixture
def reapers(monkeypatch, mounts) -> list:
    """Reapers are recorded, not forked: a test runs their body itself. The 'reaper' is this
    process (alive, with its own start time), as the body finds itself when it runs here."""
    started: list = []

    def fork_detached(body, *, name=""):
        assert name == "berth-linger"
        started.append(body)
        return os.getpid()

    monkeypatch.setattr(imagemount.proc, "fork_detached", fork_detached)
    clock = Clock()
    monkeypatch.setattr(imagemount, "time", clock)
    return [started, clock]


def test_the_last_one_out_with_a_linger_leaves_the_mount_and_one_reaper(tmp_path, mounts, reapers):
    mounted, calls, image = mounts
    started, clock = reapers
    hold = imagemount.acquire(tmp_path, "sha256-abc", image, "b1", linger_s=60)
    assert hold.release() is False and mounted == {str(hold.root)} and len(started) == 1
    record = imagemount._read_record(hold.directory)
    assert imagemount.lingering_until(record) == clock.now + 60
    assert record["reaper"] == [os.getpid(), imagemount._process_start(os.getpid())]
    # The stale clean-up leaves it inside its linger.
    assert imagemount.cleanup_stale(tmp_path) == [] and mounted == {str(hold.root)}
    # The next container reuses it: no second mount; its leaving reuses the live reaper.
    again = imagemount.acquire(tmp_path, "sha256-abc", image, "b2", linger_s=60)
    assert calls == [str(hold.root)] and imagemount.lingering_until(imagemount._read_record(hold.directory)) is None
    clock.now += 30
    assert again.release() is False and len(started) == 1
    # The reaper wakes at the first linger's end, sees the later one, sleeps on, then unmounts.
    started[0]()
    assert clock.now >= 1_000_000.0 + 30 + 60 and mounted == set() and not hold.directory.exists()


def _reap_while_in_use(tmp_path, image, started, clock, monkeypatch, meanwhile) -> list:
    """A mount that lingered and is in use again when its reaper wakes; the reaper's body run
    with ``meanwhile(slept, hold)`` called at each of its sleeps; returns what it slept and
    the hold."""
    imagemount.acquire(tmp_path, "sha256-abc", image, "b1", linger_s=10).release()
    hold = imagemount.acquire(tmp_path, "sha256-abc", image, "b2", linger_s=10)
    clock.now += 20
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds
        meanwhile(slept, hold)

    monkeypatch.setattr(clock, "sleep", sleep)
    started[0]()
    return slept, hold


def test_a_reaper_watches_a_mount_in_use_and_the_next_last_one_out_reuses_it(tmp_path, mounts, reapers, monkeypatch):
    mounted, calls, image = mounts
    started, clock = reapers

    def leave(slept, hold):
        if len(slept) == 2:  # the container ends while the reaper watches
            assert hold.release() is False and len(started) == 1  # the live reaper reused

    slept, user = _reap_while_in_use(tmp_path, image, started, clock, monkeypatch, leave)
    assert slept[:2] == [max(imagemount.REAPER_POLL_S, 10)] * 2 and slept[2] >= 10, slept  # every linger
    assert mounted == set() and not user.directory.exists()


def test_a_reaper_unmounts_a_mount_whose_last_holder_was_killed(tmp_path, mounts, reapers, monkeypatch):
    """kill -9 of the berth holding a mount that lingered before: nobody leaves, so nobody
    lingers; the reaper watching it unmounts it (red team: it ended when it found the mount in
    use, and mount and daemon stayed until the user's next berth)."""
    mounted, calls, image = mounts
    started, clock = reapers

    def killed(slept, hold):
        if len(slept) == 3:
            os.close(hold.holder_fd)  # its lock goes with it, its holder file stays

    slept, user = _reap_while_in_use(tmp_path, image, started, clock, monkeypatch, killed)
    assert slept == [max(imagemount.REAPER_POLL_S, 10)] * 3 and mounted == set() and not user.directory.exists()


def test_stale_cleanup_removes_a_lingering_mount_whose_time_is_up_or_whose_daemon_died(tmp_path, mounts, reapers):
    mounted, calls, image = mounts
    started, clock = reapers
    expired = imagemount.acquire(tmp_path, "sha256-expired", image, "b1", linger_s=10)
    dead = imagemount.acquire(tmp_path, "sha256-dead", image, "b2", linger_s=600)
    expired.release()
    dead.release()
    mounted.discard(str(dead.root))  # its daemon was killed (Slurm's end of step): the mount is dead
    clock.now += 11  # and the reaper of the other one was killed: nobody unmounted it on time
    cleaned = imagemount.cleanup_stale(tmp_path)
    assert sorted(entry["image"] for entry in cleaned) == ["sha256-dead", "sha256-expired"]
    assert mounted == set() and not (tmp_path / "images").exists()
    # A reaper that wakes after that finds nothing to do, and touches nothing.
    for body in started:
        body()
    assert not (tmp_path / "images").exists()


def test_without_a_linger_the_last_one_out_unmounts_and_starts_no_reaper(tmp_path, mounts, reapers):
    mounted, calls, image = mounts
    started, clock = reapers
    hold = imagemount.acquire(tmp_path, "sha256-abc", image, "b1", linger_s=0)
    assert hold.release() is True and mounted == set() and started == []


def test_a_linger_set_to_zero_later_unmounts_at_the_next_release(tmp_path, mounts, reapers):
    """The setting changed between runs: a lingering mount reused by a run without a linger
    is unmounted by that run's release; its old reaper then finds nothing."""
    mounted, calls, image = mounts
    started, clock = reapers
    imagemount.acquire(tmp_path, "sha256-abc", image, "b1", linger_s=60).release()
    assert imagemount.acquire(tmp_path, "sha256-abc", image, "b2", linger_s=0).release() is True
    assert mounted == set() and len(calls) == 1
    started[0]()
    assert not (tmp_path / "images").exists()


def test_mounts_are_listed_in_use_or_lingering_and_doctor_cleanup_ends_a_lingering_one(tmp_path, mounts, reapers):
    mounted, calls, image = mounts
    started, clock = reapers
    used = imagemount.acquire(tmp_path, "sha256-used", image, "b1", linger_s=60)
    imagemount.acquire(tmp_path, "sha256-idle", image, "b2", linger_s=60).release()
    assert imagemount.list_mounts(tmp_path) == [
        {"image": "sha256-idle", "root": str(tmp_path / "images/sha256-idle/root"), "holders": 0,
         "lingering_until": clock.now + 60, "unmount_failed": None},
        {"image": "sha256-used", "root": str(used.root), "holders": 1, "lingering_until": None,
         "unmount_failed": None}]
    cleaned = imagemount.cleanup_stale(tmp_path, lingering=True)
    assert cleaned == [{"image": "sha256-idle", "unmounted": str(tmp_path / "images/sha256-idle/root"),
                        "lingering": True, "failure": None}]
    assert mounted == {str(used.root)}
    assert used.release() is False  # lingers in turn


def test_a_holder_looked_at_by_doctor_while_it_is_made_still_holds_the_mount(tmp_path, mounts, monkeypatch):
    """``berth doctor`` (list_mounts) counts holders by trying their locks, without the mount
    lock: when it tries a holder file in the instant between its creation and its berth's
    flock, that berth must still end up holding it, or the next leaver unmounts the image
    under its running container."""
    import fcntl

    mounted, calls, image = mounts
    real_open = os.open
    looked = []
    done = threading.Event()

    def open_and_look(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if Path(path).parent.name == "holders" and flags & os.O_EXCL:
            doctor = real_open(path, os.O_RDWR)  # list_mounts' try of this holder's lock
            fcntl.flock(doctor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            looked.append(path)

            def look_done():
                os.close(doctor)
                done.set()

            threading.Timer(0.3, look_done).start()
        return fd

    monkeypatch.setattr(os, "open", open_and_look)
    user = imagemount.acquire(tmp_path, "sha256-abc", image, "b1", lock_timeout_s=10)
    monkeypatch.setattr(os, "open", real_open)
    assert looked == [user.holder]
    assert done.wait(10)  # the doctor's look is over
    assert imagemount.list_mounts(tmp_path)[0]["holders"] == 1
    other = imagemount.acquire(tmp_path, "sha256-abc", image, "b2")
    assert other.release() is False and mounted == {str(user.root)}
    assert user.release() is True and mounted == set()


def test_a_shorter_linger_than_the_one_before_gets_a_reaper_of_its_own(tmp_path, mounts, reapers):
    """A reused reaper may sleep towards the end of the earlier, longer linger: a shorter one
    starts another (the earlier is ended), which unmounts at the shorter end."""
    mounted, calls, image = mounts
    started, clock = reapers
    imagemount.acquire(tmp_path, "sha256-abc", image, "b1", linger_s=600).release()
    hold = imagemount.acquire(tmp_path, "sha256-abc", image, "b2", linger_s=10)
    assert hold.release() is False and len(started) == 2
    clock.now += 11
    started[1]()
    assert mounted == set() and not hold.directory.exists()
    # A linger as long or longer than the one before keeps the live reaper.
    imagemount.acquire(tmp_path, "sha256-abc", image, "b3", linger_s=10).release()
    imagemount.acquire(tmp_path, "sha256-abc", image, "b4", linger_s=20).release()
    assert len(started) == 3


def test_a_lock_timeout_of_zero_means_one_try_never_going_on_without_the_lock(tmp_path, mounts):
    """lock_timeout_s may be 0 (BERTH_LOCK_TIMEOUT_S=0: never wait). Joining or leaving while
    another berth holds the mount lock then fails at once with the lock's error (exit 75);
    it went on without the lock and ended in a TypeError traceback (os.close(None))."""
    from berth.errors import LockError

    mounted, calls, image = mounts
    hold = imagemount.acquire(tmp_path, "sha256-abc", image, "b1", lock_timeout_s=0)
    with locks.file_lock(hold.directory / "lock", timeout_s=0) as held:
        assert held
        with pytest.raises(LockError):
            imagemount.acquire(tmp_path, "sha256-abc", image, "b2", lock_timeout_s=0)
        with pytest.raises(LockError):
            hold.release()
        assert os.listdir(hold.directory / "holders") == ["b1"] and mounted == {str(hold.root)}
    assert hold.release() is True and mounted == set()


def test_a_reaper_waits_for_a_busy_mount_lock_even_with_lock_timeout_0(tmp_path, mounts, reapers):
    """lock_timeout_s = 0 (a user's "do not wait") made the reaper give up on a lock held for
    a moment, and the mount stayed up past its linger until the next berth's clean-up."""
    mounted, calls, image = mounts
    started, clock = reapers
    hold = imagemount.acquire(tmp_path, "sha256-abc", image, "b1", lock_timeout_s=0, linger_s=10)
    hold.release()
    clock.now += 11
    with locks.file_lock(hold.directory / "lock", timeout_s=0) as held:
        assert held
        thread = threading.Thread(target=started[0])
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and mounted == {str(hold.root)}  # waiting for the lock
    thread.join(10)
    assert not thread.is_alive() and mounted == set() and not hold.directory.exists()


@pytest.mark.parametrize("change", [{"idle_since": float("inf")}, {"idle_since": 1e300}, {"linger_s": 10 ** 400},
                                    {"idle_since": float("nan")}, {"idle_since": 10 ** 400}])
def test_a_lingering_mounts_record_that_no_berth_wrote_neither_keeps_it_forever_nor_breaks_berth(
        tmp_path, mounts, reapers, change):
    """mount.json is the user's (a corrupted or edited record is possible): an end of linger at
    infinity, far in the future or past a float kept the mount for good (the reaper slept a day
    at a time, the stale clean-up left it, doctor promised an unmount in 1e300 s), and a linger
    too large for a float raised OverflowError in every berth's stale clean-up. A linger that
    cannot end later than the longest linger from now counts as over."""
    import json

    mounted, calls, image = mounts
    started, clock = reapers
    hold = imagemount.acquire(tmp_path, "sha256-abc", image, "b1", linger_s=60)
    hold.release()
    record = {**imagemount._read_record(hold.directory), **change}
    (hold.directory / "mount.json").write_text(json.dumps(record))
    (listed,) = imagemount.list_mounts(tmp_path)
    assert listed["lingering_until"] <= clock.now, listed
    naps = []
    clock.sleep = lambda seconds: (naps.append(seconds), pytest.fail("slept") if len(naps) > 3 else None)
    started[0]()  # the reaper ends it at once, not a day at a time
    assert mounted == set() and not hold.directory.exists() and naps == []
    again = imagemount.acquire(tmp_path, "sha256-abc", image, "b2", linger_s=60)
    again.release()
    (again.directory / "mount.json").write_text(json.dumps({**imagemount._read_record(again.directory), **change}))
    cleaned = imagemount.cleanup_stale(tmp_path)  # and so does the next berth's stale clean-up
    assert [entry["image"] for entry in cleaned] == ["sha256-abc"] and mounted == set()


def test_a_holder_swapped_for_a_link_while_the_clean_up_looks_is_no_holder(tmp_path, mounts, monkeypatch):
    """The clean-up judged each holder with lstat and then looked at its lock by name: one
    swapped for a link in between (by what can write into the state directory) raised ELOOP out
    of imagemount.cleanup_stale, and so out of every berth run, until someone removed it."""
    mounted, calls, image = mounts
    live = imagemount.acquire(tmp_path, "sha256-abc", image, "b1")
    dead = live.directory / imagemount.HOLDERS / "bdead"
    dead.touch(mode=0o600)
    real_locked = locks.locked

    def swapping(paths, **kwargs):
        paths = list(paths)
        if dead.is_file() and not dead.is_symlink():  # after the listing, before the look
            dead.unlink()
            dead.symlink_to(live.directory / imagemount.HOLDERS / "b1")  # a held lock, never followed
        return real_locked(paths, **kwargs)

    monkeypatch.setattr(locks, "locked", swapping)
    assert imagemount.cleanup_stale(tmp_path) == []  # b1 still holds the mount
    assert sorted(os.listdir(live.directory / imagemount.HOLDERS)) == ["b1"]  # the link went itself
    assert live.release() is True and mounted == set()


def test_a_link_planted_in_a_mounts_directory_never_makes_berth_remove_what_it_names(tmp_path, mounts):
    """The state directory is the user's, but what can write into it (a container that sees
    it) is hostile: a 'holders' link to another directory had every berth's stale clean-up
    remove each file there as a dead holder, and a holder that is a link (or a directory) made
    the clean-up raise in every berth run."""
    mounted, calls, image = mounts
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    linked = tmp_path / "images" / "sha256-linked"
    linked.mkdir(parents=True)
    (linked / "lock").touch()
    (linked / "holders").symlink_to(precious)
    odd = imagemount.acquire(tmp_path, "sha256-odd", image, "b1")
    (odd.directory / "holders" / "link").symlink_to(precious / "thesis.tex")
    (odd.directory / "holders" / "dir").mkdir()
    assert imagemount.cleanup_stale(tmp_path) == []  # b1 still holds its mount
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(os.listdir(odd.directory / "holders")) == ["b1", "dir"]  # the link went, not its target
    assert [entry["holders"] for entry in imagemount.list_mounts(tmp_path)] == [0, 1]
    assert odd.release() is True and mounted == set()
    imagemount.cleanup_stale(tmp_path)
    assert (precious / "thesis.tex").read_text() == "years of work"
