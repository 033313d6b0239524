"""The MPI test image and the ``mpi_image`` fixture (DESIGN.md decision 9, docs/mpi.md).

The image is Debian bookworm minbase with ``openmpi-bin`` (OpenMPI 4.1.4 with PMIx 4.2.2:
libopenmpi3, mpirun, orted) plus ``/opt/hello``: a small MPI program compiled here on the host
with ``mpicc`` (host and image are both Debian 12 with the same OpenMPI, so the ABI matches and
no compiler is needed inside the image). Its output, one line per rank::

    hello rank=R size=N node=$SLURMD_NODENAME host=HOSTNAME pid=PID

The debootstrap tree is built once (needs root and the Debian mirror, minutes the first time)
and cached, like the other test images, under /var/cache/berth-test-images (see
:func:`tests.harness.images.cache_dir`); the layer with the program is cached by content.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.ocilayout import Dir, File, HostFile, ImageSpec, Layer

#: What debootstrap adds to minbase: the MPI runtime (mpirun, orted, libopenmpi3 + PMIx).
MPI_INCLUDE = ("openmpi-bin",)

HELLO_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int rank = -1, size = -1, len = 0;
    char host[MPI_MAX_PROCESSOR_NAME];
    const char *node = getenv("SLURMD_NODENAME");
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &len);
    /* A real exchange, not just PMIx wire-up: the sum of all ranks reaches every rank. */
    int sum = 0;
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("hello rank=%d size=%d node=%s host=%s pid=%d sum=%d\n", rank, size, node ? node : "-", host,
           (int)getpid(), sum);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
"""


def _rootfs_tar() -> tuple[Path, str]:
    """debootstrap minbase bookworm + openmpi-bin as an uncompressed tar, built once."""
    return images.debootstrap_rootfs_tar("mpi", MPI_INCLUDE)


#: bench/mpi.py's OSU-style micro-benchmark (tests use it for large messages between ranks).
MPIBENCH_C = Path(__file__).resolve().parents[2] / "bench" / "mpi" / "mpibench.c"


def hello_binary() -> Path:
    """``/opt/hello`` compiled on the host with mpicc, cached by source hash."""
    return _compiled("mpi-hello", HELLO_C)


def mpibench_binary() -> Path:
    """bench/mpi/mpibench.c compiled on the host with mpicc (world-readable, cached by source hash):
    ``mpibench TESTS MAX_P2P MAX_COLL ITERS WARMUP REPS`` prints ``RESULT TEST SIZE ...`` lines."""
    return _compiled("mpibench", MPIBENCH_C.read_text())


def _compiled(name: str, source: str) -> Path:
    mpicc = shutil.which("mpicc")
    if mpicc is None:
        raise FileNotFoundError("mpicc is missing: run scripts/install-system-packages.sh (libopenmpi-dev)")
    key = f"{name}-" + hashlib.sha256(source.encode()).hexdigest()[:16]
    binary = images.cache_dir() / key
    if binary.exists():
        return binary
    with images._cache_lock(key):
        if binary.exists():
            return binary
        work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=images.cache_dir()))
        try:
            (work / "hello.c").write_text(source)
            subprocess.run([mpicc, "-O2", "-o", str(work / "hello"), str(work / "hello.c")],
                           check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
            os.chmod(work / "hello", 0o755)
            os.replace(work / "hello", binary)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return binary


def mpi_spec() -> ImageSpec:
    """Debian bookworm minbase + openmpi-bin (one big layer) plus /opt/hello."""
    tar_path, key = _rootfs_tar()
    extra = Layer((Dir("etc"), Dir("opt"), HostFile("opt/hello", hello_binary(), mode=0o755),
                   File("etc/berth-marker", "mpi\n")))
    return ImageSpec(layers=(Layer(tar_path=str(tar_path), tar_key=key), extra), cmd=("/bin/bash",))


@pytest.fixture(scope="session")
def mpi_image(registry) -> images.PushedImage:
    """The MPI test image pushed to the session registry (``test/mpi:4.1.4``). Minutes the first
    time (debootstrap), then cached. Use in tests marked ``slow``."""
    try:
        spec = mpi_spec()
    except (PermissionError, FileNotFoundError) as error:
        pytest.skip(str(error))
    return images.push_pushed_image(registry, "test/mpi", "4.1.4", spec, "oci")
