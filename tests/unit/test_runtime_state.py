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


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a directory of someone else's")
def test_a_squatted_default_state_dir_is_replaced_by_a_private_one_found_again_later(tmp_path):
    squatted = tmp_path / f"berth-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)
    (tmp_path / f"berth-{os.getuid()}.decoy").mkdir()
    os.chown(tmp_path / f"berth-{os.getuid()}.decoy", 65534, 65534)
    with pytest.raises(RuntimeFailure, match="belongs to uid 65534"):
        state.ensure_state_dir(squatted)  # a state_dir the user chose: refused, never relocated
    first = state.ensure_state_dir(squatted, relocatable=True)
    assert first.parent == tmp_path and first.name.startswith(f"berth-{os.getuid()}.") and first != squatted
    info = os.lstat(first)
    assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700 and (first / "containers").is_dir()
    assert state.ensure_state_dir(squatted, relocatable=True) == first


def test_state_dir_resolution_relocates_only_the_default(tmp_path, monkeypatch):
    from berth.config.settings import Settings

    monkeypatch.setattr(state, "fallback_state_dir", lambda: tmp_path / "fallback")
    calls = []
    monkeypatch.setattr(state, "ensure_state_dir", lambda path, relocatable=False: calls.append((path, relocatable)))
    state.resolve_state_dir(Settings(state_dir=tmp_path / "fallback"))
    state.resolve_state_dir(Settings(state_dir=tmp_path / "fallback", sources={"state_dir": "env BERTH_STATE_DIR"}))
    state.resolve_state_dir(Settings(state_dir=tmp_path / "other"))
    assert calls == [(tmp_path / "fallback", True), (tmp_path / "fallback", False), (tmp_path / "other", False)]


def _berth(*args, state_dir):
    env = {**os.environ, "BERTH_STATE_DIR": str(state_dir), "BERTH_CONFIG_DIR": str(state_dir.parent / "etc")}
    return subprocess.run([sys.executable, "-m", "berth", *args], capture_output=True, text=True, env=env)


def test_a_container_entry_planted_as_a_link_never_makes_berth_remove_what_it_names(tmp_path):
    """What can write into the state directory (a container that sees it) could plant
    containers/ID as a link to another directory holding a free 'lock': every berth's stale
    clean-up took it for a dead container and emptied the directory it names. A link is removed
    itself; anything else that is not a directory, or a 'lock' that is not a regular file, is
    left, and berth ps and doctor --cleanup work on."""
    state_dir = state.ensure_state_dir(tmp_path / "state")
    precious = tmp_path / "precious"
    (precious / "chapters").mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    (precious / "chapters" / "one.tex").write_text("the first")
    (precious / "lock").touch()
    containers = state_dir / "containers"
    (containers / "b0123456789ab").symlink_to(precious)
    (containers / "b0123456789ac").write_text("not a directory")
    (containers / "b0123456789ad").mkdir()
    (containers / "b0123456789ad" / "lock").symlink_to(precious / "lock")
    (containers / "b0123456789ae").mkdir()
    (containers / "b0123456789ae" / "lock").mkdir()
    assert state.cleanup_stale(state_dir) == []
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert (precious / "chapters" / "one.tex").read_text() == "the first" and (precious / "lock").exists()
    assert sorted(os.listdir(containers)) == ["b0123456789ac", "b0123456789ad", "b0123456789ae"]
    assert state.list_containers(state_dir) == []
    (containers / "b0123456789ab").symlink_to(precious)
    for args in (["ps"], ["doctor", "--cleanup"]):
        result = _berth(*args, state_dir=state_dir)
        assert "Traceback" not in result.stderr and result.returncode in (0, 1), (args, result.stderr)
    assert not os.path.lexists(containers / "b0123456789ab")
    assert sorted(os.listdir(precious)) == ["chapters", "lock", "thesis.tex"]
