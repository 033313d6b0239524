"""pytest fixtures: registry (see docs/contracts.md)."""
