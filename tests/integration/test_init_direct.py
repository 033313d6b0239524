"""berth-init run directly as the unprivileged test user, outside any container.

Its exit status is the container's (README: 126 not executable, 127 not found, 125 berth's own
failure); these tests make berth-init's own steps fail for real and read what it returns.
"""

from __future__ import annotations

import pytest

from berth.runtime import ocirt


def _init(user, script: str):
    """``script`` run by sh in a user namespace of its own where ``user`` is root (so that the
    namespace's limits can be set), with $0 berth-init."""
    return user.run(["unshare", "--user", "--map-root-user", "/bin/sh", "-c", script, ocirt.init_path()], timeout=60)


def test_a_refused_identity_switch_is_berth_inits_failure_not_a_missing_command(user):
    """berth-init's own failures (here the nested user namespace, refused by the kernel's limit)
    exited 127, which is "command not found": a job script saw its program as missing."""
    result = _init(user, 'echo 0 > /proc/sys/user/max_user_namespaces && "$0" -u 0 -g 0 -- /bin/true; echo "status $?"')
    assert result.stdout.splitlines()[-1:] == ["status 125"], (result.stdout, result.stderr)
    assert "berth-init: unshare(CLONE_NEWUSER): No space left on device" in result.stderr, result.stderr
    found = _init(user, '"$0" -u 0 -g 0 -- /no/such/program; echo "status $?"')
    assert found.stdout.splitlines()[-1:] == ["status 127"], (found.stdout, found.stderr)


@pytest.mark.parametrize("uid", ["x", "1x", "-1", "4294967295", "4294967296"])
def test_an_id_that_is_not_a_uid_is_refused_not_read_as_another(user, uid):
    """-u and -g were read with strtol and no check: "x" became 0 (root in the nested
    namespace), "1x" became 1, and 2^32 wrapped."""
    result = _init(user, f'"$0" -u {uid} -g 0 -- /bin/true; echo "status $?"')
    assert result.stdout.splitlines()[-1:] == ["status 125"], (result.stdout, result.stderr)
    assert f"-u and -g want a number from 0 to 4294967294, not '{uid}'" in result.stderr, result.stderr


def test_signals_the_caller_ignores_stay_ignored_for_the_command(user):
    """berth-init catches every signal itself (so that none reaching it as a pid namespace's init
    is dropped before it blocks them), and gives the command the dispositions it was started with:
    under nohup, SIGHUP stays ignored."""
    result = _init(user, "trap '' HUP; exec \"$0\" -- /bin/grep SigIgn /proc/self/status")
    assert result.returncode == 0, result.stderr
    ignored = int(result.stdout.split()[1], 16)
    assert ignored & (1 << (1 - 1)), result.stdout  # SIGHUP is 1
