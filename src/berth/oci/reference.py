"""Image references, normalized the way docker does.

``busybox`` → ``docker.io/library/busybox:latest``; ``user/img`` → ``docker.io/user/img:latest``;
a first component with a '.' or ':' or equal to ``localhost`` is a registry host
(``127.0.0.1:5000/x``). ``name@sha256:…`` pins a digest; ``name:tag@sha256:…`` keeps both
and the digest wins. Grammar: distribution/reference (reference.go).
"""

from __future__ import annotations

import re

from berth.oci.digest import Digest, InvalidDigest
from berth.oci.names import is_registry_host
from berth.record import Record, replace

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
MAX_NAME_LENGTH = 255


def is_repository(path: str) -> bool:
    """True for a repository path: components of lower-case letters and digits separated by
    '.', '_', '__' or '-', joined by '/', at most 255 characters (no '..', no empty part)."""
    return (isinstance(path, str) and len(path) <= MAX_NAME_LENGTH
            and all(re.fullmatch(_COMPONENT, component) for component in path.split("/")))


def is_tag(tag: str) -> bool:
    """True for a tag: letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-'."""
    return isinstance(tag, str) and re.fullmatch(_TAG, tag) is not None


class InvalidReference(ValueError):
    pass


class Reference(Record):
    """A normalized image reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        """Parse and normalize ``text``; raise InvalidReference saying which part is wrong."""
        original = text
        if not text or text != text.strip() or any(c.isspace() for c in text):
            raise InvalidReference(f"invalid image reference '{original}': empty or contains spaces")
        digest = None
        if "@" in text:
            text, _, digest_text = text.partition("@")
            try:
                digest = Digest.parse(digest_text)
            except InvalidDigest as exc:
                raise InvalidReference(f"invalid image reference '{original}': {exc}") from None
        tag = None
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > slash:
            text, tag = text[:colon], text[colon + 1 :]
            if not is_tag(tag):
                raise InvalidReference(
                    f"invalid image reference '{original}': bad tag '{tag}' "
                    "(letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')"
                )
        first, sep, rest = text.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, path = first, rest
            if not is_registry_host(registry):
                raise InvalidReference(f"invalid image reference '{original}': bad registry host '{registry}'")
        else:
            registry, path = DOCKER_HUB, text
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = DOCKER_HUB
        if not path:
            raise InvalidReference(f"invalid image reference '{original}': no repository name")
        components = path.split("/")
        for component in components:
            if not re.fullmatch(_COMPONENT, component):
                raise InvalidReference(
                    f"invalid image reference '{original}': bad repository component '{component}' "
                    "(lower-case letters and digits, separated by '.', '_', '__' or '-')"
                )
        if registry == DOCKER_HUB and len(components) == 1:
            path = f"library/{path}"
        if len(registry) + 1 + len(path) > MAX_NAME_LENGTH:
            raise InvalidReference(f"invalid image reference '{original}': name longer than {MAX_NAME_LENGTH}")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, path, tag, digest)

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host to talk to: Docker Hub's API lives on another name than its references."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def version(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if pinned, else the tag."""
        return str(self.digest) if self.digest else (self.tag or DEFAULT_TAG)

    def with_digest(self, digest: Digest) -> "Reference":
        return replace(self, digest=digest)

    def familiar(self) -> str:
        """The short form docker shows (``busybox:latest`` for Docker Hub official images)."""
        name = self.name
        if self.registry == DOCKER_HUB:
            name = self.repository.removeprefix("library/")
        return name + self._suffix()

    def _suffix(self) -> str:
        text = f":{self.tag}" if self.tag else ""
        if self.digest:
            text += f"@{self.digest}"
        return text

    def __str__(self) -> str:
        return self.name + self._suffix()
