"""berth.image.tarstream: the fast header parser must read exactly what tarfile reads, and
the byte source must hand member data over intact whichever path (buffer, splice) it takes."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from berth.image import tarstream

ATTRIBUTES = ("name", "mode", "uid", "gid", "size", "mtime", "type", "linkname", "devmajor", "devminor",
              "pax_headers", "offset", "offset_data", "uname", "gname")


def members(fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        def add(name, kind=tarfile.REGTYPE, data=b"", **attrs):
            info = tarfile.TarInfo(name)
            info.type = kind
            for key, value in attrs.items():
                setattr(info, key, value)
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(data) if data else None)
        add("./plain", data=b"x" * 700, mode=0o4755, uid=1000, gid=100, mtime=1_700_000_000, uname="u", gname="g")
        add("dir/", tarfile.DIRTYPE, mode=0o1777)
        add("link", tarfile.SYMTYPE, linkname="/etc/passwd")
        add("hard", tarfile.LNKTYPE, linkname="plain")
        add("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("blk", tarfile.BLKTYPE, devmajor=259, devminor=7)
        add("fifo", tarfile.FIFOTYPE)
        add("long/" + "n" * 150 + "/file", data=b"long name")
        if fmt != tarfile.USTAR_FORMAT:
            add("sym-long", tarfile.SYMTYPE, linkname="t" * 150)
        add("caf\u00e9", data=b"utf8")
        add("empty")
        if fmt != tarfile.USTAR_FORMAT:
            add("bigid", uid=3_000_000, gid=4_000_000, data=b"big ids")  # base-256 or pax
        if fmt == tarfile.PAX_FORMAT:
            add("xattr", data=b"x", pax_headers={"SCHILY.xattr.user.a": "1",
                                                 "SCHILY.xattr.security.capability": "\x01\x02"})
            add("frac", data=b"f", mtime=1_700_000_000.5)
            add("comment", data=b"c", pax_headers={"comment": "tarfile handles this one"})
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("use_fd", [True, False], ids=["fd", "fileobj"])
def test_iter_members_reads_what_tarfile_reads(tmp_path, fmt, use_fd):
    data = members(fmt)
    expected = list(tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape"))
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    with open(path, "rb", buffering=0) as raw:
        source = tarstream.ByteSource(fd=raw.fileno()) if use_fd else tarstream.ByteSource(io.BytesIO(data))
        got = []
        for info in tarstream.iter_members(source):
            got.append(info)
            if info.name == "plain":  # read half the data: the rest must be skipped correctly
                sink = tarstream.ByteSink(fileobj=io.BytesIO())
                source.copy_to(sink, 300)
    assert [info.name for info in got] == [info.name for info in expected]
    for mine, reference in zip(got, expected):
        for attribute in ATTRIBUTES:
            assert getattr(mine, attribute) == getattr(reference, attribute), (reference.name, attribute)


def test_copy_to_splices_large_members_intact(tmp_path):
    payload = os.urandom(3 << 20)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in (("small", b"s" * 100), ("large", payload), ("after", b"a")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    read_end, write_end = os.pipe()
    out_read, out_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # feed the pipe from a child, as the decompressor would
        os.close(read_end)
        os.write(write_end, data.getvalue())
        os._exit(0)
    os.close(write_end)
    collected = bytearray()
    sink = tarstream.ByteSink(fd=out_write)
    source = tarstream.ByteSource(fd=read_end)
    import threading
    drained = threading.Thread(target=lambda: collected.extend(iter_read(out_read)))
    drained.start()
    names = []
    for info in tarstream.iter_members(source):
        names.append(info.name)
        source.copy_to(sink, info.size)
    sink.flush()
    os.close(out_write)
    drained.join()
    os.waitpid(pid, 0)
    os.close(read_end)
    assert names == ["small", "large", "after"]
    assert bytes(collected) == b"s" * 100 + payload + b"a"


def iter_read(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


@pytest.mark.parametrize("name, expected", [
    ("./usr//bin/./ls", "usr/bin/ls"), ("/etc/", "etc"), (".", ""), ("./", ""), ("a/b", "a/b"),
])
def test_canonical_name(name, expected):
    assert tarstream.canonical_name(name) == expected


@pytest.mark.parametrize("name", ["../x", "a/../../b", "a/..", ".."])
def test_canonical_name_rejects_dot_dot(name):
    with pytest.raises(tarstream.NameRejected):
        tarstream.canonical_name(name)


def test_fast_ustar_header_equals_tarfile_output():
    info = tarfile.TarInfo("usr/bin/thing")
    info.size, info.mode, info.uid, info.gid, info.mtime = 12345, 0o4755, 7, 8, 1_700_000_000
    info.uname = info.gname = ""
    assert tarstream.fast_ustar_header(info) == info.tobuf(tarfile.USTAR_FORMAT)
    info.type, info.size, info.linkname = tarfile.SYMTYPE, 0, "../lib/x"
    assert tarstream.fast_ustar_header(info) == info.tobuf(tarfile.USTAR_FORMAT)
    info.type, info.linkname, info.devmajor, info.devminor = tarfile.CHRTYPE, "", 1, 3
    assert tarstream.fast_ustar_header(info) == info.tobuf(tarfile.USTAR_FORMAT)
    info.name = "n" * 101  # too long for plain ustar: the caller falls back to tarfile's PAX
    assert tarstream.fast_ustar_header(info) is None


@pytest.mark.parametrize("header", [bytes(512), b"\xff" * 512, bytes(range(256)) * 2,
                                    bytes((i * 7919) % 256 for i in range(512))])
def test_header_checksum_is_the_byte_sum_with_the_field_as_spaces(header):
    # Adler-32 pieces stand for Python's sum (issue 10): exact at the extremes, all 0xff too.
    assert tarstream.header_checksum(header) == sum(header[:148]) + 8 * 0x20 + sum(header[156:])


@pytest.mark.parametrize("name, kind, attrs", [
    ("d", tarfile.DIRTYPE, {"mode": 0o1777}),
    ("d/", tarfile.DIRTYPE, {}),
    ("n" * 99, tarfile.DIRTYPE, {}),  # 100 with the slash: still plain ustar
    ("f", tarfile.REGTYPE, {"size": 8**11 - 1, "mtime": 8**11 - 1, "uid": 8**7 - 1, "gid": 8**7 - 1}),
    ("dev/null", tarfile.CHRTYPE, {"devmajor": 8**7 - 1, "devminor": 3}),
    ("dev/sda", tarfile.BLKTYPE, {"devmajor": 8, "devminor": 0}),
    ("fifo", tarfile.FIFOTYPE, {"mode": 0o644}),
    ("l", tarfile.SYMTYPE, {"linkname": "t" * 100}),
    ("h", tarfile.LNKTYPE, {"linkname": "f"}),
    ("f", tarfile.REGTYPE, {"mtime": 1_700_000_000.75, "mode": 0o106755}),
])
def test_ustar_header_equals_tarfile_output(name, kind, attrs):
    info = tarfile.TarInfo(name)
    info.type, info.uname, info.gname = kind, "", ""
    for key, value in attrs.items():
        setattr(info, key, value)
    expected = info.tobuf(tarfile.USTAR_FORMAT)
    assert tarstream.ustar_header(info.name, info.type, info.mode, info.uid, info.gid, info.size, info.mtime,
                                  info.linkname, info.devmajor, info.devminor) == expected
    assert tarstream.fast_ustar_header(info) == expected


@pytest.mark.parametrize("attrs", [
    {"size": 8**11}, {"uid": 8**7}, {"mtime": -1}, {"devmajor": 8**7}, {"name": "n" * 101},
    {"name": "caf\u00e9"}, {"linkname": "t" * 101}, {"uname": "root"},
])
def test_fast_ustar_header_leaves_what_does_not_fit_to_tarfile(attrs):
    info = tarfile.TarInfo("f")
    info.uname = info.gname = ""
    for key, value in attrs.items():
        setattr(info, key, value)
    assert tarstream.fast_ustar_header(info) is None


@pytest.mark.parametrize("kind, attrs, xattrs", [
    (tarfile.REGTYPE, {"size": 700, "mode": 0o104755, "mtime": 2**33, "uname": "u", "gname": "g"}, None),
    (tarfile.REGTYPE, {"size": 5, "mtime": -5.5}, {"user.a": "1"}),  # pax: tarfile's writer
    (tarfile.SYMTYPE, {"linkname": "x" * 200}, None),  # too long for ustar: tarfile's writer
    (tarfile.DIRTYPE, {"mode": 0o2755}, None),
    (tarfile.CHRTYPE, {"devmajor": 1, "devminor": 5}, None),
])
def test_write_output_writes_what_output_info_and_write_member_write(kind, attrs, xattrs):
    # The hot path builds the header without an output TarInfo (issue 10): same bytes out.
    source = tarfile.TarInfo("in")
    source.type = kind
    for key, value in attrs.items():
        setattr(source, key, value)
    data = b"d" * source.size if kind == tarfile.REGTYPE else b""
    linkname = source.linkname if kind == tarfile.SYMTYPE else ""
    outputs = []
    for fast in (True, False):
        out = io.BytesIO()
        sink = tarstream.ByteSink(fileobj=out)
        reader = tarstream.ByteSource(io.BytesIO(data))
        if fast:
            tarstream.write_output(sink, source, "out/name", linkname=linkname, xattrs=xattrs, data=reader)
        else:
            tarstream.write_member(sink, tarstream.output_info(source, "out/name", linkname=linkname,
                                                               xattrs=xattrs), reader)
        sink.flush()
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) % 512 == 0 and data in outputs[0]


@pytest.mark.parametrize("path, components, too_long", [
    ("\U0001f600" * 63, True, False),  # the longest short name: 252 bytes
    ("\U0001f600" * 64, True, True),  # 256 bytes in one component
    ("a" * 255, True, False), ("a" * 256, True, True), ("a" * 256, False, False),
    ("a/" * 2048, True, False), ("a/" * 2049, False, True),
    ("\udcff" * 64, True, False),  # undecodable bytes: one byte each
])
def test_check_name_length_limits(path, components, too_long):
    assert (tarstream.check_name_length(path, components=components) is not None) is too_long


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE])
def test_huge_extension_header_is_refused_before_it_is_read(kind):
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, 1 << 40  # a terabyte of "long name"
    source = tarstream.ByteSource(io.BytesIO(info.tobuf(tarfile.GNU_FORMAT) + bytes(4096)))
    with pytest.raises(tarstream.ExtensionTooLarge, match="1099511627776 bytes"):
        list(tarstream.iter_members(source))


@pytest.mark.parametrize("via", ["file", "pipe", "fileobj"])
def test_skipping_large_members_lands_on_the_next_header(tmp_path, via):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, size in (("big", 3 << 20), ("next", 10), ("big2", 200_000), ("last", 3)):
            info = tarfile.TarInfo(name)
            info.size = size
            archive.addfile(info, io.BytesIO(os.urandom(size)))
    raw = data.getvalue()
    path = tmp_path / "t.tar"
    path.write_bytes(raw)
    if via == "file":
        handle = open(path, "rb", buffering=0)
        source = tarstream.ByteSource(fd=handle.fileno())
    elif via == "pipe":
        handle = open(path, "rb", buffering=0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.write(write_end, raw)
            os._exit(0)
        os.close(write_end)
        source = tarstream.ByteSource(fd=read_end)
    else:
        handle = io.BytesIO(raw)
        source = tarstream.ByteSource(handle)
    names = [info.name for info in tarstream.iter_members(source)]  # data never read: skipped
    assert names == ["big", "next", "big2", "last"]
    if via == "pipe":
        os.waitpid(pid, 0)
        os.close(read_end)
    handle.close()


def test_truncated_plain_file_is_detected_when_skipping(tmp_path):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("big")
        info.size = 1 << 20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    path = tmp_path / "t.tar"
    path.write_bytes(data.getvalue()[:600_000])
    with open(path, "rb", buffering=0) as handle, pytest.raises(EOFError):
        list(tarstream.iter_members(tarstream.ByteSource(fd=handle.fileno())))
