"""pytest fixtures: runtime (see docs/contracts.md).

Images for container tests are SquashFS files built here from busybox-static (mksquashfs
-all-root, as berth's own converter gives: files owned by root, read-only for the user), so the
runtime tests do not depend on a registry. ``berth run PATH.sqfs`` runs such a file directly;
tests that go through the store use the registry fixtures instead.

``runtime_env`` gives each test its own BERTH_STATE_DIR and, after the test, checks the leak
rules of issue 3: no FUSE mount under that state directory, no process of the test user whose
command line names it, no container directory left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.users import User

BUSYBOX = "/bin/busybox"
APPLETS = (
    "sh", "id", "ls", "cat", "echo", "sleep", "true", "false", "env", "pwd", "touch", "mkdir", "ps",
    "kill", "stat", "mount", "umount", "whoami", "hostname", "grep", "wc", "head", "readlink", "test",
    "tr", "rm", "ln", "ip", "cut", "chmod", "nsenter", "unshare", "dd",
)

#: A tiny static program that reports its real and effective uid and tries to become root.
SETUID_PROBE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/ptrace.h>
int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "ptrace") == 0) {
        long result = ptrace(PTRACE_ATTACH, atoi(argv[2]), 0, 0);
        printf("ptrace=%ld\n", result);
        return 0;
    }
    printf("ruid=%d euid=%d\n", (int)getuid(), (int)geteuid());
    printf("setuid0=%d\n", setuid(0));
    printf("shadow=%d\n", open("/host-etc/shadow", O_RDONLY));
    return 0;
}
"""

def _busybox_rootfs(root: Path, *, with_etc: bool = True, with_dirs: bool = True) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    if with_dirs:
        for name in ("proc", "sys", "dev", "tmp", "home", "root", "etc", "work", "data"):
            (root / name).mkdir(exist_ok=True)
        os.chmod(root / "tmp", 0o1777)
    if with_etc:
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
            "berthtest:x:4242:4242:impostor:/nowhere:/bin/false\n")
        (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")


def _mksquashfs(root: Path, output: Path) -> Path:
    subprocess.run(["mksquashfs", str(root), str(output), "-comp", "lz4", "-all-root", "-noappend", "-quiet",
                    "-no-progress"], check=True, capture_output=True)
    os.chmod(output, 0o644)
    return output


@dataclass(frozen=True)
class RuntimeImages:
    """SquashFS files for container tests (all world-readable)."""

    busybox: Path  # busybox with /etc/passwd, /tmp, /home, /data, /work
    bare: Path  # busybox only: no /etc, /proc, /dev, /tmp, /home (needs the overlay)
    setuid: Path  # busybox + /bin/setuid-probe owned by root, mode 4755, and /opt/suid/busybox (4755)
    hostile_link: Path  # /data -> /etc, /escape -> ../../../../etc, /etc/group a FIFO
    home_to_dev: Path  # busybox whose /home is a link to /dev (issue 12 #8)


@pytest.fixture(scope="session")
def runtime_images() -> RuntimeImages:
    if not (shutil.which("mksquashfs") and os.path.exists(BUSYBOX)):
        pytest.skip("mksquashfs or busybox-static missing: run scripts/install-system-packages.sh")
    work = Path(tempfile.mkdtemp(prefix="berth-rt-images-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        root = work / "busybox"
        _busybox_rootfs(root)
        busybox = _mksquashfs(root, work / "busybox.sqfs")

        root = work / "bare"
        _busybox_rootfs(root, with_etc=False, with_dirs=False)
        bare = _mksquashfs(root, work / "bare.sqfs")

        root = work / "setuid"
        _busybox_rootfs(root)
        source = work / "probe.c"
        source.write_text(SETUID_PROBE_C)
        subprocess.run(["gcc", "-static", "-O2", "-o", str(root / "bin" / "setuid-probe"), str(source)],
                       check=True, capture_output=True)
        os.chmod(root / "bin" / "setuid-probe", 0o4755)
        (root / "opt" / "suid").mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "opt" / "suid" / "busybox")
        os.chmod(root / "opt" / "suid" / "busybox", 0o4755)
        setuid = _mksquashfs(root, work / "setuid.sqfs")

        root = work / "hostile"
        _busybox_rootfs(root)
        (root / "data").rmdir()
        (root / "data").symlink_to("/etc")
        (root / "escape").symlink_to("../../../../../etc")
        # A FIFO where /etc/group should be: reading it naively would block berth forever.
        (root / "etc" / "group").unlink()
        os.mkfifo(root / "etc" / "group")
        hostile = _mksquashfs(root, work / "hostile.sqfs")

        root = work / "home-to-dev"
        _busybox_rootfs(root)
        (root / "home").rmdir()
        (root / "home").symlink_to("/dev")
        home_to_dev = _mksquashfs(root, work / "home-to-dev.sqfs")
        yield RuntimeImages(busybox, bare, setuid, hostile, home_to_dev)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fuse_mounts_under(path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            if fields[4].startswith(prefix):
                found.append(fields[4])
    return found


def process_cmdlines(uid: int | None = None) -> list[tuple[int, bytes]]:
    """(pid, raw command line: each argument ended by a NUL) of every process on the host, or
    of ``uid``'s only; a process that ends while it is read is left out. The one /proc scan of
    the tests (leftover processes, secrets on command lines)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if uid is not None and os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                found.append((int(entry), handle.read()))
        except OSError:
            continue
    return found


def processes_mentioning(uid: int, text: str) -> list[str]:
    """Command lines of ``uid``'s processes that contain ``text`` (e.g. a state directory)."""
    found = []
    for pid, raw in process_cmdlines(uid):
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a dead process nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def still_alive_after(pids, deadline_s: float = 10.0) -> list[int]:
    """Poll until none of ``pids`` is alive or ``deadline_s`` passes; return those still alive.
    A process that has finished its work may still be exiting for a moment (its memory, and so
    its /proc environ and cmdline, already gone, not yet a zombie): judge it after this."""
    deadline = time.monotonic() + deadline_s
    while True:
        alive = [pid for pid in pids if process_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def lingering_reapers(uid: int, state_dir: str) -> list[str]:
    """``uid``'s reapers of lingering image mounts (berth.runtime.imagemount, command name
    berth-linger) started by a berth of ``state_dir`` (their environment names it)."""
    found = []
    marker = f"BERTH_STATE_DIR={state_dir}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/comm", "rb") as handle:
                if handle.read().strip() != b"berth-linger":
                    continue
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if marker not in handle.read().split(b"\0"):
                    continue
        except OSError:
            continue
        found.append(f"{entry}: berth-linger")
    return found


@dataclass
class RuntimeEnv:
    """berth as the test user with a private state directory and user store."""

    user: User
    state_dir: Path
    scratch: Path
    extra_env: dict = field(default_factory=dict)

    @property
    def user_store(self) -> Path:
        """A private user store: tests never touch the test user's real one."""
        return self.state_dir.parent / "user-store"

    def env(self, **extra: str) -> dict[str, str]:
        return {"BERTH_STATE_DIR": str(self.state_dir), "BERTH_USER_STORE": str(self.user_store),
                **self.extra_env, **extra}

    def berth(self, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        return self.user.berth(*args, env=self.env(**(env or {})), **kwargs)

    def popen(self, *args: str, env: dict | None = None, groups: tuple[int, ...] | None = None,
              **kwargs) -> subprocess.Popen:
        """Start berth as the test user without waiting (signals reach berth itself: runuser
        is replaced by setpriv so the pid is berth's). ``groups``: supplementary gids to run
        with instead of the user's own (no system file is edited for that)."""
        from tests.harness.users import berth_executable

        full_env = self.user.base_env(**self.env(**(env or {})))
        if groups is None:
            group_option = "--init-groups"
        else:
            group_option = "--groups=" + ",".join(map(str, groups)) if groups else "--clear-groups"
        argv = ["setpriv", f"--reuid={self.user.uid}", f"--regid={self.user.gid}", group_option,
                "env", "-i", *[f"{k}={v}" for k, v in full_env.items()], str(berth_executable()), *args]
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        return subprocess.Popen(argv, cwd="/", **kwargs)

    def containers(self) -> list[str]:
        try:
            return sorted(os.listdir(self.state_dir / "containers"))
        except OSError:
            return []

    def leaks(self) -> list[str]:
        """Mounts, processes and container directories left behind (empty when clean)."""
        leaks = [f"mount {m}" for m in fuse_mounts_under(str(self.state_dir))]
        leaks += [f"process {p}" for p in processes_mentioning(self.user.uid, str(self.state_dir))]
        leaks += [f"process {p}" for p in lingering_reapers(self.user.uid, str(self.state_dir))]
        leaks += [f"container dir {c}" for c in self.containers()]
        return leaks

    def wait_clean(self, timeout_s: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            leaks = self.leaks()
            if not leaks or time.monotonic() > deadline:
                return leaks
            time.sleep(0.1)


def _force_clean(env: RuntimeEnv) -> None:
    """Last resort after a failed test, so one failure does not poison the others."""
    for mount in sorted(fuse_mounts_under(str(env.state_dir)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)
    for line in (processes_mentioning(env.user.uid, str(env.state_dir))
                 + lingering_reapers(env.user.uid, str(env.state_dir))):
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except OSError:
            pass


#: Runs a test once with berth-launcher and once with runc, the same expectations for both
#: (issue 10): ``@BOTH_RUNTIMES`` on a test that takes ``runtime_env``. Unmarked tests run with
#: the default (``runtime = "auto"``: the launcher, runc for what it does not do).
BOTH_RUNTIMES = pytest.mark.parametrize("runtime_env", ["launcher", "runc"], indirect=True)


@pytest.fixture
def runtime_env(user, request) -> RuntimeEnv:
    """A private state directory for one test; asserts afterwards that nothing leaked.
    Parametrized indirectly (BOTH_RUNTIMES), the parameter is the runtime setting."""
    base = user.tempdir(prefix="berth-rt-")
    scratch = base / "scratch"
    scratch.mkdir()
    os.chown(scratch, user.uid, user.gid)
    runtime = getattr(request, "param", None)
    env = RuntimeEnv(user, base / "state", scratch, extra_env={"BERTH_RUNTIME": runtime} if runtime else {})
    yield env
    leaks = env.wait_clean()
    if leaks:
        _force_clean(env)
    shutil.rmtree(base, ignore_errors=True)
    assert not leaks, "berth left things behind:\n" + "\n".join(leaks)



@pytest.fixture
def home_elsewhere(user) -> Path:
    """A directory to set as the test user's HOME that is not their passwd home and lies
    outside /tmp (which every container has privately), as sites set HOME to a project or
    scratch path: /var/tmp/berth-home-XXXX, the user's, 0755. Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="berth-home-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    os.chown(path, user.uid, user.gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)
