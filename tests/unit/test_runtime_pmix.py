"""berth.runtime.pmix: which PMIx directories a host-launched rank gets mounted."""

from __future__ import annotations

import os
import subprocess

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
    nolocal = EnvOp("set", "MPIR_CVAR_NOLOCAL", "1")
    assert rank_env_ops(rank, ["PATH=/bin"]) == [EnvOp("set", "OMPI_MCA_btl", "^vader"), nolocal]
    assert rank_env_ops({**rank, "OMPI_MCA_btl": "self,tcp"}, []) == [nolocal]
    assert rank_env_ops(rank, ["OMPI_MCA_btl=self,ofi", "MPIR_CVAR_NOLOCAL=0"]) == []
    assert rank_env_ops({"PATH": "/bin"}, []) == []


def test_pmi2_rank_of_its_own_container_keeps_mpich_off_node_shared_memory():
    """Issue 13: MPICH (Slurm's PMI-2) aborts MPI_Init with "unable to allocate shared memory"
    when two ranks of a node are in containers of their own (no common /dev/shm)."""
    from berth.config.settings import EnvOp
    from berth.runtime.pmix import rank_env_ops

    rank = {"PMI_RANK": "3", "PMI_FD": "11"}
    assert rank_env_ops(rank, []) == [EnvOp("set", "MPIR_CVAR_NOLOCAL", "1")]
    assert rank_env_ops({**rank, "MPIR_CVAR_NOLOCAL": "0"}, []) == []
    assert rank_env_ops(rank, [], "node") == []


def test_pmi_socket_is_passed_only_when_it_is_an_open_socket(tmp_path):
    import socket

    from berth.config.settings import EnvOp
    from berth.runtime.pmix import pmi_env_ops, pmi_fd

    left, right = socket.socketpair()
    plain = open(tmp_path / "file", "w")
    try:
        assert pmi_fd({"PMI_FD": str(left.fileno())}) == left.fileno()
        assert pmi_env_ops({"PMI_FD": str(left.fileno())}) == [EnvOp("set", "PMI_FD", "3")]
        for value in (str(plain.fileno()), "999", "1", "-4", "x", "", "٣"):
            assert pmi_fd({"PMI_FD": value}) is None, value
        assert pmi_fd({}) is None and pmi_env_ops({}) == []
    finally:
        left.close(), right.close(), plain.close()


def test_node_scoped_rank_keeps_shared_memory_without_single_copy_unless_chosen():
    """Issue 13: ranks in one node container keep vader, but CMA between them is refused (each
    rank's own nested user namespace; the image's binaries are owned by an unmapped id)."""
    from berth.config.settings import EnvOp
    from berth.runtime.pmix import rank_env_ops

    rank = {"PMIX_RANK": "1"}
    mechanism = "OMPI_MCA_btl_vader_single_copy_mechanism"
    assert rank_env_ops(rank, [], "node") == [EnvOp("set", mechanism, "none")]
    assert rank_env_ops({**rank, "OMPI_MCA_btl": "self,vader"}, [], "node") == [EnvOp("set", mechanism, "none")]
    assert rank_env_ops({**rank, mechanism: "cma"}, [], "node") == []
    assert rank_env_ops(rank, [f"{mechanism}=xpmem"], "node") == []
    assert rank_env_ops({}, [], "node") == []


def _slurm_step(tmp_path, tmpfs_line="TmpFS={root}/%n"):
    """A slurm.conf and a node's TmpFS holding this step's client directory and decoys."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=c  # comment TmpFS=/wrong\nNodeName=node1 CPUs=2\n"
                    f"{tmpfs_line.format(root=tmp_path / 'local')}\n")
    node = tmp_path / "local" / "node1"
    uid = os.getuid()
    for name in (f"spmix_appdir_{uid}_77.3", f"spmix_appdir_{uid}_77.4", f"spmix_appdir_{uid + 1}_78.0"):
        (node / name).mkdir(parents=True)
    env = {"PMIX_NAMESPACE": "slurm.pmix.77.3", "PMIX_RANK": "0", "SLURM_CONF": str(conf),
           "SLURMD_NODENAME": "node1"}
    return env, node


def test_slurm_client_directory_of_this_step_only_is_mounted(tmp_path):
    """Issue 13: Slurm's pmix plugin puts spmix_appdir_UID_JOB.STEP under TmpFS, named by no
    variable; only this step's (not TmpFS, other steps', other users') is mounted."""
    env, node = _slurm_step(tmp_path)
    mounts, _ = _mounts(env)
    mine = str(node / f"spmix_appdir_{os.getuid()}_77.3")
    assert [(m.source, m.destination, m.read_only) for m in mounts] == [(mine, mine, False)]


def test_slurm_client_directory_old_name_and_SLURM_PMIX_TMPDIR(tmp_path):
    base = tmp_path / "pmixtmp"
    (base / "spmix_appdir_77.3").mkdir(parents=True)
    mounts, _ = _mounts({"PMIX_NAMESPACE": "slurm.pmix.77.3", "SLURM_PMIX_TMPDIR": str(base),
                         "SLURM_CONF": str(tmp_path / "missing.conf")})
    assert [m.source for m in mounts] == [str(base / "spmix_appdir_77.3")]


@pytest.mark.parametrize("namespace", ["", "prterun-vm-1@1", "slurm.pmix.77", "slurm.pmix.77.x",
                                       "xslurm.pmix.77.3", "slurm.pmix.7\u0667.3"])
def test_no_slurm_client_directory_outside_a_slurm_pmix_step(tmp_path, namespace):
    env, _ = _slurm_step(tmp_path)
    mounts, _ = _mounts({**env, "PMIX_NAMESPACE": namespace})
    assert mounts == []


def test_slurm_tmpfs_expansion_and_defaults(tmp_path):
    from berth.runtime.pmix import slurm_tmpfs

    conf = tmp_path / "slurm.conf"
    conf.write_text("tmpfs=/scratch/%h/%n\n")
    env = {"SLURM_CONF": str(conf), "SLURMD_NODENAME": "n7"}
    assert slurm_tmpfs(env, nodename="host1") == "/scratch/host1/n7"
    assert slurm_tmpfs({"SLURM_CONF": str(conf)}) is None  # %n without SLURMD_NODENAME
    conf.write_text("ClusterName=c\n")
    assert slurm_tmpfs(env) == "/tmp"  # Slurm's default
    assert slurm_tmpfs({"SLURM_CONF": str(tmp_path / "missing")}) is None


def test_a_descriptor_is_moved_to_fd_3_for_the_child_only(tmp_path):
    """proc.start(move_fds={3: fd}): the child gets the socket as fd 3 (runc --preserve-fds 1
    passes only 3, 4, ...), and whatever berth had at fd 3 is back afterwards."""
    import socket
    import sys

    from berth import proc

    left, right = socket.socketpair()
    mine = os.open(tmp_path, os.O_RDONLY)  # berth's own descriptor, maybe at 3
    before = os.stat(3) if _is_open(3) else None
    try:
        child = proc.start([sys.executable, "-c", "import os, stat; print(stat.S_ISSOCK(os.fstat(3).st_mode)); "
                            "os.write(3, b'x')"], stdout=subprocess.PIPE, move_fds={3: left.fileno()})
        output, _ = child.communicate(timeout=30)
        assert child.returncode == 0 and output.strip() == b"True"
        assert right.recv(1) == b"x"
        after = os.stat(3) if _is_open(3) else None
        assert (before and (before.st_dev, before.st_ino)) == (after and (after.st_dev, after.st_ino))
    finally:
        os.close(mine)
        left.close()
        right.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
