"""berth.runtime.nodescope's pure parts: the node key and each task's own environment."""

from __future__ import annotations

import pytest

from berth.errors import UsageError
from berth.runtime import nodescope
from berth.runtime.options import is_container_name, parse_run_options


def test_node_key_names_job_step_and_node():
    key = nodescope.node_key({"SLURM_JOB_ID": "17", "SLURM_STEP_ID": "3", "SLURMD_NODENAME": "cn-0042"})
    assert key == "17.3.cn-0042"
    assert is_container_name(nodescope.container_name(key))


def test_node_key_makes_a_hostile_node_name_a_valid_container_name():
    key = nodescope.node_key({"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURMD_NODENAME": "../x y/" + "n" * 80})
    assert "/" not in key and " " not in key
    assert is_container_name(nodescope.container_name(key))


def test_node_key_outside_a_step_is_a_usage_error():
    with pytest.raises(UsageError, match="--scope node: not in a Slurm job step") as error:
        nodescope.node_key({"SLURM_JOB_ID": "17"})
    assert "--scope task" in error.value.hint


def test_task_env_takes_this_tasks_passed_through_values_only():
    environ = {"PMIX_RANK": "3", "SLURM_PROCID": "3", "HOME": "/h", "SECRET_TOKEN": "x"}
    assert nodescope.task_env(environ, ["PMIX_*", "SLURM_*"]) == ["PMIX_RANK=3", "SLURM_PROCID=3"]


def test_scope_option_defaults_to_task_and_rejects_others():
    assert parse_run_options([]).scope == "task"
    assert parse_run_options(["--scope", "node"]).scope == "node"
    with pytest.raises(UsageError, match="--scope"):
        parse_run_options(["--scope", "rank"])
