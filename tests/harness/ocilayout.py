"""Build OCI images from a declarative spec, with full control over the tar layers.

Nothing here talks to a registry: :func:`write_layout` writes an OCI image layout directory
(``oci-layout``, ``index.json``, ``blobs/sha256/...``) that ``umoci`` and ``skopeo`` read, and
:func:`docker_manifest` gives the Docker schema 2 manifest of the same blobs. Layers are made
with :mod:`tarfile` so tests can put anything in them: whiteouts, opaque markers, device nodes,
setuid bits, foreign owners, xattrs (PAX ``SCHILY.xattr.*``), hard links, hostile names.

Everything is deterministic (fixed mtimes, gzip header mtime 0), so the same spec always gives
the same digests; :func:`spec_key` hashes a spec for caching.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

FIXED_MTIME = 1_700_000_000  # 2023-11-14, any fixed value keeps digests stable

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
#: containerd's name for a zstd layer in a Docker schema 2 manifest (Docker itself has none).
MEDIA_DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
#: Layer media type by (compression, manifest format).
LAYER_MEDIA = {
    ("gzip", "oci"): MEDIA_OCI_LAYER_GZIP, ("zstd", "oci"): MEDIA_OCI_LAYER_ZSTD,
    ("none", "oci"): MEDIA_OCI_LAYER_TAR, ("gzip", "v2s2"): MEDIA_DOCKER_LAYER_GZIP,
    ("zstd", "v2s2"): MEDIA_DOCKER_LAYER_ZSTD, ("none", "v2s2"): MEDIA_DOCKER_LAYER_TAR,
}
ALL_MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_LIST)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


# --------------------------------------------------------------------------- layer entries


@dataclass(frozen=True)
class Entry:
    """One tar member. ``path`` is relative, without leading slash (``"etc/passwd"``).

    ``kind``: file, dir, symlink, hardlink, fifo, char, block. ``target`` is the link target
    (for hard links: the path of the earlier member in the same layer). ``raw_name`` overrides
    the tar member name verbatim (for hostile names such as ``../x`` or ``/abs``).
    """

    path: str
    kind: str = "file"
    content: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""
    xattrs: tuple[tuple[str, str], ...] = ()
    devmajor: int = 0
    devminor: int = 0
    raw_name: Optional[str] = None
    mtime: int = FIXED_MTIME

    def key(self) -> list:
        return [self.raw_name or self.path, self.kind, hashlib.sha256(self.content).hexdigest(), self.mode,
                self.uid, self.gid, self.target, list(self.xattrs), self.devmajor, self.devminor, self.mtime]


def File(path: str, content: Union[bytes, str] = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
         xattrs: Optional[dict[str, str]] = None) -> Entry:
    data = content.encode() if isinstance(content, str) else content
    return Entry(path.lstrip("/"), "file", data, mode, uid, gid, xattrs=tuple(sorted((xattrs or {}).items())))


def HostFile(path: str, source: Union[str, Path], mode: Optional[int] = None, uid: int = 0, gid: int = 0) -> Entry:
    """A file whose content is read now from ``source`` on this machine."""
    source = Path(source)
    return File(path, source.read_bytes(), mode if mode is not None else source.stat().st_mode & 0o7777, uid, gid)


def Dir(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, xattrs: Optional[dict[str, str]] = None) -> Entry:
    return Entry(path.strip("/"), "dir", b"", mode, uid, gid, xattrs=tuple(sorted((xattrs or {}).items())))


def Symlink(path: str, target: str, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path.lstrip("/"), "symlink", b"", 0o777, uid, gid, target=target)


def Hardlink(path: str, target: str) -> Entry:
    """A hard link to ``target``, a member earlier in the same layer."""
    return Entry(path.lstrip("/"), "hardlink", b"", 0o644, target=target.lstrip("/"))


def Fifo(path: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path.lstrip("/"), "fifo", b"", mode, uid, gid)


def CharDevice(path: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    return Entry(path.lstrip("/"), "char", b"", mode, devmajor=major, devminor=minor)


def BlockDevice(path: str, major: int, minor: int, mode: int = 0o660) -> Entry:
    return Entry(path.lstrip("/"), "block", b"", mode, devmajor=major, devminor=minor)


def Whiteout(path: str) -> Entry:
    """Hide ``path`` (file or whole directory) of the lower layers: ``DIR/.wh.NAME``."""
    parent, _, name = path.strip("/").rpartition("/")
    marker = f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name
    return Entry(marker, "file", b"", 0o644)


def Opaque(directory: str) -> Entry:
    """Mark ``directory`` opaque: lower layers' contents hidden, this layer's kept."""
    return Entry(f"{directory.strip('/')}/{OPAQUE_MARKER}", "file", b"", 0o644)


@dataclass(frozen=True)
class Layer:
    """A layer: entries written in order, or an existing uncompressed tar file (``tar_path``).
    ``compression`` ("gzip", "zstd", "none") overrides the image's for this layer (mixed images)."""

    entries: tuple[Entry, ...] = ()
    tar_path: Optional[str] = None
    tar_key: str = ""  # identifies tar_path's content for caching (e.g. its build parameters)
    compression: str = ""

    def key(self) -> list:
        if self.tar_path:
            key = ["tar", self.tar_key or self.tar_path]
        else:
            key = [entry.key() for entry in self.entries]
        # Only when set, so the cache keys of existing specs stay what they were.
        return ["compressed", self.compression, key] if self.compression else key


@dataclass(frozen=True)
class ImageSpec:
    """An image: layers (bottom first) and the config fields tests care about."""

    layers: tuple[Layer, ...]
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    cmd: tuple[str, ...] = ("/bin/sh",)
    entrypoint: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    architecture: str = "amd64"
    os: str = "linux"
    variant: str = ""
    compression: str = "gzip"  # "gzip", "zstd" or "none" (a layer may override it)
    annotations: tuple[tuple[str, str], ...] = field(default=())

    def key(self) -> list:
        return [[layer.key() for layer in self.layers], list(self.env), list(self.cmd), list(self.entrypoint),
                self.working_dir, self.user, list(self.labels), self.architecture, self.os, self.variant,
                self.compression, list(self.annotations)]


def spec_key(spec: Union[ImageSpec, Iterable[ImageSpec]]) -> str:
    """A short stable hash of a spec (or of several, for an index), for cache directory names."""
    if isinstance(spec, ImageSpec):
        data = spec.key()
    else:
        data = [item.key() for item in spec]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- tar writing


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.raw_name if entry.raw_name is not None else entry.path)
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = entry.mtime
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
             "block": tarfile.BLKTYPE}
    if entry.kind not in kinds:
        raise ValueError(f"unknown entry kind {entry.kind!r} for {entry.path}")
    info.type = kinds[entry.kind]
    if entry.kind in ("symlink", "hardlink"):
        info.linkname = entry.target
    if entry.kind in ("char", "block"):
        info.devmajor, info.devminor = entry.devmajor, entry.devminor
    if entry.kind == "file":
        info.size = len(entry.content)
    if entry.xattrs:
        info.pax_headers = {f"SCHILY.xattr.{name}": value for name, value in entry.xattrs}
    return info


def layer_tar_bytes(layer: Layer) -> bytes:
    """The uncompressed tar stream of a layer built from entries."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in layer.entries:
            info = _tarinfo(entry)
            tar.addfile(info, io.BytesIO(entry.content) if entry.kind == "file" else None)
    return buffer.getvalue()


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":  # the zstd program: deterministic for one input and level
        return subprocess.run(["zstd", "-q", "-c", "-3"], input=data, capture_output=True, check=True).stdout
    raise ValueError(f"unknown compression {compression!r}")


# --------------------------------------------------------------------------- layout writing


@dataclass(frozen=True)
class BuiltImage:
    """An image written into a layout: its blobs' digests and the two manifest flavours."""

    layout: Path
    config_digest: str
    config_size: int
    layer_digests: tuple[str, ...]  # compressed blobs, as in the manifest
    layer_sizes: tuple[int, ...]
    diff_ids: tuple[str, ...]  # uncompressed, as in the config's rootfs
    compression: str
    oci_manifest: bytes
    platform: dict
    #: per layer, when the spec mixes compressions; empty means ``compression`` for all
    layer_compressions: tuple[str, ...] = ()

    def layer_compression(self, n: int) -> str:
        return self.layer_compressions[n] if self.layer_compressions else self.compression

    @property
    def oci_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.oci_manifest).hexdigest()

    def manifest(self, fmt: str) -> tuple[bytes, str]:
        """``(manifest bytes, media type)`` for ``fmt`` "oci" or "v2s2"."""
        if fmt == "oci":
            return self.oci_manifest, MEDIA_OCI_MANIFEST
        if fmt == "v2s2":
            return docker_manifest(self), MEDIA_DOCKER_MANIFEST
        raise ValueError(f"unknown manifest format {fmt!r}")

    def blob_path(self, digest: str) -> Path:
        return blob_path(self.layout, digest)

    def blobs(self) -> list[str]:
        """Every blob the manifests reference (config first, then layers)."""
        return [self.config_digest, *self.layer_digests]


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hex_digest = digest.partition(":")
    return Path(layout) / "blobs" / algorithm / hex_digest


def _write_blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return digest


def _write_blob_from_file(layout: Path, source: Path, compression: str) -> tuple[str, int, str]:
    """Compress ``source`` into a blob; returns (blob digest, blob size, diff_id). Streams."""
    staging = Path(layout) / "blobs" / "sha256" / ".staging"
    staging.parent.mkdir(parents=True, exist_ok=True)
    diff_hash = hashlib.sha256()
    with open(source, "rb") as src, open(staging, "wb") as raw:
        zstd = subprocess.Popen(["zstd", "-q", "-c", "-3"], stdin=subprocess.PIPE, stdout=raw) \
            if compression == "zstd" else None
        out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) if compression == "gzip" \
            else zstd.stdin if zstd is not None else raw
        while chunk := src.read(1 << 20):
            diff_hash.update(chunk)
            out.write(chunk)
        if out is not raw:
            out.close()
        if zstd is not None and zstd.wait() != 0:
            raise RuntimeError(f"zstd failed compressing {source}")
    blob_hash = hashlib.sha256()
    with open(staging, "rb") as blob:
        while chunk := blob.read(1 << 20):
            blob_hash.update(chunk)
    digest = "sha256:" + blob_hash.hexdigest()
    os.replace(staging, blob_path(layout, digest))
    return digest, os.path.getsize(blob_path(layout, digest)), "sha256:" + diff_hash.hexdigest()


def _config_json(spec: ImageSpec, diff_ids: list[str]) -> bytes:
    config: dict = {"Env": list(spec.env)}
    if spec.cmd:
        config["Cmd"] = list(spec.cmd)
    if spec.entrypoint:
        config["Entrypoint"] = list(spec.entrypoint)
    if spec.working_dir:
        config["WorkingDir"] = spec.working_dir
    if spec.user:
        config["User"] = spec.user
    if spec.labels:
        config["Labels"] = dict(spec.labels)
    document = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": spec.architecture,
        "os": spec.os,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "berth test harness"} for _ in diff_ids],
    }
    if spec.variant:
        document["variant"] = spec.variant
    return json.dumps(document, sort_keys=True).encode()


def _platform(spec: ImageSpec) -> dict:
    platform = {"architecture": spec.architecture, "os": spec.os}
    if spec.variant:
        platform["variant"] = spec.variant
    return platform


def write_image_blobs(spec: ImageSpec, layout: Path) -> BuiltImage:
    """Write the layers, config and OCI manifest of ``spec`` as blobs of ``layout``."""
    layout = Path(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    layer_digests, layer_sizes, diff_ids = [], [], []
    compressions = tuple(layer.compression or spec.compression for layer in spec.layers)
    for layer, compression in zip(spec.layers, compressions):
        if layer.tar_path:
            digest, size, diff_id = _write_blob_from_file(layout, Path(layer.tar_path), compression)
        else:
            raw = layer_tar_bytes(layer)
            blob = _compress(raw, compression)
            digest, size = _write_blob(layout, blob), len(blob)
            diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
        layer_digests.append(digest)
        layer_sizes.append(size)
        diff_ids.append(diff_id)
    config = _config_json(spec, diff_ids)
    config_digest = _write_blob(layout, config)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": LAYER_MEDIA[c, "oci"], "digest": d, "size": s}
                   for c, d, s in zip(compressions, layer_digests, layer_sizes)],
    }
    if spec.annotations:
        manifest_doc["annotations"] = dict(spec.annotations)
    manifest = json.dumps(manifest_doc, sort_keys=True).encode()
    _write_blob(layout, manifest)
    mixed = compressions if any(layer.compression for layer in spec.layers) else ()
    return BuiltImage(layout, config_digest, len(config), tuple(layer_digests), tuple(layer_sizes),
                      tuple(diff_ids), spec.compression, manifest, _platform(spec), mixed)


def docker_manifest(image: BuiltImage) -> bytes:
    """The Docker schema 2 manifest for the same config and layer blobs."""
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": MEDIA_DOCKER_MANIFEST,
        "config": {"mediaType": MEDIA_DOCKER_CONFIG, "digest": image.config_digest, "size": image.config_size},
        "layers": [{"mediaType": LAYER_MEDIA[image.layer_compression(n), "v2s2"], "digest": d, "size": s}
                   for n, (d, s) in enumerate(zip(image.layer_digests, image.layer_sizes))],
    }, sort_keys=True).encode()


def index_manifest(images: list[tuple[bytes, str, dict]], fmt: str) -> tuple[bytes, str]:
    """An OCI index (``fmt="oci"``) or Docker manifest list (``"v2s2"``) over
    ``(manifest bytes, media type, platform)`` entries."""
    media = MEDIA_OCI_INDEX if fmt == "oci" else MEDIA_DOCKER_LIST
    document = {
        "schemaVersion": 2,
        "mediaType": media,
        "manifests": [{"mediaType": media_type, "size": len(data),
                       "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "platform": platform}
                      for data, media_type, platform in images],
    }
    return json.dumps(document, sort_keys=True).encode(), media


def write_layout(spec: ImageSpec, layout: Path, tag: str = "latest") -> BuiltImage:
    """Write an OCI image layout holding ``spec`` under ``tag`` (readable by umoci and skopeo)."""
    image = write_image_blobs(spec, layout)
    _write_index_json(layout, [{"mediaType": MEDIA_OCI_MANIFEST, "digest": image.oci_digest,
                                "size": len(image.oci_manifest),
                                "annotations": {"org.opencontainers.image.ref.name": tag}}])
    return image


def write_index_layout(specs: list[ImageSpec], layout: Path, tag: str = "latest") -> tuple[list[BuiltImage], bytes]:
    """Write several platform images and an OCI index over them, tagged ``tag``.

    Returns the images and the index bytes (also stored as a blob).
    """
    images = [write_image_blobs(spec, layout) for spec in specs]
    index, media = index_manifest([(image.oci_manifest, MEDIA_OCI_MANIFEST, image.platform) for image in images], "oci")
    digest = _write_blob(Path(layout), index)
    _write_index_json(layout, [{"mediaType": media, "digest": digest, "size": len(index),
                                "annotations": {"org.opencontainers.image.ref.name": tag}}])
    return images, index


def _write_index_json(layout: Path, manifests: list[dict]) -> None:
    layout = Path(layout)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}, sort_keys=True))


# --------------------------------------------------------------------------- expected tree


@dataclass(frozen=True)
class Node:
    """What a path should look like after all layers are applied (the reference for flatten)."""

    kind: str  # file, dir, symlink, fifo, char, block (a hard link shows as "file" with link_group)
    mode: Optional[int]  # None for a directory only implied by a deeper path
    uid: int = 0
    gid: int = 0
    content: bytes = b""
    target: str = ""
    xattrs: tuple[tuple[str, str], ...] = ()
    link_group: str = ""  # the first path of a set of hard links (same layer), "" otherwise


def expected_tree(spec: ImageSpec) -> dict[str, Node]:
    """Apply the entry layers of ``spec`` the way the OCI image spec says
    (https://github.com/opencontainers/image-spec/blob/main/layer.md): whiteouts and opaque
    markers hide lower-layer paths only; a non-directory replaces a whole directory.

    Keys are relative paths without leading slash. Layers given as tar files are not modelled
    (raises ValueError).
    """
    tree: dict[str, Node] = {}

    def remove_under(prefix: str, include_self: bool) -> None:
        for path in [p for p in tree if p.startswith(prefix + "/") or (include_self and p == prefix)]:
            del tree[path]

    for layer in spec.layers:
        if layer.tar_path:
            raise ValueError("expected_tree cannot model a layer given as a tar file")
        lower = set(tree)
        for entry in layer.entries:
            parent, _, name = entry.path.rpartition("/")
            if name == OPAQUE_MARKER:
                for path in [p for p in lower if p.startswith(parent + "/")]:
                    tree.pop(path, None)
            elif name.startswith(WHITEOUT_PREFIX):
                hidden = f"{parent}/{name[len(WHITEOUT_PREFIX):]}" if parent else name[len(WHITEOUT_PREFIX):]
                if hidden in lower:
                    tree.pop(hidden, None)
                for path in [p for p in lower if p.startswith(hidden + "/")]:
                    tree.pop(path, None)
        for entry in layer.entries:
            name = entry.path.rpartition("/")[2]
            if name.startswith(WHITEOUT_PREFIX):
                continue
            parts = entry.path.split("/")
            for depth in range(1, len(parts)):
                ancestor = "/".join(parts[:depth])
                if ancestor not in tree or tree[ancestor].kind != "dir":
                    if ancestor in tree:
                        remove_under(ancestor, include_self=True)
                    tree[ancestor] = Node("dir", None)
            existing = tree.get(entry.path)
            if existing is not None and existing.kind == "dir" and entry.kind != "dir":
                remove_under(entry.path, include_self=True)
            if entry.kind == "hardlink":
                source = tree[entry.target]
                group = source.link_group or entry.target
                tree[entry.target] = Node(**{**source.__dict__, "link_group": group})
                tree[entry.path] = Node(**{**source.__dict__, "link_group": group})
            else:
                tree[entry.path] = Node(entry.kind, entry.mode, entry.uid, entry.gid, entry.content,
                                        entry.target, entry.xattrs)
    return tree
