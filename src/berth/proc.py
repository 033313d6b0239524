"""The one gateway for running external programs.

Rules (STYLE.md): argv lists only, never shell strings; an explicit environment, never a
mutation of ``os.environ``; stdin from /dev/null unless given; binaries resolved once to
absolute paths; the stderr tail kept in the raised error; signals reach the child.

How a child starts (issue 10: every ``berth run`` starts its runtime, and mounts and
unmounts its image, through here): with ``os.posix_spawn`` (glibc's vfork-like clone, one
system call in the parent) and a :class:`Child` to wait for it, without importing
``subprocess`` (with ``threading``, ``selectors``: ~1.5 ms of every run's start). The child
gets what ``subprocess`` gave it: only descriptors 0-2 and those passed (every other one
closed: berth's are close-on-exec, and inherited ones berth was given are closed by the spawn's
file actions), SIGPIPE and SIGXFSZ at their defaults, the standard streams as asked. Where
posix_spawn cannot do what is asked -- a pipe to write to or read from while the child runs
(:func:`start` with ``PIPE``), input for :func:`run`, a working directory while other threads
run (the spawn changes berth's own for an instant) -- ``subprocess`` does it, imported then.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from berth.errors import ProgramFailed, ProgramNotFound

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing costs every `berth run` ~2.5 ms (issue 10)
    import subprocess
    from typing import IO

#: The standard streams' special values, those of ``subprocess`` (which callers may pass too).
PIPE = -1
STDOUT = -2
DEVNULL = -3

#: Debian package that provides each program berth runs (for hints).
PACKAGES = {
    "runc": "runc",
    "crun": "crun",
    "squashfuse": "squashfuse",
    "squashfuse_ll": "squashfuse",
    "fusermount3": "fuse3",
    "fuse-overlayfs": "fuse-overlayfs",
    "tar2sqfs": "squashfs-tools-ng",
    "sqfs2tar": "squashfs-tools-ng",
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "pigz": "pigz",
    "igzip": "isal",
    "zstd": "zstd",
    "xz": "xz-utils",
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "sacct": "slurm-client",
    "scontrol": "slurm-client",
    "newuidmap": "uidmap",
}

STDERR_TAIL_BYTES = 4000

#: Extra directories searched after PATH: sbin is not on a normal user's PATH on Debian,
#: yet runc lives in /usr/sbin there.
EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@functools.lru_cache(maxsize=None)
def find_program(name: str) -> str:
    """Return the absolute path of ``name`` or raise ProgramNotFound with an install hint."""
    if os.path.isabs(name):
        if os.access(name, os.X_OK):
            return name
        raise ProgramNotFound(f"program {name} is not executable")
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(EXTRA_PATH)
    found = _which(name, path)
    if found is None:
        package = PACKAGES.get(name, name)
        raise ProgramNotFound(
            f"required program '{name}' is not installed",
            hint=f"ask your site administrator to install the Debian package '{package}' "
            "(scripts/install-system-packages.sh installs everything berth needs)",
        )
    return found


def _which(name: str, path: str) -> str | None:
    """``shutil.which(name, path=path)`` (an executable that is not a directory; a name with a
    slash is looked at as it is), without importing shutil and its compression modules on
    every run's start (issue 10)."""
    if os.sep in name:
        candidates = [name]
    else:
        candidates = [os.path.join(directory, name) for directory in path.split(os.pathsep)]
    for candidate in candidates:
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def has_program(name: str) -> bool:
    try:
        find_program(name)
    except ProgramNotFound:
        return False
    return True


def stat_fields(pid: int | str, *, proc: str = "/proc") -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name, or None when the process is gone
    (or the file unreadable). proc(5)'s field N is index N - 3: ``[0]`` the state (``Z`` a
    zombie), ``[1]`` the parent, ``[3]`` the session, ``[19]`` the start time in clock ticks.
    The name is skipped by its last ``)``: a name may hold spaces and parentheses."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    _name, closed, rest = data.rpartition(b")")
    return rest.decode("ascii", "replace").split() if closed else None


def berth_argv(*args: str, python: str | None = None, isolated: bool = False) -> list[str]:
    """The argv with which berth starts berth (a job's runner, each node's ``berth run`` of a
    step, the step agent's commands): this interpreter (or ``python``), ``-m berth``, ``args``.

    Always ``-P``: ``python -m`` would put the working directory first on the module path --
    a job's directory, on the shared file system: a file there named like a module berth
    imports (``argparse.py``) would run instead, and each of a start's ~70 imports would look
    there first. ``isolated`` (``-I``, which implies ``-P``): no PYTHONPATH or user site either,
    for the commands a job's container asks the host for (berth.jobs.agent), whose environment
    the container helps make -- but the user site stays (``-E -P``) when berth itself is
    installed there (``pip install --user``): ``-I`` hid berth from itself ("No module named
    berth"), and what could change that directory (the container, through the user's home)
    could change berth's own files in it anyway."""
    if not isolated:
        return [python or sys.executable, "-P", "-m", "berth", *args]
    return [python or sys.executable, *(("-E", "-P") if _in_user_site() else ("-I",)), "-m", "berth", *args]


def _in_user_site() -> bool:
    """Whether this berth is imported from the user's site-packages (``pip install --user``)."""
    import site

    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    return bool(user_site) and here == os.path.realpath(user_site)


def child_env(extra: Mapping[str, str] | None = None, *, inherit: bool = True) -> dict[str, str]:
    """A fresh environment dict for a child: a copy of ours (or empty) plus ``extra``."""
    env = dict(os.environ) if inherit else {"PATH": os.environ.get("PATH", os.defpath)}
    if extra:
        env.update(extra)
    return env


def _tail(data: bytes | str | None) -> str:
    if not data:
        return ""
    if isinstance(data, bytes):
        data = data[-STDERR_TAIL_BYTES:].decode("utf-8", "replace")
    return data[-STDERR_TAIL_BYTES:].strip()


class Completed:
    """What :func:`run` returns: the part of ``subprocess.CompletedProcess`` berth uses."""

    __slots__ = ("args", "returncode", "stdout", "stderr")

    def __init__(self, args: list[str], returncode: int, stdout: bytes | None, stderr: bytes | None) -> None:
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"Completed(args={self.args!r}, returncode={self.returncode})"


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    stdin: int | IO | None = None,
    stdout: int | IO | None = PIPE,
    stderr: int | IO | None = PIPE,
    cwd: str | None = None,
    timeout: float | None = None,
    check: bool = True,
    what: str | None = None,
    parent_death: int | None = None,
) -> Completed | subprocess.CompletedProcess:
    """Run a program to completion; its ``stdout`` and ``stderr`` (bytes, with ``PIPE``), its
    ``returncode`` (-N when killed by signal N) are in the result.

    ``argv[0]`` is resolved with :func:`find_program`. With ``check`` a non-zero exit raises
    ProgramFailed naming ``what`` (default: the program) and the tail of its stderr.
    A timeout kills the child and raises ProgramFailed. ``parent_death``: as :func:`start`.
    """
    argv = [find_program(argv[0]), *argv[1:]]
    if input is None and stdin is None:
        stdin = DEVNULL
    name = what or os.path.basename(argv[0])
    if input is None and stdin != PIPE and parent_death is None and _spawnable(cwd):
        result, timed_out = _run_spawned(argv, env, stdin, stdout, stderr, cwd, timeout)
    else:
        result, timed_out = _run_subprocess(argv, env, input, stdin, stdout, stderr, cwd, timeout, parent_death)
    if timed_out:
        # Like a failure below: the stderr tail belongs to the message (a hint says who acts).
        tail = _tail(result.stderr)
        raise ProgramFailed(f"{name} did not finish within {timeout:g} s" + (f": {tail}" if tail else ""))
    if check and result.returncode != 0:
        tail = _tail(result.stderr)
        status = describe_status(result.returncode)
        raise ProgramFailed(f"{name} failed ({status})" + (f": {tail}" if tail else ""))
    return result


def _run_subprocess(argv, env, input, stdin, stdout, stderr, cwd, timeout, parent_death=None):
    import subprocess

    if parent_death is None:
        try:
            return subprocess.run(argv, input=input, stdin=stdin if input is None else None, stdout=stdout,
                                  stderr=stderr, env=dict(env) if env is not None else None, cwd=cwd,
                                  timeout=timeout, check=False), False
        except subprocess.TimeoutExpired as exc:
            return Completed(argv, -signal.SIGKILL, exc.stdout, exc.stderr), True
    child = _popen(argv, parent_death, env=env, stdin=PIPE if input is not None else stdin, stdout=stdout,
                   stderr=stderr, cwd=cwd)
    with child:  # subprocess.run's way: the child is killed and reaped whatever happens
        try:
            out, err = child.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            return Completed(argv, -signal.SIGKILL, out, err), True
        except BaseException:
            child.kill()
            raise
    return Completed(argv, child.returncode, out, err), False


def _run_spawned(argv, env, stdin, stdout, stderr, cwd, timeout) -> tuple[Completed, bool]:
    """:func:`run` by :func:`_spawn`: the ``PIPE`` streams read as they come (``select.poll``,
    so that neither pipe can fill and stall the child), then the child waited for; with
    ``timeout``, killed when it runs out. Returns the result and whether it timed out."""
    import select

    deadline = None if timeout is None else time.monotonic() + timeout
    readers: dict[int, int] = {}  # read end -> the child's fd (1, 2)
    writers: list[int] = []
    streams = [stdin, stdout, stderr]
    try:
        for target in (1, 2):
            if streams[target] == PIPE:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                readers[read_end] = target
                writers.append(write_end)
                streams[target] = write_end
        child = _spawn_child(argv, env, *streams, cwd=cwd)
    except BaseException:
        for fd in (*readers, *writers):
            os.close(fd)
        raise
    for fd in writers:
        os.close(fd)
    output: dict[int, list[bytes]] = {1: [], 2: []}
    timed_out = False
    try:
        poller = select.poll()
        for fd in readers:
            poller.register(fd, select.POLLIN)
        while readers:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
            events = poller.poll(wait_ms)
            if not events and deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
            for fd, _ in events:
                data = os.read(fd, 65536)
                if data:
                    output[readers[fd]].append(data)
                else:
                    poller.unregister(fd)
                    os.close(fd)
                    del readers[fd]
        if not timed_out and not child._wait(None if deadline is None else deadline - time.monotonic()):
            timed_out = True
        if timed_out:
            child.kill()
            child.wait()
    except BaseException:  # a stop signal (StopRequested) while it runs: it does not outlive this
        child.kill()
        child.wait()
        raise
    finally:
        for fd in readers:
            os.close(fd)
    captured = [b"".join(output[target]) if streams_asked == PIPE else None
                for target, streams_asked in ((1, stdout), (2, stderr))]
    return Completed(argv, child.returncode, *captured), timed_out


def replace_with(argv: Sequence[str], *, env: Mapping[str, str]) -> None:
    """Become ``argv`` (execve): for a command berth only prepares and then hands over, such as
    ``berth srun``. The program gets the terminal's signals itself, as if started by the shell
    (srun counts Ctrl-C presses: forwarding them from a wrapper would double each one), and no
    Python process waits beside it. Returns only by raising."""
    argv = [find_program(argv[0]), *argv[1:]]
    try:
        os.execve(argv[0], argv, dict(env))
    except OSError as exc:
        raise ProgramFailed(f"cannot start {os.path.basename(argv[0])}: {exc.strerror}") from None


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: int | IO | None = DEVNULL,
    stdout: int | IO | None = None,
    stderr: int | IO | None = None,
    cwd: str | None = None,
    pass_fds: Sequence[int] = (),
    new_session: bool = False,
    move_fds: Mapping[int, int] | None = None,
    parent_death: int | None = None,
) -> Child | subprocess.Popen:
    """Start a program and return it as a :class:`Child` (a ``subprocess.Popen`` when a
    stream is ``PIPE``: its ``stdin``/``stdout`` are the pipes' file objects); the caller waits
    for it, with :func:`wait_forwarding` when the child must get the signals berth receives.

    ``move_fds`` {child fd: berth's fd} gives the child one of berth's descriptors under another
    number (runc's ``--preserve-fds`` passes only fds 3, 4, ...); berth's own descriptor at
    that number, if any, is left as it is (the same open file, so flock locks held through it
    stay held).

    ``parent_death``: the signal the kernel sends the program when berth dies, killed with
    SIGKILL too (PR_SET_PDEATHSIG, for the thread that calls this, set before the program
    runs; a berth gone by then sends it at once). Such a child is a ``subprocess.Popen`` (the
    prctl needs a fork of berth's own: posix_spawn cannot make it)."""
    argv = [find_program(argv[0]), *argv[1:]]
    if PIPE not in (stdin, stdout, stderr) and parent_death is None and _spawnable(cwd):
        return _spawn_child(argv, env, stdin, stdout, stderr, cwd=cwd, pass_fds=pass_fds, new_session=new_session,
                            move_fds=move_fds)
    import subprocess

    saved: list[tuple[int, int | None, bool]] = []
    try:
        for target, source in (move_fds or {}).items():
            if target == source:
                saved.append((target, None, True))
                continue
            try:
                kept, inheritable = os.dup(target), os.get_inheritable(target)
            except OSError:
                kept, inheritable = None, False
            saved.append((target, kept, inheritable))
            os.dup2(source, target, inheritable=False)
        return _popen(argv, parent_death, env=env, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd,
                      pass_fds=(*pass_fds, *(move_fds or {})), start_new_session=new_session)
    finally:
        for target, kept, inheritable in reversed(saved):
            if kept is None:
                if target not in (move_fds or {}).values():
                    os.close(target)
            else:
                os.dup2(kept, target, inheritable=inheritable)
                os.close(kept)


def _popen(argv: list[str], parent_death: int | None, *, env: Mapping[str, str] | None,
           **options) -> subprocess.Popen:
    """``subprocess.Popen`` of ``argv``; with ``parent_death`` (:func:`start`), started with
    :data:`FORWARDED_SIGNALS` blocked as :func:`_spawn_child` does (a stop signal raised as
    Popen returned would lose the child), the child setting its parent-death signal and the
    mask berth had before it runs the program."""
    import subprocess

    env = dict(env) if env is not None else None
    if parent_death is None:
        return subprocess.Popen(argv, env=env, **options)
    return _start_blocked(lambda mask: subprocess.Popen(
        argv, env=env, preexec_fn=_dying_with_this_thread(parent_death, mask), **options))


def _spawnable(cwd: str | None) -> bool:
    """Whether :func:`_spawn` can start a child here: posix_spawn exists, and for a working
    directory of its own no other thread runs (the spawn changes berth's for an instant)."""
    if not hasattr(os, "posix_spawn"):
        return False
    if cwd is None:
        return True
    threading = sys.modules.get("threading")
    return threading is None or threading.active_count() <= 1


def _stream_fd(stream) -> int | None:
    return stream if stream is None or isinstance(stream, int) else stream.fileno()


def _spawn_child(argv: list[str], env: Mapping[str, str] | None, stdin, stdout, stderr, **options) -> Child:
    """:func:`_spawn` and the :class:`Child` for it, with :data:`FORWARDED_SIGNALS` blocked in
    this thread in between: a stop signal whose handler raised (:func:`raise_on_stop`) as
    posix_spawn returned lost the child, which was then never killed nor waited for (the
    handler runs at the first bytecode after the call, before the pid is stored). A signal that
    comes meanwhile is handled once the Child exists, and kills it. The child gets the caller's
    signal mask. (A subprocess.Popen, used where posix_spawn cannot do what is asked, gets the
    same with ``parent_death``; without, it keeps the window it has.) Raises OSError."""
    return _start_blocked(lambda mask: Child(_spawn(argv, env, stdin, stdout, stderr, sigmask=mask, **options), argv))


def _start_blocked(make: Callable[[set], "Child | subprocess.Popen"]) -> "Child | subprocess.Popen":
    """The child ``make(mask)`` starts (``mask``: the signal mask this thread had, which the
    child must get), with :data:`FORWARDED_SIGNALS` blocked in this thread in between
    (:func:`_spawn_child`'s reason); a signal's handler that raises once they are unblocked
    kills and reaps the child first. The one way berth starts a child it must not lose."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # read first: a handler may raise after the block
    child = None
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        child = make(previous)
    finally:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a pending signal's handler runs here
        except BaseException:
            if child is not None:
                child.kill()
                child.wait()
            raise
    return child


def _spawn(argv: list[str], env: Mapping[str, str] | None, stdin, stdout, stderr, *, cwd: str | None = None,
           pass_fds: Sequence[int] = (), new_session: bool = False, move_fds: Mapping[int, int] | None = None,
           sigmask=None) -> int:
    """posix_spawn ``argv`` (an absolute path first) and return its pid. The streams: None
    (berth's own), DEVNULL, STDOUT (for stderr), a descriptor or a file; ``move_fds`` and
    ``pass_fds`` as :func:`start` takes them. Every other descriptor is closed in the child:
    berth's own are close-on-exec (PEP 446), and inheritable ones berth was started with are
    closed by the file actions (what subprocess's ``close_fds`` did). Raises OSError."""
    actions: list[tuple] = []
    for target, stream in ((0, stdin), (1, stdout), (2, stderr)):
        fd = _stream_fd(stream)
        if fd is None:
            continue
        if fd == DEVNULL:
            actions.append((os.POSIX_SPAWN_OPEN, target, os.devnull, os.O_RDWR, 0))
        elif fd == STDOUT and target == 2:
            actions.append((os.POSIX_SPAWN_DUP2, 1, 2))
        elif fd >= 0:
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))  # the same number: glibc clears CLOEXEC
        else:
            raise ValueError(f"stream {stream!r} cannot be given to a spawned child")
    kept = {0, 1, 2}
    for target, source in (*((fd, fd) for fd in pass_fds), *(move_fds or {}).items()):
        actions.append((os.POSIX_SPAWN_DUP2, source, target))
        kept.add(target)
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = range(3, _open_max())
    for fd in open_fds:
        if fd not in kept:
            try:
                if os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
            except OSError:
                pass  # not open (the listing's own descriptor)
    environment = os.environ if env is None else env
    masked = {} if sigmask is None else {"setsigmask": sigmask}
    if cwd is None:
        return os.posix_spawn(argv[0], argv, environment, file_actions=actions, setsid=new_session,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), **masked)
    here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(cwd)
        try:
            return os.posix_spawn(argv[0], argv, environment, file_actions=actions, setsid=new_session,
                                  setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), **masked)
        finally:
            os.fchdir(here)
    finally:
        os.close(here)


class Child:
    """A program :func:`start` started: the part of ``subprocess.Popen`` berth uses (``pid``,
    ``args``, ``returncode`` once reaped, ``poll``, ``wait``, ``send_signal``, ``terminate``,
    ``kill``). Its pid stays its own until it is reaped here, so a signal never reaches a
    recycled pid."""

    __slots__ = ("pid", "args", "returncode")
    stdin = stdout = stderr = None  # no pipes: those children are subprocess.Popen

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"Child(pid={self.pid}, args={self.args!r}, returncode={self.returncode})"

    def _reaped(self, raw: int) -> int:
        self.returncode = os.waitstatus_to_exitcode(raw)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, raw = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: nothing more to learn
                self.returncode = 0
            else:
                if pid:
                    self._reaped(raw)
        return self.returncode

    def _wait(self, timeout: float | None) -> bool:
        """Reap the child, waiting at most ``timeout`` seconds (None: as long as it takes);
        False when it still runs then. Woken by its exit (a pidfd), not by polling."""
        if self.returncode is not None:
            return True
        if timeout is None:
            try:
                self._reaped(os.waitpid(self.pid, 0)[1])
            except ChildProcessError:
                self.returncode = 0
            return True
        deadline = time.monotonic() + timeout
        try:
            pidfd = os.pidfd_open(self.pid)
        except (OSError, AttributeError):
            pidfd = None
        try:
            delay = 0.0005
            while self.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if pidfd is not None:
                    import select

                    select.select([pidfd], [], [], left)
                else:
                    time.sleep(min(delay, left))
                    delay = min(delay * 2, 0.05)
            return True
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def wait(self, timeout: float | None = None) -> int:
        """The child's return code (-N: killed by signal N), once it has ended; with
        ``timeout``, ``subprocess.TimeoutExpired`` when it still runs then (as Popen's)."""
        if not self._wait(timeout):
            import subprocess

            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def wait_or_kill(child: Child | subprocess.Popen, timeout_s: float) -> int:
    """Wait at most ``timeout_s`` for ``child`` to end, then kill it (SIGKILL) and reap it;
    return its return code. For daemons told to stop (a FUSE daemon after its unmount)."""
    if isinstance(child, Child):
        if not child._wait(timeout_s):
            child.kill()
        return child.wait()
    import subprocess

    try:
        return child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


#: Signals a waiting berth passes on to its child instead of dying of them.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGWINCH,
)
#: Signals that ask the child to stop: the first starts the stop timer of :func:`wait_forwarding`.
TIMED_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: Signals that ask berth to stop before it has a child to pass them on to (:func:`raise_on_stop`).
STOP_SIGNALS = TIMED_STOP_SIGNALS
#: Signals meant for the command (Slurm's ``--signal=USR1@60`` before a time limit): their
#: default action ends a process, so before the command runs, and while berth tears down, berth
#: must neither die of them (leaving mounts) nor pass them anywhere: :func:`raise_on_stop`
#: catches them with a handler that does nothing (not SIG_IGN, which programs berth starts
#: would inherit).
HELD_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class StopRequested(BaseException):
    """Raised by the handlers :func:`raise_on_stop` installs: a stop signal arrived before the
    child it was meant for runs, so ``finally`` blocks unwind (unmount) instead of berth dying.
    A BaseException: no ``except Exception`` on the way may swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    del frame
    raise StopRequested(signum)


@functools.cache
def _prctl():
    """libc's prctl, resolved once (ctypes): a child between fork and exec calls it without
    importing or loading anything, which another thread may hold a lock for."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """In a forked child: have the kernel send ``signum`` when the parent dies (prctl
    PR_SET_PDEATHSIG); a parent gone already (before the call) sends it at once. Without it a
    child supervising a container outlives a parent killed with SIGKILL, and nothing stops it
    (issue 8). The one way berth ties a process's life to its own: :func:`start` and
    :func:`run` give it to programs with ``parent_death``."""
    if _prctl()(1, signum, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        import ctypes

        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)


def _dying_with_this_thread(signum: int, mask) -> Callable[[], None]:
    """``preexec_fn`` for a program that gets ``signum`` when berth (the thread that starts it)
    dies: the signal mask berth had before it blocked its stop signals for the start, then
    :func:`die_with_parent`. ``setpriv --pdeathsig``, used before, cannot close the window
    between its start and its prctl: a berth killed in it left the program running (21 of 40
    tries, a parent ending right after the start; met by CI as an unsquashfs writing on after
    ``kill -9``)."""
    parent = os.getpid()
    _prctl()

    def setup() -> None:
        # A handler of berth's (raise_on_stop's, which only sets a flag for Python code this
        # child never runs again) would take the signal if berth died between the prctl and the
        # exec, and the program would run on: the default action until the exec, which resets
        # a caught signal to it anyway (review 11). An ignored one stays ignored, as exec keeps it.
        if callable(signal.getsignal(signum)):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        die_with_parent(parent, signum)

    return setup


def become_subreaper(on: bool = True) -> bool:
    """Make this process a child subreaper (prctl PR_SET_CHILD_SUBREAPER), or no longer one: a
    process below a subreaper whose parent dies is reparented to it, not to init. False where
    the kernel refuses."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0) == 0  # 36 = PR_SET_CHILD_SUBREAPER


def children_by_parent(proc: str = "/proc") -> dict[int, list[int]]:
    """Every process's children, by parent pid, from one scan of ``proc``: the one walk of the
    process tree (a process that ends while it is read is left out)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fields = stat_fields(entry, proc=proc)
        if fields and len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


#: What a detached process ignores: the terminal's signals (it has none after setsid, but a
#: process group id can be reused) and a hang-up; SIGTERM and the rest stay fatal.
_DETACHED_IGNORES = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def fork_detached(body: Callable[[], None], *, name: str = "") -> int:
    """Run ``body()`` in a process detached from the caller and return its pid: forked twice
    (its parent is the system's reaper, never the caller, which has no zombie to wait for), in
    a new session (no controlling terminal, out of the caller's process group), working
    directory ``/``, every descriptor closed and 0, 1, 2 on /dev/null (it never holds the
    caller's output, a pipe of ``$(...)`` included; when this returns, no process holds a copy
    of the caller's descriptors or their locks), signal handlers and mask at their defaults
    but :data:`_DETACHED_IGNORES`, no parent-death signal, ``name`` as its command name
    (``ps``). It exits when ``body`` returns or raises, never returning into the caller's code.

    Only the calling thread exists in the child: ``body`` must use what is already imported.
    Raises OSError when the fork fails."""
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    if middle == 0:
        status = 1
        try:
            os.setsid()
            # The caller's descriptors go here, before the second fork: the caller returns once
            # this process has exited, and then nobody holds a copy of them (its locks: a
            # container's state lock, an image's mount lock), however late the detached
            # process is scheduled.
            write_end = _keep_only(write_end)
            pid = os.fork()
            if pid:
                os.write(write_end, str(pid).encode())
                status = 0
            else:
                _become_detached(name)
                body()
                status = 0
        except BaseException:  # noqa: BLE001 - never return into the caller's code
            pass
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        pid_text = os.read(read_end, 32)
    finally:
        os.close(read_end)
        os.waitpid(middle, 0)
    if not pid_text:
        raise OSError("the detached process could not be started")
    return int(pid_text)


def _keep_only(keep: int) -> int:
    """Close every descriptor but ``keep`` (returned, moved to 3 or above) and put 0, 1, 2 on
    /dev/null."""
    import fcntl

    keep = fcntl.fcntl(keep, fcntl.F_DUPFD, 3)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, keep)
    os.closerange(keep + 1, _open_max())
    return keep


def _open_max() -> int:
    return os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536


def _become_detached(name: str) -> None:
    import gc

    gc.disable()  # no finalizer of the caller's objects runs here (their descriptors are closed)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, _open_max())
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(signum, signal.SIG_IGN if signum in _DETACHED_IGNORES else signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    if name:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME


def _held(signum, frame):
    del signum, frame


def raise_on_stop(*, replace_installed: bool = False) -> dict:
    """Make :data:`STOP_SIGNALS` raise :class:`StopRequested` and :data:`HELD_SIGNALS` do
    nothing; return the previous handlers for :func:`restore_handlers`. Handlers a caller
    installed are kept unless ``replace_installed`` (only the default ones are replaced)."""
    previous = {}
    for signums, handler in ((STOP_SIGNALS, _raise_stop), (HELD_SIGNALS, _held)):
        for signum in signums:
            current = signal.getsignal(signum)
            if replace_installed or current in (signal.SIG_DFL, signal.default_int_handler):
                previous[signum] = signal.signal(signum, handler)
    return previous


def ignore_stop() -> dict:
    """Ignore :data:`STOP_SIGNALS` (a clean-up that must finish: a second Ctrl-C must not
    leave mounts behind); return the previous handlers for :func:`restore_handlers`."""
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}


def restore_handlers(previous: Mapping) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def pass_on(signum: int, pid: int | None) -> None:
    """Send ``signum``, a signal berth received, to the child ``pid`` it is meant for (None: no
    child now); a child that has just ended is no error. The one forwarding of a signal, used
    by :func:`wait_forwarding`'s handler and the job runner's (berth.jobs.runner.Supervisor,
    whose children come and go by phase, so it cannot wait in wait_forwarding)."""
    if pid is None:
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class _Wake(Exception):
    """Raised by :func:`wait_forwarding`'s handlers to interrupt its wait."""


def wait_forwarding(child: Child | subprocess.Popen, *, stop_timeout_s: float | None = None,
                    on_stop_timeout: Callable[[], None] | None = None) -> int:
    """Wait for ``child`` and return its shell-style status, passing every signal of
    :data:`FORWARDED_SIGNALS` berth receives meanwhile on to it. With ``on_stop_timeout``, it
    is called once when the child still runs ``stop_timeout_s`` seconds after the first of
    :data:`TIMED_STOP_SIGNALS` (to kill it harder). A signal ignored when the wait starts (the
    caller's ``nohup``) stays ignored, not forwarded. The previous handlers are restored."""
    status: dict = {"deadline": None, "waiting": False, "fired": False}

    def forward(signum, frame):
        del frame
        pass_on(signum, child.pid)
        if (on_stop_timeout is not None and signum in TIMED_STOP_SIGNALS
                and status["deadline"] is None):
            timeout = stop_timeout_s or 0.0
            status["deadline"] = time.monotonic() + timeout
            signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001))
        if status["waiting"]:
            raise _Wake()

    def alarm(signum, frame):
        del signum, frame
        if status["waiting"]:
            raise _Wake()

    # A signal ignored now stays ignored (never forwarded, no stop timer): the caller's, as
    # berth ignores none of these before a wait (nohup's SIGHUP, SIGINT and SIGQUIT of a
    # background job of a non-interactive shell). A handler installed over it forwarded the
    # hang-up of `nohup berth run`, and the stop timeout killed the container (review 10).
    # berth-front.c's execute() leaves them so too.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS
                if signal.getsignal(sig) != signal.SIG_IGN}
    if on_stop_timeout is not None:
        previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, alarm)
    try:
        while True:
            try:
                status["waiting"] = True
                _, raw = os.waitpid(child.pid, 0)
                status["waiting"] = False
                child.returncode = os.waitstatus_to_exitcode(raw)
                return shell_status(child.returncode)
            except _Wake:
                status["waiting"] = False
            except ChildProcessError:
                status["waiting"] = False
                return shell_status(child.wait())
            deadline = status["deadline"]
            if deadline is not None and time.monotonic() >= deadline and not status["fired"]:
                status["fired"] = True
                on_stop_timeout()
    finally:
        if on_stop_timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        restore_handlers(previous)


# Exit statuses. Three encodings meet in berth: a subprocess ``returncode`` (-N for signal N),
# a raw wait status (os.waitpid), and the shell-style status berth reports and exits with
# (128+N for signal N). These helpers are the only place that converts between them.

def describe_status(returncode: int) -> str:
    """'exit status 3' or 'killed by signal SIGKILL' for a subprocess return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit status {returncode}"


def shell_status(returncode: int) -> int:
    """Map a subprocess return code to a shell-style exit status (128+N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def signal_status(signum: int) -> int:
    """The shell-style status of a process killed by (or stopped for) signal ``signum``."""
    return 128 + signum


def wait_status(raw: int) -> int:
    """The shell-style status of a raw wait status (``os.waitpid``)."""
    return shell_status(os.waitstatus_to_exitcode(raw))


def split_status(status: int) -> tuple[int | None, int | None]:
    """Split a shell-style status into (exit code, signal): 3 -> (3, None), 137 -> (None, 9)."""
    if status > 128:
        return None, status - 128
    return status, None


def describe_shell_status(status: int) -> str:
    """:func:`describe_status` of a shell-style status: 137 -> 'killed by signal SIGKILL'."""
    code, signum = split_status(status)
    return describe_status(code if signum is None else -signum)
