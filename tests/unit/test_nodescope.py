"""berth.runtime.nodescope: the node key, each task's own environment, and whom the last task of a
node signals to stop the node's container."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from berth.errors import UsageError
from berth.runtime import nodescope, state
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


HOLDER = ("import json, sys, time; from pathlib import Path; from berth.runtime import state; "
          "c = state.create(Path(sys.argv[1]), sys.argv[2]); pid = int(sys.argv[3]) or __import__('os').getpid(); "
          "c.write_info({'id': c.id, 'name': sys.argv[2], 'pid': pid, 'started': 1.0}); "
          "print(c.id, flush=True); time.sleep(120)")


def test_the_last_task_signals_only_the_berth_that_holds_the_containers_lock(tmp_path):
    """The last task of a node stopped the node's container by SIGTERM to info.json's pid:
    a record planted or edited (info.json is the user's file) made it signal any process of
    the user instead."""

    state_dir = state.ensure_state_dir(tmp_path / "state")
    notes = []
    victim = subprocess.Popen(["sleep", "60"])
    holders = []
    try:
        for name, pid in (("planted", victim.pid), ("real", 0)):
            holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(state_dir), name, str(pid)],
                                      stdout=subprocess.PIPE, text=True)
            holders.append(holder)
            assert holder.stdout.readline().strip()  # its container is live
            tasks_fd = os.open(tmp_path / f"tasks-{name}", os.O_CREAT | os.O_RDWR, 0o600)
            # stop_timeout_s -60: no wait for the container to go (the planted one stays).
            nodescope._leave(state_dir, name, tasks_fd, None, -60 if name == "planted" else 0,
                             lambda message, debug=False: notes.append(message))
        with pytest.raises(subprocess.TimeoutExpired):
            victim.wait(timeout=2)  # not signalled
        assert any(f"its info.json names pid {victim.pid}" in note for note in notes), notes
        assert holders[1].wait(timeout=30) == -signal.SIGTERM  # the real berth was stopped
    finally:
        for process in (victim, *holders):
            process.kill()
            process.wait()
