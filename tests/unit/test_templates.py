"""Templates: NQSV key=value parsing, the file format, and the locked atomic writers."""

from __future__ import annotations

import os

import pytest

from berth.config.settings import Settings
from berth.config.templates import (
    Template,
    create_template,
    delete_template,
    list_templates,
    load_template,
    parse_assignments,
    render_template,
    template_path,
    update_template,
)
from berth.errors import ConfigError, NotFound, UsageError
from berth.record import replace

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(config_dir=tmp_path)


def make(name="gpu", **changes) -> Template:
    base = Template(name=name, image="127.0.0.1:5000/busybox:1", image_digest=DIGEST, cpu=2,
                    memsz_bytes=4 * 1024**3)
    return replace(base, **changes)


def test_parse_full_create_line():
    values = parse_assignments(
        ["image=127.0.0.1:5000/app:2", "cpu=8", "memsz=16G", "gpu=2", "boot_timeout=10m", "stop_timeout=45",
         'custom=--env "A=b c" --network none', "comment=GPU nodes, CUDA 12"], require=True)
    assert values == {"image": "127.0.0.1:5000/app:2", "cpu": 8, "memsz_bytes": 16 * 1024**3, "gpu": 2,
                      "boot_timeout_s": 600, "stop_timeout_s": 45, "custom": '--env "A=b c" --network none',
                      "comment": "GPU nodes, CUDA 12"}


@pytest.mark.parametrize("words, message", [
    (["image=busybox", "cpu=2"], "missing required key: memsz"),
    (["cpu=2"], "missing required keys: image, memsz"),
    (["image=busybox", "cpu=2", "memsz=4G", "cpus=4"], "unknown key 'cpus' in 'cpus=4'"),
    (["image=busybox", "cpu=2", "memsz=4G", "gpu"], "malformed argument 'gpu': expected key=value"),
    (["image=busybox", "cpu=2", "memsz=4G", "=3"], "malformed argument '=3': expected key=value"),
    (["image=busybox", "cpu=2", "cpu=3", "memsz=4G"], "key 'cpu' given twice"),
    (["image=", "cpu=2", "memsz=4G"], "'image=' has no value"),
    (["image=busybox", "cpu=-1", "memsz=4G"], "bad value in 'cpu=-1': cpu=-1 is out of range: allowed 1 to 4096"),
    (["image=busybox", "cpu=0", "memsz=4G"], "cpu=0 is out of range: allowed 1 to 4096"),
    (["image=busybox", "cpu=100000", "memsz=4G"], "cpu=100000 is out of range: allowed 1 to 4096"),
    (["image=busybox", "cpu=two", "memsz=4G"], "bad value in 'cpu=two': cpu=two: expected a whole number"),
    (["image=busybox", "cpu=2", "memsz=4096"], "bad value in 'memsz=4096': memsz '4096': no unit"),
    (["image=busybox", "cpu=2", "memsz=0G"], "memsz '0G': less than the minimum 1MiB"),
    (["image=busybox", "cpu=2", "memsz=-4G"], "memsz '-4G': negative"),
    (["image=busybox", "cpu=2", "memsz=1000T"], "memsz '1000T': more than the maximum 64TiB"),
    (["image=busybox", "cpu=2", "memsz=4G", "gpu=65"], "gpu=65 is out of range: allowed 0 to 64"),
    (["image=busybox", "cpu=2", "memsz=4G", "boot_timeout=0"], "boot_timeout '0': less than the minimum 1s"),
    (["image=busybox", "cpu=2", "memsz=4G", "stop_timeout=-5"], "stop_timeout '-5': negative"),
    (["image=busybox", "cpu=2", "memsz=4G", "stop_timeout=2h"], "stop_timeout '2h': more than the maximum 1h"),
    (["image=Busy Box", "cpu=2", "memsz=4G"], "invalid image reference 'Busy Box'"),
    (["image=busybox", "cpu=2", "memsz=4G", "custom=--env 'A"], "custom is not valid shell-quoted options"),
    (["image=busybox", "cpu=2", "memsz=4G", "comment=two\nlines"], "comment may not contain control characters"),
    # int() refuses past 4300 digits: a ValueError of Python's own words, not berth's.
    (["image=busybox", "cpu=" + "9" * 4400, "memsz=4G"], "expected a whole number (of at most 18 digits)"),
])
def test_bad_assignments_name_the_offending_word(words, message):
    with pytest.raises(UsageError) as caught:
        parse_assignments(words, require=True)
    assert message in caught.value.message
    assert caught.value.exit_code == 2


def test_modify_needs_some_words_but_no_required_keys():
    assert parse_assignments(["comment="], require=False) == {"comment": ""}
    with pytest.raises(UsageError, match="nothing to change"):
        parse_assignments([], require=False)


def test_create_load_round_trip_and_listing(settings):
    created = create_template(settings, make(custom='--env "A=b c"', comment='quote " and \\ backslash é'))
    assert created.updated_by and created.updated_at.endswith("Z")
    loaded = load_template(settings, "gpu")
    assert loaded == created
    assert loaded.pinned_reference == f"127.0.0.1:5000/busybox:1@{DIGEST}"
    path = template_path(settings, "gpu")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    create_template(settings, make("alpha"))
    assert [t.name for t in list_templates(settings)] == ["alpha", "gpu"]
    assert sorted(os.listdir(settings.templates_dir)) == [".lock", "alpha.toml", "gpu.toml"]  # no temp files left


def test_create_refuses_an_existing_name_and_bad_names(settings):
    create_template(settings, make())
    with pytest.raises(ConfigError, match="template 'gpu' already exists"):
        create_template(settings, make(cpu=64))
    assert load_template(settings, "gpu").cpu == 2
    for bad in ("../etc", ".hidden", "a/b", "x" * 65, "", "name.toml"):
        with pytest.raises(UsageError, match="invalid template name"):
            create_template(settings, make(bad))


def test_update_applies_changes_to_the_current_file(settings):
    create_template(settings, make())
    update_template(settings, "gpu", {"cpu": 4})
    update_template(settings, "gpu", {"comment": "second"})
    current = load_template(settings, "gpu")
    assert (current.cpu, current.comment, current.memsz_bytes) == (4, "second", 4 * 1024**3)
    with pytest.raises(UsageError, match="needs the new image's digest"):
        update_template(settings, "gpu", {"image": "busybox:2"})
    with pytest.raises(ConfigError, match="changed while its image was pulled"):
        update_template(settings, "gpu", {"image_digest": OTHER_DIGEST}, expect_image="busybox:other")
    assert load_template(settings, "gpu").image_digest == DIGEST
    with pytest.raises(UsageError, match="cpu=0 is out of range"):
        update_template(settings, "gpu", {"cpu": 0})
    with pytest.raises(NotFound, match="no template named 'nope'"):
        update_template(settings, "nope", {"cpu": 1})


def test_delete(settings):
    create_template(settings, make())
    delete_template(settings, "gpu")
    assert list_templates(settings) == []
    with pytest.raises(NotFound):
        delete_template(settings, "gpu")
    with pytest.raises(NotFound, match="no template named 'gpu'"):
        load_template(settings, "gpu")


def test_missing_templates_dir_means_no_templates(settings):
    assert list_templates(settings) == []


def test_hand_written_file_with_nqsv_names(settings):
    settings.templates_dir.mkdir()
    (settings.templates_dir / "hand.toml").write_text(
        'image = "busybox"\ncpu = 1\nmemsz = "512M"\nboot_timeout = "2m"\nstop_timeout = 5\n')
    loaded = load_template(settings, "hand")
    assert (loaded.memsz_bytes, loaded.boot_timeout_s, loaded.stop_timeout_s, loaded.image_digest) == \
        (512 * 1024**2, 120, 5, None)
    assert loaded.pinned_reference == "busybox"


@pytest.mark.parametrize("text, message", [
    ('image = "busybox"\ncpu = 1\nmemsz = "1G"\ncolour = "red"\n', ":4: template 'bad': unknown key 'colour'"),
    ('image = "busybox"\ncpu = "1"\nmemsz = "1G"\n', ":2: template 'bad': cpu: must be an integer, not a string"),
    ('image = "busybox"\ncpu = 1\nmemsz = 1024\n', ":3: template 'bad': memsz: must be a string, not an integer"),
    ('image = "busybox"\ncpu = 1\nmemsz = "1G"\nmemsz_bytes = 5\n', ":4: template 'bad': 'memsz_bytes' repeats 'memsz'"),
    ('image = "busybox"\ncpu = 1\n', ": template 'bad' has no 'memsz_bytes'"),
    ('image = "busybox"\ncpu = 1\nmemsz = "1G"\nimage_digest = "sha256:12"\n', ":4: template 'bad': image_digest: 'sha256:12'"),
    ('image = "busybox"\ncpu = 9999\nmemsz = "1G"\n', ":2: template 'bad': cpu: cpu=9999 is out of range"),
])
def test_broken_template_files_name_file_line_and_key(settings, text, message):
    settings.templates_dir.mkdir()
    path = settings.templates_dir / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_template(settings, "bad")
    assert caught.value.message.startswith(str(path) + message), caught.value.message


def test_rendered_file_is_commented_toml_with_human_size():
    text = render_template(make(updated_by="root", updated_at="2026-01-01T00:00:00Z"))
    assert "memsz_bytes = 4294967296  # 4GiB\n" in text
    assert f'image_digest = "{DIGEST}"\n' in text
    assert text.startswith("# berth container template 'gpu'")


def test_first_template_creates_a_missing_site_directory(tmp_path):
    settings = Settings(config_dir=tmp_path / "etc" / "berth")
    create_template(settings, make())
    assert load_template(settings, "gpu").cpu == 2
    assert oct(settings.templates_dir.stat().st_mode & 0o777) == "0o755"


def test_templates_stay_world_readable_under_a_strict_umask(tmp_path):
    settings = Settings(config_dir=tmp_path / "site")
    old = os.umask(0o077)
    try:
        create_template(settings, make())
    finally:
        os.umask(old)
    modes = [oct(p.stat().st_mode & 0o777) for p in (settings.config_dir, settings.templates_dir,
                                                     template_path(settings, "gpu"))]
    assert modes == ["0o755", "0o755", "0o644"]
