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

from tests.harness.fixtures_runtime import fuse_mounts_under, processes_mentioning
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
