"""pytest fixtures: images (see docs/contracts.md)."""
