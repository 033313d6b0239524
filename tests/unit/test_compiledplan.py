"""The compiled plans' key (berth.runtime.compiledplan): Python, which keeps the entry, and the
compiled front end ``berth``, which looks it up, must compute the same key from the same inputs,
and a different one when any input differs."""

from __future__ import annotations

import os
import subprocess

import pytest

from berth.runtime import compiledplan
from tests.harness.users import venv_dir

FRONT = venv_dir() / "bin" / "berth"


def _front_key(argv: list[str], env: dict[str, str], cwd) -> str:
    """The key the front end computes (its --print-key: argv is then only that option)."""
    del argv
    result = subprocess.run([str(FRONT), "--print-key"], env=env, cwd=cwd, capture_output=True, check=True)
    return result.stdout.decode().strip()


def _python_key(env: dict[str, str], cwd) -> str:
    """The key berth's Python computes for the same process inputs, in a child with them."""
    code = ("import os, sys; from berth.runtime import compiledplan as c; "
            f"print(c.compiled_key(os.path.realpath({str(FRONT)!r}), [b'--print-key'], dict(os.environb)))")
    result = subprocess.run([str(venv_dir() / "bin" / "python"), "-c", code], env=env, cwd=cwd,
                            capture_output=True, check=True)
    return result.stdout.decode().strip()


@pytest.mark.parametrize("env", [
    {"PATH": "/usr/bin:/bin"},
    {"PATH": "/usr/bin", "A": "1", "A0": "x", "AB": "", "LANG": "C.UTF-8", "ODD": "caf\u00e9 \u2603 = =", "Z": "\n"},
    {"PATH": "/usr/bin", "LANG": "C"},
    {"PATH": "/usr/bin", "LC_ALL": "C"},
    {"PATH": "/usr/bin", "PYTHONCOERCECLOCALE": "0"},
])
def test_python_and_the_front_end_compute_the_same_key(env, tmp_path):
    env = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
    assert _front_key([], env, tmp_path) == _python_key(env, tmp_path)


def test_every_input_changes_the_key(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    base = _front_key([], env, tmp_path)
    (tmp_path / "sub").mkdir()
    assert _front_key([], env, tmp_path / "sub") != base  # the working directory
    assert _front_key([], {**env, "X": "1"}, tmp_path) != base  # the environment
    assert _front_key([], {"PATH": "/usr/bin:/bin "}, tmp_path) != base  # a value


def test_the_material_is_length_prefixed_so_fields_cannot_run_together(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = compiledplan.key_material("/f", [b"a", b"bc"], {})
    two = compiledplan.key_material("/f", [b"ab", b"c"], {})
    assert one is not None and one != two
    assert b"2:ab" in two and b"1:c" in two


def test_fingerprints_are_written_as_the_front_end_writes_its_own():
    assert compiledplan.fingerprint_text(None) == "-"
    assert compiledplan.fingerprint_text(("error", 13)) == "e 13"
    assert compiledplan.fingerprint_text((1, 2, 16877, 0, 0)) == "1 2 16877 0 0"


def test_only_the_console_script_beside_a_front_end_compiles(tmp_path):
    assert compiledplan.front_end("/usr/lib/python3/berth/__main__.py") is None
    assert compiledplan.front_end(str(tmp_path / "berth-py")) is None  # no front end there
    front = tmp_path / "berth"
    front.write_bytes(b"\x7fELF")
    front.chmod(0o755)
    assert compiledplan.front_end(str(tmp_path / "berth-py")) == os.path.realpath(front)
