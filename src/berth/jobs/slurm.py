"""The Slurm backend: ``sbatch`` a generated batch script that runs ``berth job-exec`` on the
first node of the allocation; ``squeue --states=all`` + the runner's state file for status;
``scancel`` to cancel.

Why plain commands and not pyslurm/psij-python: pyslurm must be built against the exact
libslurm of the site (22.05 here) and psij-python's Slurm executor itself shells out to the same
commands while hiding Slurm's states (SUSPENDED, TIMEOUT) behind its own; the four commands are
stable across Slurm releases and need nothing on top of slurm-client.

Slurm enforces the time limit and its cgroups (CPUs, memory, GPUs) on the whole job, the
container included: the container's processes stay in the job's cgroup (rootless runc cannot
leave it), so ``scontrol suspend``/``resume`` (freezer) stops and continues them too. On
``scancel`` and at the time limit slurmd sends SIGTERM to every process of the job and SIGKILL
``KillWait`` seconds later; the runner gives the container its ``stop_timeout`` in between, so
a site's KillWait must be at least the largest template stop_timeout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import sys
import time
from pathlib import Path

from berth import proc
from berth.config.settings import Settings
from berth.config.units import format_clock
from berth.errors import JobError, ProgramFailed, UsageError
from berth.jobs import model
from berth.jobs.model import JobResult, JobSpec, JobStatus
from berth.jobs.options import CHECKED, INTERPRETED, REFUSED
from berth.jobs.records import JobRecord, atomic_write

COMMENT_PREFIX = "berth:"

#: Slurm job states -> berth states; None: look at the runner's state file.
_STATE_MAP = {
    "PENDING": model.PENDING,
    "CONFIGURING": model.PENDING,
    "REQUEUED": model.PENDING,
    "REQUEUE_HOLD": model.PENDING,
    "REQUEUE_FED": model.PENDING,
    "RESV_DEL_HOLD": model.PENDING,
    "SUSPENDED": model.SUSPENDED,
    "CANCELLED": model.CANCELLED,
    "TIMEOUT": model.TIMEOUT,
    "DEADLINE": model.TIMEOUT,
}
_RUNNING_STATES = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED")


def sbatch_argv(spec: JobSpec, record: JobRecord) -> list[str]:
    """sbatch's command line for ``spec``: berth's own options, then the user's options berth
    passes on unchanged (``spec.scheduler_options``). Everything is on the command line, not in
    ``#SBATCH`` lines, so no value needs quoting and no ``SBATCH_*`` environment variable of
    the submitting shell overrides what berth checked (sbatch: the command line wins)."""
    r = spec.resources
    passed = {word.partition("=")[0] for word in spec.scheduler_options}
    argv = ["sbatch", "--parsable", f"--job-name={spec.name}"]
    if r.nodes is not None:
        argv.append(f"--nodes={r.nodes}")
    if r.ntasks is not None:
        argv.append(f"--ntasks={r.ntasks}")
    if r.ntasks_per_node is not None:
        argv.append(f"--ntasks-per-node={r.ntasks_per_node}")
    if r.cpus_per_task is not None:
        argv.append(f"--cpus-per-task={r.cpus_per_task}")
    if r.memory_bytes is not None and not passed & {"--mem-per-cpu", "--mem-per-gpu"}:
        argv.append(f"--mem={-(-r.memory_bytes // (1 << 20))}M")
    if r.gpus and not any(name.startswith("--gpus") for name in passed):
        argv.append(f"--gres=gpu:{r.gpus}")
    if r.time_limit_s is not None:
        argv.append(f"--time={format_clock(r.time_limit_s)}")
    if r.partition:
        argv.append(f"--partition={r.partition}")
    if r.exclusive:
        argv.append("--exclusive")
    # Slurm writes its own file in the job's private record, never the user's -o/-e (SlurmOutput).
    argv.append(f"--output={scheduler_output_pattern(record, spec)}")
    argv.append(f"--chdir={spec.workdir}")
    # Ties the Slurm job to this record: Slurm ids restart when a cluster is rebuilt.
    argv.append(f"--comment={record_tag(record)}" + (f" {spec.comment}" if spec.comment else ""))
    argv.extend(spec.scheduler_options)
    return argv


def scheduler_output_pattern(record: JobRecord, spec: JobSpec) -> str:
    """sbatch's ``--output`` for the job of ``record``: its :meth:`JobRecord.scheduler_output`
    (an array's first record: every task's, ``%a`` being Slurm's task id, which is berth's),
    with the record's ``%`` doubled so that Slurm reads none of it as a pattern. Raises
    JobError for a record path with a backslash: Slurm drops it from ``--output`` (seen with
    22.05: the job failed to launch, writing nothing anywhere)."""
    if "\\" in str(record.path):
        raise JobError(f"the jobs directory {record.path.parent} has a backslash in its path, which Slurm "
                       "removes from the job's output file name: the job could not start",
                       hint="move it to a path without one (jobs_dir, BERTH_JOBS_DIR; `berth config show`)")
    name = record.scheduler_output("%a" if spec.array_job_id else None).name
    return str(record.path).replace("%", "%%") + "/" + name


def scheduler_output(record: JobRecord, spec: JobSpec) -> Path:
    """The file Slurm writes its own output to for the job of ``record`` (the node's side of
    :func:`scheduler_output_pattern`)."""
    if spec.array_job_id:
        return JobRecord(record.path.parent / spec.array_job_id).scheduler_output(spec.array_task_id)
    return record.scheduler_output()


#: The first line of Slurm's file, written at submission. Slurm truncates the file when the job
#: starts unless the job's open mode is append (sbatch --open-mode, the site's JobFileAppend):
#: finding it tells the runner to append to the user's -o/-e files rather than truncate them,
#: as Slurm would have done to them.
OUTPUT_HEADER = b"berth: Slurm's own output for this job; berth job-exec carries it into the job's error file\n"


def prepare_scheduler_output(path: Path) -> None:
    atomic_write(path, OUTPUT_HEADER.decode())


class SlurmOutput:
    """A Slurm job's ``-o``/``-e`` on the node (docs/security.md, "Paths berth resolves").

    slurmstepd opens a job's ``--output`` by name and follows links: in a shared directory
    without the sticky bit another user could swap the user's file for a link to another of
    theirs (``~/.bashrc``) while the job waited, and the job's output went there. So Slurm gets
    a file in the job's private record (:func:`scheduler_output`), and the runner opens the
    user's files itself, as the local backend does (never through a link, only a regular file
    of the user's), truncated as Slurm would have (not when :data:`OUTPUT_HEADER` says append),
    as its stdout and stderr. What Slurm wrote to its own file (anything before the runner
    started, ``slurmstepd: error: *** JOB N ON node CANCELLED AT ... ***``) the runner carries
    into the job's error file when it starts and when the job ends; what it could not carry
    (it never started or was killed, Slurm wrote after it ended) ``berth logs`` shows
    (:func:`uncarried_output`)."""

    def __init__(self, record: JobRecord, spec: JobSpec) -> None:
        self.spec = spec
        self.path = scheduler_output(record, spec)
        self.offset = 0

    def take(self) -> None:
        """Open the user's output and error files as this process's stdout and stderr and carry
        Slurm's output so far into the error file. Raises JobError naming a file refused."""
        from berth.jobs.records import open_regular_nofollow

        opened: dict[str, int] = {}
        try:
            for name in filter(None, (self.spec.output, self.spec.error)):
                if name not in opened:
                    opened[name] = open_regular_nofollow(Path(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644,
                                                         replace_planted=False)
        except OSError as exc:
            for fd in opened.values():
                os.close(fd)
            raise _refused(exc, name) from None
        append, self.offset = self._start()
        if not append:
            for fd in opened.values():
                os.ftruncate(fd, 0)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(opened[self.spec.output], 1)
        os.dup2(opened.get(self.spec.error or "", opened[self.spec.output]), 2)
        for fd in opened.values():
            os.close(fd)
        self.carry()

    def _start(self) -> tuple[bool, int]:
        """(whether Slurm appends, where carrying starts): in append mode after the header and
        whatever a run before this one (Slurm requeued the job) carried already; in truncate
        mode at 0, Slurm having emptied the file when this run started."""
        try:
            with _open_own(self.path) as fd:
                if os.pread(fd, len(OUTPUT_HEADER), 0) != OUTPUT_HEADER:
                    return False, 0
                return True, _carried(fd, self.path, len(OUTPUT_HEADER))
        except OSError:
            return False, 0

    def carry(self) -> None:
        """Append what Slurm wrote to its file since the last carry to the job's error file
        (this process's stderr) and record how far it got (:func:`_carried`). Never raises: the
        job's own end matters more."""
        try:
            with _open_own(self.path) as fd:
                while chunk := os.pread(fd, 1 << 20, self.offset):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(2, view):]
                    self.offset += len(chunk)
                atomic_write(_carried_path(self.path), f"{self.offset} {_fingerprint(fd, self.offset)}\n")
        except (OSError, JobError):
            pass


def uncarried_output(record: JobRecord, spec: JobSpec) -> bytes:
    """What Slurm wrote to its own file for the job that the runner did not carry into the
    job's error file (:class:`SlurmOutput`): everything when the runner never started, or when
    Slurm truncated the file for a requeued run whose runner has not carried yet."""
    path = scheduler_output(record, spec)
    try:
        with _open_own(path) as fd:
            start = len(OUTPUT_HEADER) if os.pread(fd, len(OUTPUT_HEADER), 0) == OUTPUT_HEADER else 0
            start = _carried(fd, path, start)
            chunks = []
            while chunk := os.pread(fd, 1 << 20, start):
                chunks.append(chunk)
                start += len(chunk)
    except OSError:
        return b""
    return b"".join(chunks)


@contextlib.contextmanager
def _open_own(path: Path):
    from berth.jobs.records import open_regular_nofollow

    fd = open_regular_nofollow(path, os.O_RDONLY, replace_planted=False)
    try:
        yield fd
    finally:
        os.close(fd)


def _carried_path(path: Path) -> Path:
    return path.with_name(path.name + ".carried")


def _fingerprint(fd: int, offset: int) -> str:
    """sha256 of the first ``offset`` bytes of Slurm's file: what the carry took (Slurm's own
    messages are small)."""
    import hashlib

    digest = hashlib.sha256()
    position = 0
    while position < offset and (chunk := os.pread(fd, min(1 << 20, offset - position), position)):
        digest.update(chunk)
        position += len(chunk)
    return digest.hexdigest() if position == offset else ""


def _carried(fd: int, path: Path, start: int) -> int:
    """Where carrying of Slurm's file ``fd`` resumes: the offset ``slurm*.out.carried`` records,
    when the file still begins with the bytes carried (their sha256 is recorded beside it);
    else ``start``. The rule, for a job Slurm requeues (each run's output is carried once):

    - truncate mode (Slurm's default): Slurm empties the file when a run starts, so the offset of
      the run before is stale until this run's runner carries; the file no longer begins with
      what was carried, and all of it is this run's (what Slurm wrote after the run before
      ended is gone with the truncation, as it would be from a plain Slurm job's file);
    - append mode: the file only grows, so the offset holds across runs, and the next run
      carries what Slurm wrote after the run before's last carry (its requeue notice).

    A record without a fingerprint (an older berth) is trusted as an offset."""
    try:
        offset, _, fingerprint = _carried_path(path).read_text().strip().partition(" ")
        carried = int(offset)
    except (OSError, ValueError):
        return start
    if not start <= carried <= os.fstat(fd).st_size:
        return start
    if fingerprint and fingerprint != _fingerprint(fd, carried):
        return start
    return carried


def _refused(exc: OSError, name: str) -> JobError:
    name = exc.filename or name
    hint = ("berth writes a job's output only to a regular file of yours, never through a link; in a directory "
            "other users can write without the sticky bit, they can replace it while the job waits: keep "
            "outputs where only you can change names, and resubmit")
    if exc.errno in (errno.ELOOP, errno.EPERM, errno.ENODEV, errno.EISDIR):  # records._planted_error
        return JobError(f"refused the job's output file {name}: it {exc.strerror}", hint=hint)
    return JobError(f"cannot open the job's output file {name}: {exc.strerror}",
                    hint="check that you can still write it and its directory, and resubmit")


def array_script(tasks: list[tuple[JobRecord, JobSpec]], python: str) -> str:
    """The batch script of a job array: each task runs ``berth job-exec`` on its own record,
    its output going to the files berth resolved for that task."""
    head, spec = tasks[0]
    cases = []
    for record, task in tasks:
        runner = " ".join(shlex.quote(word) for word in
                          proc.berth_argv("job-exec", "--backend", "slurm", str(record.path), python=python))
        # job-exec opens the task's output itself, never through a link (SlurmOutput).
        cases.append(f"  {task.array_task_id}) exec {runner} ;;")
    return (
        "#!/bin/sh\n"
        f"# berth job array {spec.array_job_id}, generated by `berth submit`: each task runs its job script\n"
        f"# in a container on its first node. Image: {spec.image}\n"
        f"# sbatch options: see sbatch.argv next to this file\n"
        'case "$SLURM_ARRAY_TASK_ID" in\n' + "\n".join(cases) + "\n"
        '  *) echo "berth: no record for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;\nesac\n'
    )


def sbatch_env() -> dict[str, str]:
    """Our environment for sbatch, less the ``SBATCH_*`` input variables of the options berth
    decides (resources held to the template's ceilings, outputs, --export...): sbatch would
    apply them where berth passed no option (``SBATCH_GPUS`` with no --gpus)."""
    owned = {name.upper().replace("-", "_") for name in (*INTERPRETED, *CHECKED, *REFUSED)}
    owned |= {"TIMELIMIT", "MEM_PER_NODE", "ARRAY_INX", "EXPORT_FILE"}
    return {key: value for key, value in proc.child_env().items()
            if not (key.startswith("SBATCH_") and key[len("SBATCH_"):] in owned)}


def record_tag(record: JobRecord) -> str:
    return f"{COMMENT_PREFIX}{record.path}"


def batch_script(spec: JobSpec, record: JobRecord, python: str) -> str:
    """The batch script sbatch receives (its options are on sbatch's command line)."""
    runner = " ".join(shlex.quote(word) for word in
                      proc.berth_argv("job-exec", "--backend", "slurm", str(record.path), python=python))
    return (
        "#!/bin/sh\n"
        f"# berth job {spec.id}, generated by `berth submit`: berth job-exec runs the job script\n"
        f"# in a container on the first node. Image: {spec.image}\n"
        f"# sbatch options: see sbatch.argv next to this file\n"
        f"exec {runner}\n"
    )


#: squeue fields, comment last (it is free text): job id, state, reason, node list, comment.
SQUEUE_FORMAT = "%i|%T|%r|%N|%k"

REQUEUED = "Slurm requeued the job: it runs again from the start"
#: How a result berth takes from Slurm's final state (no word of the runner for it) begins.
SLURM_ENDED = "Slurm ended the job as"

#: Slurm states of a job that ended because a node of it failed (the runner on the batch host
#: may be gone with it, or was stopped with SIGTERM like at a cancel).
_NODE_FAILURE_STATES = ("NODE_FAIL", "BOOT_FAIL")


def parse_squeue(text: str) -> dict[str, dict[str, str]]:
    """``squeue -o SQUEUE_FORMAT`` output -> {job id: {JobState, Reason, NodeList, Comment}}
    (the names of ``scontrol show job``, which :func:`merge_state` reads)."""
    jobs: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|", 4)
        if len(parts) == 5 and parts[0]:
            comment = "" if parts[4] == "(null)" else parts[4]
            jobs[parts[0]] = {"JobId": parts[0], "JobState": parts[1], "Reason": parts[2], "NodeList": parts[3],
                              "Comment": comment}
    return jobs


def node_failure_result(slurm: dict[str, str], result: JobResult | None) -> JobResult:
    """A job Slurm ended as NODE_FAIL (BOOT_FAIL): failed, naming the node(s) that failed
    (``FailedNodes``, from sinfo, when the node is still down) or else the job's nodes."""
    state = slurm.get("JobState", "NODE_FAIL")
    failed = slurm.get("FailedNodes") or ""
    what = "did not boot" if state == "BOOT_FAIL" else "failed during the job"
    if failed:
        nodes = f"node {failed} {what}"
    elif state in _NODE_FAILURE_STATES and slurm.get("NodeList"):
        nodes = f"a node of {slurm['NodeList']} {what}"
    else:  # COMPLETING: the node list is the nodes still ending their part
        nodes = f"one of the job's nodes {what}"
    word = state if state in _NODE_FAILURE_STATES else "NODE_FAIL"
    return JobResult(model.FAILED, phase=model.PHASE_SCHEDULER,
                     message=f"{nodes}; Slurm ended the job as {word}: resubmit it",
                     started_at=result.started_at if result else None,
                     ended_at=result.ended_at if result and result.ended_at else time.time(),
                     node=result.node if result else None)


def merge_state(spec: JobSpec, record: JobRecord, slurm: dict[str, str] | None) -> JobStatus:
    """Slurm's view (None: the job is no longer known to slurmctld) + the runner's state file."""
    result = record.read_result()
    native_id = record.read_native_id()
    comment = slurm.get("Comment", "") if slurm is not None else ""
    # An array's tasks carry the tag of its first task's record (the array's id).
    tag = record_tag(JobRecord(record.path.parent / spec.array_job_id) if spec.array_job_id else record)
    if comment.startswith(COMMENT_PREFIX) and comment != tag and not comment.startswith(tag + " "):
        slurm = None  # the same number, but another job (the cluster's ids were reset)
    if slurm is None:
        if result is not None and result.final:
            return JobStatus(spec, result, native_id)
        if record.cancel_requested():
            return JobStatus(spec, JobResult(model.CANCELLED, message="the job was cancelled"), native_id)
        return JobStatus(spec, JobResult(model.FAILED, phase=model.PHASE_SCHEDULER,
                                         message="Slurm no longer knows this job and it left no result"),
                         native_id)
    state = slurm.get("JobState", "UNKNOWN")
    mapped = _STATE_MAP.get(state)
    started = result.started_at if result else None
    if mapped == model.SUSPENDED:
        return JobStatus(spec, JobResult(model.SUSPENDED, started_at=started, node=result.node if result else None),
                         native_id, state)
    if mapped in (model.PENDING,):
        requeued = result is not None and result.started_at is not None
        return JobStatus(spec, JobResult(model.PENDING, message=REQUEUED if requeued else None), native_id, state)
    node_down = state in _NODE_FAILURE_STATES or (state == "COMPLETING" and slurm.get("Reason") == "NodeDown")
    if node_down and _runner_word_lost(result, record):
        # The runner's own word is kept when the script had ended, or a cancel was asked for;
        # else it is gone with its node, or it took Slurm's SIGTERM for a cancel. Recorded, so
        # that the reason stays once slurmctld forgets the job (MinJobAge); a reason recorded
        # with the failed node's name is not replaced by one without.
        failed = node_failure_result(slurm, result)
        if result is not None and result.phase == model.PHASE_SCHEDULER and not slurm.get("FailedNodes"):
            return JobStatus(spec, result, native_id, state)
        if failed != result:
            try:
                record.write_result(failed)
            except OSError:
                pass
        return JobStatus(spec, failed, native_id, state)
    if mapped in (model.CANCELLED, model.TIMEOUT):
        base = result if result is not None else JobResult(mapped)
        message = "the time limit was reached" if mapped == model.TIMEOUT else "the job was cancelled"
        return JobStatus(spec, JobResult(mapped, exit_code=base.exit_code, signal=base.signal, message=message,
                                         started_at=base.started_at, ended_at=base.ended_at, node=base.node),
                         native_id, state)
    if state in _RUNNING_STATES:
        if result is None:
            return JobStatus(spec, JobResult(model.STAGING), native_id, state)
        if state == "RUNNING" and result.final and _runner_word_lost(result, record):
            # A requeued job's next run, before its runner writes: the end recorded is the
            # previous run's (taken for a cancel, or a node failure seen while it ended).
            return JobStatus(spec, JobResult(model.STAGING, message=REQUEUED), native_id, state)
        return JobStatus(spec, result, native_id, state)
    # Ended for another reason (COMPLETED, FAILED, NODE_FAIL, OUT_OF_MEMORY, BOOT_FAIL...).
    reason = slurm.get("Reason", "None")
    ended = f"{SLURM_ENDED} {state}" + (f" ({reason})" if reason not in ("None", "") else "")
    if result is not None and result.final:
        if not _runner_word_lost(result, record) or (result.phase == model.PHASE_SCHEDULER
                                                     and (result.message or "").startswith(SLURM_ENDED)):
            return JobStatus(spec, result, native_id, state)
        # A "cancelled" nobody asked for, or a node failure recorded before, is not this end: it is
        # the run before Slurm requeued the job, whose next run ended before its runner wrote (with
        # the requeue hold cut short, `scontrol update StartTime=now` within the second of the
        # kill, slurmctld killed it as "Job credential revoked": FAILED, exit code 1), or a signal
        # from outside. Recorded, so that it stays once slurmctld forgets the job.
        lost = JobResult(model.FAILED, phase=model.PHASE_SCHEDULER, ended_at=time.time(),
                         message=f"{ended} without a result from berth's runner for that run (the last one "
                                 f"recorded, '{result.state}', was no cancel of yours: the run before Slurm "
                                 f"requeued the job, or a signal from outside); `berth logs {spec.label}` shows "
                                 "the job's output and Slurm's own messages, or resubmit it")
        try:
            record.write_result(lost)
        except OSError:
            pass
        return JobStatus(spec, lost, native_id, state)
    return JobStatus(spec, JobResult(
        model.FAILED, phase=model.PHASE_SCHEDULER,
        message=f"{ended} before berth's runner reported a result; `berth logs {spec.label}` shows Slurm's "
                "own messages"),
        native_id, state)


def _runner_word_lost(result: JobResult | None, record: JobRecord) -> bool:
    """Whether the runner's result is not the job's end after a node failure: none or not
    final (the runner died with its node), ``cancelled`` without a cancel (it took the SIGTERM
    that stops a failed node's other parts for one), or a node failure recorded before."""
    if result is None or not result.final:
        return True
    if result.state == model.CANCELLED:
        return not record.cancel_requested()
    return result.state == model.FAILED and result.phase == model.PHASE_SCHEDULER


class SlurmBackend:
    name = "slurm"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def check(self, spec: JobSpec) -> list[str]:
        """Slurm 22.05 takes a dependency on a job id it does not know as satisfied (the job
        starts at once): every id in --dependency must be a job Slurm knows."""
        import re

        for word in spec.scheduler_options:
            if word.startswith("--dependency="):
                for job in re.findall(r"(?<=:)[0-9]+", word):
                    if job not in self._query(job):
                        raise UsageError(f"--dependency names job {job}, which Slurm does not know",
                                         hint="give the id of a job of yours (berth's or Slurm's); "
                                              "`berth jobs` lists them")
        return []

    def submit(self, record: JobRecord, spec: JobSpec) -> str | None:
        script = batch_script(spec, record, sys.executable)
        argv = sbatch_argv(spec, record)
        atomic_write(record.path / "batch.sh", script)
        atomic_write(record.path / "sbatch.argv", "\n".join(argv) + "\n")
        prepare_scheduler_output(record.scheduler_output())
        return self._sbatch(argv, script, spec)

    def _sbatch(self, argv: list[str], script: str, spec: JobSpec) -> str:
        result = proc.run(argv, input=script.encode(), env=sbatch_env(), cwd=spec.workdir, check=False)
        if result.returncode != 0:
            tail = result.stderr.decode(errors="replace").strip()
            raise JobError(f"sbatch refused job {spec.id}: {tail or proc.describe_status(result.returncode)}",
                           hint="sbatch's own words above; check the options, and the resources against "
                                "`sinfo` and the partition limits")
        native = result.stdout.decode().strip().split(";")[0]
        if not native.isdigit():
            raise JobError(f"sbatch answered something that is not a job id: {native!r}")
        return native

    def submit_array(self, tasks: list[tuple[JobRecord, JobSpec]]) -> list[str]:
        """One ``sbatch --array`` for all tasks: the batch script picks the task's record by
        ``SLURM_ARRAY_TASK_ID``; its runner writes the task's output where berth resolved it,
        and Slurm its own in the first record (``slurm-%a.out``: Slurm's ``--output`` pattern
        cannot name berth's per-task ids). Returns ``NATIVE_TASK`` ids."""
        head, spec = tasks[0]
        argv = sbatch_argv(spec, head)
        limit = f"%{spec.array_limit}" if spec.array_limit else ""
        argv[2:2] = [f"--array={','.join(str(t.array_task_id) for _, t in tasks)}{limit}"]
        script = array_script(tasks, sys.executable)
        atomic_write(head.path / "batch.sh", script)
        atomic_write(head.path / "sbatch.argv", "\n".join(argv) + "\n")
        for _, task in tasks:
            prepare_scheduler_output(head.scheduler_output(task.array_task_id))
        native = self._sbatch(argv, script, spec)
        return [f"{native}_{task.array_task_id}" for _, task in tasks]

    def _query(self, native_id: str | None = None) -> dict[str, dict[str, str]]:
        """Slurm's view of one job, or of all the caller's jobs (``squeue --me``: one cheap
        call however many jobs the cluster runs; finished jobs stay for MinJobAge)."""
        selector = ["-j", native_id] if native_id else ["--me"]
        # -r: one line per array task (NATIVE_TASK), not one for all pending tasks
        argv = ["squeue", "-h", "-r", "--states=all", *selector, "-o", SQUEUE_FORMAT]
        result = proc.run(argv, env=proc.child_env(), check=False)
        if result.returncode != 0:
            error = result.stderr.decode(errors="replace")
            if "Invalid job id" in error:
                return {}
            raise JobError(f"squeue failed: {error.strip() or proc.describe_status(result.returncode)}",
                           hint="is slurmctld reachable? (`sinfo`; SLURM_CONF)")
        return parse_squeue(result.stdout.decode(errors="replace"))

    def _failed_nodes(self, jobs: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        """Name the nodes that failed in the jobs Slurm ended as NODE_FAIL/BOOT_FAIL (those of
        the job's nodes that sinfo shows down, drained or not responding, with the admin's or
        slurmctld's reason); one sinfo call per such job, none otherwise."""
        for job in jobs.values():
            if job.get("JobState") not in _NODE_FAILURE_STATES or not job.get("NodeList"):
                continue
            result = proc.run(["sinfo", "-h", "-N", "-n", job["NodeList"], "-o", "%N|%T|%E"],
                              env=proc.child_env(), check=False)
            failed = []
            for line in result.stdout.decode(errors="replace").splitlines():
                node, _, rest = line.strip().partition("|")
                node_state, _, reason = rest.partition("|")
                if node and (node_state.startswith(("down", "drain", "fail", "unknown")) or node_state.endswith("*")):
                    failed.append(node + (f" ({reason})" if reason and reason != "none" else ""))
            if failed:
                job["FailedNodes"] = ", ".join(dict.fromkeys(failed))
        return jobs

    def status(self, record: JobRecord, spec: JobSpec) -> JobStatus:
        native = record.read_native_id()
        if native is None:
            return JobStatus(spec, JobResult(model.FAILED, phase=model.PHASE_SCHEDULER,
                                             message="the job was never accepted by Slurm"))
        return merge_state(spec, record, self._failed_nodes(self._query(native)).get(native))

    def statuses(self, records):
        if not records:
            return []
        jobs = self._failed_nodes(self._query())
        return [merge_state(spec, record, jobs.get(record.read_native_id() or "")) for record, spec in records]

    def cancel(self, record: JobRecord, spec: JobSpec) -> None:
        current = self.status(record, spec)
        if current.result.final:
            raise JobError(f"job {spec.id} already ended ({current.result.state})")
        record.request_cancel()
        try:
            proc.run(["scancel", current.native_id or ""], env=proc.child_env(), what="scancel")
        except ProgramFailed as exc:
            raise JobError(f"cannot cancel job {spec.id} (Slurm job {current.native_id}): {exc.message}") from None
