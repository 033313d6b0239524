"""Choosing the OCI runtime (runc or crun) that actually works on this host, and saying why not.

"Works" is decided by running a trivial rootless container (berth-init -V in an empty root),
not by version checks: crun 1.8 is installed on hybrid cgroup hosts yet refuses to start
("cgroups in hybrid mode not supported", TESTBED.md). The verdict is cached per host in the
caller's state directory, keyed by the runtime binary, the kernel and the cgroup layout, so the
probe costs ~50 ms once, not on every `berth run`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import NamedTuple
from pathlib import Path

from berth import fsutil, proc
from berth.errors import ProgramNotFound, RuntimeFailure
from berth.runtime.spec import INIT_PATH, SpecPlan, build_config

RUNTIMES = ("runc", "crun")
PROBE_FILE = "runtime-probe.json"
PROBE_TIMEOUT_S = 20.0


class ProbeResult(NamedTuple):
    runtime: str
    path: str | None
    works: bool
    reason: str


def init_path() -> str:
    """berth-init as installed by scripts/setup-venv.sh (``$VENV/libexec/berth/berth-init``).

    ``BERTH_INIT`` overrides (tests, unusual installs)."""
    override = os.environ.get("BERTH_INIT")
    if override:
        return override
    import sys

    return os.path.join(sys.prefix, "libexec", "berth", "berth-init")


def check_init(path: str) -> None:
    if not os.access(path, os.X_OK):
        raise RuntimeFailure(f"berth-init is missing at {path}",
                             hint="ask your site administrator to run scripts/setup-venv.sh, which builds it")


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


def _host_key(path: str) -> str:
    info = os.stat(path)
    return f"{path}:{info.st_mtime_ns}:{info.st_size}:{os.uname().release}:{cgroup_layout()}"


def _explain(runtime: str, output: str) -> str:
    """Turn a runtime's failure output into a reason with the fix."""
    text = output.strip().splitlines()[-1] if output.strip() else "no message"
    if "hybrid" in output:
        return (f"{runtime} does not support this host's hybrid cgroup layout ({text}); it works where "
                "cgroup v2 is pure, or after an admin mounts the hugetlb controller as cgroup v1")
    if "user namespace" in output.lower() or "operation not permitted" in output.lower():
        return (f"{runtime} cannot create a user namespace here ({text}); check "
                "kernel.unprivileged_userns_clone / user.max_user_namespaces ('berth doctor')")
    return f"{runtime} failed to start a trivial container: {text}"


def probe(runtime: str, scratch: Path, init: str) -> ProbeResult:
    """Run a trivial container with ``runtime``; never raises."""
    try:
        path = proc.find_program(runtime)
    except ProgramNotFound:
        return ProbeResult(runtime, None, False, f"{runtime} is not installed")
    import tempfile  # only when probing (once per host), not on every run

    workdir = Path(tempfile.mkdtemp(prefix=f"probe-{runtime}-", dir=scratch))
    try:
        rootfs = workdir / "rootfs"
        rootfs.mkdir()
        plan = SpecPlan(rootfs=str(rootfs), args=(INIT_PATH, "-V"), env=("PATH=/",), cwd="/",
                        uid=os.getuid(), gid=os.getgid(), init_path=init, hostname="berth-probe")
        (workdir / "config.json").write_text(json.dumps(build_config(plan)))
        result = proc.run([path, "--root", str(workdir / "state"), "run", "-b", str(workdir),
                           f"berth-probe-{os.getpid()}"], check=False, timeout=PROBE_TIMEOUT_S,
                          stderr=subprocess.STDOUT)
        output = (result.stdout or b"").decode("utf-8", "replace")
        if result.returncode == 0 and "berth-init" in output:
            return ProbeResult(runtime, path, True, "a trivial rootless container ran")
        return ProbeResult(runtime, path, False, _explain(runtime, output))
    except Exception as exc:  # a probe reports, it does not fail  # noqa: BLE001
        return ProbeResult(runtime, path, False, f"{runtime} probe failed: {exc}")
    finally:
        proc.run([path, "--root", str(workdir / "state"), "delete", "--force", f"berth-probe-{os.getpid()}"],
                 check=False)
        shutil.rmtree(workdir, ignore_errors=True)


class _ProbeCache:
    """The per-host verdicts in STATE_DIR/runtime-probe.json: runtime -> {key, works, reason}.

    ``key`` names the runtime binary (path, mtime, size), the kernel and the cgroup layout: a
    verdict is reused only while all of them are unchanged."""

    def __init__(self, state_dir: Path, *, use_cache: bool = True) -> None:
        self.path = state_dir / PROBE_FILE
        self.entries: dict = {}
        self.changed = False
        if use_cache:
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def result(self, runtime: str, state_dir: Path, init: str) -> ProbeResult:
        try:
            path = proc.find_program(runtime)
            key = _host_key(path)
        except (ProgramNotFound, OSError):
            return ProbeResult(runtime, None, False, f"{runtime} is not installed")
        entry = self.entries.get(runtime)
        if entry and entry.get("key") == key:
            return ProbeResult(runtime, path, entry["works"], entry["reason"])
        result = probe(runtime, state_dir, init)
        self.entries[runtime] = {"key": key, "works": result.works, "reason": result.reason}
        self.changed = True
        return result

    def save(self) -> None:
        if self.changed:
            fsutil.write_atomically(self.path, json.dumps(self.entries), mode=fsutil.PRIVATE_FILE, durable=False)


def probe_all(state_dir: Path, init: str, *, use_cache: bool = True) -> list[ProbeResult]:
    """Probe every known runtime (cached verdicts when the host has not changed)."""
    cache = _ProbeCache(state_dir, use_cache=use_cache)
    try:
        return [cache.result(runtime, state_dir, init) for runtime in RUNTIMES]
    finally:
        cache.save()


def select_runtime(state_dir: Path, wanted: str, init: str) -> str:
    """The runtime binary to use: ``wanted`` ('auto', 'runc', 'crun'). Raises RuntimeFailure."""
    if wanted not in ("auto", *RUNTIMES):
        raise RuntimeFailure(f"unknown OCI runtime '{wanted}' (settings: runtime)",
                             hint="use auto, runc or crun")
    cache = _ProbeCache(state_dir)
    reasons = []
    try:
        for runtime in RUNTIMES if wanted == "auto" else (wanted,):
            result = cache.result(runtime, state_dir, init)
            if result.works:
                return result.path or runtime
            reasons.append(result.reason)
    finally:
        cache.save()
    raise RuntimeFailure("no usable OCI runtime on this node: " + "; ".join(reasons),
                         hint="run 'berth doctor' for details; ask your site administrator to install "
                              "runc (Debian package runc) or fix the reason above")
