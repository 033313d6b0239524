"""The test harness itself: real registries (anonymous, basic, token) and the test images."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message

import pytest

from tests.harness import images, ocilayout
from tests.harness.registry import SERVICE_NAME, basic_auth_header, bearer_token

pytestmark = pytest.mark.integration

ALL_ACCEPT = ", ".join(ocilayout.ALL_MANIFEST_TYPES)


def http(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def skopeo_inspect_raw(reference: str, creds: str | None = None) -> dict:
    argv = ["skopeo", "inspect", "--raw", "--tls-verify=false"]
    if creds:
        argv += ["--creds", creds]
    result = subprocess.run([*argv, f"docker://{reference}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- registries


def test_anonymous_registry_answers_v2(registry):
    status, headers, _ = http(registry.url + "/v2/")
    assert status == 200
    assert headers.get("Docker-Distribution-Api-Version") == "registry/2.0"
    assert registry.host.startswith("127.0.0.1:")


def test_basic_auth_refuses_wrong_password_and_accepts_right_one(auth_registry):
    status, headers, _ = http(auth_registry.url + "/v2/")
    assert status == 401
    assert headers.get("WWW-Authenticate", "").startswith("Basic ")
    wrong = basic_auth_header(auth_registry.username, auth_registry.password + "x")
    assert http(auth_registry.url + "/v2/", {"Authorization": wrong})[0] == 401
    right = basic_auth_header(auth_registry.username, auth_registry.password)
    assert http(auth_registry.url + "/v2/", {"Authorization": right})[0] == 200


def test_fresh_registry_is_empty_and_separate(fresh_registry, registry, busybox_image):
    fresh = fresh_registry()
    assert fresh.host != registry.host
    status, _, body = http(fresh.url + "/v2/_catalog")
    assert status == 200
    assert json.loads(body)["repositories"] == []


# --------------------------------------------------------------------------- images


def test_busybox_manifest_and_blobs_match_the_layout(busybox_image, registry):
    body, content_type, digest = images.fetch_manifest(registry, busybox_image.name, busybox_image.tag)
    assert content_type == ocilayout.MEDIA_OCI_MANIFEST
    assert digest == busybox_image.digest == "sha256:" + hashlib.sha256(body).hexdigest()
    manifest = json.loads(body)
    assert len(manifest["layers"]) >= 2
    for layer in manifest["layers"]:
        status, _, blob = http(f"{registry.url}/v2/{busybox_image.name}/blobs/{layer['digest']}")
        assert status == 200
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
    config = json.loads(http(f"{registry.url}/v2/{busybox_image.name}/blobs/{manifest['config']['digest']}")[2])
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert any(item.startswith("PATH=") for item in config["config"]["Env"])
    assert busybox_image == f"{registry.host}/test/busybox:1"


def test_basic_auth_registry_refuses_anonymous_push(auth_registry):
    status, headers, _ = http(f"{auth_registry.url}/v2/test/anon/blobs/uploads/", method="POST")
    assert status == 401
    assert headers.get("WWW-Authenticate", "").startswith("Basic ")


# --------------------------------------------------------------------------- token flow


def token_request(token_registry, authorization: str | None, scope: str) -> tuple[int, bytes]:
    query = urllib.parse.urlencode({"service": SERVICE_NAME, "scope": scope})
    headers = {"Authorization": authorization} if authorization else {}
    status, _, body = http(f"{token_registry.token_server.realm}?{query}", headers)
    return status, body


def test_token_registry_challenges_with_its_token_server(token_registry):
    status, headers, _ = http(token_registry.url + "/v2/")
    assert status == 401
    challenge = headers.get("WWW-Authenticate", "")
    assert challenge.startswith("Bearer ")
    assert f'realm="{token_registry.token_server.realm}"' in challenge
    assert f'service="{SERVICE_NAME}"' in challenge


def test_token_server_refuses_bad_credentials(token_registry):
    scope = "repository:test/busybox:pull"
    assert token_request(token_registry, None, scope)[0] == 401
    wrong = basic_auth_header(token_registry.username, token_registry.password + "x")
    assert token_request(token_registry, wrong, scope)[0] == 401
    right = basic_auth_header(token_registry.username, token_registry.password)
    status, body = token_request(token_registry, right, scope)
    assert status == 200
    token = json.loads(body)["token"]
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == "RS256"


def test_registry_accepts_issued_token_and_enforces_its_scope(token_registry):
    name = "test/token-scope"
    images.push_image(token_registry, name, "1", images.busybox_spec())
    pull = bearer_token(token_registry, f"repository:{name}:pull")
    accept = {"Accept": ALL_ACCEPT}
    assert http(f"{token_registry.url}/v2/{name}/manifests/1", {**accept, "Authorization": "Bearer " + pull})[0] == 200
    # a pull-only token must not allow an upload, and a token for another repository no pull
    assert http(f"{token_registry.url}/v2/{name}/blobs/uploads/",
                {"Authorization": "Bearer " + pull}, method="POST")[0] == 401
    other = bearer_token(token_registry, "repository:test/other:pull")
    assert http(f"{token_registry.url}/v2/{name}/manifests/1",
                {**accept, "Authorization": "Bearer " + other})[0] == 401


def test_registry_rejects_expired_and_foreign_tokens(token_registry, tmp_path):
    from tests.harness.registry import TokenServer

    name = "test/token-scope"
    access = [{"type": "repository", "name": name, "actions": ["pull"]}]
    url = f"{token_registry.url}/v2/{name}/tags/list"
    valid = token_registry.token_server.make_token("tokenuser", access)
    assert http(url, {"Authorization": "Bearer " + valid})[0] in (200, 404)  # 404: repo not pushed yet
    expired = token_registry.token_server.make_token("tokenuser", access, lifetime_s=-60)
    assert http(url, {"Authorization": "Bearer " + expired})[0] == 401
    stranger = TokenServer(tmp_path, "x", "y")  # same claims, signed by a key the registry does not trust
    try:
        assert http(url, {"Authorization": "Bearer " + stranger.make_token("tokenuser", access)})[0] == 401
    finally:
        stranger.stop()


def test_skopeo_pulls_through_the_token_flow(token_registry):
    images.push_image(token_registry, "test/skopeo-token", "1", images.busybox_spec())
    manifest = skopeo_inspect_raw(f"{token_registry.host}/test/skopeo-token:1",
                                  f"{token_registry.username}:{token_registry.password}")
    assert manifest["mediaType"] == ocilayout.MEDIA_OCI_MANIFEST
    granted = [access for grant in token_registry.token_server.issued for access in grant["access"]]
    assert {"type": "repository", "name": "test/skopeo-token", "actions": ["pull"]} in granted


# --------------------------------------------------------------------------- every image

IMAGE_FIXTURES = {
    "busybox_image": ocilayout.MEDIA_OCI_MANIFEST,
    "busybox_v2s2_image": ocilayout.MEDIA_DOCKER_MANIFEST,
    "whiteout_image": ocilayout.MEDIA_OCI_MANIFEST,
    "hardlink_image": ocilayout.MEDIA_OCI_MANIFEST,
    "index_image": ocilayout.MEDIA_OCI_INDEX,
    "docker_index_image": ocilayout.MEDIA_DOCKER_LIST,
}


@pytest.mark.parametrize("fixture_name", sorted(IMAGE_FIXTURES))
def test_image_manifest_is_served_with_the_four_accept_types(request, registry, fixture_name):
    image = request.getfixturevalue(fixture_name)
    status, headers, body = http(f"{registry.url}/v2/{image.name}/manifests/{image.tag}", {"Accept": ALL_ACCEPT})
    assert status == 200
    assert headers.get("Content-Type") == IMAGE_FIXTURES[fixture_name]
    assert headers.get("Docker-Content-Digest") == image.digest == "sha256:" + hashlib.sha256(body).hexdigest()
    assert json.loads(body)["mediaType"] == IMAGE_FIXTURES[fixture_name]
    assert skopeo_inspect_raw(str(image))["mediaType"] == IMAGE_FIXTURES[fixture_name]
    by_digest = http(f"{registry.url}/v2/{image.name}/manifests/{image.digest}", {"Accept": ALL_ACCEPT})
    assert by_digest[0] == 200 and by_digest[2] == body


def test_registry_hides_oci_manifest_from_a_docker_only_accept(registry, busybox_image):
    """The registry fact clients must cope with (TESTBED.md): send all four Accept types."""
    docker_only = {"Accept": f"{ocilayout.MEDIA_DOCKER_MANIFEST}, {ocilayout.MEDIA_DOCKER_LIST}"}
    status, _, _ = http(f"{registry.url}/v2/{busybox_image.name}/manifests/{busybox_image.tag}", docker_only)
    assert status == 404


def test_v2s2_and_oci_busybox_share_blobs_but_not_manifest(busybox_image, busybox_v2s2_image):
    assert busybox_image.digest != busybox_v2s2_image.digest
    assert busybox_image.built.layer_digests == busybox_v2s2_image.built.layer_digests
    manifest = json.loads(images.fetch_manifest(busybox_v2s2_image.registry, busybox_v2s2_image.name, "1")[0])
    assert manifest["config"]["mediaType"] == ocilayout.MEDIA_DOCKER_CONFIG
    assert {layer["mediaType"] for layer in manifest["layers"]} == {ocilayout.MEDIA_DOCKER_LAYER_GZIP}


@pytest.mark.parametrize("fixture_name", ["index_image", "docker_index_image"])
def test_index_lists_amd64_and_arm64_with_different_content(request, registry, fixture_name):
    image = request.getfixturevalue(fixture_name)
    index = json.loads(images.fetch_manifest(registry, image.name, image.tag)[0])
    platforms = {(m["platform"]["os"], m["platform"]["architecture"]): m for m in index["manifests"]}
    assert set(platforms) == {("linux", "amd64"), ("linux", "arm64")}
    child_type = ocilayout.MEDIA_OCI_MANIFEST if image.fmt == "oci" else ocilayout.MEDIA_DOCKER_MANIFEST
    configs = {}
    for key, entry in platforms.items():
        assert entry["mediaType"] == child_type
        body, content_type, digest = images.fetch_manifest(registry, image.name, entry["digest"])
        assert (content_type, digest) == (child_type, entry["digest"])
        config_digest = json.loads(body)["config"]["digest"]
        configs[key] = json.loads(http(f"{registry.url}/v2/{image.name}/blobs/{config_digest}")[2])
    assert configs[("linux", "arm64")]["architecture"] == "arm64"
    assert configs[("linux", "amd64")]["architecture"] == "amd64"
    assert configs[("linux", "arm64")]["rootfs"] != configs[("linux", "amd64")]["rootfs"]


# --------------------------------------------------------------------------- layouts


def unpack_with_umoci(layout, out):
    result = subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out / "rootfs"


def assert_tree_matches(rootfs, expected) -> None:
    import os
    import stat

    found = set()
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), rootfs))
    assert found == set(expected)
    kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo"}
    inodes: dict[str, int] = {}
    for path, node in expected.items():
        info = os.lstat(rootfs / path)
        assert kinds[stat.S_IFMT(info.st_mode)] == node.kind, path
        assert (info.st_uid, info.st_gid) == (node.uid, node.gid), path
        if node.kind != "symlink":
            assert stat.S_IMODE(info.st_mode) == node.mode, path
        if node.kind == "file":
            assert (rootfs / path).read_bytes() == node.content, path
        if node.kind == "symlink":
            assert os.readlink(rootfs / path) == node.target, path
        if node.link_group:
            assert inodes.setdefault(node.link_group, info.st_ino) == info.st_ino, path
        elif node.kind == "file":
            assert info.st_nlink == 1, path
        for name, value in node.xattrs:
            assert os.getxattr(rootfs / path, name) == value.encode(), path


@pytest.mark.parametrize("fixture_name", ["busybox_image", "whiteout_image", "hardlink_image"])
def test_umoci_unpack_of_layout_equals_expected_tree(request, fixture_name, tmp_path):
    """An independent implementation (umoci, as root) agrees with expected_tree()."""
    image = request.getfixturevalue(fixture_name)
    assert_tree_matches(unpack_with_umoci(image.layout, tmp_path / "bundle"), image.expected_tree())


def test_whiteout_expected_tree_applies_every_rule(whiteout_image):
    expected = whiteout_image.expected_tree()
    for hidden in ("data/gone.txt", "data/subdir", "data/subdir/inner.txt", "opaque/old.txt", "opaque/olddir",
                   "swap/was_dir/child"):
        assert hidden not in expected, hidden
    assert expected["data/recreated.txt"].content == b"second\n"
    assert expected["opaque/new.txt"].content == b"new\n"
    assert (expected["swap/was_file"].kind, expected["swap/was_dir"].kind) == ("dir", "file")
    assert expected["links/hard"].link_group == expected["links/hard_src"].link_group == "links/hard_src"
    assert expected["perm/suid"].mode == 0o4755
    assert (expected["perm/owned"].uid, expected["perm/owned"].gid) == (1234, 5678)
    assert expected["perm/xattr"].xattrs == (("user.berth", "test"),)
    assert expected["perm/fifo"].kind == "fifo"


def test_skopeo_push_of_cached_layout_gives_the_same_digest(fresh_registry, busybox_image):
    """The layout is valid for skopeo, and skopeo keeps the manifest bytes (no conversion)."""
    target = fresh_registry()
    images.skopeo_push(target, "copy/busybox", "1", busybox_image.layout, "oci")
    assert images.fetch_manifest(target, "copy/busybox", "1")[2] == busybox_image.digest
    images.skopeo_push(target, "copy/busybox-v2s2", "1", busybox_image.layout, "v2s2")
    assert skopeo_inspect_raw(f"{target.host}/copy/busybox-v2s2:1")["mediaType"] == ocilayout.MEDIA_DOCKER_MANIFEST


def test_cache_is_keyed_by_spec(busybox_image):
    assert images.build_image(images.busybox_spec()).oci_digest == busybox_image.digest
    changed = images.busybox_spec(marker="changed")
    assert ocilayout.spec_key(changed) != ocilayout.spec_key(images.busybox_spec())
    assert images.build_image(changed).layout != busybox_image.layout


def test_hostile_layer_is_pushed_verbatim(fresh_registry):
    """push_image does not sanitize: security tests rely on that."""
    import gzip
    import io
    import tarfile

    hostile = ocilayout.ImageSpec(layers=(ocilayout.Layer((
        ocilayout.Entry("escape", "file", b"x", raw_name="../../escape"),
        ocilayout.Entry("abs", "symlink", target="/etc/shadow", raw_name="/abs-link"),
        ocilayout.CharDevice("dev/mem", 1, 1),
    )),))
    target = fresh_registry()
    images.push_image(target, "test/hostile", "1", hostile)
    manifest = json.loads(images.fetch_manifest(target, "test/hostile", "1")[0])
    blob = http(f"{target.url}/v2/test/hostile/blobs/{manifest['layers'][0]['digest']}")[2]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        members = {member.name: member for member in tar.getmembers()}
    assert set(members) == {"../../escape", "/abs-link", "dev/mem"}
    assert members["dev/mem"].ischr() and (members["dev/mem"].devmajor, members["dev/mem"].devminor) == (1, 1)


@pytest.mark.slow
def test_debian_image_has_python(debian_image, registry, tmp_path):
    import tarfile

    manifest = json.loads(images.fetch_manifest(registry, debian_image.name, debian_image.tag)[0])
    assert len(manifest["layers"]) == 2
    assert manifest["layers"][0]["size"] > 10_000_000
    tar_path = debian_image.spec.layers[0].tar_path
    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
    assert "./usr/bin/python3" in names and "./bin" in names


def test_token_server_accepts_the_oauth2_password_grant(token_registry):
    form = urllib.parse.urlencode({
        "grant_type": "password", "service": SERVICE_NAME, "client_id": "berth",
        "username": token_registry.username, "password": token_registry.password,
        "scope": "repository:test/oauth:pull",
    }).encode()
    request = urllib.request.Request(token_registry.token_server.realm, data=form, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        token = json.load(response)["access_token"]
    assert http(token_registry.url + "/v2/", {"Authorization": "Bearer " + token})[0] == 200
    bad = urllib.parse.urlencode({"grant_type": "password", "username": token_registry.username,
                                  "password": "wrong"}).encode()
    status = http_post(token_registry.token_server.realm, bad)
    assert status == 401


def http_post(url: str, data: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_skopeo_push_of_index_layout_keeps_the_index(fresh_registry, index_image):
    target = fresh_registry()
    images.skopeo_push(target, "copy/multi", "1", index_image.layout, "oci", all_images=True)
    body, content_type, digest = images.fetch_manifest(target, "copy/multi", "1")
    assert (content_type, digest) == (ocilayout.MEDIA_OCI_INDEX, index_image.digest)
