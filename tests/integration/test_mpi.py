"""Multi-node MPI in berth containers without sshd (DESIGN.md decision 9, docs/mpi.md), on the
real Slurm test cluster (4 slurmd "nodes" on loopback), as the unprivileged test user.

The image (``mpi_image``) is Debian bookworm with OpenMPI 4.1.4 and ``/opt/hello``, which prints
``hello rank=R size=N node=$SLURMD_NODENAME host=H pid=P sum=S`` after an MPI_Allreduce of the
ranks (S = 0+1+…+N-1: the ranks really exchanged data, not just PMIx wire-up).

Every test checks afterwards that no MPI process and no FUSE mount of berth's is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from tests.harness.mpi import mpi_image  # noqa: F401  (fixture)
from tests.harness.users import berth_executable, describe
from tests.integration.jobs_helpers import submit, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.slow]

HELLO = re.compile(r"^hello rank=(\d+) size=(\d+) node=(\S+) host=\S+ pid=(\d+) sum=(\d+)$")
FINAL = ("completed", "failed", "cancelled", "timeout")
#: Programs of an MPI run that must all be gone after it.
MPI_PROGRAMS = ("hello", "orted", "mpirun", "prterun", "squashfuse", "squashfuse_ll", "fuse-overlayfs")


def ranks(output: str) -> dict[int, tuple[int, str, int, int]]:
    """{rank: (size, node, pid, sum)} from the program's lines (other lines ignored)."""
    found = {}
    for line in output.splitlines():
        match = HELLO.match(line.strip())
        if match:
            rank, size, node, pid, total = match.groups()
            assert int(rank) not in found, f"rank {rank} printed twice:\n{output}"
            found[int(rank)] = (int(size), node, int(pid), int(total))
    return found


def assert_world(output: str, size: int, nodes: dict[str, int]) -> None:
    """Ranks 0..size-1, each with the right size and sum, spread over ``nodes`` {name: ranks}."""
    found = ranks(output)
    assert sorted(found) == list(range(size)), output
    assert {entry[0] for entry in found.values()} == {size}, output
    assert {entry[3] for entry in found.values()} == {size * (size - 1) // 2}, output
    per_node: dict[str, int] = {}
    for _, node, _, _ in found.values():
        per_node[node] = per_node.get(node, 0) + 1
    assert per_node == nodes, output


def run_as(user, argv: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    """``user.run`` that turns a timeout into a failure showing what was printed so far."""
    try:
        return user.run(argv, env=env, timeout=timeout_s, cwd="/tmp")
    except subprocess.TimeoutExpired as error:
        out = (error.stdout or b"").decode(errors="replace")
        err = (error.stderr or b"").decode(errors="replace")
        pytest.fail(f"{argv} did not end within {timeout_s} s\nstdout:\n{out}\nstderr:\n{err}")


#: OpenMPI 4.1.4's TCP BTL crash (TESTBED.md, "MPI"): under load a rank still waiting in MPI_Init's
#: modex fence receives a peer's first ob1 message and calls its not yet registered handler, a
#: NULL pointer; with runc as with berth-launcher, on the bare OpenMPI code path (core dumps: frame
#: mca_btl_tcp_endpoint_recv_handler, tag 65, called from ompi_mpi_init's fence wait). Its
#: signature, exactly: a segmentation fault at address 0 and nothing else of OpenMPI's.
def ompi_init_race(stderr: str) -> bool:
    return "Signal: Segmentation fault (11)" in stderr and "Failing at address: (nil)" in stderr


def run_mpi(user, argv: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    """``run_as`` for an OpenMPI launch over TCP: run again once when, and only when, the first
    run died of OpenMPI's own MPI_Init race (:func:`ompi_init_race`); said as a warning. Any
    other failure, or the race twice in a row, is the test's failure."""
    result = run_as(user, argv, env, timeout_s)
    if result.returncode != 0 and ompi_init_race(result.stderr):
        warnings.warn(f"OpenMPI's MPI_Init race (TESTBED.md) hit {argv[:6]}: ran it again\n{result.stderr[-1500:]}")
        result = run_as(user, argv, env, timeout_s)
    return result


def leftovers(user, marker: str) -> list[str]:
    """The test user's MPI programs and FUSE daemons started by this module (their environment
    holds ``marker``, this module's state directory) still running, and FUSE mounts left under it.
    (Other tests may run berth as the same user at the same time: theirs are not counted.)"""
    found = []
    result = subprocess.run(["ps", "-u", str(user.uid), "-o", "pid=,comm="], check=False,
                            capture_output=True, text=True)
    for line in result.stdout.splitlines():
        pid, _, comm = line.strip().partition(" ")
        if comm.strip() not in MPI_PROGRAMS:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"BERTH_STATE_DIR={marker}".encode() in environ:
            found.append(f"process {pid} {comm.strip()}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if " - fuse" in line and line.split()[4].startswith(marker + "/"):
            found.append(f"mount {line.split()[4]}")
    return found


def assert_clean(user, marker: str, timeout_s: float = 20) -> None:
    # The containers really kept their state there (else nothing below would be found anyway).
    assert (Path(marker) / "containers").is_dir(), f"no berth container used {marker}"
    deadline = time.monotonic() + timeout_s
    while (left := leftovers(user, marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left


@pytest.fixture(scope="module")
def mpi_site(job_site, mpi_image, slurm_cluster, user):  # noqa: F811
    """job_site plus a template ``mpi`` whose image is the MPI image (in the site store)."""
    import os

    admin_env = {**os.environ, **job_site.env}
    result = subprocess.run(
        [str(berth_executable()), "template", "create", "mpi", f"image={mpi_image}", "cpu=1", "memsz=512M",
         "stop_timeout=5", "boot_timeout=120", "comment=OpenMPI 4.1.4 for MPI tests"],
        check=False, env=admin_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, describe(result)
    state = user.tempdir("berth-mpi-state-")
    env = {**slurm_cluster.env(), "BERTH_BACKEND": "slurm", "BERTH_STATE_DIR": str(state)}
    yield job_site, env
    assert_clean(user, str(state))
    shutil.rmtree(state, ignore_errors=True)


def test_srun_pmix_one_container_per_rank(mpi_site, mpi_image, user, slurm_cluster):  # noqa: F811
    """Host-launched: srun --mpi=pmix starts 4 ranks on 2 nodes, each in its own container; they
    wire up through the PMIx server of slurmstepd (env + its directory mounted in)."""
    site, env = mpi_site
    result = run_mpi(user, ["srun", "--mpi=pmix", "-N2", "-n4", "--ntasks-per-node=2", str(berth_executable()),
                           "run", mpi_image, "/opt/hello"], {**site.env, **env})
    assert result.returncode == 0, describe(result) + slurm_cluster.logs()[-3000:]
    found = ranks(result.stdout)
    nodes = sorted({node for _, node, _, _ in found.values()})
    assert len(nodes) == 2 and all(node.startswith("node") for node in nodes), result.stdout
    assert_world(result.stdout, 4, {nodes[0]: 2, nodes[1]: 2})
    # One container per rank: each rank is the first program of its own PID namespace (host
    # PIDs here are in the thousands), not a process of the host.
    assert all(pid < 50 for _, _, pid, _ in found.values()), result.stdout
    assert "PMIX ERROR" not in result.stderr, describe(result)
    assert_clean(user, env["BERTH_STATE_DIR"])


def test_srun_pmix_with_tmpfs_outside_tmp_mounts_only_this_steps_client_directory(
        mpi_site, mpi_image, user, slurm_cluster):  # noqa: F811
    """Issue 13: the cluster's TmpFS is outside /tmp (as /local/scratch is on real clusters), so
    Slurm's pmix plugin puts the step's spmix_appdir_UID_JOB.STEP where no container has it and
    OpenMPI aborts MPI_Init (session_dir.c) unless berth mounts it. Only that directory is
    mounted: another user's and another step's directories in the same TmpFS stay out."""
    import os

    site, env = mpi_site
    tmpfs = slurm_cluster.tmpfs
    assert not str(tmpfs).startswith("/tmp/"), tmpfs
    decoys = []
    for node in slurm_cluster.nodes:
        theirs = tmpfs / node / "spmix_appdir_4242_1.0"
        other_step = tmpfs / node / f"spmix_appdir_{user.uid}_1.0"
        for decoy in (theirs, other_step):
            decoy.mkdir(exist_ok=True)
            decoys.append(decoy)
        os.chown(other_step, user.uid, user.gid)
    try:
        result = run_as(user, ["srun", "--mpi=pmix", "-N1", "-n2", str(berth_executable()), "run", mpi_image,
                               "sh", "-c", f'ls -A "{tmpfs}/$SLURMD_NODENAME"; exec /opt/hello'],
                        {**site.env, **env}, timeout_s=60)
    finally:
        for decoy in decoys:
            decoy.rmdir()
    assert result.returncode == 0, describe(result) + slurm_cluster.logs()[-3000:]
    listed = [line for line in result.stdout.splitlines() if line.startswith("spmix_appdir_")]
    assert len(listed) == 2 and len(set(listed)) == 1, describe(result)
    assert re.fullmatch(rf"spmix_appdir_{user.uid}_\d+\.\d+", listed[0]) and listed[0] != f"spmix_appdir_{user.uid}_1.0"
    node = ranks(result.stdout)[0][1]
    assert_world(result.stdout, 2, {node: 2})
    assert_clean(user, env["BERTH_STATE_DIR"])


def test_srun_pmix_without_the_pmix_directory(mpi_site, mpi_image, user, slurm_cluster):  # noqa: F811
    """Control for the PMIx directory mount: when the variables name a directory that is not the
    caller's, berth says so and does not mount it, and PMIx's shared-memory data store then fails
    in the rank (it falls back to its slower in-process store, with errors). So the clean run of
    the test above is due to the mount."""
    site, env = mpi_site
    script = ('export PMIX_SERVER_TMPDIR=/var/tmp PMIX_DSTORE_21_BASE_PATH=/var/tmp/none '
              'PMIX_DSTORE_ESH_BASE_PATH=/var/tmp/none; '
              f'exec {berth_executable()} run {mpi_image} /opt/hello')
    result = run_as(user, ["srun", "--mpi=pmix", "-N1", "-n2", "sh", "-c", script], {**site.env, **env},
                    timeout_s=60)
    assert "PMIx directory PMIX_SERVER_TMPDIR=/var/tmp skipped: owned by uid 0" in result.stderr, describe(result)
    assert "PMIX ERROR" in result.stderr and "gds_ds12" in result.stderr, describe(result)
    assert_clean(user, env["BERTH_STATE_DIR"])


def test_ranks_in_separate_containers_on_one_node_without_shared_memory(mpi_site, mpi_image, user):  # noqa: F811
    """OpenMPI's default transports include shared memory (vader), which cannot work between two
    containers (own /dev/shm, /tmp, PID namespace: the ranks crash with SIGSEGV). With no
    OMPI_MCA_btl chosen, berth turns vader off for host-launched ranks, and two ranks on one
    node still exchange data (over loopback TCP)."""
    site, env = mpi_site
    env = {name: value for name, value in env.items() if name != "OMPI_MCA_btl"}
    result = run_as(user, ["srun", "--mpi=pmix", "-N1", "-n2", "--kill-on-bad-exit=1", str(berth_executable()),
                           "run", mpi_image, "sh", "-c", 'echo "btl=$OMPI_MCA_btl"; exec /opt/hello'],
                    {**site.env, **env}, timeout_s=60)
    assert result.returncode == 0, describe(result)
    assert result.stdout.count("btl=^vader\n") == 2, describe(result)
    node = ranks(result.stdout)[0][1]
    assert_world(result.stdout, 2, {node: 2})
    assert_clean(user, env["BERTH_STATE_DIR"])


SCOPE_PROBE = ('echo "probe rank=$PMIX_RANK node=$SLURMD_NODENAME pidns=$(readlink /proc/self/ns/pid) '
               'btl=${OMPI_MCA_btl-unset}"; exec /opt/hello')


def test_srun_pmix_scope_node_one_container_per_node(mpi_site, mpi_image, user, slurm_cluster):  # noqa: F811
    """Issue 13, ``--scope node``: 4 ranks on 2 nodes, the 2 ranks of a node in one container
    (one PID namespace per node, the same /dev/shm), each rank with its own PMIx identity from
    its own srun task, every rank's result checked; the container is gone after the step."""
    site, env = mpi_site
    result = run_mpi(user, ["srun", "--mpi=pmix", "-N2", "-n4", "--ntasks-per-node=2", "--kill-on-bad-exit=1",
                           str(berth_executable()), "run", "--scope", "node", mpi_image, "sh", "-c", SCOPE_PROBE],
                    {**site.env, **env})
    assert result.returncode == 0, describe(result) + slurm_cluster.logs()[-3000:]
    found = ranks(result.stdout)
    nodes = sorted({node for _, node, _, _ in found.values()})
    assert len(nodes) == 2, result.stdout
    assert_world(result.stdout, 4, {nodes[0]: 2, nodes[1]: 2})
    probes = [dict(word.split("=", 1) for word in line.split()[1:])
              for line in result.stdout.splitlines() if line.startswith("probe ")]
    assert sorted(int(probe["rank"]) for probe in probes) == [0, 1, 2, 3], result.stdout
    namespaces = {node: {probe["pidns"] for probe in probes if probe["node"] == node} for node in nodes}
    # One container per node: its ranks share one PID namespace; the two nodes' differ, and
    # neither is the host's.
    assert all(len(spaces) == 1 for spaces in namespaces.values()), namespaces
    assert namespaces[nodes[0]] != namespaces[nodes[1]], namespaces
    assert os.readlink("/proc/self/ns/pid") not in namespaces[nodes[0]] | namespaces[nodes[1]]
    # Each rank is its own process of its node's namespace (small PIDs, distinct within a node).
    for node in nodes:
        pids = [pid for _, name, pid, _ in found.values() if name == node]
        assert len(set(pids)) == 2 and all(pid < 100 for pid in pids), result.stdout
    # berth leaves the transports alone in a node's container (no ^vader): here the cluster's
    # own choice (self,tcp: all test nodes share a host name) reaches the ranks.
    assert {probe["btl"] for probe in probes} == {env["OMPI_MCA_btl"]}, result.stdout
    assert "PMIX ERROR" not in result.stderr, describe(result)
    assert_clean(user, env["BERTH_STATE_DIR"])


def test_scope_node_ranks_share_memory_on_one_node(mpi_site, mpi_image, user):  # noqa: F811
    """The reason for ``--scope node``: with one container per node, OpenMPI's shared-memory
    transport works between the node's ranks (``btl=self,vader``: no TCP at all), which
    crashes between containers of ``--scope task`` (see the test above about separate containers)."""
    site, env = mpi_site
    env = {**env, "OMPI_MCA_btl": "self,vader"}
    result = run_as(user, ["srun", "--mpi=pmix", "-N1", "-n2", "--kill-on-bad-exit=1", str(berth_executable()),
                           "run", "--scope", "node", mpi_image, "/opt/hello"], {**site.env, **env}, timeout_s=90)
    assert result.returncode == 0, describe(result)
    node = ranks(result.stdout)[0][1]
    assert_world(result.stdout, 2, {node: 2})
    assert_clean(user, env["BERTH_STATE_DIR"])


def test_scope_node_large_messages_over_shared_memory(mpi_site, mpi_image, user):  # noqa: F811
    """Large messages between the ranks of a node container over shared memory only: OpenMPI's
    single-copy transfer (CMA) is refused between ranks that entered through berth-init (own
    user namespaces, unmapped owner of the binary), and vader hung on the first 64 KiB windowed
    send; berth turns single-copy off for node-scoped ranks (berth.runtime.pmix)."""
    from tests.harness.mpi import mpibench_binary

    site, env = mpi_site
    env = {**env, "OMPI_MCA_btl": "self,vader"}
    shared = user.tempdir("berth-mpibench-")
    shutil.copy(mpibench_binary(), shared / "mpibench")
    (shared / "mpibench").chmod(0o755)
    try:
        result = run_as(user, ["srun", "--mpi=pmix", "-N1", "-n2", "--kill-on-bad-exit=1", str(berth_executable()),
                               "run", "--scope", "node", "-v", f"{shared}:/bench:ro", mpi_image,
                               "/bench/mpibench", "bw,latency", "262144", "1", "5", "1", "1"],
                        {**site.env, **env}, timeout_s=90)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert result.returncode == 0, describe(result)
    sizes = {line.split()[2] for line in result.stdout.splitlines() if line.startswith("RESULT bw ")}
    assert {"65536", "262144"} <= sizes, describe(result)
    assert_clean(user, env["BERTH_STATE_DIR"])


def test_scope_node_outside_a_slurm_step_is_refused(mpi_site, mpi_image, user):  # noqa: F811
    site, env = mpi_site
    env = {**site.env, **env}
    result = user.run([str(berth_executable()), "run", "--scope", "node", mpi_image, "true"], env=env,
                      timeout=60, cwd="/tmp")
    assert result.returncode == 125, describe(result)
    assert "--scope node: not in a Slurm job step" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr


def test_mpi_job_host_launched_and_mpirun_inside(mpi_site, user, slurm_cluster):
    """A ``berth submit -N2 -n4`` job whose script runs in the MPI image's container:

    - ``srun --mpi=pmix … berth run $BERTH_JOB_IMAGE /opt/hello`` and ``berth srun --mpi=pmix …``
      reach the host through the step agent: one container per rank on both nodes;
    - ``mpirun`` inside the container starts its remote daemons through Slurm (OpenMPI's slurm
      launcher calls ``srun``: the agent's shim) as ``berth run IMAGE orted`` (the job runner sets
      OpenMPI's launch agent so; berth.jobs.mpi) — no sshd or ssh launcher anywhere —
      and the 4 ranks are children of those daemons in one container per node.
    """
    site, env = mpi_site
    work = site.workdir(user)
    site.write_script(work, "mpi.sh", """\
        #!/bin/sh
        #BERTH -J mpi -N 2 -n 4 --ntasks-per-node=2 -o out-%j.txt
        echo "batch node=$SLURMD_NODENAME marker=$(cat /etc/berth-marker)"
        srun --mpi=pmix --kill-on-bad-exit=1 -N2 -n4 berth run "$BERTH_JOB_IMAGE" /opt/hello > srun.txt 2> srun.err
        echo "srun status $?"
        berth srun --mpi=pmix --kill-on-bad-exit=1 -N2 -n4 /opt/hello > berth-srun.txt 2> berth-srun.err
        echo "berth srun status $?"
        export OMPI_MCA_plm=slurm
        echo "agent=$OMPI_MCA_orte_launch_agent"
        hosts=$(for n in $(echo "$SLURM_JOB_NODELIST" | tr -d 'node[]' | tr ',-' '  '); do printf 'node%s:2,' "$n"; done)
        echo "hosts=$hosts"
        timeout 90 mpirun -n 4 --host "${hosts%,}" /opt/hello > mpirun.txt 2> mpirun.err
        echo "mpirun status $?"
    """, user)
    def report() -> str:
        logs = (work / f"out-{job}.txt").read_text() if (work / f"out-{job}.txt").exists() else ""
        return logs + "".join(f"\n== {path.name}\n{path.read_text()}" for path in sorted(work.glob("*.txt"))
                              if path.name != f"out-{job}.txt") + "".join(
            f"\n== {path.name}\n{path.read_text()}" for path in sorted(work.glob("*.err")))

    for attempt in (1, 2):
        job = submit(user, site, work, "--template", "mpi", "mpi.sh", env=env)
        try:
            states = wait_for(user, site, [job], FINAL, timeout_s=180, env=env)
        except AssertionError as error:
            user.berth("cancel", job, env={**site.env, **env})
            raise AssertionError(f"{error}\n{report()}") from None
        logs = (work / f"out-{job}.txt").read_text() if (work / f"out-{job}.txt").exists() else ""
        launches_ok = all(f"{what} status 0" in logs for what in ("srun", "berth srun", "mpirun"))
        # A CI run's job ended with the race's report in srun.err, yet this look did not see it
        # (and no second job was submitted): give a failed launch's reports a moment to arrive.
        deadline = time.monotonic() + (0 if launches_ok else 10)
        while True:
            errors = "".join(path.read_text() for path in work.glob("*.err"))
            if ompi_init_race(errors) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # Once more only when a launch died of OpenMPI's own MPI_Init race (see run_mpi).
        if attempt == 2 or launches_ok or not ompi_init_race(errors):
            break
        warnings.warn(f"OpenMPI's MPI_Init race (TESTBED.md) hit job {job}: submitted it again\n{report()[-3000:]}")
        for path in [*work.glob("*.txt"), *work.glob("*.err")]:
            path.unlink()
    outputs = {name: (work / name).read_text() if (work / name).exists() else "(missing)"
               for name in ("srun.txt", "berth-srun.txt", "mpirun.txt")}
    info = (f"\nattempt {attempt}, race seen when judged: {ompi_init_race(errors)}\n"
            f"{json.dumps(states[job], indent=1)}\n{report()}")
    assert states[job]["state"] == "completed", info
    assert "marker=mpi" in logs and "srun status 0" in logs and "berth srun status 0" in logs, info
    for name in ("srun.txt", "berth-srun.txt"):
        found = ranks(outputs[name])
        nodes = sorted({node for _, node, _, _ in found.values()})
        assert len(nodes) == 2, info
        assert_world(outputs[name], 4, {nodes[0]: 2, nodes[1]: 2})
        assert all(pid < 50 for _, _, pid, _ in found.values()), info
    assert "mpirun status 0" in logs, info
    # berth set the launcher: the daemons ran in the job's own image, pinned by digest.
    assert f"agent=berth run {states[job]['image']} orted\n" in logs and "@sha256:" in states[job]["image"], info
    found = ranks(outputs["mpirun.txt"])
    nodes = sorted({node for _, node, _, _ in found.values()})
    assert len(nodes) == 2, info
    assert_world(outputs["mpirun.txt"], 4, {nodes[0]: 2, nodes[1]: 2})
    assert f"hosts={nodes[0]}:2,{nodes[1]}:2,\n" in logs, info
    # One container per node: orted is the first program of its PID namespace, its two ranks
    # are its children there (small, distinct PIDs per node).
    for node in nodes:
        pids = [pid for _, name, pid, _ in found.values() if name == node]
        assert len(set(pids)) == 2 and all(pid < 100 for pid in pids), info
    assert_clean(user, env["BERTH_STATE_DIR"])


def test_mpi_job_with_scope_node_makes_berth_srun_share_a_container_per_node(mpi_site, user, slurm_cluster):
    """Issue 13: ``#BERTH --scope node`` makes it the default of the job's ``berth srun`` steps
    (the step starts on the host through the agent, with BERTH_JOB_SCOPE from the job)."""
    site, env = mpi_site
    work = site.workdir(user)
    site.write_script(work, "scope.sh", f"""\
        #!/bin/sh
        #BERTH -J scope -N 2 -n 4 --ntasks-per-node=2 -o out-%j.txt --scope node
        echo "job scope=$BERTH_JOB_SCOPE"
        berth srun --mpi=pmix --kill-on-bad-exit=1 -N2 -n4 sh -c '{SCOPE_PROBE}' > scope.txt 2> scope.err
        echo "berth srun status $?"
    """, user)
    job = submit(user, site, work, "--template", "mpi", "scope.sh", env=env)
    states = wait_for(user, site, [job], FINAL, timeout_s=180, env=env)
    logs = (work / f"out-{job}.txt").read_text() if (work / f"out-{job}.txt").exists() else ""
    output = (work / "scope.txt").read_text() if (work / "scope.txt").exists() else ""
    info = f"\n{json.dumps(states[job], indent=1)}\n{logs}\n{output}\n" + (
        (work / "scope.err").read_text() if (work / "scope.err").exists() else "")
    assert states[job]["state"] == "completed", info
    assert "job scope=node" in logs and "berth srun status 0" in logs, info
    found = ranks(output)
    nodes = sorted({node for _, node, _, _ in found.values()})
    assert len(nodes) == 2, info
    assert_world(output, 4, {nodes[0]: 2, nodes[1]: 2})
    probes = [dict(word.split("=", 1) for word in line.split()[1:])
              for line in output.splitlines() if line.startswith("probe ")]
    namespaces = {node: {probe["pidns"] for probe in probes if probe["node"] == node} for node in nodes}
    assert all(len(spaces) == 1 for spaces in namespaces.values()), info
    assert namespaces[nodes[0]] != namespaces[nodes[1]], info
    assert_clean(user, env["BERTH_STATE_DIR"])
