"""The ``DT_SONAME`` of a shared library, read from its ELF headers without loading it.

Used on the host's libraries and on the image's (hostile input): every offset and size is
checked against the file and against small limits before it is read, nothing is mapped, and a
file that is not a well-formed ELF shared object gives None, never an exception. Both classes
(32- and 64-bit) and both byte orders are read, through the section headers (System V ABI,
"Sections" and "Dynamic Section"): the ``SHT_DYNAMIC`` section, its ``DT_SONAME`` entry and the
string table that the section's ``sh_link`` names. Stripped libraries keep these sections.
"""

from __future__ import annotations

import os
import struct

ELF_MAGIC = b"\x7fELF"
_SHT_DYNAMIC = 6
_DT_NULL = 0
_DT_SONAME = 14
MAX_SECTIONS = 4096
MAX_DYNAMIC_BYTES = 64 << 10
MAX_NAME_BYTES = 256

#: (class, data) -> (section header format, dynamic entry format, e_shoff offset, e_shentsize offset)
_LAYOUTS = {
    (1, 1): ("<IIIIIIIIII", "<iI", 32, 46),
    (1, 2): (">IIIIIIIIII", ">iI", 32, 46),
    (2, 1): ("<IIQQQQIIQQ", "<qQ", 40, 58),
    (2, 2): (">IIQQQQIIQQ", ">qQ", 40, 58),
}


def soname_of_fd(fd: int) -> str | None:
    """The SONAME of the open regular file ``fd``, or None (not ELF, no SONAME, malformed)."""
    try:
        size = os.fstat(fd).st_size
        header = os.pread(fd, 64, 0)
    except OSError:
        return None
    if len(header) < 52 or not header.startswith(ELF_MAGIC):
        return None
    layout = _LAYOUTS.get((header[4], header[5]))
    if layout is None:
        return None
    section_format, entry_format, shoff_at, shentsize_at = layout
    order = section_format[0]
    (shoff,) = struct.unpack_from(order + ("Q" if header[4] == 2 else "I"), header, shoff_at)
    shentsize, shnum = struct.unpack_from(order + "HH", header, shentsize_at)
    section = struct.Struct(section_format)
    if not 0 < shnum <= MAX_SECTIONS or shentsize < section.size or shoff + shnum * shentsize > size:
        return None
    try:
        table = os.pread(fd, shnum * shentsize, shoff)
    except OSError:
        return None
    if len(table) < shnum * shentsize:
        return None
    sections = [section.unpack_from(table, index * shentsize) for index in range(shnum)]
    entry = struct.Struct(entry_format)
    for _, kind, _, _, offset, length, link, _, _, _ in sections:
        if kind != _SHT_DYNAMIC or link >= shnum:
            continue
        if offset + length > size or length > MAX_DYNAMIC_BYTES:
            return None
        try:
            dynamic = os.pread(fd, length, offset)
        except OSError:
            return None
        strtab = sections[link]
        for index in range(len(dynamic) // entry.size):
            tag, value = entry.unpack_from(dynamic, index * entry.size)
            if tag == _DT_NULL:
                break
            if tag != _DT_SONAME:
                continue
            strtab_offset, strtab_size = strtab[4], strtab[5]
            if value >= strtab_size or strtab_offset + strtab_size > size:
                return None
            try:
                raw = os.pread(fd, min(MAX_NAME_BYTES, strtab_size - value), strtab_offset + value)
            except OSError:
                return None
            name, nul, _ = raw.partition(b"\0")
            if not nul or not name:
                return None
            return name.decode("ascii", "replace")
        return None
    return None


def soname(path: str) -> str | None:
    """The SONAME of the library at host ``path`` (the last component is not followed: callers
    resolve links themselves, in-root for an image), or None when it has none or is no file."""
    from berth.untrusted import open_regular_file

    fd = open_regular_file(path)
    if fd is None:
        return None
    try:
        return soname_of_fd(fd)
    finally:
        os.close(fd)
