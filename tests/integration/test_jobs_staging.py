"""Jobs with --stage-in/--stage-out, for real: SeaweedFS on loopback, the local backend and the
Slurm test cluster, berth as the unprivileged test user.

The dataset (``s3_dataset``: nested keys, a 20 MiB multipart object, 120 small objects) is
staged in before the container starts, the container computes checksums of what it finds, the
results are staged out and compared. Then the failure semantics: failed (stage-in), failed
(stage-out) with the objects that did not arrive, stage-out after a failed script and after the
time limit, none after success-only or a cancel before the start; and where the keys must not
appear: argv of every process, the container's environment, the record, status, logs, another
user's view.
"""

from __future__ import annotations

import json

import pytest

from tests.harness.fixtures_runtime import process_cmdlines
from tests.harness.fixtures_s3 import md5
from tests.harness.users import describe
from tests.integration.jobs_helpers import submit, wait_file, wait_for

pytestmark = pytest.mark.integration

FINAL = ("completed", "failed", "cancelled", "timeout")

COMPUTE = """\
    #!/bin/sh
    #BERTH --stage-in=s3://berth-data/ds/:input/
    #BERTH --stage-out=output/:s3://{bucket}/run-$JOB/
    set -e
    mkdir -p output
    (cd input && find . -type f | sort | xargs md5sum) > output/md5s.txt
    cat input/big.bin input/big.bin > output/double.bin
    env > output/env.txt
    ls -la "$BERTH_JOB_DIR" > output/jobdir.txt
"""


@pytest.fixture(params=["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def backend_env(request, job_site):
    if request.param == "local":
        return {"BERTH_BACKEND": "local"}
    cluster = request.getfixturevalue("slurm_cluster")
    return {**cluster.env(), "BERTH_BACKEND": "slurm"}


def _stored(client, bucket: str, prefix: str) -> dict[str, dict]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", ())}


def _scan_cmdlines(secrets: list[bytes]) -> int:
    """Every process's argv must be free of the keys; returns how many berth processes were seen."""
    seen = 0
    for _, cmdline in process_cmdlines():
        seen += b"berth" in cmdline
        for secret in secrets:
            assert secret not in cmdline, cmdline
    return seen


def test_stage_in_compute_stage_out(job_site, user, other_user, s3_server, s3_dataset, s3_profile, backend_env):
    work = job_site.workdir(user)
    bucket = s3_server.new_bucket("job")
    env = {**backend_env, **s3_profile(user)}
    job_site.write_script(work, "compute.sh", COMPUTE.format(bucket=bucket).replace("$JOB", "1"), user)
    job_id = submit(user, job_site, work, "--template", "bb", "-o", "out-%j.txt", "compute.sh", env=env)
    secrets = [s3_server.user_keys.secret_key.encode(), s3_server.user_keys.access_key.encode()]
    states_seen = set()
    while True:
        status = json.loads(user.berth("status", job_id, "--json", env={**job_site.env, **env}).stdout)
        states_seen.add(status["state"])
        _scan_cmdlines(secrets)
        if status["state"] in FINAL:
            break
    assert status["state"] == "completed", json.dumps(status)
    output = (work / f"out-{job_id}.txt").read_text()
    assert "berth: stage-in s3://berth-data/ds/:input/: 121 objects" in output, output
    assert "berth: stage-out output/:s3://" in output and "4 objects" in output, output

    # What the container computed from the staged-in data is what the bucket holds.
    client = s3_server.client()
    md5s = client.get_object(Bucket=bucket, Key="run-1/md5s.txt")["Body"].read().decode()
    seen = {line.split()[1].removeprefix("./"): line.split()[0] for line in md5s.splitlines()}
    assert seen == s3_dataset
    stored = _stored(client, bucket, "run-1/")
    assert set(stored) == {f"run-1/{name}" for name in ("md5s.txt", "double.bin", "env.txt", "jobdir.txt")}
    double = client.get_object(Bucket=bucket, Key="run-1/double.bin")["Body"].read()
    assert len(double) == 2 * (20 << 20) and md5(double[: 20 << 20]) == s3_dataset["big.bin"]
    assert stored["run-1/double.bin"]["ETag"].strip('"').endswith("-5")  # multipart, 8 MiB parts

    # The keys are nowhere: not in the container's environment or files, the record, the
    # status, the job's output.
    container_env = (work / "output" / "env.txt").read_text()
    assert "AWS_" not in container_env and "s3-credentials" not in (work / "output" / "jobdir.txt").read_text()
    record = job_site.jobs_dir / job_id
    texts = [container_env, output, json.dumps(status)]
    texts += [p.read_text(errors="replace") for p in record.rglob("*") if p.is_file()]
    for text in texts:
        for secret in secrets:
            assert secret.decode() not in text
    assert json.loads((record / "spec.json").read_text())["stage_in"] == ["s3://berth-data/ds/:input/"]
    # Another user sees no record and no keys through berth.
    theirs = other_user.berth("status", job_id, "--json", env=job_site.env)
    assert theirs.returncode != 0 and s3_server.user_keys.secret_key not in theirs.stdout + theirs.stderr


def test_failure_phases(job_site, user, s3_server, s3_dataset, s3_profile, backend_env):
    work = job_site.workdir(user)
    bucket = s3_server.new_bucket("fail")
    env = {**backend_env, **s3_profile(user)}
    job_site.write_script(work, "mark.sh", "#!/bin/sh\nmkdir -p out\necho ran > out/ran-$BERTH_JOB_ID\nexit ${1:-0}\n",
                          user)
    missing = submit(user, job_site, work, "--template", "bb", "--stage-in", "s3://berth-data/ds/missing.bin:x",
                     "--stage-out", f"out/:s3://{bucket}/missing/", "mark.sh", env=env)
    failed_script = submit(user, job_site, work, "--template", "bb", "--stage-out", f"out/:s3://{bucket}/failed/",
                           "mark.sh", "3", env=env)
    success_only = submit(user, job_site, work, "--template", "bb", "--stage-out", f"out/:s3://{bucket}/only/",
                          "--stage-out-when", "success", "mark.sh", "4", env=env)
    # The second user's keys may not write the test user's bucket.
    denied_env = {**backend_env, **s3_profile(user, keys=s3_server.other_keys)}
    no_bucket = submit(user, job_site, work, "--template", "bb", "--stage-out", "out/:s3://berth-data/denied/",
                       "mark.sh", env=denied_env)
    states = wait_for(user, job_site, [missing, failed_script, success_only, no_bucket], FINAL, timeout_s=120,
                      env=env)

    assert (states[missing]["state"], states[missing]["phase"]) == ("failed", "stage-in")
    assert "s3://berth-data/ds/missing.bin does not exist" in states[missing]["message"]
    assert not (work / "out" / f"ran-{missing}").exists()  # the script never ran
    assert not _stored(s3_server.client(), bucket, "missing/")  # and nothing was staged out

    assert (states[failed_script]["state"], states[failed_script]["phase"], states[failed_script]["exit_code"]) \
        == ("failed", "script", 3)
    assert f"failed/ran-{failed_script}" in _stored(s3_server.client(), bucket, "failed/")  # always: kept

    assert (states[success_only]["state"], states[success_only]["exit_code"]) == ("failed", 4)
    assert not _stored(s3_server.client(), bucket, "only/")

    assert (states[no_bucket]["state"], states[no_bucket]["phase"]) == ("failed", "stage-out")
    # A refusal is not sent again (berth.retry): one round, no "after N attempts".
    assert "did not arrive: s3://berth-data/denied/" in states[no_bucket]["message"]
    assert f"s3://berth-data/denied/ran-{no_bucket}" in states[no_bucket]["message"]
    assert "refused the request" in states[no_bucket]["message"]
    table = user.berth("status", no_bucket, env={**job_site.env, **env})
    assert "failed (stage-out)" in table.stdout, describe(table)


def test_cancel_during_stage_in_skips_stage_out_and_timeout_keeps_it(job_site, user, s3_server, s3_profile,
                                                                     stalled_endpoint):
    work = job_site.workdir(user)
    bucket = s3_server.new_bucket("cancel")
    stalled = s3_profile(user, name="stalled", endpoint=stalled_endpoint, timeout_s=300)
    cancelled = submit(user, job_site, work, "--template", "bb", "--s3-profile", "stalled",
                       "--stage-in", "s3://berth-data/ds/big.bin:in.bin", "--stage-out", f"out/:s3://{bucket}/c/",
                       "--job-name=stalled", _script(job_site, work, user),
                       env={**stalled, "BERTH_BACKEND": "local"})
    wait_for(user, job_site, [cancelled], ("staging",), env=stalled)
    result = user.berth("cancel", cancelled, env={**job_site.env, **stalled})
    assert result.returncode == 0, describe(result)
    env = s3_profile(user)
    job_site.write_script(work, "slow.sh", "#!/bin/sh\nmkdir -p out\necho partial > out/partial.txt\nsleep 60\n", user)
    timed = submit(user, job_site, work, "--template", "bb", "-t", "0:04", "--stage-out", f"out/:s3://{bucket}/t/",
                   "slow.sh", env={**env, "BERTH_BACKEND": "local"})
    states = wait_for(user, job_site, [cancelled, timed], FINAL, timeout_s=90, env=env)
    assert states[cancelled]["state"] == "cancelled" and "during stage-in" in states[cancelled]["message"]
    assert not (work / "in.bin").exists() and not [p for p in work.iterdir() if p.name.startswith(".in.bin.")]
    assert not _stored(s3_server.client(), bucket, "c/")
    assert states[timed]["state"] == "timeout", states[timed]
    body = s3_server.client().get_object(Bucket=bucket, Key="t/partial.txt")["Body"].read()
    assert body == b"partial\n"  # the time limit stopped the script, its results still left


def _script(job_site, work, user) -> str:
    job_site.write_script(work, "never.sh", "#!/bin/sh\nmkdir -p out\necho ran > out/ran\n", user)
    return "never.sh"


def test_credentials_in_container_only_on_request(job_site, user, s3_server, s3_dataset, s3_profile):
    work = job_site.workdir(user)
    env = {**s3_profile(user), "BERTH_BACKEND": "local"}
    job_site.write_script(work, "creds.sh", """\
        #!/bin/sh
        echo "file=$AWS_SHARED_CREDENTIALS_FILE endpoint=$AWS_ENDPOINT_URL"
        stat -c 'mode=%a owner=%u' "$AWS_SHARED_CREDENTIALS_FILE"
        grep -c aws_secret_access_key "$AWS_SHARED_CREDENTIALS_FILE"
        cat "$AWS_CONFIG_FILE"
    """, user)
    job_id = submit(user, job_site, work, "--template", "bb", "--s3-credentials-in-container", "-o", "c-%j.txt",
                    "creds.sh", env=env)
    # Environment credentials (no profile file) also stage, and never reach the container.
    keys = s3_server.user_keys
    aws_env = {"BERTH_BACKEND": "local", "AWS_ACCESS_KEY_ID": keys.access_key,
               "AWS_SECRET_ACCESS_KEY": keys.secret_key, "AWS_ENDPOINT_URL": s3_server.endpoint}
    job_site.write_script(work, "env.sh", "#!/bin/sh\nenv\nmd5sum one.bin\n", user)
    env_job = submit(user, job_site, work, "--template", "bb", "-o", "e-%j.txt",
                     "--stage-in", "s3://berth-data/ds/nested/level0/deeper0/small-0000.bin:one.bin", "env.sh",
                     env=aws_env)
    states = wait_for(user, job_site, [job_id, env_job], FINAL, env=env)
    assert states[job_id]["state"] == "completed", states[job_id]
    text = (work / f"c-{job_id}.txt").read_text()
    assert f"mode=600 owner={user.uid}" in text and "\n1\n" in text, text
    assert f"endpoint={s3_server.endpoint}" in text and f"endpoint_url = {s3_server.endpoint}" in text
    assert keys.secret_key not in text  # the script saw the file, the log did not get the key
    assert not list((job_site.jobs_dir / job_id).rglob("s3-credentials"))  # removed after the container
    assert states[env_job]["state"] == "completed", states[env_job]
    env_text = (work / f"e-{env_job}.txt").read_text()
    assert "AWS_" not in env_text and keys.secret_key not in env_text
    assert s3_dataset["nested/level0/deeper0/small-0000.bin"] in env_text


@pytest.mark.parametrize("command", ["status", "jobs", "submit"])
def test_credentials_of_a_killed_runner_are_removed_by_the_next_berth(job_site, user, s3_server, s3_profile,
                                                                       command):
    """A runner killed with SIGKILL (or a node crash) never runs its clean-up: the credentials
    file it wrote stayed in the record for good. The next `berth status`, `berth jobs` or
    `berth submit` of the user, which finds the job gone, removes it."""
    import os
    import signal
    import time

    work = job_site.workdir(user)
    env = {**s3_profile(user), "BERTH_BACKEND": "local"}
    job_site.write_script(work, "nap.sh", "#!/bin/sh\necho up > up.txt\nsleep 20\n", user)
    job_site.write_script(work, "quick.sh", "#!/bin/sh\ntrue\n", user)
    job_id = submit(user, job_site, work, "--template", "bb", "--s3-credentials-in-container", "nap.sh", env=env)
    wait_file(work / "up.txt", timeout_s=60, contains="up")
    record = job_site.jobs_dir / job_id
    files = [record / "ctr" / "s3-credentials", record / "ctr" / "s3-config"]
    assert all(path.exists() for path in files)
    runner = int((record / "runner.pid").read_text())
    os.kill(runner, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{runner}") and open(f"/proc/{runner}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the killed runner did not exit"
        time.sleep(0.1)
    assert all(path.exists() for path in files)  # nobody has looked yet
    if command == "status":
        status = json.loads(user.berth("status", job_id, "--json", env={**job_site.env, **env}).stdout)
    elif command == "jobs":
        status = wait_for(user, job_site, [job_id], FINAL, env=env)[job_id]
    else:
        other = submit(user, job_site, work, "--template", "bb", "quick.sh", env=env)
        assert other != job_id
        assert not any(path.exists() for path in files)  # by the submit itself, before any status
        status = wait_for(user, job_site, [job_id], FINAL, env=env)[job_id]
    assert status["state"] == "failed" and "runner is gone" in status["message"], status
    assert not any(path.exists() for path in files)
    assert s3_server.user_keys.secret_key not in "".join(
        p.read_text(errors="replace") for p in record.rglob("*") if p.is_file())


def test_bad_staging_options_are_refused_at_submit(job_site, user, s3_profile):
    work = job_site.workdir(user)
    job_site.write_script(work, "x.sh", "#!/bin/sh\ntrue\n", user)
    env = s3_profile(user, mode=0o644)
    cases = [
        (["--stage-in", "s3://berth-data/x"], 2, "--stage-in 's3://berth-data/x': no ':DEST'"),
        (["--stage-out-when", "sometimes"], 2, "--stage-out-when 'sometimes'"),
        (["--stage-in", "s3://berth-data/x:y"], 78, "chmod 600"),
        (["--stage-in", "s3://berth-data/x:y", "--s3-profile", "nope"], 78, "chmod 600"),
    ]
    for extra, code, words in cases:
        result = user.berth("submit", "--template", "bb", *extra, "x.sh", cwd=str(work), env={**job_site.env, **env})
        assert result.returncode == code and words in result.stderr, describe(result)
    env = s3_profile(user)
    result = user.berth("submit", "--template", "bb", "--stage-in", "s3://berth-data/x:y", "--s3-profile", "nope",
                        "x.sh", cwd=str(work), env={**job_site.env, **env})
    assert result.returncode == 78 and "unknown S3 profile 'nope'" in result.stderr, describe(result)
    assert not [p for p in job_site.jobs_dir.iterdir() if p.is_dir() and (p / "spec.json").exists()
                and "s3://berth-data/x:y" in (p / "spec.json").read_text()]


def test_a_job_cannot_turn_its_stage_out_dest_into_a_link_to_a_host_directory(job_site, user):
    """The container runs the image's code and can write the job's directory; a relative DEST
    it replaced with a link (results -> a directory of the user's it does not see) must not
    receive the job's files after the container ended (red team: the walk to DEST started at
    DEST, not at the job's directory)."""
    work = job_site.workdir(user)
    elsewhere = job_site.workdir(user)  # the user's, outside the job: what the link names
    job_site.write_script(work, "plant.sh", f"""\
        #!/bin/sh
        mkdir -p out
        echo planted > out/authorized_keys
        ln -s {elsewhere} results
    """, user)
    job_id = submit(user, job_site, work, "--template", "bb", "--stage-out", "out/:results/", "plant.sh",
                    env={"BERTH_BACKEND": "local"})
    states = wait_for(user, job_site, [job_id], FINAL, timeout_s=120, env={"BERTH_BACKEND": "local"})
    assert (states[job_id]["state"], states[job_id]["phase"]) == ("failed", "stage-out"), states[job_id]
    assert f"{work}/results is a symbolic link in the job's directory" in states[job_id]["message"]
    assert list(elsewhere.iterdir()) == []
