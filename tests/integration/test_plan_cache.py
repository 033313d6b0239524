"""Cached run plans (berth.runtime.plancache, issue 10 target 3) as the unprivileged test user
with real squashfuse, berth-launcher and a real registry: a repeated `berth run` executes the
plan an identical run kept, with the same results as a run that plans (output, exit status,
files owned by the user, nothing left behind: runtime_env checks mounts, processes and state
directories after every test), and any change of what the plan was made from — site policy,
settings files, the image a tag names, /etc/passwd, a -v source — takes effect on the very next
run. Entries another user could have written, or corrupt ones, are ignored."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.harness.users import describe

pytestmark = pytest.mark.integration

#: A run keeps its plan only when no input changed in the last seconds (plancache.RACY_NS):
#: files a test has just written are waited for by running again, up to this long.
KEEP_DEADLINE_S = 60.0
CACHE_ON = {"BERTH_PLAN_CACHE": "1"}
#: The compiled front end joins a shared image mount that is up (mounting is Python's): its
#: runs let the mount linger, and its tests end with `berth doctor --cleanup`.
LINGER = {"BERTH_IMAGE_MOUNT_LINGER": "60"}
#: Which front end runs `berth run` in this test: "compiled" (the command `berth`,
#: berth.runtime.compiledplan) or "python" (the console script berth-py it execs on a miss).
FRONT = ["compiled"]


@pytest.fixture(autouse=True, params=["compiled", "python"])
def front(request, runtime_env):
    """Every test once with each front end: the same expectations for both (issue 10)."""
    FRONT[0] = request.param
    yield request.param
    if request.param == "compiled":  # the lingering mounts its runs leave
        runtime_env.berth("doctor", "--cleanup", env=_site_env[0])


_site_env: list[dict] = [{}]


def _plans(env) -> Path:
    return env.state_dir / "plans"


def _entries(env, kind: str | None = None) -> list[Path]:
    """The kept plans: Python's (named by their key) and the compiled ones ("c-" and a key);
    ``kind``: only those of one front end."""
    try:
        names = sorted(_plans(env).iterdir())
    except FileNotFoundError:
        return []
    python = [path for path in names if len(path.name) == 64]
    compiled = [path for path in names if path.name.startswith("c-") and len(path.name) == 66]
    return {"python": python, "compiled": compiled}.get(kind, python + compiled)


def program() -> str:
    from tests.harness.users import venv_dir

    return str(venv_dir() / "bin" / ("berth" if FRONT[0] == "compiled" else "berth-py"))


def run(env, site, *args, extra=None):
    _site_env[0] = site.env
    linger = LINGER if FRONT[0] == "compiled" else {}
    return env.user.run([program(), "run", "--debug", *args],
                        env=env.env(**{**site.env, **CACHE_ON, **linger, **(extra or {})}))


def run_until_kept(env, site, *args, extra=None, compiled=True):
    """Run until the run keeps its plan (inputs written moments ago are not trusted yet);
    every run's result is returned, the last one kept the plan (``compiled``: in its compiled
    form too, when the front end is this test's)."""
    results = []
    deadline = time.monotonic() + KEEP_DEADLINE_S
    while True:
        result = run(env, site, *args, extra=extra)
        results.append(result)
        if "plan cache: kept this run's plan" in result.stderr:
            if FRONT[0] == "compiled" and compiled:
                assert "compiled too" in result.stderr, describe(result)
            return results
        assert "plan cache: this run's plan is not kept: " in result.stderr and "changed moments ago" in \
            result.stderr, describe(result)
        assert time.monotonic() < deadline, describe(result)
        time.sleep(0.2)


def hit(result) -> bool:
    """Whether the run was a hit of this test's front end (the compiled one says so and nothing
    of Python's, which it never started)."""
    return hit_text(result.stderr)


def hit_text(stderr: str) -> bool:
    """:func:`hit` of a run's stderr (a run started with :func:`_popen`)."""
    if FRONT[0] == "compiled":
        return "front end: hit" in stderr and "plan cache:" not in stderr
    return "plan cache: hit" in stderr


def leaks(env) -> list[str]:
    """What a run left behind, but the image mount it leaves lingering (compiled front end)."""
    return [leak for leak in env.wait_clean(timeout_s=3.0) if "/images/" not in leak and "berth-linger" not in leak]


@pytest.fixture
def site(site_config, runtime_env, registry):
    site_config.trust_registry(registry.host)
    return site_config


# --------------------------------------------------------------------- hit and miss alike

def test_a_repeated_run_runs_the_kept_plan_with_the_same_results(runtime_env, runtime_images, site, user):
    env = runtime_env
    script = ('id -u; id -g; echo "$HOME"; pwd; grep "^berthtest:" /etc/passwd; echo "$GREETING"; '
              'echo data > /data/out.txt; exit 3')
    args = ("-e", "GREETING=hello", "-w", "/tmp", "-v", f"{env.scratch}:/data", str(runtime_images.busybox),
            "sh", "-c", script)
    planned = run_until_kept(env, site, *args)[-1]
    assert planned.returncode == 3 and not hit(planned), describe(planned)
    assert len(_entries(env, FRONT[0])) == 1
    (env.scratch / "out.txt").unlink()
    cached = run(env, site, *args)
    assert hit(cached), describe(cached)
    assert (cached.returncode, cached.stdout) == (planned.returncode, planned.stdout)
    assert cached.stdout.splitlines()[:4] == [str(user.uid), str(user.gid), str(user.home), "/tmp"]
    assert cached.stdout.splitlines()[-1] == "hello"
    info = os.stat(env.scratch / "out.txt")
    assert (info.st_uid, info.st_gid) == (user.uid, user.gid)
    assert not leaks(env)  # between runs too: the cached run tore down like the other
    # Another command line, another environment: another plan.
    other = run(env, site, *args[:-1], script.replace("exit 3", "exit 4"))
    assert not hit(other) and other.returncode == 4, describe(other)
    differs = run(env, site, *args, extra={"SOMETHING": "else"})
    assert not hit(differs) and differs.returncode == 3, describe(differs)


def test_plans_are_kept_only_when_the_setting_is_on_and_only_for_berth_launcher(runtime_env, runtime_images,
                                                                                site):
    env = runtime_env
    image = str(runtime_images.busybox)
    for _ in range(2):
        off = env.berth("run", "--debug", image, "true", env={**site.env, "BERTH_PLAN_CACHE": "0"})
        assert off.returncode == 0 and "plan cache: this run's plan is not kept: the setting plan_cache is off" in \
            off.stderr, describe(off)
    site.write("plan_cache = false\npinned = [\"plan_cache\"]\n")
    pinned = run(env, site, image, "true")
    assert pinned.returncode == 125 and "only the site configuration may set plan_cache" in pinned.stderr, \
        describe(pinned)
    site.write("")
    default = env.berth("run", "--debug", image, "true", env=site.env)  # nobody sets it: on
    assert default.returncode == 0 and "plan_cache is off" not in default.stderr, describe(default)
    for path in _entries(env):
        path.unlink()
    runc = run(env, site, image, "true", extra={"BERTH_RUNTIME": "runc"})
    assert runc.returncode == 0 and "not kept: run by runc, not berth-launcher" in runc.stderr, describe(runc)
    assert _entries(env) == []


# -------------------------------------------------------------- changes take effect at once

def test_a_site_policy_change_takes_effect_on_the_next_run(runtime_env, runtime_images, site):
    env = runtime_env
    source = env.scratch / "src"
    source.mkdir()
    os.chown(source, env.user.uid, env.user.gid)
    args = ("-v", f"{source}:/data", str(runtime_images.busybox), "sh", "-c", "ls /data; echo $SITE_VAR; ls /site")
    site.write("")
    run_until_kept(env, site, *args)
    assert hit(run(env, site, *args))
    # A forced mount and an environment variable appear: the very next run has them.
    shared = Path(site.root) / "shared"
    shared.mkdir(mode=0o755)
    (shared / "from-site").write_text("")
    site.write(f'[[policy.mounts]]\nsource = "{shared}"\ndestination = "/site"\n'
               '[[policy.env]]\nop = "set"\nname = "SITE_VAR"\nvalue = "policy"\n', "conf.d/20-mount.toml")
    changed = run(env, site, *args)
    assert not hit(changed) and changed.returncode == 0, describe(changed)
    assert changed.stdout.split() == ["policy", "from-site"], describe(changed)
    # The site denies the -v source: refused at once, not run from the kept plan.
    site.write(f'[policy]\nmount_deny_sources = ["{env.scratch}"]\n', "conf.d/30-deny.toml")
    denied = run(env, site, *args)
    assert denied.returncode == 125 and not hit(denied), describe(denied)
    assert "which site policy does not allow to be mounted" in denied.stderr, describe(denied)


def test_a_settings_file_appearing_takes_effect_on_the_next_run(runtime_env, runtime_images, site):
    env = runtime_env
    args = (str(runtime_images.busybox), "true")
    run_until_kept(env, site, *args)
    assert hit(run(env, site, *args))
    site.write_user_file('runtime = "runc"\n')  # a user file that did not exist when the plan was kept
    changed = run(env, site, *args)
    assert changed.returncode == 0 and not hit(changed), describe(changed)
    assert "xdg-config/berth" in changed.stderr and "/runc\n" in changed.stderr, \
        describe(changed)


def test_a_plan_replaced_by_one_the_front_end_cannot_run_takes_its_compiled_form_along(runtime_env, runtime_images,
                                                                                      site):
    """The compiled form of a replaced plan stayed in plans/ (review): a run that plans again
    replaces both forms or removes the one it does not keep."""
    env = runtime_env
    args = (str(runtime_images.busybox), "true")
    site.write("")
    run_until_kept(env, site, *args)
    assert len(_entries(env, "python")) == 1 and len(_entries(env, "compiled")) == 1
    site.write('image_mount = "per_container"\n')  # kept again, but not compiled: not a shared mount
    kept = run_until_kept(env, site, *args, compiled=False)[-1]
    assert "not compiled: image_mount = per_container" in kept.stderr, describe(kept)
    assert len(_entries(env, "python")) == 1 and _entries(env, "compiled") == [], _entries(env)


def test_an_image_tag_moved_to_another_digest_runs_the_new_image(runtime_env, site, busybox_image,
                                                                  whiteout_image):
    env = runtime_env
    for image in (busybox_image, whiteout_image):
        pulled = env.berth("pull", str(image), env=site.env)
        assert pulled.returncode == 0, describe(pulled)
    listing = "ls / | tr '\\n' ' '"
    expected = run(env, site, str(whiteout_image), "sh", "-c", listing)
    run_until_kept(env, site, str(busybox_image), "sh", "-c", listing)
    before = run(env, site, str(busybox_image), "sh", "-c", listing)
    assert hit(before) and before.stdout != expected.stdout, describe(before)
    index = env.user_store / "index.json"
    document = json.loads(index.read_text())
    references = document["references"]
    key = next(name for name in references if name.endswith("test/busybox:1"))
    references[key] = next(value for name, value in references.items() if name.endswith("test/whiteout:1"))
    info = os.stat(index)
    replacement = index.with_name("index.json.test")
    replacement.write_text(json.dumps(document, sort_keys=True))
    os.chown(replacement, info.st_uid, info.st_gid)
    os.chmod(replacement, info.st_mode & 0o777)
    os.replace(replacement, index)  # as a pull that moves the tag publishes it
    after = run(env, site, str(busybox_image), "sh", "-c", listing)
    assert not hit(after) and after.stdout == expected.stdout, describe(after)


def test_a_changed_passwd_file_is_a_miss(runtime_env, runtime_images, site):
    env = runtime_env
    args = (str(runtime_images.busybox), "true")
    run_until_kept(env, site, *args)
    assert hit(run(env, site, *args))
    info = os.stat("/etc/passwd")
    os.utime("/etc/passwd", ns=(info.st_atime_ns, info.st_mtime_ns))  # not a byte changed: only its ctime
    after = run(env, site, *args)
    assert after.returncode == 0 and not hit(after) and "/etc/passwd changed" in after.stderr, describe(after)


def test_a_mount_source_swapped_for_a_link_to_a_denied_path_is_refused(runtime_env, runtime_images, site):
    env = runtime_env
    site.write('[policy]\nmount_deny_sources = ["/etc"]\n')
    source = env.scratch / "src"
    source.mkdir()
    os.chown(source, env.user.uid, env.user.gid)
    args = ("-v", f"{source}:/data", str(runtime_images.busybox), "ls", "/data")
    run_until_kept(env, site, *args)
    assert hit(run(env, site, *args))
    source.rmdir()
    source.symlink_to("/etc")
    os.lchown(source, env.user.uid, env.user.gid)
    after = run(env, site, *args)
    assert after.returncode == 125 and not hit(after), describe(after)
    assert "/etc" in after.stderr and "passwd" not in after.stdout, describe(after)


# ------------------------------------------------------------------ entries that are not trusted

def _without_dependencies(entry: Path) -> None:
    """Rewrite a kept entry (either front end's) in place with no dependency listed."""
    import marshal

    data = entry.read_bytes()
    if len(entry.name) == 64:
        fields = marshal.loads(data)
        fields["deps"] = []
        entry.write_bytes(marshal.dumps(fields))
        return
    head, _, rest = data.partition(b"\n")
    out = [head + b"\n"]
    while rest:  # records: TAG LENGTH\n BYTES\n (berth.runtime.compiledplan.render)
        line, _, rest = rest.partition(b"\n")
        size = int(line.split(b" ")[1])
        value, rest = rest[:size + 1], rest[size + 1:]
        if not line.startswith(b"D "):
            out.append(line + b"\n" + value)
    assert b"\nD " in data and b"\nD " not in b"".join(out)
    entry.write_bytes(b"".join(out))


@pytest.mark.parametrize("damage", ["other user", "group-writable", "truncated", "link", "no dependencies"])
def test_an_entry_not_written_by_the_user_alone_or_damaged_is_ignored(runtime_env, runtime_images, site,
                                                                      other_user, damage):
    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "echo ran; exit 5")
    run_until_kept(env, site, *args)
    entries = _entries(env)
    assert len(entries) == 2  # Python's and the compiled one (berth-py keeps both)
    for entry in entries:  # both: the front end's miss falls to Python's look-up
        if damage == "other user":
            os.chown(entry, other_user.uid, other_user.gid)
        elif damage == "group-writable":
            os.chmod(entry, 0o660)
        elif damage == "truncated":
            data = entry.read_bytes()
            entry.write_bytes(data[: len(data) // 3])
        elif damage == "no dependencies":  # nothing to re-check: never run, on either front end
            _without_dependencies(entry)
        else:
            target = env.scratch / ("planted" + entry.name)
            shutil.copy2(entry, target)
            os.chown(target, env.user.uid, env.user.gid)
            entry.unlink()
            entry.symlink_to(target)
            os.lchown(entry, env.user.uid, env.user.gid)
    result = run(env, site, *args)
    assert (result.returncode, result.stdout) == (5, "ran\n") and not hit(result), describe(result)
    assert "plan cache: miss: " in result.stderr, describe(result)
    if FRONT[0] == "compiled":
        assert "front end: " in result.stderr and ": running berth-py" in result.stderr, describe(result)
    if damage != "link":
        # Replaced by the user's own entry for the next run.
        again = run(env, site, *args)
        assert (again.returncode, again.stdout) == (5, "ran\n") and hit(again), describe(again)


def test_prune_and_doctor_cleanup_remove_the_kept_plans(runtime_env, runtime_images, site):
    env = runtime_env
    run_until_kept(env, site, str(runtime_images.busybox), "true")
    kept = len(_entries(env))
    assert kept == 2  # Python's and the compiled one
    pruned = env.berth("prune", "--json", env=site.env)
    assert pruned.returncode == 0 and json.loads(pruned.stdout)["plans_removed"] == kept, describe(pruned)
    assert _entries(env) == []
    run_until_kept(env, site, str(runtime_images.busybox), "true")
    cleaned = env.berth("doctor", "--cleanup", env=site.env)
    assert f"removed {kept} cached run plans" in cleaned.stdout, describe(cleaned)
    assert _entries(env) == []


def test_a_run_from_a_kept_plan_imports_no_planning(runtime_env, runtime_images, site, front):
    """The point of the cache (issue 10, target 3): a hit looks no image up and plans nothing,
    so it imports none of their modules, nor argparse (nor tomllib: the settings it loads, to
    know the cache is on, come from the parse cache). (Python's hit: the compiled front end's
    starts no Python at all, which every other test's hit() checks.)"""
    from tests.harness.users import venv_dir

    env = runtime_env
    args = (str(runtime_images.busybox), "true")
    run_until_kept(env, site, *args)
    if front == "compiled":  # the compiled front end's hit starts no Python at all
        trace = env.scratch / "execs"
        result = env.user.run(["strace", "-f", "-qq", "-e", "trace=execve", "-o", str(trace), program(), "run",
                               "--debug", *args], env=env.env(**site.env, **CACHE_ON, **LINGER))
        assert result.returncode == 0 and hit(result), describe(result)
        programs = [line.split('"')[1] for line in trace.read_text().splitlines() if "execve(" in line
                    and "= 0" in line]
        assert programs[0] == program() and os.path.basename(programs[1]) == "berth-launcher", programs
        # By the program's own name: a venv's path holds "python3.11" (lib/python3.11/site-packages).
        assert not [name for name in programs if os.path.basename(name).startswith(("python", "berth-py"))], programs
        return
    result = env.user.run([str(venv_dir() / "bin" / "python"), "-X", "importtime", program(), "run",
                           "--debug", *args], env=env.env(**site.env, **CACHE_ON))
    assert result.returncode == 0 and hit(result), describe(result)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    planning = {"argparse", "tomllib", "berth.image.api", "berth.runtime.plan", "berth.runtime.policy",
                "berth.runtime.options", "berth.runtime.spec", "berth.store.store"}
    assert "berth.runtime.container" in imported and imported & planning == set(), describe(result)


def test_a_run_given_the_directory_holding_the_state_keeps_its_plan_and_neither_run_reaches_the_plans(
        runtime_env, runtime_images, site):
    """A -v of the directory holding the state directory (as -v /tmp:/x holds /tmp/berth-UID)
    was refused the cache (plancache.exposed): its container could have planted plans. The
    state directory is hidden in every container now, the planning run's and the kept plan's
    alike (test_state_directory_mask.py), so the plan is kept and its run is as harmless."""
    env = runtime_env
    # /work: a directory the image has (a missing mount point needs an overlay, whose plans the
    # compiled front end leaves to Python).
    script = ('s=/work/state; echo "entries: $(ls -A $s | wc -l)"; '
              '(echo x > $s/plans/planted) 2>/dev/null && echo PLANTED; echo ok > /work/scratch/ok && echo normal')
    args = ("-v", f"{env.state_dir.parent}:/work", str(runtime_images.busybox), "sh", "-c", script)
    planned = run_until_kept(env, site, *args)[-1]
    again = run(env, site, *args)
    assert hit(again) and not hit(planned), describe(again)
    for result in (planned, again):
        assert result.returncode == 0 and result.stdout == "entries: 0\nnormal\n", describe(result)
    assert [path.name for path in _entries(env)] != [] and not (_plans(env) / "planted").exists()


# ------------------------------------------------- the compiled front end and Python, side by side

def _popen(env, site, *args, extra=None, wrapper=()):
    """`berth run --debug ARGS` by this test's front end, as the test user, with no process
    between (setpriv execs; ``wrapper``, such as nohup, must exec too): signals reach the front
    end itself."""
    import subprocess

    linger = LINGER if FRONT[0] == "compiled" else {}
    full = env.user.base_env(**env.env(**{**site.env, **CACHE_ON, **linger, **(extra or {})}))
    argv = ["setpriv", f"--reuid={env.user.uid}", f"--regid={env.user.gid}", "--init-groups", "env", "-i",
            *[f"{k}={v}" for k, v in full.items()], *wrapper, program(), "run", "--debug", *args]
    return subprocess.Popen(argv, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _running(env, site, deadline_s: float = 30.0) -> dict:
    """The one container `berth ps --json` shows, once it shows one."""
    deadline = time.monotonic() + deadline_s
    while True:
        listed = env.berth("ps", "--json", env=site.env)
        records = json.loads(listed.stdout) if listed.returncode == 0 else []
        if records:
            return records[0]
        assert time.monotonic() < deadline, describe(listed)
        time.sleep(0.1)


def _keep_stopped(env, site, *args, extra=None) -> str:
    """Keep the plan of a long-running command: run it until a run, stopped (SIGTERM) once its
    container runs, kept it, or a run was a hit (a stop that came after the plan was written
    but before berth said "kept" kept it all the same); that run's stderr."""
    deadline = time.monotonic() + KEEP_DEADLINE_S
    while True:
        child = _popen(env, site, *args, extra=extra)
        _running(env, site)
        child.terminate()
        _, stderr = child.communicate(timeout=60)
        if any(words in stderr for words in ("plan cache: kept this run's plan", "plan cache: hit", "front end: hit")):
            return stderr
        assert time.monotonic() < deadline, stderr
        time.sleep(0.2)


def test_ps_and_exec_see_the_container_and_sigterm_reaches_it(runtime_env, runtime_images, site):
    """A hit's container is one like any other (info.json as Python writes it): `berth ps`
    lists it, `berth exec` enters it; SIGTERM to berth reaches the command, and berth exits with
    the command's status."""
    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "trap 'echo got TERM; exit 7' TERM; echo up; "
            "while :; do sleep 0.1; done")
    run_until_kept(env, site, *args[:1], "true")  # the image mount is up (and lingers, compiled)
    # The long-running command's own plan: kept by a first run that is stopped at once.
    _keep_stopped(env, site, *args)
    child = _popen(env, site, *args)
    record = _running(env, site)
    assert record["image"] == str(runtime_images.busybox) and record["command"] == list(args[1:]), record
    entered = env.berth("exec", record["id"], "cat", "/proc/1/cmdline", env=site.env)
    assert entered.returncode == 0 and "berth-init" in entered.stdout, describe(entered)
    child.terminate()
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 7 and stdout.splitlines() == ["up", "got TERM"], (child.returncode, stdout, stderr)
    assert ("front end: hit" if FRONT[0] == "compiled" else "plan cache: hit") in stderr, stderr
    assert not leaks(env)


def test_a_killed_hit_leaves_what_the_next_run_cleans_up(runtime_env, runtime_images, site):
    """kill -9 of berth running a kept plan: its container directory (lock free) and its hold on
    the image mount are cleaned by the next berth, which runs as usual (the compiled front end
    leaves such state to Python: the next run is not its hit)."""
    env = runtime_env
    args = (str(runtime_images.busybox), "sleep", "30")
    run_until_kept(env, site, str(runtime_images.busybox), "true")
    _keep_stopped(env, site, *args)
    child = _popen(env, site, *args)
    _running(env, site)
    child.kill()
    child.communicate(timeout=60)
    assert env.containers(), "the killed run's container directory should be left for the clean-up"
    after = run(env, site, str(runtime_images.busybox), "true")
    assert after.returncode == 0 and "cleaned up container" in after.stderr, describe(after)
    if FRONT[0] == "compiled":
        assert "front end: a container left by a berth that died: running berth-py" in after.stderr, describe(after)
    assert not leaks(env)


def test_turning_the_setting_off_in_a_file_takes_effect_on_the_next_run(runtime_env, runtime_images, site):
    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "echo ran")
    site.write("plan_cache = true\n", "conf.d/50-cache.toml")
    on = {"BERTH_PLAN_CACHE": ""}  # only the file turns it on
    run_until_kept(env, site, *args, extra=on)
    assert hit(run(env, site, *args, extra=on))
    site.write("plan_cache = false\n", "conf.d/50-cache.toml")
    off = run(env, site, *args, extra=on)
    assert (off.returncode, off.stdout) == (0, "ran\n") and not hit(off), describe(off)
    assert "plan cache: hit" not in off.stderr and "front end: hit" not in off.stderr, describe(off)
    assert "the setting plan_cache is off" in off.stderr, describe(off)


def test_with_the_image_mount_s_daemon_dead_the_run_still_runs(runtime_env, runtime_images, site):
    """The compiled front end joins a mount that is up and leaves every clean-up to Python: with
    the mount's daemon killed (Slurm's end of a step does that), the run is Python's, which
    cleans the dead mount up, mounts again, and runs."""
    import signal

    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "echo ran; exit 4")
    run_until_kept(env, site, *args)
    first = run(env, site, *args)
    assert hit(first) and first.returncode == 4, describe(first)
    records = list((env.state_dir / "images").glob("*/mount.json"))
    daemon = json.loads(records[0].read_text())["pid"] if records else None
    if daemon is not None:  # lingering (compiled); Python's runs here unmount on leaving
        os.kill(daemon, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{daemon}/cmdline") and open(f"/proc/{daemon}/cmdline").read():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    result = run(env, site, *args)
    assert (result.returncode, result.stdout) == (4, "ran\n"), describe(result)
    if FRONT[0] == "compiled":
        assert daemon is not None
        assert not hit(result) and "front end: an image mount for the clean-up" in result.stderr, describe(result)
        assert hit(run(env, site, *args))  # mounted again by that run, lingering: the front end's again
    assert not leaks(env)


def _forge(entry: Path) -> None:
    """Rewrite a compiled entry's dependencies to what they are now, as something that could
    write the state directory could (berth.runtime.compiledplan's format)."""
    from berth.runtime.compiledplan import fingerprint_text
    from berth.runtime.plancache import fingerprint

    data, out = entry.read_bytes(), []
    head, _, rest = data.partition(b"\n")
    out.append(head + b"\n")
    while rest:
        line, _, rest = rest.partition(b"\n")
        tag, size = line.split(b" ")
        value, rest = rest[: int(size)], rest[int(size) + 1:]
        if tag == b"D":
            where, _, _ = value.partition(b"\0")
            value = where + b"\0" + fingerprint_text(fingerprint(os.fsdecode(where[2:]), where[:1] == b"c")).encode()
        out.append(b"%s %d\n%s\n" % (tag, len(value), value))
    info = os.stat(entry)
    entry.write_bytes(b"".join(out))
    os.chown(entry, info.st_uid, info.st_gid)


def test_with_the_setting_off_not_even_a_forged_entry_runs(runtime_env, runtime_images, site):
    """A compiled entry whose dependencies were rewritten to match settings files that now turn
    plan_cache off (what a container that reached the state directory could do): the front end
    reads the setting itself and runs nothing of it; Python reads no entry with it off."""
    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "echo ran")
    site.write("plan_cache = true\n", "conf.d/50-cache.toml")
    on = {"BERTH_PLAN_CACHE": ""}
    run_until_kept(env, site, *args, extra=on)
    site.write("plan_cache = false # off again\n", "conf.d/50-cache.toml")
    [compiled] = _entries(env, "compiled")
    _forge(compiled)
    off = run(env, site, *args, extra=on)
    assert (off.returncode, off.stdout) == (0, "ran\n") and "hit" not in off.stderr, describe(off)
    if FRONT[0] == "compiled":
        assert "front end: the setting plan_cache is off: running berth-py" in off.stderr, describe(off)
    # The site pins it in a form only Python reads: the front end leaves the run to Python.
    site.write('plan_cache = true\n', "conf.d/50-cache.toml")
    site.write('plan_cache = false\npinned = [\n  "plan_cache",\n]\n')
    _forge(compiled)
    pinned = run(env, site, *args, extra=on)
    assert pinned.returncode == 0 and "hit" not in pinned.stderr, describe(pinned)
    if FRONT[0] == "compiled":
        assert "front end: the settings are Python's to read" in pinned.stderr, describe(pinned)


# ------------------------------------------------ red team: where the two front ends differed

def test_in_the_hosts_pid_namespace_no_run_leaves_a_daemon_behind(runtime_env, runtime_images, site, user):
    """With the site's host pid namespace berth is the subreaper that ends what the container
    leaves behind (supervise.adopt_orphans); the compiled front end ran such a kept plan without
    it, and a setsid daemon outlived every hit (red team). Such plans are Python's to run."""
    from tests.harness.fixtures_runtime import process_cmdlines

    env = runtime_env
    site.write('[policy.namespaces]\npid = "host"\n')
    args = (str(runtime_images.busybox), "sh", "-c", "setsid sleep 986 </dev/null >/dev/null 2>&1 & echo started")

    def left_behind() -> list:
        found = [pid for pid, command in process_cmdlines(user.uid) if command.startswith(b"sleep\x00986")]
        for pid in found:
            os.kill(pid, 9)
        return found

    kept = run_until_kept(env, site, *args, compiled=False)[-1]
    assert left_behind() == [], describe(kept)
    for _ in range(2):
        again = run(env, site, *args)
        assert (again.returncode, again.stdout) == (0, "started\n"), describe(again)
        assert left_behind() == [], describe(again)
    if FRONT[0] == "compiled":
        assert "not compiled: the host's pid namespace" in kept.stderr, describe(kept)
    else:
        assert hit(again), describe(again)


def test_a_signal_the_caller_ignores_is_the_commands_default_again(runtime_env, runtime_images, site):
    """Python starts every program with SIGPIPE and SIGXFSZ at their default actions
    (proc._spawn), whatever berth was started with; the compiled front end passed on a caller's
    `trap '' PIPE XFSZ`, and `yes | head -n1` in the container wrote 'Broken pipe' instead of
    dying of SIGPIPE (red team)."""
    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "yes | head -n1; ulimit -f 1; head -c 4096 /dev/zero > /tmp/f")
    wrapped = ["sh", "-c", "trap '' PIPE XFSZ; exec \"$@\"", "sh", program(), "run", "--debug", *args]
    linger = LINGER if FRONT[0] == "compiled" else {}
    results = []
    for _ in range(int(KEEP_DEADLINE_S / 0.2)):
        results.append(env.user.run(wrapped, env=env.env(**{**site.env, **CACHE_ON, **linger})))
        if hit(results[-1]):
            break
        time.sleep(0.2)
    assert hit(results[-1]), describe(results[-1])
    for result in (results[0], results[-1]):
        assert result.returncode == 128 + 25 and result.stdout == "y\n", describe(result)  # SIGXFSZ
        assert "Broken pipe" not in result.stderr and "too large" not in result.stderr, describe(result)


@pytest.mark.parametrize("spelling", ["escaped key", "escaped pin", "home through a link's ..", "set twice"])
def test_the_front_end_reads_plan_cache_as_python_does_or_leaves_it_to_python(runtime_env, runtime_images, site,
                                                                              spelling):
    """The front end's own reading of plan_cache (against a forged entry) must never say on where
    Python says off: a key or a pin spelled with a TOML escape ("plan\\u005fcache"), and a HOME
    through a link's '..' (Python normalizes it, the kernel goes up from the link's target), were
    read as the default, and the forged entry ran; a key set twice (no TOML: Python refuses the
    settings) was read as its last value (red team; the test fails before)."""
    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "echo ran")
    extra = {"BERTH_PLAN_CACHE": ""}
    if spelling == "home through a link's ..":
        physical = Path(site.root) / "physical" / "home"
        physical.mkdir(parents=True, mode=0o755)
        (Path(site.root) / "link").symlink_to(physical)
        extra.update(HOME=f"{site.root}/link/..", XDG_CONFIG_HOME="")
    run_until_kept(env, site, *args, extra=extra)
    if spelling == "escaped key":
        site.write('"plan\\u005fcache" = false\n', "conf.d/50-cache.toml")
    elif spelling == "escaped pin":
        site.write('plan_cache = false\npinned = ["plan\\u005fcache"]\n')
        site.write_user_file("plan_cache = true\n")
    elif spelling == "set twice":
        site.write("plan_cache = false\nplan_cache = true\n", "conf.d/50-cache.toml")
    else:
        user_file = Path(site.root) / ".config" / "berth" / "berth.toml"  # $HOME normalized, as Python has it
        user_file.parent.mkdir(parents=True, mode=0o755)
        user_file.write_text("plan_cache = false\n")
        user_file.chmod(0o644)
    for entry in _entries(env, "compiled"):
        _forge(entry)
    result = run(env, site, *args, extra=extra)
    assert "hit" not in result.stderr, describe(result)
    if spelling == "escaped pin":
        assert result.returncode == 125 and "only the site configuration may set plan_cache" in result.stderr, \
            describe(result)
    elif spelling == "set twice":
        assert result.returncode != 0 and "50-cache.toml" in result.stderr and result.stdout == "", describe(result)
    else:
        assert (result.returncode, result.stdout) == (0, "ran\n"), describe(result)


def test_the_runtime_s_error_is_said_in_the_same_words(runtime_env, runtime_images, site):
    """berth-launcher's error line (its log escapes quotes as runc's does) is said as Python says
    it (supervise.runtime_error unescapes them); the compiled front end said chdir to cwd
    (\\"/etc/passwd\\") (red team; the test fails before)."""
    env = runtime_env
    args = ("-w", "/etc/passwd", str(runtime_images.busybox), "true")
    run_until_kept(env, site, *args)
    result = run(env, site, *args)
    assert result.returncode == 125 and hit(result), describe(result)
    assert ('berth: error: berth-launcher could not start the container: chdir to cwd ("/etc/passwd") set in '
            "config.json failed: not a directory\n") in result.stderr, describe(result)


def test_debug_lines_naming_a_path_of_the_plan_are_printable(runtime_env, runtime_images, site):
    """--debug names a changed dependency of a kept plan: both front ends wrote its path as it
    is, so a file name could send terminal escapes (or a line that looks like berth's own) to the
    user's terminal. Both write it now as cli.output.printable does (review; fails before), the
    compiled one also the format and separator characters above U+00FF (review 10)."""
    env = runtime_env
    # A bidirectional override and a line separator (read as another name, "Trojan Source"),
    # a tag character, a private-use one; é passes as it is.
    env_file = env.scratch / "env\x1b[2J\u009b\nfile\u202e\u2028\U000e0041\ue000\u00e9"
    env_file.write_text("A=1\n")
    os.chmod(env_file, 0o644)
    args = ("--env-file", str(env_file), str(runtime_images.busybox), "true")
    run_until_kept(env, site, *args)
    env_file.write_text("A=22\n")
    result = run(env, site, *args)
    assert result.returncode == 0 and not hit(result), describe(result)
    assert "\x1b" not in result.stderr and "\u009b" not in result.stderr, describe(result)
    shown = f"{env.scratch}/env\\x1b[2J\\x9b\\nfile\\u202e\\u2028\\U000e0041\\ue000\u00e9 changed"
    assert f"berth: plan cache: miss: {shown}\n" in result.stderr, describe(result)
    if FRONT[0] == "compiled":
        assert f"berth: front end: {shown}: running berth-py\n" in result.stderr, describe(result)


def test_a_hit_killed_leaves_no_mount_up_once_the_linger_is_over(runtime_env, runtime_images, site, user):
    """kill -9 of berth running a kept plan on a lingering image mount: its hold dies with it, and
    the mount, its daemon and its reaper go without another berth being run. The reaper ended
    when it found the mount in use again, and the killed holder wrote no linger: mount and
    daemon stayed up until the user's next berth on the node (red team; the test fails before)."""
    from tests.harness.fixtures_runtime import fuse_mounts_under, lingering_reapers, processes_mentioning

    env = runtime_env
    short = {"BERTH_IMAGE_MOUNT_LINGER": "3"}
    args = (str(runtime_images.busybox), "sleep", "30")
    stderr = _keep_stopped(env, site, *args, extra=short)  # the mount lingers after it, with a reaper
    assert fuse_mounts_under(str(env.state_dir)) and lingering_reapers(user.uid, str(env.state_dir)), stderr
    child = _popen(env, site, *args, extra=short)
    _running(env, site)
    child.kill()
    _, stderr = child.communicate(timeout=60)
    assert ("front end: hit" if FRONT[0] == "compiled" else "plan cache: hit") in stderr, stderr

    def left() -> list:
        return (fuse_mounts_under(str(env.state_dir)) + processes_mentioning(user.uid, str(env.state_dir))
                + lingering_reapers(user.uid, str(env.state_dir)))

    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == []
    after = run(env, site, str(runtime_images.busybox), "true", extra=short)  # cleans the container directory
    assert after.returncode == 0, describe(after)


def test_a_squashfs_rewritten_in_place_with_its_size_and_time_runs_its_new_content(runtime_env, site, user):
    """IMAGE given as a path, rewritten where it is (cp -p, rsync --inplace: same size, same
    mtime): the next run runs the new content. Its shared mount was named by path, size and
    mtime only, so the run (re-planned: the file's fingerprint changed) joined the mount of the
    old content that lingered, on both front ends (red team; the test fails before)."""
    from tests.harness.fixtures_runtime import _busybox_rootfs, _mksquashfs

    env = runtime_env
    images = {}
    for content in ("old", "new"):
        root = env.scratch / f"root-{content}"
        _busybox_rootfs(root)
        (root / "marker").write_text(content)
        images[content] = _mksquashfs(root, env.scratch / f"{content}.sqfs")
    image = env.scratch / "image.sqfs"
    shutil.copy2(images["old"], image)
    assert image.stat().st_size == images["new"].stat().st_size  # SquashFS is padded to 4 KiB
    args = (str(image), "cat", "/marker")
    linger = {"BERTH_IMAGE_MOUNT_LINGER": "60"}  # for Python's runs too: the old mount lingers
    run_until_kept(env, site, *args, extra=linger)
    before = run(env, site, *args, extra=linger)
    assert before.stdout == "old" and hit(before), describe(before)
    times = image.stat()
    with open(image, "r+b") as target:
        target.write(images["new"].read_bytes())
    os.utime(image, ns=(times.st_atime_ns, times.st_mtime_ns))
    after = run(env, site, *args, extra=linger)
    assert (after.returncode, after.stdout) == (0, "new"), describe(after)
    runtime_env.berth("doctor", "--cleanup", env=site.env)


def test_a_sigusr1_before_the_command_runs_is_dropped_not_passed_to_it(runtime_env, runtime_images, site):
    """SIGUSR1 (Slurm's --signal=USR1@T) that reaches berth before the command runs is dropped
    (proc.HELD_SIGNALS: its default action would end a command that has not set itself up to
    take it); the compiled front end kept it blocked and passed it on as the command started,
    which died of it (red team; the test fails before). The window is held open by holding the
    image mount's lock, which both front ends wait for."""
    import fcntl
    import signal

    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "sleep 1; echo done")
    run_until_kept(env, site, *args, extra=LINGER)
    [lock] = (env.state_dir / "images").glob("*/lock")  # the mount lingers, for both
    with open(lock, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        child = _popen(env, site, *args, extra=LINGER)
        time.sleep(1.0)  # the run waits for the lock
        child.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
    stdout, stderr = child.communicate(timeout=60)
    assert (child.returncode, stdout) == (0, "done\n"), (child.returncode, stdout, stderr)
    assert ("front end: hit" if FRONT[0] == "compiled" else "plan cache: hit") in stderr, stderr
    env.berth("doctor", "--cleanup", env=site.env)  # the mount Python's runs left lingering too


@pytest.mark.parametrize("damage", ["group-writable", "link", "other user"])
def test_a_plans_directory_not_the_users_alone_is_not_read(runtime_env, runtime_images, site, other_user, damage):
    """STATE/plans writable by the group, a link to a directory of the user's, or another
    user's: neither front end runs an entry from it (red team: held)."""
    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "echo ran; exit 6")
    run_until_kept(env, site, *args)
    plans = _plans(env)
    if damage == "group-writable":
        os.chmod(plans, 0o770)
    elif damage == "link":
        plans.rename(plans.with_name("elsewhere"))
        plans.symlink_to(plans.with_name("elsewhere"))
        os.lchown(plans, env.user.uid, env.user.gid)
    else:
        os.chown(plans, other_user.uid, other_user.gid)
    result = run(env, site, *args)
    assert (result.returncode, result.stdout) == (6, "ran\n") and not hit(result), describe(result)
    assert "front end: hit" not in result.stderr and "plan cache: hit" not in result.stderr, describe(result)


def test_a_sigusr1_before_a_fallback_to_python_is_dropped(runtime_env, runtime_images, site):
    """A SIGUSR1 that came while the compiled front end had the forwarded signals blocked (it
    waited for the image mount's lock), followed by a fall back to Python (the mount stopped
    serving meanwhile), is dropped as Python drops it (proc.HELD_SIGNALS): exec_python unblocked
    it before berth-py started and berth died of it, exit 138 (review 10; the test fails
    before)."""
    import fcntl
    import signal

    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "echo done")
    run_until_kept(env, site, *args, extra=LINGER)
    [lock] = (env.state_dir / "images").glob("*/lock")  # the mount lingers, for both
    record = json.loads((lock.parent / "mount.json").read_text())
    with open(lock, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        child = _popen(env, site, *args, extra=LINGER)
        time.sleep(1.0)  # the run waits for the lock
        child.send_signal(signal.SIGUSR1)
        os.kill(record["pid"], signal.SIGKILL)  # the mount stops serving: the front end leaves it to Python
        time.sleep(0.5)
    stdout, stderr = child.communicate(timeout=120)
    assert (child.returncode, stdout) == (0, "done\n"), (child.returncode, stdout, stderr)
    if FRONT[0] == "compiled":
        assert "the image mount does not serve (mounting it is Python's): running berth-py" in stderr, stderr
    env.berth("doctor", "--cleanup", env=site.env)


def test_a_hangup_the_caller_ignores_stays_ignored(runtime_env, runtime_images, site):
    """`nohup berth run ...`: SIGHUP, ignored by the caller, stays ignored by berth (not
    forwarded, no stop timer) on both front ends, and the command inherits it ignored as it
    would from nohup alone. Python's wait_forwarding installed its handler over SIG_IGN and the
    compiled front end blocked it (a blocked signal is queued even when ignored): both forwarded
    the hang-up, the command ignored it, and --stop-timeout killed the container, exit 137
    (review 10; the test fails before)."""
    import signal

    env = runtime_env
    args = ("--stop-timeout", "1", str(runtime_images.busybox), "sh", "-c",
            "grep ^SigIgn: /proc/self/status; sleep 4; echo done")
    run_until_kept(env, site, *args, extra=LINGER)
    child = _popen(env, site, *args, extra=LINGER, wrapper=("nohup",))
    time.sleep(2.0)  # the container runs
    child.send_signal(signal.SIGHUP)
    stdout, stderr = child.communicate(timeout=60)
    assert (child.returncode, stdout.splitlines()[-1:]) == (0, ["done"]), (child.returncode, stdout, stderr[-800:])
    ignored = int(stdout.split()[1], 16)
    assert ignored & (1 << (signal.SIGHUP - 1)), stdout  # the command's, as from nohup alone
    assert ("front end: hit" if FRONT[0] == "compiled" else "plan cache: hit") in stderr, stderr
    env.berth("doctor", "--cleanup", env=site.env)


@pytest.fixture
def btrfs_state(runtime_env):
    """A state directory on a btrfs file system of its own (a loop file): fstat names another
    device there (the subvolume's anonymous one) than /proc/locks and mountinfo do. Needs root
    (the tests run as root and berth as the test user) and mkfs.btrfs (btrfs-progs, installed by
    scripts/install-system-packages.sh)."""
    import subprocess
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("mounting a btrfs loop file system needs root")
    if not shutil.which("mkfs.btrfs"):
        pytest.skip("mkfs.btrfs is not installed (btrfs-progs; scripts/install-system-packages.sh installs it)")
    top = Path(tempfile.mkdtemp(prefix="berth-btrfs-", dir="/tmp"))
    image, mount = top / "btrfs.img", top / "m"
    mount.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(300 << 20)
    try:
        subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
        mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a loop file system here: {mounted.stderr.strip()}")
        state = mount / "state"
        state.mkdir(mode=0o700)
        os.chown(state, runtime_env.user.uid, runtime_env.user.gid)
        os.chmod(top, 0o755)
        os.chmod(mount, 0o755)
        yield state
        runtime_env.berth("doctor", "--cleanup", env={"BERTH_STATE_DIR": str(state)})
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def test_on_btrfs_the_first_run_to_end_leaves_the_image_mounted_for_the_others(runtime_env, runtime_images, site,
                                                                               btrfs_state):
    """A state directory on btrfs (/tmp on a SLES node). The compiled front end judged holder
    locks by fstat's device, which btrfs gives per subvolume where /proc/locks names the
    superblock's: every live container looked dead, so a second run was Python's ("a container
    left by a berth that died") and the first run to end removed the other's holder and left
    the mount to be unmounted under it (SIGBUS, exit 135; review 10, the test fails before).
    Both front ends: the second run joins as a hit, the first one's end leaves the mount to the
    second, which reads its image to the end."""
    env = runtime_env
    # A short linger: its reaper, woken a linger after the first run ends, unmounts the image
    # when it finds no holder file of a live container.
    on_btrfs = {"BERTH_IMAGE_MOUNT_LINGER": "3", "BERTH_STATE_DIR": str(btrfs_state)}
    short = (str(runtime_images.busybox), "sh", "-c", "sleep 3")
    long = (str(runtime_images.busybox), "sh", "-c", "sleep 10; cat /bin/busybox >/dev/null && echo long-ok")
    for _ in range(3):  # again while a file the plans depend on changed meanwhile (another test's user)
        run_until_kept(env, site, *long, extra=on_btrfs)
        run_until_kept(env, site, *short, extra=on_btrfs)  # the mount lingers after it, for both
        first = _popen(env, site, *short, extra=on_btrfs)
        time.sleep(1.0)
        second = _popen(env, site, *long, extra=on_btrfs)  # while the first runs
        first_out, first_err = first.communicate(timeout=60)
        second_out, second_err = second.communicate(timeout=60)
        if not any(" changed" in line and "miss" in line for line in (first_err + second_err).splitlines()):
            break
    assert first.returncode == 0 and hit_text(first_err), first_err[-1500:]
    assert (second.returncode, second_out) == (0, "long-ok\n"), (second.returncode, second_err[-1500:],
                                                                  first_err[-1500:])
    assert hit_text(second_err), second_err[-1500:]


def test_on_btrfs_a_lock_on_another_subvolumes_file_does_not_keep_a_dead_holder_alive(
        runtime_env, runtime_images, site, btrfs_state, user):
    """btrfs's subvolumes share the one device /proc/locks names and number their inodes alike:
    a FLOCK held on another subvolume's file of the same inode number as a dead container's
    holder file made both front ends take that holder for live, and the image stayed mounted
    after the last run (review 10, left open then; the test fails before). A FLOCK seen there is
    now confirmed by a try of the lock."""
    import subprocess

    from tests.harness.fixtures_runtime import fuse_mounts_under

    env = runtime_env
    on_btrfs = {"BERTH_IMAGE_MOUNT_LINGER": "0", "BERTH_STATE_DIR": str(btrfs_state)}
    args = (str(runtime_images.busybox), "true")
    run_until_kept(env, site, *args, extra=on_btrfs)
    killed = _popen(env, site, str(runtime_images.busybox), "sleep", "60", extra=on_btrfs)
    deadline = time.monotonic() + 30
    while not (holders := list(btrfs_state.glob("images/*/holders/*"))):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
        time.sleep(0.05)
    killed.kill()  # kill -9: its holder file stays, its lock goes
    killed.communicate(timeout=30)
    [dead] = holders
    target = dead.stat().st_ino
    other = btrfs_state.parent / "other"
    subprocess.run(["btrfs", "subvolume", "create", str(other)], check=True, capture_output=True)
    index = 0
    while (made := other / f"f{index}").touch() or made.stat().st_ino < target:
        index += 1
    assert made.stat().st_ino == target, (made.stat().st_ino, target)
    locker = subprocess.Popen(["flock", "--exclusive", str(made), "sleep", "120"])
    try:
        deadline = time.monotonic() + 10
        while str(target) not in open("/proc/locks").read():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = run(env, site, *args, extra=on_btrfs)  # cleans the killed one's container up
        assert result.returncode == 0 and "left by a berth that died" in result.stderr, describe(result)
        deadline = time.monotonic() + 10
        while fuse_mounts_under(str(btrfs_state)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fuse_mounts_under(str(btrfs_state)) == [], describe(result)
        assert not dead.exists(), describe(result)
    finally:
        locker.kill()
        locker.wait()


def test_on_btrfs_a_look_at_a_free_lock_never_takes_it(btrfs_state):
    """The look at a lock (berth.locks.is_locked: berth doctor, ps, the GPU ledger's "busy")
    must never take a free lock, even for an instant: a concurrent one-try taker (a container
    taking its GPU) then fails. On btrfs 91dabca tried every lock /proc/locks showed as held,
    which took free ones whose inode number another subvolume's flocked file has: 3,606 of
    200,000 takes failed (review 11). The holders' descriptors now tell the two files apart."""
    import subprocess
    import sys

    from berth import locks

    top = btrfs_state.parent
    for name in ("a", "b"):
        subprocess.run(["btrfs", "subvolume", "create", str(top / name)], check=True, capture_output=True)
    held, free = top / "a" / "x.lock", top / "b" / "gpu0.lock"
    held.touch()
    free.touch()
    assert held.stat().st_ino == free.stat().st_ino and held.stat().st_dev != free.stat().st_dev
    holder = subprocess.Popen(["flock", "--exclusive", str(held), "sleep", "120"])
    try:
        deadline = time.monotonic() + 10
        while not locks.is_locked(held):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        taker = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "failed = 0\n"
            "for _ in range(20000):\n"
            "    try:\n"
            "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "    except BlockingIOError:\n"
            "        failed += 1\n"
            "    else:\n"
            "        fcntl.flock(fd, fcntl.LOCK_UN)\n"
            "print(failed)\n"), str(free)], stdout=subprocess.PIPE, text=True)
        looks = 0
        while taker.poll() is None:
            locks.is_locked(free)  # True while the taker has it, which is right
            looks += 1
        failed = int(taker.communicate()[0])
        assert failed == 0, f"{failed} of 20000 one-try takes failed during {looks} looks"
        assert locks.is_locked(held) and not locks.is_locked(free)
    finally:
        holder.kill()
        holder.wait()
