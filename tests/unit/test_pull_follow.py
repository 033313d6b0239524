"""pull._FollowedBlob: a layer converted while it downloads (issue 10, target 4). The flattener
may only ever keep a conversion made from exactly the verified blob. The pump hashes nothing:
the download's BlobWriter hashes every byte once, and what went through the pipe counts as the
verified blob only when the writer verified the generation of the partial file the pump opened
(store.BlobWriter's rule); anything else (a download that started over, a cut one) makes the
layer convert again from the stored blob (StreamUnusable); a failed download explains itself.
The test thread plays the download through the store's own BlobWriter."""

from __future__ import annotations

import contextlib
import hashlib
import threading

import pytest

from berth.errors import DigestMismatch, ImageError
from berth.image import pull
from berth.image.flatten import StreamUnusable
from berth.oci.digest import Digest
from berth.store.store import USER, Store

BLOB = bytes(range(256)) * 4096  # 1 MiB


class FakeDownloads:
    """What _FollowedBlob uses of pull._Downloads; the test thread plays the download,
    writing the partial file through the store's BlobWriter as fetch_blob does."""

    def __init__(self, store: Store, digest: Digest, size: int) -> None:
        self.store = store
        self.sizes = {digest: size}
        self.changed = threading.Condition()
        self.stop = pull.StopSignal()
        self.over = False
        self.failure: BaseException | None = None
        self.partial = store.layout.partial_blob(digest)
        self._download = contextlib.ExitStack()
        self.writer = self._download.enter_context(store.blob_download(digest, size))
        self.writers = {digest: self.writer}  # what fetch_blob's watch_writer records

    def download_over(self, digest: Digest) -> bool:
        return self.over

    def wait_for(self, digest: Digest) -> None:
        if self.failure is not None:
            raise self.failure

    def write(self, data: bytes, *, restart: bool = False) -> None:
        """More bytes of the download; ``restart``: it starts over from byte 0 first (the
        registry ignored a Range request)."""
        if restart:
            self.writer.restart()
        self.writer.write(data)
        self.wake()

    def end(self, failure: BaseException | None = None) -> None:
        """The download ends: verified and stored (BlobWriter.commit), or ``failure`` (a
        commit that finds the digest wrong fails on its own)."""
        if failure is None:
            try:
                self.writer.commit(verified=self.wake)
            except DigestMismatch as mismatch:
                failure = mismatch
        else:
            self.writer.discard()
        self.failure = failure
        self._download.close()
        self.over = True
        self.wake()

    def wake(self) -> None:
        with self.changed:
            self.changed.notify_all()


@pytest.fixture
def store(tmp_path) -> Store:
    created = Store(tmp_path / "store", USER)
    created.require_writable()
    return created


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def _read_exactly(pipe, count: int) -> bytes:
    """``count`` bytes from the pipe (a pipe read returns what is there, maybe less)."""
    data = b""
    while len(data) < count:
        chunk = pipe.read(count - len(data))
        assert chunk, f"the pipe ended after {len(data)} of {count} bytes"
        data += chunk
    return data


def _read_all(pipe) -> bytes:
    chunks = []
    while chunk := pipe.read(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _following(store, first: bytes, blob: bytes = BLOB):
    """A download of ``blob`` whose partial file holds ``first`` so far, and a follower of it
    entered: (downloads, digest, follower, head, pipe)."""
    digest = _digest(blob)
    downloads = FakeDownloads(store, digest, len(blob))
    downloads.write(first)
    follower = pull._FollowedBlob(downloads, digest)
    head, pipe = follower.__enter__()
    return downloads, digest, follower, head, pipe


def test_the_bytes_come_through_as_they_download_and_a_verified_stream_is_kept(store):
    downloads, _, follower, head, pipe = _following(store, BLOB[:100_000])
    assert head == BLOB[:8]
    assert _read_exactly(pipe, 50_000) == BLOB[:50_000]  # before the rest exists: it is streaming

    def rest() -> None:
        for start in range(100_000, len(BLOB), 300_000):
            downloads.write(BLOB[start:start + 300_000])
        downloads.end()

    writer = threading.Thread(target=rest)
    writer.start()
    assert BLOB[:50_000] + _read_all(pipe) == BLOB
    writer.join()
    follower.__exit__(None, None, None)  # no StreamUnusable: exactly the blob went through
    assert follower.complete


def test_a_download_that_starts_over_is_not_used(store):
    # The registry ignored a Range request: the partial file is truncated and written again
    # (here with the same length, so only the hash can tell what the pipe carried).
    # the first attempt's bytes, wrong
    downloads, _, follower, _head, pipe = _following(store, b"\xff" * 8 + BLOB[8:200_000])
    assert len(pipe.read(150_000)) > 0
    downloads.write(BLOB, restart=True)
    downloads.end()
    _read_all(pipe)
    with pytest.raises(StreamUnusable):
        follower.__exit__(None, None, None)


def test_a_partial_that_shrinks_ends_the_stream_and_is_not_used(store):
    downloads, _, follower, _head, pipe = _following(store, BLOB[:300_000])
    assert pipe.read(300_000)
    downloads.write(BLOB[:10], restart=True)  # started over, not yet where the pipe was
    assert len(_read_all(pipe)) < len(BLOB)  # the pipe ends: the flattener sees a cut layer
    downloads.write(BLOB[10:])
    downloads.end()
    with pytest.raises(StreamUnusable):
        follower.__exit__(ImageError, ImageError("layer truncated"), None)


def test_a_failed_download_is_what_the_pull_reports(store):
    # corrupt bytes: not gzip, not tar, and not the blob (the commit finds it out)
    corrupt = bytes(255 - b for b in BLOB)
    downloads, digest, follower, _head, pipe = _following(store, corrupt[:200_000])
    assert pipe.read(1000)
    downloads.write(corrupt[200_000:])
    downloads.end()
    assert isinstance(downloads.failure, DigestMismatch)
    with pytest.raises(DigestMismatch) as raised:
        follower.__exit__(ImageError, ImageError("layer is corrupt"), None)
    assert raised.value is downloads.failure
    assert not store.has_blob(digest)


def test_a_download_over_before_the_flattener_comes_is_read_from_the_store(store):
    digest = _digest(BLOB)
    downloads = FakeDownloads(store, digest, len(BLOB))
    downloads.write(BLOB)
    downloads.end()
    follower = pull._FollowedBlob(downloads, digest)
    assert follower.__enter__() is None
    follower.__exit__(None, None, None)


def test_a_flattener_that_stops_reading_does_not_block_the_pump(store):
    # The flattener fails early (a hostile entry) and never reads on: leaving must not hang
    # on a pump blocked writing into a full pipe.
    big = BLOB * 8
    digest = _digest(big)
    downloads = FakeDownloads(store, digest, len(big))
    downloads.write(big)
    follower = pull._FollowedBlob(downloads, digest)
    assert follower.__enter__() is not None
    downloads.end()
    raised = []

    def leave() -> None:
        try:
            follower.__exit__(ImageError, ImageError("impossible owner"), None)
        except StreamUnusable as exc:
            raised.append(exc)

    # In a thread of the test's own, with a bound: a hang is what this test is for (an
    # __exit__ that waits on a blocked pump would otherwise only end at pytest's timeout).
    leaving = threading.Thread(target=leave, daemon=True)
    leaving.start()
    leaving.join(30)
    assert not leaving.is_alive(), "leaving hung on a pump blocked writing into a full pipe"
    assert not follower._thread.is_alive()
    assert raised == []  # what the flattener read is the verified blob's: its refusal stands


def test_a_refusal_of_what_streamed_stands_once_the_blob_is_verified(store):
    # A hostile entry in the first bytes: the flattener refuses the layer while it downloads.
    # Once the download is verified, what went through the pipe is a prefix of the verified
    # blob, so the refusal is the blob's: no StreamUnusable, no second conversion of the
    # stored blob only to refuse it again (issue 10: wasted work, and the pull waited for it).
    # Larger than the pipe holds: the pump is still at work when the flattener gives up.
    big = BLOB * 4
    downloads, _, follower, _head, pipe = _following(store, big[:300_000], big)
    assert _read_exactly(pipe, 1000) == big[:1000]
    downloads.write(big[300_000:])
    downloads.end()
    follower.__exit__(ImageError, ImageError("impossible owner"), None)  # no StreamUnusable


def test_a_refusal_of_bytes_the_verified_blob_does_not_begin_with_is_not_kept(store):
    # The download started over meanwhile with different bytes at the same offsets (the pump
    # did not see the file shrink): what the flattener refused is not the verified blob's
    # beginning, so the layer is converted again from the stored blob.
    big = BLOB * 4
    downloads, _, follower, _head, pipe = _following(store, b"\xff" * 8 + big[8:300_000], big)
    assert len(_read_exactly(pipe, 1000)) == 1000
    downloads.write(big, restart=True)
    downloads.end()
    with pytest.raises(StreamUnusable):
        follower.__exit__(ImageError, ImageError("impossible owner"), None)


def test_a_start_over_the_pump_never_saw_is_not_kept_though_the_whole_size_went_through(store):
    # Only the writer's generation tells here: the first attempt's bytes were wrong, the
    # download started over and was written past where the pump was before it looked again,
    # so the pump passed exactly the blob's size (wrong head, right tail) without seeing the
    # file shrink. The writer verified generation 1; the pump opened generation 0.
    big = BLOB * 4
    wrong = b"\xff" * 8 + big[8:300_000]
    downloads, _, follower, _head, pipe = _following(store, wrong, big)
    assert _read_exactly(pipe, len(wrong)) == wrong  # the pump is at byte 300,000, waiting
    with downloads.changed:  # the pump cannot look at the file until both steps are done
        downloads.writer.restart()
        downloads.writer.write(big)
    downloads.end()
    assert _read_all(pipe) == big[300_000:]
    assert follower._passed == len(big)
    with pytest.raises(StreamUnusable):
        follower.__exit__(None, None, None)
    assert not follower.complete


def test_a_resumed_partial_is_followed_and_kept(store):
    # A partial file left by a killed pull: the writer reads it back and hashes it (BlobWriter
    # resumes), so the pump may pass those bytes on as they are and the result is kept.
    digest = _digest(BLOB)
    store.layout.partial_blob(digest).write_bytes(BLOB[:400_000])
    downloads = FakeDownloads(store, digest, len(BLOB))
    assert downloads.writer.offset == 400_000
    follower = pull._FollowedBlob(downloads, digest)
    head, pipe = follower.__enter__()
    assert head == BLOB[:8]
    assert _read_exactly(pipe, 400_000) == BLOB[:400_000]
    downloads.write(BLOB[400_000:])
    downloads.end()
    assert _read_all(pipe) == BLOB[400_000:]
    follower.__exit__(None, None, None)
    assert follower.complete
    assert store.blob_path(digest).read_bytes() == BLOB


def test_a_blob_another_download_writes_is_waited_for_not_followed(store):
    # No writer of this pull (another process holds the blob's lock and writes the partial
    # file): nothing vouches for that file's bytes here, so the layer is read from the store.
    digest = _digest(BLOB)
    downloads = FakeDownloads(store, digest, len(BLOB))
    downloads.writers.clear()
    downloads.write(BLOB[:300_000])
    follower = pull._FollowedBlob(downloads, digest)
    entered = []
    entering = threading.Thread(target=lambda: entered.append(follower.__enter__()), daemon=True)
    entering.start()
    downloads.write(BLOB[300_000:])
    downloads.end()
    entering.join(30)
    assert entered == [None]
