"""The last step of pull and import: blobs in the store -> one SquashFS image, then the tag.

Under the image's lock: convert in a tmp/ directory (the flattener writes there), write the
JSON files, rename the directory into images/, and only then point the reference at it in
index.json — so a crash at any moment leaves either nothing or tmp/ garbage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from berth.errors import ImageError
from berth.image.api import StoredImage, load_stored
from berth.image.progress import PullProgress, notify
from berth.oci import mediatypes
from berth.oci.digest import Digest, InvalidDigest
from berth.record import Record
from berth.store.store import Store
from berth.untrusted import MAX_JSON_BYTES, parse_json


class Descriptor(Record):
    """An OCI content descriptor (the fields berth uses)."""

    media_type: str
    digest: Digest
    size_bytes: int

    def to_json(self) -> dict:
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size_bytes}


def parse_descriptor(data: object, what: str) -> Descriptor:
    """Validate one descriptor of a manifest; raises ImageError naming ``what``."""
    if not isinstance(data, dict):
        raise ImageError(f"{what}: descriptor is not an object")
    try:
        digest = Digest.parse(str(data.get("digest")))
    except InvalidDigest as exc:
        raise ImageError(f"{what}: {exc}") from None
    size = data.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}: descriptor of {digest} has no valid size")
    return Descriptor(str(data.get("mediaType") or ""), digest, size)


#: The most layers an image may have (docs/images.md). A manifest of 4 MiB could list some
#: 25,000: each a download, a store file and a pass of the flattener, from a hostile registry.
#: Docker and podman stop building at 127 (overlay's stacking limit); berth flattens, so it
#: allows more (images built by other tools, nix's layered ones), but not without bound.
MAX_LAYERS = 500


def parse_image_manifest(data: bytes, what: str) -> tuple[dict, Descriptor, list[Descriptor]]:
    """(manifest JSON, config descriptor, layer descriptors) of an image manifest.

    Raises ImageError for anything but a well-formed OCI or Docker schema 2 image manifest, and
    for one of more than MAX_LAYERS layers.
    """
    manifest = parse_json(data, what=f"image content refused: the manifest of {what}", error=ImageError)
    if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
        raise ImageError(
            f"the manifest of {what} is not an OCI or Docker schema 2 image manifest",
            hint="Docker schema 1 images are deprecated and not supported: re-push the image "
            "with a current tool (e.g. `skopeo copy`)",
        )
    config = parse_descriptor(manifest.get("config"), f"the manifest of {what}, config")
    if config.size_bytes > MAX_JSON_BYTES:
        # A config is read into memory: refuse a huge one before fetching it.
        raise ImageError(f"the manifest of {what}, config: descriptor of {config.digest} announces "
                         f"{config.size_bytes} bytes, more than the {MAX_JSON_BYTES} bytes berth accepts "
                         "for an image config")
    layers_json = manifest.get("layers")
    if not isinstance(layers_json, list):
        raise ImageError(f"the manifest of {what} has no 'layers' list")
    if len(layers_json) > MAX_LAYERS:
        raise ImageError(f"image content refused: the manifest of {what} lists {len(layers_json)} layers, "
                         f"more than the {MAX_LAYERS} berth accepts")
    layers = [parse_descriptor(item, f"the manifest of {what}, layer {n}")
              for n, item in enumerate(layers_json, 1)]
    for layer in layers:
        if layer.media_type and layer.media_type not in mediatypes.LAYER_COMPRESSION:
            raise ImageError(f"{what}: layer {layer.digest} has unsupported media type {layer.media_type}",
                             hint="berth understands OCI and Docker tar layers (plain, gzip, zstd)")
    return manifest, config, layers


def install_image(
    store: Store,
    digest: Digest,
    *,
    manifest_bytes: bytes,
    config_bytes: bytes | Callable[[], bytes],
    layers: Sequence[Descriptor],
    reference_key: str | None,
    compression: str,
    meta: dict,
    progress: PullProgress | None = None,
    wait_for_layer: Callable[[Digest], None] | None = None,
    follow_layer: Callable | None = None,
    before_publish: Callable[[], None] | None = None,
) -> tuple[StoredImage, bool]:
    """Convert (unless present) and tag an image whose blobs are all in ``store``, or will
    be: ``wait_for_layer(digest)`` returns once that layer blob is verified and stored (or
    raises why it never will be); the flattener calls it before opening each layer, and
    every layer is waited for before the image is published. ``follow_layer(digest)``, when
    given, lets the flattener read a layer while it downloads (flatten.Layer.follow).
    ``config_bytes`` may be a function that returns them (a pull downloads the config beside
    the layers): it is called, and may raise, after the conversion and before anything is
    stored for publishing. ``before_publish`` runs just before publishing (the pull stores
    the manifest blob there).

    Returns (image, converted). The caller holds ``store.writing()``. Raises ImageError
    (layers the flattener refuses), StoreError (disk full...), PermissionDenied, and whatever
    ``wait_for_layer`` raises.
    """
    from berth.image.flatten import Layer, build_squashfs

    converted = False
    with store.image_lock(digest):
        if not store.has_image(digest):
            notify(progress, "phase", "converting to squashfs")
            started = time.monotonic()
            with store.image_workdir(digest) as workdir:
                output = workdir / store.layout.image_squashfs(digest).name
                flatten_layers = [Layer(path=store.blob_path(d.digest), media_type=d.media_type,
                                        digest=d.digest, wait_until_stored=wait_for_layer,
                                        follow=follow_layer)
                                  for d in layers]
                report = build_squashfs(flatten_layers, output, compression=compression, tmp_dir=workdir)
                if wait_for_layer is not None:
                    for layer in layers:  # the rule holds whatever the flattener opened
                        wait_for_layer(layer.digest)
                if callable(config_bytes):
                    config_bytes = config_bytes()
                if before_publish is not None:
                    before_publish()
                full_meta = dict(meta)
                full_meta.update({
                    "digest": str(digest),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "compression": compression,
                    "squashfs_bytes": output.stat().st_size,
                    "layers": [d.to_json() for d in layers],
                    "convert_s": round(time.monotonic() - started, 3),
                    "flatten": {"entries": report.entries, "content_bytes": report.content_bytes,
                                "notes": list(report.notes), "notes_omitted": report.notes_omitted},
                })
                store.publish_image(workdir, digest, manifest_bytes=manifest_bytes,
                                    config_bytes=config_bytes, meta=full_meta)
            converted = True
        if reference_key:
            # Still under the image lock, so an rmi cannot remove the image in between.
            store.set_reference(reference_key, digest)
    return load_stored(store, digest, reference_key), converted
