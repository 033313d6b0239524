"""The BerthError hierarchy: every failure berth reports to a person.

Library code raises these and never prints or exits; the CLI catches them once, prints
``error: MESSAGE`` and ``hint: HINT`` and exits with ``exit_code``. Messages are lower-case,
say what failed and name the option, key, file or image involved; hints say who must act.

Every class has its own exit code (tests/unit/test_errors.py enumerates them), so a script can
tell a missing manifest (30) from a missing template (3) or a refused login (40) from an
unreachable registry (42). A subclass's code starts with its family's digit where one fits:

    1 other              2 usage            20 image reference
    3 not found         30 manifest unknown 31 platform not found
    4 registry          40 authentication   41 rate limited       42 unreachable
    5 digest mismatch    6 store             7 image content       8 program failed
    9 job               10 data staging
   73 permission denied on a file (EX_CANTCREAT)
   74 host (an OSError library code did not expect; EX_IOERR)
   77 site policy (EX_NOPERM)  78 configuration (EX_CONFIG)
  125 container runtime       127 program not found

``berth run`` and ``berth exec`` exit 125 for every berth error instead (docker's convention:
their own exit status is the container's).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable


class BerthError(Exception):
    """Base of every error berth reports. ``hint`` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(BerthError):
    """Bad command-line input (option values, argument syntax)."""

    exit_code = 2


class ConfigError(BerthError):
    """Invalid site or user configuration, templates or policy (sysexits EX_CONFIG)."""

    exit_code = 78


class PolicyError(BerthError):
    """A request the site policy forbids (a mount, a device, a registry)."""

    exit_code = 77


class PermissionDenied(BerthError):
    """The caller lacks a permission on a file (writing the site store, templates...)."""

    exit_code = 73


class ReferenceError_(BerthError):
    """An image reference that does not parse."""

    exit_code = 20


class NotFound(BerthError):
    """An image, template, job, container or blob that does not exist."""

    exit_code = 3


class RegistryError(BerthError):
    """The registry answered something unexpected or could not be reached."""

    exit_code = 4


class AuthenticationError(RegistryError):
    """The registry refused the credentials (HTTP 401/403)."""

    exit_code = 40


class RateLimited(RegistryError):
    """The registry asked us to slow down (HTTP 429) and retries ran out."""

    exit_code = 41


class RegistryUnreachable(RegistryError):
    """No connection to the registry (DNS, refused, timeout, TLS)."""

    exit_code = 42


class ManifestUnknown(NotFound):
    """The registry does not have this tag or digest."""

    exit_code = 30


class PlatformNotFound(NotFound):
    """An image index holds no manifest for the requested platform."""

    exit_code = 31


class DigestMismatch(BerthError):
    """Content did not match the digest or size it was announced with."""

    exit_code = 5


class StoreError(BerthError):
    """The image store is unusable (disk full, permissions, corruption)."""

    exit_code = 6


class ImageError(BerthError):
    """An image's content cannot be flattened or converted (hostile or broken layers)."""

    exit_code = 7


class ProgramNotFound(BerthError):
    """A required external program is not installed."""

    exit_code = 127


class ProgramFailed(BerthError):
    """An external program exited non-zero; the message keeps its stderr tail."""

    exit_code = 8


class RuntimeFailure(BerthError):
    """The container could not be set up or started."""

    exit_code = 125


class InsufficientSpace(RuntimeFailure):
    """A node-local file system lacks the room for what berth would write there (an unpacked
    image copy): nothing was written; the message says how much is needed and free. ``berth
    run`` falls back to the FUSE mount, so this reaches the command line only from callers
    that cannot."""

    exit_code = 11


class JobError(BerthError):
    """A batch job could not be submitted, queried or cancelled."""

    exit_code = 9


class HostError(BerthError):
    """An operating-system call failed where library code did not expect it (a read-only or
    full filesystem, a permission, a vanished file). The CLI turns such an ``OSError`` into this
    error with :func:`from_os_error` instead of showing a traceback."""

    exit_code = 74


def from_os_error(error: OSError) -> HostError:
    """A HostError saying which call failed on which file, with a hint for the common causes."""
    reason = error.strerror or str(error) or type(error).__name__
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    where = f": {' -> '.join(names)}" if names else ""
    hint = _OS_ERROR_HINTS.get(error.errno or 0,
                               "this is unexpected: run the command again with --debug and report the traceback")
    return HostError(f"{reason.lower()}{where}", hint=hint)


_OS_ERROR_HINTS = {
    errno.ENOSPC: "free space where berth writes (berth prune removes unused images; berth config "
                  "show lists the paths berth uses), or point those paths elsewhere",
    errno.EDQUOT: "your disk quota is exhausted: free space (berth prune removes unused images) or "
                  "ask your site administrator for more",
    errno.EROFS: "the filesystem is mounted read-only: point berth at a writable location "
                 "(berth config show lists the paths berth uses)",
    errno.EACCES: "you lack permission on that path: check its owner and mode, or ask its owner",
    errno.EPERM: "the operation is not permitted on that path: check its owner and mode, or ask "
                 "your site administrator",
    errno.ENOENT: "the file or directory vanished or was never there: check the path",
}


class StagingError(BerthError):
    """Data staging (S3, https, host files) failed: the message names the object, option or key."""

    exit_code = 10


def did_you_mean(typed: str, known: Iterable[str]) -> str | None:
    """``"did you mean 'X'?"`` for the entry of ``known`` closest to ``typed``, else None.

    The one "did you mean" of berth (configuration keys, template keys, submit options), for
    hints. Leading dashes are ignored when comparing (``--nodez`` is close to ``--nodes``).
    """
    import difflib  # only on error paths: berth's start-up time matters

    by_bare = {}
    for name in known:
        by_bare.setdefault(str(name).lstrip("-"), str(name))
    close = difflib.get_close_matches(typed.lstrip("-"), list(by_bare), n=1, cutoff=0.6)
    return f"did you mean '{by_bare[close[0]]}'?" if close else None


class LockError(BerthError):
    """A lock was not obtained: its holder kept it past the bounded wait (the message names the
    lock file and, when visible, the holding process), or the file system cannot lock."""

    exit_code = 75
