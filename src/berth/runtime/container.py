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
from berth.runtime import fuse, limits, materialise, ocirt, state, supervise

# berth.runtime.plan, policy and options are imported by the runs that plan (run_container),
# not at the top: a run whose plan is cached (run_cached) executes without them.

Log = Callable[..., None]


class LocalImage(NamedTuple):
    """A SquashFS file run directly (``berth run ./image.sqfs``): no store; ``config`` is an
    OCI image config (``{"config": {"Env": ..., "Cmd": ...}}``) or None."""

    squashfs: Path
    config: dict | None = None
    reference: str | None = None
    digest: object | None = None


#: IMAGE starting so is a path, never a reference (names_local_image).
PATH_PREFIXES = ("/", "./", "../")


def names_local_image(argument: str) -> bool:
    """Whether ``berth run IMAGE`` may name a SquashFS file rather than an image reference
    (docs/images.md): IMAGE is clearly a path (starts with ``/``, ``./`` or ``../``: it is
    one, existing or not), or ends with ``.sqfs`` (a file when one exists there). Anything
    else is a reference, even where a file of that name exists in the working directory:
    ``example.org/team/app:1`` is the store's image, never ``./example.org/team/app:1``."""
    return argument.startswith(PATH_PREFIXES) or argument.endswith(".sqfs")


def _quiet(message: str, *, debug: bool = False) -> None:
    del message, debug


class Execution(NamedTuple):
    """What the lifecycle (:func:`_run`) needs of a run besides its plan: from the options and
    the judged request of a run that plans, or from a cached plan's entry (run_cached)."""

    name: str | None
    image_name: str
    argv: tuple[str, ...]
    uid: int
    gid: int
    network: str
    workdir: str
    remap_root: bool
    stop_timeout_s: float
    cpus: float | None = None
    memory_bytes: int | None = None
    pmi_fd: int | None = None


class ExecSettings(NamedTuple):
    """The settings the lifecycle reads (the image mount's and the runtime's), as a cached
    plan's entry records them."""

    state_dir: str
    image_mount: str
    stage_to_local: bool
    image_fuse: str
    lock_timeout_s: int
    image_mount_linger: int
    runtime: str


def run_container(settings, image, command: list[str] | None, options: RunOptions, *,
                  log: Log | None = None, gpu_wait_s: float = 0.0, keep_plan=None) -> int:
    """Run ``command`` (or the image's entrypoint/cmd) in a new container; return its status.

    ``image`` is a berth.image.api.StoredImage (or LocalImage): ``squashfs`` and ``config``
    are used. Returns the shell-style status (128+N for signal N). Raises RuntimeFailure for
    set-up failures (exit 125), PolicyError/UsageError for refused requests. ``log(message,
    debug=False)`` receives notes for the user (debug ones only matter with --debug).
    ``gpu_wait_s``: how long to wait for GPUs that the caller's other containers hold (local
    jobs queue for them; ``berth run`` refuses at once).
    """
    from berth.runtime import policy
    from berth.runtime.plan import plan_container, request_for

    log = log or _quiet
    if options.tty and not any(os.isatty(fd) for fd in (0, 1, 2)):
        raise UsageError("-t/--tty: none of stdin, stdout or stderr is a terminal",
                         hint="drop -t in scripts and batch jobs (stdin and stdout pass through without it)")
    started = time.monotonic()
    with _paused(keep_plan):
        state_dir = state.resolve_state_dir(settings)
        init = _prepare(state_dir, log)
    policy.check_runtime_pin(settings, options.runtime)
    wanted = options.runtime or settings.runtime
    # Which runtime runs it depends on the config (berth-launcher or runc, issue 10): chosen
    # once the plan is made; an unknown name fails here, before anything is mounted.
    ocirt.candidates(wanted, None)

    # GPUs taken through the ledger stay taken until this run ends (the locks die with berth).
    with ExitStack() as held:
        extra_edits = _gpu_edits(settings, options, held, log, gpu_wait_s)
        request = request_for(settings, image, command, options, init_path=init, log=log, extra_edits=extra_edits,
                              state_dir=state_dir)
        if keep_plan is not None:
            keep_plan.planned(settings, image, options, request, state_dir, init)

        def make_plan(image_root: str, container, limit_plan, kernel_overlay: bool):
            if keep_plan is None:
                return plan_container(request, image_root, container, limit_plan=limit_plan, log=log,
                                      kernel_overlay=kernel_overlay)
            with keep_plan.recording():
                return plan_container(request, image_root, container, limit_plan=limit_plan, log=log,
                                      kernel_overlay=kernel_overlay)

        execution = Execution(options.name, request.image_name, request.argv, request.caller.uid,
                              request.caller.gid, request.network, request.workdir, options.remap_root,
                              options.stop_timeout_s, options.cpus, options.memory_bytes, request.pmi_fd)
        with _paused(keep_plan):
            return _run(settings, image, execution, make_plan, (wanted, init), state_dir, log, started,
                        keep_plan=keep_plan)


def run_cached(entry: dict, log: Log | None = None) -> int:
    """Run the plan of a cached entry (berth.runtime.plancache: looked up, its dependencies
    re-checked by the caller) through the same lifecycle as :func:`run_container`. Raises as
    run_container does."""
    from berth.runtime.plancache import CachedPlan

    log = log or _quiet
    started = time.monotonic()
    settings = ExecSettings(**entry["settings"])
    run, image_entry = entry["run"], entry["image"]
    state_dir = state.ensure_state_dir(Path(settings.state_dir))
    init = _prepare(state_dir, log, init=run["init"])
    image = LocalImage(Path(image_entry["squashfs"]), None, image_entry["reference"], image_entry["digest"])
    execution = Execution(run["name"], run["image_name"], tuple(run["argv"]), run["uid"], run["gid"],
                          run["network"], run["workdir"], run["remap_root"], float(run["stop_timeout_s"]))

    def make_plan(image_root: str, container, limit_plan, kernel_overlay: bool):
        del limit_plan  # none: runs with --cpus or --memory are not cached
        if kernel_overlay:
            raise RuntimeFailure("the cached plan does not fit this image mount",
                                 hint="remove the cached plans with 'berth prune' and run again")
        return CachedPlan(entry["plan"], str(container.path), image_root)

    return _run(settings, image, execution, make_plan, (settings.runtime, init), state_dir, log, started)


def _prepare(state_dir: Path, log: Log, *, init: str | None = None) -> str:
    """What every run does before its container: clean up after berths of this user that died,
    and check berth-init (returned)."""
    for cleaned in state.cleanup_stale(state_dir, warn=lambda text: log(f"warning: {text}")):
        log(f"cleaned up container {cleaned['id']} left by a berth that died", debug=True)
    init = init or ocirt.init_path()
    ocirt.check_init(init)
    return init


class _paused:
    """Stops a plan recorder (berth.runtime.plancache.Recorder, when one records) while the
    lifecycle, not the planning, reads files."""

    def __init__(self, keep_plan) -> None:
        self._recorder = getattr(keep_plan, "recorder", None)
        self._was = False

    def __enter__(self) -> None:
        if self._recorder is not None:
            self._was, self._recorder.active = self._recorder.active, False

    def __exit__(self, *exc) -> None:
        if self._recorder is not None:
            self._recorder.active = self._was


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


def _run(settings, image, run: Execution, make_plan, wanted: tuple[str, str], state_dir: Path, log: Log,
         started: float, *, keep_plan=None) -> int:
    """The lifecycle of one container, for runs that plan and runs whose plan is cached alike:
    ``make_plan(image_root, container, limit_plan, kernel_overlay)`` gives the plan once the
    image is mounted (a ContainerPlan, or a plancache.CachedPlan); ``wanted``: the runtime
    setting and berth-init's path, for ocirt.select_runtime; ``keep_plan``: told the plan and
    the runtime, to keep them (berth.cli.fastrun)."""
    clock = time.monotonic
    phases: dict[str, float] = {}

    phases["prepare"] = clock() - started
    early = proc.raise_on_stop()
    try:
        container = state.create(state_dir, run.name)
    except BaseException:
        proc.restore_handlers(early)
        raise
    fuse_mounts: list = []
    runtime = ""  # none started yet: teardown has no runtime state to delete
    try:
        materialise.make_directories(container)
        limit_plan = limits.plan_limits(run.cpus, run.memory_bytes, container.id,
                                        busy_cpus=state.pinned_cpus(state_dir) if run.cpus else None)
        for note in limit_plan.notes:
            log(note)
        # What `berth ps`, `berth exec` and the clean-up of a dead berth need to know.
        info = {
            "id": container.id, "name": run.name or container.id, "image": run.image_name,
            "command": list(run.argv), "started": time.time(), "pid": os.getpid(),
            "runtime": None, "uid": run.uid, "gid": run.gid,
            "remap_root": run.remap_root, "daemon_pids": [],
            "cpu_set": sorted(limit_plan.cpu_set or ()),
        }
        container.write_info(info)
        lower = materialise.mount_image(settings, container, image, log)
        fuse_mounts.append(lower)
        phases["mount"] = clock() - started - phases["prepare"]
        if isinstance(lower, fuse.FuseMount):
            info["daemon_pids"].append(lower.process.pid)
            container.write_info(info)  # this container's daemon: recorded before anything else can fail
        else:  # shared: not this container's daemon to kill, only its reference to drop (its holder
            # lock, which the stale clean-up judges), so it is recorded with the runtime below:
            # one atomic write less per run (issue 10)
            info["image_mount"] = str(lower.directory)

        plan = make_plan(materialise.image_root(container, lower), container, limit_plan,
                         materialise.kernel_overlay(lower))
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
        log(f"bundle {container.bundle}, network {run.network}, workdir {run.workdir}", debug=True)
        if keep_plan is not None:
            keep_plan.made(plan, config, container, runtime, log)

        if limit_plan.cpu_set is not None:
            # Inherited by the runtime and so by the container (the FUSE daemons are already up).
            os.sched_setaffinity(0, limit_plan.cpu_set)
        phases["bundle"] = clock() - started - sum(phases.values())
        orphans = supervise.adopt_orphans(config)
        child = supervise.start_runtime(runtime, container, pmi_fd=run.pmi_fd)
        try:
            status = supervise.wait(child, runtime, container, run.stop_timeout_s, log)
        finally:
            supervise.end_orphans(orphans, log)
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
            for warning in supervise.teardown(container, runtime, fuse_mounts):
                log(f"warning: {warning}")
        finally:
            proc.restore_handlers(held)
            proc.restore_handlers(early)
        phases["teardown"] = clock() - before
        log("timing: " + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in phases.items()),
            debug=True)
