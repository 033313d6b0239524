"""berth.runtime.pmix: which PMIx directories a host-launched rank gets mounted."""

from __future__ import annotations

import os

import pytest

from berth.config.settings import Settings, SitePolicy
from berth.errors import PolicyError
from berth.runtime.pmix import pmix_mounts


def _mounts(env, settings=None, uid=None):
    notes = []
    mounts = pmix_mounts(env, settings or Settings(), os.getuid() if uid is None else uid,
                         lambda message, debug=False: notes.append((message, debug)))
    return mounts, notes


def test_server_dir_mounted_at_same_path_and_nested_store_not_twice(tmp_path):
    server = tmp_path / "spool" / "pmix.7.0"
    (server / "pmix_dstor_ds21_1").mkdir(parents=True)
    (server / "pmix_dstor_ds12_1").mkdir()
    env = {"PMIX_SERVER_TMPDIR": f"{server}/", "PMIX_DSTORE_21_BASE_PATH": f"{server}//pmix_dstor_ds21_1",
           "PMIX_DSTORE_ESH_BASE_PATH": f"{server}/pmix_dstor_ds12_1", "PATH": "/bin"}
    mounts, _ = _mounts(env)
    assert [(m.source, m.destination, m.read_only) for m in mounts] == [(str(server), str(server), False)]


def test_separate_store_dir_mounted_too_through_its_link(tmp_path):
    server, store = tmp_path / "server", tmp_path / "store"
    server.mkdir()
    store.mkdir()
    (tmp_path / "link").symlink_to(store)
    mounts, _ = _mounts({"PMIX_SERVER_TMPDIR": str(server), "PMIX_DSTORE_21_BASE_PATH": str(tmp_path / "link")})
    assert sorted(m.source for m in mounts) == sorted([str(server), str(store)])


def test_nothing_without_pmix_and_missing_or_relative_paths_skipped(tmp_path):
    assert _mounts({"PATH": "/bin"}) == ([], [])
    mounts, notes = _mounts({"PMIX_SERVER_TMPDIR": str(tmp_path / "gone"), "PMIX_DSTORE_21_BASE_PATH": "rel"})
    assert mounts == []
    assert [debug for _, debug in notes] == [True, True]
    assert "missing on this node" in notes[0][0] and "not an absolute path" in notes[1][0]


def test_directory_of_another_user_is_not_mounted(tmp_path):
    mounts, notes = _mounts({"PMIX_SERVER_TMPDIR": str(tmp_path)}, uid=os.getuid() + 1)
    assert mounts == []
    assert notes and "not by you" in notes[0][0] and notes[0][1] is False


def test_denied_source_refused(tmp_path):
    settings = Settings(policy=SitePolicy(mount_deny_sources=(str(tmp_path),)))
    (tmp_path / "pmix").mkdir()
    with pytest.raises(PolicyError, match="site policy does not allow"):
        _mounts({"PMIX_SERVER_TMPDIR": str(tmp_path / "pmix")}, settings)


def test_host_launched_rank_gets_shared_memory_transport_off_unless_chosen():
    from berth.config.settings import EnvOp
    from berth.runtime.pmix import rank_env_ops

    rank = {"PMIX_RANK": "0", "PMIX_NAMESPACE": "slurm.pmix.7.0"}
    assert rank_env_ops(rank, ["PATH=/bin"]) == [EnvOp("set", "OMPI_MCA_btl", "^vader")]
    assert rank_env_ops({**rank, "OMPI_MCA_btl": "self,tcp"}, []) == []
    assert rank_env_ops(rank, ["OMPI_MCA_btl=self,ofi"]) == []
    assert rank_env_ops({"PATH": "/bin"}, []) == []
