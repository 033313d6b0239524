"""One content-addressed image store (user or site: same layout, same code; DESIGN.md #4).

Publishing rules (the containers/image PutBlob contract, STYLE.md):
- a blob is streamed into ``tmp/``, hashed and counted while it is written, checked against
  its digest and size, fsynced, then ``os.replace``d into ``blobs/``; a mismatch deletes it;
- an image is converted in a ``tmp/`` directory and renamed whole into ``images/``;
- ``index.json`` (reference -> manifest digest) is rewritten last, atomically, under a lock.
So ``kill -9`` at any moment leaves at worst garbage in ``tmp/``, which the next writer holding
the same lock, or ``prune``, removes.

Locks (berth.locks: flock, released by the kernel when a process dies, every wait bounded by
``lock_timeout_s``), always taken in this order:
``gc`` (shared by writers, exclusive by prune) -> ``blob`` or ``image`` -> ``index``; a pull
that converts while its downloads finish takes ``blob`` locks under the ``image`` lock
(image -> blob), and nothing takes an ``image`` lock while holding a ``blob`` lock.
Readers (find, list, inspect, run) take no lock: everything they read is replaced atomically,
which lets users read a site store they cannot write or lock. Lock files are 0600, so only the
store's owner can hold them (issue 12: users cannot block the site store's writers).

Privacy (docs/security.md): a user store is the user's alone (directories 0700, files 0600,
blobs and images 0400, whatever the umask and wherever it lives); a site store is readable by
everyone (0755, 0644, 0444).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from berth.errors import BerthError, DigestMismatch, NotFound, PermissionDenied, StoreError
from berth import fsutil, locks
from berth.oci.digest import Digest, new_hasher
from berth.record import Record, field
from berth.store.layout import LAYOUT_VERSION, StoreLayout
from berth.untrusted import parse_json

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing costs every `berth run` ~2.5 ms (issue 10)
    from typing import BinaryIO

USER = "user"
SITE = "site"

#: tmp/ entries older than this and not locked are garbage (a crashed pull or import).
STALE_TMP_S = 3600
_CHUNK_BYTES = 1 << 20

class _Modes(Record):
    """Permissions of a store's directories, files and immutable content."""

    dir: int
    file: int
    blob: int  # immutable content: blobs and image files


_MODES = {USER: _Modes(fsutil.PRIVATE_DIR, fsutil.PRIVATE_FILE, 0o400),
          SITE: _Modes(fsutil.PUBLIC_DIR, fsutil.PUBLIC_FILE, 0o444)}


def store_errors(store: "Store", action: str, path: Path | str) -> "_ErrorMapper":
    """Context manager mapping OSError to StoreError / PermissionDenied with a hint."""
    return _ErrorMapper(store, action, Path(path))


class _ErrorMapper:
    def __init__(self, store: "Store", action: str, path: Path) -> None:
        self.store, self.action, self.path = store, action, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, OSError) or isinstance(exc, BerthError):
            return False
        raise self.store.os_error(exc, self.action, self.path) from None


class PruneReport(Record):
    """What a prune removed."""

    images_removed: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    tmp_removed: int = 0
    bytes_freed: int = 0


#: Files and directories a converted image adds to a store: its tmp/ work directory, which
#: becomes images/sha256-HEX/, and image.sqfs, manifest.json, config.json, image.json in it.
_IMAGE_FILES = 5


class Store:
    """A store rooted at ``root``; ``kind`` is "user" or "site" (used in messages and listings).

    Nothing is created on disk until a writing method runs (:meth:`require_writable`).
    """

    def __init__(self, root: Path, kind: str = USER, *,
                 lock_timeout_s: float = locks.DEFAULT_TIMEOUT_S) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        self.kind = kind
        self.layout = StoreLayout(self.root)
        self.modes = _MODES[kind]
        self.lock_timeout_s = lock_timeout_s

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, {self.kind!r})"

    # ----------------------------------------------------------------- errors

    def os_error(self, exc: OSError, action: str, path: Path) -> BerthError:
        """The BerthError a failed file operation on this store becomes."""
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreError(f"no space left on the device while {action} {path} in the {self.kind} store",
                              hint=self._no_space_hint())
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return self._permission_denied(path, reason)
        return StoreError(f"{action} {path} in the {self.kind} store failed: {reason}")

    def _no_space_hint(self) -> str:
        return (f"free space on the file system of {self.root} (`berth prune"
                f"{' --site' if self.kind == SITE else ''}` removes unused images and blobs) "
                "or move the store ("
                + ("site_store setting or BERTH_SITE_STORE" if self.kind == SITE else
                   "user_store setting or BERTH_USER_STORE") + ")")

    def check_room(self, what: str, blobs: list[tuple[Digest, int]],
                   image: tuple[Digest, int] | None = None) -> None:
        """Refuse (StoreError) before any byte comes when what a pull will write does not fit
        the free space (or inodes: one a file) of the store's file system: the blobs of ``blobs``
        (digest and declared size) not stored yet, less what their partial downloads hold, and
        the SquashFS of ``image`` (manifest digest and estimated size), which the conversion
        writes into tmp/ on the same file system, unless that image is stored already. A
        download reads at most the declared size, but a registry declares what it likes: a
        hostile or broken one would fill the file system (the store's, which others share), and
        only then fail."""
        missing = []
        for digest, size in blobs:
            if self.has_blob(digest):
                continue
            try:
                partial = os.stat(self.layout.partial_blob(digest)).st_size
            except OSError:
                partial = 0
            missing.append(max(size - partial, 0))
        image_bytes = image_files = 0
        if image is not None and not self.has_image(image[0]):
            image_bytes, image_files = image[1], _IMAGE_FILES
        where = self.root
        while not where.exists() and where != where.parent:  # a store not made yet: its file system
            where = where.parent
        from berth.config.units import human_size  # the one way sizes are shown to people

        try:
            shortage = fsutil.room_shortage(where, sum(missing) + image_bytes, len(missing) + image_files,
                                            show_size=human_size)
        except OSError:
            return  # the download's own write says what is wrong
        if shortage is None:
            return
        downloads = (f"the registry declares its {len(missing)} blob(s) still to download as "
                     f"{human_size(sum(missing))} (the largest {human_size(max(missing))})" if missing else
                     "nothing is left to download")
        if image is None:
            parts = downloads
        elif image_files:
            parts = (f"{downloads}, and the image's SquashFS is estimated at {human_size(image_bytes)} "
                     "(from its layers' declared sizes)")
        else:
            parts = f"{downloads}; the image's SquashFS is in the store already"
        raise StoreError(
            f"no room to pull {what} into the {self.kind} store {self.root}: {shortage}: {parts}",
            hint=self._no_space_hint() + "; sizes far beyond the image's real size mean the registry serves a "
            "wrong manifest: tell the registry's administrator or the image's maintainer")

    def _permission_denied(self, path: Path, reason: str = "permission denied") -> PermissionDenied:
        if self.kind == SITE:
            return PermissionDenied(
                f"cannot write the site store: {path}: {reason}",
                hint="the site store is managed by administrators: ask your site administrator "
                "to add the image, and use --site only as an admin (without --site berth uses "
                "your own store)",
            )
        return PermissionDenied(
            f"cannot write your image store: {path}: {reason}",
            hint=f"make {self.root} writable by you, or point BERTH_USER_STORE elsewhere",
        )

    # ----------------------------------------------------------------- set-up

    def exists(self) -> bool:
        """Whether the store is there to read. A user store must be the caller's own (a
        directory, or a link of theirs to one): one that another user made or linked, in a
        shared directory, would have the caller run that user's images. Raises
        PermissionDenied for such a store."""
        if self.kind != USER:
            return self.root.is_dir()
        try:
            fsutil.check_own_dir(self.root)
        except PermissionError as exc:
            if exc.strerror == "not a directory":
                return False
            raise PermissionDenied(f"your image store {self.root} is not yours: {exc.strerror}",
                                   hint="someone else made it or linked it there: berth will not use images from "
                                        "it; remove it, or point BERTH_USER_STORE (user_store) elsewhere") from None
        except OSError:
            return False
        return True

    def require_writable(self) -> None:
        """Create the layout if needed and check that this process may write it.

        Raises PermissionDenied (naming the path; for the site store: ask the administrator)
        before any network traffic, so a refused pull costs nothing.
        """
        layout = self.layout
        modes = self.modes
        if self.kind == USER:
            # Private whatever the umask and wherever the store lives, parents berth creates
            # (~/.local, ~/.local/share) included; an older 0755 store is closed (issue 12).
            with store_errors(self, "creating", self.root):
                fsutil.ensure_private_dir(self.root)
        # Nobody but the store's owner needs tmp/ and locks/: readers take no lock.
        dirs = [(self.root, modes.dir), (layout.blobs_dir, modes.dir), (layout.blobs_dir / "sha256", modes.dir),
                (layout.images_dir, modes.dir), (layout.tmp_dir, fsutil.PRIVATE_DIR),
                (layout.locks_dir, fsutil.PRIVATE_DIR)]
        for path, mode in dirs:
            if path.is_dir():
                if not os.access(path, os.W_OK | os.X_OK):
                    raise self._permission_denied(path)
                if mode == fsutil.PRIVATE_DIR and path != self.root:
                    with store_errors(self, "securing", path):
                        _close_if_ours(path)
                continue
            with store_errors(self, "creating", path):
                try:
                    path.mkdir(mode=mode, parents=path == self.root)
                except FileExistsError:
                    pass
                os.chmod(path, mode)
        if not layout.version_file.exists():
            self._write_file_atomic(layout.version_file, f"{LAYOUT_VERSION}\n".encode())

    # ------------------------------------------------------------------ locks

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Held by every writer for its whole duration (shared); prune excludes them all."""
        self.require_writable()
        with self.lock(self.layout.gc_lock, "writers of the store against prune", shared=True):
            yield

    @contextmanager
    def lock(self, path: Path, purpose: str, *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
        """Hold one of the store's locks (berth.locks: bounded wait, 0600 lock file). Yields
        False instead of waiting when ``blocking`` is False and someone else holds it."""
        with store_errors(self, "opening lock file", path):
            fd = locks.open_lock_file(path)
        try:
            if blocking:
                locks.acquire(fd, path, shared=shared, timeout_s=self.lock_timeout_s,
                              purpose=f"{purpose}, {self.kind} store")
                yield True
            else:
                yield locks.try_acquire(fd, shared=shared)
        finally:
            os.close(fd)  # releases the lock

    def blob_lock(self, digest: Digest):
        return self.lock(self.layout.blob_lock(digest), f"blob {digest}")

    def image_lock(self, digest: Digest, *, blocking: bool = True):
        return self.lock(self.layout.image_lock(digest), f"image {digest}", blocking=blocking)

    # ------------------------------------------------------------------ blobs

    def has_blob(self, digest: Digest) -> bool:
        return self.layout.blob(digest).is_file()

    def blob_path(self, digest: Digest) -> Path:
        return self.layout.blob(digest)

    def blob_size(self, digest: Digest) -> int:
        return self.layout.blob(digest).stat().st_size

    def read_blob(self, digest: Digest) -> bytes:
        try:
            return self.layout.blob(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the {self.kind} store at {self.root}",
                           hint="something removed it from the store: pull the image again") from None

    def put_blob_bytes(self, digest: Digest, data: bytes) -> None:
        """Store small verified content (manifests, configs). Idempotent."""
        if self.has_blob(digest):
            return
        with self.blob_lock(digest):
            if self.has_blob(digest):
                return
            writer = BlobWriter(self, digest, len(data), resume=False)
            try:
                writer.write(data)
                writer.commit()
            finally:
                writer.close()

    @contextmanager
    def blob_download(self, digest: Digest, size_bytes: int) -> Iterator["BlobWriter | None"]:
        """Hold the blob's lock; yield None when the blob is already stored, else a writer.

        The writer resumes a partial download left in tmp/ (its content is re-hashed) and
        the caller continues from ``writer.offset``. A partial file left on failure is kept
        for the next attempt (resuming), except after a digest mismatch, where it is removed.
        Other processes wanting the same blob wait on the lock and then find it stored.
        """
        with self.blob_lock(digest):
            if self.has_blob(digest):
                stored_size = self.blob_size(digest)
                if stored_size == size_bytes:
                    yield None
                    return
                path = self.blob_path(digest)
                with store_errors(self, "reading", path):
                    intact = hash_file(path, digest.algorithm)[0] == digest
                if intact:
                    # Verified content of that digest has this size: the descriptor lies
                    # (a hostile manifest must not make the store drop a blob others use).
                    raise DigestMismatch(
                        f"the manifest announces blob {digest} as {size_bytes} bytes, but that "
                        f"blob is {stored_size} bytes",
                        hint="the image's manifest is wrong: tell the registry's administrator "
                        "or the image's maintainer")
                # Damaged on disk (it was verified before publishing): download it again.
                with store_errors(self, "removing corrupt blob", path):
                    os.unlink(path)
            writer = BlobWriter(self, digest, size_bytes, resume=True)
            try:
                yield writer
            finally:
                writer.close()

    def add_blob_file(self, source: BinaryIO, *, digest: Digest | None = None,
                      size_bytes: int | None = None) -> tuple[Digest, int]:
        """Copy a stream into the store, hashing it; verify it when digest/size are given.

        Returns (digest, size). Used by import, which learns digests by hashing.
        """
        tmp_path = self._new_tmp_path(self.layout.import_prefix(), ".blob")
        algorithm = digest.algorithm if digest else "sha256"
        hasher = new_hasher(algorithm)
        size = 0
        try:
            with store_errors(self, "writing", tmp_path), open(tmp_path, "wb") as out:
                while chunk := source.read(_CHUNK_BYTES):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = Digest(algorithm, hasher.hexdigest())
            if digest is not None and actual != digest:
                raise DigestMismatch(f"content announced as {digest} has digest {actual}")
            if size_bytes is not None and size != size_bytes:
                raise DigestMismatch(f"content {actual} is {size} bytes, announced as {size_bytes}")
            with self.blob_lock(actual):
                if not self.has_blob(actual):
                    self._publish_file(tmp_path, self.layout.blob(actual), self.modes.blob)
            return actual, size
        finally:
            _unlink_quietly(tmp_path)

    def _publish_file(self, tmp_path: Path, final: Path, mode: int) -> None:
        with store_errors(self, "publishing", final):
            if not final.parent.is_dir():
                final.parent.mkdir(mode=self.modes.dir, exist_ok=True)
                os.chmod(final.parent, self.modes.dir)
            fsutil.publish_file(tmp_path, final, mode)

    def list_blobs(self) -> list[Digest]:
        found = []
        if not self.layout.blobs_dir.is_dir():
            return found
        for algorithm_dir in self.layout.blobs_dir.iterdir():
            for entry in algorithm_dir.iterdir() if algorithm_dir.is_dir() else ():
                digest = self.layout.blob_from_name(algorithm_dir.name, entry.name)
                if digest is not None:
                    found.append(digest)
        return found

    # ----------------------------------------------------------------- images

    def has_image(self, digest: Digest) -> bool:
        """True when the image is complete (its directory is renamed in whole, so the
        metadata file exists exactly when everything does)."""
        return self.layout.image_meta(digest).is_file()

    def list_images(self) -> list[Digest]:
        """Every complete image (see :meth:`has_image`), sorted."""
        return [digest for digest in self.list_images_any() if self.has_image(digest)]

    def load_image_files(self, digest: Digest) -> tuple[dict, dict, dict]:
        """(manifest, config, metadata) of a stored image; StoreError if unreadable."""
        layout = self.layout
        try:
            manifest = parse_json(layout.image_manifest(digest).read_bytes(), what="manifest.json")
            config = parse_json(layout.image_config(digest).read_bytes(), what="config.json")
            meta = parse_json(layout.image_meta(digest).read_bytes(), what="image.json")
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"image {digest} in the {self.kind} store at {self.root} is unreadable: {exc}",
                hint="remove it with `berth rmi` and pull it again"
                + (" (ask your site administrator)" if self.kind == SITE else ""),
            ) from None
        return manifest, config, meta

    @contextmanager
    def image_workdir(self, digest: Digest) -> Iterator[Path]:
        """A fresh tmp/ directory to convert an image in; the caller holds the image lock.

        Leftovers of earlier crashed conversions of the same image are removed first (only
        the lock holder converts this image, so they are garbage). The directory is removed
        when the block ends unless :meth:`publish_image` moved it into images/.
        """
        prefix = self.layout.image_workdir_prefix(digest)
        tmp_dir = self.layout.tmp_dir
        for entry in tmp_dir.iterdir():
            if entry.name.startswith(prefix):
                _remove_tree(entry)
        path = tmp_dir / f"{prefix}{os.urandom(4).hex()}"
        with store_errors(self, "creating", path):
            path.mkdir(mode=fsutil.PRIVATE_DIR)
        try:
            yield path
        finally:
            if path.exists():
                _remove_tree(path)

    def publish_image(self, workdir: Path, digest: Digest, *, manifest_bytes: bytes,
                      config_bytes: bytes, meta: dict) -> None:
        """Write the image's JSON files into ``workdir`` (which holds image.sqfs already) and
        rename it into images/ in one step. The caller holds the image lock.

        ``image.json`` gets ``squashfs_digest``, the SHA-256 of image.sqfs, besides ``meta``."""
        layout = self.layout
        final = layout.image_dir(digest)
        squashfs = workdir / layout.image_squashfs(digest).name

        def write(name: str, data: bytes) -> None:
            # With its final mode before the fsync, which then makes both durable at once.
            with open(workdir / name, "wb") as out:
                os.fchmod(out.fileno(), self.modes.file)
                out.write(data)
                out.flush()
                os.fsync(out.fileno())

        with store_errors(self, "writing image files in", workdir):
            os.chmod(squashfs, self.modes.blob)  # before its fsync, for the same reason
        # Recorded so that `berth store verify` can tell a damaged SquashFS from a good one
        # (blobs are named by their digest; the SquashFS is not: issue 8). The end of a pull
        # is one core's work: the manifest and config are written and fsynced by a thread
        # while the image is hashed (and fsynced), not after (issue 10, target 4).
        import threading  # lazily: `berth run` never publishes (start-up time, issue 10)

        failures: list[OSError] = []

        def write_copies() -> None:
            try:
                write(layout.image_manifest(digest).name, manifest_bytes)
                write(layout.image_config(digest).name, config_bytes)
            except OSError as exc:
                failures.append(exc)

        copies = threading.Thread(target=write_copies, name="berth-publish", daemon=True)
        copies.start()
        try:
            with store_errors(self, "reading", squashfs):
                squashfs_digest = hash_file(squashfs, sync=True)[0]
        finally:
            copies.join()
        meta = {**meta, "squashfs_digest": str(squashfs_digest)}
        with store_errors(self, "writing image files in", workdir):
            if failures:
                raise failures[0]
            write(layout.image_meta(digest).name, json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n")
            os.chmod(workdir, self.modes.dir)
            fsutil.fsync_directory(workdir)
        if final.exists():
            # Complete already (renames are atomic): nothing to do.
            return
        with store_errors(self, "publishing", final):
            os.rename(workdir, final)
            fsutil.fsync_directory(layout.images_dir)

    def remove_image(self, digest: Digest) -> int:
        """Remove an image directory (caller holds its lock); returns bytes freed.

        The directory is renamed into tmp/ first, so a crash part-way leaves no half image.
        """
        final = self.layout.image_dir(digest)
        if not final.exists():
            return 0
        size = _tree_size(final)
        trash = self._new_tmp_path(self.layout.trash_prefix(), "")
        with store_errors(self, "removing", final):
            os.rename(final, trash)
        _remove_tree(trash)
        return size

    # ------------------------------------------------------------------ index

    def read_index(self) -> dict[str, str]:
        """reference -> manifest digest (strings). Empty when the store has no index yet."""
        path = self.layout.index
        try:
            data = parse_json(path.read_bytes(), what="index.json")
        except FileNotFoundError:
            return {}
        except PermissionError:
            raise PermissionDenied(
                f"cannot read the {self.kind} store index {path}: permission denied",
                hint="ask your site administrator to make the site store readable by users "
                "(directories 0755, files 0644)" if self.kind == SITE else
                f"make {self.root} readable by you, or point BERTH_USER_STORE elsewhere",
            ) from None
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"the {self.kind} store index {path} is unreadable: {exc}",
                hint="the file is written atomically by berth; something else changed it: "
                "restore it or remove it (then re-tag images by pulling them again)",
            ) from None
        references = data.get("references") if isinstance(data, dict) else None
        if not isinstance(references, dict):
            raise StoreError(f"the {self.kind} store index {path} has no 'references' object",
                             hint="the file is written by berth only: restore it or remove it (then "
                             "re-tag images by pulling them again)")
        for key, value in references.items():
            try:
                Digest.parse(str(value))
            except ValueError:
                raise StoreError(f"the {self.kind} store index {path} maps '{key}' to '{value}', "
                                 "which is not a digest",
                                 hint="the file is written by berth only: restore it or remove "
                                 "that entry") from None
        return {str(k): str(v) for k, v in references.items()}

    def update_index(self, change: Callable[[dict[str, str]], None]) -> dict[str, str]:
        """Apply ``change`` to the references under the index lock and write the result
        atomically (temp file, fsync, rename). Returns the new references."""
        with self.lock(self.layout.index_lock, "the index of references"):
            references = self.read_index()
            change(references)
            data = {"layout": LAYOUT_VERSION, "references": dict(sorted(references.items()))}
            self._write_file_atomic(self.layout.index,
                                    json.dumps(data, indent=2).encode() + b"\n")
            return references

    def set_reference(self, reference: str, digest: Digest) -> None:
        self.update_index(lambda refs: refs.__setitem__(reference, str(digest)))

    def name_image(self, reference: str, digest: Digest) -> bool:
        """Name the stored image ``digest`` ``reference`` in the index, under the image's lock
        (no removal comes between the look and the name); False when it is not stored."""
        if not self.has_image(digest):
            return False
        with self.image_lock(digest):
            if not self.has_image(digest):
                return False
            self.set_reference(reference, digest)
        return True

    def record_step_pull_failure(self, step: str, message: str) -> None:
        """Tell the other nodes of Slurm step ``step`` that this node's pull failed (best
        effort: they wait out lock_timeout_s when this cannot be written)."""
        try:
            self.require_writable()
            self._write_file_atomic(self.layout.step_pull_failure(step), message.encode()[:4000])
        except (BerthError, OSError):
            pass

    def step_pull_failure(self, step: str, newer_than: float) -> str | None:
        """The failure another node recorded for step ``step`` since ``newer_than`` (a time
        stamp: an older record is of an earlier cluster's job that had the same id), else None."""
        path = self.layout.step_pull_failure(step)
        try:
            if os.stat(path).st_mtime < newer_than:
                return None
            return path.read_bytes()[:4000].decode(errors="replace")
        except OSError:
            return None

    def _write_file_atomic(self, final: Path, data: bytes) -> None:
        # Staged in tmp/ (same file system, so the rename is atomic), where prune finds crash leftovers.
        with store_errors(self, "writing", final):
            fsutil.write_atomically(final, data, mode=self.modes.file, staging_dir=self.layout.tmp_dir)

    def _new_tmp_path(self, prefix: str, suffix: str) -> Path:
        return self.layout.tmp_dir / f"{prefix}{os.getpid()}-{os.urandom(6).hex()}{suffix}"

    # ------------------------------------------------------------------ prune

    def prune(self, *, now: float | None = None) -> PruneReport:
        """Remove images no reference names, blobs no stored image uses, and tmp/ entries
        older than STALE_TMP_S that nobody holds (crashed pulls, conversions, imports).

        Takes the gc lock exclusively: it waits for running pulls and imports to finish,
        and none starts while it runs, so nothing it removes is in use.
        """
        now = time.time() if now is None else now
        self.require_writable()
        images_removed: list[str] = []
        freed = 0
        blobs_removed = 0
        tmp_removed = 0
        with self.lock(self.layout.gc_lock, "prune against writers of the store"):
            referenced_images = {v for v in self.read_index().values()}
            kept_blobs: set[Digest] = set()
            for digest in self.list_images_any():
                if str(digest) in referenced_images:
                    kept_blobs |= self._blobs_of_image(digest)
                    continue
                with self.image_lock(digest, blocking=False) as held:
                    if held and str(digest) not in set(self.read_index().values()):
                        freed += self.remove_image(digest)
                        images_removed.append(str(digest))
                    else:
                        kept_blobs |= self._blobs_of_image(digest)
            for digest in self.list_blobs():
                if digest in kept_blobs:
                    continue
                path = self.layout.blob(digest)
                try:
                    size = path.stat().st_size
                    with store_errors(self, "removing", path):
                        path.unlink()
                except FileNotFoundError:
                    continue
                freed += size
                blobs_removed += 1
            # No writer runs now (they hold the gc lock shared), so no one holds or waits
            # on the lock files of content that is gone: remove them too.
            for entry in list(self.layout.locks_dir.iterdir()):
                if self._orphan_lock(entry.name):
                    _unlink_quietly(entry)
            for entry in list(self.layout.tmp_dir.iterdir()):
                try:
                    age_s = now - entry.lstat().st_mtime
                except FileNotFoundError:
                    continue
                if entry.name.startswith(self.layout.trash_prefix()) or age_s > STALE_TMP_S:
                    size = _tree_size(entry)
                    _remove_tree(entry)
                    freed += size
                    tmp_removed += 1
        return PruneReport(images_removed, blobs_removed, tmp_removed, freed)

    def _orphan_lock(self, name: str) -> bool:
        """Whether ``name`` in locks/ is the lock of a blob or image no longer stored."""
        for kind, present in (("blob-", self.has_blob), ("image-", self.has_image)):
            if name.startswith(kind) and name.endswith(".lock"):
                algorithm, sep, hex_part = name[len(kind):-len(".lock")].partition("-")
                digest = self.layout.blob_from_name(algorithm, hex_part) if sep else None
                return digest is not None and not present(digest)
        return False

    def list_images_any(self) -> list[Digest]:
        """Every images/ entry that names a digest, complete or not."""
        if not self.layout.images_dir.is_dir():
            return []
        found = []
        for entry in self.layout.images_dir.iterdir():
            digest = self.layout.digest_from_image_dir(entry.name)
            if digest is not None:
                found.append(digest)
        return sorted(found)

    def _blobs_of_image(self, digest: Digest) -> set[Digest]:
        """The blobs a stored image uses: its manifest, config, layers (and its index)."""
        used = {digest}
        try:
            manifest = parse_json(self.layout.image_manifest(digest).read_bytes(), what="manifest.json")
            meta = parse_json(self.layout.image_meta(digest).read_bytes(), what="image.json")
        except (OSError, ValueError):
            return used
        descriptors = [manifest.get("config") or {}, *(manifest.get("layers") or [])]
        for text in [d.get("digest") for d in descriptors if isinstance(d, dict)] + [meta.get("index_digest")]:
            if isinstance(text, str):
                try:
                    used.add(Digest.parse(text))
                except ValueError:
                    pass
        return used


class BlobWriter:
    """Streams one blob into tmp/, hashing and counting as it goes (see Store.blob_download).

    ``write`` raises DigestMismatch as soon as more bytes arrive than announced; ``commit``
    checks size and digest, fsyncs and renames into blobs/. A mismatch removes the partial file.

    The one hash of a blob is this writer's (issue 10, target 4: a pull hashed a layer twice,
    here and again where it converts the layer while it downloads). A reader of the partial
    file in the same process (pull._FollowedBlob) may take the bytes it read for the verified
    blob without hashing them, by this rule: between two starts over, the partial file only
    grows, every byte of it hashed by this writer (read back when resuming, else hashed as
    written); every way of starting over (:meth:`restart`, :meth:`discard`) first adds one to
    :attr:`generation`; :meth:`commit` records in :attr:`verified_generation` the generation
    whose bytes matched the digest (before its fsync and rename). So a reader that notes
    ``generation`` before it opens :attr:`path`, reads from that one opening, and then finds
    ``verified_generation`` equal to the noted value, read a prefix of the verified blob (the
    whole blob when it read ``size_bytes`` bytes). Nothing but this writer writes the file: it
    lies in the store's tmp/, which only the store's owner may enter, under the blob's lock.
    Another process of the owner could still change bytes between their write and the
    reader's splice, and the conversion would then not be of the hashed bytes. Left so, by
    decision (docs/security.md, "the layer pump"): hashing what is converted is the second
    SHA-256 pass issue 10 removed (0.86 s of CPU per GiB here), and an unnamed file (O_TMPFILE)
    guards nothing against the same user (/proc/PID/fd opens it; ptrace reads berth's memory)
    while it loses the partial file a killed pull resumes from. The owner can rewrite the
    published blobs and SquashFS files of the store just as well: its own processes are inside
    its trust boundary, not an attacker berth can stop.
    (The blob itself is published only by a commit that also fsynced and renamed it.)
    """

    def __init__(self, store: Store, digest: Digest, size_bytes: int, *, resume: bool) -> None:
        self.store = store
        self.digest = digest
        self.size_bytes = size_bytes
        self.path = store.layout.partial_blob(digest)
        self._hasher = digest.hasher()
        self.offset = 0
        #: Starts over so far (see the class docstring); bumped before the file changes.
        self.generation = 0
        #: The generation whose bytes matched the digest; None until then.
        self.verified_generation: int | None = None
        with store_errors(store, "writing", self.path):
            info = self.path.stat() if resume and self.path.is_file() else None
            if info is not None and info.st_size <= size_bytes:
                # A pull killed between publishing's chmod (read-only) and its rename leaves
                # the whole blob here read-only: the file is ours, in our private tmp/.
                if not info.st_mode & stat.S_IWUSR:
                    os.chmod(self.path, fsutil.PRIVATE_FILE)
                self._file = open(self.path, "r+b")
                while chunk := self._file.read(_CHUNK_BYTES):
                    self._hasher.update(chunk)
                    self.offset += len(chunk)
            else:
                self._file = open(self.path, "w+b")

    @property
    def complete(self) -> bool:
        return self.offset == self.size_bytes

    def restart(self) -> None:
        """Start over from byte 0 (the registry ignored a Range request)."""
        self.generation += 1  # before the file shrinks: a reader of it must see one or the other
        with store_errors(self.store, "writing", self.path):
            if self._file.closed:
                self._file = open(self.path, "w+b")
            self._file.seek(0)
            self._file.truncate()
        self._hasher = self.digest.hasher()
        self.offset = 0

    def write(self, chunk: bytes) -> None:
        if self.offset + len(chunk) > self.size_bytes:
            self.discard()
            raise DigestMismatch(
                f"blob {self.digest} is longer than the {self.size_bytes} bytes its descriptor announces",
                hint="the registry serves content that does not match the manifest: "
                "tell the registry's administrator or the image's maintainer",
            )
        try:
            with store_errors(self.store, "writing", self.path):
                self._file.write(chunk)
                # In the file, not in the buffer, before it counts: a reader of the partial file
                # (pull._FollowedBlob) otherwise waited for a short last chunk until commit.
                self._file.flush()
        except StoreError:
            # Disk full or similar: a partial file is no use to anyone and holds the space.
            self.discard()
            raise
        self._hasher.update(chunk)
        self.offset += len(chunk)

    def commit(self, *, verified: Callable[[], None] | None = None) -> None:
        """Verify and publish; raises DigestMismatch (partial removed) or StoreError.
        ``verified`` is called once the bytes matched the digest, before the fsync."""
        if not self.complete:
            raise StoreError(f"blob {self.digest}: commit after {self.offset} of {self.size_bytes} bytes",
                             hint="this is a bug in berth: report it to berth's maintainers")
        actual = Digest(self.digest.algorithm, self._hasher.hexdigest())
        if actual != self.digest:
            self.discard()
            raise DigestMismatch(
                f"blob {self.digest} does not match its digest: the content received hashes to {actual}",
                hint="the registry serves corrupt content for this image: tell the registry's "
                "administrator or the image's maintainer; nothing was stored",
            )
        self.verified_generation = self.generation
        if verified is not None:
            verified()
        try:
            with store_errors(self.store, "writing", self.path):
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            self.store._publish_file(self.path, self.store.layout.blob(self.digest), self.store.modes.blob)
        except StoreError:
            self.discard()
            raise

    def discard(self) -> None:
        self.generation += 1
        self.close()
        _unlink_quietly(self.path)

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass


def _close_if_ours(path: Path) -> None:
    """chmod 0700 a directory of ours that group or others may enter (made by an earlier berth).
    One of another account's that we may write (root administering a service account's site
    store) is left as it is."""
    info = os.stat(path)
    if info.st_uid == os.getuid() and info.st_mode & 0o077:
        os.chmod(path, fsutil.PRIVATE_DIR)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def hash_file(path: os.PathLike | str, algorithm: str = "sha256", *, sync: bool = False) -> tuple[Digest, int]:
    """(digest, size) of the file at ``path``, read in chunks (SHA-256 unless ``algorithm``
    says): the one file hash of the store and of ``berth store verify``. With ``sync``, the file is also fsynced, in a
    thread while it is hashed: both release the GIL, and the fsync of a fresh image (what is
    left to write and the device's cache flush; SquashfsWriter writes most of it back while
    tar2sqfs runs) and its hash (~0.08 s for 116 MB) then cost the longer of the two instead
    of their sum (issue 10, target 4;
    bench/RESULTS.md "Pull + convert, the Python pass and the durability overlap").
    Raises the fsync's OSError after the hash."""
    hasher = new_hasher(algorithm)
    with open(path, "rb") as handle:
        syncing = None
        failure: list[OSError] = []
        if sync:
            import threading  # lazily: `berth run` never publishes (start-up time, issue 10)

            def fsync() -> None:
                try:
                    os.fsync(handle.fileno())
                except OSError as exc:
                    failure.append(exc)

            syncing = threading.Thread(target=fsync, name="berth-fsync", daemon=True)
            syncing.start()
        # One buffer read into again and again: no fresh megabyte per chunk for malloc to keep
        # (the peak memory of a pull is a tested bound: tests/integration/test_pull.py).
        buffer = bytearray(_CHUNK_BYTES)
        view = memoryview(buffer)
        size = 0
        try:
            while count := handle.readinto(buffer):
                hasher.update(view[:count])
                size += count
        finally:
            if syncing is not None:
                syncing.join()
        if failure:
            raise failure[0]
    return Digest(algorithm, hasher.hexdigest()), size


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil  # writers only: keep readers' (berth run's) imports light

        # Image content is read-only (0444 files); directories we created stay writable.
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)


def _tree_size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
