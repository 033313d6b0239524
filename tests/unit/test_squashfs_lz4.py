"""lz4 SquashFS files that Debian 12's unsquashfs reads (issue 9, defect 6): tar2sqfs stores a
4-byte id table as a 5-byte lz4 block, which unsquashfs 4.5 refuses; berth stores such table
blocks uncompressed after tar2sqfs has written the file."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from berth.errors import ImageError
from berth.image.flatten import tar_to_squashfs
from berth.image.squashfs import lz4_block_decompress, repair_lz4_tables


def rootfs_tar(tmp_path: Path, owners: int = 1, xattr: bool = False) -> Path:
    path = tmp_path / "rootfs.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for number in range(3):
            data = f"file {number}\n".encode()
            info = tarfile.TarInfo(f"etc/f{number}")
            info.size, info.uid, info.gid, info.mode = len(data), number % owners, 0, 0o644
            if xattr:
                info.pax_headers = {"SCHILY.xattr.user.berth": "test"}
            archive.addfile(info, io.BytesIO(data))
    return path


def unsquashfs_lists(image: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["unsquashfs", "-l", str(image)], capture_output=True, text=True, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("owners, xattr", [(1, False), (3, True)])
def test_lz4_images_are_readable_by_unsquashfs(tmp_path, owners, xattr):
    image = tmp_path / "image.sqfs"
    tar_to_squashfs(rootfs_tar(tmp_path, owners, xattr), image, compression="lz4")
    listed = unsquashfs_lists(image)
    assert listed.returncode == 0, listed.stderr
    assert "squashfs-root/etc/f2" in listed.stdout.split()
    assert repair_lz4_tables(image) == 0  # nothing left to repair: the writer did it


def test_without_the_repair_unsquashfs_refuses_the_image(tmp_path):
    # what tar2sqfs writes by itself (the cause, kept visible: if a later tar2sqfs stops
    # inflating blocks, this test says the repair can go)
    image = tmp_path / "raw.sqfs"
    with open(rootfs_tar(tmp_path), "rb") as source:
        subprocess.run(["tar2sqfs", "--quiet", "--force", "--compressor", "lz4", str(image)], stdin=source,
                       check=True, capture_output=True)
    assert "failed to read id table block" in unsquashfs_lists(image).stderr
    before = image.read_bytes()
    assert repair_lz4_tables(image) == 1
    after = image.read_bytes()
    assert len(after) == len(before) and sum(a != b for a, b in zip(before, after)) <= 8  # one small block
    assert unsquashfs_lists(image).returncode == 0


def test_other_compressors_and_other_files_are_left_alone(tmp_path):
    image = tmp_path / "image.sqfs"
    tar_to_squashfs(rootfs_tar(tmp_path), image, compression="zstd")
    before = image.read_bytes()
    assert repair_lz4_tables(image) == 0 and image.read_bytes() == before
    text = tmp_path / "not-squashfs"
    text.write_bytes(b"x" * 200)
    assert repair_lz4_tables(text) == 0 and text.read_bytes() == b"x" * 200
    short = tmp_path / "short"
    short.write_bytes(b"hsqs")
    with pytest.raises(ImageError, match="too short"):
        repair_lz4_tables(short)


@pytest.mark.parametrize("block, expected", [
    (b"\x40\x00\x00\x00\x00", b"\x00" * 4),  # literals only: tar2sqfs' 4-byte id table
    (b"\x11a\x01\x00\x10b", b"a" * 6 + b"b"),  # a match overlapping its own output
    (b"\xf0\x01" + b"z" * 16, b"z" * 16),  # a literal length continued in a second byte
])
def test_lz4_blocks_decode(block, expected):
    assert lz4_block_decompress(block, len(expected)) == expected


@pytest.mark.parametrize("block, size", [
    (b"\x40\x00\x00", 4),  # truncated literals
    (b"\x11a\x00\x00\x10b", 7),  # offset 0
    (b"\x11a\x05\x00\x10b", 7),  # a match before the start
    (b"\x40\x00\x00\x00\x00", 5),  # decodes to another size
])
def test_malformed_lz4_blocks_are_refused(block, size):
    with pytest.raises(ImageError, match="lz4 block"):
        lz4_block_decompress(block, size)
