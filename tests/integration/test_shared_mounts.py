"""One image mount per node, user and image, shared by that user's containers and
reference-counted by them (issue 10 target 1, DESIGN.md direction 12): real squashfuse_ll,
runc and the unprivileged test user. The leak rules of the runtime fixture (no mount, process
or container directory left under the state directory) hold after every test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from berth.runtime import fuse
from tests.harness.fixtures_runtime import (fuse_mounts_under, lingering_reapers, process_alive, processes_mentioning,
                                            still_alive_after)
from tests.harness.users import describe
from tests.integration.test_run_lifecycle import wait_for_line

pytestmark = pytest.mark.integration

# The trap comes before 'ready': a SIGTERM sent as soon as 'ready' shows must find it set.
WAIT = 'trap "exit 0" TERM; echo ready; while true; do sleep 0.1; done'


def image_mounts(env) -> list[str]:
    """The shared image mounts under the test's state directory."""
    return sorted(m for m in fuse_mounts_under(str(env.state_dir)) if "/images/" in m)


def daemons(env) -> list[str]:
    """The test user's squashfuse daemons of this state directory."""
    return [line for line in processes_mentioning(env.user.uid, str(env.state_dir))
            if line.split(": ", 1)[1].split()[0].rsplit("/", 1)[-1] in ("squashfuse", "squashfuse_ll")]


def start(env, image, count: int, command: str = WAIT) -> list[subprocess.Popen]:
    """``count`` containers of ``image`` started at the same moment, each past its 'ready'."""
    processes = [env.popen("run", str(image), "sh", "-c", command) for _ in range(count)]
    for process in processes:
        wait_for_line(process, "ready", timeout_s=60)
    return processes


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err


def stop_all(processes: list[subprocess.Popen]) -> None:
    """Stop every process still running, then report the first that did not exit 0: one
    failure must not leave the others running into the leak check."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    errors = [process.communicate(timeout=30)[1] for process in running]
    for process, err in zip(running, errors):
        assert process.returncode == 0, err


def test_concurrent_containers_of_one_image_share_one_mount_and_daemon(runtime_env, runtime_images):
    processes = start(runtime_env, runtime_images.busybox, 4)
    try:
        assert len(image_mounts(runtime_env)) == 1, image_mounts(runtime_env)
        assert len(daemons(runtime_env)) == 1, daemons(runtime_env)
        (mount,) = image_mounts(runtime_env)
        holders = sorted(os.listdir(os.path.join(os.path.dirname(mount), "holders")))
        assert len(holders) == 4 and holders == sorted(runtime_env.containers())
        # The mount lies in the user's private state directory: another user cannot reach it.
        assert os.stat(os.path.dirname(mount)).st_mode & 0o077 == 0
        # Each container still sees the whole image through it.
        joined = runtime_env.berth("exec", runtime_env.containers()[0], "cat", "/etc/group")
        assert joined.returncode == 0 and joined.stdout.startswith("root:x:0:"), describe(joined)
        for process in processes[:-1]:
            stop(process)
        assert len(image_mounts(runtime_env)) == 1, "the mount went while a container still used it"
    finally:
        stop_all(processes)
    assert runtime_env.wait_clean() == []
    assert not (runtime_env.state_dir / "images").exists()


def test_another_user_cannot_read_the_image_through_the_mount(runtime_env, runtime_images, other_user):
    (process,) = start(runtime_env, runtime_images.busybox, 1)
    try:
        (mount,) = image_mounts(runtime_env)
        for path in (mount, os.path.dirname(mount)):
            probe = other_user.run(["ls", path])
            assert probe.returncode != 0 and "Permission denied" in probe.stderr, describe(probe)
    finally:
        stop(process)


def test_kill_9_of_one_holder_keeps_the_mount_for_the_others_and_the_last_one_out_unmounts(
        runtime_env, runtime_images):
    first, second, third = start(runtime_env, runtime_images.busybox, 3)
    try:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert len(image_mounts(runtime_env)) == 1 and len(daemons(runtime_env)) == 1
        # The next berth cleans up the killed one's container and joins the same mount.
        joined = runtime_env.berth("run", "--debug", str(runtime_images.busybox), "cat", "/etc/group")
        assert joined.returncode == 0 and joined.stdout.startswith("root:x:0:"), describe(joined)
        assert "cleaned up container" in joined.stderr and "sharing the image mount" in joined.stderr
        assert len(runtime_env.containers()) == 2
        stop(second)
        assert len(image_mounts(runtime_env)) == 1 and len(daemons(runtime_env)) == 1
        stop(third)
    finally:
        stop_all([second, third])
    assert runtime_env.wait_clean() == []


def test_kill_9_of_every_holder_is_cleaned_up_by_doctor(runtime_env, runtime_images):
    processes = start(runtime_env, runtime_images.busybox, 2)
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    time.sleep(0.3)
    # The daemon is not tied to any one berth: the mount stays until a berth command cleans up.
    left = image_mounts(runtime_env)
    assert len(left) == 1 and len(daemons(runtime_env)) == 1
    result = runtime_env.berth("doctor", "--cleanup", "--json")
    report = json.loads(result.stdout)
    assert len(report["cleaned"]) == 2, describe(result)
    assert [entry["unmounted"] for entry in report["images_unmounted"]] == left, describe(result)
    assert runtime_env.wait_clean() == []
    again = runtime_env.berth("doctor", "--cleanup", "--json")
    assert json.loads(again.stdout)["images_unmounted"] == [], describe(again)


def test_kill_9_of_every_holder_is_cleaned_up_by_the_next_run(runtime_env, runtime_images):
    processes = start(runtime_env, runtime_images.busybox, 2)
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert len(image_mounts(runtime_env)) == 1
    # Another image: the clean-up, not this run's own release, must remove the first mount.
    result = runtime_env.berth("run", str(runtime_images.setuid), "true")
    assert result.returncode == 0, describe(result)
    assert runtime_env.wait_clean() == []


def test_a_second_image_gets_its_own_mount(runtime_env, runtime_images):
    first = start(runtime_env, runtime_images.busybox, 2)
    second = start(runtime_env, runtime_images.setuid, 2)
    try:
        mounts = image_mounts(runtime_env)
        assert len(mounts) == 2 and len(daemons(runtime_env)) == 2, mounts
        # Each container sees its own image: only the second one has /bin/setuid-probe.
        for record in json.loads(runtime_env.berth("ps", "--json").stdout):
            looked = runtime_env.berth("exec", record["id"], "test", "-e", "/bin/setuid-probe")
            assert looked.returncode == (0 if record["image"] == str(runtime_images.setuid) else 1), describe(looked)
        for process in first:
            stop(process)
        assert len(image_mounts(runtime_env)) == 1
    finally:
        stop_all(first + second)
    assert runtime_env.wait_clean() == []


def test_containers_starting_while_the_last_one_leaves_never_lose_their_mount(runtime_env, runtime_images):
    """Short containers joining and leaving at once, over and over: each one reads the image
    (a mount pulled from under one fails its command), and the last one out unmounts."""
    def one(_):
        return runtime_env.berth("run", str(runtime_images.busybox), "sh", "-c", "cat /etc/group >/dev/null && echo ok")

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, range(16)))
    failed = [describe(r) for r in results if r.returncode != 0 or r.stdout != "ok\n"]
    assert failed == []
    assert runtime_env.wait_clean() == []


def test_per_container_mounts_stay_available_as_a_site_setting(runtime_env, runtime_images):
    site = runtime_env.state_dir.parent / "site"  # root's, in a directory every user traverses
    site.mkdir(mode=0o755)
    (site / "berth.toml").write_text('image_mount = "per_container"\n')
    runtime_env.extra_env["BERTH_CONFIG_DIR"] = str(site)
    processes = start(runtime_env, runtime_images.busybox, 2)
    try:
        assert image_mounts(runtime_env) == []
        assert len(daemons(runtime_env)) == 2
    finally:
        stop_all(processes)
    assert runtime_env.wait_clean() == []


def test_site_can_choose_squashfuse_with_kernel_caching(runtime_env, runtime_images):
    site = runtime_env.state_dir.parent / "site"
    site.mkdir(mode=0o755)
    (site / "berth.toml").write_text('image_fuse = "squashfuse"\n')
    runtime_env.extra_env["BERTH_CONFIG_DIR"] = str(site)
    (process,) = start(runtime_env, runtime_images.busybox, 1)
    try:
        (daemon,) = daemons(runtime_env)
        argv = daemon.split(": ", 1)[1].split()
        assert argv[0].endswith("/squashfuse") and "ro,kernel_cache,entry_timeout=86400" in argv[argv.index("-o") + 1]
        joined = runtime_env.berth("exec", runtime_env.containers()[0], "cat", "/etc/group")
        assert joined.returncode == 0 and joined.stdout.startswith("root:x:0:"), describe(joined)
    finally:
        stop(process)
    assert runtime_env.wait_clean() == []


# ---------------------------------------------------------------- lingering mounts (image_mount_linger)


def mount_record(env) -> dict:
    """The one shared mount's record (mount.json), read as root."""
    (mount,) = image_mounts(env)
    with open(os.path.join(os.path.dirname(mount), "mount.json")) as handle:
        return json.load(handle)


def wait_gone(env, deadline_s: float = 60.0) -> float:
    """Poll until no image mount, daemon or reaper of the test's state directory is left;
    return the time.time() at which that was first seen."""
    deadline = time.monotonic() + deadline_s
    while image_mounts(env) or daemons(env) or lingering_reapers(env.user.uid, str(env.state_dir)):
        assert time.monotonic() < deadline, (image_mounts(env), daemons(env))
        time.sleep(0.05)
    return time.time()


def test_a_lingering_mount_is_reused_by_the_next_run_and_goes_when_its_linger_is_up(runtime_env, runtime_images):
    runtime_env.extra_env["BERTH_IMAGE_MOUNT_LINGER"] = "12"  # room for a loaded machine's second run
    first = runtime_env.berth("run", str(runtime_images.busybox), "cat", "/etc/group")
    assert first.returncode == 0 and first.stdout.startswith("root:x:0:"), describe(first)
    (mount,) = image_mounts(runtime_env)
    record = mount_record(runtime_env)
    (daemon,) = daemons(runtime_env)
    reaper = record["reaper"][0]
    assert record["linger_s"] == 12 and process_alive(reaper) and process_alive(record["pid"]), record
    # It names itself berth-linger as soon as it runs (berth may have exited before that).
    deadline = time.monotonic() + 10
    while lingering_reapers(runtime_env.user.uid, str(runtime_env.state_dir)) != [f"{reaper}: berth-linger"]:
        assert time.monotonic() < deadline, lingering_reapers(runtime_env.user.uid, str(runtime_env.state_dir))
        time.sleep(0.02)
    # The next run reuses the same mount and daemon, and its leaving pushes the linger's end.
    while time.time() < record["idle_since"] + 1:
        time.sleep(0.05)
    second = runtime_env.berth("run", "--debug", str(runtime_images.busybox), "cat", "/etc/group")
    assert second.returncode == 0 and "sharing the image mount" in second.stderr, (describe(second), record)
    assert "it was lingering" in second.stderr, describe(second)
    assert image_mounts(runtime_env) == [mount] and daemons(runtime_env) == [daemon], (daemons(runtime_env), daemon)
    pushed = mount_record(runtime_env)
    assert pushed["idle_since"] > record["idle_since"] + 1 and pushed["reaper"] == record["reaper"], (record, pushed)
    gone_at = wait_gone(runtime_env)
    assert gone_at >= pushed["idle_since"] + 12, ("unmounted before the pushed linger's end", gone_at, pushed)
    # wait_gone saw them leave; they may still be exiting (CI: the reaper, a moment after its unmount)
    assert still_alive_after([reaper, record["pid"]]) == []
    assert not (runtime_env.state_dir / "images").exists()
    assert runtime_env.wait_clean() == []


def test_command_substitution_returns_at_once_with_a_long_linger(runtime_env, runtime_images):
    """The reaper holds none of berth's descriptors: `$(berth run ...)` returns when berth does,
    not when the linger ends. `berth doctor --cleanup` ends the lingering mount and its reaper."""
    from tests.harness.users import berth_executable

    runtime_env.extra_env["BERTH_IMAGE_MOUNT_LINGER"] = "10m"
    script = f'out=$({berth_executable()} run {runtime_images.busybox} echo hi) && echo "got $out"'
    started = time.monotonic()
    result = runtime_env.user.run(["sh", "-c", script], env=runtime_env.env(), timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 0 and result.stdout == "got hi\n", describe(result)
    assert took < 60, f"berth run took {took:.1f} s with a 10 minute linger"
    assert len(image_mounts(runtime_env)) == 1 and process_alive(mount_record(runtime_env)["reaper"][0])
    doctor = runtime_env.berth("doctor")
    assert "shared image mounts: " in doctor.stdout and "lingering, unmounted in" in doctor.stdout, describe(doctor)
    cleaned = runtime_env.berth("doctor", "--cleanup")
    assert "(lingering, not in use)" in cleaned.stdout, describe(cleaned)
    wait_gone(runtime_env, deadline_s=20)
    assert runtime_env.wait_clean() == []


def test_a_shorter_linger_set_later_ends_the_mount_when_it_is_up_not_at_the_earlier_ones_end(
        runtime_env, runtime_images):
    """The user lowered image_mount_linger between two runs: the mount the second run leaves
    lingering goes when the shorter linger is up. The first run's reaper, reused, slept towards
    the end of the first, longer linger (ten minutes) and kept mount, daemon and itself."""
    runtime_env.extra_env["BERTH_IMAGE_MOUNT_LINGER"] = "10m"
    first = runtime_env.berth("run", str(runtime_images.busybox), "true")
    assert first.returncode == 0, describe(first)
    long_reaper = mount_record(runtime_env)["reaper"][0]
    runtime_env.extra_env["BERTH_IMAGE_MOUNT_LINGER"] = "2"
    second = runtime_env.berth("run", "--debug", str(runtime_images.busybox), "true")
    assert second.returncode == 0 and "it was lingering" in second.stderr, describe(second)
    left_at = mount_record(runtime_env)["idle_since"]
    gone_at = wait_gone(runtime_env, deadline_s=40)
    assert left_at + 2 <= gone_at, ("unmounted before the linger's end", left_at, gone_at)
    assert still_alive_after([long_reaper]) == []
    assert runtime_env.wait_clean() == []


def test_a_lingering_mount_whose_reaper_was_killed_is_cleaned_by_a_later_berth_after_its_linger(
        runtime_env, runtime_images):
    runtime_env.extra_env["BERTH_IMAGE_MOUNT_LINGER"] = "3"
    result = runtime_env.berth("run", str(runtime_images.busybox), "true")
    assert result.returncode == 0, describe(result)
    record = mount_record(runtime_env)
    os.kill(record["reaper"][0], signal.SIGKILL)
    # Inside the linger, another berth (of another image) leaves it alone.
    other = runtime_env.berth("run", str(runtime_images.setuid), "true")
    assert other.returncode == 0, describe(other)
    if time.time() < record["idle_since"] + 3:
        assert len(image_mounts(runtime_env)) == 2, "a lingering mount was removed inside its linger"
    while time.time() < record["idle_since"] + 3.2:
        time.sleep(0.05)
    # After it, the stale clean-up of the next berth removes it (the other image's mount too,
    # once its own reaper's time is up).
    runtime_env.extra_env["BERTH_IMAGE_MOUNT_LINGER"] = "0"
    later = runtime_env.berth("run", str(runtime_images.setuid), "true")
    assert later.returncode == 0, describe(later)
    assert still_alive_after([record["pid"]]) == []
    wait_gone(runtime_env)
    assert runtime_env.wait_clean() == []


def test_a_lingering_mount_whose_daemon_died_is_cleaned_up_and_mounted_again(runtime_env, runtime_images):
    """What Slurm's end of a step does: every process of the step killed, daemon and reaper."""
    runtime_env.extra_env["BERTH_IMAGE_MOUNT_LINGER"] = "10m"
    result = runtime_env.berth("run", str(runtime_images.busybox), "true")
    assert result.returncode == 0, describe(result)
    record = mount_record(runtime_env)
    for pid in (record["reaper"][0], record["pid"]):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(record["pid"]) or process_alive(record["reaper"][0]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Another image's run: its stale clean-up removes the dead mount though its linger is not up.
    other = runtime_env.berth("run", str(runtime_images.setuid), "true")
    assert other.returncode == 0, describe(other)
    assert len(image_mounts(runtime_env)) == 1 and not process_alive(record["pid"])
    # And the same image mounts again, with a new daemon.
    again = runtime_env.berth("run", str(runtime_images.busybox), "cat", "/etc/group")
    assert again.returncode == 0 and again.stdout.startswith("root:x:0:"), describe(again)
    assert len(image_mounts(runtime_env)) == 2 and len(daemons(runtime_env)) == 2
    cleaned = runtime_env.berth("doctor", "--cleanup", "--json")
    assert [entry["lingering"] for entry in json.loads(cleaned.stdout)["images_unmounted"]] == [True, True]
    wait_gone(runtime_env, deadline_s=20)
    assert runtime_env.wait_clean() == []


def test_a_state_directory_reached_through_a_link_of_the_users_leaves_no_mount(runtime_env, runtime_images):
    """A state directory given as a symbolic link of the user's own (accepted: users move such
    directories that way): the kernel's mount table names the real path. berth looked for the
    linked spelling there, found no mount, never unmounted, killed the daemon after 5 s and left
    a dead mount behind for good (and took that long to return)."""
    runtime_env.state_dir.mkdir(mode=0o700)
    os.chown(runtime_env.state_dir, runtime_env.user.uid, runtime_env.user.gid)
    link = runtime_env.state_dir.parent / "state-link"
    os.symlink(runtime_env.state_dir, link)
    os.lchown(link, runtime_env.user.uid, runtime_env.user.gid)
    result = runtime_env.berth("run", str(runtime_images.busybox), "cat", "/etc/group",
                               env={"BERTH_STATE_DIR": str(link)})
    assert result.returncode == 0 and result.stdout.startswith("root:x:0:"), describe(result)
    assert image_mounts(runtime_env) == [] and daemons(runtime_env) == [], image_mounts(runtime_env)
    assert not (runtime_env.state_dir / "images").exists()


def test_a_lingering_mount_of_another_mount_namespace_is_left_to_it(runtime_env, runtime_images):
    """Slurm's job_container/tmpfs runs each job in a mount namespace of its own, with one state
    directory for the user's jobs on the node: a mount of another job's namespace is not in this
    one's mount table. Another berth's stale clean-up took such a lingering mount for one whose
    daemon had not unmounted, waited 5 s for that daemon, killed it and its reaper and removed
    the directory (the mount's namespace lost it): a 5 s stall of every berth run, and another
    job's mount ended. Such a mount is its own namespace's to judge; once its daemon is gone
    (Slurm ends the job's processes), the next clean-up removes what is left."""
    from tests.harness.users import berth_executable

    env = runtime_env.user.base_env(**runtime_env.env(BERTH_IMAGE_MOUNT_LINGER="10m"))
    argv = ["unshare", "--mount", "--propagation", "slave", "--", "setpriv", f"--reuid={runtime_env.user.uid}",
            f"--regid={runtime_env.user.gid}", "--init-groups", "env", "-i",
            *[f"{key}={value}" for key, value in env.items()], str(berth_executable()),
            "run", str(runtime_images.busybox), "true"]
    job = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=120)
    assert job.returncode == 0, job.stderr
    (directory,) = (runtime_env.state_dir / "images").iterdir()
    record = json.loads((directory / "mount.json").read_text())
    try:
        assert image_mounts(runtime_env) == [], "the mount should be in the other namespace only"
        other = runtime_env.berth("run", str(runtime_images.setuid), "true")
        assert other.returncode == 0, describe(other)
        assert process_alive(record["pid"]) and process_alive(record["reaper"][0]), "another namespace's mount ended"
        assert json.loads((directory / "mount.json").read_text()) == record
    finally:
        for pid in (record["reaper"][0], record["pid"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert still_alive_after([record["pid"], record["reaper"][0]]) == []
    cleaned = runtime_env.berth("doctor", "--cleanup")
    assert cleaned.returncode == 0, describe(cleaned)
    assert not (runtime_env.state_dir / "images").exists()
    assert runtime_env.wait_clean() == []


@pytest.mark.parametrize("mode", ["per_container", "unpacked"])
def test_a_linger_has_no_effect_outside_shared_image_mounts(runtime_env, runtime_images, mode):
    """image_mount_linger applies to image_mount = "shared" only (docs/configuration.md): with
    the other two, a run with a ten-minute linger leaves no mount, no FUSE daemon (squashfuse's
    nor fuse-overlayfs') and no berth-linger reaper once it returns."""
    site = runtime_env.state_dir.parent / "site"  # root's, in a directory every user traverses
    site.mkdir(mode=0o755)
    (site / "berth.toml").write_text(f'image_mount = "{mode}"\n')
    runtime_env.extra_env["BERTH_CONFIG_DIR"] = str(site)
    runtime_env.extra_env["BERTH_IMAGE_MOUNT_LINGER"] = "10m"
    result = runtime_env.berth("run", str(runtime_images.busybox), "cat", "/etc/group")
    assert result.returncode == 0 and result.stdout.startswith("root:x:0:"), describe(result)
    state_dir = str(runtime_env.state_dir)
    fuse_daemons = [line for line in processes_mentioning(runtime_env.user.uid, state_dir)
                    if line.split(": ", 1)[1].split()[0].rsplit("/", 1)[-1] in fuse.DAEMON_PROGRAMS]
    assert fuse_mounts_under(state_dir) == [] and fuse_daemons == [], (fuse_mounts_under(state_dir), fuse_daemons)
    assert lingering_reapers(runtime_env.user.uid, state_dir) == []
    assert not (runtime_env.state_dir / "images").exists()
    assert runtime_env.wait_clean() == []


def test_a_stop_signal_while_the_daemon_mounts_leaves_no_mount_and_no_daemon(runtime_images, tmp_path, monkeypatch):
    """A SIGTERM that reached berth while it waited for squashfuse_ll to mount (proc's stop
    handlers raise in the wait) left the daemon to mount after berth had cleaned up: the image
    stayed mounted with no record and nobody to unmount it (a --scope node task stopped while
    its container started, tests/reliability/test_signals.py, failed 1 run in 8 on this). The
    real daemon, interrupted at the first wait, must be unmounted and gone."""
    import subprocess as sp

    from berth import proc
    from berth.runtime import fuse

    class InterruptedClock:
        """fuse's time: the signal arrives as the mount wait starts (its first clock reading,
        before it first looks at the mount point), so whether the daemon is quicker than the
        wait's first look does not matter (raising at the first sleep did: a daemon that had
        mounted by the first look left no sleep to interrupt, 3 runs in 4 on a quiet machine)."""

        def __init__(self) -> None:
            self.raised = False

        def monotonic(self) -> float:
            if not self.raised:
                self.raised = True
                raise proc.StopRequested(signal.SIGTERM)
            return time.monotonic()

        sleep = staticmethod(time.sleep)

    started: list = []
    real_start = proc.start

    def recording_start(*args, **kwargs):
        started.append(real_start(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(fuse, "time", InterruptedClock())
    monkeypatch.setattr(fuse.proc, "start", recording_start)
    mountpoint = tmp_path / "root"
    mountpoint.mkdir()
    with pytest.raises(proc.StopRequested):
        fuse.mount_squashfs(str(runtime_images.busybox), str(mountpoint), str(tmp_path / "log"),
                            program="squashfuse_ll", options=(), detached=True)
    (daemon,) = started
    try:
        assert daemon.poll() is not None, "the daemon runs on after berth gave up on its mount"
        assert str(mountpoint) not in fuse.mounted_paths()
    finally:  # (before the fix) let the daemon finish its mount, then end both
        deadline = time.monotonic() + 10
        while daemon.poll() is None and str(mountpoint) not in fuse.mounted_paths() and time.monotonic() < deadline:
            time.sleep(0.01)
        if str(mountpoint) in fuse.mounted_paths():
            sp.run(["umount", "-l", str(mountpoint)], capture_output=True)
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()


def _fusermount_not_setuid_first(env) -> tuple:
    """A directory holding a copy of fusermount3 (not setuid: it cannot unmount the user's
    FUSE mounts), and the environment that puts it first on PATH."""
    import shutil

    bin_dir = env.scratch / "bin"
    bin_dir.mkdir()
    shutil.copy("/usr/bin/fusermount3", bin_dir / "fusermount3")
    os.chmod(bin_dir / "fusermount3", 0o755)
    os.chmod(bin_dir, 0o755)
    return bin_dir, {"PATH": f"{bin_dir}:{env.user.base_env()['PATH']}"}


def test_a_failed_unmount_is_said_and_the_next_run_does_not_mount_over_it(runtime_env, runtime_images):
    """Seen on a GPU node: a fusermount3 first on PATH that is not setuid root (libfuse mounts
    with its own by absolute path) could not unmount the user's image mount; berth said
    nothing, and the next `berth run` mounted again over the still-mounted mount point and
    failed with fusermount3's "failed to access mountpoint ...: Permission denied". Now the
    failed unmount is a warning naming the cause, the next run that meets the stale mount and
    cannot remove it says so, and a run with a working fusermount3 removes it and runs."""
    bin_dir, bad_path = _fusermount_not_setuid_first(runtime_env)
    image = str(runtime_images.busybox)

    first = runtime_env.berth("run", image, "true", env=bad_path)
    assert first.returncode == 0, describe(first)
    assert "berth: warning: could not unmount the image at" in first.stderr, describe(first)
    assert f"the fusermount3 first on PATH ({bin_dir}/fusermount3) is not setuid root" in first.stderr
    assert len(image_mounts(runtime_env)) == 1  # still there: the warning was true

    second = runtime_env.berth("run", image, "true", env=bad_path)
    assert second.returncode != 0, describe(second)
    assert "still holds an earlier mount of the image whose daemon is gone, and berth could not remove it" \
        in second.stderr, describe(second)
    assert "failed to access mountpoint" not in second.stderr and "Traceback" not in second.stderr

    third = runtime_env.berth("run", image, "true")
    assert third.returncode == 0, describe(third)
    assert runtime_env.wait_clean() == []


def test_every_clean_up_that_cannot_unmount_says_so(runtime_env, runtime_images):
    """The last one out said a failed unmount (above); the other clean-up paths dropped it: a
    lingering mount's reaper (detached: nobody to tell, so `berth doctor` shows it), the stale
    clean-up of `berth run` and `berth doctor --cleanup` (which said it had unmounted the mount
    that was still there). Each now says fusermount3's words and the likely cause (review)."""
    bin_dir, bad_path = _fusermount_not_setuid_first(runtime_env)
    cause = f"the fusermount3 first on PATH ({bin_dir}/fusermount3) is not setuid root"
    image = str(runtime_images.busybox)

    # The reaper of a lingering mount, with that PATH, cannot unmount it when its time is up.
    first = runtime_env.berth("run", image, "true", env={**bad_path, "BERTH_IMAGE_MOUNT_LINGER": "1"})
    assert first.returncode == 0, describe(first)
    deadline = time.monotonic() + 20
    records = runtime_env.state_dir / "images"
    while not any("unmount_failed" in path.read_text() for path in records.glob("*/mount.json")):
        assert time.monotonic() < deadline, list(records.glob("*/*"))
        time.sleep(0.2)
    assert len(image_mounts(runtime_env)) == 1
    doctor = runtime_env.berth("doctor", env=bad_path)
    assert "WARN shared image mounts:" in doctor.stdout and "could not unmount the image at" in doctor.stdout, \
        describe(doctor)
    assert cause in doctor.stdout, describe(doctor)

    # The stale clean-up at the start of a run, and berth ps's.
    run = runtime_env.berth("run", image, "true", env=bad_path)
    assert "berth: warning: could not unmount the image at" in run.stderr and cause in run.stderr, describe(run)
    ps = runtime_env.berth("ps", env=bad_path)
    assert "berth: warning: could not unmount the image at" in ps.stderr and cause in ps.stderr, describe(ps)

    # berth doctor --cleanup says it, and does not claim the mount is gone.
    cleanup = runtime_env.berth("doctor", "--cleanup", "--json", env=bad_path)
    report = json.loads(cleanup.stdout)
    assert report["images_unmounted"] == [] and len(report["unmount_failures"]) == 1, describe(cleanup)
    assert "could not unmount the image at" in cleanup.stderr and cause in cleanup.stderr, describe(cleanup)
    assert len(image_mounts(runtime_env)) == 1

    fixed = runtime_env.berth("doctor", "--cleanup")
    assert fixed.returncode == 0 and "unmounted the shared image mount" in fixed.stdout, describe(fixed)
    assert runtime_env.wait_clean() == []
