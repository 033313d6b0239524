"""RegistryClient against the real registry (Debian docker-registry 2.8, harness fixtures).

Pushes small images with berth's own client in every manifest format and reads them back by tag
and by digest; checks Range downloads, mounts, errors, basic auth and the bearer-token flow, and
credentials taken from each of the three auth files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import threading

import pytest

from berth.errors import AuthenticationError, ManifestUnknown, NotFound, RegistryError, RegistryUnreachable
from berth.oci import mediatypes
from berth.oci.digest import Digest
from berth.registry.auth import load_credentials
from berth.registry.client import RegistryClient
from berth.registry.transport import RetryPolicy

pytestmark = pytest.mark.integration


def no_wait(retries: int) -> RetryPolicy:
    return RetryPolicy.with_retries(retries, sleep=lambda s: None)


def client(registry, credentials=None, **kwargs) -> RegistryClient:
    return RegistryClient(registry.host, insecure=True, credentials=credentials, timeout_s=20,
                          retry=no_wait(1), **kwargs)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def credentials_from(tmp_path, registry, where: str, password: str | None = None):
    """Credentials for ``registry`` written to one of the three files, loaded as berth does."""
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    path = {"REGISTRY_AUTH_FILE": tmp_path / "containers-auth.json",
            "berth": tmp_path / "xdg/berth/auth.json",
            "docker": home / ".docker/config.json"}[where]
    if where == "REGISTRY_AUTH_FILE":
        env["REGISTRY_AUTH_FILE"] = str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    auth = b64(f"{registry.username}:{password or registry.password}")
    key = registry.host if where != "docker" else f"http://{registry.host}/v2/"
    path.write_text(json.dumps({"auths": {key: {"auth": auth}}}))
    return load_credentials(env), path


class SmallImage:
    """A one-layer image made of bytes in memory, in OCI or Docker schema 2 form."""

    def __init__(self, fmt: str, marker: str):
        self.fmt = fmt
        self.layer = (f"layer content {marker}\n" * 500).encode()
        self.config = json.dumps({"architecture": "amd64", "os": "linux",
                                  "config": {"Env": [f"MARKER={marker}"]},
                                  "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(self.layer))]}},
                                 sort_keys=True).encode()
        oci = fmt == "oci"
        self.media_type = mediatypes.OCI_MANIFEST if oci else mediatypes.DOCKER_MANIFEST
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": self.media_type,
            "config": {"mediaType": mediatypes.OCI_CONFIG if oci else mediatypes.DOCKER_CONFIG,
                       "digest": str(Digest.of(self.config)), "size": len(self.config)},
            "layers": [{"mediaType": mediatypes.OCI_LAYER if oci else "application/vnd.docker.image.rootfs.diff.tar",
                        "digest": str(Digest.of(self.layer)), "size": len(self.layer)}],
        }, sort_keys=True).encode()

    def push(self, registry_client: RegistryClient, repository: str, tag: str) -> Digest:
        for blob in (self.layer, self.config):
            registry_client.upload_blob(repository, Digest.of(blob), len(blob), io.BytesIO(blob))
        return registry_client.put_manifest(repository, tag, self.manifest, self.media_type)


def index_of(images: list[tuple[SmallImage, Digest]], fmt: str) -> tuple[bytes, str]:
    media_type = mediatypes.OCI_INDEX if fmt == "oci" else mediatypes.DOCKER_MANIFEST_LIST
    manifests = [{"mediaType": image.media_type, "digest": str(digest), "size": len(image.manifest),
                  "platform": {"architecture": arch, "os": "linux"}}
                 for (image, digest), arch in zip(images, ("amd64", "arm64"))]
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}).encode(), media_type


@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_push_and_pull_back_by_tag_and_digest(registry, fmt):
    image = SmallImage(fmt, marker=fmt)
    with client(registry) as registry_client:
        digest = image.push(registry_client, f"berth-client/{fmt}", "v1")
        assert digest == Digest.of(image.manifest)
        by_tag = registry_client.get_manifest(f"berth-client/{fmt}", "v1")
        by_digest = registry_client.get_manifest(f"berth-client/{fmt}", str(digest))
        for manifest in (by_tag, by_digest):
            assert manifest.data == image.manifest
            assert manifest.digest == digest
            assert manifest.media_type == image.media_type
        with registry_client.open_blob(f"berth-client/{fmt}", Digest.of(image.config)) as blob:
            assert blob.offset == 0
            assert blob.size_bytes == len(image.config)
            assert b"".join(blob.read_chunks()) == image.config


@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_index_push_and_pull(registry, fmt):
    repository = f"berth-client/index-{fmt}"
    with client(registry) as registry_client:
        pushed = []
        for arch in ("amd64", "arm64"):
            image = SmallImage(fmt, marker=f"{fmt}-{arch}")
            pushed.append((image, image.push(registry_client, repository, f"only-{arch}")))
        data, media_type = index_of(pushed, fmt)
        digest = registry_client.put_manifest(repository, "multi", data, media_type)
        for version in ("multi", str(digest)):
            manifest = registry_client.get_manifest(repository, version)
            assert (manifest.data, manifest.media_type, manifest.digest) == (data, media_type, digest)
            assert manifest.is_index
        child = registry_client.get_manifest(repository, str(pushed[1][1]))
        assert child.data == pushed[1][0].manifest


@pytest.mark.parametrize("fixture", ["busybox_image", "busybox_v2s2_image", "index_image", "docker_index_image"])
def test_reads_images_pushed_by_other_tools(request, registry, fixture):
    """Manifests pushed by the harness (not by berth) read back with the same digest."""
    pushed = request.getfixturevalue(fixture)
    expected_type = {"busybox_image": mediatypes.OCI_MANIFEST, "busybox_v2s2_image": mediatypes.DOCKER_MANIFEST,
                     "index_image": mediatypes.OCI_INDEX, "docker_index_image": mediatypes.DOCKER_MANIFEST_LIST}[fixture]
    repository = pushed.name.split("/", 1)[1] if pushed.name.startswith(registry.host) else pushed.name
    with client(registry) as registry_client:
        by_tag = registry_client.get_manifest(repository, pushed.tag)
        by_digest = registry_client.get_manifest(repository, pushed.digest)
    assert str(by_tag.digest) == pushed.digest
    assert by_digest.data == by_tag.data
    assert by_tag.media_type == expected_type


def test_range_download_resumes_and_streams_large_blob_in_bounded_chunks(registry):
    blob = hashlib.sha256(b"seed").digest() * (3 << 15)  # 3 MiB, not compressible into a pattern
    digest = Digest.of(blob)
    with client(registry) as registry_client:
        assert registry_client.upload_blob("berth-client/range", digest, len(blob), io.BytesIO(blob)) is True
        assert registry_client.upload_blob("berth-client/range", digest, len(blob), io.BytesIO(blob)) is False
        assert registry_client.blob_exists("berth-client/range", digest)
        offset = 1_000_003
        with registry_client.open_blob("berth-client/range", digest, offset=offset) as response:
            assert response.offset == offset  # docker-registry honors Range
            assert response.size_bytes == len(blob)
            chunks = list(response.read_chunks(64 * 1024))
        assert max(len(c) for c in chunks) <= 64 * 1024
        assert b"".join(chunks) == blob[offset:]


def test_cross_repository_mount_on_a_real_registry(registry):
    blob = b"mounted blob " * 100
    digest = Digest.of(blob)
    with client(registry) as registry_client:
        registry_client.upload_blob("berth-client/mount-src", digest, len(blob), io.BytesIO(blob))
        assert not registry_client.blob_exists("berth-client/mount-dst", digest)
        # The file object must not be needed: the registry links the existing blob.
        assert registry_client.upload_blob("berth-client/mount-dst", digest, len(blob), io.BytesIO(b""),
                                           mount_from="berth-client/mount-src") is True
        assert registry_client.blob_exists("berth-client/mount-dst", digest)


def test_not_found_errors(registry):
    with client(registry) as registry_client:
        with pytest.raises(ManifestUnknown) as caught:
            registry_client.get_manifest("berth-client/never-pushed", "v1")
        assert caught.value.message.startswith(f"manifest unknown: {registry.host}/berth-client/never-pushed:v1")
        missing = Digest.of(b"never uploaded")
        with pytest.raises(NotFound) as caught:
            registry_client.open_blob("berth-client/never-pushed", missing)
        assert str(missing) in caught.value.message
        assert registry_client.blob_exists("berth-client/never-pushed", missing) is False


def test_https_to_a_plain_http_registry_suggests_insecure(registry):
    with RegistryClient(registry.host, retry=no_wait(3)) as registry_client:
        with pytest.raises(RegistryUnreachable) as caught:
            registry_client.get_manifest("a", "b")
    assert "plain-HTTP registry set insecure" in caught.value.hint


def test_nothing_listening_is_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{sock.getsockname()[1]}"
    with RegistryClient(host, insecure=True, retry=no_wait(1)) as registry_client:
        with pytest.raises(RegistryUnreachable) as caught:
            registry_client.ping()
    assert caught.value.message.startswith(f"cannot reach registry {host}")
    assert caught.value.hint == f"is the registry running on {host}?"


# -- basic auth ------------------------------------------------------------------------------

def test_basic_auth_without_credentials(auth_registry, tmp_path):
    empty = load_credentials({"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    with client(auth_registry, empty) as registry_client:
        with pytest.raises(AuthenticationError) as caught:
            registry_client.get_manifest("a", "v1")
    assert "requires a user name and password; no credentials were sent" in caught.value.message
    assert str(tmp_path / ".docker/config.json") in caught.value.message


def test_basic_auth_wrong_password(auth_registry, tmp_path):
    credentials, path = credentials_from(tmp_path, auth_registry, "berth", password="wrong-password")
    with client(auth_registry, credentials) as registry_client:
        with pytest.raises(AuthenticationError) as caught:
            registry_client.ping()
    assert (f"the credentials of user '{auth_registry.username}' from {path} were sent"
            in caught.value.message)
    assert "HTTP 401" in caught.value.message


@pytest.mark.parametrize("where", ["REGISTRY_AUTH_FILE", "berth", "docker"])
def test_basic_auth_with_credentials_from_each_file(auth_registry, tmp_path, where):
    credentials, path = credentials_from(tmp_path, auth_registry, where)
    assert credentials.source_for(auth_registry.host) == str(path)
    image = SmallImage("oci", marker=f"basic-{where}")
    with client(auth_registry, credentials) as registry_client:
        digest = image.push(registry_client, "berth-client/basic", where.lower())
        assert registry_client.get_manifest("berth-client/basic", str(digest)).data == image.manifest


# -- bearer tokens ---------------------------------------------------------------------------

def test_token_flow_pull_and_push_scopes(token_registry, tmp_path):
    credentials, _ = credentials_from(tmp_path, token_registry, "berth")
    issued_before = len(token_registry.token_server.issued)
    image = SmallImage("v2s2", marker="token")
    with client(token_registry, credentials) as registry_client:
        digest = image.push(registry_client, "berth-client/token", "v1")
        for _ in range(3):
            assert registry_client.get_manifest("berth-client/token", "v1").digest == digest
        with registry_client.open_blob("berth-client/token", Digest.of(image.layer), offset=10) as blob:
            assert blob.offset == 10
            assert b"".join(blob.read_chunks()) == image.layer[10:]
    issued = token_registry.token_server.issued[issued_before:]
    granted = [tuple((a["name"], tuple(a["actions"])) for a in entry["access"]) for entry in issued]
    # One token for the upload, shared by its HEAD, POST and PUT: the HEAD's challenge names the
    # pull scope, and berth adds the push scope it will need. Then one pull token for the reads,
    # cached across the three manifest GETs and the blob GET.
    assert granted == [(("berth-client/token", ("pull",)), ("berth-client/token", ("pull", "push"))),
                       (("berth-client/token", ("pull",)),)]
    assert {entry["service"] for entry in issued} == {"berth-test-registry"}


def test_token_flow_wrong_password(token_registry, tmp_path):
    credentials, path = credentials_from(tmp_path, token_registry, "docker", password="nope")
    with client(token_registry, credentials) as registry_client:
        with pytest.raises(AuthenticationError) as caught:
            registry_client.get_manifest("berth-client/token", "v1")
    assert f"token server 127.0.0.1:{token_registry.token_server.port} of registry {token_registry.host} refused" \
        in caught.value.message
    assert str(path) in caught.value.message


def test_token_flow_anonymous_is_refused_with_login_hint(token_registry):
    with client(token_registry) as registry_client:
        with pytest.raises(AuthenticationError) as caught:
            registry_client.get_manifest("berth-client/token", "v1")
    assert "no credentials were sent" in caught.value.message
    assert caught.value.hint == f"log in first: berth login {token_registry.host}"


def test_parallel_blob_downloads_share_one_client(token_registry, tmp_path):
    credentials, _ = credentials_from(tmp_path, token_registry, "berth")
    blobs = [(f"parallel blob {i} ".encode() * 20000) for i in range(6)]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []
    with client(token_registry, credentials, pool_size=6) as registry_client:
        for blob in blobs:
            registry_client.upload_blob("berth-client/parallel", Digest.of(blob), len(blob), io.BytesIO(blob))
        issued_before = len(token_registry.token_server.issued)

        def download(index: int) -> None:
            try:
                with registry_client.open_blob("berth-client/parallel", Digest.of(blobs[index])) as response:
                    results[index] = b"".join(response.read_chunks(32 * 1024))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=download, args=(i,)) for i in range(len(blobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    assert [results[i] for i in range(len(blobs))] == blobs
    # Threads racing on the first challenge may each fetch a token, but never more than one each.
    assert 1 <= len(token_registry.token_server.issued) - issued_before <= len(blobs)


# -- HTTPS -----------------------------------------------------------------------------------

def _certificate_authority_and_server_cert(workdir, server_names):
    """A throw-away CA and a server certificate for ``server_names`` (IPs or DNS names)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=2))

    def build(subject, issuer, public_key, signing_key, ca, names=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(validity[0])
                   .not_valid_after(validity[1])
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            alt = []
            for name in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    alt.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "berth test CA")])
    ca_cert = build(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]), ca_name,
                 key.public_key(), ca_key, False, server_names)
    pem = serialization.Encoding.PEM
    (workdir / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (workdir / "server.pem").write_bytes(cert.public_bytes(pem))
    (workdir / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return workdir / "ca.pem"


@pytest.fixture
def tls_registry_factory(tmp_path):
    """Start docker-registry with TLS on 127.0.0.1 for a certificate naming ``server_names``."""
    import subprocess
    import time
    import urllib.request

    from tests.harness.registry import REGISTRY_BINARY, free_port

    processes = []

    def start(server_names):
        ca = _certificate_authority_and_server_cert(tmp_path, server_names)
        port = free_port()
        (tmp_path / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'storage'}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {tmp_path / 'server.pem'}\n"
            f"    key: {tmp_path / 'server.key'}\n")
        log = open(tmp_path / "registry.log", "wb")
        processes.append(subprocess.Popen([REGISTRY_BINARY, "serve", str(tmp_path / "config.yml")],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        log.close()
        import ssl

        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", timeout=2, context=context).close()
                break
            except OSError:
                if time.monotonic() > deadline or processes[-1].poll() is not None:
                    raise RuntimeError("TLS registry did not start: " + (tmp_path / "registry.log").read_text())
                time.sleep(0.05)
        return f"127.0.0.1:{port}", ca

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def test_https_registry_with_a_trusted_certificate(tls_registry_factory, monkeypatch):
    host, ca = tls_registry_factory(["127.0.0.1"])
    # OpenSSL's default verify paths honor SSL_CERT_FILE: how a site adds its private CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    image = SmallImage("oci", marker="tls")
    with RegistryClient(host, retry=no_wait(0)) as registry_client:
        digest = image.push(registry_client, "berth-client/tls", "v1")
        assert registry_client.get_manifest("berth-client/tls", "v1").digest == digest
    # insecure means plain HTTP, never "HTTPS without verification": the TLS port refuses it.
    with RegistryClient(host, insecure=True, retry=no_wait(0)) as registry_client:
        with pytest.raises(RegistryError):
            registry_client.get_manifest("berth-client/tls", "v1")


def test_https_certificate_is_verified(tls_registry_factory, monkeypatch, tmp_path):
    host, ca = tls_registry_factory(["127.0.0.1"])
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-certs-here"))
    with RegistryClient(host, retry=no_wait(3)) as registry_client:
        with pytest.raises(RegistryUnreachable) as caught:
            registry_client.ping()
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.message
    assert "certificate is not trusted here" in caught.value.hint and "SSL_CERT_FILE" in caught.value.hint


def test_https_host_name_is_verified(tls_registry_factory, monkeypatch):
    host, ca = tls_registry_factory(["registry.example"])  # valid chain, wrong name
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    with RegistryClient(host, retry=no_wait(0)) as registry_client:
        with pytest.raises(RegistryUnreachable) as caught:
            registry_client.ping()
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.message
    assert "127.0.0.1" in caught.value.message
