#!/usr/bin/env python3
"""Pull + convert to one SquashFS: berth against the anchors, side by side, as ratios (issue 2).

For each image ((a) debootstrap minbase bookworm, one layer; (b) a 450 MB five-layer image
with whiteouts and an opaque directory), cold (empty store) and warm (layers already cached,
only conversion), each run in turn:

- berth: ``berth pull REF`` into a fresh store (cold); after ``berth rmi`` (blobs kept) again
  (warm; the registry's access log must show no blob download). Peak RSS by /usr/bin/time.
- Sarus-like: ``skopeo copy docker://REF oci:DIR`` + ``umoci unpack --rootless`` +
  ``mksquashfs -comp lz4`` (gzip too, for reference); warm = the same into the existing layout
  (skopeo skips blobs it has).
- Charliecloud: ``ch-image --no-cache pull`` + ``ch-convert -o squash`` (its mksquashfs,
  gzip, 64 KiB blocks); warm = pull again into the same storage (layers from its download cache).
  ch-image speaks only HTTPS: it pulls from a second registry process (self-signed TLS,
  ``--tls-no-verify``) serving the same storage.
- Floor: ``pigz -dc`` of the layer blobs to /dev/null, and ``pigz -dc | tar2sqfs -c lz4``
  (for a multi-layer image: each layer separately, summed; that is not a correct flattened
  image, only the cost of the stream conversion).

Everything runs as the unprivileged user (berthtest). Prints a markdown report on stdout (and
to --output). Usage::

    python3 bench/pull_convert.py [--runs 3] [--images debian,multi] [--output FILE]
                                  [--before BERTH] [--berth-only]

``--before BERTH`` also times another berth executable (an older commit's venv, e.g. made with
``git worktree add /var/tmp/before REV && cd /var/tmp/before && scripts/setup-venv.sh``), in
the same runs, interleaved with this one: before and after on the same machine load.
``--berth-only`` leaves out the Sarus-like and Charliecloud pipelines (the floor stays).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

TOOLS = ("berth", "berth-convert", "berth-before", "berth-cpu", "berth-before-cpu", "skopeo", "umoci", "mksquashfs-lz4", "mksquashfs-gzip", "ch-image-pull",
         "ch-convert", "pigz", "tar2sqfs")


class Bench:
    def __init__(self, user: c.BenchUser, registry: c.Registry, tls_registry: c.Registry,
                 workdir: Path, before: Path | None = None, berth_only: bool = False) -> None:
        self.before = before
        self.berth_only = berth_only
        self.user = user
        self.registry = registry
        self.tls_registry = tls_registry
        self.workdir = workdir
        self.berth_missing = c.berth_subcommand_missing(user, "pull")
        self.berth_insecure_option = (not self.berth_missing) and c.berth_help_has(user, "pull", "--insecure")
        self.config_dir = c.berth_config_dir(user, [registry.host], workdir)
        self.berth_rss_kib: list[int] = []
        self.notes: list[str] = []

    # ---------------------------------------------------------------- berth

    def berth_pull(self, image: c.BenchImage, store: Path, berth: Path = c.BERTH) -> tuple[float, int, int, float]:
        """Seconds, peak RSS (KiB), registry blob downloads and CPU seconds (user + system, of
        berth and the igzip and tar2sqfs it waited for) of one ``berth pull``."""
        rss_file = self.workdir / "berth-time.txt"
        argv = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), str(berth), "pull"]
        if self.berth_insecure_option:
            argv.append("--insecure")
        argv.append(image.ref(self.registry))
        gets_before = self.registry.blob_gets()
        env = c.berth_env(self.config_dir, store, self.workdir / "berth-state")
        start = time.perf_counter()
        self.user.run(argv, env=env)
        seconds = time.perf_counter() - start
        rss_kib, user_s, system_s = rss_file.read_text().strip().splitlines()[-1].split()
        return seconds, int(rss_kib), self.registry.blob_gets() - gets_before, float(user_s) + float(system_s)

    def berth_forget_image(self, image: c.BenchImage, store: Path, berth: Path = c.BERTH) -> None:
        """Remove the converted image but keep its blobs (``berth rmi``; blobs go only with prune)."""
        env = c.berth_env(self.config_dir, store, self.workdir / "berth-state")
        self.user.run([str(berth), "rmi", image.ref(self.registry)], env=env)
        blobs = list((store / "blobs").rglob("*")) if (store / "blobs").exists() else []
        if not any(path.is_file() for path in blobs):
            raise RuntimeError("`berth rmi` removed the blobs too: cannot measure a warm pull")

    # ---------------------------------------------------------------- anchors

    def sarus(self, image: c.BenchImage, layout: Path, out: Path, results: dict, *, with_gzip: bool) -> None:
        u = self.user
        results["skopeo"].add(c.timed(u.argv(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                               f"docker://{image.ref(self.registry)}", f"oci:{layout}:bench"])))
        bundle = out.parent / "bundle"
        c.rm_tree(bundle)
        results["umoci"].add(c.timed(u.argv(["umoci", "unpack", "--rootless", "--image", f"{layout}:bench",
                                              str(bundle)])))
        # gzip is only a reference (Sarus's default) and slow on 2 cores: measured once, in the
        # first run's cold pass
        for comp in ("lz4", "gzip") if with_gzip else ("lz4",):
            target = out.with_suffix(f".{comp}.sqfs")
            results[f"mksquashfs-{comp}"].add(c.timed(u.argv(
                ["mksquashfs", str(bundle / "rootfs"), str(target), "-comp", comp, "-noappend", "-quiet",
                 "-no-progress"])))
            target.unlink()
        c.rm_tree(bundle)

    def charliecloud(self, image: c.BenchImage, storage: Path, out: Path, results: dict) -> None:
        env = {"CH_IMAGE_STORAGE": str(storage)}
        results["ch-image-pull"].add(c.timed(self.user.argv(
            ["ch-image", "--no-cache", "--tls-no-verify", "pull",
             f"{self.tls_registry.host}/{image.name}:{image.tag}", "bench"], env)))
        out.unlink(missing_ok=True)
        results["ch-convert"].add(c.timed(self.user.argv(
            ["ch-convert", "-i", "ch-image", "-o", "squash", "--tmp", str(out.parent), "bench", str(out)],
            env)))
        out.unlink()

    def floor(self, image: c.BenchImage, out: Path, results: dict) -> None:
        pigz_s = 0.0
        tar2sqfs_s = 0.0
        for layer in image.layers:
            pigz_s += c.timed(self.user.argv(["sh", "-c", 'exec pigz -dc "$1" > /dev/null', "sh", str(layer.path)]))
            out.unlink(missing_ok=True)
            tar2sqfs_s += c.timed(self.user.argv(
                ["sh", "-c", 'pigz -dc "$1" | tar2sqfs -q -f -c lz4 "$2"', "sh", str(layer.path), str(out)]))
            out.unlink(missing_ok=True)
        results["pigz"].add(pigz_s)
        results["tar2sqfs"].add(tar2sqfs_s)

    # ---------------------------------------------------------------- one image

    def measure(self, image: c.BenchImage, runs: int) -> dict:
        cold = {tool: c.Sample() for tool in TOOLS}
        warm = {tool: c.Sample() for tool in TOOLS}
        warm_blob_gets = []
        for index in range(runs):
            c.log(f"{image.name}: run {index + 1}/{runs}")
            run_dir = self.user.tempdir(f"run{index}-", self.workdir)
            # berth, cold then warm (and the --before berth, alternating which goes first)
            berths = [("berth", c.BERTH)] + ([("berth-before", self.before)] if self.before else [])
            for tool, executable in (berths if index % 2 == 0 else berths[::-1]):
                if self.berth_missing:
                    break
                store = run_dir / f"{tool}-store"
                try:
                    seconds, rss, _, cpu_s = self.berth_pull(image, store, executable)
                    cold[tool].add(seconds)
                    cold[f"{tool}-cpu"].add(cpu_s)
                    if tool == "berth":
                        cold["berth-convert"].add(convert_seconds(store))
                    self.berth_forget_image(image, store, executable)
                    seconds, rss_warm, gets, cpu_s = self.berth_pull(image, store, executable)
                    warm[tool].add(seconds)
                    warm[f"{tool}-cpu"].add(cpu_s)
                    if tool == "berth":
                        warm["berth-convert"].add(convert_seconds(store))
                    if tool == "berth":
                        self.berth_rss_kib += [rss, rss_warm]
                        warm_blob_gets.append(gets)
                except (RuntimeError, OSError) as error:
                    self.berth_missing = f"{tool} pull failed: {c.error_line(str(error))}"
                    c.log(str(error))
                c.rm_tree(store)
            if self.berth_only:
                self.floor(image, run_dir / "floor.sqfs", cold)
                c.rm_tree(run_dir)
                continue
            # Sarus-like pipeline
            layout = run_dir / "oci"
            self.sarus(image, layout, run_dir / "sarus", cold, with_gzip=index == 0)
            self.sarus(image, layout, run_dir / "sarus", warm, with_gzip=False)
            c.rm_tree(layout)
            # Charliecloud
            storage = run_dir / "ch"
            self.charliecloud(image, storage, run_dir / "ch.sqfs", cold)
            self.charliecloud(image, storage, run_dir / "ch.sqfs", warm)
            c.rm_tree(storage)
            # floor (layer blobs from the bench cache: same bytes as in the registry)
            self.floor(image, run_dir / "floor.sqfs", cold)
            c.rm_tree(run_dir)
        for tool in ("pigz", "tar2sqfs", "mksquashfs-gzip"):
            warm[tool] = cold[tool]
        if warm_blob_gets:
            self.notes.append(f"- {image.name}: blob downloads the registry logged during each warm berth pull: "
                              f"{warm_blob_gets} (0 means layers came from the store)")
        return {"cold": cold, "warm": warm}


def convert_seconds(store: Path) -> float:
    """The conversion phase of the pull just made (``convert_s`` that berth records in image.json:
    from the start of the flattening, which may wait for downloads, to the SquashFS written)."""
    import json

    metas = list((store / "images").glob("*/image.json"))
    return max(json.loads(meta.read_text())["convert_s"] for meta in metas) if metas else 0.0


def pipeline_sample(results: dict, parts: tuple[str, ...]) -> c.Sample:
    """Per-run sums of the phases of a pipeline (a phase measured fewer times than the others
    contributes its median to every run)."""
    runs = max(len(results[part].values) for part in parts)
    return c.Sample([sum(results[part].values[i] if i < len(results[part].values) else results[part].median
                         for part in parts) for i in range(runs)])


def render(image: c.BenchImage, measured: dict, berth_missing: str | None, before: str = "") -> str:
    lines = [(f"#### {image.name}: {len(image.layers)} layer(s), {image.compressed_bytes / 1e6:.0f} MB compressed, "
              f"{image.tar_bytes / 1e6:.0f} MB of tar"), ""]
    rows = []
    verdicts = []
    for mode in ("cold", "warm"):
        r = measured[mode]
        berth = r["berth"]
        entries = [
            ("berth pull (lz4)", berth),
            ("  of which conversion (image.json convert_s; overlaps the downloads)", r["berth-convert"]),
            *([(f"berth pull (lz4), before: {before}", r["berth-before"])] if r["berth-before"].values else []),
            ("  CPU seconds of berth pull (user + system, with its igzip and tar2sqfs; others' load "
             "changes them less than the wall time)", r["berth-cpu"]),
            *([("  CPU seconds of berth pull, before", r["berth-before-cpu"])] if r["berth-before-cpu"].values else []),
            ("skopeo + umoci + mksquashfs lz4 (Sarus-like)", pipeline_sample(r, ("skopeo", "umoci", "mksquashfs-lz4"))),
            ("skopeo + umoci (this pass) + mksquashfs gzip (first cold pass only)", pipeline_sample(r, ("skopeo", "umoci", "mksquashfs-gzip"))),
            ("  of which skopeo copy", r["skopeo"]),
            ("  of which umoci unpack --rootless", r["umoci"]),
            ("  of which mksquashfs lz4", r["mksquashfs-lz4"]),
            ("ch-image pull + ch-convert (gzip)", pipeline_sample(r, ("ch-image-pull", "ch-convert"))),
            ("  of which ch-image pull", r["ch-image-pull"]),
            ("pigz -dc of the layers (floor)", r["pigz"]),
            ("pigz -dc \\| tar2sqfs lz4" + (" (per layer, summed)" if len(image.layers) > 1 else ""), r["tar2sqfs"]),
        ]
        for label, sample in entries:
            if not sample.values and not label.startswith("berth"):
                continue  # a pipeline left out (--berth-only)
            if label.startswith("berth") and not sample.values:
                rows.append([mode, label, f"not available: {berth_missing}", "—"])
                continue
            whole = not label.startswith(("berth", "  "))
            berth_ratio = c.ratio(berth.median, sample.median) if berth.values and whole else "—"
            rows.append([mode, label, sample.cell(), berth_ratio])
        if berth.values and r["berth-before"].values:
            verdicts.append(f"- {image.name} {mode}: berth / berth before ({before}) = "
                            f"{berth.median / r['berth-before'].median:.2f} (CPU seconds: "
                            f"{r['berth-cpu'].median / r['berth-before-cpu'].median:.2f}); before / pigz -dc = "
                            f"{r['berth-before'].median / r['pigz'].median:.2f}")
        if berth.values and not r["skopeo"].values:
            verdicts.append(f"- {image.name} {mode}: berth / pigz -dc = {berth.median / r['pigz'].median:.2f} "
                            f"(target ≤ 1.5 {'met' if berth.median / r['pigz'].median <= 1.5 else 'NOT met'})")
        elif berth.values:
            sarus = pipeline_sample(r, ("skopeo", "umoci", "mksquashfs-lz4"))
            speedup = sarus.median / berth.median
            floor_ratio = berth.median / r["pigz"].median
            verdicts.append(f"- {image.name} {mode}: berth is {speedup:.2f}x faster than skopeo+umoci+mksquashfs lz4 "
                            f"(target ≥ 2x {'met' if mode != 'cold' or speedup >= 2 else 'NOT met'}"
                            f"{'' if mode == 'cold' else ', target is for cold'}); "
                            f"berth / pigz -dc = {floor_ratio:.2f} (target ≤ 1.5 "
                            f"{'met' if floor_ratio <= 1.5 else 'NOT met'})")
    lines.append(c.markdown_table(["store", "tool", "seconds: median (min–max)", "berth / tool"], rows))
    lines.append("")
    lines.extend(verdicts or [f"- targets not evaluated: berth not available: {berth_missing}"])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", default="debian,multi")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--before", type=Path, help="another berth executable to time in the same runs")
    parser.add_argument("--berth-only", action="store_true", help="leave out the Sarus-like and Charliecloud pipelines")
    args = parser.parse_args()
    if os.getuid() != 0:
        parser.error("run as root (it starts a registry and runs the tools as the unprivileged user)")
    command = "python3 bench/pull_convert.py " + " ".join(sys.argv[1:])
    header = c.report_header("Pull + convert to SquashFS (issue 2)", command.strip())
    c.ensure_cache_readable()
    user = c.BenchUser.lookup()
    builders = {"debian": c.debian_image, "multi": c.multi_image}
    images = [builders[name]() for name in args.images.split(",")]
    workdir = user.tempdir("berth-bench-pull-", Path("/var/tmp"))
    sections = [header]
    try:
        with c.Registry(c.registry_storage()) as registry, c.Registry(c.registry_storage(), tls=True) as tls_registry:
            c.ensure_pushed(registry, images)
            bench = Bench(user, registry, tls_registry, workdir, args.before, args.berth_only)
            before_label = ""
            if args.before:
                version = user.run([str(args.before), "--version"], check=False)
                before_label = f"`{args.before}` ({version.stdout.strip() or 'unknown version'})"
            if bench.berth_missing:
                c.log(f"berth column not available: {bench.berth_missing}")
            for image in images:
                measured = bench.measure(image, args.runs)
                sections.append(render(image, measured, bench.berth_missing, before_label))
                sections.append("")
            if bench.berth_rss_kib:
                sections.append(f"Peak RSS of `berth pull` (/usr/bin/time %M, includes its child processes): "
                                f"max {max(bench.berth_rss_kib) / 1024:.0f} MiB, "
                                f"median {sorted(bench.berth_rss_kib)[len(bench.berth_rss_kib) // 2] / 1024:.0f} MiB "
                                f"over {len(bench.berth_rss_kib)} pulls (largest layer "
                                f"{max(l.size for i in images for l in i.layers) / 2**20:.0f} MiB compressed).")
            else:
                sections.append(f"Peak RSS of `berth pull`: not available: {bench.berth_missing}")
            sections.extend(["", *bench.notes])
    finally:
        c.rm_tree(workdir)
    c.emit_report(sections, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
