"""Sizes and durations: the one grammar for every option and key that takes one.

docs/configuration.md "Sizes and durations" is the table users read; this module is its only
implementation (issue 9: the template, ``berth run`` and ``berth submit`` each had their own).

**Sizes** are a number (``4``, ``1.5``) and an optional unit: ``B``; ``K``, ``M``, ``G``, ``T``,
``P``, each also written ``KB``/``KiB`` and so on, any case. Every unit is binary (``1G`` =
``1GiB`` = 1024³ bytes), as Slurm and docker read them; there are no powers of 1000. What a
number *without* a unit means is the option's, and the caller states it (``bare_unit``):

- ``"M"``: sbatch's ``--mem`` (no unit means megabytes);
- ``"B"``: docker's ``--memory`` of ``berth run`` (no unit means bytes);
- ``None``: a unit is required (template ``memsz``: people read a bare ``4096`` as bytes, KiB or
  MiB depending on the tool they last used).

Every memory size is between :data:`MEMORY_MIN_BYTES` and :data:`MEMORY_MAX_BYTES`.

**Durations** are whole seconds written either as a number and an optional unit (``90s``,
``5m``, ``1.5h``, ``2d``; ``sec``, ``min``, ``hour``, ``day`` and plurals are accepted too) or in
sbatch's clock forms ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``. A bare number
is minutes for sbatch's ``-t/--time`` and seconds everywhere else (``bare_unit``).

Functions are pure; patterns compile lazily (``re``'s cache: nothing at import, start-up time
counts). Bad input raises :class:`~berth.errors.UsageError` whose message names the option or
key (``--mem '4X': not a size``) and whose hint shows what is accepted.
"""

from __future__ import annotations

import re

from berth.errors import UsageError

MEMORY_MIN_BYTES = 1 << 20  # 1 MiB: less is a typo (a unit forgotten), never a real limit
MEMORY_MAX_BYTES = 64 << 40  # 64 TiB per node: catches 4T typed for 4G
#: Grace between SIGTERM and SIGKILL (template ``stop_timeout``, ``berth run --stop-timeout``).
STOP_TIMEOUT_MAX_S = 3600

_POWERS = {"": None, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
# Digits are bounded so that no number overflows or takes long to convert (int's 4300-digit limit).
_NUMBER = r"([0-9]{1,18}(?:\.[0-9]{1,9})?)"
_SIZE = _NUMBER + r"\s*(?:([bB])|([kKmMgGtTpP])(?:[iI]?[bB])?)?"
_SIZE_HINT = {
    "M": "write a number and a unit, e.g. 512M, 4G, 4GiB (K, M, G, T; powers of 1024); no unit means M, as sbatch",
    "B": "write a number and a unit, e.g. 512M, 4G, 4GiB (K, M, G, T; powers of 1024); no unit means bytes, as docker",
    None: "write a number and a unit, e.g. 512M, 4G, 4GiB (K, M, G, T; powers of 1024)",
}

_SECONDS_PER = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
_DURATION = _NUMBER + r"\s*([a-zA-Z]*)"
_CLOCK = r"(?:([0-9]{1,9})-)?([0-9]{1,9})(?::([0-9]{1,9}))?(?::([0-9]{1,9}))?"
_DURATION_HINT = {
    "s": "write seconds (90), a unit (90s, 5m, 2h, 1d) or a clock time (MM:SS, HH:MM:SS, D-HH:MM:SS)",
    "min": "write minutes (30), a unit (90s, 5m, 2h, 1d) or a clock time (MM:SS, HH:MM:SS, D-HH:MM:SS), as sbatch",
}


def parse_size(text: str, *, option: str, bare_unit: str | None,
               minimum_bytes: int = 1, maximum_bytes: int | None = None) -> int:
    """A size -> bytes (module docstring). ``option`` names the option or key in messages.

    ``bare_unit`` is ``"M"``, ``"B"`` or ``None`` (a unit is required). Fractions are rounded
    to whole bytes. Raises UsageError for anything else, and below ``minimum_bytes`` or above
    ``maximum_bytes``.
    """
    stripped = text.strip(" ")  # spaces only: a newline or a tab in a value is a mistake
    match = re.fullmatch(_SIZE, stripped)
    if not match:
        reason = "negative" if stripped.startswith("-") else "not a size"
        raise UsageError(f"{option} '{text}': {reason}", hint=_SIZE_HINT[bare_unit])
    number, byte_unit, unit = match.groups()
    bare = byte_unit is None and unit is None
    if bare:
        if bare_unit is None:
            raise UsageError(f"{option} '{text}': no unit",
                             hint=f"write e.g. {number}M or {number}G (K, M, G, T; powers of 1024): "
                             "a number alone is ambiguous here")
        unit = bare_unit
    whole, exact = _scaled(number, 1024 ** _POWERS[(byte_unit or unit).lower()])
    size = whole if exact else whole + 1  # a fraction of a byte rounds up: never a zero limit
    if size < minimum_bytes:
        if bare and unit == "B":
            raise UsageError(f"{option} '{text}': less than the minimum {format_size(minimum_bytes)} "
                             "(a number without a unit is bytes here, as in docker)",
                             hint=f"write {number}M for {number} MiB, or {number}G for {number} GiB")
        raise UsageError(f"{option} '{text}': less than the minimum {format_size(minimum_bytes)}",
                         hint=_SIZE_HINT[bare_unit])
    if maximum_bytes is not None and size > maximum_bytes:
        raise UsageError(f"{option} '{text}': more than the maximum {format_size(maximum_bytes)}",
                         hint="check the value for a typo")
    return size


def parse_memory(text: str, *, option: str, bare_unit: str | None) -> int:
    """A memory size (``--mem``, ``--memory``, ``memsz``) -> bytes, within 1 MiB to 64 TiB."""
    return parse_size(text, option=option, bare_unit=bare_unit,
                      minimum_bytes=MEMORY_MIN_BYTES, maximum_bytes=MEMORY_MAX_BYTES)


def format_size(size_bytes: int) -> str:
    """The shortest exact binary form: 4294967296 -> ``4GiB``; 1000 -> ``1000B``."""
    for unit, power in (("PiB", 5), ("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        scale = 1024**power
        if size_bytes >= scale and size_bytes % scale == 0:
            return f"{size_bytes // scale}{unit}"
    return f"{size_bytes}B"


def human_size(size_bytes: int | float) -> str:
    """For people, rounded: ``512 B``, ``1.5 KiB``, ``4.0 GiB`` (progress, summaries; not parsed back)."""
    size = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def parse_duration(text: str, *, option: str, bare_unit: str,
                   minimum_s: int = 1, maximum_s: int | None = None) -> int:
    """A duration -> whole seconds (module docstring). ``option`` names the option or key.

    ``bare_unit`` is ``"s"`` or ``"min"`` (sbatch's ``--time``). Raises UsageError for anything
    else, for a value that is not a whole number of seconds, and outside the bounds.
    """
    stripped = text.strip(" ")  # spaces only: a newline or a tab in a value is a mistake
    hint = _DURATION_HINT[bare_unit]
    seconds: int | None = None
    clock = re.fullmatch(_CLOCK, stripped)
    if clock and (clock.group(1) is not None or clock.group(3) is not None):
        days, first, second, third = (int(g) if g is not None else None for g in clock.groups())
        if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
        elif third is not None:  # HH:MM:SS
            seconds = first * 3600 + second * 60 + third
        else:  # MM:SS
            seconds = first * 60 + second
    else:
        match = re.fullmatch(_DURATION, stripped)
        if match:
            number, unit = match.groups()
            scale = _SECONDS_PER.get(unit.lower()) if unit else (60 if bare_unit == "min" else 1)
            if scale is not None:
                seconds, exact = _scaled(number, scale)
                if not exact:
                    raise UsageError(f"{option} '{text}': not a whole number of seconds", hint=hint)
    if seconds is None:
        reason = "negative" if stripped.startswith("-") else "not a duration"
        raise UsageError(f"{option} '{text}': {reason}", hint=hint)
    if seconds < minimum_s:
        raise UsageError(f"{option} '{text}': less than the minimum {format_duration(minimum_s)}", hint=hint)
    if maximum_s is not None and seconds > maximum_s:
        raise UsageError(f"{option} '{text}': more than the maximum {format_duration(maximum_s)}",
                         hint="check the value for a typo")
    return seconds


def format_duration(seconds: int) -> str:
    """Short human form: 0 -> ``0s``, 90 -> ``90s``, 300 -> ``5m``, 7200 -> ``2h``, 86400 -> ``1d``."""
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale and seconds % scale == 0:
            return f"{seconds // scale}{unit}"
    return f"{seconds}s"


def _scaled(number: str, scale: int) -> tuple[int, bool]:
    """``number`` (digits, maybe one '.') times ``scale``, exactly: (whole part, no remainder)."""
    whole, _, fraction = number.partition(".")
    numerator = int(whole + fraction) * scale
    quotient, remainder = divmod(numerator, 10 ** len(fraction))
    return quotient, remainder == 0


def format_clock(seconds: int) -> str:
    """Seconds -> sbatch's ``HH:MM:SS``, or ``D-HH:MM:SS`` from a day on."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{text}" if days else text
