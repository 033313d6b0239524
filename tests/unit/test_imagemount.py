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
    assert cleaned == [{"image": "sha256-dead", "unmounted": str(dead.root)}]
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
