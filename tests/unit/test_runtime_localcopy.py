"""Node-local copies of SquashFS files (stage_to_local): made once, verified, refreshed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from berth.errors import RuntimeFailure
from berth.oci.digest import Digest
from berth.runtime.localcopy import local_copy


def test_copy_is_made_once_and_reused(tmp_path):
    source = tmp_path / "image.sqfs"
    source.write_bytes(b"sqsh" * 1000)
    digest = Digest.of(b"manifest")
    first = local_copy(tmp_path / "state", source, digest)
    assert first == tmp_path / "state" / "images" / f"sha256-{digest.hex}.sqfs"
    assert first.read_bytes() == source.read_bytes()
    inode = first.stat().st_ino
    again = local_copy(tmp_path / "state", source, digest)
    assert (again, again.stat().st_ino) == (first, inode)
    leftovers = sorted(p.name for p in (tmp_path / "state" / "images").iterdir())
    assert leftovers == [f"sha256-{digest.hex}.lock", f"sha256-{digest.hex}.sqfs"]


def test_a_changed_source_is_copied_again(tmp_path):
    source = tmp_path / "x.sqfs"
    source.write_bytes(b"old content")
    first = local_copy(tmp_path / "state", source)
    source.write_bytes(b"new content, longer")
    os.utime(source, ns=(0, first.stat().st_mtime_ns + 10**9))
    second = local_copy(tmp_path / "state", source)
    assert second.read_bytes() == b"new content, longer"


def test_concurrent_callers_share_one_copy(tmp_path):
    source = tmp_path / "big.sqfs"
    source.write_bytes(os.urandom(4 << 20))
    code = ("import sys; from pathlib import Path; from berth.runtime.localcopy import local_copy; "
            "print(local_copy(Path(sys.argv[1]), Path(sys.argv[2])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "state"), str(source)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1
    assert Path(outputs.pop()).read_bytes() == source.read_bytes()
    assert not [p for p in (tmp_path / "state" / "images").iterdir() if p.name.endswith(".tmp")]


def test_unusable_state_directory_is_a_clear_failure(tmp_path):
    source = tmp_path / "x.sqfs"
    source.write_bytes(b"x")
    state = tmp_path / "state"
    state.mkdir()
    (state / "images").write_text("not a directory")  # fails for root too
    with pytest.raises(RuntimeFailure) as info:
        local_copy(state, source)
    assert "cannot copy the image" in str(info.value) and "stage_to_local" in info.value.hint


# ---------------------------------------------------------------- unpacked copies (issue 10)

LISTING = """\
drwxr-xr-x 0/0                      27 2026-12-03 11:33 squashfs-root
drwxr-xr-x 0/0                     100 2026-12-03 11:33 squashfs-root/bin
-rwsr-xr-x 0/0                 1982256 2026-12-03 11:33 squashfs-root/bin/busybox
lrwxrwxrwx 0/0                       7 2026-12-03 11:33 squashfs-root/bin/sh -> busybox
-rw-r--r-- 0/0                       1 2026-12-03 11:33 squashfs-root/a name with -> arrow
crw-rw-rw- 0/0                   1,  3 2026-12-03 11:36 squashfs-root/dev/null
brw-r----- 0/6                 8, 0 2026-12-03 11:36 squashfs-root/dev/sda
drwxrwsr-t 0/0                       3 2026-12-03 11:33 squashfs-root/shared
prw-r--r-- 0/0                       0 2026-12-03 11:33 squashfs-root/fifo
"""


def test_listing_gives_room_devices_and_setid_modes():
    from berth.runtime.localcopy import BLOCK, parse_listing

    listing = parse_listing(LISTING)
    assert listing.inodes == 9
    # whole blocks: 1982256 B -> 484 blocks, 1 B -> 1 block, three directories one each
    assert listing.size_bytes == (484 + 1 + 3) * BLOCK
    assert listing.devices == ["dev/null", "dev/sda"]
    assert listing.setid_modes == [("bin/busybox", 0o4755), ("shared", 0o3775)]


def test_a_full_file_system_refuses_before_writing(tmp_path, monkeypatch):
    from berth.errors import InsufficientSpace
    from berth.runtime import imagemount, localcopy

    source = tmp_path / "x.sqfs"
    source.write_bytes(b"x")
    monkeypatch.setattr(localcopy, "_listing", lambda _: localcopy.Listing(1 << 50, 10, [], []))
    with pytest.raises(InsufficientSpace) as info:
        localcopy.unpacked_copy(tmp_path / "state", source)
    assert "no room to unpack the image" in info.value.message
    # Sizes for people as everywhere in berth (units.human_size, binary); this one said "MB" (10^6).
    assert re.search(r"it needs 1075\.2 TiB, [0-9.]+ (?:[KMGT]i)?B free", info.value.message), info.value.message
    assert "berth prune" in info.value.hint
    key = imagemount.source_key(source, None)[0]
    assert sorted(p.name for p in (tmp_path / "state" / "unpacked").iterdir()) == [key + ".lock", key + ".maker"]


def test_prune_removes_unused_copies_and_leftovers_but_not_one_in_use(tmp_path):
    from berth import locks
    from berth.runtime.localcopy import prune_unpacked

    base = tmp_path / "unpacked"
    for name in ("used", "unused"):
        root = base / name / "root" / "proc"
        root.mkdir(parents=True)
        root.chmod(0o555)  # an image's read-only directory must not stop the removal
        (base / f"{name}.lock").touch()
    (base / ".tmp-unused-abc" / "root").mkdir(parents=True)
    with locks.file_lock(base / "used.lock", shared=True):
        removed = prune_unpacked(base)
    assert [path for path, _ in removed] == [str(base / "unused")]
    assert sorted(p.name for p in base.iterdir()) == ["used", "used.lock"]


def test_a_maker_does_not_wait_for_the_containers_running_from_the_copy(tmp_path, monkeypatch):
    """Four containers started at once all found no copy; one made it and ran, holding the
    copy's lock shared for its life. The others must not then wait for that lock exclusively
    (a hang of two of four in a full run): making takes the maker lock, not the use lock."""
    from berth import locks
    from berth.runtime import imagemount, localcopy

    source = tmp_path / "image.sqfs"
    source.write_bytes(b"hsqs" + b"\0" * 100)
    base = tmp_path / "state" / localcopy.UNPACKED
    base.mkdir(parents=True)
    key = imagemount.source_key(source, None)[0]

    def fake_unpack(base, name, source, source_info):
        (base / name / "root").mkdir(parents=True)
        (base / name / "info.json").write_text(json.dumps({"boot_id": localcopy._boot_id()}))

    monkeypatch.setattr(localcopy, "_unpack", fake_unpack)
    monkeypatch.setattr(localcopy, "prune_unpacked", lambda *args, **kwargs: [])
    with locks.file_lock(base / f"{key}.lock", shared=True):  # a running container's hold
        held = localcopy.unpacked_copy(tmp_path / "state", source, lock_timeout_s=2)
        try:
            assert held.root == base / key / "root" and held.root.is_dir()
        finally:
            held.release()


def test_remove_tree_opens_closed_directories(tmp_path):
    from berth.fsutil import remove_tree

    closed = tmp_path / "tree" / "a" / "b"
    closed.mkdir(parents=True)
    (closed / "file").write_text("x")
    closed.chmod(0)
    (tmp_path / "tree" / "a").chmod(0o500)
    remove_tree(tmp_path / "tree")
    assert not (tmp_path / "tree").exists()


@pytest.mark.parametrize("release, expected", [("6.18.44-fc", True), ("5.11.0", True), ("5.10.0-28-amd64", False),
                                               ("4.18.0-553.el8", False), ("weird", False)])
def test_kernel_overlay_only_on_an_unpacked_copy_and_linux_5_11(monkeypatch, tmp_path, release, expected):
    from berth.runtime import materialise
    from berth.runtime.localcopy import UnpackedImage

    monkeypatch.setattr(materialise.os, "uname", lambda: os.uname_result(("Linux", "n", release, "#1", "x86_64")))
    assert materialise.kernel_overlay(UnpackedImage(tmp_path, -1)) is expected
    assert materialise.kernel_overlay(object()) is False  # a FUSE mount: root-owned files cannot be copied up


def test_a_lock_timeout_of_zero_fails_at_once_rather_than_copying_without_the_lock(tmp_path):
    """lock_timeout_s 0 (BERTH_LOCK_TIMEOUT_S=0, docs: "do not wait"): while another berth holds
    the copy's lock, the copy fails at once naming the lock (exit 75). locks.file_lock read the
    0 as "try once, run the block anyway", and the copy was made without the lock."""
    from berth import locks
    from berth.errors import LockError

    source = tmp_path / "image.sqfs"
    source.write_bytes(b"sqsh" * 1000)
    digest = Digest.of(b"manifest")
    images = tmp_path / "state" / "images"
    images.mkdir(parents=True)
    with locks.file_lock(images / f"sha256-{digest.hex}.lock", timeout_s=1) as held:
        assert held
        with pytest.raises(LockError):
            local_copy(tmp_path / "state", source, digest, lock_timeout_s=0)
    assert not (images / f"sha256-{digest.hex}.sqfs").exists()
