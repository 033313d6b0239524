"""Staging without a server: SRC:DEST syntax, key safety, profile resolution and secret files."""

from __future__ import annotations

import hashlib
import os

import pytest

from berth.errors import ConfigError, UsageError
from berth.staging.locations import (HostLocation, S3Location, UrlLocation, key_to_relative, parse_transfer)
from berth.staging.profiles import credentials_file_text, resolve_profile
from berth.staging.transfer import Summary, ItemSummary, matches_etag, multipart_etag


@pytest.mark.parametrize("text, source, dest", [
    ("s3://bucket/data/:input/", S3Location("bucket", "data/"), HostLocation("input/")),
    ("s3://bucket/a/b.csv:b.csv", S3Location("bucket", "a/b.csv"), HostLocation("b.csv")),
    ("s3://bucket/:all", S3Location("bucket", ""), HostLocation("all")),
    ("https://example.org:8443/x.tar:x.tar", UrlLocation("https://example.org:8443/x.tar"), HostLocation("x.tar")),
    ("/data/ref:ref", HostLocation("/data/ref"), HostLocation("ref")),
])
def test_stage_in_splits_at_the_last_colon(text, source, dest):
    transfer = parse_transfer(text, "in")
    assert (transfer.source, transfer.destination) == (source, dest)


@pytest.mark.parametrize("text, source, dest", [
    ("results/*.h5:s3://bucket/run1/", HostLocation("results/*.h5"), S3Location("bucket", "run1/")),
    ("out:s3://b-1.x/k", HostLocation("out"), S3Location("b-1.x", "k")),
    ("logs/**:/scratch/keep/", HostLocation("logs/**"), HostLocation("/scratch/keep/")),
])
def test_stage_out_splits_at_the_first_colon(text, source, dest):
    transfer = parse_transfer(text, "out")
    assert (transfer.source, transfer.destination) == (source, dest)


@pytest.mark.parametrize("text, direction, words", [
    ("s3://bucket/data/", "in", "no ':DEST'"),
    ("s3://bucket/x:", "in", "no ':DEST'"),
    ("input", "in", "no ':DEST'"),
    ("s3://Bad_Bucket/x:y", "in", "not an S3 bucket name"),
    ("s3://bucket/x:s3://other/y", "in", "no ':DEST'"),
    ("data/*.csv:in/", "in", "not globs"),
    ("ftp://host/x:y", "in", "unknown scheme"),
    ("https://user:pw@host/x:y", "in", "user name or password"),
    ("results", "out", "no 'SRC:'"),
    ("results:", "out", "no destination"),
    ("s3://bucket/k:s3://bucket/y/", "out", "not a URL"),
    ("out:https://host/x", "out", "not to an http(s) URL"),
])
def test_malformed_transfers_name_the_option_and_text(text, direction, words):
    with pytest.raises(UsageError) as caught:
        parse_transfer(text, direction)
    option = "--stage-in" if direction == "in" else "--stage-out"
    assert caught.value.message.startswith(f"{option} '{text}'")
    assert words in caught.value.message
    assert caught.value.hint


@pytest.mark.parametrize("key", ["p/../../etc/passwd", "p//x", "p/./x", "p/", "p/a/.."])
def test_hostile_keys_never_become_paths_outside_the_destination(key):
    with pytest.raises(ValueError):
        key_to_relative(key, "p/")


def test_key_to_relative_keeps_nested_keys():
    assert key_to_relative("p/a/b/c.txt", "p/") == "a/b/c.txt"


def _write(path, text, mode=0o600):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_berth_profile_file_wins_and_repr_hides_secrets(tmp_path):
    _write(tmp_path / "cfg/berth/s3.toml", '[work]\nendpoint = "http://127.0.0.1:9"\naccess_key = "AK"\n'
           'secret_key = "TOPSECRET"\naddressing_style = "path"\nmultipart_threshold = "16M"\n')
    profile = resolve_profile("work", environ={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert (profile.endpoint, profile.access_key, profile.secret_key, profile.multipart_threshold) == \
        ("http://127.0.0.1:9", "AK", "TOPSECRET", 16 << 20)
    assert "TOPSECRET" not in repr(profile) and "TOPSECRET" not in profile.describe()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_secret_files_readable_by_others_are_refused_with_the_exact_chmod(tmp_path, mode):
    path = _write(tmp_path / "cfg/berth/s3.toml", '[default]\nsecret_key = "S"\naccess_key = "A"\n', mode)
    with pytest.raises(ConfigError) as caught:
        resolve_profile(None, environ={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert f"mode {mode:04o}" in caught.value.message
    assert caught.value.hint == f"run: chmod 600 {path}"


def test_aws_files_and_variables(tmp_path):
    _write(tmp_path / ".aws/credentials", "[default]\naws_access_key_id = A1\naws_secret_access_key = S1\n"
           "[lab]\naws_access_key_id = A2\naws_secret_access_key = S2\n")
    _write(tmp_path / ".aws/config", "[default]\nregion = eu-west-1\n[profile lab]\nendpoint_url = http://lab:8333\n"
           "s3 =\n    addressing_style = path\n", 0o644)  # no secret in it: its mode is free
    env = {"HOME": str(tmp_path)}
    default = resolve_profile(None, environ=env)
    assert (default.access_key, default.region, default.endpoint) == ("A1", "eu-west-1", None)
    lab = resolve_profile("lab", environ=env)
    assert (lab.access_key, lab.endpoint, lab.addressing_style) == ("A2", "http://lab:8333", "path")
    from_env = resolve_profile(None, environ={**env, "AWS_ACCESS_KEY_ID": "A3", "AWS_SECRET_ACCESS_KEY": "S3",
                                              "AWS_ENDPOINT_URL": "https://s3.site"})
    assert (from_env.access_key, from_env.endpoint, from_env.credentials_source) == \
        ("A3", "https://s3.site", "environment (AWS_ACCESS_KEY_ID)")
    (tmp_path / ".aws/credentials").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        resolve_profile(None, environ=env)


def test_an_aws_config_that_is_a_fifo_is_refused_without_waiting(tmp_path):
    """~/.aws/config is read without the secret files' rules (it is often shared), but it is
    read all the same: a FIFO there (a container that sees the home can plant one) made every
    stage and every job's staging wait in open() for good."""
    import threading

    (tmp_path / ".aws").mkdir()
    os.mkfifo(tmp_path / ".aws/config")
    outcome: list = []

    def resolve():
        try:
            outcome.append(resolve_profile(None, environ={"HOME": str(tmp_path)}))
        except ConfigError as error:
            outcome.append(error)
    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(tmp_path / ".aws/config", os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("resolving the profile waited on a FIFO at ~/.aws/config")
    [error] = outcome
    assert isinstance(error, ConfigError) and error.message.startswith(f"{tmp_path}/.aws/config is not a regular file")


def test_unknown_profile_and_bad_keys(tmp_path):
    _write(tmp_path / "cfg/berth/s3.toml", '[default]\nendpoint = "http://x"\n')
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    with pytest.raises(ConfigError, match="unknown S3 profile 'nope'") as caught:
        resolve_profile("nope", environ=env)
    assert "known: default" in caught.value.hint
    _write(tmp_path / "cfg/berth/s3.toml", '[default]\nsecret = "S"\n')
    with pytest.raises(ConfigError, match=r"\[default\] secret: unknown key"):
        resolve_profile(None, environ=env)
    _write(tmp_path / "cfg/berth/s3.toml", '[default]\naccess_key = "A"\n')
    with pytest.raises(ConfigError, match="access key without a secret key"):
        resolve_profile(None, environ=env)
    _write(tmp_path / "cfg/berth/s3.toml", '[default]\nmultipart_threshold = "1M"\n')
    with pytest.raises(ConfigError, match="multipart_threshold '1M': less than the minimum 5MiB"):
        resolve_profile(None, environ=env)
    _write(tmp_path / "cfg/berth/s3.toml", '[default]\ntimeout_s = 0\n')
    with pytest.raises(ConfigError, match="timeout_s '0': less than the minimum 1s"):
        resolve_profile(None, environ=env)
    _write(tmp_path / "cfg/berth/s3.toml", '[default]\ntimeout_s = "2 minutes later"\n')
    with pytest.raises(ConfigError, match="timeout_s '2 minutes later': not a duration"):
        resolve_profile(None, environ=env)
    _write(tmp_path / "cfg/berth/s3.toml", '[default]\nendpoint = "http://a:b@host"\n')
    with pytest.raises(ConfigError, match="user name or password"):
        resolve_profile(None, environ=env)


@pytest.mark.parametrize("text, seconds", [("90", 90), ('"90s"', 90), ('"2m"', 120), ('"1h"', 3600)])
def test_timeout_s_is_a_duration_as_everywhere_in_berth(tmp_path, text, seconds):
    """config.units is the one duration grammar (berth.toml's duration keys take "2m"); the S3
    profile took an integer only and refused timeout_s = "2m" as 'must be an integer'."""
    _write(tmp_path / "cfg/berth/s3.toml", f"[default]\ntimeout_s = {text}\n")
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert resolve_profile(None, environ=env).timeout_s == seconds


def test_site_endpoint_is_the_fallback(tmp_path):
    class Site:
        s3_endpoint = "https://s3.site.example"
        s3_ca_bundle = None

    profile = resolve_profile(None, settings=Site(), environ={"HOME": str(tmp_path)})
    assert profile.endpoint == "https://s3.site.example" and profile.anonymous


def test_multipart_etag_is_md5_of_part_md5s(tmp_path):
    data = os.urandom((5 << 20) * 2 + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    parts = [data[i:i + (5 << 20)] for i in range(0, len(data), 5 << 20)]
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
    assert multipart_etag(str(path), 5 << 20) == expected
    assert matches_etag(str(path), expected, [5 << 20]) is True
    assert matches_etag(str(path), expected, [6 << 20]) is False
    assert matches_etag(str(path), expected, [6 << 20, 5 << 20]) is True  # any candidate
    assert matches_etag(str(path), expected, None) is None
    assert matches_etag(str(path), hashlib.md5(data).hexdigest(), None) is True


def test_credentials_file_text_and_summary_have_no_surprises():
    from berth.staging.profiles import S3Profile

    text = credentials_file_text(S3Profile("p", access_key="A", secret_key="S"))
    assert text == "[default]\naws_access_key_id = A\naws_secret_access_key = S\n"
    summary = Summary("in", [ItemSummary("s3://b/p/:d/", objects=3, bytes=2_000_000, skipped=1, seconds=1.0)], 1.0)
    assert summary.lines()[0] == "stage-in s3://b/p/:d/: 3 objects, 1.9 MiB in 1.00 s (2.0 MB/s), 1 skipped"
    assert summary.to_dict()["mb_per_s"] == 2.0


def test_worker_threads_share_one_store_per_bucket(monkeypatch):
    """Stage-out's workers asked for the client at once and each built its own (16 clients and
    pools: seconds of CPU and a slow exit); one store per bucket must serve them all."""
    import time as _time

    from berth.staging import transfer
    from berth.staging.profiles import S3Profile

    made = []

    def slow_store(profile, bucket):
        _time.sleep(0.05)
        made.append(bucket)
        return object()

    monkeypatch.setattr(transfer, "make_store", slow_store)
    runner = transfer._Runner(S3Profile("p", max_concurrency=16), None)
    results, failures = transfer._run_pool(runner, lambda item: runner.store(f"b{item % 2}"), list(range(32)),
                                           fail_fast=False)
    assert failures == [] and len({id(store) for _, store in results}) == 2
    assert sorted(made) == ["b0", "b1"]


def test_progress_bar_draws_on_a_terminal_only():
    import io as _io

    from berth.cli.progress import StagingBar

    screen = _io.StringIO()
    bar = StagingBar(screen, tty=True)
    bar.add_total(2, 2048)
    bar.advance(1024)
    bar.object_done()
    bar.object_done(skipped=True)
    bar.finish()
    last = screen.getvalue().rstrip("\n").split("\r")[-1]
    assert "2/2 objects (1 skipped)" in last and "1.0 KiB / 2.0 KiB" in last
    quiet = _io.StringIO()
    bar = StagingBar(quiet, tty=False)
    bar.add_total(1, 10)
    bar.finish()
    assert quiet.getvalue() == ""


def test_site_s3_endpoint_key_refuses_secrets_in_the_url(tmp_path):
    from berth.config.load import load_settings

    site = tmp_path / "etc"
    site.mkdir()
    env = {"HOME": str(tmp_path), "BERTH_CONFIG_DIR": str(site)}
    (site / "berth.toml").write_text('s3_endpoint = "https://s3.site.example:8443"\n')
    settings = load_settings(environ=env)
    assert settings.s3_endpoint == "https://s3.site.example:8443"
    assert resolve_profile(None, settings=settings, environ=env).endpoint == "https://s3.site.example:8443"
    (site / "berth.toml").write_text('s3_endpoint = "https://key:secret@s3.site.example"\n')
    with pytest.raises(ConfigError, match="may not carry a user name or password") as caught:
        load_settings(environ=env)
    assert "secret" not in caught.value.message.replace("user name or password", "")
    (site / "berth.toml").write_text('s3_endpoint = "s3.site.example"\n')
    with pytest.raises(ConfigError, match="is not an http:// or https:// URL"):
        load_settings(environ=env)
