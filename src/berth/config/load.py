"""Loading settings (placeholder until the configuration issue lands: defaults, per-user
paths, and the BERTH_SITE_STORE / BERTH_USER_STORE / BERTH_STATE_DIR / BERTH_RUNTIME
environment overrides that tests already rely on)."""

from __future__ import annotations

import os
from pathlib import Path

from berth.config.settings import Settings, default_paths

_PATH_ENV = {
    "BERTH_SITE_STORE": "site_store",
    "BERTH_USER_STORE": "user_store",
    "BERTH_STATE_DIR": "state_dir",
    "BERTH_JOBS_DIR": "jobs_dir",
}


def load_settings(options: dict | None = None) -> Settings:
    values: dict = dict(default_paths())
    for name, key in _PATH_ENV.items():
        if os.environ.get(name):
            values[key] = Path(os.environ[name])
    if os.environ.get("BERTH_RUNTIME"):
        values["runtime"] = os.environ["BERTH_RUNTIME"]
    values.update(options or {})
    return Settings(**values, sources={})
