#!/usr/bin/env python3
"""Where a cold pull's time goes: a timeline of each blob's download and each layer's
conversion, and the CPU seconds of each part (issue 10, target 4 asks for a phase breakdown
where pull + convert misses 1.5x the ``pigz -dc`` floor).

Runs ``berth pull`` in process, as the unprivileged user, against the bench registry (the
images of bench/pull_convert.py), with berth's own functions wrapped to note when they start
and end; a fresh store each run. Reports per run: the process start (interpreter and imports),
manifest resolution, each blob's download (start, end), each layer's conversion (start, end,
read while downloading or from the stored blob), the wait for tar2sqfs to end, publishing,
and CPU seconds of the main thread, the download threads and the children (igzip, tar2sqfs).

Usage (as root, with berth's venv)::

    .venv/bin/python bench/pull_timeline.py [--runs 3] [--images debian,multi] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

#: The instrumented pull, run as the bench user by the venv's interpreter: prints one JSON
#: object (the events and the CPU seconds).
CHILD = r'''
import time
T0 = time.monotonic()
import json, os, resource, sys, threading
EVENTS = []
def note(what):
    EVENTS.append((round(time.monotonic() - T0, 3), what))
started_at = float(sys.argv[3])
from berth.config.load import load_settings
from berth.image import pull as P, flatten as F, squashfs as S, tarstream as T
from berth.store import store as ST
note("imports done")
short = lambda digest: str(digest)[7:15]
THREAD_CPU = {}
def wrap(owner, name, label):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        what = label(*args, **kwargs)
        note(f"{what} start")
        cpu0 = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            note(f"{what} end")
            key = threading.current_thread().name.split("_")[0]
            THREAD_CPU[key] = THREAD_CPU.get(key, 0.0) + time.thread_time() - cpu0
    setattr(owner, name, wrapper)
wrap(P, "fetch_blob", lambda client, store, ref, d, *a, **k: f"download {short(d.digest)}")
wrap(P, "_get_manifest", lambda client, ref, version: "manifest")
wrap(F._Flattener, "layer", lambda self, source, layer, what, plan: f"convert layer {layer} ({what[13:21]})")
wrap(S.SquashfsWriter, "finish", lambda self: "tar2sqfs finish")
wrap(ST.Store, "publish_image", lambda self, *a, **k: "publish")
enter = P._FollowedBlob.__enter__
def follow_enter(self):
    result = enter(self)
    note(f"layer {short(self.digest)} read " + ("while downloading" if result else "from the stored blob"))
    return result
P._FollowedBlob.__enter__ = follow_enter
from berth.cli.progress import TerminalProgress
settings = load_settings()
cpu0 = time.thread_time()
P.pull_image(settings, sys.argv[1], progress=TerminalProgress(sys.stderr))  # as `berth pull` does
main_cpu = time.thread_time() - cpu0
note("pull returned")
own = resource.getrusage(resource.RUSAGE_SELF)
children = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"events": EVENTS, "start_s": round(T0 - started_at, 3) if started_at else None,
                  "main_thread_cpu_s": round(main_cpu, 3),
                  "download_threads_cpu_s": round(THREAD_CPU.get("berth-pull", 0.0), 3),
                  "process_cpu_s": round(own.ru_utime + own.ru_stime, 3),
                  "children_cpu_s": round(children.ru_utime + children.ru_stime, 3)}))
'''


def system_cpu() -> tuple[float, float]:
    """(busy, idle + iowait) CPU seconds of the whole machine so far, all cores (/proc/stat):
    what the registry, the kernel's writeback and other users' processes took besides berth."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / tick, idle / tick


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pulls(user: c.BenchUser, config_dir: Path, image: c.BenchImage, registry: c.Registry,
          workdir: Path) -> tuple[dict, dict]:
    """A cold pull (fresh store), then a warm one (``berth rmi``: the blobs stay)."""
    store = user.tempdir("store-", workdir)
    env = c.berth_env(config_dir, store, workdir / "state")
    found = []
    for mode in ("cold", "warm"):
        if mode == "warm":
            user.run([str(c.BERTH), "rmi", image.ref(registry)], env=env)
        # time.monotonic() is system-wide on Linux: the child measures its start against ours.
        system_before, registry_before = system_cpu(), process_cpu(registry.process.pid)
        begin = time.monotonic()
        result = user.run([str(c.VENV / "bin" / "python"), str(workdir / "child.py"), image.ref(registry),
                           str(store), repr(begin)], env=env)
        wall = time.monotonic() - begin
        busy, idle = (after - before for after, before in zip(system_cpu(), system_before))
        data = json.loads(result.stdout.strip().splitlines()[-1])
        data["wall_s"] = round(wall, 3)
        data["system_busy_s"], data["system_idle_s"] = round(busy, 2), round(idle, 2)
        data["registry_cpu_s"] = round(process_cpu(registry.process.pid) - registry_before, 2)
        found.append(data)
    c.rm_tree(store)
    return found[0], found[1]


def render(image: c.BenchImage, runs: list[tuple[dict, dict]]) -> str:
    lines = [f"#### {image.name}: {len(image.layers)} layer(s), {image.compressed_bytes / 1e6:.0f} MB compressed", ""]
    lines.append(c.markdown_table(
        ["run", "store", "wall s", "interpreter start s", "main thread CPU s", "download threads CPU s",
         "process CPU s", "children CPU s (igzip, tar2sqfs)", "registry CPU s", "machine busy CPU s", "machine idle s"],
        [[str(n), mode, f"{r['wall_s']:.2f}", f"{r['start_s']:.2f}", f"{r['main_thread_cpu_s']:.2f}",
          f"{r['download_threads_cpu_s']:.2f}", f"{r['process_cpu_s']:.2f}", f"{r['children_cpu_s']:.2f}",
          f"{r['registry_cpu_s']:.2f}", f"{r['system_busy_s']:.2f}", f"{r['system_idle_s']:.2f}"]
         for n, pair in enumerate(runs, 1) for mode, r in zip(("cold", "warm"), pair)]))
    for index, mode in enumerate(("cold", "warm")):
        median = sorted((pair[index] for pair in runs), key=lambda r: r["wall_s"])[len(runs) // 2]
        lines += ["", f"Timeline of the median {mode} run (seconds since the interpreter started; it started "
                  f"{median['start_s']:.2f} s after the command):", "", "```"]
        lines += [f"{at:7.3f}  {what}" for at, what in median["events"]]
        lines += ["```"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", default="debian,multi")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if os.getuid() != 0:
        parser.error("run as root (it starts a registry and runs berth as the unprivileged user)")
    command = "python3 bench/pull_timeline.py " + " ".join(sys.argv[1:])
    sections = [c.report_header("Where a cold pull's time goes (issue 10, target 4)", command.strip())]
    c.ensure_cache_readable()
    user = c.BenchUser.lookup()
    builders = {"debian": c.debian_image, "multi": c.multi_image}
    images = [builders[name]() for name in args.images.split(",")]
    workdir = user.tempdir("berth-bench-timeline-", Path("/var/tmp"))
    try:
        (workdir / "child.py").write_text(CHILD)
        with c.Registry(c.registry_storage()) as registry:
            c.ensure_pushed(registry, images)
            config_dir = c.berth_config_dir(user, [registry.host], workdir)
            for image in images:
                runs = []
                for index in range(args.runs):
                    c.log(f"{image.name}: run {index + 1}/{args.runs}")
                    runs.append(pulls(user, config_dir, image, registry, workdir))
                sections += ["", render(image, runs)]
    finally:
        c.rm_tree(workdir)
    c.emit_report(sections, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
