"""Symbolic-link attacks on the paths berth resolves (issue 8, scenario 9), as the unprivileged
test users: ``berthtest`` (the victim, who runs berth) and ``berthtest2`` (the attacker, who can
write where the victim works: a shared project or scratch directory, mode 0777; this machine's
``fs.protected_symlinks`` is 0, as it is on many compute nodes, so even sticky directories
would not stop a link being followed) or an image's author.

Each path is attacked with a link planted before berth runs and, where berth resolves the path
in several steps (a window), with a race: the attacker swaps a directory for a link to the
victim's files in a loop while berth runs again and again. A race test asserts that berth met
the link at least once (its refusal names it): a loop that never hit the window proves nothing.
The outcome is always the same: refused with a message that says why, or the write lands where
the victim meant; never in the victim's other files, never a copy of their secrets.

docs/security.md ("Paths berth resolves") has the inventory: every path, its protection and
the test that attacks it (some live in other files).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.fixtures_runtime import BOTH_RUNTIMES, _busybox_rootfs, _mksquashfs
from tests.harness.users import describe

pytestmark = pytest.mark.security

FILES = [f"f{index:02d}" for index in range(30)]  # many files: many chances to meet the link per run
RACE_DEADLINE_S = 90.0
RACE_MIN_RUNS = 3

#: The attacker's loop: swap ``path`` (a directory of the attacker's) for a link to ``victim``
#: and back until ``stop`` exists or the deadline; prints "ready", then the number of swaps.
SWAPPER = r"""
import os, sys, time
path, victim, stop, limit_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
parked, swaps, deadline = path + ".parked", 0, time.monotonic() + limit_s


def attempt(step, *args):
    try:
        step(*args)
        return True
    except OSError:
        return False


print("ready", flush=True)
while time.monotonic() < deadline and not os.path.exists(stop):
    attempt(os.rename, path, parked)
    if attempt(os.symlink, victim, path):
        swaps += 1
    time.sleep(0.0005)  # each state lasts about as long as the other
    attempt(os.unlink, path)
    if not attempt(os.rename, parked, path):  # berth made a directory there meanwhile: aside with it
        attempt(os.rename, path, f"{path}.{swaps}.made-by-berth")
        attempt(os.rename, parked, path)
    time.sleep(0.0005)
print(swaps, flush=True)
"""


def shared_dir(user, name: str) -> Path:
    """A directory of the victim's that the attacker can write too (a group project directory)."""
    path = user.tempdir(prefix=f"berth-{name}-")
    os.chmod(path, 0o777)
    return path


def private_files(user, path: Path, text: str) -> dict[str, str]:
    """The victim's own directory (0700) with FILES holding ``text``; returns its contents."""
    path.mkdir(mode=0o700)
    for name in FILES:
        (path / name).write_text(f"{text} {name}\n")
    for item in (path, *path.iterdir()):
        os.chown(item, user.uid, user.gid)
    return contents(path)


def attacker_dir(other_user, path: Path, text: str) -> None:
    """A directory of the attacker's, writable by all, with FILES holding ``text``."""
    path.mkdir()
    for name in FILES:
        (path / name).write_text(f"{text} {name}\n")
    for item in (path, *path.iterdir()):
        os.chown(item, other_user.uid, other_user.gid)
        os.chmod(item, 0o777 if item == path else 0o666)


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def plant(other_user, link: Path, target: Path) -> None:
    subprocess.run(["runuser", "-u", other_user.name, "--", "ln", "-s", str(target), str(link)], check=True)


class Race:
    """The attacker's swap loop (as ``other_user``) around ``path`` while the test runs berth."""

    def __init__(self, other_user, path: Path, victim: Path, stop_dir: Path) -> None:
        self.stop = stop_dir / f".stop-{os.urandom(4).hex()}"
        self.process = subprocess.Popen(
            ["runuser", "-u", other_user.name, "--", sys.executable, "-c", SWAPPER, str(path), str(victim),
             str(self.stop), str(RACE_DEADLINE_S + 30)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        assert self.process.stdout.readline().strip() == "ready", self.process.stderr.read()

    def finish(self) -> int:
        """Stop the loop; the number of swaps it made."""
        self.stop.touch()
        out, err = self.process.communicate(timeout=60)
        self.stop.unlink()
        assert self.process.returncode == 0, err
        return int(out.split()[-1])


def run_during_race(user, race: Race, argv: list[str], cwd: Path, env=None) -> tuple[int, int, int]:
    """Run berth ``argv`` as the victim until it has refused a link at least once and run
    RACE_MIN_RUNS times (or the deadline passes). Returns (runs, refusals, swaps)."""
    runs = refusals = 0
    deadline = time.monotonic() + RACE_DEADLINE_S
    try:
        while time.monotonic() < deadline and not (refusals and runs >= RACE_MIN_RUNS):
            result = user.berth(*argv, cwd=str(cwd), env=env, timeout=120)
            runs += 1
            assert "Traceback" not in result.stderr, describe(result)
            if "symbolic link" in result.stderr and result.returncode == 0:
                # Met while planning (a stage-out walking SRC): skipped with a note, never read
                # (the callers check that nothing leaked); only a refusal after the plan counts.
                assert "skipped" in result.stderr and "links are never followed" in result.stderr, \
                    describe(result)
            elif "symbolic link" in result.stderr:
                refusals += 1
    finally:
        swaps = race.finish()
    print(f"race: {runs} berth runs, {refusals} refused the link, {swaps} swaps")  # shown with -s or -rP
    return runs, refusals, swaps


# ---------------------------------------------------------------------------------------------
# Staging: --stage-in/--stage-out (berth stage in|out runs the same code as a job's steps)


def test_stage_out_glob_does_not_follow_a_planted_directory_link(user, other_user, user_tmp):
    """``results/**`` in a shared directory where the attacker planted ``results/evil`` ->
    the victim's 0700 directory: glob's ``**`` descends into linked directories, and berth
    copied the victim's secrets (world-readable) to DEST. They are skipped, with a note."""
    results = shared_dir(user, "results")
    (results / "mine.txt").write_text("result\n")
    os.chown(results / "mine.txt", user.uid, user.gid)
    private_files(user, user_tmp / "secret", "SECRET")
    plant(other_user, results / "evil", user_tmp / "secret")
    out = user_tmp / "out"
    try:
        result = user.berth("stage", "out", f"{results}/**:{out}/", cwd=str(user_tmp))
        assert result.returncode == 0, describe(result)
        copied = {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()}
        assert copied == {"mine.txt": "result\n"}, describe(result)
        assert f"{results}/evil is a symbolic link" in result.stderr, describe(result)
    finally:
        shutil.rmtree(results, ignore_errors=True)


def _victim_and_shared_dest(user, user_tmp: Path) -> tuple[dict[str, str], Path]:
    """The victim's ``results/sub/FILES`` (to stage out), their own directory ``victim`` (what
    the attacker aims at; its contents returned) and a shared DEST."""
    results = user_tmp / "results"
    (results / "sub").mkdir(parents=True)
    for name in FILES:
        (results / "sub" / name).write_text("REPLACED\n")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(results)], check=True)
    return private_files(user, user_tmp / "victim", "ORIGINAL"), shared_dir(user, "dest")


def test_stage_out_refuses_a_planted_link_below_dest(user, other_user, user_tmp):
    """DEST in a shared directory; the attacker planted ``DEST/sub`` -> a directory of the
    victim's: berth wrote ``sub/*`` through it, over the victim's files. Refused, naming it."""
    victim, dest = _victim_and_shared_dest(user, user_tmp)
    plant(other_user, dest / "sub", user_tmp / "victim")
    try:
        result = user.berth("stage", "out", f"results/:{dest}/", cwd=str(user_tmp))
        assert result.returncode != 0, describe(result)
        assert f"{dest}/sub is a symbolic link" in result.stderr, describe(result)
        assert contents(user_tmp / "victim") == victim
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_stage_in_from_s3_refuses_a_planted_link_below_dest(s3_server, s3_profile, user, other_user, user_tmp):
    """The same for objects: ``--stage-in s3://B/prefix/:DEST/`` with ``DEST/sub`` planted as a
    link to the victim's directory (berth made the parent directories through it)."""
    client = s3_server.client()
    bucket = s3_server.new_bucket("links")
    for name in FILES:
        client.put_object(Bucket=bucket, Key=f"data/sub/{name}", Body=b"REPLACED\n")
    victim = private_files(user, user_tmp / "victim", "ORIGINAL")
    dest = shared_dir(user, "dest")
    plant(other_user, dest / "sub", user_tmp / "victim")
    try:
        result = user.berth("stage", "in", f"s3://{bucket}/data/:{dest}/", cwd=str(user_tmp), env=s3_profile(user))
        assert result.returncode != 0, describe(result)
        assert f"{dest}/sub is a symbolic link" in result.stderr, describe(result)
        assert contents(user_tmp / "victim") == victim
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_stage_out_race_swapping_a_dest_directory_for_a_link(user, other_user, user_tmp):
    """The attacker swaps ``DEST/sub`` (a directory of theirs) for a link to the victim's
    directory and back in a loop while the victim stages out again and again: between berth
    making (or checking) ``sub`` and writing into it, the link came in. Every write lands in
    DEST or is refused; the victim's files never change."""
    victim, dest = _victim_and_shared_dest(user, user_tmp)
    attacker_dir(other_user, dest / "sub", "attacker's")
    try:
        race = Race(other_user, dest / "sub", user_tmp / "victim", dest)
        runs, refusals, swaps = run_during_race(user, race, ["stage", "out", f"results/:{dest}/"], user_tmp)
        assert contents(user_tmp / "victim") == victim, f"{runs} runs, {swaps} swaps"
        assert swaps > runs and refusals >= 1, \
            f"berth never met the link ({runs} runs, {refusals} refusals, {swaps} swaps): the race proves nothing"
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_stage_out_race_swapping_a_source_directory_for_a_link(user, other_user, user_tmp):
    """The source side: ``results/`` is shared, and the attacker swaps ``results/sub`` (theirs,
    holding files named like the victim's) for a link to the victim's 0700 directory while the
    victim stages ``results/`` out: berth planned ``results/sub/f00`` and then read it through
    the link. No secret ever reaches DEST."""
    results = shared_dir(user, "results")
    attacker_dir(other_user, results / "sub", "public")
    private_files(user, user_tmp / "secret", "SECRET")
    out = user_tmp / "out"
    try:
        race = Race(other_user, results / "sub", user_tmp / "secret", results)
        runs, refusals, swaps = run_during_race(user, race, ["stage", "out", f"{results}/:{out}/"], user_tmp)
        leaked = [str(p) for p in out.rglob("*") if p.is_file() and "SECRET" in p.read_text()]
        assert leaked == [], f"{runs} runs, {swaps} swaps"
        assert swaps > runs and refusals >= 1, \
            f"berth never met the link ({runs} runs, {refusals} refusals, {swaps} swaps): the race proves nothing"
    finally:
        shutil.rmtree(results, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Mount points inside a hostile image's root


def _linked_image(scratch: Path, name: str, links: dict[str, str]) -> Path:
    root = scratch / f"{name}-root"
    _busybox_rootfs(root, with_etc=name != "etc")
    for path, target in links.items():
        entry = root / path
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        entry.symlink_to(target)
    return _mksquashfs(root, scratch / f"{name}.sqfs")


#: (case, links in the image (HOME stands for the victim's home), berth run options)
IMAGE_LINK_CASES = [
    ("etc", {"etc": "HOME"}, []),
    ("etc-relative", {"etc": "../../../../../../../..HOME"}, []),
    ("mount", {"data": "HOME/made-by-a-mount"}, ["-v", "SRC:/data"]),
    ("workdir", {"app": "HOME/made-by-the-workdir"}, ["--workdir", "/app"]),
]


@BOTH_RUNTIMES
@pytest.mark.parametrize("case, links, options", IMAGE_LINK_CASES, ids=[c[0] for c in IMAGE_LINK_CASES])
def test_image_links_create_nothing_in_host_directories(runtime_env, home_elsewhere, case, links, options):
    """An image whose /etc (or a mount's or the working directory's path) is a link into the
    user's home: berth's identity files and mount points land in the home bind, so the runtime
    created empty ``passwd``/``group`` files, or directories, in the user's real home on the host.
    Refused before the runtime runs, naming the link; the home stays empty."""
    home = home_elsewhere
    links = {path: target.replace("HOME", str(home)) for path, target in links.items()}
    image = _linked_image(runtime_env.scratch, case, links)
    source = runtime_env.scratch / "src"
    source.mkdir(exist_ok=True)
    os.chown(source, runtime_env.user.uid, runtime_env.user.gid)
    argv = [option.replace("SRC", str(source)) for option in options]
    result = runtime_env.berth("run", *argv, str(image), "true", env={"HOME": str(home)})
    assert result.returncode == 125, describe(result)
    assert "berth will not create mount points in a host directory" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(home)) == []


def test_image_links_that_carry_the_home_itself_still_run(runtime_env, home_elsewhere):
    """The refusal above must not catch images whose links move the home as a whole (an
    image's /var -> /altvar, as ostree images link /home -> /var/home): a working directory and
    a mount asked for inside the home follow the same links as the home and are the user's own
    choice, as they are without links."""
    home = home_elsewhere
    (home / "proj").mkdir()
    (home / "data").mkdir()
    for item in (home / "proj", home / "data"):
        os.chown(item, runtime_env.user.uid, runtime_env.user.gid)
    root = runtime_env.scratch / "altvar-root"
    _busybox_rootfs(root)
    (root / "altvar" / "tmp").mkdir(parents=True)
    (root / "var").symlink_to("altvar")
    image = _mksquashfs(root, runtime_env.scratch / "altvar.sqfs")
    source = runtime_env.scratch / "src"
    source.mkdir()
    (source / "mark").write_text("mounted\n")
    for item in (source, source / "mark"):
        os.chown(item, runtime_env.user.uid, runtime_env.user.gid)
    result = runtime_env.berth("run", "--workdir", f"{home}/proj", "-v", f"{source}:{home}/data", str(image),
                               "sh", "-c", "pwd && cat ../data/mark", env={"HOME": str(home)})
    assert result.returncode == 0, describe(result)
    assert result.stdout.split() == [f"/altvar{str(home)[4:]}/proj", "mounted"], describe(result)


def test_unpacked_copy_of_a_linked_image_writes_nothing_outside_it(runtime_env, home_elsewhere):
    """``image_mount = "unpacked"``: berth unpacks the image into the user's state directory and
    restores its setuid bits itself. An image with absolute and climbing links to the user's
    home beside setuid entries: the links stay links in the copy (unsquashfs does not write
    through them), the chmods follow none, and nothing appears in the home."""
    home = home_elsewhere
    root = runtime_env.scratch / "unpack-root"
    _busybox_rootfs(root)
    (root / "lnk").symlink_to(str(home))
    (root / "opt").mkdir()
    (root / "opt" / "up").symlink_to(f"../../../../../../..{home}")
    (root / "opt" / "suid-probe").write_text("#!/bin/sh\n")
    os.chmod(root / "opt" / "suid-probe", 0o4755)
    image = _mksquashfs(root, runtime_env.scratch / "unpack.sqfs")
    site = runtime_env.state_dir.parent / "site-unpacked"
    site.mkdir(mode=0o755)
    (site / "berth.toml").write_text('image_mount = "unpacked"\n')
    result = runtime_env.berth("run", str(image), "sh", "-c", "ls -d /lnk/ /opt/up/ && echo ran",
                               env={"HOME": str(home), "BERTH_CONFIG_DIR": str(site)})
    assert result.returncode == 0 and result.stdout.endswith("ran\n"), describe(result)
    assert sorted(os.listdir(home)) == []
    copies = list((runtime_env.state_dir / "unpacked").glob("*/root"))
    assert len(copies) == 1, copies
    assert os.readlink(copies[0] / "lnk") == str(home)
    assert os.stat(copies[0] / "opt" / "suid-probe").st_mode & 0o7777 == 0o4755


# ---------------------------------------------------------------------------------------------
# Job output files


@pytest.mark.slurm
def test_slurm_array_output_swapped_for_a_link_while_queued_is_refused(job_site, user, other_user, slurm_cluster,
                                                                        user_tmp):
    """An array's outputs in a shared directory without the sticky bit (a group project
    directory): berth creates and checks them at submission, and the tasks wait in the queue
    (held here); meanwhile another user renames task 1's file away and puts a link to one of
    the victim's files there. The batch script's ``>>`` followed it and appended the task's
    output to the victim's file; now the task refuses it (failed, saying why) and task 2, left
    alone, writes its own file."""
    from tests.integration.jobs_helpers import wait_for

    env = {**job_site.env, **slurm_cluster.env(), "BERTH_BACKEND": "slurm"}
    work = job_site.workdir(user)
    os.chmod(work, 0o777)
    victim = user_tmp / "victim.txt"
    victim.write_text("ORIGINAL\n")
    os.chown(victim, user.uid, user.gid)
    job_site.write_script(work, "task.sh", """\
        #!/bin/sh
        #SBATCH --array=1-2
        #SBATCH -o out-%A_%a.txt
        #BERTH --template=bb
        echo "task output $SLURM_ARRAY_TASK_ID"
    """, user)
    result = user.berth("submit", "--json", "--hold", "task.sh", cwd=str(work), env=env)
    assert result.returncode == 0, describe(result)
    submitted = json.loads(result.stdout)
    array, native = submitted["id"], submitted["native_id"].split("_")[0]
    tasks = {task["job"]: task["id"] for task in submitted["tasks"]}
    swapped = work / f"out-{array}_1.txt"
    assert swapped.is_file() and (work / f"out-{array}_2.txt").is_file()
    subprocess.run(["runuser", "-u", other_user.name, "--", "mv", str(swapped), f"{swapped}.moved"], check=True)
    plant(other_user, swapped, victim)
    released = user.run(["scontrol", "release", native], env=slurm_cluster.env())
    assert released.returncode == 0, describe(released)
    states = wait_for(user, job_site, tasks.values(), ("completed", "failed", "cancelled", "timeout"),
                      timeout_s=120, env={**slurm_cluster.env(), "BERTH_BACKEND": "slurm"})
    info = json.dumps(states, indent=1)
    assert victim.read_text() == "ORIGINAL\n", info
    first, second = states[tasks[f"{array}_1"]], states[tasks[f"{array}_2"]]
    assert first["state"] == "failed" and "is a symbolic link" in json.dumps(first), info
    assert second["state"] == "completed", info
    assert (work / f"out-{array}_2.txt").read_text() == "task output 2\n", info
    # The refusal is in Slurm's own file of the task (in the array's record): `berth logs` shows it.
    logs = user.berth("logs", f"{array}_1", env=env)
    assert logs.returncode == 0 and f"out-{array}_1.txt: it is a symbolic link" in logs.stderr, describe(logs)


@pytest.mark.slurm
def test_slurm_job_output_swapped_for_a_link_while_queued_is_refused(job_site, user, other_user, slurm_cluster,
                                                                      user_tmp):
    """The same attack on a plain job's ``-o`` and ``-e``, which slurmstepd opened by name on
    the node (following the link: the victim's file was truncated and then held the job's
    output). Now Slurm writes only to a file in the job's private record and ``berth
    job-exec`` opens the user's files itself: the job fails naming the linked file, the
    victim's file is untouched, and ``berth logs`` shows why."""
    from tests.integration.jobs_helpers import wait_for

    env = {**job_site.env, **slurm_cluster.env(), "BERTH_BACKEND": "slurm"}
    work = job_site.workdir(user)
    os.chmod(work, 0o777)
    victims = {}
    for stream in ("out", "err"):
        victims[stream] = user_tmp / f"victim-{stream}.txt"
        victims[stream].write_text("ORIGINAL\n")
        os.chown(victims[stream], user.uid, user.gid)
    job_site.write_script(work, "job.sh", """\
        #!/bin/sh
        #SBATCH -o out-%j.txt
        #BERTH --template=bb
        echo "job output"
        echo "job error" >&2
    """, user)
    jobs = {}
    for stream in ("out", "err"):
        result = user.berth("submit", "--json", "--hold", "-e", f"{stream}-%j.err", "job.sh", cwd=str(work), env=env)
        assert result.returncode == 0, describe(result)
        submitted = json.loads(result.stdout)
        jobs[stream] = (submitted["id"], submitted["native_id"])
    for stream, (job, _) in jobs.items():
        swapped = work / (f"out-{job}.txt" if stream == "out" else f"err-{job}.err")
        assert swapped.is_file()
        subprocess.run(["runuser", "-u", other_user.name, "--", "mv", str(swapped), f"{swapped}.moved"], check=True)
        plant(other_user, swapped, victims[stream])
    released = user.run(["scontrol", "release", ",".join(native for _, native in jobs.values())],
                        env=slurm_cluster.env())
    assert released.returncode == 0, describe(released)
    states = wait_for(user, job_site, [job for job, _ in jobs.values()], ("completed", "failed", "cancelled",
                                                                          "timeout"),
                      timeout_s=120, env={**slurm_cluster.env(), "BERTH_BACKEND": "slurm"})
    info = json.dumps(states, indent=1)
    for stream, (job, _) in jobs.items():
        name = work / (f"out-{job}.txt" if stream == "out" else f"err-{job}.err")
        assert victims[stream].read_text() == "ORIGINAL\n", (stream, info)
        assert (states[job]["state"], states[job]["message"]) == (
            "failed", f"refused the job's output file {name}: it is a symbolic link"), info
        logs = user.berth("logs", job, env=env)
        assert logs.returncode == 0 and f"{name}: it is a symbolic link" in logs.stderr, describe(logs)


# ---------------------------------------------------------------------------------------------
# The user store


@pytest.mark.parametrize("planted", ["link", "directory"])
def test_user_store_planted_by_another_user_is_refused(user, other_user, user_tmp, planted):
    """The victim keeps their store in a shared directory (``BERTH_USER_STORE``) and the
    attacker made that path first: a link to a store of theirs, or the directory itself.
    berth refused to write there but read it: ``berth run NAME`` ran the attacker's image.
    Reading is refused too, naming the owner."""
    shared = shared_dir(user, "stores")
    theirs = shared / "theirs"
    subprocess.run(["runuser", "-u", other_user.name, "--", "mkdir", "-m", "755", str(theirs)], check=True)
    store = shared / "store"
    if planted == "link":
        plant(other_user, store, theirs)
    else:
        store = theirs
    # The attacker's store: an image the victim would run by name.
    root = user_tmp / "rootfs"
    _busybox_rootfs(root)
    (root / "ATTACKERS").write_text("x\n")
    tarball = user_tmp / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tarball), "."], check=True)
    os.chmod(tarball, 0o644)
    made = other_user.berth("import", str(tarball), "myapp:latest", env={"BERTH_USER_STORE": str(theirs)})
    assert made.returncode == 0, describe(made)
    subprocess.run(["chmod", "-R", "a+rX", str(theirs)], check=True)  # the attacker lets everyone read it
    try:
        for argv in (["images"], ["run", "myapp:latest", "cat", "/ATTACKERS"]):
            result = user.berth(*argv, env={"BERTH_USER_STORE": str(store)}, cwd=str(user_tmp))
            assert result.returncode != 0 and "x" not in result.stdout.split(), describe(result)
            assert f"your image store {store} is not yours" in result.stderr, describe(result)
            assert "myapp" not in result.stdout, describe(result)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
