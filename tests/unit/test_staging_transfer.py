"""The S3 data path without an S3 server: part sizes, ETag checks, ranged downloads assembled
and verified (obstore's ``get`` faked), error mapping, and a loopback HTTP server that shows
which headers obstore sends (the environment must not add any)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import http.server
import os
import threading
from datetime import datetime, timezone

import pytest

from berth.errors import BerthError, NotFound, StagingError
from berth.staging import transfer
from berth.staging.profiles import S3Profile
from berth.staging.transfer import multipart_etag, part_size_candidates, upload_part_size

MIB = 1 << 20


def _multipart_etag_of(data: bytes, part: int) -> str:
    parts = [data[i:i + part] for i in range(0, len(data), part)]
    return hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + f"-{len(parts)}"


def test_multipart_etag_from_part_digests_matches_a_real_services():
    """A known answer, not the formula again: SeaweedFS gave this ETag to these 11 MiB + 1234
    bytes uploaded by boto3 in 5 MiB parts (3 parts)."""
    size = 11 * MIB + 1234
    data = (bytes(range(251)) * (size // 251 + 1))[:size]
    digests = [hashlib.md5(data[i:i + 5 * MIB]).digest() for i in range(0, size, 5 * MIB)]
    assert transfer.etag_from_part_digests(digests) == "6b61bab26b9d091f4a91a09d3afcc078-3"
    assert transfer.etag_from_part_digests(digests[::-1]) != "6b61bab26b9d091f4a91a09d3afcc078-3"  # order counts
    assert transfer.etag_from_part_digests(digests[:1]).endswith("-1")


@pytest.mark.parametrize("size, etag, preferred, first", [
    (20 * MIB, "x-3", 8 * MIB, 8 * MIB),        # the harness's object: 8 MiB parts (7 and 9 fit too)
    (1 << 30, "x-128", 8 * MIB, 8 * MIB),       # aws-cli's 1 GiB upload
    (1 << 30, "x-205", 8 * MIB, 5 * MIB),       # 5 MiB parts (Go SDK, rclone, obstore)
    (1 << 30, "x-21", 8 * MIB, 50 * MIB),       # s5cmd's 50 MiB parts
    (100 * MIB, "x-7", 16 * MIB, 16 * MIB),     # berth's own chunk size comes first
    (12345, "x-1", 8 * MIB, 12345),             # one part: the part is the object
])
def test_part_size_candidates_put_the_usual_sizes_first(size, etag, preferred, first):
    found = part_size_candidates(size, etag, preferred)
    assert found[0] == first and len(found) <= 4
    count = int(etag.rsplit("-", 1)[1])
    assert all(-(-size // part) == count for part in found)  # every candidate gives N parts


@pytest.mark.parametrize("size, etag", [(10 * MIB, "0123456789abcdef0123456789abcdef"), (10 * MIB, "x-0"),
                                        (10 * MIB, "x-abc"), (0, "x-2")])
def test_part_size_candidates_none_for_plain_or_odd_etags(size, etag):
    assert part_size_candidates(size, etag) == []


def test_upload_parts_stay_within_s3s_limits():
    assert upload_part_size(1 << 30, 8 * MIB) == 8 * MIB
    assert upload_part_size(1 << 30, 1 * MIB) == 5 * MIB            # S3's minimum part
    big = 200 << 30                                                  # 200 GiB in 8 MiB parts: 25,600
    assert -(-big // upload_part_size(big, 8 * MIB)) <= 10_000


class _FakeResult:
    def __init__(self, data: bytes, etag: str) -> None:
        self._data, self.meta = data, {"e_tag": f'"{etag}"'}

    def bytes(self) -> bytes:
        return self._data

    def stream(self, min_chunk_size: int):
        step = max(1, min_chunk_size // 3)  # pieces that do not line up with anything
        return iter([self._data[i:i + step] for i in range(0, len(self._data), step)])


def _fake_get(monkeypatch, data: bytes, etag: str, corrupt_range_at: int | None = None):
    """obstore.get over ``data``; the range that starts at ``corrupt_range_at`` has a flipped byte."""
    import obstore

    calls = []

    def get(store, key, options=None):
        options = options or {}
        start, end = options.get("range", (0, len(data)))
        calls.append((start, end, options.get("if_match")))
        body = bytearray(data[start:end])
        if start == corrupt_range_at:
            body[len(body) // 2] ^= 0xFF
        return _FakeResult(bytes(body), etag)

    monkeypatch.setattr(obstore, "get", get)
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())
    return calls


def _profile(**extra) -> S3Profile:
    values = {"multipart_threshold": 4 * MIB, "multipart_chunksize": 5 * MIB, "max_concurrency": 4, **extra}
    return S3Profile("p", endpoint="http://127.0.0.1:9", access_key="A", secret_key="S", **values)


def _get(tmp_path, data: bytes, etag: str) -> transfer._Get:
    return transfer._Get("bucket", "ds/obj.bin", len(data), etag, 1_600_000_000.0, str(tmp_path / "out" / "obj.bin"))


def test_ranged_download_is_assembled_in_order_and_verified(tmp_path, monkeypatch):
    data = os.urandom(23 * MIB + 4321)
    etag = _multipart_etag_of(data, 8 * MIB)             # uploaded in 8 MiB parts (3 parts)
    calls = _fake_get(monkeypatch, data, etag)
    runner = transfer._Runner(_profile(), None)
    get = _get(tmp_path, data, etag)
    assert runner.download(get) is True
    assert (tmp_path / "out" / "obj.bin").read_bytes() == data
    assert os.stat(get.path).st_mtime == get.mtime
    # Cut at the object's own part boundaries, each request pinned to the ETag.
    assert sorted(calls) == [(0, 8 * MIB, f'"{etag}"'), (8 * MIB, 16 * MIB, f'"{etag}"'),
                             (16 * MIB, len(data), f'"{etag}"')]
    assert os.listdir(tmp_path / "out") == ["obj.bin"]
    # Present and identical now: skipped without a request.
    calls.clear()
    assert runner.download(get) is False and calls == []


def test_a_ranged_download_keeps_only_a_few_ranges_in_flight(tmp_path, monkeypatch):
    """Every range of a large object was submitted at once (pool.map): an endpoint listing an
    object of some TiB (a size no one checks before the ranges are cut) made berth hold a
    future per 8 MiB, hundreds of thousands, before one byte arrived. Now at most two per
    worker wait; what is fetched is only what the endpoint actually serves."""
    data = os.urandom(2 * MIB)
    _fake_get(monkeypatch, data, hashlib.md5(data).hexdigest())
    waiting, most = [0], [0]
    lock = threading.Lock()

    class Counting(transfer.ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            with lock:
                waiting[0] += 1
                most[0] = max(most[0], waiting[0])
            future = super().submit(fn, *args, **kwargs)

            def done(_):
                with lock:
                    waiting[0] -= 1
            future.add_done_callback(done)
            return future
    monkeypatch.setattr(transfer, "ThreadPoolExecutor", Counting)
    runner = transfer._Runner(_profile(multipart_threshold=MIB, multipart_chunksize=64 << 10, max_concurrency=2), None)
    get = _get(tmp_path, data, hashlib.md5(data).hexdigest())
    assert runner.download(get) is True and (tmp_path / "out" / "obj.bin").read_bytes() == data  # 32 ranges
    assert most[0] <= 4, most[0]


def test_ranged_download_with_a_less_likely_part_size_is_still_verified(tmp_path, monkeypatch):
    data = os.urandom(20 * MIB)
    etag = _multipart_etag_of(data, 9 * MIB)             # 3 parts of 9 MiB: fits, but not first
    _fake_get(monkeypatch, data, etag)
    assert part_size_candidates(len(data), etag, 5 * MIB)[0] != 9 * MIB
    runner = transfer._Runner(_profile(), None)
    assert runner.download(_get(tmp_path, data, etag)) is True
    assert (tmp_path / "out" / "obj.bin").read_bytes() == data


@pytest.mark.parametrize("multipart", [True, False])
def test_checksum_mismatch_renames_nothing_and_keeps_the_old_file(tmp_path, monkeypatch, multipart):
    data = os.urandom(20 * MIB + 17)
    etag = _multipart_etag_of(data, 8 * MIB) if multipart else hashlib.md5(data).hexdigest()
    _fake_get(monkeypatch, data, etag, corrupt_range_at=8 * MIB if multipart else 5 * MIB)
    runner = transfer._Runner(_profile(), None)
    get = _get(tmp_path, data, etag)
    os.makedirs(os.path.dirname(get.path))
    with open(get.path, "wb") as handle:
        handle.write(b"the old file")
    with pytest.raises(StagingError, match="does not match the object's ETag"):
        runner.download(get)
    assert os.listdir(tmp_path / "out") == ["obj.bin"]   # no .part file left behind
    assert (tmp_path / "out" / "obj.bin").read_bytes() == b"the old file"


def test_small_download_mismatch_leaves_nothing(tmp_path, monkeypatch):
    data = os.urandom(1000)
    import obstore

    corrupted = data[:-1] + bytes([data[-1] ^ 0xFF])  # not b"?": random data ends in it 1 run in 256
    monkeypatch.setattr(obstore, "get", lambda store, key, options=None: _FakeResult(corrupted,
                                                                                      hashlib.md5(data).hexdigest()))
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())
    runner = transfer._Runner(_profile(), None)
    with pytest.raises(StagingError, match="does not match"):
        runner.download(_get(tmp_path, data, hashlib.md5(data).hexdigest()))
    assert os.listdir(tmp_path / "out") == []


def _no_waiting(monkeypatch) -> list[float]:
    """Staging's retry policy with its numbers but no waiting; returns the waits it asked for."""
    from berth.record import replace

    slept: list[float] = []
    monkeypatch.setattr(transfer, "STAGING_RETRY", replace(transfer.STAGING_RETRY, sleep=slept.append))
    return slept


def test_a_range_that_arrives_short_is_fetched_again(tmp_path, monkeypatch):
    import obstore

    _no_waiting(monkeypatch)
    data = os.urandom(10 * MIB)
    etag = _multipart_etag_of(data, 5 * MIB)
    seen = []

    def get(store, key, options=None):
        start, end = options["range"]
        seen.append(start)
        short = seen.count(start) == 1 and start == 0
        return _FakeResult(data[start:end - (1 if short else 0)], etag)

    monkeypatch.setattr(obstore, "get", get)
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())
    runner = transfer._Runner(_profile(), None)
    assert runner.download(_get(tmp_path, data, etag)) is True
    assert sorted(seen) == [0, 0, 5 * MIB]
    assert (tmp_path / "out" / "obj.bin").read_bytes() == data


@pytest.mark.parametrize("exception, text, kind, words", [
    ("FileNotFoundError", "Object at location k not found: ... status code: 404 Not Found: \n", NotFound,
     "s3://b/k does not exist"),
    ("FileNotFoundError", "... status code: 404 Not Found: <Error><Code>NoSuchBucket</Code>", NotFound,
     "the bucket does not exist"),
    ("GenericError", "Generic S3 error: list ... status code: 404 Not Found: <Error><Code>NoSuchBucket</Code>",
     NotFound, "the bucket does not exist"),
    ("PermissionDeniedError", "... status code: 403 Forbidden: <Code>SignatureDoesNotMatch</Code>", StagingError,
     "refused the request (SignatureDoesNotMatch)"),
    ("GenericError", "Generic S3 error: list ... status code: 403 Forbidden: <Code>AccessDenied</Code>",
     StagingError, "refused the request (AccessDenied)"),
    ("PreconditionError", "... status code: 412 Precondition Failed", StagingError, "changed during the transfer"),
    ("GenericError", "... after 3 retries - HTTP error: error sending request ... kind: Timeout, TimedOut",
     StagingError, "stopped answering (no data for 60 s, after retries)"),
    ("GenericError", "... HttpError { kind: Connect, ... tcp connect error", StagingError,
     "cannot connect to the S3 endpoint http://127.0.0.1:9"),
    ("GenericError", "... status code: 503 Service Unavailable: <Code>SlowDown</Code>", StagingError,
     "answered SlowDown (HTTP 503)"),
])
def test_obstore_errors_become_messages_that_name_the_object(exception, text, kind, words):
    from obstore import exceptions as ox

    cls = FileNotFoundError if exception == "FileNotFoundError" else getattr(ox, exception)
    error = transfer.s3_error(cls(text), "s3://b/k", _profile())
    assert type(error) is kind and words in error.message, error.message
    assert "status code" not in error.message and "Debug" not in error.message


@pytest.mark.parametrize("reason, retried", [
    ("Name or service not known", False),  # EAI_NONAME: the name stays unknown
    ("No address associated with hostname", False),  # EAI_NODATA
    ("Temporary failure in name resolution", True),  # EAI_AGAIN: the resolver may answer later
])
def test_an_unknown_endpoint_name_is_not_retried_a_resolver_hiccup_is(reason, retried):
    """berth.retry, as the registry applies it: an unknown host name stays unknown, only a
    temporary resolver failure is worth another round. Every dns error was transient: a
    misspelled endpoint went through every stage-out round before its message."""
    from obstore import exceptions as ox

    text = ("Generic S3 error: error sending request for url (http://s3.exmple.org/b/k): client error "
            f"(Connect): dns error: failed to lookup address information: {reason}")
    error = transfer.s3_error(ox.GenericError(text), "s3://b/k", _profile())
    assert transfer.is_transient(error) is retried
    assert "cannot connect to the S3 endpoint" in error.message, error.message


def test_a_local_disk_error_is_not_taken_for_the_service():
    import errno

    error = transfer.s3_error(OSError(errno.ENOSPC, "No space left on device", "/x/.f.part"), "s3://b/k", _profile())
    assert "no space left on the node's disk" in error.message


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        type(self).seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        self.send_response(200)
        for name, value in (("Content-Length", "5"), ("ETag", '"5d41402abc4b2a76b9719d911017c592"'),
                            ("Last-Modified", "Wed, 01 Jan 2025 00:00:00 GMT")):
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()
    server.server_close()


def test_the_environment_cannot_add_to_the_resolved_profile(recorder, monkeypatch):
    """obstore reads AWS_* variables by itself; berth resolved the profile already, so a stale
    AWS_SESSION_TOKEN (say) must not be sent with another profile's keys, nor AWS_REQUEST_PAYER
    or AWS_ENDPOINT change the request."""
    import obstore

    endpoint, seen = recorder
    for name, value in (("AWS_SESSION_TOKEN", "stale-token"), ("AWS_REQUEST_PAYER", "true"),
                        ("AWS_ENDPOINT", "http://127.0.0.2:1"), ("AWS_ACCESS_KEY_ID", "ENVKEY"),
                        ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "true")):
        monkeypatch.setenv(name, value)
    profile = S3Profile("p", endpoint=endpoint, region="eu-west-1", access_key="PROFILEKEY", secret_key="S",
                        addressing_style="path")
    meta = obstore.head(transfer.make_store(profile, "bucket"), "some/key")
    assert meta["size"] == 5 and meta["last_modified"] == datetime(2025, 1, 1, tzinfo=timezone.utc)
    path, headers = seen[-1]
    assert path == "/bucket/some/key"
    assert "x-amz-security-token" not in headers and "x-amz-request-payer" not in headers
    assert "Credential=PROFILEKEY/" in headers["authorization"] and "/eu-west-1/s3/" in headers["authorization"]


def test_anonymous_profiles_send_no_signature(recorder, monkeypatch):
    import obstore

    endpoint, seen = recorder
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
    obstore.head(transfer.make_store(S3Profile("anon", endpoint=endpoint, addressing_style="path"), "bucket"), "k")
    assert "authorization" not in seen[-1][1]


def test_virtual_addressing_puts_the_bucket_in_the_host(recorder):
    import obstore

    endpoint, seen = recorder
    # 127.0.0.1 cannot carry a bucket name; "localhost" subdomains resolve to loopback here only
    # through the endpoint rewrite, so check the URL the store was given instead of a request.
    store = transfer.make_store(S3Profile("v", endpoint="https://s3.example.org", access_key="A", secret_key="S",
                                          addressing_style="virtual"), "bucket")
    assert store.config["endpoint"] == "https://bucket.s3.example.org"
    assert store.config["virtual_hosted_style_request"] in (True, "true")
    aws = transfer.make_store(S3Profile("aws", region="eu-west-1", access_key="A", secret_key="S"), "bucket")
    assert aws.config["endpoint"] == "https://bucket.s3.eu-west-1.amazonaws.com"
    path = transfer.make_store(S3Profile("site", endpoint=endpoint, access_key="A", secret_key="S"), "bucket")
    obstore.head(path, "k")  # auto on a site endpoint: path style
    assert seen[-1][0] == "/bucket/k"


def test_bodies_are_signed_over_http_and_left_to_tls_over_https():
    def unsigned(endpoint: str) -> bool:
        store = transfer.make_store(S3Profile("p", endpoint=endpoint, access_key="A", secret_key="S"), "bucket")
        return store.config["unsigned_payload"] in (True, "true")

    assert unsigned("https://s3.example.org") is True
    assert unsigned("http://127.0.0.1:9") is False


def test_large_uploads_go_one_at_a_time_and_are_verified(tmp_path, monkeypatch):
    """obstore holds every part of an upload in memory: 16 large files at once with 16 parts
    each would hold 256 parts; berth sends large files one at a time (small ones beside)."""
    import time as _time

    import obstore

    from berth.staging.locations import parse_transfer

    (tmp_path / "out").mkdir()
    for index in range(4):
        (tmp_path / "out" / f"big{index}.bin").write_bytes(os.urandom(6 * MIB + index))
    for index in range(6):
        (tmp_path / "out" / f"small{index}.txt").write_bytes(b"x" * index)
    active, peak, calls = [0], [0], []
    lock = threading.Lock()

    def put(store, key, file, use_multipart=None, chunk_size=None, max_concurrency=None):
        if use_multipart:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            _time.sleep(0.05)
            with lock:
                active[0] -= 1
            parts = [bytes(part) for part in file]  # obstore takes the parts as berth reads them
            assert all(len(part) == chunk_size for part in parts[:-1])
            calls.append((key, chunk_size, max_concurrency))
            return {"e_tag": f'"{_multipart_etag_of(b"".join(parts), chunk_size)}"', "version": None}
        return {"e_tag": f'"{hashlib.md5(bytes(file)).hexdigest()}"', "version": None}

    monkeypatch.setattr(obstore, "put", put)
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())
    profile = _profile(max_concurrency=8)
    summary = transfer.stage_out((parse_transfer("out/:s3://bucket/run/", "out"),), profile, str(tmp_path))
    assert (summary.objects, summary.failed) == (10, [])
    assert peak[0] == 1
    assert sorted(calls) == [(f"run/big{i}.bin", 5 * MIB, 8) for i in range(4)]


def test_a_wrong_multipart_etag_fails_the_upload_and_lists_it(tmp_path, monkeypatch):
    import obstore

    from berth.staging.locations import parse_transfer

    (tmp_path / "big.bin").write_bytes(os.urandom(6 * MIB))
    monkeypatch.setattr(obstore, "put", lambda store, key, file, **kw: {"e_tag": '"0123456789abcdef0123456789abcdef-2"'})
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())
    slept = _no_waiting(monkeypatch)
    with pytest.raises(StagingError) as caught:
        transfer.stage_out((parse_transfer("big.bin:s3://bucket/big.bin", "out"),), _profile(), str(tmp_path))
    assert "1 object(s) did not arrive after 4 attempts: s3://bucket/big.bin" in caught.value.message
    assert "does not match" in caught.value.message
    assert len(slept) == 3  # the policy's backoff between the four rounds


def test_an_upload_checks_what_it_sent_and_refuses_a_swapped_in_link(tmp_path, monkeypatch):
    """The parts are hashed as they are read and handed over: a file that changed size since
    the plan is an error (the next round sends it again), and a symbolic link put in place of a
    planned file is never followed (it could point at the user's credentials)."""
    sent = _record_puts(monkeypatch)
    runner = transfer._Runner(_profile(), None)
    path = tmp_path / "grows.bin"
    path.write_bytes(os.urandom(6 * MIB))
    planned = transfer._Put(str(path), 5 * MIB, "bucket", "grows.bin")
    with pytest.raises(StagingError, match="changed size while it was uploaded"):
        runner.upload(planned)
    runner.upload(transfer._Put(str(path), 6 * MIB, "bucket", "grows.bin"))
    assert sent["grows.bin"] == path.read_bytes()

    secret = tmp_path / "s3.toml"
    secret.write_text("secret_key = x\n")
    link = tmp_path / "result.txt"
    link.symlink_to(secret)
    with pytest.raises(StagingError, match="result.txt"):
        runner.upload(transfer._Put(str(link), 10, "bucket", "result.txt"))
    assert "result.txt" not in sent


def _record_puts(monkeypatch) -> dict:
    import obstore

    sent = {}

    def put(store, key, file, use_multipart=None, chunk_size=None, max_concurrency=None):
        data = b"".join(bytes(part) for part in file) if use_multipart else bytes(file)
        sent[key] = data
        etag = _multipart_etag_of(data, chunk_size) if use_multipart else hashlib.md5(data).hexdigest()
        return {"e_tag": f'"{etag}"'}

    monkeypatch.setattr(obstore, "put", put)
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())
    return sent


@pytest.mark.parametrize("source", ["results/*", "results/**/*.toml", "results/s3.toml", "results/"])
def test_stage_out_never_follows_a_linked_directory_the_job_made(tmp_path, monkeypatch, source):
    """A job that turns its results directory into a link to the user's credentials directory
    must not get them uploaded: a glob went through the link (glob follows directory links),
    and so did a plain path below it (O_NOFOLLOW guards the last component only)."""
    from berth.staging.locations import parse_transfer

    secrets = tmp_path / "home" / ".config" / "berth"
    secrets.mkdir(parents=True)
    (secrets / "s3.toml").write_text("[default]\nsecret_key = \"hush\"\n")
    job = tmp_path / "job"
    job.mkdir()
    (job / "results").symlink_to(secrets)
    (job / "log.txt").write_text("done\n")
    sent = _record_puts(monkeypatch)
    notes: list[str] = []
    with pytest.raises(StagingError) as caught:
        transfer.stage_out((parse_transfer(f"{source}:s3://bucket/run/", "out"),
                            parse_transfer("log.txt:s3://bucket/run/", "out")), _profile(), str(job), notes=notes)
    assert not any(b"hush" in data for data in sent.values()), sorted(sent)
    assert sent == {"run/log.txt": b"done\n"}
    assert any("results" in note and "symbolic link" in note for note in notes), notes
    assert "matched no file" in caught.value.message


def test_stage_out_through_a_directory_the_user_named_outside_the_job(tmp_path, monkeypatch):
    """Above what berth discovers, the path as typed is the user's choice: an absolute SRC
    whose own directories include a link (scratch linked into a home) is read through it."""
    from berth.staging.locations import parse_transfer

    scratch = tmp_path / "scratch"
    (scratch / "run1").mkdir(parents=True)
    (scratch / "run1" / "out.h5").write_bytes(b"data")
    (tmp_path / "linked").symlink_to(scratch)
    sent = _record_puts(monkeypatch)
    job = tmp_path / "job"
    job.mkdir()
    summary = transfer.stage_out((parse_transfer(f"{tmp_path}/linked/run1/*.h5:s3://bucket/r/", "out"),),
                                 _profile(), str(job))
    assert (summary.objects, sent) == (1, {"r/out.h5": b"data"})


@pytest.mark.parametrize("destination", ["s3://bucket/run/", "keep/"])
def test_a_fifo_the_job_left_among_its_results_is_skipped_not_waited_on(tmp_path, monkeypatch, destination):
    """The job's container can leave a FIFO in its results directory: the upload opened it for
    reading and waited for a writer for good (a job stuck in staging until its time limit); a
    host copy failed the stage-out. It is skipped with a note, as a link is."""
    from berth.staging.locations import parse_transfer

    job = tmp_path / "job"
    (job / "out").mkdir(parents=True)
    (job / "out" / "a.txt").write_bytes(b"result")
    os.mkfifo(job / "out" / "pipe")
    sent = _record_puts(monkeypatch)
    notes: list[str] = []
    outcome: list = []

    def stage():
        try:
            outcome.append(transfer.stage_out((parse_transfer(f"out/:{destination}", "out"),), _profile(), str(job),
                                              notes=notes))
        except StagingError as error:
            outcome.append(error)
        try:  # and a FIFO put in place of a planned file after the plan is refused, not waited on
            transfer._Runner(_profile(), None).upload(transfer._Put(str(job / "out" / "pipe"), 6, "bucket", "x"))
        except StagingError as error:
            outcome.append(error)
    thread = threading.Thread(target=stage, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(job / "out" / "pipe", os.O_WRONLY | os.O_NONBLOCK))  # let it go
        thread.join(20)
        pytest.fail("stage-out waited on a FIFO among the job's results")
    summary, refused = outcome
    assert not isinstance(summary, StagingError), summary.message
    assert refused.message.endswith("out/pipe is no longer a regular file (a FIFO or device put in its place?)")
    assert summary.objects == 1
    if destination.startswith("s3://"):
        assert sent == {"run/a.txt": b"result"}
    else:
        assert sorted(os.listdir(job / "keep")) == ["a.txt"]
    assert any("pipe" in note and "not a regular file" in note for note in notes), notes


def _fake_listing(monkeypatch, objects: dict[str, bytes]) -> None:
    """obstore's listing and small GETs over ``objects`` (key -> body)."""
    import obstore

    when = datetime(2025, 1, 1, tzinfo=timezone.utc)
    listing = [{"path": key, "size": len(body), "e_tag": f'"{hashlib.md5(body).hexdigest()}"', "last_modified": when}
               for key, body in objects.items()]
    monkeypatch.setattr(transfer, "_list_prefix", lambda store, location, profile: [
        meta for meta in listing if meta["path"].startswith(location.key)])
    monkeypatch.setattr(obstore, "get", lambda store, key, options=None: _FakeResult(
        objects[key], hashlib.md5(objects[key]).hexdigest()))
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())


def test_stage_in_never_writes_through_a_link_inside_dest(tmp_path, monkeypatch):
    """Keys are hostile, and so is what a previous job left in DEST: a directory link inside
    DEST (input/sub -> elsewhere) would take the object sub/x out of DEST."""
    from berth.staging.locations import parse_transfer

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = tmp_path / "job"
    (job / "input").mkdir(parents=True)
    (job / "input" / "sub").symlink_to(elsewhere)
    _fake_listing(monkeypatch, {"data/sub/x": b"payload", "data/top.txt": b"top"})
    with pytest.raises(StagingError) as caught:
        transfer.stage_in((parse_transfer("s3://bucket/data/:input/", "in"),), _profile(), str(job))
    assert "input/sub" in caught.value.message and "symbolic link" in caught.value.message
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("item", ["s3://bucket/data/:input/", "s3://bucket/data/x:input/", "s3://bucket/data/x:input/x",
                                  "s3://bucket/data/:input/deeper/", "URL:input/", "out/:input/", "out/x:input/x"])
def test_a_dest_the_job_turned_into_a_link_is_not_written_through(tmp_path, monkeypatch, item):
    """A job's container can write the job's directory: it replaced ``input`` (a relative DEST)
    with a link to a host directory it does not see, and stage-out wrote the job's files there
    (stage-in: a bucket's objects), since links were refused only *below* DEST. Now, as for SRC,
    no link below the job's directory is followed on the way to a relative DEST."""
    from berth.staging.locations import parse_transfer

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = tmp_path / "job"
    (job / "out").mkdir(parents=True)
    (job / "out" / "x").write_bytes(b"result")
    (job / "input").symlink_to(elsewhere)
    _fake_listing(monkeypatch, {"data/x": b"payload"})
    monkeypatch.setattr(transfer, "_head", lambda store, location, profile: {
        "size": 7, "e_tag": hashlib.md5(b"payload").hexdigest(), "last_modified": datetime(2025, 1, 1, tzinfo=timezone.utc)})
    with _serving(_answering(b"payload")) as server:
        text = item.replace("URL", f"http://127.0.0.1:{server.server_address[1]}/x")
        with pytest.raises(StagingError) as caught:
            if item.startswith("out/"):
                transfer.stage_out((parse_transfer(text, "out"),), _profile(), str(job))
            else:
                transfer.stage_in((parse_transfer(text, "in"),), _profile(), str(job))
    assert os.listdir(elsewhere) == []
    assert f"{job}/input is a symbolic link in the job's directory" in caught.value.message, caught.value.message
    assert caught.value.hint.startswith("write the directory the link points to as DEST")


def test_a_dest_named_outside_the_job_may_be_reached_through_a_link(tmp_path, monkeypatch):
    """Outside the job's directory the path as typed is the user's choice (scratch linked into a
    home), for DEST as for SRC: only links below it are refused."""
    from berth.staging.locations import parse_transfer

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "linked").symlink_to(scratch)
    job = tmp_path / "job"
    job.mkdir()
    _fake_listing(monkeypatch, {"data/x": b"payload"})
    transfer.stage_in((parse_transfer(f"s3://bucket/data/:{tmp_path}/linked/input/", "in"),), _profile(), str(job))
    assert (scratch / "input" / "x").read_bytes() == b"payload"


def test_an_object_whose_name_is_as_long_as_the_file_system_allows_is_staged_in(tmp_path, monkeypatch):
    """S3 keys may be 1024 bytes; a last part of 238 to 255 bytes is a valid file name, and
    failed with 'File name too long' for the temporary file only."""
    from berth.staging.locations import parse_transfer

    name = "n" * 255
    _fake_listing(monkeypatch, {f"data/{name}": b"payload"})
    job = tmp_path / "job"
    job.mkdir()
    transfer.stage_in((parse_transfer("s3://bucket/data/:input/", "in"),), _profile(), str(job))
    assert os.listdir(job / "input") == [name] and (job / "input" / name).read_bytes() == b"payload"


def test_stage_in_replaces_a_link_at_the_destination_file_instead_of_following_it(tmp_path, monkeypatch):
    """A link where a file is to go is replaced by the file (rename does not follow it); the
    skip check must not take the link's target for the object, nor touch the target's time."""
    from berth.staging.locations import parse_transfer

    body = b"object body"
    target = tmp_path / "target.txt"
    target.write_bytes(b"x" * len(body))             # same size as the object
    os.utime(target, (1_735_689_600, 1_735_689_600))   # and the object's Last-Modified
    job = tmp_path / "job"
    (job / "input").mkdir(parents=True)
    (job / "input" / "f.txt").symlink_to(target)
    _fake_listing(monkeypatch, {"data/f.txt": body})
    summary = transfer.stage_in((parse_transfer("s3://bucket/data/:input/", "in"),), _profile(), str(job))
    assert (summary.objects, summary.skipped) == (1, 0)
    assert not os.path.islink(job / "input" / "f.txt") and (job / "input" / "f.txt").read_bytes() == body
    assert target.read_bytes() == b"x" * len(body)


def test_stage_out_to_a_host_directory_never_writes_through_a_link_inside_it(tmp_path):
    from berth.staging.locations import parse_transfer

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = tmp_path / "job"
    (job / "out" / "sub").mkdir(parents=True)
    (job / "out" / "sub" / "x.txt").write_text("x")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "sub").symlink_to(elsewhere)
    with pytest.raises(StagingError) as caught:
        transfer.stage_out((parse_transfer(f"out/:{tmp_path}/keep/", "out"),), _profile(), str(job))
    assert "keep/sub is a symbolic link inside DEST" in caught.value.message
    assert os.listdir(elsewhere) == []


def test_a_copy_refuses_a_link_swapped_in_for_a_planned_file(tmp_path):
    """As uploads do: the plan skipped links, and a link put in place of a planned file since
    (pointing at the user's credentials, say) is refused, never followed."""
    secret = tmp_path / "s3.toml"
    secret.write_text("secret_key = \"hush\"\n")
    link = tmp_path / "result.txt"
    link.symlink_to(secret)
    target = tmp_path / "keep" / "result.txt"
    runner = transfer._Runner(_profile(), None)
    with pytest.raises(StagingError, match="result.txt"):
        runner.copy(transfer._Put(str(link), secret.stat().st_size, None, "result.txt", str(target)))
    assert not target.exists()


def test_stage_out_reports_a_directory_it_cannot_read_instead_of_dropping_it(tmp_path, monkeypatch):
    """os.walk skips a directory it cannot list unless told otherwise: the job's files in it
    were silently left behind, and the stage-out reported success."""
    from berth.staging.locations import parse_transfer

    job = tmp_path / "job"
    (job / "out" / "locked").mkdir(parents=True)
    (job / "out" / "locked" / "result.h5").write_bytes(b"r")
    (job / "out" / "log.txt").write_bytes(b"l")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("/locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    sent = _record_puts(monkeypatch)
    with pytest.raises(StagingError) as caught:
        transfer.stage_out((parse_transfer("out/:s3://bucket/r/", "out"),), _profile(), str(job))
    assert "out/locked" in caught.value.message and "permission denied" in caught.value.message.lower()
    assert sent == {}


def _certificates(where) -> dict[str, str]:
    """Two CAs (A, B) and a server certificate for 127.0.0.1 signed by A (openssl CLI)."""
    import subprocess

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=where)

    for ca in ("a", "b"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=test CA {ca}",
                "-keyout", f"ca-{ca}.key", "-out", f"ca-{ca}.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr")
    (where / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-a.pem", "-CAkey", "ca-a.key", "-CAcreateserial",
            "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return {name: str(where / f"{name}.pem") for name in ("ca-a", "ca-b", "server")} | {
        "server-key": str(where / "server.key")}


def _answering(body: bytes) -> type:
    """A request handler answering every GET with 200 and ``body``."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    return Handler


@contextlib.contextmanager
def _serving(handler: type, certs: dict | None = None):
    """A loopback HTTP server (HTTPS with ``certs``' server key) for the block's duration."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if certs is not None:
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs["server"], certs["server-key"])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _listing_server(page, pages_served: list[int]) -> type:
    """A loopback S3 endpoint (path style) whose ListObjectsV2 answers ``page(n)`` -> (keys,
    truncated) for its n-th page (from 0) and counts the pages in ``pages_served``; any other
    request is 404."""
    from urllib.parse import parse_qs, urlsplit

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server's naming
            if "list-type" not in parse_qs(urlsplit(self.path).query):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            keys, truncated = page(len(pages_served))
            pages_served.append(len(keys))
            contents = "".join(f"<Contents><Key>{key}</Key><LastModified>2025-01-01T00:00:00.000Z</LastModified>"
                               "<ETag>&quot;0cc175b9c0f1b6a831c399e269772661&quot;</ETag><Size>1</Size></Contents>"
                               for key in keys)
            body = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bucket</Name>'
                    f"<Prefix>data/</Prefix><KeyCount>{len(keys)}</KeyCount><MaxKeys>1000</MaxKeys>"
                    f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
                    + ("<NextContinuationToken>again</NextContinuationToken>" if truncated else "")
                    + contents + "</ListBucketResult>").encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    return Handler


@pytest.mark.parametrize("endless", ["repeating", "growing"])
def test_a_listing_that_never_ends_is_stopped(tmp_path, monkeypatch, endless):
    """A hostile S3 endpoint answered every ListObjectsV2 page 'truncated, continue with token
    X': obstore asks again for ever (measured: ~110 pages a second), and berth kept every object
    in a list until the node ran out of memory. A page that repeats keys already listed stops
    the listing at once; one that keeps bringing new keys stops at MAX_LISTED_OBJECTS. (The
    fake ends after 40 pages, so that the test ends before the fix too.)"""
    from berth.staging.locations import parse_transfer

    monkeypatch.setattr(transfer, "MAX_LISTED_OBJECTS", 2500, raising=False)
    served: list[int] = []

    def page(n):
        first = 0 if endless == "repeating" else n * 1000
        return [f"data/k{i:08d}" for i in range(first, first + 1000)], n < 40
    with _serving(_listing_server(page, served)) as server:
        profile = S3Profile("p", endpoint=f"http://127.0.0.1:{server.server_address[1]}", access_key="A",
                            secret_key="S", addressing_style="path")
        with pytest.raises(StagingError) as caught:
            transfer.stage_in((parse_transfer("s3://bucket/data/:input/", "in"),), profile, str(tmp_path))
    # (One page more than needed, in case the library ever reads a page ahead.)
    if endless == "repeating":
        assert "listed the key 'data/k00000000' twice" in caught.value.message, caught.value.message
        assert len(served) <= 3, served
    else:
        assert "more than 2500 objects under s3://bucket/data/" in caught.value.message, caught.value.message
        assert len(served) <= 4, served
    assert not (tmp_path / "input").exists()


@pytest.mark.parametrize("answer, words", [
    ("lying", "the connection to http://127.0.0.1:"),           # Content-Length 7, 3 bytes, then closed
    ("short", "the object changed during the transfer (7 bytes listed, 3 now)"),  # a 200 of 3 bytes
])
def test_a_200_with_a_short_body_leaves_no_file(tmp_path, answer, words):
    """A hostile or broken endpoint answers the GET of a 7-byte object with 200 and 3 bytes
    (announced as 7, or as 3): the real library, end to end; nothing is renamed into DEST."""
    from berth.staging.locations import parse_transfer

    etag = hashlib.md5(b"payload").hexdigest()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _head(self, length):
            self.send_response(200)
            for name, value in (("Content-Length", length), ("ETag", f'"{etag}"'),
                                ("Last-Modified", "Wed, 01 Jan 2025 00:00:00 GMT")):
                self.send_header(name, value)
            self.end_headers()

        def do_HEAD(self):  # noqa: N802 - http.server's naming
            self._head("7")

        def do_GET(self):  # noqa: N802
            self._head("7" if answer == "lying" else "3")
            self.wfile.write(b"pay")
            self.close_connection = True

        def log_message(self, *args):
            pass

    with _serving(Handler) as server:
        profile = S3Profile("p", endpoint=f"http://127.0.0.1:{server.server_address[1]}", access_key="A",
                            secret_key="S", addressing_style="path")
        with pytest.raises(StagingError) as caught:
            transfer.stage_in((parse_transfer("s3://bucket/data/x:input/x", "in"),), profile, str(tmp_path))
    assert words in caught.value.message, caught.value.message
    assert os.listdir(tmp_path / "input") == []


def test_an_https_stage_in_adds_the_profiles_ca_bundle_to_the_system_roots(tmp_path, monkeypatch):
    """docs/staging.md: ca_bundle is added to the system's trusted roots. For https:// sources
    it replaced them (urllib3's ca_certs): a profile with a site CA could no longer fetch from
    any public server."""
    from berth.staging.locations import parse_transfer

    certs = _certificates(tmp_path)
    with _serving(_answering(b"hello\n"), certs) as server:
        # The "system" roots trust CA A (OpenSSL reads SSL_CERT_FILE); the profile adds CA B.
        monkeypatch.setenv("SSL_CERT_FILE", certs["ca-a"])
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        runner = transfer._Runner(_profile(ca_bundle=certs["ca-b"]), None)
        url = f"https://127.0.0.1:{server.server_address[1]}/data.txt"
        size, _ = runner.fetch_url(parse_transfer(f"{url}:in/", "in"), str(tmp_path))
        assert (size, (tmp_path / "in" / "data.txt").read_bytes()) == (6, b"hello\n")
        # And the profile's CA alone still verifies nothing it did not sign.
        monkeypatch.setenv("SSL_CERT_FILE", certs["ca-b"])
        with pytest.raises(StagingError, match="certificate is not trusted"):
            transfer._Runner(_profile(ca_bundle=certs["ca-b"]), None).fetch_url(
                parse_transfer(f"{url}:again/", "in"), str(tmp_path))
        assert not (tmp_path / "again").exists() or os.listdir(tmp_path / "again") == []


def test_a_presigned_urls_signature_is_never_printed(tmp_path):
    """A presigned URL's query is a credential for the object. The summary lines (terminal,
    job log) and --json carried the item as typed, signature and access key id included; a
    malformed item's error message too."""
    from berth.errors import UsageError
    from berth.staging.locations import parse_transfer

    with _serving(_answering(b"ok")) as server:
        query = "AWSAccessKeyId=AKIDSECRET&Signature=SIGSECRET%3D&Expires=1"
        url = f"http://127.0.0.1:{server.server_address[1]}/d/obj.txt?{query}"
        summary = transfer.stage_in((parse_transfer(f"{url}:in/", "in"),), _profile(), str(tmp_path))
    assert (tmp_path / "in" / "obj.txt").read_bytes() == b"ok"
    shown = "\n".join(summary.lines()) + json.dumps(summary.to_dict())
    assert "obj.txt" in shown and "SECRET" not in shown, shown
    with pytest.raises(UsageError) as caught:
        parse_transfer(f"https://example.org/x?{query}:s3://bucket/y", "in")
    assert "SECRET" not in caught.value.message and "example.org/x" in caught.value.message, caught.value.message


def test_a_small_object_that_grew_since_the_listing_is_not_read_into_memory(tmp_path, monkeypatch):
    """Objects below multipart_threshold are read whole into memory: one replaced by a huge
    one between the listing and the GET (or a listing that lies) was read whole too. The size
    the GET answers is checked before the body is taken."""
    import obstore

    class Huge:
        meta = {"e_tag": '"0123456789abcdef0123456789abcdef"', "size": 64 << 30}

        def bytes(self):
            raise AssertionError("the whole body was read")

    monkeypatch.setattr(obstore, "get", lambda store, key, options=None: Huge())
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())
    runner = transfer._Runner(_profile(), None)
    with pytest.raises(StagingError, match="changed"):
        runner.download(_get(tmp_path, b"x" * 1000, "0123456789abcdef0123456789abcdef"))
    assert os.listdir(tmp_path / "out") == []


def test_a_small_file_that_grew_since_the_plan_is_not_read_whole_nor_sent(tmp_path, monkeypatch):
    """A file planned below multipart_threshold was read whole (however large it had grown)
    and sent before its size was compared with the plan."""
    sent = _record_puts(monkeypatch)
    path = tmp_path / "log.txt"
    path.write_bytes(b"y" * (2 * MIB))
    runner = transfer._Runner(_profile(), None)
    with pytest.raises(StagingError, match="changed size while it was uploaded"):
        runner.upload(transfer._Put(str(path), 10, "bucket", "log.txt"))
    assert sent == {}


def test_a_file_that_vanishes_while_stage_out_plans_fails_its_item_not_the_others(tmp_path, monkeypatch):
    """An OSError while planning one item (a file removed between the directory listing and
    its lstat) escaped stage_out as a bare OSError: the items after it were never sent, and
    nothing listed what did not arrive."""
    from berth.staging.locations import parse_transfer

    job = tmp_path / "job"
    (job / "a").mkdir(parents=True)
    (job / "a" / "vanished.txt").write_text("v")
    (job / "b.txt").write_text("b")
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        if str(path).endswith("vanished.txt"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat)
    sent = _record_puts(monkeypatch)
    with pytest.raises(StagingError) as caught:
        transfer.stage_out((parse_transfer("a/:s3://bucket/r/", "out"), parse_transfer("b.txt:s3://bucket/r/", "out")),
                           _profile(), str(job))
    assert sent == {"r/b.txt": b"b"}
    assert "a/:s3://bucket/r/" in caught.value.message and "vanished.txt" in caught.value.message


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x/..", "http://127.0.0.1:9/.", "http://127.0.0.1:9/x/.?a=b"])
def test_a_url_whose_last_part_is_no_file_name_is_refused_clearly(tmp_path, url):
    """DEST a directory and the URL ending in '..' or '.': berth tried to rename its
    temporary file onto DEST's parent ("in/..: Device or resource busy (....tmp)")."""
    from berth.staging.locations import parse_transfer

    runner = transfer._Runner(_profile(), None)
    with pytest.raises(StagingError) as caught:
        runner.fetch_url(parse_transfer(f"{url}:in/", "in"), str(tmp_path))
    assert "no file name" in caught.value.message and "DEST" in caught.value.hint, caught.value.message
    assert "a=b" not in caught.value.message


@pytest.mark.parametrize("key", ["data/..", "data/."])
def test_an_object_whose_key_ends_in_no_file_name_is_refused_clearly(tmp_path, monkeypatch, key):
    """As for a URL: DEST a directory and the key's last part '..' or '.' (S3 allows both);
    berth tried to rename its temporary file onto DEST's parent or DEST itself ("Device or
    resource busy (....tmp)")."""
    import obstore

    from berth.staging.locations import parse_transfer

    body = b"payload"
    head = {"size": len(body), "e_tag": f'"{hashlib.md5(body).hexdigest()}"',
            "last_modified": datetime(2025, 1, 1, tzinfo=timezone.utc)}
    monkeypatch.setattr(transfer, "_head", lambda store, location, profile: head)
    monkeypatch.setattr(obstore, "get", lambda store, k, options=None: _FakeResult(body, head["e_tag"]))
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())
    (tmp_path / "in").mkdir()
    with pytest.raises(StagingError) as caught:
        transfer.stage_in((parse_transfer(f"s3://bucket/{key}:in/", "in"),), _profile(), str(tmp_path))
    assert "no file name" in caught.value.message and "DEST" in caught.value.hint, caught.value.message
    assert os.listdir(tmp_path) == ["in"] and os.listdir(tmp_path / "in") == []


def test_a_linked_directory_inside_a_staged_out_directory_is_noted_not_skipped_silently(tmp_path, monkeypatch):
    """os.walk does not descend into a directory link (right: links are never followed) but
    says nothing: the files behind it were left out without the note a file link gets."""
    from berth.staging.locations import parse_transfer

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "big.h5").write_bytes(b"h5")
    job = tmp_path / "job"
    (job / "out").mkdir(parents=True)
    (job / "out" / "log.txt").write_text("l")
    (job / "out" / "data").symlink_to(scratch)
    sent = _record_puts(monkeypatch)
    notes: list[str] = []
    summary = transfer.stage_out((parse_transfer("out/:s3://bucket/r/", "out"),), _profile(), str(job), notes=notes)
    assert (summary.objects, sorted(sent)) == (1, ["r/log.txt"])
    assert any("out/data" in note and "symbolic link" in note for note in notes), notes


def test_an_https_stage_in_is_not_redirected_to_plain_http(tmp_path, monkeypatch):
    """An https:// source is verified by TLS alone (no checksum): urllib3 followed a redirect to
    http:// and the file arrived over plain text, unverified, without a word."""
    from berth.staging.locations import parse_transfer

    certs = _certificates(tmp_path)

    plain_handler = _answering(b"tampered\n")
    with _serving(plain_handler) as plain:
        class Redirect(plain_handler):
            def do_GET(self):  # noqa: N802
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{plain.server_address[1]}/data.txt")
                self.send_header("Content-Length", "0")
                self.end_headers()

        with _serving(Redirect, certs) as secure:
            monkeypatch.setenv("SSL_CERT_FILE", certs["ca-a"])
            monkeypatch.delenv("SSL_CERT_DIR", raising=False)
            runner = transfer._Runner(_profile(), None)
            with pytest.raises(StagingError) as caught:
                runner.fetch_url(parse_transfer(f"https://127.0.0.1:{secure.server_address[1]}/data.txt:in/", "in"),
                                 str(tmp_path))
            assert "plain http" in caught.value.message, caught.value.message
            assert not (tmp_path / "in" / "data.txt").exists()


@pytest.mark.parametrize("length", ["abc", "7, 7", "-7"])
def test_an_https_sources_content_length_that_is_no_number_is_no_traceback(tmp_path, length):
    """A hostile server's ``Content-Length: abc`` (or a repeated one) made int() raise
    ValueError out of the stage-in: a traceback, where urllib3 and http.client both read such a
    length as unknown and the body to the end of the connection."""
    from berth.staging.locations import parse_transfer

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", length)
            self.end_headers()
            self.wfile.write(b"payload")  # HTTP/1.0: the connection closes after it

        def log_message(self, *args):
            pass

    with _serving(Handler) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.txt"
        size, _ = transfer._Runner(_profile(), None).fetch_url(parse_transfer(f"{url}:in/", "in"), str(tmp_path))
    assert (size, (tmp_path / "in" / "data.txt").read_bytes()) == (7, b"payload")


def _record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync (of a regular file or a directory) and rename, in order."""
    import stat

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("rename", str(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.parametrize("size", [1000, 9 * MIB], ids=["small", "ranged"])
def test_a_staged_in_object_is_on_disk_before_its_name_and_its_mode_follows_the_umask(tmp_path, monkeypatch, size):
    """Staged files are user data in the job's directory and the skip rule trusts a file's size
    and time without reading it: a download renamed before its blocks were written could, after
    a crash, be skipped by the requeued job and read as zeros. Downloads were never fsynced,
    and they were created 0644 (minus the umask) where copies and https sources get what
    open() gives (0666 minus the umask)."""
    data = os.urandom(size)
    etag = _multipart_etag_of(data, 5 * MIB) if size > 4 * MIB else hashlib.md5(data).hexdigest()
    _fake_get(monkeypatch, data, etag)
    get = _get(tmp_path, data, etag)
    os.makedirs(os.path.dirname(get.path))
    events = _record_fsyncs_and_renames(monkeypatch)
    old = os.umask(0o002)
    try:
        assert transfer._Runner(_profile(), None).download(get) is True
    finally:
        os.umask(old)
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"], events
    assert events[0] == ("fsync", "file") and events[2] == ("fsync", "dir")
    assert events[1][1].endswith("obj.bin")
    assert stat_mode(get.path) == 0o664
    assert (tmp_path / "out" / "obj.bin").read_bytes() == data and os.listdir(tmp_path / "out") == ["obj.bin"]


def test_host_copies_and_https_sources_are_on_disk_before_their_names(tmp_path, monkeypatch):
    from berth.staging.locations import parse_transfer

    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "result.txt").write_text("result\n")
    events = _record_fsyncs_and_renames(monkeypatch)
    transfer.stage_out((parse_transfer(f"result.txt:{tmp_path}/keep/", "out"),), _profile(), str(tmp_path / "job"))
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"], events
    assert (tmp_path / "keep" / "result.txt").read_text() == "result\n"
    events.clear()
    with _serving(_answering(b"ok")) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/d/obj.txt"
        transfer.stage_in((parse_transfer(f"{url}:in/", "in"),), _profile(), str(tmp_path))
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"], events
    assert (tmp_path / "in" / "obj.txt").read_bytes() == b"ok"


KILLED_STAGE_IN = """\
import os, sys
if sys.argv[3] == "none":  # a file system without O_TMPFILE (NFS, Lustre)
    real_open = os.open
    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)
    os.open = no_tmpfile
from berth.staging import transfer
from berth.staging.locations import parse_transfer
from berth.staging.profiles import S3Profile
profile = S3Profile("p", endpoint="http://127.0.0.1:9", access_key="A", secret_key="S")
transfer.stage_in((parse_transfer(sys.argv[1] + ":in/", "in"),), profile, sys.argv[2])
"""


@pytest.mark.parametrize("tmpfile", ["O_TMPFILE", "none"])
def test_a_stage_in_killed_while_it_downloads_leaves_no_temporary_file(tmp_path, monkeypatch, tmpfile):
    """A stage-in killed with its job (SIGKILL) left its temporary file, ``.NAME.RANDOM.tmp``,
    in the job's directory, and every later kill another. The file has no name until it is
    complete (O_TMPFILE, on the file systems that have it: this test's tmp directory). Where
    the file system has none (NFS, Lustre: forced here), the named file a kill leaves says its
    writer, and the next stage-in into the directory removes it (the writer is dead)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.harness.procfiles import bytes_written_in

    sent, release = threading.Event(), threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"x" * 65536)
            self.wfile.flush()
            sent.set()
            release.wait(60)

        def log_message(self, *args):
            pass

    try:
        os.close(os.open(tmp_path, os.O_TMPFILE | os.O_WRONLY))
    except OSError as exc:
        pytest.skip(f"the test's file system has no O_TMPFILE ({exc.strerror}): berth names the file there")
    job = tmp_path / "job"
    job.mkdir()
    with _serving(Stalling) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/d/obj.txt"
        process = subprocess.Popen([sys.executable, "-c", KILLED_STAGE_IN, url, str(job), tmpfile])
        try:
            deadline = time.monotonic() + 60
            while not (sent.is_set() and bytes_written_in(process.pid, job / "in") is not None):  # named or not
                assert time.monotonic() < deadline and process.poll() is None, "the stage-in never wrote"
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        finally:
            release.set()
            if process.poll() is None:
                process.kill()
                process.wait()
    if tmpfile == "O_TMPFILE":
        assert os.listdir(job / "in") == []
        return
    left = os.listdir(job / "in")
    assert len(left) == 1 and left[0].startswith(".obj.txt.") and f".berth-{process.pid}-" in left[0], left
    real_open = os.open

    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    from berth.staging.locations import parse_transfer

    monkeypatch.setattr(os, "open", no_tmpfile)
    with _serving(_answering(b"ok")) as server:  # another object into the same directory
        url = f"http://127.0.0.1:{server.server_address[1]}/d/other.txt"
        transfer.stage_in((parse_transfer(f"{url}:in/", "in"),), _profile(), str(job))
    assert os.listdir(job / "in") == ["other.txt"]


def stat_mode(path) -> int:
    return os.stat(path).st_mode & 0o7777


@pytest.mark.parametrize("direction", ["in", "out"])
def test_a_host_copy_of_a_private_file_stays_private(tmp_path, direction):
    """A copy got 0666 minus the umask whatever its source's mode: a job's 0600 result (a key,
    a token) staged out to a shared project directory, or a private input staged into the job's
    directory, became readable by every user (0644). Like cp: no permission the source lacks."""
    from berth.staging.locations import parse_transfer

    job, host = tmp_path / "job", tmp_path / "host"
    job.mkdir()
    host.mkdir()
    source = (job if direction == "out" else host) / "private.key"
    source.write_text("secret\n")
    os.chmod(source, 0o600)
    (job if direction == "out" else host).joinpath("shared.txt").write_text("shared\n")
    os.chmod(source.with_name("shared.txt"), 0o644)
    old_umask = os.umask(0o022)
    try:
        if direction == "out":
            transfer.stage_out((parse_transfer(f"private.key:{host}/keep/", "out"),
                                parse_transfer(f"shared.txt:{host}/keep/", "out")), _profile(), str(job))
            copied = host / "keep"
        else:
            transfer.stage_in((parse_transfer(f"{host}/:input/", "in"),), _profile(), str(job))
            copied = job / "input"
    finally:
        os.umask(old_umask)
    assert (copied / "private.key").read_text() == "secret\n"
    assert stat_mode(copied / "private.key") == 0o600 and stat_mode(copied / "shared.txt") == 0o644


def _failing_puts(monkeypatch, failures: list[Exception]) -> list[str]:
    """obstore.put that raises ``failures`` one by one, then stores; returns the keys tried."""
    import obstore

    tried: list[str] = []

    def put(store, key, file, use_multipart=None, chunk_size=None, max_concurrency=None):
        tried.append(key)
        if failures:
            raise failures.pop(0)
        return {"e_tag": f'"{hashlib.md5(bytes(file)).hexdigest()}"'}

    monkeypatch.setattr(obstore, "put", put)
    monkeypatch.setattr(transfer, "make_store", lambda profile, bucket: object())
    return tried


def test_a_refused_stage_out_is_not_sent_again(tmp_path, monkeypatch):
    """berth.retry's rule: a refusal cannot change by trying again. Stage-out sent every failed
    object again in three rounds, whatever the failure (403, a missing bucket, a full disk),
    and waited between them before it said so."""
    from obstore import exceptions as ox

    from berth.staging.locations import parse_transfer

    (tmp_path / "a.txt").write_text("a")
    refused = ox.PermissionDeniedError("... status code: 403 Forbidden: <Code>AccessDenied</Code>")
    tried = _failing_puts(monkeypatch, [refused] * 10)
    slept = _no_waiting(monkeypatch)
    with pytest.raises(StagingError) as caught:
        transfer.stage_out((parse_transfer("a.txt:s3://bucket/r/", "out"),), _profile(), str(tmp_path))
    assert (tried, slept) == (["r/a.txt"], [])
    assert "1 object(s) did not arrive: s3://bucket/r/a.txt" in caught.value.message
    assert "refused the request (AccessDenied)" in caught.value.message


def test_a_stage_out_that_meets_the_services_5xx_is_sent_again_with_backoff(tmp_path, monkeypatch):
    from obstore import exceptions as ox

    from berth.staging.locations import parse_transfer

    (tmp_path / "a.txt").write_text("a")
    busy = ox.GenericError("... status code: 503 Service Unavailable: <Code>SlowDown</Code>")
    tried = _failing_puts(monkeypatch, [busy, busy])
    slept = _no_waiting(monkeypatch)
    summary = transfer.stage_out((parse_transfer("a.txt:s3://bucket/r/", "out"),), _profile(), str(tmp_path))
    assert (summary.objects, summary.failed, tried) == (1, [], ["r/a.txt"] * 3)
    # Full jitter below the policy's exponential bound: uniform(0, 0.5), then uniform(0, 1).
    assert len(slept) == 2 and 0 <= slept[0] <= 0.5 and 0 <= slept[1] <= 1.0


def test_obstore_retries_with_the_staging_policys_numbers(monkeypatch):
    from obstore import store as obstore_store

    seen = {}

    def s3store(bucket, **kwargs):
        seen.update(kwargs["retry_config"])

    monkeypatch.setattr(obstore_store, "S3Store", s3store)
    transfer.make_store(_profile(), "bucket")
    policy = transfer.STAGING_RETRY
    assert seen["max_retries"] == policy.attempts - 1
    assert (seen["backoff"]["init_backoff"].total_seconds(), seen["backoff"]["max_backoff"].total_seconds()) == \
        (policy.base_s, policy.cap_s)


@pytest.mark.parametrize("retry_after, wanted", [("2", None), ("86400", "asked berth to wait 86400 s")])
def test_an_https_sources_retry_after_follows_berths_retry_rule(tmp_path, monkeypatch, retry_after, wanted):
    """berth.retry: a server's Retry-After up to ``max_retry_after_s`` is waited for; a longer
    one stops at once, naming the wait. urllib3, which retries an https source's requests,
    slept whatever the server asked (a 503 with ``Retry-After: 86400`` held the job's allocation
    a day per attempt); capped at 60 s, it asked again a server that said a day."""
    import urllib3.util.retry
    from berth.staging.locations import parse_transfer

    answers = iter([503, 503])
    statuses = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            status = next(answers, 200)
            statuses.append(status)
            body = b"late\n" if status == 200 else b""
            self.send_response(status)
            if status == 503:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    waits: list[float] = []
    monkeypatch.setattr(urllib3.util.retry.time, "sleep", waits.append)  # urllib3's own waits, recorded
    with _serving(Handler) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.txt"
        fetch = lambda: transfer._Runner(_profile(), None).fetch_url(parse_transfer(f"{url}:in/", "in"),  # noqa: E731
                                                                      str(tmp_path))
        if wanted is None:
            size, _ = fetch()
            assert (size, (tmp_path / "in" / "data.txt").read_bytes()) == (5, b"late\n")
            assert (statuses, waits) == ([503, 503, 200], [2.0, 2.0])
        else:
            with pytest.raises(StagingError) as caught:
                fetch()
            assert (statuses, waits) == ([503], [])
            assert caught.value.message == (f"--stage-in '{url}': the server answered HTTP 503 and {wanted} "
                                            "before trying again (Retry-After), longer than berth waits between "
                                            "attempts (60 s): stopped without retrying")
            assert caught.value.hint.startswith("try again after ")
            assert not (tmp_path / "in" / "data.txt").exists()


def _stage_in_with_a_session_token(server, tmp_path) -> None:
    """Stage s3://bucket/data/obj.bin in from the loopback ``server`` with session credentials."""
    from berth.staging.locations import parse_transfer

    profile = S3Profile("p", endpoint=f"http://127.0.0.1:{server.server_address[1]}", access_key="A",
                        secret_key="S", session_token="SESSION-SECRET", addressing_style="path")
    transfer.stage_in((parse_transfer("s3://bucket/data/obj.bin:obj.bin", "in"),), profile, str(tmp_path))


def _redirecting(status: int, target: str) -> type:
    """A handler answering every GET and HEAD with ``status`` to the same path on ``target``."""
    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(status)
            self.send_header("Location", f"{target}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_HEAD = do_GET

        def log_message(self, *args):
            pass
    return Redirecting


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_session_credentials_never_follow_a_redirect_to_another_host(tmp_path, status):
    """obstore (reqwest) follows redirects and drops only ``Authorization`` on the way to
    another host: the session token (``x-amz-security-token``) went along to whatever host the
    endpoint named. berth makes every other host unreachable for the store (a proxy that refuses
    to connect, with the endpoint excluded), so the redirected request is never sent, and says
    why. The real library against a loopback endpoint that redirects to 127.0.0.2."""
    reached: list[dict] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            reached.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    elsewhere = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Elsewhere)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()

    try:
        with _serving(_redirecting(status, f"http://127.0.0.2:{elsewhere.server_address[1]}")) as server:
            with pytest.raises(StagingError) as caught:
                _stage_in_with_a_session_token(server, tmp_path)
    finally:
        elsewhere.shutdown()
        elsewhere.server_close()
    assert reached == []
    assert "redirected the request to another host" in caught.value.message, caught.value.message
    assert "s3://bucket/data/obj.bin" in caught.value.message
    assert not (tmp_path / "obj.bin").exists()


_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def test_an_endpoint_reached_through_the_sites_proxy_keeps_it(monkeypatch):
    """The guard against redirects replaces reqwest's proxy from the environment; where the
    endpoint itself goes through that proxy, the proxy stays (and the guard is left out), given
    to obstore explicitly: berth alone decides, reqwest reads no proxy variable."""
    def options(endpoint: str, profile: S3Profile | None = None) -> dict:
        profile = profile or S3Profile("p", endpoint=endpoint, access_key="A", secret_key="S")
        return transfer.make_store(profile, "bucket").client_options

    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.site:3128")
    monkeypatch.setenv("no_proxy", "s3.site.example,10.0.0.0/8")
    assert options("https://s3.example.org")["proxy_url"] == "http://proxy.site:3128"
    assert "proxy_excludes" not in options("https://s3.example.org")
    assert options("https://s3.site.example")["proxy_excludes"] == "s3.site.example"
    assert options("https://10.1.2.3:9000")["proxy_url"] == "http://127.0.0.1:0"  # CIDR: direct, guarded
    assert "proxy_url" not in options("", S3Profile("anon", endpoint="https://s3.site.example"))
    assert options("", S3Profile("anon", endpoint="https://s3.example.org"))["proxy_url"] == "http://proxy.site:3128"
    monkeypatch.setenv("https_proxy", "proxy.site:3128")  # no scheme: http, as curl and reqwest read it
    assert options("https://s3.example.org")["proxy_url"] == "http://proxy.site:3128"


def test_a_proxy_setting_that_is_no_url_is_refused_without_showing_it(monkeypatch):
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "http://user:PROXY-SECRET@proxy.site:99999")
    with pytest.raises(StagingError) as caught:
        transfer.make_store(S3Profile("p", endpoint="https://s3.example.org", access_key="A", secret_key="S"),
                            "bucket")
    assert "is not a usable URL" in caught.value.message
    assert "PROXY-SECRET" not in caught.value.message + (caught.value.hint or "")


@pytest.mark.parametrize("environment, proxied", [
    ({"no_proxy": "127.0.0.1/32"}, False),                       # CIDR: urllib proxied it, reqwest did not
    ({"no_proxy": "127.0.0.0/8"}, False),
    ({"no_proxy": "*"}, False),
    ({"NO_PROXY": "127.0.0.1"}, False),
    ({"NO_PROXY": "other.example", "no_proxy": "127.0.0.1"}, False),
    ({"NO_PROXY": "127.0.0.1", "no_proxy": "other.example"}, True),  # reqwest read NO_PROXY, urllib no_proxy
    ({"no_proxy": "other.example"}, True),
], ids=["cidr-32", "cidr-8", "star", "upper-only", "lower-bypasses", "upper-bypasses", "proxied"])
def test_the_session_token_reaches_no_other_host_whatever_the_proxy_variables_say(tmp_path, monkeypatch,
                                                                                  environment, proxied):
    """berth decides whether the endpoint goes through the environment's proxy and obstore does
    exactly that. Before, berth judged by urllib (no CIDR in no_proxy, no_proxy over NO_PROXY)
    and reqwest by its own reading (CIDR, NO_PROXY over no_proxy): where urllib said proxied and
    reqwest direct, the guard was off and the endpoint's redirect to another host went through
    the proxy with x-amz-security-token (review10). A real proxy process (it answers itself) on
    127.0.0.3, an endpoint on 127.0.0.1 redirecting to 127.0.0.2."""
    from urllib.parse import urlsplit

    seen: list[tuple[str, str | None]] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            seen.append((self.path, self.headers.get("x-amz-security-token")))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.3", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.3:{proxy.server_address[1]}")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    try:
        with _serving(_redirecting(307, "http://127.0.0.2:9")) as server:
            endpoint = f"127.0.0.1:{server.server_address[1]}"
            with pytest.raises(BerthError) as caught:
                _stage_in_with_a_session_token(server, tmp_path)
    finally:
        proxy.shutdown()
        proxy.server_close()
    # Only the endpoint's own requests may reach the proxy, and only where berth sends it there.
    assert [urlsplit(path).netloc for path, _ in seen if urlsplit(path).netloc != endpoint] == [], seen
    assert bool(seen) == proxied, seen
    if not proxied:
        assert "redirected the request to another host" in caught.value.message, caught.value.message


def test_an_https_source_that_trickles_is_stopped_by_the_stall_rule(tmp_path):
    """A server sending a byte every 50 ms is never silent for the profile's read timeout, and
    the stage-in waited for it as long as it kept going (a job's allocation held for good):
    berth.retry's stall rule stops it (fewer than 64 KiB in timeout_s), names the URL, and
    leaves no file."""
    import time

    from berth.staging.locations import parse_transfer

    class Trickling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                self.wfile.write(b"x" * 100)
                for _ in range(2000):
                    time.sleep(0.05)
                    self.wfile.write(b"x")
                    self.wfile.flush()
            except OSError:
                pass

        def log_message(self, *args):
            pass
    started = time.monotonic()
    with _serving(Trickling) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/d/slow.bin"
        with pytest.raises(StagingError) as caught:
            transfer.stage_in((parse_transfer(f"{url}:in/", "in"),), _profile(timeout_s=1), str(tmp_path))
    assert time.monotonic() - started < 10
    assert "/d/slow.bin" in caught.value.message and "the download is stalled" in caught.value.message
    assert not (tmp_path / "in" / "slow.bin").exists()



@pytest.mark.parametrize("location", ["http://[::1/x", "http://other.example:99999/x", "http://other.example:abc/x"])
def test_a_redirect_to_a_url_berth_cannot_read_is_a_clear_error(tmp_path, location):
    """Python's URL parser raised ValueError on an IPv6 host without its ']' (a traceback), and
    urllib3's LocationParseError on a bad port was shown as its class name alone."""
    from berth.staging.locations import parse_transfer

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass
    with _serving(Redirect) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/d/f.txt"
        with pytest.raises(StagingError) as caught:
            transfer.stage_in((parse_transfer(f"{url}:in/", "in"),), _profile(), str(tmp_path))
    assert f"the server redirects to a URL berth cannot use ({location})" in caught.value.message
