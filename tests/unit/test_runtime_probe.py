"""The OCI runtime probe and its cache (issue 9, defect 3): only definite verdicts are kept, each
is keyed by everything the probe depended on and expires, and a cached failure alone never
refuses a run."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from berth import proc
from berth.errors import RuntimeFailure
from berth.runtime import ocirt

RUNC = "/usr/bin/runc"


class FakeProbes:
    """Stands in for running a container: answers from a script of ProbeResult factories."""

    def __init__(self, monkeypatch, tmp_path: Path) -> None:
        self.calls: list[tuple[str, str]] = []
        self.answers: dict[str, list] = {}
        self.runtime_paths = {}
        for name in ocirt.RUNTIMES:
            path = tmp_path / "bin" / name
            path.parent.mkdir(exist_ok=True)
            path.write_text("#!/bin/sh\n")
            path.chmod(0o755)
            self.runtime_paths[name] = str(path)
        monkeypatch.setattr(proc, "find_program", self.find_program)
        monkeypatch.setattr(ocirt, "probe", self.probe)

    def find_program(self, name: str) -> str:
        if name not in self.runtime_paths:
            raise proc.ProgramNotFound(f"required program '{name}' is not installed")
        return self.runtime_paths[name]

    def probe(self, runtime: str, scratch: Path, init: str) -> ocirt.ProbeResult:
        self.calls.append((runtime, init))
        answer = self.answers.get(runtime, ["fails"])
        kind = answer.pop(0) if len(answer) > 1 else answer[0]
        path = self.runtime_paths[runtime]
        if kind == "works":
            return ocirt.ProbeResult(runtime, path, True, "a trivial rootless container ran")
        if kind == "timeout":
            return ocirt.ProbeResult(runtime, path, False, f"{runtime} did not answer", definite=False)
        if kind == "init":
            return ocirt.ProbeResult(runtime, path, False, "berth-init did not start", definite=False,
                                     init_failed=True)
        return ocirt.ProbeResult(runtime, path, False, f"{runtime} refuses this host")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    return FakeProbes(monkeypatch, tmp_path)


def make_init(tmp_path: Path, name: str = "berth-init", content: str = "static") -> str:
    path = tmp_path / name
    path.write_text(content)
    path.chmod(0o755)
    return str(path)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_timed_out_probe_is_not_remembered(fake, tmp_path):
    # a loaded node: runc's probe times out once, then works
    init = make_init(tmp_path)
    fake.answers = {"runc": ["timeout", "works"], "crun": ["fails"]}
    with pytest.raises(RuntimeFailure) as caught:
        ocirt.select_runtime(tmp_path, "runc", init)
    assert "nothing was remembered" in caught.value.hint
    assert ocirt.select_runtime(tmp_path, "runc", init) == fake.runtime_paths["runc"]
    assert ocirt.select_runtime(tmp_path, "runc", init) == fake.runtime_paths["runc"]
    assert fake.calls == [("runc", init), ("runc", init)]  # the success is cached, the timeout was not


def test_another_installations_failing_init_does_not_poison_this_one(fake, tmp_path, monkeypatch):
    good = make_init(tmp_path, "good-init")
    broken = make_init(tmp_path, "broken-init", "dynamic")

    def runc_probe(runtime, scratch, init):
        fake.calls.append((runtime, init))
        path = fake.runtime_paths[runtime]
        if runtime == "runc" and init == good:
            return ocirt.ProbeResult(runtime, path, True, "ran")
        return ocirt.ProbeResult(runtime, path, False, "exec failed")  # even if judged definite

    monkeypatch.setattr(ocirt, "probe", runc_probe)
    with pytest.raises(RuntimeFailure):
        ocirt.select_runtime(tmp_path, "auto", broken)
    assert ocirt.select_runtime(tmp_path, "auto", good) == fake.runtime_paths["runc"]
    assert ("runc", good) in fake.calls


def test_an_init_failure_points_at_berth_init_not_the_runtime(fake, tmp_path):
    init = make_init(tmp_path)
    fake.answers = {"runc": ["init"], "crun": ["init"]}
    with pytest.raises(RuntimeFailure) as caught:
        ocirt.select_runtime(tmp_path, "auto", init)
    assert caught.value.hint == ocirt.INIT_FIX and "libc6-dev" in caught.value.hint
    assert json.loads((tmp_path / ocirt.PROBE_FILE).read_text())["entries"] == {}


def test_replacing_berth_init_or_the_runtime_probes_again(fake, tmp_path):
    init = make_init(tmp_path)
    fake.answers = {"runc": ["works"]}
    ocirt.select_runtime(tmp_path, "runc", init)
    ocirt.select_runtime(tmp_path, "runc", init)
    assert len(fake.calls) == 1
    replacement = make_init(tmp_path, "new-init", "rebuilt, another size")
    os.replace(replacement, init)  # same path, another inode and size
    ocirt.select_runtime(tmp_path, "runc", init)
    assert len(fake.calls) == 2
    runc = Path(fake.runtime_paths["runc"])
    runc.write_text("#!/bin/sh\n# upgraded\n")
    ocirt.select_runtime(tmp_path, "runc", init)
    assert len(fake.calls) == 3


def test_a_cached_failure_is_probed_again_before_refusing(fake, tmp_path):
    # crun refused (definite, cached); the admin fixes the host: the next run must not need doctor
    init = make_init(tmp_path)
    fake.answers = {"crun": ["fails", "works"]}
    with pytest.raises(RuntimeFailure, match="crun refuses this host"):
        ocirt.select_runtime(tmp_path, "crun", init)
    assert ocirt.select_runtime(tmp_path, "crun", init) == fake.runtime_paths["crun"]
    assert len(fake.calls) == 2


def test_a_cached_failure_still_lets_auto_skip_to_a_working_runtime(fake, tmp_path):
    init = make_init(tmp_path)
    fake.answers = {"runc": ["fails"], "crun": ["works"]}
    for _ in range(3):
        assert ocirt.select_runtime(tmp_path, "auto", init) == fake.runtime_paths["crun"]
    assert fake.calls == [("runc", init), ("crun", init)]


@pytest.mark.parametrize("works, ttl", [(True, ocirt.WORKS_TTL_S), (False, ocirt.FAILS_TTL_S)])
def test_verdicts_expire(fake, tmp_path, works, ttl):
    init = make_init(tmp_path)
    clock = Clock()
    fake.answers = {"runc": ["works" if works else "fails"], "crun": ["works"]}
    cache = ocirt._ProbeCache(tmp_path, clock=clock)
    cache.result("runc", tmp_path, init)
    cache.save()
    clock.now += ttl - 1
    assert ocirt._ProbeCache(tmp_path, clock=clock).result("runc", tmp_path, init).cached
    clock.now += 2
    again = ocirt._ProbeCache(tmp_path, clock=clock)
    assert not again.result("runc", tmp_path, init).cached
    assert len(fake.calls) == 2


def test_a_cache_file_of_another_format_or_garbage_is_ignored(fake, tmp_path):
    init = make_init(tmp_path)
    fake.answers = {"runc": ["works"]}
    for text in ("not json", "[]", json.dumps({"runc": {"key": "x", "works": False, "reason": "old"}})):
        (tmp_path / ocirt.PROBE_FILE).write_text(text)
        assert ocirt.select_runtime(tmp_path, "runc", init) == fake.runtime_paths["runc"]
    assert len(fake.calls) == 3
    saved = json.loads((tmp_path / ocirt.PROBE_FILE).read_text())
    assert saved["format"] == ocirt.CACHE_FORMAT and len(saved["entries"]) == 1
    assert stat.S_IMODE((tmp_path / ocirt.PROBE_FILE).stat().st_mode) == 0o600


# -- probe() itself, with a fake runtime program: how an answer is classified ---------------------

def fake_runtime(tmp_path: Path, monkeypatch, script: str) -> str:
    program = tmp_path / "fake-runc"
    program.write_text("#!/bin/sh\ncase \"$3\" in delete) exit 0;; esac\n" + script)
    program.chmod(0o755)
    monkeypatch.setattr(proc, "find_program", lambda name: str(program))
    return str(program)


@pytest.mark.parametrize("script, works, definite, init_failed", [
    ('echo "berth-init 1"; exit 0\n', True, True, False),
    ('echo "cgroups in hybrid mode not supported" >&2; exit 1\n', False, True, False),
    ('echo "fork/exec: resource temporarily unavailable" >&2; exit 1\n', False, False, False),
    ('echo "cannot allocate memory"; exit 1\n', False, False, False),
    ('kill -9 $$\n', False, False, False),
    ('echo "exec /dev/.berth-init: no such file or directory" >&2; exit 1\n', False, False, True),
])
def test_probe_classifies_answers(tmp_path, monkeypatch, script, works, definite, init_failed):
    fake_runtime(tmp_path, monkeypatch, script)
    result = ocirt.probe("runc", tmp_path, make_init(tmp_path))
    assert (result.works, result.definite, result.init_failed) == (works, definite, init_failed), result
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("probe-")] == []


def test_a_probe_that_times_out_is_not_definite(tmp_path, monkeypatch):
    fake_runtime(tmp_path, monkeypatch, "sleep 5\n")
    monkeypatch.setattr(ocirt, "PROBE_TIMEOUT_S", 0.3)
    result = ocirt.probe("runc", tmp_path, make_init(tmp_path))
    assert not result.works and not result.definite and "within 0.3 s" in result.reason


def test_a_probe_whose_preparation_fails_is_not_definite(tmp_path, monkeypatch):
    fake_runtime(tmp_path, monkeypatch, "exit 0\n")
    result = ocirt.probe("runc", tmp_path / "missing-scratch", make_init(tmp_path))
    assert not result.works and not result.definite and "could not be probed" in result.reason
