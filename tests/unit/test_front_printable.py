"""The compiled front end writes text as berth.cli.output.printable does: its table of the
characters above U+00FF that are escaped is Python's own rule, derived again here."""

import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest

from berth.cli.output import printable

FRONT = Path(__file__).resolve().parents[2] / "src" / "berth" / "runtime" / "init" / "berth-front.c"
HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
%s
int main(void) {
    static char line[64], in[32], out[256];
    while (fgets(line, sizeof line, stdin)) {
        size_t n = strlen(line) / 2;
        for (size_t i = 0; i < n; i++) { unsigned v; sscanf(line + 2 * i, "%%2x", &v); in[i] = (char)v; }
        in[n] = 0;
        printable(in, out, sizeof out, 0);
        puts(out);
    }
    return 0;
}
"""


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


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_the_front_ends_printable_writes_every_assigned_code_point_as_python_does(tmp_path):
    """printable() compiled from berth-front.c's own text against berth.cli.output.printable,
    for every assigned code point (review 11: the two-byte ones of the table, U+0600-U+07FF,
    the Arabic letter mark among them, passed as they were; the test fails before)."""
    source = FRONT.read_text()
    start = source.index("static const unsigned NOT_PRINTABLE")
    end = source.index("\n}\n", source.index("static void printable(")) + 3
    (tmp_path / "h.c").write_text(HARNESS % source[start:end])
    subprocess.run(["cc", "-O1", "-o", str(tmp_path / "h"), str(tmp_path / "h.c")], check=True)
    points = [p for p in range(0x20, 0x110000)
              if not 0xD800 <= p <= 0xDFFF and unicodedata.category(chr(p)) != "Cn"]
    data = "".join(("A" + chr(p) + "B").encode().hex() + "\n" for p in points).encode()
    out = subprocess.run([str(tmp_path / "h")], input=data, capture_output=True, check=True).stdout
    got = out.decode("utf-8", "surrogateescape").split("\n")[:-1]
    wrong = [f"U+{p:04X}" for p, line in zip(points, got) if line != printable("A" + chr(p) + "B")]
    assert not wrong, f"{len(wrong)} code points differ: {wrong[:12]}"
