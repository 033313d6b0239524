"""Golden tests for generated batch scripts (Slurm): what a scheduler receives.

Regenerate after an intended change with ``BERTH_UPDATE_GOLDEN=1 pytest tests/unit/test_jobs_scripts.py``
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from berth.errors import UsageError
from berth.jobs.model import JobSpec, Resources
from berth.jobs.records import JobRecord
from berth.jobs.slurm import batch_script

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "jobs"
PYTHON = "/opt/berth/venv/bin/python"
RECORD = JobRecord(Path("/home/alice/.local/state/berth/jobs/42"))


def template_job(**resources) -> JobSpec:
    """A job of template 'mpi' (cpu=4, memsz=8G, gpu=1) on 2 nodes for 90 minutes."""
    values = dict(nodes=2, ntasks_per_node=2, cpus_per_task=4, memory_bytes=8 << 30, gpus=1, time_limit_s=5400,
                  partition="batch", exclusive=True)
    values.update(resources)
    return JobSpec(
        id="42", backend="slurm", name="lammps", script=str(RECORD.script), script_source="/home/alice/run.sh",
        args=("in.lj",), workdir="/scratch/alice/run1", image="registry.site/hpc/lammps:2024@sha256:" + "ab" * 32,
        template="mpi", resources=Resources(**values), output="/scratch/alice/run1/lammps-42.out",
        error="/scratch/alice/run1/lammps-42.err", boot_timeout_s=120, stop_timeout_s=30,
    )


def minimal_job() -> JobSpec:
    return JobSpec(
        id="7", backend="slurm", name="hello.sh", script="/home/bob/.local/state/berth/jobs/7/script",
        script_source="/home/bob/hello.sh", args=(), workdir="/home/bob", image="busybox:1.36", template=None,
        resources=Resources(), output="/home/bob/.local/state/berth/jobs/7/stdout", error=None,
    )


CASES = {
    "slurm-template-job.sh": lambda: batch_script(template_job(), RECORD, PYTHON),
    "slurm-minimal-job.sh": lambda: batch_script(minimal_job(), JobRecord(Path("/home/bob/.local/state/berth/jobs/7")),
                                                 PYTHON),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_script_matches_golden(name):
    generated = CASES[name]()
    path = GOLDEN / name
    if os.environ.get("BERTH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(generated)
    assert generated == path.read_text()


def test_paths_with_spaces_cannot_become_directives():
    spec = template_job()
    spec = JobSpec(**{**spec.__dict__, "workdir": "/scratch/my run"})
    with pytest.raises(UsageError, match="cannot hold paths with spaces"):
        batch_script(spec, RECORD, PYTHON)
