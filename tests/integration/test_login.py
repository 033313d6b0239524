"""`berth login` / `berth logout` as the unprivileged user, against real registries."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from berth.registry.auth import load_credentials
from berth.registry.client import RegistryClient
from berth.registry.transport import RetryPolicy
from tests.harness.users import describe

pytestmark = pytest.mark.integration


@pytest.fixture
def login_env(user_tmp):
    """HOME and XDG_CONFIG_HOME of the test user inside a scratch directory."""
    return {"HOME": str(user_tmp), "XDG_CONFIG_HOME": str(user_tmp / "config")}


def auth_file(login_env):
    from pathlib import Path

    return Path(login_env["XDG_CONFIG_HOME"]) / "berth" / "auth.json"


def login(user, registry, login_env, password, *extra):
    return user.berth("login", "--username", registry.username, "--password-stdin", "--insecure", *extra,
                      registry.host, input=password + "\n", env=login_env)


@pytest.mark.parametrize("fixture", ["auth_registry", "token_registry"])
def test_login_validates_then_stores_credentials_privately(request, user, login_env, fixture, monkeypatch):
    registry = request.getfixturevalue(fixture)
    result = login(user, registry, login_env, registry.password)
    assert result.returncode == 0, describe(result)
    path = auth_file(login_env)
    assert result.stdout.strip() == f"Login Succeeded (credentials for {registry.host} saved in {path})"
    info = path.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (user.uid, 0o600)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stored = json.loads(path.read_text())["auths"][registry.host]["auth"]
    assert base64.b64decode(stored).decode() == f"{registry.username}:{registry.password}"
    # What login stored is what a later pull (the user's) uses: read as the user would (a file
    # another user owns is refused to anyone else, root included: docs/security.md).
    monkeypatch.setattr(os, "getuid", lambda: user.uid)
    credentials = load_credentials(login_env)
    monkeypatch.undo()
    with RegistryClient(registry.host, insecure=True, credentials=credentials, retry=RetryPolicy(attempts=1)) as client:
        client.ping()


@pytest.mark.parametrize("fixture", ["auth_registry", "token_registry"])
def test_login_with_wrong_password_stores_nothing(request, user, login_env, fixture):
    registry = request.getfixturevalue(fixture)
    result = login(user, registry, login_env, "not-the-password")
    assert result.returncode == 40, describe(result)
    assert "berth: error: " in result.stderr
    assert f"user '{registry.username}' from the command line were sent" in result.stderr
    assert not auth_file(login_env).exists()


def test_login_keeps_other_entries_and_logout_removes_only_its_own(user, auth_registry, login_env):
    path = auth_file(login_env)
    other = {"auth": base64.b64encode(b"someone:else").decode()}
    user.run(["mkdir", "-p", str(path.parent)], env=login_env, check=True)
    user.run(["sh", "-c", f"cat > {path}"], input=json.dumps({"auths": {"other.example": other}}),
             env=login_env, check=True)
    assert login(user, auth_registry, login_env, auth_registry.password).returncode == 0
    assert set(json.loads(path.read_text())["auths"]) == {"other.example", auth_registry.host}

    result = user.berth("logout", auth_registry.host, env=login_env)
    assert result.returncode == 0, describe(result)
    assert result.stdout.strip() == f"Removed login credentials for {auth_registry.host} from {path}"
    assert json.loads(path.read_text()) == {"auths": {"other.example": other}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    again = user.berth("logout", auth_registry.host, env=login_env)
    assert (again.returncode, again.stdout.strip()) == (0, f"Not logged in to {auth_registry.host}")


def test_password_on_the_command_line_works_with_a_warning(user, auth_registry, login_env):
    # --password=VALUE, not "-p VALUE": the harness's random password may start with '-', which
    # any argparse-style parser (docker's too) takes for an option when it stands alone.
    result = user.berth("login", "-u", auth_registry.username, f"--password={auth_registry.password}",
                        "--insecure", auth_registry.host, env=login_env)
    assert result.returncode == 0, describe(result)
    assert "warning: a password given with --password is visible to other users" in result.stderr


def test_no_password_without_a_terminal_is_a_usage_error(user, auth_registry, login_env):
    result = user.berth("login", "-u", auth_registry.username, "--insecure", auth_registry.host, env=login_env)
    assert result.returncode == 2, describe(result)
    assert "no password given and standard input is not a terminal" in result.stderr
    assert "--password-stdin" in result.stderr
    assert not auth_file(login_env).exists()


def test_password_stdin_needs_a_user_name(user, auth_registry, login_env):
    result = user.berth("login", "--password-stdin", "--insecure", auth_registry.host,
                        input="pw\n", env=login_env)
    assert result.returncode == 2, describe(result)
    assert "--password-stdin needs --username" in result.stderr


def test_login_to_an_unreachable_registry_explains(user, login_env):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{sock.getsockname()[1]}"
    result = user.berth("login", "-u", "x", "--password-stdin", host, input="pw\n", env=login_env)
    assert result.returncode == 42, describe(result)
    assert f"cannot reach registry {host}" in result.stderr
    assert "for a plain-HTTP registry set insecure" in result.stderr
    assert not auth_file(login_env).exists()


def test_logout_of_credentials_berth_does_not_own(user, auth_registry, login_env):
    docker_config = f"{login_env['HOME']}/.docker/config.json"
    entry = {"auths": {auth_registry.host: {"auth": base64.b64encode(b"u:p").decode()}}}
    user.run(["mkdir", "-p", f"{login_env['HOME']}/.docker"], env=login_env, check=True)
    user.run(["sh", "-c", f"cat > {docker_config}"], input=json.dumps(entry), env=login_env, check=True)
    result = user.berth("logout", auth_registry.host, env=login_env)
    assert result.returncode == 3, describe(result)
    assert f"they come from {docker_config}" in result.stderr
    assert "berth logout edits only its own file" in result.stderr
    assert json.loads(open(docker_config).read()) == entry


def test_a_root_owned_file_sudo_berth_login_left_is_passed_over_then_replaced_by_login(user, auth_registry,
                                                                                      login_env):
    """``sudo berth login`` (HOME and XDG_CONFIG_HOME kept) leaves root's 0600 auth.json in the
    user's configuration directory. Every command that read it failed ("cannot read registry
    credentials file"), public pulls too, and the EACCES path of a5036c0 did not cover it (the
    writers rule trusts root's files; review 11). Now it is passed over with the fix named,
    ``berth logout`` refuses to edit it, and ``berth login`` writes the file anew as the user's
    own, saying what it did not keep."""
    path = auth_file(login_env)
    user.run(["mkdir", "-p", str(path.parent)], env=login_env, check=True)
    path.write_text(json.dumps({"auths": {"planted.example": {"auth": base64.b64encode(b"root:pw").decode()}}}))
    os.chmod(path, 0o600)  # root's, as sudo left it
    why = "not readable by you (owned by uid 0, mode 0600)"

    logout = user.berth("logout", auth_registry.host, env=login_env)
    assert logout.returncode != 0 and f"registry credentials file {path} is {why}" in logout.stderr, describe(logout)

    result = login(user, auth_registry, login_env, auth_registry.password)
    assert result.returncode == 0, describe(result)
    assert (f"berth: warning: registry credentials file {path} was {why}: berth wrote it anew as your own "
            "(mode 0600) with this login only") in result.stderr, describe(result)
    info = path.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (user.uid, 0o600)
    assert set(json.loads(path.read_text())["auths"]) == {auth_registry.host}
