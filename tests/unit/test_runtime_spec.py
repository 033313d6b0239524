"""config.json is the contract with runc/crun: pinned by golden files (tests/golden/).

Regenerate after an intended change with BERTH_UPDATE_GOLDEN=1 and review the diff.
"""

import json
import os
from pathlib import Path

import pytest

from berth.runtime.spec import INIT_PATH, BindMount, SpecPlan, build_config, process_args

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def default_plan(**changes) -> SpecPlan:
    values = dict(
        rootfs="/tmp/berth-1001/containers/b0/lower",
        args=process_args(1001, 1001, ["/bin/sh", "-c", "echo hi"], remap_root=False),
        env=("PATH=/usr/bin:/bin", "HOME=/home/alice"),
        cwd="/work",
        uid=1001,
        gid=1001,
        init_path="/opt/berth/libexec/berth/berth-init",
        hostname="node1",
        binds=(
            BindMount("/home/alice", "/home/alice", read_only=False),
            BindMount("/tmp/berth-1001/containers/b0/etc/passwd", "/etc/passwd"),
            BindMount("/tmp/berth-1001/containers/b0/etc/group", "/etc/group"),
            BindMount("/dev/fuse", "/dev/fuse", read_only=False, device=True),
        ),
        tmpfs=("/home",),
        tmp_source="/tmp/berth-1001/containers/b0/tmp",
        annotations=(("org.berth.image", "registry.example/app:1"),),
    )
    values.update(changes)
    return SpecPlan(**values)


CASES = {
    "config-default.json": default_plan(machine="x86_64"),
    "config-remap-root-isolated.json": default_plan(
        args=process_args(1001, 1001, ["/bin/true"], remap_root=True),
        remap_root=True, readonly_root=False, terminal=True, network="none",
        rlimits=(("RLIMIT_DATA", 1 << 30, 1 << 30),), tmp_source=None,
        host_namespaces=("pid",), private_namespaces=("cgroup",),
    ),
    "config-cgroup-v2.json": default_plan(
        cgroups_path="/user.slice/user-1001.slice/berth-b0", cpu_quota_us=150000, memory_limit_bytes=1 << 30,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_matches_golden_file(name):
    produced = json.dumps(build_config(CASES[name]), indent=2, sort_keys=True) + "\n"
    path = GOLDEN / name
    if os.environ.get("BERTH_UPDATE_GOLDEN"):
        path.write_text(produced)
    assert produced == path.read_text(), f"config.json changed; if intended, regenerate {path}"


def test_identity_mode_keeps_only_setfcap_and_enters_nested_namespace():
    config = build_config(default_plan())
    process = config["process"]
    assert process["user"] == {"uid": 0, "gid": 0}
    assert process["args"][:6] == [INIT_PATH, "-u", "1001", "-g", "1001", "--"]
    for kind in ("bounding", "effective", "permitted"):
        assert process["capabilities"][kind] == ["CAP_SETFCAP"]
    assert process["capabilities"]["ambient"] == [] and process["noNewPrivileges"] is True
    assert config["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 1001, "size": 1}]
    assert config["root"]["readonly"] is True


def test_remap_root_drops_every_capability_and_skips_identity_switch():
    config = build_config(default_plan(args=process_args(5, 6, ["id"], remap_root=True), remap_root=True))
    assert config["process"]["args"] == [INIT_PATH, "--", "id"]
    assert all(config["process"]["capabilities"][k] == [] for k in config["process"]["capabilities"])


def test_init_is_mounted_after_dev_tmpfs_and_binds_come_last():
    destinations = [m["destination"] for m in build_config(default_plan())["mounts"]]
    assert destinations.index("/dev") < destinations.index(INIT_PATH)
    assert destinations.index("/home") < destinations.index("/home/alice")
    assert destinations[-1] == "/dev/fuse"


def test_only_device_binds_allow_device_nodes():
    mounts = {m["destination"]: m for m in build_config(default_plan())["mounts"]}
    assert "nodev" not in mounts["/dev/fuse"]["options"]
    assert "nodev" in mounts["/home/alice"]["options"] and "nosuid" in mounts["/home/alice"]["options"]
    assert "ro" in mounts["/etc/passwd"]["options"] and "rw" in mounts["/home/alice"]["options"]


def test_network_none_adds_a_network_namespace_and_host_shares():
    shared = {n["type"] for n in build_config(default_plan())["linux"]["namespaces"]}
    isolated = {n["type"] for n in build_config(default_plan(network="none"))["linux"]["namespaces"]}
    assert shared == {"pid", "ipc", "uts", "mount", "user"}
    assert isolated == shared | {"network"}


def test_no_cgroup_settings_without_delegation():
    linux = build_config(default_plan())["linux"]
    assert "resources" not in linux and "cgroupsPath" not in linux


def test_judged_bind_sources_are_checked_by_init_unless_a_later_bind_hides_them():
    """A bind that carries its source's (st_dev, st_ino) becomes a `-b DEV:INO:DEST` check for
    berth-init (a source swapped after the policy check is refused in the container), except
    when a later bind covers its destination."""
    binds = (BindMount("/s/a", "/data", identity=(1, 2)), BindMount("/s/b", "/data/sub", identity=(3, 4)),
             BindMount("/s/c", "/opt/x", identity=(5, 6)), BindMount("/s/d", "/opt"),
             BindMount("/s/e", "/plain"))
    args = process_args(1001, 1001, ["true"], remap_root=False)
    config = build_config(default_plan(binds=binds, args=args))
    assert config["process"]["args"] == [INIT_PATH, "-b", "1:2:/data", "-b", "3:4:/data/sub", *args[1:]]
    probe = build_config(default_plan(binds=binds, args=(INIT_PATH, "-V")))  # the runtime probe too
    assert probe["process"]["args"][-1] == "-V"


def test_a_root_overlay_is_the_first_mount_onto_the_empty_rootfs():
    config = build_config(default_plan(rootfs="/s/containers/b0/rootfs",
                                root_overlay=("/s/unpacked/K/root", "/s/containers/b0/upper", "/s/containers/b0/work")))
    assert config["root"] == {"path": "/s/containers/b0/rootfs", "readonly": True}
    assert config["mounts"][0] == {
        "destination": "/", "type": "overlay", "source": "overlay",
        "options": ["lowerdir=/s/unpacked/K/root", "upperdir=/s/containers/b0/upper", "workdir=/s/containers/b0/work",
                    "userxattr"]}
    assert [m["destination"] for m in config["mounts"][1:3]] == ["/proc", "/dev"]
    assert all(m["type"] != "overlay" for m in build_config(default_plan())["mounts"])


def test_root_runs_allow_their_bound_device_nodes_in_the_cgroup():
    """runc started by root (not rootless) filters devices by cgroup: each bound device node is
    allowed by its numbers; rootless runs and non-device binds add no rule."""
    host = os.stat("/dev/null")
    binds = (BindMount("/dev/null", "/dev/x", read_only=False, device=True), BindMount("/etc", "/etc2"))
    rules = build_config(default_plan(uid=0, gid=0, binds=binds))["linux"]["resources"]["devices"]
    assert rules == [{"allow": True, "type": "c", "major": os.major(host.st_rdev), "minor": os.minor(host.st_rdev),
                      "access": "rw"}]
    assert "resources" not in build_config(default_plan(binds=binds))["linux"]
    read_only = (BindMount("/dev/null", "/dev/x", read_only=False, device=True, device_access="r"),
                 BindMount("/dev/zero", "/dev/y", read_only=False, device=True, device_access=""))
    rules = build_config(default_plan(uid=0, gid=0, binds=read_only))["linux"]["resources"]["devices"]
    assert [(rule["minor"], rule["access"]) for rule in rules] == [(os.minor(host.st_rdev), "r")]
