"""Node-local unpacked copies of images (site setting ``image_mount = "unpacked"``, issue 10
target 2; berth.runtime.localcopy): real unsquashfs, squashfuse_ll and runc, as the
unprivileged test user. The copy outlives its containers (later jobs reuse it), so the leak
rules of the runtime fixture (no mount, process or container directory left) still hold."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time

import pytest

from tests.harness.fixtures_runtime import _busybox_rootfs, processes_mentioning
from tests.harness.users import describe
from tests.integration.test_shared_mounts import daemons, image_mounts, start, stop

pytestmark = pytest.mark.integration

#: Walks a tree as the user (a FUSE mount refuses root) and prints what a container could see.
WALK = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
seen = {}
for directory, dirs, files in os.walk(root):
    for name in dirs + files:
        path = os.path.join(directory, name)
        info = os.lstat(path)
        entry = {"type": stat.S_IFMT(info.st_mode), "mode": oct(stat.S_IMODE(info.st_mode)),
                 "mtime": int(info.st_mtime)}
        if stat.S_ISLNK(info.st_mode):
            entry["target"] = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            entry["size"] = info.st_size
            with open(path, "rb") as handle:
                entry["sha256"] = hashlib.sha256(handle.read()).hexdigest()
        entry["owner"] = [info.st_uid, info.st_gid]
        seen[os.path.relpath(path, root)] = entry
print(json.dumps(seen))
"""


@pytest.fixture
def unpacked_env(runtime_env):
    """runtime_env with the site setting image_mount = "unpacked"."""
    site = runtime_env.state_dir.parent / "site"  # root's, in a directory every user traverses
    site.mkdir(mode=0o755)
    (site / "berth.toml").write_text('image_mount = "unpacked"\n')
    runtime_env.extra_env["BERTH_CONFIG_DIR"] = str(site)
    return runtime_env


LOCKS = (".lock", ".maker")


def copies(env) -> list[str]:
    """Names under the user's unpacked/ directory (copies, their locks, temporary directories)."""
    try:
        return sorted(os.listdir(env.state_dir / "unpacked"))
    except FileNotFoundError:
        return []


def walk(env, root) -> dict:
    result = env.user.run(["/usr/bin/python3", "-c", WALK, str(root)])
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def test_unpacked_copy_shows_the_same_tree_as_squashfuse(unpacked_env, runtime_images):
    """Names, types, modes (setuid bits included), sizes, contents, times and link targets are
    those of the squashfuse mount; owners are the caller (module docstring of localcopy)."""
    for image in (runtime_images.setuid, runtime_images.hostile_link):
        result = unpacked_env.berth("run", "--debug", str(image), "true")
        assert result.returncode == 0 and "unpacked the image into" in result.stderr, describe(result)
        (name,) = [entry for entry in copies(unpacked_env) if not entry.endswith(LOCKS)]
        unpacked = walk(unpacked_env, unpacked_env.state_dir / "unpacked" / name / "root")
        mountpoint = unpacked_env.scratch / "mnt"
        mountpoint.mkdir()
        os.chown(mountpoint, unpacked_env.user.uid, unpacked_env.user.gid)
        mounted = unpacked_env.user.run(["squashfuse_ll", str(image), str(mountpoint)])
        assert mounted.returncode == 0, describe(mounted)
        try:
            through_fuse = walk(unpacked_env, mountpoint)
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            mountpoint.rmdir()
        assert sorted(unpacked) == sorted(through_fuse)
        for path in through_fuse:
            assert unpacked[path].pop("owner") == [unpacked_env.user.uid, unpacked_env.user.gid], path
            assert through_fuse[path].pop("owner") == [0, 0], path
        assert unpacked == through_fuse
        if image == runtime_images.setuid:
            assert unpacked["bin/setuid-probe"]["mode"] == "0o4755"
        # Inside the container too: the same view as the shared FUSE mount, but for owners.
        # Not compared: berth's mounts, and /etc, which the overlay gets a new time in when
        # berth puts a plain /etc/group there (the hostile image's is a FIFO).
        paths = sorted(f"/{path}" for path in unpacked if path.split("/")[0] not in ("proc", "dev", "sys", "tmp", "home")
                       and path not in ("etc", "etc/passwd", "etc/group"))
        views = []
        for mode in ("unpacked", "shared"):
            (unpacked_env.state_dir.parent / "site" / "berth.toml").write_text(f'image_mount = "{mode}"\n')
            seen = unpacked_env.berth("run", str(image), "stat", "-c", "%n|%A|%Y|%N", *paths)
            assert seen.returncode == 0, describe(seen)
            views.append(seen.stdout)
        (unpacked_env.state_dir.parent / "site" / "berth.toml").write_text('image_mount = "unpacked"\n')
        assert views[0] == views[1] and "/bin/sh|lrwxrwxrwx|" in views[0]
        assert unpacked_env.berth("prune").returncode == 0
        assert copies(unpacked_env) == []
    assert unpacked_env.wait_clean() == []


def test_unpacked_copy_is_read_only_and_setuid_bits_give_nothing(unpacked_env, runtime_images):
    result = unpacked_env.berth("run", str(runtime_images.setuid), "sh", "-c",
                                "/bin/setuid-probe; touch /bin/new 2>&1; id -u")
    assert result.returncode == 0, describe(result)
    uid = unpacked_env.user.uid
    assert f"ruid={uid} euid={uid}" in result.stdout and "setuid0=-1" in result.stdout, describe(result)
    assert "Read-only file system" in result.stdout, describe(result)
    (name,) = [entry for entry in copies(unpacked_env) if not entry.endswith(LOCKS)]
    assert not (unpacked_env.state_dir / "unpacked" / name / "root" / "bin" / "new").exists()
    # --writable: the container writes into its own overlay, never into the shared copy.
    written = unpacked_env.berth("run", "--writable", str(runtime_images.setuid), "sh", "-c",
                                 "echo hi > /bin/new && cat /bin/new && rm /bin/cat && test ! -e /bin/cat && echo gone")
    assert written.returncode == 0 and written.stdout == "hi\ngone\n", describe(written)
    assert not (unpacked_env.state_dir / "unpacked" / name / "root" / "bin" / "new").exists()
    assert (unpacked_env.state_dir / "unpacked" / name / "root" / "bin" / "cat").is_symlink()
    assert unpacked_env.wait_clean() == []


def test_an_overlay_on_an_unpacked_copy_is_the_kernels_and_leaves_the_copy_alone(unpacked_env, runtime_images):
    """A mount point the image lacks needs an overlay: on an unpacked copy it is a kernel
    overlayfs the runtime mounts in the container's user namespace, not a FUSE daemon."""
    source = unpacked_env.scratch / "data"
    source.mkdir()
    (source / "hello").write_text("hello\n")
    os.chown(source, unpacked_env.user.uid, unpacked_env.user.gid)
    result = unpacked_env.berth("run", "--debug", "-v", f"{source}:/scratch/project", str(runtime_images.busybox),
                                "sh", "-c", "cat /scratch/project/hello; grep ' / / ' /proc/self/mountinfo; "
                                "touch /new 2>&1; true")
    assert result.returncode == 0, describe(result)
    assert "adding a kernel overlayfs overlay" in result.stderr, describe(result)
    assert "/berth-launcher\n" in result.stderr, describe(result)  # the launcher mounts it, not runc
    lines = result.stdout.splitlines()
    assert lines[0] == "hello" and " - overlay overlay " in lines[1] and " / / ro," in lines[1], describe(result)
    assert "Read-only file system" in lines[2], describe(result)
    assert daemons(unpacked_env) == [] and image_mounts(unpacked_env) == []
    (name,) = [entry for entry in copies(unpacked_env) if not entry.endswith(LOCKS)]
    assert not (unpacked_env.state_dir / "unpacked" / name / "root" / "scratch").exists()
    assert unpacked_env.wait_clean() == []


def test_concurrent_containers_make_one_copy_and_later_runs_reuse_it(unpacked_env, runtime_images):
    processes = start(unpacked_env, runtime_images.busybox, 4)
    try:
        names = copies(unpacked_env)
        assert len(names) == 3 and names[1:] == [names[0] + ".lock", names[0] + ".maker"], names  # one copy, no temporary left
        assert image_mounts(unpacked_env) == [] and daemons(unpacked_env) == []  # no FUSE at all
        copy = unpacked_env.state_dir / "unpacked" / names[0]
        made = os.stat(copy).st_ino
        # prune leaves a copy in use alone
        pruned = unpacked_env.berth("prune", "--json")
        assert pruned.returncode == 0 and json.loads(pruned.stdout)["node_local_removed"] == [], describe(pruned)
    finally:
        for process in processes:
            stop(process)
    later = unpacked_env.berth("run", "--debug", str(runtime_images.busybox), "cat", "/etc/group")
    assert later.returncode == 0 and later.stdout.startswith("root:x:0:"), describe(later)
    assert "using the unpacked copy" in later.stderr and os.stat(copy).st_ino == made, describe(later)
    pruned = unpacked_env.berth("prune")
    assert pruned.returncode == 0 and f"deleted node-local copy: {copy}" in pruned.stdout, describe(pruned)
    assert copies(unpacked_env) == []
    assert unpacked_env.wait_clean() == []


def test_another_user_cannot_read_an_unpacked_copy(unpacked_env, runtime_images, other_user):
    result = unpacked_env.berth("run", str(runtime_images.busybox), "true")
    assert result.returncode == 0, describe(result)
    (name,) = [entry for entry in copies(unpacked_env) if not entry.endswith(LOCKS)]
    copy = unpacked_env.state_dir / "unpacked" / name
    assert os.stat(unpacked_env.state_dir / "unpacked").st_mode & 0o077 == 0
    for argv in (["ls", str(unpacked_env.state_dir / "unpacked")], ["cat", str(copy / "root" / "etc" / "passwd")]):
        probe = other_user.run(argv)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, describe(probe)
    assert unpacked_env.wait_clean() == []


@pytest.fixture
def big_image(runtime_env):
    """busybox and 64 MiB of incompressible files: unpacking it takes long enough to kill."""
    root = runtime_env.scratch / "big"
    _busybox_rootfs(root)
    for index in range(64):
        (root / "data" / f"blob-{index}").write_bytes(os.urandom(1 << 20))
    image = runtime_env.scratch / "big.sqfs"
    subprocess.run(["mksquashfs", str(root), str(image), "-comp", "lz4", "-all-root", "-noappend", "-quiet",
                    "-no-progress"], check=True, capture_output=True)
    os.chmod(image, 0o644)
    return image


def test_kill_9_while_unpacking_leaves_no_copy_that_a_later_run_uses(unpacked_env, big_image):
    berth = unpacked_env.popen("run", str(big_image), "true")
    deadline = time.monotonic() + 60
    while not any(name.startswith(".tmp-") for name in copies(unpacked_env)):
        assert berth.poll() is None and time.monotonic() < deadline, berth.communicate()
        time.sleep(0.001)
    berth.send_signal(signal.SIGKILL)
    berth.wait(timeout=10)
    left = copies(unpacked_env)
    assert [name for name in left if not name.startswith(".") and not name.endswith(LOCKS)] == [], left
    # unsquashfs died with berth (parent-death signal): nothing keeps writing the half copy.
    deadline = time.monotonic() + 5
    while processes_mentioning(unpacked_env.user.uid, "unsquashfs") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in processes_mentioning(unpacked_env.user.uid, str(unpacked_env.state_dir))
            if "unsquashfs" in p] == []
    again = unpacked_env.berth("run", "--debug", str(big_image), "sh", "-c", "cat /data/* | wc -c")
    assert again.returncode == 0 and again.stdout.strip() == str(64 << 20), describe(again)
    assert "unpacked the image into" in again.stderr, describe(again)
    names = copies(unpacked_env)
    assert len(names) == 3 and not any(name.startswith(".") for name in names), names
    assert unpacked_env.wait_clean() == []


def test_short_disk_falls_back_to_the_fuse_mount_with_a_warning(unpacked_env, runtime_images):
    state = unpacked_env.state_dir
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=4m,mode=0700,uid={unpacked_env.user.uid},"
                    f"gid={unpacked_env.user.gid}", "berth-test-small", str(state)], check=True)
    try:
        result = unpacked_env.berth("run", str(runtime_images.busybox), "cat", "/etc/group")
        assert result.returncode == 0 and result.stdout.startswith("root:x:0:"), describe(result)
        assert "warning: no room to unpack the image" in result.stderr, describe(result)
        assert "MiB free" in result.stderr and "berth prune" in result.stderr, describe(result)
        assert [name for name in copies(unpacked_env) if not name.endswith(LOCKS)] == []
        assert unpacked_env.wait_clean() == []
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's unsquashfs makes device nodes (a user's mknod fails)")
def test_root_unpacks_no_device_node_even_one_whose_name_hides_it_from_the_listing(tmp_path):
    """A device node named with a newline or a carriage return read as another name in
    ``unsquashfs -lln``'s listing, so it was not excluded, and root's unsquashfs made it: a
    container of root's on the launcher (no device cgroup) could open the host device it names
    (review of 4 December). Real unsquashfs as root; the copy must hold no device node at all."""
    from berth.runtime import localcopy

    tree = tmp_path / "tree"
    (tree / "opt").mkdir(parents=True)
    (tree / "opt" / "kept").write_text("data\n")
    for name in ("plain", "lc\nx", "cr\rx", "fs\x1cx"):  # /dev/loop-control's numbers
        os.mknod(tree / "opt" / name, 0o666 | stat.S_IFCHR, os.makedev(10, 237))
    os.mknod(tree / "opt" / "blk\nx", 0o666 | stat.S_IFBLK, os.makedev(7, 0))
    image = tmp_path / "evil.sqfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-all-root", "-noappend", "-quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    hold = localcopy.unpacked_copy(state, image)
    try:
        found = {}
        for directory, dirs, files in os.walk(hold.root):
            for name in dirs + files:
                found[os.path.relpath(os.path.join(directory, name), hold.root)] = os.lstat(
                    os.path.join(directory, name)).st_mode
        devices = [path for path, mode in found.items() if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)]
        assert devices == [], f"device nodes in the unpacked copy: {devices!r}"
        assert (hold.root / "opt" / "kept").read_text() == "data\n"
    finally:
        hold.release()
