"""Layer compressions through the real registry: zstd layers (OCI and the Docker schema 2 type
containerd writes), images mixing gzip and zstd layers, and a zstd image made by skopeo; each
pulled and run as the unprivileged test user (issue 10, target 4)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.ocilayout import (
    MEDIA_DOCKER_LAYER_GZIP, MEDIA_DOCKER_LAYER_ZSTD, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_ZSTD, File, Layer,
)
from tests.harness.users import describe

pytestmark = pytest.mark.integration

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


def _zstd_spec(marker: str) -> images.ImageSpec:
    return dataclasses.replace(images.busybox_spec(marker=marker), compression="zstd")


def _mixed_spec(marker: str) -> images.ImageSpec:
    """busybox with its /bin layer gzip, its /etc layer zstd, and a third gzip layer on top."""
    base = images.busybox_spec(marker=marker)
    bottom, etc = base.layers
    top = Layer((File("opt/mixed.txt", "from a gzip layer above a zstd one\n"),), compression="gzip")
    return dataclasses.replace(base, layers=(bottom, dataclasses.replace(etc, compression="zstd"), top))


def _manifest_layers(registry, name: str, tag: str) -> list[dict]:
    body, _media_type, _digest = images.fetch_manifest(registry, name, tag)
    return json.loads(body)["layers"]


def _blob_head(image: images.PushedImage, digest: str) -> bytes:
    return Path(image.layout, "blobs", "sha256", digest.split(":")[1]).read_bytes()[:4]


def _pull_and_run(runtime_env, ref: str, *command: str) -> str:
    pulled = runtime_env.berth("pull", "--insecure", "--json", ref)
    assert pulled.returncode == 0, describe(pulled)
    assert json.loads(pulled.stdout)["converted"] is True
    ran = runtime_env.berth("run", ref, *command)
    assert ran.returncode == 0, describe(ran)
    return ran.stdout


@pytest.mark.parametrize("fmt, media", [("oci", MEDIA_OCI_LAYER_ZSTD), ("v2s2", MEDIA_DOCKER_LAYER_ZSTD)])
def test_zstd_image_pulls_and_runs(runtime_env, registry, fmt, media):
    image = images.push_pushed_image(registry, f"test/zstd-{fmt}", "1", _zstd_spec(f"zstd {fmt}"), fmt)
    layers = _manifest_layers(registry, image.name, image.tag)
    assert [layer["mediaType"] for layer in layers] == [media, media]
    assert {_blob_head(image, layer["digest"]) for layer in layers} == {ZSTD_MAGIC}
    out = _pull_and_run(runtime_env, image, "sh", "-c", "cat /etc/berth-marker; id -u; busybox --help | head -1")
    lines = out.splitlines()
    assert lines[0] == f"zstd {fmt}"
    assert lines[1] == str(runtime_env.user.uid)
    assert lines[2].startswith("BusyBox")


@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_image_mixing_gzip_and_zstd_layers_pulls_and_runs(runtime_env, registry, fmt):
    image = images.push_pushed_image(registry, f"test/mixed-{fmt}", "1", _mixed_spec(f"mixed {fmt}"), fmt)
    layers = _manifest_layers(registry, image.name, image.tag)
    gzip_type, zstd_type = {"oci": (MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_ZSTD),
                            "v2s2": (MEDIA_DOCKER_LAYER_GZIP, MEDIA_DOCKER_LAYER_ZSTD)}[fmt]
    assert [layer["mediaType"] for layer in layers] == [gzip_type, zstd_type, gzip_type]
    assert [_blob_head(image, layer["digest"])[:2] for layer in layers] == [GZIP_MAGIC, ZSTD_MAGIC[:2], GZIP_MAGIC]
    out = _pull_and_run(runtime_env, image, "sh", "-c", "cat /etc/berth-marker /opt/mixed.txt; ls /bin/busybox")
    assert out.splitlines() == [f"mixed {fmt}", "from a gzip layer above a zstd one", "/bin/busybox"]


def test_zstd_image_recompressed_by_skopeo_pulls_and_runs(runtime_env, registry):
    # Another implementation's zstd layers (containers/image, with its own frame layout).
    built = images.build_image(images.busybox_spec(marker="skopeo zstd"))
    images.skopeo_push(registry, "test/skopeo-zstd", "1", built.layout, compress_format="zstd")
    layers = _manifest_layers(registry, "test/skopeo-zstd", "1")
    assert [layer["mediaType"] for layer in layers] == [MEDIA_OCI_LAYER_ZSTD] * 2
    out = _pull_and_run(runtime_env, f"{registry.host}/test/skopeo-zstd:1", "cat", "/etc/berth-marker")
    assert out == "skopeo zstd\n"


def test_a_layer_asking_for_gigabytes_of_decompression_memory_is_refused_on_pull(runtime_env, registry, tmp_path):
    """A hostile registry (here the real one, serving what was pushed) hands out a layer typed
    gzip that is xz declaring a 1.5 GiB dictionary: a 200-byte blob that made `xz -dc` hold up to
    that much memory. The pull, as the unprivileged user, is refused as image content (exit 7)
    with a message that says who must act, and nothing is published."""
    import io
    import subprocess
    import tarfile

    from berth.oci import mediatypes
    from berth.oci.digest import Digest
    from berth.registry.client import RegistryClient

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"bomb\n"))
    layer = subprocess.run(["xz", "-c", "--lzma2=preset=0,dict=1536MiB"], input=archive.getvalue(),
                           capture_output=True, check=True).stdout
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}).encode()
    with RegistryClient(registry.host, insecure=True) as client:
        for blob in (config, layer):
            client.upload_blob("test/xz-bomb", Digest.of(blob), len(blob), io.BytesIO(blob))
        manifest = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
                               "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": str(Digest.of(config)),
                                          "size": len(config)},
                               "layers": [{"mediaType": MEDIA_OCI_LAYER_GZIP, "digest": str(Digest.of(layer)),
                                           "size": len(layer)}]}).encode()
        client.put_manifest("test/xz-bomb", "1", manifest, mediatypes.OCI_MANIFEST)
    pulled = runtime_env.berth("pull", "--insecure", f"{registry.host}/test/xz-bomb:1")
    assert pulled.returncode == 7, describe(pulled)
    assert "Memory usage limit reached" in pulled.stderr, describe(pulled)
    assert "the layer asks for more memory to decompress than berth allows" in pulled.stderr, describe(pulled)
    assert runtime_env.berth("images", "--json").stdout.count("xz-bomb") == 0
