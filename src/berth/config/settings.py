"""The typed settings model every part of berth receives explicitly (never a global).

Loading order (DESIGN.md decision 7): built-in defaults, then the site file
``$BERTH_CONFIG_DIR/berth.toml`` (default ``/etc/berth``) and its ``conf.d/*.toml`` drop-ins in
name order, then the user's ``$XDG_CONFIG_HOME/berth/berth.toml``, then ``BERTH_*``
environment variables, then command-line options. See ``berth.config.load``.

Field names carry units (``_s``, ``_mib``). Every value's origin is kept in
``Settings.sources`` (dotted key -> "default" | file:line | "env BERTH_X" | "option --x").
"""

from __future__ import annotations

import os
import posixpath
import pwd
import stat
from collections.abc import Mapping
from pathlib import Path

from berth.record import Record, field

DEFAULT_CONFIG_DIR = Path("/etc/berth")
DEFAULT_SITE_STORE = Path("/var/lib/berth/store")


class Mount(Record):
    """A bind mount: host ``source`` at container ``destination``."""

    source: str
    destination: str
    read_only: bool = True
    #: Skip silently when the source does not exist on this node (site mounts such as /scratch).
    optional: bool = False


class EnvOp(Record):
    """One environment change: op is 'set', 'prepend', 'append' or 'unset'.

    prepend/append join with ``separator`` (':' by default) to an existing value.
    """

    op: str
    name: str
    value: str = ""
    separator: str = ":"


class GroupPolicy(Record):
    """Extra mounts, devices and environment for members of a Unix group."""

    group: str
    mounts: tuple[Mount, ...] = ()
    devices: tuple[str, ...] = ()
    env: tuple[EnvOp, ...] = ()


class RegistryPolicy(Record):
    """A ``[[registries]]`` entry: how berth may talk to one registry host."""

    host: str
    insecure: bool = False  # plain HTTP / unverified TLS allowed for this registry
    trusted: bool = True


class SitePolicy(Record):
    """What the site forces on every container and what users may ask for."""

    mounts: tuple[Mount, ...] = ()
    devices: tuple[str, ...] = ()
    env: tuple[EnvOp, ...] = ()
    groups: tuple[GroupPolicy, ...] = ()
    #: User bind-mount sources must start with one of these (empty: anything the user can read).
    mount_allow: tuple[str, ...] = ()
    #: User bind-mount sources or destinations under these are refused.
    mount_deny_sources: tuple[str, ...] = ("/etc/shadow", "/etc/gshadow", "/root", "/proc", "/sys", "/dev")
    mount_deny_destinations: tuple[str, ...] = ("/proc", "/sys", "/dev", "/etc/passwd", "/etc/group")
    #: If non-empty, only images from these registries may be pulled (a limit on pulls only:
    #: an image already in a store still runs; docs/configuration.md).
    trusted_registries: tuple[str, ...] = ()
    #: Namespaces the site forces, e.g. {"network": "none"}; users cannot override.
    forced_namespaces: tuple[tuple[str, str], ...] = ()
    #: Host environment variables passed into containers (shell-style globs).
    passthrough_env: tuple[str, ...] = (
        "SLURM_*", "SLURMD_*", "PMI_*", "PMIX_*", "OMPI_*", "PRTE_*", "MPI_*", "I_MPI_*", "MPIR_CVAR_*",
        "UCX_*", "FI_*",
        "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
        "TERM", "LANG", "LC_*", "TZ", "BERTH_JOB_*",
    )


#: Host driver libraries made loadable in GPU containers (sonames as in the host's ld.so cache;
#: a trailing '*' matches versioned names): the compute and utility set NVIDIA's own container
#: toolkit injects (docs/gpus.md).
DEFAULT_GPU_LIBRARIES = (
    "libcuda.so.1", "libcudadebugger.so.1", "libnvidia-ml.so.1", "libnvidia-ptxjitcompiler.so.1",
    "libnvidia-nvvm.so.4", "libnvidia-opencl.so.1", "libnvidia-cfg.so.1", "libnvidia-allocator.so.1",
    "libnvidia-gpucomp.so.*", "libnvidia-pkcs11.so.*",
)
DEFAULT_GPU_BINARIES = (
    "nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
)


class DeviceSettings(Record):
    """Where this node's devices, CDI specs and GPU driver files are, and what they may mount
    (``[devices]`` in the site file; docs/gpus.md). Site-only: a user could otherwise point berth
    at specs of their own."""

    #: CDI spec directories, lowest priority first (a later one wins for the same device).
    cdi_dirs: tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")
    #: Host paths that CDI specs and the GPU driver files may bind-mount (under one of these).
    mount_allow: tuple[str, ...] = ("/usr", "/lib", "/lib32", "/lib64", "/opt", "/etc", "/run", "/var/run")
    #: The host's device directory: a device named /dev/X is the host's DEV_DIR/X.
    dev_dir: str = "/dev"
    #: The NVIDIA kernel driver's /proc directory (version, one information file per GPU).
    nvidia_proc_dir: str = "/proc/driver/nvidia"
    #: The ld.so cache the driver libraries are looked up in.
    ld_cache: str = "/etc/ld.so.cache"
    gpu_libraries: tuple[str, ...] = DEFAULT_GPU_LIBRARIES
    gpu_binaries: tuple[str, ...] = DEFAULT_GPU_BINARIES
    #: Where the driver binaries are looked for, in order.
    bin_dirs: tuple[str, ...] = ("/usr/bin", "/usr/local/bin", "/usr/sbin", "/bin", "/sbin")
    #: ``[devices.groups]``: name -> device paths or globs (``rdma = ["/dev/infiniband/*"]``),
    #: asked for with ``--device NAME`` (also in templates' custom options).
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()


class MpiSettings(Record):
    """The site's host MPI, injected into containers with ``--mpi host`` (``[mpi]`` in the site
    file; docs/mpi.md, "Host MPI injection"). Site-only, like ``[devices]``; empty: no host MPI."""

    #: The host's MPICH-ABI libraries (sonames in the ld.so cache ``devices.ld_cache``), the C
    #: library first among them: ``libmpi.so.12`` or ``libmpich.so.12``, and their C++ and
    #: Fortran siblings.
    libraries: tuple[str, ...] = ()
    #: Host libraries they need that the image may lack or have in other versions (libfabric,
    #: UCX, hwloc, ...): sonames in the same cache, made loadable beside them.
    dependencies: tuple[str, ...] = ()
    #: Fabric device paths or globs under /dev (``/dev/infiniband/*``); missing ones are skipped.
    devices: tuple[str, ...] = ()
    #: Configuration files or directories the MPI reads (``/etc/libfabric``, ...), bind-mounted
    #: read-only at the same path; missing ones are skipped.
    files: tuple[str, ...] = ()


class Settings(Record):
    """Every setting, loaded by berth.config.load (docs/configuration.md), with ``sources``."""

    config_dir: Path = DEFAULT_CONFIG_DIR
    user_store: Path = Path("~/.local/share/berth")
    site_store: Path = DEFAULT_SITE_STORE
    #: Per-user runtime state (container bundles, mount points): fast local storage.
    #: (The loader's default comes from default_paths; this one is for Settings() made directly:
    #: never a directory shared by all users.)
    state_dir: Path = field(default_factory=lambda: fallback_state_dir())
    #: Per-user job records of the local backend.
    jobs_dir: Path = Path("~/.local/state/berth/jobs")
    #: OCI runtime: "auto" picks the first of runc/crun that works here.
    runtime: str = "auto"
    squashfs_compression: str = "lz4"
    pull_parallel: int = 4
    pull_retries: int = 5
    #: Seconds a registry connection may take to connect, or stay silent mid-response.
    registry_timeout_s: int = 60
    registries: tuple[RegistryPolicy, ...] = ()
    policy: SitePolicy = field(default_factory=SitePolicy)
    devices: DeviceSettings = field(default_factory=DeviceSettings)
    mpi: MpiSettings = field(default_factory=MpiSettings)
    #: Scheduler backend for `berth submit` when none is given: "local" or "slurm".
    backend: str = "local"
    local_max_jobs: int = 4
    #: Copy the SquashFS to node-local storage before mounting (site choice for slow shared FS).
    stage_to_local: bool = False
    #: "shared": one mount of an image per node and user, shared by that user's containers
    #: (berth.runtime.imagemount); "per_container": each container mounts its own;
    #: "unpacked": a node-local unpacked copy per user, reused by later jobs (berth.runtime.localcopy).
    image_mount: str = "shared"
    #: Seconds a shared image mount stays after its last container leaves, for the next container
    #: of the image to reuse with its warm caches (berth.runtime.imagemount); 0: unmount at once.
    image_mount_linger: int = 0
    #: FUSE program for images: "auto" (squashfuse_ll when installed), "squashfuse_ll",
    #: "squashfuse" (with the kernel caching options of berth.runtime.fuse).
    image_fuse: str = "auto"
    #: Keep the plan of a `berth run` whose every input berth can name, and execute it again
    #: for the next identical run without planning (berth.runtime.plancache). On by default
    #: since no container reaches the state directory the plans are kept in (berth.runtime.plan
    #: hides it wherever a mount holds it; docs/security.md, "Cached run plans").
    plan_cache: bool = True
    #: Default S3 endpoint for data staging when a user's profile names none (no secrets here).
    s3_endpoint: str = ""
    #: CA bundle for the S3 endpoint's TLS certificate (None: the system's).
    s3_ca_bundle: Path | None = None
    #: How long berth waits for a lock (store, templates, node-local copies) before it gives up
    #: naming the lock and its holder; 0: do not wait (berth.locks).
    lock_timeout_s: int = 600
    #: Keys users may normally set (runtime, backend, ...) that the site forces (site-only ``pinned``).
    pinned: tuple[str, ...] = ()
    sources: dict = field(default_factory=dict, compare=False)

    def registry(self, host: str) -> RegistryPolicy:
        """The site's policy for ``host`` (``[[registries]]``), or the defaults for an unlisted one."""
        for policy in self.registries:
            if policy.host == host:
                return policy
        return RegistryPolicy(host=host)

    @property
    def templates_dir(self) -> Path:
        """One ``NAME.toml`` per container template (``berth.config.templates``)."""
        return self.config_dir / "templates.d"


_LOOK_UP = "look up"


def home_directory(environ: Mapping[str, str] | None = None, passwd_home: str | None = _LOOK_UP) -> Path:
    """berth's one meaning of "home" (docs/configuration.md, "Home"), for its own files and for
    the container alike: ``$HOME`` when it is an absolute path (normalized), else the passwd
    entry's directory, else ``/`` — the rule of the shell's ``~``, of the XDG base-directory
    specification, docker and pip. Sites set ``HOME`` to a project or scratch path on purpose.
    ``passwd_home``: the caller's passwd directory when already looked up (None: no entry)."""
    env = os.environ if environ is None else environ
    home = env.get("HOME", "")
    if home.startswith("/"):
        return Path("/" + posixpath.normpath(home).lstrip("/"))
    if passwd_home is _LOOK_UP:
        try:
            passwd_home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            passwd_home = None
    return Path(passwd_home or "/")


def xdg_directory(kind: str, environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME``, ``$XDG_DATA_HOME``, ``$XDG_STATE_HOME`` or ``$XDG_CACHE_HOME``
    (``kind`` "config", "data", "state", "cache"), or its default under :func:`home_directory`.
    As the XDG spec says, an unset, empty or relative value is ignored."""
    env = os.environ if environ is None else environ
    value = env.get(f"XDG_{kind.upper()}_HOME", "")
    if value.startswith("/"):
        return Path(value)
    return home_directory(env) / _XDG_DEFAULTS[kind]


_XDG_DEFAULTS = {"config": ".config", "data": ".local/share", "state": ".local/state", "cache": ".cache"}


def user_config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """berth's per-user configuration directory (berth.toml, auth.json): ``XDG_CONFIG_HOME/berth``."""
    return xdg_directory("config", environ) / "berth"


def runtime_directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """``$XDG_RUNTIME_DIR`` when it can be trusted on this node: an absolute path to an existing
    directory (not a link) of the caller's that nobody else may enter, as the XDG spec requires.
    None otherwise: Slurm exports a login node's ``/run/user/UID`` to compute nodes where it is
    missing or belongs to someone else (issue 9, defect 2)."""
    env = os.environ if environ is None else environ
    value = env.get("XDG_RUNTIME_DIR", "")
    if not value.startswith("/"):
        return None
    try:
        info = os.lstat(value)
    except OSError:
        return None
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077:
        return Path(value)
    return None


def fallback_state_dir() -> Path:
    """The state directory when no trustworthy ``XDG_RUNTIME_DIR`` exists: ``/tmp/berth-UID``
    (node-local). Someone else may have created that name first: berth.runtime.state then uses
    a private directory of its own making (see ``ensure_state_dir``)."""
    return Path(f"/tmp/berth-{os.getuid()}")


def early_state_dir(environ: Mapping[str, str]) -> Path | None:
    """The caller's state directory as far as it is known before settings are loaded, for what
    berth keeps there for the loading itself (the parse cache, berth.config.tomlfile) and for
    the plan cache's look-up (berth.runtime.plancache): ``$BERTH_STATE_DIR`` when it is an
    absolute path (the environment outranks every settings file), else the default
    (default_paths). None when ``BERTH_STATE_DIR`` is set but not so (relative, ``~/…``, with
    ``..``): only the settings judge that. A ``state_dir`` set in berth.toml or by an option is
    learnt with the settings, too late for these."""
    value = environ.get("BERTH_STATE_DIR", "")
    if not value:
        return default_paths(environ)["state_dir"]
    if not value.startswith("/") or "\0" in value or ".." in value.split("/"):
        return None
    return Path(os.path.normpath(value))


def default_paths(environ: Mapping[str, str] | None = None) -> dict[str, Path]:
    """The per-user default locations (user_store, jobs_dir, state_dir), from the XDG
    variables as the XDG spec says. The configuration directory is load_settings' concern."""
    env = os.environ if environ is None else environ
    runtime_dir = runtime_directory(env)
    return {
        "user_store": xdg_directory("data", env) / "berth",
        "jobs_dir": xdg_directory("state", env) / "berth" / "jobs",
        "state_dir": runtime_dir / "berth" if runtime_dir else fallback_state_dir(),
    }
