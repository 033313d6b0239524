"""A missing image in a Slurm step of several nodes is pulled by the step's node 0 only; the
other nodes wait for it without locks, and stop as soon as node 0 records that its pull failed
(docs/scale.md: N nodes pulling at once make N registry pulls and N waiters on the store's
lock on the shared filesystem)."""

from __future__ import annotations

import os
import types

import pytest

from berth.cli.run import resolve_image, step_pull_role
from berth.errors import NotFound, RegistryUnreachable
from berth.image import api


def step(nodes: str, node: str, **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_NODES": nodes, "SLURM_NODEID": node,
            **extra}


def test_node_0_of_a_multi_node_step_pulls_and_the_others_wait():
    assert step_pull_role({}) is None  # not in Slurm
    assert step_pull_role({"SLURM_JOB_ID": "12", "SLURM_NODEID": "1", "SLURM_NNODES": "4"}) is None  # batch
    assert step_pull_role(step("1", "0")) is None
    assert step_pull_role(step("4", "0")) == ("pull", "12.3")
    assert step_pull_role(step("4", "3")) == ("wait", "12.3")
    assert step_pull_role(step("4", "x")) is None and step_pull_role(step("", "2")) is None  # unknown: pull
    assert step_pull_role(step("4", "3", SLURM_JOB_ID="../x")) is None  # ids name a file: plain words only


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def settings_in(tmp_path, timeout_s: int = 600):
    return types.SimpleNamespace(lock_timeout_s=timeout_s, user_store=tmp_path / "store",
                                 site_store=tmp_path / "site")


def wait(settings, clock):
    return api.wait_for_image(settings, "x:1", step="12.3", sleep=clock.sleep, clock=lambda: clock.now,
                              wall_clock=lambda: 1_000_000.0 + clock.now)


def test_a_waiting_node_reads_the_stores_until_the_image_is_there(monkeypatch, tmp_path):
    image = object()
    answers = iter([None, None, None, image])
    monkeypatch.setattr(api, "find_image", lambda settings, ref: next(answers))
    clock = Clock()
    assert wait(settings_in(tmp_path), clock) is image
    assert clock.sleeps == [0.2, 0.4, 0.8]  # backing off


def test_a_waiting_node_gives_up_after_lock_timeout_naming_the_puller(monkeypatch, tmp_path):
    monkeypatch.setattr(api, "find_image", lambda settings, ref: None)
    clock = Clock()
    with pytest.raises(NotFound) as raised:
        wait(settings_in(tmp_path, 30), clock)
    assert clock.now == 30 and max(clock.sleeps) == 5.0
    assert "did not appear" in raised.value.message and "node 0 of Slurm step 12.3" in raised.value.message
    assert "berth pull x:1" in raised.value.hint


def test_a_failed_pull_of_node_0_stops_the_waiting_nodes_at_once(monkeypatch, tmp_path):
    settings = settings_in(tmp_path)

    def refuse(settings, ref):
        raise RegistryUnreachable("cannot reach registry.example: connection refused")

    monkeypatch.setattr(api, "pull", refuse)
    with pytest.raises(RegistryUnreachable):
        api.pull_for_step(settings, "x:1", step="12.3")
    marker = tmp_path / "store" / "tmp" / "step-pull-12.3.failed"
    assert marker.read_text() == "cannot reach registry.example: connection refused"

    monkeypatch.setattr(api, "find_image", lambda settings, ref: None)
    clock = Clock()
    os.utime(marker, (1_000_000.0, 1_000_000.0))
    with pytest.raises(NotFound) as raised:
        wait(settings, clock)
    assert clock.now == 0  # no waiting at all
    assert "node 0 of Slurm step 12.3 could not pull it: cannot reach registry.example" in raised.value.message

    # an earlier cluster's job with the same id left one long ago: not this step's
    os.utime(marker, (1_000_000.0 - 3600, 1_000_000.0 - 3600))
    with pytest.raises(NotFound, match="did not appear"):
        wait(settings_in(tmp_path, 1), Clock())


def test_resolve_image_waits_or_pulls_by_the_nodes_role(monkeypatch):
    calls = []
    monkeypatch.setattr(api, "find_image", lambda settings, ref: None)
    monkeypatch.setattr(api, "wait_for_image", lambda settings, ref, step: calls.append(("wait", step)) or "w")
    monkeypatch.setattr(api, "pull_for_step", lambda settings, ref, step: calls.append(("pull", step)) or "p")
    monkeypatch.setattr(api, "get_image",
                        lambda settings, ref, pull_missing: calls.append(("get", pull_missing)) or "g")
    for name, value in step("2", "1").items():
        monkeypatch.setenv(name, value)
    assert resolve_image(None, "x:1", "missing") == "w"
    assert resolve_image(None, "x:1", "never") == "g"  # never: the store's own "not found"
    monkeypatch.setenv("SLURM_NODEID", "0")
    assert resolve_image(None, "x:1", "missing") == "p"
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "1")
    assert resolve_image(None, "x:1", "missing") == "g"
    assert calls == [("wait", "12.3"), ("get", False), ("pull", "12.3"), ("get", True)]
