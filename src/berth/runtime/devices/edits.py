"""Container edits: the one shape of every device change a container gets (DESIGN.md 11).

A ``--device /dev/X``, a site device group (``[devices.groups]``), a vendor's CDI device
(``--device vendor.com/class=name``), the site policy's and group policies' devices and the GPU
generator (``--gpus``) all produce :class:`ContainerEdits` — CDI's model: device nodes, mounts,
environment, hooks — and :func:`apply_edits` alone judges them and turns them into bind mounts,
environment operations and OCI hooks for the run plan (berth.runtime.spec builds config.json).

Rules (every edit, whoever wrote it, is judged the same way):

- A device's host path named under ``/dev/`` is looked up in the site's ``devices.dev_dir`` (the
  host's /dev unless a site or a test moves it); what it resolves to must lie under that
  directory and be a character or block device the caller may open (``permissions``: r, w), with
  the spec's type/major/minor when it states them. Rootless containers cannot make device nodes:
  the host's node is bind-mounted (with ``dev``) at the container path, which must lie under
  ``/dev`` and contain no ``..``.
- A mount's host path is resolved (links followed) and must lie under ``devices.mount_allow`` and
  outside ``policy.mount_deny_sources``, both as named and as resolved; it is mounted read-only
  unless its options say ``rw``. Destinations follow the user mounts' rules; berth's own
  :data:`GPU_DIR` and :data:`MPI_DIR` under /dev are allowed.
  Neither it nor a directory above it may be changeable by a user other than root or the
  caller (:func:`writers_problem`).
- A hook's program must be an executable regular file under ``devices.mount_allow``, with the
  same rule for who may change it.
- Two edits may name the same container path only with the same host file.
"""

from __future__ import annotations

import glob
import os
import posixpath
import stat
from collections.abc import Sequence

from berth.config.settings import EnvOp
from berth.errors import PolicyError, UsageError
from berth.fsutil import writers_problem
from berth.namedtuple import NamedTuple
from berth.runtime import spec
from berth.runtime.policy import under

#: Where berth mounts host driver libraries and binaries: under the container's /dev tmpfs, the
#: one directory every container has that runc can create mount points in without an overlay.
GPU_DIR = "/dev/.berth-gpu"
#: Where berth mounts the site's MPI libraries for ``--mpi host`` (berth.runtime.devices.mpi).
MPI_DIR = "/dev/.berth-mpi"
#: berth's own directories under the container's /dev that edits may mount into.
INJECTION_DIRS = (GPU_DIR, MPI_DIR)

_ADMIN = "ask your site administrator (devices in docs/gpus.md)"


class DeviceNode(NamedTuple):
    """A device node at container ``path``; ``host_path`` None means the same path on the host."""

    path: str
    host_path: str | None = None
    type: str | None = None  # "c", "b" or "u" (CDI); None: whatever the host node is
    major: int | None = None
    minor: int | None = None
    permissions: str = "rw"


class Mount(NamedTuple):
    host_path: str
    container_path: str
    read_only: bool = True


class ContainerEdits(NamedTuple):
    """What one device request adds to a container. ``origin`` names the request in messages
    ("--device /dev/fuse", "CDI device nvidia.com/gpu=0 (/etc/cdi/nvidia.json)", "--gpus 2")."""

    origin: str
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    env: tuple[EnvOp, ...] = ()
    hooks: tuple[spec.Hook, ...] = ()


class AppliedEdits(NamedTuple):
    """Judged edits, as the run plan takes them: device binds, then mounts (in request order)."""

    devices: tuple[spec.BindMount, ...] = ()
    mounts: tuple[spec.BindMount, ...] = ()
    env: tuple[EnvOp, ...] = ()
    hooks: tuple[spec.Hook, ...] = ()


def host_device_path(dev_dir: str, path: str) -> str:
    """The host path of a device named ``path``: /dev/X is DEV_DIR/X; anything else as is."""
    if path.startswith("/dev/") and dev_dir.rstrip("/") != "/dev":
        return dev_dir.rstrip("/") + path[len("/dev"):]
    return path


def device_destination(path: str, real: str, *, what: str, dev_dir: str = "/dev") -> str:
    """Where a device appears in the container: the path as given when it is a plain path under
    /dev, else the device's real path seen from DEV_DIR (a link of the user's to a GPU shows as
    the GPU's node). No '..': normalizing one could land the device on /etc/passwd or on
    berth-init."""
    if ".." in path.split("/"):
        raise PolicyError(f"{what}: the device path must not contain '..'", hint=f"name the device: {real}")
    if path.startswith("/dev/"):
        destination = posixpath.normpath(path)
    else:
        base = dev_dir.rstrip("/")
        destination = "/dev" + real[len(base):] if real.startswith(base + "/") else real
    if destination == spec.INIT_PATH or destination.startswith(spec.INIT_PATH + "/") \
            or not destination.startswith("/dev/"):
        raise PolicyError(f"{what}: the container path {destination} is not a device path under /dev")
    return destination


def _judge_device(node: DeviceNode, *, what: str, dev_dir: str) -> spec.BindMount:
    named = node.host_path or node.path
    if not named.startswith("/"):
        raise PolicyError(f"{what}: the device path '{named}' is not absolute")
    host = host_device_path(dev_dir, named)
    real = os.path.realpath(host)
    base = dev_dir.rstrip("/") or "/"
    if not under(real, (base,)):
        raise PolicyError(f"{what}: {named} is not under /dev" + (f" (devices.dev_dir {dev_dir})" if base != "/dev" else ""))
    try:
        info = os.stat(real)
    except OSError:
        raise UsageError(f"{what}: {named} does not exist on this node") from None
    kind = "c" if stat.S_ISCHR(info.st_mode) else "b" if stat.S_ISBLK(info.st_mode) else None
    if kind is None:
        raise PolicyError(f"{what}: {named} is not a device node")
    if node.type not in (None, "u", kind) or (node.type == "u" and kind != "c"):
        raise PolicyError(f"{what}: {named} is a {'character' if kind == 'c' else 'block'} device, "
                          f"not type '{node.type}' as the spec says", hint=_ADMIN)
    for expected, actual, name in ((node.major, os.major(info.st_rdev), "major"),
                                   (node.minor, os.minor(info.st_rdev), "minor")):
        if expected is not None and expected != actual:
            raise PolicyError(f"{what}: {named} has {name} number {actual}, not {expected} as the spec says",
                              hint=f"the spec is stale: {_ADMIN}")
    mode = (os.R_OK if "r" in node.permissions else 0) | (os.W_OK if "w" in node.permissions else 0)
    if mode and not os.access(real, mode):
        raise PolicyError(f"{what}: you cannot open {real} on the host, so it cannot be passed in",
                          hint="ask your site administrator for access (device permissions or group)")
    # A container path given apart from the host's (CDI path + hostPath, groups) is taken as
    # written; a user's path alone may be a link to the device (see device_destination).
    if node.host_path is not None and not node.path.startswith("/dev/"):
        raise PolicyError(f"{what}: the container path {node.path} is not a device path under /dev", hint=_ADMIN)
    destination = device_destination(node.path, real, what=what, dev_dir=dev_dir)
    return spec.BindMount(real, destination, read_only=False, device=True, device_access=node.permissions)


def _judge_mount(mount: Mount, *, what: str, settings) -> spec.BindMount:
    from berth.runtime.policy import check_destination, source_identity

    named = mount.host_path
    if not named.startswith("/") or ".." in named.split("/") or "\0" in named:
        raise PolicyError(f"{what}: the mount source '{named}' must be an absolute path without '..'", hint=_ADMIN)
    real = os.path.realpath(named)
    allow = settings.devices.mount_allow
    deny = settings.policy.mount_deny_sources
    for path in (named, real):
        denied = under(path, deny)
        if denied or not under(path, allow):
            reason = f"is under {denied}, which site policy does not allow to be mounted" if denied else \
                f"is not under an allowed place (devices.mount_allow: {', '.join(allow)})"
            via = f" (it resolves to {real})" if real != named else ""
            raise PolicyError(f"{what}: the mount source {named}{via} {reason}", hint=_ADMIN)
    if not os.path.exists(real):
        raise UsageError(f"{what}: the mount source {named} does not exist on this node", hint=_ADMIN)
    # What the container is given (libraries it loads, tools it runs, read-write data) must not
    # be someone else's to change: another user could put code there that runs as every user of
    # the device (as with hooks; site files owned by root are fine, and so are the caller's own).
    _refuse_changeable(real, "mount source", what, "berth does not bind into a container what other users can change")
    destination = mount.container_path
    if any(destination == base or destination.startswith(base + "/") for base in INJECTION_DIRS):
        if ".." in destination.split("/"):
            raise PolicyError(f"{what}: the destination '{destination}' contains '..'")
    else:
        destination = check_destination(destination, what=what, deny=settings.policy.mount_deny_destinations)
    return spec.BindMount(real, destination, read_only=mount.read_only,
                          identity=source_identity(real, what=what))


def _judge_hook(hook: spec.Hook, *, what: str, settings) -> spec.Hook:
    if hook.hook_name not in spec.HOOK_NAMES:
        raise PolicyError(f"{what}: hook '{hook.hook_name}' is not one of {', '.join(spec.HOOK_NAMES)}", hint=_ADMIN)
    real = os.path.realpath(hook.path) if hook.path.startswith("/") else hook.path
    allow = settings.devices.mount_allow
    if not hook.path.startswith("/") or not under(real, allow) or not under(hook.path, allow):
        raise PolicyError(f"{what}: the hook program {hook.path} is not under an allowed place "
                          f"(devices.mount_allow: {', '.join(allow)})", hint=_ADMIN)
    if not os.path.isfile(real) or not os.access(real, os.X_OK):
        raise UsageError(f"{what}: the hook program {hook.path} is not an executable file on this node", hint=_ADMIN)
    # The runtime runs it as the caller: whoever can change it, or a directory above it, could
    # run code as every user of the device (as cdi.check_spec_writers says of the spec).
    _refuse_changeable(real, "hook program", what, "berth does not run a hook that other users can change "
                       "(it would run code as you)")
    return hook._replace(path=real)


def _refuse_changeable(real: str, kind: str, what: str, why: str) -> None:
    """Raise PolicyError when ``real`` (a resolved path) or a directory above it can be changed
    by someone other than root or the caller (:func:`writers_problem`), naming the first."""
    path = real
    while True:
        problem = writers_problem(os.stat(path), acl=path)
        if problem:
            label = f"the {kind} {real}" if path == real else f"the directory {path} of {kind} {real}"
            raise PolicyError(f"{what}: {label} is {problem}: {why}", hint=f"{_ADMIN}; chmod go-w, chown root")
        if path == "/":
            return
        path = os.path.dirname(path)


def apply_edits(settings, edits: Sequence[ContainerEdits]) -> AppliedEdits:
    """Judge every edit (module docstring) and merge them in order. Raises PolicyError or
    UsageError naming the request (``origin``) and the path; nothing is half-applied."""
    dev_dir = settings.devices.dev_dir
    devices: dict[str, tuple[spec.BindMount, str]] = {}
    mounts: dict[str, tuple[spec.BindMount, str]] = {}
    env: list[EnvOp] = []
    hooks: list[spec.Hook] = []

    def add(table: dict, bind: spec.BindMount, origin: str, kind: str) -> None:
        other = devices.get(bind.destination) or mounts.get(bind.destination)
        if other is None:
            table[bind.destination] = (bind, origin)
        elif other[0].source != bind.source:
            raise PolicyError(f"{origin}: the {kind} {bind.destination} is also given by {other[1]}, "
                              f"from another host file ({other[0].source}, not {bind.source})",
                              hint="ask for one of them, or ask your site administrator")

    for edit in edits:
        for node in edit.device_nodes:
            add(devices, _judge_device(node, what=edit.origin, dev_dir=dev_dir), edit.origin, "device")
        for mount in edit.mounts:
            add(mounts, _judge_mount(mount, what=edit.origin, settings=settings), edit.origin, "mount")
        env += edit.env
        hooks += [_judge_hook(hook, what=edit.origin, settings=settings) for hook in edit.hooks]
    return AppliedEdits(
        devices=tuple(bind for bind, _ in devices.values()),
        mounts=tuple(bind for bind, _ in mounts.values()),
        env=tuple(env),
        hooks=tuple(hooks),
    )


def is_cdi_name(text: str) -> bool:
    """Whether ``text`` looks like a CDI device name (``vendor.com/class=name``)."""
    kind, equals, _ = text.partition("=")
    return bool(equals) and "/" in kind and not text.startswith("/")


def check_device_request(text: str, *, what: str) -> None:
    """Syntax of one ``--device`` value (a path, a group name or a CDI name). Raises UsageError."""
    import re

    if not text or "\0" in text:
        raise UsageError(f"{what}: empty device")
    if text.startswith("/") or is_cdi_name(text) or re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", text):
        return
    raise UsageError(f"{what}: {text!r} is not a device path, a device group or a CDI device name",
                     hint="for example --device /dev/fuse, --device rdma (a site group) or "
                          "--device vendor.com/class=name")


def device_request_edits(settings, text: str, *, what: str) -> ContainerEdits:
    """The edits for one ``--device`` value (a path, a site group or a CDI name), unjudged.
    Raises UsageError for an unknown group or CDI device."""
    check_device_request(text, what=what)
    if text.startswith("/"):
        return ContainerEdits(what, device_nodes=(DeviceNode(text),))
    if is_cdi_name(text):
        from berth.runtime.devices import cdi

        return cdi.device_edits(settings, text, what=what)
    check_devices(settings, [text])
    return group_edits(settings, text, dict(settings.devices.groups)[text], what=what)


def existing_devices(settings, patterns: Sequence[str]) -> list[DeviceNode]:
    """The devices of this node that paths or globs under /dev name (in DEV_DIR), in order."""
    dev_dir = settings.devices.dev_dir
    nodes = []
    for pattern in patterns:
        host_pattern = host_device_path(dev_dir, pattern)
        matches = sorted(glob.glob(host_pattern)) if glob.has_magic(pattern) else \
            [host_pattern] if os.path.lexists(host_pattern) else []
        for match in matches:
            path = "/dev" + match[len(dev_dir.rstrip("/")):] if dev_dir.rstrip("/") != "/dev" else match
            nodes.append(DeviceNode(path, host_path=path))
    return nodes


def group_edits(settings, name: str, patterns: Sequence[str], *, what: str) -> ContainerEdits:
    """A site device group: every existing device its paths or globs name (on this node)."""
    nodes = existing_devices(settings, patterns)
    if not nodes:
        raise UsageError(f"{what}: none of the devices of group '{name}' ({', '.join(patterns)}) exist on this node",
                         hint="run it on a node that has them, or ask your site administrator")
    return ContainerEdits(f"{what} (device group {name})", device_nodes=tuple(nodes))


def request_edits(settings, device_requests: Sequence[tuple[str, str]]) -> list[ContainerEdits]:
    """Edits for ``(value, what)`` device requests in order (site policy, groups, options)."""
    return [device_request_edits(settings, text, what=what) for text, what in device_requests]


def check_devices(settings, requests: Sequence[str]) -> list[ContainerEdits]:
    """What can be judged of ``--device`` values away from the node that will run them (at
    submission, in a template's custom options): paths fully, group names against the site's
    groups, CDI names by syntax. Returns the path edits for :func:`apply_edits`."""
    from berth.runtime.devices.cdi import check_name

    groups = dict(settings.devices.groups)
    found = []
    for text in requests:
        what = f"--device {text}"
        check_device_request(text, what=what)
        if text.startswith("/"):
            found.append(ContainerEdits(what, device_nodes=(DeviceNode(text),)))
        elif is_cdi_name(text):
            check_name(text, what=what)
        elif text not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise UsageError(f"{what}: there is no device group '{text}' (site device groups: {known})",
                             hint="name a device path under /dev, a site group, or a CDI device vendor.com/class=name")
    return found
