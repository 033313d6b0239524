"""Output helpers: aligned tables for people, JSON for scripts, control characters escaped.

Sizes for people: ``berth.config.units.human_size`` (staging reports them too)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``).

    Names come from files other people (or older berth versions) wrote: a newline must not split
    a table row, and an escape sequence from an image or a file must never reach the terminal
    (issue 12). ``newlines=True`` keeps line breaks (error messages that quote a program's stderr).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (newlines and c == "\n") else repr(c)[1:-1] for c in text)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], file: TextIO | None = None) -> None:
    file = file or sys.stdout
    rows = [["" if cell is None else printable(str(cell)) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()
    print(line, file=file)
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip(), file=file)


def print_json(data: Any, file: TextIO | None = None) -> None:
    json.dump(data, file or sys.stdout, indent=2, sort_keys=True, default=str)
    (file or sys.stdout).write("\n")
