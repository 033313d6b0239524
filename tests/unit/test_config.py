"""Settings loading: order of layers, provenance, and every kind of configuration error."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from berth.config.load import effective_values, load_settings
from berth.config.settings import Settings
from berth.errors import ConfigError


class Site:
    """A site directory, a user config home, and the environment that points at them."""

    def __init__(self, root: Path) -> None:
        self.config_dir = root / "etc-berth"
        self.config_dir.mkdir()
        self.home = root / "home"
        self.user_file = self.home / ".config" / "berth" / "berth.toml"
        self.user_file.parent.mkdir(parents=True)
        self.environ = {"HOME": str(self.home), "BERTH_CONFIG_DIR": str(self.config_dir)}

    def write(self, relative: str, text: str) -> Path:
        path = self.config_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def write_user(self, text: str) -> Path:
        self.user_file.write_text(textwrap.dedent(text))
        return self.user_file

    def load(self, options: dict | None = None, **env: str) -> Settings:
        return load_settings(options, environ={**self.environ, **env})


@pytest.fixture
def site(tmp_path) -> Site:
    return Site(tmp_path)


def test_defaults_have_default_sources_and_xdg_paths(site):
    settings = site.load()
    assert settings.config_dir == site.config_dir
    assert settings.sources["config_dir"] == "env BERTH_CONFIG_DIR"
    assert settings.user_store == site.home / ".local/share/berth"
    assert settings.jobs_dir == site.home / ".local/state/berth/jobs"
    assert settings.runtime == "auto" and settings.sources["runtime"] == "default"
    assert settings.policy.mount_deny_sources[:2] == ("/etc/shadow", "/etc/gshadow")
    assert settings.templates_dir == site.config_dir / "templates.d"


def test_layers_apply_in_documented_order_with_sources(site):
    site_file = site.write("berth.toml", """\
        # comment
        pull_parallel = 2
        pull_retries = 3
        backend = "slurm"
        squashfs_compression = "zstd"
    """)
    dropin_a = site.write("conf.d/10-a.toml", "pull_parallel = 5\n")
    dropin_b = site.write("conf.d/20-b.toml", "\npull_parallel = 6\nlocal_max_jobs = 9\n")
    site.write("conf.d/README", "not toml, ignored\n")
    user_file = site.write_user("pull_parallel = 7\npull_retries = 8\n")
    settings = site.load({"backend": "local"}, BERTH_PULL_RETRIES="11")
    assert settings.pull_parallel == 7
    assert settings.sources["pull_parallel"] == f"{user_file}:1"
    assert settings.pull_retries == 11 and settings.sources["pull_retries"] == "env BERTH_PULL_RETRIES"
    assert settings.backend == "local" and settings.sources["backend"] == "option --backend"
    assert settings.squashfs_compression == "zstd" and settings.sources["squashfs_compression"] == f"{site_file}:5"
    assert settings.local_max_jobs == 9 and settings.sources["local_max_jobs"] == f"{dropin_b}:3"
    assert dropin_a.exists()


def test_dropins_are_read_in_lexical_order(site):
    site.write("conf.d/9-last.toml", "pull_parallel = 9\n")
    site.write("conf.d/10-first.toml", "pull_parallel = 10\n")  # "10-" sorts before "9-"
    assert site.load().pull_parallel == 9


def test_existing_environment_overrides_still_work(site, tmp_path):
    settings = site.load(BERTH_SITE_STORE=str(tmp_path / "s"), BERTH_USER_STORE=str(tmp_path / "u"),
                         BERTH_STATE_DIR=str(tmp_path / "st"), BERTH_JOBS_DIR=str(tmp_path / "j"),
                         BERTH_RUNTIME="runc")
    assert (settings.site_store, settings.user_store) == (tmp_path / "s", tmp_path / "u")
    assert (settings.state_dir, settings.jobs_dir, settings.runtime) == (tmp_path / "st", tmp_path / "j", "runc")
    assert settings.sources["site_store"] == "env BERTH_SITE_STORE"


def test_user_file_paths_expand_home(site):
    site.write_user('user_store = "~/images"\n')
    assert site.load().user_store == site.home / "images"


def test_xdg_config_home_moves_the_user_file(site, tmp_path):
    other = tmp_path / "xdg" / "berth"
    other.mkdir(parents=True)
    (other / "berth.toml").write_text("pull_retries = 1\n")
    site.write_user("pull_retries = 2\n")
    assert site.load(XDG_CONFIG_HOME=str(tmp_path / "xdg")).pull_retries == 1


def test_unknown_key_names_file_line_key_and_suggests(site):
    path = site.write("berth.toml", 'runtime = "runc"\n\n[policy]\ndevices = []\nmount_alow = ["/home"]\n')
    with pytest.raises(ConfigError) as caught:
        site.load()
    assert caught.value.message == f"{path}:5: policy.mount_alow: unknown key"
    assert "did you mean 'mount_allow'?" in caught.value.hint


def test_unknown_top_level_key_in_dropin(site):
    path = site.write("conf.d/50-x.toml", "\n\nruntimes = 'runc'\n")
    with pytest.raises(ConfigError) as caught:
        site.load()
    assert caught.value.message == f"{path}:3: runtimes: unknown key"
    assert "did you mean 'runtime'?" in caught.value.hint


@pytest.mark.parametrize("line, problem", [
    ('pull_parallel = "4"', "pull_parallel: must be an integer, not a string ('4')"),
    ("pull_parallel = 0", "pull_parallel: 0 is out of range: allowed 1 to 64"),
    ("pull_parallel = true", "pull_parallel: must be an integer, not a boolean (True)"),
    ('runtime = "docker"', "runtime: 'docker' is not one of: auto, launcher, runc, crun"),
    ('site_store = "relative/store"', "site_store: must be an absolute path, not 'relative/store'"),
    ('site_store = "/a/../etc"', "site_store: '/a/../etc' may not contain '..' or NUL characters"),
    ("stage_to_local = 1", "stage_to_local: must be a boolean (true or false), not an integer (1)"),
    ('pinned = ["site_store"]', "pinned[0]: 'site_store' cannot be pinned"),
])
def test_wrong_types_and_values(site, line, problem):
    path = site.write("berth.toml", f"# site\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        site.load()
    assert caught.value.message == f"{path}:2: {problem}"
    assert caught.value.exit_code == 78


def test_toml_syntax_error_names_file_and_position(site):
    path = site.write("berth.toml", "runtime = runc\n")
    with pytest.raises(ConfigError) as caught:
        site.load()
    assert caught.value.message.startswith(f"{path}: invalid TOML: ")
    assert "line 1" in caught.value.message


@pytest.mark.parametrize("text, key", [
    ('site_store = "/srv/store"\n', "site_store"),
    ("stage_to_local = true\n", "stage_to_local"),
    ('pinned = ["runtime"]\n', "pinned"),
    ('[[registries]]\nhost = "example.org"\n', "registries"),
    ('[policy]\ndevices = ["/dev/fuse"]\n', "policy"),
    ('policy.trusted_registries = ["evil.example"]\n', "policy"),
])
def test_user_file_cannot_set_site_only_keys(site, text, key):
    path = site.write_user(text)
    with pytest.raises(ConfigError) as caught:
        site.load()
    assert caught.value.message.startswith(f"{path}:")
    assert f"only the site configuration may set {key}" in caught.value.message


def test_site_pins_a_user_settable_key(site):
    site_file = site.write("berth.toml", 'runtime = "runc"\npinned = ["runtime"]\n')
    user_file = site.write_user('runtime = "crun"\n')
    with pytest.raises(ConfigError) as caught:
        site.load()
    assert caught.value.message == (f"{user_file}:1: runtime: only the site configuration may set runtime: "
                                    f"the site pins it to 'runc' (pinned at {site_file}:2)")
    with pytest.raises(ConfigError, match="environment variable BERTH_RUNTIME: runtime: only the site"):
        site.user_file.unlink()
        site.load(BERTH_RUNTIME="crun")
    with pytest.raises(ConfigError, match="option --runtime: runtime: only the site"):
        site.load({"runtime": "crun"})
    # Repeating the pinned value is harmless (test harnesses set BERTH_RUNTIME=runc).
    assert site.load(BERTH_RUNTIME="runc").runtime == "runc"


def test_unpinned_user_settable_key_is_fine(site):
    site.write("berth.toml", 'runtime = "runc"\n')
    user_file = site.write_user('runtime = "crun"\n')
    settings = site.load()
    assert settings.runtime == "crun" and settings.sources["runtime"] == f"{user_file}:1"


def test_image_mount_linger_is_a_duration_any_layer_sets_unless_the_site_pins_it(site):
    assert site.load().image_mount_linger == 0
    site_file = site.write("berth.toml", 'image_mount_linger = "5m"\n')
    settings = site.load()
    assert settings.image_mount_linger == 300 and settings.sources["image_mount_linger"] == f"{site_file}:1"
    user_file = site.write_user("image_mount_linger = 90\n")
    assert site.load().image_mount_linger == 90
    assert site.load(BERTH_IMAGE_MOUNT_LINGER="1h").image_mount_linger == 3600
    assert site.load(BERTH_IMAGE_MOUNT_LINGER="0").image_mount_linger == 0
    assert site.load({"image_mount_linger": "2:30"}).image_mount_linger == 150
    with pytest.raises(ConfigError) as caught:
        site.load(BERTH_IMAGE_MOUNT_LINGER="5x")
    assert caught.value.message == "environment variable BERTH_IMAGE_MOUNT_LINGER: image_mount_linger: '5x': not a duration"
    assert "90s, 5m" in caught.value.hint
    with pytest.raises(ConfigError, match="image_mount_linger: '2d': more than the maximum 1d"):
        site.load(BERTH_IMAGE_MOUNT_LINGER="2d")
    with pytest.raises(ConfigError, match="image_mount_linger: '-1': negative"):
        site.load({"image_mount_linger": -1})
    user_file.write_text("image_mount_linger = true\n")
    with pytest.raises(ConfigError, match=f"{user_file}:1: image_mount_linger: must be a duration .*not a boolean"):
        site.load()
    # The site pins it: a user's other value is refused, as for any pinnable key.
    site_file.write_text('image_mount_linger = 0\npinned = ["image_mount_linger"]\n')
    user_file.write_text('image_mount_linger = "10m"\n')
    with pytest.raises(ConfigError, match="only the site configuration may set image_mount_linger: the site pins it to '0'"):
        site.load()


def test_bad_environment_values_name_the_variable(site):
    with pytest.raises(ConfigError) as caught:
        site.load(BERTH_PULL_PARALLEL="many")
    assert caught.value.message == "environment variable BERTH_PULL_PARALLEL: 'many' is not an integer"
    with pytest.raises(ConfigError, match="environment variable BERTH_STATE_DIR: state_dir: must be an absolute path"):
        site.load(BERTH_STATE_DIR="relative")
    with pytest.raises(ConfigError, match="environment variable BERTH_BACKEND: backend: 'pbs' is not one of"):
        site.load(BERTH_BACKEND="pbs")


def test_options_override_everything_and_are_checked(site):
    site.write_user("pull_parallel = 3\n")
    settings = site.load({"pull_parallel": 12, "user_store": Path("/tmp/x"), "runtime": None},
                         BERTH_PULL_PARALLEL="5")
    assert settings.pull_parallel == 12 and settings.sources["pull_parallel"] == "option --pull-parallel"
    assert settings.user_store == Path("/tmp/x") and settings.sources["user_store"] == "option --user-store"
    assert settings.sources["runtime"] == "default"
    with pytest.raises(ConfigError, match="option --pull-parallel: pull_parallel: 999 is out of range"):
        site.load({"pull_parallel": 999})
    with pytest.raises(ConfigError, match="option --site-store: site_store: only the site configuration"):
        site.load({"site_store": "/srv/other"})
    with pytest.raises(ConfigError, match="option --colour: 'colour' is not a setting"):
        site.load({"colour": "red"})


def test_effective_values_list_every_key_with_its_source(site):
    path = site.write("berth.toml", '[[policy.mounts]]\nsource = "/scratch"\n\n[policy.namespaces]\nnetwork = "none"\n')
    rows = {key: (value, source) for key, value, source in effective_values(site.load())}
    assert rows["policy.mounts[0]"] == ({"source": "/scratch", "destination": "/scratch", "read_only": True,
                                         "optional": False}, f"{path}:1")
    assert rows["policy.namespaces.network"] == ("none", f"{path}:5")
    assert rows["runtime"] == ("auto", "default")
    assert rows["registries"] == ([], "default")
    expected = {"config_dir", "user_store", "site_store", "state_dir", "jobs_dir", "runtime", "squashfs_compression",
                "pull_parallel", "pull_retries", "backend", "local_max_jobs", "stage_to_local", "pinned",
                "lock_timeout_s"}
    assert expected <= set(rows)


# ---------------------------------------------------------------- parse cache (issue 10, start-up)


@pytest.fixture
def cached_site(site, tmp_path):
    """A site whose caller has a private XDG_RUNTIME_DIR, so parses are cached there."""
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    site.environ["XDG_RUNTIME_DIR"] = str(runtime)
    site.cache = runtime / "berth" / "toml-cache.marshal"
    return site


def _forge(cache: Path, path: Path, document: dict) -> None:
    """A cache entry for ``path``'s present bytes that says ``document``."""
    import marshal

    entry = marshal.dumps((path.read_bytes(), document, {}))
    cache.write_bytes(marshal.dumps((1, {str(path): entry})))


def test_parse_cache_serves_unchanged_files_and_parses_changed_ones(cached_site, monkeypatch):
    import tomllib

    parsed = []
    real_loads = tomllib.loads
    monkeypatch.setattr(tomllib, "loads", lambda text: parsed.append(text) or real_loads(text))
    site_file = cached_site.write("berth.toml", "pull_retries = 3\n")
    cached_site.write_user("pull_parallel = 7\n")
    first = cached_site.load()
    assert len(parsed) == 2 and cached_site.cache.stat().st_mode & 0o777 == 0o600
    second = cached_site.load()
    assert len(parsed) == 2  # both from the cache
    assert effective_values(second) == effective_values(first)
    site_file.write_text("pull_retries = 5\n")  # same size, other bytes
    assert cached_site.load().pull_retries == 5 and len(parsed) == 3


def test_parse_cache_keeps_line_numbers_for_messages(cached_site, monkeypatch):
    import tomllib

    cached_site.write("berth.toml", "\n\npull_retries = 3\nruntime = 5\n")
    with pytest.raises(ConfigError) as info:
        cached_site.load()
    monkeypatch.setattr(tomllib, "loads", None)  # from here on, only the cache can parse
    for _ in range(2):
        with pytest.raises(ConfigError) as info:
            cached_site.load()
        assert ":4" in info.value.message and "runtime" in info.value.message
    monkeypatch.undo()
    cached_site.write("berth.toml", "\n\npull_retries = 3\n")
    cached_site.write_user("\nbogus = 1\n")
    with pytest.raises(ConfigError):
        cached_site.load()
    monkeypatch.setattr(tomllib, "loads", None)
    with pytest.raises(ConfigError) as info:
        cached_site.load()
    assert ":2" in info.value.message and "bogus" in info.value.message


def test_parse_cache_is_trusted_only_when_nobody_else_can_write_it(cached_site):
    """The cache's content is configuration: a forged entry is used from a private file (the
    control: the caller could equally point BERTH_CONFIG_DIR elsewhere), never from one that
    others may write or in a directory others may enter."""
    site_file = cached_site.write("berth.toml", "pull_retries = 3\n")
    cached_site.load()
    _forge(cached_site.cache, site_file, {"pull_retries": 9})
    assert cached_site.load().pull_retries == 9
    _forge(cached_site.cache, site_file, {"pull_retries": 9})
    cached_site.cache.chmod(0o620)
    assert cached_site.load().pull_retries == 3
    _forge(cached_site.cache, site_file, {"pull_retries": 9})
    cached_site.cache.chmod(0o600)
    cached_site.cache.parent.chmod(0o755)
    assert cached_site.load().pull_retries == 3


def test_parse_cache_ignores_garbage_and_a_link(cached_site, tmp_path):
    site_file = cached_site.write("berth.toml", "pull_retries = 3\n")
    cached_site.load()
    cached_site.cache.write_bytes(b"\x00garbage")
    assert cached_site.load().pull_retries == 3
    elsewhere = tmp_path / "forged"
    _forge(elsewhere, site_file, {"pull_retries": 9})
    elsewhere.chmod(0o600)
    cached_site.cache.unlink()
    cached_site.cache.symlink_to(elsewhere)
    assert cached_site.load().pull_retries == 3


def test_parse_cache_follows_berth_state_dir(cached_site):
    """BERTH_STATE_DIR moves the state directory, the parse cache with it (one rule,
    settings.early_state_dir, as the plan cache's): nothing is left in the default one."""
    state = cached_site.cache.parent.parent / "elsewhere"
    cached_site.environ["BERTH_STATE_DIR"] = str(state)
    cached_site.write("berth.toml", "pull_retries = 3\n")
    assert cached_site.load().pull_retries == 3
    assert (state / "toml-cache.marshal").is_file() and not cached_site.cache.exists()
    from berth.runtime import plancache

    assert plancache.cache_directory(cached_site.environ) == state / "plans"
    cached_site.environ["BERTH_STATE_DIR"] = "relative/dir"  # only the settings judge it: no cache
    with pytest.raises(ConfigError):
        cached_site.load()
    assert sorted(path.name for path in state.iterdir()) == ["toml-cache.marshal"]
    assert not cached_site.cache.exists()


def test_parse_cache_skips_documents_marshal_cannot_hold(tmp_path):
    import datetime

    from berth.config.tomlfile import KeyLines, ParseCache

    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    cache = ParseCache(directory)
    cache.put(tmp_path / "x.toml", b"a = 1979-05-27\n", {"a": datetime.date(1979, 5, 27)}, KeyLines(""))
    cache.save()
    assert not (directory / ParseCache.NAME).exists()
