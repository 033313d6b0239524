"""Choosing the OCI runtime (runc or crun) that actually works on this host, and saying why not.

"Works" is decided by running a trivial rootless container (berth-init -V in an empty root),
not by version checks: crun 1.8 is installed on hybrid cgroup hosts yet refuses to start
("cgroups in hybrid mode not supported", TESTBED.md). Definite verdicts are cached in the
caller's state directory, keyed by everything the probe depended on (the runtime binary and
berth-init, each by path and identity, berth's version, the kernel, the cgroup layout) and
expired after a while, so the probe costs ~50 ms once, not on every `berth run`. A probe that
could not decide (timeout, exhausted resources, berth-init failing) is reported, never cached.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from berth import fsutil, proc
from berth.errors import ProgramFailed, ProgramNotFound, RuntimeFailure
from berth.namedtuple import NamedTuple
from berth.untrusted import parse_json

# berth.runtime.spec is imported by the probe (once per host), not by every run (issue 10).

RUNTIMES = ("runc", "crun")
#: berth's own runtime (init/berth-launcher.c, berth.runtime.launcher): the OCI subset berth
#: generates, without runc's start-up cost; runc/crun run what it does not do.
LAUNCHER = "launcher"
#: Every value of the ``runtime`` setting.
CHOICES = ("auto", LAUNCHER, *RUNTIMES)
PROBE_FILE = "runtime-probe.json"
#: Version of the cache file's layout; another version is ignored (and replaced).
CACHE_FORMAT = 2
PROBE_TIMEOUT_S = 20.0
#: How long a cached verdict is trusted when nothing it depends on changed.
WORKS_TTL_S = 24 * 3600.0
FAILS_TTL_S = 600.0


class ProbeResult(NamedTuple):
    runtime: str
    path: str | None
    works: bool
    reason: str
    #: The runtime answered (it ran the container, or refused for a lasting reason): only such
    #: results are cached. Not definite: a timeout, a kill, EAGAIN, berth's own preparation failed.
    definite: bool = True
    #: berth-init, not the runtime, failed: the verdict says nothing about the runtime.
    init_failed: bool = False
    #: Taken from the cache, not probed now.
    cached: bool = False


def init_path() -> str:
    """berth-init, built with the package (setup.py) next to its source:
    ``berth/runtime/init/berth-init``. ``BERTH_INIT`` overrides (tests, unusual installs)."""
    override = os.environ.get("BERTH_INIT")
    if override:
        return override
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "init", "berth-init")


def launcher_path() -> str:
    """berth-launcher, built with the package (setup.py) next to berth-init."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "init", "berth-launcher")


def is_launcher(program: str) -> bool:
    """Whether the runtime executable ``program`` (as :func:`program_path` gives it) is
    berth-launcher, which takes berth's own options (``--parent-death``)."""
    return os.path.basename(program) == "berth-launcher"


def program_path(runtime: str) -> str:
    """The executable of ``runtime`` (a name of RUNTIMES or LAUNCHER). Raises ProgramNotFound."""
    if runtime != LAUNCHER:
        return proc.find_program(runtime)
    path = launcher_path()
    if os.access(path, os.X_OK):
        return path
    raise ProgramNotFound(f"berth-launcher is missing from this berth installation: no executable {path}",
                          hint=INIT_FIX)


#: The program names a container's record gives its runtime (info.json's ``runtime``, the
#: basename of what berth ran, berth.runtime.container) -> the runtime's name in CHOICES.
_RECORDED = {"berth-launcher": LAUNCHER, "runc": "runc", "crun": "crun"}


def recorded_program(recorded: object) -> str | None:
    """The executable of the runtime a container's record names (info.json's ``runtime``:
    berth-launcher, runc or crun), resolved as berth resolves one to run it
    (:func:`program_path`); None for any other value or a runtime not installed. The record is
    the user's file, which what can write into the state directory (a container that sees it)
    may have planted: a program path read from it is never run."""
    runtime = _RECORDED.get(recorded) if isinstance(recorded, str) else None
    if runtime is None:
        return None
    try:
        return program_path(runtime)
    except ProgramNotFound:
        return None


#: How to get berth-init back: it is compiled when berth is installed (setup.py).
INIT_FIX = ("berth-init is compiled when berth is installed, which needs gcc and a static C library: "
            "ask your site administrator to install them (Debian/Ubuntu: apt-get install gcc libc6-dev; "
            "RHEL: dnf install gcc glibc-static) and reinstall berth from its source "
            "(pip install --force-reinstall SOURCE_DIR, or scripts/setup-venv.sh in a checkout)")


def check_init(path: str) -> None:
    """Raise RuntimeFailure naming ``path`` and the fix when berth-init cannot be executed."""
    if os.access(path, os.X_OK):
        return
    if os.environ.get("BERTH_INIT"):
        raise RuntimeFailure(f"BERTH_INIT names {path}, which is not an executable berth-init",
                             hint="unset BERTH_INIT to use the berth-init installed with berth, or point "
                                  "it at a static berth-init")
    raise RuntimeFailure(f"berth-init, the init every container starts with, is missing from this "
                         f"berth installation: no executable {path}", hint=INIT_FIX)


def cgroup_layout() -> str:
    """'v2' (pure unified), 'hybrid' (v1 controllers + unified), 'v1' or 'none'."""
    try:
        stat = os.statvfs("/sys/fs/cgroup")
        del stat
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            return "v2"
        if os.path.isdir("/sys/fs/cgroup/unified"):
            return "hybrid"
        if os.path.isdir("/sys/fs/cgroup/memory") or os.path.isdir("/sys/fs/cgroup/cpu"):
            return "v1"
    except OSError:
        pass
    return "none"


def _explain(runtime: str, output: str) -> str:
    """Turn a runtime's failure output into a reason with the fix."""
    text = output.strip().splitlines()[-1] if output.strip() else "no message"
    if "hybrid" in output:
        return (f"{runtime} does not support this host's hybrid cgroup layout ({text}); it works where "
                "cgroup v2 is pure, or after an admin mounts the hugetlb controller as cgroup v1")
    if "user namespace" in output.lower() or "operation not permitted" in output.lower():
        from berth.runtime import hostcheck

        return (f"{runtime} cannot create a user namespace here ({text}); "
                + (hostcheck.userns_hint() or "check kernel.unprivileged_userns_clone / "
                   "user.max_user_namespaces ('berth doctor')"))
    return f"{runtime} failed to start a trivial container: {text}"


#: Phrases of a runtime's output that mean "try again", not "this runtime cannot work here":
#: a loaded node runs out of processes, memory, file descriptors or time (EAGAIN, ENOMEM...).
TRANSIENT_PHRASES = ("resource temporarily unavailable", "cannot allocate memory", "too many open files",
                     "too many processes", "no space left on device", "disk quota exceeded",
                     "interrupted system call", "timed out", "timeout", "try again")


def probe(runtime: str, scratch: Path, init: str) -> ProbeResult:
    """Run a trivial container with ``runtime``; never raises.

    The result is ``definite`` only when the runtime itself answered: it ran the container, or
    it refused for a reason that will hold on the next try. A timeout, a kill, an exhausted
    resource or an error of berth's own preparation is not definite (the caller must not cache
    it), and neither is a failure of berth-init to start, which says nothing about the runtime
    (``init_failed``)."""
    try:
        path = program_path(runtime)
    except ProgramNotFound as exc:
        return ProbeResult(runtime, None, False, exc.message, definite=False)
    from berth.runtime.spec import INIT_PATH, SpecPlan, build_config

    container = f"berth-probe-{os.getpid()}-{os.urandom(3).hex()}"
    workdir: Path | None = None
    try:
        import tempfile  # only when probing (once per host), not on every run

        workdir = Path(tempfile.mkdtemp(prefix=f"probe-{runtime}-", dir=scratch))
        rootfs = workdir / "rootfs"
        rootfs.mkdir()
        plan = SpecPlan(rootfs=str(rootfs), args=(INIT_PATH, "-V"), env=("PATH=/",), cwd="/",
                        uid=os.getuid(), gid=os.getgid(), init_path=init, hostname="berth-probe")
        (workdir / "config.json").write_text(json.dumps(build_config(plan)))
        result = proc.run([path, "--root", str(workdir / "state"), "run", "-b", str(workdir), container],
                          check=False, timeout=PROBE_TIMEOUT_S, stderr=proc.STDOUT)
    except ProgramFailed as exc:  # proc.run's timeout
        return ProbeResult(runtime, path, False, f"{runtime} did not start a trivial container within "
                           f"{PROBE_TIMEOUT_S:g} s (is the node overloaded?): {exc.message}", definite=False)
    except Exception as exc:  # a probe reports, it does not fail  # noqa: BLE001
        return ProbeResult(runtime, path, False, f"{runtime} could not be probed: {exc}", definite=False)
    finally:
        if workdir is not None:
            proc.run([path, "--root", str(workdir / "state"), "delete", "--force", container], check=False)
            fsutil.remove_tree(workdir)
    output = (result.stdout or b"").decode("utf-8", "replace")
    if result.returncode == 0 and "berth-init" in output:
        return ProbeResult(runtime, path, True, "a trivial rootless container ran")
    last = output.strip().splitlines()[-1] if output.strip() else "no message"
    if result.returncode < 0 or any(phrase in output.lower() for phrase in TRANSIENT_PHRASES):
        return ProbeResult(runtime, path, False, f"{runtime} failed to start a trivial container "
                           f"({proc.describe_status(result.returncode)}: {last}); this looks temporary",
                           definite=False)
    if INIT_PATH in output or (result.returncode != 0 and "berth-init" in output):
        return ProbeResult(runtime, path, False, f"berth-init ({init}) did not start in a trivial {runtime} "
                           f"container ({last}): it must be a static executable ('berth doctor' checks it)",
                           definite=False, init_failed=True)
    return ProbeResult(runtime, path, False, _explain(runtime, output))


def _identity(path: str) -> list:
    """What tells one file from another, or the same file changed: path, device, inode, mtime, size."""
    info = os.stat(path)
    return [path, info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size]


def probe_key(runtime_path: str, init: str) -> str:
    """Everything a probe's verdict depends on, as one string: the runtime binary and berth-init
    (each by path and identity: another installation's berth-init, or an upgraded runc, is
    another key), berth's version, the kernel, the cgroup layout and the caller. Raises OSError
    when either file cannot be examined."""
    from berth import __version__

    return json.dumps([CACHE_FORMAT, __version__, _identity(runtime_path), _identity(init),
                       os.uname().release, cgroup_layout(), os.getuid()], separators=(",", ":"))


class _ProbeCache:
    """Verdicts in STATE_DIR/runtime-probe.json: ``{"format": 2, "entries": {KEY: {works, reason,
    at}}}`` with KEY from :func:`probe_key`.

    Only definite verdicts are stored, and each is trusted for a while only: WORKS_TTL_S for a
    runtime that worked, FAILS_TTL_S for one that did not (a fix by the admin is seen without
    `berth doctor`). Several installations of berth on one node keep their own entries, since
    berth-init's identity is part of the key (issue 9: a second installation's failed probe
    used to be taken as the verdict on the runtime itself for every installation)."""

    def __init__(self, state_dir: Path, *, use_cache: bool = True, clock=time.time) -> None:
        self.path = state_dir / PROBE_FILE
        self.clock = clock
        self.entries: dict[str, dict] = {}
        self.changed = False
        try:
            data = parse_json(self.path.read_bytes(), what=str(self.path))
            if data.get("format") == CACHE_FORMAT and isinstance(data.get("entries"), dict):
                self.entries = data["entries"]
        except (OSError, ValueError, AttributeError):
            self.entries = {}
        self.use_cache = use_cache

    def _fresh(self, entry: object) -> bool:
        if not isinstance(entry, dict) or not isinstance(entry.get("at"), (int, float)):
            return False
        ttl = WORKS_TTL_S if entry.get("works") is True else FAILS_TTL_S
        return 0 <= self.clock() - entry["at"] < ttl

    def result(self, runtime: str, scratch: Path, init: str, *, reprobe: bool = False) -> ProbeResult:
        """The cached verdict on ``runtime`` with ``init``, or a new probe (stored when definite).
        ``reprobe`` skips the cache. ``.cached`` tells which it was."""
        try:
            path = program_path(runtime)
        except ProgramNotFound as exc:
            return ProbeResult(runtime, None, False, exc.message, definite=False)
        try:
            key = probe_key(path, init)
        except OSError as exc:
            return ProbeResult(runtime, path, False, f"cannot examine {exc.filename}: {exc.strerror}",
                               definite=False, init_failed=exc.filename == init)
        entry = self.entries.get(key)
        if self.use_cache and not reprobe and self._fresh(entry):
            return ProbeResult(runtime, path, entry["works"], str(entry.get("reason", "")), cached=True)
        result = probe(runtime, scratch, init)
        if result.definite:
            self.entries[key] = {"runtime": runtime, "works": result.works, "reason": result.reason,
                                 "at": self.clock()}
        else:
            self.entries.pop(key, None)
        self.changed = True
        return result

    def save(self) -> None:
        """Write the verdicts back (expired ones dropped); a failure to write costs only a probe
        next time, so it is not an error."""
        if not self.changed:
            return
        live = {key: entry for key, entry in self.entries.items() if self._fresh(entry)}
        try:
            fsutil.write_atomically(self.path, json.dumps({"format": CACHE_FORMAT, "entries": live}),
                                    mode=fsutil.PRIVATE_FILE, durable=False)
        except OSError:
            pass


def probe_all(state_dir: Path, init: str, *, use_cache: bool = True) -> list[ProbeResult]:
    """Probe every known runtime, berth-launcher first (cached verdicts when the host has not
    changed)."""
    cache = _ProbeCache(state_dir, use_cache=use_cache)
    try:
        return [cache.result(runtime, state_dir, init) for runtime in (LAUNCHER, *RUNTIMES)]
    finally:
        cache.save()


def candidates(wanted: str, config: dict | None, log=None) -> tuple[str, ...]:
    """The runtimes to try, in order, for the ``runtime`` setting ``wanted`` and the container's
    ``config`` (config.json as a dict): ``auto`` puts berth-launcher first when it can run the
    config (berth.runtime.launcher.unsupported), else runc then crun; ``launcher`` is
    berth-launcher only, and a config it cannot run is refused with the reason. Without a
    config (None) nothing has been judged: ``auto`` means the OCI runtimes. Raises
    RuntimeFailure."""
    if wanted not in CHOICES:
        raise RuntimeFailure(f"unknown OCI runtime '{wanted}' (settings: runtime)",
                             hint="use " + ", ".join(CHOICES[:-1]) + " or " + CHOICES[-1])
    if wanted not in ("auto", LAUNCHER):
        return (wanted,)
    if config is None:
        return RUNTIMES if wanted == "auto" else (LAUNCHER,)
    from berth.runtime.launcher import unsupported

    reason = unsupported(config)
    if reason is None:
        return (LAUNCHER, *RUNTIMES) if wanted == "auto" else (LAUNCHER,)
    if wanted == LAUNCHER:
        raise RuntimeFailure(f"runtime = launcher, but this container needs {reason}, which berth-launcher "
                             "does not do", hint='set runtime = "auto" (berth then uses runc for such a '
                             'container) or drop the option that needs it')
    if log:
        log(f"runtime: berth-launcher does not do {reason}: using runc or crun", debug=True)
    return RUNTIMES


def select_runtime(state_dir: Path, wanted: str, init: str, config: dict | None = None, log=None) -> str:
    """The runtime binary to use: ``wanted`` (one of CHOICES) for ``config`` (see
    :func:`candidates`). Raises RuntimeFailure.

    A cached failure only lets berth skip to a runtime that works; when none does, every cached
    failure is probed again before berth refuses, so no stored verdict can refuse a run alone."""
    order = candidates(wanted, config, log)
    cache = _ProbeCache(state_dir)
    results = []
    try:
        for runtime in order:
            result = cache.result(runtime, state_dir, init)
            if result.works:
                return result.path or runtime
            results.append(result)
        for index, result in enumerate(results):
            if result.cached:
                results[index] = result = cache.result(result.runtime, state_dir, init, reprobe=True)
                if result.works:
                    return result.path or result.runtime
    finally:
        cache.save()
    reasons = "; ".join(result.reason for result in results)
    if any(result.init_failed for result in results):
        hint = INIT_FIX
    elif any(result.path and not result.definite for result in results):
        hint = ("nothing was remembered from this failure: run the command again; if it keeps failing, "
                "run 'berth doctor' and show its output to your site administrator")
    else:
        hint = ("run 'berth doctor' for details; ask your site administrator to install "
                "runc (Debian package runc) or fix the reason above")
    raise RuntimeFailure("no usable OCI runtime on this node: " + reasons, hint=hint)
