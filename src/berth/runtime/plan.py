"""The container plan: everything ``berth run`` decides before it makes or runs anything.

A run is three stages (issue 9): this **plan**, its **materialisation**
(:mod:`berth.runtime.materialise`: state directory, FUSE mounts, identity files, bundle) and
**supervision** (:mod:`berth.runtime.supervise`: the OCI runtime, signals, stop timeout,
teardown). The plan is made in two pure steps: they read the host and the image's files, and
write nothing, start nothing:

1. :func:`request_for` — what does not depend on the image's files: the command, the
   environment, the caller's identity and home, ``-v``/site/PMIx mounts and devices judged by
   site policy (host sources resolved and identified), namespaces.
2. :func:`plan_container` — with the image's root directory at hand (mounted read-only, or any
   directory in tests): where each mount lands through the image's own links (judged again
   there), which mount points the image lacks (so an overlay is needed), the identity files'
   content and where they go, and the OCI ``config.json`` (:func:`berth.runtime.spec.build_config`).

New run-time features (devices, GPUs and CDI edits, MPI injection, shared image mounts) arrive
as data in :class:`RunRequest` and so in :class:`ContainerPlan` and config.json, never as side
effects of the run: tests pin plans with golden files the way tests/golden pins config.json.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable, Mapping

from berth.errors import PolicyError, RuntimeFailure, UsageError
from berth.namedtuple import NamedTuple
from berth.runtime import limits, policy, rootfs, spec
from berth.runtime.state import ContainerLayout
from berth.runtime.env import check_image_env, compose_env, read_env_file
from berth.runtime.identity import Caller, group_text, identity_env, passwd_text, read_image_file
from berth.runtime.options import RunOptions
from berth.runtime.pmix import pmi_env_ops, pmi_fd, pmix_mounts, rank_env_ops

Log = Callable[..., None]

#: Container directories berth always mounts, with the standard filesystems of spec.py.
STANDARD_MOUNT_POINTS = ("/proc", "/dev", "/sys", "/tmp")
#: Container directories under which runc can create missing mount points (berth's tmpfs there).
CREATABLE_UNDER = ("/dev", "/tmp")


def _quiet(message: str, *, debug: bool = False) -> None:
    del message, debug


def image_name(image) -> str:
    return str(getattr(image, "reference", None) or getattr(image, "digest", None) or image.squashfs)


def compose_command(image_config: dict, command: list[str] | None, entrypoint: str | None, name: str) -> list[str]:
    """Entrypoint + Cmd as docker composes them; ``--entrypoint`` resets the image's Cmd."""
    def strings(value, key: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return ["/bin/sh", "-c", value]
        if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
            raise RuntimeFailure(f"image {name}: config {key} is not a list of strings",
                                 hint="the image is broken; ask its author")
        return list(value)

    if entrypoint is not None:
        argv = [entrypoint, *(command or [])]
    else:
        argv = strings(image_config.get("Entrypoint"), "Entrypoint")
        argv += list(command) if command else strings(image_config.get("Cmd"), "Cmd")
    if not argv:
        raise UsageError(f"image {name} has no entrypoint or command, and none was given",
                         hint=f"add a command: berth run {name} /bin/sh -c '...'")
    return argv


def _workdir(options: RunOptions, image_config: dict) -> str:
    if options.workdir:
        return rootfs.normalize_container_path(options.workdir)
    value = image_config.get("WorkingDir") or "/"
    # OCI image-spec says absolute; a hostile "../../" is normalized to "/" (contained).
    return rootfs.normalize_container_path(value if isinstance(value, str) else "/")


def _group_policies(settings) -> list:
    """Site group policies that apply to the caller (member by primary or supplementary gid)."""
    if not settings.policy.groups:
        return []
    import grp

    mine = set(os.getgroups()) | {os.getgid()}
    applied = []
    for group_policy in settings.policy.groups:
        try:
            gid = grp.getgrnam(group_policy.group).gr_gid
        except KeyError:
            continue
        if gid in mine:
            applied.append(group_policy)
    return applied


class HomeMounts(NamedTuple):
    """The caller's home in the container: ``path`` (HOME inside), the bind of the host
    directory (None: an empty tmpfs instead), the private tmpfs directories, the mount points
    needed and the directories under which runc may create mount points."""

    path: str
    binds: tuple[spec.BindMount, ...] = ()
    tmpfs: tuple[str, ...] = ()
    mount_points: tuple[rootfs.MountPoint, ...] = ()
    creatable: tuple[str, ...] = ()


def plan_home(caller: Caller, options: RunOptions, site_policy, log: Log) -> HomeMounts:
    """The home mounts for ``caller.home`` (berth.config.settings.home_directory: ``$HOME``,
    else the passwd entry's): bind-mounted read-write at its own path (its real path on the
    host as source), or an empty tmpfs with ``--no-mount-home`` or when it is missing on the
    host; a two-level home (``/home/NAME``) gets a private tmpfs over its parent, hiding the
    image's and other users' entries. Its destination is judged like a ``-v`` destination, and
    a home taken from ``$HOME`` (not the passwd entry's, which the site owns) also like a ``-v``
    source, except that ``mount_allow`` does not apply. Raises PolicyError."""
    home = posixpath.normpath(caller.home) if caller.home else "/"
    if home == "/" or not home.startswith("/"):
        log(f"home directory '{caller.home}' is not mounted (not an absolute directory)", debug=True)
        return HomeMounts(home)
    from_env = home != caller.passwd_home
    what = f"home directory {home}" + (" ($HOME)" if from_env else "")
    hint = ("set HOME to a directory of yours that berth may mount, or ask your site administrator"
            if from_env else "ask your site administrator")
    try:
        policy.check_destination(home, what=what, deny=site_policy.mount_deny_destinations)
    except PolicyError as refused:
        raise PolicyError(refused.message, hint=hint) from None
    tmpfs: list[str] = []
    needed: list[rootfs.MountPoint] = []
    creatable: list[str] = []
    binds: list[spec.BindMount] = []
    parent = posixpath.dirname(home)
    if parent not in ("/", "/tmp") and posixpath.dirname(parent) == "/":
        # /home/NAME: hide the image's /home (and other users' entries) behind a private tmpfs.
        # (/tmp is the container's private one already: a tmpfs would hide it.)
        tmpfs.append(parent)
        needed.append(rootfs.MountPoint(parent, True))
        creatable.append(parent)
    if options.mount_home and os.path.isdir(home):
        real = os.path.realpath(home)
        if from_env:
            policy.check_source(home, home, real, what=what, deny=site_policy.mount_deny_sources, hint=hint)
        binds.append(spec.BindMount(real, home, read_only=False))
        log(f"home {home} mounted read-write", debug=True)
    else:
        tmpfs.append(home)
        log(f"home {home} is an empty temporary directory (--no-mount-home or missing on the host)", debug=True)
    needed.append(rootfs.MountPoint(home, True))
    return HomeMounts(home, tuple(binds), tuple(tmpfs), tuple(needed), tuple(creatable))


def home_covers(path: str, caller: Caller, options: RunOptions, site_policy) -> bool:
    """Whether container path ``path`` (a real host path, mounted at itself) is already in the
    container through the home mount: the job runner then adds no mount for it. The same
    :func:`plan_home` decides, so runner and container cannot disagree on what home is."""
    home = plan_home(caller, options, site_policy, _quiet)
    return any(path == bind.destination or path.startswith(bind.destination.rstrip("/") + "/")
               for bind in home.binds)


def _site_mounts(settings, groups: list, log: Log) -> list[spec.BindMount]:
    mounts = []
    for mount in [*settings.policy.mounts, *(m for g in groups for m in g.mounts)]:
        if not os.path.exists(mount.source):
            if mount.optional:
                log(f"site mount {mount.source} skipped: missing on this node", debug=True)
                continue
            raise RuntimeFailure(f"site mount {mount.source} -> {mount.destination} is missing on this node",
                                 hint="ask your site administrator (policy mounts; mark it optional if it "
                                      "exists only on some nodes)")
        mounts.append(spec.BindMount(os.path.realpath(mount.source),
                                     rootfs.normalize_container_path(mount.destination),
                                     read_only=mount.read_only))
    return mounts


def _device_edits(settings, groups: list, options: RunOptions, extra_edits: tuple):
    """Every device edit of the run (site policy's devices, the caller's groups', ``--device``
    paths, groups and CDI devices, then ``extra_edits`` such as the GPUs), judged by the one
    path (berth.runtime.devices.edits.apply_edits). None when there is none."""
    requested = [(d, "site policy device") for d in settings.policy.devices]
    requested += [(d, f"group {g.group} device") for g in groups for d in g.devices]
    requested += [(d, f"--device {d}") for d in options.devices]
    if not requested and not extra_edits:
        return None
    from berth.runtime.devices import edits

    return edits.apply_edits(settings, [*edits.request_edits(settings, requested), *extra_edits])


class RunRequest(NamedTuple):
    """What a run needs, judged against site policy, before the image's files are looked at."""

    image_name: str
    argv: tuple[str, ...]
    env: tuple[str, ...]
    caller: Caller
    workdir: str
    hostname: str
    network: str
    init_path: str
    home: HomeMounts
    #: Site (and site-group and PMIx) binds, then the user's ``-v``, then devices; destinations
    #: as requested: :func:`plan_container` judges them again where the image's links land them.
    site_mounts: tuple[spec.BindMount, ...] = ()
    user_mounts: tuple[spec.BindMount, ...] = ()
    #: Mounts of device edits (CDI specs, GPU driver files), judged like site mounts.
    device_mounts: tuple[spec.BindMount, ...] = ()
    devices: tuple[spec.BindMount, ...] = ()
    #: OCI hooks of CDI specs.
    hooks: tuple[spec.Hook, ...] = ()
    #: Site policy's ``mount_deny_destinations`` (the user's mounts are judged by it).
    deny_destinations: tuple[str, ...] = ()
    host_namespaces: tuple[str, ...] = ()
    private_namespaces: tuple[str, ...] = ()
    remap_root: bool = False
    writable: bool = False
    tty: bool = False
    #: ``--mpi host``: the site's MPI on this node (berth.runtime.devices.mpi.HostMpi), whose
    #: edits are in the mounts above; checked against the image's by :func:`plan_container`.
    mpi: object | None = None
    #: Slurm's PMI socket of this task (berth.runtime.pmix.pmi_fd), passed in as fd 3.
    pmi_fd: int | None = None
    #: berth's own directories on this node (:func:`berth_directories`): hidden wherever a
    #: mount of the container holds them, never mounted themselves.
    private_dirs: tuple[str, ...] = ()


def berth_directories(settings, environ: Mapping[str, str], state_dir=None) -> tuple[str, ...]:
    """The directories of berth's node-local state that no container may see (docs/security.md,
    "The state directory on shared nodes"): the state directory this run uses (``state_dir``,
    as berth.runtime.state resolved it) and the one the settings name, the default one for this
    environment (which also holds the parse cache of settings files and the kept run plans) and
    ``/tmp/berth-UID`` (the default of runs without XDG_RUNTIME_DIR, such as Slurm jobs')."""
    from berth.config.settings import default_paths, fallback_state_dir

    candidates = (state_dir, settings.state_dir, default_paths(environ)["state_dir"], fallback_state_dir())
    return tuple(dict.fromkeys(str(path) for path in candidates if path))


def request_for(settings, image, command: list[str] | None, options: RunOptions, *, init_path: str,
                caller: Caller | None = None, environ: Mapping[str, str] | None = None,
                log: Log | None = None, extra_edits: tuple = (), state_dir=None) -> RunRequest:
    """Judge a ``berth run`` request: raises PolicyError/UsageError for refused requests and
    RuntimeFailure for a broken image config or a missing site mount. Reads the host (policy
    paths, env files, the caller's databases, CDI specs), never the image's files; starts
    nothing. ``extra_edits``: device edits decided by the caller (the GPUs it took);
    ``state_dir``: the state directory the run uses (see :func:`berth_directories`)."""
    log = log or _quiet
    environ = os.environ if environ is None else environ
    name = image_name(image)
    whole_config = image.config or {}
    image_config = whole_config.get("config") or {} if isinstance(whole_config, dict) else None
    if not isinstance(image_config, dict):
        raise RuntimeFailure(f"image {name}: its config is not a JSON object",
                             hint="the image is broken; ask its author")
    argv = compose_command(image_config, command, options.entrypoint, name)
    image_env = check_image_env(image_config.get("Env") or [], name)
    if image_config.get("User") not in (None, "", "0", "root", "0:0"):
        log(f"image User '{image_config.get('User')}' ignored: containers run as you", debug=True)
    caller = caller or Caller.current(environ)
    groups = _group_policies(settings)
    user_mounts = policy.resolve_user_mounts(settings, options)
    forced = policy.forced_network(settings)
    network = forced or options.network or "host"
    namespaces = dict(settings.policy.forced_namespaces)
    host_namespaces = tuple(k for k in ("pid", "ipc", "uts") if namespaces.get(k) == "host")
    private_namespaces = tuple(k for k in ("cgroup",) if namespaces.get(k) == "private")
    if options.hostname and "uts" in host_namespaces:
        log("ignoring --hostname: site policy gives containers the host's UTS namespace")
    if forced and options.network and options.network != forced:
        policy.check_options(settings, options)  # raises the PolicyError with its hint
    host_mpi = None
    if options.mpi == "host":
        from berth.runtime.devices.mpi import host_mpi as find_host_mpi

        host_mpi = find_host_mpi(settings)
        extra_edits = (*extra_edits, host_mpi.edits)
    applied = _device_edits(settings, groups, options, extra_edits)
    site_mounts = _site_mounts(settings, groups, log)
    site_mounts += pmix_mounts(environ, settings, caller.uid, log)
    env_entries: list[str] = []
    for env_file in options.env_files:
        env_entries += read_env_file(env_file)
    env_entries += list(options.env)
    home = plan_home(caller, options, settings.policy, log)
    env = compose_env(
        image_env,
        host_env=environ,
        passthrough=settings.policy.passthrough_env,
        identity=identity_env(caller, as_root=options.remap_root, home_in_container=home.path),
        site_ops=[*(applied.env if applied else ()), *rank_env_ops(environ, image_env, options.scope),
                  *pmi_env_ops(environ),
                  *settings.policy.env,
                  *(op for g in groups for op in g.env)],
        user_entries=env_entries,
        tty=options.tty,
    )
    return RunRequest(
        image_name=name,
        argv=tuple(argv),
        env=tuple(env),
        caller=caller,
        workdir=_workdir(options, image_config),
        hostname=options.hostname or os.uname().nodename,
        network=network,
        init_path=init_path,
        home=home,
        site_mounts=tuple(site_mounts),
        user_mounts=tuple(user_mounts),
        device_mounts=applied.mounts if applied else (),
        devices=applied.devices if applied else (),
        hooks=applied.hooks if applied else (),
        deny_destinations=tuple(settings.policy.mount_deny_destinations),
        host_namespaces=host_namespaces,
        private_namespaces=private_namespaces,
        remap_root=options.remap_root,
        writable=options.writable,
        tty=options.tty,
        mpi=host_mpi,
        pmi_fd=pmi_fd(environ),
        private_dirs=berth_directories(settings, environ, state_dir),
    )


def _landing(root: str, destination: str, what: str, deny) -> str:
    """Where ``destination`` lands in the image (its links followed in-root), judged again:
    an image link such as /data -> /etc must not carry a mount onto a denied path."""
    resolved, _ = rootfs.resolve_in_root(root, destination)
    if resolved != destination:
        policy.check_destination(resolved, what=f"{what} (through the image's links: {resolved})", deny=deny)
    return resolved


#: Container paths berth's own mounts never land on or cover, whatever the site's
#: mount_deny_destinations says: the kernel filesystems berth mounts itself (and its init).
KERNEL_FILESYSTEMS = ("/proc", "/sys", "/dev")


def _own_landing(root: str, destination: str, what: str, deny, image: str) -> str:
    """Where one of berth's own mounts (home, its parent's tmpfs, /tmp) lands through the
    image's links, judged by the destination rule like a ``-v`` (issue 12 #8): an image with
    ``/home -> /dev`` would otherwise carry the home's tmpfs over the container's /dev and
    berth's init. The kernel filesystems themselves must not be links at all."""
    resolved, _ = rootfs.resolve_in_root(root, destination)
    if resolved == destination:
        return resolved
    if destination in KERNEL_FILESYSTEMS:
        raise RuntimeFailure(f"image {image}: its {destination} is a link to {resolved}: berth mounts the "
                             f"container's {destination} there itself", hint=_HOSTILE_IMAGE)
    kernel = policy.under(resolved, KERNEL_FILESYSTEMS)
    try:
        if kernel:
            raise PolicyError(f"{kernel} is the container's own {kernel}")
        policy.check_destination(resolved, what=what, deny=deny)
    except PolicyError as refused:
        raise RuntimeFailure(f"image {image}: its links carry {what} to {resolved}, where berth does not mount "
                             f"({refused.message.split(': ', 1)[-1]})", hint=_HOSTILE_IMAGE) from None
    return resolved


_HOSTILE_IMAGE = "the image is broken or hostile (a symbolic link where a directory belongs); ask its author"


def _identity_targets(root: str) -> tuple[dict[str, str], list[rootfs.MountPoint]]:
    """Where berth's passwd/group files go, and which image entries must be replaced first.

    /etc is followed in-root (an image may link it elsewhere), but not into /proc, /sys or
    /dev; the files themselves are never followed: an image's /etc/passwd that is a link (to
    /proc/self/environ, to berth-init...) or anything but a regular file is replaced by a plain
    file in the overlay, so the bind lands exactly where the container looks."""
    etc, _ = rootfs.resolve_in_root(root, "/etc")
    if etc in ("/proc", "/sys", "/dev") or etc.startswith(("/proc/", "/sys/", "/dev/")):
        raise RuntimeFailure(f"the image's /etc is a link to {etc}: berth will not put identity files there",
                             hint="the image is broken or hostile; ask its author")
    targets: dict[str, str] = {}
    replaced: list[rootfs.MountPoint] = []
    for name in ("passwd", "group"):
        target = posixpath.join(etc, name)
        targets[name] = target
        try:
            info = os.lstat(os.path.join(root, target.lstrip("/")))
        except FileNotFoundError:
            continue  # missing: an ordinary mount point to create
        except OSError as exc:
            raise RuntimeFailure(f"cannot inspect the image's {target}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            replaced.append(rootfs.MountPoint(target, False))
    return targets, replaced


def _links_stay_out_of_host_dirs(redirected, binds, image: str) -> None:
    """Refuse an image whose links carry one of the container's mount points into a host
    directory that is bound into the container (the home, a site or ``-v`` mount) although it
    was not asked for inside it: the runtime would create the missing mount point there, on the
    host, as a file or directory of the user's (a hostile image's /etc -> /home/NAME left empty
    ``passwd`` and ``group`` files in the user's real home; /data -> /home/NAME/x a directory
    ``x``). A path asked for inside a bind (``--workdir $HOME/x``) may follow the links that
    carry the bind itself (an image's /home -> /var/home). ``redirected``: (what, the path
    asked for, where the image's links carry it, the bind itself or None); ``binds``: (the
    destination asked for, where it lands, the bind). Raises RuntimeFailure."""
    for what, asked, landing, itself in redirected:
        for bind_asked, bind_landing, bind in binds:
            if bind is itself or not policy.under(landing, [bind_landing]) or policy.under(asked, [bind_asked]):
                continue
            raise RuntimeFailure(f"image {image}: its links carry {what} to {landing}, inside the host directory "
                                 f"mounted at {bind_landing}: berth will not create mount points in a host "
                                 "directory", hint=_HOSTILE_IMAGE)


def _hidden(private_dirs, labelled_binds) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Where berth's own directories (``private_dirs``; those that exist must be the caller's)
    appear in the container through its mounts: every such place gets an empty read-only
    tmpfs (linux.maskedPaths, which runc and berth-launcher mount after every other mount).
    They are judged by where the directories really are, every path they can be reached by
    (policy.host_views: links resolved, other mounts of their file system) against each mount's
    real source, which the runtime's recursive bind carries whole. A directory that does not
    exist yet but whose parent a read-write mount holds (``/tmp/berth-UID`` of a user whose
    runs use ``$XDG_RUNTIME_DIR``) would be the container's to make, with plans or a parse cache
    planted for a later berth: its place gets the same tmpfs as a mount, whose mount point the
    runtime creates (the directory appears on the host, empty, the caller's). Returns (places to
    mask, places to create and mask). ``labelled_binds``: (what, the bind as asked, the bind
    where it lands in the container). Raises PolicyError for a source that is such a directory
    or inside one, and for a destination at or inside such a place (the runtime would make its
    mount point there, in the real directory)."""
    views: list[str] = []
    missing: list[str] = []
    for directory in private_dirs:
        try:
            info = os.stat(directory)
        except FileNotFoundError:
            parent = os.path.dirname(os.path.abspath(directory))
            missing += [posixpath.join(view, os.path.basename(directory)) for view in policy.host_views(parent)]
            continue
        except (OSError, ValueError):
            continue
        if info.st_uid == os.getuid() and stat.S_ISDIR(info.st_mode):
            views += [view for view in policy.host_views(directory) if view not in views]
    if not views and not missing:
        return (), ()
    masks: dict[str, str] = {}
    made: dict[str, str] = {}
    for what, asked, bind in labelled_binds:
        source = os.path.realpath(bind.source)
        for view in views:
            if policy.under(source, (view,)):
                raise PolicyError(f"{what}: the host path {asked.source} is berth's state directory {view} or inside "
                                  "it, which no container may see",
                                  hint="mount another directory: berth keeps its containers' state there")
            if policy.under(view, (source,)):
                masks.setdefault(bind.destination.rstrip("/") + view[len(source.rstrip("/")):], view)
        for place in missing:
            if not bind.read_only and policy.under(place, (source,)) and place != source:
                made.setdefault(bind.destination.rstrip("/") + place[len(source.rstrip("/")):], place)
    for what, asked, bind in labelled_binds:
        inside = policy.under(bind.destination, masks) or policy.under(bind.destination, made)
        if inside:
            raise PolicyError(f"{what}: {asked.destination} is inside {inside}, where berth's state directory "
                              f"{masks.get(inside) or made[inside]} appears in the container (hidden there)",
                              hint="choose another destination")
    return tuple(masks), tuple(place for place in made if place not in masks)


def _mpi_binds(request: RunRequest, image_root: str, device_mounts: list, log: Log) -> list[spec.BindMount]:
    """``--mpi host``: check the image's MPI against the site's (refusals raise UsageError) and
    bind the site's libraries over the image's files (berth.runtime.devices.mpi)."""
    if request.mpi is None:
        return []
    from berth.runtime.devices import mpi

    library_path = next((entry.partition("=")[2].split(":") for entry in request.env
                         if entry.startswith("LD_LIBRARY_PATH=")), [])
    family, other = mpi.image_mpi(image_root, library_path)
    for note in mpi.check(request.mpi, family, other, image_name=request.image_name):
        log(f"warning: {note}")
    binds = mpi.image_binds(device_mounts, request.mpi, family, deny=request.deny_destinations)
    log("--mpi host: " + ", ".join(f"{b.source} over the image's {b.destination}" for b in binds), debug=True)
    return binds


class IdentityFile(NamedTuple):
    """One of berth's identity files: ``name`` in the container's ``etc`` state directory,
    its ``text``, and the container path it is bind-mounted over."""

    name: str
    text: str
    target: str


class ContainerPlan(NamedTuple):
    """Everything materialisation and supervision do, decided: pure data.

    ``overlay``: an overlay goes on top of the image (``--writable``, or mount points the
    image lacks, created first in the overlay's upper directory: ``mount_points``): a kernel
    overlayfs that the runtime mounts in the container's namespaces when ``kernel_overlay``,
    else fuse-overlayfs, mounted by berth."""

    request: RunRequest
    image_root: str
    overlay: bool
    mount_points: tuple[rootfs.MountPoint, ...]
    identity_files: tuple[IdentityFile, ...]
    spec: spec.SpecPlan
    limits: limits.LimitPlan
    kernel_overlay: bool = False

    @property
    def squash_to(self) -> tuple[int, int] | None:
        """The ids fuse-overlayfs gives new files (only a writable root needs it)."""
        caller = self.request.caller
        return (caller.uid, caller.gid) if self.request.writable else None

    def config(self) -> dict:
        """The OCI runtime-spec config.json."""
        return spec.build_config(self.spec)

    def to_dict(self) -> dict:
        """A JSON-ready view: config.json plus the judged mounts and identity files."""
        return {
            "image_root": self.image_root,
            "overlay": self.overlay,
            "mount_points": [{"path": p.path, "directory": p.is_dir} for p in self.mount_points],
            "identity_files": [{"name": f.name, "target": f.target, "text": f.text} for f in self.identity_files],
            "config": self.config(),
        }


def plan_container(request: RunRequest, image_root: str, layout: ContainerLayout, *,
                   limit_plan: limits.LimitPlan | None = None, log: Log | None = None,
                   kernel_overlay: bool = False) -> ContainerPlan:
    """The whole plan, from a judged request, the image's root directory (read in-root, links
    never followed on the host) and the container's state layout (host paths named in
    config.json; nothing is created). ``kernel_overlay``: an overlay, when one is needed, is the
    kernel's, mounted by the runtime (the image root is a directory of the caller's that a user
    namespace may overlay: berth.runtime.localcopy's unpacked copy). Raises PolicyError when a requested mount lands on a
    denied path through the image's links, RuntimeFailure when one of berth's own mounts would
    (home, /tmp, the kernel filesystems, the identity files' /etc). Writes nothing."""
    log = log or _quiet
    limit_plan = limit_plan or limits.LimitPlan()
    deny = request.deny_destinations
    # Judge mount destinations where they really land: through the image's own links.
    user_mounts = [m._replace(destination=_landing(image_root, m.destination, f"--mount {m.destination}", deny))
                   for m in request.user_mounts]
    site_mounts = [m._replace(destination=_landing(image_root, m.destination, f"site mount {m.destination}",
                                                   ("/proc", "/sys")))
                   for m in request.site_mounts]
    device_mounts = [m._replace(destination=_landing(image_root, m.destination, f"device mount {m.destination}",
                                                     deny)) for m in request.device_mounts]
    device_mounts += _mpi_binds(request, image_root, device_mounts, log)
    # berth's own mounts are judged where they land too (issue 12 #8).
    for path in STANDARD_MOUNT_POINTS:
        _own_landing(image_root, path, f"the container's {path}", deny, request.image_name)
    home = request.home

    def own(path: str) -> str:
        return _own_landing(image_root, path, f"the home mount {path}", deny, request.image_name)

    tmpfs = tuple(own(path) for path in home.tmpfs)  # the parent's first: /home -> /dev names /home
    home = home._replace(binds=tuple(b._replace(destination=own(b.destination)) for b in home.binds),
                         tmpfs=tmpfs, creatable=tuple(own(path) for path in home.creatable))
    identity_paths, replaced = _identity_targets(image_root)
    asked_binds = [*request.home.binds, *request.site_mounts, *request.user_mounts, *request.device_mounts]
    landed_binds = [*home.binds, *site_mounts, *user_mounts, *device_mounts]
    redirected = [(f"its /etc/{name}", f"/etc/{name}", target, None) for name, target in identity_paths.items()
                  if target != f"/etc/{name}"]
    redirected += [(f"the mount {asked.destination}", asked.destination, bind.destination, bind)
                   for asked, bind in zip(asked_binds, landed_binds) if bind.destination != asked.destination]
    workdir, _ = rootfs.resolve_in_root(image_root, request.workdir)
    if workdir != request.workdir:
        redirected.append((f"the working directory {request.workdir}", request.workdir, workdir, None))
    _links_stay_out_of_host_dirs(redirected, [(asked.destination, bind.destination, bind)
                                              for asked, bind in zip(asked_binds, landed_binds)],
                                 request.image_name)
    labels = [*(f"the home mount {b.destination}" for b in request.home.binds),
              *(f"site mount {b.destination}" for b in request.site_mounts),
              *(f"--mount {b.source}:{b.destination}" for b in request.user_mounts),
              *(f"device mount {b.destination}" for b in request.device_mounts)]
    masked, made = _hidden((*request.private_dirs, str(layout.state_dir)),
                           list(zip(labels, asked_binds, landed_binds)))
    # runc creates a missing working directory before it masks anything: in the real state
    # directory, on the host, were the working directory inside a hidden place.
    inside = policy.under(request.workdir, (*masked, *made)) or policy.under(workdir, (*masked, *made))
    if inside:
        raise PolicyError(f"the working directory {request.workdir} is inside {inside}, where berth's state "
                          "directory appears in the container (hidden there)",
                          hint="choose another working directory (-w)")
    creatable = [*CREATABLE_UNDER, *home.creatable]
    needed = [rootfs.MountPoint(p, True) for p in STANDARD_MOUNT_POINTS]
    needed += home.mount_points
    needed += [rootfs.MountPoint(path, False) for path in identity_paths.values()]
    for bind in [*site_mounts, *user_mounts, *device_mounts]:
        needed.append(rootfs.MountPoint(bind.destination, os.path.isdir(bind.source)))
    needed.append(rootfs.MountPoint(request.workdir, True))
    missing = rootfs.missing_mount_points(image_root, needed, creatable) + replaced
    overlay = bool(missing) or request.writable
    kernel_overlay = kernel_overlay and overlay
    kind = "kernel overlayfs" if kernel_overlay else "fuse-overlayfs"
    if missing:
        log("the image lacks mount point(s) " + ", ".join(p.path for p in missing)
            + f": adding a {kind} overlay to create them", debug=True)
    if request.writable:
        log(f"--writable: volatile {kind} overlay, discarded at exit", debug=True)

    # Identity files: the image's own entries plus the caller's (read in-root, never via host links).
    caller = request.caller
    shell_exists = lambda path: rootfs.path_kind(image_root, path) == "file"  # noqa: E731
    passwd_resolved, _ = rootfs.resolve_in_root(image_root, "/etc/passwd")
    group_resolved, _ = rootfs.resolve_in_root(image_root, "/etc/group")
    identity_files = (
        IdentityFile("passwd", passwd_text(read_image_file(os.path.join(image_root, passwd_resolved.lstrip("/"))),
                                           caller, as_root=request.remap_root, shell_exists=shell_exists),
                     identity_paths["passwd"]),
        IdentityFile("group", group_text(read_image_file(os.path.join(image_root, group_resolved.lstrip("/"))),
                                         caller, as_root=request.remap_root),
                     identity_paths["group"]),
    )
    binds = [
        *home.binds,
        *(spec.BindMount(str(layout.etc / f.name), f.target) for f in identity_files),
        *site_mounts,
        *user_mounts,
        *device_mounts,
        *request.devices,
    ]
    spec_plan = spec.SpecPlan(
        rootfs=str(layout.rootfs) if overlay else image_root,
        args=spec.process_args(caller.uid, caller.gid, list(request.argv), remap_root=request.remap_root),
        env=request.env,
        cwd=request.workdir,
        uid=caller.uid,
        gid=caller.gid,
        init_path=request.init_path,
        hostname=request.hostname,
        readonly_root=not request.writable,
        remap_root=request.remap_root,
        terminal=request.tty,
        network=request.network,
        host_namespaces=request.host_namespaces,
        private_namespaces=request.private_namespaces,
        binds=tuple(binds),
        tmpfs=home.tmpfs,
        tmp_source=str(layout.tmp),
        rlimits=limit_plan.rlimits,
        cgroups_path=limit_plan.cgroups_path,
        cpu_quota_us=limit_plan.cpu_quota_us,
        memory_limit_bytes=limit_plan.memory_limit_bytes,
        annotations=(("org.berth.image", request.image_name),),
        hooks=request.hooks,
        root_overlay=(image_root, str(layout.upper), str(layout.work)) if kernel_overlay else None,
        machine=os.uname().machine,
        masked=masked,
        hidden_tmpfs=made,
    )
    return ContainerPlan(request, image_root, overlay, tuple(missing), identity_files, spec_plan, limit_plan,
                         kernel_overlay)
