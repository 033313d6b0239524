"""The one gateway for running external programs.

Rules (STYLE.md): argv lists only, never shell strings; an explicit environment, never a
mutation of ``os.environ``; stdin from /dev/null unless given; binaries resolved once to
absolute paths; the stderr tail kept in the raised error; signals reach the child.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO

from berth.errors import ProgramFailed, ProgramNotFound

#: Debian package that provides each program berth runs (for hints).
PACKAGES = {
    "runc": "runc",
    "crun": "crun",
    "squashfuse": "squashfuse",
    "squashfuse_ll": "squashfuse",
    "fusermount3": "fuse3",
    "fuse-overlayfs": "fuse-overlayfs",
    "tar2sqfs": "squashfs-tools-ng",
    "sqfs2tar": "squashfs-tools-ng",
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "pigz": "pigz",
    "igzip": "isal",
    "zstd": "zstd",
    "xz": "xz-utils",
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "sacct": "slurm-client",
    "scontrol": "slurm-client",
    "newuidmap": "uidmap",
}

STDERR_TAIL_BYTES = 4000

#: Extra directories searched after PATH: sbin is not on a normal user's PATH on Debian,
#: yet runc lives in /usr/sbin there.
EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@functools.lru_cache(maxsize=None)
def find_program(name: str) -> str:
    """Return the absolute path of ``name`` or raise ProgramNotFound with an install hint."""
    if os.path.isabs(name):
        if os.access(name, os.X_OK):
            return name
        raise ProgramNotFound(f"program {name} is not executable")
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(EXTRA_PATH)
    found = shutil.which(name, path=path)
    if found is None:
        package = PACKAGES.get(name, name)
        raise ProgramNotFound(
            f"required program '{name}' is not installed",
            hint=f"ask your site administrator to install the Debian package '{package}' "
            "(scripts/install-system-packages.sh installs everything berth needs)",
        )
    return found


def has_program(name: str) -> bool:
    try:
        find_program(name)
    except ProgramNotFound:
        return False
    return True


def child_env(extra: Mapping[str, str] | None = None, *, inherit: bool = True) -> dict[str, str]:
    """A fresh environment dict for a child: a copy of ours (or empty) plus ``extra``."""
    env = dict(os.environ) if inherit else {"PATH": os.environ.get("PATH", os.defpath)}
    if extra:
        env.update(extra)
    return env


def _tail(data: bytes | str | None) -> str:
    if not data:
        return ""
    if isinstance(data, bytes):
        data = data[-STDERR_TAIL_BYTES:].decode("utf-8", "replace")
    return data[-STDERR_TAIL_BYTES:].strip()


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    stdin: int | IO | None = None,
    stdout: int | IO | None = subprocess.PIPE,
    stderr: int | IO | None = subprocess.PIPE,
    cwd: str | None = None,
    timeout: float | None = None,
    check: bool = True,
    what: str | None = None,
) -> subprocess.CompletedProcess:
    """Run a program to completion.

    ``argv[0]`` is resolved with :func:`find_program`. With ``check`` a non-zero exit raises
    ProgramFailed naming ``what`` (default: the program) and the tail of its stderr.
    A timeout kills the child and raises ProgramFailed.
    """
    argv = [find_program(argv[0]), *argv[1:]]
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    try:
        result = subprocess.run(
            argv,
            input=input,
            stdin=stdin if input is None else None,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # Like a failure below: the stderr tail belongs to the message (a hint says who acts).
        tail = _tail(exc.stderr)
        raise ProgramFailed(
            f"{what or os.path.basename(argv[0])} did not finish within {timeout:g} s"
            + (f": {tail}" if tail else ""),
        ) from None
    if check and result.returncode != 0:
        tail = _tail(result.stderr)
        status = describe_status(result.returncode)
        raise ProgramFailed(
            f"{what or os.path.basename(argv[0])} failed ({status})" + (f": {tail}" if tail else ""),
        )
    return result


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: int | IO | None = subprocess.DEVNULL,
    stdout: int | IO | None = None,
    stderr: int | IO | None = None,
    cwd: str | None = None,
    pass_fds: Sequence[int] = (),
    new_session: bool = False,
) -> subprocess.Popen:
    """Start a program and return its Popen; the caller waits for it and forwards
    :data:`FORWARDED_SIGNALS` to it when it outlives a signal to berth (``berth run`` does)."""
    argv = [find_program(argv[0]), *argv[1:]]
    return subprocess.Popen(
        argv,
        env=dict(env) if env is not None else None,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        start_new_session=new_session,
    )


#: Signals a waiting berth passes on to its child instead of dying of them.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGWINCH,
)


def describe_status(returncode: int) -> str:
    """'exit status 3' or 'killed by signal SIGKILL' for a subprocess return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit status {returncode}"


def shell_status(returncode: int) -> int:
    """Map a subprocess return code to a shell-style exit status (128+N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode
