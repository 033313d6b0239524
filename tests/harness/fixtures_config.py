"""pytest fixtures: config (see docs/contracts.md)."""
