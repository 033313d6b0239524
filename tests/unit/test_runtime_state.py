"""Container state directories: locking, listing, clean-up of dead berths' leftovers."""

import json
import os
import shutil
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
    from berth.config import settings
    from berth.config.settings import Settings

    monkeypatch.setattr(settings, "fallback_state_dir", lambda: tmp_path / "fallback")
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


def _evil_program(tmp_path):
    marker = tmp_path / "ran"
    program = tmp_path / "evil"
    program.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\n")
    program.chmod(0o755)
    return program, marker


def _dead_container(state_dir, info):
    code = ("import json, sys, os; from pathlib import Path; from berth.runtime import state; "
            "c = state.create(Path(sys.argv[1]), None); info = json.loads(sys.argv[2]); "
            "info.get('id') == 'ID' and info.update(id=c.id); c.write_info(info); "
            "(c.runtime_root / c.id).mkdir(parents=True); print(c.id); os._exit(0)")
    return subprocess.run([sys.executable, "-c", code, str(state_dir), json.dumps(info)], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_clean_up_never_runs_a_program_info_json_names_and_survives_any_value(tmp_path):
    """info.json is the user's file, which what can write into the state directory may have
    planted: the clean-up of a dead container ran its runtime_path (any program), and a value
    of another type (a number for runtime_path) raised TypeError in every berth run."""
    state_dir = state.ensure_state_dir(tmp_path / "state")
    program, marker = _evil_program(tmp_path)
    planted = _dead_container(state_dir, {"id": "ID", "runtime": str(program), "runtime_path": str(program)})
    assert [c["id"] for c in state.cleanup_stale(state_dir)] == [planted]
    assert os.listdir(state_dir / "containers") == [] and not marker.exists()
    odd = _dead_container(state_dir, {"id": 7, "name": {}, "runtime": ["runc"], "runtime_path": 5, "pid": "x",
                                      "daemon_pids": "abc", "cpu_set": 3, "started": "yesterday"})
    assert state.cleanup_stale(state_dir) == [{"id": odd, "name": None, "unmounted": []}]
    assert os.listdir(state_dir / "containers") == []


def test_berth_ps_and_exec_take_only_values_of_the_types_berth_writes_and_never_run_a_named_program(tmp_path):
    from berth.config.settings import Settings
    from berth.runtime import manage

    settings = Settings(state_dir=tmp_path / "state")
    state_dir = state.resolve_state_dir(settings)
    program, marker = _evil_program(tmp_path)
    planted = state.create(state_dir, None)
    odd = state.create(state_dir, None)
    try:
        planted.write_info({"id": planted.id, "name": "planted", "started": 2.0, "runtime": str(program),
                            "runtime_path": str(program), "uid": os.getuid(), "gid": os.getgid()})
        (planted.runtime_root / planted.id).mkdir(parents=True)
        odd.write_info({"id": odd.id, "started": 1.0, "runtime": "runc"})
        assert [(r["id"], r["status"]) for r in manage.list_running(settings)] == [(odd.id, "starting"),
                                                                                (planted.id, "starting")]
        with pytest.raises(RuntimeFailure, match="not running yet"):
            manage.exec_in_container(settings, "planted", ["true"])
        assert not marker.exists()
        odd.write_info({"id": 7, "name": {}, "started": "yesterday", "command": "sh", "pid": True,
                        "runtime": 5, "uid": "root", "cpu_set": [1, "2", True, -1, 3], "remap_root": "yes"})
        records = state.list_containers(state_dir)
        assert [r["id"] for r in records] == [odd.id, planted.id]  # "yesterday" sorts as 0
        assert records[0] == {**records[0], "name": odd.id, "command": [], "pid": None, "runtime": None,
                              "uid": os.getuid(), "cpu_set": [1, 3], "remap_root": False, "started": 0.0}
        assert state.find_container(state_dir, odd.id[:6])["id"] == odd.id
        assert state.pinned_cpus(state_dir) == {1: 1, 3: 1}
        listed = manage.list_running(settings)
        assert [(r["id"], r["status"], r["pid"]) for r in listed] == [(odd.id, "starting", None),
                                                                     (planted.id, "starting", None)]
    finally:
        planted.release()
        odd.release()


def test_berth_ps_looks_at_every_container_lock_at_once(tmp_path, monkeypatch):
    """list_containers looked at each lock with its own read of /proc (namespace, mountinfo,
    /proc/locks); one look serves them all, and a lock file that cannot be looked at (a link)
    still only hides its own container."""
    from berth import locks

    looks = []

    class Counted(locks._ProcLocks):
        def __init__(self, proc):
            looks.append(proc)
            super().__init__(proc)

    containers = [state.create(tmp_path, None) for _ in range(3)]
    try:
        for index, container in enumerate(containers):
            container.write_info({"id": container.id, "started": float(index)})
        monkeypatch.setattr(locks, "_ProcLocks", Counted)
        assert [r["id"] for r in state.list_containers(tmp_path)] == [c.id for c in containers]
        assert len(looks) == 1
        os.rename(containers[1].path / "lock", containers[1].path / "lock.real")
        (containers[1].path / "lock").symlink_to(containers[1].path / "lock.real")
        assert [r["id"] for r in state.list_containers(tmp_path)] == [containers[0].id, containers[2].id]
    finally:
        for container in containers:
            container.release()


def test_the_clean_up_kills_through_a_runtime_root_of_the_containers_own_only(tmp_path, monkeypatch):
    """A dead container's runc/ planted as a link to another state directory's runtime root,
    where a live container of the same name runs: the clean-up had the runtime kill it."""
    from berth.runtime import ocirt

    state_dir = state.ensure_state_dir(tmp_path / "state")
    program, marker = _evil_program(tmp_path)
    monkeypatch.setattr(ocirt, "recorded_program", lambda recorded: str(program))  # stands for runc
    linked = _dead_container(state_dir, {"id": "ID", "runtime": "runc"})
    other_root = tmp_path / "other" / "containers" / linked / "runc"
    (other_root / linked).mkdir(parents=True)
    shutil.rmtree(state_dir / "containers" / linked / "runc")
    (state_dir / "containers" / linked / "runc").symlink_to(other_root)
    own = _dead_container(state_dir, {"id": "ID", "runtime": "runc"})
    assert sorted(c["id"] for c in state.cleanup_stale(state_dir)) == sorted([linked, own])
    assert marker.read_text().split("\n")[:-1] == [f"--root {state_dir}/containers/{own}/runc kill {own} KILL",
                                                   f"--root {state_dir}/containers/{own}/runc delete --force {own}"]
    assert (other_root / linked).is_dir()


def test_the_clean_up_opens_only_the_lock_of_a_live_container(tmp_path, monkeypatch):
    """Every berth run's clean-up opened each live container's directory and then its lock
    through /proc/self/fd: two opens per live container, where its lock alone tells it is live."""
    containers = [state.create(tmp_path, None) for _ in range(3)]
    opened = []
    real_open = os.open

    def counting(path, flags, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    try:
        monkeypatch.setattr(os, "open", counting)
        assert state.cleanup_stale(tmp_path, images=False) == []
        monkeypatch.undo()
        assert sorted(opened) == sorted(str(c.path / "lock") for c in containers)
    finally:
        for container in containers:
            container.release()


def test_a_dead_container_swapped_for_a_link_after_it_was_judged_is_left_alone(tmp_path, monkeypatch):
    """The clean-up judged a dead container through its directory, opened without following a
    link, but then ran the runtime and fusermount3 by path: containers/ID swapped for a link in
    between (by what can write into the state directory) had them act on the directory the
    link names (another state directory's live container of the same id). Nothing is done by
    path once the path names another directory; the next clean-up judges the moved one."""
    from berth.runtime import fuse, ocirt

    state_dir = state.ensure_state_dir(tmp_path / "state")
    dead = _dead_container(state_dir, {"id": "ID", "runtime": "runc"})
    path = state_dir / "containers" / dead
    other = tmp_path / "other" / "containers" / dead
    (other / "runc" / dead).mkdir(parents=True)
    (other / "rootfs").mkdir()
    acted = []
    monkeypatch.setattr(ocirt, "recorded_program", lambda recorded: "/bin/true")
    monkeypatch.setattr(fuse, "mounted_paths", lambda: {str(path / "rootfs")})
    monkeypatch.setattr(state.proc, "run", lambda argv, **kwargs: acted.append(
        [os.path.realpath(a) if a.startswith(str(path)) else a for a in argv]))
    real_read = state.read_json_object

    def swapping(name):  # info.json is read through the judged directory: then the swap
        info = real_read(name)
        if not os.path.islink(path):
            os.rename(path, path.with_name(dead + ".moved"))
            path.symlink_to(other)
        return info

    monkeypatch.setattr(state, "read_json_object", swapping)
    cleaned = state.cleanup_stale(state_dir, images=False)
    assert acted == [], "the clean-up acted by path on the directory a link swapped in names"
    assert cleaned == []
    assert (other / "runc" / dead).is_dir() and (state_dir / "containers" / (dead + ".moved") / "lock").exists()
    monkeypatch.setattr(state, "read_json_object", real_read)
    assert [c["id"] for c in state.cleanup_stale(state_dir, images=False)] == [dead + ".moved"]
    assert os.listdir(state_dir / "containers") == [] and (other / "runc" / dead).is_dir()
