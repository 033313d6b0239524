"""berth.proc owns signal forwarding to children and the exit-status encodings (issue 9)."""

import os
import signal
import sys
import threading
import time

import pytest

from berth import proc

#: A child that reports the signals it gets on stdout and exits 7 after SIGUSR1.
CHILD = (
    "import signal, sys, time\n"
    "def on(signum, frame):\n"
    "    print(signal.Signals(signum).name, flush=True)\n"
    "    if signum == signal.SIGUSR1: sys.exit(7)\n"
    "for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1): signal.signal(s, on)\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(0.05)\n"
)


def start_child():
    import subprocess

    child = proc.start([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"ready\n"
    return child


def signal_later(*signals, delay_s=0.2):
    def send():
        for signum in signals:
            time.sleep(delay_s)
            os.kill(os.getpid(), signum)
    threading.Thread(target=send, daemon=True).start()


def test_signals_to_berth_reach_the_child_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR2)
    child = start_child()
    signal_later(signal.SIGUSR2, signal.SIGUSR1)
    assert proc.wait_forwarding(child) == 7
    assert child.stdout.read().split() == [b"SIGUSR2", b"SIGUSR1"]
    assert signal.getsignal(signal.SIGUSR2) is before


def test_pass_on_is_the_one_forwarding_and_a_child_gone_or_missing_is_no_error():
    """proc.pass_on forwards a signal berth received to the child it is meant for: the one
    implementation behind wait_forwarding and the job runner's SIGUSR1/SIGUSR2 (sbatch
    --signal=B:USR1: the runner is the batch shell, the script runs in its child)."""
    child = start_child()
    proc.pass_on(signal.SIGUSR2, child.pid)
    assert child.stdout.readline() == b"SIGUSR2\n"
    proc.pass_on(signal.SIGUSR1, None)  # no child now (between the job's phases): nothing, and no error
    proc.pass_on(signal.SIGUSR1, child.pid)
    assert child.wait(10) == 7
    proc.pass_on(signal.SIGUSR1, child.pid)  # reaped: no such process any more


def test_the_job_runner_passes_usr1_and_usr2_on_to_the_child_of_its_phase(tmp_path, monkeypatch):
    """berth.jobs.runner.Supervisor: SIGUSR1/SIGUSR2 go to the child of the current phase
    through proc.pass_on; SIGTERM/SIGINT/SIGHUP are recorded, not forwarded (the supervision
    loop stops the whole job tree and decides cancelled or timeout)."""
    from berth.jobs.runner import Supervisor

    sent: list = []
    monkeypatch.setattr(proc, "pass_on", lambda signum, pid: sent.append((signum, pid)))
    supervisor = Supervisor.__new__(Supervisor)
    supervisor._child_pid, supervisor._signalled = 4242, None
    supervisor._pass_on(signal.SIGUSR1, None)
    supervisor._child_pid = None
    supervisor._pass_on(signal.SIGUSR2, None)
    supervisor._on_signal(signal.SIGTERM, None)
    supervisor._on_signal(signal.SIGINT, None)
    assert sent == [(signal.SIGUSR1, 4242), (signal.SIGUSR2, None)]
    assert supervisor._signalled == signal.SIGTERM


def test_stop_timeout_fires_once_when_the_child_ignores_the_stop_signal():
    child = start_child()
    fired = []

    def kill():
        fired.append(time.monotonic())
        child.kill()

    signal_later(signal.SIGTERM)
    started = time.monotonic()
    assert proc.wait_forwarding(child, stop_timeout_s=0.3, on_stop_timeout=kill) == 128 + signal.SIGKILL
    assert len(fired) == 1 and fired[0] - started >= 0.45
    assert child.stdout.read().split() == [b"SIGTERM"]


def test_a_signal_ignored_when_the_wait_starts_stays_ignored_and_starts_no_stop_timer():
    """`nohup berth ...`: SIGHUP is SIG_IGN when berth starts; wait_forwarding installed its
    handler over it, forwarded the hang-up and started the stop timer (review 10; the test fails
    before). It stays ignored, and a later SIGUSR1 is still forwarded."""
    child = start_child()
    previous = {signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_IGN),
                signal.SIGUSR1: signal.signal(signal.SIGUSR1, lambda signum, frame: None)}  # a late one
    fired = []

    def send():
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            time.sleep(0.3)
            os.kill(os.getpid(), signum)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        status = proc.wait_forwarding(child, stop_timeout_s=0.01, on_stop_timeout=lambda: fired.append(1))
        ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        sender.join()
        child.kill()
        proc.restore_handlers(previous)
    assert (status, ignored, fired) == (7, True, [])
    assert child.stdout.read().split() == [b"SIGUSR1"]


def test_raise_on_stop_keeps_a_callers_handler_unless_told():
    mine = signal.signal(signal.SIGHUP, lambda *_: None)
    try:
        previous = proc.raise_on_stop()
        assert signal.SIGHUP not in previous
        proc.restore_handlers(previous)
        previous = proc.raise_on_stop(replace_installed=True)
        with pytest.raises(proc.StopRequested) as stopped:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
        assert stopped.value.signum == signal.SIGHUP
        proc.restore_handlers(previous)
    finally:
        signal.signal(signal.SIGHUP, mine)


@pytest.mark.parametrize("status,split,words", [
    (0, (0, None), "exit status 0"), (3, (3, None), "exit status 3"), (128, (128, None), "exit status 128"),
    (137, (None, 9), "killed by signal SIGKILL"), (143, (None, 15), "killed by signal SIGTERM"),
])
def test_shell_status_encodings(status, split, words):
    assert proc.split_status(status) == split
    assert proc.describe_shell_status(status) == words


def test_wait_status_and_returncode_agree():
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    _, raw = os.waitpid(pid, 0)
    assert proc.wait_status(raw) == proc.shell_status(-signal.SIGKILL) == proc.signal_status(signal.SIGKILL) == 137


def test_die_with_parent_stops_a_forked_child_when_its_parent_is_killed(tmp_path):
    """The job runner's forked supervisor must not outlive a runner killed with SIGKILL
    (issue 8, scenario 3: the container ran on while the job showed as failed)."""
    import subprocess
    import sys
    import textwrap
    import time

    pid_file = tmp_path / "child.pid"
    middle = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        from berth import proc
        parent = os.getpid()
        if os.fork() == 0:
            proc.die_with_parent(parent)
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """)])
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    child = int(pid_file.read_text())
    middle.kill()
    middle.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        os.kill(child, 9)
        raise AssertionError("the child outlived its parent")


def test_parent_death_leaves_no_window_between_the_start_and_the_prctl(tmp_path):
    """A berth that dies right after starting a program with ``parent_death`` takes it along,
    however soon it dies: ``setpriv --pdeathsig``, used before, set the signal only once it had
    started, and a parent dead by then left the program running (21 of 40 tries like these; CI
    met it as an unsquashfs writing on after ``kill -9`` of berth)."""
    import subprocess
    import textwrap

    tag = f"berth-parent-death-{os.getpid()}"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from berth import proc
        for index in range(20):
            if os.fork() == 0:
                try:
                    proc.start(["sh", "-c", "sleep 60; : {tag}"], parent_death=signal.SIGKILL)
                finally:
                    os._exit(0)
            os.wait()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    deadline = time.monotonic() + 5
    while (left := subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True).stdout.split()):
        if time.monotonic() > deadline:
            subprocess.run(["pkill", "-KILL", "-f", tag])
            raise AssertionError(f"{len(left)} of 20 programs outlived the berth that started them")
        time.sleep(0.05)


#: An execve that waits a second once it has left a mark: the window before the exec, widened.
SHIM = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int execve(const char *path, char *const argv[], char *const envp[]) {
    const char *mark = getenv("REVIEW_MARK");
    if (mark) {
        int fd = open(mark, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0) { write(fd, "x", 1); close(fd); }
        struct timespec t = {1, 0};
        nanosleep(&t, NULL);
    }
    return syscall(SYS_execve, path, argv, envp);
}
"""


@pytest.mark.parametrize("handler", ["raise_on_stop", "default"])
def test_parent_death_sigterm_in_the_last_window_before_exec_is_not_lost(tmp_path, handler):
    """A parent-death SIGTERM that comes between the prctl and the exec was caught by the
    handler berth has for it then (raise_on_stop, as ``berth run`` has while it mounts and
    starts the runtime), which only sets a flag for Python code the child never runs again:
    the program ran on without its parent. The window (microseconds) is widened by an
    LD_PRELOAD that sleeps in execve (review 11; the raise_on_stop case fails before)."""
    import subprocess
    import textwrap

    (tmp_path / "shim.c").write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"), str(tmp_path / "shim.c")], check=True)
    tag = f"review11-pdeath-{os.getpid()}-{handler}"
    mark = tmp_path / "mark"
    script = textwrap.dedent(f"""
        import os, signal, time
        from berth import proc
        if {handler == "raise_on_stop"}:
            proc.raise_on_stop()
        proc.start(["sh", "-c", "sleep 30; : {tag}"], env={{"PATH": os.environ["PATH"]}},
                   parent_death=signal.SIGTERM)
        time.sleep(60)
    """)
    env = dict(os.environ, LD_PRELOAD=str(tmp_path / "shim.so"), REVIEW_MARK=str(mark))
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 20
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mark.exists()
    parent.kill()  # berth killed (kill -9) while its child is between the preexec function and the exec
    parent.wait()
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True).stdout.split()
    for pid in left:
        os.kill(int(pid), signal.SIGKILL)
    assert not left, "the program outlived the berth that started it"


def test_parent_death_programs_get_berths_signal_mask_and_output():
    """The stop signals blocked while the child is made are unblocked in it again (a program
    that ignored SIGTERM could not be stopped), and ``run`` still captures, checks and times out."""
    import subprocess

    child = proc.start(["sh", "-c", "grep SigBlk /proc/self/status; exec sleep 60"], stdout=subprocess.PIPE,
                       parent_death=signal.SIGTERM)
    try:
        assert int(child.stdout.readline().split()[1], 16) == 0
    finally:
        child.terminate()
        assert child.wait(timeout=10) == -signal.SIGTERM
        child.stdout.close()
    result = proc.run(["sh", "-c", "echo out; echo err >&2"], parent_death=signal.SIGKILL)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"out\n", b"err\n")
    result = proc.run(["cat"], input=b"fed", parent_death=signal.SIGKILL)
    assert result.stdout == b"fed"
    with pytest.raises(proc.ProgramFailed, match="failed .*exit.*3.*: nope"):
        proc.run(["sh", "-c", "echo nope >&2; exit 3"], parent_death=signal.SIGKILL)
    with pytest.raises(proc.ProgramFailed, match="did not finish within 0.2 s"):
        proc.run(["sleep", "30"], parent_death=signal.SIGKILL, timeout=0.2)


def test_replace_with_becomes_the_program_in_the_same_process():
    """``berth srun`` hands over to srun with replace_with: same pid (the terminal's signals
    reach srun once, not once directly and once more through a wrapper), srun's exit status."""
    import subprocess

    script = ("import os, sys\nfrom berth import proc\nprint(os.getpid(), flush=True)\n"
              "proc.replace_with(['sh', '-c', 'echo $$; exit 7'], env=proc.child_env())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    python_pid, shell_pid = done.stdout.split()
    assert (done.returncode, python_pid) == (7, shell_pid)


def test_replace_with_a_missing_program_is_a_clear_error():
    with pytest.raises(proc.ProgramNotFound, match="'no-such-program-berth' is not installed"):
        proc.replace_with(["no-such-program-berth"], env={})


HOLDING = (
    "import os, signal, sys\n"
    "from berth import proc\n"
    "previous = proc.raise_on_stop()\n"
    "for signum in (signal.SIGUSR1, signal.SIGUSR2):\n"
    "    os.kill(os.getpid(), signum)\n"
    "print('alive after USR1 and USR2', flush=True)\n"
    "try:\n"
    "    os.kill(os.getpid(), signal.SIGQUIT)\n"
    "except proc.StopRequested as stop:\n"
    "    print('stop requested by', signal.Signals(stop.signum).name, flush=True)\n"
    "proc.restore_handlers(previous)\n"
    "print(signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, flush=True)\n"
)


def test_before_the_command_runs_usr1_usr2_do_not_kill_berth_and_quit_unwinds():
    """Issue 8 audit: `berth run` (and a job's container child) died of SIGUSR1/SIGUSR2 (Slurm's
    --signal=USR1@60, sent to every task) or SIGQUIT during start-up or teardown, default
    action, leaving its mounts and container directory; now the first two are held (a handler,
    not SIG_IGN that runc and the command would inherit) and SIGQUIT unwinds like SIGTERM."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", HOLDING], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == ["alive after USR1 and USR2", "stop requested by SIGQUIT", "True"]


#: A caller that starts a detached process which writes what it finds into a report file, waits
#: for a go file, and exits: run with its stdout on a pipe, as `$(berth run ...)` does.
DETACHED_CALLER = (
    "import json, os, signal, sys, time\n"
    "from berth import proc\n"
    "report, go = sys.argv[1], sys.argv[2]\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what a teardown under proc.ignore_stop has\n"
    "def body():\n"
    "    facts = {'pid': os.getpid(), 'sid': os.getsid(0), 'ppid': os.getppid(),\n"
    "             'fds': sorted(int(fd) for fd in os.listdir('/proc/self/fd')),\n"
    "             'stdout': os.readlink('/proc/self/fd/1'), 'cwd': os.getcwd(),\n"
    "             'term': signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,\n"
    "             'int': signal.getsignal(signal.SIGINT) == signal.SIG_IGN,\n"
    "             'comm': open('/proc/self/comm').read().strip()}\n"
    "    with open(report + '.tmp', 'w') as handle: json.dump(facts, handle)\n"
    "    os.rename(report + '.tmp', report)\n"
    "    while not os.path.exists(go): time.sleep(0.01)\n"
    "pid = proc.fork_detached(body, name='berth-test')\n"
    "print(pid, os.getpid(), os.getsid(0), flush=True)\n"
)


def test_fork_detached_leaves_nothing_of_the_caller_open_and_is_in_its_own_session(tmp_path):
    import json
    import subprocess

    report, go = tmp_path / "report", tmp_path / "go"
    started = time.monotonic()
    # capture_output: the call returns only when every holder of the pipe closed it.
    result = subprocess.run([sys.executable, "-c", DETACHED_CALLER, str(report), str(go)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    pid, caller, caller_session = (int(word) for word in result.stdout.split())
    try:
        deadline = time.monotonic() + 10
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        facts = json.loads(report.read_text())
        # A session of its own (whose leader, gone, was its parent: it can never get a terminal).
        assert facts["pid"] == pid and facts["sid"] not in (caller_session, pid) and facts["ppid"] != caller
        assert facts["fds"][:3] == [0, 1, 2] and len(facts["fds"]) <= 4  # the listing's own fd
        assert facts["stdout"] == "/dev/null" and facts["cwd"] == "/"
        assert facts["term"] and facts["int"] and facts["comm"] == "berth-test"
    finally:
        go.write_text("")
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"


DETACHED_LOCKER = (
    "import fcntl, os, sys, time\n"
    "from berth import proc\n"
    "lock_path, go = sys.argv[1], sys.argv[2]\n"
    "fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)  # a lock the caller holds while it forks (a container's state lock)\n"
    "become = proc._become_detached\n"
    "def slow_become(name):  # a loaded node: the detached process is scheduled late\n"
    "    time.sleep(3)\n"
    "    become(name)\n"
    "proc._become_detached = slow_become\n"
    "def body():\n"
    "    while not os.path.exists(go): time.sleep(0.01)\n"
    "pid = proc.fork_detached(body, name='berth-test')\n"
    "os.close(fd)  # the caller lets the lock go: nobody holds it now\n"
    "other = os.open(lock_path, os.O_RDWR)\n"
    "try:\n"
    "    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "    print(pid, 'free', flush=True)\n"
    "except BlockingIOError:\n"
    "    print(pid, 'held', flush=True)\n"
)


def test_fork_detached_returns_with_no_copy_of_the_callers_descriptors_left_anywhere(tmp_path):
    """A lock the caller drops right after fork_detached returns is free at once: neither the
    intermediate process nor the detached one still holds the caller's descriptor (a reaper of
    a lingering image mount is forked while berth holds the container's and the mount's locks;
    a copy held until the detached process got round to closing it kept them taken)."""
    import subprocess

    go = tmp_path / "go"
    try:
        result = subprocess.run([sys.executable, "-c", DETACHED_LOCKER, str(tmp_path / "lock"), str(go)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        pid, state = result.stdout.split()
        assert state == "free"
    finally:
        go.write_text("")


def test_stat_fields_skip_a_command_name_with_spaces_and_parentheses(tmp_path):
    """berth.proc.stat_fields, the one reader of /proc/PID/stat (start times, zombies, parents,
    sessions): a process may name itself ``x) R 1 2`` and must not shift the fields."""
    from berth import proc

    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_bytes(b"42 (x) R 1 2 (evil)) S 7 42 42 0 -1\n")
    assert proc.stat_fields(42, proc=str(tmp_path))[:4] == ["S", "7", "42", "42"]
    assert proc.stat_fields(43, proc=str(tmp_path)) is None  # gone
    assert proc.stat_fields(os.getpid())[1] == str(os.getppid())
