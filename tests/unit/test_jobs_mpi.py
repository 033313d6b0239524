"""berth.jobs.mpi: the OpenMPI launcher settings a job's container gets."""

from __future__ import annotations

from berth.jobs.mpi import mpi_launcher_env

IMAGE = "reg.example:5000/hpc/ompi:4.1@sha256:" + "a" * 64


def test_orted_runs_in_the_job_image_through_slurm():
    assert mpi_launcher_env(IMAGE, {"PATH": "/bin"}) == {
        "OMPI_MCA_orte_launch_agent": f"berth run {IMAGE} orted",
        "OMPI_MCA_plm_slurm_args": "--overlap",
    }


def test_host_settings_win():
    env = {"OMPI_MCA_orte_launch_agent": "/site/bin/orted-wrapper"}
    assert mpi_launcher_env(IMAGE, env) == {"OMPI_MCA_plm_slurm_args": "--overlap"}
    env["OMPI_MCA_plm_slurm_args"] = ""
    assert mpi_launcher_env(IMAGE, env) == {}
