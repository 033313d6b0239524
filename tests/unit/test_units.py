"""The one size and duration grammar (config.units; docs/configuration.md "Sizes and durations").

Each rule of the table is tested once on the grammar and once through every option that takes
it (template ``memsz``/timeouts, ``berth run --memory``/``--stop-timeout``, ``berth submit
--mem``/``--time``), so that no option can drift from the table again (issue 9).
"""

from __future__ import annotations

import pytest

from berth.config.templates import parse_assignments
from berth.config.units import (
    MEMORY_MAX_BYTES,
    MEMORY_MIN_BYTES,
    format_clock,
    format_duration,
    format_size,
    parse_duration,
    parse_memory,
    parse_size,
)
from berth.errors import UsageError
from berth.jobs.options import parse_memory_bytes, parse_time_s
from berth.runtime.options import parse_run_options

GiB = 1 << 30


def _memsz(text: str) -> int:
    return parse_assignments(["image=busybox", "cpu=1", f"memsz={text}"], require=True)["memsz_bytes"]


def _memory(text: str) -> int:
    return parse_run_options([f"--memory={text}"]).memory_bytes


def _timeout(key: str, text: str) -> int:
    return parse_assignments([f"{key}={text}"], require=False)[f"{key}_s"]


def _stop(text: str) -> float:
    return parse_run_options([f"--stop-timeout={text}"]).stop_timeout_s


MEMORY_OPTIONS = {"memsz": _memsz, "--memory": _memory, "--mem": parse_memory_bytes}


@pytest.mark.parametrize("text,size", [
    ("4G", 4 * GiB), ("4GiB", 4 * GiB), ("4GB", 4 * GiB), ("4g", 4 * GiB), ("4gib", 4 * GiB), ("4 G", 4 * GiB),
    (" 4G ", 4 * GiB), ("1.5G", 1536 << 20), ("512M", 512 << 20), ("2048K", 2 << 20), ("1T", 1 << 40),
    ("1048576B", 1 << 20), ("1048576b", 1 << 20), ("0.5T", 512 * GiB), ("64T", 64 << 40),
])
@pytest.mark.parametrize("option", sorted(MEMORY_OPTIONS))
def test_every_memory_option_reads_units_the_same_binary_way(option, text, size):
    assert MEMORY_OPTIONS[option](text) == size


def test_a_number_without_unit_is_what_the_option_s_model_says():
    assert parse_memory_bytes("512") == 512 << 20  # sbatch --mem: megabytes
    assert _memory("2097152") == 2 << 20  # docker --memory: bytes
    with pytest.raises(UsageError) as caught:  # template memsz: refused as ambiguous
        _memsz("4096")
    assert caught.value.message == "bad value in 'memsz=4096': memsz '4096': no unit"
    assert "4096M or 4096G" in caught.value.hint


def test_a_bare_byte_count_below_the_minimum_says_the_unit_was_bytes():
    with pytest.raises(UsageError) as caught:
        _memory("4096")
    assert caught.value.message == ("--memory '4096': less than the minimum 1MiB "
                                    "(a number without a unit is bytes here, as in docker)")
    assert caught.value.hint == "write 4096M for 4096 MiB, or 4096G for 4096 GiB"


@pytest.mark.parametrize("text,reason", [
    ("G", "not a size"), ("4X", "not a size"), ("4GG", "not a size"), ("4 G B", "not a size"),
    ("1e3M", "not a size"), ("0x10M", "not a size"), (".5G", "not a size"), ("4G\n", "not a size"),
    ("-1G", "negative"), ("-0", "negative"), ("1" * 30 + "M", "not a size"), ("4096\u0663M", "not a size"),
    ("0M", "less than the minimum 1MiB"), ("1023K", "less than the minimum 1MiB"),
    ("65T", "more than the maximum 64TiB"), ("1P", "more than the maximum 64TiB"),
])
@pytest.mark.parametrize("option", sorted(MEMORY_OPTIONS))
def test_bad_sizes_are_refused_naming_the_option(option, text, reason):
    with pytest.raises(UsageError) as caught:
        MEMORY_OPTIONS[option](text)
    assert f"{option} '{text}': {reason}" in caught.value.message
    assert caught.value.hint


def test_empty_values_are_refused():
    for call, option in ((parse_memory_bytes, "--mem"), (_memory, "--memory"), (parse_time_s, "--time"), (_stop, "--stop-timeout")):
        with pytest.raises(UsageError, match=f"{option} '': not a"):
            call("")
    for key in ("memsz", "boot_timeout", "stop_timeout"):
        with pytest.raises(UsageError, match=f"'{key}=' has no value"):
            parse_assignments([f"{key}="], require=False)


def test_size_fractions_round_up_to_a_byte_and_bounds_are_inclusive():
    assert parse_size("1.5K", option="x", bare_unit=None) == 1536
    assert parse_size("0.0001K", option="x", bare_unit=None) == 1
    assert parse_memory("1M", option="x", bare_unit=None) == MEMORY_MIN_BYTES
    assert parse_memory("64TiB", option="x", bare_unit=None) == MEMORY_MAX_BYTES


def test_format_size_is_exact_and_parses_back():
    for size in (4 * GiB, 1536 << 20, 1000, 1 << 50, 3 << 29):
        assert parse_size(format_size(size), option="x", bare_unit=None) == size
    assert [format_size(n) for n in (4 * GiB, 1536 << 20, 1000, 1 << 50)] == ["4GiB", "1536MiB", "1000B", "1PiB"]


DURATION_OPTIONS = {
    "--time": parse_time_s,
    "boot_timeout": lambda text: _timeout("boot_timeout", text),
    "stop_timeout": lambda text: _timeout("stop_timeout", text),
    "--stop-timeout": _stop,
}


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90), ("5m", 300), ("5min", 300), ("1h", 3600), ("0.25h", 900), ("0.5m", 30), ("2 min", 120),
    ("10 seconds", 10), ("1H", 3600), ("5:30", 330), ("1:00:00", 3600), ("0:45", 45),
])
@pytest.mark.parametrize("option", sorted(DURATION_OPTIONS))
def test_every_duration_option_reads_units_and_clock_forms_the_same_way(option, text, seconds):
    assert DURATION_OPTIONS[option](text) == seconds


def test_a_bare_duration_is_minutes_only_for_sbatch_time():
    assert parse_time_s("30") == 1800
    assert (_timeout("boot_timeout", "30"), _timeout("stop_timeout", "30"), _stop("30")) == (30, 30, 30.0)


@pytest.mark.parametrize("text,seconds", [
    ("30", 1800), ("5:30", 330), ("1:00:00", 3600), ("2-0", 172800), ("1-02:03", 93780), ("1-02:03:04", 93784),
    ("0:04", 4), ("2d", 172800), ("365d", 365 * 86400),
])
def test_time_takes_every_sbatch_format(text, seconds):
    assert parse_time_s(text) == seconds


@pytest.mark.parametrize("text,reason", [
    ("abc", "not a duration"), ("1:2:3:4", "not a duration"), ("5 fortnights", "not a duration"),
    ("5m\n", "not a duration"), ("-5", "negative"), ("0.01m", "not a whole number of seconds"),
    ("0.5s", "not a whole number of seconds"), ("UNLIMITED", "not a duration"), ("1" * 40, "not a duration"),
])
@pytest.mark.parametrize("option", sorted(DURATION_OPTIONS))
def test_bad_durations_are_refused_naming_the_option(option, text, reason):
    with pytest.raises(UsageError) as caught:
        DURATION_OPTIONS[option](text)
    assert f"{option} '{text}': {reason}" in caught.value.message
    assert caught.value.hint


@pytest.mark.parametrize("option,text,reason", [
    ("--time", "0", "less than the minimum 1s"), ("--time", "366d", "more than the maximum 365d"),
    ("boot_timeout", "0", "less than the minimum 1s"), ("boot_timeout", "25h", "more than the maximum 1d"),
    ("stop_timeout", "2h", "more than the maximum 1h"), ("--stop-timeout", "61m", "more than the maximum 1h"),
])
def test_duration_bounds_are_per_option(option, text, reason):
    with pytest.raises(UsageError, match=f"{option} '{text}': {reason}"):
        DURATION_OPTIONS[option](text)


def test_run_stop_timeout_may_be_zero_and_defaults_to_ten_seconds():
    assert _stop("0") == 0.0
    assert parse_run_options([]).stop_timeout_s == 10.0


def test_duration_formats_parse_back():
    for seconds in (4, 59, 90, 3600, 5400, 93784, 86400 * 3):
        assert parse_duration(format_duration(seconds), option="x", bare_unit="s") == seconds
        assert parse_duration(format_clock(seconds), option="x", bare_unit="min") == seconds
    assert (format_clock(93784), format_clock(59), format_duration(7200)) == ("1-02:03:04", "00:00:59", "2h")
