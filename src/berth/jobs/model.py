"""The job model: what a user asks for, what berth records, and the states a job goes through.

Pure data, no I/O. A job is described once at submission (:class:`JobSpec`, stored as
``spec.json`` in the job's record directory) and its progress is written by the job runner
(:class:`JobResult`, ``state.json``). Backends translate :class:`Resources` into scheduler
requests (``sbatch`` options, local CPU/memory limits).

States (issue 4): pending → staging → running → completed | failed (with the phase that
failed) | cancelled | timeout; ``suspended`` while a scheduler has the job stopped.
"""

from __future__ import annotations

from berth import proc
from berth.record import Record, asdict, field, fields

PENDING = "pending"
STAGING = "staging"
RUNNING = "running"
SUSPENDED = "suspended"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TIMEOUT = "timeout"

ACTIVE_STATES = (PENDING, STAGING, RUNNING, SUSPENDED)
FINAL_STATES = (COMPLETED, FAILED, CANCELLED, TIMEOUT)

#: Phases a failed job names: where it went wrong.
PHASE_SCHEDULER = "scheduler"  # the scheduler failed the job before berth's runner started
PHASE_STAGING = "staging"  # finding or pulling the image
PHASE_BOOT = "boot"  # starting the container (boot_timeout bounds staging + boot)
PHASE_SCRIPT = "script"  # the script ran and exited non-zero or was killed
PHASE_STAGE_IN = "stage-in"  # --stage-in data could not be brought in (the container never started)
PHASE_STAGE_OUT = "stage-out"  # --stage-out results did not all arrive

#: Defaults for jobs that name an image instead of a template (templates set their own).
DEFAULT_BOOT_TIMEOUT_S = 300
DEFAULT_STOP_TIMEOUT_S = 10


class Resources(Record):
    """A scheduler request in sbatch terms. ``None``: not asked for (the scheduler's default)."""

    nodes: int | None = None
    ntasks: int | None = None
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    #: Memory per node, as ``sbatch --mem``.
    memory_bytes: int | None = None
    gpus: int | None = None
    time_limit_s: int | None = None
    partition: str | None = None
    exclusive: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Resources":
        return cls(**{f.name: data.get(f.name, f.default) for f in fields(cls)})


class JobSpec(Record):
    """Everything needed to run a job, fixed at submission (``spec.json``)."""

    id: str
    backend: str
    name: str
    #: The snapshot of the script in the record directory (what runs), and where it came from.
    script: str
    script_source: str
    args: tuple[str, ...]
    #: The submit directory: the working directory of the script inside the container.
    workdir: str
    #: The image to run: a digest reference when a template pinned one.
    image: str
    template: str | None
    resources: Resources
    output: str
    error: str | None
    boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    #: The template's ``custom`` run options (shell-quoted), applied to the container.
    custom: str = ""
    user: str = ""
    submitted_at: float = 0.0
    #: Data staging (docs/staging.md): SRC:DEST items as typed, when stage-out runs, the S3
    #: profile's *name* (never its keys), and whether the container gets the keys as a file.
    stage_in: tuple[str, ...] = ()
    stage_out: tuple[str, ...] = ()
    stage_out_when: str = "always"
    s3_profile: str | None = None
    s3_credentials_in_container: bool = False
    #: sbatch options berth passes on unchanged (``--account=proj``), in precedence order.
    scheduler_options: tuple[str, ...] = ()
    #: The user's --comment (Slurm's comment carries berth's record tag, then this).
    comment: str = ""
    #: --dependency on the local backend (``afterok:3:4,singleton``; Slurm's is in scheduler_options).
    dependency: str = ""
    #: A task of a job array: the array's id (berth's id of its first task), this task's id, and
    #: at most how many of its tasks run at once (--array=1-5%2).
    array_job_id: str = ""
    array_task_id: int | None = None
    array_limit: int | None = None
    array_spec: str = ""
    #: Default ``--scope`` of the job's ``berth srun`` steps: "task" or "node" (docs/mpi.md).
    scope: str = "task"
    #: ``--mpi`` of the job's containers and ``berth srun`` steps: "host", "none" or "" (the
    #: image's own MPI unless the template's custom options say otherwise; docs/mpi.md).
    mpi: str = ""

    @property
    def label(self) -> str:
        """``7`` or, for an array task, ``7_3`` (as Slurm names array tasks)."""
        return f"{self.array_job_id}_{self.array_task_id}" if self.array_job_id else self.id
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["args"] = list(self.args)
        data["stage_in"], data["stage_out"] = list(self.stage_in), list(self.stage_out)
        data["scheduler_options"] = list(self.scheduler_options)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["resources"] = Resources.from_dict(data.get("resources") or {})
        values["args"] = tuple(data.get("args") or ())
        values["stage_in"] = tuple(data.get("stage_in") or ())
        values["stage_out"] = tuple(data.get("stage_out") or ())
        values["scheduler_options"] = tuple(data.get("scheduler_options") or ())
        return cls(**values)


class JobResult(Record):
    """What the job runner reports (``state.json``); also the merged view ``berth status`` shows."""

    state: str
    phase: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    message: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    node: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobResult":
        return cls(**{f.name: data.get(f.name, f.default) for f in fields(cls)})

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class JobStatus(Record):
    """One row of ``berth status`` / ``berth jobs``: spec plus the current result."""

    spec: JobSpec
    result: JobResult
    #: The scheduler's own id (Slurm job id), when the backend has one.
    native_id: str | None = None
    #: The scheduler's own state word (e.g. Slurm's ``SUSPENDED``), for people who know it.
    native_state: str | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.spec.id,
            "job": self.spec.label,
            "array_job_id": self.spec.array_job_id or None,
            "array_task_id": self.spec.array_task_id,
            "backend": self.spec.backend,
            "native_id": self.native_id,
            "native_state": self.native_state,
            "name": self.spec.name,
            "image": self.spec.image,
            "template": self.spec.template,
            "output": self.spec.output,
            "error": self.spec.error,
            "submitted_at": self.spec.submitted_at,
            **self.result.to_dict(),
        }


def result_for_exit(exit_status: int, **times) -> JobResult:
    """The final result for a script that ran and exited with a shell-style status."""
    code, sig = proc.split_status(exit_status)
    if exit_status == 0:
        return JobResult(COMPLETED, exit_code=0, **times)
    return JobResult(FAILED, phase=PHASE_SCRIPT, exit_code=code, signal=sig,
                     message=f"the job script failed ({proc.describe_shell_status(exit_status)})", **times)
