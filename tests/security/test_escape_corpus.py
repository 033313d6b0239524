"""Escape attempts of issue 8 (scenario 9) not covered elsewhere in tests/security, run as the
unprivileged test user in real containers: device nodes, /proc and /sys writes that would reach
the host kernel, chroot/pivot_root/unshare games, and a hostile LD_PRELOAD in berth's own
environment (nothing berth runs with privilege may load it). Each attempt must be refused or
contained; the host side is checked where that is what matters.

docs/reliability.md lists every attempt of tests/security with its outcome.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.fixtures_runtime import BOTH_RUNTIMES
from tests.harness.users import describe

pytestmark = pytest.mark.security

#: (name, shell command run in the container, text that would prove the escape)
ATTEMPTS = [
    ("mknod a memory device", "mknod /tmp/mem c 1 1 2>/dev/null && echo ESCAPED", "ESCAPED"),
    ("mknod a block device", "mknod /tmp/sda b 8 0 2>/dev/null && echo ESCAPED", "ESCAPED"),
    ("write /proc/sysrq-trigger", "echo h > /proc/sysrq-trigger 2>/dev/null && echo ESCAPED", "ESCAPED"),
    ("write /proc/sys/kernel/core_pattern",
     "echo '|/tmp/x' > /proc/sys/kernel/core_pattern 2>/dev/null && echo ESCAPED", "ESCAPED"),
    ("write /proc/sys/vm/drop_caches", "echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo ESCAPED", "ESCAPED"),
    ("read /proc/kcore", "head -c 16 /proc/kcore >/dev/null 2>&1 && echo ESCAPED", "ESCAPED"),
    ("write /sys/kernel/uevent_helper",
     "echo /tmp/x > /sys/kernel/uevent_helper 2>/dev/null && echo ESCAPED", "ESCAPED"),
    ("mount a cgroup v1 hierarchy (release_agent escape)",
     "mkdir -p /tmp/cg && mount -t cgroup -o rdma cgroup /tmp/cg 2>/dev/null && echo ESCAPED", "ESCAPED"),
    ("chroot", "chroot / true 2>/dev/null && echo ESCAPED", "ESCAPED"),
    ("pivot_root", "mkdir -p /tmp/new/old && pivot_root /tmp/new /tmp/new/old 2>/dev/null && echo ESCAPED",
     "ESCAPED"),
    ("setns into the host's namespaces through /proc/1",
     "nsenter -t 1 -m -u -i -n -p true 2>/dev/null && [ \"$(readlink /proc/1/exe)\" != /dev/.berth-init ] "
     "&& echo ESCAPED", "ESCAPED"),
    ("kill a host process by pid", "kill -0 $(( $(cat /proc/sys/kernel/pid_max) - 1 )) 2>/dev/null && echo ESCAPED; "
     "kill -9 -1 2>/dev/null; echo done", "ESCAPED"),
    ("raise the hard open-files limit", "ulimit -H -n 99999999 2>/dev/null && echo ESCAPED", "ESCAPED"),
]


@pytest.mark.parametrize("name, command, proof", ATTEMPTS, ids=[a[0] for a in ATTEMPTS])
def test_escape_attempt_is_refused(runtime_env, runtime_images, name, command, proof):
    result = runtime_env.berth("run", str(runtime_images.setuid), "sh", "-c", command)
    assert proof not in result.stdout, f"{name}: {describe(result)}"
    assert "Traceback" not in result.stderr, describe(result)


EVIL_SO = r"""
#include <stdio.h>
#include <unistd.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *dir = getenv("BERTH_EVIL_DIR");
    if (!dir) return;
    char path[4096];
    snprintf(path, sizeof path, "%s/loaded-euid-%d-pid-%d", dir, (int)geteuid(), (int)getpid());
    FILE *f = fopen(path, "w");
    if (f) fclose(f);
}
"""


def test_hostile_ld_preload_in_berths_environment_gets_no_privilege(runtime_env, runtime_images, user):
    """A user (or a hostile job environment) sets LD_PRELOAD for berth: whatever berth starts may
    load it as that user, but nothing runs it with another identity (the setuid fusermount3 and
    anything else berth execs ignore it or run as the user)."""
    build = runtime_env.scratch / "evil"
    build.mkdir()
    (build / "evil.c").write_text(EVIL_SO)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(build / "evil.so"), str(build / "evil.c")], check=True,
                   capture_output=True)
    os.chmod(build, 0o755)
    os.chmod(build / "evil.so", 0o755)
    markers = runtime_env.scratch / "markers"
    markers.mkdir()
    os.chown(markers, user.uid, user.gid)
    os.chmod(markers, 0o777)  # so that a privileged process could write there, if one loaded it
    result = runtime_env.berth("run", "--writable", str(runtime_images.busybox), "true",
                               env={"LD_PRELOAD": str(build / "evil.so"), "BERTH_EVIL_DIR": str(markers)})
    assert result.returncode == 0, describe(result)
    loaded = sorted(p.name for p in markers.iterdir())
    assert loaded, "the library was never loaded: the test proves nothing"
    assert all(name.startswith(f"loaded-euid-{user.uid}-") for name in loaded), loaded


def test_hostile_ld_so_preload_in_the_image_does_not_stop_or_hijack_berth_init(runtime_env, user):
    """An image's /etc/ld.so.preload and LD_* in its config reach only dynamic programs of the
    image; berth-init is static and the container still starts, as the user."""
    from tests.harness.fixtures_runtime import _busybox_rootfs, _mksquashfs

    root = runtime_env.scratch / "root"
    _busybox_rootfs(root)
    (root / "etc" / "ld.so.preload").write_text("/lib/evil-does-not-exist.so\n")
    image = _mksquashfs(root, runtime_env.scratch / "preload.sqfs")
    result = runtime_env.berth("run", "--env", "LD_PRELOAD=/lib/evil.so", "--env", "LD_LIBRARY_PATH=/tmp",
                               str(image), "id", "-u")
    assert result.returncode == 0, describe(result)
    assert result.stdout.strip() == str(user.uid)


KEYRING_ATTEMPTS = ("session keyring", "user keyring", "link host keyring", "read host key", "link host key",
                    "request_key", "join the host's named session keyring", "add_key in the container")


def test_keyring_syscalls_do_not_reach_the_host_users_keys(runtime_env, runtime_images, user):
    """The kernel keyring is not namespaced by uid: before berth's seccomp filter, a container
    linked the host user's user keyring (KEY_USR_ALL for the same kuid) and its named session
    keyring into its own session keyring and then read every secret in them; request_key found
    them too. The host side (tests/security/programs/keyprobe.c, as the test user) makes a named
    session keyring with a secret, puts another in the user keyring and runs berth; inside, the
    same program tries add_key/keyctl/request_key on them (their serials given, as if guessed)."""
    build = runtime_env.scratch / "keyprobe"
    build.mkdir()
    source = Path(__file__).parent / "programs" / "keyprobe.c"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(build / "keyprobe"), str(source)], check=True,
                   capture_output=True)
    os.chmod(build, 0o755)
    os.chmod(build / "keyprobe", 0o755)
    result = runtime_env.user.run(
        [str(build / "keyprobe"), "host", "sh", "-c",
         f'exec berth run -v {build}:/probe:ro {runtime_images.busybox} /probe/keyprobe $BERTH_HOST_KEYS'],
        env=runtime_env.env())
    assert result.returncode == 0, describe(result)
    assert "host session=" in result.stdout, describe(result)  # the host side made its keys
    for attempt in KEYRING_ATTEMPTS:  # every attempt ran (and said how it ended)
        assert attempt in result.stdout, describe(result)
    assert "ESCAPED" not in result.stdout, describe(result)
    assert "host after: container key in session absent, in user keyring absent" in result.stdout, describe(result)


@BOTH_RUNTIMES
def test_keyring_calls_are_refused_through_the_x32_and_i386_entries_too(runtime_env, runtime_images):
    """The keyring rule lists each call's number for every ABI the machine runs: a 64-bit
    program can still enter the kernel the i386 way (int $0x80, other numbers) or the x32 way,
    and a filter that knew only the native numbers let those through (both runtimes)."""
    if os.uname().machine != "x86_64":
        pytest.skip("the probe is x86_64 assembly (aarch64's arm32 entry is not probed)")
    build = runtime_env.scratch / "keyabi"
    build.mkdir(mode=0o755)
    source = Path(__file__).parent / "programs" / "keyabi.c"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(build / "keyabi"), str(source)], check=True,
                   capture_output=True)
    os.chmod(build / "keyabi", 0o755)
    host = dict(line.split() for line in runtime_env.user.run([str(build / "keyabi")]).stdout.splitlines())
    if int(host["i386-getpid"]) <= 0 or int(host["i386-keyctl"]) < 0:
        pytest.skip(f"this kernel has no working i386 entry for the test user: {host}")
    result = runtime_env.berth("run", "-v", f"{build}:/probe:ro", str(runtime_images.busybox), "/probe/keyabi")
    assert result.returncode == 0, describe(result)
    inside = dict(line.split() for line in result.stdout.splitlines())
    assert int(inside["i386-getpid"]) > 0, inside  # the entry works inside: only the keyring calls fail
    eperm = "-1"
    assert {name: value for name, value in inside.items() if name != "i386-getpid"} == {
        "native-keyctl": eperm, "x32-keyctl": eperm, "i386-keyctl": eperm, "i386-add_key": eperm,
        "i386-request_key": eperm}, inside
