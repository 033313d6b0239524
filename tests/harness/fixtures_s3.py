"""pytest fixtures: the S3 server (tests/harness/s3.py).

- ``s3_server``: SeaweedFS for the whole session, with buckets ``berth-data`` (the test user's)
  and ``other-data`` (the second user's); ``.user_keys``, ``.other_keys``, ``.endpoint``,
  ``.client(keys)``, ``.new_bucket()``.
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


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    server = start_s3()
    try:
        yield server
    finally:
        server.stop()


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
