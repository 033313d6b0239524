"""Failures of the operating system reach the user as messages with a hint, never a traceback."""

from __future__ import annotations

import pytest

from tests.harness.users import berth_executable, describe

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("argv", [["config", "show"], ["images"]])
def test_output_to_a_full_disk_is_a_message(user, user_tmp, argv):
    # /dev/full answers every write with ENOSPC: `config show` fills the stdout buffer while the
    # handler runs, `images` (one header line) only when it is flushed
    env = {"BERTH_USER_STORE": str(user_tmp / "store"), "BERTH_SITE_STORE": str(user_tmp / "site")}
    result = user.run(["/bin/sh", "-c", f'exec "$0" "$@" > /dev/full', str(berth_executable()), *argv], env=env)
    assert result.returncode == 74, describe(result)
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, describe(result)
    assert result.stderr.startswith("berth: error: no space left on device\nberth: hint: free space"), describe(result)
