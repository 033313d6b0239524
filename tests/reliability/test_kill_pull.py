"""Scenario 2 of issue 8: `kill -9` of `berth pull` at random moments and at every phase
boundary (a partial download appears, a blob is published, the conversion starts, the image
directory is published, the index is written). After each kill the store verifies with no
damage (only leftovers of the killed writer in tmp/), and the next pull completes."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.harness.storetest import proxy, stores, via, wait_for  # noqa: F401 - fixtures
from tests.harness.users import describe
from tests.reliability.helpers import drop, fresh_stores, image_ok, verify

pytestmark = pytest.mark.integration


def _phases(trial):
    root = trial.user_store

    def entries(name):
        path = root / name
        try:
            return list(path.iterdir())
        except OSError:
            return []

    return {
        "partial download": lambda: any(p.name.endswith(".partial") and p.stat().st_size > 0
                                        for p in entries("tmp")),
        "first blob published": lambda: bool(entries("blobs/sha256")),
        "conversion started": lambda: any(p.name.startswith("image-") for p in entries("tmp")),
        "image published": lambda: bool(entries("images")),
        "index written": lambda: (root / "index.json").exists(),
    }


def kill_trial(stores, proxy, image, name: str, result, *, phase: str | None, delay_s: float) -> None:
    trial = fresh_stores(stores, name)
    ref = via(proxy, image)
    try:
        proxy.blob_delay_s = 0.02
        process = trial.popen("pull", "--insecure", "-q", ref)
        if phase is not None:
            wait_for(_phases(trial)[phase], timeout_s=120, interval_s=0.001)
        else:
            time.sleep(delay_s)
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _out, err = process.communicate(timeout=60)
        killed = process.returncode == -signal.SIGKILL
        result.faults["kill -9 " + (f"at {phase}" if phase else "at a random time")
                      + ("" if killed else " (pull had finished)")] += 1
        good, damage = verify(trial)
        if not good:
            result.outcome("corrupt", f"{name} ({phase or delay_s}): {damage}")
            return
        proxy.blob_delay_s = 0
        again = trial.berth("pull", "--insecure", "--json", ref)
        good, damage = verify(trial)
        if again.returncode != 0 or not good or not image_ok(trial, image.digest):
            result.outcome("unclean", f"{name}: next pull: {describe(again)} verify: {damage}")
            return
        result.outcome("recovered")
    finally:
        proxy.blob_delay_s = 0
        drop(trial)


def test_kill_9_of_pull_at_every_phase_and_at_random(stores, proxy, busybox_image, campaign):
    result = campaign.scenario("2", "kill -9 of berth pull", 100)
    phases = list(_phases(stores))
    trials = campaign.trials(len(phases) + 2, 100)
    rng = random.Random(9)
    for n in range(trials):
        phase = phases[n % (len(phases) + 1)] if n % (len(phases) + 1) < len(phases) else None
        kill_trial(stores, proxy, busybox_image, f"kill-{n}", result, phase=phase,
                   delay_s=rng.uniform(0.0, 1.2))
    campaign.finish(result)
    result.figures["image"] = ("busybox (2 layers), blob download throttled (20 ms per 64 KiB); kills at a "
                               "uniformly random time in 0-1.2 s or when a phase boundary is seen on disk")
    assert result.bad == 0, result.failures
