"""Many users on one machine (issue 12), with two real unprivileged users: ``user`` (the victim)
and ``other_user``. One user must not read another's store, hold the site's or another user's
locks, or squat the state directory; a lock wait always ends with a message naming the holder.
The state directory also survives an XDG_RUNTIME_DIR exported from another node (issue 9,
defect 2). docs/security.md, "Multi-user model", is what these tests keep true.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.users import berth_executable, describe

pytestmark = pytest.mark.integration


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def fresh_home(user):
    """A new home for ``user``, traversable by everyone as Debian's default homes are (0755),
    that HOME points at (it differs from the passwd home, as on sites that set HOME)."""
    home = user.tempdir(prefix="berth-home-")
    yield home
    shutil.rmtree(home, ignore_errors=True)


def _as(user, argv, *, env, umask=0o022, **kwargs):
    """Run ``argv`` as ``user`` with ``umask``."""
    return user.run(["sh", "-c", f'umask {umask:03o}; exec "$@"', "sh", *argv], env=env, **kwargs)


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_another_user_cannot_read_a_users_store_whatever_the_umask(user, other_user, fresh_home, busybox_image,
                                                                   site_config, umask):
    """Defect 1: the user store had the site store's modes (0755/0644/0444) and berth created
    ~/.local and ~/.local/share 0755, so anyone could copy an image pulled with private credentials."""
    env = {**site_config.env, "HOME": str(fresh_home)}
    env.pop("XDG_CONFIG_HOME")
    pulled = _as(user, [str(berth_executable()), "pull", "--insecure", "-q", str(busybox_image)], env=env, umask=umask)
    assert pulled.returncode == 0, describe(pulled)
    store = fresh_home / ".local" / "share" / "berth"
    squashfs = next((store / "images").glob("sha256-*/image.sqfs"))
    for directory in (fresh_home / ".local", fresh_home / ".local" / "share", store, squashfs.parent):
        assert _mode(directory) == 0o700, directory
    assert _mode(store / "index.json") == 0o600 and _mode(squashfs) == 0o400
    for path in (store / "index.json", squashfs):
        peek = other_user.run(["cat", str(path)])
        assert peek.returncode != 0 and "Permission denied" in peek.stderr, describe(peek)
    listing = other_user.run(["ls", str(fresh_home / ".local")])
    assert listing.returncode != 0 and "Permission denied" in listing.stderr, describe(listing)
    # The owner still uses it.
    images = user.berth("images", env=env)
    assert images.returncode == 0 and "test/busybox" in images.stdout, describe(images)


def test_a_store_made_open_by_an_earlier_berth_is_closed_on_the_next_write(user, other_user, fresh_home, site_config):
    store = fresh_home / "store"
    store.mkdir(mode=0o755)
    (store / "index.json").write_text('{"layout": 1, "references": {}}\n')
    for path in (store, store / "index.json"):
        os.chown(path, user.uid, user.gid)
    store.chmod(0o755)
    result = user.berth("prune", env={**site_config.env, "BERTH_USER_STORE": str(store)})
    assert result.returncode == 0, describe(result)
    assert _mode(store) == 0o700
    peek = other_user.run(["cat", str(store / "index.json")])
    assert peek.returncode != 0, describe(peek)


# --------------------------------------------------------------------------------- locks (defect 2)


def _hold(user, lock: Path, *, shared: bool = False) -> subprocess.Popen | None:
    """``flock LOCK sleep 60`` as ``user``: the lock held once it prints, None if it cannot be taken."""
    argv = ["runuser", "-u", user.name, "--", "flock", "-s" if shared else "-x", "-n", str(lock),
            "sh", "-c", "echo held; exec sleep 60"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)
    line = process.stdout.readline().strip()
    if line == "held":
        return process
    process.wait(10)
    return None


def _release(process: subprocess.Popen | None) -> None:
    if process is not None:
        process.kill()
        process.wait(10)


def test_users_cannot_hold_the_site_stores_or_the_templates_locks(other_user, admin, site_config):
    """Defect 2: lock files were 0644 and flock works on a read-only descriptor, so any user
    could make the administrator's pull --site, prune --site and template changes hang."""
    env = dict(site_config.env)
    made = admin.berth("prune", "--site", env=env, timeout=60)
    assert made.returncode == 0, describe(made)
    site_config.add_template("t1")
    locks = [site_config.site_store / "locks" / "gc.lock", site_config.templates_dir / ".lock"]
    for lock in locks:
        assert lock.is_file() and _mode(lock) == 0o600 and os.stat(lock).st_uid == 0, lock
    holders = [_hold(other_user, lock, shared=True) for lock in locks]
    try:
        assert holders == [None, None]
        started = time.monotonic()
        pruned = admin.berth("prune", "--site", env=env, timeout=60)
        assert pruned.returncode == 0, describe(pruned)
        modified = admin.berth("template", "modify", "t1", "cpu=2", env=env, timeout=60)
        assert modified.returncode == 0, describe(modified)
        assert time.monotonic() - started < 30
    finally:
        for holder in holders:
            _release(holder)
    # Users still read, check and diagnose the site store and templates without any lock.
    listed = other_user.berth("template", "list", env=env)
    assert listed.returncode == 0 and "t1" in listed.stdout, describe(listed)
    verified = other_user.berth("store", "verify", "--site", env=env)
    assert verified.returncode == 0 and "not checked, it belongs to the store's owner" in verified.stderr, \
        describe(verified)
    doctor = other_user.berth("doctor", env=env)
    assert "permission denied" not in (doctor.stdout + doctor.stderr).lower(), describe(doctor)


def test_an_old_open_site_lock_file_is_closed_by_the_admins_next_command(other_user, admin, site_config):
    locks_dir = site_config.site_store / "locks"
    locks_dir.mkdir(mode=0o755)
    legacy = locks_dir / "gc.lock"
    legacy.write_text("")
    legacy.chmod(0o644)
    made = admin.berth("prune", "--site", env=dict(site_config.env), timeout=60)
    assert made.returncode == 0, describe(made)
    assert _mode(legacy) == 0o600 and _mode(locks_dir) == 0o700
    assert _hold(other_user, legacy, shared=True) is None


def _user_store_with_locks(user, env, home: Path) -> Path:
    """The user's default store, made by the user (mkdir -p, as a user might) and used once."""
    store = home / ".local" / "share" / "berth"
    made = user.run(["mkdir", "-p", str(store)])
    assert made.returncode == 0, describe(made)
    pruned = user.berth("prune", env=env)
    assert pruned.returncode == 0, describe(pruned)
    return store / "locks" / "gc.lock"


def test_another_user_cannot_hold_a_users_store_lock(user, other_user, fresh_home, site_config):
    env = {**site_config.env, "HOME": str(fresh_home)}
    lock = _user_store_with_locks(user, env, fresh_home)
    assert lock.is_file() and _mode(lock) == 0o600
    assert _hold(other_user, lock, shared=True) is None


def test_a_lock_wait_is_bounded_and_names_the_holder(user, fresh_home, site_config):
    """Every wait on a lock ends (lock_timeout_s) with the lock file and who holds it."""
    env = {**site_config.env, "HOME": str(fresh_home), "BERTH_LOCK_TIMEOUT_S": "1"}
    lock = _user_store_with_locks(user, env, fresh_home)
    holder = _hold(user, lock, shared=True)  # e.g. a pull of the user's that hangs
    assert holder is not None
    try:
        started = time.monotonic()
        blocked = user.berth("prune", env=env, timeout=60)
        waited = time.monotonic() - started
    finally:
        _release(holder)
    assert blocked.returncode == 75, describe(blocked)
    assert waited < 20
    assert f"gave up waiting for the lock {lock}" in blocked.stderr, describe(blocked)
    # flock(1) took the lock: its pid, user and command line are named.
    assert f"of user {user.name} (flock -s -n {lock} sh -c" in blocked.stderr, describe(blocked)
    assert "lock_timeout_s" in blocked.stderr


# ----------------------------------------------------- state directory (defect 3; issue 9 defect 2)


def _in_private_tmp(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh, as root) in a mount namespace with its own empty /tmp, so that the
    state directory's default /tmp/berth-UID can be squatted without touching the real /tmp."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-euc",
                           "mount -t tmpfs -o mode=1777 berth-private-tmp /tmp\n" + script],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _berth_run_script(user, image: Path, xdg_runtime_dir: str | None) -> str:
    env = {k: v for k, v in user.base_env().items() if k != "BERTH_CONFIG_DIR"}
    if xdg_runtime_dir is not None:
        env["XDG_RUNTIME_DIR"] = xdg_runtime_dir
    assignments = " ".join(f"'{k}={v}'" for k, v in env.items())
    return (f"runuser -u {user.name} -- env -i {assignments} {berth_executable()} run {image} echo ran-ok\n"
            f"stat -c '%n %u %a %F' /tmp/berth-{user.uid}*\n")


def _state_dirs(output: str) -> dict[str, tuple[int, str, str]]:
    found = {}
    for line in output.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[0].startswith("/tmp/berth-"):
            found[parts[0]] = (int(parts[1]), parts[2], parts[3])
    return found


def test_a_squatted_state_directory_does_not_stop_the_victim(user, other_user, runtime_images):
    """Defect 3: another user who creates /tmp/berth-UID first made every run of the victim fail."""
    squat = f"runuser -u {other_user.name} -- mkdir -m 0777 /tmp/berth-{user.uid}\n"
    result = _in_private_tmp(squat + _berth_run_script(user, runtime_images.busybox, None))
    assert result.returncode == 0 and "ran-ok" in result.stdout, describe(result)
    dirs = _state_dirs(result.stdout)
    assert dirs.pop(f"/tmp/berth-{user.uid}") == (other_user.uid, "777", "directory")  # left alone
    [(own, info)] = dirs.items()
    assert own.startswith(f"/tmp/berth-{user.uid}.") and info == (user.uid, "700", "directory"), result.stdout


def test_a_squatting_link_is_not_followed(user, other_user, runtime_images):
    target = f"/tmp/target-of-{other_user.name}"
    squat = (f"runuser -u {other_user.name} -- mkdir -m 0777 {target}\n"
             f"runuser -u {other_user.name} -- ln -s {target} /tmp/berth-{user.uid}\n")
    script = squat + _berth_run_script(user, runtime_images.busybox, None) + f"ls -A {target} | wc -l\n"
    result = _in_private_tmp(script)
    assert result.returncode == 0 and "ran-ok" in result.stdout, describe(result)
    assert result.stdout.strip().splitlines()[-1] == "0", describe(result)  # nothing created through the link


@pytest.mark.parametrize("runtime_dir", ["missing", "foreign"])
def test_an_exported_xdg_runtime_dir_that_is_missing_or_foreign_falls_back(user, other_user, runtime_images,
                                                                        runtime_dir):
    """Issue 9, defect 2: Slurm exports a login node's XDG_RUNTIME_DIR=/run/user/UID to compute
    nodes, where it does not exist or belongs to someone else; berth used it and failed."""
    if runtime_dir == "missing":
        prepare, path = "", f"/tmp/run-user-{user.uid}-not-here"
    else:
        path = f"/tmp/run-user-of-{other_user.name}"
        prepare = f"runuser -u {other_user.name} -- mkdir -m 0700 {path}\n"
    result = _in_private_tmp(prepare + _berth_run_script(user, runtime_images.busybox, path))
    assert result.returncode == 0 and "ran-ok" in result.stdout, describe(result)
    assert _state_dirs(result.stdout) == {f"/tmp/berth-{user.uid}": (user.uid, "700", "directory")}, result.stdout


def test_what_an_admin_with_umask_077_puts_in_the_site_store_is_readable_and_closed(
        admin, other_user, site_config, registry, busybox_image):
    """The site store is read by every user and written by the administrators only, whatever
    the administrator's umask: content readable by all, nothing writable by group or others."""
    site_config.trust_registry(registry.host)
    env = dict(site_config.env)
    pulled = _as(admin, [str(berth_executable()), "pull", "--site", "-q", str(busybox_image)], env=env,
                 umask=0o077)
    assert pulled.returncode == 0, describe(pulled)
    private = {site_config.site_store / "tmp", site_config.site_store / "locks"}
    for path in [site_config.site_store, *site_config.site_store.rglob("*")]:
        if path in private or path.parent in private:
            continue
        mode = _mode(path)
        assert not mode & 0o022, (path, oct(mode))
        assert mode & 0o004 and (not path.is_dir() or mode & 0o001), (path, oct(mode))
    seen = other_user.berth("inspect", str(busybox_image), env=env)
    assert seen.returncode == 0 and busybox_image.digest in seen.stdout, describe(seen)
