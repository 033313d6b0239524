"""Device edits, CDI specs, the ld.so cache reader and the GPU generator, on a fake driver tree
(issue 13: every refusal, selection, renumbering). Needs root for mknod, as scripts/test.sh runs."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from berth.config.settings import DeviceSettings, EnvOp, Settings
from berth.errors import ConfigError, PolicyError, UsageError
from berth.record import replace
from berth.runtime import spec
from berth.runtime.devices import cdi, edits, gpus, ldcache
from tests.harness.gpu_tree import DRIVER_VERSION, make_fake_driver_tree, uuid_of


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_fake_driver_tree(tmp_path_factory.mktemp("gpu") / "tree", gpus=4)


@pytest.fixture
def settings(tree, tmp_path):
    devices = DeviceSettings(dev_dir=str(tree.dev_dir), nvidia_proc_dir=str(tree.proc_dir),
                             ld_cache=str(tree.ld_cache), bin_dirs=(str(tree.bin_dir),),
                             cdi_dirs=(str(tmp_path / "etc-cdi"), str(tmp_path / "run-cdi")),
                             mount_allow=(str(tree.root), "/usr"))
    (tmp_path / "etc-cdi").mkdir()
    (tmp_path / "run-cdi").mkdir()
    return Settings(state_dir=tmp_path / "state", devices=devices)


def _spec(kind="vendor.example/ve", devices=None, **top):
    return {"cdiVersion": "0.6.0", "kind": kind,
            "devices": devices if devices is not None else [
                {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}], **top}


def _write(settings, document, name="vendor.json", rank=0):
    path = Path(settings.devices.cdi_dirs[rank]) / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


# --- the ld.so cache --------------------------------------------------------------------------

def test_ld_cache_reads_what_ldconfig_prints():
    listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout.splitlines()[1:]
    expected: dict[str, str] = {}
    for line in listed:
        name, rest = line.strip().split(" (", 1)
        if "x86-64" in rest:
            expected.setdefault(name, rest.split("=> ")[1])
    assert ldcache.read("/etc/ld.so.cache") == expected and "libc.so.6" in expected


def test_ld_cache_of_the_fake_driver(tree):
    libraries = ldcache.read(str(tree.ld_cache))
    assert libraries["libcuda.so.1"] == str(tree.lib_dir / "libcuda.so.1")
    found = ldcache.find(libraries, ("libnvidia-ml.so.*", "libcuda.so.1", "libnvidia-nvvm.so.4"))
    assert [name for name, _ in found] == ["libnvidia-ml.so.1", "libcuda.so.1"]


@pytest.mark.parametrize("data", [b"", b"not a cache at all", b"glibc-ld.so.cache1.1" + b"\xff" * 28 + b"\0" * 8])
def test_ld_cache_garbage_is_an_error(data):
    with pytest.raises(ConfigError, match="ld.so cache /x"):
        ldcache.parse(data, "/x")


# --- CDI specs --------------------------------------------------------------------------------

def test_cdi_spec_with_every_field(settings, tree):
    tool = tree.bin_dir / "nvidia-smi"
    document = _spec(devices=[{"name": "ve0", "annotations": {"a": "b"}, "containerEdits": {
        "env": ["VE_NODE=0"],
        "deviceNodes": [{"path": "/dev/veslot0", "hostPath": "/dev/nvidia1", "type": "c", "major": 1, "minor": 3,
                         "fileMode": 0o666, "permissions": "rw", "uid": 0, "gid": 0}],
        "mounts": [{"hostPath": str(tree.lib_dir), "containerPath": "/opt/ve/lib", "options": ["ro", "bind"]}],
        "hooks": [{"hookName": "createContainer", "path": str(tool), "args": ["nvidia-smi", "-L"],
                   "env": ["X=1"], "timeout": 5}],
    }}], containerEdits={"env": ["VE_COMMON=1"]})
    _write(settings, document)
    found = cdi.device_edits(settings, "vendor.example/ve=ve0", what="--device vendor.example/ve=ve0")
    applied = edits.apply_edits(settings, [found])
    assert [(b.source, b.destination, b.device) for b in applied.devices] == [
        (str(tree.dev_dir / "nvidia1"), "/dev/veslot0", True)]
    assert [(b.source, b.destination, b.read_only) for b in applied.mounts] == [
        (str(tree.lib_dir), "/opt/ve/lib", True)]
    assert applied.env == (EnvOp("set", "VE_NODE", "0"), EnvOp("set", "VE_COMMON", "1"))
    assert applied.hooks == (spec.Hook("createContainer", str(tool), ("nvidia-smi", "-L"), ("X=1",), 5),)
    config = spec.build_config(spec.SpecPlan(rootfs="/r", args=("true",), env=(), cwd="/", uid=1, gid=1,
                                             init_path="/i", hostname="h", hooks=applied.hooks))
    assert config["hooks"] == {"createContainer": [{"path": str(tool), "args": ["nvidia-smi", "-L"],
                                                    "env": ["X=1"], "timeout": 5}]}


def test_cdi_yaml_spec(settings):
    pytest.importorskip("yaml")
    _write(settings, "cdiVersion: 0.5.0\nkind: vendor.example/ve\ndevices:\n- name: all\n  containerEdits:\n"
                     "    env: [A=1]\n", name="ve.yaml")
    assert cdi.device_edits(settings, "vendor.example/ve=all", what="--device").env == (EnvOp("set", "A", "1"),)


@pytest.mark.parametrize("document,message", [
    ("{not json", "is not valid JSON"),
    (_spec(cdiVersion="0.1.0"), "cdiVersion: '0.1.0' is not a CDI version"),
    (_spec(kind="no-slash"), "kind: 'no-slash' is not valid"),
    (_spec(extra=1), "extra: unknown key"),
    (_spec(devices=[{"name": "0", "containerEdits": {"deviceNodes": [{"path": "dev/x"}]}}]),
     r"devices\[0\].containerEdits.deviceNodes\[0\].path: 'dev/x' must be an absolute path"),
    (_spec(devices=[{"name": "0", "containerEdits": {"mounts": [{"hostPath": "/usr", "containerPath": "/x",
                                                                 "type": "overlay"}]}}]),
     r"mounts\[0\].type: 'overlay': berth applies bind mounts only"),
    (_spec(devices=[{"name": "0", "containerEdits": {"env": ["NOEQUALS"]}}]), r"env\[0\]: 'NOEQUALS' is not KEY=VALUE"),
    (_spec(devices=[{"name": "0", "containerEdits": {"hooks": [{"hookName": "sometime", "path": "/bin/true"}]}}]),
     r"hooks\[0\].hookName: 'sometime' is not one of"),
    (_spec(devices=[{"name": "0", "containerEdits": {"hooks": [{"hookName": "poststop", "path": "/bin/true",
                                                                 "env": ["1X=2"]}]}}]),
     r"hooks\[0\].env\[0\]: '1X=2' is not KEY=VALUE"),
    (_spec(devices=[{"name": "0", "containerEdits": {}}, {"name": "0", "containerEdits": {}}]), "defined twice"),
    (_spec(devices=[]), "devices: must be a non-empty list"),
    ('{"a":' * 40 + "1" + "}" * 40, "nests deeper than"),
    ("x" * (cdi.MAX_SPEC_BYTES + 1), "larger than"),
])
def test_malformed_specs_are_refused_naming_file_and_key(settings, document, message):
    file = _write(settings, document)
    with pytest.raises(ConfigError, match=message) as caught:
        cdi.device_edits(settings, "vendor.example/ve=0", what="--device vendor.example/ve=0")
    assert file in caught.value.message and caught.value.message.startswith("--device vendor.example/ve=0: ")


def test_yaml_alias_bomb_hits_the_value_budget(settings):
    pytest.importorskip("yaml")
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]
    _write(settings, "\n".join(lines) + "\n", name="bomb.yaml")
    with pytest.raises(ConfigError, match="more than 100000 values"):
        cdi.device_edits(settings, "vendor.example/ve=0", what="--device")


def test_unknown_cdi_device_names_what_exists(settings):
    _write(settings, _spec())
    with pytest.raises(UsageError, match=r"unknown CDI device vendor.example/ve=7 \(devices of kind vendor.example/ve: "
                                         r"vendor.example/ve=0\)"):
        cdi.device_edits(settings, "vendor.example/ve=7", what="--device vendor.example/ve=7")
    with pytest.raises(UsageError, match="no spec in .* defines kind other.example/fpga"):
        cdi.device_edits(settings, "other.example/fpga=0", what="--device")
    with pytest.raises(UsageError, match="is not a CDI device name"):
        cdi.device_edits(settings, "vendor.example/ve=bad name", what="--device")


def test_later_directory_wins_and_same_directory_conflicts(settings):
    _write(settings, _spec(devices=[{"name": "0", "containerEdits": {"env": ["FROM=etc"]}}]), rank=0)
    _write(settings, _spec(devices=[{"name": "0", "containerEdits": {"env": ["FROM=run"]}}]), rank=1)
    assert cdi.device_edits(settings, "vendor.example/ve=0", what="--device").env == (EnvOp("set", "FROM", "run"),)
    _write(settings, _spec(devices=[{"name": "0", "containerEdits": {"env": ["FROM=run2"]}}]), name="b.json", rank=1)
    with pytest.raises(ConfigError, match="defined by several specs of one directory"):
        cdi.device_edits(settings, "vendor.example/ve=0", what="--device")


def test_unsupported_edits_are_refused_when_used(settings):
    _write(settings, _spec(devices=[{"name": "0", "containerEdits": {"additionalGids": [44]}},
                                    {"name": "1", "containerEdits": {"env": ["OK=1"]}}]))
    assert cdi.device_edits(settings, "vendor.example/ve=1", what="--device").env == (EnvOp("set", "OK", "1"),)
    with pytest.raises(ConfigError, match="cannot apply containerEdits additionalGids"):
        cdi.device_edits(settings, "vendor.example/ve=0", what="--device")



def test_specs_that_other_users_wrote_or_can_change_are_refused(settings):
    """A spec's hooks run as the caller (any program: /usr/bin/sh -c ... is under mount_allow),
    so a spec owned by another user, or writable by others or a group other than root, is
    refused (every CDI request fails naming it) rather than read."""
    path = _write(settings, _spec())
    os.chmod(path, 0o644)
    assert cdi.device_edits(settings, "vendor.example/ve=0", what="--device").origin.endswith(f"({path})")
    for mode, gid, message in ((0o646, 0, r"writable by others \(mode 0646\)"),
                               (0o664, 4321, r"writable by group 4321 \(mode 0664\)")):
        os.chmod(path, mode)
        os.chown(path, -1, gid)
        with pytest.raises(ConfigError, match=f"CDI spec {path}: {message}"):
            cdi.device_edits(settings, "vendor.example/ve=0", what="--device")
    os.chmod(path, 0o664)
    os.chown(path, -1, 0)  # group root may write (root's own group)
    assert cdi.device_edits(settings, "vendor.example/ve=0", what="--device").env == ()
    os.chmod(path, 0o644)
    os.chown(path, 4321, -1)
    with pytest.raises(ConfigError, match=f"CDI spec {path}: owned by uid 4321, neither root nor you"):
        cdi.device_edits(settings, "vendor.example/ve=0", what="--device")


# --- judging edits ----------------------------------------------------------------------------

def test_mount_source_outside_allowed_places_is_refused(settings, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _write(settings, _spec(devices=[{"name": "0", "containerEdits": {
        "mounts": [{"hostPath": str(outside), "containerPath": "/opt/x"}]}}]))
    found = cdi.device_edits(settings, "vendor.example/ve=0", what="--device vendor.example/ve=0")
    with pytest.raises(PolicyError, match=f"the mount source {outside} is not under an allowed place"):
        edits.apply_edits(settings, [found])
    # A link from an allowed place to a forbidden one is judged by what it resolves to.
    link = Path(settings.devices.mount_allow[0]) / "link-to-etc"
    link.symlink_to("/etc")
    try:
        edit = edits.ContainerEdits("spec", mounts=(edits.Mount(str(link / "shadow"), "/x"),))
        with pytest.raises(PolicyError, match="resolves to /etc/shadow"):
            edits.apply_edits(settings, [edit])
    finally:
        link.unlink()


@pytest.mark.parametrize("change, message", [
    ("program-others", r"the hook program {program} is writable by others \(mode 0757\)"),
    ("program-group", r"the hook program {program} is writable by group 4321 \(mode 0775\)"),
    ("program-owner", r"the hook program {program} is owned by uid 4321, neither root nor you"),
    ("directory-others", r"the directory {directory} of hook program {program} is writable by others \(mode 0777\)"),
])
def test_a_hook_program_that_other_users_can_change_is_refused(settings, tree, change, message):
    """A spec's writers are judged because its hooks run programs as every user of its devices;
    the program itself was not: whoever owns it or can write it (or its directory) could run
    code as everyone who asks for the device, through a spec root wrote."""
    directory = tree.root / f"hooks-{change}"
    directory.mkdir(mode=0o755)
    program = directory / "hook"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    edit = edits.ContainerEdits("CDI device vendor.example/ve=0", hooks=(spec.Hook("createRuntime", str(program)),))
    assert edits.apply_edits(settings, [edit]).hooks[0].path == str(program)
    if change == "program-others":
        program.chmod(0o757)
    elif change == "program-group":
        program.chmod(0o775)
        os.chown(program, -1, 4321)
    elif change == "program-owner":
        os.chown(program, 4321, -1)
    else:
        directory.chmod(0o777)
    with pytest.raises(PolicyError, match=message.format(program=program, directory=directory)):
        edits.apply_edits(settings, [edit])
    directory.chmod(0o1777)  # sticky: others cannot replace the program, only add names
    if change == "directory-others":
        assert edits.apply_edits(settings, [edit]).hooks[0].path == str(program)


@pytest.mark.parametrize("change, message", [
    ("source-others", r"the mount source {source} is writable by others \(mode 0646\)"),
    ("source-group", r"the mount source {source} is writable by group 4321 \(mode 0664\)"),
    ("source-owner", r"the mount source {source} is owned by uid 4321, neither root nor you"),
    ("directory-others", r"the directory {directory} of mount source {source} is writable by others \(mode 0777\)"),
])
def test_a_cdi_mount_source_that_other_users_can_change_is_refused(settings, tree, change, message):
    """A spec's mount sources were judged by place (mount_allow) only: a library or tool that
    another user can change was bound into every container asking for the device, which then
    loads or runs it as its user. Refused naming the spec and the path; root's files (and a
    sticky directory's) are fine."""
    directory = tree.root / f"mounts-{change}"
    directory.mkdir(mode=0o755)
    source = directory / "libvendor.so"
    source.write_text("library")
    source.chmod(0o644)
    spec_file = _write(settings, _spec(devices=[{"name": "0", "containerEdits": {
        "mounts": [{"hostPath": str(source), "containerPath": "/usr/lib/libvendor.so"}]}}]))
    found = cdi.device_edits(settings, "vendor.example/ve=0", what="--device vendor.example/ve=0")
    assert edits.apply_edits(settings, [found]).mounts[0].source == str(source)
    if change == "source-others":
        source.chmod(0o646)
    elif change == "source-group":
        source.chmod(0o664)
        os.chown(source, -1, 4321)
    elif change == "source-owner":
        os.chown(source, 4321, -1)
    else:
        directory.chmod(0o777)
    with pytest.raises(PolicyError, match=message.format(source=source, directory=directory)) as caught:
        edits.apply_edits(settings, [found])
    assert f"--device vendor.example/ve=0 ({spec_file})" in caught.value.message
    if change == "directory-others":
        directory.chmod(0o1777)
        assert edits.apply_edits(settings, [found]).mounts[0].source == str(source)


def test_mount_destinations_follow_the_user_mount_rules(settings, tree):
    for destination, message in (("/proc/x", "/proc"), ("/etc/passwd", "/etc/passwd"), ("/dev/.berth-init", "reserved")):
        edit = edits.ContainerEdits("spec", mounts=(edits.Mount(str(tree.lib_dir), destination),))
        with pytest.raises(PolicyError, match=message):
            edits.apply_edits(settings, [edit])


def test_device_nodes_are_judged(settings, tree):
    def apply(node):
        return edits.apply_edits(settings, [edits.ContainerEdits("spec", device_nodes=(node,))])

    assert apply(edits.DeviceNode("/dev/nvidia2")).devices[0].source == str(tree.dev_dir / "nvidia2")
    # A spec's permissions reach the device cgroup rule root's runc sets (a read-only mount does
    # not stop writes to a device node; review of 4 December: every rule said "rw").
    assert apply(edits.DeviceNode("/dev/nvidia2")).devices[0].device_access == "rw"
    assert apply(edits.DeviceNode("/dev/nvidia2", permissions="r")).devices[0].device_access == "r"
    with pytest.raises(UsageError, match="/dev/nvidia9 does not exist on this node"):
        apply(edits.DeviceNode("/dev/nvidia9"))
    with pytest.raises(PolicyError, match="not a device node"):
        apply(edits.DeviceNode("/dev/x", host_path=str(tree.dev_dir)))
    with pytest.raises(PolicyError, match="has major number 1, not 195"):
        apply(edits.DeviceNode("/dev/nvidia0", major=195))
    with pytest.raises(PolicyError, match="not type 'b'"):
        apply(edits.DeviceNode("/dev/nvidia0", type="b"))
    with pytest.raises(PolicyError, match="not under /dev"):
        apply(edits.DeviceNode("/dev/x", host_path="/etc/passwd"))
    with pytest.raises(PolicyError, match="not a device path under /dev"):
        apply(edits.DeviceNode("/etc/passwd", host_path="/dev/nvidia0"))
    with pytest.raises(PolicyError, match="also given by first"):
        edits.apply_edits(settings, [edits.ContainerEdits("first", device_nodes=(edits.DeviceNode("/dev/x", "/dev/nvidia0"),)),
                                     edits.ContainerEdits("second", device_nodes=(edits.DeviceNode("/dev/x", "/dev/nvidia1"),))])


def test_device_requests_paths_groups_and_cdi(settings, tree):
    groups = replace(settings.devices, groups=(("rdma", ("/dev/infiniband/*",)), ("ctl", ("/dev/nvidiactl",))))
    settings = replace(settings, devices=groups)
    with pytest.raises(UsageError, match="none of the devices of group 'rdma'"):
        edits.device_request_edits(settings, "rdma", what="--device rdma")
    tree.node("infiniband/uverbs0")
    tree.node("infiniband/rdma_cm")
    try:
        group = edits.device_request_edits(settings, "rdma", what="--device rdma")
        applied = edits.apply_edits(settings, [group, edits.device_request_edits(settings, "/dev/nvidiactl", what="--device")])
        assert [b.destination for b in applied.devices] == [
            "/dev/infiniband/rdma_cm", "/dev/infiniband/uverbs0", "/dev/nvidiactl"]
    finally:
        for name in ("uverbs0", "rdma_cm"):
            (tree.dev_dir / "infiniband" / name).unlink()
    with pytest.raises(UsageError, match=r"there is no device group 'gpu' \(site device groups: ctl, rdma\)"):
        edits.device_request_edits(settings, "gpu", what="--device gpu")
    with pytest.raises(UsageError, match="is not a device path, a device group or a CDI device name"):
        edits.check_device_request("Not A Device", what="--device")


# --- GPUs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("all", gpus.GpuRequest("all")), ("2", gpus.GpuRequest("2", count=2)),
    ("0,2", gpus.GpuRequest("0,2", ids=("0", "2"))), ("device=1", gpus.GpuRequest("device=1", ids=("1",))),
    (uuid_of(3), gpus.GpuRequest(uuid_of(3), ids=(uuid_of(3),))),
])
def test_gpu_requests(text, expected):
    assert gpus.parse_request(text) == expected


@pytest.mark.parametrize("text", ["0", "65", "some", "0,0", "device=", "1,x", "²", "0,²", "2\n"])
def test_bad_gpu_requests(text):
    with pytest.raises(UsageError, match="--gpus"):
        gpus.parse_request(text)


@pytest.mark.parametrize("text, words", [
    ("9" * 4400, "--gpus 99999999999999999999...: ask for 1 to 64 GPUs"),
    ("device=" + "9" * 4400, "the GPU index 99999999999999999999... is past any node's GPUs"),
    ("0," + "9" * 4400, "the GPU index 99999999999999999999... is past any node's GPUs"),
])
def test_a_gpu_number_of_thousands_of_digits_is_a_clear_error(text, words):
    """int() refuses strings past 4300 digits (ValueError: a traceback from `berth run --gpus`)."""
    with pytest.raises(UsageError) as caught:
        gpus.parse_request(text)
    assert words in caught.value.message and len(caught.value.message) < 300


def test_an_allocation_of_a_range_of_thousands_of_digits_is_no_traceback():
    big = "9" * 4400
    assert gpus._id_list(f"{big}-{big}") == [f"{big}-{big}"]  # no such GPU: _by_id says so


def test_gpus_and_driver_of_the_fake_tree(settings):
    found = gpus.nvidia_gpus(settings)
    assert [(g.index, g.node, g.uuid, g.model) for g in found] == [
        (i, f"/dev/nvidia{i}", uuid_of(i), "Berth Fake GPU") for i in range(4)]
    assert gpus.driver_version(settings) == DRIVER_VERSION


@pytest.mark.parametrize("environ,expected,ledger", [
    ({}, [0, 1, 2, 3], True),
    ({"CUDA_VISIBLE_DEVICES": f"2,{uuid_of(0)}"}, [2, 0], True),
    ({"CUDA_VISIBLE_DEVICES": ""}, [], True),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1,3", "CUDA_VISIBLE_DEVICES": "0,1"}, [1, 3], False),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0-3", "SLURM_STEP_GPUS": "2"}, [2], False),
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0"}, [], False),
])
def test_allocation(settings, environ, expected, ledger):
    allocated = gpus.allocation(gpus.nvidia_gpus(settings), environ)
    assert [g.index for g in allocated.gpus] == expected and allocated.ledger is ledger


def test_more_gpus_than_allocated_is_an_error_that_says_so(settings):
    allocated = gpus.allocation(gpus.nvidia_gpus(settings), {"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1,3"})
    with pytest.raises(UsageError, match=r"--gpus 3: only 2 GPU\(s\) are allocated to you here \(SLURM_JOB_GPUS=1,3\)"):
        gpus.select(gpus.parse_request("3"), allocated)
    with pytest.raises(UsageError, match="index 2 is past the 2 GPU"):
        gpus.select(gpus.parse_request("0,2"), allocated)
    with pytest.raises(UsageError, match=f"GPU {uuid_of(0)} is not allocated to you"):
        gpus.select(gpus.parse_request(uuid_of(0)), allocated)
    none = gpus.allocation(gpus.nvidia_gpus(settings), {"SLURM_JOB_ID": "7"})
    with pytest.raises(UsageError, match="no GPU is allocated to you here"):
        gpus.select(gpus.parse_request("all"), none)
    assert [g.index for g in gpus.select(gpus.parse_request("1"), allocated)] == [1, 3]
    assert [g.index for g in gpus.select(gpus.parse_request("device=1"), allocated)] == [3]


def test_gpu_edits_select_renumber_and_inject(settings, tree):
    with ExitStack() as stack:
        found, notes = gpus.gpu_edits(settings, "2", {"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1,3"}, stack)
    assert notes == []
    applied = edits.apply_edits(settings, [found])
    assert [b.destination for b in applied.devices] == [
        "/dev/nvidia1", "/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
    assert {(b.source, b.destination) for b in applied.mounts} == {
        (str(tree.lib_dir / f"libcuda.so.{DRIVER_VERSION}"), "/dev/.berth-gpu/lib/libcuda.so.1"),
        (str(tree.lib_dir / f"libnvidia-ml.so.{DRIVER_VERSION}"), "/dev/.berth-gpu/lib/libnvidia-ml.so.1"),
        (str(tree.bin_dir / "nvidia-smi"), "/dev/.berth-gpu/bin/nvidia-smi")}
    assert all(b.read_only for b in applied.mounts)
    assert applied.env == (EnvOp("set", "CUDA_VISIBLE_DEVICES", "0,1"), EnvOp("set", "NVIDIA_VISIBLE_DEVICES", "0,1"),
                           EnvOp("prepend", "LD_LIBRARY_PATH", "/dev/.berth-gpu/lib"),
                           EnvOp("prepend", "PATH", "/dev/.berth-gpu/bin"))


def test_ledger_never_gives_one_gpu_twice(settings):
    with ExitStack() as first:
        one, _ = gpus.gpu_edits(settings, "3", {}, first)
        assert [n.path for n in one.device_nodes[:3]] == ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2"]
        with ExitStack() as second:
            two, _ = gpus.gpu_edits(settings, "1", {}, second)
            assert two.device_nodes[0].path == "/dev/nvidia3"
            with pytest.raises(PolicyError, match=r"GPU\(s\) 0, 1, 2, 3 are in use .* \(0 of 1 free\)"):
                gpus.gpu_edits(settings, "1", {}, ExitStack())
            with pytest.raises(PolicyError, match="in use"):
                gpus.gpu_edits(settings, "device=0", {}, ExitStack())
    with ExitStack() as again:
        assert gpus.gpu_edits(settings, "all", {}, again)[0].device_nodes[3].path == "/dev/nvidia3"


def test_missing_driver_library_is_a_note(settings, tmp_path):
    settings = replace(settings, devices=replace(settings.devices, ld_cache="/etc/ld.so.cache"))
    with ExitStack() as stack:
        found, notes = gpus.gpu_edits(settings, "1", {}, stack)
    assert "libcuda.so.1 is not in the ld.so cache /etc/ld.so.cache" in notes[0]
    assert not any(op.name == "LD_LIBRARY_PATH" for op in found.env)


def test_amd_gpus(tmp_path):
    tree = make_fake_driver_tree(tmp_path / "amd", gpus=2, amd=True)
    settings = Settings(state_dir=tmp_path / "state", devices=DeviceSettings(dev_dir=str(tree.dev_dir)))
    with ExitStack() as stack:
        found, _ = gpus.gpu_edits(settings, "device=1", {}, stack)
    assert [n.path for n in found.device_nodes] == ["/dev/kfd", "/dev/dri/renderD129"]
    assert found.env == (EnvOp("set", "ROCR_VISIBLE_DEVICES", "0"),)


def test_no_gpu_here(tmp_path):
    settings = Settings(devices=DeviceSettings(dev_dir=str(tmp_path)))
    with pytest.raises(UsageError, match="this node has no GPU"):
        gpus.gpu_edits(settings, "1", {}, ExitStack())


# --- jobs ---------------------------------------------------------------------------------------

def test_submit_gpus_beside_gres():
    from berth.jobs.api import build_resources

    assert build_resources({"gpus": "2"}).gpus == 2
    assert build_resources({"gpus": "2", "gres": "gpu:2"}).gpus == 2
    with pytest.raises(UsageError, match="--gpus 2 and --gres gpu:3 ask for different numbers of GPUs"):
        build_resources({"gpus": "2", "gres": "gpu:3"})
    with pytest.raises(UsageError, match="--gpus"):
        build_resources({"gpus": "0"})


def test_job_gpus_become_the_containers_gpus(settings, tmp_path, monkeypatch):
    from berth.jobs.model import Resources
    from berth.jobs.runner import build_run_options

    class Record:
        container_dir = tmp_path / "c"
        path = tmp_path

    record = Record()
    for gpus, custom, expected in ((2, "", "2"), (None, "", None), (1, "--gpus device=0", "device=0")):
        job = _job_spec(tmp_path, Resources(gpus=gpus), custom)
        assert build_run_options(settings, job, record, limit_resources=True).gpus == expected
    # Slurm (no local limits): whatever Slurm allocated, also through options berth passes on,
    # when the node's GPUs are ones berth knows.
    job = _job_spec(tmp_path, Resources(gpus=2), "")
    assert build_run_options(settings, job, record, limit_resources=False).gpus == "all"
    assert build_run_options(Settings(), job, record, limit_resources=False).gpus is None  # no GPU in /dev here
    job = _job_spec(tmp_path, Resources(), "")
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    assert build_run_options(settings, job, record, limit_resources=False).gpus == "all"
    monkeypatch.delenv("SLURM_JOB_GPUS")
    assert build_run_options(settings, job, record, limit_resources=False).gpus is None


def _job_spec(tmp_path, resources, custom):
    from berth.jobs.model import JobSpec
    from berth.record import MISSING, fields

    values = {}
    for field in fields(JobSpec):
        values[field.name] = field.default if field.default is not MISSING else \
            field.default_factory() if field.default_factory is not MISSING else None
    values.update(id="1", name="job", image="img", workdir=str(tmp_path), resources=resources, custom=custom,
                  stop_timeout_s=10)
    return JobSpec(**values)


def test_template_custom_devices_are_judged_where_they_can_be(settings):
    """At template creation (and submission) device paths are judged fully, group names against
    the site's groups, CDI names by syntax only: their spec lives on the GPU nodes."""
    from berth.runtime.options import parse_custom
    from berth.runtime.policy import check_options

    settings = replace(settings, devices=replace(settings.devices, groups=(("rdma", ("/dev/infiniband/*",)),)))
    check_options(settings, parse_custom("--device rdma --device vendor.example/fpga=0 --gpus 1"))
    with pytest.raises(UsageError, match="there is no device group 'ib'"):
        check_options(settings, parse_custom("--device ib"))
    with pytest.raises(UsageError, match="is not a CDI device name"):
        check_options(settings, parse_custom("--device vendor.example/fpga=a+b"))
    with pytest.raises(UsageError, match="--gpus"):
        parse_custom("--gpus many")


def test_doctor_says_why_a_gpu_is_not_usable(settings, tree):
    from berth.runtime.doctor import check_gpus

    good = check_gpus(settings)
    assert good.ok and f"driver {DRIVER_VERSION}" in good.detail and "libraries: libcuda.so.1, libnvidia-ml.so.1" in good.detail
    (tree.dev_dir / "nvidia-uvm").rename(tree.dev_dir / "uvm-away")
    try:
        broken = check_gpus(replace(settings, devices=replace(settings.devices, ld_cache="/etc/ld.so.cache",
                                                               nvidia_proc_dir=str(tree.root / "none"))))
    finally:
        (tree.dev_dir / "uvm-away").rename(tree.dev_dir / "nvidia-uvm")
    assert not broken.ok and not broken.required
    for reason in ("/dev/nvidia-uvm is missing", "the NVIDIA kernel module is not loaded",
                   "libcuda.so.1 is not in the ld.so cache /etc/ld.so.cache"):
        assert reason in broken.detail


def test_yaml_specs_are_loaded_safely(settings, tmp_path):
    marker = tmp_path / "pwned"
    _write(settings, f"cdiVersion: 0.5.0\nkind: !!python/object/apply:os.system ['touch {marker}']\n"
                     "devices: []\n", name="evil.yaml")
    with pytest.raises(ConfigError, match="is neither JSON nor valid YAML"):
        cdi.device_edits(settings, "vendor.example/ve=0", what="--device")
    assert not marker.exists()


def test_doctor_on_amd_gpus(tmp_path):
    from berth.runtime.doctor import check_gpus

    tree = make_fake_driver_tree(tmp_path / "amd", gpus=2, amd=True)
    check = check_gpus(Settings(state_dir=tmp_path / "state", devices=DeviceSettings(dev_dir=str(tree.dev_dir))))
    assert check.ok and check.detail.startswith("2 AMD GPU(s)")
