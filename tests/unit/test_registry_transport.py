"""Retries, backoff, redirects and error mapping (berth.registry.transport) on a scripted server."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
from email.utils import formatdate

import pytest

from berth import __version__
from berth.errors import AuthenticationError, NotFound, RateLimited, RegistryError, RegistryUnreachable
from berth.registry.transport import RetryPolicy, Transport, parse_retry_after, same_origin
from tests.unit.registry_fake import FakeServer, Reply


class Sleeps(list):
    """Records every backoff delay instead of sleeping."""


def recording_policy(sleeps: list, retries: int = 3, **kwargs) -> RetryPolicy:
    # uniform returns the upper bound so delays are deterministic (the jitter's ceiling).
    return RetryPolicy.with_retries(retries, sleep=sleeps.append, uniform=lambda low, high: high, **kwargs)


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.stop()


def make_transport(server, sleeps, retries=3, **kwargs) -> Transport:
    return Transport(server.host, insecure=True, timeout_s=5, retry=recording_policy(sleeps, retries, **kwargs))


def sequence(*replies):
    """A handler that answers with ``replies`` in order, repeating the last one."""
    queue = list(replies)

    def handler(request):
        return queue.pop(0) if len(queue) > 1 else queue[0]
    return handler


# -- backoff ---------------------------------------------------------------------------------

def test_backoff_grows_exponentially_and_is_capped():
    backoff = RetryPolicy(base_s=0.5, cap_s=4.0, uniform=lambda low, high: high)
    assert [backoff.delay_s(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_jitter_stays_within_bounds():
    backoff = RetryPolicy(base_s=1.0, cap_s=8.0)
    for attempt in range(6):
        for _ in range(50):
            assert 0.0 <= backoff.delay_s(attempt) <= min(8.0, 2.0 ** attempt)


def test_backoff_honors_retry_after_up_to_a_cap():
    backoff = RetryPolicy(base_s=0.5, max_retry_after_s=30.0, uniform=lambda low, high: high)
    assert backoff.delay_s(0, retry_after_s=7) == 7
    assert backoff.delay_s(0, retry_after_s=3600) == 30.0
    assert backoff.delay_s(3, retry_after_s=1) == 4.0  # our own delay when longer


def test_parse_retry_after():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 42, usegmt=True), now=now) == pytest.approx(42, abs=1)
    assert parse_retry_after(formatdate(now - 42, usegmt=True), now=now) == 0.0


def test_same_origin():
    assert same_origin("http://a:80/x", "http://a/y")
    assert not same_origin("http://a:5000/x", "http://a:5001/x")
    assert not same_origin("https://a/x", "http://a/x")
    assert not same_origin("https://a/x", "https://b/x")
    assert not same_origin("http://b\\@a/x", "http://a/x")  # urllib3 connects to b
    assert not same_origin("http://[a/x", "http://[a/x")      # unparsable: never the registry's


# -- retries ---------------------------------------------------------------------------------

def test_5xx_is_retried_then_succeeds(server):
    server.handler = sequence(Reply(503), Reply(500), Reply(200, b"ok"))
    sleeps: list = []
    response = make_transport(server, sleeps).request("GET", server.url + "/v2/", accept=(200,), what="ping")
    assert response.data == b"ok"
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]


def test_429_honors_retry_after_and_ends_in_rate_limited(server):
    server.handler = sequence(Reply(429, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}',
                                    {"Retry-After": "3"}))
    sleeps: list = []
    with pytest.raises(RateLimited) as caught:
        make_transport(server, sleeps, retries=2).request("GET", server.url + "/v2/x", accept=(200,), what="thing")
    assert len(server.requests) == 3  # first attempt + 2 retries
    assert sleeps == [3.0, 3.0]
    assert "TOOMANYREQUESTS: slow down" in caught.value.message
    assert "3 attempts" in caught.value.message


@pytest.mark.parametrize("status, error, advice", [(429, RateLimited, "log in"), (503, RegistryError, "maintenance")])
def test_a_retry_after_beyond_the_cap_stops_at_once_naming_the_wait(server, status, error, advice):
    """berth.retry: a registry that asks for a longer wait than the policy takes (an hour, cap
    60 s) is not asked again after 60 s (that hammers it) nor waited for: one request, no sleep,
    an error naming the registry, the wait and when to try again."""
    server.handler = sequence(Reply(status, b"", {"Retry-After": "3600"}))
    sleeps: list = []
    with pytest.raises(error) as caught:
        make_transport(server, sleeps, retries=5).request("GET", server.url + "/v2/x", accept=(200,), what="thing")
    assert (len(server.requests), sleeps, type(caught.value)) == (1, [], error)
    assert caught.value.message == (f"registry {server.host} answered HTTP {status} to thing and asked berth to wait "
                                    "3600 s before trying again (Retry-After), longer than berth waits between "
                                    "attempts (60 s): stopped without retrying")
    assert caught.value.hint.startswith("try again after 20") and advice in caught.value.hint
    # At the cap it is still a wait berth takes.
    server.requests.clear()
    server.handler = sequence(Reply(status, b"", {"Retry-After": "60"}), Reply(200, b"ok"))
    assert make_transport(server, sleeps).request("GET", server.url + "/v2/", accept=(200,), what="p").data == b"ok"
    assert (len(server.requests), sleeps) == (2, [60.0])


def test_persistent_500_is_a_registry_error_after_retries(server):
    server.handler = sequence(Reply(500, b"boom"))
    sleeps: list = []
    with pytest.raises(RegistryError) as caught:
        make_transport(server, sleeps, retries=4).request("GET", server.url + "/v2/", accept=(200,), what="ping")
    assert type(caught.value) is RegistryError
    assert len(server.requests) == 5
    assert sleeps == [0.5, 1.0, 2.0, 4.0]
    assert "HTTP 500" in caught.value.message and "boom" in caught.value.message


@pytest.mark.parametrize("status, error", [(400, RegistryError), (404, NotFound), (401, AuthenticationError),
                                           (403, AuthenticationError), (405, RegistryError)])
def test_other_statuses_are_not_retried(server, status, error):
    server.handler = sequence(Reply(status))
    sleeps: list = []
    with pytest.raises(error):
        make_transport(server, sleeps).request("GET", server.url + "/v2/", accept=(200,), what="ping")
    assert len(server.requests) == 1
    assert sleeps == []


def test_accepted_statuses_are_returned_not_raised(server):
    server.handler = sequence(Reply(404))
    response = make_transport(server, []).request("HEAD", server.url + "/v2/x", accept=(200, 404), what="x")
    assert response.status == 404


def test_connection_refused_is_retried_then_unreachable_with_hint():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    sleeps: list = []
    transport = Transport(f"127.0.0.1:{port}", insecure=False, timeout_s=5, retry=recording_policy(sleeps, 2))
    with pytest.raises(RegistryUnreachable) as caught:
        transport.request("GET", f"https://127.0.0.1:{port}/v2/", accept=(200,), what="ping")
    assert sleeps == [0.5, 1.0]
    assert "Connection refused" in caught.value.message
    assert f"cannot reach registry 127.0.0.1:{port}" in caught.value.message
    assert "is the registry running" in caught.value.hint and "insecure" in caught.value.hint


def test_tls_to_a_plain_http_server_is_not_retried_and_suggests_insecure(server):
    sleeps: list = []
    transport = Transport(server.host, insecure=False, timeout_s=5, retry=recording_policy(sleeps, 3))
    with pytest.raises(RegistryUnreachable) as caught:
        transport.request("GET", f"https://{server.host}/v2/", accept=(200,), what="ping")
    assert sleeps == []
    assert caught.value.message.startswith(f"TLS connection to {server.host} failed")
    assert "plain-HTTP registry set insecure" in caught.value.hint


def test_file_body_is_rewound_for_a_retry(server):
    import io

    server.handler = sequence(Reply(502), Reply(201))
    body = io.BytesIO(b"xxpayload")
    body.seek(2)
    make_transport(server, []).request("PUT", server.url + "/up", accept=(201,), body=body,
                                       headers={"Content-Length": "7"}, what="upload")
    assert [r.body for r in server.requests] == [b"payload", b"payload"]


def test_user_agent_names_berth_and_its_version(server):
    server.handler = sequence(Reply(200))
    make_transport(server, []).request("GET", server.url + "/v2/", accept=(200,), what="ping")
    assert server.requests[0].header("User-Agent") == f"berth/{__version__}"


# -- redirects -------------------------------------------------------------------------------

def test_redirect_to_another_host_drops_authorization(server):
    other = FakeServer(lambda request: Reply(200, b"blob bytes"))
    try:
        server.handler = lambda request: Reply(307, headers={"Location": f"{other.url}/storage/obj?sig=1"})
        response = make_transport(server, []).request(
            "GET", server.url + "/v2/a/blobs/x", accept=(200,), what="blob",
            headers={"Authorization": "Bearer secret", "Range": "bytes=3-"})
        assert response.data == b"blob bytes"
        [target] = other.requests
        assert target.path == "/storage/obj?sig=1"
        assert target.header("Authorization") is None
        assert target.header("Range") == "bytes=3-"  # the range still applies at the target
        assert server.requests[0].header("Authorization") == "Bearer secret"
    finally:
        other.stop()


def test_redirect_on_the_same_host_keeps_authorization(server):
    def handler(request):
        if request.path == "/v2/a/blobs/x":
            return Reply(302, headers={"Location": "/elsewhere"})
        return Reply(200, b"here")
    server.handler = handler
    response = make_transport(server, []).request("GET", server.url + "/v2/a/blobs/x", accept=(200,),
                                                  what="blob", headers={"Authorization": "Basic abc"})
    assert response.data == b"here"
    assert [r.header("Authorization") for r in server.requests] == ["Basic abc", "Basic abc"]


def test_a_redirect_that_python_and_urllib3_read_as_different_hosts_gets_no_authorization(server):
    """``http://OTHER\\@REGISTRY/`` is the registry to Python's urlsplit (which judged the
    origin: the userinfo ends at the last '@') and OTHER to urllib3 (which connects: its
    authority ends at the backslash), so the registry's credentials went to OTHER. The origin
    is judged now as urllib3 reads the URL it connects to."""
    other = FakeServer(lambda request: Reply(200, b"blob bytes"))
    try:
        server.handler = lambda request: Reply(307, headers={"Location": f"{other.url}\\@{server.host}/steal"})
        response = make_transport(server, []).request(
            "GET", server.url + "/v2/a/blobs/x", accept=(200,), what="blob",
            headers={"Authorization": "Basic c2VjcmV0"})
        assert response.data == b"blob bytes"
        [target] = other.requests
        assert target.header("Authorization") is None
    finally:
        other.stop()


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/x",
                                      # Python's URL parser raised ValueError (a traceback) on these:
                                      "http://[::1/x", "//[::1/x", "http://other.example:99999999999999999999/x"])
def test_a_redirect_to_another_scheme_is_refused_not_followed(server, location):
    server.handler = lambda request: Reply(302, headers={"Location": location})
    with pytest.raises(RegistryError, match="redirected blob to an unsupported URL"):
        make_transport(server, []).request("GET", server.url + "/v2/a/blobs/x", accept=(200,), what="blob")
    assert len(server.requests) == 1  # refused, not retried as a network error


def test_redirect_loop_is_an_error(server):
    server.handler = lambda request: Reply(302, headers={"Location": "/loop"})
    with pytest.raises(RegistryError, match="redirected blob more than 5 times"):
        make_transport(server, []).request("GET", server.url + "/v2/", accept=(200,), what="blob")
    assert len(server.requests) == 6


def test_importing_the_client_does_not_import_urllib3():
    code = "import sys, berth.registry.client, berth.cli.auth; print('urllib3' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# -- proxies ---------------------------------------------------------------------------------

def test_plain_http_goes_through_the_configured_proxy(server):
    """The fake server plays the proxy: it receives the absolute URL of the registry."""
    server.handler = sequence(Reply(200, b"via proxy"))
    transport = Transport("registry.example:5000", insecure=True, retry=RetryPolicy(attempts=1), timeout_s=5,
                          proxies={"http": f"http://user:p%40ss@{server.host}"})
    response = transport.request("GET", "http://registry.example:5000/v2/", accept=(200,), what="ping")
    assert response.data == b"via proxy"
    [request] = server.requests
    assert request.path == "http://registry.example:5000/v2/"
    assert request.header("Proxy-Authorization") == "Basic " + base64.b64encode(b"user:p@ss").decode()


def test_no_proxy_and_loopback_bypass_the_proxy(server):
    transport = Transport("x", insecure=True, retry=RetryPolicy(attempts=1), timeout_s=5,
                          proxies={"http": "http://proxy.example:3128", "https": "http://proxy.example:3128",
                                   "no": "internal.example,.corp.example"})
    assert transport.proxy_for("http://registry.example/v2/") == "http://proxy.example:3128"
    assert transport.proxy_for("https://registry.example/v2/") == "http://proxy.example:3128"
    assert transport.proxy_for("http://internal.example:5000/v2/") is None
    assert transport.proxy_for("http://r.corp.example/v2/") is None
    for loopback in ("127.0.0.1:5000", "localhost", "[::1]:5000", "127.9.9.9"):
        assert transport.proxy_for(f"http://{loopback}/v2/") is None, loopback
    assert Transport("x", proxies={}).proxy_for("http://registry.example/") is None


def test_no_proxy_cidr_entries_bypass_the_proxy():
    """An address inside a CIDR entry of no_proxy goes direct (curl, Go and reqwest read it so;
    urllib does not): the one rule registries and S3 endpoints share (review10)."""
    transport = Transport("x", proxies={"http": "http://proxy.example:3128",
                                        "no": "10.0.0.0/8, fd00::/8,bad/99,registry.example"})
    assert transport.proxy_for("http://10.1.2.3:5000/v2/") is None
    assert transport.proxy_for("http://[fd00::5]:5000/v2/") is None
    assert transport.proxy_for("http://11.1.2.3/v2/") == "http://proxy.example:3128"
    assert transport.proxy_for("http://10.example/v2/") == "http://proxy.example:3128"
    assert transport.proxy_for("http://registry.example/v2/") is None
    assert Transport("x", proxies={"http": "http://p:1", "no": "::/0"}).proxy_for("http://10.1.2.3/") == "http://p:1"


@pytest.mark.parametrize("reply", [
    Reply(200, b"{" + b" " * (3 << 20) + b"}"),
    Reply(200, b"{}", headers={"Content-Length": str(10 << 30)}, drop_after=2),
], ids=["3MiB-body", "10GiB-announced"])
def test_an_answer_that_is_not_streamed_is_read_with_a_bound(server, reply):
    """A ping (berth login) or an upload's answer was read whole into memory: a registry could
    answer gigabytes. Past 1 MiB (or announcing more) it is refused, without reading it all."""
    server.handler = lambda request: reply
    with pytest.raises(RegistryError, match="answered the API root with more than 1048576 bytes"):
        make_transport(server, []).request("GET", f"{server.url}/v2/", accept=(200,), what="the API root")


def test_a_head_announcing_a_large_blob_is_not_refused(server):
    server.handler = lambda request: Reply(200, b"x" * (2 << 20))
    response = make_transport(server, []).request("HEAD", f"{server.url}/v2/a/blobs/x", accept=(200,), what="blob")
    assert response.status == 200 and response.headers["Content-Length"] == str(2 << 20)


def test_an_answer_that_is_not_streamed_is_a_reply_of_berths_not_urllib3s_response(server):
    """A non-streamed answer was urllib3's response with its private ``_body`` cache set so that
    ``response.data`` returned the bounded body: a private attribute, whose meaning urllib3 may
    change in any release. It is berth's own record: status, headers, the body, the URL that
    answered (after a redirect), the connection already back in the pool."""
    from berth.registry import transport

    server.handler = lambda request: (Reply(307, headers={"Location": "/v2/there"}) if request.path == "/v2/"
                                      else Reply(200, b"ok", headers={"X-Kind": "a"}, multi_headers=[("X-Kind", "b")]))
    reply = make_transport(server, []).request("GET", f"{server.url}/v2/", accept=(200,), what="p")
    assert isinstance(reply, transport.Reply)
    assert (reply.status, reply.data, reply.final_url) == (200, b"ok", f"{server.url}/v2/there")
    assert reply.headers.getlist("X-Kind") == ["a", "b"]



@pytest.mark.parametrize("proxy", ["http://[::1:3128", "http://proxy.example:99999", "http://proxy.example:abc",
                                   "http://user:s3cret@proxy.example:99999", "http://proxy.example:0"])
def test_a_proxy_setting_berth_cannot_use_is_named_not_a_traceback(proxy):
    """An ``http_proxy`` with an IPv6 host without its ']' raised ValueError (a traceback), and
    one with a port past 65535 read as "cannot reach registry ...: is the registry running?",
    which blames the registry: the setting is named, and who fixes it."""
    from berth.errors import ConfigError

    transport = Transport("r.example", insecure=True, proxies={"http": proxy}, retry=RetryPolicy(attempts=1))
    with pytest.raises(ConfigError) as caught:
        transport.request("GET", "http://r.example/v2/", accept=(200,), what="the API root")
    assert "the proxy setting http_proxy is not a usable URL" in caught.value.message
    # A proxy URL may carry a password: the value is never shown.
    assert proxy not in caught.value.message and "s3cret" not in caught.value.message + caught.value.hint
    assert "fix http_proxy (or HTTP_PROXY)" in caught.value.hint
