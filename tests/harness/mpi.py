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
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.ocilayout import Dir, File, HostFile, ImageSpec, Layer, Symlink

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


def _compiled(name: str, source: str, compiler: str = "mpicc", flags: tuple[str, ...] = ()) -> Path:
    mpicc = shutil.which(compiler)
    if mpicc is None:
        raise FileNotFoundError(f"{compiler} is missing: run scripts/install-system-packages.sh "
                                "(libopenmpi-dev, libmpich-dev)")
    key = f"{name}-" + hashlib.sha256(json.dumps([source, compiler, flags]).encode()).hexdigest()[:16] \
        if compiler != "mpicc" or flags else f"{name}-" + hashlib.sha256(source.encode()).hexdigest()[:16]

    def make(out: Path) -> None:
        source_file = out.with_suffix(".c")
        source_file.write_text(source)
        subprocess.run([mpicc, "-O2", "-o", str(out), str(source_file), *flags],
                       check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)

    return _cached_file(key, make, mode=0o755)


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


# ---------------------------------------------------------------------------------------------
# Host MPI injection (issue 13, docs/mpi.md "Host MPI injection"): the host's MPI is Debian's
# MPICH 4.0.2 (libmpich.so.12.2.2); the image brings "its own" MPICH build, a copy of Debian's
# with its version string changed to 4.0.1 and its file named libmpich.so.12.2.1, so that the
# library a rank really loaded can be told from the output (MPI_Get_library_version, and the
# file dladdr names).

HOST_MPICH = "/usr/lib/x86_64-linux-gnu/libmpich.so.12.2.2"
IMAGE_MPICH_VERSION = "4.0.1"
IMAGE_MPICH_FILE = "usr/lib/x86_64-linux-gnu/libmpich.so.12.2.1"

MPICH_HELLO_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    int rank = -1, size = -1, len = 0, sum = 0;
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    Dl_info info;
    const char *node = getenv("SLURMD_NODENAME");
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Get_library_version(version, &len);
    version[strcspn(version, "\n")] = 0;
    for (char *c = version; *c; c++) if (*c == '\t' || *c == ' ') *c = '_';
    if (!dladdr((void *)MPI_Init, &info) || !info.dli_fname) info.dli_fname = "?";
    printf("mpich rank=%d size=%d node=%s sum=%d library=%s file=%s\n", rank, size, node ? node : "-", sum,
           version, info.dli_fname);
    fflush(stdout);
    /* MPICH 4.0.2 + UCX 1.13 over TCP: without this barrier a rank entering MPI_Finalize late
     * can spin closing its endpoints to peers already in PMI's final barrier (docs/mpi.md). */
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
"""

#: A stand-in MPICH-ABI C library newer than any host's (ABI 12.9): refused before it runs.
FAKE_NEWER_MPI_C = r"""
int MPI_Get_library_version(char *version, int *length) {
    static const char text[] = "FAKE IMAGE MPICH (ABI 12.9)";
    for (int i = 0; i < (int)sizeof text; i++) version[i] = text[i];
    *length = (int)sizeof text - 1;
    return 0;
}
"""


def mpich_hello_binary() -> Path:
    """``/opt/hello-mpich`` compiled with Debian's mpicc.mpich (links libmpich.so.12)."""
    return _compiled("mpich-hello", MPICH_HELLO_C, compiler="mpicc.mpich", flags=("-ldl",))


def _cached_file(key: str, make, mode: int = 0o644) -> Path:
    """``cache_dir()/key``, made once by ``make(path)`` (under the cache's lock, then renamed)."""
    path = images.cache_dir() / key
    if path.exists():
        return path
    with images._cache_lock(key):
        if not path.exists():
            work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=images.cache_dir()))
            try:
                make(work / "out")
                os.chmod(work / "out", mode)
                os.replace(work / "out", path)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return path


def image_mpich_library() -> Path:
    """Debian's libmpich.so.12.2.2 without debug sections and with MPICH_VERSION 4.0.1."""
    if not os.path.exists(HOST_MPICH):
        raise FileNotFoundError(f"{HOST_MPICH} is missing: run scripts/install-system-packages.sh (mpich)")

    def make(out: Path) -> None:
        subprocess.run(["objcopy", "--strip-debug", HOST_MPICH, str(out)], check=True, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=120)
        data = out.read_bytes()
        old = b"\x004.0.2\x00"
        if data.count(old) != 1:
            raise RuntimeError(f"{HOST_MPICH}: MPICH_VERSION 4.0.2 not found once; cannot make the image's copy")
        out.write_bytes(data.replace(old, b"\x00" + IMAGE_MPICH_VERSION.encode() + b"\x00"))

    digest = hashlib.sha256(Path(HOST_MPICH).read_bytes()).hexdigest()[:16]
    return _cached_file(f"image-libmpich-{IMAGE_MPICH_VERSION}-{digest}.so", make)


def fake_newer_mpich_library() -> Path:
    def make(out: Path) -> None:
        source = out.with_suffix(".c")
        source.write_text(FAKE_NEWER_MPI_C)
        subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libmpich.so.12", "-o", str(out), str(source)],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)

    return _cached_file("fake-libmpich-12.9-" + hashlib.sha256(FAKE_NEWER_MPI_C.encode()).hexdigest()[:16] + ".so",
                        make)


def mpich_spec() -> ImageSpec:
    """The MPI image's Debian (which has MPICH's dependencies: hwloc, UCX) plus the image's own
    MPICH 4.0.1 (ABI 12.2.1, in the image's standard directory, not in its ld.so cache) and
    /opt/hello-mpich."""
    tar_path, key = _rootfs_tar()
    extra = Layer((Dir("opt"), HostFile("opt/hello-mpich", mpich_hello_binary(), mode=0o755),
                   HostFile(IMAGE_MPICH_FILE, image_mpich_library(), mode=0o644),
                   Symlink("usr/lib/x86_64-linux-gnu/libmpich.so.12", os.path.basename(IMAGE_MPICH_FILE)),
                   File("etc/berth-marker", "mpich\n")))
    return ImageSpec(layers=(Layer(tar_path=str(tar_path), tar_key=key), extra), cmd=("/bin/bash",))


def mpich_newer_spec() -> ImageSpec:
    """busybox with an MPICH-ABI C library of ABI 12.9 (newer than the host's 12.2.2)."""
    return images.busybox_spec(extra_layers=(Layer((
        Dir("usr/lib"), Dir("usr/lib/x86_64-linux-gnu"),
        HostFile("usr/lib/x86_64-linux-gnu/libmpich.so.12.9.0", fake_newer_mpich_library(), mode=0o644),
        Symlink("usr/lib/x86_64-linux-gnu/libmpich.so.12", "libmpich.so.12.9.0"))),), marker="mpich-newer")


@pytest.fixture(scope="session")
def mpich_image(registry) -> images.PushedImage:
    """The image with its own MPICH 4.0.1 (``test/mpich:4.0.1``); built from the MPI image's tree."""
    try:
        spec = mpich_spec()
    except (PermissionError, FileNotFoundError) as error:
        pytest.skip(str(error))
    return images.push_pushed_image(registry, "test/mpich", "4.0.1", spec, "oci")


@pytest.fixture(scope="session")
def mpich_newer_image(registry) -> images.PushedImage:
    return images.push_pushed_image(registry, "test/mpich-newer", "12.9", mpich_newer_spec(), "oci")
