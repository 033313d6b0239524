"""Every common SquashFS reader reads what `berth pull` writes, with every compressor berth
offers (issue 9, defect 6: Debian 12's unsquashfs refused every lz4 image tar2sqfs wrote).

The image is the whiteout test image pulled by the unprivileged user: several owners (id table
of more than one entry), an xattr (xattr id table), small files (fragment table), a FIFO, a
setuid file and hard links. Readers: unsquashfs 4.5.1 (squashfs-tools), rdsquashfs and sqfs2tar
(squashfs-tools-ng), squashfuse as the user, and the kernel (a loop mount, as root).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from berth.image.squashfs import COMPRESSIONS
from tests.harness.storetest import squashfs_listing, stores  # noqa: F401 - fixture
from tests.harness.users import describe

pytestmark = pytest.mark.integration

#: Files whose content every reader must return identically: (path in the image, content).
KNOWN = (("data/keep.txt", b"keep\n"), ("perm/owned", b"owned\n"), ("perm/xattr", b"xattr\n"),
         ("swap/was_dir", b"now a file\n"))


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, **kwargs)


def unsquashfs_paths(squashfs: Path) -> list[str]:
    result = run(["unsquashfs", "-l", "-d", "", str(squashfs)], text=True)
    assert result.returncode == 0, result.stderr
    return sorted(line.strip().lstrip("/") for line in result.stdout.splitlines()
                  if line.startswith("/") and line.strip() != "/")


def tree_paths(root: Path) -> list[str]:
    paths = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            paths.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(paths)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_reader_reads_a_pulled_image(stores, whiteout_image, user_tmp, compression):
    stores.extra_env["BERTH_SQUASHFS_COMPRESSION"] = compression
    pulled = stores.json("pull", "--insecure", "--json", str(whiteout_image))
    squashfs = Path(pulled["squashfs"])
    expected_paths = squashfs_listing(squashfs)  # sqfs2tar (squashfs-tools-ng)
    assert "perm/owned" in expected_paths and "bin/busybox" in expected_paths

    # unsquashfs: lists as the user, extracts (owners, xattrs, FIFO) as root
    as_user = stores.user.run(["unsquashfs", "-l", str(squashfs)])
    assert as_user.returncode == 0, describe(as_user)
    assert unsquashfs_paths(squashfs) == expected_paths
    extracted = user_tmp / "unsquashfs"
    result = run(["unsquashfs", "-d", str(extracted), str(squashfs)], text=True)
    assert result.returncode == 0, result.stderr
    owned = os.stat(extracted / "perm/owned")
    assert (owned.st_uid, owned.st_gid) == (1234, 5678)
    assert os.getxattr(extracted / "perm/xattr", "user.berth") == b"test"
    busybox = hashlib.sha256((extracted / "bin/busybox").read_bytes()).hexdigest()

    # rdsquashfs
    for path, content in KNOWN:
        cat = run(["rdsquashfs", "-c", "/" + path, str(squashfs)])
        assert cat.returncode == 0 and cat.stdout == content, (path, cat.stderr)

    # squashfuse, unprivileged
    fuse_point = user_tmp / "fuse"
    fuse_point.mkdir()
    os.chown(fuse_point, stores.user.uid, stores.user.gid)
    mounted = stores.user.run(["squashfuse", str(squashfs), str(fuse_point)])
    assert mounted.returncode == 0, describe(mounted)
    try:
        read = stores.user.run(["cat", *(str(fuse_point / path) for path, _ in KNOWN)])
        summed = stores.user.run(["sha256sum", str(fuse_point / "bin/busybox")])
        listed = stores.user.run(["find", str(fuse_point), "-mindepth", "1", "-printf", "%P\\n"])
    finally:
        stores.user.run(["fusermount3", "-u", "-z", str(fuse_point)])
    assert read.stdout == b"".join(content for _, content in KNOWN).decode()
    assert summed.stdout.split()[0] == busybox
    assert sorted(listed.stdout.splitlines()) == expected_paths, describe(listed)

    # the kernel
    kernel_point = user_tmp / "kernel"
    kernel_point.mkdir()
    result = run(["mount", "-t", "squashfs", "-o", "loop,ro", str(squashfs), str(kernel_point)], text=True)
    assert result.returncode == 0, result.stderr
    try:
        contents = [(kernel_point / path).read_bytes() for path, _ in KNOWN]
        kernel_busybox = hashlib.sha256((kernel_point / "bin/busybox").read_bytes()).hexdigest()
        kernel_paths = tree_paths(kernel_point)
        kernel_owned = os.stat(kernel_point / "perm/owned")
    finally:
        run(["umount", str(kernel_point)])
    assert contents == [content for _, content in KNOWN]
    assert kernel_busybox == busybox and kernel_paths == expected_paths
    assert (kernel_owned.st_uid, kernel_owned.st_gid) == (1234, 5678)
