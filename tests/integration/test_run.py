"""berth run as the unprivileged test user with real runc and squashfuse: identity, exit codes,
stdio, terminal. Every test checks afterwards (runtime_env) that no mount, process or state
directory was left behind."""

import os
import pty
import select
import subprocess
import time

import pytest

from tests.harness.fixtures_runtime import BOTH_RUNTIMES
from tests.harness.users import describe

pytestmark = pytest.mark.integration


def run(env, image, *command, **kwargs):
    return env.berth("run", str(image), *command, **kwargs)


@BOTH_RUNTIMES
def test_identity_matches_the_caller(runtime_env, runtime_images, user):
    result = run(runtime_env, runtime_images.busybox, "sh", "-c",
                 'id -u; id -g; echo "$HOME"; echo "$USER"; whoami; grep "^berthtest:" /etc/passwd; '
                 'grep "^berthtest:" /etc/group')
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert lines[0] == str(user.uid) and lines[1] == str(user.gid)
    assert lines[2] == str(user.home) and lines[3] == user.name and lines[4] == user.name
    # The image's impostor entry (uid 4242) is replaced by the caller's real one.
    assert lines[5] == f"berthtest:x:{user.uid}:{user.gid}::{user.home}:/bin/sh"
    assert lines[6] == f"berthtest:x:{user.gid}:berthtest"
    assert len(lines) == 7


@BOTH_RUNTIMES
def test_files_written_to_a_mounted_directory_belong_to_the_caller(runtime_env, runtime_images, user):
    scratch = runtime_env.scratch
    result = runtime_env.berth(
        "run", "-v", f"{scratch}:/data", str(runtime_images.busybox),
        "sh", "-c", "echo data > /data/out.txt && mkdir /data/sub && stat -c '%u:%g' /data/out.txt")
    assert result.returncode == 0, describe(result)
    assert result.stdout.strip() == f"{user.uid}:{user.gid}"
    for name in ("out.txt", "sub"):
        info = os.stat(scratch / name)
        assert (info.st_uid, info.st_gid) == (user.uid, user.gid)
    assert (scratch / "out.txt").read_text() == "data\n"


def test_home_is_mounted_read_write(runtime_env, runtime_images, user):
    marker = user.home / f".berth-test-{os.getpid()}"
    try:
        result = run(runtime_env, runtime_images.busybox, "sh", "-c", f'echo hi > "$HOME/{marker.name}"; pwd')
        assert result.returncode == 0, describe(result)
        assert marker.read_text() == "hi\n" and os.stat(marker).st_uid == user.uid
        assert result.stdout.strip() == "/"
        hidden = runtime_env.berth("run", "--no-mount-home", str(runtime_images.busybox), "sh", "-c",
                                   f'ls -A "$HOME"; test -e "$HOME/{marker.name}" && echo visible; '
                                   'touch "$HOME/t" && echo writable')
        assert hidden.returncode == 0, describe(hidden)
        assert hidden.stdout.split() == ["writable"]
    finally:
        marker.unlink(missing_ok=True)


def test_home_is_the_callers_HOME_when_it_differs_from_the_passwd_home(runtime_env, runtime_images, user,
                                                                     home_elsewhere):
    """Issue 9 defect 1: berth's one meaning of home is $HOME (else the passwd entry's): it is
    mounted, HOME inside and the caller's passwd entry inside say it, and files land there."""
    result = runtime_env.berth("run", str(runtime_images.busybox), "sh", "-c",
                               'echo "$HOME"; grep "^berthtest:" /etc/passwd | cut -d: -f6; '
                               'echo made > "$HOME/made.txt"', env={"HOME": str(home_elsewhere)})
    assert result.returncode == 0, describe(result)
    assert result.stdout.splitlines() == [str(home_elsewhere)] * 2
    assert (home_elsewhere / "made.txt").read_text() == "made\n"
    assert os.stat(home_elsewhere / "made.txt").st_uid == user.uid


@pytest.mark.parametrize("command,status", [
    (["sh", "-c", "exit 3"], 3),
    (["sh", "-c", "exit 0"], 0),
    (["sh", "-c", "kill -KILL $$"], 137),
    (["sh", "-c", "kill -USR1 $$"], 138),
    (["/no/such/program"], 127),
    (["/etc/passwd"], 126),
])
@BOTH_RUNTIMES
def test_exit_status_is_the_commands(runtime_env, runtime_images, command, status):
    result = run(runtime_env, runtime_images.busybox, *command)
    assert result.returncode == status, describe(result)


#: Modules a warm `berth run` must not import (issue 10, target 3: start-up;
#: tests/unit/test_runtime_startup.py checks the run path import by import; this checks what a
#: real run imports, to its exit): dataclasses with its inspect, ast, dis, tokenize (~7 ms; the
#: run path's frozen classes are berth.record's), typing (berth.namedtuple), tarfile. (hashlib
#: is not among them here: a SquashFS given by path, as these tests run, is keyed by a hash.)
NOT_IMPORTED_BY_RUN = ("dataclasses", "inspect", "ast", "dis", "tokenize", "typing", "tarfile")


@BOTH_RUNTIMES
def test_a_run_imports_none_of_the_modules_it_does_without(runtime_env, runtime_images):
    run(runtime_env, runtime_images.busybox, "true")  # the first run may parse and probe
    result = runtime_env.berth("run", str(runtime_images.busybox), "sh", "-c", "echo ran",
                               env={"PYTHONPROFILEIMPORTTIME": "1"})  # python -X importtime, by environment
    assert result.returncode == 0 and result.stdout == "ran\n", describe(result)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {"berth.runtime.container", "argparse", "json"} <= imported, describe(result)  # the control
    assert sorted(imported.intersection(NOT_IMPORTED_BY_RUN)) == [], describe(result)


def test_berth_failures_exit_125_with_a_message(runtime_env, runtime_images):
    result = runtime_env.berth("run", "/nonexistent/image.sqfs", "true")
    assert result.returncode == 125, describe(result)
    assert "error:" in result.stderr
    result = runtime_env.berth("run", "-v", "/etc/shadow:/x", str(runtime_images.busybox), "true")
    assert result.returncode == 125 and "not allow" in result.stderr, describe(result)


@BOTH_RUNTIMES
def test_stdin_and_stdout_pass_through(runtime_env, runtime_images):
    data = "".join(f"line {i}\n" for i in range(2000))
    result = run(runtime_env, runtime_images.busybox, "sh", "-c", "cat; echo err >&2", input=data)
    assert result.returncode == 0, describe(result)
    assert result.stdout == data and result.stderr.strip().endswith("err")


def test_stdin_is_not_a_terminal_without_t(runtime_env, runtime_images):
    result = run(runtime_env, runtime_images.busybox, "sh", "-c", "test -t 0 && echo tty || echo notty")
    assert result.stdout.strip() == "notty", describe(result)


def _run_in_pty(runtime_env, args, send: bytes = b"", timeout_s: float = 30.0):
    master, slave = pty.openpty()
    process = runtime_env.popen(*args, stdin=slave, stdout=slave, stderr=slave, text=False)
    os.close(slave)
    output = b""
    sent = False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        if send and not sent and b"READY" in output:
            os.write(master, send)
            sent = True
        if process.poll() is not None and not ready:
            break
    os.close(master)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.returncode, output.decode(errors="replace")


def test_tty_gives_the_command_a_terminal(runtime_env, runtime_images):
    status, output = _run_in_pty(runtime_env, ["run", "-t", str(runtime_images.busybox), "sh", "-c",
                                               "test -t 0 && test -t 1 && echo IS-A-TTY; tty; echo TERM=$TERM"])
    assert status == 0, output
    assert "IS-A-TTY" in output and "/dev/pts/" in output and "TERM=" in output


def test_interactive_shell_under_a_pty(runtime_env, runtime_images):
    status, output = _run_in_pty(
        runtime_env, ["run", "-t", str(runtime_images.busybox), "sh", "-c", "echo READY; exec sh -i"],
        send=b"echo answer-$((6*7))\nexit 4\n")
    assert "answer-42" in output, output
    assert status == 4, output


@BOTH_RUNTIMES
def test_hostname_defaults_to_the_node_and_can_be_set(runtime_env, runtime_images):
    result = run(runtime_env, runtime_images.busybox, "hostname")
    assert result.stdout.strip() == os.uname().nodename, describe(result)
    result = runtime_env.berth("run", "--hostname", "inside", str(runtime_images.busybox), "hostname")
    assert result.stdout.strip() == "inside", describe(result)


def test_image_without_etc_tmp_or_home_gets_an_overlay(runtime_env, runtime_images, user):
    result = runtime_env.berth("run", "--debug", str(runtime_images.bare), "sh", "-c",
                               'id -un; test -d /tmp && test -d "$HOME" && echo dirs-ok; touch /tmp/x && echo tmp-ok')
    assert result.returncode == 0, describe(result)
    assert result.stdout.split() == [user.name, "dirs-ok", "tmp-ok"]
    assert "fuse-overlayfs" in result.stderr and "/etc/passwd" in result.stderr


@BOTH_RUNTIMES
def test_root_is_read_only_and_tmp_private(runtime_env, runtime_images):
    result = run(runtime_env, runtime_images.busybox, "sh", "-c",
                 "touch /newfile 2>&1; echo private > /tmp/p; cat /tmp/p")
    assert result.returncode == 0, describe(result)
    assert "Read-only file system" in result.stdout and result.stdout.strip().endswith("private")
    again = run(runtime_env, runtime_images.busybox, "sh", "-c", "ls -A /tmp")
    assert again.stdout.strip() == "", describe(again)


@BOTH_RUNTIMES
def test_pid_namespace_shows_only_the_container(runtime_env, runtime_images):
    result = run(runtime_env, runtime_images.busybox, "sh", "-c",
                 "ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '")
    assert result.returncode == 0, describe(result)
    count, init = result.stdout.splitlines()
    assert int(count) <= 4, result.stdout  # init, sh, ls, grep
    assert init.startswith("/dev/.berth-init ")
    # the init leads its own session and process group (as runc's does), not the runtime's
    session = run(runtime_env, runtime_images.busybox, "cut", "-d", " ", "-f5,6", "/proc/1/stat")
    assert session.stdout.split() == ["1", "1"], describe(session)


@BOTH_RUNTIMES
def test_runtime_failure_before_the_command_is_125(runtime_env, runtime_images):
    # A working directory that is a file: runc fails before running anything.
    result = runtime_env.berth("run", "-w", "/etc/passwd", str(runtime_images.busybox), "true")
    assert result.returncode == 125, describe(result)
    assert "could not start the container" in result.stderr and "not a directory" in result.stderr


@BOTH_RUNTIMES
def test_supplementary_groups_still_grant_access(runtime_env, runtime_images):
    # A file readable only through group 4242, which the caller holds as a supplementary group
    # (given by setpriv: no system file is edited). The kernel keeps supplementary groups in the
    # container (they show as nogroup: a rootless user namespace maps only the caller's gid).
    shared = runtime_env.scratch / "group-only"
    shared.write_text("group secret\n")
    os.chown(shared, 0, 4242)
    os.chmod(shared, 0o640)
    process = runtime_env.popen("run", "-v", f"{runtime_env.scratch}:/s", str(runtime_images.busybox), "sh", "-c",
                                "cat /s/group-only; id -G", groups=(4242,))
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "group secret"
    assert lines[1].split()[0] == str(runtime_env.user.gid)
    denied = runtime_env.popen("run", "-v", f"{runtime_env.scratch}:/s", str(runtime_images.busybox),
                               "cat", "/s/group-only", groups=())
    out, err = denied.communicate(timeout=30)
    assert denied.returncode == 1 and "Permission denied" in err


def test_tty_without_a_terminal_is_a_clear_error(runtime_env, runtime_images):
    result = runtime_env.berth("run", "-t", str(runtime_images.busybox), "true")
    assert result.returncode == 125, describe(result)
    assert "none of stdin, stdout or stderr is a terminal" in result.stderr


@BOTH_RUNTIMES
def test_init_reaps_orphaned_zombies(runtime_env, runtime_images):
    # The subshell exits at once, so its background sleep is re-parented to berth-init (PID 1),
    # which must reap it when it ends; a zombie would show state Z in /proc/PID/stat.
    result = run(runtime_env, runtime_images.busybox, "sh", "-c",
                 "(sleep 0.2 &); sleep 1; cat /proc/[0-9]*/stat | grep -c ') Z ' || true")
    assert result.returncode == 0, describe(result)
    assert result.stdout.strip() == "0"
