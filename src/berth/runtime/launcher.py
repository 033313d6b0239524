"""What berth-launcher can run: the fallback decision, made on the config.json itself (issue 10).

berth-launcher (``init/berth-launcher.c``, static like berth-init) executes the config.json berth
generates without runc, for the part of the OCI runtime spec that berth uses; everything else
goes to runc (or crun). :func:`unsupported` says, before a run, why a config needs runc; the
launcher refuses the same configs itself (``berth-launcher check``, and every ``run``), so a
config that slips past this check fails with a message instead of running half-understood.
The tables here are the launcher's (tests/unit/test_runtime_launcher.py runs both on the same
configs).

Pure: no I/O, no imports beyond the standard library's ``os`` for the caller's ids.
"""

from __future__ import annotations

import os

TOP_KEYS = frozenset({"ociVersion", "process", "root", "mounts", "linux", "hostname", "annotations", "hooks"})
PROCESS_KEYS = frozenset({"terminal", "user", "args", "env", "cwd", "capabilities", "noNewPrivileges", "rlimits"})
CAPABILITY_SETS = frozenset({"bounding", "effective", "permitted", "inheritable", "ambient"})
LINUX_KEYS = frozenset({"uidMappings", "gidMappings", "namespaces", "maskedPaths", "readonlyPaths", "seccomp",
                        "resources"})
#: The one seccomp profile the launcher runs: berth.runtime.spec's keyring rule (every ABI the
#: machine runs; any other profile goes to runc).
KEYRING_SYSCALLS = frozenset({"add_key", "keyctl", "request_key"})
NAMESPACES = frozenset({"user", "mount", "pid", "ipc", "uts", "network", "cgroup"})
FS_TYPES = frozenset({"proc", "tmpfs", "devpts", "mqueue", "sysfs", "overlay"})
MOUNT_FLAGS = frozenset({
    "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async", "dirsync", "noatime",
    "atime", "nodiratime", "diratime", "relatime", "norelatime", "strictatime", "bind", "rbind",
    "private", "rprivate", "slave", "rslave", "unbindable", "runbindable",
    "rro", "rnosuid", "rnodev", "rnoexec",
})
RLIMITS = frozenset({
    "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS", "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_RSS", "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK",
})
CAPABILITIES = frozenset({
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
})

#: What berth's own features need that the launcher does not do, by config key: the reason given.
WHY = {
    "hooks": "OCI hooks (from a CDI spec)",
    "linux.cgroupsPath": "cgroup resources (--cpus/--memory on a host that delegates cgroup v2)",
    "linux.resources": "cgroup resources (--cpus/--memory on a host that delegates cgroup v2)",
    "process.terminal": "a terminal (-t)",
}


def _unknown(mapping: object, allowed: frozenset, where: str) -> str | None:
    if not isinstance(mapping, dict):
        return f"{where} is not an object"
    for key in mapping:
        if key not in allowed:
            name = f"{where}.{key}" if where != "config" else key
            return WHY.get(name, f"config key {name}")
    return None


def _mount_reason(mount: object) -> str | None:
    if not isinstance(mount, dict) or set(mount) - {"destination", "type", "source", "options"}:
        return "a mount with keys berth-launcher does not know"
    options = mount.get("options") or []
    bind = "bind" in options or "rbind" in options
    kind = mount.get("type", "none")
    destination = mount.get("destination")
    if not isinstance(destination, str) or not destination.startswith("/"):
        return "a mount without an absolute destination"
    if bind:
        if not str(mount.get("source", "")).startswith("/"):
            return f"a bind mount at {destination} from a relative source"
        unknown = [option for option in options if option not in MOUNT_FLAGS]
        if unknown:
            return f"bind mount option {unknown[0]} (at {destination})"
        return None
    if kind not in FS_TYPES:
        return f"a mount of type {kind} (at {destination})"
    if any("," in option for option in options):
        return f"a mount option with a comma (at {destination})"
    return None


def unsupported(config: dict, *, uid: int | None = None, gid: int | None = None) -> str | None:
    """Why berth-launcher cannot run ``config`` (a config.json dict), or None when it can.

    ``uid``/``gid``: the caller's effective ids (default: this process's), which the single
    uid and gid mappings must name: the launcher has no newuidmap."""
    reason = _unknown(config, TOP_KEYS, "config")
    if reason:
        return reason
    if not str(config.get("ociVersion", "")).startswith("1."):
        return f"ociVersion {config.get('ociVersion')}"
    hooks = config.get("hooks") or {}
    if not isinstance(hooks, dict) or any(hooks.values()):
        return WHY["hooks"]
    process = config.get("process")
    reason = _unknown(process, PROCESS_KEYS, "process")
    if reason:
        return reason
    if process.get("terminal"):
        return WHY["process.terminal"]
    user = process.get("user")
    if not isinstance(user, dict) or set(user) - {"uid", "gid"}:
        return "process.user keys other than uid and gid (additionalGids, umask)"
    capabilities = process.get("capabilities") or {}
    reason = _unknown(capabilities, CAPABILITY_SETS, "process.capabilities")
    if reason:
        return reason
    for names in capabilities.values():
        for name in names:
            if name not in CAPABILITIES:
                return f"capability {name}"
    for limit in process.get("rlimits") or ():
        if not isinstance(limit, dict) or limit.get("type") not in RLIMITS:
            return f"rlimit {limit.get('type') if isinstance(limit, dict) else limit}"
    if not isinstance(config.get("root"), dict) or set(config["root"]) - {"path", "readonly"}:
        return "root keys other than path and readonly"
    for mount in config.get("mounts") or ():
        reason = _mount_reason(mount)
        if reason:
            return reason
    linux = config.get("linux")
    reason = _unknown(linux, LINUX_KEYS, "linux")
    if reason:
        return reason
    # Device allow rules alone (a run by root, for runc's device cgroup) need nothing: the
    # launcher makes no cgroup, so nothing filters the device nodes it binds. A rule narrower
    # than read-write (a CDI spec's "r") needs that cgroup to be enforced: runc's.
    resources = linux.get("resources")
    if resources is not None and (not isinstance(resources, dict) or set(resources) - {"devices"}
                                  or not all(isinstance(rule, dict) and rule.get("allow") is True
                                             for rule in resources.get("devices") or ())):
        return WHY["linux.resources"]
    if resources is not None and not all(rule.get("access") in ("rw", "rwm") for rule in resources.get("devices") or ()):
        return "a device allowed less than read-write (a CDI spec's permissions), which needs runc's device cgroup"
    if "seccomp" in linux and not _is_keyring_rule(linux["seccomp"]):
        return "a seccomp profile other than berth's keyring rule"
    if "seccomp" in linux and not process.get("noNewPrivileges"):
        return "seccomp without noNewPrivileges"
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    for key, own in (("uidMappings", uid), ("gidMappings", gid)):
        mappings = linux.get(key)
        if (not isinstance(mappings, list) or len(mappings) != 1 or not isinstance(mappings[0], dict)
                or set(mappings[0]) - {"containerID", "hostID", "size"}
                or mappings[0].get("hostID") != own or mappings[0].get("size") != 1):
            return f"linux.{key} other than the caller's own id, once"
    kinds = []
    for namespace in linux.get("namespaces") or ():
        if not isinstance(namespace, dict) or set(namespace) != {"type"}:
            return "a namespace joined by path"
        if namespace["type"] not in NAMESPACES:
            return f"a {namespace['type']} namespace"
        kinds.append(namespace["type"])
    if "user" not in kinds or "mount" not in kinds:
        return "no new user or mount namespace"
    if "hostname" in config and "uts" not in kinds:
        return "a hostname without a new uts namespace"
    return None


def _is_keyring_rule(profile) -> bool:
    """``linux.seccomp`` is berth's keyring rule: everything allowed, add_key, keyctl and
    request_key refused with EPERM (berth.runtime.spec._seccomp)."""
    if not isinstance(profile, dict) or set(profile) - {"defaultAction", "architectures", "syscalls"}:
        return False
    rules = profile.get("syscalls")
    if profile.get("defaultAction") != "SCMP_ACT_ALLOW" or not isinstance(rules, list) or len(rules) != 1:
        return False
    rule = rules[0]
    return (isinstance(rule, dict) and set(rule) == {"names", "action", "errnoRet"}
            and rule["action"] == "SCMP_ACT_ERRNO" and rule["errnoRet"] == 1
            and isinstance(rule["names"], list) and set(rule["names"]) == KEYRING_SYSCALLS
            and len(rule["names"]) == len(KEYRING_SYSCALLS)
            and all(isinstance(a, str) for a in profile.get("architectures", [])))
