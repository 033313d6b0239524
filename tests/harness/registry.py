"""A real OCI registry for tests: Debian's docker-registry (Distribution 2.8) on loopback.

Three flavours, all plain HTTP on 127.0.0.1 with a free port and filesystem storage in a
temporary directory (deleted at stop):

- anonymous: anyone may pull and push;
- basic: htpasswd (bcrypt, made with ``htpasswd -Bbn``) with one user;
- token: Distribution's ``auth: token:`` scheme; a small token server (:class:`TokenServer`, a
  threaded ``http.server`` on 127.0.0.1) checks basic credentials and issues RS256 JWTs. The
  JWT header carries the signing certificate in ``x5c``; that self-signed certificate is the
  registry's ``rootcertbundle``, so the registry verifies the chain against it.

Servers are stopped by PID (never by name). Nothing here is imported by berth itself.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "/usr/bin/htpasswd"
START_TIMEOUT_S = 15.0
SERVICE_NAME = "berth-test-registry"
ISSUER_NAME = "berth-test-token-issuer"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --------------------------------------------------------------------------- token server


class TokenServer:
    """Docker token-auth server (https://distribution.github.io/distribution/spec/auth/token/).

    ``GET /token?service=S&scope=repository:NAME:pull,push`` with HTTP basic credentials (or
    ``POST /token`` with the OAuth2 password grant form) answers
    ``{"token": JWT, "access_token": JWT, "expires_in": 300}``. Wrong or missing credentials
    answer 401. ``/token`` without a scope gives a token with no access (what
    clients ask for at login). Every granted scope is recorded in :attr:`issued` so tests can
    check what a client asked for.
    """

    def __init__(self, workdir: Path, username: str, password: str, *, token_lifetime_s: int = 300):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
        import datetime

        self.username = username
        self.password = password
        self.token_lifetime_s = token_lifetime_s
        self.issued: list[dict] = []
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER_NAME)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-cert.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._cert_der_b64 = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="token-server", daemon=True)
        self._thread.start()

    def make_token(self, subject: str, access: list[dict], *, lifetime_s: Optional[int] = None) -> str:
        """A signed JWT granting ``access`` (Distribution's claim set) to ``subject``."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._cert_der_b64]}
        claims = {
            "iss": ISSUER_NAME,
            "sub": subject,
            "aud": SERVICE_NAME,
            "exp": now + (self.token_lifetime_s if lifetime_s is None else lifetime_s),
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - quiet; tests read .issued
                pass

            def _answer(self, status: int, body: dict, extra_headers: Optional[dict] = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (extra_headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server naming
                from urllib.parse import parse_qs, urlsplit

                parts = urlsplit(self.path)
                if parts.path != "/token":
                    self._answer(404, {"error": "not found"})
                    return
                if not self._credentials_ok():
                    self._answer(401, {"error": "bad credentials"},
                                 {"WWW-Authenticate": 'Basic realm="berth-test-token"'})
                    return
                self._grant(parse_qs(parts.query))

            def do_POST(self):  # noqa: N802 - OAuth2 password grant, as containerd sends it
                from urllib.parse import parse_qs, urlsplit

                if urlsplit(self.path).path != "/token":
                    self._answer(404, {"error": "not found"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode(errors="replace"))
                user = form.get("username", [""])[0]
                password = form.get("password", [""])[0]
                if form.get("grant_type", [""])[0] != "password" or not (
                        secrets.compare_digest(user, server.username)
                        and secrets.compare_digest(password, server.password)):
                    self._answer(401, {"error": "invalid_grant"})
                    return
                self._grant(form)

            def _grant(self, query: dict[str, list[str]]) -> None:
                access = []
                for scope_list in query.get("scope", []):
                    for scope in scope_list.split(" "):  # OAuth2 joins scopes with spaces
                        # scope = TYPE:NAME:ACTIONS, e.g. repository:test/busybox:pull,push
                        kind, _, rest = scope.partition(":")
                        name, _, actions = rest.rpartition(":")
                        if kind and name:
                            access.append({"type": kind, "name": name, "actions": [
                                a for a in actions.split(",") if a in ("pull", "push", "delete", "*")]})
                token = server.make_token(server.username, access)
                with server._lock:
                    server.issued.append({"service": query.get("service", [""])[0], "access": access})
                self._answer(200, {"token": token, "access_token": token,
                                   "expires_in": server.token_lifetime_s})

            def _credentials_ok(self) -> bool:
                header = self.headers.get("Authorization", "")
                if not header.startswith("Basic "):
                    return False
                try:
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    return False
                return secrets.compare_digest(user, server.username) and secrets.compare_digest(
                    password, server.password)

        return Handler

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- registry


@dataclass
class Registry:
    """A running registry. ``host`` is ``127.0.0.1:PORT`` (what goes in an image reference)."""

    host: str
    workdir: Path
    process: subprocess.Popen
    auth: str = "none"  # "none" | "basic" | "token"
    username: Optional[str] = None
    password: Optional[str] = None
    token_server: Optional[TokenServer] = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:5000`` (append ``/v2/``)."""
        return f"http://{self.host}"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def log_tail(self, size_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-size_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the registry (by PID) and the token server, and delete the storage."""
        if self._stopped:
            return
        self._stopped = True
        _terminate(self.process)
        if self.token_server is not None:
            self.token_server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when pytest dies, so no registry is orphaned."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _config_yaml(port: int, storage: Path, auth_section: str) -> str:
    # JSON is valid YAML, but the registry's config parser wants "version" as a string.
    return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
{auth_section}"""


def start_registry(
    *,
    auth: str = "none",
    username: str = "berth",
    password: Optional[str] = None,
    parent_dir: Optional[Path] = None,
) -> Registry:
    """Start docker-registry on 127.0.0.1 and wait until ``/v2/`` answers.

    ``auth`` is ``"none"``, ``"basic"`` (htpasswd) or ``"token"`` (bearer tokens from a
    :class:`TokenServer`). For the auth flavours the credentials are ``username`` and
    ``password`` (a random one when not given). The caller must call :meth:`Registry.stop`
    (or use the registry as a context manager). Raises ``RuntimeError`` with the registry's
    log tail when it does not come up.
    """
    if auth not in ("none", "basic", "token"):
        raise ValueError(f"unknown registry auth {auth!r}")
    if not os.path.exists(REGISTRY_BINARY):
        raise RuntimeError(f"{REGISTRY_BINARY} is missing: apt-get install docker-registry")
    password = password or secrets.token_urlsafe(12)
    workdir = Path(tempfile.mkdtemp(prefix="berth-registry-", dir=parent_dir))
    os.chmod(workdir, 0o755)
    token_server = None
    try:
        auth_section = ""
        if auth == "basic":
            htpasswd = subprocess.run(
                [HTPASSWD_BINARY, "-Bbn", username, password],
                check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL,
            ).stdout
            (workdir / "htpasswd").write_text(htpasswd)
            auth_section = f"auth:\n  htpasswd:\n    realm: berth-test\n    path: {workdir / 'htpasswd'}\n"
        elif auth == "token":
            token_server = TokenServer(workdir, username, password)
            auth_section = (
                "auth:\n  token:\n"
                f"    realm: {token_server.realm}\n"
                f"    service: {SERVICE_NAME}\n"
                f"    issuer: {ISSUER_NAME}\n"
                f"    rootcertbundle: {token_server.cert_path}\n"
            )
        last_error = ""
        for _attempt in range(5):
            port = free_port()
            config = workdir / "config.yml"
            config.write_text(_config_yaml(port, workdir / "storage", auth_section))
            log = open(workdir / "registry.log", "ab")
            try:
                process = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=_die_with_parent,
                )
            finally:
                log.close()
            registry = Registry(
                host=f"127.0.0.1:{port}", workdir=workdir, process=process, auth=auth,
                username=username if auth != "none" else None,
                password=password if auth != "none" else None,
                token_server=token_server,
            )
            if _wait_ready(registry):
                return registry
            _terminate(process)
            last_error = registry.log_tail()
        raise RuntimeError(f"docker-registry did not start; log tail:\n{last_error}")
    except BaseException:
        if token_server is not None:
            token_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _wait_ready(registry: Registry) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(registry.url + "/v2/", timeout=2) as response:
                if response.status == 200:
                    return True
        except urllib.error.HTTPError as error:
            if error.code == 401:  # auth registries answer 401 with a challenge: it is up
                return True
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.02)
    return False


def basic_auth_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def bearer_token(registry: Registry, scope: Optional[str] = None) -> str:
    """Fetch a token from the registry's token server (``scope`` like ``repository:x/y:pull``)."""
    from urllib.parse import urlencode

    if registry.token_server is None:
        raise ValueError("registry has no token server")
    query = {"service": SERVICE_NAME}
    if scope:
        query["scope"] = scope
    request = urllib.request.Request(
        registry.token_server.realm + "?" + urlencode(query),
        headers={"Authorization": basic_auth_header(registry.username, registry.password)},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["token"]


def auth_headers(registry: Registry, scope: Optional[str] = None) -> dict[str, str]:
    """The Authorization header that this registry accepts (empty for anonymous ones)."""
    if registry.auth == "basic":
        return {"Authorization": basic_auth_header(registry.username, registry.password)}
    if registry.auth == "token":
        return {"Authorization": "Bearer " + bearer_token(registry, scope)}
    return {}
