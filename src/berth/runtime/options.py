"""What `berth run` accepts, as one record, and the one parser that fills it.

The parser lives here (not in cli/) because templates validate their ``custom="…"`` options
with the very same rules (docs/contracts.md: ``parse_custom``); cli/run.py only adds the
positional IMAGE and COMMAND and calls :func:`options_from_namespace`.
"""

from __future__ import annotations

import argparse
import posixpath
import re

from berth.config.units import STOP_TIMEOUT_MAX_S, parse_duration, parse_memory
from berth.errors import UsageError
from berth.namedtuple import NamedTuple
from berth.oci.names import is_container_hostname, is_env_name
from berth.record import Record

DEFAULT_STOP_TIMEOUT_S = 10.0

# Patterns as strings, compiled on first use by re's cache (not at import: start-up time);
# always full matches ('$' accepts a final newline: issue 12).
_CONTAINER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"


class MountRequest(NamedTuple):
    """A user bind mount ``-v SRC:DST[:ro|rw]`` (source as typed; checked by policy)."""

    source: str
    destination: str
    read_only: bool = False


class RunOptions(Record):
    """Everything `berth run` accepts besides IMAGE and COMMAND (see ``berth run --help``)."""

    mounts: tuple[MountRequest, ...] = ()
    workdir: str | None = None
    #: ``KEY=VALUE`` or ``KEY`` (take the caller's value), in command-line order.
    env: tuple[str, ...] = ()
    env_files: tuple[str, ...] = ()
    network: str | None = None  # "host" | "none"; None: the site's choice, else host
    #: Device paths, site device group names or CDI names (berth.runtime.devices.edits).
    devices: tuple[str, ...] = ()
    #: ``all``, a count or a list of GPUs (berth.runtime.devices.gpus); None: no GPU.
    gpus: str | None = None
    cpus: float | None = None
    memory_bytes: int | None = None
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    tty: bool = False
    name: str | None = None
    pull: str = "missing"  # "missing" | "never" | "always"
    debug: bool = False
    writable: bool = False
    remap_root: bool = False
    mount_home: bool = True
    entrypoint: str | None = None
    hostname: str | None = None
    runtime: str | None = None
    #: "task": one container per berth run; "node": the tasks of a Slurm step on one node
    #: share one container (berth.runtime.nodescope).
    scope: str = "task"
    #: "host": the site's MPICH-ABI MPI replaces the image's (berth.runtime.devices.mpi);
    #: "none" or None: the image's own MPI ("none" undoes a template's ``--mpi host``).
    mpi: str | None = None


def is_container_name(name: str) -> bool:
    """True for a container name (``--name``; also every generated id): 1 to 63 letters,
    digits, '_', '.', '-', starting with a letter or digit (so never '.' or '..')."""
    return isinstance(name, str) and re.fullmatch(_CONTAINER_NAME, name) is not None


def parse_mount(text: str) -> MountRequest:
    """``SRC:DST[:ro|rw]`` -> MountRequest. Syntax only; policy.check_options judges paths."""
    parts = text.split(":")
    mode = "rw"
    if len(parts) == 3:
        mode = parts[2]
        parts = parts[:2]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise UsageError(
            f"--mount '{text}': expected SRC:DST or SRC:DST:ro",
            hint="for example -v /scratch/me/data:/data:ro",
        )
    if mode not in ("ro", "rw"):
        raise UsageError(f"--mount '{text}': the mode must be 'ro' or 'rw', not '{mode}'")
    return MountRequest(parts[0], parts[1], read_only=mode == "ro")


def check_env_entry(entry: str, *, what: str, show: bool = True) -> None:
    """Raise UsageError unless ``entry`` is ``KEY=VALUE`` or ``KEY``. ``show=False`` (an
    --env-file line, where people keep secrets off the command line): the message never quotes
    the entry, which may be a secret or hold one (``export TOKEN=...``)."""
    name = entry.partition("=")[0]
    if not is_env_name(name):
        shown = f"{entry!r} does not" if show else "the line does not"
        raise UsageError(f"{what}: {shown} start with a valid variable name",
                         hint="names are letters, digits and '_', not starting with a digit"
                              + ("" if show else "; lines are KEY=VALUE or KEY, without 'export'"))
    if "\0" in entry:
        raise UsageError(f"{what}: the value of {name} contains a NUL byte")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the container options (not IMAGE/COMMAND) to ``parser``."""
    add = parser.add_argument
    add("-v", "--mount", "--volume", dest="mounts", action="append", default=[], metavar="SRC:DST[:ro|rw]",
        help="bind-mount a host path into the container (read-write unless :ro)")
    add("-w", "--workdir", metavar="DIR", help="working directory inside the container")
    add("-e", "--env", dest="env", action="append", default=[], metavar="KEY[=VALUE]",
        help="set a variable (KEY alone takes your current value)")
    add("--env-file", dest="env_files", action="append", default=[], metavar="FILE",
        help="read KEY=VALUE lines from FILE ('#' comments and blank lines ignored)")
    add("--network", choices=("host", "none"), help="host (default: fabrics and MPI need it) or none")
    add("--device", dest="devices", action="append", default=[], metavar="/dev/X|GROUP|VENDOR/CLASS=NAME",
        help="pass a host device you can open, a site device group, or a CDI device (vendor.com/class=name)")
    add("--gpus", metavar="all|N|LIST",
        help="GPUs from your allocation: all, a count, or indexes/UUIDs (0,1 or device=1), with the host "
             "driver's libraries and tools")
    add("--cpus", type=float, metavar="N", help="limit to N CPUs (cgroup v2 when delegated, else CPU affinity)")
    add("--memory", metavar="SIZE",
        help="limit memory, e.g. 4G (no unit: bytes, as docker); cgroup v2 when delegated, else RLIMIT_DATA")
    add("--stop-timeout", dest="stop_timeout", metavar="DURATION",
        help="time between forwarding SIGTERM/SIGINT and killing the container: seconds, or 90s, 2m "
        f"(default {DEFAULT_STOP_TIMEOUT_S:g}s)")
    add("-t", "--tty", action="store_true", help="give the command a terminal (interactive shells)")
    add("-i", "--interactive", action="store_true",
        help="accepted for docker compatibility: stdin always passes through")
    add("--rm", dest="remove", action="store_true",
        help="accepted for docker compatibility: berth always removes the container when it exits")
    add("--name", help="a name for berth ps/exec (default: a generated id)")
    add("--pull", choices=("missing", "never", "always"), default="missing",
        help="pull the image: when missing from every store (default), never, or always")
    add("--debug", dest="run_debug", action="store_true", help="explain what berth sets up")
    add("--writable", action="store_true", help="a writable root filesystem, discarded at exit")
    add("--remap-root", action="store_true", help="run as uid 0 inside (still no host privilege)")
    add("--no-mount-home", dest="mount_home", action="store_false", help="do not mount your home directory")
    add("--entrypoint", metavar="PATH", help="replace the image's entrypoint")
    add("--hostname", help="hostname inside (default: this node's)")
    add("--runtime", choices=("launcher", "runc", "crun"),
        help="runtime: berth's own launcher or an OCI runtime (default: site setting, else the first that works)")
    add("--scope", choices=("task", "node"), default="task",
        help="task: a container per berth run (default); node: in a Slurm step, the tasks of a node "
             "share one container (one start-up, shared /dev/shm and IPC for MPI ranks)")
    add("--mpi", choices=("host", "none"),
        help="host: the site's MPI (MPICH ABI) replaces the image's, after an ABI check; none: the "
             "image's own MPI (default)")


def options_from_namespace(ns: argparse.Namespace) -> RunOptions:
    """Validate parsed arguments and build RunOptions. Raises UsageError."""
    for entry in ns.env:
        check_env_entry(entry, what="-e")
    if ns.cpus is not None and not 0 < ns.cpus <= 65536:
        raise UsageError(f"--cpus {ns.cpus:g}: must be a positive number of CPUs")
    if ns.workdir is not None and not posixpath.isabs(ns.workdir):
        raise UsageError(f"--workdir '{ns.workdir}': must be an absolute path inside the container")
    if ns.name is not None and not is_container_name(ns.name):
        raise UsageError(f"--name {ns.name!r}: use letters, digits, '_', '.', '-' (at most 63)")
    if ns.hostname is not None and not is_container_hostname(ns.hostname):
        raise UsageError(f"--hostname {ns.hostname!r} is not a valid host name",
                         hint="letters, digits and '-' in dot-separated labels, at most 63 characters")
    if ns.gpus is not None:
        from berth.runtime.devices.gpus import parse_request

        parse_request(ns.gpus)
    if ns.devices:
        from berth.runtime.devices.edits import check_device_request

        for device in ns.devices:
            check_device_request(device, what=f"--device {device}")
    return RunOptions(
        mounts=tuple(parse_mount(m) for m in ns.mounts),
        workdir=ns.workdir,
        env=tuple(ns.env),
        env_files=tuple(ns.env_files),
        network=ns.network,
        devices=tuple(ns.devices),
        gpus=ns.gpus,
        cpus=ns.cpus,
        memory_bytes=None if ns.memory is None else parse_memory(ns.memory, option="--memory", bare_unit="B"),
        stop_timeout_s=(DEFAULT_STOP_TIMEOUT_S if ns.stop_timeout is None else
                        float(parse_duration(ns.stop_timeout, option="--stop-timeout", bare_unit="s",
                                             minimum_s=0, maximum_s=STOP_TIMEOUT_MAX_S))),
        tty=ns.tty,
        name=ns.name,
        pull=ns.pull,
        debug=ns.run_debug,
        writable=ns.writable,
        remap_root=ns.remap_root,
        mount_home=ns.mount_home,
        entrypoint=ns.entrypoint,
        hostname=ns.hostname,
        runtime=ns.runtime,
        scope=getattr(ns, "scope", "task"),
        mpi=getattr(ns, "mpi", None),
    )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def parse_run_options(argv: list[str]) -> RunOptions:
    """Parse `berth run` options (no IMAGE, no COMMAND). Raises UsageError."""
    parser = _Parser(prog="berth run options", add_help=False)
    add_run_arguments(parser)
    ns, rest = parser.parse_known_args(argv)
    if rest:
        raise UsageError(f"unexpected argument(s) {' '.join(rest)!r}: only options are allowed here")
    return options_from_namespace(ns)


def parse_custom(text: str) -> RunOptions:
    """A template's ``custom="…"`` string (shell-quoted run options). Raises UsageError."""
    import shlex  # templates only: not on `berth run`'s path (start-up time, issue 10)

    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"custom options '{text}': {exc}") from None
    return parse_run_options(argv)
