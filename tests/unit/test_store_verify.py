"""Unit tests of `berth store verify` (issue 8): each kind of damage is reported, repair removes
it and restores what the store can restore by itself; a clean store stays clean."""

from __future__ import annotations

import json
import os
import time

import pytest

from berth.oci.digest import Digest
from berth.store.store import STALE_TMP_S, USER, Store
from berth.store import verify as verify_mod
from berth.store.verify import verify_store
from tests.unit.test_store import _fake_image


@pytest.fixture
def store(tmp_path) -> Store:
    created = Store(tmp_path / "store", USER)
    created.require_writable()
    return created


def _kinds(report) -> list[tuple[str, str]]:
    return sorted((p.kind, os.path.basename(p.path)) for p in report.problems)


def _writable(path) -> None:
    os.chmod(path, 0o644)


def test_clean_store_is_clean_and_publish_records_the_squashfs_digest(store):
    digest = _fake_image(store)
    meta = json.loads(store.layout.image_meta(digest).read_bytes())
    assert meta["squashfs_digest"] == str(Digest.of(b"hsqs" + b"\0" * 100))
    report = verify_store(store)
    assert report.problems == [] and report.remaining == []
    assert report.images_checked == 1 and report.blobs_checked == 3  # manifest, config, layer
    assert verify_store(Store(store.root.parent / "absent")).problems == []


def test_corrupt_blob_reported_and_repair_restores_it_from_the_image(store):
    digest = _fake_image(store)
    config_digest = Digest.parse(json.loads(store.layout.image_manifest(digest).read_bytes())["config"]["digest"])
    path = store.layout.blob(config_digest)
    _writable(path)
    path.write_bytes(b"{}")
    report = verify_store(store)
    assert _kinds(report) == [(verify_mod.CORRUPT_BLOB, config_digest.hex)]
    assert report.remaining == report.problems
    repaired = verify_store(store, repair=True)
    assert [p.repaired for p in repaired.problems] == ["removed", "restored from the image's own copy"]
    assert repaired.remaining == []
    assert store.read_blob(config_digest) == store.layout.image_config(digest).read_bytes()
    assert verify_store(store).problems == []


def test_missing_layer_is_left_to_the_image_layer_to_fetch(store):
    _fake_image(store, layer=b"the layer")
    store.layout.blob(Digest.of(b"the layer")).unlink()
    report = verify_store(store)
    assert _kinds(report) == [(verify_mod.MISSING_BLOB, Digest.of(b"the layer").hex)]
    repaired = verify_store(store, repair=True)
    assert [need.digest for need in repaired.refetch_blobs] == [Digest.of(b"the layer")]
    assert repaired.refetch_blobs[0].size_bytes == len(b"the layer")
    assert len(repaired.remaining) == 1  # until someone fetches it


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_damaged_squashfs_removes_the_image_and_leaves_the_reference_to_restore(store, damage):
    digest = _fake_image(store)
    squashfs = store.layout.image_squashfs(digest)
    _writable(squashfs)
    if damage == "truncate":
        squashfs.write_bytes(squashfs.read_bytes()[:50])
    elif damage == "flip":
        data = bytearray(squashfs.read_bytes())
        data[60] ^= 1
        squashfs.write_bytes(bytes(data))
    else:
        squashfs.unlink()
    report = verify_store(store)
    expected = verify_mod.INCOMPLETE_IMAGE if damage == "remove" else verify_mod.CORRUPT_IMAGE
    assert [p.kind for p in report.problems] == [expected]
    repaired = verify_store(store, repair=True)
    assert not store.layout.image_dir(digest).exists()
    assert list(repaired.refetch_references) == ["example.org/team/app:1"]
    assert repaired.removed_meta[str(digest)]["index_digest"] is None
    kinds = [p.kind for p in repaired.problems]
    assert kinds == [expected, verify_mod.DANGLING_REFERENCE]
    assert [p.repaired is not None for p in repaired.problems] == [True, False]


def test_squashfs_of_an_older_berth_checked_by_size_and_superblock(store):
    digest = _fake_image(store)
    meta_path = store.layout.image_meta(digest)
    meta = json.loads(meta_path.read_bytes())
    del meta["squashfs_digest"]
    meta["squashfs_bytes"] = 104
    _writable(meta_path)
    meta_path.write_text(json.dumps(meta))
    squashfs = store.layout.image_squashfs(digest)
    _writable(squashfs)
    good = bytearray(b"hsqs" + b"\0" * 100)
    good[40:48] = (104).to_bytes(8, "little")
    squashfs.write_bytes(bytes(good))
    report = verify_store(store)
    assert report.problems == [] and any("no SHA-256 recorded" in note for note in report.notes)
    squashfs.write_bytes(bytes(good[:100]))
    assert "recorded as 104" in verify_store(store).problems[0].detail


def test_tampered_manifest_or_config_copy_is_a_corrupt_image(store):
    digest = _fake_image(store)
    config = store.layout.image_config(digest)
    _writable(config)
    config.write_bytes(b'{"config": {"Env": ["A=2"]}}')
    assert [p.detail for p in verify_store(store).problems] == [
        "config.json does not match the manifest's config digest"]


def test_dangling_reference_and_unknown_files(store):
    digest = _fake_image(store)
    store.set_reference("example.org/other:2", Digest.of(b"no such image"))
    junk = store.layout.blobs_dir / "sha256" / "not-a-digest"
    junk.write_bytes(b"x")
    report = verify_store(store)
    assert _kinds(report) == [(verify_mod.DANGLING_REFERENCE, "index.json"),
                              (verify_mod.UNKNOWN_FILE, "not-a-digest")]
    assert store.has_image(digest)


def test_stray_temporaries_removed_but_partial_downloads_kept(store):
    _fake_image(store)
    stray = store.layout.tmp_dir / "image-sha256-abc-dead"
    stray.mkdir()
    (stray / "image.sqfs").write_bytes(b"half")
    written = store.layout.tmp_dir / "write-1-ab.tmp"
    written.write_bytes(b"{")
    partial = store.layout.partial_blob(Digest.of(b"big"))
    partial.write_bytes(b"bi")
    report = verify_store(store)
    assert _kinds(report) == [(verify_mod.STRAY_TEMPORARY, "image-sha256-abc-dead"),
                              (verify_mod.STRAY_TEMPORARY, "write-1-ab.tmp")]
    assert any(partial.name in note for note in report.notes)
    assert report.remaining == [] and len(report.garbage) == 2  # leftovers do not fail the check
    repaired = verify_store(store, repair=True)
    assert repaired.remaining == [] and not stray.exists() and not written.exists()
    assert partial.exists()


def test_without_the_lock_young_temporaries_are_not_judged(store, monkeypatch):
    young = store.layout.tmp_dir / "write-2-cd.tmp"
    young.write_bytes(b"{")
    old = store.layout.tmp_dir / "write-3-ef.tmp"
    old.write_bytes(b"{")
    past = time.time() - STALE_TMP_S - 60
    os.utime(old, (past, past))
    # A user reading a site store it cannot write: no lock can be taken.
    real_access = os.access
    monkeypatch.setattr(verify_mod.os, "access",
                        lambda path, mode: False if str(path) == str(store.layout.locks_dir) else real_access(path, mode))
    report = verify_store(store)
    assert _kinds(report) == [(verify_mod.STRAY_TEMPORARY, old.name)]


def test_unreadable_index_is_reported(store):
    store.layout.index.write_text("{not json")
    assert [p.kind for p in verify_store(store).problems] == [verify_mod.UNREADABLE_INDEX]


def test_doctor_names_store_verify_when_its_quick_look_finds_a_problem(store):
    from berth.runtime.doctor import check_store

    digest = _fake_image(store)
    assert check_store(store).ok
    squashfs = store.layout.image_squashfs(digest)
    _writable(squashfs)
    squashfs.unlink()
    check = check_store(store)
    assert not check.ok and "incomplete image" in check.detail
    assert check.fix.startswith("run `berth store verify`")
    site = check_store(Store(store.root, "site"))
    assert "ask your site administrator" in site.fix and "--site --repair" in site.fix


def test_quick_look_does_not_hash_and_does_not_wait_for_a_running_pull(store):
    from berth.locks import file_lock

    digest = _fake_image(store, layer=b"layer")
    path = store.layout.blob(Digest.of(b"layer"))
    _writable(path)
    path.write_bytes(b"other")  # only a deep check sees this
    with file_lock(store.layout.gc_lock, shared=True):  # a pull running
        assert verify_store(store, deep=False).problems == []
    assert store.has_image(digest)
