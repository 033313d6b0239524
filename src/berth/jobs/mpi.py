"""mpirun inside a job's container, with remote ranks started through Slurm (DESIGN.md decision 9).

OpenMPI's ``mpirun`` (4.x, ORTE) in a Slurm allocation starts one ``orted`` per remote node with
its Slurm launcher: ``srun … orted ARGS``. Inside a berth job that ``srun`` is the step agent's
shim (:mod:`berth.jobs.agent`), so the step really starts on the host; the launch agent below
makes it ``srun … berth run IMAGE orted ARGS``: each node's daemon runs in a container of the
job's own image (pinned by digest), and the ranks it forks share that container. No sshd, no
ssh client, no Slurm inside the image.

``--overlap`` lets the daemons' step share CPUs with other steps of the job (the daemons are
not ranks: the ranks are their children). Variables already set on the host (the user's or
the site's) are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping


def mpi_launcher_env(image: str, host_env: Mapping[str, str]) -> dict[str, str]:
    """OpenMPI settings for the job script's container: launch ``orted`` as ``berth run IMAGE
    orted`` through Slurm, unless ``host_env`` already sets them."""
    defaults = {
        "OMPI_MCA_orte_launch_agent": f"berth run {image} orted",
        "OMPI_MCA_plm_slurm_args": "--overlap",
    }
    return {name: value for name, value in defaults.items() if name not in host_env}
