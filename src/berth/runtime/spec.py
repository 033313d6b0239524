"""The OCI runtime-spec ``config.json`` berth hands to runc or crun: a pure function of a plan.

No I/O here: :func:`build_config` turns a :class:`SpecPlan` (everything already decided and
resolved by berth.runtime.container) into the config dict, so that tests/golden/ can pin the
exact contract with the runtime (DESIGN.md decision 5).

Identity (DESIGN.md decision 6, issue 3). runc 1.1 refuses a rootless user namespace that does
not map container uid 0, so the container's user namespace maps 0 -> the caller and the process
starts as 0/0; berth-init (bind-mounted at /dev/.berth-init) then enters a nested user namespace
that maps the caller's uid/gid to 0 of runc's namespace and runs the command with the real ids.
Mapping the parent namespace's uid 0 into a child namespace needs CAP_SETFCAP in the creator
(Linux >= 5.12, commit db2e718a4798), so that one capability is kept; it vanishes at the
command's execve (uid != 0). With ``remap_root`` there is no nested namespace and every
capability is dropped.
"""

from __future__ import annotations

from berth.namedtuple import NamedTuple

OCI_VERSION = "1.0.2"
INIT_PATH = "/dev/.berth-init"
#: The one capability berth-init needs to map its parent's uid 0 (see the module docstring).
IDENTITY_CAPABILITIES = ("CAP_SETFCAP",)
#: Per POSIX and the OCI runtime spec config.md, the default PATH when an image sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
#: The kernel keyring is not namespaced by uid: the container's processes have the caller's
#: kuid, so they could link the caller's host user keyring (permissions KEY_USR_ALL) and its
#: named session keyrings into their own and then read every key in them (issue 8, scenario 9;
#: runc's new session keyring and the per-user-namespace user keyring of Linux >= 5.3 do not
#: stop that). These calls fail with EPERM, as in Docker's and Podman's default profiles.
KEYRING_SYSCALLS = ("add_key", "keyctl", "request_key")
#: seccomp architectures of a host machine: its native ABI and the compat ABIs it runs (a
#: 32-bit or x32 program would otherwise call keyctl under another number).
SECCOMP_ARCHITECTURES = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
    "ppc64le": ("SCMP_ARCH_PPC64LE",),
    "s390x": ("SCMP_ARCH_S390X", "SCMP_ARCH_S390"),
}
_EPERM = 1


# NamedTuples, not dataclasses: they are built on every `berth run` and a dataclass costs ~1 ms
# of class creation at import (start-up time is a product feature).
class BindMount(NamedTuple):
    """A host path bind-mounted at ``destination`` (sources are already resolved real paths)."""

    source: str
    destination: str
    read_only: bool = True
    #: Device nodes need "dev"; everything else is nodev.
    device: bool = False
    #: (st_dev, st_ino) of the source when policy judged it: berth-init refuses to start when the
    #: destination is another inode (the source was swapped before runc mounted it).
    identity: tuple[int, int] | None = None
    #: For a device node: what the container may do with it ("r", "w" or "rw": a CDI spec's
    #: ``permissions`` without "m"). Enforced by the device cgroup runc sets up when root starts
    #: the container; a read-only mount does not stop writes to a device node.
    device_access: str = "rw"


#: OCI runtime-spec hook points (config.md "POSIX-platform Hooks"); CDI hooks name one of them.
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")


class Hook(NamedTuple):
    """An OCI hook: a host program the runtime runs at ``hook_name`` (rootless: as the caller)."""

    hook_name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout_s: int | None = None


class SpecPlan(NamedTuple):
    """Everything config.json depends on, decided by the caller."""

    rootfs: str
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    init_path: str
    hostname: str
    readonly_root: bool = True
    remap_root: bool = False
    terminal: bool = False
    network: str = "host"  # "host" | "none"
    #: Namespaces the site policy makes the host's ("pid", "ipc", "uts") or adds ("cgroup").
    host_namespaces: tuple[str, ...] = ()
    private_namespaces: tuple[str, ...] = ()
    #: Binds in order, after the standard filesystems (/proc, /dev, /sys, /tmp...).
    binds: tuple[BindMount, ...] = ()
    #: Container directories that get a private tmpfs (e.g. the parent of $HOME), before binds.
    tmpfs: tuple[str, ...] = ()
    #: Host directory bind-mounted at /tmp (private per container); None: a tmpfs.
    tmp_source: str | None = None
    #: (type, soft, hard) rlimits, e.g. ("RLIMIT_DATA", n, n).
    rlimits: tuple[tuple[str, int, int], ...] = ()
    #: cgroup v2 resources when the host delegates them; None: no cgroup settings at all.
    cgroups_path: str | None = None
    cpu_quota_us: int | None = None
    cpu_period_us: int = 100000
    memory_limit_bytes: int | None = None
    annotations: tuple[tuple[str, str], ...] = ()
    #: OCI hooks in order (from CDI specs: berth.runtime.devices.edits).
    hooks: tuple[Hook, ...] = ()
    #: (lower, upper, work): a kernel overlayfs that the runtime mounts at / in the container's
    #: own user and mount namespaces (Linux >= 5.11), before every other mount; ``rootfs`` is
    #: then an empty directory it lands on. None: ``rootfs`` is the root.
    root_overlay: tuple[str, str, str] | None = None
    #: The host's machine (``os.uname().machine``): which seccomp architectures to filter.
    machine: str = ""
    #: Container directories hidden behind an empty read-only tmpfs after every mount, besides
    #: MASKED_PATHS: where berth's own state appears through a mount (berth.runtime.plan._hidden).
    masked: tuple[str, ...] = ()
    #: Container directories that get an empty read-only tmpfs after every bind, their mount
    #: point created by the runtime: where berth's own state would be made (plan._hidden).
    hidden_tmpfs: tuple[str, ...] = ()


def _device_rules(binds) -> list[dict]:
    """cgroup device rules that let the device nodes among ``binds`` be used as each one's
    ``device_access`` says (a node with none gets no rule: runc's filter then refuses it)."""
    import os
    import stat
    rules = []
    for bind in binds:
        if not bind.device:
            continue
        try:
            st = os.stat(bind.source)
        except OSError:
            continue  # berth-init's identity check refuses the run if the node is gone
        kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else None
        if kind is not None and bind.device_access:
            rules.append({"allow": True, "type": kind, "major": os.major(st.st_rdev),
                          "minor": os.minor(st.st_rdev), "access": bind.device_access})
    return rules


def process_args(plan_uid: int, plan_gid: int, command: list[str], *, remap_root: bool,
                 init_path: str = INIT_PATH, data_limit: int | None = None) -> tuple[str, ...]:
    """The container process argv: berth-init, the identity to enter, then the command.
    ``data_limit``: RLIMIT_DATA in bytes, set by berth-init just before the command runs."""
    limit = () if data_limit is None else ("-d", str(data_limit))
    if remap_root:
        return (init_path, *limit, "--", *command)
    return (init_path, *limit, "-u", str(plan_uid), "-g", str(plan_gid), "--", *command)


def _mounts(plan: SpecPlan) -> list[dict]:
    nosuid_nodev = ["nosuid", "nodev"]
    if "pid" in plan.host_namespaces:
        # A user namespace cannot mount a procfs for a PID namespace it does not own: bind it.
        proc_mount = {"destination": "/proc", "type": "none", "source": "/proc",
                      "options": ["rbind", *_recursive("nosuid", "noexec", "nodev")]}
    else:
        proc_mount = {"destination": "/proc", "type": "proc", "source": "proc",
                      "options": ["nosuid", "noexec", "nodev"]}
    mounts: list[dict] = [] if plan.root_overlay is None else [
        # userxattr: whiteouts and opaque directories as user.overlay.* (no privilege needed)
        {"destination": "/", "type": "overlay", "source": "overlay",
         "options": [f"lowerdir={plan.root_overlay[0]}", f"upperdir={plan.root_overlay[1]}",
                     f"workdir={plan.root_overlay[2]}", "userxattr"]},
    ]
    mounts += [
        proc_mount,
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        # Rootless: no gid=5 (tty is not mapped); ptmxmode so the new instance is usable.
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    ]
    if "ipc" not in plan.host_namespaces:
        # An mqueue filesystem belongs to an IPC namespace: only with a private one.
        mounts.append({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                       "options": ["nosuid", "noexec", "nodev"]})
    mounts += [
        # A user namespace without its own network namespace cannot mount sysfs: bind the host's.
        {"destination": "/sys", "type": "none", "source": "/sys",
         "options": ["rbind", *_recursive("nosuid", "noexec", "nodev", "ro")]},
        {"destination": INIT_PATH, "type": "none", "source": plan.init_path,
         "options": ["bind", "ro", "nosuid", "nodev"]},
    ]
    if plan.tmp_source is not None:
        mounts.append({"destination": "/tmp", "type": "none", "source": plan.tmp_source,
                       "options": ["rbind", "rw", *_recursive(*nosuid_nodev)]})
    else:
        mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                       "options": [*nosuid_nodev, "mode=1777"]})
    for destination in plan.tmpfs:
        mounts.append({"destination": destination, "type": "tmpfs", "source": "tmpfs",
                       "options": [*nosuid_nodev, "mode=755"]})
    for bind in plan.binds:
        flags = ["nosuid"] if bind.device else ["nosuid", "nodev"]
        options = ["rbind", *_recursive(*flags, *(["ro"] if bind.read_only else []))]
        if not bind.read_only:
            options.insert(1, "rw")
        mounts.append({"destination": bind.destination, "type": "none", "source": bind.source,
                       "options": options})
    for destination in plan.hidden_tmpfs:
        mounts.append({"destination": destination, "type": "tmpfs", "source": "tmpfs",
                       "options": ["ro", "nosuid", "nodev", "noexec", "mode=0700"]})
    return mounts


def _recursive(*flags: str) -> list[str]:
    """An rbind's restricting ``flags``, each with runc's recursive form beside it ("ro" and
    "rro"...): runc 1.1 applies the plain ones to the top mount only, so a host file system
    mounted below the source stayed writable, suid and dev in the container. berth-launcher
    applies them to the whole tree (mount_setattr AT_RECURSIVE) and takes both forms."""
    return [word for flag in flags for word in (flag, "r" + flag)]


def _init_args(plan: SpecPlan) -> list[str]:
    """``plan.args`` with a ``-b DEV:INO:DESTINATION`` check for berth-init per bind that carries
    its source's identity, unless a later bind covers its destination (it would hide it)."""
    args = list(plan.args)
    if not args or args[0] != INIT_PATH:
        return args
    checks = []
    for index, bind in enumerate(plan.binds):
        if bind.identity is None:
            continue
        covered = any(later.destination == bind.destination or bind.destination.startswith(
            later.destination.rstrip("/") + "/") for later in plan.binds[index + 1:])
        if not covered:
            checks += ["-b", f"{bind.identity[0]}:{bind.identity[1]}:{bind.destination}"]
    return [args[0], *checks, *args[1:]]


def _seccomp(machine: str) -> dict:
    """Everything allowed but the keyring calls (see KEYRING_SYSCALLS)."""
    profile: dict = {"defaultAction": "SCMP_ACT_ALLOW"}
    if machine in SECCOMP_ARCHITECTURES:
        profile["architectures"] = list(SECCOMP_ARCHITECTURES[machine])
    profile["syscalls"] = [{"names": list(KEYRING_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM}]
    return profile


def build_config(plan: SpecPlan) -> dict:
    """The OCI runtime-spec config (a dict ready for json.dump). Pure: no I/O."""
    capabilities = [] if plan.remap_root else list(IDENTITY_CAPABILITIES)
    process: dict = {
        "terminal": plan.terminal,
        "user": {"uid": 0, "gid": 0},
        "args": _init_args(plan),
        "env": list(plan.env),
        "cwd": plan.cwd,
        "capabilities": {
            "bounding": capabilities,
            "effective": capabilities,
            "permitted": capabilities,
            "inheritable": [],
            "ambient": [],
        },
        "noNewPrivileges": True,
    }
    if plan.rlimits:
        process["rlimits"] = [{"type": kind, "soft": soft, "hard": hard} for kind, soft, hard in plan.rlimits]
    namespaces = [{"type": kind} for kind in ("pid", "ipc", "uts") if kind not in plan.host_namespaces]
    namespaces += [{"type": "mount"}, {"type": "user"}]
    if plan.network == "none":
        namespaces.append({"type": "network"})
    if "cgroup" in plan.private_namespaces:
        namespaces.append({"type": "cgroup"})
    linux: dict = {
        "uidMappings": [{"containerID": 0, "hostID": plan.uid, "size": 1}],
        "gidMappings": [{"containerID": 0, "hostID": plan.gid, "size": 1}],
        "namespaces": namespaces,
        "maskedPaths": [*MASKED_PATHS, *plan.masked],
        "readonlyPaths": list(READONLY_PATHS),
        "seccomp": _seccomp(plan.machine),
    }
    resources: dict = {}
    if plan.uid == 0:
        # runc started by root is not rootless: it puts the container into a cgroup whose device
        # filter lets only its default nodes be opened, and a bind-mounted device node (berth
        # cannot mknod) then fails with EPERM (NVML's "Unknown Error"). Each device berth binds
        # is allowed by its own number; rootless runc applies no device filter.
        allowed = _device_rules(plan.binds)
        if allowed:
            resources["devices"] = allowed
    if plan.cgroups_path is not None:
        if plan.cpu_quota_us is not None:
            resources["cpu"] = {"quota": plan.cpu_quota_us, "period": plan.cpu_period_us}
        if plan.memory_limit_bytes is not None:
            resources["memory"] = {"limit": plan.memory_limit_bytes}
        linux["cgroupsPath"] = plan.cgroups_path
    if plan.cgroups_path is not None or resources:
        linux["resources"] = resources
    config: dict = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": plan.rootfs, "readonly": plan.readonly_root},
        "mounts": _mounts(plan),
        "linux": linux,
    }
    if "uts" not in plan.host_namespaces:
        config["hostname"] = plan.hostname
    if plan.annotations:
        config["annotations"] = dict(sorted(plan.annotations))
    if plan.hooks:
        hooks: dict[str, list] = {}
        for hook in plan.hooks:
            entry: dict = {"path": hook.path}
            if hook.args:
                entry["args"] = list(hook.args)
            if hook.env:
                entry["env"] = list(hook.env)
            if hook.timeout_s is not None:
                entry["timeout"] = hook.timeout_s
            hooks.setdefault(hook.hook_name, []).append(entry)
        config["hooks"] = hooks
    return config
