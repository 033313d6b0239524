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


def _plans(env) -> Path:
    return env.state_dir / "plans"


def _entries(env) -> list[Path]:
    try:
        return sorted(path for path in _plans(env).iterdir() if len(path.name) == 64)
    except FileNotFoundError:
        return []


def run(env, site, *args, extra=None):
    return env.berth("run", "--debug", *args, env={**site.env, **CACHE_ON, **(extra or {})})


def run_until_kept(env, site, *args, extra=None):
    """Run until the run keeps its plan (inputs written moments ago are not trusted yet);
    every run's result is returned, the last one kept the plan."""
    results = []
    deadline = time.monotonic() + KEEP_DEADLINE_S
    while True:
        result = run(env, site, *args, extra=extra)
        results.append(result)
        if "plan cache: kept this run's plan" in result.stderr:
            return results
        assert "plan cache: this run's plan is not kept: " in result.stderr and "changed moments ago" in \
            result.stderr, describe(result)
        assert time.monotonic() < deadline, describe(result)
        time.sleep(0.2)


def hit(result) -> bool:
    return "plan cache: hit" in result.stderr


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
    assert len(_entries(env)) == 1
    (env.scratch / "out.txt").unlink()
    cached = run(env, site, *args)
    assert hit(cached), describe(cached)
    assert (cached.returncode, cached.stdout) == (planned.returncode, planned.stdout)
    assert cached.stdout.splitlines()[:4] == [str(user.uid), str(user.gid), str(user.home), "/tmp"]
    assert cached.stdout.splitlines()[-1] == "hello"
    info = os.stat(env.scratch / "out.txt")
    assert (info.st_uid, info.st_gid) == (user.uid, user.gid)
    assert not env.wait_clean()  # between runs too: the cached run tore down like the other
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

@pytest.mark.parametrize("damage", ["other user", "group-writable", "truncated", "link"])
def test_an_entry_not_written_by_the_user_alone_or_damaged_is_ignored(runtime_env, runtime_images, site,
                                                                      other_user, damage):
    env = runtime_env
    args = (str(runtime_images.busybox), "sh", "-c", "echo ran; exit 5")
    run_until_kept(env, site, *args)
    [entry] = _entries(env)
    if damage == "other user":
        os.chown(entry, other_user.uid, other_user.gid)
    elif damage == "group-writable":
        os.chmod(entry, 0o660)
    elif damage == "truncated":
        data = entry.read_bytes()
        entry.write_bytes(data[: len(data) // 3])
    else:
        target = env.scratch / "planted"
        shutil.copy2(entry, target)
        os.chown(target, env.user.uid, env.user.gid)
        entry.unlink()
        entry.symlink_to(target)
        os.lchown(entry, env.user.uid, env.user.gid)
    result = run(env, site, *args)
    assert (result.returncode, result.stdout) == (5, "ran\n") and not hit(result), describe(result)
    assert "plan cache: miss: " in result.stderr, describe(result)
    if damage != "link":
        # Replaced by the user's own entry for the next run.
        again = run(env, site, *args)
        assert (again.returncode, again.stdout) == (5, "ran\n") and hit(again), describe(again)


def test_prune_and_doctor_cleanup_remove_the_kept_plans(runtime_env, runtime_images, site):
    env = runtime_env
    run_until_kept(env, site, str(runtime_images.busybox), "true")
    assert len(_entries(env)) == 1
    pruned = env.berth("prune", "--json", env=site.env)
    assert pruned.returncode == 0 and json.loads(pruned.stdout)["plans_removed"] == 1, describe(pruned)
    assert _entries(env) == []
    run_until_kept(env, site, str(runtime_images.busybox), "true")
    cleaned = env.berth("doctor", "--cleanup", env=site.env)
    assert "removed 1 cached run plans" in cleaned.stdout, describe(cleaned)
    assert _entries(env) == []


def test_a_run_from_a_kept_plan_imports_no_planning(runtime_env, runtime_images, site):
    """The point of the cache (issue 10, target 3): a hit looks no image up and plans nothing,
    so it imports none of their modules, nor argparse (nor tomllib: the settings it loads, to
    know the cache is on, come from the parse cache)."""
    from tests.harness.users import berth_executable, venv_dir

    env = runtime_env
    args = (str(runtime_images.busybox), "true")
    run_until_kept(env, site, *args)
    result = env.user.run([str(venv_dir() / "bin" / "python"), "-X", "importtime", str(berth_executable()), "run",
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
    script = ('s=/outside/state; echo "entries: $(ls -A $s | wc -l)"; '
              '(echo x > $s/plans/planted) 2>/dev/null && echo PLANTED; echo ok > /outside/scratch/ok && echo normal')
    args = ("-v", f"{env.state_dir.parent}:/outside", str(runtime_images.busybox), "sh", "-c", script)
    planned = run_until_kept(env, site, *args)[-1]
    again = run(env, site, *args)
    assert hit(again) and not hit(planned), describe(again)
    for result in (planned, again):
        assert result.returncode == 0 and result.stdout == "entries: 0\nnormal\n", describe(result)
    assert [path.name for path in _entries(env)] != [] and not (_plans(env) / "planted").exists()
