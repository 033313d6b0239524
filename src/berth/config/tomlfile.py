"""Reading TOML files with line numbers for error messages, and writing the small TOML berth owns.

``tomllib`` (Python 3.11) parses but keeps no positions, so ``KeyLines`` scans the text for
table headers (``[a.b]``, ``[[a.b]]``) and ``key =`` lines and maps each dotted path
(array-of-table elements as integers: ``("policy", "mounts", 1, "source")``) to its line.
The scan ignores multi-line strings' contents only approximately; it is for messages, never
for meaning, and falls back to the nearest enclosing table's line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from berth.errors import ConfigError

Path_ = tuple[str | int, ...]

_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*([^\]]+?)\s*\]\]\s*(?:#.*)?$")
_TABLE_HEADER = re.compile(r"^\s*\[\s*([^\]\[]+?)\s*\]\s*(?:#.*)?$")
_KEY_LINE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_KEY_PART = re.compile(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""")


def _split_key(text: str) -> list[str]:
    return [part.strip("\"'") for part in _KEY_PART.findall(text)]


class KeyLines:
    """Where each key of one TOML text is written (1-based line numbers)."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Path_, int] = {}
        array_counts: dict[Path_, int] = {}
        current: Path_ = ()
        in_multiline = False
        for number, line in enumerate(text.splitlines(), start=1):
            # Skip the inside of multi-line strings so that their text is not read as keys.
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                was_inside = in_multiline
                in_multiline = not in_multiline
                if was_inside:
                    continue
            elif in_multiline:
                continue
            match = _ARRAY_HEADER.match(line)
            if match:
                array = self._resolve(_split_key(match.group(1)), array_counts)
                index = array_counts.get(array, 0)
                array_counts[array] = index + 1
                current = (*array, index)
                self._register_prefixes(array, number)
                self._lines[current] = number
                continue
            match = _TABLE_HEADER.match(line)
            if match:
                current = self._resolve(_split_key(match.group(1)), array_counts)
                self._register_prefixes(current, number)
                continue
            match = _KEY_LINE.match(line)
            if match:
                path = current
                for part in _split_key(match.group(1)):
                    path = (*path, part)
                    self._lines.setdefault(path, number)

    def _register_prefixes(self, path: Path_, number: int) -> None:
        """A header like [[policy.groups.mounts]] is also where 'policy' first shows up."""
        for end in range(1, len(path) + 1):
            self._lines.setdefault(path[:end], number)

    @staticmethod
    def _resolve(parts: list[str], array_counts: dict[Path_, int]) -> Path_:
        """A header's path, with the current element index after every array-of-tables prefix."""
        path: Path_ = ()
        for i, part in enumerate(parts):
            path = (*path, part)
            if i < len(parts) - 1 and path in array_counts:
                path = (*path, array_counts[path] - 1)
        return path

    def line(self, path: Path_) -> int | None:
        """The line of ``path``, else of its nearest written ancestor, else None."""
        probe = tuple(path)
        while probe:
            if probe in self._lines:
                return self._lines[probe]
            probe = probe[:-1]
        return None


#: Largest configuration or template file read (a site file is a few KiB).
MAX_TOML_BYTES = 4 << 20


def read_toml(path: Path) -> tuple[dict[str, Any], KeyLines] | None:
    """Parse ``path``; None when it does not exist. Raises ConfigError (unreadable, bad syntax,
    larger than MAX_TOML_BYTES or nested deeper than berth.untrusted.MAX_DEPTH: issue 12 #5)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TOML_BYTES + 1)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ConfigError(
            f"cannot read configuration file {path}: permission denied",
            hint="configuration files must be readable by every user of berth: "
            "ask your site administrator to make it world-readable (chmod 0644)",
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"configuration file {path} is a directory") from None
    if len(data) > MAX_TOML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_TOML_BYTES >> 20} MiB, more than berth reads",
                          hint="configuration files are small: fix or remove the file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                          hint="TOML files must be UTF-8") from None
    import tomllib  # only when a file exists: most nodes have none, and berth run's start-up counts

    from berth.untrusted import MAX_DEPTH, nesting_exceeds

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)"; keep it as the position.
        raise ConfigError(f"{path}: invalid TOML: {exc}",
                          hint="see https://toml.io for the syntax; strings need double quotes") from None
    except RecursionError:  # tomllib recurses once or twice per level of arrays and inline tables
        document = None
    if document is None or nesting_exceeds(document, MAX_DEPTH):
        raise ConfigError(f"{path}: values nested more than {MAX_DEPTH} levels deep",
                          hint="berth's configuration nests a few levels: fix or remove the file")
    return document, KeyLines(text)


def toml_value(value: Any) -> str:
    """One TOML value for what berth writes: str, bool, int, or a list of those.

    Strings are written as basic strings with JSON escapes (a subset of TOML's); control
    characters must have been refused before (TOML forbids DEL unescaped).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        import json  # writers only; readers stay light

        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
