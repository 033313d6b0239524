"""The step launcher agent: how a job script running *inside* its container starts steps on
every node without sshd and without Slurm inside the image (DESIGN.md decision 9).

The job runner (``berth job-exec``, on the host) puts two tiny POSIX shell shims, ``srun`` and
``berth``, in ``RECORD/ctr/bin`` and puts that directory first on the script's PATH inside the
container (``RECORD/ctr`` is mounted over the jobs directory: ``$BERTH_JOB_BIN``). A shim
writes its request into ``$BERTH_JOB_AGENT/req.XXXXXX/`` (argv NUL-separated, working directory,
exported environment, two FIFOs for output) and touches ``ready``; the agent thread in the job
runner runs the same command on the host — ``srun …`` or ``berth srun …`` / ``berth run …`` —
with its output streamed into the FIFOs, then writes the exit status. The shim then writes a
byte into ``$BERTH_JOB_AGENT/wake``, a FIFO the agent holds open and waits on, so a step starts
as soon as it is asked for (the agent's scan every :data:`POLL_S` is only the fallback, for a
container that removed or replaced the FIFO: that can slow its own steps, nothing else). So::

    srun -N2 -n2 berth run IMAGE hostname     # one container per task, any image
    berth srun -N2 -n2 hostname               # the same with the job's image (BERTH_JOB_IMAGE)

work from inside the job's container exactly as they do from a host shell. Only the programs
in :data:`ALLOWED_PROGRAMS` are run, as the job's own user: the agent gives the script nothing
its owner could not do from a login shell.

The request is written by the container, which runs the image's code: the host command gets the
host's environment plus only the variables of :func:`step_environment`'s allow-list (never one
that makes a host program load code or configuration: ``LD_*``, ``PYTHON*``, ``BASH_ENV``,
``BERTH_CONFIG_DIR``...), ``berth`` is this interpreter in isolated mode (``python -I -m
berth``; ``-E -P`` for a berth installed in the user site: :func:`berth.proc.berth_argv`) and ``srun`` is found on the host's PATH, and no file of the request is read or
written through a link (the request directory itself is opened once, before the container
starts, and every request relative to it).
"""

from __future__ import annotations

import os
import select
import shlex
import stat
import threading
from pathlib import Path

from berth import proc
from berth.errors import JobError
from berth.fsutil import replace_in_directory
from berth.jobs.records import atomic_write, make_private_dir
from berth.oci.names import is_env_name

ALLOWED_PROGRAMS = ("srun", "berth")

#: Variables a step request may set for the host command (an allow-list: anything else keeps the
#: host's value). They are the ones that reach a step's containers (``policy.passthrough_env``)
#: and that no host program reads as code or configuration: SLURM_*, PMI*, OMPI_* stay the
#: host's (srun and slurmstepd read them), and LD_*, PYTHON*, BASH_ENV, BERTH_* never pass.
STEP_VARIABLES = frozenset({
    "LANG", "LANGUAGE", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
})
STEP_VARIABLE_PREFIXES = ("LC_", "MPI_", "I_MPI_", "BERTH_JOB_")
#: Locale variables whose value is a path make glibc load that file: only plain names pass.
_LOCALE_VARIABLES = ("LANG", "LANGUAGE", "LC_")
#: Container paths that mean nothing on the host (the host's own BERTH_JOB_* always win).
_CONTAINER_ONLY = frozenset({"BERTH_JOB_BIN", "BERTH_JOB_AGENT"})

POLL_S = 0.05
#: The agent's wake-up FIFO in the request directory (see the module docstring).
WAKE = "wake"

SHIM = r"""#!/bin/sh
# berth step shim (berth.jobs.agent): runs "$(basename "$0") ARGS" on the host through the job
# runner, streams its output here and exits with its status.
agent=${BERTH_JOB_AGENT:?this command works only inside a berth job}
req=$(mktemp -d "$agent/req.XXXXXX") || exit 125
printf '%s\0' "$@" > "$req/argv"
basename "$0" > "$req/prog"
pwd > "$req/cwd"
export -p > "$req/env"
mkfifo "$req/out" "$req/err" || exit 125
cat "$req/out" & out=$!
cat "$req/err" >&2 & err=$!
touch "$req/ready"
# wake the agent (<>: opening a FIFO read-write never blocks; -p: never create a file here)
if [ -p "$agent/wake" ]; then { printf x >&3; } 3<>"$agent/wake"; fi 2>/dev/null
wait $out
wait $err
while [ ! -e "$req/status" ]; do sleep 0.1; done
status=$(cat "$req/status")
rm -rf "$req"
exit "$status"
"""


def install_shims(bin_dir: Path, agent_dir: Path) -> None:
    """Create ``bin_dir`` with the ``srun`` and ``berth`` shims and the agent's request dir
    (written without following anything a container may have planted there)."""
    make_private_dir(bin_dir)
    make_private_dir(agent_dir)
    for name in ALLOWED_PROGRAMS:
        atomic_write(bin_dir / name, SHIM, mode=0o700)
    wake = agent_dir / WAKE
    try:
        os.unlink(wake)  # a requeued job's, or anything planted under the name
    except FileNotFoundError:
        pass
    os.mkfifo(wake, 0o600)


def open_wake(agent_dir: Path) -> int | None:
    """The agent's end of the wake-up FIFO: read-write (so that it never reads end-of-file
    when no shim has it open) and non-blocking; None when the name is not our FIFO any more."""
    try:
        fd = os.open(agent_dir / WAKE, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISFIFO(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        return None
    return fd


def parse_exported(text: str) -> dict[str, str]:
    """The output of ``export -p`` (dash, busybox ash or bash) -> {name: value}."""
    values: dict[str, str] = {}
    try:
        words = shlex.split(text)
    except ValueError:
        return values
    for word in words:
        if word in ("export", "declare", "-x"):
            continue
        name, sep, value = word.partition("=")
        if sep and is_env_name(name):
            values[name] = value
    return values


def step_environment(host_env: dict[str, str], script_env: dict[str, str]) -> dict[str, str]:
    """The host environment plus the allow-listed variables the script exported
    (:data:`STEP_VARIABLES`, :data:`STEP_VARIABLE_PREFIXES`); the host's own ``BERTH_JOB_*`` win,
    and a locale variable naming a path is dropped."""
    env = dict(host_env)
    for name, value in script_env.items():
        if name not in STEP_VARIABLES and not name.startswith(STEP_VARIABLE_PREFIXES):
            continue
        if name in _CONTAINER_ONLY or (name.startswith("BERTH_JOB_") and name in host_env):
            continue
        if name.startswith(_LOCALE_VARIABLES) and "/" in value:
            continue
        env[name] = value
    return env


def host_command(program: str, args: list[str]) -> list[str]:
    """The host argv for an allowed program: ``berth`` is this interpreter in isolated mode
    (no PYTHONPATH, user site or current directory on ``sys.path``: the container cannot make
    it import anything; the user site stays where berth itself is installed, proc.berth_argv),
    ``srun`` the host's, by absolute path (raises ProgramNotFound)."""
    if program == "berth":
        return proc.berth_argv(*args, isolated=True)
    return [proc.find_program(program), *args]


class StepAgent:
    """Serves shim requests in ``agent_dir`` until :meth:`stop`; one thread per request."""

    def __init__(self, agent_dir: Path, host_env: dict[str, str], fallback_cwd: str) -> None:
        self.agent_dir = agent_dir
        self.host_env = host_env
        self.fallback_cwd = fallback_cwd
        self._stop = threading.Event()
        self._seen: set[str] = set()
        self._children: list = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="berth-step-agent", daemon=True)
        self._wake: int | None = None
        #: The request directory, opened once: the container may rename it and plant a link
        #: under its name, which must not make the agent serve (and write into) another one.
        self._dir: int | None = None

    def open(self) -> None:
        """Open the request directory and the wake-up FIFO: before the job's container starts
        (the job runner calls this before it forks the job), so that nothing the container does
        can change which directory is served."""
        self._dir = open_agent_dir(self.agent_dir)
        self._wake = open_wake(self.agent_dir)

    def start(self) -> None:
        """Serve, in a thread (started after the runner's fork: forking with threads is unsafe)."""
        if self._dir is None:
            self.open()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._wake is not None:
            try:
                os.write(self._wake, b"x")  # end the wait now
            except OSError:
                pass
        self._thread.join(timeout=2)
        if self._wake is not None and not self._thread.is_alive():
            os.close(self._wake)
            self._wake = None

    def child_pids(self) -> list[int]:
        with self._lock:
            return [child.pid for child in self._children if child.poll() is None]

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                self._scan()
                self._wait()
        finally:
            if self._dir is not None:
                os.close(self._dir)
                self._dir = None

    def _scan(self) -> None:
        """Start a handler for every new ready request: each is opened here, relative to the
        request directory's descriptor and without following a link, and the handler gets
        that descriptor (a name swapped afterwards changes nothing)."""
        if self._dir is None:
            return
        try:
            names = os.listdir(self._dir)
        except OSError:
            return
        for name in names:
            if name in self._seen or name == WAKE:
                continue
            try:
                directory = _open_request_dir(name, self._dir)
            except OSError:
                continue  # a link, a file, another user's or gone: never served
            try:
                os.stat("ready", dir_fd=directory, follow_symlinks=False)
            except OSError:
                os.close(directory)
                continue
            self._seen.add(name)
            threading.Thread(target=self._handle, args=(directory,), daemon=True).start()

    def _wait(self) -> None:
        """Until a shim writes into the wake-up FIFO, or POLL_S at most."""
        if self._wake is None:
            self._stop.wait(POLL_S)
            return
        readable, _, _ = select.select([self._wake], [], [], POLL_S)
        if readable:
            try:
                os.read(self._wake, 4096)  # drain: one scan serves every request written so far
            except BlockingIOError:
                pass

    def _handle(self, directory: int) -> None:
        """Serve the request opened at ``directory`` (closed here)."""
        status = 127
        out = err = None
        try:
            # Everything here was written by the container: the request directory was opened
            # once without following a link (a swap after the scan changes nothing) and every
            # name is taken relative to it; FIFOs only where FIFOs belong, plain files for the
            # rest (a link would make us read or write host files).
            out = os.fdopen(_open_fifo("out", directory), "wb")
            err = os.fdopen(_open_fifo("err", directory), "wb")
            program = _read("prog", directory).decode().strip()
            args = _read("argv", directory).decode().split("\0")[:-1]
            cwd = _read("cwd", directory).decode().strip()
            env = step_environment(self.host_env, parse_exported(_read("env", directory).decode()))
            if program not in ALLOWED_PROGRAMS:
                err.write(f"berth: only {' and '.join(ALLOWED_PROGRAMS)} can be run on the host from a job\n".encode())
                status = 126
            else:
                if not os.path.isdir(cwd):
                    cwd = self.fallback_cwd
                try:
                    child = proc.start(host_command(program, args), env=env, stdout=out, stderr=err, cwd=cwd)
                except Exception as exc:  # ProgramNotFound, OSError: report into the step's stderr
                    err.write(f"berth: cannot start {program} on the host: {exc}\n".encode())
                    status = 127
                else:
                    with self._lock:
                        self._children.append(child)
                    status = proc.shell_status(child.wait())
        except (OSError, UnicodeDecodeError, JobError) as exc:
            if err is not None:
                err.write(f"berth: step request refused: {exc}\n".encode())
            status = 125
        finally:
            try:
                _write_status(directory, status)
            except OSError:
                pass
            os.close(directory)
            for handle in (out, err):
                if handle is not None:
                    handle.close()


MAX_REQUEST_BYTES = 1 << 20


def open_agent_dir(agent_dir: Path) -> int | None:
    """The agent's descriptor of its request directory (a real directory of ours, never a
    link), or None when it is not there any more."""
    try:
        return _open_request_dir(str(agent_dir), None)
    except OSError:
        return None


def _open_request_dir(name: str, parent: int | None) -> int:
    """An O_DIRECTORY descriptor of ``name`` in directory ``parent``: a real directory of
    ours, never a link."""
    # O_NONBLOCK: a FIFO planted under the name is refused (ENOTDIR), never waited on.
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    if os.fstat(fd).st_uid != os.getuid():
        os.close(fd)
        raise OSError(f"{os.path.basename(name)} is not yours")
    return fd


def _read(name: str, directory: int) -> bytes:
    """A request file's bytes: a plain file only (never through a link), at most 1 MiB. The
    error names the file, never its content."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{name} is not a plain file")
        data = os.read(fd, MAX_REQUEST_BYTES + 1)
        if len(data) > MAX_REQUEST_BYTES:
            raise OSError(f"{name} is larger than 1 MiB")
        return data
    finally:
        os.close(fd)


def _open_fifo(name: str, directory: int) -> int:
    """Open the shim's FIFO for writing; refuse anything else (a link to a file would be
    written through; a plain file opened without O_TRUNC and never written is left as it was)."""
    fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{name} is not a FIFO")
    return fd


def _write_status(directory: int, status: int) -> None:
    """Write ``status`` into the request atomically: a link planted as ``status`` is replaced,
    never followed."""
    replace_in_directory(directory, "status", f"{status}\n".encode(), 0o644)
