"""A fake NVIDIA/AMD driver tree for GPU and CDI tests without a GPU (issue 13).

Made by root (the harness): device nodes made with mknod carrying the null device's numbers
(1, 3: opening them is harmless) in a temporary device directory that the site settings name as
``devices.dev_dir``; the driver's /proc files (version, one information file per GPU); fake
``libcuda.so.1`` and ``libnvidia-ml.so.1`` compiled with gcc into a library directory, entered in
a temporary ld.so cache built by the host's ldconfig; a fake ``nvidia-smi`` that lists the GPU
nodes it sees; and a directory for CDI specs. Everything is world-readable so the unprivileged
test user's berth can use it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

NULL_MAJOR, NULL_MINOR = 1, 3
DRIVER_VERSION = "550.54.14"

FAKE_CUDA_C = r"""
int cuInit(unsigned int flags) { (void)flags; return 0; }
const char *berth_fake_driver(void) { return "fake-cuda-%s"; }
"""
FAKE_NVML_C = r"""
int nvmlInit_v2(void) { return 0; }
"""
#: A dynamic program for the test image: loads the driver as the CUDA runtime does.
DLOPEN_PROBE_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "libcuda.so.1";
    void *handle = dlopen(name, RTLD_NOW);
    if (!handle) { printf("dlopen failed: %s\n", dlerror()); return 1; }
    int (*init)(unsigned int) = (int (*)(unsigned int))dlsym(handle, "cuInit");
    const char *(*driver)(void) = (const char *(*)(void))dlsym(handle, "berth_fake_driver");
    Dl_info info;
    dladdr((void *)init, &info);
    printf("cuInit=%d driver=%s from=%s\n", init ? init(0) : -1, driver ? driver() : "none", info.dli_fname);
    return 0;
}
"""
FAKE_SMI = """#!/bin/sh
# Fake nvidia-smi: the GPU nodes this process sees (under $BERTH_FAKE_DEV, else /dev), as
# `nvidia-smi -L` and `--query-gpu=uuid|name,driver_version --format=csv,noheader -i N` print them.
dev=${BERTH_FAKE_DEV:-/dev}
i=0
for node in "$dev"/nvidia[0-9]*; do
    [ -e "$node" ] || continue
    n=${node##*nvidia}
    uuid="GPU-0000000$n-fake-4000-8000-00000000000$n"
    case "$*" in
        -L) echo "GPU $i: Berth Fake GPU (UUID: $uuid)" ;;
        *uuid*"-i $i") echo "$uuid" ;;
        *name,driver_version*"-i $i") echo "Berth Fake GPU, %s" ;;
    esac
    i=$((i+1))
done
""" % DRIVER_VERSION


def uuid_of(index: int) -> str:
    return f"GPU-0000000{index}-fake-4000-8000-00000000000{index}"


@dataclass(frozen=True)
class FakeDriverTree:
    root: Path
    dev_dir: Path
    proc_dir: Path
    lib_dir: Path
    bin_dir: Path
    ld_cache: Path
    cdi_dir: Path
    gpus: int

    def site_toml(self, *, cdi_dirs: tuple[str, ...] | None = None, extra: str = "") -> str:
        """The ``[devices]`` table that points berth at this tree."""
        dirs = cdi_dirs if cdi_dirs is not None else (str(self.cdi_dir),)
        return textwrap.dedent(f"""
            [devices]
            dev_dir = "{self.dev_dir}"
            nvidia_proc_dir = "{self.proc_dir}"
            ld_cache = "{self.ld_cache}"
            bin_dirs = ["{self.bin_dir}"]
            cdi_dirs = {json.dumps(list(dirs))}
            mount_allow = ["{self.root}", "/usr", "/lib"]
        """) + textwrap.dedent(extra)

    def write_cdi(self, name: str, document: dict | str) -> Path:
        path = self.cdi_dir / name
        path.write_text(document if isinstance(document, str) else json.dumps(document))
        path.chmod(0o644)
        return path

    def node(self, name: str, *, char: bool = True) -> Path:
        """Make one more fake device node (as root), e.g. ``infiniband/uverbs0``."""
        path = self.dev_dir / name
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.mknod(path, (0o020000 if char else 0o060000) | 0o666, os.makedev(NULL_MAJOR, NULL_MINOR))
        os.chmod(path, 0o666)
        return path


def _gcc(source: str, output: Path, *args: str) -> None:
    c_file = output.with_suffix(".c")
    c_file.write_text(source)
    subprocess.run(["gcc", "-O2", "-o", str(output), str(c_file), *args], check=True, capture_output=True)
    c_file.unlink()


def make_fake_driver_tree(root: Path, *, gpus: int = 4, amd: bool = False, modeset: bool = False) -> FakeDriverTree:
    """Build the tree under ``root`` (which must be on a file system without nodev)."""
    if os.geteuid() != 0:
        raise RuntimeError("the fake driver tree needs root (mknod)")
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    root.chmod(0o755)
    dev_dir, proc_dir, lib_dir, bin_dir, cdi_dir = (root / n for n in ("dev", "proc-nvidia", "lib", "bin", "cdi"))
    for directory in (dev_dir, proc_dir, lib_dir, bin_dir, cdi_dir):
        directory.mkdir(mode=0o755)
    tree = FakeDriverTree(root, dev_dir, proc_dir, lib_dir, bin_dir, root / "ld.so.cache", cdi_dir, gpus)
    if amd:
        tree.node("kfd")
        for index in range(gpus):
            tree.node(f"dri/renderD{128 + index}")
    else:
        for index in range(gpus):
            tree.node(f"nvidia{index}")
        for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools") + (("nvidia-modeset",) if modeset else ()):
            tree.node(name)
    (proc_dir / "version").write_text(
        f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {DRIVER_VERSION}  Thu Feb 22 01:44:30 UTC 2024\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    for index in range(gpus if not amd else 0):
        info = proc_dir / "gpus" / f"0000:{index + 1:02x}:00.0"
        info.mkdir(parents=True)
        (info / "information").write_text(
            f"Model: \t\t Berth Fake GPU\nIRQ:   \t\t 42\nGPU UUID: \t {uuid_of(index)}\n"
            f"Video BIOS: \t ??.??.??.??.??\nBus Type: \t PCIe\nDMA Size: \t 47 bits\n"
            f"Device Minor: \t {index}\nGPU Excluded:\t No\n")
    _gcc(FAKE_CUDA_C % DRIVER_VERSION, lib_dir / f"libcuda.so.{DRIVER_VERSION}",
         "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1")
    _gcc(FAKE_NVML_C, lib_dir / f"libnvidia-ml.so.{DRIVER_VERSION}", "-shared", "-fPIC", "-Wl,-soname,libnvidia-ml.so.1")
    # ldconfig makes the soname links (libcuda.so.1 -> libcuda.so.550.54.14) and the cache.
    conf = root / "ld.so.conf"
    conf.write_text(f"{lib_dir}\n")
    subprocess.run(["ldconfig", "-C", str(tree.ld_cache), "-f", str(conf)], check=True, capture_output=True)
    (bin_dir / "nvidia-smi").write_text(FAKE_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    for path in (root, *root.rglob("*")):
        if not path.is_symlink() and not path.is_char_device() and not path.is_block_device():
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    return tree


def glibc_rootfs(root: Path) -> None:
    """Add the host's glibc (loader and libc) and the dlopen probe to an image root: a
    dynamic program's minimum, and no NVIDIA file."""
    libc_dir = root / "lib" / "x86_64-linux-gnu"
    libc_dir.mkdir(parents=True, exist_ok=True)
    (root / "lib64").mkdir(exist_ok=True)
    for name in ("libc.so.6",):
        shutil.copy2(f"/lib/x86_64-linux-gnu/{name}", libc_dir / name)
    shutil.copy2("/lib64/ld-linux-x86-64.so.2", root / "lib64" / "ld-linux-x86-64.so.2")
    (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    _gcc(DLOPEN_PROBE_C, root / "usr" / "bin" / "dlopen-probe")
