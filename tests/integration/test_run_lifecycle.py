"""Signals, stop timeout, `kill -9` of berth and the clean-up that follows, ps/exec, doctor."""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.harness.fixtures_runtime import BOTH_RUNTIMES, fuse_mounts_under, processes_mentioning
from tests.harness.users import berth_executable, describe

pytestmark = pytest.mark.integration


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float = 20.0) -> str:
    """Read the process's stdout until a line contains ``text``."""
    deadline = time.monotonic() + timeout_s
    seen = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen += line
        if text in line:
            return seen
    stderr = process.stderr.read() if process.poll() is not None else ""
    raise AssertionError(f"never saw {text!r}; got {seen!r}; stderr: {stderr}")


@BOTH_RUNTIMES
def test_sigterm_to_berth_reaches_the_command(runtime_env, runtime_images):
    process = runtime_env.popen("run", str(runtime_images.busybox), "sh", "-c",
                                'trap "echo got-TERM; exit 7" TERM; echo ready; sleep 60 & wait')
    wait_for_line(process, "ready")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)
    assert "got-TERM" in out, err
    assert process.returncode == 7, err


@BOTH_RUNTIMES
def test_sigint_to_berth_reaches_the_command(runtime_env, runtime_images):
    process = runtime_env.popen("run", str(runtime_images.busybox), "sh", "-c",
                                'trap "echo got-INT; exit 9" INT; echo ready; sleep 60 & wait')
    wait_for_line(process, "ready")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert "got-INT" in out and process.returncode == 9, err


@BOTH_RUNTIMES
def test_command_killed_by_the_forwarded_signal_gives_128_plus_n(runtime_env, runtime_images):
    process = runtime_env.popen("run", str(runtime_images.busybox), "sh", "-c", "echo ready; exec sleep 60")
    wait_for_line(process, "ready")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=20)
    assert process.returncode == 128 + signal.SIGTERM


@BOTH_RUNTIMES
def test_command_ignoring_sigterm_is_killed_after_stop_timeout(runtime_env, runtime_images):
    process = runtime_env.popen("run", "--stop-timeout", "1", str(runtime_images.busybox), "sh", "-c",
                                'trap "echo ignoring" TERM; echo ready; while true; do sleep 0.1; done')
    wait_for_line(process, "ready")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    elapsed = time.monotonic() - started
    assert process.returncode == 137, err
    assert 0.9 <= elapsed < 6, elapsed
    assert "ignoring" in out and "--stop-timeout 1" in err


def _start_and_kill_berth(runtime_env, image, command: str):
    process = runtime_env.popen("run", "--name", "victim", str(image), "sh", "-c", command)
    wait_for_line(process, "ready")
    assert fuse_mounts_under(str(runtime_env.state_dir)), "container not mounted while running"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    return process


@BOTH_RUNTIMES
def test_kill_9_of_berth_is_cleaned_up_by_the_next_invocation(runtime_env, runtime_images):
    # The command ignores the TERM its runtime passes on when berth dies: only the clean-up
    # (runtime kill, lazy unmount, state removal) can end it.
    _start_and_kill_berth(runtime_env, runtime_images.busybox,
                          'trap "" TERM; echo ready; while true; do sleep 0.2; done')
    time.sleep(0.5)
    assert runtime_env.containers(), "nothing left to clean: the test proves nothing"
    result = runtime_env.berth("run", "--debug", str(runtime_images.busybox), "true")
    assert result.returncode == 0, describe(result)
    assert "cleaned up container" in result.stderr
    assert runtime_env.wait_clean(timeout_s=10) == []


def test_kill_9_of_berth_is_cleaned_up_by_doctor(runtime_env, runtime_images):
    _start_and_kill_berth(runtime_env, runtime_images.busybox,
                          'trap "" TERM; echo ready; while true; do sleep 0.2; done')
    time.sleep(0.5)
    left = runtime_env.containers()
    assert left
    result = runtime_env.berth("doctor", "--cleanup", "--json")
    report = json.loads(result.stdout)
    assert [entry["id"] for entry in report["cleaned"]] == left, describe(result)
    assert runtime_env.wait_clean(timeout_s=10) == []


@BOTH_RUNTIMES
def test_ps_and_exec_join_a_running_container(runtime_env, runtime_images, user):
    process = runtime_env.popen("run", "--name", "worker", str(runtime_images.busybox), "sh", "-c",
                                "echo shared > /tmp/marker; echo ready; sleep 60")
    try:
        wait_for_line(process, "ready")
        listing = runtime_env.berth("ps", "--json")
        records = json.loads(listing.stdout)
        assert [r["name"] for r in records] == ["worker"], describe(listing)
        assert records[0]["image"] == str(runtime_images.busybox)
        assert records[0]["command"] == ["sh", "-c", "echo shared > /tmp/marker; echo ready; sleep 60"]
        assert records[0]["status"] == "running" and records[0]["pid"] > 0
        table = runtime_env.berth("ps")
        assert table.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "IMAGE"]
        assert "worker" in table.stdout.splitlines()[1]

        joined = runtime_env.berth("exec", "worker", "sh", "-c", "id -u; cat /tmp/marker; ls /proc | grep -c '^[0-9]'")
        assert joined.returncode == 0, describe(joined)
        lines = joined.stdout.splitlines()
        assert lines[0] == str(user.uid) and lines[1] == "shared"
        assert int(lines[2]) >= 3  # the container's init, its sleep and the exec'd processes
        status = runtime_env.berth("exec", records[0]["id"][:6], "sh", "-c", "exit 5")
        assert status.returncode == 5, describe(status)
        clash = runtime_env.berth("run", "--name", "worker", str(runtime_images.busybox), "true")
        assert clash.returncode == 125 and "already running" in clash.stderr, describe(clash)
        # The container survives the exec'd commands.
        again = runtime_env.berth("exec", "worker", "cat", "/tmp/marker")
        assert again.stdout == "shared\n", describe(again)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    missing = runtime_env.berth("exec", "worker", "true")
    assert missing.returncode == 125 and "no running container 'worker'" in missing.stderr, describe(missing)


@BOTH_RUNTIMES
def test_exec_gets_the_open_files_limit_of_the_containers_process(runtime_env, runtime_images):
    """A process joining a container (berth exec; a node's ranks under --scope node, started
    by Slurm tasks whose soft RLIMIT_NOFILE is 1024) gets the open-files limit the container's
    first process got: runc raises its soft limit to the hard one and its processes inherit
    that, in run and exec alike. berth-launcher's exec passed the caller's soft limit on
    (OpenMPI ranks in a node's container: 1024 descriptors under berth-launcher, 20000 under runc)."""
    probe = "echo files=$(ulimit -n) hard=$(ulimit -Hn)"
    process = runtime_env.popen("run", "--name", "files", str(runtime_images.busybox),
                                "sh", "-c", f"{probe}; echo ready; sleep 60")
    try:
        first = wait_for_line(process, "ready").splitlines()[0]
        joined = runtime_env.user.run(["prlimit", "--nofile=1024:", str(berth_executable()), "exec", "files",
                                       "sh", "-c", probe], env=runtime_env.env())
        assert joined.returncode == 0, describe(joined)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    fields = dict(word.split("=") for word in first.split())
    assert int(fields["hard"]) > 1024 and fields["files"] == fields["hard"], first
    assert joined.stdout.strip() == first, describe(joined)



@BOTH_RUNTIMES
def test_exec_into_a_memory_limited_container_gets_its_data_limit(runtime_env, runtime_images):
    """Without cgroup delegation ``--memory`` is each process's RLIMIT_DATA. runc applied it to
    its own Go init before that exec'd, so `berth exec` (and a node's ranks under --scope node)
    into a 64 MiB container died "pthread_create failed"; berth-init now sets it for the
    command alone. The exec'd process must still get the limit, and env/cwd still apply."""
    probe = "grep 'Max data size' /proc/self/limits"
    process = runtime_env.popen("run", "--name", "small", "--memory", "64M", str(runtime_images.busybox),
                                "sh", "-c", f"{probe}; echo ready; sleep 60")
    try:
        first = wait_for_line(process, "ready").splitlines()[0]
        joined = runtime_env.berth("exec", "-e", "PROBE=x", "-w", "/tmp", "small", "sh", "-c",
                                   f"{probe}; echo $PROBE; pwd")
        assert joined.returncode == 0, describe(joined)
        status = runtime_env.berth("exec", "small", "sh", "-c", "exit 4")
        assert status.returncode == 4, describe(status)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        pytest.skip("cgroup v2 here: --memory is the cgroup's limit, not RLIMIT_DATA")
    assert first.split()[3:5] == [str(64 << 20), str(64 << 20)], first
    assert joined.stdout.splitlines() == [first, "x", "/tmp"], describe(joined)
    assert list(runtime_env.state_dir.rglob("exec-*.json")) == []

def test_doctor_reports_each_check(runtime_env):
    result = runtime_env.berth("doctor")
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    names = [line.split(":")[0] for line in lines if line[:4] in ("OK  ", "FAIL", "WARN")]
    for check in ("OK   user namespaces", "OK   /dev/fuse", "OK   squashfuse", "OK   fuse-overlayfs",
                  "OK   fusermount3", "OK   berth-init", "OK   state directory", "OK   runtime runc"):
        assert check in names, result.stdout
    report = json.loads(runtime_env.berth("doctor", "--json").stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True and checks["runtime runc"]["ok"] is True
    assert "static" in checks["berth-init"]["detail"]
    if not checks["runtime crun"]["ok"]:
        # crun fails on this hybrid cgroup host: the reason must be explained, and it is not fatal.
        assert checks["runtime crun"]["required"] is False and checks["runtime crun"]["detail"]


def test_doctor_fails_with_a_fix_when_the_state_dir_is_unusable(runtime_env, user):
    blocker = runtime_env.scratch / "file"
    blocker.write_text("")
    result = runtime_env.berth("doctor", env={"BERTH_STATE_DIR": str(blocker / "state")})
    assert result.returncode == 1, describe(result)
    assert "FAIL state directory" in result.stdout and "fix: set BERTH_STATE_DIR" in result.stdout


def _probe_cache(runtime_env) -> dict[str, dict]:
    """runtime name -> its cached verdict (the file's keys name everything the probe depended on)."""
    cache = json.loads((runtime_env.state_dir / "runtime-probe.json").read_text())
    assert len(cache["entries"]) == len({entry["runtime"] for entry in cache["entries"].values()})
    return {entry["runtime"]: entry for entry in cache["entries"].values()}


def test_runtime_probe_is_cached_per_host(runtime_env, runtime_images):
    first = runtime_env.berth("run", str(runtime_images.busybox), "true")
    assert first.returncode == 0, describe(first)
    # auto: berth-launcher runs what it can, and runc is not even probed then
    assert _probe_cache(runtime_env)["launcher"]["works"] is True
    assert "runc" not in _probe_cache(runtime_env)
    with_runc = runtime_env.berth("run", "--runtime", "runc", str(runtime_images.busybox), "true")
    assert with_runc.returncode == 0, describe(with_runc)
    assert _probe_cache(runtime_env)["runc"]["works"] is True
    forced = runtime_env.berth("run", "--runtime", "crun", str(runtime_images.busybox), "true")
    cache = _probe_cache(runtime_env)
    if cache["crun"]["works"]:
        assert forced.returncode == 0, describe(forced)
    else:
        assert forced.returncode == 125 and "no usable OCI runtime" in forced.stderr, describe(forced)
        assert cache["crun"]["reason"] in forced.stderr


@BOTH_RUNTIMES
def test_no_processes_or_mounts_after_a_normal_run(runtime_env, runtime_images, user):
    result = runtime_env.berth("run", "--writable", str(runtime_images.busybox), "true")
    assert result.returncode == 0, describe(result)
    assert fuse_mounts_under(str(runtime_env.state_dir)) == []
    assert processes_mentioning(user.uid, str(runtime_env.state_dir)) == []
    assert runtime_env.containers() == []
    # ("plans": the run's kept plan, plan_cache being on by default.)
    assert sorted(name for name in os.listdir(runtime_env.state_dir) if name != "plans") == \
        ["containers", "containers.lock", "runtime-probe.json"]


@BOTH_RUNTIMES
def test_exec_with_a_terminal(runtime_env, runtime_images):
    from tests.integration.test_run import _run_in_pty

    process = runtime_env.popen("run", "--name", "ttyhost", str(runtime_images.busybox), "sh", "-c",
                                "echo ready; sleep 60")
    try:
        wait_for_line(process, "ready")
        status, output = _run_in_pty(runtime_env, ["exec", "-t", "ttyhost", "sh", "-c",
                                                   "test -t 0 && echo EXEC-TTY; tty; exit 6"])
        assert status == 6, output
        assert "EXEC-TTY" in output and "/dev/pts/" in output
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)


def test_auto_runs_the_launcher_and_falls_back_to_runc_for_what_it_does_not_do(runtime_env, runtime_images):
    from tests.integration.test_run import _run_in_pty

    plain = runtime_env.berth("run", "--debug", str(runtime_images.busybox), "true")
    assert plain.returncode == 0, describe(plain)
    assert "runtime " in plain.stderr and "/berth-launcher\n" in plain.stderr, describe(plain)
    # A terminal is what berth-launcher does not do: runc runs it, and --debug says why.
    status, output = _run_in_pty(runtime_env, ["run", "--debug", "-t", str(runtime_images.busybox), "sh", "-c",
                                               "test -t 0 && echo ON-A-TTY"])
    assert status == 0, output
    assert "ON-A-TTY" in output and "berth-launcher does not do a terminal (-t)" in output, output
    assert "/berth-launcher\r\n" not in output and "runc\r\n" in output, output
    # runtime = launcher refuses what berth-launcher does not do, and says what to set instead
    status, output = _run_in_pty(runtime_env, ["run", "--runtime", "launcher", "-t", str(runtime_images.busybox),
                                               "true"])
    assert status == 125 and "runtime = launcher, but this container needs a terminal (-t)" in output, output


def test_planted_container_entries_neither_lose_files_nor_run_programs_nor_stop_berth(runtime_env, runtime_images):
    """What can write into the state directory (a container that sees it) could plant
    containers/ID as a link to a directory holding a free 'lock', and a dead container's
    info.json naming a program: every berth run's stale clean-up emptied the linked directory
    and ran the program. berth run, ps and doctor --cleanup now remove the link itself, run
    only the runtime berth resolves, and clean the dead container."""
    user = runtime_env.user
    runtime_env.state_dir.mkdir(mode=0o700)
    containers = runtime_env.state_dir / "containers"
    precious = runtime_env.state_dir.parent / "precious"
    marker = runtime_env.state_dir.parent / "planted-program-ran"
    program = runtime_env.state_dir.parent / "planted-program"
    program.write_text(f"#!/bin/sh\ntouch {marker}\n")
    program.chmod(0o755)
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (precious / "lock").touch()
    containers.mkdir(mode=0o700)
    (containers / "b0123456789ab").symlink_to(precious)
    dead = containers / "b0123456789ac"
    (dead / "runc" / dead.name).mkdir(parents=True)
    (dead / "lock").touch()
    (dead / "info.json").write_text(json.dumps({"id": dead.name, "runtime": str(program),
                                                "runtime_path": str(program), "started": "x"}))
    for path in (runtime_env.state_dir, precious, program, *containers.rglob("*"), containers):
        os.lchown(path, user.uid, user.gid)
    result = runtime_env.berth("run", "--debug", str(runtime_images.busybox), "true")
    assert result.returncode == 0, describe(result)
    assert f"cleaned up container {dead.name}" in result.stderr
    assert sorted(os.listdir(precious)) == ["lock", "thesis.tex"] and not marker.exists()
    assert runtime_env.containers() == []
    (containers / "b0123456789ab").symlink_to(precious)
    os.lchown(containers / "b0123456789ab", user.uid, user.gid)
    for args in (("ps",), ("doctor", "--cleanup")):
        done = runtime_env.berth(*args)
        assert "Traceback" not in done.stderr and done.returncode in (0, 1), describe(done)
    assert runtime_env.containers() == [] and sorted(os.listdir(precious)) == ["lock", "thesis.tex"]


def test_root_without_fuse3_unmounts_what_it_mounted(runtime_images, tmp_path):
    """As root on a node without fuse3 (no fusermount3: met on a bare GPU node), libfuse mounts
    by itself, but berth unmounted with fusermount3 only: every run left its mounts behind and
    said so. Root now unmounts with umount2. Run in a mount namespace of its own, where
    fusermount3 is hidden (a non-executable file over it) without touching the host's."""
    state, config = tmp_path / "state", tmp_path / "etc"
    config.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path), "BERTH_ALLOW_ROOT": "1",
           "BERTH_CONFIG_DIR": str(config), "BERTH_STATE_DIR": str(state), "BERTH_USER_STORE": str(tmp_path / "store")}
    assignments = " ".join(f"'{k}={v}'" for k, v in env.items())
    fusermount = subprocess.run(["sh", "-c", "command -v fusermount3"], capture_output=True, text=True).stdout.strip()
    assert fusermount, "the test bed has fuse3 (scripts/install-system-packages.sh)"
    script = (f"mount --bind /dev/null {fusermount}\n"
              f"! env -i {assignments} sh -c 'command -v fusermount3'\n"
              f"env -i {assignments} {berth_executable()} run {runtime_images.busybox} echo ran-ok\n"
              f"env -i {assignments} {berth_executable()} run --name second {runtime_images.busybox} cat /etc/group\n"
              f"echo mounts: $(grep -c ' {state}' /proc/self/mountinfo || true)\n")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", script],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and "ran-ok" in result.stdout and "root:x:0:" in result.stdout, describe(result)
    assert result.stdout.strip().splitlines()[-1] == "mounts: 0", describe(result)
    assert "unmount" not in result.stderr and "fusermount3" not in result.stderr, describe(result)
