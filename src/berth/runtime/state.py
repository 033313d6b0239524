"""Per-container state on the node, and cleaning up after berths that died.

::

    STATE_DIR/                       settings.state_dir, 0700, the caller's (one per user)
      runtime-probe.json             which OCI runtime works on this host (see ocirt.py)
      containers.lock                held shared while a container directory is being created
      containers/ID/                 one per running container, 0700
        lock                         flock()ed by the berth process for the container's life
        info.json                    name, image, command, started, runtime, identity
        runc/                        the OCI runtime's --root (state of this container only)
        bundle/config.json           the OCI bundle
        rootfs/                      fuse-overlayfs of the image, when the plan needs one
        lower/                       the image's mount point with image_mount = "per_container"
        upper/ work/                 overlay upper and work directories
        tmp/                         the container's private /tmp
        etc/passwd etc/group         the caller's identity files
      images/KEY/                    an image's mount shared by the containers (imagemount.py);
                                     KEY.sqfs: a node-local copy (localcopy.py)
      unpacked/KEY/root              an image unpacked on the node (image_mount = "unpacked",
                                     localcopy.py), bound read-only by its containers

A container directory whose lock nobody holds belongs to a berth that is gone (killed with
SIGKILL, node trouble): :func:`cleanup_stale` kills what runs there, unmounts and removes it.
Only the caller's own state directory is scanned, so it is cheap enough for every invocation.

A directory without a ``lock`` file is judged under ``containers.lock``: creators hold it
shared from their ``mkdir`` until ``lock`` is in place (locked under another name, then
renamed), so a cleaner that gets it exclusively knows that no berth is creating one right now,
and a directory still without ``lock`` is left by a berth killed in between: it goes at once
(it used to count as "starting now" for 60 s; issue 8, scenario 3). Removal takes ``lock``
last, so a berth killed while removing leaves a directory the next one judges by its free lock.

What can write into the state directory (a container that sees it) is hostile: a container
directory is opened without following a link and emptied through that descriptor (a link in
``containers/`` is removed itself), and info.json counts only with the types berth writes
(:func:`list_containers`), never naming a program to run (berth.runtime.ocirt.recorded_program).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path

from berth import fsutil, locks, proc
from berth.errors import NotFound, RuntimeFailure
from berth.untrusted import read_json_object

#: Told each warning of a clean-up for the user (a mount it could not unmount).
Warn = Callable[[str], None]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from berth.config.settings import Settings

# berth.runtime.options (is_container_name: with argparse) and berth.config.settings are
# imported where they are needed, not here: the execution of a cached plan needs neither
# (issue 10; tests/unit/test_runtime_startup.py).

CONTAINERS = "containers"


class ContainerLayout:
    """Where the files of container ``container_id`` live under ``path`` (the layout above):
    pure paths, so that a plan can name them before the directory exists."""

    __slots__ = ("id", "path")

    def __init__(self, container_id: str, path: Path) -> None:
        self.id = container_id
        self.path = path

    @property
    def state_dir(self) -> Path:
        """The caller's state directory this container lives in (see resolve_state_dir)."""
        return self.path.parent.parent

    @property
    def runtime_root(self) -> Path:
        return self.path / "runc"

    @property
    def bundle(self) -> Path:
        return self.path / "bundle"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def lower(self) -> Path:
        return self.path / "lower"

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def work(self) -> Path:
        return self.path / "work"

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def etc(self) -> Path:
        return self.path / "etc"

    @property
    def info_path(self) -> Path:
        return self.path / "info.json"


class ContainerState(ContainerLayout):
    """The state directory of one container, locked by its berth process while it lives."""

    __slots__ = ("lock_fd",)

    def __init__(self, container_id: str, path: Path, lock_fd: int) -> None:
        super().__init__(container_id, path)
        self.lock_fd = lock_fd

    def write_info(self, info: dict) -> None:
        # Not durable: the container does not outlive the node's uptime, and start-up time counts.
        fsutil.write_atomically(self.info_path, json.dumps(info, sort_keys=True), mode=fsutil.PRIVATE_FILE,
                                durable=False)

    def release(self) -> None:
        """Remove the directory (mounts must be gone) and drop the lock. (fsutil.remove_tree:
        a kernel overlayfs leaves its ``work/work`` mode 000.)"""
        _remove_lock_last(self.path)
        os.close(self.lock_fd)


_STATE_HINT = "set BERTH_STATE_DIR (or state_dir in berth.toml) to a private local directory of yours"


def resolve_state_dir(settings: Settings) -> Path:
    """The caller's state directory on this node, created and checked (see ensure_state_dir).

    Every command that touches containers' state calls this, so they all agree on where it is.
    Raises RuntimeFailure."""
    from berth.config.settings import fallback_state_dir

    configured = Path(settings.state_dir)
    default = settings.sources.get("state_dir", "default") == "default"
    return ensure_state_dir(configured, relocatable=default and configured == fallback_state_dir())


def ensure_state_dir(state_dir: Path, *, relocatable: bool = False) -> Path:
    """Create the caller's state directory 0700 (missing parents too) and refuse one that is
    not safely theirs; returns the directory to use.

    The directory is judged with lstat (a symbolic link planted by someone else is refused, not
    followed; a directory of someone else's is refused) before anything is created inside it.
    ``relocatable``: ``state_dir`` is the predictable default ``/tmp/berth-UID``, which another
    user can create first (issue 12, defect 3): then berth uses a directory of its own making,
    ``/tmp/berth-UID.XXXXXXXX`` (random, created exclusively, so nobody can take it first), and
    finds it again on later runs by its owner and mode. The directory is returned by its real
    path (a link of the user's own is accepted, see fsutil.check_private_dir): the kernel's
    mount table names mounts by it, and berth finds its mounts there by path (a linked spelling
    found none: the shared image mount was never unmounted and stayed dead). Raises RuntimeFailure.
    """
    try:
        path = Path(os.path.realpath(_own_state_dir(state_dir, relocatable)))
        os.makedirs(path / CONTAINERS, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RuntimeFailure(f"cannot use the state directory {exc.filename or state_dir}: {exc.strerror}",
                             hint="someone else may have created it: remove it, or " + _STATE_HINT
                             if exc.errno == errno.EPERM else _STATE_HINT) from None
    return path


def _own_state_dir(state_dir: Path, relocatable: bool) -> Path:
    for _ in range(3):
        try:
            return fsutil.ensure_private_dir(state_dir)
        except FileExistsError:
            continue  # created by someone between our look and our mkdir: judge it again
        except PermissionError:
            if not relocatable or not os.path.lexists(state_dir):
                raise
        # Squatted: use (or make) a private directory nobody else can have made.
        prefix = state_dir.name + "."
        try:
            names = sorted(name for name in os.listdir(state_dir.parent) if name.startswith(prefix))
        except OSError:
            names = []
        for name in names:
            candidate = state_dir.parent / name
            if fsutil.is_private_dir(candidate):
                return candidate
        import tempfile

        return Path(tempfile.mkdtemp(prefix=prefix, dir=state_dir.parent))
    raise PermissionError(errno.EPERM, "keeps changing under berth", str(state_dir))


def create(state_dir: Path, name: str | None) -> ContainerState:
    """A new locked container directory in ``state_dir`` (as resolve_state_dir returned it:
    created, judged, by its real path). ``name`` must be unused among live containers."""
    containers = state_dir / CONTAINERS
    os.makedirs(containers, mode=0o700, exist_ok=True)  # removed meanwhile by a clean-up: again
    if name is not None:
        for record in list_containers(state_dir):
            if record.get("name") == name:
                raise RuntimeFailure(f"a container named '{name}' is already running (id {record['id']})",
                                     hint="choose another --name, or stop that container")
    # os.urandom, not secrets: the id only needs to be unique, and secrets costs ~5 ms of imports.
    container_id = "b" + os.urandom(6).hex()
    path = containers / container_id
    fd = -1
    with locks.file_lock(containers.parent / CREATION_LOCK, shared=True, purpose="creating a container directory"):
        os.mkdir(path, 0o700)
        try:
            # Lock under another name, then rename: "lock" is never seen unlocked. (Opened and
            # then locked in place, a berth starting at the same moment — MPI ranks on one node
            # — could take the lock in between, judge the new directory stale and clean it away.)
            fd = os.open(path / ".lock.new", os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
            locks.try_acquire(fd)  # a new file nobody else has open: never waits
            os.rename(path / ".lock.new", path / "lock")
        except BaseException:  # a stop signal (StopRequested) or an error: leave no directory
            fsutil.remove_tree(path)
            if fd >= 0:
                os.close(fd)
            raise
    return ContainerState(container_id, path, fd)


#: Held shared by creators of container directories, exclusively (one try) by a cleaner that
#: judges directories without a lock file (see the module's docstring).
CREATION_LOCK = "containers.lock"


def _remove_lock_last(path: Path, directory: int | None = None) -> None:
    """Remove a container directory, its lock file last: killed half-way, what is left still
    has a lock file whose lock is free, and the next berth finishes the job. Subdirectories go
    with fsutil.remove_tree (a kernel overlayfs leaves its ``work/work`` mode 000).

    The entries are removed through the directory open without following a link
    (``directory``, as the caller judged it, else opened here): a ``containers/ID`` planted as
    a link (by what can write into the state directory: a container that sees it) would
    otherwise have every file of the directory it names removed."""
    own = directory is None
    if own:
        try:
            directory = fsutil.open_directory(path, nofollow=True)
        except OSError:
            return  # gone, or not a directory (a link: never followed)
    try:
        with os.scandir(directory) as scan:
            entries = list(scan)
        for entry in entries:
            if entry.name == "lock":
                continue
            if entry.is_dir(follow_symlinks=False):
                fsutil.remove_tree(Path(fsutil.descriptor_path(directory, entry.name)))
            else:
                try:
                    os.unlink(entry.name, dir_fd=directory)  # a link itself, never what it names
                except OSError:
                    pass
        try:
            os.unlink("lock", dir_fd=directory)
        except OSError:
            pass
    except OSError:
        return
    finally:
        if own:
            os.close(directory)
    try:
        os.rmdir(path)  # a link swapped in meanwhile: ENOTDIR, and it stays
    except OSError:
        pass


def _open_container(path: Path) -> int | None:
    """The container directory ``path`` open without following a link, or None when it is not
    a directory: a link (berth never makes one there) is removed itself, never what it names;
    anything else that is not a directory is left, and never counts as a container."""
    try:
        return fsutil.open_directory(path, nofollow=True)
    except OSError:
        pass
    if os.path.islink(path):
        try:
            os.unlink(path)
        except OSError:
            pass
    return None


def _try_lock(path: Path) -> int | None:
    """An fd holding the lock of the container directory ``path`` when nobody holds it, else
    None (also when it has no lock file: :func:`_lockless` judges those; and when its ``lock``
    is not a regular file berth can lock: a link, a directory... is left). Opened by name, one
    open per live container; the caller then judges the directory and checks that this is its
    lock (:func:`_is_lock_of`) before it acts on a free one."""
    try:
        fd = locks.open_lock_file(path / "lock", create=False, tighten=False)
    except OSError:
        return None
    try:
        held = locks.try_acquire(fd)
    except BaseException:
        os.close(fd)
        raise
    if not held:
        os.close(fd)
        return None
    return fd


def _is_lock_of(lock_fd: int, directory: int) -> bool:
    """Whether ``lock_fd`` is the ``lock`` of the directory open as ``directory``: a directory
    entry swapped for a link between the two opens named another directory's lock."""
    try:
        lock, entry = os.fstat(lock_fd), os.stat("lock", dir_fd=directory, follow_symlinks=False)
    except OSError:
        return False
    return (lock.st_dev, lock.st_ino) == (entry.st_dev, entry.st_ino)


def _still_names(path: Path, directory: int) -> bool:
    """Whether ``path`` still names the directory open as ``directory``: checked again before
    each thing the clean-up does by path (the runtime, fusermount3), which a link swapped in
    since the directory was judged would carry to another directory (another live container)."""
    try:
        here, judged = os.lstat(path), os.fstat(directory)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (judged.st_dev, judged.st_ino)


def _read_info(path: Path) -> dict:
    return read_json_object(path / "info.json")


def list_containers(state_dir: Path) -> list[dict]:
    """info.json of every live container (its lock held by a berth process), oldest first."""
    containers = state_dir / CONTAINERS
    try:
        with os.scandir(containers) as scan:  # a link or a file is no container (see _open_container)
            names = sorted(entry.name for entry in scan if entry.is_dir(follow_symlinks=False))
    except OSError:
        return []
    paths = [containers / name / "lock" for name in names]
    # A look: taking a lock could hide a dead one from its cleaner. One look at all of them
    # (/proc read once); a lock file that is a link or not a regular file is not locked.
    held = locks.locked(paths)
    records = []
    for name, live in zip(names, held):
        if not live:
            continue
        path = containers / name
        info = _read_info(path)
        if info:
            records.append(_record(info, name, path))
    records.sort(key=lambda r: r["started"])
    return records


def _whole(value: object, minimum: int = 0) -> int | None:
    """``value`` when it is an int (not a bool) of at least ``minimum``, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    return None


def _started(value: object) -> float:
    """info.json's ``started`` (time.time() seconds), 0.0 for anything else than a finite number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an integer too large for a float
            return 0.0
        if math.isfinite(value):
            return value
    return 0.0


def _record(info: dict, name: str, path: Path) -> dict:
    """The fields of container ``name``'s info.json that berth reads (berth ps, exec, the
    affinity fallback, --scope node), each of the type berth writes, or its default. The file
    is the user's, which what can write into the state directory may have planted or
    corrupted: a value of another type raised TypeError in every berth ps (and berth run
    --cpus). ``id`` is the directory's name; ``runtime_path`` is dropped (never run: see
    berth.runtime.ocirt.recorded_program)."""
    def text(key: str, default: str | None = None) -> str | None:
        value = info.get(key)
        return value if isinstance(value, str) else default

    def wholes(key: str, minimum: int) -> list[int]:
        values = info.get(key)
        return [v for v in values if _whole(v, minimum) is not None] if isinstance(values, list) else []

    command = info.get("command")
    uid, gid = _whole(info.get("uid")), _whole(info.get("gid"))
    return {
        "id": name, "state_path": str(path), "name": text("name", name), "image": text("image"),
        "command": command if isinstance(command, list) and all(isinstance(a, str) for a in command) else [],
        "started": _started(info.get("started")),
        "pid": _whole(info.get("pid"), 1), "runtime": text("runtime"),
        "uid": os.getuid() if uid is None else uid, "gid": os.getgid() if gid is None else gid,
        "remap_root": info.get("remap_root") is True, "image_mount": text("image_mount"),
        "cpu_set": wholes("cpu_set", 0), "daemon_pids": wholes("daemon_pids", 2),
    }


def berth_pid(record: dict) -> int | None:
    """The pid of the berth that runs the live container ``record`` (of list_containers), to
    be signalled (--scope node's last task stops the node's container with it): info.json's
    ``pid`` unless /proc/locks shows the container's lock held by other processes only. The
    record is the user's file, which what can write into the state directory may have planted:
    a pid read from it alone could name any process of the user. Where /proc cannot tell (no
    holder seen: another PID namespace, a file system whose numbers differ), the record's."""
    pid = record["pid"]
    if pid is None:
        return None
    try:
        fd = locks.open_lock_file(Path(record["state_path"]) / "lock", create=False)
    except OSError:
        return None  # gone: nobody to stop
    try:
        seen = {holder.pid for holder in locks.holders(fd)}
    finally:
        os.close(fd)
    return pid if not seen or pid in seen else None


def pinned_cpus(state_dir: Path) -> dict[int, int]:
    """How many of the caller's live containers are pinned to each CPU (affinity fallback)."""
    counts: dict[int, int] = {}
    for record in list_containers(state_dir):
        for cpu in record.get("cpu_set") or ():
            counts[cpu] = counts.get(cpu, 0) + 1
    return counts


def find_container(state_dir: Path, key: str) -> dict:
    """A live container by name, id or unique id prefix. Raises NotFound."""
    records = list_containers(state_dir)
    for record in records:
        if record.get("name") == key or record.get("id") == key:
            return record
    matches = [r for r in records if r.get("id", "").startswith(key)]
    if len(matches) == 1:
        return matches[0]
    raise NotFound(f"no running container '{key}' of yours on this node",
                   hint="'berth ps' lists your running containers")


def _kill_runtime(path: Path, directory: int, info: dict) -> None:
    from berth.runtime import ocirt

    root = str(path / "runc")
    container_id = path.name
    try:
        # Real directories only: a runc/ planted as a link to another state directory's
        # runtime root would have the runtime kill a live container of the same name there.
        if not all(stat.S_ISDIR(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
                   for name in ("runc", f"runc/{container_id}")):
            return
    except OSError:
        return
    runtime = ocirt.recorded_program(info.get("runtime"))  # never a program the record names by path
    if runtime is None:
        return
    for action in (["kill", container_id, "KILL"], ["delete", "--force", container_id]):
        if _still_names(path, directory):
            proc.run([runtime, "--root", root, *action], check=False, timeout=10)


def _unmount_under(path: Path, directory: int, warn: Warn | None) -> list[str]:
    """Lazily unmount every mount at or below ``path`` (deepest first) while ``path`` still
    names the directory open as ``directory``; returns what was found, and tells ``warn`` why
    one is still mounted (berth.runtime.fuse.unmount_or_say)."""
    from berth.runtime import fuse

    prefix = str(path) + "/"
    found = sorted((p for p in fuse.mounted_paths() if p.startswith(prefix)), key=len, reverse=True)
    for mountpoint in found:
        if _still_names(path, directory):
            failure = fuse.unmount_or_say(mountpoint, lazy_only=True)
            if failure and warn is not None:
                warn(f"could not unmount {mountpoint}, left by a berth that died: {failure}")
    return found


def _kill_daemons(path: Path, info: dict) -> None:
    """SIGTERM the container's recorded FUSE daemons that still serve a mount point inside
    ``path``: never a recycled pid, not even one running another of the user's FUSE daemons
    (berth.runtime.fuse.daemon_mountpoint)."""
    from berth.runtime import fuse

    inside = str(path) + "/"
    daemon_pids = info.get("daemon_pids")
    for pid in daemon_pids if isinstance(daemon_pids, list) else ():
        if (fuse.daemon_mountpoint(pid) or "").startswith(inside):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


def cleanup_container_dir(path: Path, directory: int | None = None, *, warn: Warn | None = None) -> dict | None:
    """Kill, unmount and remove one container directory whose lock is free (caller holds it).
    ``directory``: the directory open as the caller judged it (:func:`_open_container`), else
    opened here; None (nothing done) when ``path`` is not a directory (a link is removed itself).
    What is read and removed goes through ``directory``; what goes by path (the runtime's root,
    fusermount3's mount points) only while ``path`` still names it (:func:`_still_names`). Once
    it no longer does (swapped for a link), the rest is left (None): the next clean-up judges
    the directory where it is now. ``warn`` hears of each mount that could not be unmounted."""
    own = directory is None
    if own:
        directory = _open_container(path)
        if directory is None:
            return None
    try:
        info = read_json_object(fsutil.descriptor_path(directory, "info.json"))
        _kill_runtime(path, directory, info)
        mounts = _unmount_under(path, directory, warn)
        _kill_daemons(path, info)
        if not _still_names(path, directory):
            return None
        _remove_lock_last(path, directory)
    finally:
        if own:
            os.close(directory)
    name = info.get("name")
    return {"id": path.name, "name": name if isinstance(name, str) else None, "unmounted": mounts}


def cleanup_stale(state_dir: Path, *, images: bool = True, warn: Warn | None = None) -> list[dict]:
    """Clean every container directory of this user whose berth process is gone; then, with
    ``images``, unmount the shared image mounts none of the user's live containers holds
    (berth.runtime.imagemount.cleanup_stale: after the containers, so that nothing runs on a
    mount that goes). Returns the containers cleaned; ``warn`` hears why a mount it found is
    still mounted (fusermount3's words and the likely cause: said, never dropped)."""
    cleaned = _cleanup_containers(state_dir, warn)
    if images:
        from berth.runtime import imagemount

        for image in imagemount.cleanup_stale(state_dir):
            if image["failure"] and warn is not None:
                warn(image["failure"])
    return cleaned


def _cleanup_containers(state_dir: Path, warn: Warn | None) -> list[dict]:
    containers = state_dir / CONTAINERS
    try:
        with os.scandir(containers) as scan:
            entries = list(scan)
    except OSError:
        return []
    cleaned = []
    for entry in entries:
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            _open_container(path)  # a link is removed itself; anything else is left
            continue
        # The lock first, by name: a live container (its lock held) costs this one open. A
        # free one is judged through its directory, opened without following a link, and
        # counts only when the lock taken is that directory's.
        fd = _try_lock(path)
        if fd is None:
            continue
        try:
            directory = _open_container(path)
            if directory is None:
                continue
            try:
                record = cleanup_container_dir(path, directory, warn=warn) if _is_lock_of(fd, directory) else None
            finally:
                os.close(directory)
        finally:
            os.close(fd)
        if record is not None:
            cleaned.append(record)
    names = [entry.name for entry in entries]
    for path in _lockless(state_dir, names):
        record = cleanup_container_dir(path, warn=warn)
        if record is not None:
            cleaned.append(record)
    return cleaned


def _lockless(state_dir: Path, names: list[str]) -> list[Path]:
    """The container directories without a lock file that no berth is creating: left by one
    killed between its ``mkdir`` and its lock (or, in the last instant, while removing one).
    Judged while holding the creation lock exclusively (one try: a berth creating a container
    right now makes this wait for the next command)."""
    containers = state_dir / CONTAINERS
    lockless = [name for name in names if not os.path.lexists(containers / name / "lock")]
    if not lockless:
        return []  # the usual case: every directory has its lock file
    from berth.runtime.options import is_container_name

    candidates = [containers / name for name in lockless if is_container_name(name)]
    if not candidates:
        return []
    try:
        with locks.file_lock(state_dir / CREATION_LOCK, timeout_s=0) as held:
            if not held:
                return []
            return [path for path in candidates
                    if os.path.isdir(path) and not os.path.islink(path) and not os.path.lexists(path / "lock")]
    except OSError:
        return []


def get_state_path(state_dir: Path, container_id: str) -> Path:
    from berth.runtime.options import is_container_name

    if not is_container_name(container_id):
        raise NotFound(f"no container '{container_id}'")
    return state_dir / CONTAINERS / container_id
