"""Scenario 3 of issue 8: `kill -9` of `berth run`, and of a local job's runner, at random
moments (during start-up, while the command runs). Once the next berth command has run (for a
run: `berth run` or `berth doctor --cleanup`; for a job: `berth jobs`, then `doctor --cleanup`),
no mount, process or state of it is left, and the job ends failed with a reason."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from tests.harness.fixtures_runtime import fuse_mounts_under, processes_mentioning
from tests.harness.users import describe
from tests.integration.jobs_helpers import submit, wait_for

pytestmark = pytest.mark.integration


def _marker_processes(uid: int, marker: str) -> list[str]:
    return processes_mentioning(uid, marker)


def test_kill_9_of_berth_run_at_random_moments(runtime_env, runtime_images, campaign):
    result = campaign.scenario("3", "kill -9 of berth run / of a local job", 100)
    trials = campaign.trials(4, 70)
    rng = random.Random(3)
    for n in range(trials):
        marker = f"berth-kill-run-{os.getpid()}-{n}"
        # No pipes: the orphaned container would keep them open after berth dies.
        process = runtime_env.popen("run", str(runtime_images.busybox), "sh", "-c",
                                    f'trap "" TERM; while true; do sleep 0.2; done; : {marker}',
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay_s = rng.uniform(0.0, 1.2)
        time.sleep(delay_s)
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
        result.faults["kill -9 of berth run"] += 1
        # Alternate the "next berth command": another run, or doctor --cleanup.
        if n % 2:
            follow = runtime_env.berth("run", str(runtime_images.busybox), "true")
        else:
            follow = runtime_env.berth("doctor", "--cleanup", "--json")
        leaks = runtime_env.wait_clean(timeout_s=10) + [f"process {p}" for p in _marker_processes(
            runtime_env.user.uid, marker)]
        if (n % 2 and follow.returncode != 0) or "Traceback" in follow.stderr:
            result.outcome("unclean", f"trial {n} (kill at {delay_s:.2f} s): {describe(follow)}")
        elif leaks:
            result.outcome("unclean", f"trial {n} (kill at {delay_s:.2f} s): left {leaks}\n{describe(follow)}")
        else:
            result.outcome("recovered")
    campaign.finish(result)
    result.figures["berth run kill points"] = "uniform in 0-1.2 s after start (start-up takes ~0.3-0.6 s here)"
    assert result.bad == 0, result.failures


def test_kill_9_of_a_local_job_runner(job_site, user, campaign):
    result = campaign.results.get("3") or campaign.scenario("3", "kill -9 of berth run / of a local job", 100)
    trials = campaign.trials(2, 30)
    rng = random.Random(33)
    state_dir = job_site.root / f"state-{os.getpid()}"
    state_dir.mkdir(mode=0o700)
    os.chown(state_dir, user.uid, user.gid)
    env = {"BERTH_STATE_DIR": str(state_dir)}
    work = job_site.workdir(user)
    for n in range(trials):
        marker = f"berth-kill-job-{os.getpid()}-{n}"
        job_site.write_script(work, f"job{n}.sh", f"#!/bin/sh\nsh -c 'while true; do sleep 0.2; done; : {marker}'\n",
                              user)
        job = submit(user, job_site, work, "--template", "bb", f"job{n}.sh", env=env)
        delay_s = rng.uniform(0.0, 2.0)
        time.sleep(delay_s)
        pid_file = job_site.jobs_dir / job / "runner.pid"
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        result.faults["kill -9 of a local job runner"] += 1
        try:
            state = wait_for(user, job_site, [job], {"failed", "completed"}, timeout_s=30, env=env)[job]
        except AssertionError as error:
            result.outcome("unclean", f"job {job}: {error}")
            continue
        cleanup = user.berth("doctor", "--cleanup", "--json", env={**job_site.env, **env})
        deadline = time.monotonic() + 10
        while True:
            leaks = [f"mount {m}" for m in fuse_mounts_under(str(state_dir))]
            leaks += [f"process {p}" for p in _marker_processes(user.uid, marker)]
            leaks += [f"process {p}" for p in processes_mentioning(user.uid, str(state_dir))]
            if not leaks or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        containers = sorted(os.listdir(state_dir / "containers")) if (state_dir / "containers").is_dir() else []
        if leaks or containers or "Traceback" in cleanup.stderr:
            result.outcome("unclean", f"job {job} (kill at {delay_s:.2f} s): left {leaks} {containers}\n"
                           f"{describe(cleanup)}")
        elif state["state"] != "failed" or "runner is gone" not in (state.get("message") or ""):
            result.outcome("unclean", f"job {job}: ended {state}")
        else:
            result.outcome("failed cleanly")
    campaign.finish(result)
    assert result.bad == 0, result.failures
