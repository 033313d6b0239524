"""bench/RESULTS.md's "Targets at a glance" is made by bench/run_all.py from the sections below
it; sections gain reports by hand too (a before/after pair, a rerun), so the glance must follow
the sections, not the last run_all run: it named a staging line written by hand and jobs_start
lines three hours older than the section's newest report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run_all():
    spec = importlib.util.spec_from_file_location("bench_run_all", BENCH / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_glance_is_the_one_its_sections_give():
    run_all = _run_all()
    text = (BENCH / "RESULTS.md").read_text()
    assert run_all.with_glance(text) == text, "run `python3 bench/run_all.py --glance`"


def test_each_target_takes_its_newest_reports_verdict_wherever_it_stands():
    run_all = _run_all()
    section = "\n".join([
        "### before", "- command: `x --before`", "- date: 2026-12-03 15:06 UTC",
        "- target flat in node count: 1.72, NOT met", "- target per node < 100 ms: 208 ms, NOT met", "",
        "### after", "- command: `x`", "- date: 2026-12-03 15:09 UTC",
        "- target flat in node count: 1.42, NOT met", "",
        "#### Reading it", "- Why the targets are still missed: the target needs a compiled launcher", "",
        "### older, listed last", "- command: `x --runs 5`", "- date: 2026-12-03 12:48 UTC",
        "- target flat in node count: 2.24, NOT met", "- target by CPU: 0.93, met",
    ])
    assert run_all.newest_targets(section) == [
        "- (2026-12-03 15:09) target flat in node count: 1.42, NOT met",
        "- (2026-12-03 15:06) target per node < 100 ms: 208 ms, NOT met",
        "- (2026-12-03 12:48) target by CPU: 0.93, met",
    ]
