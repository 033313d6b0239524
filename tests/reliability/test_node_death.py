"""Scenario 6 of issue 8: a compute node dies mid-job on the Slurm test cluster.

A two-node job runs one container per node (``srun -N2 -n2 berth run ...`` from inside the
job's own container). Then one node dies: its slurmd and every process of the job on it get
SIGKILL (tests/harness/slurm.py ``kill_node``; slurmctld is told the node is down, which it
concludes by itself SlurmdTimeout later). Alternately the node that dies is the job's batch
host (the runner dies with it) and the other one. Then:

- the job ends ``failed`` with a reason naming the node failure, and ``berth status`` shows it;
- the surviving node leaks nothing: no container directory, FUSE mount, squashfuse, runc or
  container process of the job under its state directories;
- the dead node comes back and a resubmitted job completes on both nodes; the next berth
  command on the dead node (``doctor --cleanup``) leaves nothing of the killed job there either
  (on a real node a reboot does that; here every node shares this machine's /tmp).

Every node has its own state directory (BERTH_STATE_DIR per node, as node-local /tmp is on a
cluster): the "nodes" of the test cluster share this machine, and one node's containers must
not share an image mount whose FUSE daemon lives in the dead node's job.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.harness.fixtures_runtime import fuse_mounts_under, processes_mentioning
from tests.harness.users import describe
from tests.integration.jobs_helpers import submit, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

FINAL = ("completed", "failed", "cancelled", "timeout")

#: A requeued run (SLURM_RESTART_COUNT) goes through once: Slurm's own resubmission completes.
JOB = """\
#!/bin/sh
#BERTH --nodes=2 --ntasks-per-node=1 -o out-%j.txt
echo "batch host $SLURMD_NODENAME, restart ${{SLURM_RESTART_COUNT:-0}}"
mode=$1
if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ]; then mode=once; fi
srun -N2 -n2 sh {work}/rank.sh "$mode"
echo "srun ended with status $?"
"""

#: Runs on the host of each node (srun's task): a container with the node's own state directory.
RANK = """\
#!/bin/sh
node=$SLURMD_NODENAME
BERTH_STATE_DIR={base}/$node
export BERTH_STATE_DIR
exec berth run -v {work}:{work} {image} sh -c "echo up > {work}/up-$SLURM_JOB_ID-$node; \\
  if [ '$1' != once ]; then while true; do sleep 0.2; done; fi; : {marker}"
"""


def _leaks(uid: int, directories: list[Path], marker: str) -> list[str]:
    found = []
    for directory in directories:
        found += [f"mount {m}" for m in fuse_mounts_under(str(directory))]
        found += [f"process {p}" for p in processes_mentioning(uid, str(directory))]
        containers = directory / "containers"
        if containers.is_dir():
            found += [f"container dir {directory.name}/{name}" for name in os.listdir(containers)]
    found += [f"process {p}" for p in processes_mentioning(uid, marker)]
    return found


def _wait_no_leaks(uid: int, directories: list[Path], marker: str, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        leaks = _leaks(uid, directories, marker)
        if not leaks or time.monotonic() > deadline:
            return leaks
        time.sleep(0.5)


def _start_job(job_site, user, env: dict, marker: str, *argv: str) -> tuple[Path, Path, dict, str, str]:
    """Submit JOB (``argv``: berth submit's options) with RANK on each node, each node with its
    own state directory under ``work/state``: (work, that base, the trial's env, job, Slurm id)."""
    work = job_site.workdir(user)
    base = work / "state"
    base.mkdir(mode=0o700)
    os.chown(base, user.uid, user.gid)
    trial_env = {**env, "BERTH_STATE_DIR": str(base / "batch")}
    job_site.write_script(work, "job.sh", JOB.format(work=work), user)
    job_site.write_script(work, "rank.sh", RANK.format(work=work, base=base, image=job_site.image, marker=marker),
                          user)
    job = submit(user, job_site, work, "--template", "bb", *argv, "job.sh", env=trial_env)
    native = (job_site.jobs_dir / job / "native_id").read_text().strip()
    return work, base, trial_env, job, native


def _nodes_up(work: Path, native: str, timeout_s: float = 180) -> list[str]:
    """The nodes whose container has started, once both have (fewer if ``timeout_s`` passes)."""
    deadline = time.monotonic() + timeout_s
    while len(list(work.glob(f"up-{native}-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    return sorted(path.name.rsplit("-", 1)[1] for path in work.glob(f"up-{native}-*"))


def _cleanup_every_node(user, job_site, trial_env: dict, base: Path, marker: str) -> list[str]:
    """The next berth command on every node (``doctor --cleanup`` on its state directory), then
    what is still left there: the problems found."""
    problems = []
    directories = sorted(p for p in base.iterdir() if p.is_dir())
    for directory in directories:
        cleanup = user.berth("doctor", "--cleanup", "--json",
                             env={**job_site.env, **trial_env, "BERTH_STATE_DIR": str(directory)})
        if "Traceback" in cleanup.stderr:
            problems.append(f"doctor --cleanup on {directory.name}: {describe(cleanup)}")
    left = _wait_no_leaks(user.uid, directories, marker, timeout_s=15)
    if left:
        problems.append(f"left after doctor --cleanup on every node: {left}")
    return problems


def _batch_host(cluster, native: str) -> str:
    text = cluster.run("scontrol", "show", "job", native).stdout
    found = re.search(r"BatchHost=(\S+)", text)
    assert found, text
    return found.group(1)


def test_a_node_dies_mid_job(job_site, user, slurm_cluster, campaign):
    result = campaign.scenario("6", "a Slurm node dies mid-job", 10)
    trials = campaign.trials(2, 10)
    env = {**slurm_cluster.env(), "BERTH_BACKEND": "slurm"}
    for n in range(trials):
        marker = f"berth-node-death-{os.getpid()}-{n}"
        work, base, trial_env, job, native = _start_job(job_site, user, env, marker, "--no-requeue")
        what = f"trial {n} (job {job}, Slurm job {native})"
        nodes = _nodes_up(work, native)
        if len(nodes) < 2:
            result.outcome("unclean", f"{what}: the two containers did not start\n{_output(work, job)}")
            user.berth("cancel", job, env={**job_site.env, **trial_env})
            continue
        batch = _batch_host(slurm_cluster, native)
        victim = batch if n % 2 else next(node for node in nodes if node != batch)
        survivor = next(node for node in nodes if node != victim)
        kind = "batch host" if victim == batch else "a node of a step"
        result.faults[f"node died: {kind}"] += 1
        slurm_cluster.kill_node(victim)
        try:
            try:
                state = wait_for(user, job_site, [job], FINAL, timeout_s=120, env=trial_env)[job]
            except AssertionError as error:
                result.outcome("unclean", f"{what}, {kind} {victim} died: {error}")
                continue
            # Failed at once (COMPLETING, reason NodeDown); the node is named once Slurm says
            # NODE_FAIL, a moment later.
            deadline = time.monotonic() + 30
            while True:
                status = user.berth("status", job, env={**job_site.env, **trial_env})
                message = [line for line in status.stdout.splitlines() if line.startswith("message:")]
                if (message and victim in message[0]) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            survivor_dirs = [base / survivor] + ([base / "batch"] if survivor == batch else [])
            leaks = _wait_no_leaks(user.uid, survivor_dirs, marker, timeout_s=60)
        finally:
            slurm_cluster.restart_node(victim)
        problems = []
        if state["state"] != "failed" or "node" not in (state.get("message") or "").lower():
            problems.append(f"ended {json.dumps(state)}")
        if status.returncode != 0 or "failed" not in status.stdout or not message or victim not in message[0]:
            problems.append(f"berth status does not say which node failed: {describe(status)}")
        if leaks:
            problems.append(f"the surviving node {survivor} left {leaks}")
        # The node is back: the same job again, once through, on two nodes.
        again = submit(user, job_site, work, "--template", "bb", "job.sh", "once", env=trial_env)
        final = wait_for(user, job_site, [again], FINAL, timeout_s=180, env=trial_env)[again]
        if final["state"] != "completed":
            problems.append(f"the resubmitted job {again} ended {json.dumps(final)}\n{_output(work, again)}")
        # The next berth command on the dead node cleans what the killed job left there.
        problems += _cleanup_every_node(user, job_site, trial_env, base, marker)
        if problems:
            result.outcome("unclean", f"{what}, {kind} {victim} died: " + "; ".join(problems)
                           + f"\n{_output(work, job)}")
        else:
            result.outcome("failed cleanly")
            result.figures.setdefault(f"berth status when the {kind} died",
                                      f"`{' '.join(message[0].split()) if message else status.stdout.strip()}`")
    campaign.finish(result)
    result.figures["how a node dies"] = ("SIGKILL of its slurmd and of every process in its job cgroups, then "
                                         "`scontrol update state=down` (slurmctld's verdict after SlurmdTimeout)")
    assert result.bad == 0, "\n\n".join(result.failures)


def _output(work: Path, job: str | None) -> str:
    """The output of berth job ``job`` (``-o out-%j.txt``: berth's id, not Slurm's), or of all."""
    texts = []
    for path in sorted(work.glob(f"out-{job}.txt" if job else "out-*.txt")):
        texts.append(f"==> {path.name} <==\n{path.read_text(errors='replace')[-2000:]}")
    return "\n".join(texts)


def test_a_job_slurm_requeues_after_a_node_death_runs_again(job_site, user, slurm_cluster, campaign):
    """Slurm's default for batch jobs (JobRequeue=1): a job whose node died is requeued, not
    ended. berth shows it pending with the reason, and the second run (in the same record)
    completes and leaves nothing."""
    result = campaign.results.get("6") or campaign.scenario("6", "a Slurm node dies mid-job", 10)
    env = {**slurm_cluster.env(), "BERTH_BACKEND": "slurm"}
    marker = f"berth-node-requeue-{os.getpid()}"
    work, base, trial_env, job, native = _start_job(job_site, user, env, marker)
    nodes = _nodes_up(work, native)
    assert len(nodes) == 2, f"the two containers did not start\n{_output(work, job)}"
    victim = next(node for node in nodes if node != _batch_host(slurm_cluster, native))
    result.faults["node died: requeued by Slurm"] += 1
    slurm_cluster.kill_node(victim)
    try:
        pending = wait_for(user, job_site, [job], ("pending",), timeout_s=120, env=trial_env)[job]
    finally:
        slurm_cluster.restart_node(victim)
    problems = []
    if "requeued" not in (pending.get("message") or ""):
        problems.append(f"pending without saying why: {json.dumps(pending)}")
    # Slurm holds a requeued job back a while (its BeginTime) before it runs again.
    final = wait_for(user, job_site, [job], FINAL, timeout_s=400, env=trial_env, poll_s=2)[job]
    if final["state"] != "completed":
        problems.append(f"the requeued run ended {json.dumps(final)}")
    problems += _cleanup_every_node(user, job_site, trial_env, base, marker)
    if problems:
        result.outcome("unclean", f"requeued job {job}, {victim} died: " + "; ".join(problems)
                       + f"\n{_output(work, job)}")
    else:
        result.outcome("recovered")
    campaign.finish(result)
    assert result.bad == 0, "\n\n".join(result.failures)
