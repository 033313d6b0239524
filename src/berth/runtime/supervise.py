"""Running a materialised container: the OCI runtime in the foreground, signals, the stop
timeout, and the teardown (issue 9's third stage; see :mod:`berth.runtime.plan`).

Signals to berth are forwarded to the runtime (berth.proc.wait_forwarding; the runtime passes
them to berth-init, which passes them to the command's process group); ``--stop-timeout``
seconds after the first SIGTERM/SIGINT/SIGHUP/SIGQUIT, the container is killed. Before the
runtime runs, a stop signal raises berth.proc.StopRequested, so that the mounts are undone. Teardown deletes the runtime's state, unmounts the
FUSE mounts in reverse order (a shared image mount is left, and unmounted by the last
container out) and removes the state directory.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from berth import proc
from berth.errors import RuntimeFailure
from berth.runtime import fuse, ocirt
from berth.runtime.state import ContainerState

Log = Callable[..., None]

def start_runtime(runtime: str, container: ContainerState, *, pmi_fd: int | None = None) -> proc.Child:
    """``runtime run`` of the container's bundle, in its own session, dying with berth (SIGTERM,
    which the runtime passes on to the container). ``pmi_fd``: Slurm's PMI socket, passed to
    the container as fd 3 (berth.runtime.pmix).

    berth-launcher sets its parent-death signal itself (``--parent-death``): it is started by
    posix_spawn, one fork of berth less (issue 10); runc and crun get it from a fork of berth
    (:func:`berth.proc.start`'s ``parent_death``)."""
    preserve = ["--preserve-fds", "1"] if pmi_fd is not None else []
    launcher = ocirt.is_launcher(runtime)
    front = [runtime, "--parent-death", str(os.getpid())] if launcher else [runtime]
    return proc.start(
        [*front, "--root", str(container.runtime_root), "--log", str(runtime_log(container)), "--log-format", "text",
         "run", *preserve, "--bundle", str(container.bundle), container.id],
        stdin=None, new_session=True, move_fds={3: pmi_fd} if pmi_fd is not None else None,
        parent_death=None if launcher else signal.SIGTERM,
    )


def in_host_pid_namespace(config: dict) -> bool:
    """Whether the container of ``config`` (config.json) shares the host's pid namespace, where
    berth must be the subreaper of what it leaves behind (:func:`adopt_orphans`)."""
    return not any(namespace.get("type") == "pid" for namespace in config.get("linux", {}).get("namespaces", ()))


def adopt_orphans(config: dict) -> frozenset[int] | None:
    """For a container in the host's pid namespace (a site's ``[policy.namespaces] pid =
    "host"``): make berth a child subreaper, so that what the container leaves behind -- a
    daemon that left the command's session (setsid, a double fork), which no container init
    takes with it there -- is reparented to berth rather than to init, and
    :func:`end_orphans` ends it. Call before the runtime starts; returns berth's children
    then (not the container's: its FUSE daemons). None for a container with its own pid
    namespace (its init's exit kills all of it) or where the kernel refuses."""
    if not in_host_pid_namespace(config):
        return None
    if not proc.become_subreaper():
        return None
    return frozenset(proc.children_by_parent().get(os.getpid(), ()))


def end_orphans(before: frozenset[int] | None, log: Log, *, timeout_s: float = 10.0) -> int:
    """SIGKILL and reap every child of berth but ``before`` (see :func:`adopt_orphans`): the
    container's processes reparented to berth once their parents (the runtime, the
    container's init) ended. Again until none is left, as a killed process's own children
    come to berth in turn; at most ``timeout_s``. Returns how many were ended."""
    if before is None:
        return 0
    import signal
    import time

    ended, deadline = 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        orphans = [pid for pid in proc.children_by_parent().get(os.getpid(), ()) if pid not in before]
        if not orphans:
            break
        for pid in orphans:  # berth's children: the pid stays theirs until berth reaps it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in orphans:
            try:
                os.waitpid(pid, 0)
                ended += 1
            except ChildProcessError:
                pass
    proc.become_subreaper(False)  # what berth detaches later (berth-linger) goes to init, as before
    if ended:
        log(f"ended {ended} process(es) the container left behind in the host's pid namespace", debug=True)
    return ended


def runtime_log(container: ContainerState) -> Path:
    return container.path / "runtime.log"


def wait(child: proc.Child, runtime: str, container: ContainerState, stop_timeout_s: float,
         log: Log) -> int:
    """Wait for the runtime process, forwarding signals (berth.proc); kill the container
    ``stop_timeout_s`` after a stop signal if it is still there."""
    def kill() -> None:
        log(f"container did not stop within --stop-timeout {stop_timeout_s:g} s: killing it")
        proc.run([runtime, "--root", str(container.runtime_root), "kill", container.id, "KILL"],
                 check=False, timeout=10)

    return proc.wait_forwarding(child, stop_timeout_s=stop_timeout_s, on_stop_timeout=kill)


def runtime_error(log_path: Path) -> str | None:
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


def teardown(container: ContainerState, runtime: str, fuse_mounts: list) -> list[str]:
    """Delete the runtime's state of the container, unmount (last mounted first), remove the
    state directory. Returns warnings for the user: a mount it could not unmount (the shared
    image mount's last one out, or one of the container's own)."""
    warnings = []
    if runtime and (container.runtime_root / container.id).exists():
        proc.run([runtime, "--root", str(container.runtime_root), "delete", "--force", container.id],
                 check=False, timeout=10)
    for mount in reversed(fuse_mounts):
        if isinstance(mount, fuse.FuseMount):
            failure = fuse.stop(mount)
            if failure:  # the next berth's stale clean-up meets it
                warnings.append(f"could not unmount {mount.mountpoint}: {failure}")
        else:  # a shared image mount (berth.runtime.imagemount): leave it, the last one out unmounts
            try:
                mount.release()
            except RuntimeFailure as failure:  # the unmount failed: the next berth meets the mount
                warnings.append(failure.message)
            except Exception:  # noqa: BLE001 - the stale clean-up of the next berth finishes it
                pass
    container.release()
    return warnings
