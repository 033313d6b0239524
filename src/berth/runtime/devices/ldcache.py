"""The host's ld.so cache (``/etc/ld.so.cache``), read directly: soname -> library path.

This is what the dynamic loader itself consults, so a driver library is found where the host's
programs find it (NVIDIA installs to distribution-specific directories). Reading the file costs
a fraction of a millisecond; running ``ldconfig -p`` would cost a process per container.

Format (glibc elf/dl-cache.h, the "new" format written alone since glibc 2.32, or after the old
``ld.so-1.7.0`` table before that): a 48-byte header ``glibc-ld.so.cache1.1``, ``nlibs``,
``len_strings``, flags, extension offset; then ``nlibs`` 24-byte entries (flags int32, key and
value offsets uint32, osversion uint32, hwcap uint64) whose offsets count from the header's
start. Entries of other architectures (32-bit libraries on a 64-bit host) are skipped by their
flags. A file that does not parse is an error naming it.
"""

from __future__ import annotations

import os
import struct

from berth.errors import ConfigError

OLD_MAGIC = b"ld.so-1.7.0"
NEW_MAGIC = b"glibc-ld.so.cache1.1"
_NEW_HEADER = struct.Struct("<20sIIB3xI12x")  # magic+version, nlibs, len_strings, flags, ext offset
_NEW_ENTRY = struct.Struct("<iIIIQ")
_OLD_ENTRY_SIZE = 12
MAX_CACHE_BYTES = 64 << 20

#: FLAG_ELF_LIBC6 plus the architecture's "required" bits (dl-cache.h) per machine.
_LIBC6 = 0x0003
_ARCH_FLAGS = {"x86_64": 0x0300, "aarch64": 0x0A00, "ppc64le": 0x0500, "ppc64": 0x0500, "s390x": 0x0400,
               "riscv64": 0x1000}


def _hint(path: str) -> str:
    return f"ask your site administrator (devices.ld_cache = {path}; `ldconfig` rebuilds it)"


def _string(data: bytes, offset: int, path: str) -> str:
    end = data.find(b"\0", offset)
    if offset >= len(data) or end < 0:
        raise ConfigError(f"ld.so cache {path}: a string offset points outside the file", hint=_hint(path))
    return data[offset:end].decode("utf-8", "replace")


def parse(data: bytes, path: str, machine: str | None = None) -> dict[str, str]:
    """soname -> library path for ``machine`` (default: this host's), first entry winning as
    for the loader. Raises ConfigError for a file that is not an ld.so cache."""
    start = 0
    if data.startswith(OLD_MAGIC):
        if len(data) < 16:
            raise ConfigError(f"ld.so cache {path} is truncated", hint=_hint(path))
        (old_count,) = struct.unpack_from("<I", data, 12)
        start = 16 + old_count * _OLD_ENTRY_SIZE
        start = (start + 7) & ~7  # ALIGN_CACHE: the new table follows at 8-byte alignment
    if data[start:start + len(NEW_MAGIC)] != NEW_MAGIC:
        raise ConfigError(f"ld.so cache {path} is not in glibc's format (glibc-ld.so.cache1.1)", hint=_hint(path))
    if len(data) < start + _NEW_HEADER.size:
        raise ConfigError(f"ld.so cache {path} is truncated", hint=_hint(path))
    _, count, _, _, _ = _NEW_HEADER.unpack_from(data, start)
    if start + _NEW_HEADER.size + count * _NEW_ENTRY.size > len(data):
        raise ConfigError(f"ld.so cache {path} is truncated ({count} entries announced)", hint=_hint(path))
    wanted = _ARCH_FLAGS.get(machine or os.uname().machine)
    found: dict[str, str] = {}
    base = data[start:]
    for index in range(count):
        flags, key, value, _, _ = _NEW_ENTRY.unpack_from(data, start + _NEW_HEADER.size + index * _NEW_ENTRY.size)
        if flags & 0xFF != _LIBC6 or (wanted is not None and flags & 0xFF00 != wanted):
            continue
        name = _string(base, key, path)
        found.setdefault(name, _string(base, value, path))
    return found


def read(path: str) -> dict[str, str]:
    """The host's sonames from the cache file ``path``. Raises ConfigError."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CACHE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the ld.so cache {path}: {exc.strerror}", hint=_hint(path)) from None
    if len(data) > MAX_CACHE_BYTES:
        raise ConfigError(f"ld.so cache {path} is larger than {MAX_CACHE_BYTES >> 20} MiB", hint=_hint(path))
    return parse(data, path)


def find(libraries: dict[str, str], wanted) -> list[tuple[str, str]]:
    """(soname, path) for every wanted name present: exact sonames, or a prefix before a
    trailing '*' (``libnvidia-gpucomp.so.*``), in the order asked, each soname once."""
    found: dict[str, str] = {}
    for name in wanted:
        if name.endswith("*"):
            prefix = name[:-1]
            for soname in sorted(libraries):
                if soname.startswith(prefix):
                    found.setdefault(soname, libraries[soname])
        elif name in libraries:
            found.setdefault(name, libraries[name])
    return list(found.items())
