"""Verified transfers between S3 (or https, or host paths) and the node, with a summary.

Library: obstore (Python bindings of the Rust ``object_store`` crate: SigV4 signing, retries
with backoff, multipart uploads, listing, all outside the interpreter). Chosen over boto3's
botocore/s3transfer by measurement (bench/RESULTS.md, docs/staging.md): botocore builds, signs
and parses every request in Python under the GIL, which made berth no faster than aws-cli on
many small objects and a third of s5cmd's speed on large downloads; obstore's requests cost
the interpreter almost nothing and its bodies are received outside it, reaching berth in
pieces that it hashes and writes while the next ones arrive. Imported lazily.

Rules (issue 7):

- **Downloads** go to a temporary file in the destination's directory (``fsutil.atomic_writer``,
  the one atomic write, like every file staging writes; unnamed until the rename where the file
  system allows, so that a stage-in killed with its job leaves no ``.NAME.*.tmp`` behind; where
  it does not, the name says its writer and the next write into the directory removes a dead
  writer's) and
  are renamed only after the size and
  the ETag were verified: a plain ETag is the object's MD5, hashed as
  the body arrives; an object from ``multipart_threshold`` on is fetched in parallel ranged GETs
  (``If-Match`` its ETag) cut at its own part boundaries (the part size inferred from the size
  and the ETag's part count: ``part_size_candidates``), so each part's MD5 is hashed as it
  arrives and the multipart ETag (``MD5-N``) is checked without a second pass.
  Any failure removes the temporary file: a destination holds the old file or the whole new
  one, never a part. The ranges are written with ``pwrite`` by many threads into the one descriptor
  that writer opened: no second temporary-file mechanism is needed.
- **Durable**: every file staging writes (stage-in from S3, https or a host path, stage-out to a
  host directory) is fsynced before its rename, and the rename after it (``atomic_writer``'s
  default): it is user data in the job's directory, which outlives the node, and the skip rule
  below trusts a file's size and time without reading it again, so a crash between a rename and
  the writeback must not leave a name with the right size and time over blocks never written
  (a requeued job would skip it and read zeros).
- **Skips**: a destination that exists with the object's size and modification time (berth
  sets the object's Last-Modified on every file it verified) is identical; same size but another
  time is hashed and compared with the ETag. So a re-sync of an unchanged prefix is one listing.
- **Uploads**: small files are one PUT whose answered ETag must be the body's MD5; files from
  ``multipart_threshold`` on are a parallel multipart upload in parts of ``multipart_chunksize``,
  each part hashed as it is read and handed over, and the multipart ETag the service answers
  must match. A mismatch fails the object, and stage-out's
  next round sends it again.
- **Concurrency**: objects transfer ``max_concurrency`` at a time (threads that wait outside the
  GIL) on one connection pool per bucket; one large object's parts likewise.
- **Retries** follow berth's one rule (:mod:`berth.retry`) with the numbers of ``STAGING_RETRY``:
  obstore retries each request (connection errors, timeouts, 5xx, 429) that many times with
  that backoff, and urllib3 an https source's; on top, a range whose body broke off is fetched
  again, and a stage-out sends again, in later rounds, the objects whose failure was transient
  (the network, the service's 5xx, a body or an ETag that did not verify) until the policy's
  attempts are used. A refusal, a missing bucket or object, a changed object or a local error
  is never retried: it fails the object at once. Then stage-out reports the list of objects
  that did not arrive.
- **Keys are hostile**: a key with ``..``, empty or absolute components is refused, never
  written outside the destination; symbolic links are never followed when reading a job's
  results (a job could point one at a credentials file).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import shutil
import stat
import threading
import time
from collections import deque
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlsplit

from berth import fsutil
from berth.config.units import human_size
from berth.errors import BerthError, NotFound, StagingError
from berth.record import Record, field
from berth.retry import RETRY_STATUSES, RetryPolicy, StallWatch, is_transient, parse_retry_after, refused_wait, transient
from berth.staging.locations import (IN, HostLocation, S3Location, Transfer, UrlLocation, key_to_relative,
                                     without_url_query)
from berth.staging.profiles import S3Profile

#: Staging's numbers for berth's one retry rule (berth.retry): attempts of one request (obstore,
#: urllib3), of one range (its own budget: ranges run in parallel threads) and of the stage-out
#: rounds of one item's objects, and the backoff between them.
#: The cap is short beside the registry's: a stage-in or stage-out holds a job's allocation.
STAGING_RETRY = RetryPolicy(attempts=4, base_s=0.5, cap_s=5.0)
#: Ranges of one large download in flight at once (bodies stream outside the GIL with obstore:
#: 16 beat 8 on this test bed; more only add threads).
RANGE_WORKERS = 16
#: Large objects (from ``multipart_threshold`` on) transferred at once: each one already has up
#: to ``max_concurrency`` parts in flight, and obstore holds every part of an upload in memory,
#: so a stage-out of many large files would otherwise hold max_concurrency² parts (16 x 16 x
#: 8 MiB = 2 GiB); one at a time keeps it at max_concurrency parts, as s3transfer's shared bound
#: did. Small objects keep flowing beside it.
LARGE_AT_ONCE = 1
_MAX_PARTS = 10_000
_READ_CHUNK = 1 << 20
#: Pieces a ranged GET's body is handed over in: small enough that the piece just hashed is
#: still in the CPU's cache when ``pwrite`` copies it (256 KiB against 1 MiB: a fifth less wall
#: time for a 1 GiB download and 100 -> 67 MiB peak memory, bench/RESULTS.md), large enough that
#: the Python loop around it costs nothing (4,096 pieces per GiB).
_RANGE_PIECE = 256 << 10
_MAX_LISTED_FAILURES = 20
#: The most objects one stage-in item may list. An endpoint decides when its listing ends: a
#: hostile one answering "truncated, continue" for ever made berth keep every object listed
#: until the node ran out of memory (a listing that repeats a key stops at once). Two million
#: holds ImageNet's 1.28 million training images as objects; a listed object takes ~0.8 KB of
#: memory (measured: 200,000 keys of 40 bytes listed from a loopback endpoint, maximum RSS).
MAX_LISTED_OBJECTS = 2_000_000


# ---------------------------------------------------------------------------------------------
# Summary and progress


class ItemSummary(Record, frozen=False):
    """One ``SRC:DEST`` item's figures."""

    text: str
    objects: int = 0
    bytes: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"transfer": self.text, "objects": self.objects, "bytes": self.bytes, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "mb_per_s": round(_rate(self.bytes, self.seconds), 1)}


class Summary(Record, frozen=False):
    """A whole stage-in or stage-out: per item and in total, and what did not arrive."""

    direction: str
    items: list[ItemSummary] = field(default_factory=list)
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)

    @property
    def objects(self) -> int:
        return sum(item.objects for item in self.items)

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def skipped(self) -> int:
        return sum(item.skipped for item in self.items)

    def to_dict(self) -> dict:
        return {"direction": f"stage-{self.direction}", "objects": self.objects, "bytes": self.bytes,
                "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "mb_per_s": round(_rate(self.bytes, self.seconds), 1), "failed": list(self.failed),
                "transfers": [item.to_dict() for item in self.items]}

    def lines(self) -> list[str]:
        """Human lines for a job log or a terminal (no secrets: only names and figures)."""
        out = []
        for item in self.items:
            out.append(f"stage-{self.direction} {item.text}: {item.objects} objects, {human_size(item.bytes)} in "
                       f"{item.seconds:.2f} s ({_rate(item.bytes, item.seconds):.1f} MB/s), {item.skipped} skipped")
        out.append(f"stage-{self.direction} total: {self.objects} objects, {human_size(self.bytes)} in {self.seconds:.2f} s "
                   f"({_rate(self.bytes, self.seconds):.1f} MB/s), {self.skipped} skipped"
                   + (f", {len(self.failed)} failed" if self.failed else ""))
        return out


def _rate(size_bytes: int, seconds: float) -> float:
    return size_bytes / 1e6 / seconds if seconds > 0 else 0.0


class Progress:
    """What a transfer reports while it runs (the CLI draws it; the job runner ignores it).
    Called from worker threads."""

    def add_total(self, objects: int, size_bytes: int) -> None:
        pass

    def advance(self, size_bytes: int) -> None:
        pass

    def object_done(self, skipped: bool = False) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Hashing and ETags


def _md5(data=b""):
    return hashlib.md5(data, usedforsecurity=False)


def _etag(raw: str | None) -> str:
    return (raw or "").strip('"').lower()


def file_md5(path: str) -> str:
    digest = _md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK * 8):
            digest.update(chunk)
    return digest.hexdigest()


def multipart_etag(path: str, part_size: int) -> str:
    """S3's ETag of a multipart upload of ``path`` in parts of ``part_size``: MD5 of the
    concatenated part MD5s, ``-N``."""
    digests = []
    with open(path, "rb") as handle:
        while True:
            part = _md5()
            left = part_size
            while left:
                chunk = handle.read(min(left, _READ_CHUNK * 8))
                if not chunk:
                    break
                part.update(chunk)
                left -= len(chunk)
            if left == part_size:
                break
            digests.append(part.digest())
            if left:
                break
    return etag_from_part_digests(digests)


def etag_from_part_digests(digests: list[bytes]) -> str:
    """The ETag S3 gives a multipart upload whose parts have the MD5 ``digests`` (raw 16-byte
    digests, in part order): the MD5 of their concatenation, ``-`` and the part count."""
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def part_size_candidates(size_bytes: int, etag: str, preferred: int | None = None) -> list[int]:
    """The part sizes a multipart object's ETag (``MD5-N``) can have been uploaded with, most
    likely first; empty when the ETag is no multipart ETag or no usual size fits.

    S3 tells the part size only through ``HEAD ?partNumber=1``, which obstore does not send;
    berth infers it instead. Uploaders cut uniform parts (the last one shorter), so a part size
    ``p`` fits when ``N - 1`` parts are shorter than the object and ``N`` are not. Of those,
    the usual sizes come first (``preferred``, berth's own ``multipart_chunksize``; the tools'
    defaults: 8 MiB aws-cli/boto3, 5 MiB Go SDK/rclone/obstore, 16 MiB mc, 50 MiB s5cmd, powers
    of two), then any other whole number of MiB, then the same in MB, at most four in all."""
    count_text = etag.rpartition("-")[2]
    if "-" not in etag or not count_text.isdigit() or int(count_text) < 1 or size_bytes <= 0:
        return []
    count = int(count_text)
    if count == 1:
        return [size_bytes]

    def fits(part: int) -> bool:
        return part > 0 and (count - 1) * part < size_bytes <= count * part

    mib, mb = 1 << 20, 1000 * 1000
    low = -(-size_bytes // count)  # the smallest part size that fits
    found: list[int] = []
    for unit, usual in ((mib, (8, 5, 16, 50, 10, 15, 32, 64, 100, 128, 256, 512, 1024)), (mb, (5, 8, 10, 16, 50, 100))):
        for part in ([preferred] if preferred and unit == mib else []) + [n * unit for n in usual]:
            if fits(part) and part not in found:
                found.append(part)
        first = -(-low // unit) * unit
        found.extend(p for p in range(first, first + 4 * unit, unit) if fits(p) and p not in found)
    return found[:4]


def matches_etag(path: str, etag: str, part_sizes: list[int] | None) -> bool | None:
    """True/False when ``etag`` can be checked against the file; None when it cannot (a
    multipart ETag with no candidate part size, or an ETag that is no MD5 such as SSE-KMS).
    A multipart ETag matches when one of ``part_sizes`` reproduces it."""
    if "-" in etag:
        if not part_sizes:
            return None
        return any(multipart_etag(path, part_size) == etag for part_size in part_sizes)
    if len(etag) != 32:
        return None
    return file_md5(path) == etag


def upload_part_size(size_bytes: int, chunksize: int) -> int:
    """``chunksize`` doubled until ``size_bytes`` fits in S3's 10,000 parts (at least 5 MiB)."""
    part = max(chunksize, 5 << 20)
    while -(-size_bytes // part) > _MAX_PARTS:
        part *= 2
    return part


# ---------------------------------------------------------------------------------------------
# The store


def _duration(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms"


#: The proxy every host but the endpoint's goes through: nothing can listen on port 0, so a
#: connection to it is refused at once (see make_store: redirects to other hosts).
_NOWHERE = "http://127.0.0.1:0"


def _endpoint_proxy(endpoint: str) -> str | None:
    """The proxy the environment names for ``endpoint`` (``https_proxy``/``http_proxy``, else
    ``all_proxy``), or None when there is none or ``no_proxy`` sends the endpoint around it, by
    berth's one rule (``berth.registry.transport.proxy_bypassed``). make_store hands the answer
    to obstore, which then reads no proxy variable itself."""
    import urllib.request

    from berth.registry.transport import proxy_bypassed, usable_proxy_url

    proxies = urllib.request.getproxies_environment()
    parts = urlsplit(endpoint)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or not parts.hostname or proxy_bypassed(parts.hostname, parts.port, proxies):
        return None
    written = usable_proxy_url(proxy)
    if written is None:
        # Not the value: a proxy URL may carry a password.
        raise StagingError(f"the proxy the environment names for the S3 endpoint {endpoint} "
                           f"({parts.scheme}_proxy or all_proxy) is not a usable URL",
                           hint="set it to http://HOST:PORT (a port from 1 to 65535), or unset it")
    return written


def make_store(profile: S3Profile, bucket: str):
    """An obstore ``S3Store`` for one bucket of ``profile``.

    Everything is set explicitly, so the variables obstore would otherwise read from the
    environment (``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT``, ``AWS_REQUEST_PAYER`` ...) never override
    the profile berth resolved: the keys come through a credential provider (they stay in this
    process's memory, never on a command line or in another process's environment). Timeouts:
    ``connect_timeout`` and ``read_timeout`` (no byte for ``timeout_s``: a stalled endpoint) per
    attempt; no overall limit on one request beyond a day, since a large part may take long on a
    slow link. Retries: ``STAGING_RETRY``'s attempts and backoff (obstore retries network
    errors, 5xx and 429, as berth's rule does).

    Redirects: obstore (reqwest) follows them by itself and drops only ``Authorization`` on the
    way to another host, so a session token (``x-amz-security-token``) went to whatever host the
    endpoint named, and it has no option to stop that. So every host but the endpoint's goes
    through a proxy that cannot be reached (``_NOWHERE``, port 0 refuses at once): a redirect to
    another host fails before a byte is sent, and ``s3_error`` says so. Only where the
    environment routes the endpoint itself through a proxy (:func:`_endpoint_proxy`) is this
    left out, since that proxy must stay in use; it is then given to obstore explicitly, so
    that berth alone decides (reqwest ignores the environment once a proxy is given). The
    residual risks are written in docs/security.md.

    Request bodies are signed (SHA-256 in the signature) over plain http only: over https TLS
    already guards them on the wire, so berth sends ``UNSIGNED-PAYLOAD`` there as aws-cli does,
    which saves a SHA-256 pass over every byte uploaded (0.15 s of CPU per 266 MB measured);
    the ETag check after each upload verifies the content either way."""
    from datetime import timedelta

    from obstore.store import S3Store

    region = profile.region or "us-east-1"
    endpoint = (profile.endpoint or f"https://s3.{region}.amazonaws.com").rstrip("/")
    scheme, _, host = endpoint.partition("://")
    virtual = profile.addressing_style == "virtual" or (
        profile.addressing_style == "auto" and profile.endpoint is None
        and "." not in bucket and bucket == bucket.lower())
    if virtual:
        # obstore sends virtual-hosted requests to the endpoint as given: the bucket goes in.
        endpoint = f"{scheme}://{bucket}.{host}"
    config = {"endpoint": endpoint, "region": region, "virtual_hosted_style_request": virtual,
              "skip_signature": profile.anonymous, "request_payer": False, "unsigned_payload": scheme == "https",
              "s3_express": False}
    client_options = {
        "allow_http": scheme == "http",
        "connect_timeout": _duration(min(10, profile.timeout_s)),
        "read_timeout": _duration(profile.timeout_s),
        # The whole request (never a large part on a slow link). No stall rule (StallWatch) for
        # S3 bodies: obstore gives Python a body only in chunks of at least min_chunk_size and no
        # progress hook, so a trickle is cut only here (docs/staging.md "Failures").
        "timeout": "24h",
        "pool_max_idle_per_host": str(profile.max_concurrency + 8),
        "user_agent": "berth",
    }
    if profile.ca_bundle:
        with open(profile.ca_bundle, "rb") as handle:
            client_options["root_certificate"] = handle.read()
    proxy = _endpoint_proxy(endpoint)
    if proxy is not None:
        # Given explicitly, so reqwest reads no proxy variable itself: it read them otherwise than
        # urllib (NO_PROXY over no_proxy, CIDR entries), reached an endpoint berth thought proxied
        # directly, with the guard below off (review10).
        client_options["proxy_url"] = proxy
    elif not profile.anonymous:
        client_options["proxy_url"] = _NOWHERE
        client_options["proxy_excludes"] = urlsplit(endpoint).hostname or host
    policy = STAGING_RETRY
    retry_config = {"max_retries": policy.attempts - 1, "retry_timeout": timedelta(seconds=5 * profile.timeout_s),
                    "backoff": {"init_backoff": timedelta(seconds=policy.base_s),
                                "max_backoff": timedelta(seconds=policy.cap_s), "base": 2}}
    provider = None
    if not profile.anonymous:
        credential = {"access_key_id": profile.access_key, "secret_access_key": profile.secret_key,
                      "token": profile.session_token or None, "expires_at": None}
        provider = lambda: credential  # noqa: E731 - obstore calls it once and keeps the result
    return S3Store(bucket, config=config, client_options=client_options, retry_config=retry_config,
                   credential_provider=provider)


_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")


def s3_error(exc: BaseException, what: str, profile: S3Profile) -> BerthError:
    """An obstore exception as a BerthError naming ``what`` (an object or bucket). obstore's
    own text (URLs, debug dumps) is never shown: only the status and the service's error code."""
    if isinstance(exc, BerthError):
        return exc
    if isinstance(exc, OSError) and exc.errno is not None:
        return local_error(exc, what)  # this machine's disk (obstore's not-found carries no errno)
    from obstore import exceptions as ox

    endpoint = profile.endpoint or "the AWS default endpoint"
    text = str(exc)
    status_match, code_match = _STATUS.search(text), _CODE.search(text)
    status = int(status_match.group(1)) if status_match else None
    code = code_match.group(1) if code_match else ""
    if code == "NoSuchBucket":
        return NotFound(f"{what}: the bucket does not exist",
                        hint=f"check the bucket name, or create the bucket first (endpoint {endpoint})")
    if isinstance(exc, (FileNotFoundError, ox.NotFoundError)) or code == "NoSuchKey" or status == 404:
        return NotFound(f"{what} does not exist at {endpoint}", hint="check the key (keys are case-sensitive)")
    if isinstance(exc, (PermissionError, ox.PermissionDeniedError, ox.UnauthenticatedError)) \
            or status in (401, 403):
        return StagingError(f"{what}: the S3 service at {endpoint} refused the request ({code or status or 403}) "
                            f"with the credentials of {profile.describe()}",
                            hint="check the profile's access_key and secret_key, and that they may use this bucket")
    if _NOWHERE.partition("://")[2] in text:  # (make_store: a redirect to another host)
        return StagingError(f"{what}: the S3 endpoint {endpoint} redirected the request to another host; berth "
                            f"does not follow it, so that the credentials of {profile.describe()} never reach a "
                            f"host they were not given for",
                            hint="set the profile's endpoint (or region) to the host that serves the bucket; "
                                 "if the redirect is unexpected, tell the endpoint's operators")
    if isinstance(exc, ox.PreconditionError) or status == 412:
        return StagingError(f"{what}: the object changed during the transfer", hint="retry")
    if status is not None:
        answered = StagingError(f"{what}: the S3 service at {endpoint} answered {code or status}"
                                + (f" (HTTP {status})" if code else ""),
                                hint="retry; if it persists, ask the service's operators")
        return transient(answered) if status in RETRY_STATUSES else answered
    if "kind: Timeout" in text or "TimedOut" in text:
        return transient(StagingError(f"{what}: the S3 endpoint {endpoint} stopped answering (no data for "
                            f"{profile.timeout_s} s, after retries)",
                            hint="the service is overloaded or stalled; raise timeout_s in the profile or retry later"))
    if "kind: Connect" in text or "tcp connect error" in text or "dns error" in text:
        unreachable = StagingError(f"{what}: cannot connect to the S3 endpoint {endpoint}",
                                   hint="is the endpoint URL right and the service up? (profile endpoint, "
                                        "AWS_ENDPOINT_URL, or the site's s3_endpoint)")
        # An unknown name (EAI_NONAME, EAI_NODATA) stays unknown; only EAI_AGAIN is worth
        # another round (berth.retry; the registry's transport judges names the same way).
        unknown_name = "dns error" in text and "Temporary failure" not in text
        return unreachable if unknown_name else transient(unreachable)
    if isinstance(exc, ox.BaseError):
        return transient(StagingError(f"{what}: the connection to {endpoint} failed ({type(exc).__name__})",
                                      hint="retry; if it persists, ask the service's operators"))
    return StagingError(f"{what}: {type(exc).__name__}: {exc}")


def local_error(exc: OSError, what: str) -> StagingError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StagingError(f"{what}: no space left on the node's disk ({exc.filename or 'destination'})",
                            hint="free space or choose another destination; the partial file was removed")
    return StagingError(f"{what}: {exc.strerror or exc} ({exc.filename or ''})".replace(" ()", ""))


# ---------------------------------------------------------------------------------------------
# Planning


class _Get(Record):
    """One object to download to ``path``, which lies below ``root`` (the DEST the user named;
    default: ``path``'s directory): nothing between them is a symbolic link berth follows."""

    bucket: str
    key: str
    size: int
    etag: str
    mtime: float
    path: str
    root: str = ""

    def where(self) -> tuple[str, str]:
        """(DEST, the path below it)."""
        root = self.root or os.path.dirname(self.path)
        return root, os.path.relpath(self.path, root)


class _Put(Record):
    """One local file to upload (or copy, when ``bucket`` is None, to ``target``). ``path`` lies
    below ``base`` (the source the user named, or a glob's fixed part) and ``target`` below
    ``target_root`` (the DEST named; defaults: their directories): what lies between is read
    and written without following a symbolic link (fsutil.open_beneath), so a link swapped in
    there after the plan checked it cannot carry the transfer outside them."""

    path: str
    size: int
    bucket: str | None
    key: str
    target: str | None = None
    base: str = ""
    target_root: str = ""

    def source(self) -> tuple[str, str]:
        base = self.base or os.path.dirname(self.path)
        return base, os.path.relpath(self.path, base)

    def destination(self) -> tuple[str, str]:
        assert self.target is not None
        root = self.target_root or os.path.dirname(self.target)
        return root, os.path.relpath(self.target, root)


def _resolve(workdir: str, path: str) -> str:
    expanded = os.path.expanduser(path)
    return os.path.normpath(expanded if os.path.isabs(expanded) else os.path.join(workdir, expanded))


def _list_prefix(store, location: S3Location, profile: S3Profile) -> list[dict]:
    """Every object under ``location``, read page by page (obstore asks for the next page as
    long as the endpoint says there is one). Raises StagingError for a listing that repeats a
    key (it would never end) or holds more than MAX_LISTED_OBJECTS."""
    import obstore

    endpoint = profile.endpoint or "the AWS default endpoint"
    found: list[dict] = []
    seen: set[str] = set()
    try:
        for chunk in obstore.list(store, location.key or None, chunk_size=1000):
            for meta in chunk:
                if meta["path"] in seen:
                    raise StagingError(f"{location}: the S3 service at {endpoint} listed the key '{meta['path']}' "
                                       "twice: its listing repeats itself and would never end",
                                       hint="the service is broken or hostile: ask its operators")
                seen.add(meta["path"])
                found.append(meta)
            if len(found) > MAX_LISTED_OBJECTS:
                raise StagingError(f"more than {MAX_LISTED_OBJECTS} objects under {location}: more than berth "
                                   "lists for one stage-in item",
                                   hint="stage narrower prefixes as several items (or pack small objects "
                                        "into archives); if the prefix is not that large, the service is broken")
    except Exception as exc:  # noqa: BLE001 - mapped to a BerthError naming the prefix
        raise s3_error(exc, str(location), profile) from None
    return found


def _bucket_missing(store, bucket: str, profile: S3Profile) -> NotFound | None:
    """A NotFound for ``bucket`` when it does not exist (a one-key listing tells; HEAD has no
    body to tell a missing bucket from a missing key), else None."""
    import obstore

    try:
        next(iter(obstore.list(store, None, chunk_size=1)), None)
    except Exception as exc:  # noqa: BLE001
        error = s3_error(exc, f"s3://{bucket}/", profile)
        if isinstance(error, NotFound):
            return NotFound(f"s3://{bucket}/: the bucket does not exist",
                            hint=f"check the bucket name (endpoint {profile.endpoint or 'the AWS default'})")
        raise error from None
    return None


def _head(store, location: S3Location, profile: S3Profile) -> dict:
    import obstore

    try:
        return obstore.head(store, location.key)
    except Exception as exc:  # noqa: BLE001
        error = s3_error(exc, str(location), profile)
        if isinstance(error, NotFound) and not error.message.endswith("the bucket does not exist"):
            raise (_bucket_missing(store, location.bucket, profile) or error) from None
        raise error from None


def _dest_anchor(workdir: str, dest: str) -> str:
    """Where the no-link walk to a DEST starts: the job's directory when DEST lies in it (a
    relative DEST, as for SRC), else DEST as the user named it. A job's container can write its
    directory: a DEST it turned into a link (results -> a host directory the container does not
    see) must not carry stage-out's files, or a bucket's objects, there."""
    job = os.path.normpath(workdir)
    return job if _inside(dest, job) else dest


def _refuse_link_inside(root: str, path: str, checked: set[str], transfer: Transfer, dest: str = "") -> None:
    """Refuse to write ``path`` through a directory below ``root`` (DEST, or the job's directory
    holding DEST: :func:`_dest_anchor`) that is a symbolic link: keys are hostile, and a link a
    job left in DEST, or made of DEST itself, would take them out of it. (A link at ``path``
    itself is replaced by the file, never followed: rename does not follow it.)"""
    directory = os.path.dirname(path)
    if directory == root or not _inside(directory, root):
        return
    link = _first_link(root, directory, checked)
    if link is None:
        return
    if not dest or (link != dest and _inside(link, dest)):
        raise StagingError(f"{_option(transfer)} '{transfer.shown}': {link} is a symbolic link inside DEST; "
                           "berth does not write through links", hint="remove the link, or choose another DEST")
    raise StagingError(f"{_option(transfer)} '{transfer.shown}': {link} is a symbolic link in the job's directory "
                       f"{root}; berth does not write through links there (the job's container could have made it)",
                       hint="write the directory the link points to as DEST (an absolute path), or remove the link")


def _option(transfer: Transfer) -> str:
    return "--stage-in" if transfer.direction == IN else "--stage-out"


def _plan_get(runner: "_Runner", transfer: Transfer, workdir: str, profile: S3Profile) -> list[_Get]:
    source: S3Location = transfer.source  # type: ignore[assignment]
    dest = _resolve(workdir, transfer.destination.path)  # type: ignore[union-attr]
    anchor = _dest_anchor(workdir, dest)
    store = runner.store(source.bucket)
    if source.is_prefix:
        listed = _list_prefix(store, source, profile)
        gets = []
        checked: set[str] = set()
        for item in listed:
            key = item["path"]
            if key.endswith("/") and item.get("size", 0) == 0:
                continue  # a "folder" marker
            try:
                relative = key_to_relative(key, source.key)
            except ValueError:
                raise StagingError(f"--stage-in '{transfer.text}': object key '{key}' would be written "
                                   "outside the destination (empty, '.' or '..' components)",
                                   hint="rename the object; berth never writes outside DEST") from None
            path = os.path.join(dest, relative)
            _refuse_link_inside(anchor, path, checked, transfer, dest)
            gets.append(_Get(source.bucket, key, int(item["size"]), _etag(item.get("e_tag")),
                             item["last_modified"].timestamp(), path, anchor))
        if not gets:
            missing = _bucket_missing(store, source.bucket, profile)
            if missing:
                raise missing
            raise NotFound(f"--stage-in '{transfer.text}': no object under {source}",
                           hint="check the prefix (keys are case-sensitive; a prefix ends with '/')")
        return gets
    name = source.key.rsplit("/", 1)[-1]
    into_directory = transfer.destination.path.endswith("/") or os.path.isdir(dest)  # type: ignore[union-attr]
    if into_directory and name in (".", ".."):  # keys are hostile: S3 allows both
        raise StagingError(f"--stage-in '{transfer.text}': the key's last part '{name}' is no file name",
                           hint="write the file's name as DEST (…:DIR/NAME)")
    head = _head(store, source, profile)
    path = os.path.join(dest, name) if into_directory else dest
    _refuse_link_inside(anchor, path, set(), transfer, dest)
    return [_Get(source.bucket, source.key, int(head["size"]), _etag(head.get("e_tag")),
                 head["last_modified"].timestamp(), path, anchor if anchor != dest else "")]


def _glob_base(pattern: str) -> str:
    parts = pattern.split("/")
    static = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        static.append(part)
    return "/".join(static) or ("/" if pattern.startswith("/") else ".")


def _walk_files(root: str, transfer: Transfer, notes: list[str]) -> list[str]:
    """The files under ``root``; a directory that cannot be read is an error naming it (os.walk
    would skip it, and its files would be left behind without a word), and a directory link
    (never followed, as os.walk does not) gets a note, as a file link does."""
    found = []

    def unreadable(error: OSError) -> None:
        raise StagingError(f"{_option(transfer)} '{transfer.text}': cannot read the directory "
                           f"{error.filename}: {error.strerror or error}",
                           hint="make it readable (chmod u+rx), or leave it out of SRC") from None

    for directory, dirs, files in os.walk(root, followlinks=False, onerror=unreadable):
        dirs.sort()
        for name in [name for name in dirs if os.path.islink(os.path.join(directory, name))]:
            notes.append(f"{_option(transfer)} '{transfer.shown}': skipped the symbolic link "
                         f"{os.path.join(directory, name)} (links are never followed)")
        for name in sorted(files):
            found.append(os.path.join(directory, name))
    return found


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _first_link(anchor: str, path: str, checked: set[str]) -> str | None:
    """The first symbolic link among ``path``'s components below ``anchor`` (``path`` itself
    included), or None. ``checked`` holds directories already known to be no link."""
    current = anchor
    for part in os.path.relpath(path, anchor).split("/"):
        current = os.path.join(current, part)
        if current in checked:
            continue
        if os.path.islink(current):
            return current
        if current != path:
            checked.add(current)
    return None


def _plan_put(transfer: Transfer, workdir: str, notes: list[str]) -> list[_Put]:
    """The files of a stage-out item (or of a host-path stage-in item) and where each goes.

    Symbolic links are never followed below the job's directory (a relative SRC) or below the
    directory written before the first glob character (an absolute SRC): a job could turn its
    results directory into a link to the user's credentials, and ``glob`` goes through
    directory links. Above that, the path as typed is the user's own choice."""
    source: HostLocation = transfer.source  # type: ignore[assignment]
    pattern = _resolve(workdir, source.path)
    option = "--stage-in" if transfer.direction == IN else "--stage-out"
    if source.is_glob:
        matches = sorted(glob.glob(pattern, recursive=True))
        base = _glob_base(pattern)
    else:
        matches = [pattern] if os.path.lexists(pattern) else []
        base = pattern if os.path.isdir(pattern) and not os.path.islink(pattern) else os.path.dirname(pattern)
    anchor = workdir if _inside(pattern, os.path.normpath(workdir)) and _inside(base, os.path.normpath(workdir)) \
        else (base if source.is_glob else os.path.dirname(pattern))
    checked: set[str] = set()
    linked = 0
    files: list[tuple[str, str]] = []  # (path, relative name)
    for match in matches:
        link = _first_link(anchor, match, checked)
        if link is not None:
            notes.append(f"{option} '{transfer.text}': skipped {match}: {link} is a symbolic link "
                         "(links are never followed)")
            linked += 1
            continue
        if os.path.isdir(match):
            for path in _walk_files(match, transfer, notes):
                kind = os.lstat(path).st_mode
                if stat.S_ISLNK(kind):
                    notes.append(f"{option} '{transfer.text}': skipped the symbolic link {path}")
                    continue
                if not stat.S_ISREG(kind):
                    # A FIFO the job left there: opening it waited for a writer for good.
                    notes.append(f"{option} '{transfer.shown}': skipped {path}: not a regular file "
                                 "(a FIFO, socket or device)")
                    continue
                files.append((path, os.path.relpath(path, base)))
        elif os.path.isfile(match):
            files.append((match, os.path.relpath(match, base)))
    if len(matches) == linked:
        raise NotFound(f"{option} '{transfer.text}': {source.path} matched no file in {workdir}"
                       + (" (only symbolic links, which are never followed)" if linked else ""),
                       hint="check the path or glob (relative paths are relative to the job's directory)")
    destination = transfer.destination
    puts = []
    if isinstance(destination, S3Location):
        if not destination.is_prefix and len(files) != 1:
            raise StagingError(f"{option} '{transfer.text}': {destination} names one object but the source "
                               f"has {len(files)} files", hint="end DEST with '/' to stage out under a prefix")
        for path, relative in files:
            key = destination.key + relative if destination.is_prefix else destination.key
            puts.append(_Put(path, os.lstat(path).st_size, destination.bucket, key, base=base))
    else:
        target_root = _resolve(workdir, destination.path)  # type: ignore[union-attr]
        anchor = _dest_anchor(workdir, target_root)
        single_file = len(files) == 1 and not source.is_glob and os.path.isfile(pattern) \
            and not destination.path.endswith("/") and not os.path.isdir(target_root)  # type: ignore[union-attr]
        checked = set()
        for path, relative in files:
            target = target_root if single_file else os.path.join(target_root, relative)
            _refuse_link_inside(anchor, target, checked, transfer, target_root)
            puts.append(_Put(path, os.lstat(path).st_size, None, relative, target, base,
                             anchor if anchor != target_root else "" if single_file else target_root))
    return puts


# ---------------------------------------------------------------------------------------------
# Doing


def _open_parent_beneath(root: str, relative: str, what: str) -> tuple[int, str]:
    """The directory ``relative`` goes into below DEST ``root`` (made as needed; ``root`` too,
    as the user named it), open without following a symbolic link below ``root``, and the file
    name. The plan refused links it saw (_refuse_link_inside); this closes the window after it:
    a link swapped in meanwhile, by whoever can write there, is a StagingError too, never
    followed. Raises StagingError."""
    try:
        if not os.path.isdir(root):
            os.makedirs(root, exist_ok=True)
        return fsutil.open_directory_beneath(root, os.path.dirname(relative), make_mode=0o777), \
            os.path.basename(relative)
    except OSError as exc:
        raise _beneath_error(exc, what) from None


def _beneath_error(exc: OSError, what: str) -> StagingError:
    if exc.errno == errno.ELOOP:
        return StagingError(f"{what}: {exc.filename} {exc.strerror}",
                            hint="someone put a symbolic link inside the transfer's directory; remove it "
                                 "(berth never reads or writes through a link there)")
    return local_error(exc, what)


class _Runner:
    """Shared state of one stage-in/out: stores (one per bucket, sharing nothing but the
    profile), stop flag, progress."""

    def __init__(self, profile: S3Profile, progress: Progress | None) -> None:
        self.profile = profile
        self.progress = progress or Progress()
        self.stop = threading.Event()
        self._stores: dict[str, object] = {}
        self._lock = threading.Lock()
        self.large = threading.BoundedSemaphore(LARGE_AT_ONCE)
        #: Directories whose dead writers' temporary files are removed (fsutil.atomic_writer).
        self.swept: set = set()

    def store(self, bucket: str):
        # Worker threads ask at once: one store (and one connection pool) per bucket for all.
        with self._lock:
            if bucket not in self._stores:
                self._stores[bucket] = make_store(self.profile, bucket)
            return self._stores[bucket]

    def close(self, cancel: bool) -> None:
        self._stores.clear()

    # -- downloads ---------------------------------------------------------------------------

    def identical(self, get: _Get, path: str | None = None) -> bool:
        """Whether ``path`` (default ``get.path``) already holds the object."""
        path = path or get.path
        try:
            info = os.lstat(path)  # a link there is replaced, never taken for the object
        except OSError:
            return False
        if info.st_size != get.size or not stat.S_ISREG(info.st_mode):
            return False
        if abs(info.st_mtime - get.mtime) < 1e-3:
            return True
        # Only the likeliest part size: each candidate is one more pass over a large file, and a
        # wrong "not identical" only costs a download (which then tries them all).
        if matches_etag(path, get.etag, self.part_sizes(get)[:1]):
            os.utime(path, (get.mtime, get.mtime), follow_symlinks=False)
            return True
        return False

    def part_sizes(self, get: _Get) -> list[int]:
        return part_size_candidates(get.size, get.etag, self.profile.multipart_chunksize)

    def download(self, get: _Get) -> bool:
        """Fetch one object, verified, into place. Returns False when it was already there."""
        what = f"s3://{get.bucket}/{get.key}"
        root, relative = get.where()
        parent, name = _open_parent_beneath(root, relative, f"{what} to {get.path}")
        try:
            return self._download_into(get, parent, name, what)
        finally:
            os.close(parent)

    def _download_into(self, get: _Get, parent: int, name: str, what: str) -> bool:
        # Every path from here on starts at the directory judged above (fsutil.descriptor_path).
        final = fsutil.descriptor_path(parent, name)
        if self.identical(get, final):
            return False
        try:
            # mode None: what open() would create, as for copies and https sources; durable:
            # the module docstring says why.
            with fsutil.atomic_writer(Path(final), mode=None, unnamed=True, swept=self.swept) as out:
                fd = out.fileno()  # written with os.write/pwrite only: the buffer stays empty
                if get.size >= self.profile.multipart_threshold:
                    with self.large:
                        verified = self._get_ranged(get, fd)
                else:
                    verified = self._get_small(get, fd)
                if self.stop.is_set():
                    raise StagingError(f"{what}: stopped")
                size = os.fstat(fd).st_size
                if size != get.size:
                    raise StagingError(f"{what}: received {size} bytes, the object has {get.size}",
                                       hint="the object changed during the transfer or the connection broke; retry")
                if verified is False:
                    raise StagingError(f"{what}: the content does not match the object's ETag {get.etag}",
                                       hint="the object changed during the transfer or was corrupted; retry "
                                            "(docs/staging.md: which multipart part sizes berth can check)")
                os.utime(fd, (get.mtime, get.mtime))
        except BaseException as exc:
            if isinstance(exc, (BerthError, KeyboardInterrupt, SystemExit)) or not isinstance(exc, Exception):
                raise
            raise s3_error(exc, what, self.profile) from None
        return True

    def _get_ranged(self, get: _Get, fd: int) -> bool | None:
        """A large object in parallel ranged GETs (``If-Match`` its ETag) written in place
        (``pwrite``). For a multipart object the ranges are its own parts (the likeliest part
        size, ``part_size_candidates``), so each range's MD5 is hashed as it arrives and the
        multipart ETag is checked without reading the file again; the less likely part sizes
        are checked from the page cache only if the first does not match. The bodies arrive
        into obstore's buffers outside the GIL; hashing and ``pwrite`` release it too, so the
        workers run on every core. A range whose body breaks off is fetched again
        (``STAGING_RETRY``'s attempts and backoff) on top of obstore's per-request retries."""
        candidates = self.part_sizes(get) if "-" in get.etag else []
        range_size = candidates[0] if candidates else self.profile.multipart_chunksize
        count = -(-get.size // range_size)
        store = self.store(get.bucket)
        os.ftruncate(fd, get.size)

        def fetch(index: int) -> bytes:
            start = index * range_size
            end = min(get.size, start + range_size)
            budget = STAGING_RETRY.budget()
            while True:
                if self.stop.is_set():
                    raise StagingError(f"s3://{get.bucket}/{get.key}: stopped")
                try:
                    return self._get_range(store, get, fd, start, end)
                except Exception as exc:  # noqa: BLE001 - sorted by s3_error
                    error = s3_error(exc, f"s3://{get.bucket}/{get.key}", self.profile)
                    if not is_transient(error) or self.stop.is_set() or not budget.retry():
                        raise error from None

        workers = max(1, min(self.profile.max_concurrency, RANGE_WORKERS, count))
        digests: list[bytes] = []
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="berth-range") as pool:
            try:
                # Two ranges per worker submitted ahead, in order: pool.map submitted them all at
                # once, a future per range of whatever size the endpoint listed (TiBs: 100,000s).
                pending: deque = deque()
                for index in range(count):
                    pending.append(pool.submit(fetch, index))
                    if len(pending) >= 2 * workers:
                        digests.append(pending.popleft().result())
                while pending:
                    digests.append(pending.popleft().result())
            except BaseException:
                self.stop.set()
                raise
        written = fsutil.descriptor_path(fd)  # the temporary file, read again through /proc
        if not candidates:
            return matches_etag(written, get.etag, None)  # a large single-PUT object: one more pass
        if etag_from_part_digests(digests) == get.etag:
            return True
        return matches_etag(written, get.etag, candidates[1:]) if len(candidates) > 1 else False

    def _get_range(self, store, get: _Get, fd: int, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) into ``fd`` at their offset; their MD5. The body
        is taken as a stream of ``_RANGE_PIECE`` pieces, so obstore keeps receiving while this thread
        hashes and writes the piece before (measured: a quarter less CPU and wall time than
        collecting each range whole, and memory bounded by the pieces, not the part size)."""
        import obstore

        result = obstore.get(store, get.key, options={"range": (start, end), "if_match": f'"{get.etag}"'})
        digest = _md5()
        offset = start
        for chunk in result.stream(min_chunk_size=_RANGE_PIECE):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
            self.progress.advance(len(chunk))
            if self.stop.is_set():
                raise StagingError(f"s3://{get.bucket}/{get.key}: stopped")
        if offset != end:
            raise transient(StagingError(f"s3://{get.bucket}/{get.key}: bytes {start}-{end - 1} arrived short "
                                         f"({offset - start})", hint="the connection broke or the object changed; retry"))
        return digest.digest()

    def _get_small(self, get: _Get, fd: int) -> bool | None:
        import obstore

        result = obstore.get(self.store(get.bucket), get.key)
        etag = _etag(result.meta.get("e_tag")) or get.etag
        size = result.meta.get("size")
        if size is not None and size != get.size:  # before the body is read whole into memory
            raise StagingError(f"s3://{get.bucket}/{get.key}: the object changed during the transfer "
                               f"({get.size} bytes listed, {size} now)", hint="retry")
        view = memoryview(result.bytes())
        digest = _md5(view)
        while view:
            view = view[os.write(fd, view):]
        self.progress.advance(get.size)
        if "-" in etag or len(etag) != 32:
            return None
        return digest.hexdigest() == etag

    # -- uploads -----------------------------------------------------------------------------

    def upload(self, put: _Put) -> None:
        """One file to S3, verified by the ETag the service answers: a plain ETag must be the
        MD5 of the body sent; a multipart one is recomputed from the parts as they are read and
        handed to obstore (one pass over the file, measured cheaper and faster than letting
        obstore read the file while another thread hashes it), so it checks exactly what was
        sent. Symbolic links are not followed (the plan skipped them; a link swapped in since
        is refused), and a file that grew or shrank meanwhile is an error."""
        import obstore

        what = f"s3://{put.bucket}/{put.key}"
        store = self.store(put.bucket)  # type: ignore[arg-type]
        try:
            # Buffered: read(n) returns n bytes until the end, so parts are exactly part_size.
            # Without blocking: a FIFO put in the planned file's place since is refused, not waited on.
            handle = os.fdopen(fsutil.open_beneath(*put.source(), os.O_RDONLY | os.O_NONBLOCK), "rb")
            with handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise StagingError(f"{put.path} is no longer a regular file (a FIFO or device put in its place?)",
                                       hint="stage out files the job has finished writing")
                if put.size >= self.profile.multipart_threshold:
                    part_size = upload_part_size(put.size, self.profile.multipart_chunksize)
                    digests: list[bytes] = []
                    read = [0]

                    def parts():
                        while part := handle.read(part_size):
                            digests.append(_md5(part).digest())
                            read[0] += len(part)
                            self.progress.advance(len(part))
                            yield part
                            if self.stop.is_set():
                                raise StagingError(f"{what}: stopped")

                    with self.large:
                        result = obstore.put(store, put.key, parts(), use_multipart=True, chunk_size=part_size,
                                             max_concurrency=self.profile.max_concurrency)
                    expected = etag_from_part_digests(digests)
                    etag = _etag(result.get("e_tag"))
                    if "-" in etag and etag != expected:
                        raise transient(StagingError(f"{what}: the stored object's ETag {etag} does not match "
                                                     f"{put.path}", hint="the upload was corrupted; it is sent again"))
                    if "-" not in etag:  # a service whose multipart ETags are no MD5s: the size at least
                        stored = obstore.head(store, put.key)["size"]
                        if stored != put.size:
                            raise transient(StagingError(f"{what}: the service stored {stored} bytes of {put.size}"))
                    length = read[0]
                else:
                    data = handle.read(put.size + 1)  # a file that grew is not read whole
                    if len(data) != put.size:
                        raise StagingError(f"{what}: {put.path} changed size while it was uploaded "
                                           f"({put.size} bytes planned, {'more' if len(data) > put.size else len(data)} "
                                           "now)", hint="stage out files the job has finished writing")
                    digest = _md5(data).hexdigest()
                    result = obstore.put(store, put.key, data, use_multipart=False)
                    etag = _etag(result.get("e_tag"))
                    if len(etag) == 32 and etag != digest:
                        raise transient(StagingError(f"{what}: the stored object's ETag does not match {put.path}",
                                                     hint="the upload was corrupted; it is sent again"))
                    self.progress.advance(len(data))
                    length = len(data)
                if length != put.size:
                    raise StagingError(f"{what}: {put.path} changed size while it was uploaded "
                                       f"({put.size} bytes planned, {length} now)",
                                       hint="stage out files the job has finished writing")
        except BerthError:
            raise
        except OSError as exc:
            raise _beneath_error(exc, what) from None
        except Exception as exc:  # noqa: BLE001
            raise s3_error(exc, what, self.profile) from None

    def copy(self, put: _Put) -> bool:
        """Host path to host path (stage-in of a host file, stage-out to a host directory). The
        source is read and the target written through descriptors reached without following a
        link below SRC and DEST (a link swapped in since the plan is refused, as uploads do)."""
        assert put.target is not None
        what = put.target
        root, relative = put.destination()
        try:
            source = os.fdopen(fsutil.open_beneath(*put.source(), os.O_RDONLY | os.O_NONBLOCK), "rb")
        except OSError as exc:
            raise _beneath_error(exc, put.path) from None
        with source:
            parent, name = _open_parent_beneath(root, relative, what)
            try:
                return self._copy_into(put, source, parent, name)
            except OSError as exc:
                raise _beneath_error(exc, what) from None
            finally:
                os.close(parent)

    def _copy_into(self, put: _Put, source, parent: int, name: str) -> bool:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise StagingError(f"{put.path} is no longer a regular file (a FIFO or device put in its place?)",
                               hint="stage out files the job has finished writing")
        final = fsutil.descriptor_path(parent, name)
        try:
            existing = os.lstat(final)  # a link there is replaced, never followed
            if stat.S_ISREG(existing.st_mode) and existing.st_size == info.st_size \
                    and abs(existing.st_mtime - info.st_mtime) < 1e-3:
                return False
        except FileNotFoundError:
            pass
        os.set_blocking(source.fileno(), True)
        with fsutil.atomic_writer(Path(final), mode=None, unnamed=True, swept=self.swept) as out:  # durable: the module docstring says why
            # As cp: no permission the source lacks (a private result stays private), set before
            # any byte is in the file.
            created = stat.S_IMODE(os.fstat(out.fileno()).st_mode)
            if created & ~stat.S_IMODE(info.st_mode):
                os.fchmod(out.fileno(), created & stat.S_IMODE(info.st_mode))
            shutil.copyfileobj(source, out, _READ_CHUNK)
            out.flush()
            if os.fstat(out.fileno()).st_size != info.st_size:
                raise StagingError(f"{put.path} changed while it was copied to {put.target}")
            os.utime(out.fileno(), (info.st_atime, info.st_mtime))
        self.progress.advance(info.st_size)
        return True

    # -- https -------------------------------------------------------------------------------

    def fetch_url(self, transfer: Transfer, workdir: str) -> tuple[int, bool]:
        import urllib3

        url = transfer.source.url  # type: ignore[union-attr]
        dest = _resolve(workdir, transfer.destination.path)  # type: ignore[union-attr]
        name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "index.html"
        shown = without_url_query(url)  # a query may carry a signature: never print it
        into_directory = transfer.destination.path.endswith("/") or os.path.isdir(dest)  # type: ignore[union-attr]
        if into_directory and name in (".", ".."):
            raise StagingError(f"--stage-in '{transfer.shown}': the URL's last part '{name}' is no file name",
                               hint="write the file's name as DEST (…:DIR/NAME)")
        path = os.path.join(dest, name) if into_directory else dest
        anchor = _dest_anchor(workdir, dest)
        _refuse_link_inside(anchor, path, set(), transfer, dest)
        root = anchor if anchor != dest else os.path.dirname(path)
        tls = {}
        if self.profile.ca_bundle:
            # Added to the system's roots, as for S3 (docs/staging.md); urllib3's ca_certs would
            # replace them, and a profile with a site CA could fetch from no public server.
            import ssl

            context = ssl.create_default_context()
            try:
                context.load_verify_locations(cafile=self.profile.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise StagingError(f"--stage-in '{shown}': cannot use the CA bundle {self.profile.ca_bundle} "
                                   f"({getattr(exc, 'strerror', None) or exc})",
                                   hint="ca_bundle must be a PEM file of CA certificates") from None
            tls = {"ssl_context": context}
        pool = urllib3.PoolManager(
            retries=_url_retry(urllib3),  # berth's one retry rule; urllib3 retries the requests
            timeout=urllib3.Timeout(connect=10, read=self.profile.timeout_s), **tls)
        try:
            response = _get_following_redirects(pool, url, shown)
            try:
                if response.status != 200:
                    if response.status == 404:
                        raise NotFound(f"--stage-in '{shown}': the server answered 404 (not found)")
                    raise StagingError(f"--stage-in '{shown}': the server answered HTTP {response.status}")
                # urllib3's reading of Content-Length (None when it is no single number, as
                # http.client reads it): a server's "abc" must not be int()ed into a traceback.
                expected = response.length_remaining
                size = 0
                # Created from the job's directory (or DEST) without following a link: as S3 objects.
                parent, name = _open_parent_beneath(root, os.path.relpath(path, root), shown)
                try:
                    with fsutil.atomic_writer(Path(fsutil.descriptor_path(parent, name)), mode=None,
                                              unnamed=True, swept=self.swept) as out:  # durable, as every staged file
                        watch = StallWatch(self.profile.timeout_s, response.read1)  # berth.retry's stall rule
                        while chunk := watch.read(_READ_CHUNK):
                            out.write(chunk)
                            size += len(chunk)
                            self.progress.advance(len(chunk))
                            if (expected is None or size < expected) and watch.stalled(len(chunk)):
                                raise transient(StagingError(
                                    f"--stage-in '{shown}': the server sent only {watch.received} bytes in "
                                    f"{self.profile.timeout_s:g} s: the download is stalled",
                                    hint="the server or the network is overloaded; retry later, or raise "
                                         "timeout_s in the S3 profile for a very slow link"))
                        if expected is not None and expected != size:
                            raise StagingError(f"--stage-in '{shown}': received {size} bytes of {expected}",
                                               hint="the connection broke; retry")
                finally:
                    os.close(parent)
            finally:
                response.release_conn()
            return size, True
        except BaseException as exc:
            if isinstance(exc, OSError):
                raise local_error(exc, path) from None
            if isinstance(exc, _WaitRefused):
                asked, when = refused_wait(exc.retry_after_s, STAGING_RETRY)
                raise StagingError(f"--stage-in '{shown}': the server answered HTTP {exc.status} and {asked}",
                                   hint=f"{when}; the job's allocation is not held waiting for it") from None
            if isinstance(exc, urllib3.exceptions.HTTPError):
                if isinstance(getattr(exc, "reason", exc), urllib3.exceptions.SSLError):
                    raise StagingError(f"--stage-in '{shown}': the server's TLS certificate is not trusted",
                                       hint="for a site CA, set ca_bundle in the S3 profile (it is added to "
                                            "the system's roots)") from None
                raise StagingError(f"--stage-in '{shown}': {type(exc).__name__}",
                                   hint="is the URL right and the server reachable?") from None
            raise


class _WaitRefused(Exception):
    """An https source's server asked for a longer wait than berth.retry takes."""

    def __init__(self, status: int, retry_after_s: float) -> None:
        super().__init__(status, retry_after_s)
        self.status, self.retry_after_s = status, retry_after_s


def _url_retry(urllib3):
    """urllib3's retries of an https source's requests, with the numbers of ``STAGING_RETRY``
    (other=0: an untrusted certificate, one of urllib3's "other" errors, is not retried). A
    server's Retry-After longer than the policy waits stops at once (:class:`_WaitRefused`), as
    berth.retry says: urllib3 waits what the server asks (urllib3 2.8: up to six hours; older
    ones: no limit)."""
    class PolicyRetry(urllib3.Retry):
        def increment(self, method=None, url=None, response=None, *args, **kwargs):
            # Only an answer berth retries waits at all (a redirect's Retry-After is not a wait).
            if response is not None and response.status in STAGING_RETRY.statuses:
                wait = parse_retry_after(response.headers.get("Retry-After"))
                if not STAGING_RETRY.honours(wait):
                    response.drain_conn()
                    raise _WaitRefused(response.status, wait)
            return super().increment(method, url, response, *args, **kwargs)

    return PolicyRetry(total=STAGING_RETRY.attempts - 1, other=0, backoff_factor=STAGING_RETRY.base_s,
                       backoff_max=STAGING_RETRY.cap_s, status_forcelist=STAGING_RETRY.statuses)


_MAX_REDIRECTS = 5


def _get_following_redirects(pool, url: str, shown: str):
    """GET ``url``, following redirects here rather than in urllib3, so that one from https to
    plain http is refused before it is followed: an https source is verified by TLS alone, and
    urllib3 followed the downgrade without a word."""
    from urllib.parse import urljoin

    location = url
    for _ in range(_MAX_REDIRECTS + 1):
        response = pool.request("GET", location, preload_content=False, redirect=False)
        target = response.get_redirect_location()
        if not target:
            return response
        response.drain_conn()
        response.release_conn()
        try:
            following = urljoin(location, target)
            urlsplit(following).port  # a port past 65535 or an IPv6 host without ']': ValueError
            from urllib3.util import parse_url
            parse_url(following)
        except ValueError:  # (urllib3's LocationParseError is one)
            raise StagingError(f"--stage-in '{shown}': the server redirects to a URL berth cannot use "
                               f"({target.split('?', 1)[0][:200]})",
                               hint="the server is misconfigured: ask its owners, or use the final URL") from None
        if location.lower().startswith("https://") and not following.lower().startswith("https://"):
            raise StagingError(f"--stage-in '{shown}': the server redirects to plain http "
                               f"({following.split('?', 1)[0]}); berth does not follow an https source there",
                               hint="use the final URL if you trust it, or ask the server's owners")
        location = following
    raise StagingError(f"--stage-in '{shown}': more than {_MAX_REDIRECTS} redirects")


def _run_pool(runner: _Runner, function, items, *, fail_fast: bool) -> tuple[list, list[tuple[object, BerthError]]]:
    """Run ``function`` over ``items`` ``max_concurrency`` at a time; returns (results, failures)."""
    results: list = []
    failures: list[tuple[object, BerthError]] = []
    if not items:
        return results, failures
    workers = min(runner.profile.max_concurrency, len(items))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="berth-stage") as pool:
        futures = {pool.submit(function, item): item for item in items}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    item = futures[future]
                    error = future.exception()
                    if error is None:
                        results.append((item, future.result()))
                        continue
                    failures.append((item, error if isinstance(error, BerthError) else
                                     StagingError(f"{type(error).__name__}: {error}")))
                if failures and fail_fast:
                    runner.stop.set()
                    for future in pending:
                        future.cancel()
                    wait(pending)
                    break
        except BaseException:
            runner.stop.set()
            for future in futures:
                future.cancel()
            runner.close(cancel=True)
            raise
    return results, failures


def _tally(item: ItemSummary, runner: _Runner, results: list) -> None:
    """Count finished objects: a result of False means it was already there (skipped)."""
    for entry, moved in results:
        item.objects += 1
        if moved is False:
            item.skipped += 1
        else:
            item.bytes += entry.size
        runner.progress.object_done(skipped=moved is False)


def stage_in(transfers: tuple[Transfer, ...], profile: S3Profile, workdir: str, *,
             progress: Progress | None = None, notes: list[str] | None = None) -> Summary:
    """Bring every ``transfers`` item onto this machine (relative DESTs under ``workdir``).

    Raises a BerthError naming the first object that failed; what was verified before stays,
    and no partial file is left behind."""
    runner = _Runner(profile, progress)
    summary = Summary("in")
    started = time.monotonic()
    notes = notes if notes is not None else []
    try:
        for transfer in transfers:
            item = ItemSummary(transfer.shown)
            summary.items.append(item)
            item_start = time.monotonic()
            source = transfer.source
            if isinstance(source, UrlLocation):
                runner.progress.add_total(1, 0)
                size, _ = runner.fetch_url(transfer, workdir)
                item.objects, item.bytes = 1, size
                runner.progress.object_done()
            else:
                if isinstance(source, S3Location):
                    plan, function = _plan_get(runner, transfer, workdir, profile), runner.download
                else:
                    plan, function = _plan_put(transfer, workdir, notes), runner.copy
                runner.progress.add_total(len(plan), sum(entry.size for entry in plan))
                results, failures = _run_pool(runner, function, plan, fail_fast=True)
                if failures:
                    raise failures[0][1]
                _tally(item, runner, results)
            item.seconds = time.monotonic() - item_start
    finally:
        runner.close(cancel=False)
        summary.seconds = time.monotonic() - started
    return summary


def stage_out(transfers: tuple[Transfer, ...], profile: S3Profile, workdir: str, *,
              progress: Progress | None = None, notes: list[str] | None = None,
              retry: RetryPolicy | None = None) -> Summary:
    """Send every item's files to S3 or a host directory. Objects whose failure was transient
    (:func:`is_transient`) are sent again in later rounds, ``retry.attempts`` rounds in all
    (default ``STAGING_RETRY``) with its backoff between them; others fail at once. Then a
    StagingError lists those that did not arrive (also in ``summary.failed``, which the caller
    may still print)."""
    retry = retry or STAGING_RETRY
    rounds_used = 1
    runner = _Runner(profile, progress)
    summary = Summary("out")
    started = time.monotonic()
    notes = notes if notes is not None else []
    planning_errors: list[str] = []
    last_errors: list[BerthError] = []
    try:
        for transfer in transfers:
            item = ItemSummary(transfer.shown)
            summary.items.append(item)
            item_start = time.monotonic()
            try:
                try:
                    puts = _plan_put(transfer, workdir, notes)
                except OSError as exc:  # a file removed while it was listed, say: this item fails, not all
                    raise local_error(exc, f"--stage-out '{transfer.shown}'") from None
            except BerthError as error:
                planning_errors.append(error.message)
                last_errors.append(error)
                continue
            runner.progress.add_total(len(puts), sum(p.size for p in puts))
            function = runner.upload if isinstance(transfer.destination, S3Location) else runner.copy
            todo = puts
            budget = retry.budget()  # the rounds of this item's objects
            failed: list[_Put] = []
            while todo:
                results, failures = _run_pool(runner, function, todo, fail_fast=False)
                rounds_used = max(rounds_used, budget.attempts)
                _tally(item, runner, results)
                if failures:
                    last_errors = [error for _, error in failures]
                failed += [put for put, error in failures if not is_transient(error)]
                todo = [put for put, error in failures if is_transient(error)]
                if todo and not budget.retry():
                    break
            for put in failed + todo:
                summary.failed.append(f"s3://{put.bucket}/{put.key}" if put.bucket else str(put.target))
            item.seconds = time.monotonic() - item_start
    finally:
        runner.close(cancel=False)
        summary.seconds = time.monotonic() - started
    summary.failed.sort()
    if summary.failed or planning_errors:
        listed = summary.failed[:_MAX_LISTED_FAILURES]
        more = len(summary.failed) - len(listed)
        parts = []
        if summary.failed:
            parts.append(f"{len(summary.failed)} object(s) did not arrive"
                         + (f" after {rounds_used} attempts" if rounds_used > 1 else "") + ": "
                         + ", ".join(listed) + (f" and {more} more" if more else ""))
        parts.extend(planning_errors)
        cause = last_errors[-1] if last_errors else None
        error = StagingError("stage-out failed: " + "; ".join(parts)
                             + (f" (last error: {cause.message})" if cause and cause.message not in planning_errors
                                else ""),
                             hint=(cause.hint if cause and cause.hint else "the job's files are still in its "
                                   "directory; `berth stage out` sends them again"))
        error.summary = summary  # type: ignore[attr-defined] - what did arrive, for the log
        raise error
    return summary
