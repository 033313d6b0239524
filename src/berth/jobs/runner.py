"""The job runner: what ``berth job-exec`` does on the job's first node, for every backend.

It supervises one child process that stages the image and runs the job script in the
container (:func:`berth.runtime.container.run_container`), and reports progress in the
record's ``state.json``: staging → running → completed / failed (with phase) / cancelled /
timeout.

- ``boot_timeout`` bounds staging plus container start: the wrapper that starts the script
  inside the container creates ``RECORD/ctr/started`` (``ctr`` is mounted over the jobs dir);
  past the deadline without it the child is stopped and the job fails naming the phase it was
  in (staging or boot). (Not a byte on stdin: runc gives a foreground container pipes, not the
  caller's descriptors.)
- SIGTERM/SIGINT/SIGHUP/SIGQUIT (``berth cancel`` locally, ``scancel`` or the time limit on
  Slurm, ``scancel -s QUIT``) and the local
  time limit stop the job the way Slurm stops a step: SIGTERM to every process of the job, then
  SIGKILL after ``stop_timeout``. The job is ``cancelled`` when a cancel was requested (or the
  signal came from outside before the time limit) and ``timeout`` when the time limit was reached.
- The step agent (:mod:`berth.jobs.agent`) serves ``srun``/``berth`` calls from inside the
  container while the job runs.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from pathlib import Path

from berth import proc
from berth.errors import BerthError, JobError
from berth.jobs import model
from berth.jobs.agent import StepAgent, install_shims
from berth.jobs.model import JobResult, JobSpec
from berth.jobs.mpi import mpi_launcher_env
from berth.jobs.records import JobRecord
from berth.record import replace
from berth.untrusted import parse_json

#: Runs inside the container: tell the runner the script starts, give the script /dev/null as
#: stdin (as sbatch does) and the step shims first on its PATH, then become the script.
WRAPPER = (
    ': > "$BERTH_JOB_DIR/started"; exec 0</dev/null; '
    'if [ -d "${BERTH_JOB_BIN:-}" ]; then PATH="$BERTH_JOB_BIN:$PATH"; export PATH; fi; '
    'exec "$@"'
)

POLL_S = 0.1
#: After stop_timeout, run_container kills the container itself and unmounts the image; the
#: runner kills what is left only this much later, so that the clean-up can finish.
TEARDOWN_GRACE_S = 10.0
#: When a SIGTERM arrives this close to the time limit, it is the scheduler's time limit.
TIME_LIMIT_SLACK_S = 5.0


def record_bin(record: JobRecord) -> Path:
    return record.container_dir / "bin"


def record_agent(record: JobRecord) -> Path:
    return record.container_dir / "agent"


def container_view(record: JobRecord) -> Path:
    """Where the container finds its part of the record: mounted over the jobs directory."""
    return record.path.parent


def job_environment(spec: JobSpec, record: JobRecord) -> dict[str, str]:
    """Variables every job's script sees (paths as the container sees them)."""
    view = container_view(record)
    env = {
        "BERTH_JOB_ID": spec.id,
        "BERTH_JOB_NAME": spec.name,
        "BERTH_JOB_IMAGE": spec.image,
        "BERTH_JOB_SCOPE": spec.scope,
        "BERTH_JOB_MPI": spec.mpi,
        "BERTH_JOB_DIR": str(view),
        "BERTH_JOB_BIN": str(view / "bin"),
        "BERTH_JOB_AGENT": str(view / "agent"),
    }
    if spec.array_job_id:
        # A task of a job array (issue 11): berth's ids, and Slurm's names for them where no
        # Slurm set its own (the local backend), so a script reads the same variables on both.
        env["BERTH_ARRAY_JOB_ID"], env["BERTH_ARRAY_TASK_ID"] = spec.array_job_id, str(spec.array_task_id)
        if spec.backend == "local":
            env["SLURM_ARRAY_JOB_ID"], env["SLURM_ARRAY_TASK_ID"] = spec.array_job_id, str(spec.array_task_id)
    return env


def host_step_environment(spec: JobSpec, record: JobRecord) -> dict[str, str]:
    """What steps started on the host (``srun …``, ``berth srun …``) get from the job."""
    return {"BERTH_JOB_ID": spec.id, "BERTH_JOB_NAME": spec.name, "BERTH_JOB_IMAGE": spec.image,
            "BERTH_JOB_SCOPE": spec.scope, "BERTH_JOB_MPI": spec.mpi, "BERTH_JOB_DIR": str(record.path)}


def build_run_options(settings, spec: JobSpec, record: JobRecord, *, limit_resources: bool):
    """The container options for the job script: the template's custom options, the job's
    environment, the submit directory as working directory, and (local backend) the CPU and
    memory limits. Raises UsageError when the template's custom options no longer parse."""
    from berth.runtime.identity import Caller
    from berth.runtime.options import MountRequest, RunOptions, parse_custom
    from berth.runtime.plan import home_covers

    options = parse_custom(spec.custom) if spec.custom else RunOptions()
    job_env = {**mpi_launcher_env(spec.image, os.environ), **job_environment(spec, record)}
    env = tuple(f"{k}={v}" for k, v in job_env.items())
    # The submit directory must be visible at its host path: unless the container's home mount
    # (berth.runtime.plan decides, with the container's meaning of home) already shows it
    # there, it is added. The record's container part is mounted over the whole jobs
    # directory: the container sees its script and step shims, not the other jobs, their
    # specs or the slot locks (which it could otherwise tamper with).
    mounts = list(options.mounts)
    real = os.path.realpath(spec.workdir)
    if real != "/" and not home_covers(real, Caller.current(), options, settings.policy) \
            and not any(m.destination == real for m in mounts):
        mounts.append(MountRequest(real, real, read_only=False))
    mounts.append(MountRequest(str(record.container_dir), str(container_view(record)), read_only=False))
    changes: dict = {
        "mounts": tuple(mounts),
        "env": (*options.env, *env),
        "workdir": spec.workdir,
        "stop_timeout_s": float(spec.stop_timeout_s),
        # A template's custom --scope is for the job's steps (BERTH_JOB_SCOPE), not its script.
        "scope": "task",
    }
    if spec.mpi:
        # --container-mpi (or the template's --mpi) is for the script's container and the steps.
        changes["mpi"] = spec.mpi
    if options.gpus is None and limit_resources and spec.resources.gpus:
        # Local: the GPU ledger hands them out, so that concurrent jobs never share one.
        changes["gpus"] = str(spec.resources.gpus)
    elif options.gpus is None and not limit_resources and (spec.resources.gpus or os.environ.get("SLURM_JOB_GPUS")):
        # Slurm allocated them (also through --gpus-per-node/--gpus-per-task, which berth passes
        # on): the container takes what SLURM_JOB_GPUS names, when they are GPUs berth knows
        # (a site's "gpu" gres may be devices that a template's CDI device gives instead).
        from berth.runtime.devices.gpus import node_gpus

        if node_gpus(settings):
            changes["gpus"] = "all"
    if limit_resources:
        resources = spec.resources
        if resources.cpus_per_task is not None:
            changes["cpus"] = float(resources.cpus_per_task)
        if resources.memory_bytes is not None:
            changes["memory_bytes"] = resources.memory_bytes
    return replace(options, **changes)


def stage_and_run(settings, spec: JobSpec, record: JobRecord, report, *, limit_resources: bool) -> int:
    """Find the image (pulling only if no store has it), then run the script in it.

    ``report(event, **data)`` tells the supervisor about progress. Returns the shell-style exit
    status. This is the one place that touches the image and runtime layers.
    """
    from berth.image.api import get_image
    from berth.runtime.container import run_container

    options = build_run_options(settings, spec, record, limit_resources=limit_resources)
    if spec.s3_credentials_in_container:
        options = replace(options, env=(*options.env, *container_credentials(settings, spec, record)))
    image = get_image(settings, spec.image, pull_missing=True)
    report("staged", image=str(image.digest))
    script = str(container_view(record) / record.script.relative_to(record.container_dir))
    command = ["/bin/sh", "-c", WRAPPER, "berth-job", script, *spec.args]
    # Local jobs queue for GPUs their other jobs hold (cancel and time limit still apply).
    return run_container(settings, image, command, options, gpu_wait_s=float("inf") if limit_resources else 0.0)


def container_credentials(settings, spec: JobSpec, record: JobRecord) -> list[str]:
    """Write the job's S3 profile as 0600 AWS files for the container (only on request) and
    return the variables that point the AWS tools at them. The keys go into the file, never
    into the environment."""
    from berth.jobs.records import atomic_write
    from berth.staging.profiles import credentials_file_text, resolve_profile

    profile = resolve_profile(spec.s3_profile, settings=settings)
    credentials, config = record.credential_files
    atomic_write(credentials, credentials_file_text(profile), mode=0o600)
    lines = ["[default]", f"region = {profile.region}"]
    if profile.endpoint:
        lines.append(f"endpoint_url = {profile.endpoint}")
    if profile.addressing_style != "auto":
        lines += ["s3 =", f"    addressing_style = {profile.addressing_style}"]
    atomic_write(config, "\n".join(lines) + "\n", mode=0o600)
    view = container_view(record)
    env = [f"AWS_SHARED_CREDENTIALS_FILE={view / credentials.name}", f"AWS_CONFIG_FILE={view / config.name}",
           f"AWS_DEFAULT_REGION={profile.region}"]
    if profile.endpoint:
        env.append(f"AWS_ENDPOINT_URL={profile.endpoint}")
    return env


def run_staging(settings, spec: JobSpec, direction: str) -> int:
    """Stage-in or stage-out of a job, on this node; the summary (or what arrived before a
    failure) goes to the job's output. Raises BerthError; returns 0."""
    from berth.staging.locations import parse_transfers
    from berth.staging.profiles import resolve_profile
    from berth.staging.transfer import stage_in, stage_out

    items = spec.stage_in if direction == "in" else spec.stage_out
    transfers = parse_transfers(items, direction)
    profile = resolve_profile(spec.s3_profile, settings=settings)
    notes: list[str] = []
    run = stage_in if direction == "in" else stage_out
    try:
        summary = run(transfers, profile, spec.workdir, notes=notes)
    except BerthError as error:
        partial = getattr(error, "summary", None)
        _log([*notes, *(partial.lines() if partial is not None else [])])
        raise
    _log([*notes, *summary.lines()])
    return 0


def _log(lines: list[str]) -> None:
    """Lines for the job's output file (the runner's stdout), unbuffered: the runner forks."""
    if lines:
        os.write(1, "".join(f"berth: {line}\n" for line in lines).encode())


def _descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every process below it (from /proc), parents first."""
    children = proc.children_by_parent()
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def signal_tree(root_pid: int, sig: int) -> None:
    """Send ``sig`` to ``root_pid`` and all its descendants (SIGTERM spares FUSE daemons,
    SIGKILL the daemon of a shared image mount)."""
    from berth.runtime import fuse, imagemount

    for pid in _descendants(root_pid):
        # FUSE daemons serve the container's root filesystem until run_container unmounts it: a
        # SIGTERM for the job must not take the files away from under the script's trap. Any
        # FUSE daemon in the tree, whatever its mount (a shared image mount's too: other
        # containers use it): the pid was found in this walk, not recorded earlier, and a wrong
        # "yes" only spares a process that the SIGKILL below ends anyway. The SIGKILL spares the
        # daemon of a shared image mount, the one its record names (pid and start time), which
        # is in the tree only while the berth that started it lives: other containers of the
        # user's, other jobs' too, read their image through it, and the mount goes once nobody
        # holds it (berth.runtime.imagemount). Any other FUSE daemon, a job's own detached one
        # included, goes. A job's own process could leave the tree anyway (a double fork): the
        # walk is no boundary.
        if sig != signal.SIGKILL:
            if fuse.daemon_mountpoint(pid) is not None:
                continue
        elif imagemount.is_shared_daemon(pid):
            continue
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_steps(agent: StepAgent, stop_timeout_s: float) -> None:
    """End the steps still running once the job's container is gone (started in the background,
    or the job was cancelled): SIGTERM first, so that a ``berth run`` step forwards it and tears
    down its container and mounts itself (signal_tree spares FUSE daemons); SIGKILL for what is
    left ``stop_timeout_s`` plus the teardown grace later. (SIGKILL at once left the steps'
    container directories and image mounts to the next berth command: issue 8.)"""
    steps = agent.child_pids()
    for step in steps:
        signal_tree(step, signal.SIGTERM)
    deadline = time.monotonic() + stop_timeout_s + TEARDOWN_GRACE_S
    while steps and time.monotonic() < deadline:
        time.sleep(POLL_S)
        steps = agent.child_pids()
    for step in steps:
        signal_tree(step, signal.SIGKILL)


class Supervisor:
    """Runs one job: the child that stages and runs the container, and the events around it."""

    def __init__(self, settings, record: JobRecord, *, limit_resources: bool, enforce_time_limit: bool,
                 node: str | None = None) -> None:
        self.settings = settings
        self.record = record
        self.spec = record.read_spec()
        self.limit_resources = limit_resources
        self.enforce_time_limit = enforce_time_limit
        self.node = node
        self._signalled: int | None = None
        #: The child now running (stage-in, container, stage-out): SIGUSR1/SIGUSR2 go to it.
        self._child_pid: int | None = None
        self.started_at = time.time()
        #: The job's time limit counts from here: stage-in, container and script together.
        self._start_monotonic = time.monotonic()
        #: While a stage-out is still to run, the script's end is not the job's final state.
        self._hold_final = False

    # -- state -----------------------------------------------------------------------------
    def _write(self, state: str, **fields) -> JobResult:
        result = JobResult(state, started_at=self.started_at, node=self.node, **fields)
        if not (self._hold_final and result.final):
            self.record.write_result(result)
        return result

    def _on_signal(self, signum, _frame) -> None:
        """SIGTERM/SIGINT/SIGHUP/SIGQUIT (berth.proc.STOP_SIGNALS, what a berth run step takes
        for a stop) stop the job, which is not forwarding them: the supervision
        loop (:meth:`_supervise`, :meth:`_stage_phase`) sends SIGTERM to the whole process tree
        of the phase, sparing FUSE daemons (:func:`signal_tree`), kills it after stop_timeout
        and records cancelled or timeout; so the signal is only noted here."""
        if self._signalled is None:
            self._signalled = signum

    def _pass_on(self, signum, _frame) -> None:
        """SIGUSR1/SIGUSR2 are the script's (``sbatch --signal=B:USR1@60``: the batch shell is
        this runner): passed on to the child of the current phase (berth.proc.pass_on), which
        forwards them into the container (berth.proc.wait_forwarding). Their default action
        would end the runner and, with it, the job."""
        proc.pass_on(signum, self._child_pid)

    # -- main ------------------------------------------------------------------------------
    def run(self) -> JobResult:
        """Run the job to its end and return (and record) its final result."""
        for signum in proc.STOP_SIGNALS:  # SIGQUIT too: its default action (core) left no result
            signal.signal(signum, self._on_signal)
        for signum in proc.HELD_SIGNALS:
            signal.signal(signum, self._pass_on)
        spec = self.spec
        self.record.started_file.unlink(missing_ok=True)  # a requeued Slurm job runs again
        self._write(model.STAGING)
        install_shims(record_bin(self.record), record_agent(self.record))
        if spec.stage_in:
            outcome, error = self._stage_phase("in")
            if outcome != "ok":
                return self._stage_in_result(outcome, error)
        self._hold_final = bool(spec.stage_out)
        host_env = {**os.environ, **host_step_environment(spec, self.record)}
        agent = StepAgent(record_agent(self.record), host_env, spec.workdir)
        agent.open()  # before the job's container exists (berth.jobs.agent)
        events_read, events_write = os.pipe()
        pid = self._fork(events_read, events_write, self._run_script)
        agent.start()
        try:
            result = self._supervise(pid, events_read)
        finally:
            agent.stop()
            stop_steps(agent, float(spec.stop_timeout_s))
            os.close(events_read)
            self.record.remove_credentials()
        if spec.stage_out:
            self._hold_final = False
            result = self._stage_out_after(result)
        return result

    # -- data staging (docs/staging.md) -----------------------------------------------------
    def _stage_phase(self, direction: str) -> tuple[str, dict | None]:
        """Run stage-in or stage-out in a child process, stoppable by a cancel (and, for
        stage-in, by the time limit). Returns ("ok" | "failed" | "cancelled" | "timeout", error)."""
        events_read, events_write = os.pipe()
        pid = self._fork(events_read, events_write,
                         lambda report: run_staging(self.settings, self.spec, direction))
        limit = self.spec.resources.time_limit_s
        deadline = self._start_monotonic + limit if (limit and self.enforce_time_limit and direction == "in") \
            else None
        error: dict | None = None
        buffer = b""
        stopping: tuple[str, float] | None = None
        try:
            while True:
                done, raw = os.waitpid(pid, os.WNOHANG)
                readable, _, _ = select.select([events_read], [], [], 0 if done == pid else POLL_S)
                if events_read in readable:
                    buffer += os.read(events_read, 65536)
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        event = parse_json(line, what="an event of the container supervisor", error=JobError)
                        if event["event"] == "error":
                            error = event
                if done == pid:
                    break
                now = time.monotonic()
                if stopping is None:
                    final = None
                    if self._signalled is not None:
                        final = self._state_after_signal(now - self._start_monotonic)
                    elif deadline is not None and now > deadline:
                        final = model.TIMEOUT
                    if final is not None:
                        signal_tree(pid, signal.SIGTERM)
                        stopping = (final, now + TEARDOWN_GRACE_S)
                elif now > stopping[1]:
                    signal_tree(pid, signal.SIGKILL)
                    stopping = (stopping[0], float("inf"))
        finally:
            os.close(events_read)
        if stopping is not None:
            return stopping[0], error
        status = proc.wait_status(raw)
        if status == 0:
            return "ok", None
        return "failed", error or {"message": f"the stage-{direction} process ended with "
                                              f"{proc.describe_shell_status(status)}"}

    def _stage_in_result(self, outcome: str, error: dict | None) -> JobResult:
        times = {"ended_at": time.time()}
        if outcome == "failed":
            return self._write(model.FAILED, phase=model.PHASE_STAGE_IN, message=_message(error), **times)
        word = {"timeout": "the time limit was reached during stage-in",
                "cancelled": "the job was cancelled during stage-in"}[outcome]
        return self._write(outcome, message=word, **times)

    def _stage_out_after(self, result: JobResult) -> JobResult:
        """Stage-out once the container is gone: after any end of a script that started
        (``--stage-out-when always``) or after success only; never when the script never
        started (cancelled, or failed before). A failure makes a completed job
        ``failed (stage-out)``; a job that failed already keeps its state and gains the reason."""
        spec = self.spec
        started = self.record.started_file.exists()
        if not started or (spec.stage_out_when == "success" and result.state != model.COMPLETED):
            self.record.write_result(result)
            return result
        # The signal that stopped the script (cancel, time limit) must not stop its stage-out:
        # only a new one does.
        self._signalled = None
        self.record.write_result(replace(result, state=model.STAGING, phase=model.PHASE_STAGE_OUT,
                                         ended_at=None))
        outcome, error = self._stage_phase("out")
        final = result
        if outcome != "ok":
            problem = _message(error) if outcome == "failed" else f"stage-out was stopped ({outcome})"
            if result.state == model.COMPLETED:
                final = replace(result, state=model.FAILED if outcome == "failed" else outcome,
                                phase=model.PHASE_STAGE_OUT, exit_code=None, message=problem)
            else:
                final = replace(result, message=f"{result.message}; {problem}")
        final = replace(final, ended_at=time.time())
        self.record.write_result(final)
        return final

    # -- children ------------------------------------------------------------------------------
    def _fork(self, events_read: int, events_write: int, body) -> int:
        """Fork a child that runs ``body(report)`` and exits with its status (125 on a
        BerthError, which it reports on the pipe). Returns the child's pid."""
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._child_pid = None
            os.close(events_read)
            self._child(events_write, body, parent)
        os.close(events_write)
        self._child_pid = pid
        return pid

    def _run_script(self, report) -> int:
        return stage_and_run(self.settings, self.spec, self.record, report, limit_resources=self.limit_resources)

    def _child(self, events_write: int, body, parent: int) -> None:
        status = 125
        try:
            # A stop before the runtime starts must still unwind run_container's clean-up
            # (FUSE mounts), and a stopped transfer must remove its partial file: raise, so
            # that finally blocks run. While the runtime runs, run_container forwards the
            # signal and applies stop_timeout.
            proc.raise_on_stop(replace_installed=True)
            # A runner killed with SIGKILL stops its job the same way (else the container ran
            # on, unsupervised, while the job showed as failed: issue 8, scenario 3).
            proc.die_with_parent(parent)

            def report(event: str, **data) -> None:
                os.write(events_write, (json.dumps({"event": event, **data}) + "\n").encode())

            status = body(report)
        except proc.StopRequested as stopped:
            status = proc.signal_status(stopped.signum)
        except BerthError as error:
            try:
                os.write(events_write, (json.dumps({"event": "error", "message": error.message,
                                                    "hint": error.hint,
                                                    "kind": type(error).__name__}) + "\n").encode())
            except OSError:
                pass
            status = 125
        except BaseException as error:  # never let the child return into the parent's code
            try:
                os.write(events_write, (json.dumps({"event": "error", "message": repr(error),
                                                    "kind": type(error).__name__}) + "\n").encode())
            except OSError:
                pass
            status = 125
        finally:
            os._exit(status & 0xFF)

    def _supervise(self, pid: int, events_read: int) -> JobResult:
        spec = self.spec
        start = time.monotonic()
        boot_deadline = start + float(spec.boot_timeout_s)
        limit = spec.resources.time_limit_s
        time_deadline = self._start_monotonic + limit if (limit and self.enforce_time_limit) else None
        phase = model.PHASE_STAGING
        running = False
        error: dict | None = None
        buffer = b""
        stopping: tuple[str, float] | None = None  # (final state, kill deadline)
        while True:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                break
            readable, _, _ = select.select([events_read], [], [], POLL_S)
            if not running and self.record.started_file.exists():
                running = True
                self._write(model.RUNNING)
            if events_read in readable:
                chunk = os.read(events_read, 65536)
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    event = parse_json(line, what="an event of the container supervisor", error=JobError)
                    if event["event"] == "staged":
                        phase = model.PHASE_BOOT
                    elif event["event"] == "error" and not (error or {}).get("boot_timeout"):
                        error = event
            now = time.monotonic()
            if stopping is None:
                final = None
                if self._signalled is not None:
                    final = self._state_after_signal(now - self._start_monotonic)
                elif not running and now > boot_deadline:
                    error = {"message": f"boot_timeout of {spec.boot_timeout_s:g} s expired while "
                             + ("staging the image" if phase == model.PHASE_STAGING else "starting the container"),
                             "phase": phase, "boot_timeout": True}
                    signal_tree(pid, signal.SIGTERM)
                    stopping = (model.FAILED, now + TEARDOWN_GRACE_S)
                    continue
                elif time_deadline is not None and now > time_deadline:
                    final = model.TIMEOUT
                if final is not None:
                    signal_tree(pid, signal.SIGTERM)
                    stopping = (final, now + float(spec.stop_timeout_s) + TEARDOWN_GRACE_S)
            elif now > stopping[1]:
                signal_tree(pid, signal.SIGKILL)
                stopping = (stopping[0], float("inf"))
        status = proc.wait_status(raw)
        running = running or self.record.started_file.exists()
        times = {"ended_at": time.time()}
        boot_timeout = error is not None and error.get("boot_timeout")
        if stopping is not None and not boot_timeout:
            # Cancelled or timed out, in whatever phase: that, not the interrupted phase, is the result.
            code, sig = proc.split_status(status)
            word = {"timeout": "the time limit was reached", "cancelled": "the job was cancelled"}[stopping[0]]
            return self._write(stopping[0], exit_code=code, signal=sig, message=word, **times)
        if error is not None and (boot_timeout or not running):
            return self._write(model.FAILED, phase=error.get("phase", phase), message=_message(error), **times)
        if not running:
            return self._write(model.FAILED, phase=phase, exit_code=None,
                               message=f"the container did not start ({proc.describe_shell_status(status)})", **times)
        result = model.result_for_exit(status, **times)
        return self._write(result.state, phase=result.phase, exit_code=result.exit_code,
                           signal=result.signal, message=result.message, **times)

    def _state_after_signal(self, elapsed_s: float) -> str:
        if self.record.cancel_requested():
            return model.CANCELLED
        limit = self.spec.resources.time_limit_s
        if limit and elapsed_s >= limit - TIME_LIMIT_SLACK_S:
            return model.TIMEOUT
        return model.CANCELLED


def _message(error: dict | None) -> str:
    """An error event from a child as one line: message, then the hint in parentheses."""
    if not error:
        return "unknown error"
    message = error.get("message") or "unknown error"
    if error.get("hint"):
        message += f" ({error['hint']})"
    return message
