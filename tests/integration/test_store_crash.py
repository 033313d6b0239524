"""kill -9 of berth pull at several moments leaves the store consistent; a re-pull resumes and
succeeds; prune then leaves nothing unreferenced (issue 2: "consistent after kill -9 at any
moment")."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness.storetest import BIG_BYTES, Stores, big_image, proxy, stores, via, wait_for  # noqa: F401

pytestmark = pytest.mark.integration

def _big_layer(image) -> str:
    import json

    manifest = json.loads(Path(image.layout, "blobs", "sha256", image.digest[7:]).read_text())
    return max(manifest["layers"], key=lambda layer: layer["size"])["digest"]


def assert_consistent(stores: Stores) -> None:
    """What a reader may rely on at any moment: every image directory complete, every reference
    naming a complete image, every blob matching its name."""
    root = stores.user_store
    for name in stores.image_dirs():
        image = root / "images" / name
        assert sorted(p.name for p in image.iterdir()) == ["config.json", "image.json", "image.sqfs",
                                                           "manifest.json"], name
    for reference, digest in stores.index().items():
        assert (root / "images" / digest.replace(":", "-") / "image.json").is_file(), reference
    for digest in stores.blobs():
        hasher = hashlib.sha256()
        with open(root / "blobs" / "sha256" / digest[7:], "rb") as blob:
            while chunk := blob.read(1 << 20):
                hasher.update(chunk)
        assert f"sha256:{hasher.hexdigest()}" == digest


def _kill(process) -> bool:
    """kill -9 berth; False when it had just finished on its own (a race the caller allows)."""
    try:
        os.kill(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _out, err = process.communicate(timeout=30)
    assert process.returncode in (-signal.SIGKILL, 0), err
    return process.returncode == -signal.SIGKILL


def _repull_and_prune(stores: Stores, ref: str, digest: str, *, age_leftovers: bool = False) -> dict:
    result = stores.json("pull", "--insecure", "--json", ref)
    assert result["digest"] == digest
    assert_consistent(stores)
    if age_leftovers:
        # A kill at a random moment may land in the store's own creation and leave a temporary
        # of its layout-version file; prune keeps tmp/ entries younger than STALE_TMP_S (it
        # cannot tell a crashed writer's from a slow one's), so make what is left look stale.
        old = time.time() - 2 * 3600
        for name in stores.tmp_entries():
            os.utime(stores.user_store / "tmp" / name, (old, old))
    stores.ok("prune")
    assert stores.blobs() == stores.referenced_blobs()
    assert stores.tmp_entries() == []
    assert stores.index() == {ref: digest}
    return result


def test_kill_during_download_then_repull_resumes(stores, proxy, big_image):
    ref = via(proxy, big_image)
    big = _big_layer(big_image)
    partial = stores.user_store / "tmp" / f"blob-sha256-{big[7:]}.partial"
    proxy.blob_delay_s = 0.005
    process = stores.popen("pull", "--insecure", "-q", ref)
    try:
        assert wait_for(lambda: partial.exists() and partial.stat().st_size > 2 << 20, timeout_s=60)
    finally:
        _kill(process)
    kept = partial.stat().st_size
    assert 0 < kept < BIG_BYTES
    assert stores.index() == {} and stores.image_dirs() == [] and big not in stores.blobs()
    assert_consistent(stores)
    proxy.blob_delay_s = 0
    proxy.reset()
    result = _repull_and_prune(stores, ref, big_image.digest)
    ranges = [r for _m, _p, r in proxy.blob_gets(big)]
    assert len(ranges) == 1 and ranges[0] is not None
    assert int(ranges[0].removeprefix("bytes=").rstrip("-")) >= kept
    assert result["downloaded_bytes"] < BIG_BYTES


def test_kill_during_conversion_then_repull_converts_without_downloading(stores, proxy, big_image):
    ref = via(proxy, big_image)
    tmp = stores.user_store / "tmp"
    process = stores.popen("pull", "--insecure", "-q", ref)
    try:
        assert wait_for(lambda: tmp.is_dir() and any(p.name.startswith("image-") for p in tmp.iterdir()),
                        timeout_s=60)
    finally:
        _kill(process)
    assert_consistent(stores)
    leftovers = [name for name in stores.tmp_entries() if name.startswith("image-")]
    published = stores.image_dirs()
    # Either the kill hit the conversion (its directory is left in tmp/, nothing published)
    # or it landed after the rename (published, nothing left over): never both, never half.
    assert bool(leftovers) != bool(published), (leftovers, published)
    assert stores.index() == {} or published
    # Conversion starts on the top layer while the layers below still download (issue 10):
    # the kill may leave some of them missing; what was verified and stored is never fetched again.
    stored = stores.blobs()
    proxy.reset()
    result = _repull_and_prune(stores, ref, big_image.digest)
    fetched = {path.rsplit("/", 1)[1] for _method, path, _range in proxy.blob_gets()}
    assert not fetched & stored, fetched & stored
    # A blob whose partial was complete when the kill came is verified and stored by the
    # repull without a GET, and still counts as one the pull brought in: hence >=, not ==.
    assert result["downloaded_blobs"] >= len(fetched)
    assert result["converted"] == bool(leftovers)


def test_crash_garbage_is_removed_by_prune_once_stale(stores, proxy, big_image):
    ref = via(proxy, big_image)
    tmp = stores.user_store / "tmp"
    # Wait for the big layer's partial, well before its end: a small layer's partial could be
    # published between the check and the kill on a loaded machine, leaving tmp/ empty.
    partial = tmp / f"blob-sha256-{_big_layer(big_image)[7:]}.partial"
    proxy.blob_delay_s = 0.005
    process = stores.popen("pull", "--insecure", "-q", ref)
    try:
        assert wait_for(lambda: partial.exists() and 0 < partial.stat().st_size < BIG_BYTES // 2, timeout_s=60)
    finally:
        _kill(process)
    garbage = stores.tmp_entries()
    assert garbage
    fresh = stores.json("prune", "--json")
    assert fresh["tmp_removed"] == 0 and stores.tmp_entries() == garbage  # may still be resumed
    old = time.time() - 2 * 3600
    for name in garbage:
        os.utime(tmp / name, (old, old))
    stale = stores.json("prune", "--json")
    assert stale["tmp_removed"] == len(garbage) and stale["bytes_freed"] > 0
    assert stores.tmp_entries() == [] and stores.blobs() == set()


@pytest.mark.parametrize("delay_s", [0.05, 0.3, 0.8, 1.5])
def test_kill_at_any_moment_keeps_store_consistent(stores, proxy, big_image, delay_s):
    ref = via(proxy, big_image)
    proxy.blob_delay_s = 0.002
    process = stores.popen("pull", "--insecure", "-q", ref)
    time.sleep(delay_s)
    if process.poll() is None:
        _kill(process)
    assert_consistent(stores)
    proxy.blob_delay_s = 0
    _repull_and_prune(stores, ref, big_image.digest, age_leftovers=True)


def test_prune_during_a_pull_waits_and_removes_nothing_in_use(stores, proxy, big_image):
    ref = via(proxy, big_image)
    big = _big_layer(big_image)
    partial = stores.user_store / "tmp" / f"blob-sha256-{big[7:]}.partial"
    proxy.blob_delay_s = 0.003
    pull = stores.popen("pull", "--insecure", "--json", ref)
    try:
        assert wait_for(lambda: partial.exists() and partial.stat().st_size > 1 << 20, timeout_s=60)
        # blobs already stored (config, busybox layers) belong to no image yet: a prune that
        # did not wait would delete them under the running pull
        prune = stores.popen("prune", "--json")
        prune_out, prune_err = prune.communicate(timeout=120)
        pull_out, pull_err = pull.communicate(timeout=120)
    finally:
        if pull.poll() is None:
            _kill(pull)
    assert pull.returncode == 0, pull_err
    assert prune.returncode == 0, prune_err
    assert json.loads(prune_out)["blobs_removed"] == 0
    assert json.loads(pull_out)["digest"] == big_image.digest
    assert_consistent(stores)
    assert stores.blobs() == stores.referenced_blobs()
