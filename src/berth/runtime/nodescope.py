"""``berth run --scope node``: every task of a Slurm step on one node runs in one container.

Host-launched MPI (``srun --mpi=pmix ... berth run --scope node IMAGE PROGRAM``) starts one
``berth run`` per task; each task carries its own PMIx identity (``PMIX_RANK``, ``SLURM_PROCID``,
``SLURM_LOCALID``...) in its environment, given by its own slurmstepd task. So the container is
shared but the processes are not: the first task of the node to arrive starts the node's
container (whose main process only waits), and every task, the first included, enters it like
``berth exec`` does (the runtime's ``exec``: same namespaces, one image mount, one init) with
its own environment. The ranks of a node then share ``/dev/shm``, ``/tmp``, IPC and the PID
namespace, so OpenMPI keeps its shared-memory transport (docs/mpi.md says why this design and
not one launcher task per node, which would give PMIx fewer processes than ranks).

Rendezvous, node-local, in the caller's private state directory (0700)::

    STATE_DIR/node-scope/JOB.STEP.NODE/
      lock          exclusive while a task looks for the container or starts it
      tasks         every task holds a shared lock on it while its command runs
      holder.log    stderr of the process that keeps the container (for error messages)

The task that finds no live container starts it (a child process running ``run_container``
with ``sleep infinity`` as the command, in its own session). After its command ends, a task
tries to turn its shared lock on ``tasks`` into an exclusive one: only the last task of the
node succeeds, and it stops the container (SIGTERM to the keeper, which tears down as any
``berth run`` does) and waits for the teardown before it exits, so that Slurm's end of step
finds nothing left. A task arriving while the last one tears down waits for the exclusive lock
to go and starts a new container. All locks are flock(2) (berth.locks): a killed task releases
its share, and the keeper's own container lock makes a killed keeper's leftovers stale for
:func:`berth.runtime.state.cleanup_stale`.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from berth import locks, proc
from berth.errors import LockError, NotFound, RuntimeFailure, UsageError
from berth.record import replace
from berth.runtime import ocirt, state
from berth.runtime.env import glob_matcher
from berth.untrusted import parse_json

#: The node container's main process: it only keeps the namespaces alive (the image needs
#: ``sleep``, as every image with a shell has: coreutils or busybox).
KEEPER_COMMAND = ["sleep", "infinity"]
START_TIMEOUT_S = 300.0
_POLL_S = 0.05


def node_key(environ: Mapping[str, str]) -> str:
    """``JOB.STEP.NODE`` of the Slurm step this task belongs to. Raises UsageError outside one."""
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    step = environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID")
    node = environ.get("SLURMD_NODENAME") or os.uname().nodename
    if not job or not step:
        raise UsageError("--scope node: not in a Slurm job step (SLURM_JOB_ID or SLURM_STEP_ID is unset)",
                         hint="run it as a task of srun (srun ... berth run --scope node IMAGE ...), or use "
                              "--scope task")
    key = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{job}.{step}.{node}")
    return key[:56]


def container_name(key: str) -> str:
    return f"node.{key}"


def task_env(environ: Mapping[str, str], passthrough: tuple[str, ...] | list[str]) -> list[str]:
    """This task's own values of the passed-through variables (PMIx rank, Slurm task ids...),
    set again on the command it runs in the shared container; ``PMI_FD`` as the container sees
    the task's PMI socket (berth.runtime.pmix), or not at all when none is passed in."""
    from berth.runtime.pmix import CONTAINER_PMI_FD, pmi_fd

    passed = pmi_fd(environ) is not None
    passes = glob_matcher(passthrough)
    return [f"{key}={CONTAINER_PMI_FD if key == 'PMI_FD' else value}" for key, value in sorted(environ.items())
            if passes(key) and (key != "PMI_FD" or passed)]


def run_in_node_container(settings, image, command: list[str] | None, options, *, log,
                          environ: Mapping[str, str] | None = None) -> int:
    """Run ``command`` as this task in the node's shared container (started if needed); return
    its shell-style status. Raises UsageError outside a Slurm step, RuntimeFailure when the
    node's container does not start, LockError when the rendezvous lock is not had in time."""
    from berth.runtime.manage import exec_in_container

    environ = os.environ if environ is None else environ
    if not command:
        raise UsageError("--scope node needs a COMMAND (the node's container itself only waits)",
                         hint="berth run --scope node IMAGE PROGRAM [ARGS]")
    key = node_key(environ)
    name = container_name(key)
    state_dir = state.resolve_state_dir(settings)
    rendezvous = state_dir / "node-scope" / key
    (state_dir / "node-scope").mkdir(mode=0o700, exist_ok=True)
    rendezvous.mkdir(mode=0o700, exist_ok=True)
    timeout_s = float(settings.lock_timeout_s)
    tasks_fd = locks.open_lock_file(rendezvous / "tasks")
    keeper_pid = None
    # A stop signal (scancel, the time limit) before the command runs must still reach _leave:
    # else a task that started the node's container dies and nobody stops it (issue 8 audit).
    early = proc.raise_on_stop()
    try:
        with locks.file_lock(rendezvous / "lock", timeout_s=timeout_s, must_hold=True,
                             purpose="the node container's rendezvous"):
            # Shared while this task runs; waits while the last task of a previous round tears down.
            locks.acquire(tasks_fd, rendezvous / "tasks", shared=True, timeout_s=timeout_s,
                          purpose="the node container's task count")
            if _live(state_dir, name) is None:
                keeper_pid = _start_keeper(settings, image, options, name, rendezvous, tasks_fd, log)
            _wait_running(state_dir, name, keeper_pid, rendezvous)
        log(f"scope node: task {environ.get('SLURM_PROCID', '?')} joins container {name}", debug=True)
        from berth.runtime.pmix import pmi_fd

        status = exec_in_container(settings, name, list(command),
                                   env=tuple(task_env(environ, settings.policy.passthrough_env)) + options.env,
                                   workdir=options.workdir, pmi_fd=pmi_fd(environ))
    except proc.StopRequested as stop:
        log(f"stopped by signal {signal.Signals(stop.signum).name} before the command started")
        status = proc.signal_status(stop.signum)
    finally:
        held = proc.ignore_stop()  # the last task's stop of the container must finish
        try:
            _leave(state_dir, name, tasks_fd, keeper_pid, options.stop_timeout_s, log)
        finally:
            proc.restore_handlers(held)
            proc.restore_handlers(early)
    return status


def _live(state_dir: Path, name: str) -> dict | None:
    try:
        return state.find_container(state_dir, name)
    except NotFound:
        return None


def _start_keeper(settings, image, options, name: str, rendezvous: Path, tasks_fd: int, log) -> int:
    """Fork the process that runs the node's container (``run_container`` with KEEPER_COMMAND)."""
    from berth.runtime.container import run_container

    keeper_options = replace(options, name=name, tty=False, scope="node")
    log_path = rendezvous / "holder.log"
    pid = os.fork()
    if pid == 0:  # the keeper
        status = 125
        try:
            os.setsid()  # the task's Ctrl-C or signals do not reach it: the last task stops it
            null = os.open(os.devnull, os.O_RDWR)
            err = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(err, 2)
            os.close(tasks_fd)  # the share is the task's, not the keeper's
            os.closerange(3, 1024)

            def keeper_log(message: str, *, debug: bool = False) -> None:
                if not debug:
                    os.write(2, f"berth: {message}\n".encode())

            status = run_container(settings, image, list(KEEPER_COMMAND), keeper_options, log=keeper_log)
        except BaseException as error:  # noqa: BLE001 - the keeper must never return into the task
            try:
                os.write(2, f"berth: {getattr(error, 'message', None) or error}\n".encode())
            except OSError:
                pass
        finally:
            os._exit(status)
    log(f"scope node: started the node's container {name} (keeper pid {pid})", debug=True)
    return pid


def _keeper_gone(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _status(output: bytes) -> str | None:
    try:
        data = parse_json(output, what="runc state")
    except ValueError:
        return None
    return data.get("status") if isinstance(data, dict) else None


def _wait_running(state_dir: Path, name: str, keeper_pid: int | None, rendezvous: Path) -> None:
    """Until the node's container runs its main process (runtime state ``running``)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        info = _live(state_dir, name)
        if info is not None:
            root = Path(info["state_path"]) / "runc"
            runtime = ocirt.recorded_program(info["runtime"])
            if runtime is not None and (root / info["id"]).exists():
                result = proc.run([runtime, "--root", str(root), "state", info["id"]], check=False, timeout=10)
                if result.returncode == 0 and _status(result.stdout) == "running":
                    return
        if _keeper_gone(keeper_pid) or time.monotonic() > deadline:
            try:
                why = (rendezvous / "holder.log").read_text(errors="replace").strip().splitlines()[-1:]
            except OSError:
                why = []
            raise RuntimeFailure(f"--scope node: the node's container {name} did not start"
                                 + (f": {why[0]}" if why else ""),
                                 hint="run the same command with --scope task to see berth's own error, "
                                      "and 'berth doctor' to check this node")
        time.sleep(_POLL_S)


def _leave(state_dir: Path, name: str, tasks_fd: int, keeper_pid: int | None, stop_timeout_s: float, log) -> None:
    """Drop this task's share; the last task of the node stops the container and waits for it."""
    try:
        try:
            last = locks.try_acquire(tasks_fd)  # exclusive only when no other task holds a share
        except LockError:
            last = False  # no lock (none was shared: error path)
        if not last:
            return  # other tasks still run in the container
        info = _live(state_dir, name)
        pid = keeper_pid or (state.berth_pid(info) if info is not None else None)
        if not pid:
            if info is not None and info["pid"] is not None:
                log(f"warning: the node's container {name} was not stopped: its info.json names pid "
                    f"{info['pid']}, which does not hold its lock")
            return
        log(f"scope node: last task of the node, stopping container {name}", debug=True)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + stop_timeout_s + 60
        while time.monotonic() < deadline:
            if keeper_pid is not None:
                if _keeper_gone(keeper_pid):
                    return
            elif _live(state_dir, name) is None:
                return
            time.sleep(_POLL_S)
        log(f"warning: the node's container {name} did not stop within {stop_timeout_s + 60:g} s")
    finally:
        os.close(tasks_fd)
