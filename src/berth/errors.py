"""The BerthError hierarchy: every failure berth reports to a person.

Library code raises these and never prints or exits; the CLI catches them once, prints
``error: MESSAGE`` and ``hint: HINT`` and exits with ``exit_code``. Messages are lower-case,
say what failed and name the option, key, file or image involved; hints say who must act.
"""

from __future__ import annotations


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
    """The caller lacks a permission (writing the site store, templates...)."""

    exit_code = 77


class ReferenceError_(BerthError):
    """An image reference that does not parse."""

    exit_code = 2


class NotFound(BerthError):
    """An image, template, job, container or blob that does not exist."""

    exit_code = 3


class RegistryError(BerthError):
    """The registry answered something unexpected or could not be reached."""

    exit_code = 4


class AuthenticationError(RegistryError):
    """The registry refused the credentials (HTTP 401/403)."""


class RateLimited(RegistryError):
    """The registry asked us to slow down (HTTP 429) and retries ran out."""


class RegistryUnreachable(RegistryError):
    """No connection to the registry (DNS, refused, timeout, TLS)."""


class ManifestUnknown(NotFound):
    """The registry does not have this tag or digest."""


class PlatformNotFound(NotFound):
    """An image index holds no manifest for the requested platform."""


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


class JobError(BerthError):
    """A batch job could not be submitted, queried or cancelled."""

    exit_code = 9
