"""The real test bed: users, servers (registry, Slurm, S3) and test images, started by fixtures."""
