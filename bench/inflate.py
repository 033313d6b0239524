#!/usr/bin/env python3
"""Which gzip inflater should pull use? Wall and CPU seconds of each candidate on real layers
(issue 10, target 4: "inflate with the fastest well-kept library").

Candidates, each inflating whole layer blobs with the output thrown away:

- programs (what berth.image.tarstream runs today, in its own process, through a pipe):
  ``igzip -dc`` (ISA-L, Debian package isal), ``pigz -dc``, ``gzip -dc`` (reference);
- in-process libraries, streaming 1 MiB reads through ``decompressobj(wbits=31)`` (multi-member
  loop as tarstream.GzipReader does): Python's ``zlib``, ``isal.isal_zlib`` (PyPI ``isal``),
  ``zlib_ng.zlib_ng`` (PyPI ``zlib-ng``); a library not installed is listed as such;
- for reference, ``zstd -dc`` of the same tar recompressed with ``zstd -3`` (what a zstd
  layer costs to read).

A program's CPU is its own (RUSAGE_CHILDREN); a library's is this process's. On pull, a program
inflates on another core while berth parses tar headers, which an in-process library cannot do
under the GIL (isal and zlib-ng release it only inside each call). Prints a markdown report.

Usage::

    python3 bench/inflate.py [--runs 5] [--layers BLOB...] [--output FILE]

Default layers: the gzip blobs over 1 MB of the cached test and bench images
(/var/cache/berth-test-images, /var/cache/berth-bench/layers).
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

GZIP_MAGIC = b"\x1f\x8b"
CHUNK_BYTES = 1 << 20
PROGRAMS = ("igzip", "pigz", "gzip")
LIBRARIES = (("zlib", "zlib"), ("isal", "isal.isal_zlib"), ("zlib-ng", "zlib_ng.zlib_ng"))


def default_layers() -> list[Path]:
    found: dict[str, Path] = {}
    roots = [Path("/var/cache/berth-test-images"), c.CACHE / "layers"]
    for root in roots:
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            try:
                if not path.is_file() or path.stat().st_size < 1_000_000:
                    continue
                with open(path, "rb") as handle:
                    if handle.read(2) != GZIP_MAGIC:
                        continue
            except OSError:
                continue
            found.setdefault(c.sha256_file(path), path)
    return sorted(found.values(), key=lambda p: p.stat().st_size)


def run_program(argv: list[str], path: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of ``argv < path > /dev/null``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(path, "rb") as source, open(os.devnull, "wb") as sink:
        subprocess.run(argv, stdin=source, stdout=sink, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_library(module, path: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of streaming the gzip members of ``path`` through ``module``."""
    cpu = time.process_time()
    start = time.perf_counter()
    out = 0
    with open(path, "rb", buffering=0) as source:
        inflater = module.decompressobj(wbits=31)
        while chunk := source.read(CHUNK_BYTES):
            while chunk:
                out += len(inflater.decompress(chunk))
                if not inflater.eof:
                    break
                chunk = inflater.unused_data  # next gzip member
                inflater = module.decompressobj(wbits=31)
                if not chunk.startswith(GZIP_MAGIC):
                    chunk = b""  # trailing padding
    if out == 0:
        raise RuntimeError(f"{module.__name__} inflated nothing from {path}")
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", nargs="*", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    command = "python3 bench/inflate.py " + " ".join(sys.argv[1:])
    layers = args.layers or default_layers()
    if not layers:
        parser.error("no gzip layers found: build the test images first (scripts/test.sh) or pass --layers")
    sections = [c.report_header("gzip inflate for pull (issue 10, target 4)", command.strip())]
    modules = {}
    missing = []
    for label, name in LIBRARIES:
        try:
            modules[label] = importlib.import_module(name)
        except ImportError:
            missing.append(label)
    programs = [name for name in PROGRAMS if shutil.which(name)]
    work = Path(tempfile.mkdtemp(prefix="berth-bench-inflate-", dir="/var/tmp"))
    totals: dict[str, list[float]] = {}
    try:
        for path in layers:
            tar_bytes = 0
            zstd_blob = None
            if shutil.which("zstd"):
                zstd_blob = work / "layer.tar.zst"
                with open(path, "rb") as source, open(zstd_blob, "wb") as sink:
                    gunzip = subprocess.Popen(["pigz", "-dc"], stdin=source, stdout=subprocess.PIPE)
                    subprocess.run(["zstd", "-q", "-3", "-c"], stdin=gunzip.stdout, stdout=sink, check=True)
                    gunzip.stdout.close()
                    gunzip.wait()
            with open(path, "rb") as source:
                tar_bytes = len(subprocess.run(["pigz", "-dc"], stdin=source, capture_output=True,
                                               check=True).stdout)
            c.log(f"{path.name[:16]}: {path.stat().st_size / 1e6:.0f} MB gzip, {tar_bytes / 1e6:.0f} MB tar")
            candidates = [(f"{name} -dc (program)", lambda name=name: run_program([name, "-dc"], path))
                          for name in programs]
            candidates += [(f"{label} (in process)", lambda m=module: run_library(m, path))
                           for label, module in modules.items()]
            if zstd_blob is not None:
                candidates.append(("zstd -dc of the same tar, zstd -3 (reference)",
                                   lambda: run_program(["zstd", "-dc"], zstd_blob)))
            walls = {label: c.Sample() for label, _ in candidates}
            cpus = {label: c.Sample() for label, _ in candidates}
            for _ in range(args.runs):  # interleaved, so machine load hits every candidate alike
                for label, measure in candidates:
                    wall, cpu = measure()
                    walls[label].add(wall)
                    cpus[label].add(cpu)
            rows = []
            fastest = min(cpus[label].median for label, _ in candidates if "reference" not in label)
            for label, _ in candidates:
                rows.append([label, walls[label].cell(), cpus[label].cell(),
                             f"{tar_bytes / 1e6 / walls[label].median:.0f}",
                             f"{cpus[label].median / fastest:.2f}" if "reference" not in label else "—"])
                totals.setdefault(label, []).append(cpus[label].median)
            sections += ["", f"#### layer {path.name[:16]}…: {path.stat().st_size / 1e6:.0f} MB gzip, "
                         f"{tar_bytes / 1e6:.0f} MB tar", "",
                         c.markdown_table(["inflater", "wall s: median (min–max)", "CPU s: median (min–max)",
                                           "MB/s of tar (wall)", "CPU / fastest"], rows)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if missing:
        sections += ["", f"- not installed here: {', '.join(missing)} (pip install isal zlib-ng to compare them)"]
    ranked = sorted(((sum(values), label) for label, values in totals.items() if "reference" not in label))
    sections += ["", "CPU seconds summed over the layers: " + "; ".join(
        f"{label} {total:.2f}" for total, label in sorted((sum(v), k) for k, v in totals.items()))]
    if ranked:
        sections.append(f"- least CPU per inflated byte: {ranked[0][1]} ({ranked[0][0]:.2f} s; next "
                        f"{ranked[1][1] if len(ranked) > 1 else '—'}). berth inflates with the first of "
                        "igzip, pigz found (berth.image.tarstream), in its own process, so inflation "
                        "overlaps berth's tar pass on another core. Wall times on a loaded machine "
                        "vary with the load; compare CPU seconds.")
    c.emit_report(sections, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
