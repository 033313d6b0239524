"""Unit tests of the store: verified blobs, resumable partial files, atomic index, flock
locks between processes, image publishing and prune, error mapping, lookups."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from berth.config.settings import Settings
from berth.errors import DigestMismatch, PermissionDenied, StoreError
from berth.image import api
from berth.oci.digest import Digest
from berth.locks import is_locked
from berth.store.store import SITE, STALE_TMP_S, USER, Store


def _digest(data: bytes) -> Digest:
    return Digest.of(data)


@pytest.fixture
def store(tmp_path) -> Store:
    created = Store(tmp_path / "store", USER)
    created.require_writable()
    return created


def _fake_image(store: Store, layer: bytes = b"layer-bytes", config: dict | None = None,
                reference: str | None = "example.org/team/app:1") -> Digest:
    """Publish an image without the flattener: blobs, a fake image.sqfs, JSON files, tag."""
    config_bytes = json.dumps(config or {"config": {"Env": ["A=1"]}}).encode()
    store.put_blob_bytes(_digest(layer), layer)
    store.put_blob_bytes(_digest(config_bytes), config_bytes)
    manifest = {"schemaVersion": 2, "config": {"digest": str(_digest(config_bytes)), "size": len(config_bytes)},
                "layers": [{"digest": str(_digest(layer)), "size": len(layer),
                            "mediaType": "application/vnd.oci.image.layer.v1.tar"}]}
    manifest_bytes = json.dumps(manifest).encode()
    digest = _digest(manifest_bytes)
    store.put_blob_bytes(digest, manifest_bytes)
    with store.image_lock(digest), store.image_workdir(digest) as work:
        (work / "image.sqfs").write_bytes(b"hsqs" + b"\0" * 100)
        store.publish_image(work, digest, manifest_bytes=manifest_bytes, config_bytes=config_bytes,
                            meta={"index_digest": None})
        if reference:
            store.set_reference(reference, digest)
    return digest


# ------------------------------------------------------------------------------ blobs


def test_blob_verified_and_published_read_only(store):
    data = b"hello blob" * 1000
    digest = _digest(data)
    with store.blob_download(digest, len(data)) as writer:
        writer.write(data[:5000])
        writer.write(data[5000:])
        writer.commit()
    assert store.blob_path(digest).read_bytes() == data
    assert store.blob_path(digest).stat().st_mode & 0o777 == 0o400  # a user store: private
    assert not store.layout.partial_blob(digest).exists()
    with store.blob_download(digest, len(data)) as writer:
        assert writer is None  # already stored: nothing to fetch


def test_digest_mismatch_leaves_nothing(store):
    data = b"the real content"
    digest = _digest(data)
    with pytest.raises(DigestMismatch) as caught:
        with store.blob_download(digest, len(data)) as writer:
            writer.write(b"the fake content")
            writer.commit()
    assert str(digest) in caught.value.message
    assert not store.has_blob(digest)
    assert list(store.layout.tmp_dir.iterdir()) == []


def test_too_long_stream_is_refused_at_once(store):
    data = b"0123456789"
    digest = _digest(data)
    with pytest.raises(DigestMismatch, match="longer than the 10 bytes"):
        with store.blob_download(digest, len(data)) as writer:
            writer.write(data + b"x")
    assert not store.has_blob(digest)
    assert not store.layout.partial_blob(digest).exists()


def test_a_whole_partial_left_read_only_by_a_killed_publish_is_resumed(store):
    """kill -9 of a pull between fsutil.publish_file's chmod and its rename (the reliability
    campaign's scenario 2 hit it): the next pull resumed by opening the read-only file for
    writing and failed with 'cannot write your image store'."""
    data = b"x" * 5000
    digest = _digest(data)
    partial = store.layout.partial_blob(digest)
    store.require_writable()
    partial.write_bytes(data)
    partial.chmod(store.modes.blob)
    with store.blob_download(digest, len(data)) as writer:
        assert writer.offset == len(data)
        # Writable again by its owner (the test runs as root, whom no mode stops: the
        # unprivileged case is tests/reliability/test_kill_pull.py).
        assert partial.stat().st_mode & 0o200
        writer.commit()
    assert store.has_blob(digest) and not partial.exists()


def test_partial_download_resumes_with_rehash(store):
    data = os.urandom(300_000)
    digest = _digest(data)
    with store.blob_download(digest, len(data)) as writer:
        writer.write(data[:123_456])
        # interrupted here: no commit; the partial file stays for the next attempt
    assert store.layout.partial_blob(digest).stat().st_size == 123_456
    with store.blob_download(digest, len(data)) as writer:
        assert writer.offset == 123_456
        writer.write(data[123_456:])
        writer.commit()
    assert store.blob_path(digest).read_bytes() == data


def test_descriptor_lying_about_a_stored_blobs_size_keeps_the_blob(store):
    """A hostile manifest naming a stored (verified) blob with another size must not make
    the store delete that blob, which other images use: the descriptor is what is wrong."""
    data = os.urandom(5000)
    digest = _digest(data)
    store.put_blob_bytes(digest, data)
    for lie in (10, len(data) + 10):
        with pytest.raises(DigestMismatch, match="announces"):
            with store.blob_download(digest, lie):
                pass
        assert store.blob_path(digest).read_bytes() == data


def test_stored_blob_truncated_on_disk_is_downloaded_again(store):
    data = os.urandom(5000)
    digest = _digest(data)
    store.put_blob_bytes(digest, data)
    path = store.blob_path(digest)
    os.chmod(path, 0o600)
    path.write_bytes(data[:100])  # damaged on disk: its content no longer has its digest
    with store.blob_download(digest, len(data)) as writer:
        assert writer is not None
        writer.write(data)
        writer.commit()
    assert path.read_bytes() == data


def test_restart_from_zero_when_range_ignored(store):
    data = os.urandom(5000)
    digest = _digest(data)
    with store.blob_download(digest, len(data)) as writer:
        writer.write(data[:1000])
    with store.blob_download(digest, len(data)) as writer:
        assert writer.offset == 1000
        writer.restart()
        assert writer.offset == 0
        writer.write(data)
        writer.commit()
    assert store.blob_path(digest).read_bytes() == data


def test_add_blob_file_hashes_and_checks(store, tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(b"x" * 12345)
    with open(source, "rb") as handle:
        digest, size = store.add_blob_file(handle)
    assert (digest, size) == (_digest(b"x" * 12345), 12345)
    with open(source, "rb") as handle, pytest.raises(DigestMismatch):
        store.add_blob_file(handle, digest=_digest(b"other"))
    assert not store.has_blob(_digest(b"other"))
    assert [p.name for p in store.layout.tmp_dir.iterdir()] == []


# ------------------------------------------------------------------------------ locks


def _download_in_child(root: str, data: bytes, results) -> None:
    store = Store(Path(root))
    digest = _digest(data)
    with store.blob_download(digest, len(data)) as writer:
        if writer is None:
            results.put("cached")
            return
        time.sleep(0.3)  # long enough for the others to queue on the lock
        writer.write(data)
        writer.commit()
        results.put("downloaded")


def test_concurrent_downloads_of_one_blob_fetch_once(store):
    data = os.urandom(100_000)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_download_in_child, args=(str(store.root), data, results))
                for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in children)
    assert outcomes == ["cached", "cached", "cached", "downloaded"]
    assert store.blob_path(_digest(data)).read_bytes() == data


# ------------------------------------------------------------------------------ index and images


def test_index_written_atomically_and_sorted(store):
    first = _digest(b"a")
    store.set_reference("example.org/b:1", first)
    store.set_reference("example.org/a:1", first)
    data = json.loads(store.layout.index.read_text())
    assert list(data["references"]) == ["example.org/a:1", "example.org/b:1"]
    assert data["layout"] == 1
    # no temporary file left next to index.json
    assert sorted(p.name for p in store.root.iterdir()) == [
        "blobs", "images", "index.json", "layout-version", "locks", "tmp"]


def test_corrupt_index_is_a_store_error(store):
    store.layout.index.write_text("{not json")
    with pytest.raises(StoreError, match="index.json is unreadable"):
        store.read_index()


def test_index_entry_that_is_not_a_digest_is_a_store_error(store):
    store.layout.index.write_text('{"layout": 1, "references": {"example.org/a:1": "latest"}}')
    with pytest.raises(StoreError, match="maps 'example.org/a:1' to 'latest'"):
        store.read_index()


def test_publish_and_load_image(store):
    digest = _fake_image(store)
    assert store.has_image(digest)
    manifest, config, meta = store.load_image_files(digest)
    assert config == {"config": {"Env": ["A=1"]}}
    assert meta["index_digest"] is None
    assert store.layout.image_dir(digest).stat().st_mode & 0o777 == 0o700  # a user store: private
    assert list(store.layout.tmp_dir.iterdir()) == []


def test_publish_records_the_squashfs_digest_and_fsyncs_it_before_the_rename(store, monkeypatch):
    # The image is hashed while a thread fsyncs it (issue 10, target 4): both must still
    # happen, the fsync of image.sqfs before the image directory is renamed into images/.
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("image.sqfs"):
            events.append("fsync image.sqfs")
        return real_fsync(fd)

    def rename(source, target):
        events.append("rename")
        return real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    digest = _fake_image(store)
    _manifest, _config, meta = store.load_image_files(digest)
    assert meta["squashfs_digest"] == str(Digest.of(b"hsqs" + b"\0" * 100))
    assert "fsync image.sqfs" in events and "rename" in events
    assert events.index("fsync image.sqfs") < events.index("rename")


def test_a_failed_fsync_of_the_image_publishes_nothing(store, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("image.sqfs"):
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreError):
        _fake_image(store)
    assert store.list_images() == []
    assert list(store.layout.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("copy", ["manifest.json", "config.json"])
def test_a_failed_write_of_the_images_manifest_or_config_publishes_nothing(store, monkeypatch, copy):
    # They are written and fsynced by a thread while the image is hashed (issue 10, target 4):
    # its failure is the publish's, raised as the store's error, and nothing is published.
    real_fsync = os.fsync
    fsynced = []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        fsynced.append(name.rpartition("/")[2])
        if name.endswith(copy):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreError, match="no space left"):
        _fake_image(store)
    assert copy in fsynced and "image.json" not in fsynced
    assert store.list_images() == []
    assert list(store.layout.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
@pytest.mark.parametrize("kind, directories, files, content", [
    (USER, {0o700}, {0o600}, {0o400}),
    (SITE, {0o755}, {0o644}, {0o444}),
])
def test_store_modes_are_private_for_users_and_readable_for_the_site_whatever_the_umask(
        tmp_path, umask, kind, directories, files, content):
    """Issue 12, defect 1: a user store used the site store's modes, so everyone could read
    another user's images. tmp/ and locks/ are the owner's in both (readers need neither)."""
    old_umask = os.umask(umask)
    try:
        store = Store(tmp_path / "parent" / "store", kind)
        store.require_writable()
        digest = _fake_image(store)
    finally:
        os.umask(old_umask)
    modes: dict[str, set[int]] = {"dir": set(), "file": set(), "content": set()}
    for directory, subdirs, names in os.walk(store.root):
        if Path(directory).name in ("tmp", "locks"):
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
            continue
        modes["dir"].add(stat.S_IMODE(os.stat(directory).st_mode))
        for name in names:
            path = Path(directory) / name
            immutable = path.parent.name == "sha256" or name == "image.sqfs"
            modes["content" if immutable else "file"].add(stat.S_IMODE(path.stat().st_mode))
    assert modes == {"dir": directories, "file": files, "content": content}
    assert store.layout.image_squashfs(digest).is_file()
    if kind == USER:  # parents berth creates for a user store are private too (~/.local/share)
        assert stat.S_IMODE((tmp_path / "parent").stat().st_mode) == 0o700
    for lock in store.layout.locks_dir.iterdir():
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600, lock


def test_an_existing_open_user_store_is_closed_on_the_next_write(tmp_path):
    root = tmp_path / "store"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    Store(root, USER).require_writable()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_a_user_store_may_be_a_link_of_the_users_own_to_a_private_directory(tmp_path):
    target = tmp_path / "scratch-store"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    (tmp_path / "store").symlink_to(target)
    Store(tmp_path / "store", USER).require_writable()
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert (target / "blobs").is_dir()




def test_crashed_conversion_leftovers_removed_by_next_conversion(store):
    digest = _digest(b"image")
    leftover = store.layout.tmp_dir / (store.layout.image_workdir_prefix(digest) + "dead")
    leftover.mkdir()
    (leftover / "image.sqfs").write_bytes(b"half")
    with store.image_lock(digest), store.image_workdir(digest) as work:
        assert not leftover.exists()
        assert work.is_dir()
    assert not work.exists()


# ------------------------------------------------------------------------------ prune


def test_prune_removes_unreferenced_and_keeps_referenced(store):
    kept = _fake_image(store, layer=b"kept layer", reference="example.org/kept:1")
    gone = _fake_image(store, layer=b"gone layer", reference=None)
    orphan = _digest(b"orphan blob")
    store.put_blob_bytes(orphan, b"orphan blob")
    report = store.prune()
    assert report.images_removed == [str(gone)]
    assert store.has_image(kept) and not store.has_image(gone)
    assert not store.has_blob(orphan) and not store.has_blob(_digest(b"gone layer"))
    assert store.has_blob(_digest(b"kept layer")) and store.has_blob(kept)
    # gone: manifest + config? (config identical to kept's, so it stays) + layer, plus the orphan
    assert report.blobs_removed == 3
    assert report.bytes_freed > len(b"gone layer") + len(b"orphan blob")
    again = store.prune()
    assert (again.images_removed, again.blobs_removed, again.bytes_freed) == ([], 0, 0)
    # lock files of removed content go too; those of kept content and the store's stay
    locks = {p.name for p in store.layout.locks_dir.iterdir()}
    assert store.layout.blob_lock(orphan).name not in locks
    assert store.layout.image_lock(gone).name not in locks
    assert {store.layout.image_lock(kept).name, "gc.lock", "index.lock"} <= locks


def test_prune_removes_only_stale_tmp(store):
    stale = store.layout.tmp_dir / "blob-sha256-x.partial"
    fresh = store.layout.tmp_dir / "image-sha256-y-1234"
    stale.write_bytes(b"old")
    fresh.mkdir()
    old = time.time() - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    report = store.prune()
    assert report.tmp_removed == 1
    assert not stale.exists() and fresh.exists()


def test_prune_waits_for_running_writers(store):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_gc_shared, args=(str(store.root), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        assert is_locked(store.layout.gc_lock)
    finally:
        release.set()
        holder.join(10)
    assert not is_locked(store.layout.gc_lock)
    store.prune()


def _hold_gc_shared(root: str, ready, release) -> None:
    with Store(Path(root)).writing():
        ready.set()
        release.wait(10)


# ------------------------------------------------------------------------------ errors


def test_enospc_becomes_store_error_with_hint(tmp_path):
    store = Store(tmp_path, USER)
    error = store.os_error(OSError(errno.ENOSPC, "No space left on device"), "writing", tmp_path / "x")
    assert isinstance(error, StoreError)
    assert "no space left" in error.message and "berth prune" in error.hint


def test_site_permission_error_names_path_and_admin(tmp_path):
    store = Store(tmp_path, SITE)
    error = store.os_error(OSError(errno.EACCES, "Permission denied"), "creating", tmp_path / "blobs")
    assert isinstance(error, PermissionDenied)
    assert str(tmp_path / "blobs") in error.message
    assert "ask your site administrator" in error.hint and "--site only as an admin" in error.hint


# ------------------------------------------------------------------------------ lookups


def test_lookup_order_user_then_site_and_digest_in_either(tmp_path):
    settings = Settings(user_store=tmp_path / "user", site_store=tmp_path / "site")
    user_store, site_store = api.stores(settings)
    user_store.require_writable()
    site_store.require_writable()
    in_site = _fake_image(site_store, layer=b"site", reference="example.org/app:1")
    assert api.find_image(settings, "example.org/app:1").store == "site"
    in_user = _fake_image(user_store, layer=b"user", reference="example.org/app:1")
    found = api.find_image(settings, "example.org/app:1")
    assert (found.store, found.digest) == ("user", in_user)
    by_digest = api.find_image(settings, f"example.org/other@{in_site}")
    assert (by_digest.store, by_digest.digest) == ("site", in_site)
    assert api.find_image(settings, str(in_site)).digest == in_site
    assert api.find_image(settings, in_site.hex[:12]).digest == in_site
    assert api.find_image(settings, "example.org/app:2") is None
    assert found.config == {"config": {"Env": ["A=1"]}}
    assert found.squashfs == user_store.layout.image_squashfs(in_user)
    assert found.size_bytes == 104


def test_get_image_without_pull_names_both_stores(tmp_path):
    from berth.errors import NotFound

    settings = Settings(user_store=tmp_path / "user", site_store=tmp_path / "site")
    with pytest.raises(NotFound) as caught:
        api.get_image(settings, "example.org/missing:1", pull_missing=False)
    assert str(tmp_path / "user") in caught.value.message and str(tmp_path / "site") in caught.value.message


def test_bad_reference_is_reference_error(tmp_path):
    from berth.errors import ReferenceError_

    settings = Settings(user_store=tmp_path / "user", site_store=tmp_path / "site")
    Store(settings.user_store).require_writable()
    with pytest.raises(ReferenceError_, match="bad repository component"):
        api.find_image(settings, "Example.org/UPPER:1/x")


def test_a_template_names_its_image_at_its_digest_without_a_second_pull(tmp_path, monkeypatch):
    """`berth template create` ran a whole second pull (network-free: registry policy, the
    store's writers' lock, the index) only to name the image NAME@digest in the site index; the
    store names it (Store.name_image, under the image's lock), and refuses an image not stored."""
    from berth.cli import config as cli_config

    site = Store(tmp_path / "site", SITE)
    site.require_writable()
    digest = _fake_image(site)
    pulls = []

    def pull(settings, ref, *, site=False, **kwargs):
        pulls.append(ref)
        return api.load_stored(api.store_for(settings, site=True), digest, ref)

    monkeypatch.setattr(api, "pull", pull)
    settings = Settings(site_store=tmp_path / "site")
    assert cli_config._pull_digest(settings, "example.org/team/app:1") == str(digest)
    assert pulls == ["example.org/team/app:1"]
    assert site.read_index()[f"example.org/team/app@{digest}"] == str(digest)
    assert site.name_image("example.org/team/app:2", _digest(b"not stored")) is False
    assert "example.org/team/app:2" not in site.read_index()


def test_rmi_site_refuses_an_image_a_template_pins_naming_the_templates(tmp_path):
    """`berth rmi --site NAME@digest` removed the image a site template pins, without a word:
    every job of the template then failed. It is refused (naming the templates) unless forced;
    a tag of the image that the pin does not need still goes."""
    from berth.config.templates import Template, create_template
    from berth.errors import PolicyError
    from berth.image.manage import remove_image

    settings = Settings(config_dir=tmp_path / "etc", site_store=tmp_path / "site")
    site = api.store_for(settings, site=True)
    site.require_writable()
    digest = _fake_image(site, reference="example.org/team/app:1")
    site.set_reference(f"example.org/team/app@{digest}", digest)
    for name in ("gpu", "cpu"):
        create_template(settings, Template(name=name, image="example.org/team/app:1", image_digest=str(digest),
                                           cpu=1, memsz_bytes=1 << 30))
    for ref in (f"example.org/team/app@{digest}", str(digest)):
        with pytest.raises(PolicyError) as caught:
            remove_image(settings, ref, site=True)
        assert "is pinned by templates 'cpu', 'gpu'" in caught.value.message and "--force" in caught.value.hint
        assert site.has_image(digest) and len(site.read_index()) == 2
    assert remove_image(settings, "example.org/team/app:1", site=True).untagged == ["example.org/team/app:1"]
    with pytest.raises(PolicyError):  # the pin alone keeps it now: the image would go
        remove_image(settings, f"example.org/team/app@{digest}", site=True)
    result = remove_image(settings, f"example.org/team/app@{digest}", site=True, force=True)
    assert result.removed_digest == digest and not site.has_image(digest)
