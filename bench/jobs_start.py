#!/usr/bin/env python3
"""Time from job start to container running, on 1, 2 and 4 nodes of the Slurm test cluster and
on the local backend (issue 4), and berth's cost per node of a job step, wall and CPU (issue 10,
target 5), as berthtest with the debootstrap image already in the store (warm).

Each job (``berth submit --image REF``) runs this script inside its container on the first node::

    echo "script $(date +%s.%N)"                  # the job's container is running
    echo "launch $(date +%s.%N)"
    srun -N N -n N --ntasks-per-node=1 berth run REF /bin/sh -c 'echo "container $(date +%s.%N)"'
    echo "launch $(date +%s.%N)"
    srun -N N -n N --ntasks-per-node=1 /bin/sh -c 'echo "bare $(date +%s.%N)"'   # Slurm alone
    srun -N N -n N --ntasks-per-node=1 bench/treecpu.py berth run REF /bin/true  # CPU per node
    srun -N N -n N --ntasks-per-node=1 bench/treecpu.py /bin/true                # the same, bare
    srun -N 1 -n 1 berth --debug run REF /bin/true                                # berth's phases

and the benchmark reads, per job:

- boot: ``script`` − the job runner's ``started_at`` (``berth status --json``): berth's own
  share on the first node (find the image, mount it, start the runtime, start the script);
  it excludes the interpreter start of ``berth job-exec`` before the runner takes its time stamp;
- step on N nodes: from ``launch`` until the last of the N containers runs, against the same
  for a bare ``srun`` step; the difference is berth's overhead for a container on every node.
- CPU per node: bench/treecpu.py makes itself the subreaper of what it starts and prints the
  user + system time of the whole tree (the FUSE daemon and the runtime included) and its wall
  time; berth's CPU per node is the berth tree's minus the bare one's. Unlike the step times it
  does not depend on how many test nodes share this machine's cores.
- berth's phases of a step container: the ``timing:`` line of ``berth --debug run``.
- job phases (stage, mount, runtime start): shown when berth reports them (a ``phases`` or
  ``timings`` object in ``berth status --json``), else "not available".

Every "node" of the test cluster is a slurmd on this same 2-core machine, so N containers
start on 2 cores: a rise with N here is CPU contention that real nodes would not have.

Usage::

    python3 bench/jobs_start.py [--runs 3] [--nodes 1,2,4] [--output FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

JOB_SCRIPT = """#!/bin/sh
echo "script $(date +%s.%N)"
# the step agent as before its wake-up FIFO: it finds requests by scanning every 50 ms
if [ "$5" = scan ]; then rm -f "$BERTH_JOB_AGENT/wake"; fi
if [ "$1" = slurm ]; then
    echo "launch $(date +%s.%N)"
    srun -N "$2" -n "$2" --ntasks-per-node=1 berth run "$3" /bin/sh -c 'echo "container $(date +%s.%N)"'
    echo "launch-bare $(date +%s.%N)"
    srun -N "$2" -n "$2" --ntasks-per-node=1 /bin/sh -c 'echo "bare $(date +%s.%N)"'
    srun -N "$2" -n "$2" --ntasks-per-node=1 "$4" berth run "$3" /bin/true | sed 's/^treecpu/cpu-berth/'
    srun -N "$2" -n "$2" --ntasks-per-node=1 "$4" /bin/true | sed 's/^treecpu/cpu-bare/'
    srun -N 1 -n 1 berth --debug run "$3" /bin/true 2>&1 | grep 'timing:'
fi
echo "end $(date +%s.%N)"
"""
#: How often the benchmark asks `berth status` while a job runs. Each ask starts a Python and an
#: squeue beside the steps being timed; every 0.3 s, that took CPU from them (a kernel trace of a
#: job showed one overlapping a container step's start: berth exec → squashfuse exec 60 ms
#: instead of 38). So the job's output is watched for its last line (reads, no process), and
#: status is asked only when it is there or the output has not changed for this long (a job
#: that failed, or one whose output is written when it ends).
STATUS_POLL_S = 2.0
#: Steps of each kind in one allocation, run from the host (no job container, no step agent),
#: traced system-wide for the node side of a step (trace_steps).
STEP_SCRIPT = """#!/bin/sh
srun -N1 -n1 /bin/true
for i in $(seq "$1"); do
    srun -N1 -n1 berth run "$2" /bin/true
    srun -N1 -n1 /bin/true
    srun -N1 -n1 /bin/sleep 0.05
done
"""
#: The kinds of step trace_steps tells apart, by what slurmstepd executes.
STEP_KINDS = {"berth": "berth run IMAGE /bin/true", "true": "bare /bin/true", "sleep": "bare /bin/sleep 0.05"}
STEP_PHASES = [
    ("srun exec → slurmstepd exec (Slurm: the step created and launched)", "srun", "stepd"),
    ("slurmstepd exec → task exec (slurmstepd's set-up)", "stepd", "task"),
    ("berth exec → squashfuse exec (interpreter, imports, settings, image look-up)", "task", "squashfuse"),
    ("squashfuse exec → runtime exec (mount, plan, bundle)", "squashfuse", "runtime"),
    ("runtime exec → /bin/true exec (runtime start, berth-init)", "runtime", "command"),
    ("/bin/true exit → berth exit (teardown: unmount, daemon exit, state removed)", "command exit", "task exit"),
    ("task exec → task exit (the whole task)", "task", "task exit"),
    ("task exit → slurmstepd exit (step end: cgroup clean-up, accounting)", "task exit", "stepd exit"),
    ("slurmstepd exit → srun exit", "stepd exit", "srun exit"),
    ("total: srun exec → srun exit", "srun", "srun exit"),
]
TREECPU = Path(__file__).resolve().parent / "treecpu.py"
FINAL = ("completed", "failed", "cancelled", "timeout")

#: Local backend: marks in the kernel exec trace of one job (submit, detached runner, container).
LOCAL_MARKS = [
    ("submit", c.is_exec("berth")),
    ("runner", c.is_exec("python", "python3", "berth")),
    ("squashfuse", c.is_exec("squashfuse", "squashfuse_ll")),
    ("runtime", c.is_exec("runc", "crun", "berth-launcher")),
    ("container", c.is_exec("sh")),
]
LOCAL_PHASES = [
    ("trace: runner exec → squashfuse exec (runner start-up, stage)", "runner", "squashfuse"),
    ("trace: squashfuse exec → runtime exec (mount, bundle)", "squashfuse", "runtime"),
    ("trace: runtime exec (berth-launcher or runc) → job shell exec (runtime start)", "runtime", "container"),
    ("trace: runner exec → job shell exec (all of berth's share)", "runner", "container"),
]


def find_phases(data) -> dict | None:
    """A phase-timing object anywhere in ``berth status --json`` ("phases" or "timings" key)."""
    if isinstance(data, dict):
        for key in ("phases", "timings"):
            if isinstance(data.get(key), dict) and data[key]:
                return data[key]
        for value in data.values():
            found = find_phases(value)
            if found:
                return found
    if isinstance(data, list):
        for value in data:
            found = find_phases(value)
            if found:
                return found
    return None


def step_marks(events: list, slurmds: list[int]) -> list[tuple[str, dict[str, float], int]]:
    """The steps of a system-wide trace (c.ExecTrace(system_wide=True)) of STEP_SCRIPT: for
    each srun, its kind (STEP_KINDS), the time of each mark of STEP_PHASES, and how many of the
    task's processes were still running when it exited (left in the step's cgroup)."""
    ours = c.descendants(events, [os.getpid(), *slurmds])
    events = [e for e in events if e.pid in ours]
    name = lambda e: os.path.basename(e.name)  # noqa: E731
    steps = []
    for index, event in enumerate(events):
        if not (event.kind == "exec" and name(event) == "srun"):
            continue
        later = events[index + 1:]
        srun_exit = next((e for e in later if e.kind == "exit" and e.pid == event.pid), None)
        stepd = next((e for e in later if e.kind == "exec" and name(e) == "slurmstepd"), None)
        if srun_exit is None or stepd is None or stepd.time_s > srun_exit.time_s:
            continue
        in_step = c.descendants(later, [stepd.pid])
        task = next((e for e in later if e.kind == "exec" and e.pid in in_step and name(e) != "slurmstepd"
                     and e.time_s > stepd.time_s), None)
        kind = name(task) if task else None
        if kind not in STEP_KINDS:
            continue
        marks = {"srun": event.time_s, "stepd": stepd.time_s, "task": task.time_s, "srun exit": srun_exit.time_s}
        for e in later:
            if e.kind == "exit" and e.pid == task.pid and "task exit" not in marks:
                marks["task exit"] = e.time_s
            if e.kind == "exit" and e.pid == stepd.pid and "stepd exit" not in marks:
                marks["stepd exit"] = e.time_s
        left = 0
        if kind == "berth":
            tree = c.descendants(later, [task.pid])
            command = None
            for e in later:
                if e.pid not in tree or e.pid == task.pid or e.time_s < task.time_s:
                    continue
                if e.kind == "exec" and name(e) in ("squashfuse", "squashfuse_ll"):
                    marks.setdefault("squashfuse", e.time_s)
                elif e.kind == "exec" and name(e) in ("berth-launcher", "runc", "crun"):
                    marks.setdefault("runtime", e.time_s)
                elif e.kind == "exec" and name(e) == "true":
                    marks.setdefault("command", e.time_s)
                    command = e.pid
                elif e.kind == "exit" and e.pid == command:
                    marks.setdefault("command exit", e.time_s)
            exited = {e.pid for e in later if e.kind == "exit" and e.time_s <= marks.get("task exit", 0)}
            started = {e.pid for e in later if e.kind == "exec" and e.pid in tree}
            left = len(started - exited)
        steps.append((kind, marks, left))
    return steps


def trace_steps(user: c.BenchUser, env: dict, workdir: Path, ref: str, runs: int, slurm_root: Path) -> tuple[
        dict[str, dict[str, c.Sample]], int, str | None]:
    """The node side of a job step, berth's against bare ones (issue 10, target 5): STEP_SCRIPT
    in one allocation (``salloc -N1``), the kernel's exec, exit and fork events of the whole
    machine, this cluster's slurmds' and this process's descendants picked out. Returns, per
    step kind, a Sample per STEP_PHASES label; how many of berth's processes outlived it; or
    why it could not be traced."""
    why = c.ExecTrace.available()
    if why:
        return {}, 0, why
    script = workdir / "steps.sh"
    script.write_text(STEP_SCRIPT)
    script.chmod(0o755)
    slurmds = [pid for name, pid in json.loads((slurm_root / "cluster.json").read_text())["pids"].items()
               if name.startswith("slurmd")]
    samples: dict[str, dict[str, c.Sample]] = {}
    left = 0
    with c.ExecTrace(system_wide=True) as trace:
        trace.start()
        user.run(["salloc", "-N1", "-n1", "-t", "5", str(script), str(runs), ref], env=env, cwd=str(workdir))
        events = trace.stop()
    for kind, marks, still in step_marks(events, slurmds):
        left += still
        for label, start, end in STEP_PHASES:
            if start in marks and end in marks:
                samples.setdefault(kind, {}).setdefault(label, c.Sample()).add(marks[end] - marks[start])
    if not samples:
        return {}, 0, "no step was found in the trace"
    return samples, left, None


def start_slurm(root: Path, nodes: int) -> tuple[dict | None, str | None]:
    """Start the harness's Slurm cluster; its environment, or why it cannot start."""
    if not (c.REPO / "tests" / "harness" / "slurm.py").exists():
        return None, "tests/harness/slurm.py does not exist yet"
    result = subprocess.run([str(c.VENV / "bin" / "python"), "-m", "tests.harness.slurm", "start", str(root),
                             "--nodes", str(nodes)], cwd=c.REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    if result.returncode != 0:
        return None, f"the Slurm test cluster does not start: {c.error_line(result.stderr or result.stdout)}"
    env = {}
    for line in result.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line[len("export "):].split("=", 1)
            env[name] = value
    return env, None


def stop_slurm(root: Path) -> None:
    subprocess.run([str(c.VENV / "bin" / "python"), "-m", "tests.harness.slurm", "stop", str(root)],
                   cwd=c.REPO, capture_output=True, text=True, timeout=120, check=False)


class JobBench:
    def __init__(self, user: c.BenchUser, workdir: Path, env: dict, ref: str) -> None:
        self.user = user
        self.workdir = workdir
        self.env = env
        self.ref = ref
        self.script = workdir / "start.sh"
        self.script.write_text(JOB_SCRIPT)
        self.script.chmod(0o755)
        os.chown(self.script, user.uid, user.gid)
        self.phases_seen = False
        #: berth's own phases of a step's container (``berth --debug run``'s timing line)
        self.step_phases: dict[str, c.Sample] = {}

    def run_job(self, backend: str, nodes: int, extra_env: dict, agent: str = "wake") -> dict:
        """Submit one job, wait for it, and return its measurements (seconds)."""
        env = {**self.env, **extra_env}
        out_name = f"out-{backend}-{nodes}-{time.monotonic_ns()}.txt"
        argv = [str(c.BERTH), "submit", "--backend", backend, "--image", self.ref, "-o", out_name, "-t", "5"]
        if backend == "slurm":
            argv += ["-N", str(nodes), "--ntasks-per-node", "1"]
        argv += [str(self.script), backend, str(nodes), self.ref, str(TREECPU), agent]
        job_id = self.user.run(argv, env=env, cwd=str(self.workdir)).stdout.strip().splitlines()[-1]
        deadline = time.monotonic() + 180
        out_path = self.workdir / out_name
        asked = 0.0
        seen = ""
        while True:
            text = out_path.read_text(errors="replace") if out_path.exists() else ""
            ended = "\nend " in "\n" + text
            if text != seen:  # the job is writing: no status asked beside its steps
                seen, asked = text, time.monotonic()
            if ended or time.monotonic() - asked >= STATUS_POLL_S:
                asked = time.monotonic()
                status = json.loads(self.user.run([str(c.BERTH), "status", "--json", job_id], env=env).stdout)
                if isinstance(status, list):
                    status = status[0]
                state = status.get("state") or status.get("result", {}).get("state")
                if state in FINAL:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} did not finish within 180 s: {status}")
            time.sleep(0.3 if ended else 0.05)
        output = out_path.read_text() if out_path.exists() else ""
        if state != "completed":
            raise RuntimeError(f"job {job_id} ended {state}: {status.get('message')} {output[-500:]}")
        stamps: dict[str, list[float]] = {}
        cpu: dict[str, list[tuple[float, float]]] = {}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in ("script", "launch", "launch-bare", "container", "bare"):
                stamps.setdefault(parts[0], []).append(float(parts[1]))
            elif len(parts) == 4 and parts[0] in ("cpu-berth", "cpu-bare"):
                cpu.setdefault(parts[0], []).append((float(parts[1]) + float(parts[2]), float(parts[3])))
            elif "timing:" in line:
                # berth --debug run: "timing: prepare 2.0 ms, mount 6.7 ms, ..."
                for name, value in re.findall(r"(\w+) ([0-9.]+) ms", line.split("timing:", 1)[1]):
                    self.step_phases.setdefault(name, c.Sample()).add(float(value) / 1000)
        started_at = status.get("started_at") or status.get("result", {}).get("started_at")
        measured = {}
        if started_at and "script" in stamps:
            measured["boot"] = stamps["script"][0] - float(started_at)
        if backend == "slurm":
            if len(stamps.get("container", [])) != nodes or len(stamps.get("bare", [])) != nodes:
                c.log(f"job {job_id}'s output:\n{output}")
                raise RuntimeError(f"job {job_id}: expected {nodes} container and bare lines (the output is in the log)")
            measured["step"] = max(stamps["container"]) - stamps["launch"][0]
            measured["bare"] = max(stamps["bare"]) - stamps["launch-bare"][0]
            if len(cpu.get("cpu-berth", [])) != nodes or len(cpu.get("cpu-bare", [])) != nodes:
                c.log(f"job {job_id}'s output:\n{output}")
                raise RuntimeError(f"job {job_id}: expected {nodes} treecpu lines per step (the output is in the log)")
            # per node: the median node's CPU and wall of its berth run (bench/treecpu.py)
            measured["cpu berth"] = statistics.median(v[0] for v in cpu["cpu-berth"])
            measured["cpu bare"] = statistics.median(v[0] for v in cpu["cpu-bare"])
            measured["node wall berth"] = statistics.median(v[1] for v in cpu["cpu-berth"])
        phases = find_phases(status)
        if phases:
            self.phases_seen = True
            for name, value in phases.items():
                if isinstance(value, (int, float)):
                    measured[f"phase {name}"] = float(value)
        return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", default="1,2,4")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if os.getuid() != 0:
        parser.error("run as root (it starts a registry and the Slurm test cluster)")
    command = "python3 bench/jobs_start.py " + " ".join(sys.argv[1:])
    header = c.report_header("Job start to container running, and berth per node of a step (issues 4 and 10)",
                                command.strip())
    node_counts = [int(n) for n in args.nodes.split(",")]
    c.ensure_cache_readable()
    user = c.BenchUser.lookup()
    image = c.debian_image()
    workdir = user.tempdir("berth-bench-jobs-", Path("/tmp"))
    slurm_root = workdir / "slurm"
    results: dict[tuple[str, int], dict[str, c.Sample]] = {}
    unavailable: dict[str, str] = {}
    agent_samples: dict[tuple[str, str], c.Sample] = {}
    phases_seen = False
    traced_phases = False
    slurm_started = False
    step_trace: tuple[dict, int, str | None] = ({}, 0, "the Slurm test cluster did not run")
    try:
        missing = c.berth_subcommand_missing(user, "submit") or c.berth_subcommand_missing(user, "status")
        if missing:
            unavailable["all"] = missing
        else:
            with c.Registry(c.registry_storage()) as registry:
                c.ensure_pushed(registry, [image])
                site = user.tempdir("site-", workdir)
                config_dir = c.berth_config_dir(user, [registry.host], site)
                env = c.berth_env(config_dir, site / "user-store", site / "state")
                env.update({"BERTH_JOBS_DIR": str(site / "jobs"), "BERTH_SITE_STORE": str(site / "site-store"),
                            "XDG_CONFIG_HOME": str(site / "xdg")})
                ref = image.ref(registry)
                pull = [str(c.BERTH), "pull"] + (["--insecure"] if c.berth_help_has(user, "pull", "--insecure") else [])
                user.run([*pull, ref], env=env)
                bench = JobBench(user, workdir, env, ref)
                # local backend, each job also traced (kernel exec events) for its phases
                try:
                    bench.run_job("local", 1, {})  # warm-up
                    samples: dict[str, c.Sample] = {}
                    with contextlib.ExitStack() as stack:
                        trace = None if c.ExecTrace.available() else stack.enter_context(c.ExecTrace())
                        for _ in range(args.runs):
                            if trace:
                                trace.start()
                            for key, value in bench.run_job("local", 1, {}).items():
                                samples.setdefault(key, c.Sample()).add(value)
                            found = c.exec_marks(trace.stop(), LOCAL_MARKS) if trace else None
                            if found:
                                traced_phases = True
                                for label, start, end in LOCAL_PHASES:
                                    samples.setdefault(label, c.Sample()).add(found[end] - found[start])
                    results[("local", 1)] = samples
                except RuntimeError as error:
                    unavailable["local"] = c.error_line(str(error))
                # Slurm
                slurm_env, why = start_slurm(slurm_root, max(node_counts))
                if why:
                    unavailable["slurm"] = why
                else:
                    slurm_started = True
                    try:
                        bench.run_job("slurm", 1, slurm_env)  # warm-up
                        bench.step_phases.clear()
                        for nodes in node_counts:
                            samples = {}
                            for _ in range(args.runs):
                                c.log(f"slurm job on {nodes} node(s)")
                                for key, value in bench.run_job("slurm", nodes, slurm_env).items():
                                    samples.setdefault(key, c.Sample()).add(value)
                            results[("slurm", nodes)] = samples
                        # the agent's wake-up FIFO against its 50 ms scan (FIFO removed), same run, 1 node
                        for agent in ("scan", "wake"):
                            for _ in range(args.runs):
                                c.log(f"slurm job on 1 node, step agent: {agent}")
                                for key, value in bench.run_job("slurm", 1, slurm_env, agent).items():
                                    if key in ("step", "bare"):
                                        agent_samples.setdefault((agent, key), c.Sample()).add(value)
                    except RuntimeError as error:
                        unavailable["slurm"] = c.error_line(str(error))
                    c.log("steps from the host, traced")
                    try:
                        step_trace = trace_steps(user, {**env, **slurm_env}, workdir, ref, args.runs, slurm_root)
                    except RuntimeError as error:
                        step_trace = ({}, 0, c.error_line(str(error)))
                phases_seen = bench.phases_seen
    finally:
        if slurm_started:
            stop_slurm(slurm_root)
        c.rm_tree(workdir)

    sections = [header]
    if "all" in unavailable:
        sections.append(f"not available: {unavailable['all']}")
    else:
        rows = []
        phase_names = sorted({key for samples in results.values() for key in samples if key.startswith("phase ")})
        for backend, counts in (("local", [1]), ("slurm", node_counts)):
            for nodes in counts:
                samples = results.get((backend, nodes))
                if samples is None:
                    rows.append([backend, str(nodes), f"not available: {unavailable.get(backend, '?')}",
                                 *["—" for _ in range(6)], *["—" for _ in phase_names]])
                    continue
                step, bare = samples.get("step"), samples.get("bare")
                overhead = f"{(step.median - bare.median) * 1000:.0f}" if step and bare else "—"
                cpu, cpu_bare = samples.get("cpu berth"), samples.get("cpu bare")
                cpu_net = f"{(cpu.median - cpu_bare.median) * 1000:.0f}" if cpu and cpu_bare else "—"
                rows.append([backend, str(nodes), samples["boot"].cell("ms") if "boot" in samples else "—",
                             step.cell("ms") if step else "—", bare.cell("ms") if bare else "—", overhead,
                             samples["node wall berth"].cell("ms") if "node wall berth" in samples else "—",
                             cpu.cell("ms") if cpu else "—", cpu_net,
                             *[samples[name].cell("ms") if name in samples else "—" for name in phase_names]])
        sections.append(c.markdown_table(
            ["backend", "nodes", "boot on first node, ms", "container step on N nodes, ms", "bare srun step, ms",
             "berth overhead (step − bare), ms", "berth run on a node, wall ms", "CPU per node, berth run tree, ms",
             "berth CPU per node (− bare tree), ms", *phase_names], rows))
        sections.append("")
        sections.append("Per node (bench/treecpu.py around `berth run IMAGE /bin/true` and around `/bin/true` on "
                        "every node of a step; user + system CPU of the whole process tree, FUSE daemon and runtime "
                        "included; median node of each step, median of the runs). The CPU figure does not depend "
                        "on how many test nodes share this machine's 2 cores; the wall figures do.")
        sections.append("")
        if bench.step_phases:
            sections += ["berth's own phases of one step container (`srun -N1 berth --debug run IMAGE /bin/true`, "
                         "its 'timing:' line; what comes before 'prepare' — interpreter start, imports, settings, "
                         "image lookup — is the node's wall figure minus their sum):", "",
                         c.markdown_table(["phase", "ms: median (min–max)"],
                                          [[name, sample.cell("ms")] for name, sample in bench.step_phases.items()]),
                         ""]
        if agent_samples:
            sections += ["Steps started from inside the job's container go through the step agent; the agent woken by "
                         "its FIFO against its 50 ms scan (the job removes the FIFO: the agent before the change), "
                         "1 node, same run:", "",
                         c.markdown_table(["step agent", "container step, ms", "bare srun step, ms"],
                                          [[agent, agent_samples[(agent, "step")].cell("ms"),
                                            agent_samples[(agent, "bare")].cell("ms")]
                                           for agent in ("scan", "wake") if (agent, "step") in agent_samples]),
                         ""]
        traced, left, why = step_trace
        if why:
            sections += [f"Node side of a step (kernel events): not available: {why}", ""]
        else:
            kinds = [kind for kind in STEP_KINDS if kind in traced]
            sections += ["Node side of one step, berth's against bare ones: `salloc -N1` running `srun -N1 -n1 "
                         "berth run IMAGE /bin/true`, `srun … /bin/true` and `srun … /bin/sleep 0.05` in turn "
                         f"from the host (no job container, no step agent), {args.runs} of each; the kernel's "
                         "exec, exit and fork events of the whole machine, this cluster's slurmds' and the "
                         "benchmark's descendants picked out; ms, median (min–max):", "",
                         c.markdown_table(["phase", *[STEP_KINDS[kind] for kind in kinds]],
                                          [[label, *[traced[kind][label].cell("ms")
                                                              if label in traced[kind] else "—" for kind in kinds]]
                                           for label, _, _ in STEP_PHASES]),
                         "", f"- berth's processes still running when berth exited (left in the step's cgroup): "
                         f"{left}"]
            total = "total: srun exec → srun exit"
            if total in traced.get("berth", {}) and total in traced.get("true", {}):
                node = (traced["berth"][total].median - traced["true"][total].median) * 1000
                sections.append(f"- target berth overhead per node < 100 ms warm, node side traced (one step "
                                f"`berth run IMAGE /bin/true` against one of `/bin/true`, srun exec → srun exit, "
                                f"1 node, from the host): {node:.0f} ms, {'met' if node < 100 else 'NOT met'}")
            sections.append("")
        local = results.get(("local", 1), {})
        if traced_phases:
            sections += ["Local backend, berth's share by phase (kernel exec events of the same jobs):", "",
                         c.markdown_table(["phase", "ms: median (min–max)"],
                                          [[label[len("trace: "):], local[label].cell("ms")]
                                           for label, _, _ in LOCAL_PHASES if label in local]), ""]
        one, four = results.get(("slurm", 1)), results.get(("slurm", max(node_counts)))
        if one and four and "step" in one and "step" in four and max(node_counts) > 1:
            flat = four["step"].median / one["step"].median
            flat_bare = four["bare"].median / one["bare"].median
            sections.append(f"- target flat in node count ({max(node_counts)}-node / 1-node step ≤ 1.2): "
                            f"{flat:.2f}, {'met' if flat <= 1.2 else 'NOT met'} (bare srun: {flat_bare:.2f}; "
                            f"the test nodes share 2 cores)")
            single = one["step"].median - one["bare"].median
            sections.append(f"- target berth overhead per node < 100 ms warm: step − bare on 1 node (one "
                            f"container, no core shared with another node's) = {single * 1000:.0f} ms, "
                            f"{'met' if single < 0.1 else 'NOT met'}; on {max(node_counts)} nodes "
                            f"{(four['step'].median - four['bare'].median) * 1000:.0f} ms for all of them, "
                            "their containers sharing this machine's 2 cores")
            if "cpu berth" in one and "cpu berth" in four:
                per_node = [(results[("slurm", n)]["cpu berth"].median - results[("slurm", n)]["cpu bare"].median)
                            * 1000 for n in node_counts if ("slurm", n) in results]
                sections.append(f"- berth CPU per node (user + system, whole tree, minus the bare command's): "
                                + ", ".join(f"{n} node(s) {v:.0f} ms" for n, v in zip(node_counts, per_node))
                                + f"; on nodes with their own cores a {max(node_counts)}-node step would take "
                                f"about the 1-node step plus Slurm's fan-out")
                cpu_flat = per_node[-1] / per_node[0] if per_node and per_node[0] > 0 else float("inf")
                sections.append(f"- target flat in node count, by CPU (berth CPU per node, {max(node_counts)} nodes / "
                                f"1 node ≤ 1.2; independent of the shared cores): {cpu_flat:.2f}, "
                                f"{'met' if cpu_flat <= 1.2 else 'NOT met'}")
        if not phases_seen:
            sections.append("- phases as berth reports them: not available: `berth status --json` has no phase "
                            "timings" + ("; the local phases above come from kernel exec events (tracefs); "
                                         "Slurm jobs are started by slurmd, outside this process tree, so they "
                                         "are not traced" if traced_phases else ""))
    c.emit_report(sections, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
