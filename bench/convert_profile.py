#!/usr/bin/env python3
"""Where a conversion's time goes: berth's flatten of one layer blob to SquashFS, in process,
once plain (wall, berth's own CPU, its children's CPU: igzip + tar2sqfs) and once under
cProfile (the functions with the most time of their own). Issue 10, target 4 asks for this
where pull + convert misses 1.5x the ``pigz -dc`` floor.

Usage (with berth's venv)::

    .venv/bin/python bench/convert_profile.py [--layer BLOB] [--top 12]

Default layer: the bench/debian layer (/var/cache/berth-bench/layers/debian-rootfs.tar.gz,
made by bench/pull_convert.py).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

from berth.image.flatten import Layer, build_squashfs
from berth.oci.digest import Digest


def cpu(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=Path, default=c.CACHE / "layers" / "debian-rootfs.tar.gz")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    command = "python3 bench/convert_profile.py " + " ".join(sys.argv[1:])
    layer = Layer(args.layer, "application/vnd.oci.image.layer.v1.tar+gzip", Digest("sha256", "0" * 64))
    rows = []
    stats_text = ""
    with tempfile.TemporaryDirectory(prefix="berth-bench-profile-", dir="/var/tmp") as work:
        out = Path(work) / "image.sqfs"
        for profiled in (False, True):
            own, children, start = (resource.getrusage(resource.RUSAGE_SELF),
                                    resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter())
            profile = cProfile.Profile() if profiled else None
            if profile:
                profile.enable()
            report = build_squashfs([layer], out)
            if profile:
                profile.disable()
            wall = time.perf_counter() - start
            rows.append(["under cProfile" if profiled else "plain", f"{wall:.2f}",
                         f"{cpu(resource.getrusage(resource.RUSAGE_SELF)) - cpu(own):.2f}",
                         f"{cpu(resource.getrusage(resource.RUSAGE_CHILDREN)) - cpu(children):.2f}",
                         str(report.entries), f"{out.stat().st_size / 1e6:.0f}"])
            out.unlink()
            if profile:
                buffer = io.StringIO()
                pstats.Stats(profile, stream=buffer).sort_stats("tottime").print_stats(args.top)
                stats_text = "\n".join(line for line in buffer.getvalue().splitlines()
                                       if line.strip() and not line.startswith("   Ordered")
                                       and "List reduced" not in line)
    sections = [c.report_header("Where a conversion's time goes (issue 10, target 4)", command.strip()),
                "", f"Layer {args.layer.name}: {args.layer.stat().st_size / 1e6:.0f} MB gzip.", "",
                c.markdown_table(["run", "wall s", "berth CPU s", "children CPU s (igzip + tar2sqfs)",
                                  "entries", "SquashFS MB"], rows),
                "", "Functions with the most time of their own (cProfile, tottime):", "", "```",
                stats_text.strip(), "```"]
    text = "\n".join(sections).rstrip() + "\n" + c.report_footer()
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
