"""GPUs and CDI devices in real containers, as berthtest, on a fake driver tree (issue 13).

The tree (tests/harness/gpu_tree.py) has four fake NVIDIA GPUs (device nodes with the null
device's numbers), the driver's /proc files, fake libcuda.so.1/libnvidia-ml.so.1 in a temporary
ld.so cache and a fake nvidia-smi; the image holds busybox, glibc and a program that dlopen()s
libcuda.so.1 — and no NVIDIA file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness.fixtures_runtime import _busybox_rootfs, _mksquashfs
from tests.harness.gpu_tree import DRIVER_VERSION, glibc_rootfs, make_fake_driver_tree, uuid_of
from tests.harness.users import describe

pytestmark = pytest.mark.integration

SLURM_2_OF_4 = {"SLURM_JOB_ID": "77", "SLURM_JOB_GPUS": "1,3"}


@pytest.fixture(scope="module")
def gpu_lab():
    work = Path(tempfile.mkdtemp(prefix="berth-gpu-", dir="/tmp"))
    work.chmod(0o755)
    try:
        tree = make_fake_driver_tree(work / "tree", gpus=4)
        root = work / "image"
        _busybox_rootfs(root)
        glibc_rootfs(root)
        assert not list(root.rglob("*nvidia*")) and not list(root.rglob("libcuda*"))
        image = _mksquashfs(root, work / "cuda-less.sqfs")
        yield tree, image
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def gpu_site(gpu_lab, site_config):
    tree, _ = gpu_lab
    site_config.write(tree.site_toml())
    for spec in tree.cdi_dir.iterdir():
        spec.unlink()
    return site_config


def _run(runtime_env, site, image, *args, env=None, **kwargs):
    return runtime_env.berth("run", *args[:-1], str(image), *args[-1], env={**site.env, **(env or {})}, **kwargs)


INSIDE = ("sh", "-c", "ls /dev | grep nvidia | tr '\\n' ' '; echo; echo $CUDA_VISIBLE_DEVICES $NVIDIA_VISIBLE_DEVICES; "
          "nvidia-smi -L; dlopen-probe; dlopen-probe libnvidia-ml.so.1 | cut -d' ' -f1")


def test_allocated_gpus_only_renumbered_with_the_host_driver(runtime_env, gpu_lab, gpu_site):
    tree, image = gpu_lab
    result = _run(runtime_env, gpu_site, image, "--gpus", "all", INSIDE, env=SLURM_2_OF_4)
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["nvidia-uvm", "nvidia-uvm-tools", "nvidia1", "nvidia3", "nvidiactl"]
    assert lines[1] == "0,1 0,1"
    assert lines[2:4] == [f"GPU 0: Berth Fake GPU (UUID: {uuid_of(1)})", f"GPU 1: Berth Fake GPU (UUID: {uuid_of(3)})"]
    assert lines[4] == f"cuInit=0 driver=fake-cuda-{DRIVER_VERSION} from=/dev/.berth-gpu/lib/libcuda.so.1"
    assert lines[5] == "cuInit=-1"  # libnvidia-ml loaded too (it has no cuInit)


def test_without_gpus_nothing_of_the_driver_appears(runtime_env, gpu_lab, gpu_site):
    _, image = gpu_lab
    result = _run(runtime_env, gpu_site, image, ("sh", "-c", "ls /dev | grep -c nvidia; dlopen-probe"))
    assert result.returncode == 1 and result.stdout.splitlines()[0] == "0", describe(result)
    assert "dlopen failed: libcuda.so.1" in result.stdout


def test_more_gpus_than_allocated_is_refused(runtime_env, gpu_lab, gpu_site):
    _, image = gpu_lab
    result = _run(runtime_env, gpu_site, image, "--gpus", "3", ("true",), env=SLURM_2_OF_4)
    assert result.returncode == 125, describe(result)
    assert "--gpus 3: only 2 GPU(s) are allocated to you here (SLURM_JOB_GPUS=1,3)" in result.stderr
    none = _run(runtime_env, gpu_site, image, "--gpus", "1", ("true",), env={"SLURM_JOB_ID": "78"})
    assert none.returncode == 125 and "no SLURM_JOB_GPUS: no GPU allocated" in none.stderr, describe(none)


def test_two_containers_never_share_a_gpu(runtime_env, gpu_lab, gpu_site):
    _, image = gpu_lab
    env = runtime_env.env(**gpu_site.env)
    first = runtime_env.popen("run", "--gpus", "3", str(image), "sh", "-c",
                              "ls /dev | grep 'nvidia[0-9]' | tr '\\n' ' '; echo; sleep 30", env=env)
    try:
        line = first.stdout.readline()
        assert line.split() == ["nvidia0", "nvidia1", "nvidia2"], line
        second = _run(runtime_env, gpu_site, image, "--gpus", "2", ("true",))
        assert second.returncode == 125 and "(1 of 2 free)" in second.stderr, describe(second)
        third = _run(runtime_env, gpu_site, image, "--gpus", "1", ("sh", "-c", "ls /dev | grep 'nvidia[0-9]'"))
        assert third.returncode == 0 and third.stdout.split() == ["nvidia3"], describe(third)
    finally:
        first.terminate()
        first.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while True:  # the first container's GPUs are free once its berth is gone
        again = _run(runtime_env, gpu_site, image, "--gpus", "4", ("true",))
        if again.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.returncode == 0, describe(again)


def test_cdi_device_and_site_group(runtime_env, gpu_lab, gpu_site):
    tree, image = gpu_lab
    tree.node("veslot0") if not (tree.dev_dir / "veslot0").exists() else None
    tree.write_cdi("ve.json", {"cdiVersion": "0.6.0", "kind": "nec.com/ve", "devices": [
        {"name": "0", "containerEdits": {
            "deviceNodes": [{"path": "/dev/veslot0"}],
            "env": ["VE_NODE_NUMBER=0"],
            "mounts": [{"hostPath": str(tree.bin_dir), "containerPath": "/opt/nec/ve/bin", "options": ["ro"]}]}}]})
    gpu_site.write(tree.site_toml(extra='[devices.groups]\nctl = ["/dev/nvidiactl", "/dev/nvidia-uvm*"]\n'))
    result = _run(runtime_env, gpu_site, image, "--device", "nec.com/ve=0", "--device", "ctl",
                  ("sh", "-c", "test -c /dev/veslot0 && echo node; echo $VE_NODE_NUMBER; ls /opt/nec/ve/bin; "
                               "ls /dev | grep nvidia | tr '\\n' ' '"))
    assert result.returncode == 0, describe(result)
    assert result.stdout.splitlines() == ["node", "0", "nvidia-smi", "nvidia-uvm nvidia-uvm-tools nvidiactl "]


@pytest.mark.parametrize("spec,device,message", [
    (None, "nec.com/ve=9", "unknown CDI device nec.com/ve=9"),
    ({"cdiVersion": "0.6.0", "kind": "nec.com/ve", "devices": [{"name": "0", "containerEdits": {
        "mounts": [{"hostPath": "/var/spool", "containerPath": "/spool"}]}}]},
     "nec.com/ve=0", "the mount source /var/spool is not under an allowed place"),
    ({"cdiVersion": "0.6.0", "kind": "nec.com/ve", "devices": [{"name": "0", "containerEdits": {
        "deviceNodes": [{"path": "/dev/veslot0", "major": 240}]}}]},
     "nec.com/ve=0", "has major number 1, not 240 as the spec says"),
    ('{"cdiVersion": "0.6.0", "kind": "nec.com/ve", "devices": [', "nec.com/ve=0", "is not valid JSON"),
])
def test_cdi_refusals(runtime_env, gpu_lab, gpu_site, spec, device, message):
    tree, image = gpu_lab
    if not (tree.dev_dir / "veslot0").exists():
        tree.node("veslot0")
    tree.write_cdi("ve.json", spec if spec is not None else {
        "cdiVersion": "0.3.0", "kind": "nec.com/ve", "devices": [{"name": "0", "containerEdits": {"env": ["A=1"]}}]})
    result = _run(runtime_env, gpu_site, image, "--device", device, ("true",))
    assert result.returncode == 125 and message in result.stderr, describe(result)
    assert f"--device {device}" in result.stderr


def test_doctor_lists_gpus_driver_and_cdi_devices(runtime_env, gpu_lab, gpu_site):
    tree, _ = gpu_lab
    tree.write_cdi("ve.json", {"cdiVersion": "0.3.0", "kind": "nec.com/ve",
                               "devices": [{"name": "0", "containerEdits": {"env": ["A=1"]}}]})
    tree.write_cdi("broken.json", "{")
    result = runtime_env.berth("doctor", "--json", env=gpu_site.env)
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert f"driver {DRIVER_VERSION}" in checks["GPUs"]["detail"] and "4 NVIDIA GPU(s)" in checks["GPUs"]["detail"]
    assert "nec.com/ve=0" in checks["CDI devices"]["detail"]
    assert not checks["CDI devices"]["ok"] and "broken.json" in checks["CDI devices"]["detail"]


def test_local_jobs_queue_for_gpus_and_never_share_one(job_site, user):
    """Two local jobs that each want both of the node's GPUs: the second waits for the first."""
    from tests.integration.jobs_helpers import submit, wait_for

    work = job_site.workdir(user)
    job_site.write_script(work, "gpus.sh", """\
        #!/bin/sh
        if [ -e busy ]; then echo overlap; fi
        touch busy
        echo "$CUDA_VISIBLE_DEVICES $(ls /dev | grep 'nvidia[0-9]' | tr '\\n' ' ')"
        sleep 2
        rm busy
    """, user)
    ids = [submit(user, job_site, work, "--image", job_site.image, "--gpus", "2", "-o", "out-%j.txt", "gpus.sh")
           for _ in range(2)]
    states = wait_for(user, job_site, ids, ("completed", "failed", "cancelled", "timeout"), timeout_s=90)
    for job in ids:
        assert states[job]["state"] == "completed", json.dumps(states[job])
        assert (work / f"out-{job}.txt").read_text() == "0,1 nvidia0 nvidia1 \n"


def test_gpu_check_script_on_the_fake_tree(gpu_lab, gpu_site):
    """scripts/gpu-check.sh, run as on a GPU node (as root) against the fake driver tree: it
    builds its image without NVIDIA files and proves the selection with the injected nvidia-smi;
    the CUDA program then stops it, naming what the fake libcuda lacks (a real driver has it)."""
    import os
    import subprocess

    tree, _ = gpu_lab
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"
    env = {**os.environ, "PATH": f"{tree.bin_dir}:{os.environ['PATH']}", "BERTH_FAKE_DEV": str(tree.dev_dir),
           "LD_LIBRARY_PATH": str(tree.lib_dir), "GPU_CHECK_ROUNDS": "1",
           "GPU_CHECK_DEVICES_TOML": f'dev_dir = "{tree.dev_dir}"\nnvidia_proc_dir = "{tree.proc_dir}"\n'
                                     f'mount_allow = ["{tree.root}", "/usr", "/lib"]\n'}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    passed = [line for line in result.stdout.splitlines() if line.startswith("PASS")]
    assert len(passed) == 3, describe(result)
    assert passed[1] == f"PASS: nvidia-smi -L inside lists exactly GPU 3 ({uuid_of(3)}) of 4 (--gpus {uuid_of(3)})"
    assert "PASS: --gpus 5 is refused" in passed[2]
    assert result.returncode == 1 and "FAIL: cuda-burn bare: error: cuDeviceGetCount not found" in result.stderr


def test_cdi_hook_runs_as_the_caller(runtime_env, gpu_lab, gpu_site, user):
    """A CDI spec's OCI hook is run by the rootless runtime, as the caller, with its args and env."""
    tree, image = gpu_lab
    hook = tree.root / "ve-hook"
    hook.write_text('#!/bin/sh\necho "$1 uid=$(id -u) VE_HOOK=$VE_HOOK" > "$2"\n')
    hook.chmod(0o755)
    marker = runtime_env.scratch / "hook-ran"
    tree.write_cdi("ve.json", {"cdiVersion": "0.5.0", "kind": "nec.com/ve", "devices": [{"name": "hooked", "containerEdits": {
        "hooks": [{"hookName": "createRuntime", "path": str(hook), "args": ["ve-hook", "created", str(marker)],
                   "env": ["VE_HOOK=yes"]}]}}]})
    result = _run(runtime_env, gpu_site, image, "--device", "nec.com/ve=hooked", ("true",))
    assert result.returncode == 0, describe(result)
    assert marker.read_text() == f"created uid={user.uid} VE_HOOK=yes\n"
