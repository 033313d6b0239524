"""``berth import``: images from files instead of a registry.

Sources, recognised by content (not by file name):
- an OCI image layout directory (``oci-layout`` + ``index.json`` + ``blobs/``), or a tar of one;
- a ``docker save`` archive (``manifest.json`` listing Config and Layers; recent docker saves
  also contain an OCI layout, which is then preferred);
- anything else that is a tar (plain, gzip, xz, bzip2): a root filesystem, which becomes
  a one-layer image with a generated config.

Every blob goes through the store's verify-then-rename path (digests of OCI layouts are
checked, docker-archive and rootfs content is hashed), so an import is as safe as a pull.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from berth.errors import DigestMismatch, ImageError, NotFound, UsageError
from berth.image.api import StoredImage, index_key, parse_reference, store_for
from berth.image.install import Descriptor, install_image, parse_descriptor, parse_image_manifest
from berth.image.progress import PullProgress, notify
from berth.image.platforms import default_platform, parse_platform
from berth.image.pull import select_platform
from berth.image.tarstream import sniff_compression
from berth.oci import mediatypes
from berth.oci.digest import Digest, new_hasher
from berth.store.store import Store
from berth.untrusted import parse_json

if TYPE_CHECKING:
    from berth.config.settings import Settings

_CHUNK_BYTES = 1 << 20
_MAX_JSON_BYTES = 16 << 20
_REF_NAME = "org.opencontainers.image.ref.name"


def import_image(settings: "Settings", source: str, name: str, *, site: bool = False,
                 platform: str | None = None,
                 progress: PullProgress | None = None) -> tuple[StoredImage, str]:
    """Import ``source`` as ``name`` into the user (or site) store.

    Returns (image, kind) where kind is "oci-layout", "oci-archive", "docker-archive" or
    "rootfs". Raises NotFound (no such source), UsageError (name with a digest), ImageError
    (malformed archive), DigestMismatch, StoreError, PermissionDenied.
    """
    reference = parse_reference(name)
    if reference.digest is not None:
        raise UsageError(f"import name '{name}' has a digest; give NAME[:TAG]",
                         hint="the digest of an imported image is computed from its content")
    wanted = parse_platform(platform) if platform else default_platform()
    path = Path(source)
    if not path.exists():
        raise NotFound(f"import source {source} does not exist")
    store = store_for(settings, site=site)
    key = index_key(reference)
    try:
        return _import_from(store, settings, path, source, reference, key, wanted, progress)
    except (ImageError, DigestMismatch) as error:
        # The readers below name the entry that is wrong (index.json, a blob, a layer); the
        # file it is in, and who must act, are said once here.
        if error.hint is None:
            error.hint = (f"the import source {source} is malformed or incomplete: "
                          "whoever produced it must export or save the image again")
        raise
    except (OSError, EOFError, tarfile.TarError, zlib.error) as exc:
        # Reading the source failed (store errors are BerthErrors already, not caught here).
        raise ImageError(f"cannot read the import source {source}: {getattr(exc, 'strerror', None) or exc}",
                         hint="check that the file is complete and readable by you") from None


def _import_from(store: Store, settings, path: Path, source: str, reference, key: str, wanted,
                 progress) -> tuple[StoredImage, str]:
    with store.writing():
        if path.is_dir():
            if not (path / "oci-layout").is_file():
                raise ImageError(f"{source} is a directory but not an OCI image layout (no oci-layout file)",
                                 hint="give an OCI layout directory, a docker-archive or a rootfs tarball")
            source_files = _DirectorySource(path)
            return _import_oci(store, settings, source_files, reference, key, wanted, progress), "oci-layout"
        try:
            archive = tarfile.open(path, "r:*")
        except tarfile.TarError as exc:
            raise ImageError(f"{source} is neither a directory nor a tar archive: {exc}",
                             hint="give an OCI layout, a docker-archive or a rootfs tarball") from None
        with archive:
            names = {m.name.removeprefix("./"): m for m in archive.getmembers()}
            if "oci-layout" in names and "index.json" in names:
                files = _TarSource(archive, names)
                return _import_oci(store, settings, files, reference, key, wanted, progress), "oci-archive"
            if "manifest.json" in names and _docker_manifest(archive, names) is not None:
                files = _TarSource(archive, names)
                return _import_docker(store, settings, files, reference, key, progress), "docker-archive"
        return _import_rootfs(store, settings, path, reference, key, wanted, progress), "rootfs"


class _DirectorySource:
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        target = (self.root / name).resolve()
        if not str(target).startswith(str(self.root.resolve()) + os.sep):
            raise ImageError(f"{name} points outside the OCI layout {self.root}")
        try:
            handle = open(target, "rb")
        except FileNotFoundError:
            raise ImageError(f"the OCI layout {self.root} lacks {name}") from None
        with handle:
            yield handle


class _TarSource:
    def __init__(self, archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> None:
        self.archive = archive
        self.members = members

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        member = self.members.get(name.removeprefix("./"))
        if member is None or not member.isfile():
            raise ImageError(f"the archive lacks the file {name}")
        handle = self.archive.extractfile(member)
        if handle is None:
            raise ImageError(f"the archive entry {name} is not a regular file")
        with handle:
            yield handle


def _read_json(files, name: str):
    with files.open(name) as handle:
        data = handle.read(_MAX_JSON_BYTES + 1)
    if len(data) > _MAX_JSON_BYTES:
        raise ImageError(f"{name} is larger than {_MAX_JSON_BYTES} bytes")
    return parse_json(data, what=name, error=ImageError, max_bytes=_MAX_JSON_BYTES), data


def _blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _import_oci(store: Store, settings, files, reference, key: str, wanted,
                progress) -> StoredImage:
    index, _raw = _read_json(files, "index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ImageError("the OCI layout's index.json lists no manifests")
    chosen = _choose_layout_entry(entries, reference.tag)
    descriptor = parse_descriptor(chosen, "the OCI layout's index.json")
    manifest_bytes = _load_small_blob(store, files, descriptor)
    if descriptor.media_type in mediatypes.INDEXES:
        nested = parse_json(manifest_bytes, what="the OCI layout's image index", error=ImageError)
        descriptor = select_platform(nested, wanted, "the OCI layout's image index")
        manifest_bytes = _load_small_blob(store, files, descriptor)
    return _install_from(store, settings, files, manifest_bytes, descriptor.digest, key,
                         f"import of {reference}", progress, source_kind="oci")


def _choose_layout_entry(entries: list, tag: str | None) -> dict:
    if len(entries) == 1:
        return entries[0]
    names = [((e.get("annotations") or {}).get(_REF_NAME), e) for e in entries if isinstance(e, dict)]
    for ref_name, entry in names:
        if ref_name and tag and ref_name == tag:
            return entry
    tags = [str(n) for n, _ in names if n]
    raise ImageError(
        f"the OCI layout holds {len(entries)} images; name the one to import by its tag",
        hint="its tags: " + ", ".join(tags) + " (give NAME:TAG with one of them)" if tags else
        f"its index.json tags none of them ({_REF_NAME}): whoever produced it must export "
        "one image per layout, or tag them",
    )


def _load_small_blob(store: Store, files, descriptor: Descriptor) -> bytes:
    if descriptor.size_bytes > _MAX_JSON_BYTES:
        raise ImageError(f"manifest {descriptor.digest} is larger than {_MAX_JSON_BYTES} bytes")
    with files.open(_blob_name(descriptor.digest)) as handle:
        data = handle.read(descriptor.size_bytes + 1)
    if len(data) != descriptor.size_bytes or Digest.of(data, descriptor.digest.algorithm) != descriptor.digest:
        raise DigestMismatch(f"blob {descriptor.digest} of the import source does not match its descriptor")
    store.put_blob_bytes(descriptor.digest, data)
    return data


def _install_from(store: Store, settings, files, manifest_bytes: bytes, manifest_digest: Digest,
                  key: str, what: str, progress, *, source_kind: str) -> StoredImage:
    _manifest, config, layers = parse_image_manifest(manifest_bytes, what)
    total = sum(d.size_bytes for d in [config, *layers])
    notify(progress, "resolved", key, manifest_digest, len(layers), total)
    for descriptor in [config, *layers]:
        if store.has_blob(descriptor.digest):
            notify(progress, "blob_done", descriptor.digest, descriptor.size_bytes, True)
            continue
        with files.open(_blob_name(descriptor.digest)) as handle:
            store.add_blob_file(handle, digest=descriptor.digest, size_bytes=descriptor.size_bytes)
        notify(progress, "blob_done", descriptor.digest, descriptor.size_bytes, False)
    store.put_blob_bytes(manifest_digest, manifest_bytes)
    config_bytes = store.read_blob(config.digest)
    image, _converted = install_image(
        store, manifest_digest, manifest_bytes=manifest_bytes, config_bytes=config_bytes,
        layers=layers, reference_key=key, compression=settings.squashfs_compression,
        meta={"source": what, "repository": key, "index_digest": None, "platform": None,
              "media_type": parse_json(manifest_bytes, what=f"the manifest of {what}", error=ImageError)
              .get("mediaType") or mediatypes.OCI_MANIFEST,
              "imported_from": source_kind},
        progress=progress,
    )
    return image


def _docker_manifest(archive: tarfile.TarFile, names: dict) -> list | None:
    handle = archive.extractfile(names["manifest.json"])
    if handle is None:
        return None
    try:
        data = parse_json(handle.read(_MAX_JSON_BYTES + 1), what="manifest.json", max_bytes=_MAX_JSON_BYTES)
    except ValueError:
        return None
    if isinstance(data, list) and data and all(isinstance(e, dict) and "Config" in e for e in data):
        return data
    return None


def _import_docker(store: Store, settings, files: _TarSource, reference, key: str,
                   progress) -> StoredImage:
    entries = _docker_manifest(files.archive, files.members) or []
    entry = entries[0]
    if len(entries) > 1:
        wanted = {str(reference), reference.familiar()}
        matching = [e for e in entries if wanted & set(e.get("RepoTags") or [])]
        if len(matching) != 1:
            tags = [t for e in entries for t in (e.get("RepoTags") or [])]
            raise ImageError(f"the docker archive holds {len(entries)} images; name the one to import",
                             hint="its tags: " + ", ".join(tags))
        entry = matching[0]
    layer_names = entry.get("Layers")
    if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
        raise ImageError("the docker archive's manifest.json has no Layers list")
    with files.open(str(entry["Config"])) as handle:
        config_digest, config_size = store.add_blob_file(handle)
    layers: list[Descriptor] = []
    for name in layer_names:
        with files.open(name) as handle:
            head = handle.read(8)
        compression = sniff_compression(head)
        media_type = {None: mediatypes.OCI_LAYER, "gzip": mediatypes.OCI_LAYER_GZIP,
                      "zstd": mediatypes.OCI_LAYER_ZSTD}.get(compression)
        if media_type is None:
            raise ImageError(f"layer {name} of the docker archive is {compression}-compressed, "
                             "which OCI layers cannot be")
        with files.open(name) as handle:
            digest, size = store.add_blob_file(handle)
        layers.append(Descriptor(media_type, digest, size))
    config = Descriptor(mediatypes.OCI_CONFIG, config_digest, config_size)
    manifest_bytes = _manifest_bytes(config, layers)
    return _install_from(store, settings, _StoreSource(store), manifest_bytes, Digest.of(manifest_bytes),
                         key, f"import of {reference}", progress, source_kind="docker-archive")


class _StoreSource:
    """Blobs already copied into the store, served under their layout names."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        _blobs, algorithm, hex_part = name.split("/")
        with open(self.store.blob_path(Digest(algorithm, hex_part)), "rb") as handle:
            yield handle


def _manifest_bytes(config: Descriptor, layers: list[Descriptor]) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()


def _import_rootfs(store: Store, settings, path: Path, reference, key: str, wanted,
                   progress) -> StoredImage:
    """A plain root filesystem tarball -> one layer (kept compressed when gzip or zstd,
    decompressed otherwise) + a generated config with the uncompressed digest as diff_id."""
    with open(path, "rb") as handle:
        compression = sniff_compression(handle.read(8))
    if compression in (None, "gzip", "zstd"):
        with open(path, "rb") as handle:
            layer_digest, layer_size = store.add_blob_file(handle)
        media_type = {None: mediatypes.OCI_LAYER, "gzip": mediatypes.OCI_LAYER_GZIP,
                      "zstd": mediatypes.OCI_LAYER_ZSTD}[compression]
        diff_id = layer_digest if compression is None else _uncompressed_digest(path, compression)
    else:
        with _decompressed(path, compression) as stream:
            layer_digest, layer_size = store.add_blob_file(stream)
        media_type = mediatypes.OCI_LAYER
        diff_id = layer_digest
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = {
        "created": now,
        "architecture": wanted.architecture,
        "os": wanted.os,
        **({"variant": wanted.variant} if wanted.variant else {}),
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [str(diff_id)]},
        "history": [{"created": now, "created_by": f"berth import {path.name}"}],
    }
    config_bytes = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    config_digest = Digest.of(config_bytes)
    store.put_blob_bytes(config_digest, config_bytes)
    manifest_bytes = _manifest_bytes(Descriptor(mediatypes.OCI_CONFIG, config_digest, len(config_bytes)),
                                     [Descriptor(media_type, layer_digest, layer_size)])
    return _install_from(store, settings, _StoreSource(store), manifest_bytes, Digest.of(manifest_bytes),
                         key, f"import of {reference}", progress, source_kind="rootfs")


@contextmanager
def _decompressed(path: Path, compression: str) -> Iterator[IO[bytes]]:
    if compression == "gzip":
        import gzip

        with gzip.open(path, "rb") as stream:
            yield stream
    elif compression == "xz":
        import lzma

        with lzma.open(path, "rb") as stream:
            yield stream
    elif compression == "bzip2":
        import bz2

        with bz2.open(path, "rb") as stream:
            yield stream
    else:
        from berth import proc

        with open(path, "rb") as source:
            child = proc.start(["zstd", "-dc"], stdin=source, stdout=-1)
            try:
                yield child.stdout
            finally:
                child.stdout.close()
                if child.wait() != 0:
                    raise ImageError(f"zstd could not decompress {path}")


def _uncompressed_digest(path: Path, compression: str) -> Digest:
    hasher = new_hasher()
    try:
        with _decompressed(path, compression) as stream:
            while chunk := stream.read(_CHUNK_BYTES):
                hasher.update(chunk)
    except (OSError, EOFError) as exc:
        raise ImageError(f"{path} is not a valid {compression} stream: {exc}") from None
    return Digest("sha256", hasher.hexdigest())
