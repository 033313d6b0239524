"""berth's flattened SquashFS against ``umoci unpack`` of the same OCI layout, and squashfuse
mounting every compression berth offers.

The images are the harness's (tests/harness/images.py: the same specs the ``busybox_image``,
``whiteout_image``, ``hardlink_image`` and ``debian_image`` fixtures push), built into an OCI
layout without a registry: flatten needs only the layer blobs. ``umoci unpack --rootless``
(what an unprivileged user can do) is compared on names, types, modes, link targets, contents
and hard-link groups; as root a privileged ``umoci unpack`` also checks ownership and device
nodes, which ``--rootless`` cannot keep.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from berth.image.flatten import Layer, build_squashfs
from berth.oci.digest import Digest
from tests.harness import images
from tests.harness.ocilayout import MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_TAR
from tests.unit.test_flatten_helpers import f, read_tree, write_layer

pytestmark = pytest.mark.integration

SPECS = {
    "busybox": images.busybox_spec,
    "whiteout": images.whiteout_spec,
    "hardlink": images.hardlink_spec,
    "debian": images.debian_spec,
}


def layers_of(built) -> list[Layer]:
    media = MEDIA_OCI_LAYER_GZIP if built.compression == "gzip" else MEDIA_OCI_LAYER_TAR
    return [Layer(built.blob_path(digest), media, Digest.parse(digest)) for digest in built.layer_digests]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo")):
        if test(mode):
            return name
    return "other"


def umoci_tree(rootfs: Path, *, owners: bool) -> tuple[dict[str, tuple], set[frozenset[str]]]:
    """(path → comparable record, hard-link groups) of an unpacked rootfs."""
    tree: dict[str, tuple] = {}
    inodes: dict[int, set[str]] = {}
    for directory, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            path = os.path.relpath(full, rootfs)
            st = os.lstat(full)
            kind = _kind(st.st_mode)
            link = os.readlink(full) if kind == "symlink" else ""
            digest = hashlib.sha256(Path(full).read_bytes()).hexdigest() if kind == "file" else ""
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else (0, 0)
            owner = (st.st_uid, st.st_gid) if owners else ()
            tree[path] = (kind, stat.S_IMODE(st.st_mode), link, digest, dev, owner)
            if kind == "file" and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, set()).add(path)
    return tree, {frozenset(group) for group in inodes.values() if len(group) > 1}


def squashfs_tree(image: Path, *, owners: bool) -> tuple[dict[str, tuple], set[frozenset[str]]]:
    tree: dict[str, tuple] = {}
    groups: dict[str, set[str]] = {}
    for path, node in read_tree(image).items():
        if path == ".":
            continue
        digest = hashlib.sha256(node.data).hexdigest() if node.kind == "file" else ""
        dev = node.dev if node.kind in ("char", "block") else (0, 0)
        owner = (node.uid, node.gid) if owners else ()
        tree[path] = (node.kind, node.mode, node.link, digest, dev, owner)
        if node.inode_of:
            groups.setdefault(node.inode_of, set()).add(path)
    return tree, {frozenset(group) for group in groups.values() if len(group) > 1}


def unpack(layout: Path, bundle: Path, *, rootless: bool) -> Path:
    argv = ["umoci", "unpack", *(["--rootless"] if rootless else []), "--image", f"{layout}:latest", str(bundle)]
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode == 0, result.stderr
    return bundle / "rootfs"


@pytest.fixture(scope="module")
def flattened(tmp_path_factory):
    """name → (built image, SquashFS path, report), each image flattened once per module."""
    done = {}

    def get(name: str):
        if name not in done:
            built = images.build_image(SPECS[name]())
            output = tmp_path_factory.mktemp(f"flat-{name}") / "image.sqfs"
            report = build_squashfs(layers_of(built), output)
            done[name] = (built, output, report)
        return done[name]

    return get


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("rootless", [True, False], ids=["rootless", "privileged"])
def test_flattened_tree_matches_umoci_unpack(tmp_path, flattened, name, rootless):
    if not rootless and os.getuid() != 0:
        pytest.skip("a privileged umoci unpack (ownership, device nodes) needs root")
    built, image, report = flattened(name)
    rootfs = unpack(built.layout, tmp_path / "bundle", rootless=rootless)
    try:
        expected, expected_links = umoci_tree(rootfs, owners=not rootless)
        actual, actual_links = squashfs_tree(image, owners=not rootless)
    finally:
        shutil.rmtree(tmp_path / "bundle", ignore_errors=True)
    if rootless:
        # umoci --rootless cannot mknod: it leaves an empty regular file with the node's mode where
        # berth's image keeps the device node itself.
        devices = {path: record for path, record in actual.items() if record[0] in ("char", "block")}
        empty = hashlib.sha256(b"").hexdigest()
        for path, record in devices.items():
            assert expected.pop(path, None) == ("file", record[1], "", empty, (0, 0), ()), path
            del actual[path]
    assert sorted(set(expected) ^ set(actual)) == []
    different = {path: (expected[path], actual[path]) for path in expected if expected[path] != actual[path]}
    assert different == {}
    assert expected_links == actual_links
    assert report.notes == []
    assert report.entries > 0


def test_whiteout_image_holds_what_its_spec_says(flattened):
    """Spot checks against the spec's documented final state, independent of umoci."""
    _, image, _ = flattened("whiteout")
    tree = read_tree(image)
    assert tree["data/keep.txt"].data == b"keep\n"
    assert "data/gone.txt" not in tree and "data/subdir" not in tree
    assert sorted(p for p in tree if p.startswith("opaque/")) == ["opaque/new.txt"]
    assert tree["swap/was_file"].kind == "dir" and tree["swap/was_file/inner.txt"].data == b"inside\n"
    assert tree["swap/was_dir"].data == b"now a file\n"
    assert tree["data/recreated.txt"].data == b"second\n"
    assert tree["links/abs"].link == "/data/keep.txt"
    assert tree["links/hard"].inode_of == tree["links/hard_src"].inode_of != ""
    assert (tree["perm/owned"].uid, tree["perm/owned"].gid) == (1234, 5678)
    assert tree["perm/suid"].mode == 0o4755
    assert tree["perm/xattr"].xattrs == {"user.berth": b"test"}
    assert tree["perm/fifo"].kind == "fifo"


@pytest.mark.parametrize("compression", ["lz4", "zstd", "gzip", "xz", "lzo"])
def test_squashfuse_mounts_every_compression_as_the_test_user(user, user_tmp, compression):
    """squashfuse (Debian 0.1.105) reads what tar2sqfs writes with each compressor, unprivileged."""
    payload = os.urandom(300_000)
    blobs = user_tmp / "blobs"
    blobs.mkdir()
    layer = write_layer(blobs, [f("data/payload", payload, mode=0o640, uid=user.uid, gid=user.gid),
                                f("data/suid", "x", mode=0o4755)])
    image = user_tmp / f"image-{compression}.sqfs"
    build_squashfs([layer], image, compression=compression)
    os.chmod(image, 0o644)
    mountpoint = user_tmp / "mnt"
    mountpoint.mkdir()
    os.chown(mountpoint, user.uid, user.gid)
    mounted = user.run(["squashfuse", str(image), str(mountpoint)])
    assert mounted.returncode == 0, mounted.stderr
    try:
        read = user.run(["sha256sum", str(mountpoint / "data/payload")])
        listed = user.run(["stat", "-c", "%a %u %g", str(mountpoint / "data/payload"), str(mountpoint / "data/suid")])
        options = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()
                       if line.split()[1] == str(mountpoint))
    finally:
        user.run(["fusermount3", "-u", "-z", str(mountpoint)])
    assert read.stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    assert listed.stdout.split("\n")[:2] == [f"640 {user.uid} {user.gid}", "4755 0 0"]
    assert {"nosuid", "nodev"} <= set(options.split(","))
