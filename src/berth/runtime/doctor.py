"""`berth doctor`: can this node run berth containers for the caller, and if not, how to fix it.

Each check returns a :class:`Check` (name, ok, what was found, the fix). Checks run real
operations where that is cheap (a user namespace is created, /dev/fuse is opened, a trivial
container is run) rather than trusting configuration files.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from berth import proc
from berth.record import Record, asdict
from berth.runtime import hostcheck, limits, ocirt, state

ADMIN = "ask your site administrator to "


class Check(Record):
    name: str
    ok: bool
    detail: str
    fix: str = ""
    #: False for checks that are informational (berth works without them).
    required: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def check_user_namespaces(proc_sys: Path = hostcheck.PROC_SYS) -> Check:
    result = proc.run(["unshare", "--user", "--map-root-user", "true"], check=False) \
        if proc.has_program("unshare") else None
    if result is not None and result.returncode == 0:
        limit = _read(str(proc_sys / "user" / "max_user_namespaces"))
        return Check("user namespaces", True, f"unprivileged user namespaces work (max_user_namespaces={limit})")
    restrictions = hostcheck.userns_restrictions(proc_sys)
    detail = (result.stderr.decode(errors="replace").strip() if result is not None else "unshare not installed")
    found = "; ".join(r.found for r in restrictions)
    fix = "; ".join(r.fix for r in restrictions) or ("enable unprivileged user namespaces (sysctl "
                                                      "user.max_user_namespaces=15000, kernel.unprivileged_userns_clone=1)")
    return Check("user namespaces", False, f"cannot create a user namespace: {detail}" + (f" ({found})" if found else ""),
                 ADMIN + fix)


def check_fuse_device(device: Path = hostcheck.FUSE_DEVICE) -> Check:
    found = hostcheck.fuse_restriction(device)
    if found is None:
        return Check("/dev/fuse", True, f"{device} can be opened")
    return Check("/dev/fuse", False, found.found, ADMIN + found.fix)


def check_store_locks(store) -> Check | None:
    """flock(2) in a store this user writes (its locks/ directory, else its root); None when
    there is nothing this user could lock there."""
    directory = store.layout.locks_dir if store.layout.locks_dir.is_dir() else store.root
    if not (directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)):
        return None
    found = hostcheck.lock_restriction(directory)
    name = f"{store.kind} store locks"
    if found is None:
        return Check(name, True, f"flock works in {directory}", required=False)
    return Check(name, False, found.found, (ADMIN if store.kind == "site" else "") + found.fix)


def check_program(name: str, *, required: bool = True, setuid: bool = False) -> Check:
    try:
        path = proc.find_program(name)
    except Exception:  # noqa: BLE001 - ProgramNotFound: reported as a failed check
        package = proc.PACKAGES.get(name, name)
        return Check(name, False, f"{name} is not installed", ADMIN + f"install the Debian package '{package}'",
                     required=required)
    if setuid and not os.stat(path).st_mode & 0o4000:
        return Check(name, False, f"{path} is not setuid root, so FUSE mounts cannot be made unprivileged",
                     ADMIN + f"chmod u+s {path}", required=required)
    return Check(name, True, path, required=required)


def check_init() -> Check:
    path = ocirt.init_path()
    if not os.access(path, os.X_OK):
        return Check("berth-init", False, f"missing at {path}", ocirt.INIT_FIX)
    with open(path, "rb") as handle:
        head = handle.read(4096)
    # A static executable has no PT_INTERP (no dynamic loader path in its headers).
    if b"/lib64/ld-linux" in head or b"/lib/ld-" in head:
        return Check("berth-init", False, f"{path} is dynamically linked: it would not run in images with another libc",
                     ocirt.INIT_FIX)
    return Check("berth-init", True, f"{path} (static)")


def check_runtimes(state_dir: Path) -> list[Check]:
    results = ocirt.probe_all(state_dir, ocirt.init_path(), use_cache=False)
    working = [r for r in results if r.works]
    checks = []
    for result in results:
        checks.append(Check(f"runtime {result.runtime}", result.works,
                            f"{result.path or result.runtime}: {result.reason}",
                            "" if result.works else _runtime_fix(result, working),
                            required=not working))
    return checks


def _runtime_fix(result, working: list) -> str:
    if working:
        return (f"optional: berth uses {working[0].runtime}; to use {result.runtime} too, ask your site "
                "administrator to remove the cause above")
    if result.path is None and result.runtime == ocirt.LAUNCHER:
        return ocirt.INIT_FIX
    if result.path is None:
        return ADMIN + f"install {result.runtime} (Debian package {result.runtime})"
    return ADMIN + "remove the cause above (berth needs one working OCI runtime)"


def check_cgroups() -> Check:
    layout = ocirt.cgroup_layout()
    delegated = limits.delegated_cgroup()
    if delegated:
        return Check("cgroups", True, f"cgroup {layout}; {delegated} is delegated to you (cpu, memory): "
                     "--cpus/--memory use cgroups", required=False)
    return Check("cgroups", False, f"cgroup {layout}, no cgroup v2 delegation to you: --cpus uses CPU affinity and "
                 "--memory RLIMIT_DATA instead",
                 ADMIN + "boot with pure cgroup v2 and delegate cpu and memory to users "
                 "(systemd Delegate=yes) for full limits", required=False)


def check_subids() -> Check:
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = str(os.getuid())
    found = {}
    for path in ("/etc/subuid", "/etc/subgid"):
        text = _read(path) or ""
        found[path] = any(line.split(":")[0] in (name, str(os.getuid())) for line in text.splitlines() if ":" in line)
    if all(found.values()):
        return Check("subuid/subgid", True, f"{name} has /etc/subuid and /etc/subgid ranges", required=False)
    missing = ", ".join(p for p, ok in found.items() if not ok)
    return Check("subuid/subgid", False, f"no range for {name} in {missing}; berth does not need one (it maps only "
                 "your own ids), but images whose files belong to several users show them as nobody",
                 ADMIN + f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name} (optional)",
                 required=False)


def check_state_dir(settings) -> tuple[Check, Path | None]:
    """Whether the caller's state directory on this node is usable; also returns where it is."""
    try:
        state_dir = state.resolve_state_dir(settings)
        probe = state_dir / f".doctor-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except Exception as exc:  # noqa: BLE001 - reported
        return Check("state directory", False, f"{settings.state_dir}: {exc}",
                     "set BERTH_STATE_DIR (or state_dir in berth.toml) to a writable local directory"), None
    return Check("state directory", True, f"{state_dir} is yours and writable (mode 0700)"), state_dir


def check_store(store) -> Check:
    """A quick look at one image store (no hashing, no lock); the deep check is
    ``berth store verify``, which this check names when it finds something (issue 8)."""
    from berth.errors import BerthError
    from berth.store.verify import verify_store

    name = f"{store.kind} store"
    try:
        report = verify_store(store, deep=False)
    except BerthError as error:
        return Check(name, False, f"{store.root}: {error.message}", error.hint or "", required=False)
    damage = report.remaining
    if not damage:
        return Check(name, True, f"{store.root}: {report.images_checked} images look complete",
                     required=False)
    first = damage[0]
    more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
    site = " --site" if store.kind == "site" else ""
    fix = f"run `berth store verify{site}` to check every digest, and `berth store verify{site} --repair` to fix it"
    return Check(name, False, f"{store.root}: {first.kind}: {first.path}: {first.detail}{more}",
                 (ADMIN + fix.replace("run ", "", 1)) if site else fix, required=False)


def check_gpus(settings) -> Check:
    """The node's GPUs, the driver, and every reason a GPU would not be usable (issue 13)."""
    from berth.errors import BerthError
    from berth.runtime.devices import gpus

    found = gpus.node_gpus(settings)
    dev_dir = settings.devices.dev_dir
    if not found:
        return Check("GPUs", True, f"no GPU on this node (no nvidiaN and no kfd with render nodes under {dev_dir})",
                     required=False)
    problems = []
    for gpu in found:
        host = Path(dev_dir) / gpu.node.removeprefix("/dev/")
        if not os.access(host, os.R_OK | os.W_OK):
            problems.append(f"you cannot open {host}")
    listed = "; ".join(f"{g.index}: {g.model or 'GPU'}{' ' + g.uuid if g.uuid else ''}" for g in found)
    if found[0].vendor == "amd":
        return Check("GPUs", not problems, f"{len(found)} AMD GPU(s) ({listed})" + "".join(f"; {p}" for p in problems),
                     ADMIN + "give users access to /dev/kfd and /dev/dri/renderD*" if problems else "", required=False)
    for control in ("nvidiactl", "nvidia-uvm"):
        if not os.path.exists(Path(dev_dir) / control):
            # Made on the host's first CUDA use by the setuid nvidia-modprobe, which a container
            # cannot run: CUDA inside fails without it.
            problems.append(f"/dev/{control} is missing (load the nvidia and nvidia-uvm modules at boot, "
                            "e.g. with nvidia-persistenced)")
    version = gpus.driver_version(settings)
    if version is None:
        problems.append(f"the NVIDIA kernel module is not loaded ({settings.devices.nvidia_proc_dir}/version missing)")
    libraries, binaries, notes = gpus.driver_files(settings)
    problems += notes
    if not any(name == "libcuda.so.1" for name, _ in libraries):
        problems.append(f"libcuda.so.1 is not in the ld.so cache {settings.devices.ld_cache}")
    try:
        busy = gpus.Ledger(state.resolve_state_dir(settings)).busy(found)
    except BerthError:
        busy = []  # the state directory check says why
    detail = (f"{len(found)} NVIDIA GPU(s) ({listed}); driver {version or 'unknown'}; libraries: "
              f"{', '.join(n for n, _ in libraries) or 'none'}; binaries: {', '.join(n for n, _ in binaries) or 'none'}")
    if busy:
        detail += f"; in use by your containers: {', '.join(str(g.index) for g in busy)}"
    if problems:
        detail += "; not usable: " + "; ".join(problems)
    return Check("GPUs", not problems, detail, ADMIN + "install the NVIDIA driver's user-space libraries and run "
                 "ldconfig, load the kernel module, and give users access to /dev/nvidia*" if problems else "",
                 required=False)


def check_cdi(settings) -> Check:
    """The CDI devices the site's spec directories define, and the specs berth refuses."""
    from berth.errors import BerthError
    from berth.runtime.devices import cdi

    try:
        registry = cdi.load_registry(settings.devices.cdi_dirs)
    except BerthError as exc:
        return Check("CDI devices", False, exc.message, exc.hint or "", required=False)
    names = sorted(registry.devices)
    detail = (f"{len(names)} device(s): {', '.join(names)}" if names else
              f"no CDI spec in {', '.join(settings.devices.cdi_dirs)}")
    problems = [error.message for error in registry.errors]
    problems += [f"{name} is defined by several specs of one directory ({', '.join(files)})"
                 for name, files in sorted(registry.conflicts.items())]
    if problems:
        detail += "; refused: " + "; ".join(problems)
    return Check("CDI devices", not problems, detail,
                 ADMIN + "fix or remove the refused specs (docs/gpus.md)" if problems else "", required=False)


def check_mpi(settings) -> Check:
    """The site's MPI for ``--mpi host`` ([mpi]) as this node has it, or why it cannot be injected."""
    from berth.errors import BerthError
    from berth.runtime.devices import mpi

    if not settings.mpi.libraries:
        return Check("host MPI", True, "none configured ([mpi] libraries): --mpi host is refused", required=False)
    try:
        found = mpi.host_mpi(settings, what="[mpi]")
    except BerthError as exc:
        return Check("host MPI", False, exc.message, exc.hint or "", required=False)
    family = ", ".join(f"{role} {library.describe()} (MPICH ABI {library.version_text()})"
                       for role, library in found.family)
    libraries = len({m.host_path for m in found.edits.mounts if m.container_path.startswith(mpi.MPI_DIR)})
    return Check("host MPI", True, f"{family}; {libraries} librar{'y' if libraries == 1 else 'ies'} injected, "
                 f"{len(found.edits.device_nodes)} device(s)", required=False)


def run_checks(settings) -> list[Check]:
    state_check, state_dir = check_state_dir(settings)
    checks = [
        check_user_namespaces(),
        check_fuse_device(),
        check_program("squashfuse"),
        check_program("fuse-overlayfs"),
        check_program("fusermount3", setuid=True),
        check_init(),
        state_check,
    ]
    if state_dir is not None:
        checks += check_runtimes(state_dir)
        mounts = check_image_mounts(state_dir)
        if mounts is not None:
            checks.append(mounts)
    from berth.store.store import SITE, USER, Store

    checks += [check_cgroups(), check_subids()]
    for store in (Store(settings.user_store, USER), Store(settings.site_store, SITE)):
        checks.append(check_store(store))
        locks = check_store_locks(store)
        if locks is not None:
            checks.append(locks)
    checks += [check_gpus(settings), check_cdi(settings), check_mpi(settings)]
    return checks


def cleanup(settings) -> tuple[list[dict], list[dict], list[str]]:
    """Clean every stale container of the caller on this node, then the shared image mounts
    no live container holds (``berth doctor --cleanup``): (containers, images) cleaned, and
    why a mount found is still mounted (fusermount3's words and the likely cause)."""
    from berth.runtime import imagemount

    state_dir = state.resolve_state_dir(settings)
    failures: list[str] = []
    containers = state.cleanup_stale(state_dir, images=False, warn=failures.append)
    images = imagemount.cleanup_stale(state_dir, lingering=True)
    return containers, images, failures + [image["failure"] for image in images if image["failure"]]


def check_image_mounts(state_dir) -> Check | None:
    """The caller's shared image mounts on this node: how many are in use, and which linger
    (image_mount_linger) until when. None when there are none."""
    import time

    from berth.runtime import imagemount

    mounts = imagemount.list_mounts(state_dir)
    if not mounts:
        return None
    in_use = sum(1 for mount in mounts if mount["holders"])
    lingering = [mount for mount in mounts if mount["lingering_until"] is not None]
    parts = [f"{in_use} in use"]
    for mount in lingering:
        left = mount["lingering_until"] - time.time()
        parts.append(f"{mount['image']} lingering, unmounted in {max(left, 0):.0f} s unless used again"
                     if left > 0 else f"{mount['image']} lingered past its time (the next berth removes it)")
    failed = [mount["unmount_failed"] for mount in mounts if mount["unmount_failed"]]
    if failed:  # a reaper's unmount that failed: nobody else heard of it
        return Check("shared image mounts", False, "; ".join([*parts, *failed]),
                     "fix what the message names, then run 'berth doctor --cleanup'", required=False)
    return Check("shared image mounts", True, "; ".join(parts),
                 "berth doctor --cleanup ends lingering mounts now" if lingering else "", required=False)

