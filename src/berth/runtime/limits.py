"""--cpus / --memory: cgroup v2 when the host delegates it to the caller, else affinity + rlimit.

On a pure cgroup v2 host where the caller's own cgroup is writable and has the cpu and memory
controllers enabled for its children (systemd user delegation, or a Slurm step), the limits go
into config.json's linux.resources under a child cgroup. Otherwise (cgroup v1 or hybrid, like
the test bed, or no delegation) berth falls back to what an unprivileged process can always
do: CPU affinity (sched_setaffinity on the runtime process, inherited by the container) and
RLIMIT_DATA for memory, and says which it applied. Inside a Slurm step the step's cgroup is
inherited and never fought: berth only ever narrows it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from berth.namedtuple import NamedTuple


class LimitPlan(NamedTuple):
    """What to apply, and a sentence per limit saying how."""

    cpu_set: frozenset[int] | None = None
    rlimits: tuple[tuple[str, int, int], ...] = ()
    cgroups_path: str | None = None
    cpu_quota_us: int | None = None
    memory_limit_bytes: int | None = None
    notes: tuple[str, ...] = ()


def delegated_cgroup(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """The nearest cgroup v2 directory, from the caller's own up, that the caller may write
    and that enables cpu and memory for its children (systemd ``Delegate=yes`` gives the
    user's ``user@UID.service``; a Slurm step gives its step cgroup). None on cgroup v1 or
    hybrid hosts, or without delegation."""
    if not os.path.exists(os.path.join(cgroup_root, "cgroup.controllers")):
        return None
    try:
        with open(proc_cgroup, encoding="ascii") as handle:
            relative = next((line[3:].strip() for line in handle if line.startswith("0::")), None)
    except OSError:
        return None
    if relative is None:
        return None
    path = os.path.normpath(cgroup_root + "/" + relative.strip("/")) if relative.strip("/") else cgroup_root
    while path.startswith(cgroup_root.rstrip("/") + "/"):
        try:
            with open(os.path.join(path, "cgroup.subtree_control"), encoding="ascii") as handle:
                enabled = handle.read().split()
        except OSError:
            enabled = []
        if "cpu" in enabled and "memory" in enabled and os.access(path, os.W_OK) \
                and os.access(os.path.join(path, "cgroup.procs"), os.W_OK):
            return path
        path = os.path.dirname(path)
    return None


def plan_limits(cpus: float | None, memory_bytes: int | None, container_id: str,
                busy_cpus: Mapping[int, int] | None = None) -> LimitPlan:
    """Decide how to apply the requested limits on this host (reads /proc and /sys only).

    ``busy_cpus`` counts, per CPU, the caller's live containers already pinned there: affinity
    picks the least used CPUs first, so that four ``--cpus 1`` jobs on four CPUs do not all
    land on CPU 0."""
    if cpus is None and memory_bytes is None:
        return LimitPlan()
    cgroup = delegated_cgroup()
    if cgroup is not None:
        notes = []
        quota = None
        if cpus is not None:
            quota = int(cpus * 100000)
            notes.append(f"--cpus {cpus:g}: cgroup v2 cpu.max {quota} 100000 in {cgroup}/berth-{container_id}")
        if memory_bytes is not None:
            notes.append(f"--memory: cgroup v2 memory.max {memory_bytes} in {cgroup}/berth-{container_id}")
        relative = cgroup[len("/sys/fs/cgroup"):] + f"/berth-{container_id}"
        return LimitPlan(cgroups_path=relative, cpu_quota_us=quota, memory_limit_bytes=memory_bytes,
                         notes=tuple(notes))
    notes = []
    cpu_set = None
    rlimits: tuple[tuple[str, int, int], ...] = ()
    if cpus is not None:
        allowed = sorted(os.sched_getaffinity(0))
        count = max(1, min(len(allowed), math.ceil(cpus)))
        busy = busy_cpus or {}
        cpu_set = frozenset(sorted(allowed, key=lambda cpu: (busy.get(cpu, 0), cpu))[:count])
        note = (f"--cpus {cpus:g}: no cgroup v2 delegation here, so CPU affinity to "
                f"{count} CPU(s) {','.join(map(str, sorted(cpu_set)))}")
        if count < cpus:
            note += f" (only {len(allowed)} allowed to you)"
        elif count != cpus:
            note += " (affinity counts whole CPUs)"
        notes.append(note)
    if memory_bytes is not None:
        rlimits = (("RLIMIT_DATA", memory_bytes, memory_bytes),)
        notes.append(f"--memory {memory_bytes} bytes: no cgroup v2 delegation here, so RLIMIT_DATA per process "
                     "(a process, not the whole container, is limited)")
    return LimitPlan(cpu_set=cpu_set, rlimits=rlimits, notes=tuple(notes))
