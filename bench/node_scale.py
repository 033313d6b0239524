#!/usr/bin/env python3
"""Many containers of one image on one node (issue 10, target 1): N = 1, 2, 4, 8, 16 concurrent
``berth run`` containers of the import-storm image (bench/import_storm.py's image, 3000 modules),
each importing the whole storm, against N plain processes importing the same tree unpacked on
disk, side by side in one run.

Variants, each started N at once as berthtest (through the same runuser wrapper):

- ``plain``: the host's python3 (Debian 12's, the image's own) on the unpacked directory;
- ``berth shared``: ``berth run`` with the site setting ``image_mount = "shared"`` (the default:
  one squashfuse_ll mount of the image for all N containers, berth.runtime.imagemount);
- ``berth shared, lingering``: the same with ``image_mount_linger = 600`` (the mount stays
  between rounds, so every round's containers find it mounted, with its warm FUSE caches);
- ``berth per-container``: ``berth run`` with ``image_mount = "per_container"`` (one mount and
  one daemon per container, what berth did before);
- ``berth unpacked``: ``berth run`` with ``image_mount = "unpacked"`` (no FUSE: a node-local
  unpacked copy of the image, made by the warm-up round, bound read-only by every container).

Each is timed twice per round: the storm (``import storm.all``) and ``python3 -c pass``, so
that the difference says what the imports cost and the baseline what starting costs. Wall time:
from the first start to the last exit; the median of ``--runs`` rounds (rounds interleave the
variants, so that load from other users of the machine falls on all of them). While the storm
runs, the resident memory (VmRSS) of berth's helper processes of the user — FUSE daemons
(squashfuse, squashfuse_ll, fuse-overlayfs) and the containers' berth-init — is sampled every
10 ms; the table gives the largest sum seen and the most daemons seen at once. Warm page cache
(one unmeasured round of each variant first).

Usage (root: it runs the variants as the unprivileged user)::

    python3 bench/node_scale.py [--counts 1,2,4,8,16] [--runs 3] [--modules 3000] [--output FILE] [--before BERTH]

``--before BERTH`` adds ``berth shared, before``: another berth executable (an older commit's
venv) with ``image_mount = "shared"``, in the same rounds (before and after under one load).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c
from import_storm import storm_code

HELPERS = ("squashfuse", "squashfuse_ll", "fuse-overlayfs", ".berth-init")
DAEMONS = ("squashfuse", "squashfuse_ll")


class HelperSampler:
    """Samples the summed VmRSS of the user's helper processes of this benchmark while running:
    FUSE daemons whose command line names ``marker`` (the benchmark's directory: the machine's
    other users run berth as the same test user), berth-init whose parent's (runc's) does."""

    def __init__(self, uid: int, marker: str) -> None:
        self.uid = uid
        self.marker = marker.encode()
        self.peak_rss_kib = 0
        self.peak_daemons = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> HelperSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss, daemons = self.sample()
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_daemons = max(self.peak_daemons, daemons)
            self._stop.wait(0.01)

    def sample(self) -> tuple[int, int]:
        rss = daemons = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as handle:
                    status = handle.read()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            name = fields.get("Name", "").strip()
            if name not in HELPERS or int(fields.get("Uid", "-1").split()[0]) != self.uid:
                continue
            if not self._ours(entry, 4 if name == ".berth-init" else 1):
                continue
            rss += int(fields.get("VmRSS", "0 kB").split()[0])
            daemons += name in DAEMONS
        return rss, daemons


    def _ours(self, pid: str, generations: int) -> bool:
        """Whether ``pid`` or one of its ``generations - 1`` ancestors names the marker."""
        for _ in range(generations):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    if self.marker in handle.read():
                        return True
                with open(f"/proc/{pid}/stat", "rb") as handle:
                    pid = handle.read().rsplit(b")", 1)[1].split()[1].decode()
            except (OSError, IndexError):
                return False
        return False


def concurrent(argvs: list[list[str]]) -> float:
    """Start every argv at once; seconds until the last one exits. Raises when one fails."""
    started = time.perf_counter()
    processes = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, cwd="/") for argv in argvs]
    failures = []
    for process in processes:
        _, err = process.communicate(timeout=900)
        if process.returncode != 0:
            failures.append(f"exit {process.returncode}: {c.error_line(err)}")
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(argvs)} failed: {failures[0]}")
    return elapsed


def site_config(user: c.BenchUser, parent: Path, name: str, text: str) -> Path:
    directory = parent / f"site-{name}"
    directory.mkdir()
    (directory / "berth.toml").write_text(text)
    user.chown_tree(directory)
    return directory


BEFORE = "berth shared, before (image_mount = shared)"
LINGERING = "berth shared, lingering (image_mount_linger = 600)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4,8,16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modules", type=int, default=3000)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--before", type=Path, help="another berth executable, timed as 'berth shared, before'")
    args = parser.parse_args()
    if os.getuid() != 0:
        parser.error("run as root (it runs the variants as the unprivileged user)")
    counts = [int(n) for n in args.counts.split(",")]
    command = "python3 bench/node_scale.py " + " ".join(sys.argv[1:])
    header = c.report_header(f"Node scale: N concurrent containers of one image, import storm of {args.modules} "
                             "modules (issue 10, target 1)", command.strip())
    c.ensure_cache_readable()
    user = c.BenchUser.lookup()
    image, _ = c.python_image(args.modules)
    workdir = user.tempdir("berth-bench-scale-", Path("/var/tmp"))
    # name -> (storm argv, baseline argv, env)
    variants: dict[str, tuple[list[str], list[str], dict | None]] = {}
    lingering_env = None
    try:
        c.log("unpacking the image")
        rootfs = user.unpack(image, workdir / "rootfs")
        store = user.tempdir("berth-store-", workdir)
        with c.Registry(c.registry_storage()) as registry:
            c.ensure_pushed(registry, [image])
            pull_config = c.berth_config_dir(user, [registry.host], workdir)
            ref = image.ref(registry)
            pull = [str(c.BERTH), "pull", *(["--insecure"] if c.berth_help_has(user, "pull", "--insecure") else []),
                    ref]
            user.run(pull, env=c.berth_env(pull_config, store))
        host = ["env", "PYTHONDONTWRITEBYTECODE=1", "/usr/bin/python3"]
        variants["plain (python3 on the unpacked directory)"] = (
            [*host, "-c", storm_code(str(rootfs / "opt" / "storm"))], [*host, "-c", "pass"], None)
        for name, setting, linger in (("berth shared (image_mount = shared)", "shared", 0),
                                      ("berth per-container (image_mount = per_container)", "per_container", 0),
                                      ("berth unpacked (image_mount = unpacked)", "unpacked", 0),
                                      (LINGERING, "shared", 600)):
            label = f"{setting}-linger" if linger else setting
            config = site_config(user, workdir, label, f'image_mount = "{setting}"\n'
                                 + (f"image_mount_linger = {linger}\n" if linger else ""))
            state = user.tempdir(f"state-{label}-", workdir)
            berth = [str(c.BERTH), "run", ref, "/usr/bin/python3"]
            variants[name] = ([*berth, "-c", storm_code("/opt/storm")], [*berth, "-c", "pass"],
                              c.berth_env(config, store, state))
            if linger:
                lingering_env = variants[name][2]
            if args.before and setting == "shared":
                before_state = user.tempdir("state-before-", workdir)
                berth = [str(args.before), "run", ref, "/usr/bin/python3"]
                before = (BEFORE, ([*berth, "-c", storm_code("/opt/storm")], [*berth, "-c", "pass"],
                                   c.berth_env(config, store, before_state)))
        if args.before:
            variants[before[0]] = before[1]

        c.log("warm-up round")
        for storm, baseline, env in variants.values():
            concurrent([user.argv(storm, env)])
            concurrent([user.argv(baseline, env)])

        wall = {(name, n, kind): c.Sample() for name in variants for n in counts for kind in ("storm", "pass")}
        rss = {(name, n): 0 for name in variants for n in counts}
        daemons = {(name, n): 0 for name in variants for n in counts}
        for round_number in range(args.runs):
            for n in counts:
                for name, (storm, baseline, env) in variants.items():
                    c.log(f"round {round_number + 1}/{args.runs}: N={n} {name}")
                    # the variant's own state directory: a lingering variant's daemon stays
                    # mounted while the others run, and must not count as theirs
                    with HelperSampler(user.uid, (env or {}).get("BERTH_STATE_DIR", str(workdir))) as sampler:
                        wall[(name, n, "storm")].add(concurrent([user.argv(storm, env)] * n))
                    rss[(name, n)] = max(rss[(name, n)], sampler.peak_rss_kib)
                    daemons[(name, n)] = max(daemons[(name, n)], sampler.peak_daemons)
                    wall[(name, n, "pass")].add(concurrent([user.argv(baseline, env)] * n))
    finally:
        if lingering_env is not None:  # berth ends its lingering mount (and its reaper)
            user.run([str(c.BERTH), "doctor", "--cleanup"], env=lingering_env, check=False)
        c.rm_tree(workdir)

    names = list(variants)
    plain, shared, per, unpacked, lingering = names[:5]
    berths = ((shared, "shared"), (lingering, "shared, lingering"), (per, "per-container"), (unpacked, "unpacked"))
    rows = []
    for n in counts:
        plain_storm = wall[(plain, n, "storm")].median
        row = [str(n), wall[(plain, n, "storm")].cell("ms")]
        for name, _ in berths:
            row += [wall[(name, n, "storm")].cell("ms"), c.ratio(wall[(name, n, "storm")].median, plain_storm)]
        rows.append(row)
    starts = []
    for n in counts:
        row = [str(n)]
        for name in (plain, shared, lingering, per, unpacked):
            storm_only = wall[(name, n, "storm")].median - wall[(name, n, "pass")].median
            row += [wall[(name, n, "pass")].cell("ms"), f"{storm_only * 1000:.0f}"]
        plain_only = wall[(plain, n, "storm")].median - wall[(plain, n, "pass")].median
        for name in (shared, lingering, unpacked):
            row.append(c.ratio(wall[(name, n, "storm")].median - wall[(name, n, "pass")].median, plain_only))
        starts.append(row)
    helpers = [[str(n), *(cell for name, _ in berths for cell in (f"{rss[(name, n)] / 1024:.1f}",
                                                                  str(daemons[(name, n)])))] for n in counts]
    targets = []
    for name, label in ((shared, "shared"), (lingering, "shared, lingering mount"), (unpacked, "unpacked")):
        worst = max(counts, key=lambda n: wall[(name, n, "storm")].median / wall[(plain, n, "storm")].median)
        worst_ratio = wall[(name, worst, "storm")].median / wall[(plain, worst, "storm")].median
        targets.append(f"- target berth {label} ≤ 1.3x N plain processes at every N: worst {worst_ratio:.2f} at "
                       f"N={worst}, " + ("met" if worst_ratio <= 1.3 else "NOT met"))
    growth = rss[(shared, counts[-1])] / max(rss[(shared, counts[0])], 1)
    per_growth = rss[(per, counts[-1])] / max(rss[(per, counts[0])], 1)
    targets += [
        f"- target helper memory flat in N: shared {rss[(shared, counts[0])] / 1024:.1f} MiB at N={counts[0]}, "
        f"{rss[(shared, counts[-1])] / 1024:.1f} MiB at N={counts[-1]} ({growth:.1f}x for {counts[-1] // counts[0]}x "
        f"the containers; per-container mounts: {per_growth:.1f}x; unpacked: "
        f"{rss[(unpacked, counts[-1])] / 1024:.1f} MiB at N={counts[-1]}, no daemon); FUSE daemons at "
        f"N={counts[-1]}: {daemons[(shared, counts[-1])]} shared, {daemons[(per, counts[-1])]} per-container, "
        f"{daemons[(unpacked, counts[-1])]} unpacked",
        "",
    ]
    if args.before:
        targets.insert(-1, "- berth shared now / before, N at once, storm: " + ", ".join(
            f"N={n} {wall[(shared, n, 'storm')].median / wall[(BEFORE, n, 'storm')].median:.2f}" for n in counts)
            + "; `python3 -c pass`: " + ", ".join(
            f"N={n} {wall[(shared, n, 'pass')].median / wall[(BEFORE, n, 'pass')].median:.2f}" for n in counts))
    sections = [
        header,
        *targets,
        f"Image: {image.name}, {image.tar_bytes / 1e6:.0f} MB of tar. Warm page cache; median (min–max) "
        f"of {args.runs} rounds; wall time from the first start to the last exit of the N processes.",
        "",
        "#### Import storm, N at once: wall time and ratio to N plain processes",
        "",
        c.markdown_table(["N", "plain, ms", *(cell for _, label in berths
                                              for cell in (f"berth {label}, ms", f"{label} / plain"))], rows),
        "",
        "#### Where the time goes: `python3 -c pass` N at once (start-up), and storm minus that (imports)",
        "",
        c.markdown_table(["N", "plain: pass, ms", "plain: imports, ms", "shared: pass, ms", "shared: imports, ms",
                          "lingering: pass, ms", "lingering: imports, ms",
                          "per-container: pass, ms", "per-container: imports, ms", "unpacked: pass, ms",
                          "unpacked: imports, ms", "imports: shared / plain", "imports: lingering / plain",
                          "imports: unpacked / plain"], starts),
        "",
        "#### berth's helper processes during the storm (FUSE daemons and the containers' berth-init): largest summed RSS",
        "",
        c.markdown_table(["N", *(cell for _, label in berths
                                 for cell in (f"{label}: RSS, MiB", f"{label}: FUSE daemons"))], helpers),
        "",
    ]
    if args.before:
        sections += [
            f"#### berth shared, now and before (`{args.before}`), in the same rounds",
            "",
            c.markdown_table(["N", "storm: now, ms", "storm: before, ms", "now / before", "pass: now, ms",
                              "pass: before, ms", "now / before"], [
                [str(n), wall[(shared, n, "storm")].cell("ms"), wall[(BEFORE, n, "storm")].cell("ms"),
                 c.ratio(wall[(shared, n, "storm")].median, wall[(BEFORE, n, "storm")].median),
                 wall[(shared, n, "pass")].cell("ms"), wall[(BEFORE, n, "pass")].cell("ms"),
                 c.ratio(wall[(shared, n, "pass")].median, wall[(BEFORE, n, "pass")].median)] for n in counts]),
            "",
        ]
    c.emit_report(sections, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
