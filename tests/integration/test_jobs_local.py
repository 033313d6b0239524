"""Batch jobs on the local backend, for real: berth submit as the unprivileged test user,
jobs running detached in rootless containers from the site store, states in files."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.harness.users import describe
from tests.integration.jobs_helpers import HOME_SCRIPT, jobs, record_count, submit, wait_file, wait_for

pytestmark = pytest.mark.integration

FINAL = ("completed", "failed", "cancelled", "timeout")


def test_output_ownership_exit_codes_and_signals(job_site, user):
    work = job_site.workdir(user)
    job_site.write_script(work, "ok.sh", """\
        #!/bin/sh
        #BERTH --job-name=hello
        #BERTH -o out-%j.txt
        echo "uid=$(id -u) cwd=$(pwd) args=$* image=$BERTH_JOB_IMAGE"
        echo "cpus=$(nproc)"
        grep "Max data size" /proc/self/limits
        echo "jobdir=$(ls "$BERTH_JOB_DIR" | tr '\n' ' ')"
        cat /etc/os-release | head -1
        echo written > result.txt
        echo to-stderr >&2
    """, user)
    job_site.write_script(work, "three.sh", "#!/bin/sh\necho before\nexit 3\n", user)
    job_site.write_script(work, "killed.sh", "#!/bin/sh\nkill -KILL $$\n", user)
    ok = submit(user, job_site, work, "--template", "bb", "ok.sh", "a b", "c")
    three = submit(user, job_site, work, "--template", "bb", "three.sh")
    killed = submit(user, job_site, work, "--template", "bb", "killed.sh")
    states = wait_for(user, job_site, [ok, three, killed], FINAL)

    assert (states[ok]["state"], states[ok]["exit_code"], states[ok]["name"]) == ("completed", 0, "hello")
    output = (work / f"out-{ok}.txt").read_text()
    assert f"uid={user.uid} cwd={work} args=a b c image={job_site.image}@" in output
    assert "cpus=1" in output  # the template's cpu=1 on a 2-core machine
    limits = [line.split() for line in output.splitlines() if line.startswith("Max data size")]
    assert limits and limits[0][3:5] == [str(256 << 20)] * 2, output  # memsz=256M (no delegated cgroup v2 here)
    assert 'NAME="berth test busybox"' in output
    # The container sees only its own part of the record: no other jobs, specs or slot locks.
    assert f"jobdir=agent bin script started \n" in output
    assert "to-stderr" in output  # without -e, stderr goes with stdout, as sbatch does
    written = work / "result.txt"
    assert written.read_text() == "written\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (user.uid, user.gid)
    assert (states[three]["state"], states[three]["phase"], states[three]["exit_code"]) == ("failed", "script", 3)
    assert (states[killed]["state"], states[killed]["signal"], states[killed]["exit_code"]) == ("failed", 9, None)

    status = user.berth("status", three, "--json", env=job_site.env)
    assert json.loads(status.stdout)["exit_code"] == 3
    logs = user.berth("logs", three, env=job_site.env)
    assert logs.stdout == "before\n", describe(logs)
    table = user.berth("status", three, env=job_site.env)
    assert "failed (script)" in table.stdout and "exit:         3" in table.stdout


def test_job_writes_its_submit_directory_when_HOME_is_not_the_passwd_home(job_site, user, home_elsewhere):
    """Issue 9 defect 1: with HOME pointing elsewhere than the passwd home (sites set it to a
    project or scratch path), a job submitted from a directory under that HOME writes there."""
    work = home_elsewhere / "project"
    work.mkdir()
    os.chown(work, user.uid, user.gid)
    job_site.write_script(work, "home.sh", HOME_SCRIPT, user)
    job = submit(user, job_site, work, "--template", "bb", "home.sh", env={"HOME": str(home_elsewhere)})
    state = wait_for(user, job_site, [job], FINAL)[job]
    output = (work / f"home-{job}.txt").read_text()
    assert state["state"] == "completed", (state, output)
    assert output == f"home={home_elsewhere} cwd={work}\n"
    assert (work / "result.txt").read_text() == "written\n"


def test_cancel_gives_stop_timeout_and_time_limit_gives_timeout(job_site, user):
    work = job_site.workdir(user)
    job_site.write_script(work, "trap.sh", """\
        #!/bin/sh
        trap 'echo "trapped $BERTH_JOB_ID" > "trap-$BERTH_JOB_ID.txt"; exit 0' TERM
        echo started > "started-$BERTH_JOB_ID.txt"
        while true; do sleep 1; done
    """, user)
    cancelled = submit(user, job_site, work, "--template", "bb", "trap.sh")
    timed = submit(user, job_site, work, "--template", "bb", "-t", "0:04", "trap.sh")
    wait_file(work / f"started-{cancelled}.txt")
    assert jobs(user, job_site)[cancelled]["state"] == "running"
    result = user.berth("cancel", cancelled, env=job_site.env)
    assert result.returncode == 0, describe(result)
    states = wait_for(user, job_site, [cancelled, timed], FINAL, timeout_s=40)
    assert states[cancelled]["state"] == "cancelled"
    assert (work / f"trap-{cancelled}.txt").read_text() == f"trapped {cancelled}\n"
    assert states[timed]["state"] == "timeout"
    assert (work / f"trap-{timed}.txt").read_text() == f"trapped {timed}\n"
    elapsed = states[timed]["ended_at"] - states[timed]["started_at"]
    # The limit was enforced, not early: at least the 4 s asked for. The upper bound only says
    # the job was stopped at all (its loop never ends); a loaded node adds seconds of latency.
    assert 3.5 < elapsed < 40, elapsed
    again = user.berth("cancel", cancelled, env=job_site.env)
    assert again.returncode != 0 and "already ended (cancelled)" in again.stderr


def test_boot_timeout_and_staging_failures_name_the_phase(job_site, user):
    work = job_site.workdir(user)
    job_site.write_script(work, "never.sh", "#!/bin/sh\necho should-not-run\n", user)
    started = time.monotonic()
    job = submit(user, job_site, work, "--template", "slowboot", "never.sh")
    # An image in no store, from a registry that is not there: the job fails while staging.
    unreachable = submit(user, job_site, work, "--image", "127.0.0.1:9/test/missing:1", "never.sh",
                         env={"BERTH_PULL_RETRIES": "0"})
    states = wait_for(user, job_site, [job, unreachable], FINAL, timeout_s=60)
    failed = states[unreachable]
    assert (failed["state"], failed["phase"]) == ("failed", "staging"), failed
    assert "127.0.0.1:9" in failed["message"]
    state = states[job]
    assert (state["state"], state["phase"]) == ("failed", "boot")
    assert "boot_timeout of 4 s expired while starting the container" in state["message"]
    assert time.monotonic() - started < 20
    assert not (work / "should-not-run").exists()
    logs = user.berth("logs", job, env=job_site.env)
    assert "should-not-run" not in logs.stdout


def test_cancel_while_starting_the_container(job_site, user):
    work = job_site.workdir(user)
    job_site.write_script(work, "never.sh", "#!/bin/sh\necho should-not-run\n", user)
    job = submit(user, job_site, work, "--template", "hangboot", "never.sh")
    assert wait_for(user, job_site, [job], ("staging",), timeout_s=20)[job]["state"] == "staging"
    time.sleep(1.0)  # well into the container's start-up (blocked reading its env file)
    result = user.berth("cancel", job, env=job_site.env)
    assert result.returncode == 0, describe(result)
    state = wait_for(user, job_site, [job], FINAL, timeout_s=20)[job]
    assert (state["state"], state["phase"], state["message"]) == ("cancelled", None, "the job was cancelled")
    assert "should-not-run" not in user.berth("logs", job, env=job_site.env).stdout


def test_concurrency_limit_keeps_jobs_pending_and_runner_is_detached(job_site, user):
    work = job_site.workdir(user)
    limit = {"BERTH_LOCAL_MAX_JOBS": "1"}
    job_site.write_script(work, "hold.sh", """\
        #!/bin/sh
        echo running > "run-$BERTH_JOB_ID.txt"
        while [ ! -e release ]; do sleep 0.2; done
    """, user)
    # Occupy the only slot with a job of a private jobs dir, so other tests' jobs do not interfere.
    private = {**limit, "BERTH_JOBS_DIR": str(job_site.workdir(user))}
    first = submit(user, job_site, work, "--template", "bb", "hold.sh", env=private)
    second = submit(user, job_site, work, "--template", "bb", "hold.sh", env=private)
    wait_file(work / f"run-{first}.txt")
    time.sleep(1.0)
    current = jobs(user, job_site, private)
    assert (current[first]["state"], current[second]["state"]) == ("running", "pending")
    assert not (work / f"run-{second}.txt").exists()

    # The runner has its own session and no controlling terminal: the shell's exit cannot stop it.
    runner_pid = _runner_pid(private, first)
    fields = open(f"/proc/{runner_pid}/stat").read().rsplit(")", 1)[1].split()
    session, tty = int(fields[3]), int(fields[4])
    assert (session, tty) == (runner_pid, 0)

    # A pending job cancelled while it waits never starts.
    third = submit(user, job_site, work, "--template", "bb", "hold.sh", env=private)
    result = user.berth("cancel", third, env={**job_site.env, **private})
    assert result.returncode == 0, describe(result)
    assert wait_for(user, job_site, [third], FINAL, timeout_s=10, env=private)[third]["state"] == "cancelled"
    assert jobs(user, job_site, private)[first]["state"] == "running"

    (work / "release").touch()
    states = wait_for(user, job_site, [first, second], FINAL, timeout_s=30, env=private)
    assert (states[first]["state"], states[second]["state"]) == ("completed", "completed")
    assert states[second]["started_at"] >= states[first]["ended_at"] - 0.5
    assert not (work / f"run-{third}.txt").exists()


def _runner_pid(env: dict, job_id: str) -> int:
    with open(os.path.join(env["BERTH_JOBS_DIR"], job_id, "runner.pid")) as handle:
        return int(handle.read().split()[0])


def test_logs_follow_until_the_job_ends(job_site, user):
    work = job_site.workdir(user)
    job_site.write_script(work, "slow.sh", "#!/bin/sh\nfor i in 1 2 3; do echo line $i; sleep 0.5; done\n", user)
    job = submit(user, job_site, work, "--image", job_site.image, "slow.sh")
    result = user.berth("logs", "-f", job, env=job_site.env, timeout=60)
    assert result.stdout == "line 1\nline 2\nline 3\n", describe(result)
    assert jobs(user, job_site)[job]["state"] == "completed"


BAD_INPUT = [
    (["--template", "nope", "ok.sh"], 3, "no template named 'nope'"),
    (["--template", "bb", "-N", "abc", "ok.sh"], 2, "--nodes 'abc': not a whole number"),
    (["--template", "bb", "-n", "-2", "ok.sh"], 2, "--ntasks -2: must be at least 1"),
    (["--template", "bb", "-N", "1000000", "ok.sh"], 2, "--nodes 1000000: more than berth accepts"),
    (["--template", "bb", "--mem", "12X", "ok.sh"], 2, "--mem '12X': not a size"),
    (["--template", "bb", "--time", "1:2:3:4", "ok.sh"], 2, "--time '1:2:3:4': not a duration"),
    (["--template", "bb", "--gres", "tpu:1", "ok.sh"], 2, "--gres 'tpu:1': berth knows only gpu:N"),
    (["--template", "bb", "-c", "4", "ok.sh"], 77, "--cpus-per-task 4 exceeds template 'bb' (cpu=1)"),
    (["--template", "bb", "--mem", "1G", "ok.sh"], 77, "--mem 1GiB exceeds template 'bb' (memsz=256MiB)"),
    (["--template", "bb", "--gres", "gpu:1", "ok.sh"], 77, "--gres gpu:1 exceeds template 'bb' (gpu=0)"),
    (["--template", "bb", "missing.sh"], 2, "job script missing.sh does not exist"),
    (["--template", "bb", "secret.sh"], 2, "job script secret.sh is not readable"),
    (["--template", "bb", "typo.sh"], 2, "typo.sh line 3: unknown option '--nodez'"),
    (["--template", "bb", "prefix.sh"], 2, "prefix.sh line 2: unknown directive '#BERTHX'"),
    (["--template", "bb", "noshebang.sh"], 2, "does not start with '#!'"),
    (["--template", "bb", "--image", "busybox", "ok.sh"], 2, "--template and --image exclude each other"),
    (["both.sh"], 2, "--template and --image exclude each other"),
    (["ok.sh"], 2, "no image for the job"),
    (["--template", "bb", "--backend", "pbs", "ok.sh"], 2, "--backend 'pbs': unknown backend"),
    (["--template", "bb", "-N", "2", "ok.sh"], 2, "--nodes 2: the local backend runs jobs on this machine only"),
    (["--template", "bb", "-o", "/nonexistent/dir/out", "ok.sh"], 2, "the directory /nonexistent/dir does not exist"),
    (["--image", "bad reference!", "ok.sh"], 20, "bad reference!"),
    (["--template", "bb", "-J", "x\n", "ok.sh"], 2, "--job-name 'x\\n': use letters"),
]


@pytest.fixture(scope="module")
def bad_input_dir(job_site, user):
    work = job_site.workdir(user)
    job_site.write_script(work, "ok.sh", "#!/bin/sh\necho ok\n", user)
    job_site.write_script(work, "secret.sh", "#!/bin/sh\necho secret\n", user)
    (work / "secret.sh").chmod(0o000)
    job_site.write_script(work, "typo.sh", "#!/bin/sh\n#BERTH -N 1\n#BERTH --nodez=2\necho x\n", user)
    job_site.write_script(work, "prefix.sh", "#!/bin/sh\n#BERTHX --nodes=2\necho x\n", user)
    job_site.write_script(work, "noshebang.sh", "echo no interpreter\n", user)
    job_site.write_script(work, "both.sh", "#!/bin/sh\n#BERTH --template bb\n#BERTH --image busybox\necho\n", user)
    return work


@pytest.mark.parametrize("argv,exit_code,message", BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_is_refused_and_nothing_is_submitted(job_site, user, bad_input_dir, argv, exit_code, message):
    before = record_count(job_site)
    result = user.berth("submit", *argv, cwd=str(bad_input_dir), env=job_site.env)
    assert result.returncode == exit_code, describe(result)
    assert message in result.stderr, describe(result)
    assert result.stdout == ""
    assert record_count(job_site) == before
    assert not any(p.name.startswith(".") and p.name != ".slots" for p in job_site.jobs_dir.iterdir())


def test_command_line_wins_over_directives(job_site, user):
    work = job_site.workdir(user)
    job_site.write_script(work, "two.sh", """\
        #!/bin/sh
        #BERTH --nodes=2 --job-name=from-directive
        #BERTH --image 127.0.0.1:9/not/this:1
        echo ran
    """, user)
    refused = user.berth("submit", "--template", "bb", "two.sh", cwd=str(work), env=job_site.env)
    assert refused.returncode == 2 and "--nodes 2: the local backend" in refused.stderr, describe(refused)
    job = submit(user, job_site, work, "--template", "bb", "-N", "1", "two.sh")
    state = wait_for(user, job_site, [job], FINAL)[job]
    assert (state["state"], state["name"], state["template"]) == ("completed", "from-directive", "bb")


def test_unknown_job_is_a_clear_error(job_site, user):
    for command in (["status", "999999"], ["logs", "999999"], ["cancel", "999999"]):
        result = user.berth(*command, env=job_site.env)
        assert result.returncode == 3, describe(result)
        assert "no job '999999'" in result.stderr


def test_a_record_with_a_newline_in_its_name_keeps_one_row(job_site, user):
    """Issue 12 #6: `-J $'x\\n'` is refused now (BAD_INPUT); a record that an older berth wrote
    with such a name must still not split `berth jobs` rows or `berth status` lines."""
    work = job_site.workdir(user)
    job_site.write_script(work, "named.sh", "#!/bin/sh\necho named\n", user)
    job = submit(user, job_site, work, "--template", "bb", "-J", "named", "named.sh")
    wait_for(user, job_site, [job], FINAL)
    spec_file = job_site.jobs_dir / job / "spec.json"
    spec = json.loads(spec_file.read_text())
    spec["name"] = "x\nFAKE 1 local completed"
    spec_file.write_text(json.dumps(spec))  # root writes in place: owner and mode stay the user's
    table = user.berth("jobs", env=job_site.env)
    assert table.returncode == 0, describe(table)
    rows = table.stdout.splitlines()
    assert len(rows) == 1 + record_count(job_site), describe(table)
    row = next(line for line in rows if line.startswith(f"{job} "))
    assert "x\\nFAKE 1 local completed" in row, describe(table)
    assert not any(line.startswith("FAKE") for line in rows)
    shown = user.berth("status", job, env=job_site.env)
    assert shown.returncode == 0, describe(shown)
    assert "name:         x\\nFAKE 1 local completed\n" in shown.stdout, describe(shown)


def test_output_paths_planted_by_another_user_are_refused(job_site, user, other_user):
    """Issue 12 #4: in a shared sticky directory another user plants, at the names a victim's
    job will write, a symbolic link to the victim's own file, a file of their own, and a FIFO.
    Each is refused with a message before anything is submitted (the FIFO without hanging);
    the victim's file is untouched; a fresh name works, and the file is the victim's."""
    import subprocess

    shared = job_site.root / "shared-sticky"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    work = job_site.workdir(user)
    job_site.write_script(work, "ok.sh", "#!/bin/sh\necho secret-output\necho secret-error >&2\n", user)
    precious = work / "precious.txt"
    precious.write_text("keep me\n")
    os.chown(precious, user.uid, user.gid)
    for argv in (["ln", "-s", str(precious), str(shared / "link.out")],
                 ["sh", "-c", f"echo attacker > {shared / 'theirs.out'}; chmod 666 {shared / 'theirs.out'}"],
                 ["mkfifo", "-m", "666", str(shared / "fifo.out")]):
        planted = other_user.run(argv)
        assert planted.returncode == 0, describe(planted)
    cases = [
        (["-o", str(shared / "link.out")], "--output", "link.out: refused: it is a symbolic link"),
        (["-o", str(shared / "theirs.out")], "--output", f"refused: it belongs to another user (uid {other_user.uid})"),
        (["-e", str(shared / "fifo.out")], "--error", "refused: it is not a regular file (a FIFO"),
    ]
    for options, option, message in cases:
        before = record_count(job_site)
        try:
            result = user.berth("submit", "--template", "bb", *options, "ok.sh", cwd=str(work),
                                env=job_site.env, timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"berth submit {options} hung") from None
        assert result.returncode == 2, describe(result)
        assert option in result.stderr and message in result.stderr, describe(result)
        assert record_count(job_site) == before
    assert precious.read_text() == "keep me\n"
    assert (shared / "theirs.out").read_text() == "attacker\n"
    job = submit(user, job_site, work, "--template", "bb", "-o", str(shared / "mine-%j.out"), "ok.sh")
    state = wait_for(user, job_site, [job], FINAL)[job]
    assert state["state"] == "completed", state
    mine = shared / f"mine-{job}.out"
    # (stdout and stderr share the file; their order is the container's)
    assert (sorted(mine.read_text().splitlines()), mine.stat().st_uid) == (["secret-error", "secret-output"], user.uid)


def test_a_template_that_contradicts_a_later_pin_is_refused_at_submit(job_site, user):
    """Issue 12 #7: a template created before the site pinned runc keeps custom="--runtime crun";
    submitting it is refused (exit 77) before anything is queued, instead of failing at boot."""
    import subprocess

    from tests.harness.users import berth_executable

    admin = {**os.environ, **job_site.env}
    created = subprocess.run([str(berth_executable()), "template", "create", "crunpin", f"image={job_site.image}",
                              "cpu=1", "memsz=64M", "custom=--runtime crun"], env=admin, capture_output=True,
                             text=True, timeout=300)
    assert created.returncode == 0, created.stderr
    pin = job_site.config_dir / "conf.d" / "90-pin-runtime.toml"
    pin.write_text('runtime = "runc"\npinned = ["runtime"]\n')
    pin.chmod(0o644)
    try:
        work = job_site.workdir(user)
        job_site.write_script(work, "ok.sh", "#!/bin/sh\necho ok\n", user)
        before = record_count(job_site)
        result = user.berth("submit", "--template", "crunpin", "ok.sh", cwd=str(work), env=job_site.env)
        assert result.returncode == 77, describe(result)
        assert "--runtime crun: the site configuration pins runtime = runc" in result.stderr, describe(result)
        assert record_count(job_site) == before
    finally:
        pin.unlink()
        subprocess.run([str(berth_executable()), "template", "delete", "crunpin"], env=admin, capture_output=True,
                       timeout=60)


def test_dependencies_chain_on_the_local_backend(job_site, user):
    """Issue 11: afterok/afterany/afternotok with berth ids on the local backend. In a chain
    A -> B (fails) -> C (afterok:B), C never starts: cancelled with the reason, no output;
    D (afterany:B) and E (afternotok:B) run after B. A dependency on a job that does not exist
    is refused at submission."""
    work = job_site.workdir(user)
    job_site.write_script(work, "step.sh", """\
        #!/bin/sh
        sleep 1
        echo "ran $BERTH_JOB_ID" >> order
        exit "$1"
    """, user)
    first = submit(user, job_site, work, "--template", "bb", "step.sh", "0")
    middle = submit(user, job_site, work, "--template", "bb", f"--dependency=afterok:{first}", "step.sh", "1")
    never = submit(user, job_site, work, "--template", "bb", "-d", f"afterok:{middle}", "-o", "never-%j.out",
                   "step.sh", "0")
    anyway = submit(user, job_site, work, "--template", "bb", f"--dependency=afterany:{middle}", "step.sh", "0")
    notok = submit(user, job_site, work, "--template", "bb", f"--dependency=afternotok:{middle}", "step.sh", "0")
    states = wait_for(user, job_site, [first, middle, never, anyway, notok], FINAL, timeout_s=120)
    assert [states[j]["state"] for j in (first, middle, never, anyway, notok)] == \
        ["completed", "failed", "cancelled", "completed", "completed"], states
    assert f"afterok:{middle} can never be satisfied" in states[never]["message"], states[never]
    assert states[never]["started_at"] is None and not (work / f"never-{never}.out").read_text()
    ran = [line.split()[1] for line in (work / "order").read_text().splitlines()]
    assert ran[:2] == [first, middle] and sorted(ran[2:]) == sorted([anyway, notok]), ran
    refused = user.berth("submit", "--template", "bb", "--dependency=afterok:999999", "step.sh", "0",
                         cwd=str(work), env=job_site.env)
    assert refused.returncode == 2 and "--dependency names job 999999" in refused.stderr, describe(refused)


def test_scheduler_only_options_are_ignored_with_one_line(job_site, user):
    """Issue 11: the same #SBATCH script runs locally; account, QoS, constraint and mail options
    are named in one note, never silently dropped; --begin would change when it runs: refused."""
    work = job_site.workdir(user)
    job_site.write_script(work, "legacy.sh", """\
        #!/bin/sh
        #SBATCH -A chemproj -q high
        #SBATCH -C ib --mail-type=END
        #BERTH --template=bb
        echo local-ok
    """, user)
    result = user.berth("submit", "legacy.sh", cwd=str(work), env=job_site.env)
    assert result.returncode == 0, describe(result)
    notes = [line for line in result.stderr.splitlines() if line.startswith("berth: note:")]
    assert notes == ["berth: note: ignoring --account, --qos, --constraint, --mail-type: the local backend "
                     "has no scheduler to give them to"], describe(result)
    job = result.stdout.strip()
    assert wait_for(user, job_site, [job], FINAL)[job]["state"] == "completed"
    assert user.berth("logs", job, env=job_site.env).stdout == "local-ok\n"
    refused = user.berth("submit", "--begin=now+1hour", "legacy.sh", cwd=str(work), env=job_site.env)
    assert refused.returncode == 2 and "--begin: the local backend cannot honour it" in refused.stderr, \
        describe(refused)


def test_job_arrays_on_the_local_backend(job_site, user):
    """Issue 11: --array=1-5%2: every task runs once in the image with its own task id, outputs
    per %A_%a, at most two at once, states listed per task (ARRAY_TASK); one task cancelled
    while pending, the others complete; cancelling the array id cancels what is left."""
    work = job_site.workdir(user)
    job_site.write_script(work, "task.sh", """\
        #!/bin/sh
        #SBATCH --array=1-5%2
        #SBATCH -o out-%A_%a.txt
        #BERTH --template=bb
        echo "task=$SLURM_ARRAY_TASK_ID array=$SLURM_ARRAY_JOB_ID os=$(head -1 /etc/os-release)"
        sleep 2
    """, user)
    result = user.berth("submit", "--json", "task.sh", cwd=str(work), env=job_site.env)
    assert result.returncode == 0, describe(result)
    submitted = json.loads(result.stdout)
    array = submitted["id"]
    tasks = {task["job"]: task["id"] for task in submitted["tasks"]}
    assert list(tasks) == [f"{array}_{n}" for n in range(1, 6)], submitted
    # The runners race for the two slots: cancel a task that is still waiting once two run.
    deadline = time.monotonic() + 60
    while True:
        listed = jobs(user, job_site)
        running = [j for j in tasks if listed[tasks[j]]["state"] in ("staging", "running")]
        waiting = [j for j in tasks if listed[tasks[j]]["state"] == "pending"]
        if len(running) == 2 and waiting or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    victim = waiting[-1]
    cancelled = user.berth("cancel", victim, env=job_site.env)
    assert cancelled.returncode == 0, describe(cancelled)
    states = wait_for(user, job_site, tasks.values(), FINAL, timeout_s=120)
    assert {j: states[tasks[j]]["state"] for j in tasks} == {
        j: "cancelled" if j == victim else "completed" for j in tasks}, json.dumps(states)
    assert [states[tasks[j]]["job"] for j in tasks] == list(tasks)
    for job in tasks:
        n = int(job.split("_")[1])
        text = (work / f"out-{array}_{n}.txt").read_text()
        expected = "" if job == victim else f'task={n} array={array} os=NAME="berth test busybox"\n'
        assert text == expected, (job, text)
    spans = sorted((states[tasks[j]]["started_at"], states[tasks[j]]["ended_at"]) for j in tasks if j != victim)
    most = max(sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans)
    assert most <= 2, spans
    table = user.berth("jobs", env=job_site.env)
    assert any(line.startswith(f"{array}_3 ") for line in table.stdout.splitlines()), describe(table)
    again = user.berth("cancel", array, env=job_site.env)
    assert again.returncode == 9 and f"job array {array} already ended" in again.stderr, describe(again)


def test_a_job_ends_while_its_image_mount_lingers_and_doctor_cleanup_ends_the_mount(job_site, user):
    """image_mount_linger: the reaper of the job's lingering image mount is no process of the
    job's: the runner does not wait for it, the job completes at once and its runner exits."""
    from tests.harness.fixtures_runtime import fuse_mounts_under, lingering_reapers

    work = job_site.workdir(user)
    state_dir = job_site.workdir(user) / "state"
    private = {"BERTH_JOBS_DIR": str(job_site.workdir(user)), "BERTH_STATE_DIR": str(state_dir),
               "BERTH_IMAGE_MOUNT_LINGER": "10m"}
    job_site.write_script(work, "hi.sh", "#!/bin/sh\necho hi\n", user)
    job = submit(user, job_site, work, "--template", "bb", "-o", "hi.out", "hi.sh", env=private)
    state = wait_for(user, job_site, [job], FINAL, timeout_s=60, env=private)[job]
    assert state["state"] == "completed" and (work / "hi.out").read_text() == "hi\n", state
    runner = _runner_pid(private, job)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{runner}") and open(f"/proc/{runner}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the job's runner waits for the lingering mount's reaper"
        time.sleep(0.1)
    (mount,) = [m for m in fuse_mounts_under(str(state_dir)) if "/images/" in m]
    with open(os.path.join(os.path.dirname(mount), "mount.json")) as handle:
        reaper = json.load(handle)["reaper"][0]
    assert os.path.exists(f"/proc/{reaper}")
    cleaned = user.berth("doctor", "--cleanup", env={**job_site.env, **private})
    assert f"unmounted the shared image mount {mount} (lingering, not in use)" in cleaned.stdout, describe(cleaned)
    deadline = time.monotonic() + 20
    while fuse_mounts_under(str(state_dir)) or lingering_reapers(user.uid, str(state_dir)):
        assert time.monotonic() < deadline, (fuse_mounts_under(str(state_dir)), lingering_reapers(user.uid, str(state_dir)))
        time.sleep(0.1)


def test_a_module_named_file_in_the_submit_directory_does_not_replace_berths(job_site, user):
    """The runner starts in the submit directory (the user's files, often on the shared file
    system): with ``python -m berth`` that directory came first on berth's module path, and a
    file there named like a module berth imports ran instead of it (berth.proc.berth_argv: -P)."""
    work = job_site.workdir(user)
    job_site.write_script(work, "argparse.py", "raise SystemExit('the submit directory shadowed argparse')\n", user)
    job_site.write_script(work, "ok.sh", """\
        #!/bin/sh
        echo done > done.txt
    """, user)
    job = submit(user, job_site, work, "--template", "bb", "ok.sh")
    state = wait_for(user, job_site, [job], FINAL)[job]
    assert state["state"] == "completed", state
    assert (work / "done.txt").read_text() == "done\n"
