"""bench/jobs_start.py's node side of a job step (issue 10, target 5): the steps picked out of a
system-wide trace of exec, exit and fork events by their fork tree, each phase's marks, and the
processes a berth task left running in the step."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _jobs_start():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_jobs_start", BENCH / "jobs_start.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _step(c, start: float, first_pid: int, task: str, slurmd: int, *, daemon_outlives: bool = False) -> list:
    """The events of one ``srun TASK`` from this process, slurmstepd forked by ``slurmd``."""
    me, srun, stepd, task_pid, fuse, runtime, command = (os.getpid(), *range(first_pid, first_pid + 6))
    E = c.ExecEvent  # noqa: N806
    events = [E(start, "fork", "sh", srun, me), E(start + 0.001, "exec", "/usr/bin/srun", srun),
              E(start + 0.008, "fork", "slurmd", stepd, slurmd), E(start + 0.009, "exec", "/usr/sbin/slurmstepd", stepd),
              E(start + 0.020, "fork", "slurmstepd", task_pid, stepd),
              E(start + 0.021, "exec", f"/venv/bin/{task}" if task == "berth" else f"/bin/{task}", task_pid)]
    end = start + 0.022
    if task == "berth":
        events += [E(start + 0.060, "fork", "berth", fuse, task_pid), E(start + 0.061, "exec", "/usr/bin/squashfuse_ll", fuse),
                   E(start + 0.065, "fork", "berth", runtime, task_pid), E(start + 0.066, "exec", "/usr/bin/setpriv", runtime),
                   E(start + 0.067, "exec", "/x/berth-launcher", runtime),
                   E(start + 0.068, "fork", "berth-launcher", command, runtime),
                   E(start + 0.069, "exec", "/bin/true", command), E(start + 0.070, "exit", "true", command),
                   E(start + 0.071, "exit", "berth-launcher", runtime)]
        if not daemon_outlives:
            events.append(E(start + 0.072, "exit", "squashfuse_ll", fuse))
        end = start + 0.075
    events += [E(end, "exit", task, task_pid), E(end + 0.012, "exit", "slurmstepd", stepd),
               E(end + 0.013, "exit", "srun", srun)]
    return events


def test_steps_and_their_phases_are_found_by_the_fork_tree():
    jobs_start = _jobs_start()
    c = jobs_start.c
    slurmd = 4242
    stranger = [c.ExecEvent(0.5, "exec", "/usr/bin/srun", 9000),  # another user's cluster: not ours
                c.ExecEvent(0.51, "exec", "/usr/sbin/slurmstepd", 9001), c.ExecEvent(0.52, "exit", "srun", 9000)]
    events = [*_step(c, 1.0, 100, "berth", slurmd), *stranger, *_step(c, 2.0, 200, "true", slurmd),
              *_step(c, 3.0, 300, "berth", slurmd, daemon_outlives=True)]
    steps = jobs_start.step_marks(events, [slurmd])
    assert [(kind, left) for kind, _, left in steps] == [("berth", 0), ("true", 0), ("berth", 1)]
    berth = steps[0][1]
    phases = {label: round((berth[end] - berth[start]) * 1000, 3) for label, start, end in jobs_start.STEP_PHASES
              if start in berth and end in berth}
    assert phases == {
        "srun exec → slurmstepd exec (Slurm: the step created and launched)": 8.0,
        "slurmstepd exec → task exec (slurmstepd's set-up)": 12.0,
        "berth exec → squashfuse exec (interpreter, imports, settings, image look-up)": 40.0,
        "squashfuse exec → runtime exec (mount, plan, bundle)": 6.0,
        "runtime exec → /bin/true exec (runtime start, berth-init)": 2.0,
        "/bin/true exit → berth exit (teardown: unmount, daemon exit, state removed)": 5.0,
        "task exec → task exit (the whole task)": 54.0,
        "task exit → slurmstepd exit (step end: cgroup clean-up, accounting)": 12.0,
        "slurmstepd exit → srun exit": 1.0,
        "total: srun exec → srun exit": 87.0,
    }
