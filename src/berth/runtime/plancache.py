"""Cached run plans: a repeated `berth run` executes the plan an earlier, identical one made
(issue 10, target 3; DESIGN.md direction 13: "Python plans ... a plan that Python produced and
cached").

A run's plan (berth.runtime.plan: config.json, the identity files, the mount points an overlay
needs) is a pure function of the run's inputs. When every input can be named, the plan is kept
after a run made it, and the next run with the very same inputs skips argparse, the image
look-up, the planning and their imports, and goes straight to the lifecycle
(berth.runtime.container: state directory, image mount, bundle, runtime, teardown — the same
code a planning run uses).

**The key** (sha256 of a marshal of plain values) is everything a run reads that is not a file:
berth's version and package path, the interpreter, uid, gid, supplementary groups, umask, the
whole argv, the whole environment, the working directory (path, device and inode) and uname.

**The dependencies** are the files: re-checked on every use, each by its lstat fingerprint
(device, inode, mode, owner, group, and for contents also size, mtime and ctime), "absent" a
fingerprint too, so a site file appearing later takes effect. They are (1) every path the
planning opened or listed, recorded while it ran (:class:`Recorder`, an audit hook on ``open``,
``os.listdir``, ``os.scandir``: settings files and drop-in directories looked for, template
files, the store's index and image records, env files), and (2) what it only stat()s or what C
code reads (:func:`explicit_dependencies`: /etc/passwd, /etc/group and nsswitch.conf, the home
directory, every site and ``-v`` mount source as given and as resolved, the stores' roots, the
image's SquashFS, berth-init and berth-launcher, berth's own module files). Every path also
brings the identity (not the times) of each directory above it, and where links lead. The
image's own files (read by the plan through its mount) are covered by its SquashFS file.
tests/unit/test_plancache.py plans runs under a recorder of every open, listdir, scandir, stat
and lstat and fails when one is not covered.

**What is cached** (:func:`cacheable` says why not): only runs whose every input is named
above: not root, no ``--device``/``--gpus``/``--mpi host``/CDI edits or hooks, no PMIx or
Slurm step (no ``SLURM_*``, ``PMIX_*``, ``PMI_*`` variables), no ``-t``, no ``--cpus`` or
``--memory``, ``--scope container``, ``--pull missing|never``, the image mount ``shared`` or
``per_container``, user and group databases from files only (nsswitch.conf), run by
berth-launcher (not runc), nothing said to the user while planning (a warning must be said on
every run), and no input changed within the last seconds (a file changed while it was read
would otherwise be cached with its new fingerprint).

**Where**: ``STATE/plans/KEY``, STATE being the state directory berth would use without any
settings file (``$BERTH_STATE_DIR`` when absolute, else ``$XDG_RUNTIME_DIR/berth`` or
``/tmp/berth-UID``): the look-up finds it before it loads settings, which it does only for an
entry whose dependencies are unchanged, to check that ``plan_cache`` is on now (with it off, no
entry runs, whoever wrote it) and that the entry's state directory and image mount settings
are the settings' own (:func:`settings_differ`). A settings file may move the state directory:
the entry records the one the run used, and that file is one of the entry's dependencies. The
directory must be a real directory of the caller's that nobody else may enter, and an entry a
regular file of the caller's that nobody else may write (another user's or a link is ignored);
content is marshal of plain values, checked field by field (never pickle); an entry listing no
dependency is malformed. An entry names its compiled twin (``c-KEY``, berth.runtime.compiledplan),
which goes with it: a run that planned replaces both or removes the one it does not keep again,
and the oldest entries beyond :data:`MAX_ENTRIES` are pruned with their twins, as are compiled
entries no entry names.
Per-container values (the container's directory, the image mount's root) are placeholders in
the cached plan, filled in at execution.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Mapping
from pathlib import Path

FORMAT = 1
DIRECTORY = "plans"
#: A compiled entry's name is this and its own key (berth.runtime.compiledplan); an entry's is its key.
COMPILED_PREFIX = "c-"
MAX_ENTRIES = 32
MAX_ENTRY_BYTES = 1 << 20
#: An input whose ctime is this close to the planning's start may have changed while it was
#: read (file-system timestamps are coarse): such a plan is not kept (git's "racily clean").
RACY_NS = 2_000_000_000
#: Placeholders for the per-container values in a cached plan (NUL: no argv, environment or
#: path of the run can hold one).
CONTAINER = "\0C"
IMAGE_ROOT = "\0I"
#: Sources of nsswitch.conf whose users and groups come from files berth lists as
#: dependencies (systemd's module only serves systemd's dynamic users, from /run/systemd/userdb).
FILE_SOURCES = {"files", "systemd"}
NSS_FILES = ("/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
USERDB = "/run/systemd/userdb"
#: Environment variables that carry a Slurm step's or PMIx's state into a run: never cached.
STEP_PREFIXES = ("SLURM_", "PMIX_", "PMI_")


def cache_directory(environ: Mapping[str, str]) -> Path | None:
    """Where plans are kept, from what is known before settings are loaded (see the module's
    docstring); None when the state directory there exists but is not a private directory of
    the caller's (nothing is cached)."""
    from berth.config.settings import early_state_dir

    state_dir = early_state_dir(environ)
    if state_dir is None:
        return None
    base = str(state_dir)
    from berth.fsutil import is_private_dir

    if is_private_dir(Path(base)) or not os.path.lexists(base):
        return Path(base) / DIRECTORY  # a missing one: the run creates it, and store_entry judges it
    return None


def _sha256():
    try:
        from _sha256 import sha256  # the built-in module: hashlib loads OpenSSL (~3 ms)
    except ImportError:  # pragma: no cover - interpreters without it
        from hashlib import sha256
    return sha256()


def run_key(argv: list[str], environ: Mapping[str, str]) -> str | None:
    """The key of a run: sha256 of every non-file input (module docstring). None when one
    cannot be read (a working directory removed under the caller)."""
    import marshal

    import berth

    try:
        cwd = os.getcwd()
        where = os.stat(cwd)
    except OSError:
        return None
    umask = os.umask(0o077)
    os.umask(umask)
    material = (FORMAT, berth.__version__, berth.__file__, sys.executable, sys.argv[0] if sys.argv else "",
                os.getuid(), os.geteuid(), os.getgid(), os.getegid(), tuple(os.getgroups()), umask,
                tuple(argv), tuple(sorted(environ.items())), cwd, where.st_dev, where.st_ino, tuple(os.uname()))
    digest = _sha256()
    digest.update(marshal.dumps(material))
    return digest.hexdigest()


def fingerprint(path: str, contents: bool) -> tuple | None:
    """``path``'s lstat fingerprint (None: absent); ``contents``: with size and times (a file's
    bytes, a directory's entries), else its identity only (a directory a path goes through:
    /tmp changes all the time, what matters is that it is the same directory)."""
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return ("error", exc.errno)
    identity = (info.st_dev, info.st_ino, info.st_mode, info.st_uid, info.st_gid)
    if contents:
        return (*identity, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    return identity


class Dependencies:
    """Paths a plan was made from: ``path -> contents`` (see :func:`fingerprint`)."""

    def __init__(self) -> None:
        self.paths: dict[str, bool] = {}

    def add(self, path: str, *, contents: bool = True) -> None:
        """``path`` (absolute; a relative one is taken from the working directory, which is in
        the key), the identity of every directory above it, and where links on the way lead."""
        path = os.path.abspath(path)
        self.paths[path] = self.paths.get(path, False) or contents
        parent = os.path.dirname(path)
        while parent != "/" and parent not in self.paths:
            self.paths[parent] = False
            parent = os.path.dirname(parent)
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError):
            return
        if real != path:
            self.add(real, contents=contents)

    def fingerprints(self) -> list[tuple[str, bool, tuple | None]]:
        return [(path, contents, fingerprint(path, contents)) for path, contents in sorted(self.paths.items())]


class Recorder:
    """Records the paths opened and listed by Python code while ``active`` (an audit hook,
    sys.addaudithook: installed once per process, since a hook cannot be removed; inert when
    no recorder is active). A relative path cannot be named (relative to the working directory
    or to a directory descriptor: the event does not say): ``unnamed`` counts them, and a run
    with any is not cached."""

    def __init__(self) -> None:
        #: (path, listed): opened (a directory opened is a dependency by identity, its entries
        #: being read only by a listing, which names it) or listed.
        self.paths: list[tuple[str, bool]] = []
        self.unnamed = 0
        self.first_unnamed = ""
        self.active = False
        self._outer: list[tuple[bool, Recorder | None]] = []

    def __enter__(self) -> Recorder:
        _install_hook()
        self._outer.append((self.active, _ACTIVE[0]))
        _ACTIVE[0] = self
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active, _ACTIVE[0] = self._outer.pop()

    def event(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (*args, None, None)[:3]
            if isinstance(flags, int) and flags & os.O_ACCMODE == os.O_WRONLY:
                return  # written, not read (the parse cache of settings files, saved while loading)
            if isinstance(mode, str) and "+" not in mode and "r" not in mode:
                return
        elif event in ("os.listdir", "os.scandir"):
            path = args[0] if args[0] is not None else "."
        else:
            return
        if isinstance(path, int):
            if event != "open":  # a listing of a directory opened before: which one is not said
                self.unnamed += 1
                self.first_unnamed = self.first_unnamed or f"descriptor {path}"
            return  # open(fd): the descriptor was opened, and recorded, by name
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            path = os.fspath(path)
        if not path.startswith("/"):
            # Relative to the working directory, or to a descriptor (openat): which one, the
            # event does not say.
            self.unnamed += 1
            self.first_unnamed = self.first_unnamed or path
            return
        self.paths.append((path, event != "open"))


#: The recorder the audit hook reports to (a list: the hook is a closure over it). Module state
#: only because an audit hook is process-wide and permanent.
_ACTIVE: list[Recorder | None] = [None]
_HOOKED: list[bool] = [False]


def _install_hook() -> None:
    if _HOOKED[0]:
        return
    active = _ACTIVE

    def hook(event: str, args: tuple) -> None:
        recorder = active[0]
        if recorder is not None and recorder.active:
            recorder.event(event, args)

    sys.addaudithook(hook)
    _HOOKED[0] = True


def nss_from_files(path: str = "/etc/nsswitch.conf") -> bool:
    """Whether passwd, group and initgroups come from files only (see FILE_SOURCES)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return True  # glibc's default without the file: files
    except OSError:
        return False
    for line in lines:
        database, _, sources = line.split("#", 1)[0].partition(":")
        if database.strip() in ("passwd", "group", "initgroups", "shadow", "gshadow"):
            words = sources.split()
            if any(word not in FILE_SOURCES for word in words):
                return False
    return True


def explicit_dependencies(dependencies: Dependencies, settings, image, options, request, *,
                          init_path: str, launcher_path: str) -> None:
    """Add what planning reads without opening it from Python (module docstring, (2))."""
    for path in NSS_FILES:
        dependencies.add(path)
    dependencies.add(USERDB)
    dependencies.add(str(image.squashfs))
    for store in (settings.user_store, settings.site_store):
        dependencies.add(str(store), contents=False)
    caller = request.caller
    if caller.home:
        dependencies.add(caller.home, contents=False)
    if caller.passwd_home:
        dependencies.add(caller.passwd_home, contents=False)
    mounts = [*settings.policy.mounts, *(m for group in settings.policy.groups for m in group.mounts)]
    for mount in mounts:
        dependencies.add(mount.source, contents=False)
    for mount in options.mounts:
        dependencies.add(mount.source, contents=False)
    for bind in (*request.site_mounts, *request.user_mounts, *request.home.binds):
        dependencies.add(bind.source, contents=False)
    for env_file in options.env_files:
        dependencies.add(str(env_file))
    # Where berth's own directories are (or may appear) decides which places the plan hides
    # (berth.runtime.plan._hidden): each one, "absent" too, and each path it is reached by.
    from berth.runtime.policy import host_views

    for directory in request.private_dirs:
        dependencies.add(directory, contents=False)
        for view in host_views(directory):
            dependencies.add(view, contents=False)
    dependencies.add(init_path)
    dependencies.add(launcher_path)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    for module in list(sys.modules.values()):
        filename = getattr(module, "__file__", None)
        if filename and filename.startswith(package):
            dependencies.add(filename)


def cacheable(settings, image, options, request, environ: Mapping[str, str], said: list[str]) -> str | None:
    """Why a run's plan is not kept, or None when it may be (module docstring)."""
    checks = (
        (not getattr(settings, "plan_cache", False), "the setting plan_cache is off"),
        (os.getuid() == 0, "run as root"),
        (options.gpus is not None, "--gpus"),
        (bool(options.devices), "--device"),
        (options.mpi == "host", "--mpi host"),
        (options.tty, "-t"),
        (options.cpus is not None or options.memory_bytes is not None, "--cpus/--memory"),
        (options.scope != "task", "--scope node"),
        (options.pull == "always", "--pull always"),
        (settings.image_mount not in ("shared", "per_container"), f"image_mount = {settings.image_mount}"),
        (bool(request.devices or request.device_mounts or request.hooks), "devices, CDI edits or hooks"),
        (request.pmi_fd is not None or request.mpi is not None, "a PMI socket or host MPI"),
        (any(name.startswith(STEP_PREFIXES) for name in environ), "a Slurm step or PMIx environment"),
        (bool(said), "berth had something to say while planning"),
        (not nss_from_files(), "users or groups come from more than files (nsswitch.conf)"),
        (getattr(image, "squashfs", None) is None, "no image file"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    return None


# ------------------------------------------------------------------------------------- plans

def _replace(value, pairs: list[tuple[str, str]]):
    """``value`` (JSON-like: dicts, lists, strings, numbers) with each pair's first string
    replaced by its second in every string."""
    if isinstance(value, str):
        for old, new in pairs:
            if old in value:
                value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_replace(item, pairs) for item in value]
    if isinstance(value, tuple):
        return tuple(_replace(item, pairs) for item in value)
    if isinstance(value, dict):
        return {_replace(key, pairs): _replace(item, pairs) for key, item in value.items()}
    return value


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


def plan_entry(plan, config: dict, container_path: str, container_id: str) -> tuple[dict | None, str | None]:
    """The cacheable part of a ContainerPlan (its config.json ``config``), with the container's
    directory and the image root as placeholders; (None, why) when something per-container
    would be left in it."""
    plain = {
        "image_root": plan.image_root,
        "overlay": bool(plan.overlay),
        "kernel_overlay": bool(plan.kernel_overlay),
        "mount_points": [[point.path, bool(point.is_dir)] for point in plan.mount_points],
        "identity_files": [[item.name, item.text, item.target] for item in plan.identity_files],
        "squash_to": list(plan.squash_to) if plan.squash_to else None,
        "config": config,
    }
    if plain["kernel_overlay"]:
        return None, "a kernel overlay"
    if any("\0" in text for text in _strings(plain)):
        return None, "a NUL in the plan"
    templated = _replace(plain, [(plan.image_root, IMAGE_ROOT), (container_path, CONTAINER)])
    if any(container_id in text for text in _strings(templated)):
        return None, "the container's id in the plan"
    return templated, None


class CachedPlan:
    """A cached plan made concrete for one container: what materialisation and supervision use
    of a ContainerPlan (``overlay``, ``kernel_overlay``, ``mount_points``, ``identity_files``,
    ``image_root``, ``squash_to``, :meth:`config`)."""

    def __init__(self, plain: dict, container_path: str, image_root: str) -> None:
        from berth.runtime.rootfs import MountPoint

        concrete = _replace(plain, [(CONTAINER, container_path), (IMAGE_ROOT, image_root)])
        self.image_root = concrete["image_root"]
        self.overlay = concrete["overlay"]
        self.kernel_overlay = False
        self.mount_points = tuple(MountPoint(path, is_dir) for path, is_dir in concrete["mount_points"])
        self.identity_files = tuple(_IdentityFile(name, text, target)
                                    for name, text, target in concrete["identity_files"])
        self.squash_to = tuple(concrete["squash_to"]) if concrete["squash_to"] else None
        self._config = concrete["config"]

    def config(self) -> dict:
        return self._config


class _IdentityFile:
    def __init__(self, name: str, text: str, target: str) -> None:
        self.name, self.text, self.target = name, text, target


# ------------------------------------------------------------------------------ the entries

#: An entry's fields and their types (checked on every read: the file is data).
FIELDS = {"format": int, "key": str, "uid": int, "deps": list, "settings": dict, "image": dict, "run": dict,
          "plan": dict, "made": int, "compiled": str}


def store_entry(directory: Path, key: str, entry: dict) -> None:
    """Write ``entry`` as ``directory/KEY`` (created 0700 when missing inside the private state
    directory), atomically, then prune the oldest beyond MAX_ENTRIES. Raises OSError."""
    import marshal

    from berth.fsutil import PRIVATE_FILE, is_private_dir, write_atomically

    if not is_private_dir(directory):
        if not is_private_dir(directory.parent):
            raise PermissionError(f"{directory.parent} is not a private directory of yours")
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        if not is_private_dir(directory):
            raise PermissionError(f"{directory} is not a private directory of yours")
    data = marshal.dumps({"format": FORMAT, "key": key, "uid": os.getuid(), "made": time.time_ns(), **entry})
    write_atomically(directory / key, data, mode=PRIVATE_FILE, nofollow_dir=True, durable=False)
    prune(directory, keep=MAX_ENTRIES)


def prune(directory: Path, *, keep: int = 0) -> int:
    """Remove all but the ``keep`` newest entries of ``directory`` (and leftover temporary
    files), and every compiled entry (``c-KEY``) that no kept entry names as its twin: one whose
    entry was pruned, replaced or removed would otherwise stay, and run. Returns how many went."""
    try:
        names = [entry for entry in os.scandir(directory)
                 if len(entry.name) == 64 or entry.name.startswith((".", COMPILED_PREFIX))]
    except OSError:
        return 0
    dated, compiled = [], []
    for entry in names:
        if entry.name.startswith(COMPILED_PREFIX):
            compiled.append(entry.path)
            continue
        try:
            dated.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
        except OSError:
            continue
    dated.sort(reverse=True)
    twins = set()
    if compiled:
        for _, name in dated[:keep]:
            if not name.startswith("."):
                kept, _ = load_entry(directory, name)
                twins.add(kept["compiled"] if kept else None)
    removed = 0
    for path in [os.path.join(directory, name) for _, name in dated[keep:]] + compiled:
        if os.path.basename(path) in twins:
            continue
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def forget(directory: Path, *names: str) -> None:
    """Remove the entries ``names`` (a plan a run found stale and did not keep again, a
    compiled twin the new plan has none of), when ``directory`` is a private directory of the
    caller's; absent ones are no error."""
    from berth.fsutil import is_private_dir

    if not is_private_dir(directory):
        return
    for name in names:
        if name:
            try:
                os.unlink(directory / name)
            except FileNotFoundError:
                pass


def load_entry(directory: Path, key: str) -> tuple[dict | None, str]:
    """The entry for ``key`` and "" , or (None, why not): missing, not the caller's or
    writable by others, a link, too large, not a well-formed entry."""
    import marshal

    from berth.fsutil import is_private_dir

    if not is_private_dir(directory):
        return None, "no entry" if not os.path.lexists(directory) else f"{directory} is not a private directory of yours"
    try:
        fd = os.open(directory / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, "no entry"
    except OSError as exc:
        return None, f"cannot open the entry: {exc.strerror}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "the entry is not a regular file"
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return None, "the entry is not yours alone to write"
        if info.st_size > MAX_ENTRY_BYTES:
            return None, "the entry is too large"
        data = os.read(fd, MAX_ENTRY_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read the entry: {exc.strerror}"
    finally:
        os.close(fd)
    try:
        entry = marshal.loads(data)
    except (ValueError, EOFError, TypeError):
        return None, "the entry is corrupt"
    why = _malformed(entry, key)
    return (None, why) if why else (entry, "")


def _malformed(entry, key: str) -> str | None:
    if not isinstance(entry, dict):
        return "the entry is corrupt"
    for name, kind in FIELDS.items():
        if not isinstance(entry.get(name), kind):
            return f"the entry's {name} is missing or wrong"
    if entry["format"] != FORMAT:
        return "the entry is of another berth"
    if entry["key"] != key or entry["uid"] != os.getuid():
        return "the entry is for another run"
    compiled = entry["compiled"]
    if compiled and not (compiled.startswith(COMPILED_PREFIX) and len(compiled) == len(COMPILED_PREFIX) + 64
                         and "/" not in compiled):
        return "the entry's compiled twin is malformed"
    if not entry["deps"]:
        # A kept plan always depends on files (passwd, the image, berth itself): one naming
        # none was not written by Keeper, and nothing about it could be re-checked.
        return "the entry lists no dependencies"
    for item in entry["deps"]:
        if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], bool) and (item[2] is None or isinstance(item[2], tuple))):
            return "the entry's dependencies are malformed"
    settings, image, run, plan = entry["settings"], entry["image"], entry["run"], entry["plan"]
    shapes = (
        (settings, {"state_dir": str, "image_mount": str, "stage_to_local": bool, "image_fuse": str,
                    "lock_timeout_s": int, "image_mount_linger": int, "runtime": str}),
        (image, {"squashfs": str, "reference": (str, type(None)), "digest": (str, type(None))}),
        (run, {"name": (str, type(None)), "image_name": str, "argv": list, "uid": int, "gid": int,
               "network": str, "workdir": str, "remap_root": bool, "stop_timeout_s": (int, float),
               "init": str, "debug": bool}),
        (plan, {"image_root": str, "overlay": bool, "kernel_overlay": bool, "mount_points": list,
                "identity_files": list, "squash_to": (list, type(None)), "config": dict}),
    )
    for table, fields in shapes:
        for name, kind in fields.items():
            if not isinstance(table.get(name), kind):
                return f"the entry's {name} is missing or wrong"
    if plan["kernel_overlay"] or not all(isinstance(a, str) for a in run["argv"]):
        return "the entry's plan is malformed"
    mounts = plan["config"].get("mounts", [])
    if not (isinstance(mounts, list) and all(isinstance(mount, dict) for mount in mounts)):
        return "the entry's config.json mounts are malformed"
    for point in plan["mount_points"]:
        if not (isinstance(point, list) and len(point) == 2 and isinstance(point[0], str)
                and isinstance(point[1], bool)):
            return "the entry's mount points are malformed"
    for item in plan["identity_files"]:
        if not (isinstance(item, list) and len(item) == 3 and all(isinstance(part, str) for part in item)
                and item[0] in ("passwd", "group")):
            return "the entry's identity files are malformed"
    return None


def settings_differ(entry: dict, settings) -> str | None:
    """The first setting the lifecycle reads whose value in ``settings`` (loaded now) is not
    the one ``entry`` records, or None. The state directory must be the one settings name, by
    its real path, and a private directory of the caller's."""
    from berth.fsutil import is_private_dir

    recorded = entry["settings"]
    state_dir = recorded["state_dir"]
    if os.path.realpath(settings.state_dir) != state_dir or not is_private_dir(state_dir):
        return "state_dir"
    for name in ("image_mount", "stage_to_local", "image_fuse", "lock_timeout_s", "image_mount_linger"):
        if getattr(settings, name) != recorded[name]:
            return name
    if recorded["runtime"] not in (settings.runtime, "auto", "launcher", "runc", "crun"):
        return "runtime"
    return None


def changed_dependency(entry: dict) -> str | None:
    """The first dependency whose fingerprint is not the recorded one, or None."""
    for path, contents, recorded in entry["deps"]:
        if fingerprint(path, contents) != recorded:
            return path
    return None


def racy(fingerprints: list[tuple[str, bool, tuple | None]], since_ns: int) -> str | None:
    """A dependency changed at or after ``since_ns`` (minus the timestamps' coarseness)."""
    for path, contents, value in fingerprints:
        if contents and value is not None and value[0] != "error" and value[-1] >= since_ns - RACY_NS:
            return path
    return None


# ---------------------------------------------------------------------- keeping a new plan

class Keeper:
    """Keeps the plan of a run that planned, when it may be cached (berth.cli.fastrun makes
    one for a `berth run` whose look-up missed; berth.runtime.container tells it the request,
    then the plan and runtime). Records what the planning reads while its :attr:`recorder` is
    active; paused by the lifecycle. Never raises for the cache's sake: a plan not kept is only
    a slower next run."""

    def __init__(self, directory: Path, key: str, environ: Mapping[str, str], *, image_argument: str = "",
                 debug: bool = False) -> None:
        self.directory = directory
        self.key = key
        self.environ = environ
        #: IMAGE as given: a path to a SquashFS file when one exists there (berth.cli.run.resolve_image).
        self.image_argument = image_argument
        self.debug = debug
        self.recorder = Recorder()
        self.said: list[str] = []
        self.started_ns = time.time_ns()
        self._planned: tuple | None = None
        self._why_not: str | None = None
        #: What became of the compiled form (berth.runtime.compiledplan), for --debug.
        self.compiled = ""

    def log(self, log):
        """``log`` that also notes what planning says to the user (such a plan is not kept:
        a cached run would not say it again)."""
        def noting(message: str, *, debug: bool = False) -> None:
            if not debug and self.recorder.active:
                self.said.append(message)
            log(message, debug=debug)

        return noting

    def recording(self) -> Recorder:
        return self.recorder

    def planned(self, settings, image, options, request, state_dir: Path, init: str) -> None:
        self._planned = (settings, image, options, request, state_dir, init)

    def made(self, plan, config: dict, container, runtime: str, log) -> None:
        """Keep ``plan`` (its ``config``, for ``container``, run by ``runtime``) if it may be;
        say under --debug why not."""
        try:
            why = self._keep(plan, config, container, runtime)
        except (OSError, ValueError) as exc:
            why = f"cannot write it: {exc}"
        if why is not None:
            # What this run's look-up found (stale, malformed, of other settings) would stay
            # beside the plan not kept, and so would its compiled twin, which the front end
            # reads without Python: both go.
            try:
                forget(self.directory, self.key, self._twin()[1])
            except (OSError, ValueError):
                pass
        log(f"plan cache: kept this run's plan ({self.key[:12]}; {self.compiled})" if why is None
            else f"plan cache: this run's plan is not kept: {why}", debug=True)

    def dependencies(self, image_root: str, state_dir: Path) -> Dependencies:
        """What the planning recorded (but the image's own files, read under ``image_root``
        and covered by its SquashFS file, the containers' and plans' directories, and the parse
        cache of settings files) and the explicit dependencies of the request :meth:`planned`
        was told."""
        from berth.config.load import parse_cache_dir
        from berth.config.tomlfile import ParseCache
        from berth.runtime.ocirt import launcher_path
        from berth.runtime.state import CONTAINERS

        settings, image, options, request, _, init = self._planned
        dependencies = Dependencies()
        # Only what berth itself keeps there, not the whole state directory: a store or a
        # settings file a user keeps under it is an input like any other. The parse cache only
        # keeps the parse of the very bytes read from the settings files, which are dependencies.
        under = tuple(str(path).rstrip("/") + "/" for path in (image_root, Path(state_dir) / CONTAINERS,
                                                                self.directory))
        exact = {str(parse_cache_dir(self.environ) / ParseCache.NAME), *(path.rstrip("/") for path in under)}
        # The mount table (this process's own, read for the places the plan hides) is not a
        # file of the plan: what it said is, by the explicit dependencies on berth's directories.
        from berth.runtime.policy import MOUNT_TABLE

        for path, listed in self.recorder.paths:
            absolute = os.path.normpath(path)
            if absolute.startswith(under) or absolute in exact or absolute == MOUNT_TABLE:
                continue
            dependencies.add(absolute, contents=listed or not os.path.isdir(absolute))
        explicit_dependencies(dependencies, settings, image, options, request, init_path=init,
                              launcher_path=launcher_path())
        from berth.runtime.container import names_local_image

        if self.image_argument and names_local_image(self.image_argument):
            dependencies.add(self.image_argument)  # a SquashFS file appearing there would be run instead
        return dependencies

    def _twin(self) -> tuple[str | None, str]:
        """The compiled front end's path (None: not run by it) and this run's compiled entry's
        name there ("" when none)."""
        from berth.runtime import compiledplan

        front = compiledplan.front_end()
        return front, (compiledplan.twin_name(front) or "") if front else ""

    def _keep(self, plan, config: dict, container, runtime: str) -> str | None:
        if self._planned is None:
            return "it was not planned here"
        settings, image, options, request, state_dir, init = self._planned
        why = cacheable(settings, image, options, request, self.environ, self.said)
        if why:
            return why
        if os.path.realpath(state_dir) != os.path.realpath(self.directory.parent):
            return f"the state directory is not {self.directory.parent}, where plans are kept"
        if os.path.basename(runtime) != "berth-launcher":
            return f"run by {os.path.basename(runtime)}, not berth-launcher"
        if self.recorder.unnamed:
            return f"planning read a path relative to a directory it did not name ({self.recorder.first_unnamed})"
        plain, why = plan_entry(plan, config, str(container.path), container.id)
        if why:
            return why
        fingerprints = self.dependencies(plan.image_root, state_dir).fingerprints()
        changed = racy(fingerprints, self.started_ns)
        if changed:
            return f"{changed} changed moments ago"
        front, twin = self._twin()
        entry = {
            "compiled": twin,
            "deps": fingerprints,
            "settings": {"state_dir": str(state_dir), "image_mount": settings.image_mount,
                         "stage_to_local": bool(settings.stage_to_local), "image_fuse": settings.image_fuse,
                         "lock_timeout_s": int(settings.lock_timeout_s),
                         "image_mount_linger": int(settings.image_mount_linger),
                         "runtime": options.runtime or settings.runtime},
            "image": {"squashfs": str(image.squashfs), "reference": getattr(image, "reference", None),
                      "digest": None if getattr(image, "digest", None) is None else str(image.digest)},
            "run": {"name": options.name, "image_name": request.image_name, "argv": list(request.argv),
                    "uid": request.caller.uid, "gid": request.caller.gid, "network": request.network,
                    "workdir": request.workdir, "remap_root": bool(options.remap_root),
                    "stop_timeout_s": options.stop_timeout_s, "init": init, "debug": self.debug},
            "plan": plain,
        }
        store_entry(self.directory, self.key, entry)
        not_compiled = self._keep_compiled(front, twin, fingerprints, state_dir, settings, options, image, entry)
        self.compiled = "compiled too" if not_compiled is None else f"not compiled: {not_compiled}"
        if not_compiled is not None:
            forget(self.directory, twin)  # an earlier plan's, for this very run: stale now
        return None

    def _keep_compiled(self, front, twin, fingerprints, state_dir, settings, options, image, entry) -> str | None:
        """Also keep the compiled form ``twin`` for the front end ``front``
        (berth.runtime.compiledplan); None, or why not, for --debug."""
        from berth.runtime import compiledplan

        if front is None:
            return "not run by the front end's berth-py"
        if not twin:
            return "the working directory cannot be read"
        from berth.config.load import config_files

        extra = [front, os.path.join(os.path.dirname(front), compiledplan.PYTHON_ENTRY)]
        try:
            files = config_files(Path(settings.config_dir), self.environ)
        except Exception:  # noqa: BLE001 - the settings loaded moments ago; a change now: not compiled
            return "the settings files cannot be listed"
        extra += [str(path) for path, _ in files] + [str(Path(settings.config_dir) / "conf.d")]
        try:
            return compiledplan.keep(self.directory, front, twin, fingerprints, state_dir=str(state_dir),
                                     settings=settings, options=options, image=image, entry=entry,
                                     extra_dependencies=extra)
        except (OSError, ValueError) as exc:
            return f"cannot write it: {exc}"


def forget_all(environ: Mapping[str, str]) -> int:
    """Remove every kept plan of the caller on this node (``berth prune``, ``berth doctor
    --cleanup``); returns how many."""
    directory = cache_directory(environ)
    return prune(directory) if directory is not None and os.path.isdir(directory) else 0
