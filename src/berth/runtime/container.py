"""`berth run`: one unprivileged container from a stored image, to completion (issue 3).

Steps, each undone in reverse on every exit path:

1. clean up after berths of this user that died (cheap: only the caller's state directory);
2. pick the OCI runtime that works here (cached probe, berth.runtime.ocirt);
3. judge the request against site policy (berth.runtime.policy);
4. lock a fresh container state directory (berth.runtime.state);
5. mount the image's SquashFS read-only with squashfuse; when a mount point the container needs
   is missing from the image, or with ``--writable``, put fuse-overlayfs on top;
6. write the caller's passwd/group files and the bundle's config.json (berth.runtime.spec);
7. run the runtime in the foreground, forwarding signals; after ``--stop-timeout`` seconds past
   a SIGTERM/SIGINT, kill the container;
8. delete the runtime state, unmount, remove the state directory.
"""

from __future__ import annotations

import json
import os
import posixpath
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from berth import proc
from berth.errors import PolicyError, RuntimeFailure, UsageError
from berth.runtime import fuse, limits, ocirt, policy, rootfs, spec, state
from berth.runtime.env import check_image_env, compose_env, read_env_file
from berth.runtime.identity import Caller, group_text, identity_env, passwd_text, read_image_file
from berth.runtime.options import RunOptions
from berth.runtime.pmix import pmix_mounts, rank_env_ops

Log = Callable[..., None]

#: Signals that start the stop timer (the container is asked to stop).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
FORWARDED = proc.FORWARDED_SIGNALS


class LocalImage(NamedTuple):
    """A SquashFS file run directly (``berth run ./image.sqfs``): no store; ``config`` is an
    OCI image config (``{"config": {"Env": ..., "Cmd": ...}}``) or None."""

    squashfs: Path
    config: dict | None = None
    reference: str | None = None
    digest: object | None = None


def _quiet(message: str, *, debug: bool = False) -> None:
    del message, debug


def image_name(image) -> str:
    return str(getattr(image, "reference", None) or getattr(image, "digest", None) or image.squashfs)


def compose_command(image_config: dict, command: list[str] | None, entrypoint: str | None, name: str) -> list[str]:
    """Entrypoint + Cmd as docker composes them; ``--entrypoint`` resets the image's Cmd."""
    def strings(value, key: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return ["/bin/sh", "-c", value]
        if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
            raise RuntimeFailure(f"image {name}: config {key} is not a list of strings",
                                 hint="the image is broken; ask its author")
        return list(value)

    if entrypoint is not None:
        argv = [entrypoint, *(command or [])]
    else:
        argv = strings(image_config.get("Entrypoint"), "Entrypoint")
        argv += list(command) if command else strings(image_config.get("Cmd"), "Cmd")
    if not argv:
        raise UsageError(f"image {name} has no entrypoint or command, and none was given",
                         hint=f"add a command: berth run {name} /bin/sh -c '...'")
    return argv


def _workdir(options: RunOptions, image_config: dict) -> str:
    if options.workdir:
        return rootfs.normalize_container_path(options.workdir)
    value = image_config.get("WorkingDir") or "/"
    # OCI image-spec says absolute; a hostile "../../" is normalized to "/" (contained).
    return rootfs.normalize_container_path(value if isinstance(value, str) else "/")


def _group_policies(settings) -> list:
    """Site group policies that apply to the caller (member by primary or supplementary gid)."""
    if not settings.policy.groups:
        return []
    import grp

    mine = set(os.getgroups()) | {os.getgid()}
    applied = []
    for group_policy in settings.policy.groups:
        try:
            gid = grp.getgrnam(group_policy.group).gr_gid
        except KeyError:
            continue
        if gid in mine:
            applied.append(group_policy)
    return applied


class _Plan:
    """What run_container decided about mounts, before writing the bundle."""

    __slots__ = ("binds", "tmpfs", "needed", "creatable", "home_env")

    def __init__(self, creatable: list[str]) -> None:
        self.binds: list = []
        self.tmpfs: list[str] = []
        self.needed: list = []
        self.creatable = creatable
        self.home_env = "/"


def _plan_home(caller: Caller, options: RunOptions, plan: _Plan, log: Log) -> None:
    home = posixpath.normpath(caller.home) if caller.home else "/"
    plan.home_env = home
    if home == "/" or not home.startswith("/"):
        log(f"home directory '{caller.home}' is not mounted (not an absolute directory)", debug=True)
        return
    parent = posixpath.dirname(home)
    if parent != "/" and posixpath.dirname(parent) == "/":
        # /home/NAME: hide the image's /home (and other users' entries) behind a private tmpfs.
        plan.tmpfs.append(parent)
        plan.needed.append(rootfs.MountPoint(parent, True))
        plan.creatable.append(parent)
    if options.mount_home and os.path.isdir(home):
        plan.binds.append(spec.BindMount(os.path.realpath(home), home, read_only=False))
        log(f"home {home} mounted read-write", debug=True)
    else:
        plan.tmpfs.append(home)
        log(f"home {home} is an empty temporary directory (--no-mount-home or missing on the host)", debug=True)
    plan.needed.append(rootfs.MountPoint(home, True))


def _site_mounts(settings, groups: list, log: Log) -> list[spec.BindMount]:
    mounts = []
    for mount in [*settings.policy.mounts, *(m for g in groups for m in g.mounts)]:
        if not os.path.exists(mount.source):
            if mount.optional:
                log(f"site mount {mount.source} skipped: missing on this node", debug=True)
                continue
            raise RuntimeFailure(f"site mount {mount.source} -> {mount.destination} is missing on this node",
                                 hint="ask your site administrator (policy mounts; mark it optional if it "
                                      "exists only on some nodes)")
        mounts.append(spec.BindMount(os.path.realpath(mount.source),
                                     rootfs.normalize_container_path(mount.destination),
                                     read_only=mount.read_only))
    return mounts


def _devices(settings, groups: list, options: RunOptions) -> list[spec.BindMount]:
    binds = []
    seen = set()
    requested = [(d, "site policy device") for d in settings.policy.devices]
    requested += [(d, f"group {g.group} device") for g in groups for d in g.devices]
    requested += [(d, f"--device {d}") for d in options.devices]
    for path, what in requested:
        real = policy.resolve_device(path, what=what)
        if path in seen:
            continue
        seen.add(path)
        binds.append(spec.BindMount(real, policy.device_destination(path, real, what=what), read_only=False,
                                    device=True))
    return binds


def _landing(root: str, destination: str, what: str, deny) -> str:
    """Where ``destination`` lands in the image (its links followed in-root), judged again:
    an image link such as /data -> /etc must not carry a mount onto a denied path."""
    resolved, _ = rootfs.resolve_in_root(root, destination)
    if resolved != destination:
        policy.check_destination(resolved, what=f"{what} (through the image's links: {resolved})", deny=deny)
    return resolved


def _identity_targets(root: str) -> tuple[dict[str, str], list[rootfs.MountPoint]]:
    """Where berth's passwd/group files go, and which image entries must be replaced first.

    /etc is followed in-root (an image may link it elsewhere), but not into /proc, /sys or
    /dev; the files themselves are never followed: an image's /etc/passwd that is a link (to
    /proc/self/environ, to berth-init...) or anything but a regular file is replaced by a plain
    file in the overlay, so the bind lands exactly where the container looks."""
    etc, _ = rootfs.resolve_in_root(root, "/etc")
    if etc in ("/proc", "/sys", "/dev") or etc.startswith(("/proc/", "/sys/", "/dev/")):
        raise RuntimeFailure(f"the image's /etc is a link to {etc}: berth will not put identity files there",
                             hint="the image is broken or hostile; ask its author")
    targets: dict[str, str] = {}
    replaced: list[rootfs.MountPoint] = []
    for name in ("passwd", "group"):
        target = posixpath.join(etc, name)
        targets[name] = target
        try:
            info = os.lstat(os.path.join(root, target.lstrip("/")))
        except FileNotFoundError:
            continue  # missing: an ordinary mount point to create
        except OSError as exc:
            raise RuntimeFailure(f"cannot inspect the image's {target}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            replaced.append(rootfs.MountPoint(target, False))
    return targets, replaced


class _Wake(Exception):
    """Raised by berth's signal handlers to interrupt the wait for the runtime."""


class _StopRequested(Exception):
    """SIGTERM/SIGINT/SIGHUP before the runtime started: unwind (unmount) and report 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    del frame
    raise _StopRequested(signum)


_EARLY_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _install_early_handlers() -> dict:
    """Until the runtime runs, a stop request must unwind the mounts, not kill berth outright.
    Handlers a caller installed (berth.jobs) are left alone."""
    previous = {}
    for signum in _EARLY_SIGNALS:
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, signal.default_int_handler):
            previous[signum] = signal.signal(signum, _raise_stop)
    return previous


def _wait_forwarding(child: subprocess.Popen, runtime: str, root: str, container_id: str,
                     stop_timeout_s: float, log: Log) -> int:
    """Wait for the runtime process, forwarding signals; kill after the stop timeout."""
    status = {"deadline": None, "waiting": False, "killed": False}

    def forward(signum, frame):
        del frame
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass
        if signum in STOP_SIGNALS and status["deadline"] is None:
            status["deadline"] = time.monotonic() + stop_timeout_s
            signal.setitimer(signal.ITIMER_REAL, max(stop_timeout_s, 0.001))
        if status["waiting"]:
            raise _Wake()

    def alarm(signum, frame):
        del signum, frame
        if status["waiting"]:
            raise _Wake()

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, alarm)
    try:
        while True:
            try:
                status["waiting"] = True
                _, raw = os.waitpid(child.pid, 0)
                status["waiting"] = False
                child.returncode = os.waitstatus_to_exitcode(raw)
                return proc.shell_status(child.returncode)
            except _Wake:
                status["waiting"] = False
            except ChildProcessError:
                status["waiting"] = False
                return proc.shell_status(child.wait())
            deadline = status["deadline"]
            if deadline is not None and time.monotonic() >= deadline and not status["killed"]:
                status["killed"] = True
                log(f"container did not stop within --stop-timeout {stop_timeout_s:g} s: killing it")
                proc.run([runtime, "--root", root, "kill", container_id, "KILL"], check=False, timeout=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _runtime_error(log_path: Path) -> str | None:
    """The runtime's own error (level=error lines of its --log), if it failed before the command."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    errors = [line for line in text.splitlines() if "level=error" in line]
    if not errors:
        return None
    line = errors[-1]
    marker = 'msg="'
    if marker in line:
        line = line.split(marker, 1)[1].rsplit('"', 1)[0].replace('\\"', '"')
    return line


def run_container(settings, image, command: list[str] | None, options: RunOptions, *,
                  log: Log | None = None) -> int:
    """Run ``command`` (or the image's entrypoint/cmd) in a new container; return its status.

    ``image`` is a berth.image.api.StoredImage (or LocalImage): ``squashfs`` and ``config``
    are used. Returns the shell-style status (128+N for signal N). Raises RuntimeFailure for
    set-up failures (exit 125), PolicyError/UsageError for refused requests. ``log(message,
    debug=False)`` receives notes for the user (debug ones only matter with --debug).
    """
    log = log or _quiet
    if options.tty and not any(os.isatty(fd) for fd in (0, 1, 2)):
        raise UsageError("-t/--tty: none of stdin, stdout or stderr is a terminal",
                         hint="drop -t in scripts and batch jobs (stdin and stdout pass through without it)")
    clock = time.monotonic
    phases: dict[str, float] = {}
    started = clock()
    state_dir = Path(settings.state_dir)
    state.ensure_state_dir(state_dir)
    for cleaned in state.cleanup_stale(state_dir):
        log(f"cleaned up container {cleaned['id']} left by a berth that died", debug=True)
    init = ocirt.init_path()
    ocirt.check_init(init)
    wanted = settings.runtime
    if options.runtime and options.runtime != settings.runtime:
        if "runtime" in getattr(settings, "pinned", ()):
            raise PolicyError(f"--runtime {options.runtime}: the site configuration pins runtime = "
                              f"{settings.runtime}", hint="ask your site administrator (berth.toml: pinned)")
        wanted = options.runtime
    runtime = ocirt.select_runtime(state_dir, wanted, init)
    log(f"runtime {runtime}", debug=True)

    name = image_name(image)
    whole_config = image.config or {}
    image_config = whole_config.get("config") or {} if isinstance(whole_config, dict) else None
    if not isinstance(image_config, dict):
        raise RuntimeFailure(f"image {name}: its config is not a JSON object",
                             hint="the image is broken; ask its author")
    argv = compose_command(image_config, command, options.entrypoint, name)
    image_env = check_image_env(image_config.get("Env") or [], name)
    if image_config.get("User") not in (None, "", "0", "root", "0:0"):
        log(f"image User '{image_config.get('User')}' ignored: containers run as you", debug=True)
    caller = Caller.current()
    groups = _group_policies(settings)
    user_mounts = policy.resolve_user_mounts(settings, options)
    forced = policy.forced_network(settings)
    network = forced or options.network or "host"
    namespaces = dict(settings.policy.forced_namespaces)
    host_namespaces = tuple(k for k in ("pid", "ipc", "uts") if namespaces.get(k) == "host")
    private_namespaces = tuple(k for k in ("cgroup",) if namespaces.get(k) == "private")
    if options.hostname and "uts" in host_namespaces:
        log("ignoring --hostname: site policy gives containers the host's UTS namespace")
    if forced and options.network and options.network != forced:
        policy.check_options(settings, options)  # raises the PolicyError with its hint
    devices = _devices(settings, groups, options)
    site_mounts = _site_mounts(settings, groups, log)
    site_mounts += pmix_mounts(os.environ, settings, caller.uid, log)
    env_entries: list[str] = []
    for env_file in options.env_files:
        env_entries += read_env_file(env_file)
    env_entries += list(options.env)
    workdir = _workdir(options, image_config)

    phases["prepare"] = clock() - started
    early = _install_early_handlers()
    try:
        container = state.create(state_dir, options.name)
    except BaseException:
        _restore(early)
        raise
    fuse_mounts: list[fuse.FuseMount] = []
    try:
        for directory in (container.lower, container.rootfs, container.tmp, container.etc, container.bundle):
            directory.mkdir(mode=0o700)
        container.tmp.chmod(0o1777)
        limit_plan = limits.plan_limits(options.cpus, options.memory_bytes, container.id,
                                        busy_cpus=state.pinned_cpus(state_dir) if options.cpus else None)
        for note in limit_plan.notes:
            log(note)
        # What `berth ps`, `berth exec` and the clean-up of a dead berth need to know.
        info = {
            "id": container.id, "name": options.name or container.id, "image": name,
            "command": argv, "started": time.time(), "pid": os.getpid(), "runtime": os.path.basename(runtime),
            "runtime_path": runtime, "uid": caller.uid, "gid": caller.gid, "remap_root": options.remap_root,
            "daemon_pids": [],
            "cpu_set": sorted(limit_plan.cpu_set or ()),
        }
        container.write_info(info)
        squashfs = Path(image.squashfs)
        if settings.stage_to_local:
            from berth.runtime.localcopy import local_copy

            squashfs = local_copy(state_dir, squashfs, getattr(image, "digest", None))
            log(f"mounting the node-local copy {squashfs} (site setting stage_to_local)", debug=True)
        lower = fuse.mount_squashfs(str(squashfs), str(container.lower), str(container.path / "squashfuse.log"))
        fuse_mounts.append(lower)
        phases["mount"] = clock() - started - phases["prepare"]
        info["daemon_pids"].append(lower.process.pid)
        container.write_info(info)

        lower_root = str(container.lower)
        # Judge mount destinations where they really land: through the image's own links.
        user_mounts = [m._replace(destination=_landing(lower_root, m.destination, f"--mount {m.destination}",
                                                       settings.policy.mount_deny_destinations))
                       for m in user_mounts]
        site_mounts = [m._replace(destination=_landing(lower_root, m.destination, f"site mount {m.destination}",
                                                       ("/proc", "/sys")))
                       for m in site_mounts]
        identity_paths, replaced = _identity_targets(lower_root)
        plan = _Plan(creatable=["/dev", "/tmp"])
        plan.needed += [rootfs.MountPoint(p, True) for p in ("/proc", "/dev", "/sys", "/tmp")]
        _plan_home(caller, options, plan, log)
        plan.needed += [rootfs.MountPoint(path, False) for path in identity_paths.values()]
        for bind in [*site_mounts, *user_mounts]:
            plan.needed.append(rootfs.MountPoint(bind.destination, os.path.isdir(bind.source)))
        plan.needed.append(rootfs.MountPoint(workdir, True))
        missing = rootfs.missing_mount_points(lower_root, plan.needed, plan.creatable) + replaced
        root_path = container.lower
        if missing or options.writable:
            container.upper.mkdir(mode=0o755)
            container.work.mkdir(mode=0o700)
            rootfs.create_mount_points(str(container.upper), missing)
            if missing:
                log("the image lacks mount point(s) " + ", ".join(p.path for p in missing)
                    + ": adding a fuse-overlayfs overlay to create them", debug=True)
            if options.writable:
                log("--writable: volatile fuse-overlayfs overlay, discarded at exit", debug=True)
            overlay = fuse.mount_overlay(str(container.lower), str(container.upper), str(container.work),
                                         str(container.rootfs), str(container.path / "overlay.log"),
                                         squash_to=(caller.uid, caller.gid) if options.writable else None)
            fuse_mounts.append(overlay)
            info["daemon_pids"].append(overlay.process.pid)
            container.write_info(info)
            root_path = container.rootfs
            phases["overlay"] = clock() - started - sum(phases.values())

        # Identity files: the image's own entries plus the caller's (read in-root, never via host links).
        shell_exists = lambda path: rootfs.path_kind(str(container.lower), path) == "file"  # noqa: E731
        passwd_resolved, _ = rootfs.resolve_in_root(lower_root, "/etc/passwd")
        group_resolved, _ = rootfs.resolve_in_root(lower_root, "/etc/group")
        (container.etc / "passwd").write_text(passwd_text(
            read_image_file(os.path.join(container.lower, passwd_resolved.lstrip("/"))), caller,
            as_root=options.remap_root, shell_exists=shell_exists))
        (container.etc / "group").write_text(group_text(
            read_image_file(os.path.join(container.lower, group_resolved.lstrip("/"))), caller,
            as_root=options.remap_root))
        os.chmod(container.etc, 0o755)
        for entry in ("passwd", "group"):
            os.chmod(container.etc / entry, 0o644)
        binds = [
            *plan.binds,
            spec.BindMount(str(container.etc / "passwd"), identity_paths["passwd"]),
            spec.BindMount(str(container.etc / "group"), identity_paths["group"]),
            *site_mounts,
            *user_mounts,
            *devices,
        ]
        env = compose_env(
            image_env,
            host_env=os.environ,
            passthrough=settings.policy.passthrough_env,
            identity=identity_env(caller, as_root=options.remap_root, home_in_container=plan.home_env),
            site_ops=[*rank_env_ops(os.environ, image_env), *settings.policy.env,
                      *(op for g in groups for op in g.env)],
            user_entries=env_entries,
            tty=options.tty,
        )
        config = spec.build_config(spec.SpecPlan(
            rootfs=str(root_path),
            args=spec.process_args(caller.uid, caller.gid, argv, remap_root=options.remap_root),
            env=tuple(env),
            cwd=workdir,
            uid=caller.uid,
            gid=caller.gid,
            init_path=init,
            hostname=options.hostname or os.uname().nodename,
            readonly_root=not options.writable,
            remap_root=options.remap_root,
            terminal=options.tty,
            network=network,
            host_namespaces=host_namespaces,
            private_namespaces=private_namespaces,
            binds=tuple(binds),
            tmpfs=tuple(plan.tmpfs),
            tmp_source=str(container.tmp),
            rlimits=limit_plan.rlimits,
            cgroups_path=limit_plan.cgroups_path,
            cpu_quota_us=limit_plan.cpu_quota_us,
            memory_limit_bytes=limit_plan.memory_limit_bytes,
            annotations=(("org.berth.image", name),),
        ))
        (container.bundle / "config.json").write_text(json.dumps(config))
        log(f"bundle {container.bundle}, network {network}, workdir {workdir}", debug=True)

        if limit_plan.cpu_set is not None:
            # Inherited by the runtime and so by the container (the FUSE daemons are already up).
            os.sched_setaffinity(0, limit_plan.cpu_set)
        phases["bundle"] = clock() - started - sum(phases.values())
        runtime_log = container.path / "runtime.log"
        child = proc.start(
            ["setpriv", "--pdeathsig", "TERM", "--", runtime, "--root", str(container.runtime_root),
             "--log", str(runtime_log), "--log-format", "text",
             "run", "--bundle", str(container.bundle), container.id],
            stdin=None, new_session=True,
        )
        status = _wait_forwarding(child, runtime, str(container.runtime_root), container.id,
                                  options.stop_timeout_s, log)
        phases["runtime"] = clock() - started - sum(phases.values())
        if status != 0 and status < 128:
            error = _runtime_error(runtime_log)
            if error:
                raise RuntimeFailure(f"{os.path.basename(runtime)} could not start the container: {error}",
                                     hint="run with --debug, and 'berth doctor' to check this node")
        return status
    except _StopRequested as stop:
        log(f"stopped by signal {signal.Signals(stop.signum).name} before the command started")
        return 128 + stop.signum
    finally:
        before = clock()
        # Teardown must finish: a second Ctrl-C must not leave mounts behind.
        for signum in early:
            signal.signal(signum, signal.SIG_IGN)
        try:
            _teardown(container, runtime, fuse_mounts)
        finally:
            _restore(early)
        phases["teardown"] = clock() - before
        log("timing: " + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in phases.items()),
            debug=True)


def _restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _teardown(container: state.ContainerState, runtime: str, fuse_mounts: list) -> None:
    if (container.runtime_root / container.id).exists():
        proc.run([runtime, "--root", str(container.runtime_root), "delete", "--force", container.id],
                 check=False, timeout=10)
    for mount in reversed(fuse_mounts):
        fuse.stop(mount)
    container.release()
