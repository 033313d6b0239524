"""Each `berth run` option for real, as berthtest: mounts, workdir, env, network, devices,
writable, remap-root, limits, site policy (mounts, env, forced network), images from the store."""

import json
import os
import stat
import subprocess

import pytest

from tests.harness.fixtures_runtime import BOTH_RUNTIMES, process_cmdlines
from tests.harness.users import berth_executable, describe

pytestmark = pytest.mark.integration


@BOTH_RUNTIMES
def test_mount_read_write_and_read_only(runtime_env, runtime_images):
    scratch = runtime_env.scratch
    (scratch / "in.txt").write_text("from host\n")
    os.chmod(scratch / "in.txt", 0o644)
    result = runtime_env.berth("run", "-v", f"{scratch}:/data", "--mount", f"{scratch}:/ro:ro",
                               str(runtime_images.busybox), "sh", "-c",
                               "cat /ro/in.txt; echo w > /data/w.txt && echo rw-ok; "
                               "echo x > /ro/x.txt || echo ro-refused")
    assert result.returncode == 0, describe(result)
    assert result.stdout.split("\n")[:3] == ["from host", "rw-ok", "ro-refused"]
    assert (scratch / "w.txt").exists() and not (scratch / "x.txt").exists()



@BOTH_RUNTIMES
def test_a_read_only_mount_is_read_only_below_too(runtime_env, runtime_images):
    """A file system the host has mounted below a `-v SRC:DST:ro` source (a project's scratch
    under a read-only software tree, say) is read-only, nosuid and nodev in the container too.
    runc 1.1 applied "ro" to the top mount only: the one below stayed writable."""
    if os.getuid() != 0:
        pytest.skip("mounting a file system below the source needs root (the harness runs as root)")
    source = runtime_env.scratch / "tree"
    (source / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0777,size=1m", "tmpfs", str(source / "sub")], check=True)
    try:
        result = runtime_env.berth("run", "-v", f"{source}:/data:ro", str(runtime_images.busybox), "sh", "-c",
                                   "touch /data/sub/x 2>/dev/null; echo sub=$?; grep ' /data/sub ' /proc/self/mountinfo")
    finally:
        subprocess.run(["umount", "-l", str(source / "sub")], check=True)
    assert result.returncode == 0, describe(result)
    assert result.stdout.splitlines()[0] == "sub=1", describe(result)
    flags = result.stdout.splitlines()[-1].split()[5].split(",")
    assert {"ro", "nosuid", "nodev"} <= set(flags), describe(result)

@BOTH_RUNTIMES
def test_mount_points_missing_in_the_image_are_created_in_an_overlay(runtime_env, runtime_images):
    scratch = runtime_env.scratch
    (scratch / "motd").write_text("hello\n")
    os.chmod(scratch / "motd", 0o644)
    result = runtime_env.berth("run", "--debug", "-v", f"{scratch}:/new/deep/dir", "-v", f"{scratch}/motd:/etc/motd:ro",
                               str(runtime_images.busybox), "sh", "-c",
                               "cat /etc/motd; ls /new/deep/dir | grep -c motd")
    assert result.returncode == 0, describe(result)
    assert result.stdout.split() == ["hello", "1"]
    assert "fuse-overlayfs" in result.stderr and "/new/deep/dir" in result.stderr


def test_relative_mount_source_is_taken_from_the_current_directory(runtime_env, runtime_images):
    (runtime_env.scratch / "rel.txt").write_text("relative\n")
    os.chmod(runtime_env.scratch / "rel.txt", 0o644)
    result = runtime_env.berth("run", "-v", "rel.txt:/etc/rel.txt", str(runtime_images.busybox), "cat", "/etc/rel.txt",
                               cwd=str(runtime_env.scratch))
    assert result.stdout == "relative\n", describe(result)


@BOTH_RUNTIMES
def test_workdir(runtime_env, runtime_images):
    result = runtime_env.berth("run", "-w", "/work", str(runtime_images.busybox), "pwd")
    assert result.stdout.strip() == "/work", describe(result)
    result = runtime_env.berth("run", "-w", "/not/in/image", str(runtime_images.busybox), "pwd")
    assert result.returncode == 0 and result.stdout.strip() == "/not/in/image", describe(result)


@BOTH_RUNTIMES
def test_environment_options_and_no_host_leak(runtime_env, runtime_images):
    env_file = runtime_env.scratch / "vars.env"
    env_file.write_text("# comment\nFROM_FILE=file\nBOTH=file\n")
    os.chmod(env_file, 0o644)
    result = runtime_env.berth(
        "run", "--env-file", str(env_file), "-e", "BOTH=option", "-e", "A=1", "-e", "PICKED",
        str(runtime_images.busybox), "env",
        env={"SLURM_JOB_ID": "77", "OMPI_MCA_btl": "self", "SECRET_TOKEN": "leak", "PICKED": "yes"})
    assert result.returncode == 0, describe(result)
    inside = dict(line.partition("=")[::2] for line in result.stdout.splitlines())
    assert inside["FROM_FILE"] == "file" and inside["BOTH"] == "option" and inside["A"] == "1"
    assert inside["PICKED"] == "yes" and inside["SLURM_JOB_ID"] == "77" and inside["OMPI_MCA_btl"] == "self"
    assert "SECRET_TOKEN" not in inside and "BERTH_STATE_DIR" not in inside
    assert inside["PATH"].startswith("/usr/local/sbin")


def test_bad_env_file_is_refused(runtime_env, runtime_images):
    result = runtime_env.berth("run", "--env-file", "/nonexistent.env", str(runtime_images.busybox), "true")
    assert result.returncode == 125 and "--env-file /nonexistent.env" in result.stderr, describe(result)


def _interfaces(text: str) -> list[str]:
    return sorted(line.split(":")[0].strip() for line in text.splitlines()[2:])


@BOTH_RUNTIMES
def test_network_host_by_default_and_none_isolates(runtime_env, runtime_images):
    with open("/proc/net/dev") as handle:
        host = _interfaces(handle.read())
    if len(host) < 2:
        pytest.skip("this host has only a loopback interface: host and none look alike")
    shared = runtime_env.berth("run", str(runtime_images.busybox), "cat", "/proc/net/dev")
    isolated = runtime_env.berth("run", "--network=none", str(runtime_images.busybox), "cat", "/proc/net/dev")
    assert _interfaces(shared.stdout) == host, describe(shared)
    assert _interfaces(isolated.stdout) == ["lo"], describe(isolated)
    # ... and its loopback is up, as runc makes it (127.0.0.1 works without a network)
    loopback = runtime_env.berth("run", "--network=none", str(runtime_images.busybox), "ip", "link", "show", "lo")
    assert loopback.returncode == 0 and ",UP" in loopback.stdout, describe(loopback)


def _root_only_device() -> str:
    for path in ("/dev/mem", "/dev/loop-control", "/dev/kvm", "/dev/console", "/dev/tty0"):
        if os.path.exists(path) and not stat.S_IMODE(os.stat(path).st_mode) & 0o006:
            return path
    pytest.skip("no root-only device node on this host")


@BOTH_RUNTIMES
def test_device_passthrough_only_when_the_user_can_open_it(runtime_env, runtime_images):
    forbidden = _root_only_device()
    result = runtime_env.berth("run", "--device", "/dev/fuse", str(runtime_images.busybox), "sh", "-c",
                               f"stat -c '%F %t:%T' /dev/fuse; test -e {forbidden} || echo not-there")
    assert result.returncode == 0, describe(result)
    host = os.stat("/dev/fuse")
    numbers = f"{os.major(host.st_rdev):x}:{os.minor(host.st_rdev):x}"
    assert result.stdout.splitlines() == [f"character special file {numbers}", "not-there"]
    refused = runtime_env.berth("run", "--device", forbidden, str(runtime_images.busybox), "true")
    assert refused.returncode == 125 and f"cannot open {forbidden}" in refused.stderr, describe(refused)


@pytest.mark.parametrize("runtime", ["runc", "launcher"])
def test_a_device_reaches_a_container_that_root_starts(runtime, runtime_images, tmp_path):
    """runc started by root is not rootless: it gives the container a cgroup whose device filter
    opens only its default nodes, and a bound device node failed with EPERM (on a real GPU node,
    NVML's "Unknown Error" for /dev/nvidia*). berth allows every device it binds by number then.
    /dev/loop-control is not among runc's defaults. berth-launcher makes no cgroup and runs such
    a config.json too."""
    if os.getuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root (the harness runs as root) and /dev/loop-control")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "BERTH_ALLOW_ROOT": "1",
           "BERTH_RUNTIME": runtime, "BERTH_STATE_DIR": str(tmp_path / "state"),
           "BERTH_USER_STORE": str(tmp_path / "store"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    result = subprocess.run([str(berth_executable()), "run", "--device", "/dev/loop-control", str(runtime_images.busybox),
                             "sh", "-c", "exec 3<>/dev/loop-control && echo opened"],
                            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            check=False, cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert result.stdout == "opened\n", describe(result)


@BOTH_RUNTIMES
def test_writable_root_is_volatile(runtime_env, runtime_images, user):
    result = runtime_env.berth("run", "--writable", str(runtime_images.busybox), "sh", "-c",
                               "echo x > /etc/new.conf && mkdir -p /usr/local/lib/t && echo ok; id -u")
    assert result.returncode == 0, describe(result)
    assert result.stdout.split() == ["ok", str(user.uid)]
    again = runtime_env.berth("run", str(runtime_images.busybox), "sh", "-c",
                              "test -e /etc/new.conf && echo kept || echo gone")
    assert again.stdout.strip() == "gone", describe(again)


@BOTH_RUNTIMES
def test_remap_root_is_uid_0_without_host_privilege(runtime_env, runtime_images, user):
    scratch = runtime_env.scratch
    result = runtime_env.berth("run", "--remap-root", "-v", f"{scratch}:/data", str(runtime_images.busybox), "sh", "-c",
                               "id -u; id -g; grep CapEff /proc/self/status; touch /data/rootfile; "
                               "mount -t tmpfs none /tmp 2>/dev/null && echo mounted || echo no-mount")
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert lines[:2] == ["0", "0"] and lines[2].split() == ["CapEff:", "0000000000000000"]
    assert lines[3] == "no-mount"
    assert os.stat(scratch / "rootfile").st_uid == user.uid


def test_cpu_and_memory_limits_fall_back_and_say_so(runtime_env, runtime_images):
    result = runtime_env.berth("run", "--cpus", "1", "--memory", "64M", str(runtime_images.busybox), "sh", "-c",
                               "grep Cpus_allowed_list /proc/self/status; grep 'Max data size' /proc/self/limits")
    assert result.returncode == 0, describe(result)
    allowed = result.stdout.splitlines()[0].split()[1]
    assert "," not in allowed and "-" not in allowed  # exactly one CPU
    assert result.stdout.splitlines()[1].split()[3:5] == [str(64 << 20), str(64 << 20)]
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        assert "CPU affinity" in result.stderr and "RLIMIT_DATA" in result.stderr


def test_unknown_image_with_pull_never(runtime_env, site_config):
    result = runtime_env.berth("run", "--pull=never", "127.0.0.1:9/none/such:1", "true", env=site_config.env)
    assert result.returncode == 125, describe(result)
    assert "error:" in result.stderr


def test_site_policy_mounts_env_and_forced_network(runtime_env, runtime_images, site_config):
    shared = runtime_env.scratch / "site-shared"
    shared.mkdir()
    (shared / "readme").write_text("site data\n")
    os.chmod(shared / "readme", 0o644)
    site_config.write(f'''
        [[policy.mounts]]
        source = "{shared}"
        destination = "/shared"

        [[policy.mounts]]
        source = "/nonexistent/optional"
        destination = "/opt/x"
        optional = true

        [[policy.env]]
        op = "set"
        name = "SITE_VAR"
        value = "site"

        [[policy.env]]
        op = "prepend"
        name = "PATH"
        value = "/site/bin"

        [policy.namespaces]
        network = "none"
    ''')
    result = runtime_env.berth("run", str(runtime_images.busybox), "sh", "-c",
                               "cat /shared/readme; echo $SITE_VAR; echo $PATH; touch /shared/x || echo ro; "
                               "grep -c : /proc/net/dev", env=site_config.env)
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert lines[:3] == ["site data", "site", "/site/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert lines[3] == "ro" and lines[4] == "1"  # only lo
    refused = runtime_env.berth("run", "--network=host", str(runtime_images.busybox), "true", env=site_config.env)
    assert refused.returncode == 125 and "forces network=none" in refused.stderr, describe(refused)


def test_site_policy_deny_and_allow_lists(runtime_env, runtime_images, site_config):
    allowed = runtime_env.scratch / "allowed"
    allowed.mkdir()
    site_config.write(f'''
        [policy]
        mount_allow = ["{allowed}"]
        mount_deny_destinations = ["/proc", "/sys", "/dev", "/etc/passwd", "/etc/group", "/opt/site"]
    ''')
    ok = runtime_env.berth("run", "-v", f"{allowed}:/in", str(runtime_images.busybox), "true", env=site_config.env)
    assert ok.returncode == 0, describe(ok)
    outside = runtime_env.berth("run", "-v", f"{runtime_env.scratch}:/in", str(runtime_images.busybox), "true",
                                env=site_config.env)
    assert outside.returncode == 125 and "not under an allowed prefix" in outside.stderr, describe(outside)
    denied = runtime_env.berth("run", "-v", f"{allowed}:/opt/site/x", str(runtime_images.busybox), "true",
                               env=site_config.env)
    assert denied.returncode == 125 and "/opt/site" in denied.stderr, describe(denied)


def test_image_from_the_store_uses_its_config(runtime_env, site_config, busybox_image, user):
    site_config.trust_registry(busybox_image.registry.host)
    never = runtime_env.berth("run", "--pull=never", str(busybox_image), "true", env=site_config.env)
    assert never.returncode == 125 and "error:" in never.stderr, describe(never)
    # Pulled on first use (--pull=missing, the default), then found in the store.
    result = runtime_env.berth("run", str(busybox_image), "sh", "-c", "echo $PATH; id -u; cat /etc/os-release",
                               env=site_config.env)
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert lines[0] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert lines[1] == str(user.uid) and 'NAME="berth test busybox"' in lines
    stored = runtime_env.berth("run", "--pull=never", str(busybox_image), "true", env=site_config.env)
    assert stored.returncode == 0, describe(stored)
    always = runtime_env.berth("run", "--pull=always", str(busybox_image), "id", "-un", env=site_config.env)
    assert always.returncode == 0 and always.stdout.strip() == user.name, describe(always)


def test_group_policy_applies_to_members_only(runtime_env, runtime_images, site_config, user):
    import grp

    group_dir = runtime_env.scratch / "group-tools"
    group_dir.mkdir()
    site_config.write(f'''
        [[policy.groups]]
        group = "{grp.getgrgid(user.gid).gr_name}"
        devices = ["/dev/fuse"]

        [[policy.groups.mounts]]
        source = "{group_dir}"
        destination = "/opt/group-tools"

        [[policy.groups.env]]
        op = "set"
        name = "GROUP_VAR"
        value = "member"

        [[policy.groups]]
        group = "root"

        [[policy.groups.env]]
        op = "set"
        name = "ROOT_VAR"
        value = "leaked"
    ''')
    result = runtime_env.berth("run", str(runtime_images.busybox), "sh", "-c",
                               "echo ${GROUP_VAR:-none} ${ROOT_VAR:-none}; test -d /opt/group-tools && echo mounted; "
                               "test -c /dev/fuse && echo device", env=site_config.env)
    assert result.returncode == 0, describe(result)
    assert result.stdout.splitlines() == ["member none", "mounted", "device"]


def test_runtime_option_respects_a_site_pin(runtime_env, runtime_images, site_config):
    site_config.write('runtime = "runc"\npinned = ["runtime"]\n')
    result = runtime_env.berth("run", "--runtime", "crun", str(runtime_images.busybox), "true", env=site_config.env)
    assert result.returncode == 125 and "pins runtime = runc" in result.stderr, describe(result)
    same = runtime_env.berth("run", "--runtime", "runc", str(runtime_images.busybox), "true", env=site_config.env)
    assert same.returncode == 0, describe(same)


@BOTH_RUNTIMES
def test_site_can_force_host_pid_ipc_uts_namespaces(runtime_env, runtime_images, site_config, user):
    site_config.write('[policy.namespaces]\npid = "host"\nipc = "host"\nuts = "host"\n')
    result = runtime_env.berth("run", "--hostname", "ignored", str(runtime_images.busybox), "sh", "-c",
                               "ls /proc | grep -c '^[0-9]'; hostname; id -u; grep CapEff /proc/self/status",
                               env=site_config.env)
    assert result.returncode == 0, describe(result)
    count, hostname, uid, caps = result.stdout.splitlines()
    assert int(count) > 10  # the host's processes: the PID namespace is the host's
    assert hostname == os.uname().nodename and uid == str(user.uid)
    assert caps.split() == ["CapEff:", "0000000000000000"]
    assert "ignoring --hostname" in result.stderr


@BOTH_RUNTIMES
def test_a_daemon_does_not_outlive_its_container_in_the_hosts_pid_namespace(runtime_env, runtime_images,
                                                                            site_config, user):
    """With the site's host pid namespace no container init takes the container's processes
    with it: a daemon that left the command's session (setsid; and one by a double fork, whose
    parent is gone before the command ends) outlived its container, on both runtimes. berth is
    their subreaper now and ends them before it returns."""
    site_config.write('[policy.namespaces]\npid = "host"\n')
    script = ("setsid sleep 987 </dev/null >/dev/null 2>&1 & echo $!; "
              "(setsid sleep 988 </dev/null >/dev/null 2>&1 & echo $! > /tmp/second) ; cat /tmp/second")
    result = runtime_env.berth("run", str(runtime_images.busybox), "sh", "-c", script, env=site_config.env)
    pids = [int(line) for line in result.stdout.split()] if result.returncode == 0 else []
    left = [(pid, command) for pid, command in process_cmdlines(user.uid) if command.startswith(b"sleep\x0098")]
    for pid, _ in left:
        os.kill(pid, 9)
    assert result.returncode == 0 and len(pids) == 2, describe(result)
    assert left == [], f"left behind: {left} (the daemons were {pids})"


def test_concurrent_cpu_limited_containers_spread_over_cpus(runtime_env, runtime_images):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    first = runtime_env.popen("run", "--cpus", "1", str(runtime_images.busybox), "sh", "-c",
                              "grep Cpus_allowed_list /proc/self/status; sleep 30")
    try:
        first_cpu = first.stdout.readline().split()[1]
        second = runtime_env.berth("run", "--cpus", "1", str(runtime_images.busybox), "grep", "Cpus_allowed_list",
                                   "/proc/self/status")
        assert second.returncode == 0, describe(second)
        assert second.stdout.split()[1] != first_cpu
    finally:
        first.terminate()
        first.communicate(timeout=20)


def test_site_stage_to_local_mounts_a_node_local_copy(runtime_env, runtime_images, site_config):
    site_config.write("stage_to_local = true\n")
    result = runtime_env.berth("--debug", "run", str(runtime_images.busybox), "cat", "/etc/passwd",
                               env=site_config.env)
    assert result.returncode == 0, describe(result)
    copies = sorted(p for p in (runtime_env.state_dir / "images").iterdir() if p.suffix == ".sqfs")
    assert len(copies) == 1 and copies[0].read_bytes() == runtime_images.busybox.read_bytes()
    assert f"mounting the node-local copy {copies[0]}" in result.stderr, describe(result)
    assert copies[0].stat().st_uid == runtime_env.user.uid
    again = runtime_env.berth("run", str(runtime_images.busybox), "true", env=site_config.env)
    assert again.returncode == 0, describe(again)
    assert sorted(p for p in (runtime_env.state_dir / "images").iterdir() if p.suffix == ".sqfs") == copies


def test_a_cdi_device_allowed_read_only_is_read_only_in_a_container_that_root_starts(runtime_images, tmp_path):
    """A CDI spec's "permissions": "r" reached no rule: every device rule said "rw", and a
    read-only mount does not stop writes to a device node (review of 4 December). runc's device
    cgroup now allows only reads; the launcher, which makes no cgroup, leaves such a run to runc."""
    if os.getuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root (the harness runs as root) and /dev/loop-control")
    site = tmp_path / "site"
    cdi = site / "cdi"
    cdi.mkdir(parents=True)
    for directory in (tmp_path, site, cdi):
        directory.chmod(0o755)
    (cdi / "loop.json").write_text(json.dumps({"cdiVersion": "0.6.0", "kind": "example.com/loop", "devices": [
        {"name": "ctl", "containerEdits": {"deviceNodes": [{"path": "/dev/loop-control", "permissions": "r"}]}}]}))
    (site / "berth.toml").write_text(f'[devices]\ncdi_dirs = ["{cdi}"]\n')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "BERTH_ALLOW_ROOT": "1",
           "BERTH_CONFIG_DIR": str(site), "BERTH_STATE_DIR": str(tmp_path / "state"),
           "BERTH_USER_STORE": str(tmp_path / "store"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    result = subprocess.run([str(berth_executable()), "run", "--device", "example.com/loop=ctl", str(runtime_images.busybox),
                             "sh", "-c", "exec 3</dev/loop-control && echo read; exec 4<>/dev/loop-control && echo wrote"],
                            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            check=False, cwd=tmp_path)
    assert result.stdout == "read\n", describe(result)
    assert result.returncode != 0, describe(result)
