"""`berth run`: one unprivileged container from a stored image, to completion (issue 3).

The run in three stages (issue 9), each undone in reverse on every exit path:

1. **plan** (berth.runtime.plan, pure): the request judged against site policy, the command,
   environment, identity and mounts decided; once the image is mounted, where each mount lands
   through its links, which mount points it lacks, the identity files and config.json;
2. **materialise** (berth.runtime.materialise): a locked container state directory
   (berth.runtime.state), the image's SquashFS mounted read-only with squashfuse (fuse-overlayfs
   on top when the plan says so), the identity files and the bundle written;
3. **supervise** (berth.runtime.supervise): the OCI runtime in the foreground, signals
   forwarded, the container killed ``--stop-timeout`` seconds after a SIGTERM/SIGINT; then
   the runtime state deleted, the mounts unmounted, the state directory removed.

Before them: clean up after berths of this user that died (cheap: only the caller's state
directory). Between plan and supervision, the runtime is picked for the config.json the plan
gives (berth.runtime.ocirt.select_runtime): berth-launcher when it can run it, else the OCI
runtime that works here (cached probe).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from berth import proc
from berth.errors import RuntimeFailure, UsageError
from berth.namedtuple import NamedTuple
from berth.runtime import fuse, limits, materialise, ocirt, policy, state, supervise
from berth.runtime.options import RunOptions
from berth.runtime.plan import plan_container, request_for

Log = Callable[..., None]


class LocalImage(NamedTuple):
    """A SquashFS file run directly (``berth run ./image.sqfs``): no store; ``config`` is an
    OCI image config (``{"config": {"Env": ..., "Cmd": ...}}``) or None."""

    squashfs: Path
    config: dict | None = None
    reference: str | None = None
    digest: object | None = None


def _quiet(message: str, *, debug: bool = False) -> None:
    del message, debug


def run_container(settings, image, command: list[str] | None, options: RunOptions, *,
                  log: Log | None = None, gpu_wait_s: float = 0.0) -> int:
    """Run ``command`` (or the image's entrypoint/cmd) in a new container; return its status.

    ``image`` is a berth.image.api.StoredImage (or LocalImage): ``squashfs`` and ``config``
    are used. Returns the shell-style status (128+N for signal N). Raises RuntimeFailure for
    set-up failures (exit 125), PolicyError/UsageError for refused requests. ``log(message,
    debug=False)`` receives notes for the user (debug ones only matter with --debug).
    ``gpu_wait_s``: how long to wait for GPUs that the caller's other containers hold (local
    jobs queue for them; ``berth run`` refuses at once).
    """
    log = log or _quiet
    if options.tty and not any(os.isatty(fd) for fd in (0, 1, 2)):
        raise UsageError("-t/--tty: none of stdin, stdout or stderr is a terminal",
                         hint="drop -t in scripts and batch jobs (stdin and stdout pass through without it)")
    started = time.monotonic()
    state_dir = state.resolve_state_dir(settings)
    for cleaned in state.cleanup_stale(state_dir):
        log(f"cleaned up container {cleaned['id']} left by a berth that died", debug=True)
    init = ocirt.init_path()
    ocirt.check_init(init)
    policy.check_runtime_pin(settings, options.runtime)
    wanted = options.runtime or settings.runtime
    # Which runtime runs it depends on the config (berth-launcher or runc, issue 10): chosen
    # once the plan is made; an unknown name fails here, before anything is mounted.
    ocirt.candidates(wanted, None)

    # GPUs taken through the ledger stay taken until this run ends (the locks die with berth).
    with ExitStack() as held:
        extra_edits = _gpu_edits(settings, options, held, log, gpu_wait_s)
        request = request_for(settings, image, command, options, init_path=init, log=log, extra_edits=extra_edits)
        return _run(settings, image, options, request, (wanted, init), state_dir, log, started)


def _gpu_edits(settings, options: RunOptions, held: ExitStack, log: Log, wait_s: float) -> tuple:
    """The GPU generator's edits for ``--gpus`` (none without it), the GPUs held by ``held``."""
    if options.gpus is None:
        return ()
    from berth.runtime.devices.gpus import gpu_edits

    edits, notes = gpu_edits(settings, options.gpus, os.environ, held, wait_s=wait_s, log=log)
    for note in notes:
        log(f"warning: {note}")
    log("GPUs: " + ", ".join(node.path for node in edits.device_nodes), debug=True)
    return (edits,)


def _run(settings, image, options: RunOptions, request, wanted: tuple[str, str], state_dir: Path, log: Log,
         started: float) -> int:
    """``wanted``: the runtime setting and berth-init's path, for ocirt.select_runtime."""
    clock = time.monotonic
    phases: dict[str, float] = {}

    phases["prepare"] = clock() - started
    early = proc.raise_on_stop()
    try:
        container = state.create(state_dir, options.name)
    except BaseException:
        proc.restore_handlers(early)
        raise
    fuse_mounts: list = []
    runtime = ""  # none started yet: teardown has no runtime state to delete
    try:
        materialise.make_directories(container)
        limit_plan = limits.plan_limits(options.cpus, options.memory_bytes, container.id,
                                        busy_cpus=state.pinned_cpus(state_dir) if options.cpus else None)
        for note in limit_plan.notes:
            log(note)
        caller = request.caller
        # What `berth ps`, `berth exec` and the clean-up of a dead berth need to know.
        info = {
            "id": container.id, "name": options.name or container.id, "image": request.image_name,
            "command": list(request.argv), "started": time.time(), "pid": os.getpid(),
            "runtime": None, "uid": caller.uid, "gid": caller.gid,
            "remap_root": options.remap_root, "daemon_pids": [],
            "cpu_set": sorted(limit_plan.cpu_set or ()),
        }
        container.write_info(info)
        lower = materialise.mount_image(settings, container, image, log)
        fuse_mounts.append(lower)
        phases["mount"] = clock() - started - phases["prepare"]
        if isinstance(lower, fuse.FuseMount):
            info["daemon_pids"].append(lower.process.pid)
        else:  # shared: not this container's daemon to kill, only its reference to drop
            info["image_mount"] = str(lower.directory)
        container.write_info(info)

        plan = plan_container(request, materialise.image_root(container, lower), container,
                              limit_plan=limit_plan, log=log, kernel_overlay=materialise.kernel_overlay(lower))
        if plan.overlay:
            overlay = materialise.mount_overlay(plan, container)
            if overlay is not None:  # fuse-overlayfs (a kernel overlay is the runtime's to mount)
                fuse_mounts.append(overlay)
                info["daemon_pids"].append(overlay.process.pid)
                container.write_info(info)
            phases["overlay"] = clock() - started - sum(phases.values())
        config = plan.config()
        runtime = ocirt.select_runtime(state_dir, wanted[0], wanted[1], config, log)
        log(f"runtime {runtime}", debug=True)
        info["runtime"] = os.path.basename(runtime)  # never a path: see ocirt.recorded_program
        container.write_info(info)
        materialise.write_bundle(plan, container, config)
        log(f"bundle {container.bundle}, network {request.network}, workdir {request.workdir}", debug=True)

        if limit_plan.cpu_set is not None:
            # Inherited by the runtime and so by the container (the FUSE daemons are already up).
            os.sched_setaffinity(0, limit_plan.cpu_set)
        phases["bundle"] = clock() - started - sum(phases.values())
        child = supervise.start_runtime(runtime, container, pmi_fd=request.pmi_fd)
        status = supervise.wait(child, runtime, container, options.stop_timeout_s, log)
        phases["runtime"] = clock() - started - sum(phases.values())
        if status != 0 and status < 128:
            error = supervise.runtime_error(supervise.runtime_log(container))
            if error:
                raise RuntimeFailure(f"{os.path.basename(runtime)} could not start the container: {error}",
                                     hint="run with --debug, and 'berth doctor' to check this node")
        return status
    except proc.StopRequested as stop:
        log(f"stopped by signal {signal.Signals(stop.signum).name} before the command started")
        return proc.signal_status(stop.signum)
    finally:
        before = clock()
        # Teardown must finish: a second Ctrl-C (or the job runner's SIGTERM) must not leave
        # mounts behind.
        held = proc.ignore_stop()
        try:
            supervise.teardown(container, runtime, fuse_mounts)
        finally:
            proc.restore_handlers(held)
            proc.restore_handlers(early)
        phases["teardown"] = clock() - before
        log("timing: " + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in phases.items()),
            debug=True)
