"""pytest fixtures: config (see docs/contracts.md).

- ``site_config``: a fresh site configuration directory and site store in a world-traversable
  temporary directory (the test user must read them), owned by root like a real /etc/berth.
  ``BERTH_CONFIG_DIR`` and ``BERTH_SITE_STORE`` are set in this process's environment for the
  test (``User.base_env`` forwards ``BERTH_CONFIG_DIR``); pass ``site_config.env`` to child
  processes to give them the site store and an empty private ``XDG_CONFIG_HOME`` too.
- ``admin``: the ``User`` root, whose ``berth(...)`` runs berth as the site administrator.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.users import User


@dataclass
class SiteConfig:
    """A temporary site: ``config_dir`` (like /etc/berth), ``site_store``, a user config home."""

    root: Path
    config_dir: Path
    site_store: Path
    user_config_home: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def templates_dir(self) -> Path:
        return self.config_dir / "templates.d"

    def write(self, text: str, name: str = "berth.toml") -> Path:
        """Write a site file (``berth.toml`` or ``conf.d/NAME.toml``), world-readable."""
        path = self.config_dir / name
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        path.chmod(0o644)
        return path

    def write_user_file(self, text: str) -> Path:
        """The test user's own ``$XDG_CONFIG_HOME/berth/berth.toml`` (readable by everyone)."""
        path = self.user_config_home / "berth" / "berth.toml"
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        path.chmod(0o644)
        return path

    def trust_registry(self, host: str) -> Path:
        """A drop-in that lets berth pull over plain HTTP from a test registry on loopback."""
        return self.write(f'[[registries]]\nhost = "{host}"\ninsecure = true\n', f"conf.d/50-registry-{host.replace(':', '-')}.toml")

    def settings(self):
        """The settings a berth process with ``env`` would load."""
        from berth.config.load import load_settings

        return load_settings(environ={**os.environ, **self.env})

    def add_template(self, name: str, **fields):
        """Write a template directly (as root), without pulling: for tests that need one to exist."""
        from berth.config.templates import Template, create_template

        values = {"image": "127.0.0.1:5000/test/none:1", "image_digest": "sha256:" + "0" * 64, "cpu": 1,
                  "memsz_bytes": 256 * 1024**2, **fields}
        return create_template(self.settings(), Template(name=name, **values))


@pytest.fixture
def site_config(monkeypatch) -> Iterator[SiteConfig]:
    root = Path(tempfile.mkdtemp(prefix="berth-site-", dir="/tmp"))
    root.chmod(0o755)
    config_dir, site_store, user_config_home = root / "etc-berth", root / "site-store", root / "xdg-config"
    for directory in (config_dir, site_store, user_config_home):
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
    env = {"BERTH_CONFIG_DIR": str(config_dir), "BERTH_SITE_STORE": str(site_store),
           "XDG_CONFIG_HOME": str(user_config_home)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield SiteConfig(root, config_dir, site_store, user_config_home, env)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def admin() -> User:
    return User.lookup("root")
