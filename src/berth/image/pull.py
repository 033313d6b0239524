"""Pull = registry client + store: the one module that joins them (STYLE.md).

Steps: normalize the reference; check site policy (trusted registries); resolve the manifest
(an index picks this machine's platform or ``--platform``); download config and layers in
parallel, each verified by size and digest while streaming, resumed with Range after a
mid-stream failure, skipped when already stored; convert to SquashFS, starting with the top
layer while it still downloads and the layers below too (issue 10; a conversion is kept only
when it read exactly the verified blob, :class:`_FollowedBlob`, which the download's one
hash tells, store.BlobWriter); publish only after every layer is verified; tag (index.json
last).
Peak memory is bounded by the chunk size times the parallel downloads, whatever the layer size.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from berth.errors import (
    AuthenticationError,
    BerthError,
    DigestMismatch,
    ImageError,
    NotFound,
    PlatformNotFound,
    PolicyError,
    RegistryError,
    RegistryUnreachable,
)
from berth.image import squashfs
from berth.image.api import StoredImage, index_key, load_stored, parse_reference, store_for
from berth.image.install import Descriptor, install_image, parse_descriptor, parse_image_manifest
from berth.image.platforms import Platform, default_platform, parse_platform
from berth.image.progress import PullProgress, notify
from berth.image.tarstream import enlarge_pipe
from berth.oci import mediatypes
from berth.oci.digest import Digest
from berth.oci.reference import Reference
from berth.record import Record, replace
from berth.store.store import BlobWriter, Store
from berth.untrusted import parse_json

if TYPE_CHECKING:
    from collections.abc import Callable

    from berth.config.settings import Settings

_BLOB_CHUNK_BYTES = 1 << 20


def select_platform(index: dict, wanted: Platform, what: str) -> Descriptor:
    """The manifest of ``index`` for ``wanted``; raises PlatformNotFound listing what exists."""
    # A registry may send any JSON under an index's Content-Type (an array: AttributeError here).
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise ImageError(f"the image index of {what} has no 'manifests' list")
    available: list[str] = []
    candidates: list[tuple[int, Descriptor]] = []
    for n, item in enumerate(manifests, 1):
        descriptor = parse_descriptor(item, f"the image index of {what}, entry {n}")
        spec = item.get("platform") if isinstance(item.get("platform"), dict) else {}
        entry = Platform(str(spec.get("os", "")).lower(), str(spec.get("architecture", "")).lower(),
                         str(spec["variant"]).lower() if spec.get("variant") else None)
        if entry.os == "unknown" or not entry.os:
            continue  # attestation manifests (buildkit) and the like
        available.append(str(entry))
        if descriptor.media_type and descriptor.media_type not in mediatypes.MANIFESTS:
            continue
        if (entry.os, entry.architecture) != (wanted.os, wanted.architecture):
            continue
        if wanted.variant and entry.variant and entry.variant != wanted.variant:
            continue
        # Prefer an exact variant match, then an entry without variant.
        rank = 0 if entry.variant == wanted.variant else 1
        candidates.append((rank, descriptor))
    if not candidates:
        raise PlatformNotFound(
            f"{what} has no image for platform {wanted}; it has: {', '.join(available) or 'none'}",
            hint="choose one with --platform OS/ARCH[/VARIANT]",
        )
    return min(candidates, key=lambda pair: pair[0])[1]


class PullResult(Record):
    image: StoredImage
    reference: str
    platform: str | None
    index_digest: Digest | None
    downloaded_blobs: int
    downloaded_bytes: int
    cached_blobs: int
    converted: bool
    elapsed_s: float
    #: What the user should fix though the pull went on (a credentials file others may read).
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "reference": self.reference,
            "digest": str(self.image.digest),
            "index_digest": str(self.index_digest) if self.index_digest else None,
            "platform": self.platform,
            "store": self.image.store,
            "squashfs": str(self.image.squashfs),
            "size_bytes": self.image.size_bytes,
            "downloaded_blobs": self.downloaded_blobs,
            "downloaded_bytes": self.downloaded_bytes,
            "cached_blobs": self.cached_blobs,
            "converted": self.converted,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def check_registry_policy(settings: "Settings", reference: Reference) -> None:
    """Raise PolicyError when the site restricts registries and this one is not trusted."""
    trusted = settings.policy.trusted_registries
    host_policy = settings.registry(reference.registry)
    if (trusted and reference.registry not in trusted and reference.api_host not in trusted) \
            or not host_policy.trusted:
        raise PolicyError(
            f"the site policy does not allow images from registry '{reference.registry}' "
            f"(trusted: {', '.join(trusted) or 'none'})",
            hint="use an image from a trusted registry, or ask your site administrator to add "
            "this registry to policy.trusted_registries",
        )


def make_client(settings: "Settings", reference: Reference, *, insecure: bool = False):
    """A registry client for ``reference`` with the user's credentials and site settings."""
    from berth.registry.auth import load_credentials
    from berth.registry.client import RegistryClient

    return RegistryClient(
        reference.api_host,
        insecure=insecure or settings.registry(reference.registry).insecure
        or settings.registry(reference.api_host).insecure,
        credentials=load_credentials(),
        retry=retry_policy(settings),
        timeout_s=settings.registry_timeout_s,
    )


def retry_policy(settings: "Settings"):
    """The one retry policy of registry traffic, from ``pull_retries`` (retries after the first
    attempt of one manifest or blob, every layer of retrying together)."""
    from berth.registry.transport import RetryPolicy

    return RetryPolicy.with_retries(settings.pull_retries)


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.downloaded_blobs = 0
        self.downloaded_bytes = 0
        self.cached_blobs = 0

    def add(self, fetched_bytes: int | None) -> None:
        with self.lock:
            if fetched_bytes is None:
                self.cached_blobs += 1
            else:
                self.downloaded_blobs += 1
                self.downloaded_bytes += fetched_bytes


class _Cancelled(Exception):
    """Another download of the same pull failed: stop this one (its partial file is kept
    unless the stop says ``discard_partials``)."""


class StopSignal(threading.Event):
    """Set when a pull's downloads must stop; ``discard_partials`` when their partial files
    are worthless (the disk is full: keeping them would only hold the space)."""

    discard_partials = False


def pull_image(
    settings: "Settings",
    ref: str,
    *,
    site: bool = False,
    platform: str | None = None,
    insecure: bool = False,
    progress: PullProgress | None = None,
) -> PullResult:
    """Pull ``ref`` into the user (or site) store; see berth.image.api.pull for errors."""
    started = time.monotonic()
    reference = parse_reference(ref)
    wanted = parse_platform(platform) if platform else default_platform()
    check_registry_policy(settings, reference)
    store = store_for(settings, site=site)
    key = index_key(reference)
    with store.writing():
        counters = _Counters()
        # Pinned and present: no network at all.
        present = _present_by_digest(store, reference, key)
        if present is not None:
            return PullResult(present, key, None, None, 0, 0, 0, False, time.monotonic() - started)
        client = make_client(settings, reference, insecure=insecure)
        try:
            result = _pull_with(client, settings, store, reference, key, wanted, platform is not None,
                                progress, counters, started)
            credentials = client.authorizer.credentials
            return replace(result, warnings=credentials.warnings) if credentials else result
        except (ImageError, DigestMismatch) as error:
            # The checks below name the document that is wrong; who must act is said once here.
            if error.hint is None:
                error.hint = (f"the registry serves a malformed image for {reference}: tell the "
                              "registry's administrator or the image's maintainer")
            raise
        finally:
            client.close()


def _present_by_digest(store: Store, reference: Reference, key: str) -> StoredImage | None:
    if reference.digest is None:
        return None
    target = store.read_index().get(key)
    digest = Digest.parse(target) if target else reference.digest
    if not store.name_image(key, digest):
        return None
    return load_stored(store, digest, key)


def _pull_with(client, settings, store: Store, reference: Reference, key: str, wanted: Platform,
               requested: bool, progress, counters: _Counters, started: float) -> PullResult:
    what = str(reference)
    manifest = _get_manifest(client, reference, reference.version)
    index_digest = None
    platform_text = None
    if manifest.media_type in mediatypes.INDEXES or _looks_like_index(manifest.data):
        index_digest = manifest.digest
        index = parse_json(manifest.data, what=f"image content refused: the image index of {what}",
                           error=ImageError)
        chosen = select_platform(index, wanted, what)
        store.put_blob_bytes(index_digest, manifest.data)
        manifest = _get_manifest(client, reference, str(chosen.digest))
        if manifest.digest != chosen.digest:
            raise DigestMismatch(f"manifest {chosen.digest} of {what} arrived as {manifest.digest}")
        platform_text = str(wanted)
    digest = manifest.digest
    if store.name_image(key, digest):
        return PullResult(load_stored(store, digest, key), key, platform_text, index_digest, 0, 0, 0, False,
                          time.monotonic() - started)
    _manifest_json, config_descriptor, layers = parse_image_manifest(manifest.data, what)
    blobs = _unique([config_descriptor, *layers])
    # The SquashFS is written into the store's tmp/, on the blobs' file system, so it counts too.
    squashfs_bytes = squashfs.estimate_bytes([(layer.media_type, layer.size_bytes) for layer in layers],
                                             settings.squashfs_compression)
    store.check_room(what, [(blob.digest, blob.size_bytes) for blob in blobs], (digest, squashfs_bytes))
    notify(progress, "resolved", key, digest, len(layers), sum(d.size_bytes for d in blobs))
    if requested and index_digest is None:
        # An explicit --platform is checked against a single-platform image's config before
        # any layer comes: the config first (small), alone.
        _download_all(client, settings, store, reference, blobs[:1], progress, counters)
        _check_single_platform(_read_config(store, config_descriptor, what), wanted, what)
        downloading = blobs[:0:-1]
    else:
        # The config downloads beside the layers and is read before publishing: waiting for it
        # (a round trip and an fsync) kept the conversion from starting, on one core (issue
        # 10, target 4). A malformed config still fails the pull with nothing published.
        downloading = [blobs[0], *blobs[:0:-1]]
    meta = {
        "source": what,
        "repository": reference.name,
        "index_digest": str(index_digest) if index_digest else None,
        "platform": platform_text,
        "media_type": manifest.media_type,
    }
    # The flattener reads the top layer first, so the top layer downloads first: conversion
    # starts on it while it downloads (_FollowedBlob: kept only when exactly the verified
    # blob went through) and the layers below still download. install_image publishes only
    # after every layer was waited for, so a failed or corrupt download leaves nothing published.
    with _Downloads(client, settings, store, reference, downloading, progress) as downloads:
        def config_bytes() -> bytes:
            downloads.wait_for(config_descriptor.digest)
            return _read_config(store, config_descriptor, what, keep_bytes=True)

        image, converted = install_image(
            store, digest, manifest_bytes=manifest.data, config_bytes=config_bytes, layers=layers,
            reference_key=key, compression=settings.squashfs_compression, meta=meta, progress=progress,
            wait_for_layer=downloads.wait_for, follow_layer=downloads.follow,
            before_publish=lambda: store.put_blob_bytes(digest, manifest.data),
        )
        downloads.finish(counters)
    if not converted:  # converted meanwhile by another pull: keep the manifest all the same
        store.put_blob_bytes(digest, manifest.data)
    return PullResult(image, key, platform_text, index_digest, counters.downloaded_blobs,
                      counters.downloaded_bytes, counters.cached_blobs, converted,
                      time.monotonic() - started)


def _read_config(store: Store, descriptor: Descriptor, what: str, *, keep_bytes: bool = False):
    """The stored (verified) image config, parsed as the hostile JSON it may be (ImageError);
    its bytes instead with ``keep_bytes``, once they parsed."""
    data = store.read_blob(descriptor.digest)
    config = parse_json(data, what=f"image content refused: the image config of {what}", error=ImageError)
    return data if keep_bytes else config


def _check_single_platform(config: object, wanted: Platform, what: str) -> None:
    """An explicit --platform must match a single-platform image (docker refuses too)."""
    if not isinstance(config, dict):
        raise ImageError(f"the image config of {what} is not a JSON object")
    have = Platform(str(config.get("os") or "linux").lower(), str(config.get("architecture") or "").lower(),
                    str(config["variant"]).lower() if config.get("variant") else None)
    if (have.os, have.architecture) != (wanted.os, wanted.architecture) or (
            wanted.variant and have.variant and have.variant != wanted.variant):
        raise PlatformNotFound(
            f"{what} is a single-platform image for {have}, not {wanted}",
            hint="leave out --platform to pull it anyway, or pick an image built for that platform",
        )


def _looks_like_index(data: bytes) -> bool:
    """Some registries serve indexes without a media type header: look at the body."""
    try:
        body = parse_json(data, what="a manifest")
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("manifests"), list) and "layers" not in body


def _get_manifest(client, reference: Reference, version: str):
    """The manifest or index at ``version``; its digest is the client's hash of the bytes
    received, already checked against a requested digest (RegistryClient.get_manifest)."""
    manifest = client.get_manifest(reference.repository, version)
    if manifest.media_type and manifest.media_type not in (*mediatypes.MANIFESTS, *mediatypes.INDEXES):
        raise ImageError(
            f"{reference} has manifest media type {manifest.media_type}, which berth does not pull",
            hint="berth pulls OCI and Docker schema 2 images and indexes",
        )
    return manifest


def _unique(descriptors: list[Descriptor]) -> list[Descriptor]:
    seen: dict[Digest, Descriptor] = {}
    for descriptor in descriptors:
        seen.setdefault(descriptor.digest, descriptor)
    return list(seen.values())


def _download_all(client, settings, store: Store, reference: Reference, blobs: list[Descriptor],
                  progress, counters: _Counters) -> None:
    """Fetch every blob not yet stored, ``settings.pull_parallel`` at a time; the first
    failure stops the others and is raised (their partial files stay for the next attempt
    after an unreachable registry or an interruption, :func:`_ends_the_pull`)."""
    with _Downloads(client, settings, store, reference, blobs, progress) as downloads:
        downloads.finish(counters)


class _Downloads:
    """Blob downloads running in the background, ``settings.pull_parallel`` at a time, in the
    order given; :meth:`wait_for` lets the conversion use each blob as soon as it is verified
    and stored (issue 10: conversion overlaps the downloads that are still running).

    The first failure stops the others and is what :meth:`wait_for` and :meth:`finish` raise;
    their partial files stay for the next attempt only when it can resume them
    (:func:`_ends_the_pull`). Leaving the ``with`` block any other way
    (the conversion failed, Ctrl-C) stops the downloads at their next chunk and waits for them.
    """

    def __init__(self, client, settings, store: Store, reference: Reference, blobs: list[Descriptor],
                 progress) -> None:
        self.stop = StopSignal()
        self.changed = threading.Condition()
        self.store = store
        self.sizes = {blob.digest: blob.size_bytes for blob in blobs}
        workers = max(1, min(int(settings.pull_parallel or 1), len(blobs) or 1))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="berth-pull")
        self.futures: dict[Digest, Future] = {}
        #: The writer of each blob this pull downloads, once it exists (_FollowedBlob reads
        #: its partial file and trusts its hash).
        self.writers: dict[Digest, BlobWriter] = {}
        watching = _Watching(progress, self.changed)
        for blob in blobs:
            future = self.pool.submit(fetch_blob, client, store, reference, blob, client.retry, watching,
                                      self.stop, watch_writer=self._watch_writer)
            future.add_done_callback(self._done)
            self.futures[blob.digest] = future

    def __enter__(self) -> "_Downloads":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            if _ends_the_pull(error):
                self.stop.discard_partials = True
            self._stop()
        self.pool.shutdown(wait=True)

    def _done(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            # The first failure stops the others, and says whether their partials are kept.
            if _ends_the_pull(future.exception()):
                self.stop.discard_partials = True
            self._stop()
        with self.changed:
            self.changed.notify_all()

    def _watch_writer(self, writer: BlobWriter) -> None:
        with self.changed:
            self.writers[writer.digest] = writer
            self.changed.notify_all()

    def _stop(self) -> None:
        self.stop.set()
        for future in self.futures.values():
            future.cancel()  # those not started yet

    def _failure(self) -> BaseException | None:
        """The first real failure (not a download stopped because of another's)."""
        errors = [f.exception() for f in self.futures.values()
                  if f.done() and not f.cancelled() and f.exception() is not None]
        real = [e for e in errors if not isinstance(e, _Cancelled)]
        return real[0] if real else None

    def wait_for(self, digest: Digest) -> None:
        """Return once blob ``digest`` is verified and stored; raise the pull's first download
        failure as soon as there is one (whichever blob it hit)."""
        future = self.futures.get(digest)
        if future is None:
            return  # fetched before (the config, when a layer has the same digest)
        with self.changed:
            while True:
                failure = self._failure()
                if failure is not None:
                    raise failure
                if future.done() and not future.cancelled() and future.exception() is None:
                    return
                if self.stop.is_set() and all(f.done() for f in self.futures.values()):
                    raise _Cancelled()  # stopped from outside, nothing failed on its own
                self.changed.wait(1.0)

    def follow(self, digest: Digest) -> "_FollowedBlob":
        """The blob's bytes while it downloads, for the flattener (:class:`berth.image.flatten.Layer`)."""
        return _FollowedBlob(self, digest)

    def download_over(self, digest: Digest) -> bool:
        """Whether the download of ``digest`` ended (or never was: fetched before)."""
        future = self.futures.get(digest)
        return future is None or future.done()

    def finish(self, counters: _Counters) -> None:
        """Wait for every download; raise the first failure, else count them."""
        try:
            wait(list(self.futures.values()))
        except BaseException:
            self._stop()
            raise
        failure = self._failure()
        if failure is not None:
            raise failure
        for future in self.futures.values():
            counters.add(future.result())


def _relayed(event: str, *, wake: bool):
    """A :class:`_Watching` method: ``event`` passed on, then (``wake``) the waiters woken."""
    def relay(self: "_Watching", *args) -> None:
        notify(self._inner, event, *args)
        if wake:
            with self._changed:
                self._changed.notify_all()
    relay.__name__ = event
    return relay


class _Watching(PullProgress):
    """Passes every progress event on, and wakes the threads waiting on ``changed`` after each
    one about a blob's bytes (a :class:`_FollowedBlob` waits there for more of the blob it
    follows)."""

    def __init__(self, inner: PullProgress | None, changed: threading.Condition) -> None:
        self._inner = inner
        self._changed = changed

    resolved = _relayed("resolved", wake=False)
    blob_started = _relayed("blob_started", wake=True)
    blob_bytes = _relayed("blob_bytes", wake=True)
    blob_restarted = _relayed("blob_restarted", wake=True)
    blob_done = _relayed("blob_done", wake=True)
    phase = _relayed("phase", wake=False)


#: Bytes the flattener needs to tell the compression (tarstream.open_decompressed).
_HEAD_BYTES = 8


class _FollowedBlob:
    """A layer converted while it downloads (issue 10, target 4: a single-layer image otherwise
    waits for its whole download, then converts).

    A pump thread moves the download's partial file in the store's tmp/, as it grows, into a
    pipe that the flattener reads like the blob itself (splice(2): the bytes stay in the
    kernel). The pump hashes nothing: the download's writer hashes every byte once, and the
    bytes that went through are the verified blob's only by store.BlobWriter's rule: the pump
    notes the writer's generation before it opens the partial file and reads from that one
    opening, and the writer then verifies that very generation. On leaving, unless the whole
    blob went through that way, :class:`StreamUnusable` makes the flattener convert that layer
    again from the verified stored blob (a download that started over, was cut, or failed). A
    refusal of what went through (a hostile entry) stands when it is a prefix of the verified
    blob: it is the blob's, and is not made again from the stored blob. Only this pull's own
    downloads are followed (another process's download of the blob is waited for). Publishing
    still waits for every stored blob (install_image), so a killed pull leaves what a killed
    download or conversion leaves: a partial blob to resume and a conversion directory that
    the next conversion or prune removes. When the flattener fails, the download's own failure
    (a digest mismatch, an unreachable registry) is what the pull reports, not the flattener's
    view of the cut or corrupt bytes it was given."""

    def __init__(self, downloads: _Downloads, digest: Digest) -> None:
        self.downloads = downloads
        self.digest = digest
        self.size = downloads.sizes.get(digest, -1)
        #: Whether exactly the verified blob went through (known on leaving).
        self.complete = False
        self._closing = False
        #: The writer followed and its generation when the partial file was opened.
        self._writer: BlobWriter | None = None
        self._generation = -1
        #: Bytes the pump passed on: the beginning of the partial file as it read it.
        self._passed = 0
        #: Whether the pump ended the stream itself (download over, started over or cut)
        #: rather than the flattener leaving first.
        self._ended_alone = False
        self._read_end: object = None
        self._thread: threading.Thread | None = None

    def __enter__(self):
        """(first bytes, pipe) or None when the blob is better read from the store: its
        download is over (or was never this pull's), or nothing of it is in the partial file yet."""
        downloads = self.downloads
        if self.size < _HEAD_BYTES or downloads.download_over(self.digest):
            return None
        with downloads.changed:
            while True:
                if downloads.download_over(self.digest) or downloads.stop.is_set():
                    return None
                writer = downloads.writers.get(self.digest)
                fd = None
                if writer is not None:
                    generation = writer.generation  # before opening: BlobWriter's rule
                    try:
                        fd = os.open(writer.path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        pass  # between a discard and a new start, or published meanwhile
                if fd is not None:
                    try:
                        head = os.pread(fd, _HEAD_BYTES, 0)
                    except BaseException:
                        os.close(fd)
                        raise
                    if len(head) == _HEAD_BYTES:
                        break
                    os.close(fd)
                downloads.changed.wait(0.5)
        self._writer, self._generation = writer, generation
        opened = [fd]  # closed here unless the pump runs (it closes fd and write_fd)
        try:
            read_fd, write_fd = os.pipe()
            opened += [read_fd, write_fd]
            enlarge_pipe(write_fd)
            self._thread = threading.Thread(target=self._pump, args=(fd, write_fd), name="berth-pull-follow",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            for descriptor in opened:
                os.close(descriptor)
            raise
        self._read_end = os.fdopen(read_fd, "rb", buffering=0)
        return head, self._read_end

    def _pump(self, fd: int, write_fd: int) -> None:
        downloads, size = self.downloads, self.size
        try:
            while self._passed < size and not self._closing:
                offset = self._passed
                available = os.fstat(fd).st_size
                if available < offset:
                    return  # truncated: the download started over
                if available == offset:
                    with downloads.changed:
                        if os.fstat(fd).st_size == offset:
                            if downloads.download_over(self.digest) or downloads.stop.is_set():
                                return
                            downloads.changed.wait(0.5)
                    continue
                count = os.splice(fd, write_fd, min(available - offset, _BLOB_CHUNK_BYTES), offset_src=offset)
                if count <= 0:
                    return  # the file shrank meanwhile: the download started over
                self._passed += count
        except OSError:
            return  # the flattener stopped reading (a broken pipe), or the file went away
        finally:
            # Before the pipe ends: a flattener that sees its end saw the pump stop on its own.
            self._ended_alone = not self._closing
            os.close(write_fd)
            os.close(fd)

    def __exit__(self, kind, error, traceback) -> None:
        if self._thread is None:
            return
        self._closing = True
        self._read_end.close()  # a pump blocked on a full pipe gets EPIPE
        with self.downloads.changed:
            self.downloads.changed.notify_all()
        self._thread.join()
        if kind is not None and not issubclass(kind, Exception):
            return  # Ctrl-C and the like: as they are
        if kind is not None:
            # The download's failure explains a cut or corrupt stream better than the
            # flattener can; it raises here if there was one.
            self.downloads.wait_for(self.digest)
            if not self._ended_alone and self._read_the_verified_blob():
                return  # the flattener's failure (a refused entry) is the verified blob's
        elif self._passed == self.size:
            self.complete = self._read_the_verified_blob()
        if not self.complete:
            from berth.image.flatten import StreamUnusable

            raise StreamUnusable(self.digest)

    def _read_the_verified_blob(self) -> bool:
        """Whether what the pump passed on is a prefix of the verified blob: the writer
        verified the generation the pump read (BlobWriter's rule). Waits for its verdict,
        which comes as soon as the last byte was written and hashed (before the blob's fsync);
        False when the download ends without one (it failed, or started over and failed)."""
        downloads, writer = self.downloads, self._writer
        with downloads.changed:
            while writer.verified_generation is None:
                if downloads.download_over(self.digest) or downloads.stop.is_set():
                    break
                downloads.changed.wait(0.5)
        return writer.verified_generation == self._generation


def _ends_the_pull(exc: BaseException | None) -> bool:
    """Whether a failure makes the partial files of the downloads it stops worthless: all but
    an unreachable registry (run the pull again to resume) and an interruption (Ctrl-C, a stop
    signal: BaseExceptions). A corrupt blob, a refused image, a full disk: no rerun resumes
    anything until someone acts, so nothing half-written stays behind in the store's tmp/ (a
    partial of a layer still on its way when another layer turned out corrupt was left)."""
    return isinstance(exc, Exception) and not isinstance(exc, (RegistryUnreachable, _Cancelled))


def _retryable(exc: BaseException) -> bool:
    """Mid-stream failures worth resuming: network errors, 5xx/429 (not auth, not 404)."""
    if isinstance(exc, (AuthenticationError, NotFound, DigestMismatch)):
        return False
    if isinstance(exc, (RegistryUnreachable, RegistryError)):
        return True
    if isinstance(exc, BerthError):
        return False
    if isinstance(exc, (OSError, EOFError)):
        return True
    # urllib3's HTTPError family (ProtocolError, ReadTimeoutError...) without importing it here.
    return type(exc).__module__.startswith(("urllib3", "http.client"))


def fetch_blob(client, store: Store, reference: Reference, descriptor: Descriptor, retry,
               progress: PullProgress | None, stop: threading.Event, *,
               watch_writer: "Callable[[BlobWriter], None] | None" = None) -> int | None:
    """Download one blob into the store unless present; returns bytes fetched (None: cached).

    Holds the blob's lock throughout, so concurrent pulls of it (threads or processes) wait
    for this one and then find it stored. Resumes a partial file with a Range request, and
    starts over when the registry ignores the Range. ``retry`` (a RetryPolicy) gives the blob
    one budget of attempts, shared with the client's request retries: resuming after a cut
    and retrying a 503 count alike. Raises DigestMismatch (nothing kept), RegistryUnreachable
    once the budget is spent, AuthenticationError, NotFound. ``watch_writer`` is given the blob's
    writer before its first byte is written (not when the blob is stored already), and again
    each time it verified what it wrote (store.BlobWriter.verified_generation).
    """
    digest, size = descriptor.digest, descriptor.size_bytes
    if stop.is_set():
        raise _Cancelled()
    with store.blob_download(digest, size) as writer:
        if writer is None:
            notify(progress, "blob_done", digest, size, True)
            return None
        if watch_writer is not None:
            watch_writer(writer)
        fetched = 0
        budget = retry.budget()
        retried_from_zero = False
        resumed_at = writer.offset
        while True:
            try:
                if not writer.complete:
                    with client.open_blob(reference.repository, digest, offset=writer.offset,
                                          budget=budget) as response:
                        if response.offset != writer.offset:
                            if response.offset != 0:
                                raise RegistryError(
                                    f"the registry sent blob {digest} from byte {response.offset} "
                                    f"when asked for byte {writer.offset}")
                            writer.restart()
                            notify(progress, "blob_restarted", digest, "registry ignored the Range request")
                        notify(progress, "blob_started", digest, size, writer.offset)
                        for chunk in response.read_chunks(_BLOB_CHUNK_BYTES, limit=size - writer.offset):
                            if stop.is_set():
                                raise _Cancelled()
                            writer.write(chunk)
                            fetched += len(chunk)
                            notify(progress, "blob_bytes", digest, len(chunk))
                if not writer.complete:
                    raise RegistryUnreachable(
                        f"the registry ended blob {digest} after {writer.offset} of the {size} bytes "
                        f"the manifest announces")
                try:
                    writer.commit(verified=None if watch_writer is None else lambda: watch_writer(writer))
                except DigestMismatch:
                    # A partial file from an earlier run could itself be the culprit: one
                    # fresh download from byte 0 before blaming the registry.
                    if resumed_at == 0 or retried_from_zero:
                        raise
                    retried_from_zero = True
                    resumed_at = 0
                    writer.restart()
                    continue
                notify(progress, "blob_done", digest, size, False)
                return fetched
            except _Cancelled:
                if getattr(stop, "discard_partials", False):
                    writer.discard()
                raise
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised if fatal
                if isinstance(exc, DigestMismatch):
                    raise DigestMismatch(f"{reference}: {exc.message}", hint=exc.hint) from None
                if not _retryable(exc):
                    raise
                if not budget.can_retry:
                    raise RegistryUnreachable(
                        f"downloading blob {digest} of {reference} failed after {budget.attempts} attempts: {exc}",
                        hint="check the network and the registry; run the pull again to resume "
                        "where it stopped",
                    ) from None
                notify(progress, "blob_restarted", digest, f"{exc}; resuming at byte {writer.offset}")
                budget.retry()
