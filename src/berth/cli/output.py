"""Output helpers: aligned tables for people, JSON for scripts, human sizes and durations."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO


def human_size(size_bytes: int | float) -> str:
    size = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], file: TextIO | None = None) -> None:
    file = file or sys.stdout
    rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
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
