"""Container state directories: locking, listing, clean-up of dead berths' leftovers."""

import os
import subprocess
import sys

import pytest

from berth.errors import NotFound, RuntimeFailure
from berth.runtime import ocirt, state


def test_state_dir_is_created_private(tmp_path):
    path = state.ensure_state_dir(tmp_path / "s")
    assert os.stat(path).st_mode & 0o777 == 0o700 and (path / "containers").is_dir()


def test_live_container_is_listed_and_found_by_name_or_prefix(tmp_path):
    container = state.create(tmp_path, "job")
    container.write_info({"id": container.id, "name": "job", "started": 1})
    try:
        records = state.list_containers(tmp_path)
        assert [r["id"] for r in records] == [container.id]
        assert state.find_container(tmp_path, "job")["id"] == container.id
        assert state.find_container(tmp_path, container.id[:5])["id"] == container.id
        with pytest.raises(RuntimeFailure, match="already running"):
            state.create(tmp_path, "job")
        # A live container is never cleaned.
        assert state.cleanup_stale(tmp_path) == [] and container.path.exists()
    finally:
        container.release()
    assert not container.path.exists()
    with pytest.raises(NotFound, match="no running container .job."):
        state.find_container(tmp_path, "job")


def test_container_of_a_dead_berth_is_cleaned(tmp_path):
    # A child process creates and locks a container, then dies without releasing it.
    code = ("import sys, os; from pathlib import Path; from berth.runtime import state; "
            "c = state.create(Path(sys.argv[1]), 'orphan'); c.write_info({'id': c.id, 'name': 'orphan'}); "
            "(c.path / 'bundle').mkdir(); print(c.id); os._exit(0)")
    container_id = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                                  check=True).stdout.strip()
    assert state.list_containers(tmp_path) == []  # its lock is free: not live
    cleaned = state.cleanup_stale(tmp_path)
    assert [c["id"] for c in cleaned] == [container_id]
    assert os.listdir(tmp_path / "containers") == []


def test_probe_failure_reasons_name_the_fix():
    assert "hybrid cgroup" in ocirt._explain("crun", "cgroups in hybrid mode not supported")
    assert "user namespace" in ocirt._explain("runc", "operation not permitted")
    assert ocirt._explain("runc", "").endswith("no message")


def test_unknown_runtime_setting_is_refused(tmp_path):
    with pytest.raises(RuntimeFailure, match="unknown OCI runtime 'docker'"):
        ocirt.select_runtime(tmp_path, "docker", "/nonexistent")
