"""The local backend: jobs on this machine, detached from the terminal, no daemon.

``submit`` starts ``berth job-exec`` in a new session (setsid: no controlling terminal, not in
the shell's process group, so it survives the submitting shell's exit and its hang-up), with
stdout and stderr already redirected to the job's output files. The runner first takes one of
``settings.local_max_jobs`` slots — ``flock`` on ``JOBS_DIR/.slots/N.lock``, released by the
kernel however the runner ends — and waits as ``pending`` while all are taken. Everything else
(state, cancel, exit status) is in the record's files.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from berth import locks, proc
from berth.config.settings import Settings
from berth.errors import BerthError, JobError, UsageError
from berth.jobs import model
from berth.jobs.model import JobResult, JobSpec, JobStatus
from berth.jobs.records import JobRecord, atomic_write, make_private_dir, open_regular_nofollow, slots_dir

SLOT_POLL_S = 0.25

#: sbatch options passed on to Slurm that berth also turns into the local job's limits (its
#: memory, its GPUs from the ledger): not "ignored".
USED_LOCALLY = ("--mem-per-cpu", "--mem-per-gpu", "--gpus-per-node", "--gpus-per-task", "--gpus-per-socket")

#: sbatch options with a meaning on one machine that the local backend does not implement:
#: ignoring them would run the job at the wrong time, so they are refused.
LOCAL_UNSUPPORTED = {
    "--begin": "it starts jobs at once",
    "--hold": "it starts jobs at once",
    "--deadline": "it has no scheduler to drop late jobs",
}


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def check(self, spec: JobSpec) -> list[str]:
        """Refuses what this machine cannot honour (several nodes; a start time, hold or dependency
        it would silently drop); every option that only a scheduler uses (account, QoS,
        partition, mail...) is accepted and named in one note."""
        resources = spec.resources
        if resources.nodes is not None and resources.nodes > 1:
            raise UsageError(f"--nodes {resources.nodes}: the local backend runs jobs on this machine only",
                             hint="submit multi-node jobs with --backend slurm")
        ignored = []
        for value, option in ((resources.partition, "--partition"), (resources.ntasks, "--ntasks"),
                              (resources.ntasks_per_node, "--ntasks-per-node"),
                              (resources.exclusive or None, "--exclusive")):
            if value:
                ignored.append(option)
        for word in spec.scheduler_options:
            name = word.partition("=")[0]
            if name in LOCAL_UNSUPPORTED:
                raise UsageError(f"{name}: the local backend cannot honour it ({LOCAL_UNSUPPORTED[name]})",
                                 hint="submit with --backend slurm, or leave the option out")
            if name not in ignored and name not in USED_LOCALLY:
                ignored.append(name)
        if not ignored:
            return []
        return [f"ignoring {', '.join(ignored)}: the local backend has no scheduler to give them to"]

    def submit(self, record: JobRecord, spec: JobSpec) -> str | None:
        record.write_result(JobResult(model.PENDING))
        out = _open_output(spec.output)
        err = _open_output(spec.error) if spec.error else None
        try:
            child = proc.start(
                proc.berth_argv("job-exec", "--backend", "local", str(record.path)),
                stdout=out, stderr=err if err is not None else out, cwd=spec.workdir, new_session=True,
                env=proc.child_env(),
            )
        finally:
            os.close(out)
            if err is not None:
                os.close(err)
        atomic_write(record.pid_file, f"{child.pid}\n")
        return None

    def submit_array(self, tasks: list[tuple[JobRecord, JobSpec]]) -> list[str | None]:
        """One runner per task; each waits for one of the array's ``%N`` slots (run_job)."""
        return [self.submit(record, spec) for record, spec in tasks]

    def status(self, record: JobRecord, spec: JobSpec) -> JobStatus:
        result = record.read_result() or JobResult(model.PENDING)
        if not result.final and not _runner_alive(record):
            # Re-read: the runner may have finished between the two looks.
            result = record.read_result() or result
            if not result.final and record.cancel_requested():
                result = JobResult(model.CANCELLED, started_at=result.started_at,
                                   message="the job was cancelled")
            elif not result.final:
                result = JobResult(model.FAILED, phase=result.phase or model.PHASE_SCHEDULER,
                                   started_at=result.started_at,
                                   message="the job runner is gone without a result "
                                           "(killed, or the machine restarted)")
        return JobStatus(spec=spec, result=result)

    def statuses(self, records):
        return [self.status(record, spec) for record, spec in records]

    def cancel(self, record: JobRecord, spec: JobSpec) -> None:
        result = record.read_result()
        if result is not None and result.final:
            raise JobError(f"job {spec.id} already ended ({result.state})")
        record.request_cancel()
        pid = record.read_pid()
        if pid is None or not _runner_alive(record):
            record.write_result(JobResult(model.CANCELLED, ended_at=time.time(),
                                          message="the job was cancelled"))
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _open_output(path: str) -> int:
    """The job's output file, opened as berth.jobs.api prepared it: no link followed, never
    blocking on a FIFO, only a regular file of yours."""
    try:
        return open_regular_nofollow(Path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644,
                                     replace_planted=False)
    except OSError as exc:
        raise JobError(f"cannot open the job's output file {path}: {exc.strerror}",
                       hint="choose a path you can write with -o/-e") from None


def _runner_alive(record: JobRecord) -> bool:
    pid = record.read_pid()
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return False
    fields = proc.stat_fields(pid)
    return bool(fields) and fields[0] != "Z" and b"job-exec" in argv and str(record.path).encode() in argv


DEPENDENCY_POLL_S = 0.5


def wait_for_dependencies(settings, record: JobRecord, spec: JobSpec) -> str | None:
    """Wait (as ``pending``) until ``spec.dependency`` holds. Returns None when it does, else why
    it never will (or that the job was cancelled meanwhile): the job then ends cancelled, as
    Slurm cancels such a job when the site sets kill_invalid_depend.

    afterok: every named job completed; afternotok: every one ended otherwise (failed,
    cancelled, timeout); afterany: every one ended; singleton: every earlier job of yours with
    the same name on this backend ended."""
    from berth.jobs.options import parse_dependency
    from berth.jobs.records import find_record, list_records

    conditions = parse_dependency(spec.dependency, f"job {spec.id}")
    backend = LocalBackend(settings)
    while True:
        if record.cancel_requested():
            return "the job was cancelled while waiting for its dependency"
        waiting = False
        for kind, ids in conditions:
            if kind == "singleton":
                others = [r for r in list_records(settings) if int(r.id) < int(spec.id)]
                states = []
                for other in others:
                    other_spec = other.read_spec()
                    if other_spec.backend == "local" and other_spec.name == spec.name:
                        states.append(backend.status(other, other_spec).result.state)
            else:
                states = []
                for job in ids:
                    try:
                        dep = find_record(settings, job)
                        states.append(backend.status(dep, dep.read_spec()).result.state)
                    except BerthError:
                        return f"dependency {kind}:{job} can never be satisfied: job {job} is gone"
            ended = [state for state in states if state in model.FINAL_STATES]
            if kind == "afterok" and any(state != model.COMPLETED for state in ended):
                failed = next(j for j, st in zip(ids, states) if st in model.FINAL_STATES and st != model.COMPLETED)
                return f"dependency afterok:{':'.join(ids)} can never be satisfied: job {failed} did not complete"
            if kind == "afternotok" and model.COMPLETED in ended:
                done = next(j for j, st in zip(ids, states) if st == model.COMPLETED)
                return f"dependency afternotok:{':'.join(ids)} can never be satisfied: job {done} completed"
            if len(ended) < len(states):
                waiting = True
        if not waiting:
            return None
        time.sleep(DEPENDENCY_POLL_S)


def acquire_slot(settings, record: JobRecord, max_jobs: int, *, array_id: str = ""):
    """Block until one of ``max_jobs`` slots is free; return its open lock file (keep it open).
    ``array_id``: the slots of that job array's ``%N`` limit instead of the machine's.

    Returns None when a cancel was requested while waiting."""
    directory = slots_dir(settings) / f"array-{array_id}" if array_id else slots_dir(settings)
    handles = []
    try:
        if array_id:
            make_private_dir(slots_dir(settings))
        make_private_dir(directory)
        for index in range(max(1, max_jobs)):
            # Never truncate or write a lock file: a container could have planted a link to
            # one of your files in its place (the slots are under the mounted home).
            fd = open_regular_nofollow(directory / f"{index}.lock", os.O_RDWR | os.O_CREAT)
            handles.append(os.fdopen(fd, "r+"))
        while True:
            for handle in handles:
                # A queue, not a lock wait: a job waits for a slot as long as jobs run before
                # it (`berth cancel` ends the wait), so only one try per slot and round.
                if not locks.try_acquire(handle.fileno()):
                    continue
                for other in handles:
                    if other is not handle:
                        other.close()
                return handle
            if record.cancel_requested():
                for handle in handles:
                    handle.close()
                return None
            time.sleep(SLOT_POLL_S)
    except OSError as exc:
        for handle in handles:
            handle.close()
        raise JobError(f"cannot use the job slots in {directory}: {exc.strerror}") from None
