"""One retry policy for registry traffic (issue 9): the attempts of one operation are bounded
across every loop that retries part of it, delays are jittered, the policy comes from the
settings, and what is not worth retrying is a typed error at once. Attempts are counted on a
scripted server."""

from __future__ import annotations

import io
import json
import threading

import pytest

from berth.config.settings import Settings
from berth.errors import AuthenticationError, ManifestUnknown, NotFound, RateLimited, RegistryError, RegistryUnreachable
from berth.image import pull
from berth.image.install import Descriptor
from berth.oci import mediatypes
from berth.oci.digest import Digest
from berth.oci.reference import Reference
from berth.registry.client import RegistryClient
from berth.registry.transport import RetryPolicy
from berth.store.store import Store
from tests.unit.registry_fake import FakeServer, Reply

BLOB = bytes(range(256)) * 64
BLOB_DIGEST = Digest.of(BLOB)
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
                       "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": "sha256:" + "a" * 64, "size": 2},
                       "layers": []}).encode()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.stop()


def policy(attempts: int, sleeps: list | None = None) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, sleep=(sleeps.append if sleeps is not None else lambda _s: None))


def client_for(server, retry: RetryPolicy) -> RegistryClient:
    return RegistryClient(server.host, insecure=True, timeout_s=5, retry=retry)


def alternating(*replies):
    """Answers cycle through ``replies`` forever."""
    count = [0]

    def handler(request):
        reply = replies[count[0] % len(replies)]
        count[0] += 1
        return reply
    return handler


def blob_gets(server) -> int:
    return len([r for r in server.requests if r.method == "GET" and "/blobs/" in r.path])


@pytest.mark.parametrize("attempts", [1, 4, 6])
def test_one_blob_gets_one_budget_across_every_retry_loop(server, tmp_path, attempts):
    # 503s (the transport's loop) and bodies cut mid-way (pull's resume loop) take turns: each
    # used to have its own count, so the attempts multiplied (6 x 6 = 36 with the defaults)
    server.handler = alternating(Reply(503), Reply(200, BLOB, drop_after=1000))
    store = Store(tmp_path / "store")
    store.require_writable()
    sleeps: list = []
    retry = policy(attempts, sleeps)
    descriptor = Descriptor("application/vnd.oci.image.layer.v1.tar", BLOB_DIGEST, len(BLOB))
    with client_for(server, retry) as client, pytest.raises((RegistryUnreachable, RegistryError)) as caught:
        pull.fetch_blob(client, store, Reference.parse(f"{server.host}/a/b:1"), descriptor, retry, None,
                        threading.Event())
    assert blob_gets(server) == attempts
    assert len(sleeps) == attempts - 1
    assert f"{attempts} attempts" in caught.value.message or attempts == 1


def test_a_blob_that_recovers_within_the_budget_is_stored(server, tmp_path):
    replies = [Reply(503), Reply(200, BLOB, drop_after=5000)]
    server.handler = lambda request: replies.pop(0) if replies else (
        Reply(206, BLOB[5000:], {"Content-Range": f"bytes 5000-{len(BLOB) - 1}/{len(BLOB)}"}))
    store = Store(tmp_path / "store")
    store.require_writable()
    retry = policy(3)
    descriptor = Descriptor("application/vnd.oci.image.layer.v1.tar", BLOB_DIGEST, len(BLOB))
    with client_for(server, retry) as client:
        fetched = pull.fetch_blob(client, store, Reference.parse(f"{server.host}/a/b:1"), descriptor, retry, None,
                                  threading.Event())
    assert fetched == len(BLOB) and store.blob_path(BLOB_DIGEST).read_bytes() == BLOB
    assert blob_gets(server) == 3
    assert server.requests[-1].header("Range") == "bytes=5000-"


def test_a_manifest_gets_one_budget_for_503s_and_cut_bodies(server):
    server.handler = alternating(Reply(503), Reply(200, MANIFEST, {"Content-Type": mediatypes.OCI_MANIFEST},
                                                   drop_after=10))
    with client_for(server, policy(5)) as client, pytest.raises((RegistryUnreachable, RegistryError)):
        client.get_manifest("a/b", "1")
    assert len(server.requests) == 5


def test_an_upload_gets_one_budget_for_all_its_sessions(server):
    def handler(request):
        if request.method == "HEAD":
            return Reply(404)
        if request.method == "POST":
            return Reply(202, headers={"Location": "/v2/a/blobs/uploads/session"})
        return Reply(503, b"busy")
    server.handler = handler
    with client_for(server, policy(3)) as client, pytest.raises(RegistryError, match="3 attempts"):
        client.upload_blob("a", BLOB_DIGEST, len(BLOB), io.BytesIO(BLOB))
    assert server.paths("PUT") and len(server.paths("PUT")) == 3
    assert len(server.paths("POST")) == 3


def test_an_upload_told_to_wait_beyond_the_cap_stops_at_once(server):
    """berth.retry: the upload's own loop (a PUT answered 429 starts a new session) stops when
    the registry asks for more than the policy waits, naming the wait, instead of opening new
    sessions after 60 s."""
    def handler(request):
        if request.method == "HEAD":
            return Reply(404)
        if request.method == "POST":
            return Reply(202, headers={"Location": "/v2/a/blobs/uploads/session"})
        return Reply(429, headers={"Retry-After": "7200"})
    server.handler = handler
    sleeps: list = []
    with client_for(server, policy(4, sleeps)) as client, pytest.raises(RateLimited) as caught:
        client.upload_blob("a", BLOB_DIGEST, len(BLOB), io.BytesIO(BLOB))
    assert (len(server.paths("POST")), len(server.paths("PUT")), sleeps) == (1, 1, [])
    assert "asked berth to wait 7200 s before trying again" in caught.value.message
    assert caught.value.hint.startswith("try again after ")


def test_an_upload_whose_put_fails_tls_is_not_retried(server):
    """berth.retry: a TLS failure is never retried. The upload's loop restarted the session
    after any RegistryUnreachable of its PUT, a TLS failure at the upload's Location (storage on
    another host with a certificate this node does not trust) included: every attempt of the
    budget, with its backoff, before the message."""
    def handler(request):
        if request.method == "HEAD":
            return Reply(404)
        if request.method == "POST":  # the upload goes on over TLS, which this plain server does not speak
            return Reply(202, headers={"Location": f"https://{server.host}/v2/a/blobs/uploads/session"})
        return Reply(500)
    server.handler = handler
    with client_for(server, policy(4)) as client, pytest.raises(RegistryUnreachable, match="TLS"):
        client.upload_blob("a", BLOB_DIGEST, len(BLOB), io.BytesIO(BLOB))
    assert len(server.paths("POST")) == 1


def test_delays_are_jittered_and_grow(server):
    seen: list[tuple[float, float]] = []

    def uniform(low, high):
        seen.append((low, high))
        return high / 2

    sleeps: list = []
    server.handler = alternating(Reply(500))
    retry = RetryPolicy(attempts=5, base_s=0.25, cap_s=1.0, sleep=sleeps.append, uniform=uniform)
    with client_for(server, retry) as client, pytest.raises(RegistryError):
        client.get_manifest("a/b", "1")
    assert seen == [(0.0, 0.25), (0.0, 0.5), (0.0, 1.0), (0.0, 1.0)]
    assert sleeps == [0.125, 0.25, 0.5, 0.5]


@pytest.mark.parametrize("reply, error, exit_code", [
    (Reply(401), AuthenticationError, 40),
    (Reply(403), AuthenticationError, 40),
    (Reply(404), ManifestUnknown, 30),
    (Reply(400), RegistryError, 4),
])
def test_what_retrying_cannot_fix_is_a_typed_error_at_once(server, reply, error, exit_code):
    server.handler = alternating(reply)
    with client_for(server, policy(6)) as client, pytest.raises(error) as caught:
        client.get_manifest("a/b", "1")
    assert type(caught.value) is error and caught.value.exit_code == exit_code
    assert len(server.requests) == 1


def test_rate_limiting_honors_retry_after_then_is_rate_limited(server):
    sleeps: list = []
    server.handler = alternating(Reply(429, headers={"Retry-After": "7"}))
    with client_for(server, RetryPolicy(attempts=3, sleep=sleeps.append, max_retry_after_s=30)) as client, \
            pytest.raises(RateLimited) as caught:
        client.blob_exists("a/b", BLOB_DIGEST)
    assert len(server.requests) == 3 and sleeps == [7.0, 7.0]
    assert caught.value.exit_code == 41 and "3 attempts" in caught.value.message


def test_a_missing_blob_is_not_found_at_once(server, tmp_path):
    server.handler = alternating(Reply(404))
    store = Store(tmp_path / "store")
    store.require_writable()
    descriptor = Descriptor("application/vnd.oci.image.layer.v1.tar", BLOB_DIGEST, len(BLOB))
    with client_for(server, policy(6)) as client, pytest.raises(NotFound):
        pull.fetch_blob(client, store, Reference.parse(f"{server.host}/a/b:1"), descriptor, client.retry, None,
                        threading.Event())
    assert blob_gets(server) == 1


@pytest.mark.parametrize("pull_retries", [0, 2, 9])
def test_the_policy_comes_from_the_settings(pull_retries):
    settings = Settings(pull_retries=pull_retries)
    client = pull.make_client(settings, Reference.parse("127.0.0.1:5000/a/b:1"), insecure=True)
    try:
        assert client.retry.attempts == pull_retries + 1
        assert client.transport.retry is client.retry
    finally:
        client.close()
