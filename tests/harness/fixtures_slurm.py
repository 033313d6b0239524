"""pytest fixtures: slurm (see docs/contracts.md)."""
