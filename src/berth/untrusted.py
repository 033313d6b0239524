"""Parsing documents that come from outside berth's control, with limits (issue 12 #5).

Manifests, indexes and image configs come from registries and image archives; auth files,
job records, the store's index and configuration files are files on disk that someone else, an
older berth or a crash may have written. Python's parsers recurse: JSON nested 100,000 deep or
TOML arrays nested 2,000 deep raised ``RecursionError`` and berth died with a traceback. Every
such document is parsed here (or, for TOML, checked with :func:`check_depth` by
``berth.config.tomlfile``), so that a limit is always a clear :class:`~berth.errors.BerthError`:

- at most ``max_bytes`` bytes (default :data:`MAX_JSON_BYTES`);
- nested at most ``max_depth`` levels (default :data:`MAX_DEPTH`: the deepest legitimate
  document berth reads, an OCI index or a policy table, uses 5);
- valid JSON (UTF-8, -16 or -32, as ``json.loads`` detects it), integers of at most 4300 digits.

The caller names the document (``what``) and the error class that fits its layer
(``ImageError`` for image content, ``RegistryError`` for registry answers, ``ConfigError``
for files people edit, ``JobError`` for job records). Without one, :class:`InvalidDocument`
(a ``ValueError``) is raised, for callers that already turn ``ValueError`` into their own
error or that treat an unreadable document as absent.
"""

from __future__ import annotations

import json
import os
import stat

from berth.errors import BerthError

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing costs every `berth run` ~2.5 ms (issue 10)
    from collections.abc import Callable
    from typing import Any

#: Nesting limit for every parsed document (JSON and TOML): far above real documents, far
#: below Python's recursion limit, so no later recursive walk (json.dumps, ==) can overflow.
MAX_DEPTH = 64
#: Default size limit of one JSON document (callers that know their document pass less).
MAX_JSON_BYTES = 16 << 20


class InvalidDocument(ValueError):
    """A document refused by :func:`parse_json` when the caller gave no error class.

    ``reason`` is ``"size"``, ``"depth"`` or ``"syntax"``; ``detail`` is the message without
    the document's name (a caller that reads JSON or else YAML falls back on syntax only)."""

    def __init__(self, message: str, reason: str = "syntax", detail: str = "") -> None:
        super().__init__(message)
        self.reason, self.detail = reason, detail or message


def parse_json(data: bytes | str, *, what: str, error: type[Exception] = InvalidDocument,
               hint: str | None = None, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The parsed JSON ``data``. Raises ``error`` with a message naming ``what`` (and ``hint``,
    for a BerthError) when it is larger than ``max_bytes``, nested deeper than ``max_depth``
    or not valid JSON. Never raises RecursionError."""
    def refuse(detail: str, reason: str) -> Exception:
        message = f"{what} {detail}"
        if issubclass(error, BerthError):
            return error(message, hint=hint)
        if issubclass(error, InvalidDocument):
            return error(message, reason, detail)
        return error(message)

    size = len(data) if isinstance(data, (bytes, bytearray)) else len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise refuse(f"is {size} bytes, more than the {max_bytes} bytes berth accepts", "size")
    try:
        value = json.loads(data)
    except RecursionError:
        raise refuse(f"is nested more than {max_depth} levels deep", "depth") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise refuse(f"is not valid JSON: {exc}", "syntax") from None
    if nesting_exceeds(value, max_depth):
        raise refuse(f"is nested more than {max_depth} levels deep", "depth")
    return value


def read_json_object(path: os.PathLike | str) -> dict:
    """The JSON object in the file at ``path``, or ``{}`` when the file is missing, unreadable,
    not valid JSON, over the limits or not an object. For berth's own state files (container
    and mount records), which a kill may leave half-made and whose absence means "nothing here"."""
    try:
        with open(path, "rb") as handle:
            value = parse_json(handle.read(), what=os.fspath(path))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def nesting_exceeds(value: Any, max_depth: int = MAX_DEPTH) -> bool:
    """True when ``value`` (dicts and lists, as JSON and TOML parsers build them) is nested
    deeper than ``max_depth`` (a scalar is depth 0, ``[]`` depth 1). Iterative, one level at a
    time: never recurses; it costs about as much as json.loads itself (a 32 KiB image config:
    ~0.3 ms each, measured)."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            return True
        below = []
        for node in level:
            below.extend([child for child in (node.values() if isinstance(node, dict) else node)
                          if isinstance(child, (dict, list))])
        level = below
    return False


def read_named_file(path: os.PathLike | str, *, what: str, max_bytes: int,
                    error: type[Exception] = InvalidDocument, hint: str | None = None,
                    judge: Callable[[os.stat_result, int], object] | None = None) -> bytes | None:
    """The content of the file ``path`` names, links followed (a path the user chose, such as
    ``~/.docker/config.json`` linked into a dotfiles repository); None when it does not exist.
    It is opened without blocking and must be a regular file of at most ``max_bytes``: a FIFO
    (which a container that sees the home directory can plant) made berth wait for good, and a
    link to /dev/zero read without end. Raises ``error`` naming ``what`` for those; OSError
    (permission denied, ...) passes through.

    ``judge``, when given, is called with the status of the descriptor that is read (fstat)
    and the descriptor (for what fstat does not show: an ACL), before reading; what it raises
    passes through. A rule about who may change the file must judge it so: a second
    ``os.stat(path)`` judged whatever the name pointed to a moment later (renamed away:
    nothing; swapped for a link: another file)."""
    def refuse(detail: str) -> Exception:
        message = f"{what} {detail}"
        if issubclass(error, BerthError):
            return error(message, hint=hint)
        return error(message)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse("is not a regular file (a FIFO, device or directory): berth reads only plain files there")
        if judge is not None:
            judge(info, fd)
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise refuse(f"is larger than {max_bytes} bytes, more than berth reads")
    return data


def open_regular_file(path: os.PathLike | str) -> int | None:
    """A read-only descriptor of the regular file ``path`` (a final link is not followed, a FIFO
    or device does not block), or None: missing, unreadable, a link, not a regular file. For
    files of an image or another hostile tree whose path was resolved in-root first."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def read_regular_file(path: os.PathLike | str, max_bytes: int) -> bytes | None:
    """The content of the regular file ``path`` (:func:`open_regular_file`), or None, also
    when it is larger than ``max_bytes``."""
    fd = open_regular_file(path)
    if fd is None:
        return None
    try:
        data = os.read(fd, max_bytes + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= max_bytes else None
