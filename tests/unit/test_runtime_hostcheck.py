"""Host restrictions `berth doctor` and run errors name with their fix (issue 8): AppArmor's
userns restriction, user namespaces switched off, /dev/fuse missing or closed, a store on a file
system without working locks. /proc/sys and the device are faked."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from berth.runtime import doctor, hostcheck, ocirt
from berth.store.store import SITE, USER, Store


def _proc_sys(tmp_path: Path, **values: str) -> Path:
    root = tmp_path / "proc-sys"
    for dotted, value in values.items():
        path = root.joinpath(*dotted.split("__"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return root


def test_no_restriction_on_a_permissive_host(tmp_path):
    root = _proc_sys(tmp_path, kernel__apparmor_restrict_unprivileged_userns="0",
                     user__max_user_namespaces="15000", kernel__unprivileged_userns_clone="1")
    assert hostcheck.userns_restrictions(root) == [] and hostcheck.userns_hint(root) is None


def test_apparmor_and_max_user_namespaces_are_named_with_their_sysctl(tmp_path):
    root = _proc_sys(tmp_path, kernel__apparmor_restrict_unprivileged_userns="1", user__max_user_namespaces="0")
    found = hostcheck.userns_restrictions(root)
    assert [r.found.split(" ")[0] for r in found] == ["kernel.apparmor_restrict_unprivileged_userns=1",
                                                       "user.max_user_namespaces=0"]
    assert "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0" in found[0].fix
    assert "AppArmor profile" in found[0].fix
    assert "sysctl -w user.max_user_namespaces=15000" in found[1].fix
    hint = hostcheck.userns_hint(root)
    assert hint.startswith("ask your site administrator") and "max_user_namespaces=0" in hint


def test_doctor_user_namespace_check_names_the_restriction(tmp_path, monkeypatch):
    root = _proc_sys(tmp_path, kernel__apparmor_restrict_unprivileged_userns="1")
    monkeypatch.setattr(doctor.proc, "has_program", lambda name: True)
    monkeypatch.setattr(doctor.proc, "run", lambda argv, check=False: subprocess.CompletedProcess(
        argv, 1, b"", b"unshare: write failed /proc/self/uid_map: Operation not permitted"))
    check = doctor.check_user_namespaces(root)
    assert not check.ok and "apparmor_restrict_unprivileged_userns=1" in check.detail
    assert check.fix.startswith("ask your site administrator to sysctl -w kernel.apparmor")


def test_runtime_failure_reason_carries_the_same_hint(monkeypatch, tmp_path):
    root = _proc_sys(tmp_path, user__max_user_namespaces="0")
    monkeypatch.setattr(hostcheck, "PROC_SYS", root)
    monkeypatch.setattr(hostcheck.userns_hint, "__defaults__", (root,))
    reason = ocirt._explain("runc", "rootless container requires user namespaces\n")
    assert "user.max_user_namespaces=0" in reason and "sysctl -w user.max_user_namespaces=15000" in reason


def test_fuse_device_missing_or_closed(tmp_path, monkeypatch):
    missing = hostcheck.fuse_restriction(tmp_path / "no-fuse")
    assert "does not exist" in missing.found and "modprobe fuse" in missing.fix
    check = doctor.check_fuse_device(tmp_path / "no-fuse")
    assert not check.ok and "modprobe fuse" in check.fix

    device = tmp_path / "fuse"
    device.write_text("")

    def refuse(path, flags, *args):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(hostcheck.os, "open", refuse)
    closed = hostcheck.fuse_restriction(device)
    assert "not accessible" in closed.found and f"chmod 0666 {device}" in closed.fix


def test_store_without_working_locks(tmp_path, monkeypatch):
    store = Store(tmp_path / "store", USER)
    store.require_writable()
    assert doctor.check_store_locks(store).ok

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(hostcheck.fcntl, "flock", no_locks)
    check = doctor.check_store_locks(store)
    assert not check.ok and "No locks available" in check.detail and "-o flock" in check.fix
    assert list(store.layout.locks_dir.iterdir()) == []  # the probe file is gone
    site = doctor.check_store_locks(Store(tmp_path / "store", SITE))
    assert site.fix.startswith("ask your site administrator")
    assert doctor.check_store_locks(Store(tmp_path / "absent", USER)) is None


def test_fuse_mount_failure_names_the_device_problem(tmp_path, monkeypatch):
    from berth.errors import RuntimeFailure
    from berth.runtime import fuse

    monkeypatch.setattr(hostcheck, "fuse_restriction",
                        lambda device=hostcheck.FUSE_DEVICE: hostcheck.Restriction("/dev/fuse is not accessible to you",
                                                                                   "chmod 0666 /dev/fuse"))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with pytest.raises(RuntimeFailure) as raised:
        fuse._start(["false"], str(mountpoint), "squashfuse of x", str(tmp_path / "log"))
    assert "not accessible" in raised.value.message and "chmod 0666 /dev/fuse" in raised.value.hint
