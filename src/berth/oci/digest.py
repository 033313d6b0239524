"""Content digests (OCI image spec, descriptor.md#digests)."""

from __future__ import annotations

import re

from berth.record import Record

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")


class InvalidDigest(ValueError):
    pass


def new_hasher(algorithm: str = "sha256"):
    """A hashlib object for ``algorithm``, to hash content whose digest is not known yet."""
    import hashlib  # lazily: only hashing needs it, not parsing (berth run's start-up)

    return hashlib.new(algorithm)


class Digest(Record, order=True):
    """An ``algorithm:hex`` digest. Only sha256 and sha512 are accepted."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> "Digest":
        algorithm, sep, value = text.partition(":")
        if not sep or algorithm not in _ALGORITHMS:
            raise InvalidDigest(f"'{text}' is not a digest (expected sha256:<64 hex digits>)")
        if len(value) != _ALGORITHMS[algorithm] or not _HEX.fullmatch(value):
            raise InvalidDigest(
                f"'{text}' is not a valid {algorithm} digest "
                f"(expected {_ALGORITHMS[algorithm]} lower-case hex digits)"
            )
        return cls(algorithm, value)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> "Digest":
        import hashlib  # lazily: only hashing needs it, not parsing (berth run's start-up)

        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self):
        """A fresh hashlib object of this digest's algorithm (to verify content against it)."""
        return new_hasher(self.algorithm)

    @property
    def short(self) -> str:
        return self.hex[:12]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
