"""berth import (docker-archive, OCI layout directory and archive, plain rootfs tarball) and
berth export (docker-archive), as the unprivileged test user: round trips keep the rootfs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.harness import images, ocilayout
from tests.harness.storetest import squashfs_cat, squashfs_listing, stores  # noqa: F401
from tests.harness.users import describe

pytestmark = pytest.mark.integration


def _give(stores, path: Path) -> Path:
    """Make ``path`` (file or tree, made by root) readable by the test user."""
    if path.is_file():
        os.chmod(path, 0o644)
        return path
    for dirpath, _dirs, files in os.walk(path):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return path


def _workdir(stores) -> Path:
    path = stores.user_store.parent / "work"
    path.mkdir(exist_ok=True)
    os.chmod(path, 0o777)
    return path


def test_export_then_import_gives_the_same_rootfs(stores, busybox_image):
    pulled = stores.json("pull", "--insecure", "--json", str(busybox_image))
    archive = _workdir(stores) / "busybox.tar"
    result = stores.ok("export", str(busybox_image), str(archive))
    assert str(archive) in result.stdout
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))
        layer_digests = [
            "sha256:" + hashlib.sha256(tar.extractfile(name).read()).hexdigest() for name in manifest[0]["Layers"]]
        config = json.load(tar.extractfile(manifest[0]["Config"]))
    assert manifest[0]["RepoTags"] == [str(busybox_image)]
    assert len(manifest[0]["Layers"]) == 2 and set(manifest[0]["Layers"]) <= set(names)
    # docker load checks each uncompressed layer against the config's diff_ids
    assert layer_digests == config["rootfs"]["diff_ids"]
    assert [p.name for p in archive.parent.iterdir()] == ["busybox.tar"]  # no temporary left
    imported = stores.json("import", "--json", str(archive), "local/busybox:exported")
    assert imported["source_kind"] == "docker-archive"
    assert imported["reference"] == "docker.io/local/busybox:exported"
    assert squashfs_listing(Path(imported["squashfs"])) == squashfs_listing(Path(pulled["squashfs"]))
    inspected = stores.json("inspect", "local/busybox:exported")
    assert inspected["config"] == stores.json("inspect", str(busybox_image))["config"]


def test_import_oci_layout_directory_and_archive_keep_the_digest(stores, busybox_image):
    layout = Path(busybox_image.layout)
    from_dir = stores.json("import", "--json", str(layout), "local/fromdir:1")
    assert (from_dir["source_kind"], from_dir["digest"]) == ("oci-layout", busybox_image.digest)
    archive = _workdir(stores) / "layout.tar"
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(layout.iterdir()):
            tar.add(entry, arcname=entry.name)
    _give(stores, archive)
    from_tar = stores.json("import", "--json", str(archive), "local/fromtar:1")
    assert (from_tar["source_kind"], from_tar["digest"]) == ("oci-archive", busybox_image.digest)
    assert "bin/busybox" in squashfs_listing(Path(from_tar["squashfs"]))
    assert stores.index() == {"docker.io/local/fromdir:1": busybox_image.digest,
                              "docker.io/local/fromtar:1": busybox_image.digest}
    assert len(stores.image_dirs()) == 1  # same content, one image


def test_import_oci_layout_with_index_picks_the_platform(stores):
    layout = _workdir(stores) / "multi"
    ocilayout.write_index_layout(images.index_specs(), layout)
    _give(stores, layout)
    arm = stores.json("import", "--json", "--platform", "linux/arm64", str(layout), "local/multi:arm")
    assert squashfs_cat(Path(arm["squashfs"]), "etc/berth-marker").strip() == "arm64"
    missing = stores.berth("import", "--platform", "linux/s390x", str(layout), "local/multi:s390x")
    assert missing.returncode == 31 and "linux/arm64/v8" in missing.stderr, describe(missing)


@pytest.mark.parametrize("compress", [False, True])
def test_import_rootfs_tarball_makes_a_one_layer_image(stores, compress):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (("etc/hello.txt", b"hello from a rootfs\n"), ("bin/tool", b"#!/bin/sh\necho tool\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    plain = raw.getvalue()
    source = _workdir(stores) / ("rootfs.tar.gz" if compress else "rootfs.tar")
    source.write_bytes(gzip.compress(plain) if compress else plain)
    _give(stores, source)
    result = stores.json("import", "--json", str(source), "local/rootfs:1")
    assert result["source_kind"] == "rootfs"
    inspected = stores.json("inspect", "local/rootfs:1")
    assert len(inspected["layers"]) == 1
    assert inspected["layers"][0]["media_type"].endswith("tar+gzip" if compress else "tar")
    assert inspected["config"]["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(plain).hexdigest()]
    assert inspected["config"]["config"]["Cmd"] == ["/bin/sh"]
    assert squashfs_listing(Path(result["squashfs"])) == ["bin", "bin/tool", "etc", "etc/hello.txt"]
    assert squashfs_cat(Path(result["squashfs"]), "etc/hello.txt") == "hello from a rootfs\n"


def test_import_failures_are_clear_and_write_nothing(stores):
    work = _workdir(stores)
    missing = stores.berth("import", str(work / "nope.tar"), "local/x:1")
    assert missing.returncode == 3 and "does not exist" in missing.stderr, describe(missing)
    not_tar = work / "notes.txt"
    not_tar.write_text("just text\n" * 100)
    _give(stores, not_tar)
    bad = stores.berth("import", str(not_tar), "local/x:1")
    assert bad.returncode == 7 and "neither a directory nor a tar archive" in bad.stderr, describe(bad)
    plain_dir = work / "plain"
    plain_dir.mkdir()
    _give(stores, plain_dir)
    directory = stores.berth("import", str(plain_dir), "local/x:1")
    assert directory.returncode == 7 and "not an OCI image layout" in directory.stderr, describe(directory)
    truncated = work / "rootfs.tar.gz"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("etc/data")
        data = os.urandom(200_000)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    truncated.write_bytes(gzip.compress(raw.getvalue())[:100_000])
    _give(stores, truncated)
    cut = stores.berth("import", str(truncated), "local/x:1")
    assert cut.returncode == 7 and "cannot read the import source" in cut.stderr, describe(cut)
    secret = work / "secret.tar"
    secret.write_bytes(raw.getvalue())
    os.chmod(secret, 0o600)
    unreadable = stores.berth("import", str(secret), "local/x:1")
    assert unreadable.returncode == 7, describe(unreadable)
    assert f"cannot read the import source {secret}: Permission denied" in unreadable.stderr, describe(unreadable)
    pinned = stores.berth("import", str(not_tar), "local/x@sha256:" + "0" * 64)
    assert pinned.returncode == 2, describe(pinned)
    assert stores.index() == {} and stores.image_dirs() == [] and stores.tmp_entries() == []


def test_export_failures(stores, busybox_image):
    unknown = stores.berth("export", "local/none:1", str(_workdir(stores) / "x.tar"))
    assert unknown.returncode == 3, describe(unknown)
    stores.ok("pull", "--insecure", "-q", str(busybox_image))
    locked = stores.user_store.parent / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    refused = stores.berth("export", str(busybox_image), str(locked / "x.tar"))
    assert refused.returncode == 6, describe(refused)
    assert "cannot write" in refused.stderr and str(locked) in refused.stderr
    assert list(locked.iterdir()) == []
    shutil.rmtree(locked, ignore_errors=True)


def test_skopeo_reads_our_export_and_we_read_its_docker_archive(stores, busybox_image):
    """A second implementation of the format on both sides (skopeo's docker-archive transport)."""
    import subprocess

    pulled = stores.json("pull", "--insecure", "--json", str(busybox_image))
    work = _workdir(stores)
    ours = work / "ours.tar"
    stores.ok("export", str(busybox_image), str(ours))
    copied = subprocess.run(["skopeo", "copy", "-q", f"docker-archive:{ours}", f"oci:{work / 'from-ours'}:x"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert copied.returncode == 0, copied.stderr
    theirs = work / "theirs.tar"
    made = subprocess.run(["skopeo", "copy", "-q", f"oci:{busybox_image.layout}:latest",
                           f"docker-archive:{theirs}:skopeo/busybox:1"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert made.returncode == 0, made.stderr
    _give(stores, theirs)
    imported = stores.json("import", "--json", str(theirs), "local/from-skopeo:1")
    assert imported["source_kind"] == "docker-archive"
    assert squashfs_listing(Path(imported["squashfs"])) == squashfs_listing(Path(pulled["squashfs"]))
