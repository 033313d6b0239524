"""Making a container plan true on disk: the state directory's contents, the FUSE mounts, the
identity files and the OCI bundle (issue 9's second stage; the plan is
:mod:`berth.runtime.plan`, the run :mod:`berth.runtime.supervise`).

Every function here acts on a locked container state directory (berth.runtime.state) and
returns what the teardown must undo; nothing here decides anything the plan did not.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from berth.errors import InsufficientSpace, RuntimeFailure
from berth.runtime import fuse
from berth.runtime.state import ContainerState

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: a cached plan's execution imports no planning (issue 10)
    from berth.runtime.plan import ContainerPlan

Log = Callable[..., None]


def make_directories(container: ContainerState) -> None:
    """The mount points and files berth creates in the container's state directory (0700;
    the private /tmp 1777 as a /tmp must be)."""
    for directory in (container.lower, container.rootfs, container.tmp, container.etc, container.bundle):
        directory.mkdir(mode=0o700)
    container.tmp.chmod(0o1777)


def mount_image(settings, container: ContainerState, image, log: Log):
    """Mount the image's SquashFS read-only (from the node-local copy when the site sets
    ``stage_to_local``) and return what the teardown undoes: with ``image_mount = "shared"``
    (the default) an berth.runtime.imagemount.ImageMount held by this container, whose ``root``
    is the image root; with ``"per_container"`` a berth.runtime.fuse.FuseMount at the
    container's ``lower`` directory; with ``"unpacked"`` a berth.runtime.localcopy.UnpackedImage
    (the node-local unpacked tree, bound read-only by the runtime), or the shared mount with a
    warning when the state directory lacks the room for it."""
    squashfs = Path(image.squashfs)
    digest = getattr(image, "digest", None)
    if settings.image_mount == "unpacked":
        from berth.runtime.localcopy import unpacked_copy

        try:
            return unpacked_copy(container.state_dir, squashfs, digest, lock_timeout_s=settings.lock_timeout_s,
                                 log=log)
        except InsufficientSpace as exc:
            # The job still runs, on the FUSE path: slower, never wrong.
            log(f"warning: {exc.message}; mounting the SquashFS instead (hint: {exc.hint})")
    if settings.stage_to_local:
        from berth.runtime.localcopy import local_copy

        squashfs = local_copy(container.state_dir, squashfs, digest, lock_timeout_s=settings.lock_timeout_s)
        log(f"mounting the node-local copy {squashfs} (site setting stage_to_local)", debug=True)
    program, options = fuse.squashfs_program(settings.image_fuse)
    if settings.image_mount == "per_container":
        return fuse.mount_squashfs(str(squashfs), str(container.lower), str(container.path / "squashfuse.log"),
                                   program=program, options=options)
    from berth.runtime import imagemount

    try:
        key = imagemount.image_key(Path(image.squashfs), digest, imagemount.mount_scope(os.environ))
    except OSError as exc:
        raise RuntimeFailure(f"cannot read the image file {image.squashfs}: {exc.strerror}",
                             hint="check its permissions (site store images must be world-readable)") from None
    return imagemount.acquire(container.state_dir, key, squashfs, container.id, program=program, options=options,
                              lock_timeout_s=settings.lock_timeout_s, linger_s=settings.image_mount_linger, log=log)


def image_root(container: ContainerState, mount) -> str:
    """The directory the plan reads the image at (the overlay's lower directory)."""
    return str(getattr(mount, "root", container.lower))


def kernel_overlay(mount) -> bool:
    """Whether the overlay a plan may need on top of ``mount`` (what :func:`mount_image`
    returned) can be the kernel's, mounted by the runtime in the container's user namespace:
    for an unpacked copy (files of the caller's, so copy-up works) on Linux >= 5.11 (the first
    to allow overlayfs in a user namespace)."""
    # An UnpackedImage comes only from berth.runtime.localcopy, imported by mount_image when it
    # made one: without it loaded, ``mount`` is none (and a run does not import it for this).
    localcopy = sys.modules.get("berth.runtime.localcopy")
    if localcopy is None or not isinstance(mount, localcopy.UnpackedImage):
        return False
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 11)


def mount_overlay(plan: ContainerPlan, container: ContainerState) -> fuse.FuseMount | None:
    """The overlay over the image at the container's ``rootfs``, with the plan's missing
    mount points created first in its upper directory: fuse-overlayfs, or None when the plan's
    is the kernel's (the runtime mounts it, and it goes with the container's namespaces)."""
    from berth.runtime import rootfs  # only runs that need an overlay (issue 10: start-up time)

    container.upper.mkdir(mode=0o755)
    container.work.mkdir(mode=0o700)
    rootfs.create_mount_points(str(container.upper), list(plan.mount_points))
    if plan.kernel_overlay:
        return None
    return fuse.mount_overlay(plan.image_root, str(container.upper), str(container.work),
                              str(container.rootfs), str(container.path / "overlay.log"),
                              squash_to=plan.squash_to)


def write_bundle(plan: ContainerPlan, container: ContainerState, config: dict | None = None) -> None:
    """The identity files (0644 in a 0755 directory: the container's user reads them through
    the bind) and the bundle's config.json (``config``: ``plan.config()`` when already built)."""
    for identity_file in plan.identity_files:
        (container.etc / identity_file.name).write_text(identity_file.text)
    os.chmod(container.etc, 0o755)
    for identity_file in plan.identity_files:
        os.chmod(container.etc / identity_file.name, 0o644)
    (container.bundle / "config.json").write_text(json.dumps(plan.config() if config is None else config))
