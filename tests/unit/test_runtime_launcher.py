"""berth-launcher or runc: the fallback decision made on config.json (issue 10).

berth.runtime.launcher.unsupported decides in Python; the compiled launcher refuses the same
configs itself (``berth-launcher check``, which parses and validates exactly as ``run`` does
before anything is created). Both are run on the same configs here, so neither can drift.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest

from berth.errors import RuntimeFailure
from berth.runtime import ocirt
from berth.runtime.launcher import unsupported
from berth.runtime.spec import BindMount, Hook, SpecPlan, build_config, process_args

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UID, GID = os.geteuid(), os.getegid()


def plan(**changes) -> SpecPlan:
    values = dict(
        rootfs="/tmp/b0/lower", args=process_args(UID, GID, ["/bin/sh", "-c", "echo hi"], remap_root=False),
        env=("PATH=/usr/bin:/bin",), cwd="/work", uid=UID, gid=GID, init_path="/opt/berth/berth-init",
        hostname="node1", binds=(BindMount("/home/alice", "/home/alice", read_only=False),
                                 BindMount("/dev/fuse", "/dev/fuse", read_only=False, device=True)),
        tmpfs=("/home",), tmp_source="/tmp/b0/tmp", annotations=(("org.berth.image", "app:1"),),
    )
    values.update(changes)
    return SpecPlan(**values)


def golden(name: str) -> dict:
    config = json.loads((GOLDEN / name).read_text())
    config["linux"]["uidMappings"][0]["hostID"] = UID
    config["linux"]["gidMappings"][0]["hostID"] = GID
    return config


def changed(config: dict, edit) -> dict:
    config = copy.deepcopy(config)
    edit(config)
    return config


BASE = build_config(plan())

SUPPORTED = {
    "default plan": BASE,
    "golden default": golden("config-default.json"),
    "golden remap-root, private network (without its -t)": changed(
        golden("config-remap-root-isolated.json"), lambda c: c["process"].update(terminal=False)),
    "host pid, ipc, uts namespaces": build_config(plan(host_namespaces=("pid", "ipc", "uts"))),
    "rlimits and a cgroup namespace": build_config(plan(rlimits=(("RLIMIT_DATA", 1 << 30, 1 << 30),),
                                                        private_namespaces=("cgroup",))),
    "empty hooks": changed(BASE, lambda c: c.update(hooks={"prestart": []})),
    "a tmpfs at the root's /tmp": build_config(plan(tmp_source=None)),
    "a kernel overlay at / (an unpacked image)": build_config(plan(root_overlay=("/l", "/u", "/w"))),
    "device allow rules (a run by root)": changed(BASE, lambda c: c["linux"].update(resources={"devices": [
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}]})),
}

UNSUPPORTED = {
    "cgroup resources": (golden("config-cgroup-v2.json"), "cgroup"),
    "a device allowed read-only (a CDI spec's permissions, run by root)": (changed(BASE, lambda c: c["linux"].update(
        resources={"devices": [{"allow": True, "type": "c", "major": 1, "minor": 3, "access": "r"}]})), "device cgroup"),
    "CDI hooks": (build_config(plan(hooks=(Hook("createContainer", "/usr/bin/nvidia-ctk"),))), "hooks"),
    "a terminal": (build_config(plan(terminal=True)), "terminal"),
    "an unknown top-level key": (changed(BASE, lambda c: c.update(vm={})), "vm"),
    "seccomp": (changed(BASE, lambda c: c["linux"].update(seccomp={"defaultAction": "SCMP_ACT_ALLOW"})),
                "seccomp"),
    "a seccomp rule for other calls": (changed(BASE, lambda c: c["linux"]["seccomp"]["syscalls"][0].update(
        names=["add_key", "keyctl", "ptrace"])), "seccomp"),
    "the keyring rule with another errno": (changed(BASE, lambda c: c["linux"]["seccomp"]["syscalls"][0].update(
        errnoRet=38)), "seccomp"),
    "the keyring rule without no_new_privs": (changed(BASE, lambda c: c["process"].update(noNewPrivileges=False)),
                                              "noNewPrivileges"),
    "devices": (changed(BASE, lambda c: c["linux"].update(devices=[])), "devices"),
    "sysctl": (changed(BASE, lambda c: c["linux"].update(sysctl={"net.ipv4.ip_forward": "1"})), "sysctl"),
    "a namespace joined by path": (changed(BASE, lambda c: c["linux"]["namespaces"].append(
        {"type": "network", "path": "/proc/1/ns/net"})), "path"),
    "a time namespace": (changed(BASE, lambda c: c["linux"]["namespaces"].append({"type": "time"})), "time"),
    "no user namespace": (changed(BASE, lambda c: c["linux"].update(
        namespaces=[n for n in c["linux"]["namespaces"] if n["type"] != "user"])), "user"),
    "a cgroup mount": (changed(BASE, lambda c: c["mounts"].append(
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": []})), "cgroup"),
    "an unknown bind option": (changed(BASE, lambda c: c["mounts"].append(
        {"destination": "/x", "type": "none", "source": "/x", "options": ["rbind", "idmap"]})), "idmap"),
    "a relative bind source": (changed(BASE, lambda c: c["mounts"].append(
        {"destination": "/x", "type": "bind", "source": "x", "options": ["bind"]})), "relative"),
    "someone else's uid": (changed(BASE, lambda c: c["linux"]["uidMappings"][0].update(hostID=UID + 1)),
                           "uidMappings"),
    "a range of uids": (changed(BASE, lambda c: c["linux"]["uidMappings"][0].update(size=65536)), "uidMappings"),
    "two gid mappings": (changed(BASE, lambda c: c["linux"]["gidMappings"].append(
        {"containerID": 1, "hostID": 100000, "size": 1})), "gidMappings"),
    "additional gids": (changed(BASE, lambda c: c["process"]["user"].update(additionalGids=[5])), "additionalGids"),
    "an unknown capability": (changed(BASE, lambda c: c["process"]["capabilities"]["bounding"].append(
        "CAP_EVERYTHING")), "CAP_EVERYTHING"),
    "an unknown rlimit": (changed(BASE, lambda c: c["process"].update(
        rlimits=[{"type": "RLIMIT_FOO", "soft": 1, "hard": 1}])), "RLIMIT_FOO"),
    "an apparmor profile": (changed(BASE, lambda c: c["process"].update(apparmorProfile="x")), "apparmorProfile"),
    "OCI version 2": (changed(BASE, lambda c: c.update(ociVersion="2.0.0")), "ociVersion"),
    "root propagation": (changed(BASE, lambda c: c["linux"].update(rootfsPropagation="shared")),
                         "rootfsPropagation"),
}


def launcher_check(config: dict | str, tmp_path: Path, timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """``berth-launcher check`` on ``config`` (a dict, or raw text)."""
    launcher = ocirt.launcher_path()
    assert os.access(launcher, os.X_OK), f"berth-launcher is not built at {launcher} (setup.py builds it)"
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return subprocess.run([launcher, "check", "--bundle", str(tmp_path)], capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_configs_berth_generates_run_on_the_launcher(name, tmp_path):
    assert unsupported(SUPPORTED[name]) is None
    result = launcher_check(SUPPORTED[name], tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_what_the_launcher_does_not_do_goes_to_runc_and_the_launcher_refuses_it(name, tmp_path):
    config, word = UNSUPPORTED[name]
    reason = unsupported(config)
    assert reason is not None and word in reason, reason
    result = launcher_check(config, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("berth-launcher: "), result.stderr


@pytest.mark.parametrize("text, message", [
    ('{"ociVersion": "1.0.2", "ociVersion": "1.0.2"}', "appears twice"),
    ('{"ociVersion": "1.0.2"', "not valid JSON"),
    ('{"ociVersion": "1.0.2"} trailing', "trailing data"),
    ('{"ociVersion": "1.\\u0000"}', "NUL"),
    ('[' * 100 + ']' * 100, "nested too deeply"),
    ('{"ociVersion": "1.0.2", "process": "x"}', "process must be an object"),
])
def test_the_launcher_refuses_malformed_config_json_with_a_message(text, message, tmp_path):
    result = launcher_check(text, tmp_path)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


def test_an_object_of_very_many_keys_is_refused_at_once(tmp_path):
    """Each key of an object was compared with every earlier one (duplicates are refused): 150,000
    keys in a 2 MiB file kept the launcher busy for minutes (``state``, which berth ps runs,
    reads a state.json so too). Killed after 30 s here, the old parser fails this test."""
    text = json.dumps({"ociVersion": "1.0.2", "annotations": {f"k{i}": "" for i in range(150_000)}})
    result = launcher_check(text, tmp_path, timeout_s=30)
    assert result.returncode == 1 and "more than 4096 keys in one object" in result.stderr, result.stderr


def test_the_launcher_refuses_ids_beyond_32_bits_instead_of_truncating_them(tmp_path):
    """uid 2^32 + N was cast to unsigned: it became N (and 2^32 became root) without a word."""
    def wrap(config):
        big = UID + (1 << 32)
        config["process"]["user"]["uid"] = big
        config["linux"]["uidMappings"][0]["containerID"] = big

    result = launcher_check(changed(BASE, wrap), tmp_path)
    assert result.returncode == 1 and "process.user.uid" in result.stderr, result.stderr


def test_the_launcher_refuses_a_nul_byte_inside_a_number(tmp_path):
    """strchr("+-.eE", c) is true for c == NUL: a raw NUL byte was read as part of a number
    (and the number's text ended at it), so "1<NUL>9" passed as 1."""
    text = json.dumps(BASE).replace('"size": 1', '"size": 1\x009', 1)
    assert text.count("\x00") == 1
    result = launcher_check(text, tmp_path)
    assert result.returncode == 1 and "not valid JSON" in result.stderr, result.stderr


def test_auto_puts_the_launcher_first_only_for_configs_it_runs():
    assert ocirt.candidates("auto", BASE) == ("launcher", "runc", "crun")
    notes = []
    assert ocirt.candidates("auto", UNSUPPORTED["CDI hooks"][0],
                            lambda message, debug=False: notes.append(message)) == ("runc", "crun")
    assert "OCI hooks" in notes[0]
    assert ocirt.candidates("runc", BASE) == ("runc",)
    assert ocirt.candidates("launcher", BASE) == ("launcher",)


def test_runtime_launcher_refuses_a_config_it_cannot_run_and_says_why():
    with pytest.raises(RuntimeFailure) as caught:
        ocirt.candidates("launcher", UNSUPPORTED["cgroup resources"][0])
    assert "cgroup resources" in caught.value.message
    assert 'runtime = "auto"' in caught.value.hint


def test_an_unknown_runtime_name_is_refused():
    with pytest.raises(RuntimeFailure) as caught:
        ocirt.candidates("youki", BASE)
    assert "youki" in caught.value.message
