"""`berth store verify [--repair]` against a store pulled from the real registry, as the
unprivileged test user (issue 8): each kind of damage is reported with a non-zero exit, repair
fixes it without downloading what is intact, and the store then verifies clean."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.harness.storetest import proxy, stores, via  # noqa: F401 - fixtures
from tests.harness.users import describe

pytestmark = pytest.mark.integration


def _layers(image) -> list[str]:
    manifest = json.loads(Path(image.layout, "blobs", "sha256", image.digest[7:]).read_text())
    return [layer["digest"] for layer in manifest["layers"]]


def _as_user_writable(stores, path: Path) -> None:
    # Blobs and SquashFS files are published 0444; the owner (the test user) may chmod them,
    # as a stray `chmod u+w` by the user would. Root here just does it.
    os.chmod(path, 0o644)


def test_verify_reports_each_kind_of_damage_and_repair_fixes_it(stores, proxy, busybox_image):
    ref = via(proxy, busybox_image)
    stores.ok("pull", "--insecure", "-q", ref)
    clean = stores.berth("store", "verify", "--json")
    assert clean.returncode == 0, describe(clean)
    report = json.loads(clean.stdout)
    assert (report["images_checked"], report["problems"]) == (1, [])
    assert report["blobs_checked"] == 4  # manifest, config, 2 layers

    root = stores.user_store
    first, second = _layers(busybox_image)
    corrupt = root / "blobs" / "sha256" / first[7:]
    _as_user_writable(stores, corrupt)
    with open(corrupt, "r+b") as handle:
        handle.seek(10)
        handle.write(b"\xff\xfe")
    (root / "blobs" / "sha256" / second[7:]).unlink()
    squashfs = root / "images" / busybox_image.digest.replace(":", "-") / "image.sqfs"
    _as_user_writable(stores, squashfs)
    os.truncate(squashfs, squashfs.stat().st_size // 2)
    stray = root / "tmp" / "write-999-deadbeef.tmp"
    stray.write_bytes(b"half an index")

    broken = stores.berth("store", "verify")
    assert broken.returncode == 6, describe(broken)
    lines = broken.stdout.splitlines()
    assert any(line.startswith(f"corrupt blob: {corrupt}:") for line in lines), broken.stdout
    assert any(line.startswith(f"missing blob: {root}/blobs/sha256/{second[7:]}") for line in lines)
    assert any(line.startswith(f"corrupt image: {squashfs.parent}:") for line in lines)
    assert any(line.startswith(f"stray temporary: {stray}:") for line in lines)
    assert "berth store verify --repair" in broken.stderr
    doctor = {c["name"]: c for c in json.loads(stores.berth("doctor", "--json").stdout)["checks"]}
    assert not doctor["user store"]["ok"] and "berth store verify" in doctor["user store"]["fix"]
    # The SquashFS is damaged, so the image is dropped at repair; the missing layer is not
    # reported separately for an image that is itself corrupt.
    proxy.reset()
    repaired = stores.berth("store", "verify", "--repair", "--insecure", "--json")
    assert repaired.returncode == 0, describe(repaired)
    outcome = {p["kind"]: p["repaired"] for p in json.loads(repaired.stdout)["problems"]}
    assert outcome["corrupt blob"] == "removed" and outcome["stray temporary"] == "removed"
    assert outcome["dangling reference"] == "pulled again"
    # Only the two damaged layers came from the registry again; the config and manifest not.
    assert sorted(p.rsplit("/", 1)[1] for _m, p, _r in proxy.blob_gets()) == sorted([first, second])
    again = stores.berth("store", "verify", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["problems"] == [], describe(again)
    run = stores.berth("inspect", ref)
    assert run.returncode == 0, describe(run)


def test_repair_reconverts_a_truncated_squashfs_without_the_network(stores, proxy, busybox_image):
    ref = via(proxy, busybox_image)
    stores.ok("pull", "--insecure", "-q", ref)
    squashfs = stores.user_store / "images" / busybox_image.digest.replace(":", "-") / "image.sqfs"
    _as_user_writable(stores, squashfs)
    os.truncate(squashfs, 4096)
    proxy.reset()
    proxy.stop()  # the registry is out of reach: the repair must not need it
    repaired = stores.berth("store", "verify", "--repair", "--json")
    assert repaired.returncode == 0, describe(repaired)
    outcome = [(p["kind"], p["repaired"]) for p in json.loads(repaired.stdout)["problems"]]
    assert outcome == [("corrupt image", "removed (its references are rebuilt or pulled again)"),
                       ("dangling reference", "converted again from the stored blobs")]
    assert stores.ok("store", "verify").returncode == 0
    assert squashfs.stat().st_size > 4096


def test_missing_layer_fetched_again_or_reported_when_the_registry_is_gone(stores, proxy, busybox_image):
    ref = via(proxy, busybox_image)
    stores.ok("pull", "--insecure", "-q", ref)
    layer = _layers(busybox_image)[0]
    blob = stores.user_store / "blobs" / "sha256" / layer[7:]
    blob.unlink()
    proxy.reset()
    fixed = stores.berth("store", "verify", "--repair", "--insecure", "--json")
    assert fixed.returncode == 0, describe(fixed)
    problem, = json.loads(fixed.stdout)["problems"]
    assert (problem["kind"], problem["repaired"]) == ("missing blob", f"fetched again from {ref}")
    assert [p for _m, p, _r in proxy.blob_gets()] == [f"/v2/test/busybox/blobs/{layer}"]
    assert blob.is_file()

    blob.unlink()
    proxy.stop()
    failed = stores.berth("store", "verify", "--repair", "--insecure", "--json")
    assert failed.returncode == 6, describe(failed)
    problem, = json.loads(failed.stdout)["problems"]
    assert problem["kind"] == "missing blob" and problem["repaired"] is None
    assert "fetching it again failed" in problem["detail"]
    assert "problems remain" in failed.stderr and "traceback" not in failed.stderr.lower()
