"""The compiled front end writes text as berth.cli.output.printable does: its table of the
characters above U+00FF that are escaped is Python's own rule, derived again here."""

import re
import unicodedata
from pathlib import Path

FRONT = Path(__file__).resolve().parents[2] / "src" / "berth" / "runtime" / "init" / "berth-front.c"


def python_ranges() -> list[tuple[int, int]]:
    """Assigned code points above U+00FF that str.isprintable() rejects, as closed ranges."""
    ranges: list[tuple[int, int]] = []
    start = None
    for point in range(0x100, 0x110001):
        escaped = point <= 0x10FFFF and not chr(point).isprintable() and unicodedata.category(chr(point)) != "Cn"
        if escaped and start is None:
            start = point
        elif not escaped and start is not None:
            ranges.append((start, point - 1))
            start = None
    return ranges


def test_the_front_ends_table_is_pythons_rule():
    source = FRONT.read_text()
    body = source[source.index("NOT_PRINTABLE[][2] = {"):]
    body = body[:body.index("};")]
    table = [(int(a, 16), int(b, 16)) for a, b in re.findall(r"\{(0x[0-9a-f]+), (0x[0-9a-f]+)\}", body)]
    assert table == python_ranges(), f"regenerate NOT_PRINTABLE for Unicode {unicodedata.unidata_version}"
