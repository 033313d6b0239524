"""berth-launcher ``run`` on crafted config.json files, as the unprivileged test user.

The launcher executes whatever config.json berth hands it; these configs are hostile or odd on
purpose (values berth would not write today, kernels it may meet), so that a defect shows as a
failed test here rather than as a crash or a leak in someone's job. ``berth-launcher check``
tests (validation only) are in tests/unit/test_runtime_launcher.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from berth.runtime import ocirt
from tests.harness.fixtures_runtime import process_cmdlines
from tests.harness.users import User

BUSYBOX = "/bin/busybox"


def _bundle(user: User, where: Path, script: str, *, mounts: list[dict] | None = None) -> Path:
    """A bundle in ``where`` (owned by ``user``): a busybox root and a config that runs ``script``."""
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static missing: run scripts/install-system-packages.sh")
    bundle = where / "bundle"
    root = bundle / "rootfs"
    for name in ("bin", "proc", "dev", "tmp"):
        (root / name).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "touch", "test"):
        (root / "bin" / applet).symlink_to("busybox")
    config = {
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": user.uid, "gid": user.gid}, "args": ["/bin/sh", "-c", script],
                    "env": ["PATH=/bin"], "cwd": "/", "noNewPrivileges": True},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "nodev"]},
                   *(mounts or [])],
        "linux": {"uidMappings": [{"containerID": user.uid, "hostID": user.uid, "size": 1}],
                  "gidMappings": [{"containerID": user.gid, "hostID": user.gid, "size": 1}],
                  "namespaces": [{"type": "user"}, {"type": "mount"}, {"type": "pid"}]},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    (where / "state").mkdir(exist_ok=True)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(where)], check=True)
    return bundle


def _run(user: User, where: Path, bundle: Path, **kwargs) -> subprocess.CompletedProcess:
    launcher = ocirt.launcher_path()
    return user.run([str(launcher), "--root", str(where / "state"), "--log", str(where / "log"),
                     "run", "--bundle", str(bundle), "c1"], timeout=60, **kwargs)


def test_a_deep_mount_destination_is_made_not_a_crash(user, user_tmp):
    """open_in_root made missing mount points with one recursion level per component and a
    PATH_MAX buffer on each: about 60 levels overflowed the container child's 256 KiB stack
    (static memory, no guard page), and the child died of SIGSEGV (exit 139, no message)."""
    deep = "/tmp" + "/d" * 300
    bundle = _bundle(user, user_tmp, f"test -d {deep} && echo made",
                     mounts=[{"destination": deep, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}])
    result = _run(user, user_tmp, bundle)
    assert (result.returncode, result.stdout) == (0, "made\n"), (result.returncode, result.stderr)


def _syscall_fails(number: int, error: int):
    """A preexec_fn: a seccomp filter under which system call ``number`` (the same on x86_64
    and aarch64 for the ones used here) fails with ``error``, as on an older kernel."""
    def install() -> None:
        import ctypes
        import struct

        def statement(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
            return struct.pack("HBBI", code, jt, jf, k)

        program = (statement(0x20, 0)                        # load seccomp_data.nr
                   + statement(0x15, number, 0, 1)           # == number?
                   + statement(0x06, 0x00050000 | error)     # SECCOMP_RET_ERRNO | error
                   + statement(0x06, 0x7FFF0000))            # SECCOMP_RET_ALLOW
        buffer = ctypes.create_string_buffer(program)

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        libc = ctypes.CDLL(None, use_errno=True)
        prog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
            raise OSError(ctypes.get_errno(), "seccomp")

    return install


#: close_range(2) failing with EINVAL, as it does on kernels before 5.11 for CLOSE_RANGE_CLOEXEC
#: (Debian 11's 5.10, say).
_close_range_fails = _syscall_fails(436, 22)


def test_descriptors_do_not_leak_into_the_container_when_close_range_fails(user, user_tmp):
    """The launcher marks every descriptor from 3 (+ --preserve-fds) close-on-exec with
    close_range(CLOSE_RANGE_CLOEXEC) and did not check its result: where the kernel refuses the
    flag (before 5.11), every descriptor the launcher inherited reached the container."""
    bundle = _bundle(user, user_tmp, "ls /proc/self/fd")
    secret = os.open(user_tmp / "bundle" / "config.json", os.O_RDONLY)  # inheritable: not CLOEXEC
    try:
        leaked = 30
        os.dup2(secret, leaked)
        result = _run(user, user_tmp, bundle, pass_fds=(leaked,), preexec_fn=_close_range_fails)
    finally:
        os.close(secret)
        os.close(leaked)
    assert result.returncode == 0, result.stderr
    assert str(leaked) not in result.stdout.split(), result.stdout


@pytest.mark.parametrize("how", ["ro bind", "readonlyPaths"])
def test_a_read_only_recursive_bind_is_read_only_below_too(user, user_tmp, how):
    """"rbind","ro","nosuid","nodev" (berth's --mount ...:ro and the site's read-only binds)
    remounted only the top of the bound tree: a file system mounted below the source on the
    host stayed writable (and suid, dev) in the container. linux.readonlyPaths likewise."""
    if os.getuid() != 0:
        pytest.skip("mounting the host file system below the source needs root (the harness runs as root)")
    source = user_tmp / "src"
    (source / "sub").mkdir(parents=True)
    bundle = _bundle(user, user_tmp, "touch /data/top; echo top=$?; touch /data/sub/x; echo sub=$?;"
                     " cat /proc/self/mountinfo",
                     mounts=[{"destination": "/data", "type": "none", "source": str(source),
                              "options": ["rbind", "ro" if how == "ro bind" else "rw", "nosuid", "nodev"]}])
    (bundle / "rootfs" / "data").mkdir()
    if how == "readonlyPaths":
        config = json.loads((bundle / "config.json").read_text())
        config["linux"]["readonlyPaths"] = ["/data"]
        (bundle / "config.json").write_text(json.dumps(config))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0777,size=1m", "tmpfs", str(source / "sub")], check=True)
    try:
        result = _run(user, user_tmp, bundle)
    finally:
        subprocess.run(["umount", "-l", str(source / "sub")], check=True)
    assert result.returncode == 0, result.stderr
    assert "top=1" in result.stdout and "sub=1" in result.stdout, result.stdout
    # The last /data/sub line is the mount on top (a read-only path is bound over itself).
    flags = [line.split()[5].split(",") for line in result.stdout.splitlines() if " /data/sub " in line][-1]
    assert "ro" in flags and (how != "ro bind" or {"nosuid", "nodev"} <= set(flags)), flags


def test_a_directory_in_path_named_like_the_command_is_passed_over(user, user_tmp):
    """exec's PATH search took the first entry access(X_OK) allowed, a directory too (runc's
    search wants a regular file): PATH=/opt/x:/bin with a directory /opt/x/sh failed to start
    ("permission denied") where runc runs /bin/sh."""
    bundle = _bundle(user, user_tmp, "echo ran")
    (bundle / "rootfs" / "opt" / "x" / "sh").mkdir(parents=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["args"][0] = "sh"
    config["process"]["env"] = ["PATH=/opt/x:/bin"]
    (bundle / "config.json").write_text(json.dumps(config))
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(bundle)], check=True)
    result = _run(user, user_tmp, bundle)
    assert (result.returncode, result.stdout) == (0, "ran\n"), result.stderr


def test_what_berth_needs_to_report_a_failure_is_there(user, user_tmp):
    """berth reads the launcher's errors from --log: a log that could not be opened was
    ignored (the container ran, and any later error reached stderr only), and a state
    directory that could not be made was reported without the reason."""
    bundle = _bundle(user, user_tmp, "echo ran")
    launcher = str(ocirt.launcher_path())
    result = user.run([launcher, "--root", str(user_tmp / "state"), "--log", str(user_tmp / "missing" / "log"),
                       "run", "--bundle", str(bundle), "c1"], timeout=60)
    assert result.returncode == 1 and "ran" not in result.stdout, (result.stdout, result.stderr)
    assert f"cannot open the log {user_tmp}/missing/log: no such file or directory" in result.stderr, result.stderr
    (user_tmp / "not-a-directory").write_text("")
    result = user.run([launcher, "--root", str(user_tmp / "not-a-directory"), "--log", str(user_tmp / "log"),
                       "run", "--bundle", str(bundle), "c1"], timeout=60)
    assert result.returncode == 1
    assert "cannot create the state of c1: not a directory" in (user_tmp / "log").read_text()


def _killed_at_its_first_write_open():
    """preexec_fn: a seccomp filter that kills the process at its first openat(2) for writing
    (berth-launcher run without --log opens nothing for writing before the container's uid map:
    it dies right after clone, before it tells the child to go on), and under which
    prctl(PR_SET_PDEATHSIG) fails: the child acts as one that got there after the launcher died."""
    import ctypes
    import struct

    def statement(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    openat, prctl = (257, 157) if os.uname().machine == "x86_64" else (56, 167)
    program = (statement(0x20, 0)                      # 0: A = seccomp_data.nr
               + statement(0x15, openat, 0, 3)         # 1: openat? else 5
               + statement(0x20, 16 + 2 * 8)           # 2: A = args[2] (flags, low half)
               + statement(0x45, 3, 0, 4)              # 3: O_WRONLY or O_RDWR? else allow
               + statement(0x06, 0x80000000)           # 4: SECCOMP_RET_KILL_PROCESS
               + statement(0x15, prctl, 0, 2)          # 5: prctl? else allow
               + statement(0x20, 16)                   # 6: A = args[0]
               + statement(0x15, 1, 1, 0)              # 7: PR_SET_PDEATHSIG? 9, else allow
               + statement(0x06, 0x7FFF0000)           # 8: SECCOMP_RET_ALLOW
               + statement(0x06, 0x00050000 | 1))      # 9: SECCOMP_RET_ERRNO | EPERM
    buffer = ctypes.create_string_buffer(program)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    prog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")


def test_a_launcher_that_dies_before_its_container_starts_leaves_no_process(user, user_tmp):
    """The container's first process waited on the sync pipe for the launcher's "go" while
    holding the pipe's write end itself, so a launcher that died first (before the child's
    PR_SET_PDEATHSIG took effect) left it blocked forever, in its own namespaces."""
    if os.getuid() != 0:
        pytest.skip("runs the launcher as the test user directly (setuid in preexec), which needs root")
    bundle = _bundle(user, user_tmp, "echo started")
    launcher = str(ocirt.launcher_path())
    for attempt in range(2):
        marker = f"orphan-check-{attempt}"
        with open(user_tmp / "output", "w+") as output:  # a file: a survivor holding a pipe would hang run()
            result = subprocess.run([launcher, "--root", str(user_tmp / "state"), "run", "--bundle", str(bundle),
                                     marker], user=user.uid, group=user.gid, extra_groups=[],
                                    env={"PATH": "/usr/bin:/bin"}, preexec_fn=_killed_at_its_first_write_open,
                                    stdin=subprocess.DEVNULL, stdout=output, stderr=output, timeout=30)
        assert result.returncode == -signal.SIGSYS, (result.returncode, (user_tmp / "output").read_text())
        # Its child is the only other process whose command line names this container.
        deadline = time.monotonic() + 10
        while (left := _processes_naming(user, marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:  # our own leftovers, by pid, so that a failure does not leak them
            os.kill(pid, 9)
        assert left == [], f"the container's first process outlived its launcher: {left}"


def _processes_naming(user: User, text: str) -> list[int]:
    return [pid for pid, cmdline in process_cmdlines(user.uid) if text.encode() in cmdline]


@pytest.mark.parametrize("container_id", ['a"b', "a\\b", "a\nb", "a b"])
def test_a_container_id_runc_would_refuse_is_refused(user, user_tmp, container_id):
    """state.json took the id unescaped: an id with a quote or backslash made a state file no
    later kill, state or delete could read (the container could not be stopped by id). runc
    accepts letters, digits and _+-. only; so does the launcher now."""
    bundle = _bundle(user, user_tmp, "echo ran")
    result = user.run([str(ocirt.launcher_path()), "--root", str(user_tmp / "state"), "run", "--bundle", str(bundle),
                       container_id], timeout=60)
    assert result.returncode == 1 and "ran" not in result.stdout, (result.stdout, result.stderr)
    assert "invalid container id" in result.stderr, result.stderr


def test_parent_death_stops_the_container_when_berth_is_killed(user, user_tmp):
    """``--parent-death PID`` replaced ``setpriv --pdeathsig TERM`` in front of the launcher
    (berth.runtime.supervise, issue 10): a parent killed with SIGKILL must still stop the
    container, the launcher passing the SIGTERM on to it."""
    if os.getuid() != 0:
        pytest.skip("runs the launcher as the test user directly (setuid), which needs root")
    bundle = _bundle(user, user_tmp, "trap 'touch /tmp/stopped; exit 0' TERM; touch /tmp/up; "
                                     "while :; do sleep 0.05; done")
    launcher = str(ocirt.launcher_path())
    marker = "parent-death-check"
    parent = subprocess.Popen(
        ["/bin/sh", "-c", 'echo $$; "$0" --parent-death $$ --root "$1" run --bundle "$2" "$3" & wait',
         launcher, str(user_tmp / "state"), str(bundle), marker],
        user=user.uid, group=user.gid, extra_groups=[], env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        shell = int(parent.stdout.readline())
        root = bundle / "rootfs" / "tmp"
        deadline = time.monotonic() + 30
        while not (root / "up").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (root / "up").exists(), "the container did not start"
        os.kill(shell, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (_processes_naming(user, marker) or not (root / "stopped").exists()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (root / "stopped").exists(), "the container never got the SIGTERM"
        assert _processes_naming(user, marker) == [], "the launcher outlived its parent"
    finally:
        for pid in _processes_naming(user, marker):
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_parent_death_of_a_parent_gone_already_starts_nothing(user, user_tmp):
    """A parent that died before the launcher's prctl (the launcher was reparented: its parent
    is not the PID given) gets no death signal later: the launcher ends itself at once."""
    bundle = _bundle(user, user_tmp, "touch /tmp/started")
    launcher = ocirt.launcher_path()
    result = user.run(["/bin/sh", "-c", '"$0" --parent-death 1 --root "$1" run --bundle "$2" c1; echo "status $?"',
                       str(launcher), str(user_tmp / "state"), str(bundle)], timeout=60)
    assert result.stdout.strip() == f"status {128 + signal.SIGTERM}", (result.stdout, result.stderr)
    assert not (bundle / "rootfs" / "tmp" / "started").exists()
    assert not (user_tmp / "state" / "c1").exists()


def _launcher(user: User, where: Path, *args: str) -> subprocess.CompletedProcess:
    """berth-launcher ``args`` as ``user`` with ``where/state`` as its --root."""
    return user.run([str(ocirt.launcher_path()), "--root", str(where / "state"), *args], timeout=60)


def _plant_state(user: User, where: Path, text: str) -> None:
    """ROOT/c1/state.json holding ``text``, as a container process or a careless tool might leave it."""
    directory = where / "state" / "c1"
    directory.mkdir(parents=True)
    (directory / "state.json").write_text(text)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(where / "state")], check=True)


def _start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[19])


def _pending_signals(pid: int) -> int:
    """The process-wide pending signals of ``pid`` (ShdPnd): what kill(2) queued for it."""
    with open(f"/proc/{pid}/status") as handle:
        return int(next(line for line in handle if line.startswith("ShdPnd:")).split()[1], 16)


def _usr1_blocking_victim(user: User) -> subprocess.Popen:
    """A process of ``user``'s that blocks SIGUSR1 (so that one sent stays pending, for
    _pending_signals), running once this returns."""
    victim = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1});"
         " print('ready', flush=True); time.sleep(120)"],
        user=user.uid, group=user.gid, extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert victim.stdout.readline() == "ready\n"
    return victim


def test_a_state_file_cannot_point_kill_or_delete_at_another_process(user, user_tmp):
    """read_state took the pid with strtol and kill() got it cast to pid_t: a pid of 2^32 + N
    signalled process N, and with a start time of 0 the start-time check passed too (0 is what
    it read for the pid that does not exist). A state file naming 2^32 - 1 made "delete
    --force" SIGKILL every process of the user. Such a file is refused now, and nothing is sent."""
    victim = _usr1_blocking_victim(user)
    try:
        _plant_state(user, user_tmp, json.dumps({"pid": victim.pid + (1 << 32), "start_time": 0, "bundle": "/"}))
        killed = _launcher(user, user_tmp, "kill", "c1", "USR1")
        assert not _pending_signals(victim.pid) & (1 << (signal.SIGUSR1 - 1)), "kill signalled the victim"
        assert killed.returncode == 1 and "not a berth-launcher state file" in killed.stderr, killed.stderr
        deleted = _launcher(user, user_tmp, "delete", "--force", "c1")
        assert deleted.returncode == 1, (deleted.stdout, deleted.stderr)
        assert victim.poll() is None, "delete --force killed the victim"
        state = _launcher(user, user_tmp, "state", "c1")
        assert state.returncode == 1, state.stdout
    finally:
        victim.kill()
        victim.wait()


#: Run as pid 1 of a pid namespace of the test user's (so it may choose the next pid): ROOT/c1
#: names a process A; "berth-launcher kill c1 USR1" runs under strace, which stops it right after
#: it closed /proc/A/stat (its start-time check passed); A dies and is reaped, a process B that
#: blocks SIGUSR1 takes A's pid, and the launcher goes on. Prints what B got.
PID_REUSE_SCENARIO = r"""
import json, os, signal, subprocess, sys, time
launcher, root = sys.argv[1], sys.argv[2]

def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()

a = subprocess.Popen(["sleep", "300"])
os.makedirs(f"{root}/c1")
with open(f"{root}/c1/state.json", "w") as handle:
    json.dump({"pid": a.pid, "start_time": int(stat_fields(a.pid)[19]), "bundle": "/"}, handle)
tracer = subprocess.Popen(["strace", "-qq", "-o", "/dev/null", "-P", f"/proc/{a.pid}/stat",
                           "--inject=close:signal=SIGSTOP", launcher, "--root", root, "kill", "c1", "USR1"],
                          stderr=subprocess.PIPE, text=True)
stopped, deadline = None, time.monotonic() + 60
while stopped is None and time.monotonic() < deadline:
    for name in os.listdir("/proc"):
        try:
            fields = stat_fields(name) if name.isdigit() else None
        except OSError:
            continue
        if fields and int(fields[1]) == tracer.pid and fields[0] in "tT":
            stopped = int(name)
    time.sleep(0.01)
assert stopped is not None, "the launcher never stopped after its start-time check"
a.kill()
a.wait()
with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
    handle.write(str(a.pid - 1))
b = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, "
                      "{signal.SIGUSR1}); print('ready', flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
assert b.stdout.readline() == "ready\n"
os.kill(stopped, signal.SIGCONT)
_, stderr = tracer.communicate(timeout=60)
with open(f"/proc/{b.pid}/status") as handle:
    pending = int(next(line for line in handle if line.startswith("ShdPnd:")).split()[1], 16)
print(json.dumps({"reused": b.pid == a.pid, "returncode": tracer.returncode, "stderr": stderr,
                  "signalled": bool(pending & (1 << (signal.SIGUSR1 - 1)))}))
b.kill()
"""


def test_kill_signals_the_process_it_checked_not_one_that_took_its_pid_since(user, user_tmp):
    """kill and delete checked the init's start time, then called kill() with its pid: had the
    init died and its pid come round to another process of the user's in between, that process
    got the signal (SIGKILL for delete --force). The launcher signals through a pidfd opened
    before the check now, so the window is closed: the pid is made to come round here, at will."""
    if not shutil.which("strace"):
        pytest.skip("strace missing: run scripts/install-system-packages.sh")
    script = user_tmp / "pid-reuse.py"
    script.write_text(PID_REUSE_SCENARIO)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(user_tmp)], check=True)
    result = user.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", sys.executable,
                       str(script), str(ocirt.launcher_path()), str(user_tmp / "state")], timeout=120)
    assert result.returncode == 0, (result.stdout, result.stderr)
    outcome = json.loads(result.stdout)
    assert outcome["reused"], outcome  # the control: the pid did come round
    assert not outcome["signalled"], "kill signalled the process that took the container's pid"
    assert outcome["returncode"] == 1 and "container not running" in outcome["stderr"], outcome


@pytest.mark.parametrize("kernel", ["pidfd", "no pidfd_open"])
def test_kill_signals_a_running_container_with_or_without_pidfds(user, user_tmp, kernel):
    """The pidfd path, and the check + kill() that kernels before 5.3 (pidfd_open failing with
    ENOSYS) keep."""
    victim = _usr1_blocking_victim(user)
    try:
        _plant_state(user, user_tmp, json.dumps({"pid": victim.pid, "start_time": _start_time(victim.pid),
                                                 "bundle": "/"}))
        killed = user.run([str(ocirt.launcher_path()), "--root", str(user_tmp / "state"), "kill", "c1", "USR1"],
                          timeout=60, preexec_fn=_syscall_fails(434, 38) if kernel != "pidfd" else None)
        assert killed.returncode == 0, killed.stderr
        assert _pending_signals(victim.pid) & (1 << (signal.SIGUSR1 - 1)), "kill did not signal the container"
        deleted = user.run([str(ocirt.launcher_path()), "--root", str(user_tmp / "state"), "delete", "--force", "c1"],
                           timeout=60, preexec_fn=_syscall_fails(434, 38) if kernel != "pidfd" else None)
        assert deleted.returncode == 0, deleted.stderr
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.wait()


def test_a_container_whose_init_is_a_zombie_is_stopped_as_under_runc(user, user_tmp):
    """An init that died but is not reaped yet (its launcher was killed, its new parent has not
    waited) still has a /proc/PID/stat with its start time: "state" said running, "kill"
    succeeded and "delete --force" waited its full 2 s for it. runc calls it stopped."""
    zombie = subprocess.Popen(["/bin/true"], user=user.uid, group=user.gid, extra_groups=[])
    try:
        deadline = time.monotonic() + 30
        while not _is_zombie(zombie.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _is_zombie(zombie.pid)
        _plant_state(user, user_tmp, json.dumps({"pid": zombie.pid, "start_time": _start_time(zombie.pid),
                                                 "bundle": "/"}))
        state = _launcher(user, user_tmp, "state", "c1")
        assert state.returncode == 0 and json.loads(state.stdout)["status"] == "stopped", state.stdout
        killed = _launcher(user, user_tmp, "kill", "c1", "KILL")
        assert killed.returncode == 1 and "container not running" in killed.stderr, killed.stderr
    finally:
        zombie.wait()


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_preserve_fds_of_a_descriptor_the_caller_did_not_pass_is_refused(user, user_tmp):
    """--preserve-fds 1 checks that descriptor 3 is open, but it looked after --log had been
    opened: with the caller's 3 closed, the log took that number, the check passed, and the
    container started without the descriptor it was to get (the log is close-on-exec)."""
    bundle = _bundle(user, user_tmp, "ls /proc/self/fd")
    result = user.run(["/bin/sh", "-c", 'exec 3>&-; "$0" --root "$1" --log "$2" run --preserve-fds 1 --bundle "$3" c1',
                       str(ocirt.launcher_path()), str(user_tmp / "state"), str(user_tmp / "log"), str(bundle)],
                      timeout=60)
    assert result.returncode == 1 and result.stdout == "", (result.stdout, result.stderr)
    assert "--preserve-fds 1: descriptor 3 is not open" in result.stderr, result.stderr


def _deep_directory(top: Path, depth: int) -> tuple[str, os.stat_result]:
    """``top/a/a/...`` (``depth`` levels, made one by one through descriptors); its path below
    ``top`` and its stat."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fd)
            below = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        return "/".join(["a"] * depth), os.fstat(fd)
    finally:
        os.close(fd)


def test_a_sigterm_that_reaches_the_launcher_as_the_container_starts_is_not_lost(user, user_tmp):
    """The kernel drops a signal that a pid namespace's init leaves at SIG_DFL. berth-init blocks
    them all as it starts, but the launcher forwarded a SIGTERM it had got while it set the
    container up at the moment the init exec'd, before that: the signal was lost, and the
    container ran on until berth's stop timeout killed it. berth-init's start is made long here
    (it checks a deep -b path 600 times before it blocks signals), so that the moment is wide."""
    bundle = _bundle(user, user_tmp, "unused")
    root = bundle / "rootfs"
    shutil.copy2(ocirt.init_path(), root / "bin" / "init")
    (root / "bin" / "sleep").symlink_to("busybox")
    below, info = _deep_directory(root / "deep", 400)  # shutil.rmtree recurses: not much deeper
    config = json.loads((bundle / "config.json").read_text())
    checks = [f"{info.st_dev}:{info.st_ino}:/deep/{below}"] * 600
    config["process"]["args"] = ["/bin/init", *[arg for check in checks for arg in ("-b", check)],
                                 "--", "/bin/sleep", "60"]
    (bundle / "config.json").write_text(json.dumps(config))
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(user_tmp)], check=True)
    for _attempt in range(2):
        assert _terminated_as_it_starts(user, user_tmp, bundle) == (128 + signal.SIGTERM, "")


def test_the_first_signal_waits_until_the_containers_init_takes_it(user, user_tmp):
    """The launcher's own part of the above, with any init: a shell as PID 1 that sets its trap
    a moment after it starts gets the SIGTERM the launcher had when it started the container."""
    bundle = _bundle(user, user_tmp, "sleep 1; trap 'echo got it; exit 0' TERM; while :; do sleep 0.05; done")
    (bundle / "rootfs" / "bin" / "sleep").symlink_to("busybox")
    assert _terminated_as_it_starts(user, user_tmp, bundle) == (0, "got it\n")


def _terminated_as_it_starts(user: User, where: Path, bundle: Path) -> tuple[int | None, str]:
    """SIGTERM to the launcher as soon as it has cloned the container's first process: its exit
    status (None when it still ran 20 s later: the signal was lost) and the container's output."""
    shutil.rmtree(where / "state" / "c1", ignore_errors=True)
    launcher = subprocess.Popen([str(ocirt.launcher_path()), "--root", str(where / "state"), "run",
                                 "--bundle", str(bundle), "c1"], user=user.uid, group=user.gid, extra_groups=[],
                                env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 30
        while not _children(launcher.pid) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert _children(launcher.pid), "the launcher started no container"
        os.kill(launcher.pid, signal.SIGTERM)
        try:
            output, _ = launcher.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            return None, ""
        return launcher.returncode, output
    finally:
        if launcher.poll() is None:  # the SIGTERM was lost: its parent-death signal ends the container
            launcher.kill()
            launcher.communicate()


def _children(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return handle.read().split()
    except OSError:
        return []


def test_the_log_is_not_written_through_a_planted_link(user, user_tmp):
    """--log names a file in the container's directory of berth's state, which a container that
    reaches that directory can write: a link planted there had the launcher's errors appended to
    the file it names. The log is opened without following a link now."""
    victim = user_tmp / "victim"
    victim.write_text("precious\n")
    (user_tmp / "log").symlink_to(victim)
    subprocess.run(["chown", "-h", f"{user.uid}:{user.gid}", str(victim), str(user_tmp / "log")], check=True)
    result = user.run([str(ocirt.launcher_path()), "--root", str(user_tmp / "state"), "--log", str(user_tmp / "log"),
                       "run", "--bundle", str(user_tmp / "no-bundle"), "c1"], timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert victim.read_text() == "precious\n"


def test_the_state_is_not_written_through_a_link_planted_while_the_container_starts(user, user_tmp):
    """state.json is written to state.json.tmp, then renamed. ROOT/ID is the launcher's own, new
    directory, but a container that reaches berth's state directory could put a link at that
    name while the next container was set up; the launcher opened it (fopen "w") and wrote the
    state into the file the link named. The container is stopped here while it is set up (3000
    mounts make that long), the link planted, and the container let go on."""
    victim = user_tmp / "victim"
    victim.write_text("precious\n")
    mounts = [{"destination": f"/tmp/m{i}", "type": "tmpfs", "source": "tmpfs", "options": ["size=4k"]}
              for i in range(3000)]
    bundle = _bundle(user, user_tmp, "true", mounts=mounts)
    for _attempt in range(5):
        state = user_tmp / "state" / "c1"
        shutil.rmtree(state, ignore_errors=True)
        launcher = subprocess.Popen([str(ocirt.launcher_path()), "--root", str(user_tmp / "state"), "run",
                                     "--bundle", str(bundle), "c1"], user=user.uid, group=user.gid, extra_groups=[],
                                    env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not _children(launcher.pid) and launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            [child] = _children(launcher.pid)
            os.kill(int(child), signal.SIGSTOP)
            if (state / "state.json").exists():  # the container was running already: try again
                os.kill(int(child), signal.SIGCONT)
                launcher.communicate(timeout=60)
                continue
            (state / "state.json.tmp").symlink_to(victim)
            os.kill(int(child), signal.SIGCONT)
            _, errors = launcher.communicate(timeout=60)
            assert victim.read_text() == "precious\n", "the state went into the linked file"
            assert launcher.returncode == 1 and "cannot write" in errors, (launcher.returncode, errors)
            return
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.communicate()
    pytest.fail("the container never stopped while it was set up")


def test_a_fifo_planted_as_the_state_file_does_not_hang_the_launcher(user, user_tmp):
    """state.json (and the bundle's config.json, for exec) was opened for reading and blocking:
    a FIFO planted in its place by a container that reaches berth's state directory kept
    "state" (berth ps), "kill" and "delete" (berth's teardown) waiting in open() for good."""
    directory = user_tmp / "state" / "c1"
    directory.mkdir(parents=True)
    os.mkfifo(directory / "state.json")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(user_tmp / "state")], check=True)
    try:
        for command in (["state", "c1"], ["kill", "c1", "KILL"], ["delete", "--force", "c1"]):
            result = user.run([str(ocirt.launcher_path()), "--root", str(user_tmp / "state"), *command], timeout=20)
            assert result.returncode == 1 and "state.json is not a regular file" in result.stderr, result.stderr
    finally:
        for _ in range(3):  # release a launcher left waiting in open() (the old one), so it ends
            try:
                os.close(os.open(directory / "state.json", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                break
