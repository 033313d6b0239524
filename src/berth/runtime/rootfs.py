"""Looking inside a mounted image root without ever leaving it.

The image is hostile input: a symlink ``/data -> /etc`` in it must be followed *inside* the
root, never on the host (the same rule as runc's securejoin). These helpers decide which mount
points a container needs that the read-only image lacks, so berth can add an overlay.
"""

from __future__ import annotations

import os
import posixpath
import stat

from berth.namedtuple import NamedTuple

MAX_SYMLINKS = 40


def normalize_container_path(path: str) -> str:
    """``//a/./b/`` -> ``/a/b``; relative paths are taken from ``/``; ``..`` cannot climb above /."""
    return posixpath.normpath(posixpath.join("/", path)).replace("//", "/")


def resolve_in_root(root: str, path: str) -> tuple[str, bool]:
    """Resolve container ``path`` under host directory ``root`` as the container would see it.

    Returns (container path with symlinks resolved, exists). Symlinks (absolute or relative)
    are interpreted relative to ``root``; ``..`` stops at the root. Never raises for missing
    components: ``exists`` is False and the rest of the path is appended unresolved.
    """
    parts = [p for p in normalize_container_path(path).split("/") if p]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        if part == ".":
            continue
        host = os.path.join(root, *resolved, part)
        try:
            info = os.lstat(host)
        except OSError:
            return "/" + "/".join([*resolved, part, *parts]), False
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                return "/" + "/".join([*resolved, part, *parts]), False
            target = os.readlink(host)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return "/" + "/".join(resolved), True


def path_kind(root: str, path: str) -> str | None:
    """'dir', 'file' (anything not a directory) or None (missing), following links in-root."""
    resolved, exists = resolve_in_root(root, path)
    if not exists:
        return None
    try:
        info = os.stat(os.path.join(root, resolved.lstrip("/")) or root)
    except OSError:
        return None
    return "dir" if stat.S_ISDIR(info.st_mode) else "file"


class MountPoint(NamedTuple):
    """A container path a mount needs, and whether it must be a directory or a file."""

    path: str
    is_dir: bool


def missing_mount_points(root: str, needed: list[MountPoint], creatable_under: list[str]) -> list[MountPoint]:
    """The mount points that do not exist in the image and that runc could not create.

    ``creatable_under`` lists container directories that will be writable when runc creates
    mount points (the tmpfs and writable mounts berth puts there earlier in the mount list).
    Paths are resolved in-root first, so a symlink in the image is judged by its target.
    """
    missing: list[MountPoint] = []
    for point in needed:
        resolved, exists = resolve_in_root(root, point.path)
        if exists:
            kind = path_kind(root, resolved)
            if kind == ("dir" if point.is_dir else "file") or (kind == "file" and not point.is_dir):
                continue
            # Wrong type (a file where a directory must be): runc would fail; an overlay can't fix
            # it either without hiding image content, so let runc report it.
            continue
        if any(resolved == base or resolved.startswith(base.rstrip("/") + "/") for base in creatable_under
               if resolved != base):
            continue
        missing.append(MountPoint(resolved, point.is_dir))
    return missing


def create_mount_points(upper: str, points: list[MountPoint]) -> None:
    """Create ``points`` (container paths) as empty dirs/files under overlay ``upper``."""
    for point in points:
        host = os.path.join(upper, point.path.lstrip("/"))
        if point.is_dir:
            os.makedirs(host, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(host), mode=0o755, exist_ok=True)
            if not os.path.lexists(host):
                with open(host, "x"):
                    pass
