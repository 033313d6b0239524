"""Signals to berth at random early moments (issue 8, the audit after scenario 3): SIGTERM,
SIGINT and SIGUSR1 reach ``berth run`` during its start-up (clean-up of dead berths, mounting,
the bundle, the runtime starting) or just after the command started. Unlike ``kill -9``
(scenario 3), berth can act on these: it must end (or go on) by itself and leave no mount,
process or container directory, with no other berth command run after it. SIGUSR1 (Slurm's
``--signal=USR1@60``, sent to every task) must not kill berth before the command runs; once the
command runs, it is the command's.

And a local job's runner is the batch shell of its job (``sbatch --signal=B:USR1@60``): SIGUSR1
to it reaches the script inside the container, instead of ending the runner and the job.
"""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import subprocess
import tempfile
import time

import pytest

from tests.harness.fixtures_runtime import processes_mentioning
from tests.integration.jobs_helpers import submit, wait_file, wait_for

pytestmark = pytest.mark.integration

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def test_signals_at_random_early_moments_of_berth_run(runtime_env, runtime_images, campaign):
    result = campaign.scenario("3b", "SIGTERM/SIGINT/SIGUSR1 at random early moments of berth run", 100)
    trials = campaign.trials(6, 150)
    rng = random.Random(8)
    ends: dict[str, collections.Counter] = {}
    for n in range(trials):
        signum = SIGNALS[n % len(SIGNALS)]
        name = signal.Signals(signum).name
        marker = f"berth-signal-run-{os.getpid()}-{n}"
        with tempfile.TemporaryFile(mode="w+") as stderr:
            process = runtime_env.popen("run", str(runtime_images.busybox), "sh", "-c",
                                        f"while true; do sleep 0.2; done; : {marker}",
                                        stdout=subprocess.DEVNULL, stderr=stderr)
            delay_s = rng.uniform(0.0, 1.2)
            time.sleep(delay_s)
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass
            result.faults[f"{name} to berth run"] += 1
            try:
                process.wait(timeout=3 if signum == signal.SIGUSR1 else 60)
            except subprocess.TimeoutExpired:
                if signum != signal.SIGUSR1:
                    process.kill()
                    process.wait()
                    result.outcome("unclean", f"trial {n} ({name} at {delay_s:.2f} s): berth did not end in 60 s")
                    continue
                # Held before the command ran: the container runs on; end it the usual way.
                os.kill(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
                ends.setdefault(name, collections.Counter())["held, then stopped by SIGTERM"] += 1
            else:
                how = (f"died of {signal.Signals(-process.returncode).name}" if process.returncode < 0
                       else f"exit {process.returncode}")
                ends.setdefault(name, collections.Counter())[how] += 1
            stderr.seek(0)
            errors = stderr.read()
        leaks = runtime_env.wait_clean(timeout_s=10)
        leaks += [f"process {p}" for p in processes_mentioning(runtime_env.user.uid, marker)]
        if not leaks and _in_pythons_own_start_up(errors):
            # Interrupted in the interpreter's own start-up, before any of berth's code ran.
            result.outcome("failed cleanly")
            ends.setdefault(name, collections.Counter())["in Python's own start-up (before berth)"] += 1
        elif leaks or "Traceback" in errors:
            result.outcome("unclean", f"trial {n} ({name} at {delay_s:.2f} s, rc {process.returncode}): "
                           f"left {leaks}\n{errors[-3000:]}")
            # The next trial must start clean: the next berth command cleans up.
            runtime_env.berth("doctor", "--cleanup", "--json")
        elif process.returncode < 0:
            result.outcome("failed cleanly")  # died of it before it had made anything
        else:
            result.outcome("recovered")
    campaign.finish(result)
    result.figures["signal sent at"] = "uniform in 0-1.2 s after start (start-up takes ~0.3-0.6 s here)"
    for name, counts in sorted(ends.items()):
        result.figures[f"how berth ended after {name}"] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    assert result.bad == 0, "\n\n".join(result.failures)


def _in_pythons_own_start_up(errors: str) -> bool:
    """Whether berth's stderr is CPython's own fatal error for a signal that came while the
    interpreter initialised itself (``init_import_site``, ``init_sys_streams``, ...: the
    campaign's 14:35 run met the second), with no frame of berth's code: nothing of berth ran."""
    return (re.search(r"^Fatal Python error: init_\w+", errors, re.MULTILINE) is not None
            and re.search(r'File "[^"]*/berth/[^"]*\.py"', errors) is None)


def test_pythons_own_start_up_errors_are_told_from_berths():
    """The classification above: a traceback in berth's code stays unclean."""
    frozen = ('Fatal Python error: init_sys_streams: can\'t initialize sys standard streams\n'
              'Traceback (most recent call last):\n  File "<frozen io>", line 52, in <module>\nKeyboardInterrupt\n')
    assert _in_pythons_own_start_up(frozen)
    assert _in_pythons_own_start_up("Fatal Python error: init_import_site: Failed to import the site module\n")
    assert not _in_pythons_own_start_up('Traceback (most recent call last):\n  File "/x/src/berth/cli/main.py", '
                                        'line 3, in main\nKeyboardInterrupt\n')
    assert not _in_pythons_own_start_up(frozen + '  File "/x/src/berth/cli/main.py", line 3\n')


def _signal_a_local_job_runner(job_site, user, signum: int, trapped: str) -> tuple[dict, str]:
    """A local job whose script traps ``trapped`` (writing a file, then exit 0) gets ``signum``
    sent to its runner once it runs: its final state, and what the trap wrote ('' if nothing)."""
    name = signal.Signals(signum).name.lower()
    state_dir = job_site.root / f"state-{name}-{os.getpid()}"
    state_dir.mkdir(mode=0o700)
    os.chown(state_dir, user.uid, user.gid)
    env = {"BERTH_STATE_DIR": str(state_dir)}
    work = job_site.workdir(user)
    job_site.write_script(work, f"{name}.sh", f"""\
        #!/bin/sh
        trap 'echo got {trapped} > "trap-$BERTH_JOB_ID.txt"; exit 0' {trapped}
        echo started > "started-$BERTH_JOB_ID.txt"
        while true; do sleep 0.2; done
    """, user)
    job = submit(user, job_site, work, "--template", "bb", f"{name}.sh", env=env)
    wait_file(work / f"started-{job}.txt", timeout_s=60)
    runner = int((job_site.jobs_dir / job / "runner.pid").read_text().split()[0])
    os.kill(runner, signum)
    state = wait_for(user, job_site, [job], {"completed", "failed", "cancelled", "timeout"}, timeout_s=60,
                     env=env)[job]
    trap = work / f"trap-{job}.txt"
    return state, trap.read_text() if trap.exists() else ""


def test_usr1_to_a_local_job_runner_reaches_the_script(job_site, user):
    """The runner died of SIGUSR1 (default action): the job ended failed ("runner is gone")
    instead of the script's USR1 trap running."""
    state, trapped = _signal_a_local_job_runner(job_site, user, signal.SIGUSR1, "USR1")
    assert (state["state"], trapped) == ("completed", "got USR1\n"), state


def test_sigquit_to_a_local_job_runner_stops_the_job_as_a_cancel(job_site, user):
    """SIGQUIT (a stop for berth run, which forwards it) ended the runner by its default action
    (core), and the job was recorded failed ("the job runner is gone without a result")
    instead of stopped like a SIGTERM: the script's TERM trap, then cancelled."""
    state, trapped = _signal_a_local_job_runner(job_site, user, signal.SIGQUIT, "TERM")
    assert (state["state"], trapped) == ("cancelled", "got TERM\n"), state


def test_a_step_still_running_when_the_job_ends_is_stopped_cleanly(job_site, user):
    """A `berth run` step started from inside a local job (the berth shim, through the step
    agent) and still running when the script ends: the runner killed its process tree with
    SIGKILL, leaving the step's container directory and image mount to the next berth command;
    now it gets SIGTERM first and tears down by itself."""
    state_dir = job_site.root / f"state-steps-{os.getpid()}"
    state_dir.mkdir(mode=0o700)
    os.chown(state_dir, user.uid, user.gid)
    env = {"BERTH_STATE_DIR": str(state_dir)}
    work = job_site.workdir(user)
    marker = f"berth-step-left-{os.getpid()}"
    job_site.write_script(work, "steps.sh", f"""\
        #!/bin/sh
        berth run -v {work}:{work} {job_site.image} sh -c 'echo up > {work}/step-up; while true; do sleep 0.2; done; : {marker}' &
        while [ ! -e step-up ]; do sleep 0.2; done
        echo "script ends with its step running"
    """, user)
    job = submit(user, job_site, work, "--template", "bb", "steps.sh", env=env)
    state = wait_for(user, job_site, [job], {"completed", "failed", "cancelled", "timeout"}, timeout_s=120,
                     env=env)[job]
    assert state["state"] == "completed", state
    assert (work / "step-up").exists()
    deadline = time.monotonic() + 15
    while True:
        from tests.harness.fixtures_runtime import fuse_mounts_under

        containers = os.listdir(state_dir / "containers") if (state_dir / "containers").is_dir() else []
        leaks = fuse_mounts_under(str(state_dir)) + processes_mentioning(user.uid, marker) + containers
        if not leaks or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert leaks == [], leaks


def test_sigterm_to_a_node_scope_task_while_its_container_starts_leaves_nothing(runtime_env, runtime_images):
    """`berth run --scope node` (a task of a Slurm step; the step's variables are enough here):
    a SIGTERM (scancel, the time limit) while the task waited for the node's container to
    start killed it by default action, before it could stop the container it had started, so
    the node's container ran on with nobody left to stop it."""
    step = {"SLURM_JOB_ID": str(900000 + os.getpid() % 10000), "SLURM_STEP_ID": "0", "SLURMD_NODENAME": "nodeS"}
    process = runtime_env.popen("run", "--scope", "node", str(runtime_images.busybox), "sleep", "300", env=step,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # While the keeper starts the node's container (the task polls its runtime state).
    deadline = time.monotonic() + 30
    while not runtime_env.containers() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, process.returncode  # ended, not killed by it
    assert runtime_env.wait_clean(timeout_s=30) == []
