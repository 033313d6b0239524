"""Names that several layers validate: registry hosts, container host names, variable names.

One function per meaning (issue 9: three host regexes with three port rules had grown in
oci.reference, registry.auth, config.load and runtime.options). A registry host and a
container's host name are different meanings with different rules, so they are two functions:

- :func:`is_registry_host`: what may precede the first ``/`` of an image reference, as the
  distribution reference grammar defines a *domain*: DNS labels (letters, digits, inner ``-``)
  joined by ``.``, or an IPv4 address, or a bracketed IPv6 address, with an optional
  ``:PORT`` (1-65535). Any case (hosts are case-insensitive; callers that key on a host lower-case it).
- :func:`is_container_hostname`: a host name for inside the container (``--hostname``, the OCI
  runtime spec's ``hostname``): RFC 1123 labels of 1-63 letters, digits and inner ``-``, joined
  by ``.``, at most 63 characters in all (the kernel's limit is 64 bytes). No port, no brackets.
- :func:`is_env_name`: a POSIX environment variable name (letters, digits, ``_``; not starting
  with a digit), as ``-e``, ``--env-file`` and ``[[policy.env]]`` take it.

Every check is a full match (issue 12: ``re.match`` with ``$`` accepted a final newline).
Patterns are strings compiled on first use by ``re``'s cache: nothing runs at import.
"""

from __future__ import annotations

import re

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_IPV6 = r"\[[0-9A-Fa-f:.]+\]"
_PORT = r"[0-9]{1,5}"
_REGISTRY_HOST = rf"(?:{_DOMAIN}|{_IPV6})(?::({_PORT}))?"
_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"

#: Longest registry host accepted (a DNS name is at most 253 characters, plus ":65535").
REGISTRY_HOST_MAX = 259
#: Longest container host name (sethostname(2) takes at most 64 bytes; 63 leaves room for NUL).
CONTAINER_HOSTNAME_MAX = 63


def is_registry_host(text: str) -> bool:
    """True for ``name``, ``name:port``, an IPv4 address or ``[IPv6]``, with an optional port."""
    if not isinstance(text, str) or len(text) > REGISTRY_HOST_MAX:
        return False
    match = re.fullmatch(_REGISTRY_HOST, text)
    if not match:
        return False
    port = match.group(1)
    return port is None or 1 <= int(port) <= 65535


def is_container_hostname(text: str) -> bool:
    """True for an RFC 1123 host name of at most 63 characters (no port)."""
    return (isinstance(text, str) and len(text) <= CONTAINER_HOSTNAME_MAX
            and re.fullmatch(_DOMAIN, text) is not None)


def is_env_name(text: str) -> bool:
    """True for a POSIX environment variable name."""
    return isinstance(text, str) and re.fullmatch(_ENV_NAME, text) is not None
