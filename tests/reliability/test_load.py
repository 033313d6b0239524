"""Scenario 7 of issue 8: load. Sequential `berth run`s (500 in the campaign) leave nothing
behind and do not slow down (first vs last fifth); concurrent local jobs (50 in the campaign)
all complete and leave nothing behind."""

from __future__ import annotations

import os
import statistics
import subprocess
import time

import pytest

from tests.harness.fixtures_runtime import fuse_mounts_under, processes_mentioning
from tests.harness.users import describe
from tests.integration.jobs_helpers import submit, wait_for

pytestmark = pytest.mark.integration


def _mount_count() -> int:
    with open("/proc/self/mountinfo") as handle:
        return sum(1 for _ in handle)


def test_sequential_runs_leak_nothing_and_do_not_slow_down(runtime_env, runtime_images, campaign):
    result = campaign.scenario("7", "load: sequential runs, concurrent local jobs", 500)
    runs = campaign.trials(20, 500)
    times: list[float] = []
    # The machine is shared: other engineers' load comes and goes during 500 runs. Each run is
    # paired with a control that leaked state cannot slow down (`berth --version`: the same
    # user, process start, Python and berth's imports), and the trend is judged on their ratio.
    ratios: list[float] = []
    state_files_after: list[int] = []
    for n in range(runs):
        started = time.monotonic()
        run = runtime_env.berth("run", str(runtime_images.busybox), "true")
        times.append(time.monotonic() - started)
        started = time.monotonic()
        runtime_env.berth("--version")
        ratios.append(times[-1] / max(time.monotonic() - started, 1e-3))
        result.faults["sequential berth run"] += 1
        if run.returncode != 0:
            result.outcome("unclean", f"run {n}: {describe(run)}")
            continue
        leaks = runtime_env.leaks()
        if leaks:
            result.outcome("unclean", f"run {n}: left {leaks}")
            continue
        state_files_after.append(sum(len(files) for _d, _s, files in os.walk(runtime_env.state_dir)))
        result.outcome("recovered")
    fifth = max(1, len(times) // 5)
    first, last = statistics.median(times[:fifth]), statistics.median(times[-fifth:])
    ratio_first, ratio_last = statistics.median(ratios[:fifth]), statistics.median(ratios[-fifth:])
    result.figures["berth run /bin/true, median of first / last fifth"] = (
        f"{first * 1000:.0f} ms / {last * 1000:.0f} ms over {len(times)} runs (as the test user, "
        "wall time of the whole command)")
    result.figures["the same over `berth --version` run after each (load-independent trend)"] = (
        f"{ratio_first:.2f} / {ratio_last:.2f}")
    result.figures["files in the state directory after each run"] = (
        f"{min(state_files_after, default=0)}-{max(state_files_after, default=0)}")
    campaign.finish(result)
    assert result.bad == 0, result.failures
    # No growth of the state directory, and no trend: the last fifth may be noisier on a
    # shared machine, but not 50 % slower than its control. (On wall time alone the 14:35
    # campaign failed: 232 ms, then 499 ms while the load average went from 3 to 19.)
    assert max(state_files_after) == min(state_files_after), state_files_after
    assert ratio_last < ratio_first * 1.5, (ratio_first, ratio_last, first, last)


def test_concurrent_local_jobs_complete_and_leak_nothing(job_site, user, campaign):
    result = campaign.results.get("7") or campaign.scenario("7", "load: sequential runs, concurrent local jobs", 500)
    count = campaign.trials(5, 50)
    state_dir = job_site.root / f"state-load-{os.getpid()}"
    state_dir.mkdir(mode=0o700)
    os.chown(state_dir, user.uid, user.gid)
    env = {"BERTH_STATE_DIR": str(state_dir)}
    work = job_site.workdir(user)
    job_site.write_script(work, "hello.sh", "#!/bin/sh\necho hello $1\n", user)
    mounts_before = _mount_count()
    started = time.monotonic()
    # Submit concurrently: each submit is its own process, as users would.
    from tests.harness.users import berth_executable

    popens = []
    for n in range(count):
        full_env = user.base_env(**job_site.env, **env)
        argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "env", "-i",
                *[f"{k}={v}" for k, v in full_env.items()], str(berth_executable()), "submit", "--template", "bb",
                "hello.sh", str(n)]
        popens.append(subprocess.Popen(argv, cwd=str(work), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True))
    ids = []
    for popen in popens:
        out, err = popen.communicate(timeout=600)
        if popen.returncode != 0:
            result.outcome("unclean", f"submit failed: {err}")
        else:
            ids.append(out.strip())
    states = wait_for(user, job_site, ids, {"completed", "failed", "cancelled", "timeout"}, timeout_s=900,
                      env=env, poll_s=1.0)
    elapsed = time.monotonic() - started
    for job in ids:
        result.faults["concurrent local job"] += 1
        if states[job]["state"] != "completed":
            result.outcome("unclean", f"job {job}: {states[job]}")
        else:
            result.outcome("recovered")
    deadline = time.monotonic() + 15
    while True:
        leaks = [f"mount {m}" for m in fuse_mounts_under(str(state_dir))]
        leaks += [f"process {p}" for p in processes_mentioning(user.uid, str(state_dir))]
        if not leaks or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if leaks:
        result.outcome("unclean", f"after {count} jobs: left {leaks}")
    result.figures[f"{count} concurrent local jobs"] = (
        f"all final after {elapsed:.0f} s; mounts before/after: {mounts_before}/{_mount_count()}")
    campaign.finish(result)
    assert result.bad == 0, result.failures
