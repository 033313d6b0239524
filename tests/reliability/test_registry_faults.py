"""Scenario 1 of issue 8: pulls through a proxy that injects registry faults (5xx bursts, 429
with Retry-After, resets and truncations mid-blob, wrong bytes, a slow drip, a stall longer than
the client timeout, a redirect to a dead blob store). Every pull either completes with the
right image or fails with a clear message; no corrupt image is ever published; a retry after
the fault completes without fetching again a blob that was already verified."""

from __future__ import annotations

import random

import pytest

from tests.harness.faultproxy import FAULT_KINDS, FaultProxy
from tests.harness.storetest import stores, via  # noqa: F401 - fixtures
from tests.harness.users import describe
from tests.reliability.helpers import blob_name, clean_failure, drop, fresh_stores, image_ok, verify

pytestmark = pytest.mark.integration

#: The client gives up on a silent connection after this long (BERTH_REGISTRY_TIMEOUT), so a
#: stall of STALL_S is "longer than the client timeout".
CLIENT_TIMEOUT_S = 2
STALL_S = 4.0


@pytest.fixture
def fault_proxy(registry):
    proxy = FaultProxy(registry.host, stall_s=STALL_S, seed=8).start()
    yield proxy
    proxy.stop()


def pull_trial(stores, proxy: FaultProxy, image, name: str, result) -> str:
    """One pull under whatever faults ``proxy`` is set to inject; the outcome is recorded."""
    trial = fresh_stores(stores, name, BERTH_REGISTRY_TIMEOUT=str(CLIENT_TIMEOUT_S))
    ref = via(proxy, image)
    try:
        before = len(proxy.injected)
        pulled = trial.berth("pull", "--insecure", "--json", ref, timeout=600)
        for kind, _path in proxy.injected[before:]:
            result.faults[kind] += 1
        good, damage = verify(trial)
        if not good:
            result.outcome("corrupt", f"{name}: store does not verify: {damage}\n{describe(pulled)}")
            return "corrupt"
        if pulled.returncode == 0:
            if '"digest": "' + image.digest not in pulled.stdout or not image_ok(trial, image.digest):
                result.outcome("corrupt", f"{name}: wrong image\n{describe(pulled)}")
                return "corrupt"
            result.outcome("recovered")
            return "recovered"
        if not clean_failure(pulled):
            result.outcome("unclean", f"{name}: {describe(pulled)}")
            return "unclean"
        # The retry, faults off: completes, and fetches no blob that was verified already.
        stored = trial.blobs()
        saved = (proxy.probability, list(proxy.queue))
        proxy.probability, proxy.queue = 0.0, []
        proxy.reset()
        try:
            again = trial.berth("pull", "--insecure", "--json", ref, timeout=600)
        finally:
            proxy.probability, proxy.queue = saved
        refetched = [p for _m, p, _r in proxy.blob_gets() if blob_name(p) in stored]
        good, damage = verify(trial)
        if again.returncode != 0 or refetched or not good or not image_ok(trial, image.digest):
            result.outcome("unclean", f"{name}: retry: refetched {refetched}, verify {damage}\n"
                           f"{describe(pulled)}\n{describe(again)}")
            return "unclean"
        result.outcome("failed cleanly")
        return "failed cleanly"
    finally:
        drop(trial)


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_kind_recovers_or_fails_cleanly(stores, fault_proxy, busybox_image, campaign, kind):
    """Short run: each kind once on a blob GET (5xx as a burst of 3); the resumable faults must
    be recovered from by the pull itself, not just fail cleanly."""
    result = campaign.results.get("1") or campaign.scenario("1", "registry faults during pulls", 200)
    # A body fault waits in the queue for the first blob GET (the manifest goes through).
    fault_proxy.queue = [kind]
    fault_proxy.burst = 3
    outcome = pull_trial(stores, fault_proxy, busybox_image, f"kind-{kind}", result)
    campaign.finish(result)
    assert outcome in ("recovered", "failed cleanly"), result.failures[-1]
    expected = "failed cleanly" if kind == "corrupt" else "recovered"
    assert outcome == expected, (kind, fault_proxy.injected)
    assert fault_proxy.faults(kind), f"no {kind} fault was injected: {fault_proxy.injected}"


def test_random_fault_mix(stores, fault_proxy, busybox_image, campaign):
    """Faults drawn at random on a third of the manifest and blob GETs, several per pull."""
    result = campaign.results.get("1") or campaign.scenario("1", "registry faults during pulls", 200)
    trials = campaign.trials(4, 200 - len(FAULT_KINDS))
    fault_proxy.probability = 0.35
    rng = random.Random(2026)
    for n in range(trials):
        fault_proxy.burst = rng.choice((1, 2, 3))
        pull_trial(stores, fault_proxy, busybox_image, f"mix-{n}", result)
    campaign.finish(result)
    result.figures["fault probability per GET"] = "0.35 (5xx bursts of 1-3)"
    result.figures["client timeout / stall"] = f"{CLIENT_TIMEOUT_S} s / {STALL_S:g} s"
    assert result.outcomes["corrupt"] == 0, result.failures
    assert result.bad == 0, result.failures


def test_a_blob_that_trickles_is_resumed_not_waited_on_for_good(stores, registry, busybox_image):
    """A registry that sends a byte every quarter second is never silent for the read timeout:
    the pull waited as long as the registry kept trickling (for good, for a hostile one). The
    stall rule (berth.retry.StallWatch: under 64 KiB in registry_timeout_s) cuts it, and the
    one retry rule resumes the blob where it stopped."""
    import time

    proxy = FaultProxy(registry.host, seed=8, trickle_s=300.0).start()
    trial = fresh_stores(stores, "trickle", BERTH_REGISTRY_TIMEOUT=str(CLIENT_TIMEOUT_S))
    try:
        proxy.queue = ["trickle"]
        started = time.monotonic()
        pulled = trial.berth("pull", "--insecure", "--json", via(proxy, busybox_image), timeout=120)
        took = time.monotonic() - started
        assert proxy.faults("trickle"), proxy.injected
        assert pulled.returncode == 0, describe(pulled)
        assert image_ok(trial, busybox_image.digest) and verify(trial)[0]
        assert took < 60, took
    finally:
        proxy.stop()
        drop(trial)
