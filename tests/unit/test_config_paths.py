"""berth.config.settings: the one owner of home and XDG paths (issue 9) and the trust placed
in XDG_RUNTIME_DIR (defect 2: exported from a login node, missing or foreign on a compute node)."""

import os
import pwd
from pathlib import Path

import pytest

from berth.config import settings as paths
from berth.config.load import user_config_file
from berth.registry.auth import berth_auth_file, docker_config_file


def test_home_is_home_when_absolute_else_the_passwd_entry():
    passwd_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert paths.home_directory({"HOME": "/proj/alice"}) == Path("/proj/alice")
    assert paths.home_directory({}) == passwd_home
    assert paths.home_directory({"HOME": "relative/dir"}) == passwd_home


def test_xdg_variables_win_when_absolute_and_are_ignored_when_relative_or_empty():
    env = {"HOME": "/h", "XDG_CONFIG_HOME": "/xdg/config", "XDG_DATA_HOME": "rel", "XDG_STATE_HOME": ""}
    assert paths.xdg_directory("config", env) == Path("/xdg/config")
    assert paths.xdg_directory("data", env) == Path("/h/.local/share")
    assert paths.xdg_directory("state", env) == Path("/h/.local/state")
    assert paths.xdg_directory("cache", env) == Path("/h/.cache")


def test_every_per_user_file_follows_the_same_home():
    env = {"HOME": "/proj/alice"}
    assert user_config_file(env) == Path("/proj/alice/.config/berth/berth.toml")
    assert berth_auth_file(env) == Path("/proj/alice/.config/berth/auth.json")
    assert docker_config_file(env) == Path("/proj/alice/.docker/config.json")
    defaults = paths.default_paths({**env, "XDG_RUNTIME_DIR": "/nonexistent/run/user/1"})
    assert defaults["user_store"] == Path("/proj/alice/.local/share/berth")
    assert defaults["jobs_dir"] == Path("/proj/alice/.local/state/berth/jobs")


def test_runtime_dir_is_used_only_when_it_is_a_private_directory_of_ours(tmp_path):
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    runtime.chmod(0o700)
    assert paths.default_paths({"XDG_RUNTIME_DIR": str(runtime)})["state_dir"] == runtime / "berth"
    fallback = Path(f"/tmp/berth-{os.getuid()}")
    # Missing on this node (exported from a login node by Slurm).
    assert paths.default_paths({"XDG_RUNTIME_DIR": str(tmp_path / "missing")})["state_dir"] == fallback
    # Open to others: not a runtime directory as the XDG spec defines it.
    runtime.chmod(0o755)
    assert paths.runtime_directory({"XDG_RUNTIME_DIR": str(runtime)}) is None
    runtime.chmod(0o700)
    # A link, even to a good directory.
    (tmp_path / "link").symlink_to(runtime)
    assert paths.runtime_directory({"XDG_RUNTIME_DIR": str(tmp_path / "link")}) is None
    assert paths.runtime_directory({"XDG_RUNTIME_DIR": "relative"}) is None
    assert paths.default_paths({})["state_dir"] == fallback


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a directory of someone else's")
def test_a_runtime_dir_of_someone_else_is_not_used(tmp_path):
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 65534, 65534)
    assert paths.runtime_directory({"XDG_RUNTIME_DIR": str(runtime)}) is None
