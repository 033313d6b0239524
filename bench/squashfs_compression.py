#!/usr/bin/env python3
"""Which SquashFS compressor berth should write (issue 9, defect 6): pull + convert time, file
size, read-back time and which readers accept the file, per compressor.

Debian 12's unsquashfs 4.5.1 refuses every file tar2sqfs 1.2 writes with lz4 ("read_id_table:
failed to read id table block"): tar2sqfs' lz4 compressor stores a metadata block compressed
even when that makes it larger (berth's 4-byte id table becomes a 5-byte block), and unsquashfs
rejects a block larger than the data it is meant to hold. The kernel, squashfuse and rdsquashfs
do not check that. This measures what choosing another compressor costs.

For each compressor: ``berth pull`` of the debian test image (python3-minimal; the test
harness builds and caches it) into a fresh store as the unprivileged test user (cold: every
blob downloaded and converted), the SquashFS size, whether ``unsquashfs -l`` and
``rdsquashfs -l`` read it, and the time to read every file back through squashfuse (page cache
warm for the SquashFS file itself, so this is decompression, not disk). Medians of --runs.
Run as root from the repository (uses .venv's berth and the harness's registry)::

    python3 bench/squashfs_compression.py [--runs 3] [--compressions lz4,zstd,gzip] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import common as c  # noqa: E402
from tests.harness import images  # noqa: E402
from tests.harness.registry import start_registry  # noqa: E402
from tests.harness.users import User, berth_executable, describe  # noqa: E402


def timed(user: User, argv: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    result = user.run(argv, env=env, timeout=1800)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(describe(result))
    return elapsed


def reads(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return "yes" if result.returncode == 0 else "NO: " + (result.stderr.strip().splitlines() or ["?"])[0]


def read_back_s(user: User, squashfs: Path, work: Path) -> float:
    mountpoint = work / "mnt"
    mountpoint.mkdir(exist_ok=True)
    shutil.chown(mountpoint, user.uid, user.gid)
    mounted = user.run(["squashfuse", str(squashfs), str(mountpoint)])
    if mounted.returncode != 0:
        raise SystemExit(describe(mounted))
    try:
        start = time.monotonic()
        result = user.run(["tar", "-C", str(mountpoint), "-cf", "/dev/null", "."])
        elapsed = time.monotonic() - start
    finally:
        user.run(["fusermount3", "-u", "-z", str(mountpoint)])
    if result.returncode not in (0, 2):  # 2: files the user may not read (e.g. /etc/shadow)
        raise SystemExit(describe(result))
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compressions", default="lz4,zstd,gzip")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    command = f"python3 bench/squashfs_compression.py --runs {args.runs} --compressions {args.compressions}"
    header = c.report_header("SquashFS compressors: pull + convert, size, read-back, readers (issue 9)", command)
    user = User.lookup(os.environ.get("BERTH_TEST_USER", "berthtest"))
    registry = start_registry(auth="none")
    work = Path(tempfile.mkdtemp(prefix="berth-bench-sqfs-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        images.push_image(registry, "bench/debian", "bookworm", images.debian_spec(), "oci")
        reference = f"{registry.host}/bench/debian:bookworm"
        rows = []
        for compression in args.compressions.split(","):
            pulls, read_s, size, readers = [], [], 0, ("", "")
            for run in range(args.runs):
                store = work / f"store-{compression}-{run}"
                store.mkdir()
                shutil.chown(store, user.uid, user.gid)
                env = {"BERTH_USER_STORE": str(store), "BERTH_SQUASHFS_COMPRESSION": compression,
                       "BERTH_STATE_DIR": str(work / f"state-{compression}-{run}")}
                pulls.append(timed(user, [str(berth_executable()), "pull", "-q", "--insecure", reference], env))
                [squashfs] = store.glob("images/*/image.sqfs")
                size = squashfs.stat().st_size
                readers = (reads(["unsquashfs", "-l", str(squashfs)]), reads(["rdsquashfs", "-l", "/", str(squashfs)]))
                read_s.append(read_back_s(user, squashfs, work))
                shutil.rmtree(store, ignore_errors=True)
            rows.append((compression, statistics.median(pulls), min(pulls), max(pulls), size,
                         statistics.median(read_s), *readers))
        lines = [header, f"- image: debian bookworm minbase + python3-minimal (the test harness's, 2 layers), "
                         f"pulled by the unprivileged user into a fresh store each run", "",
                 "| compressor | berth pull, cold: median (min–max) s | SquashFS MB | read all files via "
                 "squashfuse: median s | unsquashfs 4.5.1 | rdsquashfs |",
                 "|---|---|---|---|---|---|"]
        for compression, median, low, high, size, read, unsquashfs, rdsquashfs in rows:
            lines.append(f"| {compression} | {median:.2f} ({low:.2f}–{high:.2f}) | {size / 1e6:.1f} | {read:.2f} "
                         f"| {unsquashfs} | {rdsquashfs} |")
        report = "\n".join(lines) + "\n" + c.report_footer()
        print(report)
        if args.output:
            args.output.write_text(report)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
