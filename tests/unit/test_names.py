"""Name grammars: one rule per meaning (oci.names), full matches everywhere (issue 9, issue 12 #6).

``re.match(r"...$")`` accepts a final newline, so every validator is tried with one; a name that
ends in a newline used to become a template file name, a job name splitting `berth jobs` rows,
a container name or an environment variable name.
"""

from __future__ import annotations

import pytest

from berth.config import templates
from berth.errors import ReferenceError_, UsageError, did_you_mean
from berth.jobs.options import check_name as check_job_name
from berth.jobs.options import parse_gres_gpus
from berth.oci.digest import Digest, InvalidDigest
from berth.oci.names import is_container_hostname, is_env_name, is_registry_host
from berth.oci.reference import InvalidReference, Reference, is_repository, is_tag
from berth.registry import auth
from berth.registry.client import check_repository, parse_version
from berth.runtime.options import check_env_entry, is_container_name, parse_run_options

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("host", [
    "localhost", "127.0.0.1", "127.0.0.1:5000", "registry.example.org", "Registry.Example.ORG:443", "[::1]",
    "[::1]:5000", "a-b.c", "x:1", "x:65535", "a" * 63 + ".example",
])
def test_registry_hosts(host):
    assert is_registry_host(host)


@pytest.mark.parametrize("host", [
    "", "-x.example", "x-.example", "a..b", ".a", "a.", "host:port", "host:", "host:0", "host:65536", "host:123456",
    "user@host", "a b", "a;b", "a/b", "[::1", "127.0.0.1:5000\n", "localhost\n", "a" * 64 + ".example", "h\u00e9st",
])
def test_not_registry_hosts(host):
    assert not is_registry_host(host)


@pytest.mark.parametrize("name,valid", [
    ("box", True), ("node-1.cluster", True), ("a" * 63, True), ("1abc", True), ("a" * 64, False), ("box\n", False),
    ("box:5000", False), ("-box", False), ("box-", False), ("a..b", False), ("a_b", False), ("", False),
    ("[::1]", False), ("b\u00f6x", False),
])
def test_container_hostnames_are_rfc_1123_without_port(name, valid):
    assert is_container_hostname(name) is valid


def test_a_registry_host_and_a_container_hostname_are_different_meanings():
    assert is_registry_host("r.example:5000") and not is_container_hostname("r.example:5000")


@pytest.mark.parametrize("name,valid", [
    ("PATH", True), ("_x1", True), ("1X", False), ("A-B", False), ("A\n", False), ("", False), ("\u00c4", False),
])
def test_env_names(name, valid):
    assert is_env_name(name) is valid


@pytest.mark.parametrize("check", [
    templates.check_name,
    lambda name: check_job_name(name, "--job-name"),
    lambda name: check_job_name(name, "--partition"),
    lambda name: parse_run_options(["--name", name]),
    lambda name: parse_run_options(["--hostname", name]),
    lambda name: check_env_entry(f"{name}=1", what="-e"),
    lambda name: parse_version(name),
    lambda name: check_repository(name),
    lambda name: auth.normalize_host(name + ":5000\n"),
], ids=["template", "job-name", "partition", "container-name", "hostname", "env", "tag", "repository", "auth-host"])
def test_a_final_newline_is_refused_by_every_name_validator(check):
    check("ok")  # the same name without the newline is valid
    with pytest.raises((UsageError, ReferenceError_)):
        check("ok\n")


@pytest.mark.parametrize("text", [
    "busybox\n", "busybox:1\n", f"busybox@{DIGEST}\n", "127.0.0.1:5000\n/x", "127.0.0.1:5000/x\n:1",
])
def test_references_refuse_newlines_anywhere(text):
    with pytest.raises(InvalidReference):
        Reference.parse(text)


def test_digests_tags_repositories_are_full_matches():
    with pytest.raises(InvalidDigest):
        Digest.parse("sha256:" + "a" * 63 + "\n")
    assert is_tag("v1") and not is_tag("v1\n") and not is_tag(".v1") and not is_tag("a" * 129)
    assert is_repository("a/b-c/d") and not is_repository("a/b\n") and not is_repository("a//b")
    assert not is_repository("a" * 256)


def test_template_names_that_end_in_newline_or_toml_are_refused():
    assert templates.is_template_name("gpu-1.x")
    for bad in ("nl\n", "x.toml", "-x", "a" * 65, "a/b", "..", "\u00e9"):
        assert not templates.is_template_name(bad)
        with pytest.raises(UsageError, match="invalid template name"):
            templates.check_name(bad)


def test_container_names_never_name_a_parent_directory():
    assert is_container_name("b0123456789ab") and is_container_name("job-1.x")
    for bad in (".", "..", "a/b", "x\n", "", "\u00e9t\u00e9", "a" * 64):
        assert not is_container_name(bad)


def test_gres_counts_are_ascii_digits():
    for bad in ("gpu:\u00b2", "gpu:\u0663"):
        with pytest.raises(UsageError, match="not a whole number"):
            parse_gres_gpus(bad)


def test_s3_bucket_names_are_full_matches():
    from berth.staging.locations import parse_s3

    assert parse_s3("s3://bucket-1/key", "in", "s3://bucket-1/key").bucket == "bucket-1"
    with pytest.raises(UsageError, match="is not an S3 bucket name"):
        parse_s3("s3://bucket\n/key", "in", "s3://bucket\n/key")


def test_numbers_from_registries_and_directories_are_ascii_digits(tmp_path):
    from berth.config.settings import Settings
    from berth.jobs.records import create_record, list_records
    from berth.registry.transport import parse_retry_after

    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("\u00b2") is None and parse_retry_after("9" * 5000) is None
    settings = Settings(jobs_dir=tmp_path)
    for name in ("\u00b2", "\u0663"):  # int() raises on the first and reads the second as 3
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.json").write_text("{}")
    assert list_records(settings) == []
    assert create_record(settings).id == "1"


def test_did_you_mean_is_one_helper():
    assert did_you_mean("mount_alow", ["mount_allow", "devices"]) == "did you mean 'mount_allow'?"
    assert did_you_mean("--nodez", ["--nodes", "--ntasks"]) == "did you mean '--nodes'?"
    assert did_you_mean("memsize", templates.ASSIGNMENT_KEYS) == "did you mean 'memsz'?"
    assert did_you_mean("zzz", ["runtime"]) is None
    with pytest.raises(UsageError) as caught:
        templates.parse_assignments(["memsize=4G"], require=False)
    assert caught.value.hint.startswith("did you mean 'memsz'? template keys: image, cpu, memsz")
