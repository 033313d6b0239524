"""Reading TOML files with line numbers for error messages, and writing the small TOML berth owns.

``tomllib`` (Python 3.11) parses but keeps no positions, so ``KeyLines`` scans the text for
table headers (``[a.b]``, ``[[a.b]]``) and ``key =`` lines and maps each dotted path
(array-of-table elements as integers: ``("policy", "mounts", 1, "source")``) to its line.
The scan ignores multi-line strings' contents only approximately; it is for messages, never
for meaning, and falls back to the nearest enclosing table's line.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from berth.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing costs every `berth run` ~2.5 ms (issue 10)
    from typing import Any

Path_ = tuple[str | int, ...]

# Patterns, compiled by re (and kept in its cache) on first use: a run whose files come from the
# ParseCache scans no text, and compiling them costs ~0.8 ms (issue 10, start-up).
_ARRAY_HEADER = r"^\s*\[\[\s*([^\]]+?)\s*\]\]\s*(?:#.*)?$"
_TABLE_HEADER = r"^\s*\[\s*([^\]\[]+?)\s*\]\s*(?:#.*)?$"
_KEY_LINE = r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
_KEY_PART = r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'"""


def _split_key(text: str) -> list[str]:
    return [part.strip("\"'") for part in re.findall(_KEY_PART, text)]


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
            match = re.match(_ARRAY_HEADER, line)
            if match:
                array = self._resolve(_split_key(match.group(1)), array_counts)
                index = array_counts.get(array, 0)
                array_counts[array] = index + 1
                current = (*array, index)
                self._register_prefixes(array, number)
                self._lines[current] = number
                continue
            match = re.match(_TABLE_HEADER, line)
            if match:
                current = self._resolve(_split_key(match.group(1)), array_counts)
                self._register_prefixes(current, number)
                continue
            match = re.match(_KEY_LINE, line)
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

    @classmethod
    def from_lines(cls, lines: dict[Path_, int]) -> KeyLines:
        """A KeyLines of a text scanned before (``lines``: an earlier one's :attr:`lines`)."""
        made = cls("")
        made._lines = dict(lines)
        return made

    @property
    def lines(self) -> dict[Path_, int]:
        return self._lines

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


def read_toml(path: Path, *, cache: ParseCache | None = None) -> tuple[dict[str, Any], KeyLines] | None:
    """Parse ``path``; None when it does not exist. Raises ConfigError (unreadable, bad syntax,
    larger than MAX_TOML_BYTES or nested deeper than berth.untrusted.MAX_DEPTH: issue 12 #5).

    ``cache``: where the parse of the very same bytes may be taken from instead of tomllib, and
    where a new parse is put (:class:`ParseCache`; the file itself is read every time)."""
    try:
        # Without blocking, a regular file only: a FIFO planted as the user's berth.toml (by a
        # container that sees the home directory) made every berth command wait for good.
        with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ConfigError(f"configuration file {path} is not a regular file (a FIFO, socket or device)",
                                  hint="replace it with a plain file, or remove it")
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
    cached = cache.get(path, data) if cache is not None else None
    if cached is not None:
        return cached
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
    lines = KeyLines(text)
    if cache is not None:
        cache.put(path, data, document, lines)
    return document, lines


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


class ParseCache:
    """The parses of the configuration files one command read, kept for the next command in
    one file, ``DIRECTORY/toml-cache.marshal`` (DIRECTORY: the caller's node-local state
    directory), so that a `berth run` whose files did not change skips tomllib (issue 10:
    ~4 ms of every start on a node with a site file, with the datetime and typing modules it
    imports). An entry is used only for the very same bytes as the file has now, so it cannot
    be stale. Its content is configuration: it is read only from a directory of the caller's
    that nobody else may enter (judged with lstat, a link is not followed; made 0700 when
    missing inside such a one, as ``$XDG_RUNTIME_DIR/berth``), and only from a regular file
    of the caller's that nobody else may write. One file whatever the files read, so the cache
    cannot grow; commands reading other files replace it. Failures only cost a parse."""

    FORMAT = 1
    NAME = "toml-cache.marshal"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._entries: dict[str, bytes] | None = None  # path -> marshal of (bytes, document, lines)
        self._used: dict[str, bytes] = {}
        self._changed = False

    def get(self, path: Path, data: bytes) -> tuple[dict[str, Any], KeyLines] | None:
        """The parse of ``path`` when its bytes were exactly ``data``; None on any doubt."""
        import marshal

        if self._entries is None:
            self._entries = self._read()
        frozen = self._entries.get(str(path))
        if frozen is None:
            return None
        try:
            entry = marshal.loads(frozen)
        except (ValueError, EOFError, TypeError):
            return None
        if not (isinstance(entry, tuple) and len(entry) == 3 and entry[0] == data
                and isinstance(entry[1], dict) and isinstance(entry[2], dict)):
            return None
        self._used[str(path)] = frozen
        return entry[1], KeyLines.from_lines(entry[2])

    def put(self, path: Path, data: bytes, document: dict[str, Any], lines: KeyLines) -> None:
        """Keep the parse of ``data``, ``path``'s bytes (copied now: the caller may change it)."""
        import marshal

        try:
            self._used[str(path)] = marshal.dumps((data, document, lines.lines))
        except ValueError:  # TOML dates and times: marshal cannot hold them, so no cache
            return
        self._changed = True

    def save(self) -> None:
        """Write the parses of the files read since this cache was made, if one was parsed anew;
        nothing on failure (a full disk: the next command parses again)."""
        if not self._changed or not _private_directory(self.directory, create=True):
            return
        import marshal

        from berth.fsutil import PRIVATE_FILE, write_atomically

        try:
            write_atomically(self.directory / self.NAME, marshal.dumps((self.FORMAT, self._used)),
                             mode=PRIVATE_FILE, nofollow_dir=True, durable=False)
        except OSError:
            pass

    def _read(self) -> dict[str, bytes]:
        if not _private_directory(self.directory, create=False):
            return {}
        import marshal

        try:
            fd = os.open(self.directory / self.NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return {}
        try:
            info = os.fstat(fd)
            if not (stat.S_ISREG(info.st_mode) and _private(info)) or info.st_size > 4 * MAX_TOML_BYTES:
                return {}
            with os.fdopen(fd, "rb", closefd=False) as handle:
                content = marshal.loads(handle.read())
        except (OSError, ValueError, EOFError, TypeError):
            return {}
        finally:
            os.close(fd)
        if not (isinstance(content, tuple) and len(content) == 2 and content[0] == self.FORMAT
                and isinstance(content[1], dict)):
            return {}
        return {path: entry for path, entry in content[1].items() if isinstance(entry, bytes)}


def _private(info: os.stat_result) -> bool:
    return info.st_uid == os.geteuid() and not info.st_mode & 0o077


def _private_directory(path: Path, *, create: bool) -> bool:
    """``path`` is a directory (not a link) of the caller's that nobody else may enter; with
    ``create``, a missing one is made (0700) when its parent is such a directory."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not (create and _private_directory(path.parent, create=False)):
            return False
        try:
            os.mkdir(path, 0o700)
            info = os.lstat(path)
        except OSError:
            return False
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and _private(info)
