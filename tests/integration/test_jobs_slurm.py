"""Batch jobs on the real Slurm test cluster (4 slurmd "nodes" on loopback), as berthtest.

Slurm round trips are slow (sbatch polls; time limits are checked every 30 s with minute
granularity), so independent jobs are submitted together and waited for together.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.fixtures_runtime import process_alive
from tests.harness.users import describe
from tests.integration.jobs_helpers import HOME_SCRIPT, jobs, submit, wait_file, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

FINAL = ("completed", "failed", "cancelled", "timeout")


@pytest.fixture(scope="module")
def slurm_env(slurm_cluster, job_site):
    return {**slurm_cluster.env(), "BERTH_BACKEND": "slurm"}


def _counter(path) -> int:
    text = path.read_text().split()
    return int(text[-1]) if text else 0


def test_slurm_jobs_end_to_end(job_site, user, slurm_cluster, slurm_env):
    work = job_site.workdir(user)
    env = slurm_env
    job_site.write_script(work, "ok.sh", """\
        #!/bin/sh
        #BERTH -J hello -o out-%j.txt
        echo "uid=$(id -u) node=$SLURMD_NODENAME cwd=$(pwd) args=$*"
        echo written > "result-$BERTH_JOB_ID.txt"
    """, user)
    job_site.write_script(work, "three.sh", "#!/bin/sh\necho before\nexit 3\n", user)
    job_site.write_script(work, "steps.sh", f"""\
        #!/bin/sh
        #BERTH --nodes=2 --ntasks-per-node=1
        echo "batch on $SLURMD_NODENAME"
        srun -N2 -n2 berth run {job_site.image} sh -c 'echo "srun-step in-container=$(test -e /etc/os-release && head -1 /etc/os-release) node=$SLURMD_NODENAME"'
        berth srun -N2 -n2 sh -c 'echo "berth-srun node=$SLURMD_NODENAME image=$BERTH_JOB_IMAGE"'
        berth srun -N1 -n1 sh -c 'exit 5'
        echo "step status $?"
    """, user)
    job_site.write_script(work, "trap.sh", """\
        #!/bin/sh
        trap 'echo "trapped $BERTH_JOB_ID" > "trap-$BERTH_JOB_ID.txt"; exit 0' TERM
        echo started > "started-$BERTH_JOB_ID.txt"
        i=0
        while true; do i=$((i+1)); echo $i >> "count-$BERTH_JOB_ID.txt"; sleep 1; done
    """, user)
    ok = submit(user, job_site, work, "--template", "bb", "ok.sh", "x", env=env)
    three = submit(user, job_site, work, "--template", "bb", "three.sh", env=env)
    steps = submit(user, job_site, work, "--template", "bb", "steps.sh", env=env)
    timed = submit(user, job_site, work, "--template", "bb", "-t", "1", "trap.sh", env=env)
    cancelled = submit(user, job_site, work, "--template", "bb", "-o", "cancel-%j.out", "-e", "cancel-%j.err",
                       "trap.sh", env=env)
    suspended = submit(user, job_site, work, "--template", "bb", "trap.sh", env=env)
    slow = submit(user, job_site, work, "--template", "slowboot", "ok.sh", env=env)
    job_site.write_script(work, "gpu.sh", '#!/bin/sh\necho "gpus=$CUDA_VISIBLE_DEVICES"\nnvidia-smi -L\n', user)
    gpu = submit(user, job_site, work, "--template", "gpu", "gpu.sh", env=env)

    # Cancel: the trap runs within stop_timeout.
    wait_file(work / f"started-{cancelled}.txt", timeout_s=60)
    result = user.berth("cancel", cancelled, env={**job_site.env, **env})
    assert result.returncode == 0, describe(result)

    # Suspend/resume: the counter stops while suspended, and goes on after.
    try:
        wait_file(work / f"count-{suspended}.txt", timeout_s=60, contains="2")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{jobs(user, job_site, env)}\n"
                             + slurm_cluster.run("squeue").stdout + slurm_cluster.logs()) from None
    native = jobs(user, job_site, env)[suspended]["native_id"]
    slurm_cluster.run("scontrol", "suspend", native)
    assert jobs(user, job_site, env)[suspended]["state"] == "suspended"
    # slurmd freezes the job's cgroup asynchronously (about 1-2 s here): wait until the freezer
    # says so, then check that the count stands still.
    node = jobs(user, job_site, env)[suspended]["node"]
    # (proctrack/cgroup freezes each step's cgroup; the script and its container are in the batch step)
    freezer = Path(f"/sys/fs/cgroup/freezer/slurm_{node}/uid_{user.uid}/job_{native}/step_batch/freezer.state")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and freezer.read_text().strip() != "FROZEN":
        time.sleep(0.2)
    assert freezer.read_text().strip() == "FROZEN"
    frozen = _counter(work / f"count-{suspended}.txt")
    time.sleep(3.0)
    assert _counter(work / f"count-{suspended}.txt") == frozen
    slurm_cluster.run("scontrol", "resume", native)
    wait_file(work / f"count-{suspended}.txt", timeout_s=30, contains=str(frozen + 2))
    assert jobs(user, job_site, env)[suspended]["state"] == "running"
    result = user.berth("cancel", suspended, env={**job_site.env, **env})
    assert result.returncode == 0, describe(result)

    states = wait_for(user, job_site, [ok, three, steps, cancelled, suspended, slow, gpu], FINAL, timeout_s=120,
                      env=env)
    info = "\n" + json.dumps(states, indent=1) + slurm_cluster.logs()[-3000:]

    assert (states[ok]["state"], states[ok]["exit_code"], states[ok]["name"]) == ("completed", 0, "hello"), info
    assert states[ok]["native_id"].isdigit()
    output = (work / f"out-{ok}.txt").read_text()
    assert f"uid={user.uid} node=node" in output and f"cwd={work} args=x" in output
    written = work / f"result-{ok}.txt"
    assert (written.read_text(), written.stat().st_uid, written.stat().st_gid) == ("written\n", user.uid, user.gid)

    assert (states[three]["state"], states[three]["phase"], states[three]["exit_code"]) == ("failed", "script", 3), info
    assert user.berth("logs", three, env={**job_site.env, **env}).stdout == "before\n"

    assert states[steps]["state"] == "completed", info
    lines = user.berth("logs", steps, env={**job_site.env, **env}).stdout.splitlines()
    batch_node = next(line.split()[-1] for line in lines if line.startswith("batch on "))
    srun_nodes = sorted(line.rsplit("node=", 1)[1] for line in lines if line.startswith("srun-step"))
    berth_srun = sorted(line for line in lines if line.startswith("berth-srun"))
    assert len(srun_nodes) == 2 and len(set(srun_nodes)) == 2 and batch_node in srun_nodes, lines
    assert all('in-container=NAME="berth test busybox"' in line for line in lines if line.startswith("srun-step"))
    assert [line.split()[1] for line in berth_srun] == [f"node={n}" for n in srun_nodes], lines
    assert all(line.endswith(f"image={job_site.image}@{job_site.image.digest}") for line in berth_srun), lines
    assert "step status 5" in lines

    assert states[cancelled]["state"] == "cancelled", info
    assert (work / f"trap-{cancelled}.txt").read_text() == f"trapped {cancelled}\n"
    # Slurm's own word on the cancel reaches the job's error file (carried by berth's runner, as
    # Slurm writes only a file in the record: docs/jobs.md, "Output files"), not its output.
    native_cancelled = states[cancelled]["native_id"]
    wait_file(work / f"cancel-{cancelled}.err", timeout_s=30,
              contains=f"error: *** JOB {native_cancelled} ON {states[cancelled]['node']} CANCELLED AT ")
    assert "CANCELLED" not in (work / f"cancel-{cancelled}.out").read_text()
    assert states[suspended]["state"] == "cancelled", info

    assert (states[slow]["state"], states[slow]["phase"]) == ("failed", "boot"), info
    assert "boot_timeout of 4 s expired" in states[slow]["message"]

    # The template's gpu=1 became --gres=gpu:1: Slurm allocated one and the container sees it.
    assert states[gpu]["state"] == "completed", info
    # The container gets the one GPU Slurm allocated (of the fake tree's two), renumbered 0.
    gpu_lines = user.berth("logs", gpu, env={**job_site.env, **env}).stdout.splitlines()
    assert gpu_lines[0] == "gpus=0" and len(gpu_lines) == 2, gpu_lines
    assert re.fullmatch(r"GPU 0: Berth Fake GPU \(UUID: GPU-0000000[01]-fake-\S+\)", gpu_lines[1]), gpu_lines

    # Without a reachable Slurm (no SLURM_CONF), `berth jobs` still lists every job, from records.
    offline = user.berth("jobs", "--json", env=job_site.env)
    assert offline.returncode == 0, describe(offline)
    assert "berth: warning: slurm jobs show their last recorded state: squeue failed" in offline.stderr
    listed = {job["id"]: job for job in json.loads(offline.stdout)}
    assert (listed[ok]["state"], listed[three]["exit_code"], listed[ok]["native_state"]) == ("completed", 3, "unknown")

    # The time limit (1 minute; Slurm checks every 30 s) ends as timeout, after the trap ran.
    states = wait_for(user, job_site, [timed], FINAL, timeout_s=150, env=env, poll_s=2)
    assert states[timed]["state"] == "timeout", info
    assert (work / f"trap-{timed}.txt").read_text() == f"trapped {timed}\n"
    # Without -e, Slurm's message goes where the job's stderr goes: its output (here the default).
    deadline = time.monotonic() + 30
    while "DUE TO TIME LIMIT ***" not in (logs := user.berth("logs", timed, env={**job_site.env, **env})).stdout:
        assert time.monotonic() < deadline, describe(logs)
        time.sleep(0.5)
    assert f"*** JOB {states[timed]['native_id']} ON " in logs.stdout and logs.stderr == "", describe(logs)


def test_slurm_job_output_files_are_the_users_and_truncated_or_appended_as_sbatch_does(job_site, user,
                                                                                      slurm_cluster, slurm_env):
    """berth's runner, not slurmstepd, opens -o/-e on the node (docs/security.md, "Paths berth
    resolves"): the job's stdout and stderr land in the files named, as the user, with the mode
    they were created with at submission; an existing file is truncated, as sbatch's default
    open mode does, or appended to with --open-mode=append; without -e stderr goes to -o; and
    `berth logs` shows both streams and nothing else."""
    work = job_site.workdir(user)
    job_site.write_script(work, "both.sh", """\
        #!/bin/sh
        #BERTH --template=bb
        echo "out $BERTH_JOB_ID"
        echo "err $BERTH_JOB_ID" >&2
    """, user)
    for name, mode in (("kept.out", 0o640), ("kept.err", 0o600), ("appended.out", 0o644)):
        (work / name).write_text("OLD\n")
        os.chown(work / name, user.uid, user.gid)
        os.chmod(work / name, mode)
    old_umask = os.umask(0o022)
    try:
        split = submit(user, job_site, work, "-o", "kept.out", "-e", "kept.err", "both.sh", env=slurm_env)
        appended = submit(user, job_site, work, "--open-mode=append", "-o", "appended.out", "both.sh", env=slurm_env)
        joined = submit(user, job_site, work, "-o", "joined-%j.out", "both.sh", env=slurm_env)
    finally:
        os.umask(old_umask)
    states = wait_for(user, job_site, [split, appended, joined], FINAL, timeout_s=120, env=slurm_env)
    info = json.dumps(states, indent=1)
    assert [states[j]["state"] for j in (split, appended, joined)] == ["completed"] * 3, info
    expected = {"kept.out": (f"out {split}\n", 0o640), "kept.err": (f"err {split}\n", 0o600),
                "appended.out": (f"OLD\nout {appended}\nerr {appended}\n", 0o644),
                f"joined-{joined}.out": (f"out {joined}\nerr {joined}\n", 0o644)}
    for name, (text, mode) in expected.items():
        info_ = os.stat(work / name)
        assert ((work / name).read_text(), info_.st_mode & 0o7777, info_.st_uid, info_.st_gid) == \
            (text, mode, user.uid, user.gid), (name, info)
    logs = user.berth("logs", split, env={**job_site.env, **slurm_env})
    assert (logs.returncode, logs.stdout, logs.stderr) == (0, f"out {split}\n", f"err {split}\n"), describe(logs)
    # Slurm wrote only its own file in the record (0600): truncated at the start, or berth's
    # first line kept in append mode (which told the runner to append).
    for job, text in ((joined, ""), (appended, "berth: Slurm's own output for this job; berth job-exec carries it "
                                               "into the job's error file\n")):
        own = job_site.jobs_dir / job / "slurm.out"
        assert (own.read_text(), own.stat().st_mode & 0o777) == (text, 0o600), job


def test_slurms_messages_from_before_the_runner_starts_reach_the_error_file(job_site, user, slurm_cluster,
                                                                           slurm_env):
    """What slurmstepd says before berth's runner starts (here: the job's directory was removed
    while it waited) lands in the job's error file, ahead of what the job itself says, as it did
    when Slurm wrote the file itself."""
    work = job_site.workdir(user)
    job_site.write_script(work, "job.sh", "#!/bin/sh\n#BERTH --template=bb\necho ran\n", user)
    gone = work / "gone"
    gone.mkdir()
    os.chown(gone, user.uid, user.gid)
    result = user.berth("submit", "--json", "--hold", "-D", "gone", "-o", f"{work}/out-%j.txt", "job.sh",
                        cwd=str(work), env={**job_site.env, **slurm_env})
    assert result.returncode == 0, describe(result)
    submitted = json.loads(result.stdout)
    job = submitted["id"]
    gone.rmdir()
    released = user.run(["scontrol", "release", submitted["native_id"]], env=slurm_cluster.env())
    assert released.returncode == 0, describe(released)
    states = wait_for(user, job_site, [job], FINAL, timeout_s=120, env=slurm_env)
    text = (work / f"out-{job}.txt").read_text()
    assert states[job]["state"] == "failed", (states, text)
    slurm = (job_site.jobs_dir / job / "slurm.out").read_text()  # (22.05 says it twice)
    assert f"error: couldn't chdir to `{gone}'" in slurm and text.startswith(slurm), (text, slurm)
    logs = user.berth("logs", job, env={**job_site.env, **slurm_env})
    assert (logs.stdout, logs.stderr) == (text, ""), describe(logs)


def test_a_requeued_runs_own_slurm_messages_are_shown_whole_in_truncate_mode(job_site, user):
    """Slurm requeues a job in its default open mode (truncate): it empties its file for the new
    run. The first run's runner carried Slurm's messages of that run (its directory was gone:
    ``couldn't chdir``); the second run's runner refuses its error file, swapped for a link
    meanwhile, so nothing carries that run's messages. `berth logs` showed them without their
    first bytes (as many as the first run had carried); it must show them whole. A cluster of
    its own whose short credential lifetime makes Slurm's hold of a requeued job 10 s, not 120."""
    import shutil
    import tempfile

    from tests.harness.slurm import start_cluster, usable

    if usable():
        pytest.skip(usable())
    root = Path(tempfile.mkdtemp(prefix="berth-slurm-requeue-"))
    cluster = start_cluster(root, nodes=1, tmpfs_root=root / "tmpfs", cred_expire_s=10)
    try:
        env = {**job_site.env, **cluster.env(), "BERTH_BACKEND": "slurm"}
        work = job_site.workdir(user)
        job_site.write_script(work, "job.sh", "#!/bin/sh\n#BERTH --template=bb\necho ran\n", user)
        gone = work / "gone"
        gone.mkdir()
        os.chown(gone, user.uid, user.gid)
        result = user.berth("submit", "--json", "--hold", "-D", "gone", "-o", f"{work}/out-%j.txt",
                            "-e", f"{work}/err-%j.txt", "job.sh", cwd=str(work), env=env)
        assert result.returncode == 0, describe(result)
        submitted = json.loads(result.stdout)
        job, native = submitted["id"], submitted["native_id"]
        gone.rmdir()
        assert user.run(["scontrol", "release", native], env=cluster.env()).returncode == 0
        wait_for(user, job_site, [job], FINAL, timeout_s=120, env=env)
        own = job_site.jobs_dir / job / "slurm.out"
        first = own.read_bytes()
        assert b"couldn't chdir" in first and (work / f"err-{job}.txt").read_bytes().startswith(first), first
        # The second run: its directory is back, its error file is a link now.
        gone.mkdir()
        os.chown(gone, user.uid, user.gid)
        (work / f"err-{job}.txt").unlink()
        (work / f"err-{job}.txt").symlink_to(work / "job.sh")
        requeued = user.run(["scontrol", "requeue", native], env=cluster.env())
        assert requeued.returncode == 0, describe(requeued)
        deadline = time.monotonic() + 120
        while b"refused the job's output file" not in own.read_bytes() or \
                not jobs(user, job_site, env)[job]["state"] in FINAL:
            assert time.monotonic() < deadline, (own.read_bytes(), jobs(user, job_site, env)[job])
            time.sleep(0.5)
        second = own.read_bytes()
        assert len(second) > len(first) and not second.startswith(first), (first, second)
        logs = user.berth("logs", job, env=env)
        assert logs.stderr.encode().endswith(second), describe(logs)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_slurm_job_writes_its_submit_directory_when_HOME_is_not_the_passwd_home(job_site, user, slurm_env,
                                                                             home_elsewhere):
    """Issue 9 defect 1 on Slurm: sbatch exports the submitting shell's HOME to the node, where
    the job runner and the container must agree on it."""
    work = home_elsewhere / "project"
    work.mkdir()
    os.chown(work, user.uid, user.gid)
    job_site.write_script(work, "home.sh", HOME_SCRIPT, user)
    env = {**slurm_env, "HOME": str(home_elsewhere)}
    job = submit(user, job_site, work, "--template", "bb", "home.sh", env=env)
    state = wait_for(user, job_site, [job], FINAL, timeout_s=60, env=env)[job]
    output = (work / f"home-{job}.txt").read_text()
    assert state["state"] == "completed", (state, output)
    assert output == f"home={home_elsewhere} cwd={work}\n"
    assert (work / "result.txt").read_text() == "written\n"


def test_slurm_bad_input_submits_nothing(job_site, user, slurm_cluster, slurm_env):
    work = job_site.workdir(user)
    job_site.write_script(work, "ok.sh", "#!/bin/sh\necho ok\n", user)
    before = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    cases = [
        (["--template", "bb", "-c", "2", "ok.sh"], 77, "exceeds template 'bb' (cpu=1)"),
        (["--template", "bb", "-N", "99", "ok.sh"], 9, "sbatch refused job"),
        (["--template", "bb", "-p", "nosuchpartition", "ok.sh"], 9, "sbatch refused job"),
    ]
    for argv, code, message in cases:
        result = user.berth("submit", *argv, cwd=str(work), env={**job_site.env, **slurm_env})
        assert (result.returncode, message in result.stderr) == (code, True), describe(result)
    # Nothing new in the queue (a job of an earlier test may have left it meanwhile).
    after = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    assert set(after.split()) - set(before.split()) == set(), (before, after)


def test_cluster_stop_ends_every_job_even_suspended(user, user_tmp):
    """The harness's own teardown: jobs outlive slurmd, so stop() must end them (a frozen job
    left behind once froze a later cluster's job of the same number)."""
    from tests.harness.slurm import SlurmCluster, usable

    if usable():
        pytest.skip(usable())
    cluster = SlurmCluster(root=user_tmp / "cluster", nodes=["extra1", "extra2"])
    cluster.start()
    work = user_tmp
    try:
        result = user.run(["sbatch", "--parsable", "-N", "2", "-o", f"{work}/out", "--wrap",
                           f"echo $$ > {work}/pid; srun -N2 sleep 300"], env=cluster.env())
        assert result.returncode == 0, describe(result)
        job_id = result.stdout.strip()
        pid = int(wait_file(work / "pid", timeout_s=30).strip())
        time.sleep(1.0)  # let the srun step start on both nodes
        cluster.run("scontrol", "suspend", job_id)
    finally:
        cluster.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.1)
    assert not process_alive(pid)
    leftovers = subprocess.run(["pgrep", "-u", user.name, "-f", "sleep 300"], capture_output=True, text=True)
    assert leftovers.stdout == ""


def _scontrol(cluster, native: str) -> dict[str, str]:
    """``scontrol show job`` as KEY=VALUE pairs (a value may hold spaces: Comment, AdminComment)."""
    text = cluster.run("scontrol", "show", "job", native).stdout
    fields = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("Comment=", "AdminComment=")):
            key, _, value = line.partition("=")
            fields[key] = value.strip()
            continue
        for word in line.split():
            key, _, value = word.partition("=")
            fields[key] = value
    return fields


def test_an_sbatch_script_runs_unchanged_with_one_berth_line(job_site, user, slurm_cluster, slurm_env):
    """Issue 11: an existing sbatch script plus one #BERTH line: its #SBATCH options reach Slurm
    (scontrol show job; the QOS through the test cluster's job_submit plugin, as there is no
    slurmdbd), the command line wins over #BERTH over #SBATCH, berth's record tag survives the
    user's --comment, and the script runs in the container. Bad input: sbatch's own message,
    nothing queued; options that would take over berth's job refused."""
    work = job_site.workdir(user)
    job_site.write_script(work, "legacy.sh", """\
        #!/bin/sh
        #SBATCH -A chemproj
        #SBATCH -q high
        #SBATCH -C ib
        #SBATCH --mail-type=END,FAIL --mail-user=alice@example.org
        #SBATCH --comment="first run" -J from-sbatch -t 5
        #SBATCH --licenses=fluent:1
        #BERTH --template=bb -J from-berth
        echo "in-container=$(head -1 /etc/os-release) id=$SLURM_JOB_ID"
    """, user)
    env = {**job_site.env, **slurm_env}
    result = user.berth("submit", "--json", "--requeue", "--signal=B:USR1@30", "-t", "3", "legacy.sh",
                        cwd=str(work), env=env)
    assert result.returncode == 0, describe(result)
    submitted = json.loads(result.stdout)
    job, native = submitted["id"], submitted["native_id"]
    fields = _scontrol(slurm_cluster, native)
    assert (fields["Account"], fields["Features"], fields["Licenses"]) == ("chemproj", "ib", "fluent:1"), fields
    assert (fields["MailType"], fields["MailUser"]) == ("END,FAIL", "alice@example.org"), fields
    assert fields["AdminComment"] == "requested qos=high", fields
    assert (fields["JobName"], fields["TimeLimit"], fields["Requeue"]) == ("from-berth", "00:03:00", "1"), fields
    assert fields["Comment"] == f"berth:{job_site.jobs_dir / job} first run", fields
    states = wait_for(user, job_site, [job], FINAL, timeout_s=120, env=slurm_env)
    assert states[job]["state"] == "completed", states
    output = user.berth("logs", job, env=env).stdout
    assert output == f'in-container=NAME="berth test busybox" id={native}\n'

    before = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    job_site.write_script(work, "ok.sh", "#!/bin/sh\necho ok\n", user)
    cases = [
        (["--template", "bb", "--nodez=2", "ok.sh"], 9, "sbatch: unrecognized option '--nodez=2'"),
        (["--template", "bb", "-C", "nosuchfeature", "ok.sh"], 9, "Invalid feature specification"),
        (["--template", "bb", "--wrap=hostname", "ok.sh"], 2, "--wrap cannot be used with berth submit"),
        (["--template", "bb", "--export=ALL,BERTH_CONFIG_DIR=/tmp/x", "ok.sh"], 2,
         "BERTH_CONFIG_DIR is berth's own variable"),
        (["--template", "bb", "-o", str(job_site.jobs_dir / "x.out"), "ok.sh"], 2, "inside berth's jobs directory"),
        (["--template", "bb", "--gpus-per-node=1", "ok.sh"], 77, "exceeds template 'bb' (gpu=0 per node)"),
    ]
    for argv, code, message in cases:
        records = len(list(job_site.jobs_dir.iterdir()))
        refused = user.berth("submit", *argv, cwd=str(work), env=env)
        assert (refused.returncode, message in refused.stderr) == (code, True), describe(refused)
        assert len(list(job_site.jobs_dir.iterdir())) == records
    after = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    assert set(after.split()) - set(before.split()) == set(), (before, after)


def test_dependencies_chain_on_slurm(job_site, user, slurm_cluster, slurm_env):
    """Issue 11: --dependency with berth ids (made Slurm ids) and Slurm's own ids. A -> B (fails)
    -> C (afterok:B) never starts (the test cluster has kill_invalid_depend: Slurm cancels it);
    D (afterany on B's Slurm id) runs. A dependency on a job Slurm does not know is refused,
    nothing queued."""
    work = job_site.workdir(user)
    env = slurm_env
    job_site.write_script(work, "step.sh", '#!/bin/sh\nsleep 1\necho "ran $BERTH_JOB_ID"\nexit "$1"\n', user)
    first = submit(user, job_site, work, "--template", "bb", "step.sh", "0", env=env)
    middle = submit(user, job_site, work, "--template", "bb", f"--dependency=afterok:{first}", "step.sh", "1",
                    env=env)
    listed = jobs(user, job_site, env)
    middle_native = listed[middle]["native_id"]
    never = submit(user, job_site, work, "--template", "bb", "-d", f"afterok:{middle}", "step.sh", "0", env=env)
    anyway = submit(user, job_site, work, "--template", "bb", f"--dependency=afterany:{middle_native}",
                    "step.sh", "0", env=env)
    fields = _scontrol(slurm_cluster, jobs(user, job_site, env)[never]["native_id"])
    assert fields["Dependency"].startswith(f"afterok:{middle_native}"), fields
    states = wait_for(user, job_site, [first, middle, never, anyway], FINAL, timeout_s=120, env=env)
    assert [states[j]["state"] for j in (first, middle, never, anyway)] == \
        ["completed", "failed", "cancelled", "completed"], states
    assert states[never]["started_at"] is None
    before = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    refused = user.berth("submit", "--template", "bb", "--dependency=afterok:999999", "step.sh", "0", cwd=str(work),
                         env={**job_site.env, **env})
    # (sbatch itself would queue it and start it at once: Slurm takes an unknown id as satisfied)
    assert refused.returncode == 2 and "--dependency names job 999999, which Slurm does not know" in refused.stderr, \
        describe(refused)
    after = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    assert set(after.split()) - set(before.split()) == set()


def test_job_arrays_on_slurm(job_site, user, slurm_cluster, slurm_env):
    """Issue 11: the same --array=1-5%2 script on Slurm: one sbatch --array, every task runs once
    in the image with its task id (Slurm's SLURM_ARRAY_*, berth's BERTH_ARRAY_*), outputs per
    %A_%a (berth's array id), tasks listed as ARRAY_TASK with Slurm ids NATIVE_TASK, one task
    cancelled, the others complete. An array spec berth cannot read is refused, nothing queued."""
    work = job_site.workdir(user)
    env = {**job_site.env, **slurm_env}
    job_site.write_script(work, "task.sh", """\
        #!/bin/sh
        #SBATCH --array=1-5%2
        #SBATCH -o out-%A_%a.txt
        #BERTH --template=bb
        echo "task=$SLURM_ARRAY_TASK_ID berth=$BERTH_ARRAY_JOB_ID/$BERTH_ARRAY_TASK_ID native=$SLURM_ARRAY_JOB_ID"
        sleep 2
    """, user)
    result = user.berth("submit", "--json", "task.sh", cwd=str(work), env=env)
    assert result.returncode == 0, describe(result)
    submitted = json.loads(result.stdout)
    array, native = submitted["id"], submitted["native_id"].split("_")[0]
    tasks = {task["job"]: task["id"] for task in submitted["tasks"]}
    assert list(tasks) == [f"{array}_{n}" for n in range(1, 6)], submitted
    listed = jobs(user, job_site, slurm_env)
    victim = [j for j in tasks if listed[tasks[j]]["state"] == "pending"][-1]  # %2: most wait
    cancelled = user.berth("cancel", victim, env=env)
    assert cancelled.returncode == 0, describe(cancelled)
    states = wait_for(user, job_site, tasks.values(), FINAL, timeout_s=120, env=slurm_env)
    info = json.dumps(states, indent=1)
    assert {j: states[tasks[j]]["state"] for j in tasks} == {
        j: "cancelled" if j == victim else "completed" for j in tasks}, info
    assert [states[tasks[f"{array}_{n}"]]["native_id"] for n in range(1, 6)] == [f"{native}_{n}" for n in range(1, 6)]
    for job in tasks:
        n = int(job.split("_")[1])
        text = (work / f"out-{array}_{n}.txt").read_text()
        assert text == ("" if job == victim else f"task={n} berth={array}/{n} native={native}\n"), (job, text)
    refused = user.berth("submit", "--template", "bb", "--array=1-5%0", "task.sh", cwd=str(work), env=env)
    assert refused.returncode == 2 and "'%0' is not a positive number" in refused.stderr, describe(refused)


def test_an_array_stages_its_image_once_per_node(job_site, user, slurm_cluster, slurm_env):
    """Issue 11: with ``stage_to_local`` the image is copied to a node once, not once per array
    task. Four tasks of one array on one node (two at a time): each task asks the host (a step
    through the agent) for the node-local copy's inode and birth time and for the image mounts
    present. Every task sees the same file (one copy: a second copy would be a new file,
    renamed over the first); the mounts are one per task, keyed by the task's own Slurm job id
    (Slurm ends a job's processes with it, so a mount cannot outlive its task); after the array
    nothing is left mounted and the copy stays for the next job."""
    import shutil

    work = job_site.workdir(user)
    config_dir = job_site.root / f"etc-berth-stage-{os.getpid()}"
    shutil.copytree(job_site.config_dir, config_dir)
    (config_dir / "conf.d" / "70-stage.toml").write_text("stage_to_local = true\n")
    state = Path(job_site.workdir(user)) / "state"
    state.mkdir(mode=0o700)
    os.chown(state, user.uid, user.gid)
    env = {**job_site.env, **slurm_env, "BERTH_CONFIG_DIR": str(config_dir), "BERTH_STATE_DIR": str(state)}
    job_site.write_script(work, "task.sh", f"""\
        #!/bin/sh
        #SBATCH --array=1-4%2
        #SBATCH -w node2
        #SBATCH -o out-%A_%a.txt
        #BERTH --template=bb
        srun -N1 -n1 sh -c 'echo "job $SLURM_JOB_ID"; stat -c "copy %i %w" {state}/images/*.sqfs; ls {state}/images'
        sleep 1
    """, user)
    result = user.berth("submit", "--json", "task.sh", cwd=str(work), env=env)
    assert result.returncode == 0, describe(result)
    submitted = json.loads(result.stdout)
    array = submitted["id"]
    tasks = [task["id"] for task in submitted["tasks"]]
    states = wait_for(user, job_site, tasks, FINAL, timeout_s=120, env=slurm_env)
    assert all(states[t]["state"] == "completed" and states[t]["node"] == "node2" for t in tasks), \
        json.dumps(states, indent=1)
    copies, mounts = set(), {}
    for n in range(1, 5):
        lines = (work / f"out-{array}_{n}.txt").read_text().splitlines()
        job = next(line.split()[1] for line in lines if line.startswith("job "))
        copies |= {line for line in lines if line.startswith("copy ")}
        # this task's own mount (another task's may be listed too while both run)
        mounts[job] = [line for line in lines if "@" in line and line.endswith(f"@slurm-{job}")]
    assert len(copies) == 1, f"the image was copied more than once on node2: {copies}"
    assert len(mounts) == 4 and all(len(keys) == 1 for keys in mounts.values()), mounts
    images = sorted(os.listdir(state / "images"))
    assert [name for name in images if name.endswith(".sqfs")] and not [n for n in images if "@" in n], images
    # the same file is still there, untouched: the next job on this node reuses it
    copy = next(state / "images" / name for name in images if name.endswith(".sqfs"))
    after = subprocess.run(["stat", "-c", "copy %i %w", str(copy)], capture_output=True, text=True).stdout.strip()
    assert {after} == copies


def test_a_step_on_several_nodes_pulls_a_missing_image_once(job_site, user, slurm_cluster, slurm_env, registry,
                                                            busybox_image):
    """An image in no store, run by a step of three nodes (`srun -N3 berth run IMAGE`): the
    step's node 0 pulls it, once; the other nodes wait for it to appear in the store instead of
    each asking the registry and queueing on the store's lock (docs/scale.md). The registry,
    behind a counting proxy, sees the requests of one pull, and every node runs the image.
    When node 0's pull fails, the others stop at once with its reason."""
    import shutil

    from tests.harness.countingproxy import CountingProxy
    from tests.harness.storetest import via
    from tests.harness.users import berth_executable

    proxy = CountingProxy(registry.host).start()
    base = None
    try:
        config_dir = job_site.root / f"etc-berth-proxy-{os.getpid()}"
        shutil.copytree(job_site.config_dir, config_dir)
        (config_dir / "conf.d" / "80-proxy.toml").write_text(
            f'[[registries]]\nhost = "{proxy.host}"\ninsecure = true\n')
        base = user.tempdir("berth-step-pull-")
        env = {**job_site.env, **slurm_env, "BERTH_CONFIG_DIR": str(config_dir)}
        ref = via(proxy, busybox_image)
        # one pull on its own, for the number of requests a pull makes
        alone = user.berth("pull", "-q", ref, env={**env, "BERTH_USER_STORE": str(base / "alone")})
        assert alone.returncode == 0, describe(alone)
        one_pull = sorted(proxy.requests)
        proxy.reset()
        step = user.run(["srun", "-N3", "-n3", "--ntasks-per-node=1", str(berth_executable()), "run", ref,
                         "/bin/sh", "-c", "echo ran on $SLURMD_NODENAME"],
                        env={**env, "BERTH_USER_STORE": str(base / "store")}, timeout=300)
        assert step.returncode == 0, describe(step)
        nodes = [line.split()[-1] for line in step.stdout.splitlines() if line.startswith("ran on node")]
        assert len(nodes) == 3 == len(set(nodes)), describe(step)
        assert sorted(proxy.requests) == one_pull, proxy.requests

        # node 0's pull fails (no such tag): the waiting nodes stop at once with its reason,
        # long before lock_timeout_s
        missing = ref.rsplit(":", 1)[0] + ":no-such-tag"
        started = time.monotonic()
        failed = user.run(["srun", "-N3", "-n3", "--ntasks-per-node=1", str(berth_executable()), "run", missing,
                           "/bin/true"], env={**env, "BERTH_USER_STORE": str(base / "store"),
                                              "BERTH_LOCK_TIMEOUT_S": "300"}, timeout=400)
        elapsed = time.monotonic() - started
        assert failed.returncode != 0 and elapsed < 120, (elapsed, describe(failed))
        assert failed.stderr.count("could not pull it") == 2, describe(failed)
    finally:
        proxy.stop()
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)  # the test user's stores: one per run was left in /tmp


def test_sequential_runs_of_a_job_share_a_lingering_mount_that_ends_with_the_job(
        user, user_tmp, slurm_cluster, slurm_env, runtime_images):
    """image_mount_linger in a plain sbatch job that calls `berth run` twice: the second run
    reuses the first one's mount; the lingering mount's reaper and daemon keep nothing of the
    job alive (Slurm ends them with the job's processes), and the next berth on the node
    removes the dead mount."""
    from tests.harness.fixtures_runtime import fuse_mounts_under, lingering_reapers
    from tests.harness.users import berth_executable

    state = user_tmp / "state"
    berth = f"{berth_executable()} run --debug {runtime_images.busybox} true"
    env = {**slurm_env, "BERTH_STATE_DIR": str(state), "BERTH_IMAGE_MOUNT_LINGER": "10m"}
    result = user.run(["sbatch", "--wait", "--parsable", "-w", "node1", "-o", f"{user_tmp}/out", "--wrap",
                       f"{berth} && {berth} && echo done"], env=env, timeout=120)
    assert result.returncode == 0, describe(result)
    output = (user_tmp / "out").read_text()
    assert output.count("sharing the image mount") == 1 and "(it was lingering)" in output, output
    assert output.rstrip().endswith("done"), output

    def daemons() -> list[str]:
        found = subprocess.run(["pgrep", "-u", user.name, "-f", f"squashfuse.* {state}/"], capture_output=True, text=True)
        return found.stdout.split()

    deadline = time.monotonic() + 30
    while daemons() or lingering_reapers(user.uid, str(state)):
        assert time.monotonic() < deadline, ("Slurm left the job's daemon or reaper", daemons())
        time.sleep(0.1)
    again = user.berth("run", str(runtime_images.setuid), "true", env={"BERTH_STATE_DIR": str(state)})
    assert again.returncode == 0, describe(again)
    assert fuse_mounts_under(str(state)) == [] and not (state / "images").exists()
