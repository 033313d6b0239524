"""CLI commands: login, logout (placeholder until the registry work lands)."""

from __future__ import annotations


def register(sub) -> None:
    """Add this module's commands to the top-level subparsers."""
