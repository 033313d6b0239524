"""Templates and site configuration for real: root administers a site directory, the
unprivileged test user reads it and is refused every change; concurrent admins lose nothing."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess

import pytest

from berth.config.templates import load_template, update_template
from tests.harness.users import berth_executable, describe

pytestmark = pytest.mark.integration


def snapshot(directory):
    """Every file under ``directory`` with its bytes: to prove that nothing changed."""
    result = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            result[str(path.relative_to(directory))] = path.read_bytes()
    return result


def test_user_sees_site_values_with_their_sources(site_config, user):
    site_file = site_config.write("""\
        runtime = "runc"
        pinned = ["runtime"]

        [[policy.mounts]]
        source = "/tmp"
        destination = "/scratch"
    """)
    result = user.berth("config", "show", "--json", env=site_config.env)
    assert result.returncode == 0, describe(result)
    shown = json.loads(result.stdout)
    assert shown["runtime"] == {"value": "runc", "source": f"{site_file}:1"}
    assert shown["policy.mounts[0]"]["source"] == f"{site_file}:4"
    assert shown["policy.mounts[0]"]["value"]["destination"] == "/scratch"
    assert shown["site_store"] == {"value": str(site_config.site_store), "source": "env BERTH_SITE_STORE"}
    assert shown["user_store"] == {"value": f"{user.home}/.local/share/berth", "source": "default"}
    table = user.berth("config", "show", env=site_config.env)
    assert table.returncode == 0, describe(table)
    runtime_line = next(line for line in table.stdout.splitlines() if line.startswith("runtime "))
    assert runtime_line.split() == ["runtime", "runc", f"{site_file}:1"]


def test_user_file_cannot_override_what_the_site_forces(site_config, user):
    site_config.write('runtime = "runc"\npinned = ["runtime"]\n')
    user_file = site_config.write_user_file('pull_parallel = 2\nruntime = "crun"\n')
    result = user.berth("config", "show", env=site_config.env)
    assert result.returncode == 78, describe(result)
    assert f"{user_file}:2: runtime: only the site configuration may set runtime" in result.stderr
    site_config.write_user_file('[[policy.mounts]]\nsource = "/etc"\n')
    result = user.berth("config", "check", env=site_config.env)
    assert result.returncode == 78, describe(result)
    assert f"{user_file}:1: policy: only the site configuration may set policy" in result.stderr


def test_a_user_file_nested_2000_deep_is_a_config_error_not_a_traceback(site_config, user):
    """Issue 12 #5: arrays nested 2,000 deep in the user's own file gave a RecursionError
    traceback on every command."""
    user_file = site_config.write_user_file("pinned = " + "[" * 2000 + "]" * 2000 + "\n")
    for argv in (["config", "show"], ["images"], ["jobs"]):
        result = user.berth(*argv, env=site_config.env)
        assert result.returncode == 78, describe(result)
        assert f"error: {user_file}: values nested more than 64 levels deep" in result.stderr, describe(result)
        assert "Traceback" not in result.stderr, describe(result)


def test_unreadable_site_file_is_an_error_not_a_silent_default(site_config, user):
    site_file = site_config.write('runtime = "runc"\n')
    site_file.chmod(0o600)
    result = user.berth("config", "show", env=site_config.env)
    assert result.returncode == 78, describe(result)
    assert f"cannot read configuration file {site_file}: permission denied" in result.stderr
    assert "ask your site administrator" in result.stderr


def test_config_check_reports_broken_templates(site_config, admin):
    site_config.add_template("good")
    site_config.templates_dir.joinpath("broken.toml").write_text('image = "busybox"\ncpu = 0\nmemsz = "1G"\n')
    result = admin.berth("config", "check", env=site_config.env)
    assert result.returncode == 78, describe(result)
    assert f"{site_config.templates_dir}/broken.toml:2: template 'broken': cpu: cpu=0 is out of range" in result.stdout
    assert "templates in" in result.stdout and ": 1 valid" in result.stdout
    # The fixture's template pins a digest that nobody pulled into the site store.
    assert (f"template 'good': pinned image 127.0.0.1:5000/test/none:1@sha256:{'0' * 64} is not in the site store "
            f"{site_config.site_store}") in result.stdout
    assert "berth: error: 2 configuration problems found" in result.stderr


def test_user_lists_and_shows_templates(site_config, user):
    site_config.add_template("small", cpu=1, comment="for tests")
    site_config.add_template("big", cpu=16, memsz_bytes=64 * 1024**3, gpu=2)
    listing = user.berth("template", "list", "--json", env=site_config.env)
    assert listing.returncode == 0, describe(listing)
    templates = json.loads(listing.stdout)
    assert [(t["name"], t["cpu"], t["memsz"], t["gpu"]) for t in templates] == [("big", 16, "64GiB", 2),
                                                                                ("small", 1, "256MiB", 0)]
    shown = user.berth("template", "show", "small", "--json", env=site_config.env)
    assert shown.returncode == 0, describe(shown)
    data = json.loads(shown.stdout)
    assert data["comment"] == "for tests" and data["image_digest"] == "sha256:" + "0" * 64
    assert data["pinned_reference"] == "127.0.0.1:5000/test/none:1@sha256:" + "0" * 64
    table = user.berth("template", "list", env=site_config.env)
    assert table.stdout.splitlines()[0].split() == ["NAME", "IMAGE", "DIGEST", "CPU", "MEMSZ", "GPU", "BOOT", "STOP",
                                                    "COMMENT"]
    missing = user.berth("template", "show", "nope", env=site_config.env)
    assert missing.returncode == 3 and "no template named 'nope'" in missing.stderr, describe(missing)


@pytest.mark.parametrize("argv", [
    ["template", "create", "mine", "image=busybox", "cpu=1", "memsz=1G"],
    ["template", "modify", "shared", "cpu=64"],
    ["template", "delete", "shared"],
    ["template", "refresh", "shared"],
])
def test_user_cannot_change_templates(site_config, user, argv):
    site_config.add_template("shared")
    before = snapshot(site_config.config_dir)
    result = user.berth(*argv, env=site_config.env)
    assert result.returncode == 73, describe(result)
    assert f"cannot change templates: {site_config.templates_dir} is not writable by you" in result.stderr
    assert "ask your site administrator" in result.stderr
    assert snapshot(site_config.config_dir) == before
    assert list(site_config.site_store.iterdir()) == []  # nothing was pulled either


def test_admin_edits_are_refused_when_input_is_bad(site_config, admin):
    site_config.add_template("t")
    before = snapshot(site_config.config_dir)
    cases = [
        (["template", "create", "x", "image=busybox", "cpu=2"], 2, "missing required key: memsz"),
        (["template", "create", "x", "image=busybox", "cpu=2", "memsz=4G", "colour=red"], 2, "unknown key 'colour'"),
        (["template", "create", "../x", "image=busybox", "cpu=2", "memsz=4G"], 2, "invalid template name '../x'"),
        (["template", "create", "t", "image=busybox", "cpu=2", "memsz=4G"], 78, "template 't' already exists"),
        (["template", "modify", "t", "memsz=-1G"], 2, "memsz '-1G': negative"),
        (["template", "modify", "t", "cpu=99999"], 2, "cpu=99999 is out of range: allowed 1 to 4096"),
        (["template", "modify", "nope", "cpu=2"], 3, "no template named 'nope'"),
        (["template", "delete", "nope"], 3, "no template named 'nope'"),
    ]
    for argv, code, message in cases:
        result = admin.berth(*argv, env=site_config.env)
        assert result.returncode == code and message in result.stderr, describe(result)
    assert snapshot(site_config.config_dir) == before


def test_custom_options_are_checked_against_site_policy(site_config, admin):
    site_config.write('[policy.namespaces]\nnetwork = "none"\n')
    site_config.add_template("t")
    before = snapshot(site_config.config_dir)
    result = admin.berth("template", "create", "net", "image=busybox", "cpu=1", "memsz=1G",
                         "custom=--network host", env=site_config.env)
    assert result.returncode == 77, describe(result)
    assert "template 'net': custom=\"--network host\": --network=host: site policy forces network=none" in result.stderr
    result = admin.berth("template", "modify", "t", "custom=--bogus-option", env=site_config.env)
    assert result.returncode == 2 and "template 't': custom=\"--bogus-option\"" in result.stderr, describe(result)
    assert snapshot(site_config.config_dir) == before


def test_custom_options_are_checked_against_pinned_settings(site_config, admin):
    """Issue 12 #7: custom="--runtime crun" while the site pins runc was accepted, then every job
    failed at boot. Refused at create and modify (submit: test_jobs_local)."""
    site_config.write('runtime = "runc"\npinned = ["runtime"]\n')
    site_config.add_template("t")
    before = snapshot(site_config.config_dir)
    for argv, code in ((["template", "create", "c", "image=busybox", "cpu=1", "memsz=1G", "custom=--runtime crun"], 77),
                       (["template", "modify", "t", "custom=--runtime=crun"], 77)):
        result = admin.berth(*argv, env=site_config.env)
        assert result.returncode == code, describe(result)
        assert "--runtime crun: the site configuration pins runtime = runc" in result.stderr, describe(result)
    assert snapshot(site_config.config_dir) == before
    result = admin.berth("template", "modify", "t", "custom=--runtime runc", env=site_config.env)
    assert result.returncode == 0, describe(result)


def test_admin_modify_and_delete(site_config, admin, user):
    site_config.add_template("t", cpu=2)
    result = admin.berth("template", "modify", "t", "cpu=4", "memsz=2G", "comment=resized", env=site_config.env)
    assert result.returncode == 0, describe(result)
    template = load_template(site_config.settings(), "t")
    assert (template.cpu, template.memsz_bytes, template.comment, template.updated_by) == (4, 2 * 1024**3, "resized",
                                                                                           "root")
    assert os.stat(site_config.templates_dir / "t.toml").st_mode & 0o777 == 0o644
    shown = user.berth("template", "show", "t", env=site_config.env)
    assert shown.returncode == 0, describe(shown)
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines() if len(line.split(None, 1)) == 2)
    assert (fields["cpu"], fields["memsz"], fields["comment"]) == ("4", "2GiB (2147483648 bytes)", "resized")
    result = admin.berth("template", "delete", "t", env=site_config.env)
    assert result.returncode == 0, describe(result)
    assert sorted(p.name for p in site_config.templates_dir.iterdir()) == [".lock"]


# Each racing process owns one key; after the race every key must hold its owner's last value.
RACE_KEYS = {"cpu": "cpu={}", "gpu": "gpu={}", "memsz_bytes": "memsz={}M", "boot_timeout_s": "boot_timeout={}",
             "stop_timeout_s": "stop_timeout={}", "comment": "comment=round {}"}


def test_concurrent_berth_processes_never_lose_a_change(site_config, admin):
    site_config.add_template("race")
    env = {**admin.base_env(), **site_config.env}
    for round_number in range(1, 4):
        processes = [
            subprocess.Popen([str(berth_executable()), "template", "modify", "race", word.format(round_number + 10)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for word in RACE_KEYS.values()
        ]
        for process in processes:
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
        template = load_template(site_config.settings(), "race")
        value = round_number + 10
        assert (template.cpu, template.gpu, template.memsz_bytes, template.boot_timeout_s, template.stop_timeout_s,
                template.comment) == (value, value, value * 1024**2, value, value, f"round {value}")


def _hammer(config_dir: str, field: str, start: int, count: int) -> None:
    from berth.config.load import load_settings

    settings = load_settings(environ={**os.environ, "BERTH_CONFIG_DIR": config_dir})
    for step in range(count):
        value = start + step
        update_template(settings, "race", {field: f"writer {value}" if field == "comment" else value})


def test_many_writers_through_the_library_keep_every_last_value(site_config):
    """Tight read-modify-write loops in 4 processes: without the lock, updates get lost."""
    site_config.add_template("race")
    fields = ("cpu", "gpu", "stop_timeout_s", "comment")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_hammer, args=(str(site_config.config_dir), field, 1, 40)) for field in fields]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    template = load_template(site_config.settings(), "race")
    assert (template.cpu, template.gpu, template.stop_timeout_s, template.comment) == (40, 40, 40, "writer 40")
    leftovers = [p.name for p in site_config.templates_dir.iterdir() if p.name not in ("race.toml", ".lock")]
    assert leftovers == []


# --- with the real registry and the real pull into the site store ----------------------------


@pytest.fixture
def pull_site(site_config, registry):
    site_config.trust_registry(registry.host)
    return site_config


def test_create_pulls_into_the_site_store_and_pins_the_digest(pull_site, admin, user, busybox_image):
    from berth.image.api import find_image

    result = admin.berth("template", "create", "bb", f"image={busybox_image}", "cpu=1", "memsz=64M",
                         "comment=busybox for tests", env=pull_site.env)
    assert result.returncode == 0, describe(result)
    template = load_template(pull_site.settings(), "bb")
    assert template.image == str(busybox_image)
    assert template.image_digest == busybox_image.digest
    stored = find_image(pull_site.settings(), template.pinned_reference)
    assert stored is not None and stored.store == "site" and str(stored.digest) == busybox_image.digest
    assert stored.squashfs.is_relative_to(pull_site.site_store)
    shown = json.loads(user.berth("template", "show", "bb", "--json", env=pull_site.env).stdout)
    assert shown["pinned_reference"] == f"{busybox_image}@{busybox_image.digest}"
    check = admin.berth("config", "check", env=pull_site.env)
    assert check.returncode == 0 and "configuration ok" in check.stdout, describe(check)


def test_create_with_a_missing_image_writes_nothing(pull_site, admin, registry):
    before = snapshot(pull_site.config_dir)
    result = admin.berth("template", "create", "ghost", f"image={registry.host}/test/does-not-exist:1", "cpu=1",
                         "memsz=64M", env=pull_site.env)
    assert result.returncode == 30, describe(result)
    assert "does-not-exist" in result.stderr
    assert snapshot(pull_site.config_dir) == before
    assert not (pull_site.templates_dir / "ghost.toml").exists()


def test_a_name_ending_in_newline_is_refused_and_cannot_break_listing(pull_site, admin, user, busybox_image):
    """Issue 12 #6: `template create $'nl\\n'` wrote ``nl\\n.toml``, whose first comment line then
    broke `template list` for every user. The name is refused now, and such a file (left by an
    older berth or a hand edit) is skipped by `template list` and reported by `config check`."""
    from berth.config.templates import Template, render_template

    pull_site.add_template("t")
    before = snapshot(pull_site.config_dir)
    result = admin.berth("template", "create", "nl\n", f"image={busybox_image}", "cpu=1", "memsz=64M",
                         env=pull_site.env)
    assert result.returncode == 2, describe(result)
    assert "invalid template name 'nl\\n'" in result.stderr, describe(result)
    assert snapshot(pull_site.config_dir) == before
    # What the old berth wrote for that name, byte for byte.
    old = Template(name="nl\n", image=str(busybox_image), image_digest=busybox_image.digest, cpu=1,
                   memsz_bytes=64 << 20)
    planted = pull_site.templates_dir / "nl\n.toml"
    planted.write_text(render_template(old))
    planted.chmod(0o644)
    listed = user.berth("template", "list", env=pull_site.env)
    assert listed.returncode == 0, describe(listed)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["NAME", "t"], describe(listed)
    check = admin.berth("config", "check", env=pull_site.env)
    assert check.returncode == 78, describe(check)
    assert "'nl\\n' is not a valid template name; the file is ignored" in check.stdout + check.stderr, describe(check)


def test_modify_image_and_refresh_repin(pull_site, admin, registry, busybox_image, busybox_v2s2_image):
    from tests.harness import images

    result = admin.berth("template", "create", "bb", f"image={busybox_image}", "cpu=1", "memsz=64M", env=pull_site.env)
    assert result.returncode == 0, describe(result)
    result = admin.berth("template", "modify", "bb", f"image={busybox_v2s2_image}", env=pull_site.env)
    assert result.returncode == 0, describe(result)
    template = load_template(pull_site.settings(), "bb")
    assert (template.image, template.image_digest) == (str(busybox_v2s2_image), busybox_v2s2_image.digest)

    first = images.push_image(registry, "test/cfg-refresh", "1", images.busybox_spec(marker="one"))
    reference = f"{registry.host}/test/cfg-refresh:1"
    result = admin.berth("template", "create", "moving", f"image={reference}", "cpu=1", "memsz=64M", env=pull_site.env)
    assert result.returncode == 0, describe(result)
    assert load_template(pull_site.settings(), "moving").image_digest == first
    second = images.push_image(registry, "test/cfg-refresh", "1", images.busybox_spec(marker="two"))
    assert second != first
    result = admin.berth("template", "refresh", "moving", env=pull_site.env)
    assert result.returncode == 0, describe(result)
    assert f"now pinned at {second} (was {first})" in result.stdout
    assert load_template(pull_site.settings(), "moving").image_digest == second


def test_a_pinned_image_survives_its_tag_moving_and_prune(pull_site, admin, registry):
    """A template pins a digest, but the site index named the image only by its tag: once the
    tag moved (an admin pulled it again) or was removed, `prune --site` deleted the image every
    job of the template runs, and those jobs failed with "in no store"."""
    from berth.image.api import find_image
    from tests.harness import images

    first = images.push_image(registry, "test/cfg-pin", "1", images.busybox_spec(marker="one"))
    reference = f"{registry.host}/test/cfg-pin:1"
    result = admin.berth("template", "create", "pinned", f"image={reference}", "cpu=1", "memsz=64M",
                         env=pull_site.env)
    assert result.returncode == 0, describe(result)
    second = images.push_image(registry, "test/cfg-pin", "1", images.busybox_spec(marker="two"))
    assert second != first
    for argv in (("pull", "--site", "-q", reference), ("rmi", "--site", reference), ("prune", "--site")):
        result = admin.berth(*argv, env=pull_site.env)
        assert result.returncode == 0, describe(result)
    template = load_template(pull_site.settings(), "pinned")
    assert template.image_digest == first
    stored = find_image(pull_site.settings(), template.pinned_reference)
    assert stored is not None and stored.store == "site" and str(stored.digest) == first
