"""Node-local copies of images: the SquashFS file (site setting ``stage_to_local``) and the
unpacked tree (site setting ``image_mount = "unpacked"``).

By default every node mounts the image's SquashFS straight from the (shared) store: one file
read per node, no registry traffic. Sites whose shared filesystem is slow for the small random
reads of a running program set ``stage_to_local = true``: the first container of an image on a
node copies the file once into the caller's node-local state directory, and every later
container (MPI ranks on that node included) mounts the copy.

The copy is verify-then-rename: written under an exclusive lock to a temporary name, its size
compared with the source, then renamed into place; a copy whose size or modification time no
longer matches the source is replaced. Copies unused for ``STALE_S`` are removed when another
copy is made, so the directory does not grow without bound.

**Unpacked copies** (issue 10, target 2): the FUSE read path costs 1.5-2.8x a plain directory on
a metadata-heavy workload (bench/RESULTS.md, import storm), and a kernel SquashFS mount needs
privilege. With ``image_mount = "unpacked"`` the first container of an image on a node unpacks
its SquashFS once with ``unsquashfs`` into the caller's state directory, and every later
container of the user (later jobs too) binds that tree read-only as its root::

    STATE_DIR/unpacked/              0700: no other user reaches a copy (site images included)
      KEY/info.json                  what was unpacked, from what, in which boot
      KEY/root/                      the image's tree, owned by the caller
      KEY.lock                       flock: shared by every container using KEY (and by its
                                     maker) for its whole life, exclusive only to remove KEY
      KEY.maker                      flock: exclusive while KEY is made (makers take turns)
      .tmp-KEY-RANDOM/               a copy being made (never used; removed under KEY.maker)

Making takes a lock of its own: a maker waiting for KEY.lock exclusively would wait for every
running container holding it shared (a whole job's length; found as a hang of two of four
containers started at once). Made like the file copy: into a temporary name, renamed into place
when ``unsquashfs`` succeeded, so a name ``KEY`` always holds a whole copy and a ``kill -9``
leaves only a temporary directory that the next maker (or ``berth prune``) removes. The copy is
not fsynced (as the file copy is not): ``info.json`` names the boot it was made in, and a copy
from another boot is made again, so a node crash cannot leave a half-written tree in use.
Before unpacking, the listing's sizes are checked against the free space and inodes of the
state directory's file system (:class:`~berth.errors.InsufficientSpace`; the caller falls back
to the FUSE mount). Copies nobody uses (their lock free) and unused for ``STALE_S`` are removed
when another copy is made; ``berth prune`` removes every unused one (:func:`prune_local`).

What the container sees (tests/integration/test_unpacked_images.py): the same names, types,
modes, sizes, link targets and times as through squashfuse; device nodes are left out (an
unprivileged ``mknod`` fails; through squashfuse they are unusable anyway: FUSE mounts are
``nodev``; any that root's ``unsquashfs`` made are removed before the copy is renamed into
place) and so are extended attributes. Owners differ: every file belongs to the caller
(as with ``--writable``'s squashed overlay), where squashfuse shows the SquashFS's owners
(root as ``nobody`` in the container). Access is not widened by that: squashfuse_ll checks no
permissions at all (every file of the image is readable through it), and the tree is bound
read-only. Setuid bits stay but mean nothing: the files are the caller's own and the container
runs with ``no_new_privs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import time
from pathlib import Path

from berth import fsutil, locks, proc
from berth.errors import InsufficientSpace, ProgramFailed, RuntimeFailure
from berth.namedtuple import NamedTuple
from berth.runtime.imagemount import source_key
from berth.untrusted import read_json_object

IMAGES = "images"
UNPACKED = "unpacked"
STALE_S = 7 * 24 * 3600
#: Room left free beyond the estimate of an unpacked copy: a fraction of it (bytes and inodes)
#: and a constant (bytes); see fsutil.room_shortage.
SPACE_MARGIN = (0.05, 16 << 20)
BLOCK = 4096


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
        name, source_info = source_key(source, digest)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        copy = directory / f"{name}.sqfs"
        if _is_current(copy, source_info):
            os.utime(copy, ns=(time.time_ns(), source_info.st_mtime_ns))
            return copy
        lock = directory / f"{name}.lock"
        # Ranks starting together copy once; the wait is bounded (a stuck copy is named).
        with locks.file_lock(lock, timeout_s=lock_timeout_s, must_hold=True,
                             purpose=f"node-local copy of {source}"):
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
        _remove_stale(directory, copy)
        return copy
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot copy the image {source} to node-local storage {directory}: {exc.strerror}",
            hint="free space in the state directory (berth doctor shows it) or ask your site "
            "administrator to turn off stage_to_local",
        ) from None


def _remove_stale(directory: Path, keep: Path | None, older_than_s: float = STALE_S) -> list[tuple[str, int]]:
    """Remove file copies other than ``keep`` unused for ``older_than_s`` and not being made
    right now (their lock free); returns ``(path, bytes)`` of each removed."""
    now = time.time()
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.endswith(".sqfs") and entry.path != str(keep):
            try:
                info = entry.stat(follow_symlinks=False)
                if now - info.st_atime < older_than_s:
                    continue
                with locks.file_lock(directory / (entry.name[:-len(".sqfs")] + ".lock"), timeout_s=0) as held:
                    if held:
                        os.unlink(entry.path)
                        removed.append((entry.path, info.st_size))
            except OSError:
                pass
    return removed


class UnpackedImage:
    """One container's use of an unpacked copy: ``root`` is the image's root directory; the
    shared lock on the copy's lock file (``lock_fd``) keeps prune and eviction away from it
    until :meth:`release` (or the death of this process)."""

    __slots__ = ("directory", "root", "lock_fd")

    def __init__(self, directory: Path, lock_fd: int) -> None:
        self.directory = directory
        self.root = directory / "root"
        self.lock_fd = lock_fd

    def release(self) -> bool:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        return False


def unpacked_copy(state_dir: Path, source: Path, digest: object | None = None, *,
                  lock_timeout_s: float = locks.DEFAULT_TIMEOUT_S, log=None) -> UnpackedImage:
    """The caller's unpacked copy of the SquashFS ``source`` on this node (made once; see the
    module docstring), held for the caller until ``release``.

    Raises InsufficientSpace (nothing written) when the state directory's file system lacks
    room, LockError when another maker holds the copy's lock beyond ``lock_timeout_s``,
    RuntimeFailure when the copy cannot be made (unsquashfs failed, disk full meanwhile...)."""
    base = Path(state_dir) / UNPACKED
    try:
        name, source_info = source_key(source, digest)
        fsutil.make_private_dirs(base)
        directory = base / name
        lock_path = base / f"{name}.lock"
        fd = locks.open_lock_file(lock_path)
    except OSError as exc:
        raise RuntimeFailure(f"cannot prepare the unpacked copy of {source} in {base}: {exc.strerror}",
                             hint="check the state directory (berth doctor shows it)") from None
    made = False
    try:
        while True:
            # Shared: containers of the image run side by side; exclusive only to make it.
            locks.acquire(fd, lock_path, shared=True, timeout_s=lock_timeout_s,
                          purpose=f"the unpacked copy of {source}")
            if not _still_named(fd, lock_path):  # prune removed it while this berth waited
                os.close(fd)
                fd = locks.open_lock_file(lock_path)
                continue
            if _is_complete(directory):
                os.utime(lock_path)  # the copy's last use, for eviction
                if log:
                    log(f"{'unpacked the image into' if made else 'using the unpacked copy'} {directory / 'root'}",
                        debug=True)
                hold = UnpackedImage(directory, fd)
                break
            # Make it, still holding the use lock shared (prune stays away) and the maker lock
            # exclusively (one maker at a time; a copy in use is complete, so never removed here).
            with locks.file_lock(base / f"{name}.maker", timeout_s=lock_timeout_s, must_hold=True,
                                 purpose=f"making the unpacked copy of {source}"):
                if not _is_complete(directory):
                    _remove_unpacked(base, name)  # a copy of another boot, a crashed maker's leftovers
                    _unpack(base, name, source, source_info)
                    made = True
    except BaseException:
        os.close(fd)
        raise
    if made:
        prune_unpacked(base, older_than_s=STALE_S)
    return hold


def _still_named(fd: int, path: Path) -> bool:
    """Whether the lock file open as ``fd`` is still the one ``path`` names (prune removes a
    copy's lock file, under the lock, with the copy)."""
    try:
        held, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a whole copy made in this boot (see the module docstring)."""
    record = read_json_object(directory / "info.json")
    return bool(record) and record.get("boot_id") == _boot_id() and os.path.isdir(directory / "root")


#: One line of ``unsquashfs -lln``: mode, owner, size (``MAJOR, MINOR`` for devices), date, time, path.
_LISTING_LINE = (r"(?P<mode>[-dlcbps][-rwxsStT]{9}) \S+\s+(?P<size>\d+|\d+,\s*\d+) "
                           r"\d{4}-\d\d-\d\d \d\d:\d\d squashfs-root(?P<path>/.*)?")  # compiled when used, not at import


class Listing(NamedTuple):
    """What ``unsquashfs -lln`` says about an image: the bytes and inodes its unpacked tree
    needs (whole blocks per file), its device nodes, and its setuid/setgid entries with their
    modes (paths relative to the image's root)."""

    size_bytes: int
    inodes: int
    devices: list[str]
    setid_modes: list[tuple[str, int]]


def _mode_bits(text: str) -> int:
    """``rwsr-xr-x`` -> 0o4755 (``ls -l`` permission letters, setuid/setgid/sticky included)."""
    bits = 0
    for index, letter in enumerate(text):
        if letter in "rwxst":
            bits |= 1 << (8 - index)
        if letter in "sS" and index in (2, 5):
            bits |= 0o4000 if index == 2 else 0o2000
        if letter in "tT" and index == 8:
            bits |= 0o1000
    return bits


def parse_listing(text: str) -> Listing:
    """Parse ``unsquashfs -lln`` output (see :class:`Listing`); lines it cannot read (a name
    with a newline) are skipped. Lines end at ``\n`` only, as unsquashfs writes them
    (``splitlines`` also cut at ``\r``, ``\x1c``-``\x1e`` and ``\x85``, which a name may hold).
    A name with a newline still reads as a wrong name: the listing is an estimate and a
    shortcut, never what keeps device nodes out (:func:`_remove_device_nodes` is)."""
    size_bytes = inodes = 0
    devices, setid_modes = [], []
    pattern = re.compile(_LISTING_LINE)
    for line in text.split("\n"):
        match = pattern.match(line)
        if match is None:
            continue
        inodes += 1
        kind, path = match["mode"][0], (match["path"] or "/").lstrip("/")
        if kind in "cb":
            devices.append(path)
        elif kind == "-":
            size_bytes += -(-int(match["size"]) // BLOCK) * BLOCK
        elif kind == "d":
            size_bytes += BLOCK
        mode = _mode_bits(match["mode"][1:])
        if mode & 0o6000 and kind in "-d":
            setid_modes.append((path, mode))
    return Listing(size_bytes, inodes, devices, setid_modes)


def _listing(source: Path) -> Listing:
    """:class:`Listing` of ``source``. Raises RuntimeFailure."""
    result = _unsquashfs(["-lln", "-n", str(source)], source)
    return parse_listing(result.stdout.decode("utf-8", "surrogateescape"))


def _check_space(base: Path, source: Path, size_bytes: int, inodes: int) -> None:
    """Raise InsufficientSpace when ``base``'s file system lacks the room for a copy."""
    from berth.config.units import human_size  # the one way sizes are shown to people

    shortage = fsutil.room_shortage(base, size_bytes, inodes, margin=SPACE_MARGIN, show_size=human_size)
    if shortage is not None:
        raise InsufficientSpace(
            f"no room to unpack the image {source} into {base}: {shortage}",
            hint="free space there (berth prune removes unused unpacked copies), set state_dir to a "
            "larger node-local file system, or ask your site administrator about image_mount")


def _unsquashfs(arguments: list[str], source: Path) -> "proc.Completed":
    # A killed berth must not leave unsquashfs writing: it dies with its parent.
    try:
        return proc.run(["unsquashfs", *arguments], what=f"unsquashfs of {source}", parent_death=signal.SIGKILL)
    except ProgramFailed as exc:
        raise RuntimeFailure(f"cannot unpack the image {source}: {exc.message}",
                             hint="check the image file (berth store verify), or ask your site administrator "
                             "about image_mount") from None


def _unpack(base: Path, name: str, source: Path, source_info: os.stat_result) -> None:
    """Make ``base/name`` (caller holds its lock exclusively): unpack into a temporary
    directory, record, rename. Raises InsufficientSpace, RuntimeFailure."""
    size_bytes, inodes, devices, setid_modes = _listing(source)
    _check_space(base, source, size_bytes, inodes)
    temporary = _temporary_directory(base, name)
    try:
        arguments = ["-q", "-n", "-no-xattrs", "-d", str(temporary / "root")]
        if devices:  # an unprivileged mknod fails: leave them out, as they are unusable on FUSE too
            (temporary / "exclude").write_text("".join(f"{path}\n" for path in devices))
            arguments += ["-no-wildcards", "-exclude-file", str(temporary / "exclude")]
        _unsquashfs([*arguments, str(source)], source)
        _remove_device_nodes(temporary / "root")
        # unsquashfs run by a user drops setuid/setgid bits; the view must match the SquashFS's
        # (they stay inert: the files are the caller's and the container has no_new_privs).
        for path, mode in setid_modes:
            os.chmod(temporary / "root" / path, mode, follow_symlinks=False)
        fsutil.write_atomically(temporary / "info.json", json.dumps({
            "source": str(source), "source_size": source_info.st_size, "source_mtime_ns": source_info.st_mtime_ns,
            "size_bytes": size_bytes, "inodes": inodes, "devices_left_out": len(devices),
            "boot_id": _boot_id(), "made": time.time()}), mode=fsutil.PRIVATE_FILE, durable=False)
        os.rename(temporary, base / name)
    except OSError as exc:
        raise RuntimeFailure(f"cannot unpack the image {source} into {base}: {exc.strerror}",
                             hint="free space there (berth prune removes unused unpacked copies)") from None
    finally:
        if temporary.exists():
            fsutil.remove_tree(temporary)


def _remove_device_nodes(root: Path) -> int:
    """Unlink every character and block device node in the unpacked tree ``root``; returns how
    many. The exclude list made from the listing keeps them from being made in the common case,
    but a name with a newline in it reads as another name there, and root's unsquashfs then
    makes the node: a container of root's on the launcher (which sets no device cgroup) could
    open the host device it names (review of 4 December). This walk reads the tree itself, never
    following a link. A directory it cannot read is skipped: only root's unsquashfs can make a
    device node at all (a user's mknod fails), and root reads every directory."""
    removed = 0
    pending = [str(root)]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
                mode = os.lstat(entry.path).st_mode
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _temporary_directory(base: Path, name: str) -> Path:
    """A new private directory ``base/.tmp-NAME-RANDOM`` (what prune and the next maker of
    ``name`` remove when a crash leaves it)."""
    while True:
        path = base / f".tmp-{name}-{os.urandom(6).hex()}"
        try:
            os.mkdir(path, fsutil.PRIVATE_DIR)
            return path
        except FileExistsError:
            continue


def _remove_unpacked(base: Path, name: str) -> int:
    """Remove the copy ``name`` and its temporary directories (caller holds its use lock
    exclusively, or shared with the maker lock while the copy is incomplete, so unused); the
    copy is renamed away first, so no half-removed tree keeps its name.
    Returns the bytes freed (estimated from its record)."""
    freed = 0
    directory = base / name
    if os.path.lexists(directory):
        freed = int(read_json_object(directory / "info.json").get("size_bytes", 0) or 0)
        doomed = _temporary_directory(base, name)
        os.rename(directory, doomed / "old")
        fsutil.remove_tree(doomed)
    for entry in os.scandir(base):
        if entry.name.startswith(f".tmp-{name}-"):
            fsutil.remove_tree(Path(entry.path))
    return freed


def prune_unpacked(base: Path, *, older_than_s: float = 0.0) -> list[tuple[str, int]]:
    """Remove the unpacked copies under ``base`` that no container uses (their lock free) and
    that were last used ``older_than_s`` ago or more, with any crashed maker's leftovers.
    Returns ``(path, bytes)`` of each removed. Never raises for one copy's trouble."""
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    names = {entry.name[:-len(".lock")] for entry in entries if entry.name.endswith(".lock")}
    now = time.time()
    for name in sorted(names):
        lock_path = base / f"{name}.lock"
        try:
            if now - os.stat(lock_path).st_mtime < older_than_s:
                continue
            with locks.file_lock(lock_path, timeout_s=0) as held:
                if held:
                    freed = _remove_unpacked(base, name)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(base / f"{name}.maker")  # no maker: it would hold the use lock
                    os.unlink(lock_path)
                    removed.append((str(base / name), freed))
        except OSError:
            pass
    return removed


def prune_local(state_dir: Path) -> list[tuple[str, int]]:
    """``berth prune``'s part on this node: every node-local copy of the caller's (SquashFS
    files and unpacked trees) that nothing uses right now. Returns ``(path, bytes)`` removed."""
    return (_remove_stale(Path(state_dir) / IMAGES, None, older_than_s=0.0)
            + prune_unpacked(Path(state_dir) / UNPACKED))
