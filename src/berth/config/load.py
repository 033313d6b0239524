"""Loading settings (placeholder: built-in defaults and per-user paths only)."""

from __future__ import annotations

from berth.config.settings import Settings, default_paths


def load_settings(options: dict | None = None) -> Settings:
    return Settings(**default_paths(), sources={})
