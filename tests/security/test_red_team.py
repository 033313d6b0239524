"""Red team: attacks on berth beyond test_container_escape.py and test_hostile_layers.py.

Everything runs for real as the unprivileged user berthtest (real runc, squashfuse, berth-init).
Where a second, hostile local user is needed it is uid 1002 (no passwd entry is needed: the
attacker runs through ``setpriv``, so no system file is edited).

Threat model used to judge results (DESIGN.md: berth is not setuid and runs as the caller):
* the kernel boundary (no privilege beyond the caller's own) and the boundary between local
  users are real security boundaries: a break is a finding;
* site policy (mount_deny_*, reserved destinations) only binds the caller's own container, which
  the caller could also start with their own copy of runc; a bypass is a (low) finding because
  berth documents the checks as watertight, and the tests pin the fix.

* a job's container and the host: by design the step agent runs ``srun`` and ``berth`` as the
  user for the job (docs/jobs.md says what that allows); anything *more* it can be made to do
  (other programs, host code through the environment, files read or written through links
  planted in a request) is a finding.

A finding still open is demonstrated by a test marked ``xfail(strict=True)``, which flips to a
pass (and strict xfail then fails the suite) when the owner fixes it; the marker is removed
then. Every finding reported so far is fixed: all tests here are attacks berth withstands, kept
as regression tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.harness.fixtures_runtime import BOTH_RUNTIMES, fuse_mounts_under, process_cmdlines, processes_mentioning
from tests.harness.users import berth_executable, describe

pytestmark = pytest.mark.security

#: A local user other than berthtest: the attacker (or the victim's neighbour) in cross-user tests.
OTHER_UID = 1002
MARKER = "RED-TEAM-WAS-HERE"


def run_as_other(argv: list[str], *, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``argv`` as uid/gid OTHER_UID with no supplementary groups and a clean environment."""
    full_env = {"HOME": "/tmp", "PATH": f"{berth_executable().parent}:/usr/bin:/bin", "LANG": "C.UTF-8",
                **(env or {})}
    cmd = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
           "env", "-i", *[f"{k}={v}" for k, v in full_env.items()], *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/", check=False,
                          stdin=subprocess.DEVNULL)


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float = 30) -> None:
    """Read the process's stdout until a line equal to ``text`` (fails on EOF or timeout)."""
    deadline = time.monotonic() + timeout_s
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    try:
        for line in process.stdout:
            if line.strip() == text:
                return
            if time.monotonic() > deadline:
                break
        pytest.fail(f"never saw {text!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}")
    finally:
        timer.cancel()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=10)


def host_pids_running(uid: int, argv: list[bytes]) -> list[int]:
    """Host pids of ``uid`` whose command line is exactly ``argv``."""
    wanted = b"\0".join(argv) + b"\0"
    return [pid for pid, cmdline in process_cmdlines(uid) if cmdline == wanted]


# --------------------------------------------------------------------------------------------
# Cross-user attacks (real security boundary)
# --------------------------------------------------------------------------------------------

def test_another_user_cannot_exec_list_or_enter_a_running_container(runtime_env, runtime_images, user):
    """uid 1002 knows the victim's state directory and container name: berth exec/ps, runc on the
    victim's runtime root, and /proc/PID/root of the victim's container process all fail."""
    process = runtime_env.popen("run", "--name", "victim", str(runtime_images.busybox), "sh", "-c",
                                "echo secret > /tmp/secret; echo ready; exec sleep 61")
    try:
        wait_for_line(process, "ready")
        env = {"BERTH_STATE_DIR": str(runtime_env.state_dir)}
        execed = run_as_other(["berth", "exec", "victim", "sh", "-c", f"echo {MARKER}"], env=env)
        assert execed.returncode != 0 and MARKER not in execed.stdout, describe(execed)
        listed = run_as_other(["berth", "ps"], env=env)
        assert "victim" not in listed.stdout, describe(listed)
        [container_id] = runtime_env.containers()
        runc_root = runtime_env.state_dir / "containers" / container_id / "runc"
        raw = run_as_other(["runc", "--root", str(runc_root), "exec", container_id, "echo", MARKER])
        assert raw.returncode != 0 and MARKER not in raw.stdout, describe(raw)
        peek = run_as_other(["ls", str(runtime_env.state_dir / "containers")])
        assert peek.returncode != 0 and container_id not in peek.stdout, describe(peek)
        [sleeper] = host_pids_running(user.uid, [b"sleep", b"61"])
        via_proc = run_as_other(["cat", f"/proc/{sleeper}/root/tmp/secret"])
        assert via_proc.returncode != 0 and "secret" not in via_proc.stdout, describe(via_proc)
        via_cwd = run_as_other(["ls", f"/proc/{sleeper}/cwd/"])
        assert via_cwd.returncode != 0, describe(via_cwd)
        # The FUSE mounts are the victim's only (no allow_other): even a path that is known
        # cannot be opened through the kernel's FUSE permission check by another uid.
        for mountpoint in fuse_mounts_under(str(runtime_env.state_dir)):
            opened = run_as_other(["stat", "-c", "%i", mountpoint])
            assert opened.returncode != 0, describe(opened)
    finally:
        stop(process)


def test_victims_bind_source_cannot_be_used_by_another_user(runtime_env, runtime_images, user):
    """A -v source path the attacker cannot read stays unreadable: berth judges as the caller."""
    private = runtime_env.scratch / "mine"
    private.mkdir(mode=0o700)
    os.chown(private, user.uid, user.gid)
    (private / "data").write_text("private\n")
    os.chown(private / "data", user.uid, user.gid)
    shared = Path(tempfile.mkdtemp(prefix="berth-rt-other-", dir="/tmp"))
    try:
        os.chmod(shared, 0o777)
        env = {"BERTH_STATE_DIR": str(shared / "state")}
        result = run_as_other(["berth", "run", "-v", f"{private}:/x", str(runtime_images.busybox), "cat", "/x/data"],
                              env=env)
        assert result.returncode == 125 and "private" not in result.stdout, describe(result)
        assert "cannot read" in result.stderr, describe(result)
    finally:
        subprocess.run(["umount", "-l", *fuse_mounts_under(str(shared))], capture_output=True, check=False)
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture
def sticky_tmp():
    """A world-writable sticky directory like /tmp, where users can plant things for others."""
    path = Path(tempfile.mkdtemp(prefix="berth-rt-sticky-", dir="/tmp"))
    os.chmod(path, 0o1777)
    yield path
    for mount in sorted(fuse_mounts_under(str(path)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def test_state_directory_planted_by_another_user_is_refused(sticky_tmp, runtime_images, user):
    """uid 1002 creates the victim's state directory first (as /tmp/berth-UID would be):
    berth refuses it instead of putting the victim's bundles where the attacker can swap them."""
    planted = sticky_tmp / f"berth-{user.uid}"
    planted.mkdir(mode=0o777)
    os.chown(planted, OTHER_UID, OTHER_UID)
    os.chmod(planted, 0o777)
    result = user.berth("run", str(runtime_images.busybox), "true", env={"BERTH_STATE_DIR": str(planted)})
    assert result.returncode == 125 and f"belongs to uid {OTHER_UID}" in result.stderr, describe(result)
    assert not (planted / "containers" / "x").exists()
    assert processes_mentioning(user.uid, str(planted)) == []


def test_state_directory_symlink_planted_by_another_user_creates_nothing(sticky_tmp, runtime_images, user):
    """uid 1002 plants STATE -> a directory of theirs. berth must refuse *before* writing
    anything through the link (a root caller would otherwise mkdir wherever the link points)."""
    target = sticky_tmp / "attacker-owned"
    target.mkdir(mode=0o777)
    os.chown(target, OTHER_UID, OTHER_UID)
    os.chmod(target, 0o777)
    planted = sticky_tmp / f"berth-{user.uid}"
    planted.symlink_to(target)
    os.lchown(planted, OTHER_UID, OTHER_UID)
    result = user.berth("run", str(runtime_images.busybox), "true", env={"BERTH_STATE_DIR": str(planted)})
    assert result.returncode == 125 and "a symbolic link of uid" in result.stderr, describe(result)
    assert sorted(os.listdir(target)) == [], "berth wrote through the attacker's symlink"


# --------------------------------------------------------------------------------------------
# Kernel boundary: no privilege beyond the caller's
# --------------------------------------------------------------------------------------------

@pytest.fixture
def root_owned_dir(runtime_env):
    """A root-owned directory (0755) holding a root-owned file (0644), readable by the user."""
    path = runtime_env.scratch / "root-owned"
    path.mkdir()
    os.chown(path, 0, 0)
    os.chmod(path, 0o755)
    (path / "file").write_text("root data\n")
    os.chown(path / "file", 0, 0)
    os.chmod(path / "file", 0o644)
    return path


@BOTH_RUNTIMES
def test_remap_root_has_no_power_over_host_files(runtime_env, runtime_images, root_owned_dir):
    """uid 0 in a --remap-root container, with a root-owned host directory mounted read-write:
    no write, no chown, no new file, no device node, no hostname change, no mount."""
    script = (
        "id -u; "
        "echo pwned > /r/file 2>/dev/null && echo WROTE || echo no-write; "
        "touch /r/new 2>/dev/null && echo CREATED || echo no-create; "
        "chown 0:0 /r/file 2>/dev/null && echo CHOWNED || echo no-chown; "
        "chmod 666 /r/file 2>/dev/null && echo CHMODDED || echo no-chmod; "
        "touch /tmp/mine; chown 1:1 /tmp/mine 2>/dev/null && echo GAVE-AWAY || echo no-give-away; "
        "mknod /tmp/mem c 1 1 2>/dev/null && echo MKNOD || echo no-mknod; "
        "hostname red-team-host 2>/dev/null && echo RENAMED || echo no-hostname; "
        "mount --bind /tmp /r 2>/dev/null && echo BOUND || echo no-mount; "
        "echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo SYSCTL || echo no-sysctl"
    )
    before = os.uname().nodename
    result = runtime_env.berth("run", "--remap-root", "-v", f"{root_owned_dir}:/r:rw", str(runtime_images.busybox),
                               "sh", "-c", script)
    assert result.returncode == 0, describe(result)
    assert result.stdout.split() == ["0", "no-write", "no-create", "no-chown", "no-chmod", "no-give-away",
                                     "no-mknod", "no-hostname", "no-mount", "no-sysctl"], describe(result)
    assert (root_owned_dir / "file").read_text() == "root data\n"
    info = os.stat(root_owned_dir / "file")
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o644)
    assert sorted(os.listdir(root_owned_dir)) == ["file"]
    assert os.uname().nodename == before


@BOTH_RUNTIMES
def test_masked_kernel_interfaces_stay_masked(runtime_env, runtime_images):
    """/proc/kcore (where the kernel has one), /proc/keys, /sys/firmware are masked;
    /proc/sysrq-trigger, /proc/sys and /sys are read-only; PID 1 is berth-init, not the host's."""
    script = (
        "cat /proc/kcore 2>/dev/null | wc -c; "
        "ls /sys/firmware | wc -l; "
        "cat /proc/keys | wc -c; "
        "(echo h > /proc/sysrq-trigger) 2>/dev/null && echo SYSRQ || echo no-sysrq; "
        "(echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && echo SYSCTL || echo no-sysctl; "
        "(echo 1 > /sys/kernel/mm/ksm/run) 2>/dev/null && echo SYSFS || echo no-sysfs; "
        "tr '\\0' '\\n' < /proc/1/cmdline | head -n 1"
    )
    result = runtime_env.berth("run", str(runtime_images.busybox), "sh", "-c", script)
    assert result.returncode == 0, describe(result)
    assert result.stdout.split() == ["0", "0", "0", "no-sysrq", "no-sysctl", "no-sysfs",
                                     "/dev/.berth-init"], describe(result)


@BOTH_RUNTIMES
def test_kill_everything_inside_reaches_no_host_process(runtime_env, runtime_images, user):
    """`kill -KILL -1` in the container (same host uid as berth, its FUSE daemons and the user's
    other processes): only the container's PID namespace is hit; berth still tears down."""
    bystander = subprocess.Popen(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                                  "sleep", "63"], stdin=subprocess.DEVNULL)
    try:
        result = runtime_env.berth("run", str(runtime_images.busybox), "sh", "-c", "kill -KILL -1; echo survived",
                                   timeout=60)
        # kill(-1) spares the caller and the namespace's init: the shell goes on.
        assert result.returncode == 0 and result.stdout == "survived\n", describe(result)
        assert bystander.poll() is None, "a host process of the user was killed from the container"
        assert runtime_env.wait_clean() == []
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


def test_device_symlinked_to_a_device_the_user_cannot_open_is_refused(runtime_env, runtime_images):
    """--device with a symlink of the user's to the host's disk (root 0600), to a device the user
    may only read (/dev/kmsg, 0644), to a regular file, or a '..' path to the disk: all refused
    (by the path rule or by the open check); a device the user may open still works."""
    refusals = ("cannot open", "not under /dev", "not a device path under /dev", "without '..'")
    for name, target in [("innocent-gpu", "/dev/vda"), ("read-only-dev", "/dev/kmsg"),
                         ("not-a-device", "/etc/hostname")]:
        if not os.path.exists(target):
            continue
        link = runtime_env.scratch / name
        link.symlink_to(target)
        result = runtime_env.berth("run", "--device", str(link), str(runtime_images.busybox), "true")
        assert result.returncode == 125 and any(r in result.stderr for r in refusals), describe(result)
    for path in ("/dev/vda", "/dev/kmsg", "/dev/../dev/vda"):
        if os.path.exists(path):
            result = runtime_env.berth("run", "--device", path, str(runtime_images.busybox), "true")
            assert result.returncode == 125 and any(r in result.stderr for r in refusals), describe(result)
    allowed = runtime_env.berth("run", "--device", "/dev/fuse", str(runtime_images.busybox), "sh", "-c",
                                "test -c /dev/fuse && echo char-device")
    assert allowed.returncode == 0 and allowed.stdout == "char-device\n", describe(allowed)


# --------------------------------------------------------------------------------------------
# Site-policy bypasses (the caller's own container; low severity, see the module docstring)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source,destination,message", [
    ("//proc/self", "/x", "under /proc"),  # POSIX keeps a leading '//' in abspath
    ("/proc/self/root/etc", "/x", "under /proc"),  # the host's / through procfs
    ("/proc/1/root", "/x", "under /proc"),  # another user's (init's) root
    ("/dev/shm", "/x", "under /dev"),
    ("/sys/fs/cgroup", "/x", "under /sys"),
    ("SCRATCH", "/etc//passwd", "/etc/passwd"),
    ("SCRATCH", "/./dev/.berth-init", "reserved"),
    ("SCRATCH", "//proc", "/proc"),
    ("SCRATCH", "/dev/.berth-init/", "reserved"),
    ("SCRATCH", "/etc", "would cover /etc/passwd"),  # issue 9 defect 7: all of /etc hides passwd
])
def test_exotic_spellings_of_forbidden_mounts_are_refused(runtime_env, runtime_images, source, destination,
                                                          message):
    source = str(runtime_env.scratch) if source == "SCRATCH" else source
    result = runtime_env.berth("run", "-v", f"{source}:{destination}", str(runtime_images.busybox), "true")
    assert result.returncode == 125 and message in result.stderr, describe(result)


def _dotdot_path_to(scratch: Path, container_path: str, host_device: str) -> str:
    """A host path P with normpath(P) == container_path and realpath(P) == host_device:
    ``scratch/hop/../../..(as deep as scratch)/<container_path>`` where ``hop`` is a link to a
    directory deep enough that the ``..`` land back in scratch, and ``scratch/<container_path>``
    is a link to the device."""
    depth = len(Path(scratch).parts) - 1  # components below "/"
    deep = scratch / "deep"
    target = deep
    for index in range(depth):
        target = target / f"d{index}"
    target.mkdir(parents=True)
    (scratch / "hop").symlink_to(target)
    # realpath: scratch/hop -> deep/d0/../d{depth-1}; depth+1 ".." climb to scratch/deep/.. = scratch
    relative = container_path.lstrip("/")
    planted = scratch / relative
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(host_device)
    path = str(scratch / "hop") + "/.." * (depth + 1) + "/" + relative
    assert os.path.normpath(path) == container_path, (path, os.path.normpath(path))
    assert os.path.realpath(path) == host_device, (path, os.path.realpath(path))
    return path


def test_device_path_cannot_mount_over_a_denied_destination(runtime_env, runtime_images):
    path = _dotdot_path_to(runtime_env.scratch, "/etc/passwd", "/dev/null")
    result = runtime_env.berth("run", "--device", path, str(runtime_images.busybox), "sh", "-c",
                               "wc -c < /etc/passwd")
    assert result.returncode == 125, describe(result)
    assert "/etc/passwd" in result.stderr, describe(result)


def test_image_symlink_cannot_route_a_mount_onto_a_denied_destination(runtime_env, runtime_images, user):
    fake = runtime_env.scratch / "fake-passwd"
    fake.write_text("root:x:0:0:fake:/:/bin/sh\n")
    os.chmod(fake, 0o644)
    # hostile_link: /data -> /etc in the image.
    result = runtime_env.berth("run", "-v", f"{fake}:/data/passwd", str(runtime_images.hostile_link),
                               "cat", "/etc/passwd")
    assert result.returncode == 125 and "/etc/passwd" in result.stderr, describe(result)


class LinkImages:
    def __init__(self, proc_link: Path, passwd_link: Path) -> None:
        self.proc_link = proc_link  # /p -> /proc, /s -> ../../sys
        self.passwd_link = passwd_link  # /etc/passwd -> /proc/self/environ, /etc/group -> /dev/.berth-init


@pytest.fixture(scope="session")
def link_images(runtime_images):
    """busybox images whose links point into /proc, /sys and at berth's own init."""
    from tests.harness.fixtures_runtime import _busybox_rootfs, _mksquashfs

    work = Path(tempfile.mkdtemp(prefix="berth-rt-redteam-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        root = work / "proc-link"
        _busybox_rootfs(root)
        (root / "p").symlink_to("/proc")
        (root / "s").symlink_to("../../sys")
        proc_link = _mksquashfs(root, work / "proc-link.sqfs")
        root = work / "passwd-link"
        _busybox_rootfs(root)
        (root / "etc" / "passwd").unlink()
        (root / "etc" / "passwd").symlink_to("/proc/self/environ")
        (root / "etc" / "group").unlink()
        (root / "etc" / "group").symlink_to("../dev/.berth-init")
        passwd_link = _mksquashfs(root, work / "passwd-link.sqfs")
        yield LinkImages(proc_link, passwd_link)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("destination", ["/p/sys/kernel/hostname", "/p/self/attr/current", "/s/kernel/mm"])
@BOTH_RUNTIMES
def test_mount_destination_through_an_image_symlink_cannot_land_in_proc_or_sys(runtime_env, link_images,
                                                                               destination):
    """-v DST where DST goes through an image link into /proc or /sys: berth resolves it in-root
    and judges where it lands (/proc and /sys are denied destinations), so both are refused."""
    payload = runtime_env.scratch / "payload"
    payload.write_text("planted\n")
    os.chmod(payload, 0o644)
    if destination.startswith("/s/"):
        payload = runtime_env.scratch
    result = runtime_env.berth("run", "-v", f"{payload}:{destination}", str(link_images.proc_link), "sh", "-c",
                               "cat /proc/sys/kernel/hostname; ls /sys/kernel/mm | wc -l")
    assert result.returncode == 125, describe(result)
    with open("/proc/sys/kernel/hostname") as handle:
        assert handle.read() != "planted\n"


def test_identity_files_linked_into_proc_or_at_the_init_still_run(runtime_env, link_images, user):
    """The image's /etc/passwd -> /proc/self/environ and /etc/group -> ../dev/.berth-init.
    berth reads them in-root (nothing leaks: berth's own environment is never read) and must
    still give the container its identity files (or refuse with a clear berth error)."""
    result = runtime_env.berth("run", str(link_images.passwd_link), "cat", "/etc/passwd", "/etc/group",
                               env={"RED_TEAM_SECRET": MARKER})
    assert MARKER not in result.stdout and MARKER not in result.stderr
    assert result.returncode == 0, describe(result)
    assert f"{user.name}:x:{user.uid}:{user.gid}:" in result.stdout, describe(result)


@BOTH_RUNTIMES
def test_bind_source_swapped_after_the_policy_check_is_not_mounted(runtime_env, runtime_images, user):
    """The user's -v source is scratch/box/proc, a plain directory when berth judges it. As soon
    as the container's state directory appears (after the check, before runc mounts), the user
    renames box and puts a link box -> / in its place: scratch/box/proc is now the host /proc.
    berth-init finds the mount is not the inode berth judged and refuses to start (125)."""
    box = runtime_env.scratch / "box"
    (box / "proc").mkdir(parents=True)
    (box / "proc" / "harmless").write_text("harmless\n")
    for path in (box, box / "proc", box / "proc" / "harmless"):
        os.chown(path, user.uid, user.gid)
    containers = runtime_env.state_dir / "containers"
    swapped = threading.Event()
    done = threading.Event()

    def swap() -> None:
        # The user could do exactly this from their own shell: scratch and the state directory
        # are theirs. (The test's root thread does it only to keep the timing simple.)
        while not done.is_set():
            try:
                if any(containers.iterdir()):
                    os.rename(box, runtime_env.scratch / "box.orig")
                    os.symlink("/", box)
                    swapped.set()
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.0005)

    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    try:
        result = runtime_env.berth("run", "-v", f"{box}/proc:/x", str(runtime_images.busybox), "sh", "-c",
                                   "test -e /x/self/status && echo HOST-PROC || ls /x")
    finally:
        done.set()
        thread.join(timeout=5)
    assert swapped.is_set(), "the swap never happened (timing)"
    # Either refused, or the judged directory (not the host /proc) is what the container sees.
    assert "HOST-PROC" not in result.stdout, describe(result)
    if result.returncode == 125:
        assert "not the host path berth checked" in result.stderr, describe(result)
    else:
        assert result.stdout.split() == ["harmless"], describe(result)


# --------------------------------------------------------------------------------------------
# Runtime-level escapes through berth's inputs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fd", range(3, 10))
@BOTH_RUNTIMES
def test_leaked_fd_as_working_directory_does_not_reach_the_host(runtime_env, runtime_images, fd):
    """CVE-2024-21626 ("Leaky Vessels") through berth's -w (an image WorkingDir is the same
    field): the process must not start with a working directory outside its root, from where
    relative paths reach the host's files. Debian's runc 1.1.5+deb12u1 carries the fix; this
    pins that berth never runs a runc without it."""
    marker = runtime_env.scratch / "host-only"
    marker.write_text(MARKER + "\n")
    os.chmod(marker, 0o644)
    relative = "../" * 12 + str(marker).lstrip("/")
    result = runtime_env.berth("run", "-w", f"/proc/self/fd/{fd}", str(runtime_images.busybox), "sh", "-c",
                               f"cat {relative} 2>/dev/null; cat ../../../../../../../etc/hostname 2>/dev/null; true")
    assert MARKER not in result.stdout, describe(result)
    host_name = Path("/etc/hostname").read_text() if os.path.exists("/etc/hostname") else None
    if result.returncode == 0 and host_name:
        assert result.stdout != host_name, describe(result)


def test_leaked_fd_as_exec_working_directory_does_not_reach_the_host(runtime_env, runtime_images):
    marker = runtime_env.scratch / "host-only"
    marker.write_text(MARKER + "\n")
    os.chmod(marker, 0o644)
    relative = "../" * 12 + str(marker).lstrip("/")
    process = runtime_env.popen("run", "--name", "target", str(runtime_images.busybox), "sh", "-c",
                                "echo ready; exec sleep 62")
    try:
        wait_for_line(process, "ready")
        for fd in range(3, 10):
            result = runtime_env.berth("exec", "-w", f"/proc/self/fd/{fd}", "target", "sh", "-c",
                                       f"cat {relative} 2>/dev/null; true")
            assert MARKER not in result.stdout, describe(result)
    finally:
        stop(process)


@pytest.fixture(scope="session")
def file_caps_image(runtime_images):
    """busybox whose copy /opt/caps/busybox carries cap_setuid,cap_dac_override,cap_sys_admin+ep."""
    from tests.harness.fixtures_runtime import BUSYBOX, _busybox_rootfs

    if not shutil.which("setcap"):
        pytest.skip("setcap missing (libcap2-bin)")
    work = Path(tempfile.mkdtemp(prefix="berth-rt-redteam-caps-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        root = work / "root"
        _busybox_rootfs(root)
        (root / "opt" / "caps").mkdir(parents=True)
        probe = root / "opt" / "caps" / "busybox"  # busybox picks its applet by argv[0]: keep the name
        shutil.copy2(BUSYBOX, probe)
        subprocess.run(["setcap", "cap_setuid,cap_dac_override,cap_sys_admin+ep", str(probe)], check=True)
        image = work / "caps.sqfs"
        subprocess.run(["mksquashfs", str(root), str(image), "-comp", "lz4", "-all-root", "-noappend", "-quiet",
                        "-no-progress", "-xattrs"], check=True, capture_output=True)
        os.chmod(image, 0o644)
        # The capability really is in the image as squashfuse shows it (the test is not vacuous).
        mountpoint = work / "check"
        mountpoint.mkdir()
        subprocess.run(["squashfuse", str(image), str(mountpoint)], check=True, capture_output=True)
        try:
            shown = subprocess.run(["getcap", str(mountpoint / "opt" / "caps" / "busybox")], capture_output=True,
                                   text=True, check=False).stdout
        finally:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        assert "cap_setuid" in shown, shown
        yield image
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("remap_root", [False, True])
def test_file_capabilities_in_the_image_give_nothing(runtime_env, file_caps_image, root_owned_dir, remap_root):
    """A binary with file capabilities (security.capability xattr) in the image: no capability
    after exec, no write to a root-owned host file, no mount."""
    options = ["--remap-root"] if remap_root else []
    result = runtime_env.berth("run", *options, "-v", f"{root_owned_dir}:/r:rw", str(file_caps_image), "sh", "-c",
                               "/opt/caps/busybox grep CapEff /proc/self/status; "
                               "/opt/caps/busybox sh -c 'echo x >> /r/file' 2>/dev/null && echo WROTE || echo no-write; "
                               "/opt/caps/busybox mount -t tmpfs none /tmp 2>/dev/null && echo MOUNTED || echo no-mount")
    assert result.returncode == 0, describe(result)
    assert result.stdout.split() == ["CapEff:", "0000000000000000", "no-write", "no-mount"], describe(result)
    assert (root_owned_dir / "file").read_text() == "root data\n"


def test_berth_run_as_root_warns_unless_allowed(tmp_path):
    """As root the container is host uid 0 with /root mounted read-write: berth run says so on
    stderr (before anything else can fail); BERTH_ALLOW_ROOT=1 silences it. (berth submit adds
    the same line to its notes; tests/unit pins the text.)"""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root", "BERTH_USER_STORE": str(tmp_path / "store")}
    for extra, warned in (({}, True), ({"BERTH_ALLOW_ROOT": "1"}, False)):
        result = subprocess.run([str(berth_executable()), "run", str(tmp_path / "missing.sqfs"), "true"],
                                env={**env, **extra}, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL, check=False, cwd=tmp_path)
        assert result.returncode != 0, describe(result)  # nothing to run: only the warning matters
        assert ("running as root" in result.stderr) == warned, describe(result)


# --------------------------------------------------------------------------------------------
# Stores shared between users
# --------------------------------------------------------------------------------------------

def _writable_by_others(root: Path, owner_uid: int) -> list[str]:
    """Entries under ``root`` that another user could change: group/other-writable (symlinks
    aside) or owned by someone other than ``owner_uid``."""
    found = []
    for path in [root, *root.rglob("*")]:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            continue
        if info.st_mode & 0o022 or info.st_uid != owner_uid:
            found.append(f"{path} uid={info.st_uid} mode={stat.S_IMODE(info.st_mode):o}")
    return found


def test_site_store_written_with_a_careless_umask_is_not_writable_by_users(user, busybox_image, sticky_tmp):
    """The admin pulls with umask 000 into the site store; afterwards every entry is the admin's
    and not group/other-writable, and a user's `berth run` of the image adds nothing there (a
    user who could write the site store could replace what every other user runs)."""
    site_store = sticky_tmp / "site"
    site_store.mkdir(mode=0o755)
    env = {"BERTH_SITE_STORE": str(site_store), "BERTH_USER_STORE": str(sticky_tmp / "admin-user-store"),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    admin = subprocess.run(["sh", "-c", 'umask 000; exec "$0" "$@"', str(berth_executable()), "pull", "--site",
                            "--insecure", "-q", str(busybox_image)],
                           env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                           check=False)
    assert admin.returncode == 0, describe(admin)
    assert _writable_by_others(site_store, 0) == []
    user_env = {"BERTH_SITE_STORE": str(site_store), "BERTH_USER_STORE": str(sticky_tmp / "user-store"),
                "BERTH_STATE_DIR": str(sticky_tmp / "user-state")}
    ran = user.berth("run", str(busybox_image), "true", env=user_env)
    assert ran.returncode == 0, describe(ran)
    assert _writable_by_others(site_store, 0) == []
    planted = user.run(["touch", str(site_store / "planted")])
    assert planted.returncode != 0 and not (site_store / "planted").exists(), describe(planted)


def test_user_store_pulled_with_a_careless_umask_stays_the_users_alone(user, busybox_image, sticky_tmp):
    """The same for a user's own store: with umask 000 nothing in it becomes writable by the
    other users of a shared home or scratch file system."""
    user_store = sticky_tmp / "user-store"
    pulled = user.run(["sh", "-c", 'umask 000; exec "$0" "$@"', str(berth_executable()), "pull", "--insecure", "-q",
                       str(busybox_image)],
                      env={"BERTH_USER_STORE": str(user_store), "BERTH_SITE_STORE": str(sticky_tmp / "none")})
    assert pulled.returncode == 0, describe(pulled)
    assert _writable_by_others(user_store, user.uid) == []


# --------------------------------------------------------------------------------------------
# Jobs: the step agent (berth.jobs.agent) runs host commands for the job's container
# --------------------------------------------------------------------------------------------

def test_job_container_cannot_run_arbitrary_code_on_the_host_through_the_step_agent(job_site, user):
    """The job script plays a hostile image's code: it writes sitecustomize.py into the submit
    directory (visible on the host at the same path), exports PYTHONPATH and calls the `berth`
    shim. The host-side berth must not import it: the proof file would be written from outside
    the container (its PID 1 is the host's init, not berth-init). PYTHONSTARTUP, LD_AUDIT,
    BASH_ENV and BERTH_CONFIG_DIR are exported too (the unit tests pin the whole allow-list)."""
    from tests.integration.jobs_helpers import submit, wait_for

    work = job_site.workdir(user)
    proof = work / "host-proof.txt"
    job_site.write_script(work, "hostile.sh", f"""\
        #!/bin/sh
        mkdir -p {work}/inject
        cat > {work}/inject/sitecustomize.py <<'PY'
        import os
        with open("/proc/1/cmdline", "rb") as handle:
            init = handle.read().split(b"\\0")[0].decode()
        with open("{proof}", "w") as out:
            out.write("pid1=" + init + "\\n")
        PY
        export PYTHONPATH={work}/inject PYTHONSTARTUP={work}/inject/sitecustomize.py
        export LD_AUDIT={work}/inject/nothing.so BASH_ENV={work}/inject/env.sh BERTH_CONFIG_DIR={work}/inject
        echo "version=$(berth --version 2>&1)"
        echo done
    """, user)
    job = submit(user, job_site, work, "--template", "bb", "-o", str(work / "out.txt"), "hostile.sh")
    states = wait_for(user, job_site, [job], ("completed", "failed", "cancelled", "timeout"))
    assert states[job]["state"] == "completed", states[job]
    assert not proof.exists(), "host code ran: " + proof.read_text()
    # The step did run on the host (the shim got the host berth's answer), just without the code.
    lines = (work / "out.txt").read_text().splitlines()
    assert lines[0].startswith("version=berth ") and lines[-1] == "done", lines


def test_job_container_cannot_write_host_files_through_step_request_symlinks(job_site, user):
    """The job's container plants a step request whose out, err and status are links to a host
    file outside its mounts, and a request that is itself a link to a host directory (laid out
    like a request): the agent refuses the first (status 125, read by the script) and writes
    neither the file nor anything into the directory."""
    from tests.integration.jobs_helpers import submit, wait_for

    work = job_site.workdir(user)
    outside = Path(tempfile.mkdtemp(prefix="outside-", dir=job_site.root))  # never mounted in the job
    os.chown(outside, user.uid, user.gid)
    victim = outside / "precious.txt"
    victim.write_text("precious\n")
    os.chown(victim, user.uid, user.gid)
    fake = outside / "fake-request"  # what a followed link would serve and write a status into
    fake.mkdir()
    for name, text in (("ready", ""), ("prog", "berth\n"), ("argv", "--version\0"), ("cwd", "/\n"), ("env", ""),
                       ("out", ""), ("err", "")):
        (fake / name).write_text(text)
    for path in (fake, *fake.iterdir()):
        os.chown(path, user.uid, user.gid)
    job_site.write_script(work, "hostile.sh", f"""\
        #!/bin/sh
        test -e {victim} && echo VISIBLE || echo not-visible
        ln -s {fake} "$BERTH_JOB_AGENT/req.linked"
        req="$BERTH_JOB_AGENT/req.hostile"
        mkdir "$req"
        ln -s {victim} "$req/out"
        ln -s {victim} "$req/err"
        ln -s {victim} "$req/status"
        printf 'x\\0' > "$req/argv"
        echo not-allowed > "$req/prog"
        echo / > "$req/cwd"
        : > "$req/env"
        touch "$req/ready"
        i=0; while [ -L "$req/status" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
        echo "status=$(cat "$req/status")"
    """, user)
    job = submit(user, job_site, work, "--template", "bb", "-o", str(work / "out.txt"), "hostile.sh")
    states = wait_for(user, job_site, [job], ("completed", "failed", "cancelled", "timeout"))
    assert states[job]["state"] == "completed", states[job]
    lines = (work / "out.txt").read_text().splitlines()
    assert lines[0] == "not-visible", lines  # truly outside the container
    assert lines[-1] == "status=125", lines  # the agent served the request: it refused it
    assert victim.read_text() == "precious\n"
    assert sorted(os.listdir(fake)) == ["argv", "cwd", "env", "err", "out", "prog", "ready"]
    assert (fake / "out").read_text() == "" and (fake / "err").read_text() == ""


def test_job_container_cannot_read_host_files_through_step_request_symlinks(job_site, user):
    """Step requests whose prog, then argv, cwd or env is a link to a host file outside the
    container's mounts: each is refused (status 125) and the file's content never reaches the
    step's output."""
    from tests.integration.jobs_helpers import submit, wait_for

    work = job_site.workdir(user)
    outside = Path(tempfile.mkdtemp(prefix="outside-", dir=job_site.root))  # never mounted in the job
    os.chown(outside, user.uid, user.gid)
    secret = outside / "secret.txt"
    secret.write_text(f"{MARKER}-secret")
    os.chown(secret, user.uid, user.gid)
    os.chmod(outside, 0o700)
    job_site.write_script(work, "hostile.sh", f"""\
        #!/bin/sh
        cat {secret} 2>/dev/null || echo not-visible
        for linked in prog argv cwd env; do
            req="$BERTH_JOB_AGENT/req.$linked"
            mkdir "$req"
            printf 'x\\0' > "$req/argv"
            echo berth > "$req/prog"
            echo / > "$req/cwd"
            : > "$req/env"
            rm "$req/$linked"
            ln -s {secret} "$req/$linked"
            mkfifo "$req/out" "$req/err"
            cat "$req/out" & cat "$req/err" & touch "$req/ready"
            wait
            i=0; while [ ! -e "$req/status" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
            echo "$linked status=$(cat "$req/status")"
        done 2>&1
    """, user)
    job = submit(user, job_site, work, "--template", "bb", "-o", str(work / "out.txt"), "hostile.sh")
    states = wait_for(user, job_site, [job], ("completed", "failed", "cancelled", "timeout"))
    assert states[job]["state"] == "completed", states[job]
    output = (work / "out.txt").read_text()
    assert output.splitlines()[0] == "not-visible", output  # truly outside the container
    statuses = [line for line in output.splitlines() if " status=" in line]
    assert statuses == [f"{name} status=125" for name in ("prog", "argv", "cwd", "env")], output
    assert output.count("step request refused") == 4, output
    assert MARKER not in output, output


def test_hostile_job_submissions_are_refused_cleanly(job_site, user):
    """A #BERTH template name that walks out of the templates directory, an output file in a
    directory the user cannot write: refused at submission, with nothing written anywhere."""
    from tests.integration.jobs_helpers import record_count

    work = job_site.workdir(user)
    # A template file of the user's own, planted where a traversal would find it.
    planted = work / "evil.toml"
    planted.write_text('image = "busybox"\ncpu = 1\nmemsz = "64M"\ncustom = "--volume /etc:/host-etc"\n')
    os.chown(planted, user.uid, user.gid)
    traversal = os.path.relpath(planted.with_suffix(""), job_site.config_dir / "templates.d")
    job_site.write_script(work, "walk.sh", f"#!/bin/sh\n#BERTH --template={traversal}\ntrue\n", user)
    records = record_count(job_site)
    result = user.berth("submit", "walk.sh", cwd=str(work), env=job_site.env)
    assert result.returncode != 0 and "template" in result.stderr, describe(result)
    closed = Path(tempfile.mkdtemp(prefix="root-only-", dir=job_site.root))
    os.chmod(closed, 0o755)
    job_site.write_script(work, "ok.sh", "#!/bin/sh\necho hi\n", user)
    result = user.berth("submit", "--template", "bb", "-o", str(closed / "out.txt"), "ok.sh", cwd=str(work),
                        env=job_site.env)
    if result.returncode == 0:  # accepted: then the job must fail on its output, writing nothing there
        from tests.integration.jobs_helpers import wait_for

        job = result.stdout.strip()
        states = wait_for(user, job_site, [job], ("completed", "failed", "cancelled", "timeout"))
        assert states[job]["state"] == "failed", states[job]
    else:
        assert "out.txt" in result.stderr, describe(result)
        assert record_count(job_site) == records
    assert os.listdir(closed) == []


# --------------------------------------------------------------------------------------------
# Admin side: importing what a user hands over
# --------------------------------------------------------------------------------------------

def test_admin_import_of_a_users_layout_never_reads_outside_it(user, sticky_tmp):
    """A user hands the admin an OCI layout for the (world-readable) site store whose config
    blob is a link to a root-only file. Even with the digest matching (the worst case: berth
    cannot rely on a mismatch), the admin's `berth import --site` refuses the link out of the
    layout instead of reading it, and the site store gets no image."""
    from tests.harness import ocilayout

    layout = sticky_tmp / "handed-over"
    built = ocilayout.write_layout(ocilayout.ImageSpec(layers=(ocilayout.Layer((
        ocilayout.File("etc/hello", "hi\n"),)),)), layout)
    manifest = json.loads(built.blob_path(built.oci_digest).read_bytes())
    config_blob = built.blob_path(manifest["config"]["digest"])
    private = sticky_tmp / "root-only"
    private.mkdir(mode=0o700)
    shutil.copy(config_blob, private / "config")
    config_blob.unlink()
    config_blob.symlink_to(private / "config")
    for path in [layout, *layout.rglob("*")]:
        os.lchown(path, user.uid, user.gid)
    site_store = sticky_tmp / "site"
    site_store.mkdir(mode=0o755)
    env = {"BERTH_SITE_STORE": str(site_store), "BERTH_USER_STORE": str(sticky_tmp / "admin-user-store"),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    result = subprocess.run([str(berth_executable()), "import", "--site", str(layout), "handed/over:1"], env=env,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode != 0 and "outside the OCI layout" in result.stderr, describe(result)
    listed = subprocess.run([str(berth_executable()), "images", "--json"], env=env, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], describe(listed)


def test_job_container_cannot_make_the_next_runner_truncate_host_files(job_site, user):
    from tests.integration.jobs_helpers import submit, wait_for

    jobs_dir = Path(tempfile.mkdtemp(prefix=".berth-redteam-jobs-", dir=user.home))
    os.chown(jobs_dir, user.uid, user.gid)
    os.chmod(jobs_dir, 0o700)
    outside = Path(tempfile.mkdtemp(prefix="outside-", dir=job_site.root))  # never mounted in a job
    os.chown(outside, user.uid, user.gid)
    victim = outside / "precious.txt"
    victim.write_text("precious\n")
    os.chown(victim, user.uid, user.gid)
    env = {"BERTH_JOBS_DIR": str(jobs_dir)}
    try:
        work = job_site.workdir(user)
        job_site.write_script(work, "plant.sh", f"""\
            #!/bin/sh
            test -e {victim} && echo VISIBLE || echo not-visible
            for n in 0 1 2 3 4 5 6 7; do
                rm -f {jobs_dir}/.slots/$n.lock; ln -s {victim} {jobs_dir}/.slots/$n.lock
            done
        """, user)
        job_site.write_script(work, "next.sh", "#!/bin/sh\ntrue\n", user)
        first = submit(user, job_site, work, "--template", "bb", "-o", str(work / "plant.out"), "plant.sh", env=env)
        states = wait_for(user, job_site, [first], ("completed", "failed", "cancelled", "timeout"), env=env)
        # Since jobs see only their own part of the record, the planting itself fails (no .slots).
        assert states[first]["state"] in ("completed", "failed"), states[first]
        # stdout and stderr share the file; busybox's buffered echo may land after ln's errors.
        lines = (work / "plant.out").read_text().splitlines()
        assert "not-visible" in lines and "VISIBLE" not in lines, lines
        second = submit(user, job_site, work, "--template", "bb", "next.sh", env=env)
        wait_for(user, job_site, [second], ("completed", "failed", "cancelled", "timeout"), env=env)
        assert victim.read_text() == "precious\n"
    finally:
        shutil.rmtree(jobs_dir, ignore_errors=True)


def test_a_container_that_rewrites_its_bundle_does_not_weaken_berth_exec(runtime_env, runtime_images):
    """berth-launcher exec took the namespaces, no_new_privs and seccomp rule of the exec'd
    process from the bundle's config.json, in berth's state directory: a container that could
    reach it (a -v of /tmp where the state is /tmp/berth-UID, before berth hid its state
    directory in every container: test_state_directory_mask.py) rewrote it, and the user's next
    berth exec ran on the host's network without the keyring rule. The exec'd process now joins
    every namespace the container's init is in and gets the rule and no_new_privs the init has.
    No container reaches the bundle now: the test rewrites it from the host, as the user."""
    runtime_env.extra_env["BERTH_RUNTIME"] = "launcher"  # runc exec reads runc's own state file
    process = runtime_env.popen(
        "run", "--name", "victim", "--network", "none", str(runtime_images.busybox), "sh", "-c",
        "echo ready; exec sleep 61")
    try:
        wait_for_line(process, "ready")
        [container_id] = runtime_env.containers()
        bundle_config = runtime_env.state_dir / "containers" / container_id / "bundle" / "config.json"
        config = json.loads(bundle_config.read_text())
        del config["linux"]["seccomp"]
        config["process"]["noNewPrivileges"] = False
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
        bundle_config.write_text(json.dumps(config))  # the same file, still the user's
        result = runtime_env.berth("exec", "victim", "sh", "-c",
                                   "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; cat /proc/net/dev")
        assert result.returncode == 0, describe(result)
        assert "Seccomp:\t2" in result.stdout and "NoNewPrivs:\t1" in result.stdout, describe(result)
        interfaces = [line.split(":")[0].strip() for line in result.stdout.splitlines()
                      if ":" in line and not line.startswith(("Seccomp", "NoNewPrivs"))]
        assert interfaces == ["lo"], describe(result)  # --network none's: not the host's
    finally:
        stop(process)
