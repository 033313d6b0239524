"""pytest fixtures: runtime (see docs/contracts.md)."""
