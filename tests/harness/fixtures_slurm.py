"""pytest fixtures: the Slurm test cluster (tests/harness/slurm.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.fixtures_runtime import process_alive
from tests.harness.gpu_tree import FakeDriverTree, make_fake_driver_tree
from tests.harness.slurm import SlurmCluster, start_cluster, usable
from tests.harness.users import berth_executable


@pytest.fixture(scope="session")
def fake_gpus() -> FakeDriverTree:
    """A fake driver tree with two NVIDIA GPUs (tests/harness/gpu_tree.py) that the Slurm test
    cluster's gres.conf names and the job site's [devices] settings point at."""
    root = Path(tempfile.mkdtemp(prefix="berth-fake-gpus-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield make_fake_driver_tree(root / "tree", gpus=2)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster(fake_gpus) -> SlurmCluster:
    """A 4-node Slurm cluster on 127.0.0.1 (munged, slurmctld, 4 slurmd), stopped by PID at
    the end of the session. Client commands need ``cluster.env()`` (SLURM_CONF and MPI
    loopback settings)."""
    reason = usable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="berth-slurm-"))
    # TmpFS outside /tmp, as on real clusters (see SlurmCluster.tmpfs_root).
    tmpfs = Path(tempfile.mkdtemp(prefix="berth-slurm-tmpfs-", dir="/var/tmp"))
    cluster = start_cluster(root, nodes=4, gpu_files=tuple(str(fake_gpus.dev_dir / f"nvidia{i}") for i in range(2)),
                            tmpfs_root=tmpfs)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(tmpfs, ignore_errors=True)


@dataclass
class JobSite:
    """A site for job tests: site configuration with templates whose image is in the site store,
    and the test user's own jobs directory and store, all under one temporary directory.

    Templates: ``bb`` (busybox, cpu=1, memsz=256M, stop_timeout=3 s) and ``slowboot`` (the same
    image with boot_timeout=4 s and a custom ``--env-file`` that is a FIFO nobody writes, so the
    container's start-up blocks and the boot timeout must fire in the boot phase), ``hangboot``
    (the same with boot_timeout=300 s: a job that stays in staging until cancelled), ``gpu``
    (gpu=1). Both backends see the two fake GPUs of ``fake_gpus`` (gres.conf on the Slurm cluster).
    """

    root: Path
    config_dir: Path
    site_store: Path
    jobs_dir: Path
    image: str
    env: dict[str, str] = field(default_factory=dict)

    def workdir(self, user) -> Path:
        """A fresh shared directory owned by the test user (the submit directory of a job)."""
        path = Path(tempfile.mkdtemp(prefix="job-", dir=self.root))
        path.chmod(0o755)
        os.chown(path, user.uid, user.gid)
        return path

    def write_script(self, directory: Path, name: str, text: str, user) -> Path:
        path = directory / name
        path.write_text(textwrap.dedent(text).lstrip())
        path.chmod(0o644)
        os.chown(path, user.uid, user.gid)
        return path


@pytest.fixture(scope="session")
def job_site(user, registry, busybox_image, fake_gpus) -> JobSite:
    root = Path(tempfile.mkdtemp(prefix="berth-jobs-", dir="/tmp"))
    root.chmod(0o755)
    config_dir, site_store = root / "etc-berth", root / "site-store"
    jobs_dir, user_store, xdg = root / "jobs", root / "user-store", root / "xdg-config"
    for directory in (config_dir, site_store, xdg, config_dir / "conf.d"):
        directory.mkdir(mode=0o755)
    for directory in (jobs_dir, user_store):
        directory.mkdir(mode=0o700)
        os.chown(directory, user.uid, user.gid)
    (config_dir / "conf.d" / "50-registry.toml").write_text(
        f'[[registries]]\nhost = "{registry.host}"\ninsecure = true\n')
    (config_dir / "conf.d" / "60-gpus.toml").write_text(fake_gpus.site_toml())
    fifo = root / "never-written.env"
    os.mkfifo(fifo, 0o644)
    env = {"BERTH_CONFIG_DIR": str(config_dir), "BERTH_SITE_STORE": str(site_store),
           "BERTH_JOBS_DIR": str(jobs_dir), "BERTH_USER_STORE": str(user_store), "XDG_CONFIG_HOME": str(xdg)}
    admin_env = {**os.environ, **env}
    berth = str(berth_executable())
    for argv in (
        ["template", "create", "bb", f"image={busybox_image}", "cpu=1", "memsz=256M", "stop_timeout=3",
         "boot_timeout=60", "comment=busybox for job tests"],
        ["template", "create", "slowboot", f"image={busybox_image}", "cpu=1", "memsz=64M", "boot_timeout=4",
         f"custom=--env-file {fifo}"],
        ["template", "create", "gpu", f"image={busybox_image}", "cpu=1", "memsz=64M", "gpu=1"],
        ["template", "create", "hangboot", f"image={busybox_image}", "cpu=1", "memsz=64M", "boot_timeout=300",
         f"custom=--env-file {fifo}"],
    ):
        result = subprocess.run([berth, *argv], env=admin_env, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail(f"cannot create template: {argv}\n{result.stdout}{result.stderr}")
    try:
        yield JobSite(root, config_dir, site_store, jobs_dir, busybox_image, env)
    finally:
        _stop_local_runners(root)
        shutil.rmtree(root, ignore_errors=True)


def _stop_local_runners(root: Path, grace_s: float = 15) -> None:
    """End local job runners a failed test left behind (SIGTERM: the runner stops its job and
    unmounts; SIGKILL to the whole tree after ``grace_s``)."""
    import signal
    import time

    from berth.jobs.runner import _descendants

    runners = []
    for pid_file in root.rglob("runner.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"job-exec" not in handle.read():
                    continue
        except (OSError, ValueError, IndexError):
            continue
        os.kill(pid, signal.SIGTERM)
        runners.append(pid)
    deadline = time.monotonic() + grace_s
    while runners and time.monotonic() < deadline:
        runners = [pid for pid in runners if process_alive(pid)]
        time.sleep(0.1)
    for pid in runners:  # everything, a shared image mount's daemon too (signal_tree spares it)
        for found in _descendants(pid):
            try:
                os.kill(found, signal.SIGKILL)
            except OSError:
                pass
