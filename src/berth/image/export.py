"""``berth export``: a stored image as a docker-archive, the format of ``docker save`` and
``docker load`` (manifest.json, ``<config hex>.json``, ``<layer>/layer.tar`` uncompressed).

The archive is written to a temporary file next to FILE and renamed into place at the end, so
a failure or a crash never leaves a truncated archive under FILE's name.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from berth import fsutil
from berth.errors import ImageError, StoreError
from berth.image.api import store_for
from berth.image.manage import require_image
from berth.image.tarstream import open_decompressed, sniff_compression
from berth.oci.digest import Digest
from berth.store.store import SITE

if TYPE_CHECKING:
    from berth.config.settings import Settings

_CHUNK_BYTES = 1 << 20


def export_image(settings: "Settings", ref: str, file: str) -> int:
    """Write stored image ``ref`` to ``file`` as a docker-archive; returns its size in bytes.

    Raises NotFound, StoreError (missing blob, cannot write FILE), ImageError (a layer
    compression docker-archive cannot hold).
    """
    image = require_image(settings, ref)
    store = store_for(settings, site=image.store == SITE)
    output = Path(file)
    config_digest = Digest.parse(image.manifest["config"]["digest"])
    repo_tags = [image.reference] if image.reference and "@" not in image.reference else []
    # Replaced atomically; created as any file the user writes (mode from the umask).
    with _output_errors(output), fsutil.atomic_writer(output, mode=None) as raw, \
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        config_name = f"{config_digest.hex}.json"
        _add_bytes(archive, config_name, store.read_blob(config_digest))
        layer_names = []
        for descriptor in image.manifest.get("layers") or []:
            digest = Digest.parse(descriptor["digest"])
            name = f"{digest.hex}/layer.tar"
            _add_layer(archive, name, store.blob_path(digest), output.parent)
            layer_names.append(name)
        manifest = [{"Config": config_name, "RepoTags": repo_tags, "Layers": layer_names}]
        _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
    return output.stat().st_size


class _output_errors:  # noqa: N801 - used as a context manager like a function
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, OSError):
            raise StoreError(f"cannot write {self.path}: {exc.strerror or exc}",
                             hint="export to a directory you can write that has room for the image") from None
        return False


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def _add_layer(archive: tarfile.TarFile, name: str, blob: Path, scratch_dir: Path) -> None:
    """Add a layer uncompressed (docker save's form); gzip is inflated through a scratch file
    because a tar header needs the size first. The compression is read from the magic bytes,
    as the flattener does (media types lie)."""
    if not blob.is_file():
        raise StoreError(f"layer blob {blob} is missing from the store",
                         hint="pull the image again to restore its blobs")
    with open(blob, "rb") as handle:
        compression = sniff_compression(handle.read(8))
    if compression is None:
        with open(blob, "rb") as handle:
            info = archive.gettarinfo(fileobj=handle, arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            archive.addfile(info, handle)
        return
    if compression != "gzip":
        raise ImageError(f"layer {blob.name} is {compression}-compressed; docker-archive layers must be "
                         "plain or gzip tars", hint="export is limited to gzip and uncompressed layers")
    scratch = scratch_dir / f".berth-export-{secrets.token_hex(4)}.tar"
    try:
        # The flattener's decompression (pigz/igzip when installed, multi-member gzip, an
        # ImageError with the decompressor's words for a corrupt blob).
        with _output_errors(scratch), open(scratch, "wb") as out, \
                open_decompressed(blob, f"layer {blob.name} in the store") as stream:
            while chunk := stream.read(_CHUNK_BYTES):
                out.write(chunk)
        with open(scratch, "rb") as handle:
            info = tarfile.TarInfo(name)
            info.size = scratch.stat().st_size
            info.mtime = int(time.time())
            info.mode = 0o644
            archive.addfile(info, handle)
    finally:
        if scratch.exists():
            scratch.unlink()
