"""The scheduler backend interface: small on purpose, so that PBS Pro/Torque, LSF and Flux fit.

A backend does four things (and arrays of them) with a job whose record (``berth.jobs.records``) already holds its
spec and script: ``submit`` it (returning the scheduler's id, if it has one), tell its
``status``, ``cancel`` it, and ``statuses`` for many jobs at once (``berth jobs``: one scheduler
query, not one per job). Logs are files named in the spec, so every backend shares
:func:`berth.jobs.api.log_paths`. What runs on the node is always ``berth job-exec``
(:mod:`berth.jobs.runner`), so a new backend only translates :class:`~berth.jobs.model.Resources`
into its scheduler's request and its states into berth's.
"""

from __future__ import annotations

from typing import Protocol

from berth.jobs.model import JobSpec, JobStatus
from berth.jobs.records import JobRecord

BACKENDS = ("local", "slurm")


class Backend(Protocol):
    name: str

    def check(self, spec: JobSpec) -> list[str]:
        """Validate a request for this backend before anything is submitted.

        Returns notes for the user (options this backend ignores); raises UsageError for
        requests it cannot honor."""

    def submit(self, record: JobRecord, spec: JobSpec) -> str | None:
        """Hand the job to the scheduler; return the scheduler's id (None if it has none).
        Raises JobError when the scheduler refuses it."""

    def submit_array(self, tasks: list[tuple[JobRecord, JobSpec]]) -> list[str | None]:
        """Hand a job array (one record per task, in task order) to the scheduler at once;
        return each task's scheduler id."""

    def status(self, record: JobRecord, spec: JobSpec) -> JobStatus:
        """The job's current state, merging the scheduler's view and the runner's state file."""

    def statuses(self, records: list[tuple[JobRecord, JobSpec]]) -> list[JobStatus]:
        """``status`` for many jobs, with as few scheduler queries as possible."""

    def cancel(self, record: JobRecord, spec: JobSpec) -> None:
        """Ask the job to stop: SIGTERM, then SIGKILL after the job's stop_timeout."""


def get_backend(settings, name: str) -> Backend:
    """The backend called ``name``. Raises UsageError for an unknown one."""
    from berth.errors import UsageError

    if name == "local":
        from berth.jobs.local import LocalBackend

        return LocalBackend(settings)
    if name == "slurm":
        from berth.jobs.slurm import SlurmBackend

        return SlurmBackend(settings)
    raise UsageError(f"--backend '{name}': unknown backend", hint=f"use one of: {', '.join(BACKENDS)}")
