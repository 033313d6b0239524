"""Environment composition order and identity files (pure functions)."""

import pytest

from berth.config.settings import EnvOp
from berth.errors import RuntimeFailure, UsageError
from berth.runtime.env import check_image_env, compose_env, read_env_file
from berth.runtime.identity import Caller, group_text, passwd_text

ALICE = Caller("alice", 1001, 1001, "alice", "/home/alice", "/bin/bash", "Alice A")


def as_dict(entries):
    return dict(entry.partition("=")[::2] for entry in entries)


def test_order_image_then_passthrough_then_identity_then_site_then_user():
    env = as_dict(compose_env(
        ["PATH=/img/bin", "A=image", "HOME=/root", "B=image"],
        host_env={"SLURM_JOB_ID": "7", "SECRET": "leak", "A": "host", "OMPI_MCA_x": "y"},
        passthrough=("SLURM_*", "OMPI_*"),
        identity={"HOME": "/home/alice", "USER": "alice", "LOGNAME": "alice"},
        site_ops=[EnvOp("prepend", "PATH", "/site/bin"), EnvOp("set", "B", "site"), EnvOp("unset", "A"),
                  EnvOp("append", "LIST", "x", ",")],
        user_entries=["B=user", "SLURM_JOB_ID", "NEW=1"],
    ))
    assert env["PATH"] == "/site/bin:/img/bin"
    assert "A" not in env and env["B"] == "user" and env["NEW"] == "1"
    assert env["HOME"] == "/home/alice" and env["SLURM_JOB_ID"] == "7" and env["OMPI_MCA_x"] == "y"
    assert "SECRET" not in env and env["LIST"] == "x"


def test_default_path_and_term():
    env = as_dict(compose_env([], host_env={}, passthrough=(), identity={}, tty=True))
    assert env["PATH"].startswith("/usr/local/sbin:") and env["TERM"] == "xterm"
    assert "TERM" not in as_dict(compose_env([], host_env={}, passthrough=(), identity={}))


def test_user_key_without_value_takes_host_value_only_when_set():
    env = as_dict(compose_env([], host_env={"X": "1"}, passthrough=(), identity={}, user_entries=["X", "Y"]))
    assert env["X"] == "1" and "Y" not in env


@pytest.mark.parametrize("env,message", [
    (["A" * 10 + "=" + "x" * 200_000], "bytes"),
    ([f"V{i}=" + "x" * 100_000 for i in range(12)], "totals"),
    ([f"V{i}=1" for i in range(5000)], "entries"),
    (["NOEQUALS"], "KEY=VALUE"),
    (["=value"], "KEY=VALUE"),
    ("A=1", "not a list"),
])
def test_hostile_image_env_is_refused(env, message):
    with pytest.raises(RuntimeFailure, match=message):
        check_image_env(env, "evil:1")


def test_env_file(tmp_path):
    path = tmp_path / "env"
    path.write_text("# comment\n\nA=1\nB=two words\n")
    assert read_env_file(str(path)) == ["A=1", "B=two words"]
    path.write_text("1A=bad\n")
    with pytest.raises(Exception, match="line 1"):
        read_env_file(str(path))


@pytest.mark.parametrize("line", ["export TOKEN=s3cr3t-value", "s3cr3t-value", "TOKEN s3cr3t-value"])
def test_a_bad_env_file_line_is_refused_without_quoting_it(tmp_path, line):
    """People put secrets in an --env-file to keep them off the command line: a malformed line
    is refused naming the file and line, never quoting the line (errors reach job logs)."""
    path = tmp_path / "env"
    path.write_text(f"A=1\n{line}\n")
    with pytest.raises(UsageError) as refused:
        read_env_file(str(path))
    text = f"{refused.value.message} {refused.value.hint}"
    assert f"--env-file {path} line 2" in text and "s3cr3t" not in text


def test_passwd_replaces_impostor_entries_and_adds_caller():
    image = ("root:x:0:0:root:/root:/bin/sh\nalice:x:5:5::/nowhere:/bin/false\n"
             "bob:x:1001:9::/b:/bin/sh\ncarol:x:7:7::/c:/bin/sh\n")
    text = passwd_text(image, ALICE, as_root=False, shell_exists=lambda path: path == "/bin/bash")
    lines = text.splitlines()
    assert lines[-1] == "alice:x:1001:1001:Alice A:/home/alice:/bin/bash"
    assert "root:x:0:0:root:/root:/bin/sh" in lines and "carol:x:7:7::/c:/bin/sh" in lines
    assert not any(line.startswith(("alice:x:5", "bob:")) for line in lines)


def test_passwd_falls_back_to_sh_and_handles_missing_file():
    text = passwd_text("", ALICE, as_root=False, shell_exists=lambda path: False)
    assert text == "alice:x:1001:1001:Alice A:/home/alice:/bin/sh\n"


def test_remap_root_keeps_image_root():
    assert passwd_text("", ALICE, as_root=True, shell_exists=bool).splitlines() == ["root:x:0:0:root:/root:/bin/sh"]
    assert group_text("wheel:x:10:\n", ALICE, as_root=True).splitlines() == ["root:x:0:", "wheel:x:10:"]


def test_group_gets_callers_primary_group():
    text = group_text("root:x:0:\nalice:x:3:\nstaff:x:1001:\nusers:x:100:\n", ALICE, as_root=False)
    assert text.splitlines() == ["root:x:0:", "users:x:100:", "alice:x:1001:alice"]


def test_glob_matcher_matches_exactly_what_fnmatchcase_does():
    """Issue 10 (start-up): the passthrough test skips fnmatch for exact names and PREFIX*
    patterns; every kind of pattern must still mean what fnmatch says."""
    import fnmatch

    from berth.config.settings import SitePolicy
    from berth.runtime.env import glob_matcher

    patterns = (*SitePolicy().passthrough_env, "A*B", "?X", "[PQ]*", "EXACT", "ST*R*", "", "*", "BR[*")
    names = ("SLURM_JOB_ID", "SLURM", "SLURMD_NODENAME", "slurm_x", "TERM", "TERMINAL", "LC_ALL", "LANG",
             "LANGUAGE", "AXB", "AB", "ABC", "QX", "XX", "X", "P1", "R1", "EXACT", "EXACTLY", "STAR", "STR",
             "", "BR[", "BR[X", "CUDA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES_X", "PMI_FD", "HOME")
    for chosen in (patterns, patterns[:20], ("*",), (), ("EXACT",), ("[PQ]*", "TERM")):
        matches = glob_matcher(chosen)
        for name in names:
            assert matches(name) == any(fnmatch.fnmatchcase(name, p) for p in chosen), (chosen, name)
