"""Golden tests for what sbatch receives: its command line (one word a line) and the batch script.

Regenerate after an intended change with ``BERTH_UPDATE_GOLDEN=1 pytest tests/unit/test_jobs_scripts.py``
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from berth.config.templates import Template
from berth.errors import UsageError
from berth.jobs.api import apply_template
from berth.jobs.model import JobSpec, Resources
from berth.jobs.records import JobRecord
from berth.jobs.slurm import batch_script, sbatch_argv

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "jobs"
PYTHON = "/opt/berth/venv/bin/python"
RECORD = JobRecord(Path("/home/alice/.local/state/berth/jobs/42"))


MPI = Template(name="mpi", image="registry.site/hpc/lammps:2024", image_digest="sha256:" + "ab" * 32, cpu=4,
               memsz_bytes=8 << 30, gpu=1, boot_timeout_s=120, stop_timeout_s=30)


def template_job(**resources) -> JobSpec:
    """A job of template 'mpi' (cpu=4, memsz=8G, gpu=1) on 2 nodes for 90 minutes, with the
    resources `berth submit` gives it (apply_template: what the user asked, the template's
    for the rest), so that the golden file shows a submission berth really makes."""
    asked = Resources(**{"nodes": 2, "ntasks_per_node": 2, "time_limit_s": 5400, "partition": "batch", **resources})
    return JobSpec(
        id="42", backend="slurm", name="lammps", script=str(RECORD.script), script_source="/home/alice/run.sh",
        args=("in.lj",), workdir="/scratch/alice/run1", image=MPI.pinned_reference,
        template="mpi", resources=apply_template(asked, MPI), output="/scratch/alice/run1/lammps-42.out",
        error="/scratch/alice/run1/lammps-42.err", boot_timeout_s=120, stop_timeout_s=30,
        scheduler_options=("--account=chem", "--qos=high", "--mail-type=END,FAIL", "--begin=now+1hour"),
        comment="run 1 of 3",
    )


def minimal_job() -> JobSpec:
    return JobSpec(
        id="7", backend="slurm", name="hello.sh", script="/home/bob/.local/state/berth/jobs/7/script",
        script_source="/home/bob/hello.sh", args=(), workdir="/home/bob", image="busybox:1.36", template=None,
        resources=Resources(), output="/home/bob/.local/state/berth/jobs/7/stdout", error=None,
    )


def submission(spec: JobSpec, record: JobRecord) -> str:
    return "\n".join(sbatch_argv(spec, record)) + "\n--- stdin:\n" + batch_script(spec, record, PYTHON)


CASES = {
    "slurm-template-job.txt": lambda: submission(template_job(), RECORD),
    "slurm-minimal-job.txt": lambda: submission(minimal_job(), JobRecord(Path("/home/bob/.local/state/berth/jobs/7"))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_script_matches_golden(name):
    generated = CASES[name]()
    path = GOLDEN / name
    if os.environ.get("BERTH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(generated)
    assert generated == path.read_text()


def test_exclusive_reaches_sbatch_for_a_job_without_template():
    """--exclusive (refused with a template: apply_template) is sbatch's own for other jobs."""
    spec = minimal_job()
    spec = JobSpec(**{**spec.__dict__, "resources": Resources(nodes=2, exclusive=True)})
    argv = sbatch_argv(spec, JobRecord(Path("/home/bob/.local/state/berth/jobs/7")))
    assert argv[argv.index("--nodes=2") + 1] == "--exclusive"


def test_values_with_spaces_reach_sbatch_as_one_word():
    """Options are sbatch arguments, not #SBATCH lines: nothing to quote, nothing split."""
    spec = template_job()
    spec = JobSpec(**{**spec.__dict__, "workdir": "/scratch/my run", "scheduler_options": ("--mail-user=a b",)})
    argv = sbatch_argv(spec, RECORD)
    assert "--chdir=/scratch/my run" in argv and argv[-1] == "--mail-user=a b"


def test_user_gpu_and_memory_options_replace_berths_own():
    spec = template_job(gpus=1, memory_bytes=1 << 30)
    spec = JobSpec(**{**spec.__dict__, "scheduler_options": ("--gpus-per-node=a100:1", "--mem-per-cpu=100M")})
    argv = sbatch_argv(spec, RECORD)
    assert not [word for word in argv if word.startswith(("--gres=", "--mem="))], argv


def test_an_array_script_starts_each_tasks_runner_on_its_record_and_files():
    from berth.jobs.slurm import array_script

    tasks = []
    for task, error in ((1, None), (3, "/scratch/a b/err-20_3")):
        spec = JobSpec(**{**template_job().__dict__, "id": str(19 + task), "array_job_id": "20",
                          "array_task_id": task, "output": f"/scratch/out-20_{task}", "error": error})
        tasks.append((JobRecord(Path(f"/home/alice/.local/state/berth/jobs/{19 + task}")), spec))
    script = array_script(tasks, PYTHON)
    # No shell redirection: it would follow a link swapped in for the output file after
    # submission; job-exec opens each task's files itself (berth.jobs.api._array_task_output).
    assert ("  1) exec /opt/berth/venv/bin/python -P -m berth job-exec --backend slurm "
            "/home/alice/.local/state/berth/jobs/20 ;;") in script.splitlines()
    assert ("  3) exec /opt/berth/venv/bin/python -P -m berth job-exec --backend slurm "
            "/home/alice/.local/state/berth/jobs/22 ;;") in script.splitlines()
