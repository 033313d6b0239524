"""File-system primitives every part of berth shares: atomic replacement and private directories.

Atomic replacement (the only implementation; the store's blob commit streams into its own tmp/
directory and publishes with :func:`publish_file`): the temporary file is created exclusively
(``O_EXCL|O_NOFOLLOW``, mode 0600) in the target's directory or in a given staging directory on
the same file system, written, given its final mode (``fchmod``: exact whatever the umask),
fsynced, renamed over the target, and the directory is fsynced. A symbolic link planted at the
target or at the temporary name is replaced or refused, never followed. On any failure the
temporary file is removed and the old content stays. Writers a kill may cut (staging) ask for an
unnamed temporary file (``O_TMPFILE``), named only for the rename, so that nothing is left.

Privacy is a parameter, never a default: every caller names the mode it writes (``PRIVATE_FILE``
for what belongs to one user, ``PUBLIC_FILE`` for site files every user reads; docs/security.md).
Directories berth creates for a user are made by :func:`make_private_dirs` (0700 whatever the
umask, owner checked, links refused).

Locks live in :mod:`berth.locks`.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from berth.namedtuple import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing costs every `berth run` ~2.5 ms (issue 10)
    from collections.abc import Callable
    from typing import BinaryIO

#: Files and directories of one user (user store, state, jobs, credentials, user configuration).
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
#: Files and directories every user must read (site store, site configuration, templates).
PUBLIC_FILE = 0o644
PUBLIC_DIR = 0o755

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def mountinfo_path(field: str) -> str:
    """A path field of ``/proc/*/mountinfo`` as the path it names: the kernel writes space,
    tab, newline and backslash as octal escapes (``\\040``...), proc(5). The one reading of
    them (policy's mount table, the FUSE helpers' mounted paths)."""
    if "\\" not in field:
        return field
    import re

    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def open_directory(path: Path | str, *, nofollow: bool = False) -> int:
    """An ``O_DIRECTORY`` descriptor of ``path``. With ``nofollow`` a last component that is a
    symbolic link is refused (OSError ELOOP or ENOTDIR). Raises OSError."""
    return os.open(path, _DIRECTORY_FLAGS | (os.O_NOFOLLOW if nofollow else 0))


def open_directory_beneath(base: Path | str, relative: str, *, make_mode: int | None = None) -> int:
    """An ``O_DIRECTORY`` descriptor of ``base/relative`` reached one component at a time with
    ``O_NOFOLLOW``: no symbolic link *below* ``base`` is ever followed, so a link planted (or
    swapped in while berth works) in a directory someone else can write cannot carry berth's
    reads or writes outside ``base``. ``base`` itself is resolved as given (the caller's own
    choice of path, links included).

    ``make_mode``: missing directories are created with this mode (the umask applies) instead
    of raising FileNotFoundError. Raises OSError: ELOOP naming the path when a component is a
    symbolic link, ENOTDIR when it is something else than a directory, EINVAL for a ``..``."""
    fd = open_directory(base)
    reached = str(base)
    try:
        for part in _components(relative):
            reached = os.path.join(reached, part)
            try:
                child = os.open(part, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if make_mode is None:
                    raise
                try:
                    os.mkdir(part, make_mode, dir_fd=fd)
                except FileExistsError:
                    pass  # made meanwhile (a parallel transfer): judged by the open below
                child = os.open(part, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as exc:
        os.close(fd)
        raise _beneath_error(exc, reached) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(base: Path | str, relative: str, flags: int, mode: int = 0o666, *,
                 make_mode: int | None = None) -> int:
    """``os.open(base/relative, flags | O_NOFOLLOW)`` with every directory on the way reached as
    by :func:`open_directory_beneath` (``make_mode`` creates missing ones): a symbolic link
    anywhere below ``base``, the last component included, is refused (OSError ELOOP)."""
    directory, name = os.path.split(relative)
    if name in ("", ".", ".."):
        raise OSError(errno.EINVAL, "not a file name", os.path.join(str(base), relative))
    parent = open_directory_beneath(base, directory, make_mode=make_mode)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
    except OSError as exc:
        raise _beneath_error(exc, os.path.join(str(base), relative)) from None
    finally:
        os.close(parent)


def descriptor_path(directory_fd: int, name: str = "") -> str:
    """A path naming ``name`` inside the directory open as ``directory_fd`` (``/proc/self/fd``),
    for code that needs a path (a temporary file, a rename) once the directory was judged by
    :func:`open_directory_beneath`: the kernel starts from that very directory, whatever has
    been renamed or swapped since. Without ``name``: the open file or directory itself (staging
    reads back the temporary file an :func:`atomic_writer` opened write-only). Valid while the
    descriptor stays open."""
    return f"/proc/self/fd/{directory_fd}/{name}" if name else f"/proc/self/fd/{directory_fd}"


def _components(relative: str) -> list[str]:
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EINVAL, "'..' leaves the directory", relative)
    return parts


def _beneath_error(exc: OSError, path: str) -> OSError:
    """ENOTDIR/ELOOP from an ``O_NOFOLLOW`` open said plainly: a link is a link."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return OSError(errno.ELOOP, "is a symbolic link (berth never follows one there)", path)
        except OSError:
            pass
    return OSError(exc.errno, exc.strerror, path)


@contextmanager
def atomic_writer(path: Path, *, mode: int | None, staging_dir: Path | None = None,
                  nofollow_dir: bool = False, durable: bool = True, unnamed: bool = False,
                  swept: set | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file; when the block ends without an exception its content atomically
    replaces ``path`` (see the module docstring). On an exception nothing changes.

    ``mode``: the file's exact permissions, or None for what ``open()`` would create (0666
    minus the umask: files the user asked for at a path of their choosing, e.g. an export).
    ``staging_dir``: where the temporary file lives (same file system as ``path``; the store
    stages in its tmp/ so that prune finds crash leftovers); default: ``path``'s directory.
    ``nofollow_dir``: refuse a ``path.parent`` that is itself a symbolic link (directories a
    container can change). ``durable=False`` skips the fsyncs (files that do not outlive the
    node's uptime, such as a running container's state on a tmpfs). ``unnamed``: the temporary
    file has no name while it is written (``O_TMPFILE``), and gets one only for the rename: a
    process killed meanwhile (a stage-in cut by the job's end) leaves nothing behind, where a
    named one stayed as ``.NAME.RANDOM.tmp``; on a file system without ``O_TMPFILE`` (NFS,
    Lustre, FUSE...) it is a named one that says its writer, ``.NAME.RANDOM.berth-PID-HOST.tmp``.
    ``swept``: a set of the caller's (one stage-in's): the first such fallback into a directory
    not in it removes what killed writers left there (:func:`remove_dead_temporaries`) and adds
    the directory, so that a run of many files lists each directory once. Raises OSError.
    """
    directory = open_directory(path.parent, nofollow=nofollow_dir)
    try:
        staging = directory if staging_dir is None else open_directory(staging_dir)
        try:
            with _replacing(directory, staging, path.name, mode, durable=durable, unnamed=unnamed,
                            swept=swept) as handle:
                yield handle
        finally:
            if staging != directory:
                os.close(staging)
    finally:
        os.close(directory)


@contextmanager
def _replacing(directory: int, staging: int, name: str, mode: int | None, *, durable: bool,
               unnamed: bool = False, swept: set | None = None) -> Iterator[BinaryIO]:
    """The one atomic replacement (module docstring): a temporary file in ``staging`` that,
    when the block ends without an exception, is flushed (fsynced if ``durable``) and renamed
    over ``name`` in ``directory``, whose rename is then made durable too. ``unnamed``: see
    :func:`atomic_writer`; the file is linked under a temporary name just before the rename."""
    with _staged(staging, name, mode, unnamed=unnamed, swept=swept) as staged:
        handle = staged[0]
        yield handle
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
        if staged[1] is None:  # unnamed until now
            temporary = _temporary_name(name, owned=True)
            os.link(descriptor_path(handle.fileno()), temporary, dst_dir_fd=staging)  # linkat, following /proc's link
            staged[1] = temporary  # removed by _staged should the rename fail
        os.replace(staged[1], name, src_dir_fd=staging, dst_dir_fd=directory)
    if durable:
        os.fsync(directory)


#: The longest file name Linux file systems take (bytes).
NAME_MAX = 255


def _temporary_name(name: str, *, owned: bool = False) -> str:
    """``.NAME.RANDOM.tmp``, NAME cut (in bytes) so that the whole fits :data:`NAME_MAX`
    whatever the final name's length (a 255-byte name is valid; its temporary name was not).
    ``owned``: ``.NAME.RANDOM.berth-PID-HOST.tmp``, naming its writer (:func:`_writer_tag`), so
    that :func:`remove_dead_temporaries` can tell a dead writer's leftover from a live one's."""
    suffix = f".{os.urandom(6).hex()}" + (f".berth-{_writer_tag()}" if owned else "") + ".tmp"
    return "." + os.fsdecode(os.fsencode(name)[:NAME_MAX - 1 - len(suffix)]) + suffix


def _host_tag() -> str:
    """8 hex digits for this node and pid namespace (where a pid names one process)."""
    from hashlib import sha256

    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return sha256(f"{os.uname().nodename}\0{namespace}".encode()).hexdigest()[:8]


def _writer_tag() -> str:
    return f"{os.getpid()}-{_host_tag()}"


def remove_dead_temporaries(directory: int) -> int:
    """Remove from the directory open as ``directory`` the named temporary files
    (``_temporary_name(owned=True)``) of writers that died: written on this node (and pid
    namespace) by a process that no longer exists, regular files of the caller's. A writer
    killed where the file system has no ``O_TMPFILE`` (NFS, Lustre: a stage-in cut by its job's
    end) left one; the next such write into the directory calls this. A live writer's file, one
    from another node and anything else are left alone. Returns how many were removed."""
    import re

    pattern = re.compile(r"\..*\.[0-9a-f]{12}\.berth-([0-9]+)-([0-9a-f]{8})\.tmp", re.DOTALL)
    host, removed = _host_tag(), 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or match.group(2) != host or _process_exists(int(match.group(1))):
            continue
        try:
            info = os.lstat(name, dir_fd=directory)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                os.unlink(name, dir_fd=directory)
                removed += 1
        except OSError:
            continue
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's (or no pid at all: never judged dead)
    return True


@contextmanager
def _staged(directory: int, name: str, mode: int | None, *, unnamed: bool = False,
            swept: set | None = None) -> Iterator[list]:
    """A new temporary file in ``directory``, as ``[handle, its name]``: exclusive under a new
    name, or without one (None) with ``unnamed`` where the file system can (``O_TMPFILE``); the
    caller that links it sets the name it gave. Removed unless the block renamed it. Where
    ``unnamed`` falls back to a name, that name says its writer (a kill leaves it), and the dead
    writers' ones are removed first, once per directory in ``swept`` (see atomic_writer)."""
    create = 0o666 if mode is None else 0o600
    fd = -1
    if unnamed:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, create, dir_fd=directory)
        except OSError as exc:  # not supported there (EISDIR: a kernel that predates it)
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        if fd < 0 and swept is not None:
            info = os.fstat(directory)
            if (info.st_dev, info.st_ino) not in swept:
                swept.add((info.st_dev, info.st_ino))
                remove_dead_temporaries(directory)
    staged: list = [None, None if fd >= 0 else _temporary_name(name, owned=unnamed)]
    if fd < 0:
        fd = os.open(staged[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     create, dir_fd=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            staged[0] = handle
            yield staged
    except BaseException:
        if staged[1] is not None:
            try:
                os.unlink(staged[1], dir_fd=directory)
            except FileNotFoundError:
                pass
        raise


def replace_in_directory(directory_fd: int, name: str, data: bytes, mode: int) -> None:
    """Atomically replace ``name`` inside the directory open as ``directory_fd`` with ``data``,
    mode exactly ``mode``. For callers that judged the directory already (job agent). Raises OSError."""
    with _replacing(directory_fd, directory_fd, name, mode, durable=True) as handle:
        handle.write(data)


def write_atomically(path: Path, data: bytes | str, *, mode: int, staging_dir: Path | None = None,
                     nofollow_dir: bool = False, durable: bool = True) -> None:
    """Atomically replace ``path`` with ``data`` (str is written as UTF-8) with exactly ``mode``.
    See :func:`atomic_writer` for the other parameters. Raises OSError."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_writer(path, mode=mode, staging_dir=staging_dir, nofollow_dir=nofollow_dir,
                       durable=durable) as handle:
        handle.write(data)


def publish_file(temporary: Path | str, final: Path | str, mode: int | None, *, durable: bool = True) -> None:
    """Give a finished (and, when it matters, fsynced) temporary file ``mode`` (None: keep the
    mode it was created with) and rename it to ``final`` (same file system, existing directory),
    then make the rename durable unless ``durable`` is False. For files written by something
    that needs a path rather than a stream: the store's resumable blob downloads, S3 transfers.
    Raises OSError."""
    if mode is not None:
        os.chmod(temporary, mode)
    os.replace(temporary, final)
    if durable:
        fsync_directory(Path(final).parent)


def fsync_directory(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = open_directory(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(path: Path) -> Path:
    """``mkdir -p -m 700 path``: every directory created is 0700 whatever the umask; existing
    ones are left as they are (they may be the user's own choice). Returns ``path``. Raises OSError."""
    missing = []
    current = path
    while not os.path.lexists(current) and current.parent != current:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR)
        except FileExistsError:
            continue
        # On the directory just made, never through a name someone swapped since (in a shared
        # directory without the sticky bit another user can rename it and put a link there:
        # a chmod by name would close the link's target, a directory of the caller's).
        fd = open_directory(directory, nofollow=True)
        try:
            os.fchmod(fd, PRIVATE_DIR)
        finally:
            os.close(fd)
    return path


def ensure_private_dir(path: Path) -> Path:
    """A directory berth owns for one user (user store, state, jobs): created as by
    :func:`make_private_dirs`, then checked by :func:`check_private_dir`. Returns ``path``.
    Raises PermissionError (EPERM, the reason in ``strerror``) or other OSErrors."""
    return check_private_dir(make_private_dirs(path))


def check_private_dir(path: Path) -> Path:
    """Require ``path`` to be a directory owned by the caller; tighten its mode to 0700 when
    group or others have any access (earlier berth versions made such directories 0755).

    A symbolic link is accepted only when the caller owns it (users move their store to scratch
    that way) and it leads to such a directory; a link of someone else's is refused unfollowed:
    in a shared directory such as /tmp it is a planted one. Raises PermissionError (EPERM, the
    reason in ``strerror``) or other OSErrors."""
    if check_own_dir(path).st_mode & 0o077:
        os.chmod(path, PRIVATE_DIR)
    return path


def check_own_dir(path: Path) -> os.stat_result:
    """Require ``path`` to be a directory owned by the caller, a symbolic link only when the
    caller owns it too (the rule of :func:`check_private_dir`), changing nothing: for
    directories berth reads as the user's own (the user store: a store planted by someone else
    would have the user run their images). Returns the directory's stat. Raises
    PermissionError (EPERM, the reason in ``strerror``), FileNotFoundError or other OSErrors."""
    uid = os.getuid()
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        if info.st_uid != uid:
            raise PermissionError(errno.EPERM, f"a symbolic link of uid {info.st_uid}'s, not a directory of yours",
                                  str(path))
        info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(errno.EPERM, "not a directory", str(path))
    if info.st_uid != uid:
        raise PermissionError(errno.EPERM, f"belongs to uid {info.st_uid}, not to you (uid {uid})", str(path))
    return info


def is_private_dir(path: Path) -> bool:
    """Whether ``path`` exists as a real directory of the caller's that nobody else can enter
    (no change is made; XDG_RUNTIME_DIR is judged this way before berth uses it)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & 0o077)


def remove_tree(path: Path | str) -> None:
    """``rm -rf path`` for a tree of the caller's whose directories may be read-only or closed
    (an unpacked image keeps the image's modes: ``/proc`` 0555, ``/root`` 0700, even 0000; a
    kernel overlayfs leaves its ``work/work`` 0000). Each directory is opened without following
    a link and made u+rwx through its descriptor, and its entries are removed through it, so a
    link is removed itself, never followed, even one swapped in while this runs. ``path``
    itself must be a directory (a link or a file there is left). Never raises: what cannot be
    removed stays.

    Its own walk, not ``shutil.rmtree`` after a pass that opened the tree up: one pass instead
    of two, and no shutil (with bz2, lzma and zlib) imported by every ``berth run``, whose
    teardown removes its container's directories with it (issue 10)."""
    fd = _open_to_remove(str(path), None)
    if fd is None:
        return
    try:
        _remove_entries(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _open_to_remove(name: str, parent: int | None) -> int | None:
    """The directory ``name`` (inside the directory open as ``parent``, or a path) open for
    reading and made u+rwx (owner only), never through a link; None when it is not a
    directory, or cannot be opened even once made accessible."""
    try:
        fd = os.open(name, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
    except PermissionError:
        # No read permission (mode 0000): open it up through an O_PATH descriptor, which
        # needs none and names that very directory, then open it again.
        try:
            handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError:
            return None
        try:
            os.chmod(descriptor_path(handle), PRIVATE_DIR)
            fd = os.open(descriptor_path(handle), _DIRECTORY_FLAGS)
        except OSError:
            return None
        finally:
            os.close(handle)
    except OSError:
        return None
    try:
        os.fchmod(fd, PRIVATE_DIR)  # entries can then be removed (a read-only directory's too)
    except OSError:
        pass
    return fd


def _listing(directory: int) -> list[tuple[str, bool]]:
    try:
        with os.scandir(directory) as scan:
            return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan]
    except OSError:
        return []


#: How many levels of the tree remove_tree keeps open below the top of its walk; the levels
#: under them are closed and opened again by name when the walk returns to them.
OPEN_LEVELS = 16


def _remove_entries(directory: int) -> None:
    """Remove everything inside the directory open as ``directory`` (see :func:`remove_tree`).
    Depth first with a stack of its own, not recursion: a tree nested deeper than Python's
    recursion limit (a container can make one in its /tmp) is removed like any other. The walk
    holds at most :data:`OPEN_LEVELS` descriptors besides ``directory`` (one per level held
    open left a tree deeper than the open-files limit in place, quietly): a level further down
    is closed and opened again by name from the nearest level still open when the walk returns
    to it (never through a link), and only when it is still the very directory (device and
    inode) it was; one that was swapped meanwhile is left, with what is under it."""
    stack = [[directory, _listing(directory), "", None]]  # [descriptor or None, entries, name, (dev, ino)]
    try:
        while stack:
            if stack[-1][0] is None and not _reopen(stack):
                continue
            fd, entries, name, _identity = stack[-1]
            if entries:
                entry, is_directory = entries.pop()
                if is_directory:
                    child = _open_to_remove(entry, fd)
                    if child is not None:
                        info = os.fstat(child)
                        stack.append([child, _listing(child), entry, (info.st_dev, info.st_ino)])
                        below = len(stack) - 1 - OPEN_LEVELS
                        if below >= 1 and stack[below][0] is not None:
                            os.close(stack[below][0])
                            stack[below][0] = None
                        continue
                try:
                    os.unlink(entry, dir_fd=fd)  # a link itself, never what it names
                except OSError:
                    pass
                continue
            stack.pop()
            if stack:
                os.close(fd)
                if stack[-1][0] is None and not _reopen(stack):
                    continue
                try:
                    os.rmdir(name, dir_fd=stack[-1][0])
                except OSError:
                    pass
    finally:
        for level in stack[1:]:
            if level[0] is not None:
                os.close(level[0])


def _reopen(stack: list) -> bool:
    """Open again, by name from the nearest level still open, the closed levels down to the
    top of ``stack`` (see _remove_entries), keeping the last :data:`OPEN_LEVELS` of them open.
    False when one is gone or is not the directory it was: the stack is then cut above the
    level that could be opened, and what is under it stays."""
    top = len(stack) - 1
    base = max(index for index, level in enumerate(stack) if level[0] is not None)  # the root is open
    parent = stack[base][0]
    for index in range(base + 1, top + 1):
        child = _open_to_remove(stack[index][2], parent)
        if child is not None:
            info = os.fstat(child)
            if (info.st_dev, info.st_ino) != stack[index][3]:
                os.close(child)
                child = None
        if parent != stack[base][0] and stack[index - 1][0] is None:
            os.close(parent)  # a level passed through, not kept
        if child is None:
            for level in stack[index:]:
                if level[0] is not None:
                    os.close(level[0])
            del stack[index:]
            return False
        if index > top - OPEN_LEVELS:
            stack[index][0] = child
        parent = child
    return True


def writers_problem(info: os.stat_result, uid: int | None = None, *, acl: int | str | None = None) -> str | None:
    """Why someone other than root or the caller can change the file or directory ``info``
    describes, or None. The one rule for CDI specs, hooks and mount sources and registry
    credentials files (docs/security.md, "who may change a file"). ``uid``: the caller
    (default: this process's user). Refused, with the reason named:

    - another owner: "owned by uid N, neither root nor you";
    - write for others: "writable by others (mode 0646)" (a sticky directory's write bits are
      accepted: others may add names there, never replace one);
    - write for a group, unless it is group root or the owner's private group
      (:func:`private_group_problem`): "writable by group staff (mode 0664), which has members
      other than you". A private group is how RHEL-family sites give every user a group of
      their own, with ``umask 002`` making every file group-writable; OpenSSH's
      ``secure_permissions`` accepts such a group the same way;
    - write through an access ACL: "writable through its access ACL by user 1002 (mode 0664
      shows the ACL's mask)". Where a file has one, its group bits are the ACL's mask, the most
      any named user or group entry gets: a 0664 file of the owner's private group may be
      writable by another user that way (review 11). ``acl``: where to read it, the file's
      descriptor or path (every caller gives one; without, ACLs are not looked at).

    Looks the owner and group up in the user and group databases only for a group-writable
    file of a group other than root (once per owner and group per process).
    """
    caller = os.getuid() if uid is None else uid
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in (0, caller):
        return f"owned by uid {info.st_uid}, neither root nor you"
    if stat.S_ISDIR(info.st_mode) and mode & stat.S_ISVTX:
        return None
    if mode & 0o002:
        return f"writable by others (mode {mode:04o})"
    if mode & 0o020 and info.st_gid != 0:
        verdict = private_group_problem(info.st_uid, info.st_gid)
        if verdict is not None:
            group, why = verdict
            owner, owners = ("you", "your") if info.st_uid == caller else ("root", "root's")
            return f"writable by group {group} (mode {mode:04o}), " + why.format(owner=owner, owners=owners)
    if mode & 0o020 and acl is not None and (writers := acl_writers(acl)):
        return f"writable through its access ACL by {', '.join(writers)} (mode {mode:04o} shows the ACL's mask)"
    return None


#: POSIX ACL entry tags (linux/posix_acl_xattr.h): a named user, a named group.
_ACL_USER, _ACL_GROUP = 0x02, 0x08


def acl_writers(where: int | str) -> list[str]:
    """The named users and groups an access ACL (``system.posix_acl_access`` of the file open
    as descriptor ``where``, or at path ``where``) gives write, as "user N" / "group N"; empty
    without an ACL (or on a file system without them). Their effective write also needs the
    ACL's mask, the file's group write bit, which the caller has checked."""
    import struct

    try:
        raw = os.getxattr(where, "system.posix_acl_access")
    except OSError:  # ENODATA: no ACL; ENOTSUP: a file system without them
        return []
    found = []
    for offset in range(4, len(raw) - 7, 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, offset)
        if tag in (_ACL_USER, _ACL_GROUP) and perm & 0o2:
            found.append(f"{'user' if tag == _ACL_USER else 'group'} {ident}")
    return found


@functools.lru_cache(maxsize=64)
def private_group_problem(owner_uid: int, gid: int) -> tuple[str, str] | None:
    """None when group ``gid`` is the private group of user ``owner_uid``; else the group's
    name (its number when it has no entry) and why it is not, a template with ``{owner}``
    ("you"/"root") and ``{owners}`` ("your"/"root's") for :func:`writers_problem`.

    Private, as OpenSSH's ``secure_permissions`` (readconf.c) judges a group-writable file:
    its only member is the owner. OpenSSH counts the group's primary members by walking the
    whole passwd database; berth does not (on an LDAP or sssd site that is a directory search
    per file judged, or nothing at all where enumeration is off), so it asks for the shape a
    user-private group has wherever sites make them (useradd's USERGROUPS_ENAB, RHEL's and
    Debian's default): the group is the owner's primary group, its supplementary member list
    (``gr_mem``) is empty or the owner alone, and its name is the owner's name. The name is
    what stands for "no other user has it as primary group" (which only a walk of passwd could
    tell): a primary group named otherwise, such as ``users`` that every account of a SUSE
    site has, is refused. A group with no member at all is nobody's primary group here, so
    it is refused too. What is left is an administrator giving a second account another
    user's private group as its primary group (``useradd -g alice bob``), which berth cannot
    see without the walk. Cached per process: the verdict of a pair does not change while
    one berth command runs, and a spec directory or a mount source's parents repeat pairs."""
    import grp
    import pwd

    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return str(gid), "which has no entry in the group database"
    try:
        owner = pwd.getpwuid(owner_uid)
    except KeyError:
        return group.gr_name, f"which berth cannot tell is private to {{owner}} (uid {owner_uid} has no user entry)"
    if any(member != owner.pw_name for member in group.gr_mem):
        return group.gr_name, "which has members other than {owner}"
    if owner.pw_gid != gid:
        return group.gr_name, "which is not {owners} primary group"
    if group.gr_name != owner.pw_name:
        return group.gr_name, ("which is {owners} primary group but not named after {owner} as a private group "
                               "is, so other users may have it as theirs too")
    return None


# ----------------------------------------------------------------------------- free space


class Room(NamedTuple):
    """What a file system has free for this process (``statvfs``: blocks and inodes available
    to unprivileged users, not root's reserve). ``free_inodes`` is None where the file system
    counts no inodes (``f_files`` 0: btrfs, some network file systems), so none can run short."""

    free_bytes: int
    free_inodes: int | None


def free_room(path: Path | str) -> Room:
    """The :class:`Room` of the file system ``path`` is on. Raises OSError (a missing ``path``
    too: a caller judging a directory not made yet names its nearest existing parent)."""
    fs = os.statvfs(path)
    return Room(fs.f_bavail * fs.f_frsize, fs.f_favail if fs.f_files > 0 else None)


#: No margin: room for exactly what is asked (a fraction of it, and bytes beyond that).
NO_MARGIN = (0.0, 0)


def room_shortage(path: Path | str, size_bytes: int, inodes: int = 0, *, show_size: Callable[[int], str],
                  margin: tuple[float, int] = NO_MARGIN) -> str | None:
    """Whether the file system of ``path`` (:func:`free_room`) has room for ``size_bytes``
    and ``inodes`` with ``margin`` (a fraction of both, and that many bytes more): None when
    it has, else what is short in words, for the caller's message: "it needs 1.2 GiB, 300.0 MiB
    free" (bytes, when both are short) or "it needs 5000 inodes, 120 free". The one free-space
    check before berth writes much (a pull's downloads and image, an unpacked copy); each
    caller raises its own error and says who must act.

    ``show_size`` shows sizes for people: callers pass berth.config.units.human_size, the one
    way to (this module sits below berth.config and cannot import it). Raises OSError when the
    file system cannot be read."""
    room = free_room(path)
    fraction, extra_bytes = margin
    wanted_bytes = size_bytes + int(size_bytes * fraction) + extra_bytes
    if room.free_bytes < wanted_bytes:
        return f"it needs {show_size(wanted_bytes)}, {show_size(room.free_bytes)} free"
    wanted_inodes = inodes + int(inodes * fraction)
    if room.free_inodes is not None and room.free_inodes < wanted_inodes:
        return f"it needs {wanted_inodes} inodes, {room.free_inodes} free"
    return None
