"""Cached run plans (berth.runtime.plancache): the key, the dependencies and their fingerprints,
the entries' trust and shape, and the completeness guard: every file a plan is made from is a
dependency of the kept plan."""

import marshal
import os
import sys
from pathlib import Path

import pytest

from berth.runtime import plancache
from berth.runtime.rootfs import MountPoint

KEY = "a" * 64


def entry_fields(**changes) -> dict:
    """A well-formed entry's fields (what Keeper writes besides format, key, uid, made)."""
    fields = {
        "compiled": "",
        "deps": [("/etc/passwd", True, plancache.fingerprint("/etc/passwd", True))],
        "settings": {"state_dir": "/tmp/s", "image_mount": "shared", "stage_to_local": False, "image_fuse": "auto",
                     "lock_timeout_s": 600, "image_mount_linger": 0, "runtime": "auto"},
        "image": {"squashfs": "/img.sqfs", "reference": None, "digest": None},
        "run": {"name": None, "image_name": "/img.sqfs", "argv": ["/bin/true"], "uid": os.getuid(),
                "gid": os.getgid(), "network": "host", "workdir": "/", "remap_root": False, "stop_timeout_s": 10.0,
                "init": "/x/berth-init", "debug": False},
        "plan": {"image_root": plancache.IMAGE_ROOT, "overlay": False, "kernel_overlay": False, "mount_points": [],
                 "identity_files": [["passwd", "root:x:0:0::/:/bin/sh\n", "/etc/passwd"]], "squash_to": None,
                 "config": {"root": {"path": plancache.IMAGE_ROOT}}},
    }
    fields.update(changes)
    return fields


@pytest.fixture
def plans(tmp_path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return state / plancache.DIRECTORY


# ------------------------------------------------------------------------------ the key

def test_the_key_changes_with_argv_environment_working_directory_and_umask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = plancache.run_key(["run", "img", "true"], {"A": "1"})
    assert plancache.run_key(["run", "img", "true"], {"A": "1"}) == base
    assert plancache.run_key(["run", "img", "false"], {"A": "1"}) != base
    assert plancache.run_key(["run", "img", "true"], {"A": "2"}) != base
    assert plancache.run_key(["run", "img", "true"], {"A": "1", "B": ""}) != base
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    assert plancache.run_key(["run", "img", "true"], {"A": "1"}) != base
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o077)
    try:
        assert plancache.run_key(["run", "img", "true"], {"A": "1"}) != base
    finally:
        os.umask(old)


def test_a_directory_of_the_same_path_but_another_inode_is_another_key(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = plancache.run_key(["run", "img"], {})
    monkeypatch.chdir(tmp_path)
    work.rmdir()
    (tmp_path / "spacer").mkdir()  # keep the freed inode from being reused at once
    work.mkdir()
    monkeypatch.chdir(work)
    assert plancache.run_key(["run", "img"], {}) != before


# ------------------------------------------------------------------------ dependencies

def test_fingerprints_see_a_rewrite_but_a_directory_on_the_way_only_by_identity(tmp_path):
    path = tmp_path / "site.toml"
    assert plancache.fingerprint(str(path), True) is None
    path.write_text("a = 1\n")
    first = plancache.fingerprint(str(path), True)
    path.write_text("a = 2\n")
    os.utime(path, ns=(1, 1))  # same size, old times: the ctime still moves
    assert plancache.fingerprint(str(path), True) != first
    directory = plancache.fingerprint(str(tmp_path), False)
    (tmp_path / "new").write_text("")
    assert plancache.fingerprint(str(tmp_path), False) == directory
    assert plancache.fingerprint(str(tmp_path), True) is not None


def test_dependencies_take_the_directories_above_and_where_links_lead(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("")
    (tmp_path / "link").symlink_to("real")
    dependencies = plancache.Dependencies()
    dependencies.add(str(tmp_path / "link" / "f"))
    assert dependencies.paths[str(tmp_path / "link" / "f")] is True
    assert dependencies.paths[str(tmp_path / "link")] is False
    assert dependencies.paths[str(tmp_path)] is False
    assert dependencies.paths[str(tmp_path / "real" / "f")] is True


def test_a_changed_dependency_is_named(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("x")
    dependencies = plancache.Dependencies()
    dependencies.add(str(path))
    entry = {"deps": dependencies.fingerprints()}
    assert plancache.changed_dependency(entry) is None
    path.unlink()
    path.write_text("x")
    assert plancache.changed_dependency(entry) == str(path)
    path.unlink()
    assert plancache.changed_dependency(entry) == str(path)


def test_a_dependency_changed_during_planning_keeps_nothing(tmp_path):
    path = tmp_path / "f"
    path.write_text("")
    fingerprints = [(str(path), True, plancache.fingerprint(str(path), True))]
    assert plancache.racy(fingerprints, os.stat(path).st_ctime_ns + 10 * plancache.RACY_NS) is None
    assert plancache.racy(fingerprints, os.stat(path).st_ctime_ns) == str(path)


def test_the_recorder_names_opened_and_listed_paths_and_counts_relative_ones(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    recorder = plancache.Recorder()
    with recorder:
        open(tmp_path / "f").close()
        os.listdir(tmp_path)
        list(os.scandir(tmp_path))
        with recorder:  # nested (planning inside a recorded run): the outer one goes on
            pass
        monkeypatch.chdir(tmp_path)
        open("f").close()
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            list(os.scandir(fd))  # which directory: not said, so the run is not cached
        finally:
            os.close(fd)
    open(tmp_path / "f").close()  # not recorded: the recorder is off
    assert recorder.paths == [(str(tmp_path / "f"), False), (str(tmp_path), True), (str(tmp_path), True),
                              (str(tmp_path), False)]
    assert recorder.unnamed == 2


def test_nsswitch_with_other_sources_than_files_is_not_cacheable(tmp_path):
    path = tmp_path / "nsswitch.conf"
    path.write_text("passwd: files systemd\ngroup: files\nhosts: files dns\n")
    assert plancache.nss_from_files(str(path))
    path.write_text("passwd: files sss\ngroup: files\n")
    assert not plancache.nss_from_files(str(path))
    path.write_text("passwd: files\ngroup: files ldap # comment\n")
    assert not plancache.nss_from_files(str(path))


# ------------------------------------------------------------------------------- plans

class _Plan:
    def __init__(self, image_root: str, container: str) -> None:
        self.image_root = image_root
        self.overlay = True
        self.kernel_overlay = False
        self.mount_points = (MountPoint("/data", True),)
        self.identity_files = (plancache._IdentityFile("passwd", "alice:x:1:1::/home/alice:/bin/sh\n",
                                                       "/etc/passwd"),)
        self.squash_to = None
        self.container = container


def test_a_plan_is_kept_with_placeholders_and_made_concrete_for_another_container():
    container, root = "/s/containers/b0123456789ab", "/s/images/sha256-1/root"
    config = {"root": {"path": container + "/rootfs"}, "mounts": [{"source": container + "/etc/passwd"},
                                                                  {"source": root + "/x"}]}
    plain, why = plancache.plan_entry(_Plan(root, container), config, container, "b0123456789ab")
    assert why is None
    assert plain["config"]["root"]["path"] == plancache.CONTAINER + "/rootfs"
    assert plain["image_root"] == plancache.IMAGE_ROOT
    concrete = plancache.CachedPlan(marshal.loads(marshal.dumps(plain)), "/s/containers/bffff", "/s/images/k/root")
    assert concrete.config() == {"root": {"path": "/s/containers/bffff/rootfs"},
                                 "mounts": [{"source": "/s/containers/bffff/etc/passwd"},
                                            {"source": "/s/images/k/root/x"}]}
    assert (concrete.image_root, concrete.overlay, concrete.mount_points) == ("/s/images/k/root", True,
                                                                               (MountPoint("/data", True),))
    assert concrete.identity_files[0].text == "alice:x:1:1::/home/alice:/bin/sh\n"


def test_a_plan_naming_its_container_elsewhere_is_not_kept():
    container = "/s/containers/b0123456789ab"
    config = {"linux": {"cgroupsPath": "berth/b0123456789ab"}}
    assert plancache.plan_entry(_Plan("/r", container), config, container, "b0123456789ab") == (
        None, "the container's id in the plan")


# ------------------------------------------------------------------------------ entries

def test_an_entry_is_written_private_and_read_back(plans):
    plancache.store_entry(plans, KEY, entry_fields())
    assert oct(os.stat(plans).st_mode & 0o777) == "0o700"
    assert oct(os.stat(plans / KEY).st_mode & 0o777) == "0o600"
    entry, why = plancache.load_entry(plans, KEY)
    assert why == "" and entry["run"]["argv"] == ["/bin/true"]


def test_no_entry_and_another_runs_entry_are_misses(plans):
    assert plancache.load_entry(plans, KEY) == (None, "no entry")
    plancache.store_entry(plans, KEY, entry_fields())
    os.rename(plans / KEY, plans / ("b" * 64))
    assert plancache.load_entry(plans, "b" * 64) == (None, "the entry is for another run")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a dict", "wrong type", "bad identity file",
                                    "no dependencies"])
def test_a_corrupt_entry_is_a_miss(plans, damage):
    plancache.store_entry(plans, KEY, entry_fields())
    data = (plans / KEY).read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"\x00garbage" * 10
    elif damage == "not a dict":
        data = marshal.dumps([1, 2])
    elif damage == "wrong type":
        entry = marshal.loads(data)
        entry["run"]["argv"] = "/bin/true"
        data = marshal.dumps(entry)
    elif damage == "bad identity file":
        entry = marshal.loads(data)
        entry["plan"]["identity_files"] = [["shadow", "x", "/etc/shadow"]]
        data = marshal.dumps(entry)
    else:  # nothing to re-check: never run (a kept plan always depends on files)
        entry = marshal.loads(data)
        entry["deps"] = []
        data = marshal.dumps(entry)
    (plans / KEY).write_bytes(data)
    entry, why = plancache.load_entry(plans, KEY)
    assert entry is None and why.startswith("the entry")


def test_an_entry_others_may_write_or_that_is_a_link_is_ignored(plans, tmp_path):
    plancache.store_entry(plans, KEY, entry_fields())
    os.chmod(plans / KEY, 0o620)
    assert plancache.load_entry(plans, KEY) == (None, "the entry is not yours alone to write")
    os.chmod(plans / KEY, 0o600)
    os.rename(plans / KEY, tmp_path / "elsewhere")
    (plans / KEY).symlink_to(tmp_path / "elsewhere")
    entry, why = plancache.load_entry(plans, KEY)
    assert entry is None and why.startswith("cannot open the entry")


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_an_entry_of_another_user_or_in_a_directory_others_may_enter_is_ignored(plans):
    plancache.store_entry(plans, KEY, entry_fields())
    os.chown(plans / KEY, 4242, 4242)
    assert plancache.load_entry(plans, KEY) == (None, "the entry is not yours alone to write")
    os.chown(plans / KEY, os.getuid(), os.getgid())
    os.chmod(plans, 0o755)
    entry, why = plancache.load_entry(plans, KEY)
    assert entry is None and "not a private directory" in why


def test_entries_are_pruned_oldest_first(plans):
    for index in range(plancache.MAX_ENTRIES + 3):
        key = f"{index:064x}"
        plancache.store_entry(plans, key, entry_fields())
        os.utime(plans / key, ns=(index * 10**9, index * 10**9))
    names = sorted(os.listdir(plans))
    assert len(names) == plancache.MAX_ENTRIES
    assert names[0] == f"{3:064x}"
    assert plancache.prune(plans) == plancache.MAX_ENTRIES and os.listdir(plans) == []


def test_a_compiled_entry_goes_with_its_entry_and_one_no_entry_names_is_pruned(plans):
    """A compiled entry (c-KEY) whose entry was pruned or replaced stayed in plans/ (review):
    pruning takes an entry's twin with it, and removes compiled entries no kept entry names."""
    twin = plancache.COMPILED_PREFIX + "1" * 64
    orphan = plancache.COMPILED_PREFIX + "2" * 64
    plancache.store_entry(plans, KEY, entry_fields(compiled=twin))
    (plans / twin).write_bytes(b"compiled")
    (plans / orphan).write_bytes(b"compiled")
    plancache.store_entry(plans, "b" * 64, entry_fields())  # a run kept: prunes
    assert sorted(os.listdir(plans)) == sorted([KEY, "b" * 64, twin])
    os.utime(plans / KEY, ns=(0, 0))  # the oldest, pruned with its twin
    assert plancache.prune(plans, keep=1) == 2 and os.listdir(plans) == ["b" * 64]


def test_an_entry_naming_a_twin_that_is_not_a_compiled_entry_is_malformed(plans):
    plancache.store_entry(plans, KEY, entry_fields(compiled="../" + KEY))
    assert plancache.load_entry(plans, KEY) == (None, "the entry's compiled twin is malformed")


def test_forget_removes_the_entries_named_only_in_a_private_directory(plans, tmp_path):
    plancache.store_entry(plans, KEY, entry_fields())
    plancache.forget(plans, KEY, "c-absent", "")
    assert os.listdir(plans) == []
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    (shared / KEY).write_bytes(b"x")
    plancache.forget(shared, KEY)
    assert os.listdir(shared) == [KEY]


def test_the_cache_is_where_settings_would_put_the_state_without_files(tmp_path):
    state = tmp_path / "state"
    # Missing: the run makes it (store_entry judges it then).
    assert plancache.cache_directory({"BERTH_STATE_DIR": str(state)}) == state / "plans"
    state.mkdir(mode=0o700)
    assert plancache.cache_directory({"BERTH_STATE_DIR": str(state)}) == state / "plans"
    assert plancache.cache_directory({"BERTH_STATE_DIR": "relative/dir"}) is None
    os.chmod(state, 0o755)
    assert plancache.cache_directory({"BERTH_STATE_DIR": str(state)}) is None
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    (runtime / "berth").mkdir(mode=0o700)
    assert plancache.cache_directory({"XDG_RUNTIME_DIR": str(runtime)}) == runtime / "berth" / "plans"


# ------------------------------------------------------------------- completeness guard

class _AllPaths:
    """Every path Python code opens, lists or stats while active: the audit events of
    plancache.Recorder, and os.stat/os.lstat (which have no audit event), by patching."""

    def __init__(self, monkeypatch, recorder: plancache.Recorder) -> None:
        self.paths: list[str] = []
        self.recorder = recorder  # the keeper's: one recorder records at a time
        real_stat, real_lstat = os.stat, os.lstat

        def stat(path, *args, **kwargs):
            self._note(path, kwargs)
            return real_stat(path, *args, **kwargs)

        def lstat(path, *args, **kwargs):
            self._note(path, kwargs)
            return real_lstat(path, *args, **kwargs)

        monkeypatch.setattr(os, "stat", stat)
        monkeypatch.setattr(os, "lstat", lstat)

    def _note(self, path, kwargs) -> None:
        if self.recorder.active and not isinstance(path, int) and kwargs.get("dir_fd") is None:
            self.paths.append(os.fspath(path) if not isinstance(path, bytes) else os.fsdecode(path))

    def all(self) -> set[str]:
        return {os.path.abspath(path) for path in [*self.paths, *(path for path, _ in self.recorder.paths)]}


class _World:
    """A node for the guard: a site file with a mount and a drop-in, a user file, a user store
    with the image, an absent site store, a home, a -v source and an env file."""

    def __init__(self, tmp_path: Path, store_in_state: bool = False) -> None:
        from tests.unit.test_store import _fake_image

        from berth.store.store import USER, Store

        site, home, self.state = tmp_path / "site", tmp_path / "home", tmp_path / "state"
        store_root = self.state / "store" if store_in_state else tmp_path / "store"
        for directory in (site / "conf.d", home / ".config" / "berth", tmp_path / "shared", tmp_path / "data",
                          tmp_path / "image-root" / "etc"):
            directory.mkdir(parents=True)
        self.state.mkdir(mode=0o700)
        (site / "berth.toml").write_text(f'[[policy.mounts]]\nsource = "{tmp_path}/shared"\n'
                                         'destination = "/shared"\n')
        (site / "conf.d" / "10-deny.toml").write_text('[policy]\nmount_deny_sources = ["/etc"]\n')
        (home / ".config" / "berth" / "berth.toml").write_text("pull_retries = 3\n")
        (tmp_path / "vars.env").write_text("A=1\n")
        (tmp_path / "image-root" / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        store = Store(store_root, USER)
        store.require_writable()
        _fake_image(store)
        self.environ = {"PATH": "/usr/bin:/bin", "HOME": str(home), "BERTH_CONFIG_DIR": str(site),
                        "XDG_CONFIG_HOME": str(home / ".config"), "BERTH_USER_STORE": str(store_root),
                        "BERTH_SITE_STORE": str(tmp_path / "site-store"), "BERTH_STATE_DIR": str(self.state),
                        "IMAGE": "example.org/team/app:1"}
        self.options = ["-v", f"{tmp_path}/data:/data", "--env-file", str(tmp_path / "vars.env")]
        self.must_cover = [str(site / "berth.toml"), str(site / "conf.d"), str(site / "conf.d" / "10-deny.toml"),
                           str(home / ".config" / "berth" / "berth.toml"), str(tmp_path / "shared"),
                           str(tmp_path / "data"), str(home), str(tmp_path / "vars.env"), "/etc/passwd",
                           "/etc/group", str(tmp_path / "site-store"), str(store_root / "index.json")]


def _plan_a_run(tmp_path, environ, argv_options, keeper):
    """Settings, image look-up, request and plan as `berth run` makes them, recorded by
    ``keeper`` (and ``everything``), on an image directory standing for the image's mount."""
    from contextlib import ExitStack

    from berth.cli.run import resolve_image
    from berth.config.load import load_settings
    from berth.runtime.options import parse_run_options
    from berth.runtime.plan import plan_container, request_for
    from berth.runtime.state import ContainerLayout

    image_root = tmp_path / "image-root"
    with ExitStack() as stack:
        stack.enter_context(keeper.recorder)
        settings = load_settings(environ=environ)
        options = parse_run_options(argv_options)
        image = resolve_image(settings, environ["IMAGE"], "missing")
        request = request_for(settings, image, ["/bin/true"], options, init_path="/x/berth-init", environ=environ,
                              caller=None)
        keeper.planned(settings, image, options, request, Path(environ["BERTH_STATE_DIR"]), "/x/berth-init")
        plan_container(request, str(image_root), ContainerLayout("b1", tmp_path / "state" / "containers" / "b1"))
    return settings


@pytest.mark.parametrize("store_in_state", [False, True], ids=["store beside", "store in the state directory"])
def test_every_file_a_plan_is_made_from_is_a_dependency(tmp_path, monkeypatch, store_in_state):
    """The guard of the module docstring: settings files and drop-ins (present and absent),
    site and -v mount sources, the home directory, env files, the store's records and the
    image file: whatever the planning opens, lists or stats is covered by the kept plan's
    dependencies (but the image's own files, and Python's), a store kept inside the state
    directory too (its index was skipped with the whole state directory once)."""
    world = _World(tmp_path, store_in_state)
    keeper = plancache.Keeper(world.state / "plans", KEY, world.environ, image_argument=world.environ["IMAGE"])
    _plan_a_run(tmp_path, world.environ, world.options, keeper)  # imports done, caches warm
    keeper = plancache.Keeper(world.state / "plans", KEY, world.environ, image_argument=world.environ["IMAGE"])
    everything = _AllPaths(monkeypatch, keeper.recorder)
    _plan_a_run(tmp_path, world.environ, world.options, keeper)
    covered = keeper.dependencies(str(tmp_path / "image-root"), world.state).paths
    from berth.config.load import parse_cache_dir

    # The image's own files (its SquashFS is a dependency), the state directories (the parse
    # cache keeps only parses of the very bytes read from settings files), Python's own files.
    # The mount table is this process's, read for where berth's directories appear: those are
    # dependencies themselves.
    ignored = (str(tmp_path / "image-root"), str(world.state / "containers"), str(parse_cache_dir(world.environ)),
               sys.prefix, sys.base_prefix, "/proc/self/mountinfo")
    missing = sorted(path for path in everything.all() if path not in covered
                     and not any(path == top or path.startswith(top + "/") for top in ignored))
    assert missing == [], "\n".join(missing)
    for path in world.must_cover:
        assert path in covered, path


# ------------------------------------------------------------------------ the look-up

def _planted(tmp_path, monkeypatch, **settings_changes):
    """An entry with no dependencies at all, as a container that could write the state
    directory might plant it, under the key of `berth run img true` in this environment."""
    from berth.cli import fastrun

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    site = tmp_path / "site"
    site.mkdir()
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BERTH_STATE_DIR": str(state),
               "BERTH_CONFIG_DIR": str(site), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    monkeypatch.chdir(tmp_path)
    argv = ["run", "img", "true"]
    fields = entry_fields()
    fields["settings"] = {**fields["settings"], "state_dir": str(state), **settings_changes}
    plancache.store_entry(state / "plans", plancache.run_key(argv, environ), fields)
    return fastrun, argv, environ, site


def test_with_the_setting_off_no_entry_runs_whoever_wrote_it(tmp_path, monkeypatch):
    fastrun, argv, environ, site = _planted(tmp_path, monkeypatch)
    (site / "berth.toml").write_text("plan_cache = false\n")
    lookup = fastrun.look_up(argv, environ)
    assert (lookup.entry, lookup.reason) == (None, "the setting plan_cache is off")
    (site / "berth.toml").write_text("")  # the default: on
    lookup = fastrun.look_up(argv, environ)
    assert lookup.entry is not None and lookup.reason == ""


def test_an_entry_whose_settings_are_not_the_current_ones_does_not_run(tmp_path, monkeypatch):
    fastrun, argv, environ, site = _planted(tmp_path, monkeypatch, image_mount="per_container")
    (site / "berth.toml").write_text("plan_cache = true\n")
    lookup = fastrun.look_up(argv, environ)
    assert (lookup.entry, lookup.reason) == (None, "the setting image_mount is not the entry's")


def test_with_the_setting_off_the_entry_is_not_even_read(tmp_path, monkeypatch):
    fastrun, argv, environ, site = _planted(tmp_path, monkeypatch)
    (site / "berth.toml").write_text("plan_cache = false\n")
    read = []
    monkeypatch.setattr(plancache, "load_entry", lambda *args: read.append(args) or (None, "read"))
    lookup = fastrun.look_up(argv, environ)
    assert (lookup.entry, lookup.reason, read) == (None, "the setting plan_cache is off", [])
    assert lookup.key is None  # nor is a plan kept


def test_an_entry_that_is_not_well_formed_is_a_miss_not_a_traceback(tmp_path, monkeypatch):
    fastrun, argv, environ, site = _planted(tmp_path, monkeypatch)
    (site / "berth.toml").write_text("plan_cache = true\n")
    fields = entry_fields()
    fields["settings"] = {**fields["settings"], "state_dir": environ["BERTH_STATE_DIR"]}
    fields["plan"] = {**fields["plan"], "config": {"mounts": 1}}
    plancache.store_entry(tmp_path / "state" / "plans", plancache.run_key(argv, environ), fields)
    lookup = fastrun.look_up(argv, environ)
    assert lookup.entry is None and lookup.reason == "the entry's config.json mounts are malformed"
    fields["plan"] = {**fields["plan"], "config": {"mounts": []}}
    fields["deps"] = [("/x\0y", False, None)]  # lstat raises ValueError: no OSError
    plancache.store_entry(tmp_path / "state" / "plans", plancache.run_key(argv, environ), fields)
    lookup = fastrun.look_up(argv, environ)
    assert lookup.entry is None and lookup.reason.startswith("the entry is not well-formed")


def test_a_state_dir_set_in_the_settings_files_uses_and_keeps_no_plan(tmp_path, monkeypatch):
    # The plans' directory is found before settings (BERTH_STATE_DIR or the default): a
    # state_dir that berth.toml moves elsewhere would leave them where containers may reach.
    fastrun, argv, environ, site = _planted(tmp_path, monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    del environ["BERTH_STATE_DIR"]
    environ["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    (tmp_path / "run").mkdir(mode=0o700)
    (site / "berth.toml").write_text(f"plan_cache = true\nstate_dir = '{elsewhere}'\n")
    directory = plancache.cache_directory(environ)
    directory.parent.mkdir(mode=0o700)
    fields = entry_fields()
    fields["settings"] = {**fields["settings"], "state_dir": str(elsewhere)}
    plancache.store_entry(directory, plancache.run_key(argv, environ), fields)
    lookup = fastrun.look_up(argv, environ)
    assert lookup.entry is None and lookup.key is None and lookup.reason.startswith("state_dir is not")
