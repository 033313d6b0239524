"""berth.proc starts programs with posix_spawn (issue 10): the child gets what subprocess gave
it -- only the descriptors passed, default SIGPIPE/SIGXFSZ, the streams asked for -- and run()
reads both pipes without stalling, times out, and reports like before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from berth import proc
from berth.errors import ProgramFailed

PYTHON = sys.executable
LIST_FDS = "import os; print(' '.join(sorted(os.listdir('/proc/self/fd'), key=int)))"


def _open_fds(output: bytes) -> set[int]:
    # the listing's own descriptor (3 or above, just closed) is in it: keep what the test names
    return {int(fd) for fd in output.split()}


def test_a_started_child_gets_only_the_descriptors_passed(tmp_path):
    inherited = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inherited, True)  # as one berth itself was started with
    private = os.open(os.devnull, os.O_RDONLY)  # close-on-exec, as berth opens everything
    passed = os.open(os.devnull, os.O_RDONLY)
    moved = os.open(os.devnull, os.O_RDONLY)
    target = max(inherited, private, passed, moved) + 5
    try:
        with open(tmp_path / "out", "wb") as out:
            child = proc.start([PYTHON, "-c", LIST_FDS], stdout=out, pass_fds=(passed,), move_fds={target: moved})
            assert isinstance(child, proc.Child)
            assert child.wait() == 0
        fds = _open_fds((tmp_path / "out").read_bytes())
        assert {0, 1, 2, passed, target} <= fds
        assert inherited not in fds and private not in fds and moved not in fds
        assert os.get_inheritable(inherited)  # berth's own descriptors are left as they were
    finally:
        for fd in (inherited, private, passed, moved):
            os.close(fd)


def test_run_gives_the_child_default_sigpipe_and_sigxfsz():
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # Python's own, which a child must not keep
    result = proc.run(["/bin/grep", "^SigIgn", "/proc/self/status"])
    ignored = int(result.stdout.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))


def test_a_working_directory_is_the_childs_and_berths_stays(tmp_path):
    before = os.getcwd()
    result = proc.run(["/bin/pwd"], cwd=str(tmp_path))
    assert result.stdout.decode().strip() == str(tmp_path)
    assert os.getcwd() == before


def test_run_reads_both_pipes_without_stalling_the_child():
    script = "import sys; sys.stdout.write('o' * 300000); sys.stderr.write('e' * 300000); sys.exit(3)"
    result = proc.run([PYTHON, "-c", script], check=False)
    assert (result.returncode, len(result.stdout), len(result.stderr)) == (3, 300000, 300000)
    merged = proc.run([PYTHON, "-c", script], check=False, stderr=proc.STDOUT)
    assert (len(merged.stdout), merged.stderr) == (600000, None)


def test_run_failure_and_timeout_name_the_program_and_its_stderr():
    with pytest.raises(ProgramFailed, match=r"python3?\S* failed \(exit status 2\): broken"):
        proc.run([PYTHON, "-c", "import sys; sys.stderr.write('broken'); sys.exit(2)"])
    started = time.monotonic()
    with pytest.raises(ProgramFailed, match=r"slow did not finish within 0.3 s: waiting"):
        proc.run([PYTHON, "-c", "import sys, time; sys.stderr.write('waiting'); sys.stderr.flush(); time.sleep(60)"],
                 timeout=0.3, what="slow")
    assert time.monotonic() - started < 30
    killed = proc.run([PYTHON, "-c", "import os; os.kill(os.getpid(), 9)"], check=False)
    assert killed.returncode == -signal.SIGKILL


def test_child_wait_times_out_like_popen_and_wait_or_kill_ends_it():
    child = proc.start([PYTHON, "-c", "import time; time.sleep(60)"])
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.05)
    assert child.poll() is None
    assert proc.wait_or_kill(child, 0.05) == -signal.SIGKILL
    child.kill()  # reaped: no signal to a pid that may be someone else's now
    quick = proc.start(["/bin/true"])
    assert proc.wait_or_kill(quick, 10) == 0


def test_run_with_input_or_a_stdin_pipe_still_works():
    assert proc.run(["/bin/cat"], input=b"fed").stdout == b"fed"
    assert proc.run(["/bin/cat"], stdin=proc.PIPE).stdout == b""  # an empty pipe, closed at once


def test_a_pipe_asked_for_gives_a_popen_with_its_file():
    child = proc.start([PYTHON, "-c", "print('through the pipe')"], stdout=proc.PIPE)
    try:
        assert child.stdout.read() == b"through the pipe\n"
    finally:
        child.wait()


def test_run_and_start_import_no_subprocess():
    code = ("import sys\nfrom berth import proc\n"
            "proc.run(['/bin/true']); proc.run(['/bin/echo', 'x'], stderr=proc.STDOUT, timeout=10)\n"
            "proc.wait_or_kill(proc.start(['/bin/true'], new_session=True, cwd='/'), 10)\n"
            "print(sorted(m for m in ('subprocess', 'threading', 'selectors', 'shutil') if m in sys.modules))\n")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


#: A stop signal (SIGTERM, raise_on_stop's StopRequested) arriving as posix_spawn returns: the
#: wrapper sends it right after the real call, before berth's code has the pid.
SIGNALLED_AS_SPAWNED = """\
import os, signal, sys
from berth import proc
proc.raise_on_stop()
real, spawned = os.posix_spawn, []
def spawn_then_signalled(*args, **kwargs):
    spawned.append(real(*args, **kwargs))
    os.kill(os.getpid(), signal.SIGTERM)
    return spawned[-1]
os.posix_spawn = spawn_then_signalled
try:
    if sys.argv[1] == "start":
        proc.start(["/bin/sleep", "60"])
    else:
        proc.run(["/bin/sleep", "60"])
    print("not stopped")
except proc.StopRequested:
    print("stopped")
try:
    pid, _ = os.waitpid(spawned[0], os.WNOHANG)
    print("left running" if pid == 0 else "left for its parent to reap")
    os.kill(spawned[0], signal.SIGKILL)
except ChildProcessError:
    print("killed and reaped")
"""


@pytest.mark.parametrize("how", ["start", "run"])
def test_a_stop_signal_as_the_child_is_spawned_does_not_lose_it(how):
    """A stop signal whose handler raised between posix_spawn and storing the pid lost the
    child: never killed nor waited for, it ran on after berth stopped."""
    result = subprocess.run([PYTHON, "-c", SIGNALLED_AS_SPAWNED, how], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["stopped", "killed and reaped"], result.stdout + result.stderr


def test_a_spawned_child_gets_berths_signal_mask_not_the_spawns():
    """The stop signals are blocked in berth while it spawns: the child must not keep them so."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        result = proc.run(["/bin/grep", "^SigBlk", "/proc/self/status"])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    blocked = int(result.stdout.split()[1], 16)
    assert blocked == 1 << (signal.SIGUSR2 - 1), hex(blocked)

