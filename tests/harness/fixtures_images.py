"""pytest fixtures: images (see docs/contracts.md "tests/harness").

Each fixture is session-scoped, pushes to the session ``registry`` and returns a
:class:`tests.harness.images.PushedImage`: a ``str`` holding the reference
(``127.0.0.1:PORT/test/busybox:1``) with ``.digest``, ``.layout`` (OCI layout, tag ``latest``),
``.spec``, ``.expected_tree()`` and ``.by_digest``.
"""

from __future__ import annotations

import pytest

from tests.harness import images


@pytest.fixture(scope="session")
def busybox_image(registry) -> images.PushedImage:
    """busybox-static, OCI manifest, two layers."""
    return images.push_pushed_image(registry, "test/busybox", "1", images.busybox_spec(), "oci")


@pytest.fixture(scope="session")
def busybox_v2s2_image(registry) -> images.PushedImage:
    """The same busybox image, with a Docker schema 2 manifest."""
    return images.push_pushed_image(registry, "test/busybox-v2s2", "1", images.busybox_spec(), "v2s2")


@pytest.fixture(scope="session")
def whiteout_image(registry) -> images.PushedImage:
    """busybox + layers with whiteouts, opaque dirs, type changes, links, modes, owners, xattr, FIFO."""
    return images.push_pushed_image(registry, "test/whiteout", "1", images.whiteout_spec(), "oci")


@pytest.fixture(scope="session")
def hardlink_image(registry) -> images.PushedImage:
    """busybox + a layer of hard links (also across directories and to a setuid file)."""
    return images.push_pushed_image(registry, "test/hardlink", "1", images.hardlink_spec(), "oci")


@pytest.fixture(scope="session")
def index_image(registry) -> images.PushedImage:
    """OCI image index: linux/amd64 busybox (/etc/berth-marker "amd64") and linux/arm64/v8
    (/etc/berth-marker "arm64", no binaries). ``.specs`` holds both specs in that order."""
    return images.push_pushed_index(registry, "test/multi", "1", images.index_specs(), "oci")


@pytest.fixture(scope="session")
def docker_index_image(registry) -> images.PushedImage:
    """The same two platforms as a Docker manifest list of schema 2 manifests."""
    return images.push_pushed_index(registry, "test/multi-docker", "1", images.index_specs(), "v2s2")


@pytest.fixture(scope="session")
def debian_image(registry) -> images.PushedImage:
    """Debian bookworm minbase + python3-minimal (debootstrap; minutes the first time, then
    cached under /var/cache/berth-test-images). Use in tests marked ``slow``."""
    try:
        spec = images.debian_spec()
    except PermissionError as error:
        pytest.skip(str(error))
    return images.push_pushed_image(registry, "test/debian", "bookworm", spec, "oci")
