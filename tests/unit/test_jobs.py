"""Unit tests of the job model, options, directives, template limits, records and state merging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from berth.errors import NotFound, PolicyError, UsageError
from berth.jobs import model
from berth.jobs.agent import parse_exported, step_environment
from berth.jobs.api import apply_template, build_resources, read_script
from berth.jobs.model import JobResult, JobSpec, Resources
from berth.jobs.options import (
    parse_gres_gpus,
    merge_options,
    parse_memory_bytes,
    suggest,
    parse_options,
    parse_time_s,
    read_directives,
)
from berth.jobs.records import JobRecord, atomic_write, create_record, find_record, list_records
from berth.jobs.slurm import REQUEUED, merge_state, parse_squeue


@pytest.mark.parametrize("text,seconds", [
    ("30", 1800), ("5:30", 330), ("1:00:00", 3600), ("2-0", 172800), ("1-02:03", 93780),
    ("1-02:03:04", 93784), ("0:04", 4),
])
def test_time_formats_as_sbatch_reads_them(text, seconds):
    assert parse_time_s(text) == seconds


@pytest.mark.parametrize("text,message", [
    ("0", "less than the minimum 1s"), ("abc", "not a duration"), ("1:2:3:4", "not a duration"),
    ("-5", "negative"), ("400-00:00:00", "more than the maximum 365d"),
])
def test_bad_times_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        parse_time_s(text)


@pytest.mark.parametrize("text,size", [("512", 512 << 20), ("4G", 4 << 30), ("1.5G", 3 << 29), ("100M", 100 << 20),
                                       ("2048K", 2 << 20), ("1T", 1 << 40), ("4GB", 4 << 30)])
def test_memory_defaults_to_megabytes_like_sbatch(text, size):
    assert parse_memory_bytes(text) == size


@pytest.mark.parametrize("text,message", [("12X", "not a size"), ("0", "less than the minimum 1MiB"),
                                          ("100K", "less than the minimum 1MiB"),
                                          ("65T", "more than the maximum 64TiB"), ("-1G", "negative")])
def test_bad_memory_is_refused(text, message):
    with pytest.raises(UsageError, match=message):
        parse_memory_bytes(text)


def test_gres_knows_gpus_only():
    assert (parse_gres_gpus("gpu:2"), parse_gres_gpus("gpu"), parse_gres_gpus("gpu:a100:1")) == (2, 1, 1)
    for bad, message in (("tpu:1", "only gpu:N"), ("gpu:x", "not a whole number"), ("gpu:65", "more than 64")):
        with pytest.raises(UsageError, match=message):
            parse_gres_gpus(bad)


def _values(words, **kwargs):
    return merge_options(parse_options(words, **kwargs)[0]).values


def test_option_words_in_every_spelling():
    values = _values(["-N2", "-n", "4", "--mem=4G", "--exclusive", "--job-name", "x", "-t5"], where="w")
    assert values == {"nodes": "2", "ntasks": "4", "mem": "4G", "exclusive": True, "job_name": "x", "time": "5"}


def test_unknown_and_malformed_options_name_the_place():
    options, end = parse_options(["--nodez=2", "job.sh"], where="job.sh line 3")
    assert (options[0].name, options[0].known, options[0].where, end) == ("nodez", False, "job.sh line 3", 1)
    assert suggest("nodez") == "did you mean '--nodes'?"
    with pytest.raises(UsageError, match="option --mem needs a value"):
        parse_options(["--mem"], where="w")
    with pytest.raises(UsageError, match="--contiguous takes no value"):
        parse_options(["--contiguous=yes"], where="w")
    with pytest.raises(UsageError, match="w: option --ti is ambiguous \\(--time, --time-min\\)"):
        parse_options(["--ti=5"], where="w")


def test_directives_are_read_from_the_leading_comment_block_only(tmp_path):
    text = ("#!/bin/sh\n#BERTH -N 2\n# a comment\n#SBATCH -A proj --qos=high\n  #SBATCH -A indented\n\n"
            "#BERTH --mem=1G --time=5 # why\necho hi\n#BERTH --nodes=9\n#SBATCH -A late\n")
    sbatch, berth = read_directives(tmp_path / "j.sh", text)
    assert [(o.name, o.value, o.where) for o in sbatch] == [
        ("account", "proj", f"{tmp_path}/j.sh line 4"), ("qos", "high", f"{tmp_path}/j.sh line 4")]
    assert merge_options(berth).values == {"nodes": "2", "mem": "1G", "time": "5"}


@pytest.mark.parametrize("line,message", [
    ("#BERTHX --nodes=2", "j.sh line 2: unknown directive '#BERTHX'"),
    ("#berth --nodes=2", "j.sh line 2: '#berth' must be written '#BERTH'"),
    ("#BERTH", "j.sh line 2: '#BERTH' without an option"),
    ("#BERTH --job-name='unclosed", "j.sh line 2: No closing quotation"),
    ("#BERTH --json", "j.sh line 2: --json belongs on the command line"),
    ("#BERTH -N 2 extra", "j.sh line 2: 'extra' is not an option"),
    ("#SBATCH --template=bb", "j.sh line 2: --template is berth's option, not sbatch's"),
    ("#SBATCH hetjob", "j.sh line 2: heterogeneous jobs ('hetjob') are not supported"),
])
def test_directive_typos_name_the_line(tmp_path, line, message):
    with pytest.raises(UsageError) as error:
        sbatch, berth = read_directives(tmp_path / "j.sh", f"#!/bin/sh\n{line}\necho\n")
        unknown = [o for o in sbatch + berth if not o.known]
        if unknown:  # what api.submit says on the local backend
            raise UsageError(f"{unknown[0].where}: unknown option '{unknown[0].display}'")
    assert error.value.message.startswith(f"{tmp_path}/{message}")


def test_precedence_command_line_over_berth_over_sbatch(tmp_path):
    text = "#!/bin/sh\n#SBATCH -J a -t 5 -A acct -q low\n#BERTH -J b -q mid\n#SBATCH -J a2\necho\n"
    sbatch, berth = read_directives(tmp_path / "j.sh", text)
    command_line = parse_options(["-q", "high"])[0]
    merged = merge_options(sbatch, berth, command_line)
    assert (merged.values["job_name"], merged.values["time"]) == ("b", "5")
    assert [o.spelled for o in merged.passthrough] == ["--account=acct", "--qos=high"]
    assert merge_options(sbatch).values["job_name"] == "a2"  # within one level, the later line wins


def test_repeatable_berth_options_collect_and_the_higher_place_replaces_the_list(tmp_path):
    text = "#!/bin/sh\n#BERTH --stage-in=a:x --stage-in b:y\n#BERTH --stage-out=r:s3://b/r\necho\n"
    _, berth = read_directives(tmp_path / "j.sh", text)
    assert merge_options(berth).values == {"stage_in": ["a:x", "b:y"], "stage_out": ["r:s3://b/r"]}
    command_line = parse_options(["--stage-in", "c:z", "--s3-credentials-in-container"])[0]
    assert merge_options(berth, command_line).values == {
        "stage_in": ["c:z"], "stage_out": ["r:s3://b/r"], "s3_credentials_in_container": True}


def test_local_dependencies_parse_as_the_local_backend_runs_them():
    from berth.jobs.options import parse_dependency

    assert parse_dependency("afterok:3:4,singleton,afterany:5", "w") == (
        ("afterok", ("3", "4")), ("singleton", ()), ("afterany", ("5",)))
    for bad, message in (("afterok:3?afterany:4", "need Slurm"), ("after:3", "'after' is not one of"),
                         ("afterok", "write afterok:JOB"), ("singleton:3", "write singleton"),
                         ("afterok:3+5", "need Slurm"), ("afterok:x", "write afterok:JOB")):
        with pytest.raises(UsageError, match=message):
            parse_dependency(bad, "w")


def test_template_and_image_at_one_level_conflict_and_across_levels_the_higher_wins():
    directive = [o for o in parse_options(["--image", "x:1"], where="j.sh line 2")[0]]
    command_line = parse_options(["--template", "bb"])[0]
    assert merge_options(directive, command_line).values == {"template": "bb"}
    with pytest.raises(UsageError, match="--template and --image exclude each other"):
        merge_options(parse_options(["--template", "bb", "--image", "x:1"])[0])


@pytest.mark.parametrize("words,message", [
    (["--wrap=hostname"], "command line: --wrap cannot be used with berth submit"),
    (["--wra", "hostname"], "--wrap cannot be used"),  # getopt's abbreviation cannot sneak past
    (["--parsable"], "--parsable cannot be used"),
    (["-W"], "--wait cannot be used"),
    (["--test-only"], "--test-only cannot be used"),
])
def test_options_that_would_take_over_berths_job_are_refused(words, message):
    with pytest.raises(UsageError, match=message):
        merge_options(parse_options(words)[0])


def test_resources_are_checked_together():
    resources = build_resources({"nodes": "2", "ntasks": "4", "cpus_per_task": "3", "mem": "2G", "gres": "gpu:1",
                                 "time": "1:00:00", "partition": "batch", "exclusive": True})
    assert resources == Resources(2, 4, None, 3, 2 << 30, 1, 3600, "batch", True)
    with pytest.raises(UsageError, match="--ntasks 1 is less than --nodes 2"):
        build_resources({"nodes": "2", "ntasks": "1"})
    with pytest.raises(UsageError, match="--partition 'a b'"):
        build_resources({"partition": "a b"})


@dataclass(frozen=True)
class FakeTemplate:
    name: str = "small"
    cpu: int = 4
    memsz_bytes: int = 8 << 30
    gpu: int = 1


def test_template_resources_become_the_request_unless_less_is_asked():
    assert apply_template(Resources(), FakeTemplate()) == Resources(cpus_per_task=4, memory_bytes=8 << 30, gpus=1)
    less = apply_template(Resources(cpus_per_task=2, memory_bytes=1 << 30, gpus=0), FakeTemplate())
    assert (less.cpus_per_task, less.memory_bytes, less.gpus) == (2, 1 << 30, 0)
    assert apply_template(Resources(), FakeTemplate(gpu=0)).gpus is None


@pytest.mark.parametrize("resources,message", [
    (Resources(cpus_per_task=5), "--cpus-per-task 5 exceeds template 'small' (cpu=4)"),
    (Resources(memory_bytes=9 << 30), "--mem 9GiB exceeds template 'small' (memsz=8GiB)"),
    (Resources(gpus=2), "--gres gpu:2 exceeds template 'small' (gpu=1)"),
])
def test_more_than_the_template_is_a_policy_error(resources, message):
    with pytest.raises(PolicyError) as error:
        apply_template(resources, FakeTemplate())
    assert error.value.message == message


def _passthrough(words: list[str]):
    return merge_options(parse_options(words)[0]).passthrough


@pytest.mark.parametrize("words,resources,message", [
    (["--mincpus=9"], Resources(ntasks_per_node=2),
     "command line: --mincpus=9 gives 9 CPUs per node, more than template 'small' allows (cpu=4 per task, "
     "8 per node)"),
    (["--cpus-per-gpu=5"], Resources(),
     "command line: --cpus-per-gpu=5 gives 5 CPUs per node, more than template 'small' allows (cpu=4 per task, "
     "4 per node)"),
    (["--gpus-per-node=1", "--cpus-per-gpu=3"], Resources(ntasks_per_node=1, cpus_per_task=2),
     "command line: --cpus-per-gpu=3 gives 3 CPUs per node, more than template 'small' allows (cpu=4 per task, "
     "2 per node)"),
    (["--exclusive"], Resources(exclusive=True),
     "--exclusive gives the job whole nodes, more CPUs than template 'small' allows (cpu=4 per task)"),
])
def test_options_that_ask_for_more_cpus_than_the_template_are_policy_errors(words, resources, message):
    """--mincpus, --cpus-per-gpu and --exclusive passed through unchecked asked Slurm for more
    CPUs than the template allows."""
    with pytest.raises(PolicyError) as error:
        apply_template(resources, FakeTemplate(), _passthrough(words))
    assert error.value.message == message and error.value.hint


def test_cpu_options_within_the_template_pass():
    assert apply_template(Resources(ntasks_per_node=2), FakeTemplate(), _passthrough(["--mincpus=8"])).cpus_per_task == 4
    assert apply_template(Resources(), FakeTemplate(gpu=2), _passthrough(["--cpus-per-gpu=2"])).gpus == 2
    assert apply_template(Resources(), FakeTemplate(gpu=0), _passthrough(["--cpus-per-gpu=64"])).gpus is None
    assert apply_template(Resources(), FakeTemplate(), _passthrough(["--exclusive=user"])).cpus_per_task == 4
    with pytest.raises(UsageError, match="--mincpus 'x': not a whole number"):
        apply_template(Resources(), FakeTemplate(), _passthrough(["--mincpus=x"]))


def test_per_gpu_options_count_the_gpus_asked_for_wherever_they_stand():
    """--mem-per-gpu was checked as the options came: before --gpus-per-node it counted every
    GPU of the template, and a job within the template was refused for its options' order."""
    template = FakeTemplate(cpu=8, memsz_bytes=16 << 30, gpu=4)
    for words in (["--mem-per-gpu=10G", "--gpus-per-node=1"], ["--gpus-per-node=1", "--mem-per-gpu=10G"],
                  ["--cpus-per-gpu=4", "--gpus-per-node=1"]):
        assert apply_template(Resources(), template, _passthrough(words)).gpus == 1, words
    with pytest.raises(PolicyError, match="--mem-per-gpu=10G gives 20GiB per node"):
        apply_template(Resources(), template, _passthrough(["--mem-per-gpu=10G", "--gpus-per-node=2"]))


def test_script_checks(tmp_path):
    good = tmp_path / "good.sh"
    good.write_text("#!/bin/sh\necho\n")
    assert read_script(str(good)) == (good, "#!/bin/sh\necho\n")
    (tmp_path / "plain.sh").write_text("echo\n")
    (tmp_path / "bin").write_bytes(b"#!\xff\xfe")
    for name, message in (("missing.sh", "does not exist"), ("plain.sh", "does not start with '#!'"),
                          ("bin", "is not text"), ("", "is a directory")):
        with pytest.raises(UsageError, match=message):
            read_script(str(tmp_path / name))


@dataclass(frozen=True)
class FakeSettings:
    jobs_dir: Path


def _spec(record: JobRecord, **changes) -> JobSpec:
    values = dict(id=record.id, backend="slurm", name="job", script=str(record.script), script_source="/x/job.sh",
                  args=("a",), workdir="/work", image="reg/img:1@sha256:" + "a" * 64, template="t",
                  resources=Resources(nodes=2), output="/work/out", error=None)
    values.update(changes)
    return JobSpec(**values)


def test_records_allocate_ids_and_round_trip(tmp_path):
    settings = FakeSettings(tmp_path / "jobs")
    first, second = create_record(settings), create_record(settings)
    assert (first.id, second.id) == ("1", "2")
    spec = _spec(first)
    first.write_spec(spec)
    assert first.read_spec() == spec
    first.write_native_id("4242")
    assert find_record(settings, "4242").path == first.path
    assert find_record(settings, "1").path == first.path
    assert [r.id for r in list_records(settings)] == ["1"]  # the second has no spec yet
    with pytest.raises(NotFound, match="no job '7'"):
        find_record(settings, "7")
    atomic_write(first.state_file, "{}")
    assert [p.name for p in first.path.iterdir() if p.name.startswith(".")] == []


def test_slurm_states_merge_with_the_runner_result(tmp_path):
    record = JobRecord(tmp_path)
    spec = _spec(record)
    record.write_native_id("17")
    mine = {"Comment": f"berth:{tmp_path}"}

    def state(slurm):
        return merge_state(spec, record, slurm).result

    assert state({**mine, "JobState": "PENDING"}).state == "pending"
    assert state({**mine, "JobState": "RUNNING"}).state == "staging"  # runner has not written yet
    record.write_result(JobResult("running", started_at=1.0))
    assert state({**mine, "JobState": "RUNNING"}).state == "running"
    assert state({**mine, "JobState": "SUSPENDED"}).state == "suspended"
    record.write_result(JobResult("cancelled", signal=15))
    assert (state({**mine, "JobState": "TIMEOUT"}).state, state({**mine, "JobState": "TIMEOUT"}).signal) == ("timeout", 15)
    record.write_result(JobResult("failed", phase="script", exit_code=3))
    assert state({**mine, "JobState": "FAILED"}) == JobResult("failed", phase="script", exit_code=3)
    assert state(None).exit_code == 3  # purged from slurmctld: the result file still tells
    # Another cluster's job 17 (ids restart when a cluster is rebuilt) is not this one.
    assert state({"JobState": "CANCELLED", "Comment": "berth:/elsewhere"}).state == "failed"
    record.state_file.unlink()
    ended = state({**mine, "JobState": "FAILED", "Reason": "NonZeroExitCode"})
    assert (ended.state, ended.phase) == ("failed", "scheduler")
    assert "Slurm ended the job as FAILED (NonZeroExitCode)" in ended.message


def test_parse_squeue_keeps_free_text_comments_whole():
    text = "5|RUNNING|None|node1|berth:/x/5\n6|PENDING|Resources||(null)\n7|FAILED|NonZeroExitCode|node[1-2]|a|b\n"
    jobs = parse_squeue(text)
    assert (jobs["5"]["JobState"], jobs["5"]["Comment"]) == ("RUNNING", "berth:/x/5")
    assert (jobs["6"]["Reason"], jobs["6"]["Comment"]) == ("Resources", "")
    assert (jobs["7"]["NodeList"], jobs["7"]["Comment"]) == ("node[1-2]", "a|b")


def test_a_node_failure_is_a_failed_job_naming_the_node_not_a_cancel(tmp_path):
    """Issue 8, scenario 6: when a node of a job dies, slurmctld ends the job as NODE_FAIL and
    stops its other nodes with SIGTERM, which the runner took for a cancel ("cancelled"), and a
    runner gone with its node left "running". Both are a failed job naming the node, recorded
    so that the reason stays once slurmctld forgets the job."""
    record = JobRecord(tmp_path)
    spec = _spec(record)
    record.write_native_id("17")
    node_fail = {"Comment": f"berth:{tmp_path}", "JobState": "NODE_FAIL", "Reason": "NodeDown",
                 "NodeList": "node[1-2]", "FailedNodes": "node2 (not responding)"}
    record.write_result(JobResult("cancelled", signal=15, started_at=5.0, node="node1"))
    # While the other nodes end their part, squeue says COMPLETING, with the reason NodeDown.
    completing = merge_state(spec, record, {**node_fail, "JobState": "COMPLETING", "NodeList": "node1",
                                            "FailedNodes": ""}).result
    assert (completing.state, "one of the job's nodes failed" in completing.message) == ("failed", True)
    failed = merge_state(spec, record, node_fail).result
    assert (failed.state, failed.phase, failed.started_at, failed.node) == ("failed", "scheduler", 5.0, "node1")
    assert failed.message == ("node node2 (not responding) failed during the job; Slurm ended the job as "
                              "NODE_FAIL: resubmit it")
    assert merge_state(spec, record, None).result == failed  # slurmctld forgot it: state.json tells
    assert merge_state(spec, record, {**node_fail, "FailedNodes": ""}).result == failed  # node back: name kept
    record.write_result(JobResult("running", started_at=5.0, node="node2"))  # the runner died with node2
    gone = merge_state(spec, record, {**node_fail, "FailedNodes": ""}).result
    assert (gone.state, "a node of node[1-2] failed" in gone.message) == ("failed", True)
    # What the runner saw through to the end stays: the script had completed, or a cancel was asked.
    record.write_result(JobResult("completed", exit_code=0))
    assert merge_state(spec, record, node_fail).result.state == "completed"
    record.write_result(JobResult("cancelled", signal=15))
    record.request_cancel()
    assert merge_state(spec, record, node_fail).result.state == "cancelled"


def test_a_requeued_job_says_so_while_pending(tmp_path):
    record = JobRecord(tmp_path)
    spec = _spec(record)
    record.write_native_id("17")
    mine = {"Comment": f"berth:{tmp_path}", "JobState": "PENDING"}
    assert merge_state(spec, record, mine).result.message is None
    record.write_result(JobResult("cancelled", signal=15, started_at=5.0))
    pending = merge_state(spec, record, mine).result
    assert (pending.state, pending.message) == ("pending", "Slurm requeued the job: it runs again from the start")
    # Running again, before the new run's runner writes: not the previous run's "cancelled",
    # nor a node failure recorded while that run ended.
    again = merge_state(spec, record, {**mine, "JobState": "RUNNING"}).result
    assert (again.state, again.message) == ("staging", pending.message)
    record.write_result(JobResult("failed", phase="scheduler", message="node node2 failed during the job"))
    assert merge_state(spec, record, {**mine, "JobState": "RUNNING"}).result.state == "staging"
    record.write_result(JobResult("completed", exit_code=0))  # the runner's own end stays
    assert merge_state(spec, record, {**mine, "JobState": "RUNNING"}).result.state == "completed"


def test_a_requeued_run_that_slurm_ended_before_its_runner_wrote_is_not_the_previous_runs_end(tmp_path):
    """A requeued job's next run that Slurm ends before its runner writes (seen with the hold
    released at once: slurmd refused the batch launch as a revoked credential, FAILED with exit
    code 1) showed the previous run's "cancelled" ("the job was cancelled", nobody had) as the
    job's end. Slurm's word counts, and it is recorded so that it stays once slurmctld forgets."""
    record = JobRecord(tmp_path)
    spec = _spec(record)
    record.write_native_id("17")
    mine = {"Comment": f"berth:{tmp_path}"}
    record.write_result(JobResult("cancelled", exit_code=0, message="the job was cancelled", started_at=5.0,
                                  ended_at=6.0, node="node1"))
    assert merge_state(spec, record, {**mine, "JobState": "PENDING"}).result.message == REQUEUED
    ended = merge_state(spec, record, {**mine, "JobState": "FAILED", "Reason": "NonZeroExitCode"}).result
    assert (ended.state, ended.phase) == ("failed", "scheduler")
    assert ended.message.startswith("Slurm ended the job as FAILED (NonZeroExitCode) without a result from "
                                    "berth's runner for that run")
    assert merge_state(spec, record, {**mine, "JobState": "FAILED", "Reason": "NonZeroExitCode"}).result == ended
    assert merge_state(spec, record, None).result == ended  # slurmctld forgot the job: state.json tells
    # The same for a node failure recorded while the previous run ended, and a later COMPLETED.
    record.write_result(JobResult("failed", phase="scheduler", message="node node2 failed during the job"))
    assert merge_state(spec, record, {**mine, "JobState": "COMPLETED"}).result.message.startswith(
        "Slurm ended the job as COMPLETED without a result")
    # A cancel that was asked for, and the runner's own end, stay the job's end.
    record.write_result(JobResult("cancelled", signal=15, message="the job was cancelled"))
    record.request_cancel()
    assert merge_state(spec, record, {**mine, "JobState": "FAILED"}).result.state == "cancelled"
    record.write_result(JobResult("failed", phase="script", exit_code=3))
    assert merge_state(spec, record, {**mine, "JobState": "FAILED"}).result.exit_code == 3


def test_exit_statuses_become_results():
    assert model.result_for_exit(0).state == "completed"
    failed = model.result_for_exit(3)
    assert (failed.state, failed.phase, failed.exit_code, failed.signal) == ("failed", "script", 3, None)
    killed = model.result_for_exit(137)
    assert (killed.exit_code, killed.signal, killed.message) == (None, 9, "the job script failed (killed by signal SIGKILL)")


def test_step_environment_keeps_host_values_for_host_things():
    exported = parse_exported("export A='1 2'\nexport PATH='/bin'\nexport SLURM_JOB_ID='9'\n"
                              "export B='multi\nline'\ndeclare -x C=\"x\"\n")
    assert exported == {"A": "1 2", "PATH": "/bin", "SLURM_JOB_ID": "9", "B": "multi\nline", "C": "x"}
    env = step_environment({"PATH": "/host/bin", "SLURM_JOB_ID": "10", "HOME": "/h"}, exported)
    assert env == {"PATH": "/host/bin", "SLURM_JOB_ID": "10", "HOME": "/h"}


def test_step_environment_passes_only_the_allow_list():
    """What a container exports reaches the host command only when allow-listed: never a
    variable that makes a host program load code or configuration."""
    hostile = {name: "/home/u/inject" for name in (
        "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "BASH_ENV",
        "ENV", "BERTH_CONFIG_DIR", "BERTH_INIT", "BERTH_RUNTIME", "SLURM_CONF", "PMIX_MCA_mca_base_component_path",
        "GCONV_PATH", "LOCPATH", "PATH")}
    wanted = {"LANG": "C.UTF-8", "LC_ALL": "C", "MPI_X": "1", "I_MPI_DEBUG": "5", "CUDA_VISIBLE_DEVICES": "0,1",
              "BERTH_JOB_EXTRA": "e"}
    host = {"PATH": "/usr/bin", "LANG": "en_US.UTF-8", "BERTH_JOB_IMAGE": "img@sha256:1", "BERTH_JOB_DIR": "/h/j"}
    exported = {**hostile, **wanted, "LC_CTYPE": "/home/u/locale", "BERTH_JOB_IMAGE": "other",
                "BERTH_JOB_DIR": "/x", "BERTH_JOB_AGENT": "/c/agent", "BERTH_JOB_BIN": "/c/bin"}
    assert step_environment(host, exported) == {**host, **wanted}


def test_host_commands_never_come_from_the_request():
    import sys

    from berth import proc
    from berth.jobs.agent import host_command

    assert host_command("berth", ["run", "x"]) == [sys.executable, "-I", "-m", "berth", "run", "x"]
    if proc.has_program("srun"):
        assert host_command("srun", ["-n1"]) == [proc.find_program("srun"), "-n1"]


def test_a_berth_installed_in_the_user_site_keeps_it_on_its_host_commands_path(monkeypatch, tmp_path):
    """`python -I` drops the user site, where `pip install --user` puts berth: the step agent's
    host berth could not import itself. There (and only there) it runs with -E -P, which keep
    the user site (tests/integration/test_install.py installs one for real)."""
    import site
    import sys
    from pathlib import Path

    from berth import proc
    from berth.jobs.agent import host_command

    here = str(Path(proc.__file__).resolve().parent.parent)
    monkeypatch.setattr(site, "ENABLE_USER_SITE", True)
    monkeypatch.setattr(site, "getusersitepackages", lambda: here)
    assert host_command("berth", ["run", "x"]) == [sys.executable, "-E", "-P", "-m", "berth", "run", "x"]
    monkeypatch.setattr(site, "ENABLE_USER_SITE", False)  # -s, or another user's process
    assert host_command("berth", ["run", "x"])[1:3] == ["-I", "-m"]
    monkeypatch.setattr(site, "ENABLE_USER_SITE", True)
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path))  # berth elsewhere
    assert host_command("berth", ["run", "x"])[1:3] == ["-I", "-m"]
    assert proc.berth_argv("x")[1:3] == ["-P", "-m"]


def test_a_request_directory_swapped_for_a_link_is_neither_read_nor_written(tmp_path):
    """The agent opens the request once without following a link: a request replaced by a
    link to another directory after the scan gets nothing written there."""
    from berth.jobs.agent import StepAgent, open_agent_dir

    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("ready", "prog", "cwd", "env"):
        (outside / name).write_text("berth\n")
    (outside / "argv").write_text("--version\0")
    (outside / "out").write_text("")  # plain files, not FIFOs: a regression fails instead of blocking
    (outside / "err").write_text("")
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    (agent_dir / "req.x").symlink_to(outside)
    agent = StepAgent(agent_dir, {"PATH": "/usr/bin:/bin"}, str(tmp_path))
    agent._dir = open_agent_dir(agent_dir)
    before = set(threading.enumerate())
    agent._scan()
    for handler in set(threading.enumerate()) - before:  # one serving the link would write its status
        handler.join(10)
    assert sorted(os.listdir(outside)) == ["argv", "cwd", "env", "err", "out", "prog", "ready"]


def _plant_request(directory, name):
    """A ready step request whose out/err are plain files: the agent refuses it (status 125)."""
    request = directory / name
    request.mkdir()
    for file, text in (("prog", "berth\n"), ("argv", "--version\0"), ("cwd", "/\n"), ("env", ""),
                       ("out", ""), ("err", ""), ("ready", "")):
        (request / file).write_text(text)
    return request


@pytest.mark.parametrize("swapped", ["while it serves", "before it serves"])
def test_an_agent_directory_swapped_for_a_link_is_not_served(tmp_path, swapped):
    """The container may rename $BERTH_JOB_AGENT and plant a link under its name, to a host
    directory outside its mounts (another job's requests, anything laid out like one): the agent
    keeps serving the directory it opened, and never reads or writes through the link. The job
    runner opens it before the job's container starts (``open``) and serves it once the job is
    forked (``start``): a swap in between changes nothing either."""
    from berth.jobs.agent import StepAgent, install_shims

    outside = tmp_path / "outside"
    outside.mkdir()
    agent_dir = tmp_path / "agent"
    install_shims(tmp_path / "bin", agent_dir)
    agent = StepAgent(agent_dir, {"PATH": "/usr/bin:/bin"}, str(tmp_path))
    agent.open()
    if swapped == "while it serves":
        agent.start()
    try:
        agent_dir.rename(tmp_path / "agent.old")
        agent_dir.symlink_to(outside)
        if swapped == "before it serves":
            agent.start()
        planted = _plant_request(outside, "req.planted")
        own = _plant_request(tmp_path / "agent.old", "req.own")
        deadline = time.monotonic() + 30
        while not (own / "status").exists() and not (planted / "status").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        agent.stop()
    assert (own / "status").read_text() == "125\n"  # the agent's own directory, renamed, is served
    assert not (planted / "status").exists()


def test_a_step_request_wakes_the_agent_at_once(tmp_path, monkeypatch):
    """The shim wakes the agent through its FIFO: a step starts when asked, not at the agent's
    next scan (which this test puts a minute away). A wake FIFO replaced by the container only
    sends the agent back to scanning."""
    import subprocess
    import time

    from berth.jobs import agent as agent_module

    monkeypatch.setattr(agent_module, "POLL_S", 60.0)
    bin_dir, agent_dir = tmp_path / "bin", tmp_path / "agent"
    agent_module.install_shims(bin_dir, agent_dir)
    assert (agent_dir / "wake").is_fifo()
    agent = agent_module.StepAgent(agent_dir, {"PATH": os.environ["PATH"]}, str(tmp_path))
    agent.start()
    try:
        time.sleep(0.2)  # the agent's first scan is over: it now waits on the FIFO
        started = time.monotonic()
        shim = subprocess.run([str(bin_dir / "berth"), "--version"], env={"PATH": "/usr/bin:/bin",
                              "BERTH_JOB_AGENT": str(agent_dir)}, capture_output=True, text=True, timeout=30,
                              cwd=tmp_path)
        elapsed = time.monotonic() - started
    finally:
        agent.stop()
    assert (shim.returncode, shim.stdout.split()[0]) == (0, "berth")
    assert elapsed < 20, f"the step waited {elapsed:.1f} s for the agent's scan"
    assert not agent._thread.is_alive()  # stop() ends the wait at once, not after POLL_S

    # a planted regular file under the name: the agent does not take it as its FIFO
    os.unlink(agent_dir / "wake")
    (agent_dir / "wake").write_text("")
    assert agent_module.open_wake(agent_dir) is None


def test_srun_words_split_into_options_and_command():
    from berth.cli.jobs import split_srun_argv

    assert split_srun_argv(["-N", "2", "-n2", "--mpi=pmix", "hostname", "-f"])[:3] == (
        None, ["--nodes=2", "--ntasks=2", "--mpi=pmix"], ["hostname", "-f"])
    assert split_srun_argv(["--image", "x:1", "--exclusive", "--", "-weird"])[:3] == (
        "x:1", ["--exclusive"], ["-weird"])
    # issue 9: options with a value, and -K whose value is optional (attached only)
    assert split_srun_argv(["-A", "proj", "-q", "high", "-C", "ib", "-G", "1", "cmd"])[:3] == (
        None, ["--account=proj", "--qos=high", "--constraint=ib", "--gpus=1"], ["cmd"])
    assert split_srun_argv(["-K", "cmd", "arg"])[:3] == (None, ["--kill-on-bad-exit"], ["cmd", "arg"])
    assert split_srun_argv(["-K1", "-lN2", "--image=y", "cmd"])[:3] == (
        "y", ["--kill-on-bad-exit=1", "--label", "--nodes=2"], ["cmd"])
    assert split_srun_argv(["-W", "5", "cmd"])[:3] == (None, ["--wait=5"], ["cmd"])  # srun's -W takes a value
    # issue 13: --scope is berth's (one container per task, or per node), never srun's
    assert split_srun_argv(["-N2", "cmd"])[3] == "task"
    assert split_srun_argv(["--scope", "node", "-n4", "cmd"]) == (None, ["--ntasks=4"], ["cmd"], "node", None)
    assert split_srun_argv(["--scope=task", "cmd"]) == (None, [], ["cmd"], "task", None)
    # --container-mpi is berth run's --mpi (srun's --mpi names the PMI plugin and passes on)
    assert split_srun_argv(["--mpi=pmi2", "--container-mpi", "host", "cmd"]) == (
        None, ["--mpi=pmi2"], ["cmd"], "task", "host")
    assert split_srun_argv(["--container-mpi=none", "cmd"], default_mpi="host")[4] == "none"
    assert split_srun_argv(["cmd"], default_mpi="host")[4] == "host"
    with pytest.raises(UsageError, match="--container-mpi 'pmi2': use host or none"):
        split_srun_argv(["--container-mpi", "pmi2", "cmd"])
    with pytest.raises(UsageError, match="--scope 'rank': use task or node"):
        split_srun_argv(["--scope", "rank", "cmd"])
    with pytest.raises(UsageError, match="no command given"):
        split_srun_argv(["-N", "2"])


def test_run_options_mount_what_is_outside_home(tmp_path, monkeypatch):
    from berth.config.settings import Settings
    from berth.jobs.runner import build_run_options

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    record = JobRecord(tmp_path / "home" / "jobs" / "3")
    spec = _spec(record, workdir=str(tmp_path / "scratch"), custom="-e X=1 --network none", stop_timeout_s=7,
                 resources=Resources(cpus_per_task=2, memory_bytes=1 << 30))
    options = build_run_options(Settings(), spec, record, limit_resources=True)
    jobs = tmp_path / "home" / "jobs"
    assert [(m.source, m.destination, m.read_only) for m in options.mounts] == [
        (str(tmp_path / "scratch"), str(tmp_path / "scratch"), False),
        (str(jobs / "3" / "ctr"), str(jobs), False),  # hides the other jobs from the container
    ]
    assert options.env[0] == "X=1" and f"BERTH_JOB_IMAGE={spec.image}" in options.env
    assert f"BERTH_JOB_BIN={jobs}/bin" in options.env
    assert (options.network, options.workdir, options.stop_timeout_s) == ("none", spec.workdir, 7.0)
    assert (options.cpus, options.memory_bytes) == (2.0, 1 << 30)
    unlimited = build_run_options(Settings(), spec, record, limit_resources=False)
    assert (unlimited.cpus, unlimited.memory_bytes) == (None, None)


def test_job_status_json_shape(tmp_path):
    record = JobRecord(tmp_path)
    status = model.JobStatus(_spec(record), JobResult("failed", phase="boot", message="m"), "17", "FAILED")
    data = json.loads(json.dumps(status.to_dict()))
    assert {k: data[k] for k in ("id", "backend", "native_id", "state", "phase", "message")} == {
        "id": record.id, "backend": "slurm", "native_id": "17", "state": "failed", "phase": "boot", "message": "m"}
    assert os.path.basename(data["output"]) == "out"


def test_planted_links_in_the_jobs_directory_are_never_followed(tmp_path):
    """Containers see the jobs directory (under the mounted home): whatever they plant there
    must not make the runner read or write other files of the user."""
    from berth.jobs.agent import _open_fifo, _read, install_shims
    from berth.jobs.records import make_private_dir, open_regular_nofollow

    victim = tmp_path / "precious.txt"
    victim.write_text("precious\n")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "state.json").symlink_to(victim)
    atomic_write(jobs / "state.json", "{}")
    assert (victim.read_text(), (jobs / "state.json").is_symlink()) == ("precious\n", False)

    (jobs / "0.lock").symlink_to(victim)
    os.close(open_regular_nofollow(jobs / "0.lock", os.O_RDWR | os.O_CREAT))
    os.link(victim, jobs / "1.lock")  # a hard link is refused too (it would lock the victim)
    os.close(open_regular_nofollow(jobs / "1.lock", os.O_RDWR | os.O_CREAT))
    assert victim.read_text() == "precious\n" and victim.stat().st_nlink == 1
    assert not (jobs / "0.lock").is_symlink()

    (jobs / "bin").symlink_to(tmp_path)
    (jobs / "agent").mkdir()
    install_shims(jobs / "bin", jobs / "agent")
    assert not (jobs / "bin").is_symlink() and (jobs / "bin" / "srun").read_text().startswith("#!/bin/sh")
    assert not (tmp_path / "srun").exists()
    make_private_dir(jobs / "agent")  # an existing real directory is kept

    (jobs / "argv").symlink_to(victim)
    directory = os.open(jobs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            _read("argv", directory)
        (jobs / "out").write_text("x")
        with pytest.raises(OSError, match="not a FIFO"):
            _open_fifo("out", directory)
    finally:
        os.close(directory)
    assert (jobs / "out").read_text() == "x"


def test_the_jobs_directory_and_the_parents_berth_creates_are_private_whatever_the_umask(tmp_path):
    """Issue 12, defect 1: ~/.local/state was created with the umask's mode (0755 or 0777)."""
    import stat

    tmp_path.chmod(0o755)
    old_umask = os.umask(0)
    try:
        record = create_record(FakeSettings(tmp_path / "local" / "state" / "berth" / "jobs"))
        atomic_write(record.state_file, "{}")
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "local", tmp_path / "local" / "state", tmp_path / "local" / "state" / "berth",
                 tmp_path / "local" / "state" / "berth" / "jobs", record.path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE(record.state_file.stat().st_mode) == 0o600


def test_export_keeps_berths_variables_and_may_not_set_them(monkeypatch):
    from berth.jobs.api import _checked_export
    from berth.jobs.options import ParsedOption

    monkeypatch.setenv("BERTH_CONFIG_DIR", "/etc/site-berth")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/a/.config")

    def export(value):
        return _checked_export(ParsedOption("export", value, "command line"))

    assert export("ALL,FOO=1") == "ALL,FOO=1"
    kept = export("FOO=1").split(",")
    assert kept[0] == "FOO=1" and {"BERTH_CONFIG_DIR", "XDG_CONFIG_HOME"} <= set(kept)
    assert "NONE" not in export("NONE").split(",") and "BERTH_CONFIG_DIR" in export("NONE")
    with pytest.raises(UsageError, match="BERTH_CONFIG_DIR is berth's own variable"):
        export("ALL,BERTH_CONFIG_DIR=/tmp/mine")


def test_sbatch_does_not_get_the_input_variables_of_options_berth_decides(monkeypatch):
    from berth.jobs.slurm import sbatch_env

    for name, value in (("SBATCH_GPUS", "8"), ("SBATCH_MEM_PER_CPU", "100G"), ("SBATCH_TIMELIMIT", "99:00:00"),
                        ("SBATCH_EXPORT", "NONE"), ("SBATCH_ACCOUNT", "chem"), ("SBATCH_QOS", "high"),
                        ("SBATCH_CPUS_PER_GPU", "64"), ("SBATCH_EXCLUSIVE", "")):
        monkeypatch.setenv(name, value)
    env = sbatch_env()
    assert {k for k in env if k.startswith("SBATCH_")} == {"SBATCH_ACCOUNT", "SBATCH_QOS"}


def test_array_specs_as_sbatch_reads_them():
    from berth.jobs.options import parse_array

    assert parse_array("1-5%2") == ((1, 2, 3, 4, 5), 2)
    assert parse_array("0-9:3,20") == ((0, 3, 6, 9, 20), None)
    assert parse_array("3,1,3") == ((1, 3), None)
    for bad, message in (("5-1", "empty range"), ("1-5%0", "not a positive number"), ("a-b", "is not N"),
                         ("1-2000", "task ids go up to 1000"), ("1-3%x", "not a positive number")):
        with pytest.raises(UsageError, match=message):
            parse_array(bad, "--array")


def test_output_patterns_name_array_tasks():
    from berth.jobs.api import _expand_path

    assert _expand_path("out-%A_%a-%j-%%.txt", "23", "x", "/w", "20", 4) == "/w/out-20_4-23-%.txt"
    assert _expand_path("/abs/%x-%j.out", "7", "name", "/w") == "/abs/name-7.out"


def test_job_scope_comes_from_the_option_else_the_templates_custom_else_task():
    """Issue 13: a job's `berth srun` steps default to the job's --scope (or the template's)."""
    from berth.jobs.api import _scope

    assert _scope(None, "") == "task"
    assert _scope(None, "--cpus 2 --scope node") == "node"
    assert _scope("task", "--scope node") == "task"  # the job's own option wins
    with pytest.raises(UsageError, match="--scope 'rank': use task or node"):
        _scope("rank", "")


def test_berth_srun_takes_the_jobs_scope_unless_given(monkeypatch):
    from berth import proc
    from berth.cli.jobs import cmd_srun

    seen = []
    monkeypatch.setattr(proc, "replace_with", lambda argv, **kwargs: seen.append(argv))
    monkeypatch.setenv("BERTH_JOB_IMAGE", "img:1")
    monkeypatch.setenv("BERTH_JOB_SCOPE", "node")
    cmd_srun(types.SimpleNamespace(argv=["-n2", "hostname"]), None)
    cmd_srun(types.SimpleNamespace(argv=["--scope", "task", "-n2", "hostname"]), None)
    monkeypatch.setenv("BERTH_JOB_SCOPE", "bogus")
    cmd_srun(types.SimpleNamespace(argv=["-n2", "hostname"]), None)
    assert [argv[0] for argv in seen] == ["srun"] * 3
    assert seen[0][-4:] == ["--scope", "node", "img:1", "hostname"]
    assert seen[1][-3:] == ["run", "img:1", "hostname"]
    assert seen[2][-3:] == ["run", "img:1", "hostname"]


def test_berth_srun_runs_berth_on_the_nodes_without_the_working_directory_on_its_path(monkeypatch, tmp_path):
    """A job's working directory (on the shared file system, with the user's files) is not on
    the module path of the nodes' berth: no module of its shadows berth's, and no import stats it."""
    from berth import proc
    from berth.cli.jobs import cmd_srun

    seen = []
    monkeypatch.setattr(proc, "replace_with", lambda argv, **kwargs: seen.append(argv))
    monkeypatch.setenv("BERTH_JOB_IMAGE", "img:1")
    cmd_srun(types.SimpleNamespace(argv=["-n1", "true"]), None)
    node_berth = seen[0][seen[0].index(sys.executable):seen[0].index("run")]
    (tmp_path / "argparse.py").write_text("raise SystemExit('the working directory shadowed argparse')\n")
    result = subprocess.run([*node_berth, "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert (result.returncode, result.stdout.split()[:1]) == (0, ["berth"]), result.stderr


def test_a_started_script_reads_as_running_before_the_runner_records_it(tmp_path):
    """The wrapper's marker, not the runner's next 0.1 s poll, says when the script runs (a CI
    run read ``staging`` for a script that had already written its first file)."""
    record = JobRecord(tmp_path)
    record.write_result(JobResult(model.STAGING, started_at=5.0))
    assert record.read_result().state == model.STAGING
    record.container_dir.mkdir(parents=True)
    record.started_file.touch()
    assert record.read_result() == JobResult(model.RUNNING, started_at=5.0)
    # Stage-out runs after the script, with the marker still there: it stays staging.
    record.write_result(JobResult(model.STAGING, phase=model.PHASE_STAGE_OUT, exit_code=0))
    assert record.read_result().state == model.STAGING


def test_slurm_writes_only_its_own_file_in_the_record_with_percent_signs_kept():
    """sbatch's --output names the record's file (an array's: one per task, in its first record),
    never the user's -o: slurmstepd would follow a link swapped in for it. A '%' of the record's
    path is doubled so that Slurm reads it as a '%'."""
    from berth.jobs.slurm import sbatch_argv, scheduler_output

    record = JobRecord(Path("/home/a/100%x/jobs/7"))
    assert "--output=/home/a/100%%x/jobs/7/slurm.out" in sbatch_argv(_spec(record, output="/w/%j.out"), record)
    head = _spec(record, array_job_id="7", array_task_id=1)
    assert "--output=/home/a/100%%x/jobs/7/slurm-%a.out" in sbatch_argv(head, record)
    assert not [word for word in sbatch_argv(head, record) if word.startswith("--error")]
    task = JobRecord(Path("/home/a/100%x/jobs/9"))
    assert scheduler_output(task, _spec(task, array_job_id="7", array_task_id=3)) == \
        Path("/home/a/100%x/jobs/7/slurm-3.out")
    assert scheduler_output(record, _spec(record)) == Path("/home/a/100%x/jobs/7/slurm.out")
    # Slurm removes a backslash from --output (the job fails to launch, writing nothing): refused.
    from berth.errors import JobError

    odd = JobRecord(Path("/home/a/x\\y/jobs/7"))
    with pytest.raises(JobError, match=r"the jobs directory /home/a/x\\y/jobs has a backslash"):
        sbatch_argv(_spec(odd), odd)


#: Runs SlurmOutput as berth job-exec does, in a child (it replaces the process's stdout and
#: stderr): take, the job writes both streams, Slurm writes a message, carry.
_TAKE_AND_CARRY = """
import os, sys
from pathlib import Path
from berth.jobs.records import JobRecord
from berth.jobs.slurm import SlurmOutput
record = JobRecord(Path(sys.argv[1]))
output = SlurmOutput(record, record.read_spec())
output.take()
os.write(1, b"job out\\n")
os.write(2, b"job err\\n")
with open(record.scheduler_output(), "ab") as slurm:
    slurm.write(b"slurmstepd: error: *** JOB 5 ON node1 CANCELLED AT 2026-12-03T17:00:00 ***\\n")
output.carry()
"""


@pytest.mark.parametrize("append", [False, True])
def test_the_runner_opens_the_users_files_and_carries_slurms_own_output_into_the_error_file(tmp_path, append):
    import subprocess
    import sys

    from berth.jobs.slurm import OUTPUT_HEADER, uncarried_output

    record = JobRecord(tmp_path / "jobs" / "5")
    record.path.mkdir(parents=True)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    for path in (out, err):
        path.write_text("OLD\n")
    spec = _spec(record, output=str(out), error=str(err))
    record.write_spec(spec)
    # Before the runner: Slurm truncated its file (the default open mode), or appended to
    # berth's first line (--open-mode=append); either way it wrote a warning.
    record.scheduler_output().write_bytes((OUTPUT_HEADER if append else b"") + b"slurmstepd: warning: early\n")
    child = subprocess.run([sys.executable, "-c", _TAKE_AND_CARRY, str(record.path)], capture_output=True)
    assert (child.returncode, child.stdout, child.stderr) == (0, b"", b""), child
    old = "OLD\n" if append else ""
    assert out.read_text() == old + "job out\n"
    assert err.read_text() == (old + "slurmstepd: warning: early\njob err\n"
                               "slurmstepd: error: *** JOB 5 ON node1 CANCELLED AT 2026-12-03T17:00:00 ***\n")
    assert uncarried_output(record, spec) == b""  # all carried: `berth logs` adds nothing
    with open(record.scheduler_output(), "ab") as slurm:
        slurm.write(b"slurmstepd: error: Detected 1 oom_kill event in StepId=5.batch\n")
    assert uncarried_output(record, spec) == b"slurmstepd: error: Detected 1 oom_kill event in StepId=5.batch\n"


def test_slurms_output_is_shown_whole_when_the_runner_never_started(tmp_path):
    from berth.jobs.slurm import OUTPUT_HEADER, prepare_scheduler_output, uncarried_output

    record = JobRecord(tmp_path / "5")
    record.path.mkdir()
    spec = _spec(record)
    assert uncarried_output(record, spec) == b""  # no file (yet)
    prepare_scheduler_output(record.scheduler_output())
    assert record.scheduler_output().read_bytes() == OUTPUT_HEADER
    assert uncarried_output(record, spec) == b""
    with open(record.scheduler_output(), "ab") as slurm:
        slurm.write(b"/bin/sh: 1: exec: /opt/berth/bin/python: not found\n")
    assert uncarried_output(record, spec) == b"/bin/sh: 1: exec: /opt/berth/bin/python: not found\n"
    record.scheduler_output().write_bytes(b"truncated by Slurm\n")
    assert uncarried_output(record, spec) == b"truncated by Slurm\n"


def test_an_output_file_swapped_for_a_link_is_refused_naming_it_and_nothing_is_written(tmp_path):
    from berth.errors import JobError
    from berth.jobs.slurm import SlurmOutput

    record = JobRecord(tmp_path / "5")
    record.path.mkdir()
    victim = tmp_path / "bashrc"
    victim.write_text("ORIGINAL\n")
    (tmp_path / "out").symlink_to(victim)
    (tmp_path / "err").write_text("")
    spec = _spec(record, output=str(tmp_path / "err"), error=str(tmp_path / "out"))
    with pytest.raises(JobError, match=f"^refused the job's output file {tmp_path}/out: it is a symbolic link$"):
        SlurmOutput(record, spec).take()
    assert victim.read_text() == "ORIGINAL\n" and (tmp_path / "err").read_text() == ""


def test_a_requeued_run_in_truncate_mode_is_shown_whole_until_its_runner_carries_it(tmp_path):
    """Slurm requeued the job in its default open mode (truncate): it emptied its file when the
    second run started, so the offset the first run's runner recorded is stale. `berth logs`
    must show all of the second run's messages (not skip as many bytes as the first run
    carried), the second runner must carry them all, and Slurm's words after the first run's
    last carry (not truncated yet) are still shown."""
    import subprocess
    import sys

    from berth.jobs.slurm import uncarried_output

    record = JobRecord(tmp_path / "jobs" / "5")
    record.path.mkdir(parents=True)
    err = tmp_path / "err.txt"
    spec = _spec(record, output=str(err))
    record.write_spec(spec)
    record.scheduler_output().write_bytes(b"slurmstepd: early 1\n")
    child = subprocess.run([sys.executable, "-c", _TAKE_AND_CARRY, str(record.path)], capture_output=True)
    assert (child.returncode, child.stderr) == (0, b""), child
    assert uncarried_output(record, spec) == b""
    notice = b"slurmstepd: error: *** JOB 5 ON node1 CANCELLED AT 2026-12-03T17:01:00 DUE TO JOB REQUEUE ***\n"
    with open(record.scheduler_output(), "ab") as slurm:
        slurm.write(notice)
    assert uncarried_output(record, spec) == notice
    # The second run starts: Slurm truncates and writes more than the first run carried, before
    # (or instead of) the runner's start.
    second = b"slurmstepd: error: couldn't chdir to `/gone': No such file or directory: going to /tmp instead\n" * 3
    assert len(second) > len(err.read_bytes())
    record.scheduler_output().write_bytes(second)
    assert uncarried_output(record, spec) == second
    child = subprocess.run([sys.executable, "-c", _TAKE_AND_CARRY, str(record.path)], capture_output=True)
    assert (child.returncode, child.stderr) == (0, b""), child
    assert err.read_bytes() == (second + b"job out\njob err\n"
                                b"slurmstepd: error: *** JOB 5 ON node1 CANCELLED AT 2026-12-03T17:00:00 ***\n")
    assert uncarried_output(record, spec) == b""
    # A third run's shorter output, and a record of an older berth (an offset only) trusted.
    record.scheduler_output().write_bytes(b"short\n")
    assert uncarried_output(record, spec) == b"short\n"
    (record.path / "slurm.out.carried").write_text("2\n")
    assert uncarried_output(record, spec) == b"ort\n"


def test_a_requeued_run_in_append_mode_carries_only_what_the_run_before_did_not(tmp_path):
    """Slurm requeued the job (--open-mode=append): the first run carried its messages already
    and the second must not repeat them, only what came after (Slurm's requeue notice)."""
    import subprocess
    import sys

    from berth.jobs.slurm import OUTPUT_HEADER

    record = JobRecord(tmp_path / "jobs" / "5")
    record.path.mkdir(parents=True)
    out = tmp_path / "out.txt"
    out.write_text("run 1\nslurmstepd: early 1\n")
    record.write_spec(_spec(record, output=str(out)))
    first = OUTPUT_HEADER + b"slurmstepd: early 1\n"
    record.scheduler_output().write_bytes(first + b"slurmstepd: *** JOB 5 CANCELLED DUE TO JOB REQUEUE ***\n")
    (tmp_path / "jobs" / "5" / "slurm.out.carried").write_text(f"{len(first)}\n")
    child = subprocess.run([sys.executable, "-c", _TAKE_AND_CARRY, str(record.path)], capture_output=True)
    assert (child.returncode, child.stderr) == (0, b""), child
    assert out.read_text() == ("run 1\nslurmstepd: early 1\nslurmstepd: *** JOB 5 CANCELLED DUE TO JOB REQUEUE ***\n"
                               "job out\njob err\n"
                               "slurmstepd: error: *** JOB 5 ON node1 CANCELLED AT 2026-12-03T17:00:00 ***\n")


def test_berth_starts_berth_without_the_working_directory_on_its_path(tmp_path):
    """berth.proc.berth_argv, the one way berth starts berth (job runners, step nodes, the step
    agent): no file of the working directory named like a module berth imports runs instead."""
    from berth import proc

    (tmp_path / "argparse.py").write_text("raise SystemExit('the working directory shadowed argparse')\n")
    for isolated in (False, True):
        result = subprocess.run(proc.berth_argv("--version", isolated=isolated), cwd=tmp_path,
                                capture_output=True, text=True)
        assert (result.returncode, result.stdout.split()[:1]) == (0, ["berth"]), result.stderr
