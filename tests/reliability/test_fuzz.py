"""Scenario 8 of issue 8: fuzzing berth's parsers of hostile input with hypothesis. The only
exceptions that may come out of berth's API are BerthError subclasses (a message and a hint for
a person), never a traceback.

Targets: image references, template ``key=value`` words and template files, ``#BERTH``
directives, TOML configuration, manifests, indexes and image configs, tar headers (a valid
layer with bytes flipped and cut, through the flattener's pre-scan and its overlay pass into
/dev/null: the same code as a pull, without tar2sqfs). A few hundred cases per target in the
default run; 10,000 each with ``--campaign``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from berth.errors import BerthError

SHORT_CASES = 200
LONG_CASES = 10_000


def _run(campaign, name: str, strategy, body) -> None:
    """Run ``body`` on ``strategy``'s cases; count them into scenario 8."""
    result = campaign.results.get("8") or campaign.scenario("8", "fuzzing (per target)", 10_000)
    cases = campaign.trials(SHORT_CASES, LONG_CASES)
    counts = {"ok": 0, "berth error": 0}
    started = time.monotonic()

    @settings(max_examples=cases, deadline=None, database=None, derandomize=not campaign.long,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(case):
        try:
            body(case)
        except BerthError as error:
            assert error.message, "a BerthError without a message"
            counts["berth error"] += 1
            return
        counts["ok"] += 1

    try:
        check()
    except Exception as exc:  # noqa: BLE001 - recorded, then re-raised for pytest
        result.outcome("unclean", f"{name}: {type(exc).__name__}: {exc}")
        raise
    total = counts["ok"] + counts["berth error"]
    result.faults[name] += total
    result.outcomes["recovered"] += counts["ok"]
    result.outcomes["failed cleanly"] += counts["berth error"]
    # trials = the smallest per-target count, so the table compares it with the minimum
    result.trials = min(total, result.trials) if result.figures else total
    result.figures[name] = (f"{total} cases ({counts['ok']} accepted, {counts['berth error']} "
                            f"BerthError) in {time.monotonic() - started:.1f} s")
    campaign.finish(result)


REFERENCE_ALPHABET = "abcz019._-/:@ABZ" + "sha256" + "\x00 \n\u00e9%"
reference_text = st.one_of(
    st.text(alphabet=REFERENCE_ALPHABET, max_size=120),
    st.text(max_size=60),
    st.builds(lambda host, path, tag: f"{host}/{path}{tag}",
              st.sampled_from(["127.0.0.1:5000", "registry.example.org", "localhost", "[::1]:5000",
                               "a" * 300, "host:99999", ""]),
              st.text(alphabet="abc/._-", max_size=40),
              st.one_of(st.just(""), st.text(alphabet=":@sha256abcdef0123", max_size=80))),
)


def test_fuzz_image_references(campaign):
    from berth.image.api import parse_reference

    def body(text):
        reference = parse_reference(text)
        str(reference)

    _run(campaign, "image references", reference_text, body)


template_word = st.one_of(
    st.text(max_size=40),
    st.builds(lambda key, value: f"{key}={value}",
              st.sampled_from(["image", "cpu", "memsz", "gpu", "boot_timeout", "stop_timeout", "custom",
                               "comment", "CPU", ""]),
              st.one_of(st.text(max_size=30), st.integers().map(str),
                        st.sampled_from(["1G", "1.5g", "-1", "0x10", "1e9", "999999999999999999999T", "1:00:00",
                                         "--env A=1 --mount x", "'unclosed", "busybox:1"]))),
)


def test_fuzz_template_words(campaign):
    from berth.config.templates import parse_assignments

    def body(case):
        words, require = case
        parse_assignments(words, require=require)

    _run(campaign, "template key=value words", st.tuples(st.lists(template_word, max_size=6), st.booleans()), body)


directive_line = st.one_of(
    st.text(max_size=60),
    st.builds(lambda head, option, value: f"{head} {option}{value}",
              st.sampled_from(["#BERTH", "#berth", "#BERTHX", "# BERTH"]),
              st.sampled_from(["--nodes", "-N", "--ntasks", "-n", "--time", "-t", "--mem", "--gres", "--template",
                               "--image", "--job-name", "-J", "--output", "--exclusive", "--bogus", ""]),
              st.one_of(st.just(""), st.text(max_size=30).map(lambda v: "=" + v),
                        st.text(max_size=30).map(lambda v: " " + v))),
)


def test_fuzz_directives(campaign, tmp_path):
    from berth.jobs.options import read_directives

    script = tmp_path / "job.sh"

    def body(lines):
        read_directives(script, "#!/bin/sh\n" + "\n".join(lines) + "\necho hi\n")

    _run(campaign, "#BERTH directives", st.lists(directive_line, max_size=8), body)


toml_scalar = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.text(max_size=20),
                        st.booleans(), st.floats(allow_nan=True), st.just("/tmp/x"), st.just("~/store"))
toml_key = st.sampled_from(["user_store", "site_store", "state_dir", "jobs_dir", "runtime", "squashfs_compression",
                            "pull_parallel", "pull_retries", "registry_timeout_s", "backend", "local_max_jobs",
                            "stage_to_local", "pinned", "unknown", "policy"])


def _toml_line(key, value) -> str:
    from berth.config.tomlfile import toml_value

    try:
        return f"{key} = {toml_value(value)}"
    except Exception:  # noqa: BLE001 - a value the writer cannot express: write it raw
        return f"{key} = {value!r}"


toml_document = st.one_of(
    st.text(max_size=200),
    st.lists(st.builds(_toml_line, toml_key, st.one_of(toml_scalar, st.lists(toml_scalar, max_size=3))),
             max_size=6).map("\n".join),
    st.lists(st.sampled_from(["[policy]", "[[policy.mounts]]", "source = '/x'", "destination = 'y'",
                              "[[registries]]", "host = '127.0.0.1:5000'", "insecure = 1", "[policy.namespaces]",
                              "network = 'host'", "[[policy.env]]", "name = 'A'", "set = 1", "a.b.c = 1",
                              "'\\x00' = 1", "[policy]\n[policy]"]), max_size=8).map("\n".join),
)


def test_fuzz_toml_configuration(campaign):
    from berth.config.load import load_settings

    config_dir = Path(tempfile.mkdtemp(prefix="berth-fuzz-config-"))
    home = config_dir / "home"
    home.mkdir()

    def body(case):
        site, user = case
        (config_dir / "berth.toml").write_text(site, errors="surrogatepass")
        user_dir = home / ".config" / "berth"
        user_dir.mkdir(parents=True, exist_ok=True)
        (user_dir / "berth.toml").write_text(user, errors="surrogatepass")
        load_settings(environ={"BERTH_CONFIG_DIR": str(config_dir), "HOME": str(home),
                               "XDG_CONFIG_HOME": str(home / ".config")})

    try:
        _run(campaign, "TOML configuration", st.tuples(toml_document, toml_document), body)
    finally:
        import shutil

        shutil.rmtree(config_dir, ignore_errors=True)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 64), max_value=2 ** 64), st.text(max_size=12),
              st.sampled_from(["sha256:" + "a" * 64, "sha256:zz", "linux", "amd64", 2])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["schemaVersion", "mediaType", "config", "layers",
                                                             "manifests", "digest", "size", "platform", "os",
                                                             "architecture", "variant", "Entrypoint", "Cmd",
                                                             "Env", "User", "WorkingDir", "x"]),
                                            inner, max_size=6)),
    max_leaves=20,
)
GOOD_MANIFEST = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                            "digest": "sha256:" + "a" * 64, "size": 10},
                 "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                             "digest": "sha256:" + "b" * 64, "size": 20}]}


def _mutate(document: dict, path: list[str], value) -> dict:
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            return copy
    target[path[-1]] = value
    return copy


manifest_bytes = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.builds(lambda path, value: json.dumps(_mutate(GOOD_MANIFEST, path, value)).encode(),
              st.sampled_from([["schemaVersion"], ["config"], ["config", "digest"], ["config", "size"],
                               ["layers"], ["mediaType"]]), json_values),
)


def test_fuzz_manifests_indexes_and_image_configs(campaign):
    from berth.image.install import parse_image_manifest
    from berth.image.platforms import parse_platform
    from berth.image.pull import select_platform
    from berth.runtime.plan import compose_command

    wanted = parse_platform("linux/amd64")

    def body(data):
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        try:
            parse_image_manifest(data, "fuzzed")
        finally:
            if isinstance(document, dict):
                try:
                    select_platform(document, wanted, "fuzzed")
                finally:
                    compose_command(document, None, None, "fuzzed")

    _run(campaign, "manifests, indexes, image configs", manifest_bytes, body)


def _sample_layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, data, link in [("dir", tarfile.DIRTYPE, b"", ""), ("dir/file", tarfile.REGTYPE, b"x" * 700, ""),
                                       ("dir/.wh.gone", tarfile.REGTYPE, b"", ""), ("link", tarfile.SYMTYPE, b"", "dir/file"),
                                       ("hard", tarfile.LNKTYPE, b"", "dir/file"),
                                       ("long/" + "n" * 150, tarfile.REGTYPE, b"y", "")]:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data), link
            archive.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


SAMPLE_LAYER = _sample_layer()
tar_bytes = st.one_of(
    st.builds(lambda flips, cut: _damage(SAMPLE_LAYER, flips, cut),
              st.lists(st.tuples(st.integers(0, len(SAMPLE_LAYER) - 1), st.integers(0, 255)), max_size=8),
              st.one_of(st.none(), st.integers(0, len(SAMPLE_LAYER)))),
    st.binary(max_size=2048),
)


def _damage(data: bytes, flips, cut) -> bytes:
    damaged = bytearray(data)
    for offset, value in flips:
        damaged[offset] = value
    return bytes(damaged[:cut] if cut is not None else damaged)


def test_fuzz_tar_headers(campaign, tmp_path):
    from berth.image import flatten, tarstream

    path = tmp_path / "layer.tar"
    sink_fd = os.open(os.devnull, os.O_WRONLY)

    def body(data):
        path.write_bytes(data)
        what = "fuzzed layer"
        with tarstream.open_decompressed(path, what) as stream:
            flatten._prescan(stream, what, 1000)
        with tarstream.open_decompressed(path, what) as stream:
            flattener = flatten._Flattener(tarstream.ByteSink(fd=sink_fd), flatten.FlattenReport(),
                                           flatten._Limits(1 << 30, 1000))
            try:
                flattener.layer(stream, 0, what, None)
                flattener.finish()
            except flatten._NeedPlan:
                pass  # the real converter pre-scans and restarts; the pre-scan ran above

    try:
        _run(campaign, "tar headers", tar_bytes, body)
    finally:
        os.close(sink_fd)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Nothing here may reach a network: parsers only."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a parser opened a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
