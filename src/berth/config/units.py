"""Sizes and durations as admins and users write them (``4G``, ``512MiB``, ``90s``, ``2h``).

Pure functions; they raise ``ValueError`` with a message naming the offending text, and
callers wrap it in the error type that names the key or option it came from.

Sizes are binary, as Slurm's ``--mem`` and NQSV's ``memsz`` are: ``K``/``KiB`` = 1024 bytes,
``M``/``MiB`` = 1024² and so on. A unit is required: a bare ``4096`` is refused because
people read it as bytes, KiB or MiB depending on the tool they last used.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP])(?:i?B)?\s*$", re.IGNORECASE)
_BYTES = re.compile(r"^\s*([0-9]+)\s*B\s*$", re.IGNORECASE)
_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4, "P": 5}

_DURATION = re.compile(r"^\s*([0-9]+)\s*(s|sec|m|min|h)?\s*$", re.IGNORECASE)
_SECONDS_PER = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_size_bytes(text: str) -> int:
    """``"4G"``, ``"4GiB"``, ``"512M"``, ``"1.5T"``, ``"1024B"`` -> bytes (binary units).

    Raises ValueError for anything else, including a number without a unit.
    """
    match = _BYTES.match(text)
    if match:
        return int(match.group(1))
    match = _SIZE.match(text)
    if not match:
        if re.fullmatch(r"\s*[0-9]+\s*", text):
            raise ValueError(f"'{text}' has no unit: write e.g. {text.strip()}M or {text.strip()}G "
                             "(K, M, G, T; powers of 1024)")
        raise ValueError(f"'{text}' is not a size: write a number and a unit, e.g. 512M, 4G, 4GiB, 1T")
    number, unit = match.groups()
    return int(round(float(number) * 1024 ** _POWERS[unit.upper()]))


def format_size(size_bytes: int) -> str:
    """The shortest exact binary form: 4294967296 -> ``4GiB``; 1000 -> ``1000B``."""
    for unit, power in (("PiB", 5), ("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        scale = 1024 ** power
        if size_bytes >= scale and size_bytes % scale == 0:
            return f"{size_bytes // scale}{unit}"
    return f"{size_bytes}B"


def parse_duration_s(text: str) -> int:
    """``"300"``, ``"300s"``, ``"5m"``, ``"2h"`` -> whole seconds. Raises ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a duration: write whole seconds (300) or use s, m, h (5m, 2h)")
    number, unit = match.groups()
    return int(number) * _SECONDS_PER[(unit or "").lower()]
