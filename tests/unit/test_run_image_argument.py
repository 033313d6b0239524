"""berth run IMAGE: a SquashFS file or a reference (berth.cli.run.resolve_image, docs/images.md).
A file named like a reference in the working directory must not replace the store's image."""

from __future__ import annotations

import pytest

from berth.cli.run import resolve_image
from berth.errors import NotFound
from berth.image import api
from berth.runtime.container import LocalImage


@pytest.fixture
def store_image(monkeypatch, tmp_path):
    """The store answers every reference with ("store", REF); the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(api, "get_image", lambda settings, ref, **kw: ("store", ref))
    monkeypatch.setattr(api, "find_image", lambda settings, ref: ("store", ref))
    monkeypatch.delenv("SLURM_STEP_NUM_NODES", raising=False)
    return tmp_path


@pytest.mark.parametrize("pull", ["never", "missing"])
def test_a_reference_is_the_stores_image_even_where_a_file_has_its_name(store_image, pull):
    (store_image / "example.org" / "team").mkdir(parents=True)
    (store_image / "example.org/team/app:1").write_bytes(b"hsqs planted")
    (store_image / "app:1").write_bytes(b"hsqs planted")
    assert resolve_image(None, "example.org/team/app:1", pull) == ("store", "example.org/team/app:1")
    assert resolve_image(None, "app:1", pull) == ("store", "app:1")


def test_an_explicit_path_is_the_file(store_image):
    (store_image / "example.org" / "team").mkdir(parents=True)
    planted = store_image / "example.org/team/app:1"
    planted.write_bytes(b"hsqs")
    image = resolve_image(None, "./example.org/team/app:1", "never")
    assert isinstance(image, LocalImage) and image.squashfs == planted.resolve()
    image = resolve_image(None, str(planted), "never")
    assert isinstance(image, LocalImage) and image.squashfs == planted.resolve()
    image = resolve_image(None, "../" + store_image.name + "/example.org/team/app:1", "never")
    assert isinstance(image, LocalImage) and image.squashfs == planted.resolve()


def test_a_sqfs_name_is_the_file_when_one_exists_else_a_reference(store_image):
    assert resolve_image(None, "images/app.sqfs", "never") == ("store", "images/app.sqfs")
    (store_image / "images").mkdir()
    (store_image / "images/app.sqfs").write_bytes(b"hsqs")
    image = resolve_image(None, "images/app.sqfs", "never")
    assert isinstance(image, LocalImage) and image.squashfs == (store_image / "images/app.sqfs").resolve()


@pytest.mark.parametrize("argument", ["./missing:1", "/nonexistent/image.sqfs", "../nowhere/app.sqfs", "./adir"])
def test_an_explicit_path_that_is_not_a_file_is_not_found_never_a_reference(store_image, argument):
    (store_image / "adir").mkdir()
    with pytest.raises(NotFound) as raised:
        resolve_image(None, argument, "missing")
    assert raised.value.message == f"no SquashFS file at {argument}" and "path" in raised.value.hint
