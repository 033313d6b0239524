"""Node-local copies of image SquashFS files (site setting ``stage_to_local``).

By default every node mounts the image's SquashFS straight from the (shared) store: one file
read per node, no registry traffic. Sites whose shared filesystem is slow for the small random
reads of a running program set ``stage_to_local = true``: the first container of an image on a
node copies the file once into the caller's node-local state directory, and every later
container (MPI ranks on that node included) mounts the copy.

The copy is verify-then-rename: written under an exclusive lock to a temporary name, its size
compared with the source, then renamed into place; a copy whose size or modification time no
longer matches the source is replaced. Copies unused for ``STALE_S`` are removed when another
copy is made, so the directory does not grow without bound.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from berth import fsutil, locks
from berth.errors import RuntimeFailure

IMAGES = "images"
STALE_S = 7 * 24 * 3600


def image_key(source: Path, digest: object | None) -> tuple[str, os.stat_result]:
    """The name an image goes by on the node (its copy here, its shared mount in
    berth.runtime.imagemount) and the source's stat. Raises OSError."""
    info = os.stat(source)
    if digest is not None:
        name = str(digest).replace(":", "-")
    else:
        # A SquashFS given by path: key it by where it is and what it is.
        ident = f"{os.path.realpath(source)}\0{info.st_size}\0{info.st_mtime_ns}"
        name = "file-" + hashlib.sha256(ident.encode()).hexdigest()[:32]
    return name, info


def _is_current(copy: Path, source_info: os.stat_result) -> bool:
    try:
        info = os.stat(copy)
    except FileNotFoundError:
        return False
    return info.st_size == source_info.st_size and info.st_mtime_ns == source_info.st_mtime_ns


def _copy_all(source_fd: int, target_fd: int) -> None:
    """Copy a whole file in the kernel (sendfile: no data through Python)."""
    offset = 0
    while sent := os.sendfile(target_fd, source_fd, offset, 1 << 30):
        offset += sent


def local_copy(state_dir: Path, source: Path, digest: object | None = None, *,
               lock_timeout_s: float = locks.DEFAULT_TIMEOUT_S) -> Path:
    """Return a node-local copy of ``source`` under ``state_dir/images`` (made once).

    Raises RuntimeFailure naming the paths when the copy cannot be made (disk full...).
    """
    directory = Path(state_dir) / IMAGES
    try:
        name, source_info = image_key(source, digest)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        copy = directory / f"{name}.sqfs"
        if _is_current(copy, source_info):
            os.utime(copy, ns=(time.time_ns(), source_info.st_mtime_ns))
            return copy
        lock = directory / f"{name}.lock"
        # Ranks starting together copy once; the wait is bounded (a stuck copy is named).
        with locks.file_lock(lock, timeout_s=lock_timeout_s, purpose=f"node-local copy of {source}"):
            if _is_current(copy, source_info):
                return copy
            with open(source, "rb") as original, \
                    fsutil.atomic_writer(copy, mode=fsutil.PRIVATE_FILE, durable=False) as out:
                _copy_all(original.fileno(), out.fileno())
                if os.fstat(out.fileno()).st_size != source_info.st_size:
                    raise RuntimeFailure(f"copy of {source} to {directory} is incomplete (the source changed?)",
                                         hint="run the command again")
                # Keep the source's mtime: it is how a later run knows the copy is current.
                os.utime(out.fileno(), ns=(time.time_ns(), source_info.st_mtime_ns))
        _remove_stale(directory, keep=copy)
        return copy
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot copy the image {source} to node-local storage {directory}: {exc.strerror}",
            hint="free space in the state directory (berth doctor shows it) or ask your site "
            "administrator to turn off stage_to_local",
        ) from None


def _remove_stale(directory: Path, keep: Path) -> None:
    now = time.time()
    for entry in os.scandir(directory):
        if entry.name.endswith(".sqfs") and entry.path != str(keep):
            try:
                if now - entry.stat().st_atime > STALE_S:
                    os.unlink(entry.path)
            except OSError:
                pass
