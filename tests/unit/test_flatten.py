"""Flattening layers into a SquashFS: overlay rules, hard links, metadata, limits, inputs.

Each test builds layer tarballs in memory, flattens them with the real tar2sqfs, and reads
the SquashFS back with sqfs2tar / unsquashfs.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from berth.errors import ImageError, StoreError, UsageError
from berth.image import tarstream
from berth.image.flatten import build_squashfs, tar_to_squashfs
from berth.oci.digest import Digest
from tests.unit.test_flatten_helpers import E, cat, d, f, hard, layer_tar, lln, read_tree, sym, write_layer


def flatten(tmp_path: Path, *layers, compression: str = "gzip", **kwargs):
    blobs = tmp_path / "blobs"
    blobs.mkdir(exist_ok=True)
    built = [layer if not isinstance(layer, list) else write_layer(blobs, layer) for layer in layers]
    output = tmp_path / "image.sqfs"
    report = build_squashfs(built, output, compression=compression, **kwargs)
    return report, read_tree(output), output


def paths(tree) -> set[str]:
    return set(tree) - {"."}


# --- one layer: what it holds arrives intact ---------------------------------------------------

def test_single_layer_keeps_types_modes_owners_contents_and_link_targets(tmp_path):
    report, tree, image = flatten(tmp_path, [
        d("./", mode=0o755),
        d("./etc", mode=0o751, uid=0, gid=4),
        f("./etc/hostname", "box\n", mode=0o640, uid=1000, gid=1001),
        sym("./etc/localtime", "/usr/share/zoneinfo/UTC"),
        sym("./rel", "../../../outside"),
        f("./usr/bin/sudo", "suid", mode=0o4755),
        f("./usr/bin/wall", "sgid", mode=0o2755, gid=5),
        d("./tmp", mode=0o1777),
        E("./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        E("./dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6),
        E("./run/fifo", tarfile.FIFOTYPE, mode=0o600),
        f("./big", b"\x00\xff" * 200_000),
    ])
    assert paths(tree) == {"etc", "etc/hostname", "etc/localtime", "rel", "usr", "usr/bin", "usr/bin/sudo",
                           "usr/bin/wall", "tmp", "dev", "dev/null", "dev/sda", "run", "run/fifo", "big"}
    assert (tree["etc"].mode, tree["etc"].gid) == (0o751, 4)
    assert (tree["etc/hostname"].data, tree["etc/hostname"].mode) == (b"box\n", 0o640)
    assert (tree["etc/hostname"].uid, tree["etc/hostname"].gid) == (1000, 1001)
    assert (tree["etc/localtime"].kind, tree["etc/localtime"].link) == ("symlink", "/usr/share/zoneinfo/UTC")
    assert tree["rel"].link == "../../../outside"  # verbatim: resolved only inside the container
    assert tree["usr/bin/sudo"].mode == 0o4755 and tree["usr/bin/wall"].mode == 0o2755
    assert tree["tmp"].mode == 0o1777
    assert (tree["dev/null"].kind, tree["dev/null"].dev) == ("char", (1, 3))
    assert (tree["dev/sda"].kind, tree["dev/sda"].dev, tree["dev/sda"].gid) == ("block", (8, 0), 6)
    assert tree["run/fifo"].kind == "fifo"
    assert tree["big"].data == b"\x00\xff" * 200_000
    # implicitly created parents get --defaults: root-owned 0755
    assert (tree["usr"].mode, tree["usr"].uid, tree["usr"].kind) == (0o755, 0, "dir")
    # squashfs-tools agrees on owners and modes
    listing = lln(image)
    assert listing["usr/bin/sudo"] == "-rwsr-xr-x 0/0"
    assert listing["etc/hostname"] == "-rw-r----- 1000/1001"
    assert listing["dev/null"].startswith("crw-rw-rw-")
    assert cat(image, "etc/hostname") == b"box\n"
    assert report.entries == 12 and report.content_bytes == 4 + 4 + 4 + 400_000  # written, not implied
    assert report.notes == []


def test_root_entry_sets_root_metadata(tmp_path):
    _, tree, _ = flatten(tmp_path, [d("./", mode=0o700, uid=7), f("x")])
    assert (tree["."].mode, tree["."].uid) == (0o700, 7)


def test_xattrs_are_kept_and_unsupported_namespaces_noted(tmp_path):
    capability = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    pax = {"SCHILY.xattr.user.color": "blue",
           "SCHILY.xattr.security.capability": capability.decode("utf-8", "surrogateescape"),
           "SCHILY.xattr.system.posix_acl_access": "acl"}
    report, tree, _ = flatten(tmp_path, [f("ping", "p", mode=0o755, pax=pax)])
    assert tree["ping"].xattrs == {"user.color": b"blue", "security.capability": capability}
    assert any("system.posix_acl_access" in note and "ping" in note for note in report.notes)


def test_names_are_canonical(tmp_path):
    report, tree, _ = flatten(tmp_path, [f("/abs", "a"), f("./dot/./x", "x"), f("double//slash", "s")])
    assert paths(tree) == {"abs", "dot", "dot/x", "double", "double/slash"}
    assert tree["abs"].data == b"a"
    assert report.notes == []


def test_long_names_and_non_ascii_names_round_trip(tmp_path):
    long_name = "/".join(["d" * 60] * 5) + "/file-" + "x" * 100
    _, tree, _ = flatten(tmp_path, [f(long_name, "L"), f("caf\u00e9/\u00fc", "u"), sym("s" * 120, "t" * 300)])
    assert tree[long_name].data == b"L"
    assert tree["caf\u00e9/\u00fc"].data == b"u"
    assert tree["s" * 120].link == "t" * 300


# --- overlay rules across layers ------------------------------------------------------------------

def test_upper_layer_replaces_same_path_and_keeps_lower_siblings(tmp_path):
    _, tree, _ = flatten(tmp_path,
                         [d("etc", mode=0o700), f("etc/a", "old a"), f("etc/b", "b")],
                         [d("etc", mode=0o755, uid=3), f("etc/a", "new a", mode=0o600)])
    assert tree["etc/a"].data == b"new a" and tree["etc/a"].mode == 0o600
    assert tree["etc/b"].data == b"b"
    assert (tree["etc"].mode, tree["etc"].uid) == (0o755, 3)  # the upper directory's metadata


def test_directory_implied_above_takes_metadata_from_below(tmp_path):
    _, tree, _ = flatten(tmp_path, [d("opt", mode=0o750, uid=9), f("opt/old", "o")], [f("opt/new", "n")])
    assert (tree["opt"].mode, tree["opt"].uid) == (0o750, 9)
    assert {tree["opt/old"].data, tree["opt/new"].data} == {b"o", b"n"}


def test_upper_non_directory_hides_lower_subtree(tmp_path):
    report, tree, _ = flatten(tmp_path,
                              [d("lib"), f("lib/x", "x"), d("lib/sub"), f("lib/sub/y", "y")],
                              [sym("lib", "usr/lib")])
    assert paths(tree) == {"lib"}
    assert tree["lib"].kind == "symlink"
    assert report.notes == []  # overlay semantics, nothing neutralized


def test_upper_directory_hides_lower_non_directory_with_note(tmp_path):
    report, tree, _ = flatten(tmp_path, [sym("a", "/etc")], [f("a/passwd", "mine")])
    assert tree["a"].kind == "dir" and tree["a/passwd"].data == b"mine"
    assert any("'a'" in note and "directory" in note for note in report.notes)


def test_whiteout_hides_file_and_subtree_of_lower_layers_only(tmp_path):
    report, tree, _ = flatten(tmp_path,
                              [f("keep", "k"), f("gone", "g"), d("dir"), f("dir/x", "x"), f("dir/y", "y")],
                              [f(".wh.gone"), f(".wh.dir"), f("dir2/.wh.nothing")],
                              [f("gone", "back")])
    assert paths(tree) == {"keep", "gone"}  # dir2 only ever held a whiteout
    assert tree["gone"].data == b"back"  # a layer above the whiteout brings it back
    assert not any(".wh." in path for path in tree)
    assert report.notes == []


def test_whiteout_does_not_hide_its_own_layer(tmp_path):
    _, tree, _ = flatten(tmp_path, [f("f", "lower")], [f(".wh.f"), f("f", "same layer")])
    assert tree["f"].data == b"same layer"


def test_whiteout_then_recreate_directory_drops_lower_children_and_metadata(tmp_path):
    _, tree, _ = flatten(tmp_path,
                         [d("d", mode=0o700), f("d/old", "o")],
                         [f(".wh.d")],
                         [f("d/new", "n")])
    assert paths(tree) == {"d", "d/new"}
    assert tree["d"].mode == 0o755  # re-created implicitly, not the whited-out 0700


def test_opaque_directory_hides_lower_children_but_keeps_its_own(tmp_path):
    report, tree, _ = flatten(tmp_path,
                              [d("etc", mode=0o711), f("etc/old", "o"), d("etc/sub"), f("etc/sub/z", "z"),
                               f("other", "x")],
                              [f("etc/.wh..wh..opq"), f("etc/new", "n")])
    assert paths(tree) == {"etc", "etc/new", "other"}
    assert tree["etc"].mode == 0o711  # D itself survives, with the lower metadata
    assert report.notes == []


def test_opaque_marker_alone_keeps_an_empty_directory(tmp_path):
    _, tree, _ = flatten(tmp_path, [d("cache", mode=0o750), f("cache/a", "a")], [f("cache/.wh..wh..opq")])
    assert paths(tree) == {"cache"}
    assert tree["cache"].mode == 0o750


def test_opaque_marker_without_lower_directory_creates_it(tmp_path):
    _, tree, _ = flatten(tmp_path, [f("x", "x")], [f("new/.wh..wh..opq")])
    assert tree["new"].kind == "dir"


def test_root_opaque_marker_hides_every_lower_layer(tmp_path):
    _, tree, _ = flatten(tmp_path, [f("a", "a"), d("b")], [f(".wh..wh..opq"), f("c", "c")])
    assert paths(tree) == {"c"}


def test_aufs_metadata_whiteouts_are_dropped_with_note(tmp_path):
    report, tree, _ = flatten(tmp_path, [f(".wh..wh.plnk/1.2"), f("x")])
    assert paths(tree) == {"x"}
    assert any(".wh..wh.plnk" in note for note in report.notes)


def test_entry_order_does_not_matter(tmp_path):
    _, tree, _ = flatten(tmp_path, [f("a/b/c", "c"), d("a/b", mode=0o700), d("a", mode=0o711), hard("h", "a/b/c")])
    assert (tree["a"].mode, tree["a/b"].mode, tree["a/b/c"].data) == (0o711, 0o700, b"c")


# --- duplicates inside one layer: tar semantics (a later entry replaces an earlier one) -----------

def test_later_duplicate_in_same_layer_wins(tmp_path):
    report, tree, _ = flatten(tmp_path, [f("x", "lower")],
                              [f("f", "first"), d("d", mode=0o700), f("f", "second", mode=0o600),
                               d("d", mode=0o750), f("x", "one"), f("x", "two")])
    assert (tree["f"].data, tree["f"].mode) == (b"second", 0o600)
    assert tree["d"].mode == 0o750
    assert tree["x"].data == b"two"
    assert sum("same layer replaces" in note for note in report.notes) == 3


def test_later_non_directory_replaces_earlier_directory_and_its_subtree(tmp_path):
    report, tree, _ = flatten(tmp_path, [f("a/x", "x"), f("a/y", "y"), sym("a", "/etc")])
    assert paths(tree) == {"a"}
    assert tree["a"].kind == "symlink"
    assert sum("replaces its parent" in note for note in report.notes) == 2


def test_duplicates_in_a_lower_layer_are_resolved_without_disturbing_upper_layers(tmp_path):
    _, tree, _ = flatten(tmp_path, [f("a", "1"), f("a", "2"), f("b", "b1")], [f("b", "top")])
    assert (tree["a"].data, tree["b"].data) == (b"2", b"top")


# --- hard links ---------------------------------------------------------------------------------

def test_hard_links_in_one_layer_share_an_inode(tmp_path):
    report, tree, _ = flatten(tmp_path, [f("usr/bin/perl", "perl", mode=0o755), hard("usr/bin/perl5", "usr/bin/perl"),
                                         hard("usr/bin/perl6", "./usr/bin/perl5")])
    group = {tree[name].inode_of for name in ("usr/bin/perl", "usr/bin/perl5", "usr/bin/perl6")}
    assert len(group) == 1 and group != {""}
    assert tree["usr/bin/perl6"].data == b"perl" and tree["usr/bin/perl6"].mode == 0o755
    assert report.notes == []


def test_hard_link_to_file_of_lower_layer_is_kept(tmp_path):
    _, tree, _ = flatten(tmp_path, [f("bin/true", "T")], [hard("bin/also-true", "bin/true")])
    assert tree["bin/also-true"].data == b"T"
    assert tree["bin/also-true"].inode_of == tree["bin/true"].inode_of != ""


@pytest.mark.parametrize("layers, why", [
    ([[hard("l", "../../etc/shadow")]], "outside"),
    ([[hard("l", "missing")]], "missing"),
    ([[sym("s", "/etc/passwd"), hard("l", "s")]], "symlink"),
    ([[d("dir"), hard("l", "dir")]], "dir"),
    ([[hard("l", "t"), f("t", "t")]], "missing"),
    ([[f("t", "t")], [f(".wh.t")], [hard("l", "t")]], "missing"),
    ([[hard("l", "l")]], "names"),
])
def test_invalid_hard_links_are_dropped_with_a_note(tmp_path, layers, why):
    report, tree, _ = flatten(tmp_path, *layers)
    assert "l" not in tree
    assert any("hard link 'l'" in note and why in note for note in report.notes), report.notes


# --- hostile input -------------------------------------------------------------------------------

def test_dot_dot_entries_are_dropped_with_a_note(tmp_path):
    report, tree, _ = flatten(tmp_path, [f("../../escape", "e"), f("a/../../b", "b"), f("ok", "ok")])
    assert paths(tree) == {"ok"}
    assert sum("'..'" in note for note in report.notes) == 2


def test_write_through_symlink_of_same_layer_is_dropped(tmp_path):
    report, tree, _ = flatten(tmp_path, [sym("etc", "/etc"), f("etc/passwd", "root::0:0::/:/bin/sh")])
    assert paths(tree) == {"etc"}
    assert any("etc/passwd" in note and "symlink" in note for note in report.notes)


def test_write_under_regular_file_is_dropped(tmp_path):
    report, tree, _ = flatten(tmp_path, [f("file", "f"), f("file/child", "c")])
    assert paths(tree) == {"file"}
    assert any("file/child" in note for note in report.notes)


def test_sparse_member_is_refused(tmp_path):
    raw = bytearray(layer_tar([f("sparse", "0123456789")]))
    # Turn the member into a GNU sparse one ('S').
    header = raw[512:1024] if raw[156:157] == b"x" else raw[0:512]
    offset = 512 if raw[156:157] == b"x" else 0
    header[156:157] = b"S"
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    raw[offset:offset + 512] = header
    with pytest.raises(ImageError, match="sparse"):
        flatten(tmp_path, write_layer(tmp_path, bytes(raw)))
    assert not (tmp_path / "image.sqfs").exists()


def test_pax_sparse_member_is_refused(tmp_path):
    sparse_map = b"1\n0\n10\n".ljust(512, b"\0")  # GNU sparse 1.0: one 10-byte extent at 0
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "sparse",
           "GNU.sparse.realsize": str(1 << 40)}
    raw = layer_tar([f("GNUSparseFile.0/sparse", sparse_map + b"0123456789", pax=pax)])
    with pytest.raises(ImageError, match="sparse"):
        flatten(tmp_path, write_layer(tmp_path, raw))


def test_plain_dot_wh_inside_a_name_is_not_a_whiteout(tmp_path):
    _, tree, _ = flatten(tmp_path, [f("dir.wh.x/file.wh.y", "ok")])
    assert tree["dir.wh.x/file.wh.y"].data == b"ok"


def test_content_limit(tmp_path):
    with pytest.raises(ImageError, match="larger than the limit of 1000 bytes"):
        flatten(tmp_path, [f("a", b"x" * 600), f("b", b"y" * 600)], max_content_bytes=1000)
    assert not (tmp_path / "image.sqfs").exists()


def test_entry_limit(tmp_path):
    with pytest.raises(ImageError, match="more than 50 entries"):
        flatten(tmp_path, [f(f"f{i}") for i in range(60)], max_entries=50)


def test_absurd_name_is_refused(tmp_path):
    with pytest.raises(ImageError, match="absurd"):
        flatten(tmp_path, [f("x" * 300)])
    with pytest.raises(ImageError, match="absurd"):
        flatten(tmp_path, [sym("s", "t" * 5000)])


def test_unknown_entry_type_is_refused(tmp_path):
    with pytest.raises(ImageError, match="unknown tar entry type"):
        flatten(tmp_path, [E("weird", b"Z")])


def test_truncated_gzip_layer_names_the_digest(tmp_path):
    good = write_layer(tmp_path, [f("a", os.urandom(100_000)), f("b", "b")])
    data = good.path.read_bytes()
    good.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as caught:
        flatten(tmp_path, good)
    assert str(good.digest) in caught.value.message
    assert not (tmp_path / "image.sqfs").exists()


def test_truncated_plain_layer_names_the_entry(tmp_path):
    raw = layer_tar([f("first", "1"), f("second", os.urandom(5000))])
    layer = write_layer(tmp_path, raw[:2048], compression="none")
    with pytest.raises(ImageError, match="truncated or corrupt after entry 'second'"):
        flatten(tmp_path, layer)


def test_corrupt_header_is_refused(tmp_path):
    raw = bytearray(layer_tar([f("first", "1"), f("second", "2")]))
    raw[1024 + 148:1024 + 156] = b"9999999\0"  # checksum of the second header
    with pytest.raises(ImageError, match="corrupt"):
        flatten(tmp_path, write_layer(tmp_path, bytes(raw), compression="none"))


def test_failure_removes_the_output(tmp_path):
    output = tmp_path / "image.sqfs"
    output.write_bytes(b"stale")
    with pytest.raises(ImageError):
        build_squashfs([write_layer(tmp_path, [E("x", b"Z")])], output)
    assert not output.exists()


def test_tar2sqfs_write_error_is_a_full_store_not_a_flattener_bug(tmp_path):
    """tar2sqfs says "I/O error" when its output cannot be written and removes the output
    before exiting, so the free space looks fine afterwards (issue 8, disk-full scenario)."""
    from berth.errors import StoreError
    from berth.image.squashfs import SquashfsWriter

    writer = SquashfsWriter.__new__(SquashfsWriter)
    writer.output = tmp_path / "image.sqfs"
    error = writer._failure(1, "data/big.bin: I/O error.")
    assert isinstance(error, StoreError) and "no space left" in error.message
    assert "prune" in error.hint


def _write_pausing(writer, until) -> None:
    """A tar stream of a few files into ``writer`` (a SquashfsWriter), pausing halfway until
    ``until()`` is true (30 s at most: a loaded machine)."""
    data = layer_tar([f(f"file{n}", os.urandom(200_000)) for n in range(8)])
    os.write(writer.stdin_fd, data[:len(data) // 2])
    deadline = time.monotonic() + 30
    while not until() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.write(writer.stdin_fd, data[len(data) // 2:])


def test_what_tar2sqfs_wrote_is_made_durable_while_it_writes(tmp_path, monkeypatch):
    # Issue 10, target 4: the store's fsync before publishing found the whole image to write;
    # the writer fdatasyncs the output while tar2sqfs runs, so that one finds little left.
    from berth.image import squashfs

    output = tmp_path / "image.sqfs"
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(squashfs.os, "fdatasync", lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd)))
    with squashfs.SquashfsWriter(output) as writer:
        _write_pausing(writer, lambda: synced)
        assert synced, "nothing was synced while tar2sqfs wrote"
        writer.finish()
    assert set(synced) == {output.stat().st_ino}
    assert not writer._writeback.is_alive()


@pytest.mark.parametrize("code, says", [("EIO", "a write error"), ("ENOSPC", "no space left")])
def test_a_failed_writeback_fails_the_conversion(tmp_path, monkeypatch, code, says):
    # Once an fsync has reported a write error, a later fsync of the file may not report it
    # again: the writer itself must fail, and leave no image to publish. A full disk says so
    # as tar2sqfs' own disk-full failure does.
    import errno

    from berth.image import squashfs

    def failing(fd: int) -> None:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(squashfs.os, "fdatasync", failing)
    output = tmp_path / "image.sqfs"
    with pytest.raises(StoreError) as raised:
        with squashfs.SquashfsWriter(output) as writer:
            _write_pausing(writer, lambda: writer._writeback_error is not None)
            writer.finish()
    assert raised.value.message.startswith(says) and str(tmp_path) in raised.value.message
    assert os.strerror(getattr(errno, code)) in raised.value.message
    assert ("prune" in raised.value.hint) == (code == "ENOSPC")
    assert not output.exists()


# --- inputs and options -----------------------------------------------------------------------------

def test_compression_is_detected_from_magic_bytes_not_media_type(tmp_path):
    plain = write_layer(tmp_path, [f("plain", "p")], compression="none")
    zstd = write_layer(tmp_path, [f("zstd", "z")], compression="zstd")
    gz = write_layer(tmp_path, [f("gz", "g")], compression="gzip")
    lying = type(gz)(gz.path, "application/vnd.docker.image.rootfs.diff.tar", gz.digest)
    _, tree, _ = flatten(tmp_path, plain, zstd, lying)
    assert {tree[name].data for name in ("plain", "zstd", "gz")} == {b"p", b"z", b"g"}


def test_zstd_layer_opening_with_a_skippable_frame_is_read_as_zstd(tmp_path):
    # RFC 8878 3.1.2: a zstd stream may begin with skippable (metadata) frames; the magic of
    # the first data frame comes only after it.
    data = layer_tar([f("after-skip", "s"), f("more", os.urandom(100_000))])
    frames = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    skippable = (0x184D2A5E).to_bytes(4, "little") + (6).to_bytes(4, "little") + b"berth!"
    assert tarstream.sniff_compression(skippable) == "zstd"
    assert tarstream.sniff_compression(data[:8]) is None
    path = tmp_path / "skip.zst"
    path.write_bytes(skippable + frames)
    layer = type(write_layer(tmp_path, [f("x", "x")]))(path, "application/vnd.oci.image.layer.v1.tar+zstd",
                                                       Digest.of(path.read_bytes()))
    _, tree, _ = flatten(tmp_path, layer)
    assert tree["after-skip"].data == b"s" and len(tree["more"].data) == 100_000


def test_python_gzip_fallback_reads_multi_member_gzip(tmp_path):
    data = layer_tar([f("a", os.urandom(300_000)), f("b", "b")])
    path = tmp_path / "multi.gz"
    path.write_bytes(gzip.compress(data[:7000]) + gzip.compress(data[7000:]) + b"\0" * 100)
    with tarstream.open_decompressed(path, "test", prefer_programs=False) as source:
        assert source.read(len(data) + 10) == data


def test_empty_layer_is_fine(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    from berth.image.flatten import Layer
    from berth.oci.digest import Digest
    _, tree, _ = flatten(tmp_path, [f("a", "a")], Layer(empty, "application/vnd.oci.image.layer.v1.tar",
                                                           Digest("sha256", "e" * 64)),
                         write_layer(tmp_path, gzip.decompress(gzip.compress(b"\0" * 1024))))
    assert paths(tree) == {"a"}


def test_unknown_compression_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="brotli"):
        flatten(tmp_path, [f("a")], compression="brotli")


@pytest.mark.parametrize("compression, code", [("lz4", 5), ("zstd", 6), ("gzip", 1), ("xz", 4), ("lzo", 3)])
def test_every_compression_builds(tmp_path, compression, code):
    _, tree, image = flatten(tmp_path, [f("a", b"abc" * 50_000)], compression=compression)
    assert tree["a"].data == b"abc" * 50_000
    header = image.read_bytes()[:96]
    assert header[:4] == b"hsqs"
    assert int.from_bytes(header[20:22], "little") == code  # the superblock's compressor id
    if compression in ("zstd", "gzip"):  # berth's fast levels, stored as compressor options
        assert int.from_bytes(header[24:26], "little") & 0x0400
        options = image.read_bytes()[96:104]
        assert int.from_bytes(options[2:6], "little") == {"zstd": 3, "gzip": 6}[compression]


def test_tar_to_squashfs_from_path_stream_and_gzip_stream(tmp_path):
    raw = layer_tar([f("./etc/passwd", "root"), f("../evil", "e"), f("dup", "1"), f("dup", "2")])
    source = tmp_path / "rootfs.tar"
    source.write_bytes(raw)
    for given in (source, io.BytesIO(raw), io.BytesIO(gzip.compress(raw))):
        output = tmp_path / "out.sqfs"
        report = tar_to_squashfs(given, output, compression="gzip")
        tree = read_tree(output)
        assert paths(tree) == {"etc", "etc/passwd", "dup"}
        assert tree["dup"].data == b"2"
        assert any("'..'" in note for note in report.notes)


def test_tar_to_squashfs_from_a_pipe_with_duplicates_says_why_it_cannot(tmp_path):
    raw = layer_tar([f("dup", "1"), f("dup", "2")])
    read_end, write_end = os.pipe()
    os.write(write_end, raw)
    os.close(write_end)
    with open(read_end, "rb") as pipe, pytest.raises(ImageError, match="cannot be read twice"):
        tar_to_squashfs(pipe, tmp_path / "out.sqfs", compression="gzip")
    assert not (tmp_path / "out.sqfs").exists()


def test_write_through_own_symlink_is_dropped_even_when_an_upper_layer_makes_a_directory_there(tmp_path):
    report, tree, _ = flatten(tmp_path, [sym("a", "/etc"), f("a/passwd", "evil")], [f("a/upper", "u")])
    assert paths(tree) == {"a", "a/upper"}
    assert tree["a"].kind == "dir"
    assert any("'a/passwd'" in note and "symlink" in note for note in report.notes)


@pytest.mark.parametrize("upper", [[f(".wh.t")], [f("t", "replaced")]], ids=["whited-out", "replaced"])
def test_hard_links_to_a_file_hidden_above_keep_its_content(tmp_path, upper):
    report, tree, _ = flatten(tmp_path, [f("t", "original", mode=0o750, uid=5), hard("l1", "t"), hard("l2", "t"),
                                         hard("l3", "l2")], upper)
    for name in ("l1", "l2", "l3"):
        assert (tree[name].data, tree[name].mode, tree[name].uid) == (b"original", 0o750, 5)
    assert tree["l1"].inode_of == tree["l2"].inode_of == tree["l3"].inode_of != ""
    assert tree.get("t") is None or tree["t"].data == b"replaced"
    assert any("'l1' became a copy of 't'" in note for note in report.notes)


def test_hard_link_to_an_entry_replaced_later_in_its_layer_keeps_the_old_content(tmp_path):
    _, tree, _ = flatten(tmp_path, [f("t", "old"), hard("l", "t"), f("t", "new")])
    assert (tree["l"].data, tree["t"].data) == (b"old", b"new")
    assert tree["l"].inode_of != tree["t"].inode_of or tree["l"].inode_of == ""


def test_hard_link_whose_own_path_is_hidden_does_not_carry_the_data(tmp_path):
    report, tree, _ = flatten(tmp_path, [f("t", "data"), hard("l1", "t"), hard("l2", "t")],
                              [f(".wh.t"), f(".wh.l1")])
    assert paths(tree) == {"l2"}
    assert tree["l2"].data == b"data"


def test_notes_escape_control_characters_in_hostile_names(tmp_path):
    report, tree, _ = flatten(tmp_path, [f("../\x1b[2Jgotcha", "x")])
    assert paths(tree) == set()
    assert len(report.notes) == 1
    assert "\x1b" not in report.notes[0] and "\\x1b[2Jgotcha" in report.notes[0]


def test_owner_beyond_32_bits_is_refused_not_truncated_to_root(tmp_path):
    with pytest.raises(ImageError, match="impossible owner 4294967296:0"):
        flatten(tmp_path, [f("fake-root", "x", uid=2**32)])


def test_device_number_beyond_linux_limits_is_refused(tmp_path):
    info = tarfile.TarInfo("dev/x")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 5000, 1
    raw = info.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
    with pytest.raises(ImageError, match="impossible device number 5000:1"):
        flatten(tmp_path, write_layer(tmp_path, raw, compression="none"))


def test_times_outside_32_bits_are_clamped(tmp_path):
    _, tree, _ = flatten(tmp_path, [f("future", "x", mtime=2**40), f("past", "y", mtime=-5), f("now", "z")])
    assert (tree["future"].mtime, tree["past"].mtime, tree["now"].mtime) == (2**32 - 1, 0, 1_700_000_000)


@pytest.mark.parametrize("program", ["igzip", "pigz", None], ids=["igzip", "pigz", "python-zlib"])
def test_every_gzip_decompressor_reads_layers_and_catches_truncation(tmp_path, monkeypatch, program):
    monkeypatch.setattr(tarstream, "decompressor", lambda kind, prefer_programs=True: program)
    payload = os.urandom(400_000)
    layer = write_layer(tmp_path, [f("a", payload), f("b", "b")])
    _, tree, _ = flatten(tmp_path, layer)
    assert (tree["a"].data, tree["b"].data) == (payload, b"b")
    layer.path.write_bytes(layer.path.read_bytes()[:200_000])
    with pytest.raises(ImageError) as caught:
        flatten(tmp_path, layer)
    assert str(layer.digest) in caught.value.message


def test_full_disk_is_a_store_error_and_leaves_nothing(tmp_path):
    if os.getuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        layer = write_layer(tmp_path, [f("a", os.urandom(3_000_000))])
        with pytest.raises(StoreError, match="no space left"):
            build_squashfs([layer], small / "image.sqfs")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_missing_output_directory_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="No such file or directory") as caught:
        build_squashfs([write_layer(tmp_path, [f("a")])], tmp_path / "absent" / "image.sqfs")
    assert "not writable" in caught.value.hint


def test_odd_whiteouts_and_root_entries_are_noted(tmp_path):
    report, tree, _ = flatten(tmp_path, [f("keep", "k"), f(".wh.keep2", "")],
                              [f("./", "a file where the root is"), f(".wh."), f(".wh..wh.aufs"), f("new", "n")])
    assert paths(tree) == {"keep", "new"}
    assert tree["."].kind == "dir"
    notes = "\n".join(report.notes)
    assert "dropped a file entry for the root directory" in notes
    assert "ignored '.wh.'" in notes and "ignored '.wh..wh.aufs'" in notes


def test_xz_layer_is_read_and_bzip2_layer_refused(tmp_path):
    import bz2
    import lzma
    from berth.image.flatten import Layer
    from berth.oci.digest import Digest
    raw = layer_tar([f("from-xz", "x")])
    xz_path, bz_path = tmp_path / "layer.xz", tmp_path / "layer.bz2"
    xz_path.write_bytes(lzma.compress(raw))
    bz_path.write_bytes(bz2.compress(raw))
    _, tree, _ = flatten(tmp_path, Layer(xz_path, "application/vnd.oci.image.layer.v1.tar", Digest("sha256", "a" * 64)))
    assert tree["from-xz"].data == b"x"
    with pytest.raises(ImageError, match="bzip2"):
        flatten(tmp_path, Layer(bz_path, "application/vnd.oci.image.layer.v1.tar", Digest("sha256", "b" * 64)))
