"""HTTP for the registry client: one urllib3 pool, retries with backoff, redirects, errors.

Rules (STYLE.md, issue 2):

- every request states the statuses it accepts; any other status becomes a typed error
  (401/403 authentication, 404 not found, 429 rate limited, anything else RegistryError);
- only connection errors, 5xx and 429 are retried, under berth's one retry rule
  (:mod:`berth.retry`: capped exponential backoff with full jitter, ``Retry-After`` honored, a
  bounded number of attempts per operation shared with the client's and pull's own loops);
  TLS failures are not retried. urllib3's own ``Retry`` is not used: it has no budget shared
  with the layers above a request, and berth follows redirects itself (to drop
  ``Authorization`` on another origin);
- redirects are followed by hand so that the registry's ``Authorization`` header never reaches
  another host (blob GETs redirect to object storage with its own signed URL);
- ``urllib3`` is imported lazily: ``berth run`` does not pay for it.

The pool (``urllib3.PoolManager``) is thread-safe; one Transport serves parallel downloads.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection, Mapping
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from berth import __version__
from berth.errors import (
    AuthenticationError,
    ConfigError,
    NotFound,
    RateLimited,
    RegistryError,
    RegistryUnreachable,
)
from berth.record import Record

# The one retry rule (berth.retry); imported under these names by the registry client and tests.
from berth.retry import (  # noqa: F401
    RETRY_STATUSES,
    RetryBudget,
    RetryPolicy,
    StallWatch,
    parse_retry_after,
    refused_wait,
    transient,
)

USER_AGENT = f"berth/{__version__}"
MAX_REDIRECTS = 5
#: The most an accepted answer that is not streamed may hold (a ping, a HEAD, an upload's POST
#: or PUT: registries send a few bytes); one that would hold more is refused, never read whole.
MAX_SMALL_BODY_BYTES = 1 << 20
#: How much of an error body is kept for the message (registries send JSON error lists).
ERROR_BODY_BYTES = 2000

#: For a request that must not be sent twice by the transport (its caller restarts the
#: whole exchange instead, from its own budget).
NO_RETRY = RetryPolicy(attempts=1)


def same_origin(url_a: str, url_b: str) -> bool:
    """True when both URLs have the same scheme, host and port (the Authorization boundary), as
    urllib3, which connects to them, reads them: Python's urlsplit reads ``http://a\\@b/`` as
    host b (userinfo ends at the last '@') where urllib3 connects to a (its authority ends at
    the backslash), which sent the registry's credentials to a. Unparsable: not the same."""
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    try:
        a, b = parse_url(url_a), parse_url(url_b)
    except LocationParseError:
        return False
    return (a.scheme, a.host, a.port or _default_port(a.scheme)) == (
        b.scheme, b.host, b.port or _default_port(b.scheme))


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443}.get(scheme)


def error_detail(body: bytes) -> str:
    """A short text from a registry error body (``{"errors": [{"code", "message"}]}``)."""
    from berth.untrusted import parse_json

    try:
        data = parse_json(body.decode("utf-8", "replace"), what="an error body")
        messages = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                    for e in data.get("errors", []) if isinstance(e, dict)]
        if messages:
            return "; ".join(messages)
    except (ValueError, AttributeError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return text[:200]


def content_length(response) -> int | None:
    """The response's Content-Length when it is a plain number, else None: the one reading of
    it (a bound on what is read is checked against it, never a size taken from it alone)."""
    length = response.headers.get("Content-Length")
    return int(length) if length and re.fullmatch(r"[0-9]{1,19}", length) else None


def read_bounded(response, limit: int, what: str, registry: str, *, hint: str, stall_s: float = 60.0) -> bytes:
    """The body of a ``stream=True`` response, refused (RegistryError with ``hint``) past
    ``limit`` bytes, whatever its Content-Length says: a document berth parses must never be
    read whole into memory first. A connection lost meanwhile, or a body that stalls over
    ``stall_s`` (berth.retry's StallWatch), is RegistryUnreachable."""
    import urllib3.exceptions as uexc

    try:
        data = _read_limited(response, limit, stall_s)
    except (uexc.HTTPError, OSError) as exc:
        raise RegistryUnreachable(
            f"connection to registry {registry} lost while reading {what}: {getattr(exc, 'args', [exc])[0]}"
        ) from None
    if data is None:
        length = content_length(response)
        size = f"{length} bytes, " if length is not None and length > limit else ""
        raise RegistryError(f"{what} is {size}more than the {limit} bytes berth accepts", hint=hint)
    return data


def _read_limited(response, limit: int, stall_s: float) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes (or, before any is read,
    when its Content-Length says it will). urllib3's and the system's errors pass through; a
    body that stalls (StallWatch over ``stall_s``) raises TimeoutError, as silence does."""
    length = content_length(response)
    if length is not None and length > limit:
        return None
    data = bytearray()
    watch = StallWatch(stall_s, lambda n: response.read1(n, decode_content=False))
    # Read until the end: urllib3 notices a body cut short of its Content-Length only
    # on the read that finds the end of the stream.
    while chunk := watch.read(64 * 1024):
        data += chunk
        if len(data) > limit:
            return None
        if (length is None or len(data) < length) and watch.stalled(len(chunk)):
            raise TimeoutError(f"the body stalled ({watch.received} bytes in {stall_s:g} s)")
    return bytes(data)


class Reply(Record):
    """An answer read whole (bounded) whose connection went back to the pool: what
    :meth:`Transport.request` returns for a request that is not streamed."""

    status: int
    headers: Any  # urllib3's HTTPHeaderDict (``getlist`` for repeated headers)
    data: bytes
    final_url: str  # the URL that answered (after redirects)


class Transport:
    """Sends requests to one registry (and the hosts it redirects to) with retries.

    ``registry`` is the ``host[:port]`` named in messages; ``retry`` is the policy (default:
    :class:`RetryPolicy`'s). The Transport does not know about authentication: the caller
    passes headers, and gets 401 back when it lists 401 as accepted.
    """

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        retry: RetryPolicy | None = None,
        timeout_s: float = 60.0,
        pool_size: int = 8,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        import urllib.request

        import urllib3

        self.registry = registry
        self.insecure = insecure
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self.pool_size = pool_size
        #: ``{"http": URL, "https": URL, "no": "host,…"}`` as urllib's getproxies() returns;
        #: by default from the environment (http_proxy, https_proxy, no_proxy), which is how
        #: compute nodes behind a site proxy reach outside registries.
        self.proxies = dict(urllib.request.getproxies_environment() if proxies is None else proxies)
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=pool_size, retries=False, timeout=self.timeout)
        self._proxy_pools: dict[str, Any] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.pool.clear()
        with self._lock:
            for manager in self._proxy_pools.values():
                manager.clear()

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL that ``url`` goes through, or None for a direct connection."""
        parts = urlsplit(url)
        proxy = self.proxies.get(parts.scheme)
        if not proxy or not parts.hostname:
            return None
        if _is_loopback(parts.hostname):
            return None  # as Go's net/http (docker, skopeo) does: loopback is never proxied
        if proxy_bypassed(parts.hostname, parts.port, self.proxies):
            return None
        return proxy

    def _manager_for(self, url: str) -> Any:
        proxy = self.proxy_for(url)
        if proxy is None:
            return self.pool
        with self._lock:
            manager = self._proxy_pools.get(proxy)
            if manager is None:
                import urllib3

                written = usable_proxy_url(proxy)
                if written is None:
                    variable = f"{urlsplit(url).scheme}_proxy"
                    # Not the value: a proxy URL may carry a password (the S3 side's rule too).
                    raise ConfigError(f"the proxy setting {variable} is not a usable URL "
                                      f"(berth would reach registry {self.registry} through it)",
                                      hint=f"fix {variable} (or {variable.upper()}) in your environment: "
                                           "http://HOST:PORT with a port from 1 to 65535; or unset it")
                parts = urlsplit(written)
                headers = None
                if parts.username is not None:
                    # Credentials in the proxy URL (http://user:pw@proxy:3128) go in a header.
                    from urllib.parse import unquote

                    login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                    headers = urllib3.make_headers(proxy_basic_auth=login)
                    parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
                manager = urllib3.ProxyManager(parts.geturl(), proxy_headers=headers, num_pools=4,
                                               maxsize=self.pool_size, retries=False, timeout=self.timeout)
                self._proxy_pools[proxy] = manager
        return manager

    # -- the one request loop -------------------------------------------------------------
    def request(
        self,
        method: str,
        url: str,
        *,
        accept: Collection[int],
        headers: Mapping[str, str] | None = None,
        body: bytes | IO[bytes] | None = None,
        stream: bool = False,
        what: str,
        follow_redirects: bool = True,
        not_found: Callable[[str], Exception] | None = None,
        budget: RetryBudget | None = None,
    ) -> Any:
        """Send one request; when its status is in ``accept``, return the urllib3 response
        (``stream``: its body unread, the caller must ``release_conn()``), else a :class:`Reply`
        with the body read (at most MAX_SMALL_BODY_BYTES) and the connection released.

        ``what`` describes the request for messages ("manifest a/b:tag"). A file ``body`` must be seekable
        for retries (it is rewound to where it was). Redirects (301/302/303/307/308) are
        followed up to MAX_REDIRECTS; ``Authorization`` is dropped when the target is on another
        origin; the response's ``final_url`` is the URL that answered. 404 raises
        ``not_found(detail)`` when given, else NotFound. Raises
        AuthenticationError (401/403 not accepted), RateLimited, RegistryUnreachable or
        RegistryError. ``budget`` is the operation's retry budget when this request is part of
        a larger one (a blob download that resumes, a manifest read again); by default the
        request gets its own. ``NO_RETRY.budget()`` for a request that cannot simply be sent
        again, such as the PUT that completes an upload.
        """
        import urllib3.exceptions as uexc

        budget = budget or self.retry.budget()
        headers = dict(headers or {})
        start_pos = body.tell() if body is not None and hasattr(body, "tell") else None
        while True:
            if start_pos is not None:
                body.seek(start_pos)  # type: ignore[union-attr]
            try:
                response = self._send_following(method, url, headers, body, stream, follow_redirects, what)
            except uexc.SSLError as exc:
                raise self._tls_error(url, what, exc) from None
            except (uexc.HTTPError, OSError) as exc:
                retryable = _retryable_exception(exc)
                if retryable and budget.retry():
                    continue
                raise _marked(self._unreachable(url, what, exc, budget.attempts), retryable) from None
            status = response.status
            if status in accept:
                if not stream:
                    try:
                        # A HEAD's Content-Length is the blob's: it has no body to bound.
                        body = (_read_limited(response, MAX_SMALL_BODY_BYTES, self.timeout_s) if method != "HEAD"
                                else response.read(decode_content=False))
                    except (uexc.HTTPError, OSError) as exc:
                        _discard(response)
                        retryable = _retryable_exception(exc)
                        if retryable and budget.retry():
                            continue
                        raise _marked(self._unreachable(url, what, exc, budget.attempts), retryable) from None
                    if body is None:
                        response.close()  # the rest is not read: the connection is not reused
                        response.release_conn()
                        raise RegistryError(
                            f"registry {self.registry} answered {what} with more than {MAX_SMALL_BODY_BYTES} bytes",
                            hint="the registry is misbehaving: tell its operator")
                    response.release_conn()
                    return Reply(status, response.headers, body, response.final_url)
                return response
            if status in self.retry.statuses:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if budget.allows(retry_after):
                    _discard(response)
                    budget.retry(retry_after)
                    continue
            detail = _read_error(response)
            raise self.status_error(status, url, what, detail, budget.attempts, not_found, budget.refused_wait_s)

    def get_document(self, send: Callable[[RetryBudget], Any], *, limit: int, what: str, hint: str,
                     budget: RetryBudget | None = None) -> tuple[Any, bytes]:
        """A small document berth parses (a manifest, a token response): ``send(budget)`` sends
        the request with ``stream=True`` (through the caller's authentication, if any), and its
        body is read bounded by ``limit`` (:func:`read_bounded`, RegistryError with ``hint``
        past it). A connection lost inside the body sends it again, from the same ``budget``
        (by default the document's own): a document is small. Returns the response, closed
        (its status and headers stay readable), and the body."""
        budget = budget or self.retry.budget()
        while True:
            response = send(budget)
            try:
                return response, read_bounded(response, limit, what, self.registry, hint=hint,
                                                stall_s=self.timeout_s)
            except RegistryUnreachable:
                if not budget.retry():
                    raise
            finally:
                response.close()  # unread bytes must not go back to the pool with the connection
                response.release_conn()

    def _send_following(self, method, url, headers, body, stream, follow_redirects, what):
        current_url, current_method, current_body = url, method, body
        # Headers given per request replace the pool's, so the User-Agent goes in each time.
        current_headers = {"User-Agent": USER_AGENT, **headers}
        for _hop in range(MAX_REDIRECTS + 1):
            response = self._manager_for(current_url).request(
                current_method,
                current_url,
                headers=current_headers,
                body=current_body,
                preload_content=False,
                decode_content=False,
                redirect=False,
                retries=False,
                timeout=self.timeout,
            )
            # Where the answer came from: a challenge (401) from a host the registry redirected
            # to is not the registry's to answer with its credentials (RegistryClient._request).
            response.final_url = current_url
            if not follow_redirects or response.status not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("Location")
            if not location:
                return response
            _discard(response)
            try:
                target = urljoin(current_url, location)
            except ValueError:  # "http://[::1/": Python's URL parser refuses what urllib3's would
                target = location
            if _scheme(target) not in ("http", "https") or not _parses(target):
                raise RegistryError(f"registry {self.registry} redirected {what} to an unsupported URL "
                                    f"{target[:200]}", hint="the registry is misconfigured: tell its operator")
            if not same_origin(current_url, target):
                # Never hand the registry's credentials (or token) to another host.
                current_headers = {k: v for k, v in current_headers.items() if k.lower() != "authorization"}
            if response.status == 303 or (response.status in (301, 302) and current_method == "POST"):
                current_method, current_body = "GET", None
            current_url = target
        raise RegistryError(f"registry {self.registry} redirected {what} more than {MAX_REDIRECTS} times",
                            hint="the registry (or a proxy before it) redirects in a loop: tell its operator")

    # -- errors ---------------------------------------------------------------------------
    def _tls_error(self, url: str, what: str, exc: BaseException) -> RegistryUnreachable:
        reason = _reason(exc)
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower():
            hint = ("the registry's certificate is not trusted here: if its certificate authority is "
                    "private, ask your site administrator to install it system-wide (or point "
                    "SSL_CERT_FILE at a bundle that holds it); check the host name too")
        else:
            hint = (f"for a plain-HTTP registry set insecure for {self.registry} (berth pull --insecure, "
                    "or insecure = true in its [[registries]] entry of the configuration)")
        return RegistryUnreachable(f"TLS connection to {_host_of(url)} failed for {what}: {reason}", hint=hint)

    def _unreachable(self, url: str, what: str, exc: BaseException, attempts: int) -> RegistryUnreachable:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        host = _host_of(url)
        reason = _reason(exc)
        if "Name or service not known" in reason or "NameResolution" in type(exc).__name__ \
                or "nodename nor servname" in reason or "Temporary failure in name resolution" in reason:
            hint = f"check the registry host name '{host}' (DNS lookup failed)"
        elif self.insecure:
            hint = f"is the registry running on {host}?"
        else:
            hint = (f"is the registry running on {host}? for a plain-HTTP registry set insecure for it "
                    "(berth pull --insecure, or insecure = true in its [[registries]] entry of the configuration)")
        return RegistryUnreachable(f"cannot reach registry {self.registry} for {what}{tries}: {reason}", hint=hint)

    def status_error(self, status: int, url: str, what: str, detail: str, attempts: int,
                     not_found: Callable[[str], Exception] | None = None,
                     refused_wait_s: float | None = None) -> Exception:
        """The typed error for an unaccepted ``status`` after ``attempts`` attempts: 401/403
        AuthenticationError, 404 NotFound (or ``not_found(detail)``), 429 RateLimited, 5xx and
        anything else RegistryError. ``refused_wait_s``: the registry's Retry-After that
        berth.retry does not wait for, which stopped the retries (said, with when to retry)."""
        detail_text = f": {detail}" if detail else ""
        if refused_wait_s is not None and status in self.retry.statuses:
            asked, when = refused_wait(refused_wait_s, self.retry)
            kind = RateLimited if status == 429 else RegistryError
            advice = ("or log in: registries grant more to authenticated users" if status == 429 else
                      "the registry is unavailable for now (maintenance?); if it lasts, tell its operator")
            return kind(f"registry {self.registry} answered HTTP {status} to {what} and {asked}{detail_text}",
                        hint=f"{when}, {advice}")
        if status == 404:
            return not_found(detail) if not_found else NotFound(f"{what} not found on registry {self.registry}{detail_text}")
        if status in (401, 403):
            return AuthenticationError(
                f"registry {self.registry} refused access to {what} (HTTP {status}){detail_text}")
        if status == 429:
            return RateLimited(
                f"registry {self.registry} is rate-limiting requests for {what} "
                f"(HTTP 429, {attempts} attempts){detail_text}",
                hint="wait a while and try again, or log in: registries grant more to authenticated users",
            )
        if 500 <= status < 600:
            return RegistryError(
                f"registry {self.registry} failed on {what} (HTTP {status}, {attempts} attempts){detail_text}",
                hint="the registry is in trouble: try again later or tell its operator",
            )
        return RegistryError(f"registry {self.registry} answered HTTP {status} to {what}{detail_text}")


def _scheme(url: str) -> str | None:
    """The scheme urllib3 reads in ``url`` (None when it cannot parse it)."""
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    try:
        return parse_url(url).scheme
    except LocationParseError:
        return None


def _parses(url: str) -> bool:
    """Whether Python's URL parser reads ``url``'s host and port too (proxy_for asks it): an
    IPv6 host without its ']' or a port past 65535 raised ValueError there, a traceback."""
    try:
        urlsplit(url).port
    except ValueError:
        return False
    return True


def usable_proxy_url(proxy: str) -> str | None:
    """``proxy`` (a proxy variable's value) as the URL to use, ``http://`` added when it names no
    scheme, or None when berth cannot use it: Python's or urllib3's URL parser refuses it (an
    IPv6 host without its ']', a port past 65535), it names no host, or its port is 0. The one
    rule for registries and S3 endpoints; callers name the variable, never its value (a proxy
    URL may carry a password)."""
    written = proxy if "://" in proxy else "http://" + proxy
    if not _parses(written) or _scheme(written) is None or not urlsplit(written).hostname or urlsplit(written).port == 0:
        return None
    return written


def proxy_bypassed(hostname: str, port: int | None, proxies: Mapping[str, str]) -> bool:
    """Whether ``no_proxy`` (``proxies["no"]``, as urllib's ``getproxies_environment`` reads the
    environment: lower case over upper case) sends ``hostname`` (a name or address; ``port``
    for ``host:port`` entries) around the proxy: urllib's rule (``*``, names, domain suffixes,
    ``host:port``) and, as curl, Go and reqwest read it, an address inside a CIDR entry
    (``10.0.0.0/8``), which urllib does not understand. berth's one rule for registries and S3
    endpoints."""
    import ipaddress
    import urllib.request

    if urllib.request.proxy_bypass_environment(hostname if port is None else f"{hostname}:{port}", proxies):
        return True
    try:
        address = ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        return False
    for entry in proxies.get("no", "").split(","):
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False) if "/" in entry else None
        except ValueError:
            continue
        if network is not None and network.version == address.version and address in network:
            return True
    return False


def _is_loopback(hostname: str) -> bool:
    import ipaddress

    if hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        return False


def _marked(error: RegistryUnreachable, retryable: bool) -> RegistryUnreachable:
    """``error`` marked transient (berth.retry) when ``retryable``: a loop above the request (an
    upload's sessions) sends again only what the rule retries."""
    return transient(error) if retryable else error


def _retryable_exception(exc: BaseException) -> bool:
    import urllib3.exceptions as uexc

    if isinstance(exc, uexc.SSLError):
        return False
    name_error = getattr(uexc, "NameResolutionError", ())  # urllib3 >= 2
    if isinstance(exc, name_error) and "Temporary failure" not in str(exc):
        # An unknown name (EAI_NONAME) stays unknown; only EAI_AGAIN is worth waiting for.
        return False
    return isinstance(exc, (uexc.HTTPError, ConnectionError, TimeoutError, OSError))


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = str(reason)
    # urllib3 prefixes its connection object's repr: keep the operating system's words.
    text = re.sub(r"^(?:<[^>]*>|\w*Connection(?:Pool)?\([^)]*\)):\s*", "", text)
    return text


def _host_of(url: str) -> str:
    return urlsplit(url).netloc


def _discard(response) -> None:
    try:
        response.drain_conn()
    except Exception:  # noqa: BLE001 - a broken connection is simply not reused
        pass
    response.release_conn()


def _read_error(response) -> str:
    try:
        body = response.read(ERROR_BODY_BYTES)
    except Exception:  # noqa: BLE001 - the status already says what failed
        body = b""
    finally:
        _discard(response)
    return error_detail(body[:ERROR_BODY_BYTES] if body else b"")
