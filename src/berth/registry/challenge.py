"""Parsing ``WWW-Authenticate`` challenges (RFC 7235 section 4.1, RFC 6750 section 3).

Registries answer an unauthenticated request with ``401`` and a challenge such as::

    Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"
    Basic realm="Registry Realm"

Pure code: no I/O. Quoted strings may contain commas and escaped quotes, and one header may
hold several challenges; both happen in the wild (the distribution spec's token auth,
docker/distribution registry/auth/token).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from berth.record import Record, field

# token68 or auth-param list; the scheme is a token followed by whitespace or end of string.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(
    r"\s*(" + _TOKEN + r")\s*=\s*(\"(?:[^\"\\]|\\.)*\"|" + _TOKEN + r")\s*(?:,|$)"
)
_SCHEME = re.compile(r"\s*(" + _TOKEN + r")(?:\s+|$)")


class Challenge(Record):
    """One authentication challenge: ``scheme`` in lower case and its parameters.

    Parameter names are lower-cased (they are case-insensitive); values keep their case.
    """

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scopes(self) -> tuple[str, ...]:
        """The ``scope`` parameter split on spaces (RFC 6749 section 3.3 allows several)."""
        return tuple(self.params.get("scope", "").split())


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """All challenges found in the given ``WWW-Authenticate`` header values, in order.

    Malformed parts are skipped rather than raised: the caller decides what a missing
    challenge means (usually an AuthenticationError naming the registry).
    """
    found: list[Challenge] = []
    for header in headers:
        text = header.strip()
        while text:
            match = _SCHEME.match(text)
            if not match:
                break
            scheme = match.group(1).lower()
            rest = text[match.end():]
            params: dict[str, str] = {}
            while True:
                param = _PARAM.match(rest)
                if not param:
                    break
                # A token followed by whitespace and no '=' begins the next challenge.
                params[param.group(1).lower()] = _unquote(param.group(2))
                rest = rest[param.end():]
            found.append(Challenge(scheme, params))
            text = rest.lstrip(", \t")
            if text == rest and not params:
                # Neither params nor a separator consumed anything: skip a token68 blob.
                text = text.split(",", 1)[1] if "," in text else ""
    return found


def pick_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """The challenge berth answers: Bearer (with a realm) before Basic; None if neither."""
    challenges = list(challenges)
    for challenge in challenges:
        if challenge.scheme == "bearer" and challenge.realm:
            return challenge
    for challenge in challenges:
        if challenge.scheme == "basic":
            return challenge
    return None
