"""Test images: specs, a build cache outside the repository, and pushing to a test registry.

``push_image(registry, name, tag, spec, fmt="oci"|"v2s2") -> manifest digest`` builds the spec
into an OCI image layout (cached under ``/var/cache/berth-test-images/<spec hash>/``, or
``$BERTH_TEST_IMAGE_CACHE``), then pushes it with plain registry API calls (blob upload
POST + PUT, manifest PUT), so the manifest bytes and digest are exactly those computed here and
hostile content that skopeo would refuse can be pushed too. :func:`skopeo_push` pushes the
same layout with skopeo instead, for cross-checks.

The ready-made specs (:func:`busybox_spec`, :func:`whiteout_spec`, :func:`debian_spec`,
:func:`index_specs`) are what the fixtures in ``fixtures_images.py`` push.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from typing import Optional

from tests.harness import ocilayout
from tests.harness.ocilayout import (
    ALL_MANIFEST_TYPES,
    BuiltImage,
    Dir,
    Fifo,
    File,
    Hardlink,
    HostFile,
    ImageSpec,
    Layer,
    Opaque,
    Symlink,
    Whiteout,
)
from tests.harness.registry import Registry, auth_headers

DEFAULT_CACHE_DIR = "/var/cache/berth-test-images"
LAYOUT_TAG = "latest"
BUSYBOX_BINARY = "/bin/busybox"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"
DEBIAN_INCLUDE = ("python3-minimal",)


def cache_dir() -> Path:
    """``$BERTH_TEST_IMAGE_CACHE``, else /var/cache/berth-test-images when we may write there
    (root, as in CI), else ``~/.cache/berth-test-images``."""
    explicit = os.environ.get("BERTH_TEST_IMAGE_CACHE")
    path = Path(explicit or DEFAULT_CACHE_DIR)
    if not explicit and not os.access(path if path.exists() else path.parent, os.W_OK):
        path = Path.home() / ".cache" / "berth-test-images"
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path, 0o755)
    except PermissionError:
        pass  # someone else's cache directory: reading it is enough
    return path


@contextmanager
def _cache_lock(name: str):
    """Serialize builds of one cache entry between concurrent pytest processes."""
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _make_world_readable(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


# --------------------------------------------------------------------------- build cache


def _built_to_json(image: BuiltImage) -> dict:
    return {"config_digest": image.config_digest, "config_size": image.config_size,
            "layer_digests": list(image.layer_digests), "layer_sizes": list(image.layer_sizes),
            "diff_ids": list(image.diff_ids), "compression": image.compression,
            "oci_manifest": image.oci_manifest.decode(), "platform": image.platform,
            "layer_compressions": list(image.layer_compressions)}


def _built_from_json(layout: Path, data: dict) -> BuiltImage:
    return BuiltImage(layout, data["config_digest"], data["config_size"], tuple(data["layer_digests"]),
                      tuple(data["layer_sizes"]), tuple(data["diff_ids"]), data["compression"],
                      data["oci_manifest"].encode(), data["platform"], tuple(data.get("layer_compressions", ())))


def _cached_layout(key: str, write) -> tuple[Path, dict]:
    """The cache entry ``key``: (its OCI layout, its built.json data), made once by
    ``write(layout_dir) -> data`` under the entry's lock in a staging directory renamed into
    place, so that concurrent pytest processes build it once and never see half of it."""
    entry = cache_dir() / key
    meta = entry / "built.json"
    if not meta.exists():
        with _cache_lock(key):
            if not meta.exists():
                staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir()))
                try:
                    (staging / "built.json").write_text(json.dumps(write(staging / "layout")))
                    _make_world_readable(staging)
                    shutil.rmtree(entry, ignore_errors=True)
                    os.rename(staging, entry)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
    return entry / "layout", json.loads(meta.read_text())


def build_image(spec: ImageSpec) -> BuiltImage:
    """The OCI layout of ``spec`` (tag ``latest``), built once and cached by spec hash."""
    layout, data = _cached_layout(ocilayout.spec_key(spec), lambda where: _built_to_json(
        ocilayout.write_layout(spec, where, LAYOUT_TAG)))
    return _built_from_json(layout, data)


def build_index(specs: list[ImageSpec]) -> tuple[list[BuiltImage], bytes]:
    """An OCI layout holding an index over ``specs`` (tag ``latest``), cached by spec hash."""
    def write(where: Path) -> dict:
        images, index = ocilayout.write_index_layout(specs, where, LAYOUT_TAG)
        return {"images": [_built_to_json(image) for image in images], "index": index.decode()}

    layout, data = _cached_layout("index-" + ocilayout.spec_key(specs), write)
    return [_built_from_json(layout, item) for item in data["images"]], data["index"].encode()


# --------------------------------------------------------------------------- pushing


class PushError(RuntimeError):
    pass


def _request(method: str, url: str, headers: dict[str, str], data=None, accept=(200,)) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        if error.code in accept:
            return error.code, error.headers, error.read()
        raise PushError(f"{method} {url} answered {error.code}: {error.read()[:500]!r}") from None


def push_blob(registry: Registry, name: str, digest: str, path: Path, headers: dict[str, str]) -> None:
    """Upload one blob (monolithic POST then PUT) unless the repository has it already."""
    base = f"{registry.url}/v2/{name}"
    status, _, _ = _request("HEAD", f"{base}/blobs/{digest}", headers, accept=(200, 404))
    if status == 200:
        return
    _, response_headers, _ = _request("POST", f"{base}/blobs/uploads/", headers, accept=(202,))
    location = response_headers.get("Location")
    if not location:
        raise PushError(f"registry {registry.host} gave no upload location for {name}")
    location = urllib.parse.urljoin(registry.url + "/", location)
    separator = "&" if "?" in location else "?"
    size = os.path.getsize(path)
    with open(path, "rb") as blob:
        _request("PUT", f"{location}{separator}digest={urllib.parse.quote(digest)}",
                 {**headers, "Content-Type": "application/octet-stream", "Content-Length": str(size)},
                 data=blob, accept=(201,))


def push_manifest(registry: Registry, name: str, reference: str, data: bytes, media_type: str,
                  headers: Optional[dict[str, str]] = None) -> str:
    """PUT a manifest (by tag or digest); returns its digest (checked against the registry's)."""
    if headers is None:
        headers = auth_headers(registry, f"repository:{name}:pull,push")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _, response_headers, _ = _request(
        "PUT", f"{registry.url}/v2/{name}/manifests/{reference}",
        {**headers, "Content-Type": media_type}, data=data, accept=(201,))
    answered = response_headers.get("Docker-Content-Digest")
    if answered and answered != digest:
        raise PushError(f"registry computed {answered} for the manifest, expected {digest}")
    return digest


def _push_built(registry: Registry, name: str, reference: str, image: BuiltImage, fmt: str,
                headers: dict[str, str]) -> tuple[bytes, str]:
    for digest in image.blobs():
        push_blob(registry, name, digest, image.blob_path(digest), headers)
    data, media = image.manifest(fmt)
    push_manifest(registry, name, reference, data, media, headers)
    return data, media


def push_image(registry: Registry, name: str, tag: str, spec: ImageSpec, fmt: str = "oci") -> str:
    """Build (cached) and push ``spec`` as ``registry.host/name:tag``; returns the manifest digest.

    ``fmt`` is ``"oci"`` (OCI image manifest) or ``"v2s2"`` (Docker schema 2 manifest, same
    blobs). Works with anonymous, basic and token registries.
    """
    image = build_image(spec)
    headers = auth_headers(registry, f"repository:{name}:pull,push")
    data, _ = _push_built(registry, name, tag, image, fmt, headers)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_index(registry: Registry, name: str, tag: str, specs: list[ImageSpec], fmt: str = "oci") -> str:
    """Push a multi-platform image: each spec by digest, then an OCI index (``fmt="oci"``) or a
    Docker manifest list (``"v2s2"``) under ``tag``. Returns the index digest."""
    images, _ = build_index(specs)
    headers = auth_headers(registry, f"repository:{name}:pull,push")
    entries = []
    for image in images:
        data, media = image.manifest(fmt)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        for blob in image.blobs():
            push_blob(registry, name, blob, image.blob_path(blob), headers)
        push_manifest(registry, name, digest, data, media, headers)
        entries.append((data, media, image.platform))
    index, media = ocilayout.index_manifest(entries, fmt)
    return push_manifest(registry, name, tag, index, media, headers)


def skopeo_push(registry: Registry, name: str, tag: str, layout: Path, fmt: str = "oci",
                all_images: bool = False, compress_format: str = "") -> None:
    """Push an OCI layout (tag ``latest``) with skopeo, for cross-checks against :func:`push_image`.
    ``compress_format`` ("zstd", "gzip") makes skopeo recompress every layer that way."""
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if compress_format:
        argv += ["--dest-compress", "--dest-compress-format", compress_format]
    if registry.username:
        argv += ["--dest-creds", f"{registry.username}:{registry.password}"]
    if fmt == "v2s2":
        argv += ["--format", "v2s2"]
    if all_images:
        argv += ["--all"]
    argv += [f"oci:{layout}:{LAYOUT_TAG}", f"docker://{registry.host}/{name}:{tag}"]
    subprocess.run(argv, check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)


def fetch_manifest(registry: Registry, name: str, reference: str,
                   accept: tuple[str, ...] = ALL_MANIFEST_TYPES) -> tuple[bytes, str, str]:
    """GET a manifest; returns ``(bytes, Content-Type, Docker-Content-Digest)``."""
    headers = {**auth_headers(registry, f"repository:{name}:pull"), "Accept": ", ".join(accept)}
    _, response_headers, body = _request("GET", f"{registry.url}/v2/{name}/manifests/{reference}", headers)
    return body, response_headers.get("Content-Type", ""), response_headers.get("Docker-Content-Digest", "")


# --------------------------------------------------------------------------- pushed images


class PushedImage(str):
    """The pushed reference (``127.0.0.1:PORT/test/busybox:1``) plus what tests compare with.

    It is a ``str``, so it can be passed wherever a reference is expected. Attributes:
    ``registry``, ``name``, ``tag``, ``digest`` (manifest digest), ``fmt``, ``spec`` (or
    ``specs`` for an index), ``layout`` (OCI layout dir, tag ``latest``, for
    ``umoci unpack --rootless --image LAYOUT:latest OUT``), ``built`` (BuiltImage(s)).
    """

    registry: Registry
    name: str
    tag: str
    digest: str
    fmt: str
    spec: Optional[ImageSpec]
    specs: tuple[ImageSpec, ...]
    layout: Path
    built: object

    def __new__(cls, registry: Registry, name: str, tag: str, digest: str, fmt: str, *, spec=None,
                specs=(), layout: Path, built=None) -> "PushedImage":
        self = super().__new__(cls, f"{registry.host}/{name}:{tag}")
        self.registry, self.name, self.tag, self.digest, self.fmt = registry, name, tag, digest, fmt
        self.spec, self.specs, self.layout, self.built = spec, tuple(specs), layout, built
        return self

    @property
    def by_digest(self) -> str:
        """``HOST/NAME@sha256:...``"""
        return f"{self.registry.host}/{self.name}@{self.digest}"

    def expected_tree(self) -> dict[str, ocilayout.Node]:
        if self.spec is None:
            raise ValueError("an index has one tree per platform: use ocilayout.expected_tree(spec)")
        return ocilayout.expected_tree(self.spec)


def push_pushed_image(registry: Registry, name: str, tag: str, spec: ImageSpec, fmt: str = "oci") -> PushedImage:
    digest = push_image(registry, name, tag, spec, fmt)
    built = build_image(spec)
    return PushedImage(registry, name, tag, digest, fmt, spec=spec, layout=built.layout, built=built)


def push_pushed_index(registry: Registry, name: str, tag: str, specs: list[ImageSpec], fmt: str = "oci") -> PushedImage:
    digest = push_index(registry, name, tag, specs, fmt)
    images, _ = build_index(specs)
    return PushedImage(registry, name, tag, digest, fmt, specs=specs, layout=images[0].layout, built=images)


# --------------------------------------------------------------------------- specs

BUSYBOX_APPLETS = (
    "sh", "ash", "ls", "cat", "id", "echo", "true", "false", "sleep", "ps", "env", "touch", "mkdir",
    "stat", "grep", "wc", "kill", "cp", "mv", "rm", "rmdir", "ln", "readlink", "realpath", "pwd", "head",
    "tail", "sed", "awk", "find", "test", "[", "uname", "hostname", "whoami", "chmod", "chown", "df",
    "du", "mount", "umount", "nproc", "printf", "seq", "sort", "tee", "tr", "xargs", "date", "dd",
    "diff", "basename", "dirname", "expr", "md5sum", "sha256sum", "timeout", "which", "yes", "mkfifo",
    "ip", "hostid", "groups", "cut", "uniq", "od", "xxd", "tar", "gzip", "vi", "less", "more", "top",
    "free", "uptime", "setsid", "nsenter", "unshare", "mktemp", "sync", "usleep", "time", "tty", "who",
)

PASSWD = """root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
nogroup:x:65534:
"""
HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"


def busybox_spec(*, extra_layers: tuple[Layer, ...] = (), architecture: str = "amd64",
                 marker: str = "") -> ImageSpec:
    """busybox-static with applet symlinks in /bin, /etc basics, the usual empty dirs.

    Layer 1: directories and /bin; layer 2: /etc files (and ``/etc/berth-marker`` holding
    ``marker`` when given: lets variants of the image differ in content).
    """
    dirs = ["bin", "dev", "etc", "home", "proc", "root", "sys", "tmp", "usr", "usr/bin", "var", "var/tmp"]
    base = [Dir(d, 0o1777 if d in ("tmp", "var/tmp") else (0o700 if d == "root" else 0o755)) for d in dirs]
    base.append(HostFile("bin/busybox", BUSYBOX_BINARY, mode=0o755))
    base += [Symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS]
    etc = [File("etc/passwd", PASSWD), File("etc/group", GROUP), File("etc/hosts", HOSTS),
           File("etc/os-release", 'NAME="berth test busybox"\nID=busybox\n')]
    if marker:
        etc.append(File("etc/berth-marker", marker + "\n"))
    return ImageSpec(
        layers=(Layer(tuple(base)), Layer(tuple(etc)), *extra_layers),
        env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
        cmd=("/bin/sh",),
        architecture=architecture,
    )


def whiteout_spec() -> ImageSpec:
    """busybox plus three layers exercising every layer-application rule (see ``expected_tree``).

    Final state (what flatten must produce), besides busybox:
    - /data/keep.txt "keep" ; /data/gone.txt hidden (file whiteout) ; /data/subdir hidden (dir whiteout)
    - /opaque/new.txt "new" only (opaque: old.txt and olddir/ of lower layers hidden)
    - /swap/was_file is a dir holding inner.txt ; /swap/was_dir is a file "now a file"
    - /data/recreated.txt "second" (whited out in layer 4, re-created in layer 5)
    - /links/abs -> /data/keep.txt ; /links/rel -> ../data/keep.txt ; /links/hard = same inode as /links/hard_src
    - /perm/private 0700 dir ; /perm/exec 0755 ; /perm/suid 04755 ; /perm/owned uid 1234 gid 5678
    - /perm/xattr with user.berth=test ; /perm/fifo a FIFO
    """
    lower = Layer((
        Dir("data"), File("data/keep.txt", "keep\n"), File("data/gone.txt", "gone\n"),
        Dir("data/subdir"), File("data/subdir/inner.txt", "inner\n"), Dir("data/subdir/deeper"),
        File("data/subdir/deeper/x", "x\n"),
        File("data/recreated.txt", "first\n"),
        Dir("opaque"), File("opaque/old.txt", "old\n"), Dir("opaque/olddir"), File("opaque/olddir/f", "f\n"),
        Dir("swap"), File("swap/was_file", "i was a file\n"), Dir("swap/was_dir"),
        File("swap/was_dir/child", "child\n"),
    ))
    middle = Layer((
        Whiteout("data/gone.txt"), Whiteout("data/subdir"), Whiteout("data/recreated.txt"),
        Opaque("opaque"), Dir("opaque"), File("opaque/new.txt", "new\n"),
        Dir("swap/was_file"), File("swap/was_file/inner.txt", "inside\n"),
        File("swap/was_dir", "now a file\n"),
        Dir("links"), Symlink("links/abs", "/data/keep.txt"), Symlink("links/rel", "../data/keep.txt"),
        File("links/hard_src", "hard\n"), Hardlink("links/hard", "links/hard_src"),
    ))
    top = Layer((
        File("data/recreated.txt", "second\n"),
        Dir("perm"), Dir("perm/private", mode=0o700), File("perm/exec", "#!/bin/sh\necho exec\n", mode=0o755),
        File("perm/suid", "suid\n", mode=0o4755), File("perm/owned", "owned\n", uid=1234, gid=5678),
        Dir("perm/owned_dir", mode=0o750, uid=1234, gid=5678),
        File("perm/xattr", "xattr\n", xattrs={"user.berth": "test"}), Fifo("perm/fifo"),
    ))
    return busybox_spec(extra_layers=(lower, middle, top))


def hardlink_spec() -> ImageSpec:
    """busybox plus a layer with hard links: several names for one file, a link in another dir,
    and a hard link to a setuid file (link keeps the mode)."""
    layer = Layer((
        Dir("hl"), File("hl/original", "shared content\n", mode=0o640, uid=1234, gid=5678),
        Hardlink("hl/second", "hl/original"), Dir("hl/sub"), Hardlink("hl/sub/third", "hl/original"),
        File("hl/suid", "suid\n", mode=0o4755), Hardlink("hl/suid_link", "hl/suid"),
    ))
    return busybox_spec(extra_layers=(layer,))


def index_specs() -> list[ImageSpec]:
    """linux/amd64 busybox and a tiny linux/arm64 image whose /etc/berth-marker says ``arm64``
    (no arm64 binary is needed: tests check which platform was chosen by its content)."""
    amd64 = busybox_spec(marker="amd64")
    arm64 = ImageSpec(
        layers=(Layer((Dir("etc"), File("etc/berth-marker", "arm64\n"), Dir("bin"))),),
        architecture="arm64", variant="v8", cmd=("/bin/sh",),
    )
    return [amd64, arm64]


def debian_rootfs_tar() -> tuple[Path, str]:
    """debootstrap minbase bookworm (+python3-minimal) as an uncompressed tar, built once (needs
    root and the Debian mirror; minutes the first time). Returns (tar path, cache key)."""
    return debootstrap_rootfs_tar("debian", DEBIAN_INCLUDE)


def debootstrap_rootfs_tar(label: str, include: list[str] | tuple[str, ...]) -> tuple[Path, str]:
    """debootstrap minbase of DEBIAN_SUITE with ``include`` as an uncompressed tar, built once
    and cached by the inputs (needs root and the Debian mirror). Returns (tar path, cache key)."""
    prefix = "debootstrap-" if label == "debian" else f"debootstrap-{label}-"
    key = prefix + hashlib.sha256(
        json.dumps([DEBIAN_SUITE, DEBIAN_MIRROR, "minbase", include]).encode()).hexdigest()[:16]
    tar_path = cache_dir() / f"{key}.tar"
    if tar_path.exists():
        return tar_path, key
    with _cache_lock(key):
        if tar_path.exists():
            return tar_path, key
        if os.getuid() != 0:
            raise PermissionError(f"building the {label} test image needs root (debootstrap)")
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir()))
        try:
            rootfs = staging / "rootfs"
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(include)}", DEBIAN_SUITE,
                 str(rootfs), DEBIAN_MIRROR],
                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800,
            )
            if result.returncode != 0:
                log = rootfs / "debootstrap" / "debootstrap.log"
                detail = log.read_text(errors="replace")[-2000:] if log.exists() else result.stderr[-2000:]
                raise RuntimeError(f"debootstrap of the {label} test image from {DEBIAN_MIRROR} failed "
                                   f"(exit {result.returncode}):\n{detail}")
            # Drop what debootstrap leaves that would vary between builds or does not belong.
            for item in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                item.unlink()
            for item in (rootfs / "var/lib/apt/lists").glob("*_Packages"):
                item.unlink()
            partial = staging / "rootfs.tar"
            subprocess.run(
                ["tar", "--create", "--file", str(partial), "--numeric-owner", "--sort=name",
                 "--xattrs", "--directory", str(rootfs), "."],
                check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=1800,
            )
            os.chmod(partial, 0o644)
            os.replace(partial, tar_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return tar_path, key


def debian_spec() -> ImageSpec:
    """Debian bookworm minbase with python3-minimal (one big layer) plus a small marker layer."""
    tar_path, key = debian_rootfs_tar()
    marker = Layer((Dir("etc"), File("etc/berth-marker", "debian\n")))
    return ImageSpec(layers=(Layer(tar_path=str(tar_path), tar_key=key), marker), cmd=("/bin/bash",))
