"""RegistryClient on a scripted server: manifests, blobs with Range, auth flows, push."""

from __future__ import annotations

import base64
import io
import json

import pytest

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
from berth.oci.digest import Digest
from berth.registry.auth import Credentials, Entry
from berth.registry.client import RegistryClient
from berth.registry.transport import RetryPolicy
from tests.unit.registry_fake import FakeServer, Reply

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
                       "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": "sha256:" + "a" * 64, "size": 2},
                       "layers": []}).encode()
MANIFEST_DIGEST = Digest.of(MANIFEST)
BLOB = bytes(range(256)) * 64  # 16 KiB
BLOB_DIGEST = Digest.of(BLOB)


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.stop()


def client_for(server, credentials=None, retries=2) -> RegistryClient:
    return RegistryClient(server.host, insecure=True, credentials=credentials, timeout_s=5,
                          retry=RetryPolicy.with_retries(retries, sleep=lambda s: None))


def creds(host, user="alice", password="pw", source="/home/alice/.docker/config.json") -> Credentials:
    return Credentials({host: Entry(user, password, source)}, (source,))


def manifest_reply(data=MANIFEST, content_type=mediatypes.OCI_MANIFEST, digest_header=None) -> Reply:
    headers = {"Content-Type": content_type}
    if digest_header:
        headers["Docker-Content-Digest"] = digest_header
    return Reply(200, data, headers)


# -- manifests -------------------------------------------------------------------------------

def test_manifest_by_tag_sends_all_four_types_and_hashes_the_bytes(server):
    server.handler = lambda request: manifest_reply(digest_header=str(MANIFEST_DIGEST))
    manifest = client_for(server).get_manifest("team/app", "v1")
    [request] = server.requests
    assert request.path == "/v2/team/app/manifests/v1"
    accepted = {part.strip() for part in request.header("Accept").split(",")}
    assert accepted == {mediatypes.OCI_MANIFEST, mediatypes.OCI_INDEX,
                        mediatypes.DOCKER_MANIFEST, mediatypes.DOCKER_MANIFEST_LIST}
    assert manifest.data == MANIFEST
    assert manifest.digest == MANIFEST_DIGEST
    assert manifest.media_type == mediatypes.OCI_MANIFEST
    assert manifest.json()["schemaVersion"] == 2


def test_manifest_by_digest_is_verified(server):
    server.handler = lambda request: manifest_reply()
    manifest = client_for(server).get_manifest("team/app", str(MANIFEST_DIGEST))
    assert manifest.digest == MANIFEST_DIGEST
    assert server.requests[0].path == f"/v2/team/app/manifests/{MANIFEST_DIGEST}"

    other = Digest.of(b"something else")
    with pytest.raises(DigestMismatch) as caught:
        client_for(server).get_manifest("team/app", str(other))
    assert str(MANIFEST_DIGEST) in caught.value.message
    assert f"team/app@{other}" in caught.value.message


def test_docker_content_digest_header_is_only_a_cross_check(server):
    lying = str(Digest.of(b"lie"))
    server.handler = lambda request: manifest_reply(digest_header=lying)
    with pytest.raises(DigestMismatch) as caught:
        client_for(server).get_manifest("team/app", "v1")
    assert lying in caught.value.message and str(MANIFEST_DIGEST) in caught.value.message


def test_media_type_from_the_document_when_content_type_is_generic(server):
    index = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.DOCKER_MANIFEST_LIST, "manifests": []}).encode()
    server.handler = lambda request: manifest_reply(index, "application/json; charset=utf-8")
    manifest = client_for(server).get_manifest("a", "latest")
    assert manifest.media_type == mediatypes.DOCKER_MANIFEST_LIST
    assert manifest.is_index


def test_content_type_parameters_are_ignored(server):
    server.handler = lambda request: manifest_reply(content_type=mediatypes.DOCKER_MANIFEST + "; charset=utf-8")
    assert client_for(server).get_manifest("a", "latest").media_type == mediatypes.DOCKER_MANIFEST


def test_schema1_manifest_is_refused_clearly(server):
    schema1 = json.dumps({"schemaVersion": 1, "name": "a", "fsLayers": []}).encode()
    server.handler = lambda request: manifest_reply(schema1, "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with pytest.raises(RegistryError, match="Docker schema 1 manifest"):
        client_for(server).get_manifest("a", "old")


def test_oversized_manifest_is_refused(server):
    server.handler = lambda request: manifest_reply(b"{" + b" " * (5 << 20) + b"}")
    with pytest.raises(RegistryError, match="more than the 4194304 bytes"):
        client_for(server).get_manifest("a", "big")


def test_unknown_manifest(server):
    server.handler = lambda request: Reply(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
    with pytest.raises(ManifestUnknown) as caught:
        client_for(server).get_manifest("team/app", "nope")
    assert caught.value.message == (f"manifest unknown: {server.host}/team/app:nope does not exist "
                                    "(MANIFEST_UNKNOWN: manifest unknown)")
    assert len(server.requests) == 1


@pytest.mark.parametrize("repository", ["../etc", "Team/app", "a//b", "/a", "a/", "a?x=1", ""])
def test_bad_repository_names_never_reach_the_wire(server, repository):
    with pytest.raises(ReferenceError_):
        client_for(server).get_manifest(repository, "latest")
    assert server.requests == []


@pytest.mark.parametrize("version", ["../x", "sha256:abc", "-tag", "a" * 129])
def test_bad_versions_never_reach_the_wire(server, version):
    with pytest.raises(ReferenceError_):
        client_for(server).get_manifest("a", version)
    assert server.requests == []


# -- blobs -----------------------------------------------------------------------------------

def blob_handler(honor_range=True):
    def handler(request):
        wanted = request.header("Range")
        if wanted and honor_range:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            if start >= len(BLOB):
                return Reply(416)
            return Reply(206, BLOB[start:], {"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"})
        return Reply(200, BLOB)
    return handler


def test_blob_streams_in_bounded_chunks(server):
    server.handler = blob_handler()
    with client_for(server).open_blob("a", BLOB_DIGEST) as blob:
        chunks = list(blob.read_chunks(1000))
        assert blob.offset == 0
        assert blob.size_bytes == len(BLOB)
    assert b"".join(chunks) == BLOB
    assert max(len(c) for c in chunks) <= 1000
    assert server.requests[0].header("Range") is None


def test_blob_range_honored(server):
    server.handler = blob_handler()
    with client_for(server).open_blob("a", BLOB_DIGEST, offset=5000) as blob:
        assert blob.offset == 5000
        assert blob.size_bytes == len(BLOB)
        assert b"".join(blob.read_chunks()) == BLOB[5000:]
    assert server.requests[0].header("Range") == "bytes=5000-"


def test_blob_range_ignored_reports_offset_zero(server):
    server.handler = blob_handler(honor_range=False)
    with client_for(server).open_blob("a", BLOB_DIGEST, offset=5000) as blob:
        assert blob.offset == 0
        assert b"".join(blob.read_chunks()) == BLOB


def test_blob_range_past_the_end_starts_over(server):
    server.handler = blob_handler()
    with client_for(server).open_blob("a", BLOB_DIGEST, offset=len(BLOB)) as blob:
        assert blob.offset == 0
        assert b"".join(blob.read_chunks()) == BLOB
    assert [r.header("Range") for r in server.requests] == [f"bytes={len(BLOB)}-", None]


def test_blob_connection_lost_mid_stream(server):
    server.handler = lambda request: Reply(200, BLOB, drop_after=3000)
    with client_for(server).open_blob("a", BLOB_DIGEST) as blob:
        received = bytearray()
        with pytest.raises(RegistryUnreachable) as caught:
            for chunk in blob.read_chunks(1000):
                received += chunk
    assert bytes(received) == BLOB[: len(received)] and len(received) <= 3000
    assert f"lost while downloading blob {BLOB_DIGEST} of a" in caught.value.message


def test_missing_blob(server):
    server.handler = lambda request: Reply(404)
    with pytest.raises(NotFound) as caught:
        client_for(server).open_blob("a", BLOB_DIGEST)
    assert caught.value.message == f"blob {BLOB_DIGEST} not found in {server.host}/a"


def test_blob_redirect_to_storage_without_registry_credentials(server):
    storage = FakeServer(lambda request: Reply(200, BLOB))
    try:
        server.handler = lambda request: (
            Reply(307, headers={"Location": f"{storage.url}/bucket/{BLOB_DIGEST.hex}?X-Signature=abc"})
            if request.header("Authorization") else
            Reply(401, multi_headers=[("WWW-Authenticate", 'Basic realm="r"')]))
        client = client_for(server, creds(server.host))
        with client.open_blob("a", BLOB_DIGEST) as blob:
            assert b"".join(blob.read_chunks()) == BLOB
        assert storage.requests[0].header("Authorization") is None
        assert server.requests[-1].header("Authorization") == "Basic " + base64.b64encode(b"alice:pw").decode()
    finally:
        storage.stop()


def test_a_challenge_from_the_redirect_target_gets_no_registry_credentials(server):
    """Storage that a blob GET is redirected to answers 401 with its own Bearer realm: berth
    must not fetch a token there with the registry's password (nor send it anywhere else)."""
    storage_requests = []

    def storage_handler(request):
        storage_requests.append(request)
        return Reply(401, multi_headers=[("WWW-Authenticate", f'Bearer realm="{storage.url}/token",service="s"')])

    storage = FakeServer(storage_handler)
    try:
        server.handler = lambda request: (
            Reply(401, multi_headers=[("WWW-Authenticate", 'Basic realm="r"')])
            if not request.header("Authorization") else Reply(200) if request.path == "/v2/" else
            Reply(307, headers={"Location": f"{storage.url}/bucket/{BLOB_DIGEST.hex}"}))
        client = client_for(server, creds(server.host))
        client.ping()  # the registry is known to want Basic: the blob GET carries it at once
        with pytest.raises(AuthenticationError, match=f"redirected blob {BLOB_DIGEST} of a to {storage.host}"):
            client.open_blob("a", BLOB_DIGEST)
        assert [r.path for r in storage_requests if r.path.startswith("/token")] == []
        assert all(r.header("Authorization") is None for r in storage_requests)
    finally:
        storage.stop()


def test_a_token_that_cannot_be_a_header_is_a_registry_error_that_does_not_show_it(server):
    """A token with a line break made http.client raise ValueError (a traceback that printed
    the token); it is refused as the token server's fault, without its value."""
    def handle(request):
        if request.path.startswith("/token"):
            return Reply(200, json.dumps({"token": "secret-token\r\nX-Injected: 1"}).encode())
        return Reply(401, multi_headers=[("WWW-Authenticate", f'Bearer realm="{server.url}/token",service="s"')])

    server.handler = handle
    with pytest.raises(RegistryError) as caught:
        client_for(server).get_manifest("team/app", "v1")
    assert "secret-token" not in caught.value.message + (caught.value.hint or "")
    assert f"the token server {server.host} of registry {server.host} answered with a token" in caught.value.message
    assert all(request.path.startswith("/token") or request.header("Authorization") is None
               for request in server.requests)


@pytest.mark.parametrize("reply", [
    Reply(200, b'{"token": "t", "pad": "' + b"x" * (3 << 20) + b'"}'),
    Reply(200, b'{"token": "t"}', headers={"Content-Length": str(10 << 30)}, drop_after=14),
], ids=["3MiB-body", "10GiB-announced"])
def test_a_token_response_is_read_with_a_bound(server, reply):
    """The token response was read whole into memory before its size was checked: a token
    server could answer gigabytes. It is refused as soon as it passes 1 MiB (or says it will)."""
    server.handler = lambda request: reply if request.path.startswith("/token") else Reply(
        401, multi_headers=[("WWW-Authenticate", f'Bearer realm="{server.url}/token",service="s"')])
    with pytest.raises(RegistryError) as caught:
        client_for(server, retries=0).get_manifest("team/app", "v1")
    assert f"the token response of {server.host} is " in caught.value.message
    assert "more than the 1048576 bytes berth accepts" in caught.value.message


# -- authentication --------------------------------------------------------------------------

class TokenRegistry:
    """A scripted registry with a token server on the same fake (realm /token)."""

    def __init__(self, server, username="alice", password="pw"):
        self.server = server
        self.good_basic = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.token_requests: list[str] = []
        server.handler = self.handle

    def handle(self, request):
        if request.path.startswith("/token"):
            self.token_requests.append(request.path)
            if request.header("Authorization") not in (None, self.good_basic):
                return Reply(401, b'{"details":"bad credentials"}')
            scope = request.path.partition("scope=")[2]
            return Reply(200, json.dumps({"token": f"T:{scope}", "expires_in": 300}).encode())
        if request.path.startswith("/v2/"):
            wanted = "repository:a:pull,push" if request.method in ("POST", "PUT") else "repository:a:pull"
            auth = request.header("Authorization") or ""
            granted = auth.removeprefix("Bearer T:").replace("%3A", ":").replace("%2C", ",").split("&scope=")
            if not any(wanted == g or (wanted.endswith(":pull") and g == wanted + ",push") for g in granted):
                challenge = (f'Bearer realm="{self.server.url}/token",service="fake",scope="{wanted}"')
                return Reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                             multi_headers=[("WWW-Authenticate", challenge)])
            if request.method == "HEAD":
                return Reply(404)
            if request.method == "POST":
                return Reply(202, headers={"Location": "/v2/a/blobs/uploads/u1?state=x"})
            if request.method == "PUT" and "/blobs/uploads/" in request.path:
                return Reply(201, headers={"Docker-Content-Digest": str(BLOB_DIGEST)})
            return manifest_reply()
        return Reply(404)


def test_bearer_flow_fetches_token_with_basic_credentials_and_caches_it(server):
    registry = TokenRegistry(server)
    client = client_for(server, creds(server.host))
    client.get_manifest("a", "v1")
    client.get_manifest("a", "v2")
    # One challenge, one token request (carrying our basic credentials), then cached.
    assert len(registry.token_requests) == 1
    token_request = [r for r in server.requests if r.path.startswith("/token")][0]
    assert token_request.path == "/token?service=fake&scope=repository%3Aa%3Apull"
    assert token_request.header("Authorization") == registry.good_basic
    manifest_requests = [r for r in server.requests if r.path.startswith("/v2/")]
    assert [r.header("Authorization") for r in manifest_requests] == [
        None, "Bearer T:repository%3Aa%3Apull", "Bearer T:repository%3Aa%3Apull"]


def test_bearer_anonymous_token_without_credentials(server):
    registry = TokenRegistry(server)
    client_for(server).get_manifest("a", "v1")
    token_request = [r for r in server.requests if r.path.startswith("/token")][0]
    assert token_request.header("Authorization") is None
    assert len(registry.token_requests) == 1


def test_push_requests_a_push_scope(server):
    registry = TokenRegistry(server)
    client = client_for(server, creds(server.host))
    client.get_manifest("a", "v1")
    assert client.upload_blob("a", BLOB_DIGEST, len(BLOB), io.BytesIO(BLOB)) is True
    assert registry.token_requests == ["/token?service=fake&scope=repository%3Aa%3Apull",
                                       "/token?service=fake&scope=repository%3Aa%3Apull%2Cpush"]
    put = [r for r in server.requests if r.method == "PUT"][0]
    assert put.path == f"/v2/a/blobs/uploads/u1?state=x&digest={str(BLOB_DIGEST).replace(':', '%3A')}"
    assert put.body == BLOB
    assert put.header("Content-Type") == "application/octet-stream"


def test_token_server_refusal_names_the_credentials_file(server):
    TokenRegistry(server, password="right")
    client = client_for(server, creds(server.host, password="wrong", source="/tmp/x/auth.json"))
    with pytest.raises(AuthenticationError) as caught:
        client.get_manifest("a", "v1")
    message = caught.value.message
    assert f"token server {server.host} of registry {server.host} refused" in message
    assert "user 'alice' from /tmp/x/auth.json were sent" in message
    assert caught.value.hint.startswith("check the user name and password")


def test_basic_challenge_without_credentials_says_where_berth_looked(server):
    server.handler = lambda request: Reply(401, multi_headers=[("WWW-Authenticate", 'Basic realm="r"')])
    empty = Credentials({}, ("/e/REGISTRY_AUTH_FILE.json", "/h/.config/berth/auth.json", "/h/.docker/config.json"))
    with pytest.raises(AuthenticationError) as caught:
        client_for(server, empty).get_manifest("a", "v1")
    assert caught.value.message == (
        f"registry {server.host} requires a user name and password; no credentials were sent "
        f"(none for {server.host} in /e/REGISTRY_AUTH_FILE.json, /h/.config/berth/auth.json, "
        "/h/.docker/config.json)")
    assert caught.value.hint == f"log in first: berth login {server.host}"
    assert len(server.requests) == 1


def test_basic_wrong_password_is_refused_once_not_looped(server):
    server.handler = lambda request: Reply(401, multi_headers=[("WWW-Authenticate", 'Basic realm="r"')])
    with pytest.raises(AuthenticationError) as caught:
        client_for(server, creds(server.host)).get_manifest("a", "v1")
    assert "refused authentication for manifest a:v1 (HTTP 401)" in caught.value.message
    assert "the credentials of user 'alice' from /home/alice/.docker/config.json were sent" in caught.value.message
    assert len(server.requests) == 2


def test_forbidden_is_an_authentication_error_without_retry(server):
    server.handler = lambda request: Reply(403, b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}')
    with pytest.raises(AuthenticationError) as caught:
        client_for(server).get_manifest("a", "v1")
    assert "denied access to manifest a:v1 (HTTP 403)" in caught.value.message
    assert "DENIED" in caught.value.message
    assert len(server.requests) == 1


def test_expired_token_is_renewed(server):
    registry = TokenRegistry(server)
    client = client_for(server, creds(server.host))
    now = [1000.0]
    client.authorizer.clock = lambda: now[0]
    client.get_manifest("a", "v1")
    now[0] += 1000  # past expires_in=300
    client.get_manifest("a", "v1")
    assert len(registry.token_requests) == 2
    # The second token is fetched directly: the registry is known to use Bearer.
    assert [r.header("Authorization") is None for r in server.requests if r.path.startswith("/v2/")] == [
        True, False, False]


# -- push ------------------------------------------------------------------------------------

def test_upload_skips_existing_blob(server):
    server.handler = lambda request: Reply(200) if request.method == "HEAD" else Reply(500)
    assert client_for(server).upload_blob("a", BLOB_DIGEST, len(BLOB), io.BytesIO(BLOB)) is False
    assert [r.method for r in server.requests] == ["HEAD"]


def test_cross_repository_mount(server):
    def handler(request):
        if request.method == "HEAD":
            return Reply(404)
        if request.method == "POST" and "mount=" in request.path:
            return Reply(201, headers={"Location": f"/v2/a/blobs/{BLOB_DIGEST}"})
        return Reply(500)
    server.handler = handler
    assert client_for(server).upload_blob("a", BLOB_DIGEST, len(BLOB), io.BytesIO(BLOB), mount_from="b/c") is True
    post = [r for r in server.requests if r.method == "POST"][0]
    assert post.path == f"/v2/a/blobs/uploads/?mount={str(BLOB_DIGEST).replace(':', '%3A')}&from=b%2Fc"


def test_put_manifest_returns_digest_and_checks_reference(server):
    server.handler = lambda request: Reply(201, headers={"Docker-Content-Digest": str(MANIFEST_DIGEST)})
    client = client_for(server)
    assert client.put_manifest("a", "v1", MANIFEST, mediatypes.OCI_MANIFEST) == MANIFEST_DIGEST
    put = server.requests[0]
    assert (put.method, put.path, put.body) == ("PUT", "/v2/a/manifests/v1", MANIFEST)
    assert put.header("Content-Type") == mediatypes.OCI_MANIFEST
    with pytest.raises(DigestMismatch):
        client.put_manifest("a", str(Digest.of(b"x")), MANIFEST, mediatypes.OCI_MANIFEST)
    with pytest.raises(RegistryError, match="media type"):
        client.put_manifest("a", "v1", MANIFEST, "application/json")
    assert len(server.requests) == 1


def test_put_manifest_detects_a_registry_that_stored_other_bytes(server):
    server.handler = lambda request: Reply(201, headers={"Docker-Content-Digest": str(Digest.of(b"other"))})
    with pytest.raises(DigestMismatch):
        client_for(server).put_manifest("a", "v1", MANIFEST, mediatypes.OCI_MANIFEST)


@pytest.mark.parametrize("host", ["", "a/b", "a b", "http://x", "x:port"])
def test_bad_host_is_refused(host):
    with pytest.raises(ReferenceError_, match="invalid registry host"):
        RegistryClient(host)


def upload_server(put_replies):
    """Handler: blob absent, each POST opens session sN, PUTs answer from ``put_replies`` in turn."""
    sessions = []
    queue = list(put_replies)

    def handler(request):
        if request.method == "HEAD":
            return Reply(404)
        if request.method == "POST":
            sessions.append(f"s{len(sessions) + 1}")
            return Reply(202, headers={"Location": f"/v2/a/blobs/uploads/{sessions[-1]}"})
        return queue.pop(0) if len(queue) > 1 else queue[0]
    return handler


def test_failed_upload_put_restarts_the_session(server):
    server.handler = upload_server([Reply(503), Reply(201, headers={"Docker-Content-Digest": str(BLOB_DIGEST)})])
    body = io.BytesIO(b"prefix" + BLOB)
    body.seek(6)
    assert client_for(server).upload_blob("a", BLOB_DIGEST, len(BLOB), body) is True
    puts = [r for r in server.requests if r.method == "PUT"]
    # Each PUT went to a fresh session with the whole blob, never twice to the same one.
    assert [p.path.split("?")[0] for p in puts] == ["/v2/a/blobs/uploads/s1", "/v2/a/blobs/uploads/s2"]
    assert [p.body for p in puts] == [BLOB, BLOB]


def test_upload_put_failing_every_time_ends_in_an_error(server):
    server.handler = upload_server([Reply(500, b'{"errors":[{"code":"UNKNOWN","message":"disk full"}]}')])
    with pytest.raises(RegistryError) as caught:
        client_for(server, retries=2).upload_blob("a", BLOB_DIGEST, len(BLOB), io.BytesIO(BLOB))
    assert "HTTP 500" in caught.value.message and "disk full" in caught.value.message
    assert len([r for r in server.requests if r.method == "PUT"]) == 3


def test_upload_put_rejected_digest_is_not_retried(server):
    server.handler = upload_server([Reply(400, b'{"errors":[{"code":"DIGEST_INVALID","message":"digest did not match"}]}')])
    with pytest.raises(RegistryError, match="DIGEST_INVALID"):
        client_for(server).upload_blob("a", BLOB_DIGEST, len(BLOB), io.BytesIO(BLOB))
    assert len([r for r in server.requests if r.method == "PUT"]) == 1


def test_credentials_never_go_to_a_plain_http_token_server_of_an_https_registry(server):
    from berth.registry.authorizer import Authorizer
    from berth.registry.challenge import Challenge

    https_client = RegistryClient(server.host, credentials=creds(server.host), retry=RetryPolicy(attempts=1))
    authorizer: Authorizer = https_client.authorizer
    challenge = Challenge("bearer", {"realm": f"{server.url}/token", "service": "s"})
    with pytest.raises(AuthenticationError, match="does not send credentials over plain HTTP"):
        authorizer._fetch_token(challenge, "repository:a:pull")
    assert server.requests == []


def test_token_response_without_token_or_with_odd_lifetime(server):
    answers = {"/token": Reply(200, b'{"expires_in": "soon"}')}

    def handler(request):
        if request.path.startswith("/token"):
            return answers["/token"]
        return Reply(401, multi_headers=[("WWW-Authenticate", f'Bearer realm="{server.url}/token"')])
    server.handler = handler
    with pytest.raises(RegistryError, match="answered without a token"):
        client_for(server).get_manifest("a", "v1")
    answers["/token"] = Reply(200, b'{"token": "T", "expires_in": "soon"}')
    with pytest.raises(AuthenticationError):  # the fake keeps refusing; the token was used
        client_for(server).get_manifest("a", "v1")
    assert server.requests[-1].header("Authorization") == "Bearer T"


@pytest.mark.parametrize("lifetime", [b"1" + b"0" * 400, b"1e999", b"-5", b"true", b"[]"])
def test_a_token_lifetime_no_float_can_hold_is_a_default_not_a_traceback(server, lifetime):
    """A hostile token server's ``expires_in`` of 400 digits made float() raise OverflowError,
    which no caller maps: a traceback instead of a pull. Any lifetime is only a hint."""
    def handler(request):
        if request.path.startswith("/token"):
            return Reply(200, b'{"token": "T", "expires_in": ' + lifetime + b"}")
        if request.header("Authorization") == "Bearer T":
            return manifest_reply()
        return Reply(401, multi_headers=[("WWW-Authenticate", f'Bearer realm="{server.url}/token"')])
    server.handler = handler
    assert client_for(server).get_manifest("a", "v1").digest == MANIFEST_DIGEST


@pytest.mark.parametrize("realm", ["http://[::1", "http://127.0.0.1:99999/token", "http://exa mple/token",
                                   "http://%zz/token", "ftp://127.0.0.1/token", "http:///token"])
def test_a_realm_that_is_no_usable_url_is_refused_once_without_a_traceback(server, realm):
    """The realm is the registry's text: an unclosed IPv6 bracket raised ValueError out of
    urlsplit (a traceback), and a realm urllib3 cannot parse was taken for an unreachable host
    and asked again with backoff. It is judged with the parser that would connect to it."""
    server.handler = lambda request: Reply(401, multi_headers=[("WWW-Authenticate", f'Bearer realm="{realm}"')])
    with pytest.raises(AuthenticationError, match="named an unusable token server realm"):
        client_for(server, retries=3).get_manifest("a", "v1")
    assert len(server.requests) == 1


def test_manifest_body_cut_short_is_fetched_again(server):
    replies = [Reply(200, MANIFEST, {"Content-Type": mediatypes.OCI_MANIFEST}, drop_after=10), manifest_reply()]
    server.handler = lambda request: replies.pop(0) if len(replies) > 1 else replies[0]
    manifest = client_for(server).get_manifest("a", str(MANIFEST_DIGEST))
    assert manifest.data == MANIFEST
    assert len(server.requests) == 2


def test_a_token_response_cut_short_is_fetched_again_as_a_manifest_is(server):
    """The token and the manifest are read by one loop (Transport.get_document): a body cut
    short is asked for again, from the same budget, and a token server's refusal names it."""
    tokens = [Reply(200, b'{"token": "T"}', drop_after=5), Reply(200, b'{"token": "T"}')]

    def handle(request):
        if request.path.startswith("/token"):
            return tokens.pop(0) if len(tokens) > 1 else tokens[0]
        if request.header("Authorization") != "Bearer T":
            return Reply(401, multi_headers=[("WWW-Authenticate", f'Bearer realm="{server.url}/token",service="s"')])
        return manifest_reply()

    server.handler = handle
    assert client_for(server).get_manifest("a", str(MANIFEST_DIGEST)).data == MANIFEST
    assert [r.path.startswith("/token") for r in server.requests] == [False, True, True, False]
    tokens[:] = [Reply(403, b'{"errors": [{"code": "DENIED", "message": "no"}]}')]
    with pytest.raises(AuthenticationError, match=r"refused a token for repository:b:pull \(HTTP 403: DENIED: no\)"):
        client_for(server).get_manifest("b", "v1")


def test_manifest_body_always_cut_short_is_unreachable(server):
    server.handler = lambda request: Reply(200, MANIFEST, {"Content-Type": mediatypes.OCI_MANIFEST}, drop_after=10)
    with pytest.raises(RegistryUnreachable, match="lost while reading manifest a:v1"):
        client_for(server, retries=2).get_manifest("a", "v1")
    assert len(server.requests) == 3


# -- the stall rule and sizes (red team, December) ----------------------------------------------

def test_a_blob_that_trickles_is_cut_by_the_stall_rule(server):
    """One byte every 50 ms is never silent for the read timeout, and the read of a 1 MiB chunk
    waited until the whole chunk was in: for good, for a hostile registry. Fewer than 64 KiB in
    one ``timeout_s`` window (berth.retry.StallWatch) is a stall, raised as the resumable
    RegistryUnreachable."""
    import time

    server.handler = lambda request: Reply(200, BLOB, trickle_after=1000)
    client = RegistryClient(server.host, insecure=True, timeout_s=1,
                            retry=RetryPolicy.with_retries(0, sleep=lambda s: None))
    started = time.monotonic()
    with client.open_blob("a", BLOB_DIGEST) as blob:
        received = bytearray()
        with pytest.raises(RegistryUnreachable) as caught:
            for chunk in blob.read_chunks(1 << 20, limit=len(BLOB)):
                received += chunk
    assert time.monotonic() - started < 4
    assert bytes(received) == BLOB[:len(received)] and 1000 <= len(received) < len(BLOB)
    assert f"of blob {BLOB_DIGEST} of a in 1 s: the download is stalled" in caught.value.message
    assert "registry_timeout_s" in caught.value.hint


def test_a_manifest_that_trickles_is_cut_by_the_stall_rule(server):
    import time

    server.handler = lambda request: Reply(200, MANIFEST, {"Content-Type": mediatypes.OCI_MANIFEST},
                                           trickle_after=10)
    client = RegistryClient(server.host, insecure=True, timeout_s=1,
                            retry=RetryPolicy.with_retries(1, sleep=lambda s: None))
    started = time.monotonic()
    with pytest.raises(RegistryUnreachable) as caught:
        client.get_manifest("a", "latest")
    assert time.monotonic() - started < 6
    assert "stalled" in caught.value.message
    assert len(server.paths("GET")) == 2  # retried once, by the one retry rule


class _FastBody:
    """A blob body that always has 16 KiB ready (one TLS record per read1)."""

    def __init__(self, total: int) -> None:
        self.left = total

    def read1(self, n, decode_content=False):
        take = min(n, 16 * 1024, self.left)
        self.left -= take
        return b"x" * take

    def release_conn(self):
        pass

    def close(self):
        pass


def test_a_slow_consumer_is_not_a_stalled_registry():
    """The time the caller spends with a chunk (the store's write, a busy converter) is not the
    registry's: before, read_chunks (a generator) counted it in the stall window, and one pause
    longer than registry_timeout_s over a fast body was a false stall that used a retry and
    blamed the registry (review10)."""
    import time

    from berth.registry.client import BlobResponse

    response = BlobResponse(_FastBody(1 << 20), offset=0, size_bytes=1 << 20, what="blob", registry="r",
                            stall_s=0.2)
    got = 0
    for chunk in response.read_chunks(1 << 20, limit=1 << 20):
        got += len(chunk)
        time.sleep(0.25)
    assert got == 1 << 20


def test_a_blob_longer_than_its_descriptor_is_read_one_byte_past_it_at_most(server):
    """A registry sending more than the descriptor's size: the reader reads at most one byte
    past ``limit`` (the caller, BlobWriter, refuses that byte), not chunks of a MiB."""
    server.handler = lambda request: Reply(200, BLOB + bytes(4 << 20))
    with client_for(server).open_blob("a", BLOB_DIGEST) as blob:
        received = b"".join(chunk for chunk in blob.read_chunks(1 << 20, limit=len(BLOB)) if chunk)
    assert received == BLOB + b"\0"
