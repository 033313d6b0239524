"""berth images / inspect / rmi / prune / push as the unprivileged test user, both stores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.harness.storetest import proxy, stores, via  # noqa: F401
from tests.harness.users import describe

pytestmark = pytest.mark.integration


def _pull(stores, ref: str) -> dict:
    return stores.json("pull", "--insecure", "--json", ref)


def test_images_lists_both_stores_marked(stores, busybox_image, whiteout_image):
    os.chown(stores.site_store, 0, 0)
    admin = stores.root_berth("pull", "--site", "--insecure", "-q", str(whiteout_image))
    assert admin.returncode == 0, describe(admin)
    _pull(stores, str(busybox_image))
    rows = stores.json("images", "--json")
    assert [(r["repository"], r["tag"], r["digest"], r["store"]) for r in rows] == [
        (f"{busybox_image.registry.host}/test/busybox", "1", busybox_image.digest, "user"),
        (f"{whiteout_image.registry.host}/test/whiteout", "1", whiteout_image.digest, "site"),
    ]
    assert all(r["size_bytes"] > 100_000 for r in rows)
    table = stores.ok("images").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "DIGEST", "SIZE", "STORE"]
    assert table[1].split()[:3] == [f"{busybox_image.registry.host}/test/busybox", "1", busybox_image.digest[7:19]]
    assert table[1].split()[-1] == "user" and table[2].split()[-1] == "site"
    full = stores.ok("images", "--no-trunc").stdout
    assert busybox_image.digest in full


def test_images_on_empty_stores_prints_only_the_header(stores):
    result = stores.ok("images")
    assert result.stdout.split() == ["REPOSITORY", "TAG", "DIGEST", "SIZE", "STORE"]
    assert stores.json("images", "--json") == []


def test_inspect_shows_manifest_config_layers_and_squashfs(stores, busybox_image):
    _pull(stores, str(busybox_image))
    data = stores.json("inspect", str(busybox_image))
    manifest = json.loads(Path(busybox_image.layout, "blobs/sha256", busybox_image.digest[7:]).read_text())
    assert data["digest"] == busybox_image.digest
    assert data["manifest"] == manifest
    assert [(l["digest"], l["size_bytes"]) for l in data["layers"]] == [
        (l["digest"], l["size"]) for l in manifest["layers"]]
    assert data["config"]["config"]["Cmd"] == ["/bin/sh"]
    assert data["store"] == "user" and data["store_path"] == str(stores.user_store)
    assert data["squashfs_bytes"] == Path(data["squashfs"]).stat().st_size
    assert data["compression"] == "lz4"
    # by digest prefix too, as docker accepts image ids
    assert stores.json("inspect", busybox_image.digest[7:19])["digest"] == busybox_image.digest


def test_inspect_unknown_and_bad_reference(stores):
    unknown = stores.berth("inspect", "127.0.0.1:5000/nothing/here:1")
    assert unknown.returncode == 3, describe(unknown)
    assert "not in your store" in unknown.stderr and "berth pull" in unknown.stderr
    bad = stores.berth("inspect", "bad//ref")
    assert bad.returncode == 20, describe(bad)


def test_rmi_untags_then_removes_when_no_reference_remains(stores, busybox_image):
    _pull(stores, str(busybox_image))
    _pull(stores, busybox_image.by_digest)
    image_dir = stores.user_store / "images" / busybox_image.digest.replace(":", "-")
    first = stores.ok("rmi", str(busybox_image))
    assert first.stdout.splitlines() == [f"untagged: {busybox_image}"]
    assert image_dir.is_dir()  # still named by its digest reference
    second = stores.ok("rmi", busybox_image.by_digest)
    assert f"deleted: {busybox_image.digest}" in second.stdout
    assert not image_dir.exists() and stores.index() == {}
    again = stores.berth("rmi", str(busybox_image))
    assert again.returncode == 3, describe(again)
    # blobs stay until prune, which reports what it freed
    assert stores.blobs()
    report = stores.json("prune", "--json")
    assert report["blobs_removed"] == 4 and report["bytes_freed"] > 1_000_000
    assert stores.blobs() == set()


def test_rmi_by_digest_removes_every_reference(stores, busybox_image, busybox_v2s2_image):
    _pull(stores, str(busybox_image))
    _pull(stores, busybox_image.by_digest)
    _pull(stores, str(busybox_v2s2_image))
    result = stores.ok("rmi", busybox_image.digest)
    assert sorted(result.stdout.splitlines()[:2]) == sorted(
        [f"untagged: {busybox_image}", f"untagged: {busybox_image.by_digest}"])
    assert stores.index() == {str(busybox_v2s2_image): busybox_v2s2_image.digest}


def test_rmi_continues_after_an_unknown_reference(stores, busybox_image):
    _pull(stores, str(busybox_image))
    result = stores.berth("rmi", "127.0.0.1:5000/nothing:1", str(busybox_image))
    assert result.returncode == 3, describe(result)
    assert f"untagged: {busybox_image}" in result.stdout
    assert stores.index() == {}


def test_prune_keeps_referenced_and_removes_unreferenced(stores, busybox_image, whiteout_image):
    _pull(stores, str(busybox_image))
    _pull(stores, str(whiteout_image))
    before = stores.blobs()
    stores.ok("rmi", str(whiteout_image))
    report = stores.json("prune", "--json")
    removed = before - stores.blobs()
    assert report["blobs_removed"] == len(removed) > 0
    assert stores.blobs() == stores.referenced_blobs()
    assert stores.json("inspect", str(busybox_image))["digest"] == busybox_image.digest
    human = stores.ok("prune").stdout
    assert human.strip() == "removed 0 images, 0 blobs, 0 temporary files: 0 B freed"


def test_push_round_trip_to_another_registry(stores, busybox_image, fresh_registry, proxy):
    target = fresh_registry()
    _pull(stores, via(proxy, busybox_image))
    destination = f"{target.host}/copied/busybox:7"
    pushed = stores.json("push", "--insecure", "--json", via(proxy, busybox_image), destination)
    assert pushed["digest"] == busybox_image.digest  # byte-identical manifest
    assert pushed["uploaded_blobs"] == 3 and pushed["present_blobs"] == 0
    again = stores.json("push", "--insecure", "--json", via(proxy, busybox_image), destination)
    assert (again["uploaded_blobs"], again["present_blobs"]) == (0, 3)
    # pull the copy into a fresh store: same image
    stores.ok("rmi", via(proxy, busybox_image))
    stores.ok("prune")
    copy = _pull(stores, destination)
    assert copy["digest"] == busybox_image.digest and copy["downloaded_blobs"] == 3


def test_push_needs_destination_for_digest_only_images(stores, busybox_image):
    _pull(stores, busybox_image.by_digest)
    result = stores.berth("push", "--insecure", busybox_image.digest)
    assert result.returncode == 2, describe(result)
    assert "berth push REF HOST/NAME:TAG" in result.stderr


def test_unreadable_site_store_is_skipped_with_a_note(stores, busybox_image):
    _pull(stores, str(busybox_image))
    (stores.site_store / "index.json").write_text('{"layout": 1, "references": {}}')
    os.chown(stores.site_store, 0, 0)
    os.chown(stores.site_store / "index.json", 0, 0)
    os.chmod(stores.site_store / "index.json", 0o600)
    result = stores.ok("images", "--json")
    assert [r["store"] for r in json.loads(result.stdout)] == ["user"]
    assert "cannot read the site store index" in result.stderr
    assert "ask your site administrator" in result.stderr


def test_admin_removes_and_prunes_the_site_store(stores, busybox_image):
    os.chown(stores.site_store, 0, 0)
    assert stores.root_berth("pull", "--site", "--insecure", "-q", str(busybox_image)).returncode == 0
    refused = stores.berth("prune", "--site")
    assert refused.returncode == 73 and "ask your site administrator" in refused.stderr, describe(refused)
    removed = stores.root_berth("rmi", "--site", str(busybox_image))
    assert removed.returncode == 0, describe(removed)
    assert f"deleted: {busybox_image.digest}" in removed.stdout
    pruned = stores.root_berth("prune", "--site", "--json")
    assert pruned.returncode == 0, describe(pruned)
    assert json.loads(pruned.stdout)["blobs_removed"] == 4
    assert stores.blobs(stores.site_store) == set() and stores.image_dirs(stores.site_store) == []
    assert stores.json("images", "--json") == []
