"""pytest fixtures: the S3 server (tests/harness/s3.py).

- ``s3_server``: SeaweedFS for the whole session, with buckets ``berth-data`` (the test user's)
  and ``other-data`` (the second user's); ``.user_keys``, ``.other_keys``, ``.endpoint``,
  ``.client(keys)``, ``.new_bucket()``.
- ``s3_dataset``: ``berth-data/ds/``: nested keys, one object over the multipart threshold
  (20 MiB, uploaded in 8 MiB parts) and many small ones; {key below ds/: md5}.
- ``stalled_endpoint``: ``http://127.0.0.1:PORT`` of a server that accepts connections and
  never answers (an S3 endpoint that stalls).
- ``s3_profile``: function-scoped helper ``s3_profile(user, name="default", keys=None, **extra)``
  that writes the user's ``~/.config/berth/s3.toml`` under a fresh XDG_CONFIG_HOME (mode 0600,
  owned by the user) and returns the environment that makes berth read it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness.s3 import S3Server, start_s3

S3_BIG_BYTES = 20 << 20
S3_SMALL_COUNT = 120


def md5(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


def tree_md5s(root: Path) -> dict[str, str]:
    """{relative path: md5} of every file under ``root``."""
    return {str(p.relative_to(root)): md5(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    server = start_s3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_dataset(s3_server) -> dict[str, str]:
    import io
    import random

    client = s3_server.client()
    rng = random.Random(7)
    expected: dict[str, str] = {}
    for index in range(S3_SMALL_COUNT):
        data = rng.randbytes(rng.randrange(1, 64 << 10))
        key = f"nested/level{index % 3}/deeper{index % 2}/small-{index:04d}.bin"
        client.put_object(Bucket="berth-data", Key=f"ds/{key}", Body=data)
        expected[key] = md5(data)
    big = rng.randbytes(S3_BIG_BYTES)
    client.upload_fileobj(io.BytesIO(big), "berth-data", "ds/big.bin")  # boto3: multipart in 8 MiB parts
    expected["big.bin"] = md5(big)
    assert "-" in client.head_object(Bucket="berth-data", Key="ds/big.bin")["ETag"]
    return expected


def profile_toml(server: S3Server, name: str = "default", keys=None, **extra) -> str:
    keys = keys or server.user_keys
    values = {"endpoint": server.endpoint, "region": "us-east-1", "access_key": keys.access_key,
              "secret_key": keys.secret_key, "addressing_style": "path", **extra}
    lines = [f"[{name}]"]
    for key, value in values.items():
        lines.append(f"{key} = {value}" if isinstance(value, (int, float)) else f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


@pytest.fixture
def s3_profile(s3_server):
    made: list[Path] = []

    def write(user, name: str = "default", keys=None, text: str | None = None, mode: int = 0o600,
              **extra) -> dict[str, str]:
        xdg = Path(tempfile.mkdtemp(prefix="berth-xdg-", dir="/tmp"))
        made.append(xdg)
        (xdg / "berth").mkdir()
        path = xdg / "berth" / "s3.toml"
        path.write_text(text if text is not None else profile_toml(s3_server, name, keys, **extra))
        path.chmod(mode)
        for item in (xdg, xdg / "berth", path):
            os.chown(item, user.uid, user.gid)
        os.chmod(xdg, 0o700)
        return {"XDG_CONFIG_HOME": str(xdg)}

    yield write
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stalled_endpoint():
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    held = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
