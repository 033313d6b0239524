"""The PMIx server's directories, passed into a host-launched MPI rank (DESIGN.md decision 9).

``srun --mpi=pmix … berth run IMAGE PROGRAM`` starts one container per rank. The rank's PMIx
client finds its server through environment variables (passed through by
``settings.policy.passthrough_env``: ``PMIX_*``) and over TCP on the host's network namespace
(the default), but it also maps the server's shared-memory data store, files under
``PMIX_SERVER_TMPDIR`` (Slurm: ``SlurmdSpoolDir/pmix.JOB.STEP/``) named again by
``PMIX_DSTORE_*_BASE_PATH``. Those directories are bind-mounted into the container at the same
path, so the rank sees exactly what a rank started on the host would.

Slurm's pmix plugin also gives the ranks of a step a client directory that no variable names
(``src/plugins/mpi/pmix/pmixp_info.c``): ``BASE/spmix_appdir_UID_JOB.STEP`` (before Slurm 20.11:
``BASE/spmix_appdir_JOB.STEP``), where BASE is ``$SLURM_PMIX_TMPDIR`` or the node's ``TmpFS``
(``%n`` and ``%h`` expanded; ``/tmp`` when unset). OpenMPI puts its session directory there and
aborts ``MPI_Init`` (``ORTE_ERROR_LOG ... session_dir.c``) when it is missing: where ``TmpFS`` is
not under ``/tmp`` (``/local/scratch``, ...), it must be mounted (issue 13). berth derives it the
way the plugin does — job and step from ``PMIX_NAMESPACE`` (``slurm.pmix.JOB.STEP``), ``TmpFS``
read from the Slurm configuration the step runs under (``$SLURM_CONF``, else
``/etc/slurm/slurm.conf``; no ``scontrol`` call, which would ask slurmctld once per rank) — and
mounts only that directory of this user's step, never ``TmpFS`` itself (other steps' and other
users' directories stay out).

The paths come from the caller's environment, so they are judged like a ``-v`` source: resolved
on the host (links followed), refused under ``mount_deny_sources``, and, since the PMIx server
(slurmstepd, prterun) creates them for the job's user, a directory the caller does not own is
skipped with a note rather than mounted. ``mount_allow`` does not apply: the caller's own PMIx
directory is always theirs to see. A variable naming a missing directory (a stale environment)
is skipped with a debug note: the rank then fails in PMIx with its own message.

One container per rank also means one ``/dev/shm``, ``/tmp`` and PID namespace per rank, so
OpenMPI's shared-memory transport (``vader``) cannot work between two ranks on one node: it
crashes them (SIGSEGV in ``mca_btl_vader_sendi``, seen on the test bed). For a host-launched
rank (``PMIX_RANK`` set) berth therefore sets ``OMPI_MCA_btl=^vader`` — ranks on one node talk
over TCP or the fabric — unless the host environment or the image already chooses
``OMPI_MCA_btl``. (Ranks that share one container, under ``mpirun`` inside it, keep it.)

Ranks that share one container through ``--scope node`` keep ``vader`` too, but not its
single-copy mechanism: each rank enters the container through berth-init, which gives it its
own nested user namespace, and the image's programs are owned by an id that namespace does not
map, so the kernel makes the ranks non-dumpable and ``process_vm_readv`` (CMA) between them is
refused. OpenMPI 4.1's vader then hangs on the first large message (seen on the test bed: a
64 KiB windowed send never completes). For such a rank berth sets
``OMPI_MCA_btl_vader_single_copy_mechanism=none`` (copy through the shared segment) unless the
host environment or the image chooses it.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable, Mapping

from berth.config.settings import EnvOp
from berth.runtime import policy
from berth.runtime.spec import BindMount

#: Variables naming directories a PMIx client needs (its server's rendezvous and data store).
PMIX_DIR_VARIABLES = ("PMIX_SERVER_TMPDIR", "PMIX_DSTORE_21_BASE_PATH", "PMIX_DSTORE_ESH_BASE_PATH")


#: Where the Slurm configuration is when ``SLURM_CONF`` is unset (Slurm's default).
SLURM_CONF_DEFAULT = "/etc/slurm/slurm.conf"
#: A slurm.conf larger than this is not read (it is a few KiB on real clusters).
MAX_SLURM_CONF_BYTES = 4 << 20


def slurm_tmpfs(host_env: Mapping[str, str], *, nodename: str | None = None) -> str | None:
    """The node's ``TmpFS`` from the Slurm configuration (``$SLURM_CONF`` or the default), with
    ``%n`` (``$SLURMD_NODENAME``) and ``%h`` (this host's name) expanded: ``/tmp`` when the file
    sets none, None when it cannot be read or ``%n`` cannot be expanded. Only ``TmpFS`` is read
    (the last one wins; ``Include`` files are not followed)."""
    path = host_env.get("SLURM_CONF") or SLURM_CONF_DEFAULT
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_SLURM_CONF_BYTES + 1)
    except OSError:
        return None
    if len(text) > MAX_SLURM_CONF_BYTES:
        return None
    value = "/tmp"
    for line in text.decode("utf-8", "replace").splitlines():
        for word in line.split("#", 1)[0].split():
            key, sep, found = word.partition("=")
            if sep and key.lower() == "tmpfs" and found:
                value = found.strip("\"'")
    if "%n" in value:
        node = host_env.get("SLURMD_NODENAME")
        if not node:
            return None
        value = value.replace("%n", node)
    if "%h" in value:
        value = value.replace("%h", nodename or os.uname().nodename.split(".")[0])
    return value if value.startswith("/") else None


def slurm_appdirs(host_env: Mapping[str, str], uid: int) -> list[str]:
    """The client directory Slurm's pmix plugin gives this step's ranks, in both of its naming
    schemes (newest first); [] outside a Slurm PMIx step."""
    prefix, _, rest = host_env.get("PMIX_NAMESPACE", "").partition("slurm.pmix.")
    job, _, step = rest.partition(".")
    if prefix or not (job.isascii() and job.isdigit() and step.isascii() and step.isdigit()):
        return []
    base = host_env.get("SLURM_PMIX_TMPDIR") or slurm_tmpfs(host_env)
    if not base or not base.startswith("/"):
        return []
    return [posixpath.join(base, f"spmix_appdir_{uid}_{job}.{step}"), posixpath.join(base, f"spmix_appdir_{job}.{step}")]


def pmix_mounts(host_env: Mapping[str, str], settings, uid: int,
                log: Callable[..., None]) -> list[BindMount]:
    """Read-write bind mounts (same path inside) of the PMIx directories named in ``host_env``
    and of Slurm's client directory of this step (:func:`slurm_appdirs`).

    Nested directories are covered by their parent's mount and not mounted twice. Raises
    PolicyError when a directory lies under ``settings.policy.mount_deny_sources`` or its
    container path under ``mount_deny_destinations``."""
    chosen: list[str] = []
    wanted = [(f"PMIx directory {name}={host_env[name]}", host_env[name])
              for name in PMIX_DIR_VARIABLES if host_env.get(name)]
    wanted += [(f"Slurm's PMIx client directory {path}", path) for path in slurm_appdirs(host_env, uid)]
    for what, value in wanted:
        if not value.startswith("/"):
            log(f"{what} skipped: not an absolute path", debug=True)
            continue
        real = os.path.realpath(value)
        try:
            info = os.stat(real)
        except OSError:
            log(f"{what} skipped: missing on this node", debug=True)
            continue
        if not os.path.isdir(real):
            log(f"{what} skipped: not a directory", debug=True)
            continue
        if info.st_uid != uid:
            log(f"{what} skipped: owned by uid {info.st_uid}, not by you (a PMIx server makes it for the "
                "job's user)")
            continue
        policy.check_source(value, value, real, what=what, deny=settings.policy.mount_deny_sources,
                            hint="unset the variable, or ask your site administrator")
        policy.check_destination(real, what=what, deny=settings.policy.mount_deny_destinations)
        chosen.append(posixpath.normpath(real))
    mounts = []
    for path in sorted(set(chosen), key=len):
        if any(path.startswith(parent.rstrip("/") + "/") for parent in (m.source for m in mounts)):
            continue
        mounts.append(BindMount(path, path, read_only=False))
        log(f"PMIx directory {path} mounted at the same path", debug=True)
    return mounts


#: What berth sets for a host-launched rank, per scope, when the host and the image leave it unset.
_RANK_DEFAULTS = {"task": ("OMPI_MCA_btl", "^vader"),
                  "node": ("OMPI_MCA_btl_vader_single_copy_mechanism", "none")}


def rank_env_ops(host_env: Mapping[str, str], image_env: list[str], scope: str = "task") -> list[EnvOp]:
    """For a host-launched PMIx rank: ``OMPI_MCA_btl=^vader`` in a container of its own
    (``scope`` "task"), ``OMPI_MCA_btl_vader_single_copy_mechanism=none`` in its node's shared
    container ("node"); for any host-launched rank (PMIx or Slurm's PMI-1/PMI-2) in a container
    of its own, ``MPIR_CVAR_NOLOCAL=1``: MPICH maps one shared-memory segment per node for its
    local ranks in ``MPI_Init`` and aborts ("unable to allocate shared memory") when they do not
    share ``/dev/shm`` (seen on the test bed), so each rank acts as if alone on its node (MPICH's
    own CVAR for it). A variable the host environment or the image sets is left as it is."""
    wanted = []
    if "PMIX_RANK" in host_env:
        wanted.append(_RANK_DEFAULTS[scope])
    if scope == "task" and ("PMIX_RANK" in host_env or "PMI_RANK" in host_env):
        wanted.append(("MPIR_CVAR_NOLOCAL", "1"))
    return [EnvOp("set", name, value) for name, value in wanted
            if name not in host_env and not any(entry.startswith(name + "=") for entry in image_env)]


#: Where a rank finds Slurm's PMI-1/PMI-2 socket in the container: runc's ``--preserve-fds 1``
#: passes exactly one descriptor, as fd 3.
CONTAINER_PMI_FD = 3


def pmi_fd(host_env: Mapping[str, str]) -> int | None:
    """Slurm's PMI socket of this task (``srun --mpi=pmi2`` sets ``PMI_FD``; MPICH's simple PMI
    client and Slurm's libpmi2 speak PMI-1/PMI-2 over it), when it is an open socket of this
    process; None otherwise (a stale variable, no such step).

    The socket is inherited from slurmstepd and no path names it, and an OCI runtime closes
    every descriptor but 0-2: berth passes it to the runtime as fd 3 (``--preserve-fds 1``) and
    sets ``PMI_FD=3`` in the container (:func:`pmi_env_ops`), for ``--scope task`` and for each
    task entering its node's container."""
    value = host_env.get("PMI_FD", "")
    if not (value.isascii() and value.isdigit()) or int(value) < 3:
        return None
    try:
        info = os.fstat(int(value))
    except (OSError, OverflowError):
        return None
    return int(value) if stat.S_ISSOCK(info.st_mode) else None


def pmi_env_ops(host_env: Mapping[str, str]) -> list[EnvOp]:
    """``PMI_FD`` as the container sees it, when :func:`pmi_fd` passes one in; else ``[]``."""
    return [EnvOp("set", "PMI_FD", str(CONTAINER_PMI_FD))] if pmi_fd(host_env) is not None else []
