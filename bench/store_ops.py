#!/usr/bin/env python3
"""What one node's part of a job start costs the shared filesystem and the registry, counted
syscall by syscall (issue 10, target 6; the figures behind docs/scale.md).

Every node of a Slurm step runs ``berth run IMAGE COMMAND`` (``srun … berth run`` or ``berth
srun``); the first node also runs the job runner. This benchmark runs that per-node command as
the unprivileged user under ``strace -f`` (strace runs as root with ``-u USER``, so the
setuid ``fusermount3`` still works and the FUSE daemon is traced too) with the variables a
Slurm step has (``SLURM_JOB_ID``/``SLURM_STEP_ID``: the mount scope of a step), and sorts every
file syscall by where its path lies:

- **store**: the image store (the user's and the site's) — on a cluster, the shared filesystem;
- **config**: the site configuration directory (``BERTH_CONFIG_DIR``; /etc/berth, often shared);
- **jobs**: the job records (``BERTH_JOBS_DIR``; by default in the home directory: shared);
- **home**, **xdg config**: the user's home directory and configuration (shared);
- **state**: berth's per-user state directory (node-local by design: mounts, containers);
- **berth install**, **berth source**, **python stdlib**: berth's virtual environment, its
  source (an editable install) and Python's standard library: berth is a Python program, and
  where a site installs it on a shared filesystem every node's start-up imports from there;
- the rest (/proc, /sys, /dev, /etc, the container's root) is not counted.

Per category: opens, stat-like calls (stat, lstat, fstatat, statx, access, readlink), directory
listings, stats of files already open (``fstat``: no path lookup, answered from the
attributes the open fetched on most network filesystems), locks (flock and fcntl locks),
namespace changes (mkdir, rename, unlink, utime, chmod) and bytes read (read, pread,
sendfile: the SquashFS blocks the FUSE daemon reads, the copy that ``stage_to_local`` makes).
Cases: the image mounted straight from the store (default), ``stage_to_local`` the first time
on a node (the copy) and once the copy is there, the first node's job runner (a local job),
and an image in no store started on 4 "nodes" at once, as separate processes (each pulls) and
as the nodes of one Slurm step (node 0 pulls, the others wait for it).

Registry traffic at job time: the image's registry runs during every traced start, and the
benchmark reports the requests in its access log and the ``connect()`` calls to its port
made by anything berth started (both must be 0: a job start never asks the registry).

Per-node CPU: the same command (not traced) under bench/treecpu.py, which reaps the whole
process tree (FUSE daemon and runtime included) and sums user + system time; a bare
``/bin/true`` under the same wrapper for comparison.

Usage::

    python3 bench/store_ops.py [--runs 5] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

TREECPU = Path(__file__).resolve().parent / "treecpu.py"
#: Where the venv's interpreter finds its standard library (the venv is made from /usr/bin/python3).
STDLIB = "/usr/lib/python3.11"
#: "Nodes" starting a step at once on an image that is in no store.
NODES = 4
STRACE = "/usr/bin/strace"
TRACED = "%file,%desc,%process,flock,connect"

STAT_CALLS = {"stat", "lstat", "fstat", "newfstatat", "fstatat64", "statx", "access", "faccessat", "faccessat2",
              "readlink", "readlinkat", "statfs", "fstatfs"}
OPEN_CALLS = {"open", "openat", "openat2", "creat"}
LIST_CALLS = {"getdents64", "getdents"}
READ_CALLS = {"read", "pread64", "readv", "preadv", "preadv2"}
COPY_CALLS = {"sendfile", "copy_file_range", "splice"}
CHANGE_CALLS = {"mkdir", "mkdirat", "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir", "utimensat",
                "chmod", "fchmod", "fchmodat", "link", "linkat", "symlink", "symlinkat", "ftruncate", "fsync",
                "fdatasync"}
LOCK_FCNTL = ("F_SETLK", "F_SETLKW", "F_OFD_SETLK", "F_OFD_SETLKW", "F_GETLK", "F_OFD_GETLK")
KINDS = ("open", "stat", "fstat", "list", "lock", "change", "read calls", "bytes read")

LINE = re.compile(r"^(?P<name>[a-z_0-9]+)\((?P<args>.*)\)\s+=\s+(?P<result>-?\d+|\?)")
FD_PATH = re.compile(r"^(?P<fd>-?\d+|AT_FDCWD)<(?P<path>[^>]*)>")
QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def classify(path: str, roots: dict[str, str]) -> str | None:
    for category, root in roots.items():
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return category
    return None


def syscall_paths(name: str, args: str) -> list[str]:
    """The paths a syscall line touches: the ``<path>`` strace -y puts after descriptors, and
    quoted path arguments (relative ones joined to their dirfd's path)."""
    parts = [part.strip() for part in split_args(args)]
    paths = []
    fd_path = None
    for part in parts:
        match = FD_PATH.match(part)
        if match:
            fd_path = match.group("path")
            if match.group("fd") != "AT_FDCWD":
                paths.append(fd_path)
            continue
        quoted = QUOTED.fullmatch(part)
        if quoted and name not in READ_CALLS and name not in ("write", "pwrite64", "connect"):
            value = quoted.group(1)
            if value.startswith("/") and fd_path and "RESOLVE_IN_ROOT" in args:
                paths.append(fd_path + value)  # openat2 inside a root (the container's): not the host path
            elif value.startswith("/"):
                paths.append(value)
            elif value and fd_path:
                paths.append(os.path.join(fd_path, value))
    return paths


def split_args(args: str) -> list[str]:
    """Top-level comma-separated arguments of a strace argument list (quotes, braces, brackets)."""
    parts, depth, current, quoted, escaped = [], 0, [], False, False
    for char in args:
        if quoted:
            current.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            continue
        if char == '"':
            quoted = True
        elif char in "{[(":
            depth += 1
        elif char in "}])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


CHILD = re.compile(r"^(?:clone|clone3|fork|vfork)\(.*\)\s+=\s+(\d+)")


def subtree(trace_files: list[Path], marker: str) -> list[Path]:
    """The trace files (``-ff``: one per pid) of the first process whose execve names ``marker``
    and of all its descendants (from the clone results in each parent's file)."""
    by_pid = {int(path.suffix[1:]): path for path in trace_files}
    children: dict[int, list[int]] = {}
    root = None
    for pid, path in by_pid.items():
        for raw in path.read_text(errors="replace").splitlines():
            match = CHILD.match(raw)
            if match:
                children.setdefault(pid, []).append(int(match.group(1)))
            elif root is None and raw.startswith("execve(") and marker in raw:
                root = pid
    found, todo = [], [root] if root is not None else []
    while todo:
        pid = todo.pop()
        if pid in by_pid:
            found.append(by_pid[pid])
        todo.extend(children.get(pid, []))
    return found


def count_trace(trace_files: list[Path], roots: dict[str, str], registry_port: int) -> tuple[dict, int]:
    """{category: Counter(kind -> n)} and the number of connect() calls to the registry port."""
    counts: dict[str, Counter] = {category: Counter() for category in roots}
    connects = 0
    for trace in trace_files:
        for raw in trace.read_text(errors="replace").splitlines():
            match = LINE.match(raw)
            if not match:
                continue
            name, args, result = match.group("name"), match.group("args"), match.group("result")
            if name == "connect":
                if f"sin_port=htons({registry_port})" in args or f":{registry_port}]" in args:
                    connects += 1
                continue
            paths = syscall_paths(name, args)
            if name in COPY_CALLS:  # sendfile(out, in, ...): bytes read from the source's category
                source = classify(paths[1], roots) if len(paths) > 1 else None
                if source is not None:
                    counts[source]["read calls"] += 1
                    counts[source]["bytes read"] += int(result) if result.isdigit() else 0
                continue
            categories = {classify(path, roots) for path in paths} - {None}
            for category in categories:
                counter = counts[category]
                if name in OPEN_CALLS:
                    counter["open"] += 1
                elif name in STAT_CALLS and (name in ("fstat", "fstatfs") or '""' in args):
                    counter["fstat"] += 1  # of a file already open: no path lookup
                elif name in STAT_CALLS:
                    counter["stat"] += 1
                elif name in LIST_CALLS:
                    counter["list"] += 1
                elif name == "flock" or (name in ("fcntl", "fcntl64") and any(f in args for f in LOCK_FCNTL)):
                    counter["lock"] += 1
                elif name in CHANGE_CALLS:
                    counter["change"] += 1
                elif name in READ_CALLS:
                    counter["read calls"] += 1
                    if result.isdigit():
                        counter["bytes read"] += int(result)
    return counts, connects


class Case:
    def __init__(self, label: str, config_extra: str, prepare=None) -> None:
        self.label = label
        self.config_extra = config_extra
        self.prepare = prepare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="untraced runs for the CPU figures")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if os.getuid() != 0:
        parser.error("run as root (strace -u runs the unprivileged user; it starts a registry)")
    if not Path(STRACE).exists():
        parser.error("strace is not installed (apt-get install strace)")
    command = "python3 bench/store_ops.py " + " ".join(sys.argv[1:])
    sections = [c.report_header("Shared-filesystem operations and registry traffic of one node's job start "
                                "(issue 10, target 6)", command.strip())]
    c.ensure_cache_readable()
    user = c.BenchUser.lookup()
    image = c.debian_image()
    workdir = user.tempdir("berth-bench-storeops-", Path("/tmp"))
    results: list[tuple[str, dict, int, int]] = []
    pull_requests = 0
    blob_gets: dict[str, int] = {}
    cpu: dict[str, c.Sample] = {}
    try:
        with c.Registry(c.registry_storage()) as registry:
            c.ensure_pushed(registry, [image])
            store = workdir / "store"
            config_dir = c.berth_config_dir(user, [registry.host], workdir)
            site_toml = (config_dir / "berth.toml").read_text()
            state = workdir / "state"
            env = c.berth_env(config_dir, store, state)
            env.update({"BERTH_SITE_STORE": str(workdir / "site-store"), "XDG_CONFIG_HOME": str(workdir / "xdg"),
                        "BERTH_JOBS_DIR": str(workdir / "jobs")})
            ref = image.ref(registry)

            def registry_requests() -> int:
                text = registry.log_path.read_text(errors="replace")
                return text.count('"GET /v2/') + text.count('"HEAD /v2/')

            user.run([str(c.BERTH), "pull", ref], env=env)
            pull_requests = registry_requests()  # the access log works: the pull shows in it
            sqfs_bytes = sum(p.stat().st_size for p in store.rglob("*.sqfs"))
            step_env = {**env, "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}
            roots = {"store": str(store), "site store": str(workdir / "site-store"), "config": str(config_dir),
                     "jobs": str(workdir / "jobs"), "home": str(user.home), "xdg config": str(workdir / "xdg"),
                     "state": str(state), "fresh store": str(workdir / "fresh-store"),
                     "fresh store 2": str(workdir / "fresh-store-2"), "berth install": str(c.VENV),
                     "berth source": str(c.REPO / "src"),
                     "python stdlib": STDLIB}

            def set_config(extra: str) -> None:
                (config_dir / "berth.toml").write_text(extra + site_toml)  # top-level keys before tables

            def traced(label: str, argv_tail: list[str] | None = None, marker: str | None = None) -> None:
                traces = workdir / "trace"
                c.rm_tree(traces)
                traces.mkdir()
                os.chown(traces, user.uid, user.gid)
                before = registry_requests()
                blobs_before = registry.blob_gets()
                full_env = user.env(**step_env)
                argv = [STRACE, "-u", user.name, "-f", "-ff", "-qq", "-y", "-s", "256", "-e", f"trace={TRACED}",
                        "-o", str(traces / "t"), "env", "-i", *[f"{k}={v}" for k, v in full_env.items()],
                        *(argv_tail or [str(c.BERTH), "run", ref, "/bin/true"])]
                Path(full_env["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)
                os.chown(full_env["XDG_RUNTIME_DIR"], user.uid, user.gid)
                c.run(argv, cwd=str(workdir))
                requests = registry_requests() - before
                blobs = registry.blob_gets() - blobs_before
                files = sorted(traces.iterdir())
                if marker:
                    files = subtree(files, marker)
                    if not files:
                        raise RuntimeError(f"{label}: no process ran {marker!r}")
                counts, connects = count_trace(files, roots, registry.port)
                results.append((label, counts, requests, connects))
                blob_gets[label] = blobs

            # 1. the image mounted from the store (the default), warm: a first run settles caches
            set_config("")
            user.run([str(c.BERTH), "run", ref, "/bin/true"], env=step_env)
            traced("mount from the store (default)")
            # 2. stage_to_local: the first start on a node copies the SquashFS, later ones reuse it
            set_config("stage_to_local = true\n")
            c.rm_tree(state / "images")
            traced("stage_to_local, first start on the node (copies)")
            traced("stage_to_local, copy already on the node")
            set_config("")
            # 3. the first node's job runner (berth job-exec: record, image, container, script), of
            # a local job: the traced submit's detached runner and everything below it
            script = workdir / "job.sh"
            script.write_text("#!/bin/sh\ntrue\n")
            script.chmod(0o755)
            traced("job runner on the first node (local backend's berth job-exec, script in the container)",
                   [str(c.BERTH), "submit", "--backend", "local", "--image", ref, "-o", str(workdir / "job.out"),
                    str(script)], marker="job-exec")
            # 4. an image in no store, NODES "nodes" starting at once (each with its own node-local
            # state directory, one user store on the "shared" filesystem): as separate processes
            # every node pulls; as the nodes of one Slurm step, node 0 pulls and the others wait
            for label, step_vars, store_name in (
                    (f"image in no store, {NODES} nodes at once, not one step (each pulls)", "", "fresh-store"),
                    (f"image in no store, {NODES} nodes of one step (node 0 pulls)",
                     f"SLURM_STEP_NUM_NODES={NODES}", "fresh-store-2")):
                nodes_argv = " ".join(
                    f"BERTH_STATE_DIR={state}-{store_name}-n{i} SLURM_NODEID={i} {step_vars} "
                    f"{c.BERTH} run {ref} /bin/true &" for i in range(NODES))
                traced(label, ["sh", "-c", f"export BERTH_USER_STORE={workdir / store_name}; {nodes_argv} wait"])
            # CPU of the whole per-node tree, untraced
            for label, argv in (("berth run IMAGE /bin/true", [str(c.BERTH), "run", ref, "/bin/true"]),
                                ("bare /bin/true", ["/bin/true"])):
                for _ in range(args.runs):
                    out = user.run([str(TREECPU), *argv], env=step_env).stdout
                    fields = [line.split() for line in out.splitlines() if line.startswith("treecpu ")][-1]
                    cpu.setdefault(label + ": CPU (user + system)", c.Sample()).add(float(fields[1]) + float(fields[2]))
                    cpu.setdefault(label + ": wall", c.Sample()).add(float(fields[3]))
    finally:
        c.rm_tree(workdir)

    sections.append(f"- image: {image.name} (debootstrap minbase), SquashFS {sqfs_bytes / 1e6:.1f} MB; command "
                    "`berth run IMAGE /bin/true` as berthtest with SLURM_JOB_ID/SLURM_STEP_ID set, traced with "
                    f"`strace -u berthtest -f -ff -y -e trace={TRACED}` (root tracer: fusermount3 stays setuid)")
    sections.append("")
    categories = ["store", "fresh store", "fresh store 2", "site store", "config", "jobs", "home", "xdg config",
                  "state", "berth install", "berth source", "python stdlib"]
    rows = []
    for label, counts, requests, connects in results:
        for category in categories:
            counter = counts.get(category, Counter())
            if not sum(counter.values()):
                continue
            rows.append([label, category, *[str(counter.get(kind, 0)) for kind in KINDS]])
        rows.append([label, "registry", f"{requests} requests in its access log ({blob_gets.get(label, 0)} blob GETs)",
                     f"{connects} connect() to it",
                     "", "", "", "", "", ""])
    sections.append(c.markdown_table(["case", "where", *KINDS], rows))
    sections.append("")
    sections.append(c.markdown_table(["per node, untraced (bench/treecpu.py)", "ms: median (min–max)"],
                                     [[label, sample.cell("ms")] for label, sample in cpu.items()]))
    shared = {label: counts for label, counts, _, _ in results}
    default = shared.get("mount from the store (default)", {})
    ops = sum(v for k, v in default.get("store", Counter()).items() if k not in ("bytes read", "read calls", "fstat"))
    sections.append("")
    sections.append(f"- per-node metadata operations by path on the store (open, stat, list, lock, change), default "
                    f"case: {ops} "
                    f"({default.get('store', Counter()).get('lock', 0)} locks); bytes read from the store: "
                    f"{default.get('store', Counter()).get('bytes read', 0)}")
    warm = [result for result in results if not result[0].startswith("image in no store")]
    total_requests = sum(r for _, _, r, _ in warm) + sum(n for _, _, _, n in warm)
    sections.append(f"- registry traffic during the traced job starts of a stored image: {total_requests} requests "
                    "and connects "
                    f"({'target zero met' if total_requests == 0 else 'target zero NOT met'}); the same access log "
                    f"shows the {pull_requests} requests of the pull before them")
    c.emit_report(sections, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
