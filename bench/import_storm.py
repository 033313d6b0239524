#!/usr/bin/env python3
"""Python import storm: a few thousand small modules imported from the image's SquashFS in a
berth container vs the same tree unpacked on disk (issue 3).

The image is a debootstrap minbase bookworm with python3-minimal plus one layer holding the
package ``storm`` under /opt/storm: N tiny modules (default 3000) in 30 subpackages, byte-compiled
(.pyc in the image, PYTHONDONTWRITEBYTECODE=1), and ``storm.all`` importing all of them.
Each variant runs ``python3 -c "import sys; sys.path.insert(0, ROOT/opt/storm); import storm.all"``
and, as its baseline, ``python3 -c pass`` in the same environment; the storm's own cost is the
difference of the medians.

Variants (as berthtest): ``berth run`` with each site setting of ``image_mount`` that reads
differently: ``shared`` (its image SquashFS, FUSE-mounted by squashfuse_ll; the default; the
last container out unmounts, so every run mounts afresh), ``shared`` with
``image_mount_linger = 60`` (every run reuses the mount the run before left lingering, and its
warm FUSE caches; ended by ``berth doctor --cleanup`` at the end) and ``unpacked`` (a node-local unpacked copy bound read-only, made by the first run, whose time is
reported apart); ``ch-run IMG.sqfs`` (the same tree as an lz4 SquashFS mounted by ch-run),
``ch-run DIR`` (the tree unpacked on disk), and the host's python3 on the unpacked directory (no
container; Debian 12's python3 is the image's). FUSE options for an immutable image, without a
container: the host's python3 on a squashfuse_ll mount with its defaults (multi-threaded),
``-s`` (single-threaded) and ``-o clone_fd``, on a squashfuse mount plain and with the kernel
caching options berth gives it (``kernel_cache``, day-long entry/attr/negative timeouts;
squashfuse_ll refuses those and ``max_read``), and on a squashfuse_ll mount made afresh for every
run (what a lone ``berth run`` gets: the last container out unmounts, so nothing stays cached).

- warm: hyperfine (warm-up runs first), page cache warm;
- cold: before every run the page, dentry and inode caches are dropped (``echo 3 >
  /proc/sys/vm/drop_caches``, root); each run is then started through runuser from the
  benchmark's own loop, which adds the same few ms to every variant.

Usage::

    python3 bench/import_storm.py [--modules 3000] [--runs 10] [--cold-runs 5] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c


def storm_code(storm_root: str) -> str:
    return f"import sys; sys.path.insert(0, '{storm_root}'); import storm.all; assert storm.all.COUNT > 0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if os.getuid() != 0:
        parser.error("run as root (it drops caches and runs the tools as the unprivileged user)")
    command = "python3 bench/import_storm.py " + " ".join(sys.argv[1:])
    header = c.report_header(f"Python import storm: {args.modules} modules (issue 3)", command.strip())
    c.ensure_cache_readable()
    user = c.BenchUser.lookup()
    image, _ = c.python_image(args.modules)
    workdir = user.tempdir("berth-bench-storm-", Path("/var/tmp"))
    unavailable: dict[str, str] = {}
    variants: dict[str, tuple[list[str], list[str], dict | None]] = {}
    mounts: list[Path] = []
    lingering_envs: list[dict] = []  # berth environments whose mounts linger: ended at the end
    unpack_s = None
    try:
        c.log("unpacking the image and building its SquashFS")
        rootfs = user.unpack(image, workdir / "rootfs")
        sqfs = workdir / "image.sqfs"
        user.run(["mksquashfs", str(rootfs), str(sqfs), "-comp", "lz4", "-noappend", "-quiet", "-no-progress"])
        image_python = ["/usr/bin/python3"]
        env_no_pyc = ["env", "PYTHONDONTWRITEBYTECODE=1"]

        # berth
        missing = c.berth_subcommand_missing(user, "pull") or c.berth_subcommand_missing(user, "run")
        if missing:
            unavailable["berth"] = missing
        else:
            store = user.tempdir("berth-store-", workdir)
            try:
                with c.Registry(c.registry_storage()) as registry:
                    c.ensure_pushed(registry, [image])
                    config_dir = c.berth_config_dir(user, [registry.host], workdir)
                    pull = [str(c.BERTH), "pull"]
                    if c.berth_help_has(user, "pull", "--insecure"):
                        pull.append("--insecure")
                    ref = image.ref(registry)
                    user.run([*pull, ref], env=c.berth_env(config_dir, store))
                berth = [str(c.BERTH), "run", ref]
                for name, setting, linger in ((BERTH_SHARED, "shared", 0), (BERTH_LINGER, "shared", LINGER_S),
                                              (BERTH_UNPACKED, "unpacked", 0)):
                    label = f"{setting}-linger" if linger else setting
                    site = workdir / f"site-{label}"
                    site.mkdir()
                    # top-level keys before the [[registries]] tables
                    (site / "berth.toml").write_text(f'image_mount = "{setting}"\n'
                                                     + (f"image_mount_linger = {linger}\n" if linger else "")
                                                     + "\n" + (config_dir / "berth.toml").read_text())
                    user.chown_tree(site)
                    # The state directory on disk (/var/tmp), where a site would keep unpacked copies.
                    berth_env = c.berth_env(site, store, user.tempdir(f"berth-state-{label}-", workdir))
                    if linger:
                        lingering_envs.append(berth_env)
                    if setting == "unpacked":
                        c.log("berth: the first run with image_mount = unpacked makes the copy")
                        unpack_s = c.timed(user.argv([*berth, "true"], berth_env))
                    variants[name] = ([*berth, *image_python, "-c", storm_code("/opt/storm")],
                                      [*berth, *image_python, "-c", "pass"], berth_env)
            except RuntimeError as error:
                unavailable["berth"] = f"berth failed: {c.error_line(str(error))}"

        ch_sqfs = ["ch-run", str(sqfs), "--", *env_no_pyc, *image_python]
        variants["ch-run IMG.sqfs"] = ([*ch_sqfs, "-c", storm_code("/opt/storm")], [*ch_sqfs, "-c", "pass"], None)
        ch_dir = ["ch-run", str(rootfs), "--", *env_no_pyc, *image_python]
        variants["ch-run DIR (unpacked on disk)"] = (
            [*ch_dir, "-c", storm_code("/opt/storm")], [*ch_dir, "-c", "pass"], None)
        host = [*env_no_pyc, "/usr/bin/python3"]
        variants[PLAIN] = (
            [*host, "-c", storm_code(str(rootfs / "opt" / "storm"))], [*host, "-c", "pass"], None)
        # the FUSE share of the cost, without any container: the same SquashFS mounted by the
        # user with squashfuse (high-level API) and squashfuse_ll (low-level, what berth uses),
        # with the options a site could choose for an immutable image
        for name, program, options in FUSE_VARIANTS:
            mountpoint = user.tempdir(f"mnt-{program}-", workdir)
            if user.run([program, *options, str(sqfs), str(mountpoint)], check=False).returncode != 0:
                unavailable[name] = f"{program} {' '.join(options)} cannot mount here"
                continue
            mounts.append(mountpoint)
            variants[name] = (
                [*host, "-c", storm_code(str(mountpoint / "opt" / "storm"))], [*host, "-c", "pass"], None)
            if not options and program == "squashfuse_ll":
                # a fresh mount for every run: what one berth run after another gets
                fresh = user.tempdir("mnt-fresh-", workdir)
                def fresh_mount(code: str, mountpoint=fresh) -> list[str]:
                    script = (f"squashfuse_ll {shlex.quote(str(sqfs))} {mountpoint} && "
                              f"{' '.join(map(shlex.quote, host))} -c {shlex.quote(code)}; "
                              f"status=$?; fusermount3 -u {mountpoint}; exit $status")
                    return ["sh", "-c", script]
                variants[FRESH_MOUNT] = (fresh_mount(storm_code(str(fresh / "opt" / "storm"))),
                                         fresh_mount("pass"), None)
            if program == "squashfuse" and not options:
                # bare rootless runc on that same mount: the container's share without berth
                runc_state = user.tempdir("runc-state-", workdir)
                bundles = [runc_bundle(user, workdir, mountpoint, [*image_python, "-c", code])
                           for code in (storm_code("/opt/storm"), "pass")]
                variants["runc on a squashfuse mount (bare runtime)"] = tuple(
                    ["runc", "--root", str(runc_state), "run", "-b", str(bundle), f"storm-{index}"]
                    for index, bundle in enumerate(bundles)) + (None,)

        # every variant must really import the storm before it is timed
        for name, (storm, _, env) in list(variants.items()):
            result = user.run(storm, env=env, check=False)
            if result.returncode != 0:
                unavailable[name] = f"exit {result.returncode}: {c.error_line(result.stderr)}"
                del variants[name]

        warm: dict[str, tuple[c.Sample, c.Sample]] = {}
        cold: dict[str, tuple[c.Sample, c.Sample]] = {}
        for name, (storm, baseline, env) in list(variants.items()):
            c.log(f"warm: {name}")
            export = workdir / "hyperfine.json"
            try:
                user.run(["hyperfine", "--style", "none", "-N", "--warmup", str(args.warmup), "--runs",
                          str(args.runs), "--export-json", str(export), "-n", "storm", hyperfine_words(storm),
                          "-n", "baseline", hyperfine_words(baseline)], env=env, timeout=3600)
            except RuntimeError as error:
                unavailable[name] = f"failed while timed: {c.error_line(str(error))}"
                del variants[name]
                continue
            results = {r["command"]: c.Sample(list(r["times"])) for r in json.loads(export.read_text())["results"]}
            warm[name] = (results["storm"], results["baseline"])
        can_drop = c.drop_caches()
        if can_drop:
            for name, (storm, baseline, env) in variants.items():
                c.log(f"cold: {name}")
                samples = (c.Sample(), c.Sample())
                try:
                    for _ in range(args.cold_runs):
                        for sample, argv in zip(samples, (storm, baseline)):
                            c.drop_caches()
                            sample.add(c.timed(user.argv(argv, env)))
                except RuntimeError as error:
                    unavailable[name] = f"failed while timed: {c.error_line(str(error))}"
                    continue
                cold[name] = samples
    finally:
        for berth_env in lingering_envs:
            user.run([str(c.BERTH), "doctor", "--cleanup"], env=berth_env, check=False)
        for mountpoint in mounts:
            user.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        c.rm_tree(workdir)

    sections = [header, (f"Image: {image.name}, {image.tar_bytes / 1e6:.0f} MB of tar; storm layer "
                         f"{image.layers[-1].tar_bytes / 1e6:.1f} MB ({args.modules} modules + .pyc)."), ""]
    if unpack_s is not None:
        sections += [f"- the first `berth run IMG true` with `image_mount = \"unpacked\"` (unsquashfs of the "
                     f"image into the state directory, then the run): {unpack_s * 1000:.0f} ms, once per "
                     "image, node and user", ""]
    targets = []
    for mode, measured in (("warm", warm), ("cold (caches dropped before every run)", cold)):
        rows = []
        berth_storm = measured.get(BERTH_SHARED)
        plain = measured.get(PLAIN)
        for name in [BERTH_SHARED, BERTH_LINGER, BERTH_UNPACKED, "ch-run IMG.sqfs", "ch-run DIR (unpacked on disk)",
                     "runc on a squashfuse mount (bare runtime)", PLAIN,
                     *(name for name, _, _ in FUSE_VARIANTS), FRESH_MOUNT]:
            if name not in measured:
                reason = (unavailable.get(name) or unavailable.get(name.split()[0])
                          or ("caches cannot be dropped here" if mode != "warm" else "?"))
                rows.append([name, f"not available: {reason}", "—", "—", "—", "—"])
                continue
            storm, baseline = measured[name]
            storm_only = storm.median - baseline.median
            berth_ratio = plain_ratio = "—"
            if berth_storm and name != BERTH_SHARED:
                berth_ratio = c.ratio(berth_storm[0].median - berth_storm[1].median, storm_only)
            if plain and name != PLAIN:
                plain_ratio = c.ratio(storm_only, plain[0].median - plain[1].median)
            rows.append([name, storm.cell("ms"), baseline.cell("ms"), f"{storm_only * 1000:.0f}", berth_ratio,
                         plain_ratio])
        for name, label in ((BERTH_SHARED, "shared"), (BERTH_LINGER, f"shared, image_mount_linger = {LINGER_S}"),
                            (BERTH_UNPACKED, "unpacked")):
            if name in measured and plain:
                ratio = ((measured[name][0].median - measured[name][1].median)
                         / (plain[0].median - plain[1].median))
                targets.append(f"- target berth run, image_mount = {label}, ≤ 1.3x the plain directory "
                               f"({mode.split()[0]}, storm only): {ratio:.2f}, {'met' if ratio <= 1.3 else 'NOT met'}")
        sections += [f"#### {mode}", "",
                     c.markdown_table(["variant", "import storm.all, ms: median (min–max)", "python3 -c pass, ms",
                                       "storm only (difference of medians), ms", "berth shared / variant (storm only)",
                                       "variant / plain directory (storm only)"], rows), ""]
    sections[1:1] = [*targets, ""]
    c.emit_report(sections, args.output)
    return 0


BERTH_SHARED = "berth run, image_mount = shared (squashfuse_ll, the default)"
#: The linger of the lingering variant: longer than the gap between two runs of the benchmark.
LINGER_S = 60
BERTH_LINGER = f"berth run, image_mount = shared, image_mount_linger = {LINGER_S} (the mount of the run before, reused)"
BERTH_UNPACKED = "berth run, image_mount = unpacked (node-local unpacked copy)"
PLAIN = "host python3 on DIR (no container)"
FRESH_MOUNT = "host python3 on squashfuse_ll, mounted afresh for each run (no container)"
#: (name, program, options) of the FUSE mounts the host's python3 reads, without a container.
FUSE_VARIANTS = (
    ("host python3 on squashfuse_ll mount (no container)", "squashfuse_ll", ()),
    ("host python3 on squashfuse_ll -s mount (single-threaded)", "squashfuse_ll", ("-s",)),
    ("host python3 on squashfuse_ll -o clone_fd mount", "squashfuse_ll", ("-o", "clone_fd")),
    ("host python3 on squashfuse mount (no container)", "squashfuse", ()),
    ("host python3 on squashfuse -o kernel_cache,…timeout=86400 mount", "squashfuse",
     ("-o", "kernel_cache,entry_timeout=86400,attr_timeout=86400,negative_timeout=86400")),
)


def runc_bundle(user: c.BenchUser, workdir: Path, root: Path, args: list[str]) -> Path:
    """A rootless runc bundle (``runc spec --rootless``) running ``args`` on a read-only ``root``."""
    bundle = user.tempdir("bundle-", workdir)
    user.run(["runc", "spec", "--rootless"], cwd=str(bundle))
    config = json.loads((bundle / "config.json").read_text())
    config["process"].update(terminal=False, args=args)
    config["process"]["env"] = [*config["process"].get("env", []), "PYTHONDONTWRITEBYTECODE=1"]
    config["root"] = {"path": str(root), "readonly": True}
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


def hyperfine_words(argv: list[str]) -> str:
    """One hyperfine -N command line: its words are split shell-style, so quote each."""
    return " ".join(shlex.quote(word) for word in argv)


if __name__ == "__main__":
    sys.exit(main())
