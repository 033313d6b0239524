"""The OCI distribution client: manifests and blobs, pull and push (docs/contracts.md).

Speaks the OCI distribution spec v1.1 (``/v2/`` API) to one registry host. It knows nothing of
the store: it hands back bytes (manifests) and streams (blobs); the caller verifies blob
content while writing it (the digest is the caller's to check: it owns the temporary file).
Manifests are verified here: against the requested digest when fetched by digest, otherwise
hashed from the bytes received, with the registry's ``Docker-Content-Digest`` header only as a
cross-check (a proxy or a confused registry must not choose the identity of an image).

Thread-safe: one client can serve parallel blob downloads (urllib3's PoolManager is).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any
from urllib.parse import urlencode, urljoin, urlsplit

from berth.errors import (
    AuthenticationError,
    DigestMismatch,
    ManifestUnknown,
    NotFound,
    ReferenceError_,
    RegistryError,
    RegistryUnreachable,
)
from berth.oci import mediatypes
from berth.oci.digest import Digest, InvalidDigest
from berth.oci.names import is_registry_host
from berth.oci.reference import is_repository, is_tag
from berth.record import Record
from berth.registry.auth import Credentials
from berth.registry.authorizer import Authorizer, pull_scope, push_scope
from berth.registry.transport import (
    NO_RETRY,
    RetryBudget,
    RetryPolicy,
    Transport,
    content_length,
    error_detail,
    parse_retry_after,
    same_origin,
)
from berth.retry import StallWatch, is_transient
from berth.untrusted import parse_json

#: Manifests larger than this are refused (containerd uses the same 4 MiB bound): a manifest
#: is read into memory, so its size must be bounded.
MAX_MANIFEST_BYTES = 4 << 20
DEFAULT_CHUNK_BYTES = 1 << 20
MANIFEST_TYPES = frozenset((*mediatypes.MANIFESTS, *mediatypes.INDEXES))

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class Manifest(Record):
    """A manifest or index exactly as the registry sent it, with its verified digest."""

    data: bytes
    media_type: str
    digest: Digest

    @property
    def is_index(self) -> bool:
        return self.media_type in mediatypes.INDEXES

    def json(self) -> dict:
        """The parsed document; raises RegistryError when it is not a JSON object."""
        value = parse_json(self.data, what=f"manifest {self.digest}", error=RegistryError,
                           max_bytes=MAX_MANIFEST_BYTES)
        if not isinstance(value, dict):
            raise RegistryError(f"manifest {self.digest} is not a JSON object")
        return value


class BlobResponse:
    """A blob download in progress; use as a context manager and read with ``read_chunks``.

    ``offset`` is where the data starts in the blob: the requested offset when the registry
    honored the ``Range`` request (206), 0 when it sent the whole blob (the caller must then
    start over). ``size_bytes`` is the blob's total size when the registry said so, else None.
    A connection lost mid-stream raises RegistryUnreachable from ``read_chunks``; resuming is
    the caller's decision (open again with ``offset`` = bytes kept).
    """

    def __init__(self, response: Any, *, offset: int, size_bytes: int | None, what: str, registry: str,
                 stall_s: float = 60.0) -> None:
        self._response = response
        self.offset = offset
        self.size_bytes = size_bytes
        self.what = what
        self.registry = registry
        self.stall_s = stall_s
        self._finished = False

    def read_chunks(self, size: int = DEFAULT_CHUNK_BYTES, *, limit: int | None = None) -> Iterator[bytes]:
        """Yield the body in chunks of at most ``size`` bytes (bounded memory), as they arrive.

        ``limit``: the bytes the caller expects at most (a descriptor's size less the offset):
        no more than one byte past it is read, so a body longer than announced is refused by
        the caller at that byte, not after gigabytes. A body that stalls (berth.retry's
        :class:`StallWatch`, over ``stall_s``: ``registry_timeout_s``) raises
        RegistryUnreachable, which a download resumes like a lost connection."""
        import urllib3.exceptions as uexc

        if self._response is None:
            raise ValueError(f"the download of {self.what} is already closed")
        response = self._response
        watch = StallWatch(self.stall_s, lambda n: response.read1(n, decode_content=False))
        left = limit
        try:
            while True:
                chunk = watch.read(size if left is None else min(size, left + 1))
                if not chunk:
                    self._finished = True
                    return
                yield chunk
                if left is not None:
                    left -= len(chunk)
                    if left <= 0:
                        continue  # the end (or past it: the caller refuses that): no stall to judge
                if watch.stalled(len(chunk)):
                    raise RegistryUnreachable(
                        f"registry {self.registry} sent only {watch.received} bytes of {self.what} in "
                        f"{self.stall_s:g} s: the download is stalled",
                        hint="the registry or the network is overloaded; berth resumed the download where "
                             "it stopped while attempts were left; raise registry_timeout_s for a very slow link")
        except (uexc.HTTPError, OSError) as exc:
            raise RegistryUnreachable(
                f"connection to registry {self.registry} lost while downloading {self.what}: "
                f"{getattr(exc, 'reason', None) or exc}",
                hint="try again; the download resumes where it stopped when the registry allows it",
            ) from None

    def close(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            if not self._finished:
                # Do not drain a half-read blob (could be gigabytes): drop the connection.
                response.close()
            response.release_conn()  # a fully read one goes back to the pool for the next blob

    def __enter__(self) -> "BlobResponse":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_repository(repository: str) -> str:
    """Raise ReferenceError_ unless ``repository`` is a valid repository path (no '..', no '/' ends)."""
    if not is_repository(repository):
        raise ReferenceError_(
            f"invalid repository name {repository!r}",
            hint="repository names are lower-case letters and digits separated by '.', '_', '-' and '/'",
        )
    return repository


def parse_version(version: str) -> Digest | None:
    """The digest when ``version`` is one, None for a valid tag; ReferenceError_ otherwise."""
    if ":" in version:
        try:
            return Digest.parse(version)
        except InvalidDigest as exc:
            raise ReferenceError_(str(exc)) from None
    if not is_tag(version):
        raise ReferenceError_(f"invalid tag {version!r}",
                              hint="tags are letters, digits, '_', '.', '-' (at most 128)")
    return None


class RegistryClient:
    """Talks to one registry host (``Reference.api_host``, e.g. ``127.0.0.1:5000``).

    ``insecure=True`` means plain HTTP, and only then; otherwise HTTPS with the system's
    certificate authorities. ``credentials`` (from :func:`berth.registry.auth.load_credentials`)
    are used only when the registry asks. ``retry`` is the one retry policy (attempts per
    operation, backoff; tests pass one that does not sleep); ``timeout_s`` bounds connecting
    and each read.
    ``proxies`` (``{"http": URL, "https": URL, "no": "hosts"}``) defaults to the environment's
    ``http_proxy``/``https_proxy``/``no_proxy``. ``pool_size`` bounds the connections kept per
    host: at least the number of threads downloading in parallel.
    """

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float = 60.0,
        pool_size: int = 8,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        if not is_registry_host(host):
            raise ReferenceError_(f"invalid registry host {host!r}", hint="give HOST or HOST:PORT")
        self.host = host
        self.insecure = insecure
        self.base_url = f"{'http' if insecure else 'https'}://{host}"
        self.retry = retry or RetryPolicy()
        self.transport = Transport(host, insecure=insecure, retry=self.retry, timeout_s=timeout_s,
                                   pool_size=pool_size, proxies=proxies)
        self.authorizer = Authorizer(host, self.transport, credentials)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- pull -----------------------------------------------------------------------------
    def ping(self) -> None:
        """Check that the registry speaks the distribution API and accepts our credentials.

        ``berth login`` uses this: with token auth a token without scope is requested, which
        makes the token server check the user name and password.
        """
        self._request("GET", "/v2/", scope=None, accept=(200,), what="the API root /v2/")

    def get_manifest(self, repository: str, version: str) -> Manifest:
        """Fetch the manifest or index ``repository:version`` (a tag or ``sha256:…``).

        Every manifest and index media type is offered in ``Accept`` (the registry answers 404
        otherwise). Raises ManifestUnknown (404), DigestMismatch (content does not match the
        requested digest or the registry's Docker-Content-Digest), RegistryError (unsupported
        media type, too large), AuthenticationError, RateLimited, RegistryUnreachable.
        """
        check_repository(repository)
        wanted = parse_version(version)
        name = f"{repository}@{version}" if wanted else f"{repository}:{version}"
        what = f"manifest {name}"
        response, data = self.transport.get_document(
            lambda budget: self._request(
                "GET", f"/v2/{repository}/manifests/{version}",
                scope=pull_scope(repository), accept=(200,),
                headers={"Accept": mediatypes.MANIFEST_ACCEPT}, stream=True, what=what,
                not_found=lambda detail: ManifestUnknown(
                    f"manifest unknown: {self.host}/{name} does not exist"
                    + (f" ({detail})" if detail else ""),
                    hint="check the repository name and the tag or digest (and that the image was pushed)",
                ),
                budget=budget,
            ),
            limit=MAX_MANIFEST_BYTES, what=what,
            hint="tell the image's maintainer: registries and runtimes refuse documents that large")
        media_type = self._manifest_media_type(response.headers.get("Content-Type"), data, what)
        if wanted is not None:
            digest = Digest.of(data, wanted.algorithm)
            if digest != wanted:
                raise DigestMismatch(
                    f"registry {self.host} sent a manifest for {name} whose digest is {digest}",
                    hint="the registry or something between it and you altered the manifest; "
                    "tell the registry's operator",
                )
        else:
            digest = Digest.of(data)
        self._cross_check(response.headers.get("Docker-Content-Digest"), data, digest, what)
        return Manifest(data, media_type, digest)

    def open_blob(self, repository: str, digest: Digest, *, offset: int = 0,
                  budget: RetryBudget | None = None) -> BlobResponse:
        """Start downloading blob ``digest``; from ``offset`` with ``Range`` when > 0.

        Redirects to object storage are followed without the registry's Authorization. The
        returned BlobResponse's ``offset`` says whether the Range was honored. ``budget``: the
        download's retry budget when the caller resumes it after failures (pull does). Raises
        NotFound (404), AuthenticationError, RateLimited, RegistryUnreachable, RegistryError.
        """
        check_repository(repository)
        if offset < 0:
            raise ValueError("offset must be >= 0")
        what = f"blob {digest} of {repository}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self._request(
            "GET", f"/v2/{repository}/blobs/{digest}", scope=pull_scope(repository),
            accept=(200, 206, 416) if offset else (200,), headers=headers, stream=True, what=what,
            not_found=lambda detail: NotFound(
                f"blob {digest} not found in {self.host}/{repository}" + (f" ({detail})" if detail else ""),
                hint="the image's manifest names a layer the registry does not have; tell the image's publisher",
            ),
            budget=budget,
        )
        start = 0
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match and int(match.group(1)) == offset:
                start = offset
            else:
                # A range we did not ask for: start over rather than splice wrong bytes.
                response.close()
                response.release_conn()
                return self.open_blob(repository, digest, offset=0, budget=budget)
        elif response.status == 416:
            # Offset at or past the end (a complete partial file, or one from another blob).
            response.close()
            response.release_conn()
            return self.open_blob(repository, digest, offset=0, budget=budget)
        size = _total_size(response, start)
        return BlobResponse(response, offset=start, size_bytes=size, what=what, registry=self.host,
                            stall_s=self.transport.timeout_s)

    def blob_exists(self, repository: str, digest: Digest) -> bool:
        """True when the repository has blob ``digest`` (HEAD: 200 yes, 404 no)."""
        return self._blob_exists(repository, digest, pull_scope(check_repository(repository)))

    # -- push -----------------------------------------------------------------------------
    def upload_blob(
        self,
        repository: str,
        digest: Digest,
        size: int,
        fileobj: IO[bytes],
        *,
        mount_from: str | None = None,
    ) -> bool:
        """Upload ``size`` bytes from ``fileobj`` as blob ``digest``; False when already present.

        Tries a cross-repository mount from ``mount_from`` first when given. Otherwise POST
        then one monolithic PUT (distribution spec "pushing a blob monolithically"); the
        registry checks the digest. ``fileobj`` must be seekable for retries. Raises
        DigestMismatch when the registry reports another digest, and the usual errors.
        """
        check_repository(repository)
        scope = push_scope(repository)
        if self._blob_exists(repository, digest, scope):
            return False
        what = f"upload of blob {digest} to {repository}"
        if mount_from:
            check_repository(mount_from)
            query = urlencode({"mount": str(digest), "from": mount_from})
            response = self._request(
                "POST", f"/v2/{repository}/blobs/uploads/?{query}",
                scope=f"{scope} {pull_scope(mount_from)}", accept=(201, 202),
                headers={"Content-Length": "0"}, body=b"", what=what)
            if response.status == 201:
                return True
            # 202: the registry could not mount and opened an upload session instead; it is
            # simply abandoned (registries purge stale sessions) to keep one code path below.
        start = fileobj.tell() if size else 0
        budget = self.retry.budget()
        while True:
            # The PUT that completes an upload cannot be repeated on the same session (the
            # registry may already hold part of the body), so a failed PUT restarts the session;
            # the POSTs and PUTs of every round draw from one budget.
            response = self._request(
                "POST", f"/v2/{repository}/blobs/uploads/", scope=scope, accept=(202,),
                headers={"Content-Length": "0"}, body=b"", what=what, budget=budget)
            location = response.headers.get("Location")
            if not location:
                raise RegistryError(f"registry {self.host} started the {what} without a Location header",
                                    hint="the registry does not follow the distribution API: tell its operator")
            url = urljoin(self.base_url + "/", location)
            url += ("&" if "?" in url else "?") + urlencode({"digest": str(digest)})
            if size:
                fileobj.seek(start)
            try:
                response = self._request(
                    "PUT", url, scope=scope, accept=(201, *self.retry.statuses),
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                    body=fileobj if size else b"", what=what, budget=NO_RETRY.budget())
            except RegistryUnreachable as error:
                if not is_transient(error) or not budget.retry():  # never a TLS failure, say
                    raise
                continue
            if response.status == 201:
                break
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if not budget.retry(retry_after):
                raise self.transport.status_error(response.status, url, what, error_detail(response.data or b""),
                                                  budget.attempts, refused_wait_s=budget.refused_wait_s)
        self._cross_check(response.headers.get("Docker-Content-Digest"), None, digest, what)
        return True

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> Digest:
        """Store ``data`` as manifest ``repository:reference``; return its digest.

        ``reference`` is a tag or the manifest's own digest (checked before sending).
        """
        check_repository(repository)
        wanted = parse_version(reference)
        digest = Digest.of(data, wanted.algorithm if wanted else "sha256")
        if wanted is not None and wanted != digest:
            raise DigestMismatch(f"manifest to push as {repository}@{wanted} has digest {digest}")
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(f"cannot push a manifest of media type '{media_type}'",
                                hint="berth pushes OCI and Docker schema 2 manifests and indexes")
        what = f"manifest {repository}:{reference}" if wanted is None else f"manifest {repository}@{reference}"
        response = self._request(
            "PUT", f"/v2/{repository}/manifests/{reference}", scope=push_scope(repository),
            accept=(201,), headers={"Content-Type": media_type, "Content-Length": str(len(data))},
            body=data, what=what)
        self._cross_check(response.headers.get("Docker-Content-Digest"), data, digest, what)
        return digest

    # -- internals ------------------------------------------------------------------------
    def _blob_exists(self, repository: str, digest: Digest, scope: str) -> bool:
        response = self._request(
            "HEAD", f"/v2/{repository}/blobs/{digest}", scope=scope, accept=(200, 404),
            what=f"blob {digest} of {repository}")
        return response.status == 200

    def _request(
        self,
        method: str,
        path: str,
        *,
        scope: str | None,
        accept: tuple[int, ...],
        what: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | IO[bytes] | None = None,
        stream: bool = False,
        not_found: Callable[[str], Exception] | None = None,
        budget: RetryBudget | None = None,
    ) -> Any:
        """One authenticated request: answer at most one 401 challenge, then map refusals.
        Answering the challenge is not a retry; failures draw from ``budget`` (by default the
        request's own)."""
        url = urljoin(self.base_url + "/", path)
        ours = same_origin(url, self.base_url)
        position = body.tell() if body is not None and not isinstance(body, bytes) else None

        def make_not_found(detail: str) -> Exception:
            if not_found is None:
                return NotFound(f"{what} not found on registry {self.host}" + (f" ({detail})" if detail else ""))
            return not_found(detail)

        auth_headers = self.authorizer.headers(scope) if ours else {}
        budget = budget or self.retry.budget()
        for attempt in range(2):
            response = self.transport.request(
                method, url, accept=(*accept, 401, 403), headers={**(headers or {}), **auth_headers},
                body=body, stream=stream, what=what, not_found=make_not_found, budget=budget)
            if response.status not in (401, 403) or response.status in accept:
                return response
            detail = _error_text(response, stream)
            # A challenge from another host (one the registry redirected to) is refused as it
            # is: answering it would send the registry's password to that host's token realm.
            answered_by = getattr(response, "final_url", url)
            if ours and not same_origin(answered_by, self.base_url):
                raise AuthenticationError(
                    f"registry {self.host} redirected {what} to {urlsplit(answered_by).netloc}, which refused "
                    f"it (HTTP {response.status})" + (f": {detail}" if detail else ""),
                    hint="berth sends the registry's credentials to no other host: tell the registry's "
                    "operator (its storage redirect needs no credentials of yours)")
            if response.status == 403 or attempt == 1 or not ours:
                raise self.authorizer.refused(response.status, what, detail)
            auth_headers = self.authorizer.answer(response, scope)
            if position is not None:
                body.seek(position)  # type: ignore[union-attr]
        raise AssertionError("unreachable")  # pragma: no cover

    def _manifest_media_type(self, content_type: str | None, data: bytes, what: str) -> str:
        declared = (content_type or "").split(";", 1)[0].strip().lower()
        if declared in MANIFEST_TYPES:
            return declared
        try:
            document = parse_json(data, what=what, max_bytes=MAX_MANIFEST_BYTES)
        except ValueError:
            document = None
        if isinstance(document, dict):
            body_type = document.get("mediaType")
            if body_type in MANIFEST_TYPES:
                return body_type
            if document.get("schemaVersion") == 1:
                raise RegistryError(
                    f"{what} on {self.host} is a Docker schema 1 manifest, which berth does not support",
                    hint="re-push the image with a current docker, podman or skopeo (schema 2 or OCI)",
                )
            # An OCI manifest may omit mediaType; recognize it by its shape.
            if document.get("schemaVersion") == 2 and "config" in document and "layers" in document:
                return mediatypes.OCI_MANIFEST
            if document.get("schemaVersion") == 2 and "manifests" in document:
                return mediatypes.OCI_INDEX
        raise RegistryError(
            f"{what} on {self.host} has unsupported media type '{declared or 'none'}'",
            hint="berth reads OCI and Docker schema 2 manifests and indexes",
        )

    def _cross_check(self, header: str | None, data: bytes | None, digest: Digest, what: str) -> None:
        if not header:
            return
        try:
            announced = Digest.parse(header.strip())
        except InvalidDigest:
            return
        if data is not None and announced.algorithm != digest.algorithm:
            actual = Digest.of(data, announced.algorithm)
        elif announced.algorithm != digest.algorithm:
            return
        else:
            actual = digest
        if announced != actual:
            raise DigestMismatch(
                f"registry {self.host} announced digest {announced} for {what}, but the content is {actual}",
                hint="the registry or something between it and you altered the content; tell the registry's operator",
            )


def _error_text(response: Any, stream: bool) -> str:
    try:
        body = response.read(2000, decode_content=False) if stream else (response.data or b"")
    except Exception:  # noqa: BLE001 - the status already says what failed
        body = b""
    if stream:
        response.close()  # the rest of an error body is not worth reading
        response.release_conn()
    return error_detail(body) if body else ""


def _total_size(response: Any, start: int) -> int | None:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match and match.group(3) != "*":
        return int(match.group(3))
    length = content_length(response)
    return None if length is None else start + length
