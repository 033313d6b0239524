"""In-root path resolution, mount points, policy checks and limit planning."""

import os

import pytest

from berth.config.settings import Settings, SitePolicy
from berth.errors import PolicyError, UsageError
from berth.runtime import limits
from berth.runtime.options import MountRequest, RunOptions
from berth.runtime.policy import check_destination, check_options, resolve_source, resolve_user_mounts
from berth.runtime.rootfs import (
    MountPoint,
    create_mount_points,
    missing_mount_points,
    normalize_container_path,
    resolve_in_root,
)


@pytest.fixture
def root(tmp_path):
    base = tmp_path / "root"
    for d in ("etc", "usr/bin", "home"):
        (base / d).mkdir(parents=True)
    (base / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (base / "abs").symlink_to("/etc")
    (base / "rel").symlink_to("../../../../etc")
    (base / "loop").symlink_to("loop")
    (base / "bin").symlink_to("usr/bin")
    return base


def test_normalize():
    assert normalize_container_path("../../") == "/"
    assert normalize_container_path("//a/./b/../c/") == "/a/c"
    assert normalize_container_path("rel") == "/rel"


def test_symlinks_are_resolved_inside_the_root(root):
    assert resolve_in_root(str(root), "/abs/passwd") == ("/etc/passwd", True)
    assert resolve_in_root(str(root), "/rel/passwd") == ("/etc/passwd", True)
    assert resolve_in_root(str(root), "/bin") == ("/usr/bin", True)
    assert resolve_in_root(str(root), "/abs/shadow") == ("/etc/shadow", False)
    path, exists = resolve_in_root(str(root), "/loop/x")
    assert not exists


def test_missing_mount_points_skip_existing_and_creatable(root):
    needed = [MountPoint("/etc/passwd", False), MountPoint("/etc/group", False), MountPoint("/home", True),
              MountPoint("/home/alice", True), MountPoint("/data", True), MountPoint("/tmp/x", True),
              MountPoint("/abs/hosts", False)]
    missing = missing_mount_points(str(root), needed, creatable_under=["/home", "/tmp"])
    # /home/alice and /tmp/x lie under tmpfs mounts runc creates them in; /abs is a link to /etc.
    assert missing == [MountPoint("/etc/group", False), MountPoint("/data", True), MountPoint("/etc/hosts", False)]


def test_create_mount_points(tmp_path):
    create_mount_points(str(tmp_path), [MountPoint("/a/b", True), MountPoint("/etc/passwd", False)])
    assert (tmp_path / "a" / "b").is_dir() and (tmp_path / "etc" / "passwd").is_file()


@pytest.mark.parametrize("destination,message", [
    ("relative", "absolute"), ("/data/../etc", "'..'"), ("/", "root directory"), ("/proc/self", "/proc"),
    ("/dev/.berth-init", "reserved"), ("/etc/passwd", "/etc/passwd"), ("//sys", "/sys"),
])
def test_bad_destinations(destination, message):
    deny = SitePolicy().mount_deny_destinations
    with pytest.raises(PolicyError, match=message):
        check_destination(destination, what="-v", deny=deny)


@pytest.mark.parametrize("destination,covered", [
    ("/etc", "/etc/passwd"), ("/etc/", "/etc/passwd"), ("//etc", "/etc/passwd"),
])
def test_a_destination_covering_a_protected_path_is_refused_like_the_path_itself(destination, covered):
    """Issue 9 defect 7: a mount over all of /etc hides /etc/passwd as surely as one over it."""
    deny = SitePolicy().mount_deny_destinations
    with pytest.raises(PolicyError, match=f"would cover {covered}"):
        check_destination(destination, what="-v", deny=deny)


def test_a_destination_covering_berths_init_is_refused_even_when_the_site_allows_dev():
    with pytest.raises(PolicyError, match="would cover /dev/.berth-init"):
        check_destination("/dev", what="-v", deny=("/etc/passwd",))
    assert check_destination("/etc/ssl", what="-v", deny=("/etc/passwd",)) == "/etc/ssl"


def test_destination_normalized():
    assert check_destination("/data//x/", what="-v", deny=()) == "/data/x"


def test_sources_are_resolved_before_judging(tmp_path):
    settings = Settings()
    link = tmp_path / "innocent"
    link.symlink_to("/etc/shadow")
    with pytest.raises(PolicyError, match="resolves to /etc/shadow"):
        resolve_source(str(link), what="-v", settings=settings)
    with pytest.raises(PolicyError, match="/proc"):
        resolve_source("/proc/1/root", what="-v", settings=settings)
    with pytest.raises(UsageError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"), what="-v", settings=settings)
    real = tmp_path / "data"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    assert resolve_source(str(tmp_path / "alias"), what="-v", settings=settings) == str(real)


def test_allow_list(tmp_path):
    settings = Settings(policy=SitePolicy(mount_allow=(str(tmp_path / "ok"),)))
    (tmp_path / "ok").mkdir()
    (tmp_path / "other").mkdir()
    options = RunOptions(mounts=(MountRequest(str(tmp_path / "ok"), "/ok"),))
    assert resolve_user_mounts(settings, options)[0].source == str(tmp_path / "ok")
    with pytest.raises(PolicyError, match="allowed prefix"):
        check_options(settings, RunOptions(mounts=(MountRequest(str(tmp_path / "other"), "/x"),)))


def test_forced_network_cannot_be_overridden():
    settings = Settings(policy=SitePolicy(forced_namespaces=(("network", "none"),)))
    check_options(settings, RunOptions(network="none"))
    with pytest.raises(PolicyError, match="forces network=none"):
        check_options(settings, RunOptions(network="host"))


def test_a_pinned_runtime_cannot_be_overridden_by_options():
    """Issue 12 #7: the one check that `berth run`, template custom options and submissions share."""
    pinned = Settings(runtime="runc", pinned=("runtime",))
    check_options(pinned, RunOptions(runtime="runc"))
    check_options(Settings(runtime="runc"), RunOptions(runtime="crun"))  # not pinned: the user may choose
    with pytest.raises(PolicyError, match="--runtime crun: the site configuration pins runtime = runc"):
        check_options(pinned, RunOptions(runtime="crun"))


def test_devices_must_be_device_nodes(tmp_path):
    with pytest.raises(PolicyError, match="not under /dev"):
        check_options(Settings(), RunOptions(devices=(str(tmp_path),)))
    with pytest.raises(PolicyError, match="not a device"):
        check_options(Settings(), RunOptions(devices=("/dev/shm",)))


def test_limit_fallback_without_delegation(monkeypatch):
    monkeypatch.setattr(limits, "delegated_cgroup", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    plan = limits.plan_limits(1.5, 1 << 30, "b1")
    assert plan.cpu_set == frozenset({0, 1}) and plan.rlimits == (("RLIMIT_DATA", 1 << 30, 1 << 30),)
    assert plan.cgroups_path is None and "CPU affinity" in plan.notes[0] and "RLIMIT_DATA" in plan.notes[1]
    assert limits.plan_limits(None, None, "b1") == limits.LimitPlan()


def test_limits_with_delegation(monkeypatch):
    monkeypatch.setattr(limits, "delegated_cgroup", lambda: "/sys/fs/cgroup/user.slice/u")
    plan = limits.plan_limits(2, 1 << 20, "b1")
    assert plan.cgroups_path == "/user.slice/u/berth-b1"
    assert (plan.cpu_quota_us, plan.memory_limit_bytes) == (200000, 1 << 20)
    assert plan.cpu_set is None and plan.rlimits == ()


def test_delegated_cgroup_is_the_nearest_writable_ancestor_with_controllers(tmp_path):
    root = tmp_path / "cgroup"
    service = root / "user.slice" / "user@1001.service"
    scope = service / "app.slice" / "job.scope"
    scope.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    for directory in (root, root / "user.slice", service, service / "app.slice", scope):
        (directory / "cgroup.procs").write_text("")
        (directory / "cgroup.subtree_control").write_text("")
    (service / "cgroup.subtree_control").write_text("cpu memory pids\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/user.slice/user@1001.service/app.slice/job.scope\n")
    assert limits.delegated_cgroup(str(root), str(proc)) == str(service)
    (service / "cgroup.subtree_control").write_text("pids\n")
    assert limits.delegated_cgroup(str(root), str(proc)) is None
    (root / "cgroup.controllers").unlink()
    assert limits.delegated_cgroup(str(root), str(proc)) is None


def test_affinity_prefers_the_least_used_cpus(monkeypatch):
    monkeypatch.setattr(limits, "delegated_cgroup", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert limits.plan_limits(1, None, "b1", busy_cpus={0: 1}).cpu_set == frozenset({1})
    assert limits.plan_limits(2, None, "b1", busy_cpus={0: 2, 1: 1, 2: 1}).cpu_set == frozenset({1, 3})


def test_device_destinations():
    from berth.runtime.devices.edits import device_destination

    assert device_destination("/dev/nvidia0", "/dev/nvidia0", what="--device") == "/dev/nvidia0"
    assert device_destination("/home/me/gpu", "/dev/nvidia0", what="--device") == "/dev/nvidia0"
    with pytest.raises(PolicyError, match="'..'"):
        device_destination("/dev/../etc/passwd", "/dev/null", what="--device")
    with pytest.raises(PolicyError, match="not a device path"):
        device_destination("/dev/.berth-init", "/dev/null", what="--device")


def test_user_mounts_carry_the_judged_source_identity(tmp_path):
    """berth-init compares the mount with the (st_dev, st_ino) of what policy judged."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    options = RunOptions(mounts=(MountRequest(str(tmp_path / "link"), "/x", read_only=True),))
    [mount] = resolve_user_mounts(Settings(), options)
    info = os.stat(tmp_path / "real")
    assert (mount.source, mount.identity) == (str(tmp_path / "real"), (info.st_dev, info.st_ino))


def test_root_gets_a_warning_unless_allowed():
    from berth.runtime.policy import root_warning

    assert "running as root" in root_warning(0, {})
    assert "BERTH_ALLOW_ROOT=1" in root_warning(0, {"BERTH_ALLOW_ROOT": "0"})
    assert root_warning(0, {"BERTH_ALLOW_ROOT": "1"}) is None
    assert root_warning(1001, {}) is None
