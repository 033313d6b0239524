"""pytest fixtures: the Slurm test cluster (tests/harness/slurm.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness.slurm import SlurmCluster, start_cluster, usable


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """A 4-node Slurm cluster on 127.0.0.1 (munged, slurmctld, 4 slurmd), stopped by PID at
    the end of the session. Client commands need ``cluster.env()`` (SLURM_CONF and MPI
    loopback settings)."""
    reason = usable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="berth-slurm-"))
    cluster = start_cluster(root, nodes=4)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
