"""Verified transfers between S3 (or https, or host paths) and the node, with a summary.

Library: boto3's botocore client and s3transfer (the AWS CLI's engine: multipart, ranged
parallel downloads, retries with backoff). Chosen over obstore and minio-py because it is the
reference implementation every S3-compatible server is tested against (Ceph RGW, MinIO,
SeaweedFS), its retry and multipart logic is what sites already trust, and it needs no compiled
code; bench/staging.py measures what that costs (bench/RESULTS.md). Imported lazily.

Rules (issue 7):

- **Downloads** go to ``.NAME.berth-RANDOM.part`` in the destination's directory and are renamed
  only after the size and the ETag were verified: a plain ETag is the object's MD5, hashed while
  streaming; an object from ``multipart_threshold`` on is fetched in parallel ranged GETs cut at
  its own part boundaries (``HEAD ?partNumber=1`` gives the part size), so each part's MD5 is
  hashed while it streams and the multipart ETag (``MD5-N``) is checked without a second pass.
  Any failure removes the temporary file: a destination holds the old file or the whole new
  one, never a part.
- **Skips**: a destination that exists with the object's size and modification time (berth
  sets the object's Last-Modified on every file it verified) is identical; same size but another
  time is hashed and compared with the ETag. So a re-sync of an unchanged prefix is one listing.
- **Uploads**: small files are one PUT with ``Content-MD5`` (the server refuses a body that does
  not match); files from ``multipart_threshold`` on go through s3transfer in parallel parts of
  ``multipart_chunksize`` while another thread hashes the same parts, then a HEAD compares size
  and multipart ETag.
- **Concurrency**: objects under the threshold transfer ``max_concurrency`` at a time on one
  connection pool; large ones share the same bound inside s3transfer.
- **Stage-out failures** are retried (whole objects, ``UPLOAD_ROUNDS`` rounds, on top of
  botocore's per-request retries) and then reported with the list of objects that did not arrive.
- **Keys are hostile**: a key with ``..``, empty or absolute components is refused, never
  written outside the destination; symbolic links are never followed when reading a job's
  results (a job could point one at a credentials file).
"""

from __future__ import annotations

import base64
import errno
import glob
import hashlib
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from berth import fsutil
from berth.config.units import human_size
from berth.errors import BerthError, NotFound, StagingError
from berth.staging.locations import (IN, HostLocation, S3Location, Transfer, UrlLocation, key_to_relative)
from berth.staging.profiles import S3Profile

UPLOAD_ROUNDS = 3
#: Ranges of one large download in flight at once (more only fight over the GIL; measured).
RANGE_WORKERS = 8
RANGE_ATTEMPTS = 3
_READ_CHUNK = 1 << 20
_MAX_LISTED_FAILURES = 20


# ---------------------------------------------------------------------------------------------
# Summary and progress


@dataclass
class ItemSummary:
    """One ``SRC:DEST`` item's figures."""

    text: str
    objects: int = 0
    bytes: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"transfer": self.text, "objects": self.objects, "bytes": self.bytes, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "mb_per_s": round(_rate(self.bytes, self.seconds), 1)}


@dataclass
class Summary:
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


def _md5():
    return hashlib.md5(usedforsecurity=False)


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
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def matches_etag(path: str, etag: str, part_size: int | None) -> bool | None:
    """True/False when ``etag`` can be checked against the file; None when it cannot (a
    multipart ETag whose part size is unknown, or an ETag that is no MD5 such as SSE-KMS)."""
    if "-" in etag:
        if part_size is None:
            return None
        return multipart_etag(path, part_size) == etag
    if len(etag) != 32:
        return None
    return file_md5(path) == etag


# ---------------------------------------------------------------------------------------------
# The client


def _broken_body_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    return (IncompleteReadError, ReadTimeoutError, ResponseStreamingError)


def make_client(profile: S3Profile):
    """A botocore S3 client for ``profile``: explicit keys (never from a process's argv),
    standard retries, timeouts that turn a stalled endpoint into an error."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    session = botocore.session.Session()
    # The profile is resolved already: botocore must not look for AWS_PROFILE's section again.
    session.set_config_variable("profile", None)
    config = Config(
        region_name=profile.region,
        s3={"addressing_style": profile.addressing_style},
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=min(10, profile.timeout_s),
        read_timeout=profile.timeout_s,
        max_pool_connections=profile.max_concurrency + 8,
        signature_version=UNSIGNED if profile.anonymous else None,
        # berth verifies with Content-MD5 and ETags; the newer trailing CRC32 checksums are not
        # understood by every S3-compatible server.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    kwargs = {"config": config, "endpoint_url": profile.endpoint}
    if profile.ca_bundle:
        kwargs["verify"] = profile.ca_bundle
    if not profile.anonymous:
        kwargs.update(aws_access_key_id=profile.access_key, aws_secret_access_key=profile.secret_key,
                      aws_session_token=profile.session_token)
    return session.create_client("s3", **kwargs)


def s3_error(exc: BaseException, what: str, profile: S3Profile) -> BerthError:
    """A botocore/s3transfer exception as a BerthError naming ``what`` (an object or bucket)."""
    from botocore import exceptions as bx

    endpoint = profile.endpoint or "the AWS default endpoint"
    if isinstance(exc, BerthError):
        return exc
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return NotFound(f"{what}: the bucket does not exist",
                            hint=f"check the bucket name, or create the bucket first (endpoint {endpoint})")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFound(f"{what} does not exist at {endpoint}", hint="check the key (keys are case-sensitive)")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                    "ExpiredToken") or status == 403:
            return StagingError(f"{what}: the S3 service at {endpoint} refused the request ({code or status}) "
                                f"with the credentials of {profile.describe()}",
                                hint="check the profile's access_key and secret_key, and that they may use this bucket")
        return StagingError(f"{what}: the S3 service at {endpoint} answered {code or status}: "
                            f"{error.get('Message', '')}".rstrip(": "))
    if isinstance(exc, (bx.ReadTimeoutError, bx.ConnectTimeoutError)):
        return StagingError(f"{what}: the S3 endpoint {endpoint} stopped answering (no data for "
                            f"{profile.timeout_s} s, after retries)",
                            hint="the service is overloaded or stalled; raise timeout_s in the profile or retry later")
    if isinstance(exc, bx.EndpointConnectionError):
        return StagingError(f"{what}: cannot connect to the S3 endpoint {endpoint}",
                            hint="is the endpoint URL right and the service up? (profile endpoint, "
                                 "AWS_ENDPOINT_URL, or the site's s3_endpoint)")
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
        return StagingError(f"{what}: the connection to {endpoint} failed ({type(exc).__name__})",
                            hint="retry; if it persists, ask the service's operators")
    if isinstance(exc, bx.NoCredentialsError):
        return StagingError(f"{what}: no S3 credentials", hint="see docs/staging.md for profiles")
    if isinstance(exc, OSError):
        return local_error(exc, what)
    return StagingError(f"{what}: {type(exc).__name__}: {exc}")


def local_error(exc: OSError, what: str) -> StagingError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StagingError(f"{what}: no space left on the node's disk ({exc.filename or 'destination'})",
                            hint="free space or choose another destination; the partial file was removed")
    return StagingError(f"{what}: {exc.strerror or exc} ({exc.filename or ''})".replace(" ()", ""))


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class _Get:
    """One object to download to ``path``."""

    bucket: str
    key: str
    size: int
    etag: str
    mtime: float
    path: str


@dataclass(frozen=True)
class _Put:
    """One local file to upload (or copy, when ``bucket`` is None, to ``target``)."""

    path: str
    size: int
    bucket: str | None
    key: str
    target: str | None = None


def _resolve(workdir: str, path: str) -> str:
    expanded = os.path.expanduser(path)
    return os.path.normpath(expanded if os.path.isabs(expanded) else os.path.join(workdir, expanded))


def _list_prefix(client, location: S3Location, profile: S3Profile) -> list[dict]:
    objects = []
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key):
            objects.extend(page.get("Contents", ()))
    except Exception as exc:  # noqa: BLE001 - mapped to a BerthError naming the prefix
        raise s3_error(exc, str(location), profile) from None
    return objects


def _head(client, location: S3Location, profile: S3Profile) -> dict:
    try:
        return client.head_object(Bucket=location.bucket, Key=location.key)
    except Exception as exc:  # noqa: BLE001
        error = s3_error(exc, str(location), profile)
        if isinstance(error, NotFound) and not error.message.endswith("the bucket does not exist"):
            # HEAD has no body: tell a missing bucket from a missing key with one more call.
            try:
                client.head_bucket(Bucket=location.bucket)
            except Exception as bucket_exc:  # noqa: BLE001
                bucket_error = s3_error(bucket_exc, f"s3://{location.bucket}/", profile)
                if isinstance(bucket_error, NotFound):
                    raise NotFound(f"s3://{location.bucket}/: the bucket does not exist",
                                   hint=f"check the bucket name (endpoint "
                                        f"{profile.endpoint or 'the AWS default'})") from None
        raise error from None


def _plan_get(client, transfer: Transfer, workdir: str, profile: S3Profile) -> list[_Get]:
    source: S3Location = transfer.source  # type: ignore[assignment]
    dest = _resolve(workdir, transfer.destination.path)  # type: ignore[union-attr]
    if source.is_prefix:
        listed = _list_prefix(client, source, profile)
        gets = []
        for item in listed:
            key = item["Key"]
            if key.endswith("/") and item.get("Size", 0) == 0:
                continue  # a "folder" marker
            try:
                relative = key_to_relative(key, source.key)
            except ValueError:
                raise StagingError(f"--stage-in '{transfer.text}': object key '{key}' would be written "
                                   "outside the destination (empty, '.' or '..' components)",
                                   hint="rename the object; berth never writes outside DEST") from None
            gets.append(_Get(source.bucket, key, int(item["Size"]), _etag(item.get("ETag")),
                             item["LastModified"].timestamp(), os.path.join(dest, relative)))
        if not gets:
            try:
                client.head_bucket(Bucket=source.bucket)
            except Exception as exc:  # noqa: BLE001
                raise s3_error(exc, f"s3://{source.bucket}/", profile) from None
            raise NotFound(f"--stage-in '{transfer.text}': no object under {source}",
                           hint="check the prefix (keys are case-sensitive; a prefix ends with '/')")
        return gets
    head = _head(client, source, profile)
    name = source.key.rsplit("/", 1)[-1]
    path = os.path.join(dest, name) if transfer.destination.path.endswith("/") or os.path.isdir(dest) else dest
    return [_Get(source.bucket, source.key, int(head["ContentLength"]), _etag(head.get("ETag")),
                 head["LastModified"].timestamp(), path)]


def _glob_base(pattern: str) -> str:
    parts = pattern.split("/")
    static = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        static.append(part)
    return "/".join(static) or ("/" if pattern.startswith("/") else ".")


def _walk_files(root: str) -> list[str]:
    found = []
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            found.append(os.path.join(directory, name))
    return found


def _plan_put(transfer: Transfer, workdir: str, notes: list[str]) -> list[_Put]:
    """The files of a stage-out item (or of a host-path stage-in item) and where each goes."""
    source: HostLocation = transfer.source  # type: ignore[assignment]
    pattern = _resolve(workdir, source.path)
    option = "--stage-in" if transfer.direction == IN else "--stage-out"
    if source.is_glob:
        matches = sorted(glob.glob(pattern, recursive=True))
        base = _glob_base(pattern)
    else:
        matches = [pattern] if os.path.lexists(pattern) else []
        base = pattern if os.path.isdir(pattern) and not os.path.islink(pattern) else os.path.dirname(pattern)
    if not matches:
        raise NotFound(f"{option} '{transfer.text}': {source.path} matched no file in {workdir}",
                       hint="check the path or glob (relative paths are relative to the job's directory)")
    files: list[tuple[str, str]] = []  # (path, relative name)
    for match in matches:
        if os.path.islink(match):
            notes.append(f"{option} '{transfer.text}': skipped the symbolic link {match} (links are never followed)")
            continue
        if os.path.isdir(match):
            for path in _walk_files(match):
                if os.path.islink(path):
                    notes.append(f"{option} '{transfer.text}': skipped the symbolic link {path}")
                    continue
                files.append((path, os.path.relpath(path, base)))
        elif os.path.isfile(match):
            files.append((match, os.path.relpath(match, base)))
    destination = transfer.destination
    puts = []
    if isinstance(destination, S3Location):
        if not destination.is_prefix and len(files) != 1:
            raise StagingError(f"{option} '{transfer.text}': {destination} names one object but the source "
                               f"has {len(files)} files", hint="end DEST with '/' to stage out under a prefix")
        for path, relative in files:
            key = destination.key + relative if destination.is_prefix else destination.key
            puts.append(_Put(path, os.lstat(path).st_size, destination.bucket, key))
    else:
        target_root = _resolve(workdir, destination.path)  # type: ignore[union-attr]
        single_file = len(files) == 1 and not source.is_glob and os.path.isfile(pattern) \
            and not destination.path.endswith("/") and not os.path.isdir(target_root)  # type: ignore[union-attr]
        for path, relative in files:
            target = target_root if single_file else os.path.join(target_root, relative)
            puts.append(_Put(path, os.lstat(path).st_size, None, relative, target))
    return puts


# ---------------------------------------------------------------------------------------------
# Doing


def _temp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.berth-{os.urandom(4).hex()}.part")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _make_parent(path: str, what: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        raise local_error(exc, what) from None


class _Runner:
    """Shared state of one stage-in/out: client, pools, stop flag, progress."""

    def __init__(self, profile: S3Profile, progress: Progress | None) -> None:
        self.profile = profile
        self.progress = progress or Progress()
        self.stop = threading.Event()
        self._client = None
        self._manager = None
        self._lock = threading.Lock()

    @property
    def client(self):
        # Worker threads ask at once: one client (and one connection pool) for all of them.
        with self._lock:
            if self._client is None:
                self._client = make_client(self.profile)
            return self._client

    @property
    def manager(self):
        client = self.client
        with self._lock:
            if self._manager is None:
                from s3transfer.manager import TransferConfig, TransferManager

                config = TransferConfig(
                    multipart_threshold=self.profile.multipart_threshold,
                    multipart_chunksize=self.profile.multipart_chunksize,
                    max_request_concurrency=self.profile.max_concurrency,
                    max_submission_concurrency=4,
                    num_download_attempts=3,
                )
                self._manager = TransferManager(client, config)
            return self._manager

    def close(self, cancel: bool) -> None:
        if self._manager is not None:
            self._manager.shutdown(cancel=cancel)
            self._manager = None

    def _subscribers(self):
        from s3transfer.subscribers import BaseSubscriber

        progress = self.progress
        stop = self.stop

        class _Report(BaseSubscriber):
            def on_progress(self, future, bytes_transferred, **kwargs):
                progress.advance(bytes_transferred)
                if stop.is_set():
                    future.cancel()

        return [_Report()]

    # -- downloads ---------------------------------------------------------------------------

    def identical(self, get: _Get) -> bool:
        try:
            info = os.stat(get.path)
        except OSError:
            return False
        if info.st_size != get.size or not os.path.isfile(get.path):
            return False
        if abs(info.st_mtime - get.mtime) < 1e-3:
            return True
        part_size = self.part_size(get) if "-" in get.etag else None
        if matches_etag(get.path, get.etag, part_size):
            os.utime(get.path, (get.mtime, get.mtime))
            return True
        return False

    def part_size(self, get: _Get) -> int | None:
        """The part size of a multipart object (HEAD ?partNumber=1), or None if unknown."""
        try:
            head = self.client.head_object(Bucket=get.bucket, Key=get.key, PartNumber=1)
            size = int(head.get("ContentLength") or 0)
            return size if size > 0 else None
        except Exception:  # noqa: BLE001 - a server without partNumber support: size-only check
            return None

    def download(self, get: _Get) -> bool:
        """Fetch one object, verified, into place. Returns False when it was already there."""
        what = f"s3://{get.bucket}/{get.key}"
        if self.identical(get):
            return False
        _make_parent(get.path, what)
        temp = _temp_name(get.path)
        try:
            if get.size >= self.profile.multipart_threshold:
                verified = self._get_ranged(get, temp)
            else:
                verified = self._get_small(get, temp)
            if self.stop.is_set():
                raise StagingError(f"{what}: stopped")
            size = os.stat(temp).st_size
            if size != get.size:
                raise StagingError(f"{what}: received {size} bytes, the object has {get.size}",
                                   hint="the object changed during the transfer or the connection broke; retry")
            if verified is False:
                raise StagingError(f"{what}: the content does not match the object's ETag {get.etag}",
                                   hint="the object changed during the transfer or was corrupted; retry")
            os.utime(temp, (get.mtime, get.mtime))
            fsutil.publish_file(temp, get.path, None, durable=False)
        except BaseException as exc:
            _remove(temp)
            if isinstance(exc, (BerthError, KeyboardInterrupt, SystemExit)) or not isinstance(exc, Exception):
                raise
            raise s3_error(exc, what, self.profile) from None
        return True

    def _get_ranged(self, get: _Get, temp: str) -> bool | None:
        """A large object in parallel ranged GETs written in place (``pwrite``). The ranges are
        the object's own parts when it was a multipart upload, so each range's MD5 is hashed
        while it streams and the multipart ETag is checked without reading the file again
        (s3transfer's downloads write through one I/O thread and leave the hashing to a second
        pass: bench/RESULTS.md). botocore signs and retries each request; a body that breaks
        off mid-stream is fetched again (``RANGE_ATTEMPTS``)."""
        multipart = "-" in get.etag
        part_size = self.part_size(get) if multipart else None
        range_size = part_size or self.profile.multipart_chunksize
        count = -(-get.size // range_size)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, get.size)

            def fetch(index: int) -> bytes:
                start = index * range_size
                end = min(get.size, start + range_size) - 1
                for attempt in range(RANGE_ATTEMPTS):
                    try:
                        return self._get_range(get, fd, start, end)
                    except _broken_body_errors() as exc:
                        if attempt + 1 == RANGE_ATTEMPTS or self.stop.is_set():
                            raise s3_error(exc, f"s3://{get.bucket}/{get.key}", self.profile) from None
                raise AssertionError("unreachable")

            workers = max(1, min(self.profile.max_concurrency, RANGE_WORKERS, count))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="berth-range") as pool:
                try:
                    digests = list(pool.map(fetch, range(count)))
                except BaseException:
                    self.stop.set()
                    raise
        finally:
            os.close(fd)
        if multipart and part_size is not None:
            composite = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
            return f"{composite}-{count}" == get.etag
        return matches_etag(temp, get.etag, None)  # a large single-PUT object: one more pass

    def _get_range(self, get: _Get, fd: int, start: int, end: int) -> bytes:
        response = self.client.get_object(Bucket=get.bucket, Key=get.key, Range=f"bytes={start}-{end}",
                                          IfMatch=f'"{get.etag}"')
        body = response["Body"]
        digest = _md5()
        offset = start
        try:
            while chunk := body.read(_READ_CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                self.progress.advance(len(chunk))
                if self.stop.is_set():
                    raise StagingError(f"s3://{get.bucket}/{get.key}: stopped")
        finally:
            body.close()
        if offset != end + 1:
            raise StagingError(f"s3://{get.bucket}/{get.key}: bytes {start}-{end} arrived short ({offset - start})",
                               hint="the connection broke or the object changed; retry")
        return digest.digest()

    def _get_small(self, get: _Get, temp: str) -> bool | None:
        response = self.client.get_object(Bucket=get.bucket, Key=get.key)
        body = response["Body"]
        digest = _md5()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            while chunk := body.read(_READ_CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                self.progress.advance(len(chunk))
                if self.stop.is_set():
                    break
        finally:
            os.close(fd)
            body.close()
        etag = _etag(response.get("ETag")) or get.etag
        if "-" in etag or len(etag) != 32:
            return None
        return digest.hexdigest() == etag

    # -- uploads -----------------------------------------------------------------------------

    def upload(self, put: _Put) -> None:
        what = f"s3://{put.bucket}/{put.key}"
        try:
            if put.size >= self.profile.multipart_threshold:
                from s3transfer.utils import ChunksizeAdjuster

                part_size = ChunksizeAdjuster().adjust_chunksize(self.profile.multipart_chunksize, put.size)
                # The expected multipart ETag is hashed from the page cache while s3transfer
                # uploads, not in a second pass afterwards.
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="berth-hash") as hasher:
                    expected = hasher.submit(multipart_etag, put.path, part_size)
                    future = self.manager.upload(put.path, put.bucket, put.key, subscribers=self._subscribers())
                    future.result()
                    expected_etag = expected.result()
                head = self.client.head_object(Bucket=put.bucket, Key=put.key)
                etag = _etag(head.get("ETag"))
                if int(head["ContentLength"]) != put.size:
                    raise StagingError(f"{what}: the service stored {head['ContentLength']} bytes of {put.size}")
                if "-" in etag and etag != expected_etag:
                    raise StagingError(f"{what}: the stored object's ETag {etag} does not match {put.path}",
                                       hint="the file changed while it was uploaded, or the upload was corrupted")
            else:
                with open(put.path, "rb") as handle:
                    data = handle.read()
                digest = hashlib.md5(data, usedforsecurity=False)
                response = self.client.put_object(Bucket=put.bucket, Key=put.key, Body=data,
                                                  ContentMD5=base64.b64encode(digest.digest()).decode())
                etag = _etag(response.get("ETag"))
                if len(etag) == 32 and etag != digest.hexdigest():
                    raise StagingError(f"{what}: the stored object's ETag does not match {put.path}")
                self.progress.advance(len(data))
        except BerthError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise s3_error(exc, what, self.profile) from None

    def copy(self, put: _Put) -> bool:
        """Host path to host path (stage-in of a host file, stage-out to a host directory)."""
        assert put.target is not None
        what = put.target
        try:
            info = os.stat(put.path)
            try:
                existing = os.stat(put.target)
                if existing.st_size == info.st_size and abs(existing.st_mtime - info.st_mtime) < 1e-3:
                    return False
            except FileNotFoundError:
                pass
            _make_parent(put.target, what)
            with open(put.path, "rb") as source, \
                    fsutil.atomic_writer(Path(put.target), mode=None, durable=False) as out:
                shutil.copyfileobj(source, out, _READ_CHUNK)
                out.flush()
                if os.fstat(out.fileno()).st_size != info.st_size:
                    raise StagingError(f"{put.path} changed while it was copied to {put.target}")
                os.utime(out.fileno(), (info.st_atime, info.st_mtime))
            self.progress.advance(info.st_size)
            return True
        except OSError as exc:
            raise local_error(exc, what) from None

    # -- https -------------------------------------------------------------------------------

    def fetch_url(self, transfer: Transfer, workdir: str) -> tuple[int, bool]:
        import urllib3

        url = transfer.source.url  # type: ignore[union-attr]
        dest = _resolve(workdir, transfer.destination.path)  # type: ignore[union-attr]
        name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "index.html"
        path = os.path.join(dest, name) if transfer.destination.path.endswith("/") or os.path.isdir(dest) else dest  # type: ignore[union-attr]
        shown = url.split("?", 1)[0]  # a query may carry a signature: never print it
        _make_parent(path, shown)
        pool = urllib3.PoolManager(
            retries=urllib3.Retry(total=4, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504)),
            timeout=urllib3.Timeout(connect=10, read=self.profile.timeout_s),
            **({"ca_certs": self.profile.ca_bundle} if self.profile.ca_bundle else {}))
        try:
            response = pool.request("GET", url, preload_content=False)
            try:
                if response.status != 200:
                    if response.status == 404:
                        raise NotFound(f"--stage-in '{shown}': the server answered 404 (not found)")
                    raise StagingError(f"--stage-in '{shown}': the server answered HTTP {response.status}")
                expected = response.headers.get("Content-Length")
                size = 0
                with fsutil.atomic_writer(Path(path), mode=None, durable=False) as out:
                    for chunk in response.stream(_READ_CHUNK):
                        out.write(chunk)
                        size += len(chunk)
                        self.progress.advance(len(chunk))
                    if expected is not None and int(expected) != size:
                        raise StagingError(f"--stage-in '{shown}': received {size} bytes of {expected}",
                                           hint="the connection broke; retry")
            finally:
                response.release_conn()
            return size, True
        except BaseException as exc:
            if isinstance(exc, OSError):
                raise local_error(exc, path) from None
            if isinstance(exc, urllib3.exceptions.HTTPError):
                raise StagingError(f"--stage-in '{shown}': {type(exc).__name__}",
                                   hint="is the URL right and the server reachable?") from None
            raise


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
            item = ItemSummary(transfer.text)
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
                    plan, function = _plan_get(runner.client, transfer, workdir, profile), runner.download
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
              rounds: int = UPLOAD_ROUNDS) -> Summary:
    """Send every item's files to S3 or a host directory. Failed objects are retried
    (``rounds`` in all); then a StagingError lists those that did not arrive (also in
    ``summary.failed``, which the caller may still print)."""
    runner = _Runner(profile, progress)
    summary = Summary("out")
    started = time.monotonic()
    notes = notes if notes is not None else []
    planning_errors: list[str] = []
    last_errors: list[BerthError] = []
    try:
        for transfer in transfers:
            item = ItemSummary(transfer.text)
            summary.items.append(item)
            item_start = time.monotonic()
            try:
                puts = _plan_put(transfer, workdir, notes)
            except BerthError as error:
                planning_errors.append(error.message)
                last_errors.append(error)
                continue
            runner.progress.add_total(len(puts), sum(p.size for p in puts))
            function = runner.upload if isinstance(transfer.destination, S3Location) else runner.copy
            todo = puts
            for attempt in range(max(1, rounds)):
                results, failures = _run_pool(runner, function, todo, fail_fast=False)
                _tally(item, runner, results)
                todo = [put for put, _ in failures]
                if not todo:
                    break
                last_errors = [error for _, error in failures]
                if attempt + 1 < rounds:
                    time.sleep(min(2.0 ** attempt, 5.0))
            for put in todo:
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
            parts.append(f"{len(summary.failed)} object(s) did not arrive after {rounds} attempts: "
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
