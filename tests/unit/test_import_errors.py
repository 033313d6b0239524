"""`berth import` of a malformed source: the error names the entry, the hint the file and who acts."""

from __future__ import annotations

import json

import pytest

from berth.config.settings import Settings
from berth.errors import DigestMismatch, ImageError
from berth.image.importer import import_image


def _layout(tmp_path, index: bytes):
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_bytes(index)
    return layout


def _settings(tmp_path) -> Settings:
    return Settings(user_store=tmp_path / "store", site_store=tmp_path / "site")


def test_a_broken_index_names_the_entry_and_the_source(tmp_path):
    layout = _layout(tmp_path, b"{not json")
    with pytest.raises(ImageError) as caught:
        import_image(_settings(tmp_path), str(layout), "x:1")
    assert caught.value.message.startswith("index.json is not valid JSON")
    assert caught.value.hint == (f"the import source {layout} is malformed or incomplete: "
                                 "whoever produced it must export or save the image again")


def test_a_blob_that_does_not_match_its_descriptor_names_the_source(tmp_path):
    wrong = b'{"schemaVersion": 2}'
    digest = "sha256:" + "0" * 64
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                "digest": digest, "size": len(wrong)}]}
    layout = _layout(tmp_path, json.dumps(index).encode())
    (layout / "blobs" / "sha256" / ("0" * 64)).write_bytes(wrong)
    with pytest.raises(DigestMismatch) as caught:
        import_image(_settings(tmp_path), str(layout), "x:1")
    assert caught.value.message == f"blob {digest} of the import source does not match its descriptor"
    assert str(layout) in caught.value.hint


def test_an_error_with_its_own_hint_keeps_it(tmp_path):
    index = {"schemaVersion": 2, "manifests": [{"digest": "sha256:" + "1" * 64}, {"digest": "sha256:" + "2" * 64}]}
    layout = _layout(tmp_path, json.dumps(index).encode())
    with pytest.raises(ImageError) as caught:
        import_image(_settings(tmp_path), str(layout), "x:1")
    assert caught.value.message == "the OCI layout holds 2 images; name the one to import by its tag"
    assert caught.value.hint == ("its index.json tags none of them (org.opencontainers.image.ref.name): "
                                 "whoever produced it must export one image per layout, or tag them")


def test_a_layout_of_several_tagged_images_lists_the_tags(tmp_path):
    tagged = [{"digest": "sha256:" + c * 64, "annotations": {"org.opencontainers.image.ref.name": tag}}
              for c, tag in (("1", "a"), ("2", "b"))]
    layout = _layout(tmp_path, json.dumps({"schemaVersion": 2, "manifests": tagged}).encode())
    with pytest.raises(ImageError) as caught:
        import_image(_settings(tmp_path), str(layout), "x:1")
    assert caught.value.hint == "its tags: a, b (give NAME:TAG with one of them)"
