"""A real multi-node Slurm test cluster on this machine (TESTBED.md "Slurm").

munged (own key, socket and state), slurmctld and several ``slurmd -N nodeN`` on 127.0.0.1
with different ports, all started in the foreground with known PIDs and everything under one
directory: configuration, spool, logs, per-node TmpFS. Client commands use ``SLURM_CONF`` from
:meth:`SlurmCluster.env` — /etc/slurm is never touched.

Every node shares this machine's hostname, so OpenMPI must not use its shared-memory
transport across "nodes" and must stay on loopback: :meth:`SlurmCluster.env` sets the
``OMPI_MCA_*`` variables for that.

Used by the ``slurm_cluster`` session fixture (``fixtures_slurm.py``) and as a script for the
README's Slurm demo::

    python -m tests.harness.slurm start DIR [--nodes N]   # prints `export SLURM_CONF=...`
    python -m tests.harness.slurm stop DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Debian's locations of the daemons (root's sbin, not on a normal PATH).
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"

#: Slurm's grace between SIGTERM and SIGKILL at cancel/time limit. It must exceed the
#: stop_timeout of every test job, or Slurm kills the container before berth's grace ends.
KILL_WAIT_S = 30

#: Stand-ins for GPU device files (gres.conf needs existing character devices).
FAKE_GPU_FILES = ("/dev/null", "/dev/zero")

#: What sites configure and jobs ask for with -C and -L: every node has these features, the
#: cluster these licenses (so pass-through options like `-C ib -L fluent:1` are accepted).
NODE_FEATURES = ("ib", "avx2")
LICENSES = "fluent:4"

#: Without slurmdbd Slurm drops a job's QOS (scontrol shows QOS=(null)); this job_submit
#: plugin keeps what was asked in the job's AdminComment, so tests can see that -q reached
#: slurmctld. (Debian's slurm-wlm-basic-plugins ships job_submit/lua and depends on liblua.)
JOB_SUBMIT_LUA = """\
function slurm_job_submit(job_desc, part_list, submit_uid)
   if job_desc.qos ~= nil then
      job_desc.admin_comment = "requested qos=" .. job_desc.qos
   end
   return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return slurm.SUCCESS
end
"""

#: Loopback-only MPI on several "nodes" that share one hostname (TESTBED.md "MPI").
MPI_ENV = {
    "OMPI_MCA_btl": "self,tcp",
    "OMPI_MCA_btl_tcp_if_include": "127.0.0.1/8",
    "OMPI_MCA_oob_tcp_if_include": "127.0.0.1/8",
    "PMIX_MCA_ptl_tcp_if_include": "127.0.0.1/8",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class SlurmCluster:
    """A running (or described) test cluster rooted at ``root``."""

    root: Path
    nodes: list[str]
    partition: str = "debug"
    cpus_per_node: int = 2
    memory_mib_per_node: int = 2000
    #: Character devices gres.conf names as the nodes' GPUs (the fixtures give the fake driver
    #: tree's /dev/nvidiaN, so that berth finds them as GPUs; tests/harness/gpu_tree.py).
    gpu_files: tuple[str, ...] = FAKE_GPU_FILES
    #: Where the nodes' TmpFS directories live (``TmpFS=TMPFS_ROOT/%n``); default ``root/tmp``.
    #: The fixture puts it outside /tmp, as sites do (/local/scratch...): under /tmp, which every
    #: container has privately, a rank would find Slurm's PMIx directories by luck (issue 13).
    tmpfs_root: Path | None = None
    #: Slurm's job credential lifetime (``AuthInfo=cred_expire``), which is also how long a
    #: requeued job waits before it runs again; None: Slurm's 120 s.
    cred_expire_s: int | None = None
    pids: dict[str, int] = field(default_factory=dict)
    #: Job ids start at a random point: cgroups are named slurm_NODE/uid_U/job_ID on this host,
    #: so two clusters (or a rebuilt one) must never reuse an id while a cgroup may remain.
    first_job_id: int = field(default_factory=lambda: random.randrange(100_000, 60_000_000, 10_000))

    @property
    def tmpfs(self) -> Path:
        """The parent of the per-node TmpFS directories (``TmpFS`` is ``THIS/%n``)."""
        return self.tmpfs_root or self.root / "tmp"

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for client commands and jobs: SLURM_CONF plus loopback-only MPI."""
        env = dict(base or {})
        env["SLURM_CONF"] = str(self.conf)
        env.update(MPI_ENV)
        return env

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client command (as the caller) against this cluster."""
        return subprocess.run(list(argv), env={**os.environ, **self.env()}, capture_output=True,
                              text=True, check=check, timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 30) -> None:
        for program in (SLURMCTLD, SLURMD, MUNGED):
            if not os.access(program, os.X_OK):
                raise RuntimeError(f"{program} is missing: run scripts/install-system-packages.sh")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        try:
            self._start_munge()
            self._write_config()
            self._start_slurm(timeout_s)
        except BaseException:
            self.stop()
            raise
        (self.root / "cluster.json").write_text(json.dumps(
            {"nodes": self.nodes, "partition": self.partition, "pids": self.pids,
             "first_job_id": self.first_job_id}))

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        os.chmod(mdir, 0o755)  # clients of every user must reach the socket
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o600)
        log = mdir / "munged.log"
        proc = subprocess.Popen(
            [MUNGED, "--foreground", "--force", f"--socket={self.munge_socket}",
             f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}",
             f"--seed-file={mdir / 'munged.seed'}", f"--log-file={log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
            start_new_session=True,
        )
        self.pids["munged"] = proc.pid
        _wait_for(lambda: self.munge_socket.exists(), 10, "munged socket", log, proc)

    def _write_config(self) -> None:
        etc = self.root / "etc"
        etc.mkdir(exist_ok=True)
        for name in ("state", "spool", "log", "tmp", "run"):
            (self.root / name).mkdir(exist_ok=True)
        self.tmpfs.mkdir(parents=True, exist_ok=True)
        os.chmod(self.tmpfs, 0o755)
        for node in self.nodes:
            # TmpFS per node: pmix creates its app directory there (TESTBED.md).
            tmp = self.tmpfs / node
            tmp.mkdir(exist_ok=True)
            os.chmod(tmp, 0o1777)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory={self.memory_mib_per_node} Gres=gpu:{len(self.gpu_files)} "
            f"Features={','.join(NODE_FEATURES)} State=UNKNOWN"
            for node, port in zip(self.nodes, node_ports, strict=True)
        )
        r = self.root
        self.conf.write_text(f"""\
# Generated by tests/harness/slurm.py — a throw-away test cluster.
ClusterName=berthtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}{f',cred_expire={self.cred_expire_s}' if self.cred_expire_s else ''}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS={self.tmpfs}/%n
SlurmdParameters=config_overrides
MailProg=/bin/true
EnforcePartLimits=ALL
ReturnToService=2
FirstJobId={self.first_job_id}
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=200
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
DependencyParameters=kill_invalid_depend
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait={KILL_WAIT_S}
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
GresTypes=gpu
Licenses={LICENSES}
JobSubmitPlugins=lua
{node_lines}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        # GPU-less "GPUs": character devices every node has, so that --gres=gpu:N is scheduled
        # and Slurm sets CUDA_VISIBLE_DEVICES as on a real GPU node (ConstrainDevices=no).
        (etc / "gres.conf").write_text("".join(f"Name=gpu File={path}\n" for path in self.gpu_files))
        (etc / "job_submit.lua").write_text(JOB_SUBMIT_LUA)
        (etc / "cgroup.conf").write_text(
            "CgroupPlugin=autodetect\nConstrainCores=yes\nConstrainRAMSpace=no\nConstrainDevices=no\n")
        for path in (etc, self.conf, etc / "cgroup.conf", etc / "gres.conf", etc / "job_submit.lua"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)

    def _start_slurm(self, timeout_s: float) -> None:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        log = self.root / "log"
        ctld = subprocess.Popen([SLURMCTLD, "-D", "-i", "-f", str(self.conf)], env=env,
                                stdin=subprocess.DEVNULL, stdout=open(log / "slurmctld.out", "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.pids["slurmctld"] = ctld.pid
        for node in self.nodes:
            self._start_slurmd(node)

        def ready() -> bool:
            for name, pid in self.pids.items():
                if not _alive(pid):
                    raise RuntimeError(f"{name} exited during start-up; see {log}")
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True,
                                    text=True)
            if result.returncode != 0:
                return False
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            return all(states.get(node, "").rstrip("*") in ("idle", "mixed", "allocated")
                       for node in self.nodes)

        _wait_for(ready, timeout_s, "slurm nodes idle", log / "slurmctld.log")

    def _start_slurmd(self, node: str) -> None:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        proc = subprocess.Popen([SLURMD, "-D", "-N", node, "-f", str(self.conf)], env=env,
                                stdin=subprocess.DEVNULL,
                                stdout=open(self.root / "log" / f"slurmd-{node}.out", "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.pids[f"slurmd-{node}"] = proc.pid

    # -- a node dies (issue 8, scenario 6) ----------------------------------------------------
    def kill_node(self, node: str, reason: str = "berth test: node died") -> list[int]:
        """Make ``node`` die the way a crashed machine does, as far as one machine can: SIGKILL
        its slurmd and every process of every job on it (everything in its job cgroups: the
        step daemons, berth, runc, the containers, their FUSE daemons), then tell slurmctld the
        node is down (what it concludes by itself SlurmdTimeout seconds later), so that it
        ends the node's jobs as NODE_FAIL and stops their other nodes' parts. Returns the pids
        killed."""
        pid = self.pids.get(f"slurmd-{node}")
        killed = []
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
            killed.append(pid)
        # A process may fork while its siblings die: repeat until the node's cgroups are empty.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = self._job_cgroup_pids(node)
            if not pids:
                break
            for victim in pids:
                try:
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        self.run("scontrol", "update", f"nodename={node}", "state=down", f"reason={reason}")
        return killed

    def restart_node(self, node: str, timeout_s: float = 60) -> None:
        """Start ``node``'s slurmd again (the machine came back) and return it to service."""
        self._start_slurmd(node)
        deadline = time.monotonic() + timeout_s
        while True:
            self.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
            state = self.run("sinfo", "-h", "-N", "-n", node, "-o", "%T", check=False).stdout.strip()
            if state.rstrip("*") in ("idle", "mixed", "allocated"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node} did not come back ({state!r}):\n{self.logs()}")
            time.sleep(0.5)

    def _job_cgroup_pids(self, node: str) -> list[int]:
        """The processes in ``node``'s job cgroups (cgroup v1 freezer hierarchy of this host).
        Other test clusters on this machine name their nodes the same: only this cluster's
        job ids count."""
        pids = set()
        for job_dir in Path("/sys/fs/cgroup/freezer").glob(f"slurm_{node}/uid_*/job_*"):
            if not self._owns_job(job_dir.name.removeprefix("job_")):
                continue
            for procs in job_dir.rglob("cgroup.procs"):
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except (OSError, ValueError):
                    continue
        return sorted(pids)

    def _owns_job(self, job_id: str) -> bool:
        return job_id.isdigit() and self.first_job_id <= int(job_id) < self.first_job_id + 10_000

    def stop(self, grace_s: float = 10) -> None:
        """End every job, then stop every daemon by PID (SIGTERM, then SIGKILL after ``grace_s``).

        Jobs outlive slurmd (slurmstepd runs on), so they are cancelled first (suspended ones
        resumed so that they can end), and whatever is left in this cluster's job cgroups is
        thawed and killed."""
        if self.pids.get("slurmctld") and _alive(self.pids["slurmctld"]):
            self._cancel_all_jobs(grace_s)
        self._kill_job_cgroups()
        order = [n for n in self.pids if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            pid = self.pids.get(name)
            if pid and _alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while pid and _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid and _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _reap(pid)
        self.pids.clear()

    def _cancel_all_jobs(self, grace_s: float) -> None:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}

        def job_ids() -> list[str]:
            result = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True)
            return [line.split() for line in result.stdout.splitlines() if line.strip()]

        jobs = job_ids()
        for job_id, state in jobs:
            if state == "SUSPENDED":
                subprocess.run(["scontrol", "resume", job_id], env=env, capture_output=True)
        if jobs:
            subprocess.run(["scancel", *[job_id for job_id, _ in jobs]], env=env, capture_output=True)
        deadline = time.monotonic() + grace_s
        while jobs and time.monotonic() < deadline:
            time.sleep(0.2)
            jobs = job_ids()

    def _kill_job_cgroups(self) -> None:
        """Thaw and SIGKILL the processes of this cluster's jobs still in their cgroups."""
        base = Path("/sys/fs/cgroup/freezer")
        for node in self.nodes:
            for job_dir in base.glob(f"slurm_{node}/uid_*/job_*"):
                if not self._owns_job(job_dir.name.removeprefix("job_")):
                    continue
                for state in job_dir.rglob("freezer.state"):
                    try:
                        state.write_text("THAWED")
                    except OSError:
                        pass
                for procs in job_dir.rglob("cgroup.procs"):
                    try:
                        pids = [int(p) for p in procs.read_text().split()]
                    except OSError:
                        continue
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass

    def logs(self) -> str:
        """The tail of every daemon log, for failing-test messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"==> {path.name} <==\n{text[-3000:]}")
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie that is not our child still answers kill(0): check /proc.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _wait_for(predicate, timeout_s: float, what: str, log: Path, proc=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"timed out waiting for {what}; {log}:\n{tail}")


def usable() -> str | None:
    """Why a cluster cannot start here, or None when it can."""
    if os.getuid() != 0:
        return "the Slurm test cluster needs root (slurmd runs jobs as other users)"
    for program in (SLURMCTLD, SLURMD, MUNGED, shutil.which("sbatch") or "/usr/bin/sbatch"):
        if not os.access(program, os.X_OK):
            return f"{program} is missing: run scripts/install-system-packages.sh"
    return None


def start_cluster(root: Path, nodes: int = 4, gpu_files: tuple[str, ...] = FAKE_GPU_FILES,
                  tmpfs_root: Path | None = None, cred_expire_s: int | None = None) -> SlurmCluster:
    cluster = SlurmCluster(root=Path(root), nodes=[f"node{i}" for i in range(1, nodes + 1)], gpu_files=gpu_files,
                           tmpfs_root=tmpfs_root, cred_expire_s=cred_expire_s)
    cluster.start()
    return cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.slurm",
                                     description="Start or stop the Slurm test cluster.")
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--nodes", type=int, default=4)
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    if args.action == "start":
        reason = usable()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        cluster = start_cluster(root, args.nodes)
        print(f"export SLURM_CONF={cluster.conf}")
        for name, value in MPI_ENV.items():
            print(f"export {name}={value}")
        return 0
    info = root / "cluster.json"
    if not info.exists():
        print(f"no cluster in {root}", file=sys.stderr)
        return 1
    data = json.loads(info.read_text())
    SlurmCluster(root=root, nodes=data["nodes"], pids=data["pids"],
                 first_job_id=data.get("first_job_id", 1)).stop()
    info.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
