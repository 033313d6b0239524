"""The test harness itself: real registries (anonymous, basic, token) and the test images."""

from __future__ import annotations

from email.message import Message
import base64
import hashlib
import json
import subprocess
import urllib.error
import urllib.request

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
