"""Running a materialised container: the OCI runtime in the foreground, signals, the stop
timeout, and the teardown (issue 9's third stage; see :mod:`berth.runtime.plan`).

SIGTERM/SIGINT/SIGHUP/SIGQUIT to berth are forwarded to the runtime (which passes them to
berth-init, which passes them to the command's process group); ``--stop-timeout`` seconds after
the first of them, the container is killed. Teardown deletes the runtime's state, unmounts the
FUSE mounts in reverse order and removes the state directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from berth import proc
from berth.runtime import fuse
from berth.runtime.state import ContainerState

Log = Callable[..., None]

#: Signals that start the stop timer (the container is asked to stop).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
FORWARDED = proc.FORWARDED_SIGNALS


class _Wake(Exception):
    """Raised by berth's signal handlers to interrupt the wait for the runtime."""


class StopRequested(Exception):
    """SIGTERM/SIGINT/SIGHUP before the runtime started: unwind (unmount) and report 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    del frame
    raise StopRequested(signum)


_EARLY_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def install_early_handlers() -> dict:
    """Until the runtime runs, a stop request must unwind the mounts, not kill berth outright.
    Handlers a caller installed (berth.jobs) are left alone."""
    previous = {}
    for signum in _EARLY_SIGNALS:
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, signal.default_int_handler):
            previous[signum] = signal.signal(signum, _raise_stop)
    return previous


def restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def start_runtime(runtime: str, container: ContainerState) -> subprocess.Popen:
    """``runtime run`` of the container's bundle, in its own session, dying with berth."""
    return proc.start(
        ["setpriv", "--pdeathsig", "TERM", "--", runtime, "--root", str(container.runtime_root),
         "--log", str(runtime_log(container)), "--log-format", "text",
         "run", "--bundle", str(container.bundle), container.id],
        stdin=None, new_session=True,
    )


def runtime_log(container: ContainerState) -> Path:
    return container.path / "runtime.log"


def wait_forwarding(child: subprocess.Popen, runtime: str, root: str, container_id: str,
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


def teardown(container: ContainerState, runtime: str, fuse_mounts: list) -> None:
    """Delete the runtime's state of the container, unmount (last mounted first), remove the
    state directory."""
    if (container.runtime_root / container.id).exists():
        proc.run([runtime, "--root", str(container.runtime_root), "delete", "--force", container.id],
                 check=False, timeout=10)
    for mount in reversed(fuse_mounts):
        fuse.stop(mount)
    container.release()
