"""berth: containers for HPC batch jobs.

Images come from OCI registries into one verified SquashFS file each; containers run
unprivileged (user namespaces, FUSE, rootless runc) as the submitting user; admins publish
container templates and site policy; jobs run through a scheduler backend (local or Slurm).
"""

__version__ = "0.1.0"
