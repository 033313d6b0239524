"""Host MPI injection (``--mpi host``, issue 13, docs/mpi.md "Host MPI injection"), for real: the
host's MPI is Debian's MPICH 4.0.2 (libmpich.so.12.2.2, ch4:ucx), named in the site's ``[mpi]``;
the image ``mpich_image`` brings its own MPICH build, 4.0.1 (libmpich.so.12.2.1; a copy of
Debian's with another version string), and ``/opt/hello-mpich``, which prints per rank::

    mpich rank=R size=N node=NODE sum=S library=MPICH_Version:_X file=LOADED_FILE

(``library``: the first line of MPI_Get_library_version; ``file``: where dladdr finds MPI_Init.)
Ranks are started by Slurm's PMI-2 (``srun --mpi=pmi2``: Debian's MPICH speaks PMI-1/PMI-2 over
Slurm's ``PMI_FD`` socket, which berth passes into the container) on the 4-node test cluster,
as the unprivileged test user. UCX is kept to TCP on loopback (TESTBED.md): ``UCX_TLS=tcp,self``
(the "nodes" share one host, so UCX would otherwise try shared memory between containers) and
``UCX_NET_DEVICES=lo``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness.mpi import mpi_image, mpich_image, mpich_newer_image  # noqa: F401
from tests.harness.users import berth_executable, describe
from tests.integration.test_mpi import assert_clean, run_as

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.slow]

LINE = re.compile(r"^mpich rank=(\d+) size=(\d+) node=(\S+) sum=(\d+) library=(\S+) file=(\S+)$")
HOST_LIBRARY = "MPICH_Version:_4.0.2"
IMAGE_LIBRARY = "MPICH_Version:_4.0.1"
INJECTED = "/dev/.berth-mpi/lib/libmpich.so.12"
#: Passed into containers by the default passthrough_env (UCX_*).
UCX = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo"}
SITE_MPI = """\
[mpi]
libraries = ["libmpich.so.12", "libmpichcxx.so.12", "libmpichfort.so.12"]
dependencies = ["libhwloc.so.15", "libucp.so.0", "libucs.so.0", "libuct.so.0", "libucm.so.0", "libnuma.so.1"]
devices = ["/dev/infiniband/*"]
files = ["/etc/mpich"]
"""


def rank_lines(output: str) -> dict[int, tuple[int, str, int, str, str]]:
    """{rank: (size, node, sum, library, file)}; a rank printing twice fails."""
    found = {}
    for line in output.splitlines():
        match = LINE.match(line.strip())
        if match:
            rank, size, node, total, library, file = match.groups()
            assert int(rank) not in found, output
            found[int(rank)] = (int(size), node, int(total), library, file)
    return found


@pytest.fixture(scope="module")
def mpich_site(job_site, mpich_image, slurm_cluster, user):  # noqa: F811
    """job_site with the host's MPICH as the site's MPI (conf.d/70-mpi.toml) and a template
    ``mpich`` whose image is the MPICH image (in the site store) with ``custom="--mpi host"``."""
    import os

    dropin = job_site.config_dir / "conf.d" / "70-mpi.toml"
    dropin.write_text(SITE_MPI)
    dropin.chmod(0o644)
    admin_env = {**os.environ, **job_site.env}
    result = subprocess.run(
        [str(berth_executable()), "template", "create", "mpich", f"image={mpich_image}", "cpu=1", "memsz=512M",
         "stop_timeout=5", "boot_timeout=120", "custom=--mpi host", "comment=the image's MPICH, host MPI injected"],
        check=False, env=admin_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, describe(result)
    state = user.tempdir("berth-mpihost-state-")
    env = {**job_site.env, **slurm_cluster.env(), **UCX, "BERTH_BACKEND": "slurm", "BERTH_STATE_DIR": str(state)}
    try:
        yield env
        assert_clean(user, str(state))
    finally:
        dropin.unlink()
        subprocess.run([str(berth_executable()), "template", "rm", "mpich"], env=admin_env, check=False,
                       capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def berth_run(*args: str) -> list[str]:
    return [str(berth_executable()), "run", *args]


def test_without_injection_the_images_own_mpich_runs(mpich_site, mpich_image, user):  # noqa: F811
    result = run_as(user, berth_run(mpich_image, "/opt/hello-mpich"), mpich_site)
    assert result.returncode == 0, describe(result)
    assert rank_lines(result.stdout) == {0: (1, "-", 0, IMAGE_LIBRARY, "/lib/x86_64-linux-gnu/libmpich.so.12")}, \
        result.stdout


def test_injection_replaces_the_images_mpich_with_the_hosts(mpich_site, mpich_image, user):  # noqa: F811
    result = run_as(user, berth_run("--mpi", "host", mpich_image, "/opt/hello-mpich"), mpich_site)
    assert result.returncode == 0, describe(result)
    assert rank_lines(result.stdout) == {0: (1, "-", 0, HOST_LIBRARY, INJECTED)}, result.stdout


def test_injection_holds_when_the_program_ignores_ld_library_path(mpich_site, mpich_image, user):  # noqa: F811
    """A program that does not use LD_LIBRARY_PATH (cleared here; an RPATH does the same) loads
    the image's own file, over which the host's library is bind-mounted."""
    result = run_as(user, berth_run("--mpi", "host", "-e", "LD_LIBRARY_PATH=", mpich_image, "/opt/hello-mpich"),
                    mpich_site)
    assert result.returncode == 0, describe(result)
    assert rank_lines(result.stdout) == {0: (1, "-", 0, HOST_LIBRARY, "/lib/x86_64-linux-gnu/libmpich.so.12")}, \
        result.stdout


@pytest.mark.parametrize("scope,nodes,ranks,runtime", [("task", 2, 2, "berth-launcher"), ("task", 2, 2, "runc"),
                                                        ("node", 2, 2, "berth-launcher"), ("node", 2, 2, "runc")])
def test_injected_ranks_through_pmi2(mpich_site, mpich_image, user, slurm_cluster,  # noqa: F811
                                     scope, nodes, ranks, runtime):
    """srun --mpi=pmi2 across 2 nodes, one container per rank or per node: every rank runs the
    host's MPICH, wired up through Slurm's PMI-2 socket passed into its container.

    At most one peer per rank over the network: Debian's MPICH 4.0.2 + UCX 1.13 hangs in
    MPI_Finalize in about 4 runs of 10 when a rank has 2 or more peers over UCX's TCP transport,
    on the bare host too (docs/mpi.md, test bed notes). Both runtimes pass the PMI socket on
    (``--preserve-fds 1``): berth-launcher, which berth picks for these containers, and runc."""
    chosen = ("--runtime", "runc") if runtime == "runc" else ()
    result = run_as(user, ["srun", "--mpi=pmi2", f"-N{nodes}", f"-n{ranks}", f"--ntasks-per-node={ranks // nodes}",
                           *berth_run("--debug", *chosen, "--scope", scope, "--mpi", "host", mpich_image,
                                      "/opt/hello-mpich")],
                    mpich_site)
    assert result.returncode == 0, describe(result) + slurm_cluster.logs()[-3000:]
    if scope == "task":  # (the node's container logs its runtime to its keeper's log)
        assert re.search(rf"runtime \S*/{runtime}\n", result.stderr), describe(result)
    found = rank_lines(result.stdout)
    assert sorted(found) == list(range(ranks)), result.stdout
    assert {(size, total, library, file) for size, _, total, library, file in found.values()} == \
        {(ranks, ranks * (ranks - 1) // 2, HOST_LIBRARY, INJECTED)}, result.stdout
    assert len({node for _, node, _, _, _ in found.values()}) == nodes, result.stdout


def test_the_images_own_mpich_also_wires_up_through_pmi2(mpich_site, mpich_image, user, slurm_cluster):  # noqa: F811
    """PMI-2 through berth is not a matter of injection: the image's MPICH uses it as well."""
    result = run_as(user, ["srun", "--mpi=pmi2", "-N2", "-n2", *berth_run(mpich_image, "/opt/hello-mpich")],
                    mpich_site)
    assert result.returncode == 0, describe(result) + slurm_cluster.logs()[-3000:]
    found = rank_lines(result.stdout)
    assert {(size, total, library) for size, _, total, library, _ in found.values()} == {(2, 1, IMAGE_LIBRARY)}, \
        result.stdout
    assert sorted(found) == [0, 1], result.stdout


def test_template_custom_mpi_host_reaches_the_jobs_steps(mpich_site, user, job_site):
    """A job of the template ``mpich`` (custom="--mpi host"): its script's container and its
    `berth srun` step's ranks (one container per node here) run the host's MPICH."""
    from tests.integration.jobs_helpers import submit, wait_for

    work = job_site.workdir(user)
    job_site.write_script(work, "job.sh", """\
        #!/bin/sh
        #BERTH -N 2 -n 2 --ntasks-per-node=1 -o out-%j.txt --scope node
        /opt/hello-mpich
        berth srun --mpi=pmi2 /opt/hello-mpich > steps.txt 2> steps.err
        echo "berth srun status $?"
        """, user)
    job = submit(user, job_site, work, "--template", "mpich", "job.sh", env=mpich_site)
    states = wait_for(user, job_site, [job], ("completed", "failed", "cancelled", "timeout"), timeout_s=180,
                      env=mpich_site)
    logs = (work / f"out-{job}.txt").read_text() if (work / f"out-{job}.txt").exists() else ""
    steps = (work / "steps.txt").read_text() if (work / "steps.txt").exists() else ""
    info = f"{states[job]}\n{logs}\n== steps\n{steps}\n" + \
        ((work / "steps.err").read_text() if (work / "steps.err").exists() else "")
    assert states[job]["state"] == "completed" and "berth srun status 0" in logs, info
    # The script's own container (a singleton MPI program: no PMI in the batch step).
    assert [(size, total, library, file) for size, _, total, library, file in rank_lines(logs).values()] == \
        [(1, 0, HOST_LIBRARY, INJECTED)], info
    found = rank_lines(steps)
    assert sorted(found) == [0, 1], info
    assert {(size, total, library, file) for size, _, total, library, file in found.values()} == \
        {(2, 1, HOST_LIBRARY, INJECTED)}, info


def test_an_open_mpi_image_is_refused(mpich_site, mpi_image, user):  # noqa: F811
    result = run_as(user, berth_run("--mpi", "host", mpi_image, "/opt/hello"), mpich_site)
    assert result.returncode == 125, describe(result)
    assert "error: --mpi host: image" in result.stderr and "libmpi.so.40.30.4" in result.stderr, result.stderr
    assert "not the MPICH ABI (libmpi.so.12) of the site's MPI libmpich.so.12.2.2 (MPICH ABI 12.2.2)" \
        in result.stderr, result.stderr
    assert "hello rank" not in result.stdout


def test_a_host_abi_older_than_the_images_is_refused(mpich_site, mpich_newer_image, user):  # noqa: F811
    result = run_as(user, berth_run("--mpi", "host", mpich_newer_image, "true"), mpich_site)
    assert result.returncode == 125, describe(result)
    assert ("error: --mpi host: the site's MPI libmpich.so.12.2.2 (MPICH ABI 12.2.2) is older than image "
            in result.stderr), result.stderr
    assert "libmpich.so.12.9.0 (MPICH ABI 12.9.0)" in result.stderr, result.stderr
    # Without injection the image runs (the refusal is about the host's MPI, not the image).
    result = run_as(user, berth_run(mpich_newer_image, "true"), mpich_site)
    assert result.returncode == 0, describe(result)


def test_no_site_mpi_is_refused(job_site, mpich_newer_image, user):  # noqa: F811
    """A site without [mpi] (its own configuration directory: the module's drop-in is elsewhere)."""
    config = Path(user.tempdir("berth-mpihost-config-"))
    (config / "conf.d").mkdir()
    shutil.copy(job_site.config_dir / "conf.d" / "50-registry.toml", config / "conf.d")
    try:
        result = run_as(user, berth_run("--mpi", "host", mpich_newer_image, "true"), {
            **job_site.env, "BERTH_CONFIG_DIR": str(config), "BERTH_STATE_DIR": str(config / "state")})
    finally:
        shutil.rmtree(config, ignore_errors=True)
    assert result.returncode == 125, describe(result)
    assert "error: --mpi host: this site names no host MPI (mpi.libraries is empty)" in result.stderr, result.stderr
