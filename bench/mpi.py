#!/usr/bin/env python3
"""MPI at native speed (issue 13): point-to-point and collective micro-benchmarks and the launch
time of an N-rank hello world, bare host vs berth, side by side in one run on the Slurm test
cluster (4 slurmd "nodes" on this machine, all traffic on loopback).

What runs:

- ``bench/mpi/mpibench.c``, written after the OSU micro-benchmarks' method (warm-up iterations
  not timed, REPS timed blocks of ITERS iterations per size, per-size median of the blocks):
  ping-pong latency and windowed bandwidth 1 B .. ``--max-p2p`` (4 MiB), allreduce and broadcast
  1 B .. ``--max-coll`` (16 KiB). It is **compiled once on the host** with ``mpicc`` (Debian 12's
  OpenMPI 4.1.4, the same as in the image) and the same binary is used twice: bare from a host
  directory, and inside berth from ``/opt/bench/mpibench`` in an image layer added on top of the
  MPI test image (``tests/harness/mpi.py``: Debian bookworm minbase + openmpi-bin). No bind mount.
- Placements: 2 ranks on one node (``-N1 -n2``; over TCP, and over shared memory where the
  scope allows it) and 2 ranks on two nodes (``-N2 -n2``), each ``srun --mpi=pmix ...
  ./mpibench`` (bare) and ``srun --mpi=pmix ... berth run --scope task|node IMG
  /opt/bench/mpibench`` (berth: a container per rank, or per node), in the order bare, berth
  per scope, bare, so that the bare host's spread against itself (the two bare runs) shows what
  is noise.
- Launch: wall time of ``srun --mpi=pmix -N NODES -n N [--overcommit] hello`` (MPI_Init,
  one MPI_Allreduce, MPI_Finalize) for N = 2, 4, 8 over 1, 2, 4 nodes, bare vs berth per scope.
- MPICH and host MPI injection (``--family mpich``): the same mpibench compiled with Debian's
  ``mpicc.mpich`` (MPICH 4.0.2, ch4:ucx), ranks started with ``srun --mpi=pmi2``, UCX kept to
  TCP on loopback (``UCX_TLS=tcp,self``, ``UCX_NET_DEVICES=lo``). Bare: the host's MPICH; berth
  task: the image's own MPICH (``tests/harness/mpi.py``'s MPICH image: a copy of Debian's library
  as version 4.0.1); berth task/node + host: ``berth run --mpi host``, the host's MPICH injected
  (site ``[mpi]``: libmpich and its UCX/hwloc libraries). Within one node, bare MPICH and
  ``--scope node`` use MPICH's shared memory; ``--scope task`` cannot (berth sets
  ``MPIR_CVAR_NOLOCAL=1``: the ranks talk over TCP).

Test-bed limits (TESTBED.md): every "node" has the same host name, so OpenMPI runs with
``btl=self,tcp`` on 127.0.0.1 (no shared memory, bare or not); the 2 cores are shared with the
ranks of the other "node" and with whatever else runs on the machine.

Usage (as root; runs the ranks as ``berthtest``; kept out of the test suite)::

    python3 bench/mpi.py                                   # full: about 15 minutes on 2 loaded cores
    python3 bench/mpi.py --quick                           # a few minutes
    python3 bench/mpi.py --max-p2p 65536 --iters 200 --reps 5 --rounds 1 --launch-runs 2
    python3 bench/mpi.py --family openmpi --placements "2 nodes, tcp" --modes task,task@runc,node \
        --tests allreduce,bcast --max-coll 64 --rounds 5 --launch-runs 0   # one question, in detail

Every launch's values are also logged (stderr), so that a state change within one launch or
between launches can be told from a cost of a mode.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common as c

SOURCE = Path(__file__).resolve().parent / "mpi" / "mpibench.c"
IN_IMAGE = "/opt/bench/mpibench"
TESTS = ("latency", "bw", "allreduce", "bcast")
#: Every test "node" believes it owns CPUs 0-1 (ConstrainCores=yes): one CPU per task would pin
#: the ranks of two nodes both to CPU 0, where two busy-polling ranks take turns in milliseconds
#: (measured: 1-8 ms one-way). With -c2 each rank of the 2-node case may use both cores.
#: name: (srun options, extra environment, berth scopes compared with the bare host). With all
#: ranks on one node the bare host may use shared memory (vader); so may --scope node, not
#: --scope task (a container per rank).
PLACEMENTS = {
    "1 node, tcp": (["-N1", "-n2"], {}, ("task", "node")),
    "1 node, shared memory": (["-N1", "-n2"], {"OMPI_MCA_btl": "self,vader"}, ("node",)),
    "2 nodes, tcp": (["-N2", "-n2", "--ntasks-per-node=1", "-c2"], {}, ("task", "node")),
}
#: MPICH (--family mpich): placements and the berth modes compared (a scope, "+host": --mpi host).
MPICH_PLACEMENTS = {
    "1 node, MPICH": (["-N1", "-n2"], {}, ("task", "task+host", "node+host")),
    "2 nodes, MPICH": (["-N2", "-n2", "--ntasks-per-node=1", "-c2"], {}, ("task", "task+host", "node+host")),
}
MPICH_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}
#: The site's MPI for the "+host" modes: Debian's MPICH and what it links (ldd libmpich.so.12).
SITE_MPI = """\
[mpi]
libraries = ["libmpich.so.12"]
dependencies = ["libhwloc.so.15", "libucp.so.0", "libucs.so.0", "libuct.so.0", "libucm.so.0", "libnuma.so.1"]
"""
SCOPES = ("task", "node")
LAUNCH_SHAPES = [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4)]  # (ranks, nodes)


def compile_bench(directory: Path, compiler: str = "mpicc") -> Path:
    """mpibench compiled on the host (same MPI as the image): the one binary both sides run."""
    mpicc = shutil.which(compiler)
    if mpicc is None:
        raise RuntimeError(f"{compiler} is missing: run scripts/install-system-packages.sh (libopenmpi-dev, "
                           "libmpich-dev)")
    binary = directory / f"mpibench-{compiler}"
    c.run([mpicc, "-O2", "-o", str(binary), str(SOURCE)])
    binary.chmod(0o755)
    return binary


def bench_image(registry, binary: Path, family: str = "openmpi"):
    """The MPI test image (OpenMPI) or the MPICH image plus a layer with /opt/bench/mpibench,
    pushed to ``registry``."""
    from tests.harness import images
    from tests.harness.mpi import mpi_spec, mpich_spec
    from tests.harness.ocilayout import Dir, HostFile, ImageSpec, Layer

    base = mpich_spec() if family == "mpich" else mpi_spec()
    layer = Layer((Dir("opt"), Dir("opt/bench"), HostFile("opt/bench/mpibench", binary, mode=0o755)))
    spec = ImageSpec(layers=(*base.layers, layer), cmd=base.cmd)
    return images.push_pushed_image(registry, f"bench/{family}", "bench", spec, "oci")


def parse_results(output: str) -> dict[tuple[str, int], float]:
    """{(test, size): median} from mpibench's RESULT lines."""
    found = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0] == "RESULT":
            found[(parts[1], int(parts[2]))] = float(parts[3])
    return found


class Runner:
    def __init__(self, user: c.BenchUser, env: dict, ref: str, bare_binary: Path, hello: Path | None,
                 pmi: str = "pmix", placements: dict | None = None) -> None:
        self.user, self.env, self.ref = user, env, ref
        self.bare_binary, self.hello = bare_binary, hello
        self.pmi, self.placements = pmi, placements or PLACEMENTS

    def prefix(self, mode: str) -> list[str]:
        """mode: "bare", or a berth scope ("task", "node"), "+host" for --mpi host, "@RUNTIME" for
        --runtime RUNTIME (runc; default: berth's choice, berth-launcher where it can)."""
        if mode == "bare":
            return []
        mode, _, runtime = mode.partition("@")
        scope, _, host = mode.partition("+")
        return [str(c.BERTH), "run", "--scope", scope, *(["--mpi", "host"] if host else []),
                *(["--runtime", runtime] if runtime else []), self.ref]

    def srun(self, options: list[str], mode: str, program: list[str], timeout: float,
             env: dict | None = None) -> subprocess.CompletedProcess:
        argv = ["srun", f"--mpi={self.pmi}", "--kill-on-bad-exit=1", *options, *self.prefix(mode), *program]
        return self.user.run(argv, env={**self.env, **(env or {})}, timeout=timeout, cwd="/tmp")

    def micro(self, placement: str, mode: str, args) -> dict[tuple[str, int], float]:
        binary = str(self.bare_binary) if mode == "bare" else IN_IMAGE
        program = [binary, ",".join(args.tests), str(args.max_p2p), str(args.max_coll), str(args.iters),
                   str(args.warmup), str(args.reps)]
        options, env, _ = self.placements[placement]
        result = self.srun(options, mode, program, timeout=1800, env=env)
        found = parse_results(result.stdout)
        if not found:
            raise RuntimeError(f"{mode} on {placement}: no RESULT lines\n"
                               f"{result.stdout[-1000:]}\n{result.stderr[-1000:]}")
        return found

    def launch(self, ranks: int, nodes: int, mode: str) -> float:
        hello = str(self.hello) if mode == "bare" else "/opt/hello"
        options = [f"-N{nodes}", f"-n{ranks}"] + (["--overcommit"] if ranks > 2 * nodes else [])
        start = time.perf_counter()
        result = self.srun(options, mode, [hello], timeout=300)
        elapsed = time.perf_counter() - start
        lines = [line for line in result.stdout.splitlines() if line.startswith("hello rank=")]
        if len(lines) != ranks:
            raise RuntimeError(f"{mode} hello {ranks}/{nodes}: {len(lines)} ranks answered\n{result.stdout[-800:]}")
        return elapsed


def pct(value: float, reference: float) -> float:
    return (value - reference) / reference * 100.0


def micro_table(test: str, scopes: tuple[str, ...],
                rows: dict[int, dict[str, float]]) -> tuple[str, dict[str, list[int]]]:
    """One table per test: bare 1, berth per scope, bare 2, the bare spread and each scope's cost
    (percent, >0 = slower). Returns the table and, per scope, the sizes where the cost is over 2%
    and over the bare spread."""
    unit = "MB/s" if test == "bw" else "µs"
    over: dict[str, list[int]] = {scope: [] for scope in scopes}
    body = []
    for size, values in sorted(rows.items()):
        bare_a, bare_b = values["bare 1"], values["bare 2"]
        bare = (bare_a + bare_b) / 2
        spread = abs(bare_a - bare_b) / bare * 100.0
        costs = []
        for scope in scopes:
            berth = values[scope]
            cost = pct(bare, berth) if test == "bw" else pct(berth, bare)  # bandwidth: lower is worse
            if cost > 2.0 and cost > spread:
                over[scope].append(size)
            costs.append(f"{cost:+.1f}")
        body.append([str(size), f"{bare_a:.2f}", *[f"{values[scope]:.2f}" for scope in scopes], f"{bare_b:.2f}",
                     f"{spread:.1f}", *costs])
    table = c.markdown_table(["size, B", f"bare 1, {unit}", *[f"berth {scope}, {unit}" for scope in scopes],
                              f"bare 2, {unit}", "bare spread, %", *[f"{scope} cost, %" for scope in scopes]], body)
    return table, over


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", default=",".join(TESTS), help="comma-separated of " + ",".join(TESTS))
    parser.add_argument("--max-p2p", type=int, default=4 * 2**20, help="largest latency/bw message, bytes")
    parser.add_argument("--max-coll", type=int, default=16 * 2**10, help="largest allreduce/bcast message, bytes")
    parser.add_argument("--iters", type=int, default=200, help="timed iterations per block (÷10 above 64 KiB)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed iterations per size")
    parser.add_argument("--reps", type=int, default=7, help="timed blocks per size (the median is reported)")
    parser.add_argument("--rounds", type=int, default=1, help="bare, berth per scope, bare: rounds per placement")
    parser.add_argument("--launch-runs", type=int, default=3, help="runs per launch shape and mode")
    parser.add_argument("--quick", action="store_true",
                        help="--max-p2p 262144 --iters 20 --warmup 2 --reps 5 --launch-runs 2")
    parser.add_argument("--family", default="openmpi,mpich",
                        help="comma-separated of openmpi (micro-benchmarks and launch) and mpich (micro-benchmarks: "
                             "the image's MPICH and the host's injected with --mpi host)")
    parser.add_argument("--placements", default="",
                        help="only these placements (';'-separated, e.g. '2 nodes, tcp;2 nodes, MPICH'); default: all")
    parser.add_argument("--modes", default="",
                        help="berth modes compared in every placement instead of its own (comma-separated: task, "
                             "node, task+host, task@runc, ...)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.family = [family for family in args.family.split(",") if family]
    if unknown := set(args.family) - {"openmpi", "mpich"}:
        parser.error(f"unknown --family {','.join(sorted(unknown))}")
    wanted = [name.strip() for name in args.placements.split(";") if name.strip()]
    known = {**PLACEMENTS, **MPICH_PLACEMENTS}
    if unknown := [name for name in wanted if name not in known]:
        parser.error(f"unknown --placements {unknown}: known {list(known)}")
    if args.quick:
        args.max_p2p, args.iters, args.warmup, args.reps, args.launch_runs = 2**18, 20, 2, 5, 2
    args.tests = [test for test in args.tests.split(",") if test]
    if unknown := set(args.tests) - set(TESTS):
        parser.error(f"unknown --tests {','.join(sorted(unknown))}")
    if os.getuid() != 0:
        parser.error("run as root (it starts a registry and the Slurm test cluster)")
    # SIGTERM ends the run through the finally below (cluster and registry stopped).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from tests.harness import slurm
    from tests.harness.mpi import hello_binary
    from tests.harness.registry import start_registry

    command = "python3 bench/mpi.py " + " ".join(sys.argv[1:])
    header = c.report_header("MPI: micro-benchmarks and launch, bare host vs berth (issue 13)", command.strip())
    user = c.BenchUser.lookup()
    workdir = user.tempdir("berth-bench-mpi-", Path("/tmp"))
    tmpfs_root = Path(tempfile.mkdtemp(prefix="berth-bench-mpi-tmpfs-", dir="/var/tmp"))
    cluster = registry = None
    micro: dict[str, dict[str, list[dict]]] = {}
    launch: dict[tuple[int, int], dict[str, c.Sample]] = {}
    launch_failures: list[str] = []
    try:
        binary = compile_bench(workdir)
        hello = workdir / "hello"
        shutil.copy(hello_binary(), hello)
        c.log("building and pushing the MPI bench image")
        registry = start_registry(auth="none")
        image = bench_image(registry, binary)
        cluster = slurm.start_cluster(workdir / "slurm", 4, tmpfs_root=tmpfs_root)
        site = user.tempdir("site-", workdir)
        config_dir = c.berth_config_dir(user, [registry.host], site)
        env = {**cluster.env(), **c.berth_env(config_dir, site / "user-store", site / "state")}
        user.run([str(c.BERTH), "pull", image], env=env)
        ref = f"{image.registry.host}/{image.name}@{image.digest}"
        runners = []
        if "openmpi" in args.family:
            runner = Runner(user, env, ref, binary, hello)
            runner.launch(2, 1, "task")  # warm-up: page cache, first mount
            runners.append(runner)
        if "mpich" in args.family:
            c.log("building and pushing the MPICH bench image")
            mpich_image = bench_image(registry, compile_bench(workdir, "mpicc.mpich"), "mpich")
            (config_dir / "conf.d").mkdir(exist_ok=True)
            (config_dir / "conf.d" / "70-mpi.toml").write_text(SITE_MPI)
            user.chown_tree(config_dir)
            user.run([str(c.BERTH), "pull", mpich_image], env=env)
            runners.append(Runner(user, {**env, **MPICH_ENV}, f"{mpich_image.registry.host}/{mpich_image.name}@"
                                  f"{mpich_image.digest}", workdir / "mpibench-mpicc.mpich", None, "pmi2",
                                  MPICH_PLACEMENTS))
        for runner in runners:
            for placement, (_, _, scopes) in runner.placements.items():
                if wanted and placement not in wanted:
                    continue
                scopes = tuple(args.modes.split(",")) if args.modes else scopes
                for round_index in range(args.rounds):
                    for label, mode in (("bare 1", "bare"), *((scope, scope) for scope in scopes),
                                        ("bare 2", "bare")):
                        c.log(f"{placement}: {label} (round {round_index + 1})")
                        found = runner.micro(placement, mode, args)
                        micro.setdefault(placement, {}).setdefault(label, []).append(found)
                        c.log(f"  {label}: " + " ".join(f"{test}/{size}={value:.2f}"
                                                        for (test, size), value in sorted(found.items())))
        for ranks, nodes in LAUNCH_SHAPES if "openmpi" in args.family and args.launch_runs else ():
            runner = runners[0]
            c.log(f"launch {ranks} ranks on {nodes} node(s)")
            samples = launch.setdefault((ranks, nodes), {mode: c.Sample() for mode in ("bare", *SCOPES)})
            for _ in range(args.launch_runs):
                for mode in ("bare", *SCOPES):
                    try:
                        samples[mode].add(runner.launch(ranks, nodes, mode))
                    except RuntimeError as error:  # counted and shown, not fatal to the whole run
                        launch_failures.append(f"{mode} {ranks} ranks on {nodes} node(s): {c.error_line(str(error))}")
                        c.log(f"launch failed: {launch_failures[-1]}")
    finally:
        if cluster is not None:
            cluster.stop()
        if registry is not None:
            registry.stop()
        c.rm_tree(workdir)
        c.rm_tree(tmpfs_root)

    sections = [header,
                "The machine was shared with other engineers' test runs and loaded (see the load averages); "
                "every \"node\" is a slurmd on the same 2 cores, OpenMPI uses `btl=self,tcp` on 127.0.0.1 "
                "except in the \"1 node, shared memory\" runs (`btl=self,vader`: all ranks on one node; the "
                "same host name on every node rules it out across nodes). berth task: one container per rank "
                "(`srun --mpi=pmix ... berth run IMG /opt/bench/mpibench`); berth node: the ranks of a node in "
                "one container (`berth run --scope node`); the binary compiled on the host with "
                "mpicc and added to the MPI test image as a layer. Values: per size, the median of "
                f"{args.reps} timed blocks of {args.iters} iterations (÷10 above 64 KiB) after {args.warmup} "
                "warm-up iterations; with several rounds, the median of the rounds. Columns bare 1 and bare 2 "
                "are the bare host run before and after berth: their spread is the noise floor. berth cost: "
                "(berth − mean bare) / mean bare for times, (mean bare − berth) / mean bare for bandwidth.", ""]
    over_all = []
    for placement, modes in micro.items():
        scopes = tuple(args.modes.split(",")) if args.modes else {**PLACEMENTS, **MPICH_PLACEMENTS}[placement][2]
        for test in args.tests:
            rows = {}
            sizes = sorted({size for (name, size) in modes["bare 1"][0] if name == test})
            for size in sizes:
                rows[size] = {mode: statistics.median(run[(test, size)] for run in modes[mode])
                              for mode in ("bare 1", *scopes, "bare 2")}
            table, over = micro_table(test, scopes, rows)
            unit = "bandwidth" if test == "bw" else "time"
            sections += [f"#### {test} ({unit}), 2 ranks, {placement}", "", table, ""]
            for scope, sizes_over in over.items():
                if sizes_over:
                    over_all.append(f"{test}, {placement}, scope {scope}: {', '.join(map(str, sizes_over))} B")
    if "mpich" in args.family:
        sections += ["MPICH rows: bare = the host's MPICH 4.0.2 (`srun --mpi=pmi2`); berth task = the image's own "
                     "MPICH 4.0.1 in a container per rank; berth task+host / node+host = `berth run --mpi host`: "
                     "the host's MPICH injected, a container per rank / per node. UCX on TCP over loopback.", ""]
    rows = []
    for (ranks, nodes), samples in launch.items():
        bare = samples["bare"]
        rows.append([str(ranks), str(nodes), bare.cell("s"), *[samples[scope].cell("s") for scope in SCOPES],
                     *[f"{(samples[scope].median - bare.median) * 1000:.0f}"
                       if samples[scope].values and bare.values else "—" for scope in SCOPES]])
    if rows:
        sections += ["#### Launch: N-rank hello (MPI_Init, MPI_Allreduce, MPI_Finalize), wall time of srun", "",
                     c.markdown_table(["ranks", "nodes", "bare, s", *[f"berth {scope}, s" for scope in SCOPES],
                                       *[f"{scope} − bare, ms" for scope in SCOPES]], rows), ""]
    if launch_failures:
        sections += [f"Launches that failed ({len(launch_failures)}; not in the figures above):", "",
                     *[f"- {failure}" for failure in launch_failures], ""]
    sections.append("- target berth within 2% of the bare host at every size: " +
                    ("met (no size above 2% and above the bare spread)" if not over_all else
                     "NOT met at " + "; ".join(over_all) + " (sizes where berth's cost is above 2% and above the "
                     "bare host's spread against itself)"))
    c.emit_report(sections, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
