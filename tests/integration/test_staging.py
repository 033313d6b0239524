"""`berth stage in|out` for real: SeaweedFS on loopback, berth as the unprivileged test user.

A s3_dataset with nested keys, one object over the multipart threshold (8 MiB here; 20 MiB file)
and many small objects; checksums compared after the round trip; every failure the issue lists;
credentials never on a command line, in output or in another user's reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.fixtures_runtime import process_cmdlines
from tests.harness.fixtures_s3 import md5, tree_md5s, S3_BIG_BYTES, S3_SMALL_COUNT
from tests.harness.users import berth_executable, describe

pytestmark = pytest.mark.integration



def stage(user, work, direction, *items, env, extra=()):
    return user.berth("stage", direction, *items, *extra, cwd=str(work), env=env, timeout=300)


def test_prefix_round_trip_verifies_resyncs_and_uploads_multipart(s3_server, s3_profile, s3_dataset, user, user_tmp):
    env = s3_profile(user)
    result = stage(user, user_tmp, "in", "s3://berth-data/ds/:input/", env=env, extra=("--json",))
    assert result.returncode == 0, describe(result)
    summary = json.loads(result.stdout)
    assert (summary["objects"], summary["skipped"], summary["failed"]) == (S3_SMALL_COUNT + 1, 0, [])
    assert summary["bytes"] == sum((user_tmp / "input" / k).stat().st_size for k in s3_dataset)
    assert tree_md5s(user_tmp / "input") == s3_dataset  # nothing else: no temporary files left
    owner = (user_tmp / "input" / "big.bin").stat()
    assert (owner.st_uid, owner.st_gid) == (user.uid, user.gid)

    # Nothing changed: everything skipped, nothing transferred.
    again = stage(user, user_tmp, "in", "s3://berth-data/ds/:input/", env=env, extra=("--json",))
    resync = json.loads(again.stdout)
    assert (resync["skipped"], resync["bytes"]) == (S3_SMALL_COUNT + 1, 0), describe(again)
    # A changed local file of the same size is found by its checksum and fetched again.
    victim = user_tmp / "input" / "big.bin"
    with open(victim, "r+b") as handle:
        handle.seek(12345)
        handle.write(b"X")
    os.utime(victim, (1, 1))
    third = json.loads(stage(user, user_tmp, "in", "s3://berth-data/ds/:input/", env=env, extra=("--json",)).stdout)
    assert (third["skipped"], third["bytes"]) == (S3_SMALL_COUNT, S3_BIG_BYTES)
    assert md5(victim.read_bytes()) == s3_dataset["big.bin"]

    # One object to a file name, and into a directory.
    single = stage(user, user_tmp, "in", "s3://berth-data/ds/big.bin:one.bin",
                   "s3://berth-data/ds/nested/level0/deeper0/small-0000.bin:dir/", env=env)
    assert single.returncode == 0, describe(single)
    assert md5((user_tmp / "one.bin").read_bytes()) == s3_dataset["big.bin"]
    assert (user_tmp / "dir" / "small-0000.bin").exists()

    # Out again under a new prefix: the service holds the same bytes (multipart ETag for big.bin).
    bucket = s3_server.new_bucket("out")
    result = stage(user, user_tmp, "out", f"input/:s3://{bucket}/run1/", f"one.bin:s3://{bucket}/exact.bin", env=env)
    assert result.returncode == 0, describe(result)
    assert "stage-out total: 122 objects" in result.stdout
    client = s3_server.client()
    stored = {o["Key"]: o for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
              for o in page.get("Contents", ())}
    assert set(stored) == {f"run1/{k}" for k in s3_dataset} | {"exact.bin"}
    assert stored["run1/big.bin"]["ETag"].strip('"').endswith("-3")  # multipart, 8 MiB parts
    for key in ("big.bin", "nested/level1/deeper1/small-0001.bin"):
        body = client.get_object(Bucket=bucket, Key=f"run1/{key}")["Body"].read()
        assert md5(body) == s3_dataset[key]

    # Globs keep paths below their fixed part; a host directory as DEST.
    glob_out = stage(user, user_tmp, "out", "input/nested/**/small-000*.bin:kept/", env=env)
    assert glob_out.returncode == 0, describe(glob_out)
    kept = sorted(str(p.relative_to(user_tmp / "kept")) for p in (user_tmp / "kept").rglob("*.bin"))
    assert kept == sorted(k.removeprefix("nested/") for k in s3_dataset if "small-000" in k)


def test_https_and_host_sources(s3_server, s3_profile, user, user_tmp):
    env = s3_profile(user)
    client = s3_server.client()
    client.put_object(Bucket="berth-data", Key="url/obj.txt", Body=b"via a presigned URL\n")
    url = client.generate_presigned_url("get_object", Params={"Bucket": "berth-data", "Key": "url/obj.txt"},
                                        ExpiresIn=300)
    source_dir = user_tmp / "src"
    (source_dir / "sub").mkdir(parents=True)
    (source_dir / "sub" / "a.txt").write_text("a\n")
    os.chown(source_dir, user.uid, user.gid)
    result = stage(user, user_tmp, "in", f"{url}:fetched/", f"{source_dir}:copy", env=env)
    assert result.returncode == 0, describe(result)
    assert (user_tmp / "fetched" / "obj.txt").read_bytes() == b"via a presigned URL\n"
    assert (user_tmp / "copy" / "sub" / "a.txt").read_text() == "a\n"
    # boto3 presigns with SigV2 here (?AWSAccessKeyId=...&Signature=...); SigV4 says X-Amz-Signature.
    assert "Signature=" in url and "Signature=" not in result.stdout + result.stderr, result.stdout


def test_failures_are_clear_and_leave_nothing_half_written(s3_server, s3_profile, s3_dataset, user, user_tmp):
    env = s3_profile(user)
    cases = [
        (("in", "s3://berth-data/ds/big.bin"), 2, "--stage-in 's3://berth-data/ds/big.bin': no ':DEST'"),
        (("in", "s3://berth-data/ds/:x", "--s3-profile", "nope"), 78, "unknown S3 profile 'nope'"),
        (("in", "s3://no-such-bucket/x:x"), 3, "s3://no-such-bucket/: the bucket does not exist"),
        (("in", "s3://no-such-bucket/p/:x"), 3, "the bucket does not exist"),
        (("in", "s3://berth-data/ds/missing.bin:x"), 3, "s3://berth-data/ds/missing.bin does not exist"),
        (("in", "s3://berth-data/nothing-here/:x"), 3, "no object under s3://berth-data/nothing-here/"),
        (("out", "absent/*.h5:s3://berth-data/x/"), 10, "absent/*.h5 matched no file"),
    ]
    for argv, code, words in cases:
        result = stage(user, user_tmp, *argv, env=env)
        assert result.returncode == code and words in result.stderr, describe(result)
        assert "Traceback" not in result.stderr
    assert not (user_tmp / "x").exists()

    wrong = s3_profile(user, keys=type(s3_server.user_keys)(s3_server.user_keys.access_key, "wrong-secret"))
    result = stage(user, user_tmp, "in", "s3://berth-data/ds/big.bin:x", env=wrong)
    assert result.returncode == 10 and "refused the request" in result.stderr, describe(result)
    assert "wrong-secret" not in result.stderr + result.stdout

    down = s3_profile(user, endpoint="http://127.0.0.1:9", timeout_s=2)
    result = stage(user, user_tmp, "in", "s3://berth-data/ds/big.bin:x", env=down)
    assert result.returncode == 10 and "cannot connect to the S3 endpoint http://127.0.0.1:9" in result.stderr, \
        describe(result)


@pytest.mark.parametrize("variables, through_proxy", [
    ({"no_proxy": "localhost", "NO_PROXY": "127.0.0.1"}, True),   # reqwest read NO_PROXY: went direct
    ({"no_proxy": "127.0.0.0/8"}, False),                          # urllib read no CIDR: guard was off
], ids=["lower-over-upper", "cidr"])
def test_s3_goes_through_the_proxy_berth_decides(s3_server, s3_profile, user, user_tmp, variables, through_proxy):
    """berth decides whether the endpoint goes through the environment's proxy and hands that
    to obstore, which reads no proxy variable itself: before, obstore's reqwest read them its own
    way (NO_PROXY over no_proxy, CIDR entries), so the endpoint went direct where berth had
    decided "proxied" and switched the redirect guard off (review10). Real SeaweedFS behind a
    real forwarding proxy on loopback, `berth stage in` as the test user."""
    from tests.harness.countingproxy import CountingProxy

    s3_server.client().put_object(Bucket="berth-data", Key="proxied/obj.txt", Body=b"through the proxy\n")
    proxy = CountingProxy(upstream=f"127.0.0.1:{s3_server.port}").start()
    try:
        env = {**s3_profile(user), "http_proxy": f"http://{proxy.host}", **variables}
        result = stage(user, user_tmp, "in", "s3://berth-data/proxied/obj.txt:got.txt", env=env)
    finally:
        proxy.stop()
    assert result.returncode == 0, describe(result)
    assert (user_tmp / "got.txt").read_bytes() == b"through the proxy\n"
    assert bool(proxy.requests) == through_proxy, proxy.requests


def test_stalled_endpoint_times_out(s3_profile, stalled_endpoint, user, user_tmp):
    """A server that accepts connections and never answers: an error after timeout_s, not a hang."""
    env = s3_profile(user, endpoint=stalled_endpoint, timeout_s=1)
    started = time.monotonic()
    result = stage(user, user_tmp, "in", "s3://berth-data/ds/big.bin:x", env=env)
    assert result.returncode == 10 and "stopped answering" in result.stderr, describe(result)
    assert time.monotonic() - started < 60
    assert not (user_tmp / "x").exists()


def test_disk_full_removes_the_partial_download(s3_server, s3_profile, s3_dataset, user, user_tmp):
    small = user_tmp / "small-disk"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=4m,uid={user.uid},gid={user.gid},mode=0755",
                    "berth-test-full", str(small)], check=True)
    try:
        env = s3_profile(user)
        result = stage(user, small, "in", "s3://berth-data/ds/big.bin:big.bin", env=env)
        assert result.returncode == 10 and "no space left" in result.stderr, describe(result)
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_a_refused_stage_out_is_not_retried_and_lists_what_did_not_arrive(s3_server, s3_profile, user, user_tmp):
    """berth.retry's rule: a refusal (403) is not sent again (it was, in three rounds with
    pauses between them); transient failures are, tests/unit/test_staging_transfer.py."""
    out = user_tmp / "results"
    out.mkdir()
    for name in ("a.txt", "b.txt"):
        (out / name).write_text(name)
    os.system(f"chown -R {user.uid}:{user.gid} {out}")
    # The second test user's keys may write only its own bucket.
    env = s3_profile(user, keys=s3_server.other_keys)
    result = stage(user, user_tmp, "out", "results/:s3://berth-data/not-yours/", env=env, extra=("--json",))
    assert result.returncode == 10, describe(result)
    assert "2 object(s) did not arrive: s3://berth-data/not-yours/a.txt, " \
           "s3://berth-data/not-yours/b.txt" in result.stderr, describe(result)
    assert "refused the request" in result.stderr, describe(result)
    assert json.loads(result.stdout)["failed"] == ["s3://berth-data/not-yours/a.txt",
                                                   "s3://berth-data/not-yours/b.txt"]


def test_profile_files_must_be_private_and_ours(s3_server, s3_profile, user, other_user, user_tmp):
    env = s3_profile(user, mode=0o640)
    result = stage(user, user_tmp, "in", "s3://berth-data/ds/big.bin:x", env=env)
    path = Path(env["XDG_CONFIG_HOME"]) / "berth" / "s3.toml"
    assert result.returncode == 78 and f"berth: hint: run: chmod 600 {path}" in result.stderr, describe(result)
    # Another user's private file, reachable through a path the test user may traverse.
    os.chown(path, other_user.uid, other_user.gid)
    path.chmod(0o644)
    result = stage(user, user_tmp, "in", "s3://berth-data/ds/big.bin:x", env=env)
    assert result.returncode == 78 and f"belongs to uid {other_user.uid}" in result.stderr, describe(result)
    # The other user cannot read the test user's (private) profile through berth either.
    mine = s3_profile(user)
    theirs = other_user.berth("stage", "in", "s3://berth-data/ds/big.bin:x", cwd="/tmp", env=mine)
    assert theirs.returncode == 78 and s3_server.user_keys.secret_key not in theirs.stdout + theirs.stderr


def test_aws_files_and_environment(s3_server, s3_dataset, user, user_tmp):
    home = user_tmp / "home"
    (home / ".aws").mkdir(parents=True)
    keys = s3_server.user_keys
    (home / ".aws" / "credentials").write_text(
        f"[lab]\naws_access_key_id = {keys.access_key}\naws_secret_access_key = {keys.secret_key}\n")
    (home / ".aws" / "config").write_text(f"[profile lab]\nendpoint_url = {s3_server.endpoint}\n"
                                          "s3 =\n    addressing_style = path\n")
    (home / ".aws" / "credentials").chmod(0o600)
    os.system(f"chown -R {user.uid}:{user.gid} {home}")
    item = "s3://berth-data/ds/nested/level0/deeper0/small-0000.bin:aws.bin"
    result = stage(user, user_tmp, "in", item, "--s3-profile", "lab", env={"HOME": str(home)})
    assert result.returncode == 0, describe(result)
    (home / ".aws" / "credentials").chmod(0o644)
    result = stage(user, user_tmp, "in", item, "--s3-profile", "lab", env={"HOME": str(home)})
    assert result.returncode == 78 and "chmod 600" in result.stderr, describe(result)
    # Variables only (no file): AWS_ENDPOINT_URL and the key pair.
    os.unlink(home / ".aws" / "credentials")
    result = stage(user, user_tmp, "in", item.replace("aws.bin", "env.bin"),
                   env={"HOME": str(home), "AWS_ACCESS_KEY_ID": keys.access_key,
                        "AWS_SECRET_ACCESS_KEY": keys.secret_key, "AWS_ENDPOINT_URL": s3_server.endpoint})
    assert result.returncode == 0, describe(result)
    assert (user_tmp / "env.bin").read_bytes() == (user_tmp / "aws.bin").read_bytes()


def test_credentials_never_on_a_command_line(s3_server, s3_profile, s3_dataset, user, user_tmp):
    """Scan every process's argv while a transfer runs (and its output afterwards)."""
    env = s3_profile(user, max_concurrency=2)
    secret = s3_server.user_keys.secret_key.encode()
    access = s3_server.user_keys.access_key.encode()
    full_env = user.base_env(**env)
    process = subprocess.Popen(
        ["runuser", "-u", user.name, "--", "env", "-i", *[f"{k}={v}" for k, v in full_env.items()],
         str(berth_executable()), "stage", "in", "s3://berth-data/ds/:scan/"],
        cwd=str(user_tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = 0
    while process.poll() is None:
        for _, cmdline in process_cmdlines():
            if b"stage" in cmdline:
                seen += 1
            assert secret not in cmdline and access not in cmdline, cmdline
        time.sleep(0.01)
    out, err = process.communicate()
    assert process.returncode == 0, err
    assert seen > 0
    assert secret not in out + err and access not in out + err


def test_a_stop_signal_during_berth_stage_removes_the_partial_file(user, user_tmp):
    """Jobs stop their stage-in by raising (berth.jobs.runner), but `berth stage` itself died
    of SIGTERM's default action: the half-written temporary file stayed in DEST."""
    import http.server
    import signal
    import threading

    from tests.harness.procfiles import bytes_written_in

    release = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", str(2 << 20))
            self.end_headers()
            self.wfile.write(b"x" * (1 << 20))
            self.wfile.flush()
            release.wait(60)  # the other half never comes while the test runs

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dest = user_tmp / "in"
    try:
        with open(user_tmp / "output", "w+") as output:
            child = subprocess.Popen([str(berth_executable()), "stage", "in",
                                      f"http://127.0.0.1:{server.server_address[1]}/big.bin:in/"],
                                     user=user.uid, group=user.gid, extra_groups=[], env=user.base_env(),
                                     cwd=str(user_tmp), stdin=subprocess.DEVNULL, stdout=output, stderr=output)
            try:
                deadline = time.monotonic() + 60
                while not (bytes_written_in(child.pid, dest) or 0):  # the download's file, unnamed
                    assert child.poll() is None and time.monotonic() < deadline, output.read()
                    time.sleep(0.05)
                child.send_signal(signal.SIGTERM)
                status = child.wait(timeout=30)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            output.seek(0)
            text = output.read()
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert status == 128 + signal.SIGTERM, (status, text)
    assert "Traceback" not in text and "stopped" in text, text
    assert list(dest.iterdir()) == [], "a partial file was left behind"
