"""Site policy applied to what a user asks of `berth run` (issue 3, issue 4: admin side).

Bind-mount sources are resolved on the host (symlinks followed, as the kernel would) *before*
they are judged, and the resolved path is what gets mounted, so a symlink cannot smuggle a
forbidden path past the check. The runtime resolves that path again when it mounts it, though,
so a component swapped for a symlink in between (by the caller, who owns the path) would mount
something else: the judged inode's (st_dev, st_ino) travels with the mount
(:attr:`BindMount.identity`) and berth-init refuses to start the command when the destination
is not that inode (a bind mount shows its source's). Destinations are container paths: they
must be absolute and free of ``..``; symlinks inside the image are followed in-root by the
runtime (runc's securejoin; berth-launcher's openat2 with RESOLVE_IN_ROOT), so they cannot
point out of the container either.

These rules are site policy, not the security boundary: every mount is made in the caller's own
user namespace with the caller's credentials, so a mount can never expose more than the caller
could read on the host anyway (a user who races a path component after the check gains nothing
they did not have).
"""

from __future__ import annotations

import os
import posixpath

from berth import fsutil
from berth.errors import PolicyError, UsageError
from berth.runtime.options import RunOptions
from berth.runtime.spec import INIT_PATH, BindMount

_ADMIN = "ask your site administrator if you need it (site policy: mount_allow / mount_deny_*)"


def under(path: str, prefixes) -> str | None:
    """The first prefix that ``path`` equals or lies under (whole components), or None."""
    for prefix in prefixes:
        prefix = prefix.rstrip("/") or "/"
        if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
            return prefix
    return None


def check_destination(destination: str, *, what: str, deny) -> str:
    """Validate a container path for a mount; return it normalized. Raises PolicyError.

    The one rule for destinations (docs/configuration.md): absolute, no ``..``, not ``/``, and
    neither equal to, under, nor *containing* a path of ``deny`` or berth's init: a mount over
    all of ``/etc`` hides ``/etc/passwd`` as surely as a mount over ``/etc/passwd`` itself."""
    if not destination.startswith("/"):
        raise PolicyError(f"{what}: the destination '{destination}' must be an absolute path inside the container")
    if ".." in destination.split("/"):
        raise PolicyError(f"{what}: the destination '{destination}' contains '..'",
                          hint="name the container path directly")
    normalized = posixpath.normpath(destination)
    if normalized.startswith("//"):
        normalized = "/" + normalized.lstrip("/")
    if normalized == "/":
        raise PolicyError(f"{what}: mounting over the container's root directory is not allowed")
    if normalized == INIT_PATH or normalized.startswith(INIT_PATH + "/"):
        raise PolicyError(f"{what}: {INIT_PATH} is reserved for berth's init")
    if under(INIT_PATH, (normalized,)):
        raise PolicyError(f"{what}: mounting over {normalized} would cover {INIT_PATH}, which is reserved for "
                          "berth's init")
    denied = under(normalized, deny)
    if denied:
        raise PolicyError(f"{what}: mounting over {denied} in the container is not allowed by site policy",
                          hint=_ADMIN)
    covered = next((path for path in deny if under(path.rstrip("/") or "/", (normalized,))), None)
    if covered:
        raise PolicyError(f"{what}: mounting over {normalized} would cover {covered}, which site policy "
                          "protects in the container", hint=_ADMIN)
    return normalized


def check_source(source: str, absolute: str, real: str, *, what: str, deny, hint: str = _ADMIN) -> None:
    """Refuse a host path when the path as given (``absolute``) or what it resolves to
    (``real``) is equal to or under a path of ``deny`` (``mount_deny_sources``)."""
    denied = under(absolute, deny) or under(real, deny)
    if denied:
        via = f" (it resolves to {real})" if real != absolute else ""
        raise PolicyError(f"{what}: the host path {source}{via} is under {denied}, which site policy does not "
                          "allow to be mounted", hint=hint)


def resolve_source(source: str, *, what: str, settings) -> str:
    """Resolve a host path (symlinks, relative to the current directory) and judge it."""
    absolute = os.path.abspath(os.path.expanduser(source))
    policy = settings.policy
    try:
        real = os.path.realpath(absolute)
    except OSError as exc:
        real = absolute
        if not under(absolute, policy.mount_deny_sources):
            raise PolicyError(f"{what}: cannot resolve the host path {source}: {exc.strerror}") from None
    check_source(source, absolute, real, what=what, deny=policy.mount_deny_sources)
    if policy.mount_allow and not under(real, policy.mount_allow):
        raise PolicyError(f"{what}: the host path {real} is not under an allowed prefix "
                          f"({', '.join(policy.mount_allow)})", hint=_ADMIN)
    if not os.path.exists(real):
        raise UsageError(f"{what}: the host path {source} does not exist")
    if not os.access(real, os.R_OK):
        raise PolicyError(f"{what}: you cannot read the host path {real}",
                          hint="you can only mount what you could read on the host")
    return real


def resolve_user_mounts(settings, options: RunOptions) -> list[BindMount]:
    """The user's ``-v`` mounts, checked and resolved (host sources real, destinations normal)."""
    deny = settings.policy.mount_deny_destinations
    mounts = []
    for request in options.mounts:
        what = f"--mount {request.source}:{request.destination}"
        destination = check_destination(request.destination, what=what, deny=deny)
        source = resolve_source(request.source, what=what, settings=settings)
        mounts.append(BindMount(source, destination, read_only=request.read_only,
                                identity=source_identity(source, what=what)))
    return mounts


def source_identity(real: str, *, what: str) -> tuple[int, int]:
    """(st_dev, st_ino) of the judged source ``real``, taken from a descriptor whose path the
    kernel confirms is ``real`` (a component swapped while it was judged is refused)."""
    try:
        fd = os.open(real, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise PolicyError(f"{what}: cannot open the host path {real}: {exc.strerror}") from None
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != real:
            raise PolicyError(f"{what}: the host path {real} changed while berth checked it",
                              hint="do not rename or replace a mount source while berth starts")
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return (info.st_dev, info.st_ino)


#: The mount table of berth's own mount namespace (proc(5)): where else a directory appears.
MOUNT_TABLE = "/proc/self/mountinfo"


def _mount_table(table: str) -> list[tuple[str, str, str]]:
    """(major:minor, root in its file system, mount point) of each mount, in mount order."""
    mounts = []
    try:
        with open(table, encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                fields = line.split(" ")
                if len(fields) > 4:
                    mounts.append((fields[2], fsutil.mountinfo_path(fields[3]), fsutil.mountinfo_path(fields[4])))
    except OSError:
        pass
    return mounts


def host_views(directory: str, *, table: str = MOUNT_TABLE) -> tuple[str, ...]:
    """Every host path at which ``directory`` (an existing directory, by its real path) can be
    reached in berth's mount namespace: its real path, and its place under every other mount
    of its file system whose root holds it (a bind mount of /tmp elsewhere, as Slurm's
    job_container/tmpfs makes a job's /tmp from its base directory). Each is confirmed by its
    (st_dev, st_ino); a path shadowed by a later mount is not one. Empty when ``directory``
    does not exist."""
    try:
        real = os.path.realpath(directory)
        info = os.stat(real)
    except (OSError, ValueError):
        return ()
    identity = (info.st_dev, info.st_ino)
    views = [real]
    device = f"{os.major(info.st_dev)}:{os.minor(info.st_dev)}"
    mounts = _mount_table(table)
    holder = None
    for mount in mounts:  # the last mount at the longest mount point holding it: what is seen
        if under(real, (mount[2],)) and (holder is None or len(mount[2].rstrip("/")) >= len(holder[2].rstrip("/"))):
            holder = mount
    if holder is None or holder[0] != device:
        return tuple(views)  # st_dev is not the table's (btrfs subvolumes...): the real path only
    point = holder[2].rstrip("/")
    inside = posixpath.normpath(holder[1].rstrip("/") + "/" + real[len(point):].lstrip("/"))
    for major_minor, root, mount_point in mounts:
        if major_minor != device or not under(inside, (root,)):
            continue
        rest = inside[len(root.rstrip("/")):].lstrip("/")
        candidate = posixpath.join(mount_point, rest) if rest else mount_point
        if candidate in views:
            continue
        try:
            seen = os.stat(candidate)
        except OSError:
            continue
        if (seen.st_dev, seen.st_ino) == identity:
            views.append(candidate)
    return tuple(views)


def root_warning(uid: int, environ) -> str | None:
    """The warning for a caller running berth as root (``uid`` 0) unless ``BERTH_ALLOW_ROOT=1``
    in ``environ``: the container is host uid 0 (without capabilities) with root's home mounted
    read-write, so a hostile image can change root's files. Not refused: admins and tests do it."""
    if uid != 0 or environ.get("BERTH_ALLOW_ROOT") == "1":
        return None
    return ("warning: running as root: the container runs as host uid 0 (with no capabilities) and "
            "/root is mounted read-write, so an image you do not trust can change root's files; "
            "run berth as an ordinary user (set BERTH_ALLOW_ROOT=1 to silence this warning)")


def forced_network(settings) -> str | None:
    return dict(settings.policy.forced_namespaces).get("network")


def check_runtime_pin(settings, runtime: str | None) -> None:
    """``--runtime`` against the site's pins: another runtime than a pinned one is a PolicyError
    (issue 12 #7: a template's custom options are held to it at create, modify and submit)."""
    if runtime and runtime != settings.runtime and "runtime" in getattr(settings, "pinned", ()):
        raise PolicyError(f"--runtime {runtime}: the site configuration pins runtime = {settings.runtime}",
                          hint="ask your site administrator (berth.toml: pinned)")


def check_options(settings, options: RunOptions) -> None:
    """Raise PolicyError (or UsageError) for anything in ``options`` site policy forbids, or
    that contradicts a site-pinned setting."""
    check_runtime_pin(settings, options.runtime)
    resolve_user_mounts(settings, options)
    if options.devices or options.gpus:
        from berth.runtime.devices.edits import apply_edits, check_devices

        # Device paths are judged on this node; group names must be the site's; CDI devices and
        # GPUs depend on the node that runs the container and are judged there.
        apply_edits(settings, check_devices(settings, options.devices))
    forced = forced_network(settings)
    if forced and options.network and options.network != forced:
        raise PolicyError(f"--network={options.network}: site policy forces network={forced}",
                          hint="ask your site administrator (policy forced_namespaces)")
