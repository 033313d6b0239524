#!/usr/bin/env python3
"""Time from job start to container running, on 1, 2 and 4 nodes of the Slurm test cluster and
on the local backend (issue 4), as berthtest with the debootstrap image already in the store.

Each job (``berth submit --image REF``) runs this script inside its container on the first node::

    echo "script $(date +%s.%N)"                  # the job's container is running
    echo "launch $(date +%s.%N)"
    srun -N N -n N --ntasks-per-node=1 berth run REF /bin/sh -c 'echo "container $(date +%s.%N)"'
    echo "launch $(date +%s.%N)"
    srun -N N -n N --ntasks-per-node=1 /bin/sh -c 'echo "bare $(date +%s.%N)"'   # Slurm alone

and the benchmark reads, per job:

- boot: ``script`` − the job runner's ``started_at`` (``berth status --json``): berth's own
  share on the first node (find the image, mount it, start the runtime, start the script);
  it excludes the interpreter start of ``berth job-exec`` before the runner takes its time stamp;
- step on N nodes: from ``launch`` until the last of the N containers runs, against the same
  for a bare ``srun`` step; the difference is berth's overhead for a container on every node.
- phases (stage, mount, runtime start): shown when berth reports them (a ``phases`` or
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
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

JOB_SCRIPT = """#!/bin/sh
echo "script $(date +%s.%N)"
if [ "$1" = slurm ]; then
    echo "launch $(date +%s.%N)"
    srun -N "$2" -n "$2" --ntasks-per-node=1 berth run "$3" /bin/sh -c 'echo "container $(date +%s.%N)"'
    echo "launch-bare $(date +%s.%N)"
    srun -N "$2" -n "$2" --ntasks-per-node=1 /bin/sh -c 'echo "bare $(date +%s.%N)"'
fi
"""
FINAL = ("completed", "failed", "cancelled", "timeout")

#: Local backend: marks in the kernel exec trace of one job (submit, detached runner, container).
LOCAL_MARKS = [
    ("submit", c.is_exec("berth")),
    ("runner", c.is_exec("python", "python3", "berth")),
    ("squashfuse", c.is_exec("squashfuse", "squashfuse_ll")),
    ("runtime", c.is_exec("runc", "crun")),
    ("container", c.is_exec("sh")),
]
LOCAL_PHASES = [
    ("trace: runner exec → squashfuse exec (runner start-up, stage)", "runner", "squashfuse"),
    ("trace: squashfuse exec → runc exec (mount, bundle)", "squashfuse", "runtime"),
    ("trace: runc exec → job shell exec (runtime start)", "runtime", "container"),
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

    def run_job(self, backend: str, nodes: int, extra_env: dict) -> dict:
        """Submit one job, wait for it, and return its measurements (seconds)."""
        env = {**self.env, **extra_env}
        out_name = f"out-{backend}-{nodes}-{time.monotonic_ns()}.txt"
        argv = [str(c.BERTH), "submit", "--backend", backend, "--image", self.ref, "-o", out_name, "-t", "5"]
        if backend == "slurm":
            argv += ["-N", str(nodes), "--ntasks-per-node", "1"]
        argv += [str(self.script), backend, str(nodes), self.ref]
        job_id = self.user.run(argv, env=env, cwd=str(self.workdir)).stdout.strip().splitlines()[-1]
        deadline = time.monotonic() + 180
        while True:
            status = json.loads(self.user.run([str(c.BERTH), "status", "--json", job_id], env=env).stdout)
            if isinstance(status, list):
                status = status[0]
            state = status.get("state") or status.get("result", {}).get("state")
            if state in FINAL:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} did not finish within 180 s: {status}")
            time.sleep(0.3)
        output = (self.workdir / out_name).read_text() if (self.workdir / out_name).exists() else ""
        if state != "completed":
            raise RuntimeError(f"job {job_id} ended {state}: {status.get('message')} {output[-500:]}")
        stamps: dict[str, list[float]] = {}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in ("script", "launch", "launch-bare", "container", "bare"):
                stamps.setdefault(parts[0], []).append(float(parts[1]))
        started_at = status.get("started_at") or status.get("result", {}).get("started_at")
        measured = {}
        if started_at and "script" in stamps:
            measured["boot"] = stamps["script"][0] - float(started_at)
        if backend == "slurm":
            if len(stamps.get("container", [])) != nodes or len(stamps.get("bare", [])) != nodes:
                raise RuntimeError(f"job {job_id}: expected {nodes} container and bare lines, got {output[-800:]}")
            measured["step"] = max(stamps["container"]) - stamps["launch"][0]
            measured["bare"] = max(stamps["bare"]) - stamps["launch-bare"][0]
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
    header = c.report_header("Job start to container running (issue 4)", command.strip())
    node_counts = [int(n) for n in args.nodes.split(",")]
    c.ensure_cache_readable()
    user = c.BenchUser.lookup()
    image = c.debian_image()
    workdir = user.tempdir("berth-bench-jobs-", Path("/tmp"))
    slurm_root = workdir / "slurm"
    results: dict[tuple[str, int], dict[str, c.Sample]] = {}
    unavailable: dict[str, str] = {}
    phases_seen = False
    traced_phases = False
    slurm_started = False
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
                        for nodes in node_counts:
                            samples = {}
                            for _ in range(args.runs):
                                c.log(f"slurm job on {nodes} node(s)")
                                for key, value in bench.run_job("slurm", nodes, slurm_env).items():
                                    samples.setdefault(key, c.Sample()).add(value)
                            results[("slurm", nodes)] = samples
                    except RuntimeError as error:
                        unavailable["slurm"] = c.error_line(str(error))
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
                    rows.append([backend, str(nodes), f"not available: {unavailable.get(backend, '?')}", "—", "—", "—",
                                 *["—" for _ in phase_names]])
                    continue
                step, bare = samples.get("step"), samples.get("bare")
                overhead = f"{(step.median - bare.median) * 1000:.0f}" if step and bare else "—"
                rows.append([backend, str(nodes), samples["boot"].cell("ms") if "boot" in samples else "—",
                             step.cell("ms") if step else "—", bare.cell("ms") if bare else "—", overhead,
                             *[samples[name].cell("ms") if name in samples else "—" for name in phase_names]])
        sections.append(c.markdown_table(
            ["backend", "nodes", "boot on first node, ms", "container step on N nodes, ms", "bare srun step, ms",
             "berth overhead (step − bare), ms", *phase_names], rows))
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
            sections.append(f"- target flat in node count ({max(node_counts)}-node / 1-node step ≤ 1.2): "
                            f"{flat:.2f}, {'met' if flat <= 1.2 else 'NOT met'}")
            single = one["step"].median - one["bare"].median
            sections.append(f"- target berth overhead per node < 100 ms warm: step − bare on 1 node (one "
                            f"container, no core shared with another node's) = {single * 1000:.0f} ms, "
                            f"{'met' if single < 0.1 else 'NOT met'}; on {max(node_counts)} nodes "
                            f"{(four['step'].median - four['bare'].median) * 1000:.0f} ms for all of them, "
                            "their containers sharing this machine's 2 cores")
        if not phases_seen:
            sections.append("- phases as berth reports them: not available: `berth status --json` has no phase "
                            "timings" + ("; the local phases above come from kernel exec events (tracefs); "
                                         "Slurm jobs are started by slurmd, outside this process tree, so they "
                                         "are not traced" if traced_phases else ""))
    c.emit_report(sections, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
