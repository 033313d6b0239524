"""A registry that serves malformed documents: the error names the document, the hint who acts."""

from __future__ import annotations

import pytest

from berth.config.settings import Settings
from berth.errors import DigestMismatch, ImageError
from berth.image import pull
from berth.oci import mediatypes
from berth.oci.digest import Digest
from berth.registry.client import Manifest

HINT = ("the registry serves a malformed image for example.org/team/app:1: tell the registry's "
        "administrator or the image's maintainer")


class OneManifestClient:
    """Answers every manifest request with ``manifests[version]`` (or the tag's)."""

    def __init__(self, manifests: dict[str, Manifest]) -> None:
        self.manifests = manifests
        self.closed = False

    def get_manifest(self, repository: str, version: str) -> Manifest:
        return self.manifests[version]

    def close(self) -> None:
        self.closed = True


def _manifest(data: bytes, media_type: str) -> Manifest:
    return Manifest(data=data, media_type=media_type, digest=Digest.of(data))


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(user_store=tmp_path / "store", site_store=tmp_path / "site")


def _pull_with(monkeypatch, settings, client):
    monkeypatch.setattr(pull, "make_client", lambda *_args, **_kwargs: client)
    return pull.pull_image(settings, "example.org/team/app:1")


def test_an_index_that_is_not_json_names_it_and_says_who_acts(monkeypatch, settings):
    client = OneManifestClient({"1": _manifest(b'{"manifests": [', mediatypes.OCI_INDEX)})
    with pytest.raises(ImageError) as caught:
        _pull_with(monkeypatch, settings, client)
    assert caught.value.message.startswith(
        "image content refused: the image index of example.org/team/app:1 is not valid JSON: ")
    assert caught.value.hint == HINT
    assert client.closed


@pytest.mark.parametrize("document", [b"[1, 2]", b'"index"', b"null"])
def test_an_index_that_is_no_json_object_is_refused_not_a_traceback(monkeypatch, settings, document):
    """A registry answers with an index's Content-Type and a JSON array: the client keeps the
    declared type without parsing, and select_platform's index.get raised AttributeError."""
    client = OneManifestClient({"1": _manifest(document, mediatypes.OCI_INDEX)})
    with pytest.raises(ImageError) as caught:
        _pull_with(monkeypatch, settings, client)
    assert caught.value.message == "the image index of example.org/team/app:1 has no 'manifests' list"
    assert caught.value.hint == HINT


def test_a_platform_manifest_under_another_digest_says_who_acts(monkeypatch, settings):
    served = _manifest(b'{"schemaVersion": 2, "layers": []}', mediatypes.OCI_MANIFEST)
    claimed = Digest.of(b"something else")
    index = ('{"manifests": [{"mediaType": "%s", "digest": "%s", "size": 3, '
             '"platform": {"os": "linux", "architecture": "amd64"}}]}' % (mediatypes.OCI_MANIFEST, claimed))
    client = OneManifestClient({"1": _manifest(index.encode(), mediatypes.OCI_INDEX), str(claimed): served})
    monkeypatch.setattr(pull, "default_platform", lambda: pull.parse_platform("linux/amd64"))
    with pytest.raises(DigestMismatch) as caught:
        _pull_with(monkeypatch, settings, client)
    assert caught.value.message == f"manifest {claimed} of example.org/team/app:1 arrived as {served.digest}"
    assert caught.value.hint == HINT


def test_an_error_with_its_own_hint_keeps_it(monkeypatch, settings):
    client = OneManifestClient({"1": _manifest(b"{}", "application/x-unknown")})
    with pytest.raises(ImageError) as caught:
        _pull_with(monkeypatch, settings, client)
    assert caught.value.hint == "berth pulls OCI and Docker schema 2 images and indexes"


def test_an_image_config_of_gigabytes_is_refused_before_anything_is_fetched(monkeypatch, settings):
    """The config is read into memory once stored: a manifest announcing an 8 GiB config made
    berth download it to the store, then read it all into memory."""
    config = Digest.of(b"huge")
    data = ('{"schemaVersion": 2, "mediaType": "%s", "config": {"mediaType": "%s", "digest": "%s", '
            '"size": %d}, "layers": []}' % (mediatypes.OCI_MANIFEST, mediatypes.OCI_CONFIG, config, 8 << 30))
    client = OneManifestClient({"1": _manifest(data.encode(), mediatypes.OCI_MANIFEST)})
    with pytest.raises(ImageError) as caught:
        _pull_with(monkeypatch, settings, client)
    assert caught.value.message == (f"the manifest of example.org/team/app:1, config: descriptor of {config} "
                                    f"announces {8 << 30} bytes, more than the 16777216 bytes berth accepts "
                                    "for an image config")
    assert caught.value.hint == HINT


def test_a_manifest_of_too_many_layers_is_refused_before_any_download(monkeypatch, settings):
    """A manifest could list as many layers as fit in 4 MiB (some 25,000): every one a
    download, a store file and a pass of the converter, from a hostile registry. Past
    MAX_LAYERS the pull stops, naming the image and the limit, before downloading anything."""
    import json

    from berth.image.install import MAX_LAYERS

    def manifest(count: int) -> Manifest:
        layer = {"mediaType": mediatypes.OCI_LAYER_GZIP, "size": 1, "digest": str(Digest.of(b"x"))}
        config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2, "digest": str(Digest.of(b"{}"))}
        data = json.dumps({"schemaVersion": 2, "config": config, "layers": [layer] * count}).encode()
        return _manifest(data, mediatypes.OCI_MANIFEST)

    monkeypatch.setattr(pull, "_download_all", lambda *args, **kwargs: pytest.fail("downloaded"))
    monkeypatch.setattr(pull, "_Downloads", lambda *args, **kwargs: pytest.fail("downloaded"))
    client = OneManifestClient({"1": manifest(MAX_LAYERS + 1)})
    with pytest.raises(ImageError) as caught:
        _pull_with(monkeypatch, settings, client)
    assert caught.value.message == (f"image content refused: the manifest of example.org/team/app:1 lists "
                                    f"{MAX_LAYERS + 1} layers, more than the {MAX_LAYERS} berth accepts")
    assert caught.value.hint == HINT
    client.manifests["1"] = manifest(MAX_LAYERS)
    with pytest.raises(pytest.fail.Exception, match="downloaded"):  # the limit itself passes
        _pull_with(monkeypatch, settings, client)


def test_layers_declared_larger_than_the_free_space_are_refused_before_any_download(monkeypatch, settings):
    """A download reads at most the size a layer's descriptor declares, but a registry declares
    what it likes: one declaring a layer of an exabyte filled the store's file system, then
    failed (review). The sum of what is still to download is compared with the free space
    first; the error names the image, the sizes, the store and who acts."""
    import json
    import os

    from berth.errors import StoreError

    def manifest(size: int) -> Manifest:
        layer = {"mediaType": mediatypes.OCI_LAYER_GZIP, "size": size, "digest": str(Digest.of(b"x"))}
        config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2, "digest": str(Digest.of(b"{}"))}
        data = json.dumps({"schemaVersion": 2, "config": config, "layers": [layer]}).encode()
        return _manifest(data, mediatypes.OCI_MANIFEST)

    monkeypatch.setattr(pull, "_download_all", lambda *args, **kwargs: pytest.fail("downloaded"))
    monkeypatch.setattr(pull, "_Downloads", lambda *args, **kwargs: pytest.fail("downloaded"))
    client = OneManifestClient({"1": manifest(1 << 60)})
    with pytest.raises(StoreError) as caught:
        _pull_with(monkeypatch, settings, client)
    store = settings.user_store
    assert caught.value.message.startswith(
        f"no room to pull example.org/team/app:1 into the user store {store}: it needs 2097152.0 TiB, ")  # downloads and image
    assert caught.value.message.endswith(
        " free: the registry declares its 2 blob(s) still to download as 1048576.0 TiB (the largest 1048576.0 TiB), "
        "and the image's SquashFS is estimated at 1048576.0 TiB (from its layers' declared sizes)")
    assert caught.value.hint.startswith(f"free space on the file system of {store} (`berth prune` removes")
    assert caught.value.hint.endswith("tell the registry's administrator or the image's maintainer")
    fs = os.statvfs(settings.user_store.parent)
    client.manifests["1"] = manifest(fs.f_bavail * fs.f_frsize // 3)  # what fits passes (layer and image)
    with pytest.raises(pytest.fail.Exception, match="downloaded"):
        _pull_with(monkeypatch, settings, client)


def test_downloads_that_fit_are_refused_when_the_squashfs_does_not_fit_beside_them(monkeypatch, settings):
    """A pull also writes the image's SquashFS into the store's file system: it counts, as
    squashfs.estimate_bytes has it from the layers' declared sizes (berth's lz4: their sum),
    and the message says both parts. It counted nothing before: the pull downloaded every
    layer, then failed in tar2sqfs with the disk full."""
    import json
    import os

    from berth.errors import StoreError
    from berth.store.store import Store

    fs = os.statvfs(settings.user_store.parent)
    free = fs.f_bavail * fs.f_frsize
    layer = {"mediaType": mediatypes.OCI_LAYER_GZIP, "size": free * 2 // 3, "digest": str(Digest.of(b"x"))}
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2, "digest": str(Digest.of(b"{}"))}
    data = json.dumps({"schemaVersion": 2, "config": config, "layers": [layer]}).encode()
    monkeypatch.setattr(pull, "_download_all", lambda *args, **kwargs: pytest.fail("downloaded"))
    monkeypatch.setattr(pull, "_Downloads", lambda *args, **kwargs: pytest.fail("downloaded"))
    client = OneManifestClient({"1": _manifest(data, mediatypes.OCI_MANIFEST)})
    with pytest.raises(StoreError) as caught:
        _pull_with(monkeypatch, settings, client)
    from berth.config.units import human_size

    assert caught.value.message.startswith(
        f"no room to pull example.org/team/app:1 into the user store {settings.user_store}: it needs ")
    assert caught.value.message.endswith(
        f"the registry declares its 2 blob(s) still to download as {human_size(free * 2 // 3 + 2)} (the largest "
        f"{human_size(free * 2 // 3)}), and the image's SquashFS is estimated at {human_size(free * 2 // 3)} "
        "(from its layers' declared sizes)")
    # An image whose SquashFS is stored already needs no room for it: only the downloads count.
    monkeypatch.setattr(Store, "has_image", lambda self, digest: True)
    monkeypatch.setattr(Store, "name_image", lambda self, reference, digest: False)  # still to name
    with pytest.raises(pytest.fail.Exception, match="downloaded"):
        _pull_with(monkeypatch, settings, client)
