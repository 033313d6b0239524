"""Parsing documents berth does not control, with limits (berth.untrusted; issue 12 #5).

Python's JSON and TOML parsers recurse: deep nesting raised RecursionError, a traceback on
every command for a user TOML file, on `berth pull` for an image config. Each parser of
outside input is tried here with nesting far past the recursion limit and just past berth's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from berth.config.load import load_settings
from berth.config.templates import read_template_file
from berth.errors import ConfigError, ImageError, JobError, RegistryError, StoreError
from berth.jobs.records import JobRecord
from berth.oci.digest import Digest
from berth.registry import auth
from berth.registry.client import Manifest
from berth.store.store import Store
from berth.untrusted import MAX_DEPTH, InvalidDocument, nesting_exceeds, parse_json

DEEP = 100_000


def _nested_json(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def _nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_documents_within_the_limits_parse_as_json_loads_does():
    text = json.dumps({"manifests": [{"platform": {"os": "linux", "features": ["x"]}}], "n": 1})
    assert parse_json(text, what="x") == json.loads(text)
    assert parse_json(text.encode(), what="x") == json.loads(text)
    assert parse_json(_nested_json(MAX_DEPTH), what="x") is not None


@pytest.mark.parametrize("text", [
    _nested_json(DEEP), _nested_objects(DEEP), _nested_json(MAX_DEPTH + 1), _nested_objects(MAX_DEPTH + 1),
    '{"a": [' * 300 + "]}" * 300, _nested_json(sys.getrecursionlimit() - 50),
])
def test_nesting_past_the_limit_is_refused_never_a_recursion_error(text):
    with pytest.raises(InvalidDocument) as caught:
        parse_json(text, what="the image config of x")
    assert str(caught.value) == f"the image config of x is nested more than {MAX_DEPTH} levels deep"


def test_size_syntax_and_number_limits_are_refused_with_the_document_named():
    with pytest.raises(InvalidDocument, match=r"^doc is 11 bytes, more than the 10 bytes berth accepts$"):
        parse_json(b'"123456789"', what="doc", max_bytes=10)
    with pytest.raises(InvalidDocument, match="^doc is not valid JSON: "):
        parse_json(b'{"a": ', what="doc")
    with pytest.raises(InvalidDocument, match="^doc is not valid JSON: "):
        parse_json(b"\xff\xfe\xfa", what="doc")
    with pytest.raises(InvalidDocument, match="^doc is not valid JSON: "):
        parse_json("1" * 5000, what="doc")


def test_the_caller_s_error_class_and_hint_are_raised():
    with pytest.raises(ImageError) as caught:
        parse_json(_nested_json(DEEP), what="the config", error=ImageError, hint="tell the maintainer")
    assert (caught.value.message, caught.value.hint) == (
        f"the config is nested more than {MAX_DEPTH} levels deep", "tell the maintainer")


def test_nesting_is_measured_without_recursion():
    value: list = []
    for _ in range(DEEP):
        value = [value]
    assert nesting_exceeds(value, MAX_DEPTH)
    assert not nesting_exceeds([[{"a": [1]}]], 4) and nesting_exceeds([[{"a": [1]}]], 3)
    assert not nesting_exceeds("scalar", 0)


# --- every parser of outside input ------------------------------------------------------------


def test_a_user_toml_file_nested_2000_deep_is_a_config_error(tmp_path):
    home = tmp_path / "home"
    user_file = home / ".config" / "berth" / "berth.toml"
    user_file.parent.mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    environ = {"HOME": str(home), "BERTH_CONFIG_DIR": str(tmp_path / "etc")}
    for text in ("pinned = " + _nested_json(2000) + "\n",
                 "pinned = " + _nested_json(MAX_DEPTH + 1) + "\n",
                 "x = " + "{a = " * 2000 + "1" + "}" * 2000 + "\n",
                 "[" + ".".join(["a"] * 200) + "]\nb = 1\n"):
        user_file.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_settings(None, environ=environ)
        assert caught.value.message == f"{user_file}: values nested more than {MAX_DEPTH} levels deep"


def test_an_oversized_toml_file_is_refused(tmp_path):
    path = tmp_path / "etc" / "berth.toml"
    path.parent.mkdir()
    path.write_text("# padding\n" * 500_000)
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        load_settings(None, environ={"HOME": str(tmp_path), "BERTH_CONFIG_DIR": str(path.parent)})


def test_a_configuration_file_that_is_a_fifo_is_refused_without_waiting(tmp_path):
    """The user's berth.toml is read by every berth command, and a container that sees the home
    directory can put a FIFO there: every command of the user's then waited in open() for good."""
    import os
    import threading

    home = tmp_path / "home"
    user_file = home / ".config" / "berth" / "berth.toml"
    user_file.parent.mkdir(parents=True)
    os.mkfifo(user_file)
    outcome: list = []

    def load():
        try:
            outcome.append(load_settings(None, environ={"HOME": str(home), "BERTH_CONFIG_DIR": str(tmp_path / "etc")}))
        except ConfigError as error:
            outcome.append(error)
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(user_file, os.O_WRONLY | os.O_NONBLOCK))  # let it go
        thread.join(10)
        pytest.fail("loading the settings waited on a FIFO planted as berth.toml")
    [error] = outcome
    assert isinstance(error, ConfigError), error
    assert error.message == f"configuration file {user_file} is not a regular file (a FIFO, socket or device)"


def test_a_template_file_nested_deep_is_a_config_error(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('image = "busybox"\ncpu = 1\nmemsz = "1G"\ncomment = ' + _nested_json(2000) + "\n")
    with pytest.raises(ConfigError, match="nested more than"):
        read_template_file(path, "t")


def test_an_auth_file_nested_deep_is_a_config_error(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text('{"auths": ' + _nested_objects(DEEP) + "}")
    with pytest.raises(ConfigError) as caught:
        auth.read_auth_file(path)
    assert caught.value.message == f"registry credentials file {path} is nested more than {MAX_DEPTH} levels deep"


def test_a_registry_manifest_nested_deep_is_a_registry_error():
    data = _nested_objects(DEEP).encode()
    manifest = Manifest(data, "application/vnd.oci.image.manifest.v1+json", Digest.of(data))
    with pytest.raises(RegistryError, match="nested more than"):
        manifest.json()


def test_a_store_index_nested_deep_is_a_store_error(tmp_path):
    store = Store(tmp_path / "store")
    store.layout.index.parent.mkdir(parents=True, exist_ok=True)
    store.layout.index.write_text(_nested_json(DEEP))
    with pytest.raises(StoreError, match="nested more than"):
        store.read_index()


def test_a_job_record_nested_deep_is_a_job_error(tmp_path):
    record = JobRecord(tmp_path / "7")
    record.path.mkdir()
    record.spec_file.write_text(_nested_objects(DEEP))
    with pytest.raises(JobError, match=r"job 7: its record .* is damaged \(spec.json is nested more than"):
        record.read_spec()
    record.state_file.write_text(_nested_json(DEEP))
    assert record.read_result() is None  # a damaged state reads as "no state yet", as before


def test_no_parser_of_berth_calls_json_loads_itself():
    """One helper: a new json.loads in src/ would bypass the limits (issue 12 #5)."""
    source = Path(__file__).resolve().parents[2] / "src" / "berth"
    offenders = [str(path.relative_to(source)) for path in source.rglob("*.py")
                 if path.name != "untrusted.py" and ("json.loads(" in path.read_text() or "json.load(" in path.read_text())]
    assert offenders == []


def test_read_json_object_gives_the_object_or_nothing(tmp_path):
    """berth's own state records: a half-written, hostile or missing file means "no record"."""
    from berth.untrusted import read_json_object

    record = tmp_path / "info.json"
    assert read_json_object(record) == {}  # missing
    record.write_text('{"pid": 12}')
    assert read_json_object(record) == {"pid": 12}
    record.write_text('{"pid": 1')  # cut by a kill
    assert read_json_object(record) == {}
    record.write_text("[1, 2]")  # not an object
    assert read_json_object(record) == {}
    record.write_text("[" * 100_000 + "]" * 100_000)  # nested past the limit, no RecursionError
    assert read_json_object(record) == {}
