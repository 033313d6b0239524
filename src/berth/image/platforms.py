"""Platforms (``OS/ARCH[/VARIANT]``) as the OCI image index names them."""

from __future__ import annotations

import os

from berth.errors import UsageError
from berth.record import Record

#: uname -m -> (OCI architecture, variant) (image-index spec, platform.architecture: GOARCH).
_MACHINE_ARCH = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", None), "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}


class Platform(Record):
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def parse_platform(text: str) -> Platform:
    """``OS/ARCH[/VARIANT]`` (e.g. ``linux/arm64/v8``); raises UsageError naming --platform."""
    parts = text.strip().split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise UsageError(f"--platform '{text}' is not OS/ARCH[/VARIANT]",
                         hint="for example --platform linux/amd64 or --platform linux/arm/v7")
    return Platform(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else None)


def default_platform() -> Platform:
    """This machine's platform in OCI terms (``uname -m`` mapped to GOARCH names). os.uname,
    not the platform module: importing that cost every pull ~1.5 ms (issue 10, target 4)."""
    machine = os.uname().machine.lower()
    architecture, variant = _MACHINE_ARCH.get(machine, (machine, None))
    return Platform("linux", architecture, variant)
