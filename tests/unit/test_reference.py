import pytest

from berth.oci.digest import Digest, InvalidDigest
from berth.oci.reference import InvalidReference, Reference

HEX = "a" * 64


@pytest.mark.parametrize(
    "text, registry, repository, tag, digest",
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("user/img", "docker.io", "user/img", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
        ("127.0.0.1:5000/test/tiny:v1", "127.0.0.1:5000", "test/tiny", "v1", None),
        ("localhost/x", "localhost", "x", "latest", None),
        ("localhost:5000/x", "localhost:5000", "x", "latest", None),
        ("quay.io/a/b/c", "quay.io", "a/b/c", "latest", None),
        (f"busybox@sha256:{HEX}", "docker.io", "library/busybox", None, f"sha256:{HEX}"),
        (f"r.io/x:t@sha256:{HEX}", "r.io", "x", "t", f"sha256:{HEX}"),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
    ],
)
def test_parse_normalizes_like_docker(text, registry, repository, tag, digest):
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert (str(ref.digest) if ref.digest else None) == digest


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("Busybox", "bad repository component 'Busybox'"),
        ("busybox:", "bad tag ''"),
        ("busybox:-x", "bad tag '-x'"),
        ("busy box", "spaces"),
        ("busybox@sha256:abc", "not a valid sha256 digest"),
        ("busybox@md5:" + "a" * 32, "not a digest"),
        ("host:5000/", "no repository name"),
        ("a//b", "bad repository component ''"),
        ("x/" + "a" * 300, "longer than"),
    ],
)
def test_parse_rejects_with_reason(text, fragment):
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    assert fragment in str(info.value)


def test_round_trip_and_familiar_forms():
    ref = Reference.parse("busybox")
    assert str(ref) == "docker.io/library/busybox:latest"
    assert ref.familiar() == "busybox:latest"
    assert ref.api_host == "registry-1.docker.io"
    assert Reference.parse(str(ref)) == ref
    local = Reference.parse("127.0.0.1:5000/a/b:c")
    assert local.api_host == "127.0.0.1:5000"
    assert local.familiar() == "127.0.0.1:5000/a/b:c"
    pinned = local.with_digest(Digest.of(b"x"))
    assert pinned.version == str(Digest.of(b"x"))
    assert local.version == "c"


def test_digest_parse_and_of():
    d = Digest.of(b"hello")
    assert str(d) == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert Digest.parse(str(d)) == d
    with pytest.raises(InvalidDigest):
        Digest.parse("sha256:" + "A" * 64)
