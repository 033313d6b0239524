"""Shared fixtures. Servers and images have their own modules under tests/harness/."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.harness.users import User, berth_executable

# Each area's fixtures live in its own module so that parallel work does not collide here.
pytest_plugins = [
    "tests.harness.fixtures_registry",
    "tests.harness.fixtures_images",
    "tests.harness.fixtures_runtime",
    "tests.harness.fixtures_config",
    "tests.harness.fixtures_slurm",
    "tests.harness.fixtures_s3",
    "tests.harness.fixtures_reliability",
]

TEST_USER = os.environ.get("BERTH_TEST_USER", "berthtest")


def pytest_configure(config):
    """Give the processes the tests start the default SIGINT and SIGQUIT, whatever this run
    inherited. A shell without job control starts a background command (`... &`) with both
    ignored, the ignore survives exec, and berth rightly keeps a signal it was started
    ignoring (as nohup expects): the signal tests then failed only in such runs."""
    del config
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def user() -> User:
    """The unprivileged user berth is tested as (created by scripts/install-system-packages.sh)."""
    try:
        found = User.lookup(TEST_USER)
    except KeyError:
        if os.getuid() != 0:
            pytest.skip(f"test user {TEST_USER} does not exist; run scripts/install-system-packages.sh")
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", TEST_USER], check=True)
        found = User.lookup(TEST_USER)
    if not berth_executable().exists():
        pytest.fail(f"{berth_executable()} is missing: run scripts/setup-venv.sh (scripts/test.sh does)")
    return found


OTHER_TEST_USER = os.environ.get("BERTH_TEST_OTHER_USER", "berthtest2")


@pytest.fixture(scope="session")
def other_user(user) -> User:
    """A second unprivileged user, for multi-user tests: it must not read, lock, squat or
    redirect anything that belongs to ``user`` (created by scripts/install-system-packages.sh)."""
    try:
        return User.lookup(OTHER_TEST_USER)
    except KeyError:
        if os.getuid() != 0:
            pytest.skip(f"second test user {OTHER_TEST_USER} does not exist; run scripts/install-system-packages.sh")
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", OTHER_TEST_USER], check=True)
        return User.lookup(OTHER_TEST_USER)


@pytest.fixture
def user_tmp(user):
    """A scratch directory owned by the test user, removed afterwards."""
    path = user.tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under scripts/test.sh (BERTH_REQUIRE_ALL=1, as in CI) every real component is installed,
    so a skipped test means a missing install step or a broken fixture: report it as a failure
    instead of letting a real-component test silently not run."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("BERTH_REQUIRE_ALL") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under BERTH_REQUIRE_ALL=1 (scripts/test.sh, CI): {reason}"
