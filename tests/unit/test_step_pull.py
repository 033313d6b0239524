"""A missing image in a Slurm step of several nodes is pulled by the step's node 0 only; the
other nodes wait for it without locks (docs/scale.md: N nodes pulling at once make N registry
pulls and N waiters on the store's lock on the shared filesystem)."""

from __future__ import annotations

import types

import pytest

from berth.cli.run import resolve_image, step_puller
from berth.errors import NotFound
from berth.image import api


def step(nodes: str, node: str, **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_NODES": nodes, "SLURM_NODEID": node,
            **extra}


def test_only_the_other_nodes_of_a_multi_node_step_wait():
    assert step_puller({}) is None  # not in Slurm
    assert step_puller({"SLURM_JOB_ID": "12", "SLURM_NODEID": "1", "SLURM_NNODES": "4"}) is None  # batch script
    assert step_puller(step("1", "0")) is None
    assert step_puller(step("4", "0")) is None  # node 0 pulls
    assert step_puller(step("4", "3")) == "node 0 of Slurm step 12.3"
    assert step_puller(step("4", "x")) is None and step_puller(step("", "2")) is None  # unknown: pull


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_waiting_node_reads_the_stores_until_the_image_is_there(monkeypatch):
    image = object()
    answers = iter([None, None, None, image])
    monkeypatch.setattr(api, "find_image", lambda settings, ref: next(answers))
    clock = Clock()
    settings = types.SimpleNamespace(lock_timeout_s=600, user_store="/u", site_store="/s")
    assert api.wait_for_image(settings, "x:1", puller="node 0", sleep=clock.sleep, clock=lambda: clock.now) is image
    assert clock.sleeps == [0.2, 0.4, 0.8]  # backing off


def test_a_waiting_node_gives_up_after_lock_timeout_naming_the_puller(monkeypatch):
    monkeypatch.setattr(api, "find_image", lambda settings, ref: None)
    clock = Clock()
    settings = types.SimpleNamespace(lock_timeout_s=30, user_store="/u", site_store="/s")
    with pytest.raises(NotFound) as raised:
        api.wait_for_image(settings, "x:1", puller="node 0 of Slurm step 12.3", sleep=clock.sleep,
                           clock=lambda: clock.now)
    assert clock.now == 30 and max(clock.sleeps) == 5.0
    assert "did not appear" in raised.value.message and "node 0 of Slurm step 12.3" in raised.value.message
    assert "berth pull x:1" in raised.value.hint


def test_resolve_image_waits_instead_of_pulling_on_other_nodes(monkeypatch):
    calls = []
    monkeypatch.setattr(api, "find_image", lambda settings, ref: None)
    monkeypatch.setattr(api, "wait_for_image", lambda settings, ref, puller: calls.append(("wait", puller)) or "w")
    monkeypatch.setattr(api, "get_image",
                        lambda settings, ref, pull_missing: calls.append(("get", pull_missing)) or "g")
    for name, value in step("2", "1").items():
        monkeypatch.setenv(name, value)
    assert resolve_image(None, "x:1", "missing") == "w"
    assert resolve_image(None, "x:1", "never") == "g"  # never: the store's own "not found"
    monkeypatch.setenv("SLURM_NODEID", "0")
    assert resolve_image(None, "x:1", "missing") == "g"
    assert calls == [("wait", "node 0 of Slurm step 12.3"), ("get", False), ("get", True)]
