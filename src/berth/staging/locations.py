"""``SRC:DEST`` as users write it for ``--stage-in``/``--stage-out`` and ``berth stage``. Pure.

Where the separating colon is (URLs contain colons too, so the rule is fixed by direction):

- stage-in: the *last* colon. SRC is ``s3://BUCKET/KEY``, ``s3://BUCKET/PREFIX/`` (a trailing
  ``/``: the whole prefix, recursively), ``https://…``/``http://…`` or a host file or directory;
  DEST is a path on the node (relative: to the job's directory), which may not contain ``:``.
- stage-out: the *first* colon. SRC is a path or glob (``*``, ``?``, ``[…]``, ``**``) produced by
  the job, which may not contain ``:``; DEST is ``s3://BUCKET/PREFIX/``, ``s3://BUCKET/KEY`` (one
  file only) or a host directory.

Bucket names follow S3's rules (3-63 lower-case letters, digits, dots, hyphens); keys are
checked where they become local paths (:func:`key_to_relative`): an object key is hostile input.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from berth.errors import UsageError
from berth.record import Record

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # matched in full: no final newline
_GLOB_CHARS = "*?["

IN = "in"
OUT = "out"


class S3Location(Record):
    bucket: str
    key: str  # "" or ending in "/" for a prefix

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class UrlLocation(Record):
    url: str

    def __str__(self) -> str:
        return self.url


class HostLocation(Record):
    path: str  # as written (relative paths are resolved against the job's directory later)

    @property
    def is_glob(self) -> bool:
        return any(ch in self.path for ch in _GLOB_CHARS)

    def __str__(self) -> str:
        return self.path


Location = S3Location | UrlLocation | HostLocation


_URL_QUERY = re.compile(r"((?:https?)://[^?#\s]*)[?#][^:\s]*", re.IGNORECASE)


def without_url_query(text: str) -> str:
    """``text`` with the query (and fragment) of any http(s) URL in it cut to ``?...``: a
    presigned URL's query is a credential for its object (signature, access key id), never
    printed (the query ends at the next ':', where DEST begins)."""
    return _URL_QUERY.sub(r"\1?...", text)


class Transfer(Record):
    """One ``SRC:DEST`` item, as written (``text``) and parsed; ``shown`` is the text to print."""

    direction: str
    text: str
    source: Location
    destination: Location

    @property
    def shown(self) -> str:
        return without_url_query(self.text)


def _option(direction: str) -> str:
    return "--stage-in" if direction == IN else "--stage-out"


def _usage(direction: str, text: str, problem: str, hint: str | None = None) -> UsageError:
    default_hint = ("write SRC:DEST, e.g. s3://bucket/data/:input/ or s3://bucket/file.csv:input.csv"
                    if direction == IN else
                    "write SRC:DEST, e.g. 'results/*.h5:s3://bucket/run1/' or out/:s3://bucket/run1/")
    return UsageError(f"{_option(direction)} '{without_url_query(text)}': {without_url_query(problem)}",
                      hint=hint or default_hint)


def parse_s3(text: str, direction: str, whole: str) -> S3Location:
    rest = text[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise _usage(direction, whole, f"'{bucket}' is not an S3 bucket name",
                     hint="bucket names have 3-63 lower-case letters, digits, '.' and '-'")
    if "\0" in key or len(key.encode()) > 1024:
        raise _usage(direction, whole, "the object key is longer than 1024 bytes or holds a NUL character")
    return S3Location(bucket, key)


def _location(text: str, direction: str, whole: str) -> Location:
    if not text:
        raise _usage(direction, whole, "SRC or DEST is empty")
    if "\0" in text:
        raise _usage(direction, whole, "holds a NUL character")
    lowered = text.lower()
    if lowered.startswith("s3://"):
        return parse_s3(text, direction, whole)
    if lowered.startswith(("https://", "http://")):
        host = text.split("://", 1)[1].split("/", 1)[0]
        if not host or "@" in host:
            raise _usage(direction, whole, "the URL has no host, or carries a user name or password",
                         hint="credentials never go into URLs; S3 keys belong in a profile (docs/staging.md)")
        return UrlLocation(text)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise _usage(direction, whole, f"unknown scheme in '{text}'",
                     hint="berth stages s3://, https:// and http:// URLs and host paths")
    return HostLocation(text)


def parse_transfer(text: str, direction: str) -> Transfer:
    """Parse one ``SRC:DEST`` for ``direction`` (``"in"`` or ``"out"``). Raises UsageError
    naming the option and the text."""
    if direction == IN:
        head, sep, tail = text.rpartition(":")
        if not sep or not tail or re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", head) or tail.startswith("//"):
            raise _usage(direction, text, "no ':DEST' after the source")
    else:
        head, sep, tail = text.partition(":")
        if sep and tail.startswith("//") and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", head):
            raise _usage(direction, text, "SRC of a stage-out is a path or glob written by the job, not a URL")
        if not sep or not head:
            raise _usage(direction, text, "no 'SRC:' before the destination")
        if not tail:
            raise _usage(direction, text, "no destination after ':'")
    source = _location(head, direction, text)
    destination = _location(tail, direction, text)
    if direction == IN:
        if not isinstance(destination, HostLocation):
            raise _usage(direction, text, "DEST of a stage-in is a path on the node, not a URL")
        if isinstance(source, HostLocation) and source.is_glob:
            raise _usage(direction, text, "stage-in sources are not globs",
                         hint="name a file or directory, or an S3 prefix ending in '/'")
    else:
        if not isinstance(source, HostLocation):
            raise _usage(direction, text, "SRC of a stage-out is a path or glob written by the job, not a URL")
        if isinstance(destination, UrlLocation):
            raise _usage(direction, text, "stage-out goes to s3://BUCKET/PREFIX/ or a host directory, "
                                          "not to an http(s) URL")
        if isinstance(destination, HostLocation) and destination.is_glob:
            raise _usage(direction, text, "DEST may not be a glob")
    return Transfer(direction, text, source, destination)


def parse_transfers(texts, direction: str) -> tuple[Transfer, ...]:
    return tuple(parse_transfer(text, direction) for text in texts)


def key_to_relative(key: str, prefix: str) -> str:
    """The local relative path for ``key`` under ``prefix``; raises ValueError for a key that
    could leave the destination (``..``, absolute, empty components, NUL) — keys are hostile."""
    relative = key[len(prefix):]
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(part in ("", ".", "..") for part in parts) \
            or "\0" in relative:
        raise ValueError(relative)
    return str(PurePosixPath(*parts))
