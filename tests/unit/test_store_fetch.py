"""Unit tests of pull's download loop and platform choice against a scripted fake registry
client: resume with Range after a cut, restart when Range is ignored, digest mismatch, retry
limit, registry policy."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import pytest

from berth.config.settings import Settings, SitePolicy
from berth.errors import DigestMismatch, PlatformNotFound, PolicyError, RegistryUnreachable, UsageError
from berth.image import platforms, pull
from berth.image.install import Descriptor
from berth.oci.digest import Digest
from berth.oci.reference import Reference
from berth.registry.transport import RetryPolicy
from berth.store.store import Store


class FakeResponse:
    def __init__(self, data: bytes, offset: int, cut_after: int | None) -> None:
        self.data, self.offset, self.cut_after = data, offset, cut_after

    def read_chunks(self, size=1 << 20, *, limit=None):
        sent = 0
        body = self.data[self.offset:]
        for start in range(0, len(body), 1000):
            if self.cut_after is not None and sent >= self.cut_after:
                raise RegistryUnreachable("connection lost (scripted)")
            chunk = body[start:start + 1000]
            sent += len(chunk)
            yield chunk


class FakeClient:
    """Serves one blob. ``cuts``: bytes to send before failing, one per request (None: all).
    ``honor_range``: False answers every request from byte 0."""

    def __init__(self, data: bytes, *, cuts=(), honor_range=True) -> None:
        self.data = data
        self.cuts = list(cuts)
        self.honor_range = honor_range
        self.requests: list[int] = []

    @contextmanager
    def open_blob(self, repository, digest, *, offset=0, budget=None):
        self.requests.append(offset)
        cut = self.cuts.pop(0) if self.cuts else None
        yield FakeResponse(self.data, offset if self.honor_range else 0, cut)


REF = Reference.parse("example.org/team/app:1")


def policy(retries: int) -> RetryPolicy:
    return RetryPolicy.with_retries(retries, sleep=lambda _s: None)


@pytest.fixture
def store(tmp_path) -> Store:
    created = Store(tmp_path / "store")
    created.require_writable()
    return created


def _descriptor(data: bytes) -> Descriptor:
    return Descriptor("application/vnd.oci.image.layer.v1.tar", Digest.of(data), len(data))


def test_mid_stream_cut_resumes_with_range(store):
    data = os.urandom(10_000)
    client = FakeClient(data, cuts=[3000, 4000])
    fetched = pull.fetch_blob(client, store, REF, _descriptor(data), policy(5), None, threading.Event())
    assert client.requests == [0, 3000, 7000]
    assert fetched == 10_000
    assert store.blob_path(Digest.of(data)).read_bytes() == data


def test_range_ignored_restarts_from_zero(store):
    data = os.urandom(10_000)
    client = FakeClient(data, cuts=[3000], honor_range=False)
    pull.fetch_blob(client, store, REF, _descriptor(data), policy(5), None, threading.Event())
    assert client.requests == [0, 3000]  # asked to resume, got the whole blob, started over
    assert store.blob_path(Digest.of(data)).read_bytes() == data


def test_partial_from_killed_process_is_resumed(store):
    data = os.urandom(10_000)
    digest = Digest.of(data)
    store.layout.partial_blob(digest).write_bytes(data[:6000])
    client = FakeClient(data)
    pull.fetch_blob(client, store, REF, _descriptor(data), policy(5), None, threading.Event())
    assert client.requests == [6000]
    assert store.blob_path(digest).read_bytes() == data


def test_corrupt_partial_gets_one_fresh_download(store):
    data = os.urandom(10_000)
    digest = Digest.of(data)
    store.layout.partial_blob(digest).write_bytes(b"\0" * 6000)  # garbage from elsewhere
    client = FakeClient(data)
    pull.fetch_blob(client, store, REF, _descriptor(data), policy(5), None, threading.Event())
    assert client.requests == [6000, 0]
    assert store.blob_path(digest).read_bytes() == data


def test_digest_mismatch_from_registry_keeps_nothing(store):
    data = os.urandom(10_000)
    descriptor = _descriptor(data)
    client = FakeClient(bytes(reversed(data)))  # same size, other content
    with pytest.raises(DigestMismatch) as caught:
        pull.fetch_blob(client, store, REF, descriptor, policy(5), None, threading.Event())
    assert str(REF) in caught.value.message and str(descriptor.digest) in caught.value.message
    assert not store.has_blob(descriptor.digest)
    assert list(store.layout.tmp_dir.iterdir()) == []


def test_retries_are_bounded_and_partial_kept_for_next_run(store):
    data = os.urandom(10_000)
    client = FakeClient(data, cuts=[1000, 0, 0, 0])
    with pytest.raises(RegistryUnreachable, match="failed after 4 attempts"):
        pull.fetch_blob(client, store, REF, _descriptor(data), policy(3), None, threading.Event())
    assert len(client.requests) == 4
    assert store.layout.partial_blob(Digest.of(data)).stat().st_size == 1000



def test_the_watched_writer_verifies_the_generation_it_stored(store):
    # pull._FollowedBlob trusts the download's one hash by the writer's generations
    # (store.BlobWriter): every start over counts one, and the commit names the one it verified.
    data = os.urandom(10_000)
    digest = Digest.of(data)
    store.layout.partial_blob(digest).write_bytes(b"\0" * 6000)  # garbage: refused at commit, then fetched afresh
    seen = []

    def watch(writer) -> None:
        seen.append((writer, writer.generation, writer.verified_generation))

    pull.fetch_blob(FakeClient(data), store, REF, _descriptor(data), policy(5), None, threading.Event(),
                    watch_writer=watch)
    writer = seen[0][0]
    assert [entry[1:] for entry in seen] == [(0, None), (2, 2)]  # made; verified after discard + restart
    assert all(entry[0] is writer for entry in seen)
    assert store.blob_path(digest).read_bytes() == data


def test_a_corrupt_blob_is_never_verified_for_the_watcher(store):
    data = os.urandom(10_000)
    seen = []
    with pytest.raises(DigestMismatch):
        pull.fetch_blob(FakeClient(bytes(reversed(data))), store, REF, _descriptor(data), policy(5), None,
                        threading.Event(), watch_writer=seen.append)
    assert len(seen) == 1 and seen[0].verified_generation is None

INDEX = {
    "manifests": [
        {"digest": "sha256:" + "a" * 64, "size": 10, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": "sha256:" + "b" * 64, "size": 10, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": "sha256:" + "c" * 64, "size": 10, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "platform": {"os": "unknown", "architecture": "unknown"}},
    ]
}


@pytest.mark.parametrize("wanted, expected", [
    ("linux/amd64", "a"), ("linux/arm64", "b"), ("linux/arm64/v8", "b"), ("LINUX/AMD64", "a"),
])
def test_platform_selection(wanted, expected):
    chosen = pull.select_platform(INDEX, pull.parse_platform(wanted), "example")
    assert chosen.digest.hex == expected * 64


def test_platform_not_found_lists_what_exists():
    with pytest.raises(PlatformNotFound) as caught:
        pull.select_platform(INDEX, pull.parse_platform("linux/s390x"), "example.org/app:1")
    assert "linux/amd64, linux/arm64/v8" in caught.value.message
    assert "unknown" not in caught.value.message


@pytest.mark.parametrize("text", ["linux", "linux/", "a/b/c/d", ""])
def test_bad_platform_is_usage_error(text):
    with pytest.raises(UsageError, match="--platform"):
        pull.parse_platform(text)


def test_default_platform_maps_machine_names(monkeypatch):
    real = os.uname()
    for machine, expected in (("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"), ("armv7l", "linux/arm/v7")):
        monkeypatch.setattr(platforms.os, "uname", lambda: os.uname_result((*real[:4], machine)))
        assert str(pull.default_platform()) == expected


def test_untrusted_registry_refused_before_any_network(tmp_path):
    settings = Settings(user_store=tmp_path / "u", site_store=tmp_path / "s",
                        policy=SitePolicy(trusted_registries=("registry.site.example",)))
    with pytest.raises(PolicyError) as caught:
        pull.pull_image(settings, "docker.io/library/busybox:1")
    assert "docker.io" in caught.value.message and "trusted_registries" in caught.value.hint
    assert not (tmp_path / "u").exists()  # refused before touching the store


class TwoBlobClient:
    """Blob ``bad`` arrives corrupt at once; blob ``slow`` trickles until told to stop."""

    def __init__(self, bad: bytes, slow: bytes) -> None:
        self.bad, self.slow = Digest.of(bad), slow
        self.slow_chunks_sent = 0
        self.retry = policy(2)

    @contextmanager
    def open_blob(self, repository, digest, *, offset=0, budget=None):
        if digest == self.bad:
            yield FakeResponse(b"\0" * 100, 0, None)
            return
        client = self

        class Slow:
            offset = 0

            def read_chunks(self, size=1 << 20, *, limit=None):
                for start in range(0, len(client.slow), 100):
                    client.slow_chunks_sent += 1
                    yield client.slow[start:start + 100]

        yield Slow()


def test_first_failure_stops_the_other_downloads(store):
    bad, slow = os.urandom(100), os.urandom(2_000_000)
    client = TwoBlobClient(bad, slow)
    settings = Settings(pull_parallel=2, pull_retries=2)
    with pytest.raises(DigestMismatch):
        pull._download_all(client, settings, store, REF, [_descriptor(bad), _descriptor(slow)], None,
                           pull._Counters())
    assert not store.has_blob(Digest.of(bad))
    # the slow blob was never started, or cut short, or had finished first: never downloaded
    # to the end after the failure; a corrupt blob makes the pull worthless, so a cut-short
    # download leaves no partial file behind (fda8488)
    if not store.has_blob(Digest.of(slow)):
        assert client.slow_chunks_sent < len(slow) // 100
        assert not store.layout.partial_blob(Digest.of(slow)).exists()
