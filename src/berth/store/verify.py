"""Checking a store against what it claims to hold (``berth store verify``, issue 8).

What is checked, with no trust in anything but the content itself:
- every blob in ``blobs/`` hashes to its name (a mismatch is corruption: bit rot, a hand edit,
  a torn write on a file system that lied about fsync);
- every image directory is complete; its ``manifest.json`` hashes to the directory's digest,
  its ``config.json`` to the manifest's config descriptor, and its ``image.sqfs`` has the size
  and SHA-256 recorded in ``image.json`` at publish time (``squashfs_digest``; images published
  before berth recorded it are checked by size and SquashFS superblock only, and say so);
- every blob a complete image uses (manifest, config, layers, index) is present;
- every reference of ``index.json`` names a complete image;
- ``tmp/`` holds nothing but resumable partial downloads once no writer runs (anything else is
  a crashed writer's leftover).

Leftovers of a killed writer in ``tmp/`` are *garbage*, not damage: berth is built so that
``kill -9`` leaves at worst that (store.py), and the next writer or ``prune`` removes it. They
are reported, and removed by ``repair``, but do not count among the problems that make the
check fail; everything else does.

``repair`` removes what is wrong: corrupt blobs, corrupt or incomplete images, stray
temporaries. What needs the network afterwards (a layer to download again, a reference whose
image was removed) is listed in :attr:`VerifyReport.refetch_blobs` and
:attr:`VerifyReport.refetch_references` for the image layer, which joins store and registry.

Locking: the check holds the gc lock exclusively, like prune, so no pull or import runs while it
looks at ``tmp/`` and nothing it removes is in use. A user checking a site store they cannot
write runs without the lock (read-only: nothing is removed) and skips young ``tmp/`` entries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from berth.errors import BerthError
from berth.oci.digest import Digest
from berth.record import Record, asdict, field
from berth.store.store import STALE_TMP_S, Store, _remove_tree, _unlink_quietly, hash_file
from berth.untrusted import parse_json

_SQUASHFS_MAGIC = b"hsqs"
_IMAGE_FILES = ("manifest.json", "config.json", "image.json", "image.sqfs")

# Problem kinds (stable: scripts and the JSON output use them).
CORRUPT_BLOB = "corrupt blob"
MISSING_BLOB = "missing blob"
UNKNOWN_FILE = "unknown file"
CORRUPT_IMAGE = "corrupt image"
INCOMPLETE_IMAGE = "incomplete image"
DANGLING_REFERENCE = "dangling reference"
STRAY_TEMPORARY = "stray temporary"
UNREADABLE_INDEX = "unreadable index"


class Problem(Record, frozen=False):
    """One thing wrong in a store; ``repaired`` says what repair did (None: still wrong)."""

    kind: str
    path: str
    detail: str
    repaired: str | None = None

    @property
    def damage(self) -> bool:
        """False for garbage (a killed writer's leftovers), which does not fail the check."""
        return self.kind != STRAY_TEMPORARY

    def as_dict(self) -> dict:
        return {**asdict(self), "damage": self.damage}



class BlobNeed(Record):
    """A blob an image uses that must come from the registry again."""

    digest: Digest
    size_bytes: int
    media_type: str
    #: the image's source reference (image.json "source"), to know where to fetch from.
    source: str | None
    problem: Problem


class VerifyReport(Record, frozen=False):
    store: str
    root: str
    blobs_checked: int = 0
    images_checked: int = 0
    bytes_hashed: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refetch_blobs: list[BlobNeed] = field(default_factory=list)
    #: reference key -> the problem that a successful pull of it repairs.
    refetch_references: dict[str, Problem] = field(default_factory=dict)
    #: image.json of the images repair removed (by digest), to rebuild them with.
    removed_meta: dict[str, dict] = field(default_factory=dict)

    @property
    def remaining(self) -> list[Problem]:
        """Damage not repaired (garbage left in tmp/ is not counted)."""
        return [p for p in self.problems if p.repaired is None and p.damage]

    @property
    def garbage(self) -> list[Problem]:
        return [p for p in self.problems if p.repaired is None and not p.damage]

    def as_dict(self) -> dict:
        return {"store": self.store, "root": self.root, "blobs_checked": self.blobs_checked,
                "images_checked": self.images_checked, "bytes_hashed": self.bytes_hashed,
                "problems": [p.as_dict() for p in self.problems],
                "remaining": len(self.remaining), "garbage": len(self.garbage),
                "notes": list(self.notes)}


@contextmanager
def _exclusive(store: Store, repair: bool, wanted: bool = True) -> Iterator[bool]:
    """The gc lock exclusively (True) when this process can take it; repair requires it."""
    if repair:
        store.require_writable()
    elif not wanted or not os.access(store.layout.locks_dir, os.W_OK | os.X_OK):
        yield False
        return
    with store.lock(store.layout.gc_lock, "verify against writers of the store") as held:
        yield held


def verify_store(store: Store, *, repair: bool = False, deep: bool = True,
                 now: float | None = None) -> VerifyReport:
    """Check ``store`` (see the module docstring); with ``repair`` remove what is wrong.

    ``deep=False`` is the quick look of ``berth doctor``: no lock (it never waits for a pull),
    blobs are not hashed and SquashFS files are checked by size. Raises PermissionDenied when
    ``repair`` is asked of a store this process cannot write, StoreError when its lock cannot
    be taken. A store that does not exist is clean.
    """
    report = VerifyReport(store.kind, str(store.root))
    if not store.exists():
        return report
    now = time.time() if now is None else now
    with _exclusive(store, repair, deep) as exclusive:
        if deep:
            _check_blobs(store, report, repair)
        _check_images(store, report, repair, deep)
        _check_index(store, report, repair)
        _check_tmp(store, report, repair, exclusive, now)
    return report


def _check_blobs(store: Store, report: VerifyReport, repair: bool) -> None:
    blobs_dir = store.layout.blobs_dir
    if not blobs_dir.is_dir():
        return
    for algorithm_dir in sorted(blobs_dir.iterdir()):
        if not algorithm_dir.is_dir() or algorithm_dir.is_symlink():
            report.problems.append(Problem(UNKNOWN_FILE, str(algorithm_dir),
                                           "not a digest algorithm directory"))
            _repair_remove(report.problems[-1], algorithm_dir, repair)
            continue
        for entry in sorted(algorithm_dir.iterdir()):
            digest = store.layout.blob_from_name(algorithm_dir.name, entry.name)
            if digest is None or not entry.is_file() or entry.is_symlink():
                report.problems.append(Problem(UNKNOWN_FILE, str(entry), "not a blob (name or type)"))
                _repair_remove(report.problems[-1], entry, repair)
                continue
            try:
                actual, size = hash_file(entry, digest.algorithm)
            except OSError as exc:
                report.problems.append(Problem(CORRUPT_BLOB, str(entry), f"unreadable: {exc.strerror}"))
                _repair_remove(report.problems[-1], entry, repair)
                continue
            report.blobs_checked += 1
            report.bytes_hashed += size
            if actual != digest:
                report.problems.append(Problem(CORRUPT_BLOB, str(entry), f"content hashes to {actual}"))
                _repair_remove(report.problems[-1], entry, repair)


def _check_images(store: Store, report: VerifyReport, repair: bool, deep: bool = True) -> None:
    images_dir = store.layout.images_dir
    if not images_dir.is_dir():
        return
    for entry in sorted(images_dir.iterdir()):
        digest = store.layout.digest_from_image_dir(entry.name)
        if digest is None or not entry.is_dir() or entry.is_symlink():
            report.problems.append(Problem(UNKNOWN_FILE, str(entry), "not an image directory"))
            _repair_remove(report.problems[-1], entry, repair)
            continue
        missing = [name for name in _IMAGE_FILES if not (entry / name).is_file()]
        if missing:
            report.problems.append(Problem(INCOMPLETE_IMAGE, str(entry), f"lacks {', '.join(missing)}"))
            _repair_image(store, report, digest, repair)
            continue
        report.images_checked += 1
        try:
            wrong = _image_fault(store, digest, report, deep)
        except OSError as exc:
            wrong = f"unreadable: {exc.strerror}"
        if wrong:
            # Its missing blobs are still listed (read before the image goes), but come
            # back with the pull that restores its references.
            problem = Problem(CORRUPT_IMAGE, str(entry), wrong)
            try:
                _check_image_blobs(store, digest, report, repair=False)
            except (OSError, ValueError, AttributeError):
                pass
            report.problems.append(problem)
            _repair_image(store, report, digest, repair)
            continue
        _check_image_blobs(store, digest, report, repair)


def _image_fault(store: Store, digest: Digest, report: VerifyReport, deep: bool = True) -> str | None:
    """What is wrong with a complete image directory's files, or None."""
    layout = store.layout
    manifest_bytes = layout.image_manifest(digest).read_bytes()
    if Digest.of(manifest_bytes, digest.algorithm) != digest:
        return "manifest.json does not hash to the image's digest"
    try:
        manifest = parse_json(manifest_bytes, what="manifest.json")
        meta = parse_json(layout.image_meta(digest).read_bytes(), what="image.json")
        config_descriptor = manifest["config"]
        config_digest = Digest.parse(str(config_descriptor["digest"]))
    except (ValueError, KeyError, TypeError):
        return "manifest.json or image.json is malformed"
    if not isinstance(meta, dict):
        return "image.json is not an object"
    config_bytes = layout.image_config(digest).read_bytes()
    if Digest.of(config_bytes, config_digest.algorithm) != config_digest:
        return "config.json does not match the manifest's config digest"
    squashfs = layout.image_squashfs(digest)
    recorded_size = meta.get("squashfs_bytes")
    recorded = meta.get("squashfs_digest")
    if isinstance(recorded, str) and deep:
        try:
            actual, size = hash_file(squashfs, "sha256")
        except OSError as exc:
            return f"image.sqfs is unreadable: {exc.strerror}"
        report.bytes_hashed += size
        if str(actual) != recorded:
            return (f"image.sqfs is {size} bytes hashing to {actual}; recorded "
                    f"{recorded_size} bytes, {recorded}")
        return None
    size = squashfs.stat().st_size
    if isinstance(recorded_size, int) and size != recorded_size:
        return f"image.sqfs is {size} bytes, recorded as {recorded_size}"
    if isinstance(recorded, str):
        return None  # the quick look: the size is all it checks
    with open(squashfs, "rb") as handle:
        head = handle.read(96)
    # The superblock: magic at 0, bytes_used (u64, little endian) at 40 (squashfs format 4.0).
    bytes_used = int.from_bytes(head[40:48], "little") if len(head) >= 48 else -1
    if head[:4] != _SQUASHFS_MAGIC or not 0 < bytes_used <= size:
        return "image.sqfs is not a complete SquashFS file (superblock)"
    if deep:
        report.notes.append(f"{squashfs}: no SHA-256 recorded (published by an older berth): "
                            "checked its size and superblock only")
    return None


def _check_image_blobs(store: Store, digest: Digest, report: VerifyReport, repair: bool) -> None:
    """Every blob a good image uses must be in blobs/; the manifest and config are restored
    from the image's own verified copies, layers are left to the image layer to fetch."""
    layout = store.layout
    manifest = parse_json(layout.image_manifest(digest).read_bytes(), what="manifest.json")
    meta = parse_json(layout.image_meta(digest).read_bytes(), what="image.json")
    local = {digest: layout.image_manifest(digest)}
    config = manifest.get("config") or {}
    needed: list[tuple[Digest, int, str]] = [(digest, layout.image_manifest(digest).stat().st_size, "")]
    for descriptor in [config, *(manifest.get("layers") or [])]:
        try:
            needed.append((Digest.parse(str(descriptor.get("digest"))), int(descriptor.get("size")),
                           str(descriptor.get("mediaType") or "")))
        except (ValueError, TypeError, AttributeError):
            continue
    if needed[1:] and isinstance(config, dict):
        local[needed[1][0]] = layout.image_config(digest)
    index_text = meta.get("index_digest")
    for blob_digest, size, media_type in needed:
        if store.has_blob(blob_digest):
            continue  # a corrupt one is reported (and, repairing, removed) by _check_blobs
        problem = Problem(MISSING_BLOB, str(layout.blob(blob_digest)),
                          f"used by image {digest} but not in the store")
        report.problems.append(problem)
        if not repair:
            continue
        if blob_digest in local:
            store.put_blob_bytes(blob_digest, local[blob_digest].read_bytes())
            problem.repaired = "restored from the image's own copy"
        else:
            report.refetch_blobs.append(BlobNeed(blob_digest, size, media_type, meta.get("source"), problem))
    if isinstance(index_text, str):
        try:
            index_digest = Digest.parse(index_text)
        except ValueError:
            return
        if not store.has_blob(index_digest):
            # The index is only needed to find the image by its index digest, which image.json
            # records too; note it rather than fail the store over it.
            report.notes.append(f"image {digest}: image index blob {index_digest} is not stored "
                                "(pull the image again to restore it)")


def _check_index(store: Store, report: VerifyReport, repair: bool) -> None:
    try:
        references = store.read_index()
    except BerthError as error:
        report.problems.append(Problem(UNREADABLE_INDEX, str(store.layout.index), error.message))
        return
    for key, target in sorted(references.items()):
        digest = Digest.parse(target)
        if store.has_image(digest):
            continue
        problem = Problem(DANGLING_REFERENCE, str(store.layout.index),
                          f"'{key}' names image {digest}, which is not in the store")
        report.problems.append(problem)
        if repair:
            report.refetch_references[key] = problem


def _check_tmp(store: Store, report: VerifyReport, repair: bool, exclusive: bool, now: float) -> None:
    tmp_dir = store.layout.tmp_dir
    if not tmp_dir.is_dir():
        return
    if not os.access(tmp_dir, os.R_OK | os.X_OK):
        # The store's owner's alone (a site store seen by a user: docs/security.md).
        report.notes.append(f"{tmp_dir}: not checked, it belongs to the store's owner")
        return
    for entry in sorted(tmp_dir.iterdir()):
        if entry.name.endswith(".partial") and entry.name.startswith("blob-"):
            report.notes.append(f"{entry}: a partial download, resumed by the next pull of its image")
            continue
        if not exclusive:
            try:
                if now - entry.lstat().st_mtime < STALE_TMP_S:
                    continue  # may belong to a running pull (no lock to tell)
            except FileNotFoundError:
                continue
        report.problems.append(Problem(STRAY_TEMPORARY, str(entry),
                                       "left by a pull, import or removal that did not finish"))
        _repair_remove(report.problems[-1], entry, repair)


def _repair_remove(problem: Problem, path, repair: bool) -> None:
    if not repair:
        return
    _remove_tree(path) if path.is_dir() and not path.is_symlink() else _unlink_quietly(path)
    if not os.path.lexists(path):
        problem.repaired = "removed"


def _repair_image(store: Store, report: VerifyReport, digest: Digest, repair: bool) -> None:
    problem = report.problems[-1]
    if repair:
        # Missing blobs of this image come back with the pull that restores its references.
        for other in report.problems:
            if other.kind == MISSING_BLOB and other.detail.endswith(f"image {digest} but not in the store") \
                    and other.repaired is None:
                other.repaired = "comes back with the image (see its references)"
    if not repair:
        return
    try:
        meta = parse_json(store.layout.image_meta(digest).read_bytes(), what="image.json")
        if isinstance(meta, dict):
            report.removed_meta[str(digest)] = meta
    except (OSError, ValueError):
        pass
    with store.image_lock(digest):
        store.remove_image(digest)
    if not store.layout.image_dir(digest).exists():
        problem.repaired = "removed (its references are rebuilt or pulled again)"
