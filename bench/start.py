#!/usr/bin/env python3
"""Warm start of /bin/true from the debootstrap image: berth against the anchors (issues 3, 10).

All as the unprivileged user (berthtest), timed by hyperfine (no shell, warm-up runs first):

- ``berth run REF /bin/true`` (the image pulled into a fresh user store first), once with
  ``runtime = "launcher"`` (berth-launcher, berth's own compiled runtime: the default) and once
  with ``runtime = "runc"``, side by side in one run; and with the launcher and the image mount
  lingering (``image_mount_linger``, its own state directory): every run reuses the mount the
  run before left, as bare runc below runs on a squashfuse mount made before (its CPU time then
  leaves out the FUSE daemon, which belongs to no run's process tree);
- ``runc run`` of a prepared rootless bundle (``runc spec --rootless``, read-only root), the
  root being the image's SquashFS mounted with squashfuse, and the same tree as a plain directory;
- the runtimes alone on a bundle holding the config.json berth generates (berth.runtime.spec,
  berth-init as PID 1, the same squashfuse root): ``berth-launcher run`` and ``runc run``;
- ``ch-run IMG.sqfs -- /bin/true`` (ch-run mounts the SquashFS itself) and ``ch-run DIR``;
- ``bwrap`` on the directory (user, pid, ipc, uts, mount namespaces; host network);
- udocker in R1 mode (host runc; its own tool tarball cannot be downloaded here);
- rootless podman (overlay storage, runc: crun fails on this hybrid cgroup host).

The SquashFS for runc and ch-run is ``mksquashfs -comp lz4`` of the unpacked layer (berth's
default compression). Also berth's own cost: ``python -X importtime -c 'import berth.cli.main'``
(total and top offenders) and ``berth --version`` against a bare ``python -c pass``.

Usage::

    python3 bench/start.py [--runs 50] [--warmup 5] [--output FILE] [--before BERTH]

``--before BERTH`` also times another berth executable (an older commit's venv, e.g. made with
``git worktree add /var/tmp/before REV && cd /var/tmp/before && scripts/setup-venv.sh``) with
the default runtime, in the same runs and rounds as this one, with its phases and imports:
before and after under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

UDOCKER = c.CACHE / "udocker-venv" / "bin" / "udocker"
UDOCKER_TOOLS_VERSION = "1.2.11"
#: berth's runtime settings timed side by side; the first is the default, whose figures the
#: targets use.
RUNTIMES = ("launcher", "runc")
BERTH = f"berth run ({RUNTIMES[0]})"
BEFORE = f"berth run ({RUNTIMES[0]}), before"
#: berth with its image mount lingering (image_mount_linger, in a state directory of its own):
#: every run reuses the mount the run before left, like bare runc's prepared squashfuse root.
LINGER = f"berth run ({RUNTIMES[0]}), image mount lingering"
#: berth with the plan cache on (plan_cache, berth.runtime.plancache): every timed run executes
#: the plan an identical run before it kept (a hit), without settings, image look-up or planning;
#: and the same with the image mount lingering too.
CACHED = f"berth run ({RUNTIMES[0]}), plan cache"
CACHED_LINGER = f"berth run ({RUNTIMES[0]}), plan cache, image mount lingering"
#: The same plans executed by the compiled front end (the command `berth`,
#: berth.runtime.compiledplan) with no Python started; the rows above run the Python console
#: script berth-py directly. The front end joins a mount that is up: without a lingering mount
#: its runs are Python's, so it has no row of its own without one.
COMPILED_LINGER = f"berth run ({RUNTIMES[0]}), compiled front end, plan cache, image mount lingering"
#: The anchors timed in turn with berth's runs (StartBench.interleaved) for the target lines.
PAIRED = ("berth-launcher (berth's config.json, squashfuse root)", "runc (berth's config.json, squashfuse root)",
          "runc (squashfuse root)", "ch-run IMG.sqfs")  # what udocker 1.3.17 asks for; see prepare_udocker


def ensure_udocker() -> str | None:
    """Install udocker from PyPI into its own venv under the cache; None or why it is missing."""
    if not UDOCKER.exists():
        venv = UDOCKER.parent.parent
        c.rm_tree(venv)
        try:
            c.run(["/usr/bin/python3", "-m", "venv", str(venv)])
            c.run([str(venv / "bin" / "pip"), "install", "-q", "udocker"], timeout=600)
        except RuntimeError as error:
            return f"cannot install udocker from PyPI: {c.error_line(str(error))}"
    return None


#: Where `berth run`'s import time goes: families of standard modules (each with what it alone
#: pulls in), then berth's own modules and the rest.
IMPORT_FAMILIES = (
    ("dataclasses and what it imports (inspect, ast, dis, tokenize, linecache, copy, weakref)",
     {"dataclasses", "inspect", "ast", "_ast", "dis", "opcode", "_opcode", "tokenize", "token", "linecache",
      "importlib.machinery", "copy", "weakref", "_weakrefset", "org", "org.python", "org.python.core", "keyword",
      "reprlib"}),
    ("argparse and what it imports (gettext, locale, shutil with bz2, lzma, zlib; fnmatch)",
     {"argparse", "gettext", "locale", "_locale", "shutil", "fnmatch", "zlib", "bz2", "_bz2", "lzma", "_lzma",
      "_compression", "importlib", "warnings"}),
    ("re, enum, functools, collections, operator, itertools, types, contextlib",
     {"re", "re._compiler", "re._parser", "re._constants", "re._casefix", "_sre", "copyreg", "enum", "functools",
      "_functools", "collections", "collections.abc", "_collections", "operator", "_operator", "itertools", "types",
      "errno", "__future__", "contextlib"}),
    ("pathlib (urllib.parse, ipaddress, ntpath)", {"pathlib", "urllib", "urllib.parse", "ipaddress", "ntpath",
                                                   "_winapi", "nt"}),
    ("subprocess, signal, threading, selectors", {"subprocess", "signal", "threading", "selectors", "select", "math",
                                                 "_posixsubprocess", "fcntl", "msvcrt"}),
    ("json", {"json", "json.decoder", "json.encoder", "json.scanner", "_json"}),
    ("tomllib (datetime, string)", {"tomllib", "tomllib._parser", "tomllib._re", "tomllib._types", "datetime",
                                    "_datetime", "string", "_string"}),
    ("typing", {"typing", "_typing"}),
)


def families(runs: list[list[tuple[str, float]]]) -> list[tuple[str, int, float]]:
    """(family, modules, median summed self time in seconds) for IMPORT_FAMILIES, berth's own
    modules and the other standard modules; ``runs``: each run's (module, self time) entries."""
    names = [name for name, _ in IMPORT_FAMILIES] + ["berth's own modules (berth.*)", "other standard modules"]

    def family(module: str) -> str:
        found = next((name for name, modules in IMPORT_FAMILIES if module in modules), None)
        return found or (names[-2] if module.split(".")[0] == "berth" else names[-1])

    sums: dict[str, list[float]] = {name: [] for name in names}
    for entries in runs:
        for name in names:
            sums[name].append(sum(seconds for module, seconds in entries if family(module) == name))
    modules = {name: len({module for module, _ in (runs[-1] if runs else []) if family(module) == name})
               for name in names}
    return [(name, modules[name], statistics.median(sums[name]) if sums[name] else 0.0) for name in names]


class StartBench:
    def __init__(self, user: c.BenchUser, workdir: Path, runs: int, warmup: int) -> None:
        self.user = user
        self.workdir = workdir
        self.runs = runs
        self.warmup = warmup
        self.notes: list[str] = []
        self.unavailable: dict[str, str] = {}
        self.mounts: list[Path] = []
        self.cleanup_dirs: list[Path] = []
        #: berth environments whose image mounts linger: `berth doctor --cleanup` ends them.
        self.lingering_envs: list[dict] = []
        self.launcher = ""
        #: importtime's args -> rows of families(): where the import time goes
        self.import_families: dict[str, list[tuple[str, int, float]]] = {}

    # ---------------------------------------------------------------- preparation

    def prepare_tree(self, image: c.BenchImage) -> tuple[Path, Path]:
        rootfs = self.user.unpack(image, self.workdir / "rootfs")
        sqfs = self.workdir / "image.sqfs"
        self.user.run(["mksquashfs", str(rootfs), str(sqfs), "-comp", "lz4", "-noappend", "-quiet", "-no-progress"])
        return rootfs, sqfs

    def mount_squashfs(self, sqfs: Path) -> Path:
        mountpoint = self.user.tempdir("mnt-", self.workdir)
        self.user.run(["squashfuse", str(sqfs), str(mountpoint)])
        self.mounts.append(mountpoint)
        return mountpoint

    def runc_bundle(self, name: str, root: Path) -> Path:
        bundle = self.user.tempdir(f"bundle-{name}-", self.workdir)
        self.user.run(["runc", "spec", "--rootless"], cwd=str(bundle))
        config_path = bundle / "config.json"
        config = json.loads(config_path.read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = ["/bin/true"]
        config["root"] = {"path": str(root), "readonly": True}
        config_path.write_text(json.dumps(config, indent=2))
        return bundle

    def berth_bundle(self, root: Path) -> Path | None:
        """A bundle with the config.json berth generates for ``/bin/true`` (berth-init as PID 1,
        the caller's identity, berth's mounts but no home or /tmp binds), built by berth's own
        spec builder as the user; None when berth is not installed (the reason noted)."""
        bundle = self.user.tempdir("bundle-berth-", self.workdir)
        code = ("import json, os, sys\n"
                "from berth.runtime import ocirt\n"
                "from berth.runtime.spec import SpecPlan, build_config, process_args\n"
                "uid, gid = os.getuid(), os.getgid()\n"
                "plan = SpecPlan(rootfs=sys.argv[1], args=process_args(uid, gid, ['/bin/true'], remap_root=False),\n"
                "                env=('PATH=/usr/bin:/bin',), cwd='/', uid=uid, gid=gid,\n"
                "                init_path=ocirt.init_path(), hostname='bench')\n"
                "json.dump(build_config(plan), open(sys.argv[2], 'w'))\n"
                "print(ocirt.launcher_path())\n")
        try:
            result = self.user.run([str(c.VENV / "bin" / "python"), "-c", code, str(root), str(bundle / "config.json")])
        except RuntimeError as error:
            self.notes.append(f"no bundle of berth's config.json: {c.error_line(str(error))}")
            return None
        self.launcher = result.stdout.strip()
        return bundle

    def prepare_udocker(self, image: c.BenchImage) -> dict | None:
        """udocker's environment, or None (reason in self.unavailable)."""
        why = ensure_udocker()
        if why:
            self.unavailable["udocker"] = why
            return None
        udocker_dir = self.user.tempdir("udocker-", self.workdir)
        # udocker wants its engine tarball (proot, fakechroot, runc builds) from the internet even
        # for R1 mode, which uses the host's runc: mark the tools as installed so it does not try.
        (udocker_dir / "lib").mkdir()
        (udocker_dir / "lib" / "VERSION").write_text(UDOCKER_TOOLS_VERSION + "\n")
        self.user.chown_tree(udocker_dir)
        env = {"UDOCKER_DIR": str(udocker_dir), "UDOCKER_USE_RUNC_EXECUTABLE": "/usr/sbin/runc"}
        try:
            self.user.run([str(UDOCKER), "-q", "import", str(image.layers[0].path), "bench:debian"], env=env)
            self.user.run([str(UDOCKER), "-q", "create", "--name=bench", "bench:debian"], env=env)
            self.user.run([str(UDOCKER), "-q", "setup", "--execmode=R1", "bench"], env=env)
            probe = self.user.run([str(UDOCKER), "-q", "run", "--nobanner", "bench", "/bin/sh", "-c", "echo ran-ok"],
                                  env=env, check=False)
        except RuntimeError as error:
            self.unavailable["udocker"] = f"udocker set-up failed: {c.error_line(str(error))}"
            return None
        if "ran-ok" not in probe.stdout:
            self.unavailable["udocker"] = f"udocker run failed: {c.error_line(probe.stderr + probe.stdout)}"
            return None
        if probe.returncode != 0:
            self.notes.append(f"udocker 1.3.17 in R1 mode exits {probe.returncode} even when the command "
                              "succeeds (the command's output was checked): timed with hyperfine -i.")
        return env

    def podman_argv(self) -> list[str] | None:
        # podman refuses a runroot longer than 50 characters: keep it short, under /tmp
        storage = self.user.tempdir("bbpod-", Path("/tmp"))
        self.cleanup_dirs.append(storage)
        base = ["podman", "--root", str(storage / "root"), "--runroot", str(storage / "run"),
                "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                "--runtime", "/usr/sbin/runc"]
        layout = c.CACHE / "layouts" / "debian"
        try:
            image_id = self.user.run([*base, "pull", "-q", f"oci:{layout}:bench"]).stdout.strip().splitlines()[-1]
            argv = [*base, "run", "--rm", "--network", "host", image_id, "/bin/true"]
            self.user.run(argv)
        except RuntimeError as error:
            self.unavailable["podman"] = f"rootless podman fails here: {c.error_line(str(error))}"
            return None
        return argv

    def berth_ready(self, image: c.BenchImage) -> tuple[list[str], dict] | None:
        missing = c.berth_subcommand_missing(self.user, "pull") or c.berth_subcommand_missing(self.user, "run")
        if missing:
            self.unavailable["berth"] = missing
            return None
        store = self.user.tempdir("berth-store-", self.workdir)
        state = self.user.tempdir("berth-state-", self.workdir)
        try:
            with c.Registry(c.registry_storage()) as registry:
                c.ensure_pushed(registry, [image])
                config_dir = c.berth_config_dir(self.user, [registry.host], self.workdir)
                env = c.berth_env(config_dir, store, state)
                pull = [str(c.BERTH), "pull"]
                if c.berth_help_has(self.user, "pull", "--insecure"):
                    pull.append("--insecure")
                self.user.run([*pull, image.ref(registry)], env=env)
                ref = image.ref(registry)
            argv = [str(c.BERTH), "run", ref, "/bin/true"]
            self.user.run(argv, env=env)
        except RuntimeError as error:
            self.unavailable["berth"] = f"berth failed: {c.error_line(str(error))}"
            return None
        return argv, env

    # ---------------------------------------------------------------- measuring

    def hyperfine(self, commands: dict[str, list[str]], env: dict | None = None,
                  ignore_failure: bool = False, runs: int | None = None) -> dict[str, c.Sample]:
        export = self.workdir / f"hyperfine-{len(os.listdir(self.workdir))}.json"
        argv = ["hyperfine", "-N", "--style", "none", "--warmup", str(self.warmup), "--runs",
                str(runs or self.runs), "--export-json", str(export)]
        if ignore_failure:
            argv.append("-i")
        for name, command in commands.items():
            argv += ["-n", name, " ".join(command)]
        os.chown(self.workdir, self.user.uid, self.user.gid)
        self.user.run(argv, env=env, timeout=3600)
        data = json.loads(export.read_text())
        return {result["command"]: c.Sample(list(result["times"])) for result in data["results"]}

    #: Run as the user: the commands in turn, round after round, each timed from spawn to exit
    #: (the same ~1 ms of subprocess overhead for every command).
    INTERLEAVE_DRIVER = (
        "import json, os, subprocess, sys, time\n"
        "spec = json.load(open(sys.argv[1]))\n"
        "warmup, rounds = int(sys.argv[2]), int(sys.argv[3])\n"
        "times = {name: [] for name, _, _ in spec}\n"
        "for index in range(warmup + rounds):\n"
        "    for name, argv, extra in spec:\n"
        "        env = {**os.environ, **extra}\n"
        "        start = time.perf_counter()\n"
        "        subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,\n"
        "                       stderr=subprocess.DEVNULL, check=True)\n"
        "        if index >= warmup:\n"
        "            times[name].append(time.perf_counter() - start)\n"
        "print(json.dumps(times))\n"
    )

    def interleaved(self, commands: dict[str, tuple[list[str], dict]], rounds: int) -> dict[str, c.Sample]:
        """The ``commands`` (name -> (argv, extra environment)) in turn, ``rounds`` times: a
        changing load on a shared machine then weighs on every command alike, which separate
        hyperfine runs (all runs of one command, then the next) do not give."""
        driver = self.workdir / "interleave.py"
        spec = self.workdir / f"interleave-{len(os.listdir(self.workdir))}.json"
        driver.write_text(self.INTERLEAVE_DRIVER)
        spec.write_text(json.dumps([[name, argv, extra] for name, (argv, extra) in commands.items()]))
        result = self.user.run(["/usr/bin/python3", str(driver), str(spec), str(self.warmup), str(rounds)],
                               timeout=3600)
        return {name: c.Sample(values) for name, values in json.loads(result.stdout).items()}

    #: As INTERLEAVE_DRIVER, with each command under treecpu.py: its last stdout line is
    #: "treecpu USER_S SYS_S WALL_S".
    CPU_DRIVER = (
        "import json, os, subprocess, sys\n"
        "spec = json.load(open(sys.argv[1]))\n"
        "warmup, rounds = int(sys.argv[2]), int(sys.argv[3])\n"
        "times = {name: [] for name, _, _ in spec}\n"
        "for index in range(warmup + rounds):\n"
        "    for name, argv, extra in spec:\n"
        "        result = subprocess.run(argv, env={**os.environ, **extra}, stdin=subprocess.DEVNULL,\n"
        "                                capture_output=True, text=True, check=True)\n"
        "        user_s, system_s = result.stdout.splitlines()[-1].split()[1:3]\n"
        "        if index >= warmup:\n"
        "            times[name].append(float(user_s) + float(system_s))\n"
        "print(json.dumps(times))\n"
    )

    def cpu_interleaved(self, commands: dict[str, tuple[list[str], dict]], rounds: int) -> dict[str, c.Sample]:
        """CPU time (user + system) of each command's whole process tree (bench/treecpu.py: the
        FUSE daemon, the runtime and the container's processes included), the commands in turn,
        round after round: unlike wall time, it hardly depends on what else the machine runs."""
        treecpu = str(Path(__file__).resolve().parent / "treecpu.py")
        wrapped = {name: ([treecpu, *argv], extra) for name, (argv, extra) in commands.items()}
        driver = self.workdir / "interleave-cpu.py"
        spec = self.workdir / f"interleave-cpu-{len(os.listdir(self.workdir))}.json"
        driver.write_text(self.CPU_DRIVER)
        spec.write_text(json.dumps([[name, argv, extra] for name, (argv, extra) in wrapped.items()]))
        result = self.user.run(["/usr/bin/python3", str(driver), str(spec), str(self.warmup), str(rounds)],
                               timeout=3600)
        return {name: c.Sample(values) for name, values in json.loads(result.stdout).items()}

    def importtime(self, args: list[str], env: dict | None = None, repeats: int = 7,
                   python: str = str(c.VENV / "bin" / "python"),
                   label: str | None = None) -> tuple[c.Sample, list[tuple[str, float]]]:
        """Import time that ``python ARGS`` adds to a bare interpreter start: the sum of the
        top-level cumulative times of modules a bare ``python -c pass`` does not import, and the
        ten modules with the largest self time among those."""

        def parse(stderr: str) -> list[tuple[str, int, int, bool]]:
            entries = []
            for line in stderr.splitlines():
                match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
                if match:
                    self_us, cumulative_us, indent, module = match.groups()
                    entries.append((module, int(self_us), int(cumulative_us), indent == " "))
            return entries

        baseline = {entry[0] for entry in parse(self.user.run([python, "-X", "importtime", "-c", "pass"]).stderr)}
        totals = c.Sample()
        self_times: dict[str, list[float]] = {}
        runs: list[list[tuple[str, float]]] = []
        for _ in range(repeats):
            entries = parse(self.user.run([python, "-X", "importtime", *args], env=env).stderr)
            added = [entry for entry in entries if entry[0] not in baseline]
            totals.add(sum(cumulative for _, _, cumulative, top in added if top) / 1e6)
            for module, self_us, _, _ in added:
                self_times.setdefault(module, []).append(self_us / 1e6)
            runs.append([(module, self_us / 1e6) for module, self_us, _, _ in added])
        top = sorted(((module, statistics.median(values)) for module, values in self_times.items()),
                     key=lambda item: -item[1])[:10]
        self.import_families[label or " ".join(args)] = families(runs)
        return totals, top

    def prime_plan_cache(self, argv: list[str], env: dict, deadline_s: float = 30.0, *, compiled: bool = False) -> bool:
        """Run ``argv`` until it has kept its plan (a run keeps none while an input changed in
        the last two seconds: the store and settings were written just now), ``compiled``: its
        compiled form too (berth.runtime.compiledplan); whether it did."""
        import time

        state = Path(env["BERTH_STATE_DIR"]) / "plans"
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            self.user.run(argv, env=env)
            if state.is_dir() and any(entry.name.startswith("c-") if compiled else len(entry.name) == 64
                                      for entry in state.iterdir()):
                return True
            time.sleep(0.5)
        return False

    def berth_phases(self, argv: list[str], env: dict, runs: int = 7) -> list[tuple[str, c.Sample]] | None:
        """Where one warm ``berth run`` spends its time, from kernel exec/exit events."""
        if c.ExecTrace.available():
            self.notes.append(f"berth run phases not measured: {c.ExecTrace.available()}")
            return None
        marks = [
            ("berth", c.is_exec("berth")),
            ("squashfuse", c.is_exec("squashfuse", "squashfuse_ll")),
            ("runtime", c.is_exec("runc", "crun", "berth-launcher")),
            ("command", c.is_exec("true")),
            ("command exit", c.is_exit("true")),
            ("unmount", c.is_exec("fusermount3", "fusermount", "umount")),
            ("berth exit", c.is_exit("berth")),
        ]
        phases = [
            ("berth exec → squashfuse exec (interpreter, imports, settings, image lookup)", "berth", "squashfuse"),
            ("squashfuse exec → runtime exec (mount, plan, bundle)", "squashfuse", "runtime"),
            ("runtime exec → /bin/true exec (runtime start, berth-init)", "runtime", "command"),
            ("/bin/true exec → exit", "command", "command exit"),
            ("/bin/true exit → berth exit (runtime exit, unmount)", "command exit", "berth exit"),
            ("total: berth exec → berth exit", "berth", "berth exit"),
        ]
        samples = [(label, c.Sample()) for label, _, _ in phases]
        with c.ExecTrace() as trace:
            for _ in range(runs):
                trace.start()
                self.user.run(argv, env=env)
                found = c.exec_marks(trace.stop(), marks)
                if found is None:
                    self.notes.append("berth run phases: an expected program (squashfuse, the runtime, "
                                      "fusermount3) was not seen in the exec trace")
                    return None
                for (label, start, end), (_, sample) in zip(phases, samples):
                    sample.add(found[end] - found[start])
        return samples

    def berth_reported_phases(self, argv: list[str], env: dict, runs: int = 7) -> list[tuple[str, c.Sample]]:
        """The phases berth itself reports with --debug ("timing: prepare 40.6 ms, mount ...")."""
        debug_argv = [argv[0], "--debug", *argv[1:]]
        samples: dict[str, c.Sample] = {}
        for _ in range(runs):
            result = self.user.run(debug_argv, env=env)
            lines = [line for line in result.stderr.splitlines() if "timing:" in line]
            if not lines:
                return []
            for part in lines[-1].split("timing:", 1)[1].split(","):
                match = re.match(r"\s*(.+?)\s+([\d.]+)\s*ms\s*$", part)
                if match:
                    samples.setdefault(match.group(1), c.Sample()).add(float(match.group(2)) / 1000)
        return list(samples.items())

    def berth_profile(self, argv: list[str], env: dict, top: int = 12) -> list[tuple[str, float]]:
        """berth's own functions by cumulative time in one warm run under cProfile (which inflates
        every figure: read them as shares)."""
        import pstats

        profile = self.workdir / "berth.prof"
        python = str(c.VENV / "bin" / "python")
        self.user.run([python, "-m", "cProfile", "-o", str(profile), *argv], env=env)
        stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
        source = str(c.REPO / "src" / "berth")
        rows = []
        for (filename, line, function), (_, _, _, cumulative_s, _) in stats.items():
            if filename.startswith(source):
                rows.append((f"{filename[len(source) - len('berth'):]}:{line}({function})", cumulative_s))
        total = max((cumulative_s for (filename, _, function), (_, _, _, cumulative_s, _) in stats.items()
                     if function == "<module>" and filename == str(c.BERTH_PY)), default=None)
        rows.sort(key=lambda row: -row[1])
        return ([("total (the berth script)", total)] if total else []) + rows[:top]

    def cleanup(self) -> None:
        for env in self.lingering_envs:  # berth ends its lingering mounts (and their reapers)
            self.user.run([str(c.BERTH), "doctor", "--cleanup"], env=env, check=False)
        for mountpoint in self.mounts:
            self.user.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        for path in self.cleanup_dirs:
            c.rm_tree(path)
        # rootless podman leaves a "pause" process holding its user namespace: end it (by PID)
        pause_pid_file = Path(self.user.env()["XDG_RUNTIME_DIR"]) / "libpod" / "tmp" / "pause.pid"
        if pause_pid_file.exists():
            try:
                pid = int(pause_pid_file.read_text().strip())
                if Path(f"/proc/{pid}/status").read_text().count(f"Uid:\t{self.user.uid}"):
                    os.kill(pid, signal.SIGTERM)
            except (ValueError, OSError):
                pass
            pause_pid_file.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--before", type=Path, help="another berth executable to time in the same runs")
    args = parser.parse_args()
    if os.getuid() != 0:
        parser.error("run as root (it prepares images and runs the tools as the unprivileged user)")
    command = "python3 bench/start.py " + " ".join(sys.argv[1:])
    if args.before:
        try:
            revision = c.run(["git", "-C", str(args.before.resolve().parents[2]), "log", "-1", "--format=%h"]).stdout.strip()
        except RuntimeError:
            revision = "unknown revision"
    header = c.report_header("Warm start of /bin/true (issues 3, 10)", command.strip())
    c.ensure_cache_readable()
    user = c.BenchUser.lookup()
    image = c.debian_image()
    workdir = user.tempdir("berth-bench-start-", Path("/var/tmp"))
    bench = StartBench(user, workdir, args.runs, args.warmup)
    sections = [header]
    if args.before:
        sections += [f"- before: `{args.before}` (git {revision}), timed in the same runs as `{BEFORE}`", ""]
    try:
        c.log("preparing the rootfs, SquashFS, bundles, udocker and podman")
        rootfs, sqfs = bench.prepare_tree(image)
        mountpoint = bench.mount_squashfs(sqfs)
        bundle_sqfs = bench.runc_bundle("sqfs", mountpoint)
        bundle_dir = bench.runc_bundle("dir", rootfs)
        runc_state = user.tempdir("runc-state-", workdir)
        commands = {
            "runc (squashfuse root)": ["runc", "--root", str(runc_state), "run", "-b", str(bundle_sqfs), "bench-sqfs"],
            "runc (directory root)": ["runc", "--root", str(runc_state), "run", "-b", str(bundle_dir), "bench-dir"],
            "ch-run IMG.sqfs": ["ch-run", str(sqfs), "--", "/bin/true"],
            "ch-run DIR": ["ch-run", str(rootfs), "--", "/bin/true"],
            "bwrap DIR": ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                          "--ro-bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev", "/bin/true"],
        }
        bundle_berth = bench.berth_bundle(mountpoint)
        if bundle_berth:
            commands["berth-launcher (berth's config.json, squashfuse root)"] = [
                bench.launcher, "--root", str(runc_state), "run", "-b", str(bundle_berth), "bench-launcher"]
            commands["runc (berth's config.json, squashfuse root)"] = [
                "runc", "--root", str(runc_state), "run", "-b", str(bundle_berth), "bench-berth"]
        podman = bench.podman_argv()
        if podman:
            commands["podman run (rootless, overlay, runc)"] = podman
        berth = bench.berth_ready(image)
        c.log("timing")
        samples: dict[str, c.Sample] = {}
        berth_envs: dict[str, dict] = {}
        berth_argvs: dict[str, list[str]] = {}
        if berth:
            for runtime in RUNTIMES:
                berth_envs[f"berth run ({runtime})"] = {**berth[1], "BERTH_RUNTIME": runtime}
                berth_argvs[f"berth run ({runtime})"] = berth[0]
            berth_envs[LINGER] = {**berth_envs[BERTH], "BERTH_IMAGE_MOUNT_LINGER": "600",
                                  "BERTH_STATE_DIR": str(user.tempdir("berth-state-linger-", workdir))}
            berth_argvs[LINGER] = berth[0]
            bench.lingering_envs.append(berth_envs[LINGER])
            python_argv = [str(c.BERTH_PY), *berth[0][1:]]
            for name, base, argv in ((CACHED, BERTH, python_argv), (CACHED_LINGER, LINGER, python_argv),
                                     (COMPILED_LINGER, LINGER, berth[0])):
                if argv is berth[0] and c.BERTH_PY == c.BERTH:
                    continue  # a berth without the compiled front end
                berth_envs[name] = {**berth_envs[base], "BERTH_PLAN_CACHE": "1",
                                    "BERTH_STATE_DIR": str(user.tempdir("berth-state-plans-", workdir))}
                berth_argvs[name] = argv
                if not bench.prime_plan_cache(argv, berth_envs[name], compiled=argv is berth[0]):
                    bench.notes.append(f"{name}: no plan was kept within 30 s (its runs are misses)")
                if name != CACHED:
                    bench.lingering_envs.append(berth_envs[name])
            if args.before:
                berth_envs[BEFORE] = berth_envs[BERTH]
                berth_argvs[BEFORE] = [str(args.before), *berth[0][1:]]
        # berth's two runtimes and the runtimes alone first and together, so that the figures
        # the targets compare are measured under the same load
        for name, env in berth_envs.items():
            try:
                samples.update(bench.hyperfine({name: berth_argvs[name]}, env=env))
            except RuntimeError as error:
                bench.unavailable[name] = f"failed while timed: {c.error_line(str(error))}"
        for name, argv in commands.items():  # one hyperfine each: a failing tool loses only its row
            try:
                samples.update(bench.hyperfine({name: argv}))
            except RuntimeError as error:
                bench.unavailable[name.split()[0]] = f"failed while timed: {c.error_line(str(error))}"
        udocker_env = bench.prepare_udocker(image)
        if udocker_env:
            samples.update(bench.hyperfine({"udocker run (R1: host runc)": [
                str(UDOCKER), "-q", "run", "--nobanner", "bench", "/bin/true"]}, env=udocker_env, ignore_failure=True))
        paired: dict[str, c.Sample] = {}
        if berth_envs:
            chosen = {name: (berth_argvs[name], {key: value for key, value in env.items() if berth[1].get(key) != value})
                      for name, env in berth_envs.items()}
            chosen.update({name: (argv, {}) for name, argv in commands.items() if name in PAIRED})
            try:
                paired = bench.interleaved({name: (argv, {**berth[1], **extra} if name in berth_envs else extra)
                                            for name, (argv, extra) in chosen.items()}, args.runs)
            except RuntimeError as error:
                bench.notes.append(f"interleaved runs failed: {c.error_line(str(error))}")
        cpu: dict[str, c.Sample] = {}
        if berth_envs:
            cpu_commands = {name: (berth_argvs[name], env) for name, env in berth_envs.items()}
            cpu_commands.update({name: (argv, {}) for name, argv in commands.items() if name in PAIRED})
            cpu_commands["python -c pass (venv python)"] = ([str(c.VENV / "bin" / "python"), "-c", "pass"], {})
            try:
                cpu = bench.cpu_interleaved(cpu_commands, args.runs)
            except RuntimeError as error:
                bench.notes.append(f"CPU times failed: {c.error_line(str(error))}")
        berth_phases: dict[str, list[tuple[str, c.Sample]]] = {}
        berth_profile: list[tuple[str, float]] = []
        berth_reported: dict[str, list[tuple[str, c.Sample]]] = {}
        for name, env in berth_envs.items():
            try:
                phases = bench.berth_phases(berth_argvs[name], env)
                if phases:
                    berth_phases[name] = phases
                berth_reported[name] = bench.berth_reported_phases(berth_argvs[name], env)
            except RuntimeError as error:
                bench.unavailable[name] = f"failed while timed: {c.error_line(str(error))}"
        if berth_envs:
            try:
                berth_profile = bench.berth_profile(python_argv, berth_envs[BERTH])
            except RuntimeError as error:
                bench.notes.append(f"no profile: {c.error_line(str(error))}")
        python_env = {"PATH": f"{c.VENV / 'bin'}:{c.SYSTEM_PATH}"}
        overhead = bench.hyperfine({
            "python -c pass (venv python)": [str(c.VENV / "bin" / "python"), "-c", "pass"],
            "python -S -c pass": [str(c.VENV / "bin" / "python"), "-S", "-c", "pass"],
            "berth --version": [str(c.BERTH), "--version"],
        }, env=python_env)
        imports = {"python -X importtime -c 'import berth.cli.main'": bench.importtime(["-c", "import berth.cli.main"])}
        if berth:
            # the whole run path: every import a warm `berth run IMG /bin/true` makes
            imports["python -X importtime .venv/bin/berth-py run IMG /bin/true"] = bench.importtime(
                python_argv, berth_envs[BERTH])
            imports["python -X importtime .venv/bin/berth-py run IMG /bin/true (plan cache hit)"] = bench.importtime(
                python_argv, berth_envs[CACHED], label=CACHED)
            if args.before:
                imports["python -X importtime BEFORE/.venv/bin/berth run IMG /bin/true (before)"] = bench.importtime(
                    berth_argvs[BEFORE], berth_envs[BERTH], python=str(args.before.parent / "python"))
    finally:
        bench.cleanup()
        c.rm_tree(workdir)

    berth_sample = samples.get(BERTH)
    rows = []
    order = [*[f"berth run ({runtime})" for runtime in RUNTIMES], LINGER, CACHED, CACHED_LINGER, COMPILED_LINGER,
             *([BEFORE] if args.before else []),
             "berth-launcher (berth's config.json, squashfuse root)",
             "runc (berth's config.json, squashfuse root)", "runc (squashfuse root)", "runc (directory root)",
             "ch-run IMG.sqfs", "ch-run DIR", "bwrap DIR", "udocker run (R1: host runc)",
             "podman run (rootless, overlay, runc)"]
    for name in order:
        sample = samples.get(name)
        if sample is None:
            why = bench.unavailable.get(name) or bench.unavailable.get(name.split()[0], "not measured")
            rows.append([name, f"not available: {why}", "—", "—"])
            continue
        if berth_sample and name != BERTH:
            rows.append([name, sample.cell("ms"), c.ratio(berth_sample.median, sample.median),
                         f"{(berth_sample.median - sample.median) * 1000:+.1f}"])
        else:
            rows.append([name, sample.cell("ms"), "—", "—"])
    sections.append(c.markdown_table(["command", "ms: median (min–max)", f"{BERTH} / tool",
                                      f"{BERTH} − tool (ms)"], rows))
    sections.append("")
    if paired:
        rounds = len(next(iter(paired.values())).values)
        sections += [(f"The same commands in turn, round after round ({rounds} rounds, {args.warmup} warm-up; "
                      "each timed from spawn to exit by a Python driver running as the user): a changing load "
                      "weighs on all of them alike, so the target lines below use these medians."), ""]
        paired_berth = paired.get(BERTH)
        sections.append(c.markdown_table(["command", "ms: median (min–max)", f"{BERTH} / command"], [
            [name, sample.cell("ms"), c.ratio(paired_berth.median, sample.median) if paired_berth else "—"]
            for name, sample in paired.items()]))
        sections.append("")
    target_samples = paired or samples
    berth_sample = target_samples.get(BERTH)
    if berth_sample:
        # berth as it runs by default, and with its image mount lingering (like bare runc, on a
        # mount made before).
        for name, mounted_before in ((BERTH, ""), (LINGER, " (both on a mount made before)"), (CACHED, ""),
                                     (CACHED_LINGER, " (both on a mount made before)"),
                                     (COMPILED_LINGER, " (both on a mount made before)")):
            sample = target_samples.get(name)
            if sample is None:
                continue
            for runc_name in ("runc (squashfuse root)", "runc (berth's config.json, squashfuse root)"):
                if runc_name in target_samples:
                    ratio = sample.median / target_samples[runc_name].median
                    sections.append(f"- target (issue 10) {name} ≤ bare {runc_name}{mounted_before}: {ratio:.2f}x, "
                                    f"{'met' if ratio <= 1.0 else 'NOT met'}")
            if "ch-run IMG.sqfs" in target_samples:
                ratio = sample.median / target_samples["ch-run IMG.sqfs"].median
                sections.append(f"- target (issue 10) {name} ≤ 2x ch-run on the SquashFS: {ratio:.2f}x, "
                                f"{'met' if ratio <= 2.0 else 'NOT met'}")
        if LINGER in target_samples:
            linger_sample = target_samples[LINGER]
            sections.append(f"- {LINGER} / {BERTH}: {linger_sample.median / berth_sample.median:.2f} "
                            f"({linger_sample.median * 1000:.1f} against {berth_sample.median * 1000:.1f} ms)")
        for name in (CACHED, CACHED_LINGER, COMPILED_LINGER):
            if name in target_samples:
                sections.append(f"- {name} / {BERTH}: {target_samples[name].median / berth_sample.median:.2f} "
                                f"({target_samples[name].median * 1000:.1f} against {berth_sample.median * 1000:.1f} ms)")
        if BEFORE in target_samples:
            sections.append(f"- {BERTH} now / before: {berth_sample.median / target_samples[BEFORE].median:.2f} "
                            f"({berth_sample.median * 1000:.1f} against {target_samples[BEFORE].median * 1000:.1f} ms)")
    else:
        sections.append(f"- targets not evaluated: berth not available: {bench.unavailable.get('berth')}")
    if cpu:
        rounds = len(next(iter(cpu.values())).values)
        sections += ["", (f"CPU time (user + system) of each command's whole process tree (bench/treecpu.py: "
                          f"FUSE daemon, runtime, container included), the commands in turn, {rounds} rounds: "
                          "it hardly depends on the machine's load, unlike the wall times above."), ""]
        cpu_berth = cpu.get(BERTH)
        sections.append(c.markdown_table(["command", "CPU ms: median (min–max)", f"{BERTH} / command"], [
            [name, sample.cell("ms"), c.ratio(cpu_berth.median, sample.median) if cpu_berth else "—"]
            for name, sample in cpu.items()]))
        if cpu_berth and BEFORE in cpu:
            sections += ["", f"- {BERTH} CPU now / before: {cpu_berth.median / cpu[BEFORE].median:.2f} "
                             f"({cpu_berth.median * 1000:.1f} against {cpu[BEFORE].median * 1000:.1f} ms)"]
    if berth_phases:
        names = list(berth_phases)
        runs = len(next(iter(berth_phases.values()))[0][1].values)
        sections += ["", ("Where a warm `berth run IMG /bin/true` spends its time, per runtime (kernel exec/exit "
                          f"events from a tracefs instance, no ptrace; {runs} runs each), ms: median (min–max):"), ""]
        labels = [label for label, _ in berth_phases[names[0]]]
        sections.append(c.markdown_table(["phase", *names], [
            [label, *[dict(berth_phases[name]).get(label, c.Sample()).cell("ms") if dict(berth_phases[name]).get(label)
                      else "—" for name in names]] for label in labels]))
    if any(berth_reported.values()):
        names = [name for name, phases in berth_reported.items() if phases]
        labels = list(dict.fromkeys(label for name in names for label, _ in berth_reported[name]))
        sections += ["", ("The phases berth reports itself (`berth --debug run …`, its 'timing:' line), "
                          "ms: median (min–max):"), "",
                     c.markdown_table(["phase (berth's name)", *names], [
                         [label, *[dict(berth_reported[name])[label].cell("ms") if label in dict(berth_reported[name])
                                   else "—" for name in names]] for label in labels])]
    if berth_profile:
        sections += ["", ("One warm `berth run` under cProfile (inflates everything; read as shares): berth's "
                          "functions by cumulative time:"), "",
                     c.markdown_table(["function", "ms cumulative"],
                                      [[f"`{name}`", f"{seconds * 1000:.1f}"] for name, seconds in berth_profile])]
    sections += ["", "berth's own start-up cost:", ""]
    sections.append(c.markdown_table(["command", "ms: median (min–max)"],
                                     [[name, sample.cell("ms")] for name, sample in overhead.items()]))
    sections.append("")
    for command_line, (total, top) in imports.items():
        sections.append(f"- `{command_line}`: imports beyond a bare interpreter take "
                        f"{total.cell('ms')} ms ({len(total.values)} runs); largest self times (median µs): "
                        + ", ".join(f"{module} {seconds * 1e6:.0f}" for module, seconds in top))
    run_families = {label: bench.import_families.get(" ".join(argv)) for label, argv in
                    ((BERTH, berth[0] if berth else []), (BEFORE, berth_argvs.get(BEFORE, []) if berth else []))}
    run_families[CACHED] = bench.import_families.get(CACHED)
    run_families = {label: rows for label, rows in run_families.items() if rows}
    if run_families:
        labels = list(run_families)
        first = run_families[labels[0]]
        sections += ["", ("Where the import time of `berth run IMG /bin/true` goes (`python -X importtime`, self "
                          "times summed by family, median of the runs), ms:"), "",
                     c.markdown_table(["family", *[f"{label}: modules" for label in labels],
                                       *[f"{label}: ms" for label in labels]], [
                         [name, *[str(dict((n, m) for n, m, _ in run_families[label])[name]) for label in labels],
                          *[f"{dict((n, s) for n, _, s in run_families[label])[name] * 1000:.1f}" for label in labels]]
                         for name, _, _ in first])]
    sections.extend(["", *[f"- {note}" for note in bench.notes]])
    c.emit_report(sections, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
