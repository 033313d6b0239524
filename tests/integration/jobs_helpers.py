"""Helpers shared by the local and Slurm job tests: submit as the test user, wait for states."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.harness.users import describe

#: A job that says where it runs and writes into its submit directory (issue 9 defect 1).
HOME_SCRIPT = """\
    #!/bin/sh
    #BERTH -o home-%j.txt
    echo "home=$HOME cwd=$(pwd)"
    echo written > result.txt
"""


def submit(user, site, cwd: Path, *args: str, env: dict | None = None) -> str:
    """``berth submit ARGS`` as the test user in ``cwd``; returns the job id."""
    result = user.berth("submit", *args, cwd=str(cwd), env={**site.env, **(env or {})})
    assert result.returncode == 0, describe(result)
    job_id = result.stdout.strip()
    assert job_id.isdigit(), describe(result)
    return job_id


def jobs(user, site, env: dict | None = None) -> dict[str, dict]:
    result = user.berth("jobs", "--json", env={**site.env, **(env or {})})
    assert result.returncode == 0, describe(result)
    return {job["id"]: job for job in json.loads(result.stdout)}


def wait_for(user, site, ids, states, *, timeout_s: float = 60, env: dict | None = None,
             poll_s: float = 0.5) -> dict[str, dict]:
    """Poll ``berth jobs --json`` until every job in ``ids`` is in one of ``states``."""
    deadline = time.monotonic() + timeout_s
    ids = list(ids)
    while True:
        current = jobs(user, site, env)
        if all(current.get(i, {}).get("state") in states for i in ids):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs {ids} did not reach {states} in {timeout_s} s: "
                                 + json.dumps({i: current.get(i) for i in ids}, indent=1))
        time.sleep(poll_s)


def record_count(site) -> int:
    return len([p for p in os.listdir(site.jobs_dir) if p.isdigit()]) if site.jobs_dir.exists() else 0


def wait_file(path: Path, timeout_s: float = 30, contains: str = "") -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
            if contains in text:
                return text
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear (with {contains!r}) within {timeout_s} s")
