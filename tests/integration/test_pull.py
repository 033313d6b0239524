"""berth pull against the real registry, as the unprivileged test user.

Blob downloads are counted by a proxy in front of the registry (tests/harness/countingproxy.py),
so "downloads nothing" and "one download per blob" are checked without timing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness.registry import Registry
from tests.harness.storetest import (  # noqa: F401 - fixtures
    BIG_BYTES, big_image, proxy, squashfs_cat, squashfs_listing, stores, via,
)
from tests.harness.users import describe

pytestmark = pytest.mark.integration

MACHINE_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine())


def _manifest(image) -> dict:
    return json.loads(Path(image.layout, "blobs", "sha256", image.digest.split(":")[1]).read_text())


def _layers(image) -> list[str]:
    return [layer["digest"] for layer in _manifest(image)["layers"]]


def _blobs(image) -> list[str]:
    return [_manifest(image)["config"]["digest"], *_layers(image)]


def test_pull_by_tag_stores_verified_blobs_and_one_squashfs(stores, proxy, busybox_image):
    ref = via(proxy, busybox_image)
    result = stores.json("pull", "--insecure", "--json", ref)
    assert result["digest"] == busybox_image.digest
    assert (result["store"], result["converted"], result["cached_blobs"]) == ("user", True, 0)
    # config + 2 layers, each fetched exactly once
    assert result["downloaded_blobs"] == 3
    assert sorted(p for _m, p, _r in proxy.blob_gets()) == sorted(
        f"/v2/test/busybox/blobs/{d}" for d in _blobs(busybox_image))
    squashfs = Path(result["squashfs"])
    assert squashfs == stores.user_store / "images" / busybox_image.digest.replace(":", "-") / "image.sqfs"
    assert squashfs.stat().st_uid == stores.user.uid
    listing = squashfs_listing(squashfs)
    assert "bin/busybox" in listing and "etc/passwd" in listing
    assert set(_layers(busybox_image)) <= stores.blobs()
    assert busybox_image.digest in stores.blobs()  # the manifest is kept as a blob too
    assert stores.index() == {ref: busybox_image.digest}
    assert stores.tmp_entries() == []


def test_second_pull_downloads_nothing_and_digest_pull_needs_no_network(stores, proxy, busybox_image):
    ref = via(proxy, busybox_image)
    stores.ok("pull", "--insecure", "-q", ref)
    proxy.reset()
    again = stores.json("pull", "--insecure", "--json", ref)
    assert (again["converted"], again["downloaded_blobs"]) == (False, 0)
    assert proxy.blob_gets() == []
    assert [r[0] for r in proxy.requests if "/manifests/" in r[1]] == ["GET"]  # the tag is re-resolved
    proxy.reset()
    pinned = f"{proxy.host}/test/busybox@{busybox_image.digest}"
    quiet = stores.ok("pull", "--insecure", "-q", pinned)
    assert quiet.stdout.strip() == busybox_image.digest
    assert proxy.requests == []
    assert stores.index() == {ref: busybox_image.digest, pinned: busybox_image.digest}


def test_pull_by_digest_into_empty_store(stores, busybox_image):
    result = stores.json("pull", "--insecure", "--json", busybox_image.by_digest)
    assert result["digest"] == busybox_image.digest
    assert result["reference"] == busybox_image.by_digest
    inspected = stores.json("inspect", busybox_image.by_digest)
    assert inspected["config"]["config"]["Cmd"] == ["/bin/sh"]


def test_docker_schema2_image(stores, busybox_v2s2_image, busybox_image):
    result = stores.json("pull", "--insecure", "--json", str(busybox_v2s2_image))
    assert result["digest"] == busybox_v2s2_image.digest != busybox_image.digest
    inspected = stores.json("inspect", str(busybox_v2s2_image))
    assert inspected["manifest"]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert all(l["media_type"] == "application/vnd.docker.image.rootfs.diff.tar.gzip" for l in inspected["layers"])
    assert "bin/busybox" in squashfs_listing(Path(inspected["squashfs"]))


@pytest.mark.parametrize("fixture", ["index_image", "docker_index_image"])
def test_platform_selection_from_index(stores, request, fixture):
    image = request.getfixturevalue(fixture)
    arm = stores.json("pull", "--insecure", "--json", "--platform", "linux/arm64", str(image))
    assert squashfs_cat(Path(arm["squashfs"]), "etc/berth-marker").strip() == "arm64"
    assert (arm["index_digest"], arm["platform"]) == (image.digest, "linux/arm64")
    if MACHINE_ARCH == "amd64":
        default = stores.json("pull", "--insecure", "--json", str(image))
        assert squashfs_cat(Path(default["squashfs"]), "etc/berth-marker").strip() == "amd64"
        assert default["digest"] != arm["digest"]
    # the digest of the index finds a stored platform image of it, without network
    found = stores.json("inspect", image.by_digest)
    assert found["index_digest"] == image.digest
    assert found["digest"] == (default["digest"] if MACHINE_ARCH == "amd64" else arm["digest"])


def test_platform_not_found_lists_platforms(stores, index_image):
    result = stores.berth("pull", "--insecure", "--platform", "linux/s390x", str(index_image))
    assert result.returncode == 31, describe(result)
    assert "linux/amd64, linux/arm64/v8" in result.stderr
    assert "--platform" in result.stderr
    assert stores.index() == {} and stores.image_dirs() == []


def test_platform_of_single_platform_image_is_checked_before_layers(stores, proxy, busybox_image):
    config = _blobs(busybox_image)[0]
    result = stores.berth("pull", "--insecure", "--platform", "linux/s390x", via(proxy, busybox_image))
    assert result.returncode == 31, describe(result)
    assert "single-platform image for linux/amd64, not linux/s390x" in result.stderr
    assert [p for _m, p, _r in proxy.blob_gets()] == [f"/v2/test/busybox/blobs/{config}"]
    assert stores.index() == {} and stores.image_dirs() == []


def test_layers_shared_between_images_are_fetched_once(stores, proxy, busybox_image, whiteout_image):
    stores.ok("pull", "--insecure", "-q", via(proxy, busybox_image))
    shared = set(_layers(busybox_image)) & set(_layers(whiteout_image))
    assert shared, "the whiteout image is built on the busybox layers"
    proxy.reset()
    result = stores.json("pull", "--insecure", "--json", via(proxy, whiteout_image))
    fetched = {p.rsplit("/", 1)[1] for _m, p, _r in proxy.blob_gets()}
    assert fetched.isdisjoint(shared)
    assert result["cached_blobs"] == len(shared)


def test_mid_stream_cut_resumes_with_range(stores, proxy, busybox_image):
    big = _layers(busybox_image)[0]
    proxy.cut_blobs = [300_000]  # first blob GET: drop the connection after 300000 bytes
    stores.json("pull", "--insecure", "--json", via(proxy, busybox_image))
    big_gets = proxy.blob_gets(big)
    assert [g[2] for g in big_gets] == [None, "bytes=300000-"]
    assert big in stores.blobs()


def test_registry_ignoring_range_restarts_from_zero(stores, proxy, busybox_image):
    proxy.cut_blobs = [200_000]
    proxy.ignore_range = True
    stores.ok("pull", "--insecure", "-q", via(proxy, busybox_image))
    gets = proxy.blob_gets()
    resumed = [g for g in gets if g[2] is not None]
    assert len(resumed) == 1 and resumed[0][2] == "bytes=200000-"
    inspected = stores.json("inspect", via(proxy, busybox_image))
    assert inspected["digest"] == busybox_image.digest


def test_concurrent_pulls_download_each_blob_once(stores, proxy, busybox_image):
    ref = via(proxy, busybox_image)
    proxy.blob_delay_s = 0.01  # keep downloads in flight while the others start
    children = [stores.popen("pull", "--insecure", "--json", ref) for _ in range(4)]
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, err
    results = [json.loads(out) for out, _err in outputs]
    assert {r["digest"] for r in results} == {busybox_image.digest}
    gets = [p for _m, p, _r in proxy.blob_gets()]
    assert len(gets) == len(set(gets)) == 3
    assert sum(r["downloaded_blobs"] for r in results) == 3
    assert sum(r["converted"] for r in results) == 1
    assert stores.image_dirs() == [busybox_image.digest.replace(":", "-")]
    assert stores.tmp_entries() == []
    assert stores.index() == {ref: busybox_image.digest}


def test_digest_mismatch_fails_cleanly(stores, fresh_registry, busybox_image):
    from tests.harness import images

    registry: Registry = fresh_registry()
    images.push_image(registry, "test/corrupt", "1", busybox_image.spec, "oci")
    layer = _layers(busybox_image)[0]
    data = registry.storage_dir / "docker/registry/v2/blobs/sha256" / layer[7:9] / layer[7:] / "data"
    size = data.stat().st_size
    data.write_bytes(b"\0" * size)  # same size, other content
    result = stores.berth("pull", "--insecure", f"{registry.host}/test/corrupt:1")
    assert result.returncode == 5, describe(result)
    assert "does not match its digest" in result.stderr and layer in result.stderr
    assert layer not in stores.blobs()
    assert not any(name.startswith(f"blob-sha256-{layer[7:]}") for name in stores.tmp_entries())
    assert stores.image_dirs() == [] and stores.index() == {}


@pytest.mark.parametrize("registry_fixture", ["auth_registry", "token_registry"])
def test_auth_refused_then_accepted_with_credentials(stores, request, registry_fixture, busybox_image):
    from tests.harness import images

    registry: Registry = request.getfixturevalue(registry_fixture)
    images.push_image(registry, "test/private", "1", busybox_image.spec, "oci")
    ref = f"{registry.host}/test/private:1"
    refused = stores.berth("pull", "--insecure", ref)
    assert refused.returncode == 40, describe(refused)
    assert "auth" in refused.stderr.lower() and registry.host in refused.stderr
    auth_file = stores.user_store.parent / "auth.json"
    import base64

    token = base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()
    auth_file.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    os.chmod(auth_file, 0o644)
    stores.extra_env["REGISTRY_AUTH_FILE"] = str(auth_file)
    result = stores.json("pull", "--insecure", "--json", ref)
    assert result["digest"] == busybox_image.digest
    # Readable by others: used, and said (docs/security.md: credentials files and their modes).
    again = stores.berth("pull", "--insecure", ref)
    assert again.returncode == 0, describe(again)
    assert (f"berth: warning: registry credentials file {auth_file} can be read by other users (mode 0644): "
            f"run: chmod 600 {auth_file}") in again.stderr, describe(again)


def test_a_credentials_file_of_the_user_s_private_group_is_used(stores, auth_registry, busybox_image):
    """A user of a RHEL-family site (a group of their own, umask 002) writes ~/.docker/config.json
    by hand: it is 0664 with their private group, which nobody else can write through. berth
    refused it ("writable by group ...") and every pull failed; now it is used, with the
    warning that others may read it (docs/security.md "Who may change a file")."""
    import base64
    import grp

    from tests.harness import images

    group = grp.getgrgid(stores.user.gid)
    if group.gr_name != stores.user.name or set(group.gr_mem) - {stores.user.name}:
        pytest.skip(f"the test user's primary group {group.gr_name} is not a private group here")
    images.push_image(auth_registry, "test/private", "1", busybox_image.spec, "oci")
    docker_dir = stores.user_store.parent / "docker"
    docker_dir.mkdir()
    config = docker_dir / "config.json"
    token = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode()).decode()
    config.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    for path, mode in ((docker_dir, 0o775), (config, 0o664)):  # what umask 002 makes
        os.chown(path, stores.user.uid, stores.user.gid)
        os.chmod(path, mode)
    stores.extra_env.update(DOCKER_CONFIG=str(docker_dir), XDG_CONFIG_HOME=str(stores.user_store.parent / "xdg"))
    result = stores.berth("pull", "--insecure", f"{auth_registry.host}/test/private:1")
    assert result.returncode == 0, describe(result)
    assert (f"berth: warning: registry credentials file {config} can be read by other users (mode 0664): "
            f"run: chmod 600 {config}") in result.stderr, describe(result)
    assert "does not use credentials" not in result.stderr, describe(result)


@pytest.mark.parametrize("registry_fixture, mode", [("auth_registry", 0o644), ("token_registry", 0o644),
                                                    ("auth_registry", 0o600)])
def test_a_credentials_file_another_user_owns_is_ignored_with_a_warning(stores, other_user, request, registry,
                                                                       registry_fixture, mode, busybox_image):
    """A credentials file another user owns (or may change) failed every pull, of public images
    too. Now it is not read: the pull warns once, naming the file, why and the fix, and goes on
    anonymously; a registry that then asks for credentials fails with an error that says the
    file was ignored and why. No credential of the file is printed. Mode 0600: the file berth
    cannot even open (one ``sudo berth login`` leaves) is judged by its path, the same way."""
    import base64

    from tests.harness import images

    private: Registry = request.getfixturevalue(registry_fixture)
    images.push_image(private, "test/private", "1", busybox_image.spec, "oci")
    auth_file = stores.user_store.parent / "shared-auth.json"
    token = base64.b64encode(f"{private.username}:{private.password}".encode()).decode()
    auth_file.write_text(json.dumps({"auths": {private.host: {"auth": token}}}))
    os.chown(auth_file, other_user.uid, other_user.gid)
    os.chmod(auth_file, mode)
    stores.extra_env.update(REGISTRY_AUTH_FILE=str(auth_file), XDG_CONFIG_HOME=str(stores.user_store.parent / "xdg"),
                            DOCKER_CONFIG=str(stores.user_store.parent / "no-docker"))
    why = f"owned by uid {other_user.uid}, neither root nor you"
    fix = (f"if it is yours, an administrator can run: chown {stores.user.name} {auth_file}; otherwise move it away "
           "(berth login writes your own)")

    public = stores.berth("pull", "--insecure", f"{registry.host}/test/busybox:1")
    assert public.returncode == 0, describe(public)
    warning = (f"berth: warning: registry credentials file {auth_file} is {why}: berth does not use credentials "
               f"another user can change, and goes on without this file; {fix}\n")
    assert public.stderr.count(warning) == 1, describe(public)
    assert public.stderr.count(str(auth_file)) == 2, describe(public)  # the warning alone names it

    refused = stores.berth("pull", "--insecure", f"{private.host}/test/private:1")
    assert refused.returncode == 40, describe(refused)
    assert f"registry credentials file {auth_file} was ignored: it is {why} ({fix})" in refused.stderr, \
        describe(refused)
    assert "hint: make the ignored file yours alone as said above, or log in: berth login " \
        f"{private.host}" in refused.stderr, describe(refused)
    for output in (public, refused):
        assert private.password not in output.stdout + output.stderr
        assert token not in output.stdout + output.stderr


def test_a_credentials_file_the_user_cannot_read_is_passed_over_with_a_warning(stores, registry, auth_registry,
                                                                              busybox_image):
    """Root's 0600 file (``sudo berth login`` leaves one): every pull failed, public ones too
    ("cannot read registry credentials file"); the writers rule trusts root's files, so the
    change before did not cover it (review 11). Now it is passed over and named once, and an
    authentication error says so."""
    from tests.harness import images

    images.push_image(auth_registry, "test/private", "1", busybox_image.spec, "oci")
    auth_file = stores.user_store.parent / "root-auth.json"
    auth_file.write_text('{"auths": {}}')
    os.chmod(auth_file, 0o600)  # root's
    stores.extra_env.update(REGISTRY_AUTH_FILE=str(auth_file), XDG_CONFIG_HOME=str(stores.user_store.parent / "xdg"),
                            DOCKER_CONFIG=str(stores.user_store.parent / "no-docker"))
    why = "not readable by you (owned by uid 0, mode 0600)"
    public = stores.berth("pull", "--insecure", f"{registry.host}/test/busybox:1")
    assert public.returncode == 0, describe(public)
    assert public.stderr.count(f"berth: warning: registry credentials file {auth_file} is {why}: berth cannot "
                               "read it, and goes on without this file; if it is yours, an administrator can run: "
                               f"chown {stores.user.name} {auth_file}") == 1, describe(public)
    refused = stores.berth("pull", "--insecure", f"{auth_registry.host}/test/private:1")
    assert refused.returncode == 40, describe(refused)
    assert f"registry credentials file {auth_file} was ignored: it is {why}" in refused.stderr, describe(refused)


def test_unknown_image_unreachable_registry_and_bad_reference(stores, registry):
    unknown = stores.berth("pull", "--insecure", f"{registry.host}/test/no-such-image:1")
    assert unknown.returncode == 30, describe(unknown)
    assert "no-such-image" in unknown.stderr
    unreachable = stores.berth("pull", "--insecure", "127.0.0.1:9/test/x:1")
    assert unreachable.returncode == 42, describe(unreachable)
    assert "127.0.0.1:9" in unreachable.stderr
    bad = stores.berth("pull", "Not/A/Valid:ref:erence")
    assert bad.returncode == 20, describe(bad)
    assert "invalid image reference" in bad.stderr
    assert stores.index() == {} and stores.blobs() == set()


def test_a_registry_that_asks_for_an_hour_is_not_asked_again_sooner(stores, registry, busybox_image):
    """berth.retry: the real registry behind a proxy that answers the manifest request 429 with
    ``Retry-After: 3600``. berth waited 60 s (its cap) and asked again, which hammers a registry
    that said an hour; now the pull stops at once, naming the registry, the wait and when to try
    again, having sent that one request and stored nothing. Once the registry serves, it pulls."""
    from tests.harness.faultproxy import FaultProxy

    proxy = FaultProxy(registry.host, queue=["429-hour"]).start()
    try:
        refused = stores.berth("pull", "--insecure", via(proxy, busybox_image), timeout=50)
        assert refused.returncode == 41, describe(refused)
        assert (f"error: registry {proxy.host} answered HTTP 429 to manifest " in refused.stderr
                and "and asked berth to wait 3600 s before trying again (Retry-After), longer than berth waits "
                    "between attempts (60 s): stopped without retrying" in refused.stderr), describe(refused)
        assert "hint: try again after " in refused.stderr, describe(refused)
        assert [path for _method, path, _range in proxy.requests if "/manifests/" in path] == \
            ["/v2/test/busybox/manifests/1"], proxy.requests
        assert stores.index() == {} and stores.blobs() == set()
        stores.ok("pull", "--insecure", "-q", via(proxy, busybox_image))
    finally:
        proxy.stop()


def test_site_store_refused_for_users_with_admin_hint(stores, proxy, busybox_image):
    os.chown(stores.site_store, 0, 0)
    os.chmod(stores.site_store, 0o755)
    result = stores.berth("pull", "--site", "--insecure", via(proxy, busybox_image))
    assert result.returncode == 73, describe(result)
    assert str(stores.site_store) in result.stderr
    assert "ask your site administrator" in result.stderr and "--site only as an admin" in result.stderr
    assert proxy.requests == []  # refused before any network traffic


def test_admin_pulls_into_site_store_and_users_use_it(stores, busybox_image):
    os.chown(stores.site_store, 0, 0)
    admin = stores.root_berth("pull", "--site", "--insecure", "-q", str(busybox_image))
    assert admin.returncode == 0, describe(admin)
    listed = stores.json("images", "--json")
    assert [(r["reference"], r["store"]) for r in listed] == [(str(busybox_image), "site")]
    inspected = stores.json("inspect", str(busybox_image))
    assert (inspected["store"], inspected["digest"]) == ("site", busybox_image.digest)
    assert Path(inspected["squashfs"]).stat().st_mode & 0o444 == 0o444
    # users cannot untag or prune it
    refused = stores.berth("rmi", "--site", str(busybox_image))
    assert refused.returncode == 73, describe(refused)
    # without --site the user's own store is meant, and the hint says where it is
    missing = stores.berth("rmi", str(busybox_image))
    assert missing.returncode == 3 and "site store" in missing.stderr, describe(missing)


def _mount_small_store(stores, size_k: int) -> Path:
    if os.getuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o",
                    f"size={size_k}k,uid={stores.user.uid},gid={stores.user.gid},mode=0755",
                    "berth-test-full", str(stores.user_store)], check=True)
    return stores.user_store


def _declared(image) -> tuple[int, int]:
    """(all blobs, the layers alone): the sizes the manifest declares."""
    manifest = _manifest(image)
    layers = sum(layer["size"] for layer in manifest["layers"])
    return manifest["config"]["size"] + layers, layers


@pytest.mark.parametrize("room", ["under the declared sizes", "for the downloads, not the image"])
def test_a_store_without_room_refuses_the_pull_before_any_download(stores, proxy, busybox_image, room):
    """Under the blobs' declared sizes, or with room for them but not for the SquashFS the pull
    then writes into the same store (estimated from the layers' declared sizes), the pull is
    refused before any blob comes, saying both parts; the store is left as it was. Before the
    estimate counted, the second case downloaded every blob and failed in tar2sqfs."""
    declared, layers = _declared(busybox_image)
    size_k = 600 if room == "under the declared sizes" else (declared + layers // 2) // 1024
    assert size_k * 1024 < declared if room == "under the declared sizes" else declared < size_k * 1024
    mount_point = _mount_small_store(stores, size_k)
    try:
        ref = via(proxy, busybox_image)
        result = stores.berth("pull", "--insecure", ref)
        assert result.returncode == 6, describe(result)
        assert f"error: no room to pull {ref} into the user store {mount_point}: it needs " in result.stderr, \
            describe(result)
        from berth.config.units import human_size

        assert (f"the registry declares its 3 blob(s) still to download as {human_size(declared)} " in result.stderr
                and f"and the image's SquashFS is estimated at {human_size(layers)} (from its layers' declared "
                "sizes)" in result.stderr), describe(result)
        assert "berth prune" in result.stderr, describe(result)
        assert proxy.blob_gets() == [] and stores.blobs() == set()  # nothing downloaded
        assert stores.tmp_entries() == [] and stores.index() == {} and stores.image_dirs() == []
        verified = stores.berth("store", "verify", "--json")
        assert verified.returncode == 0 and json.loads(verified.stdout)["problems"] == [], describe(verified)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_disk_that_fills_while_the_squashfs_is_written_is_a_clear_error_and_leaves_nothing(stores,
                                                                                             busybox_image):
    """The SquashFS estimate is a low one (berth's lz4 SquashFS of busybox is ~1.4x its gzip
    layers): with room for the downloads and the estimate but not for the real SquashFS, the
    pull goes ahead, and the write that fills the disk is the error, with nothing of it left."""
    declared, layers = _declared(busybox_image)
    mount_point = _mount_small_store(stores, (declared + layers) // 1024 + 160)
    try:
        result = stores.berth("pull", "--insecure", str(busybox_image))
        assert result.returncode == 6, describe(result)
        assert "no space left" in result.stderr and "berth prune" in result.stderr, describe(result)
        assert stores.tmp_entries() == [] and stores.index() == {} and stores.image_dirs() == []
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_progress_on_stderr_and_human_summary(stores, busybox_image):
    result = stores.ok("pull", "--insecure", str(busybox_image))
    assert "2 layers" in result.stderr
    assert result.stderr.count(": done (") == 3  # one line per blob when not on a terminal
    assert f"digest: {busybox_image.digest}" in result.stdout
    assert "fetched 3 blobs" in result.stdout


def _peak_rss_kib(stores, *args: str) -> int:
    """Peak resident memory of berth (and the programs it ran) for one command, in KiB."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    from tests.harness.users import berth_executable, python

    result = stores.user.run([python(), "-c", code, str(berth_executable()), *args], env=stores.env)
    assert result.returncode == 0, describe(result)
    return int(result.stdout)


def test_peak_memory_does_not_grow_with_the_layer(stores, big_image):
    baseline_kib = _peak_rss_kib(stores, "images")
    pull_kib = _peak_rss_kib(stores, "pull", "--insecure", "-q", str(big_image))
    # The 24 MiB layer streams through 1 MiB chunks: holding it would cost 24 MiB at least.
    # Measured here: about 11 MiB above the interpreter's own baseline (4 download threads).
    assert pull_kib - baseline_kib < 20 * 1024 < BIG_BYTES // 1024, (pull_kib, baseline_kib)


def test_site_configuration_marks_registries_insecure_and_restricts_them(stores, busybox_image):
    config_dir = stores.user_store.parent / "etc"
    config_dir.mkdir()
    host = busybox_image.registry.host
    (config_dir / "berth.toml").write_text(f'[[registries]]\nhost = "{host}"\ninsecure = true\n')
    os.chmod(config_dir, 0o755)
    os.chmod(config_dir / "berth.toml", 0o644)
    stores.extra_env["BERTH_CONFIG_DIR"] = str(config_dir)
    plain = stores.json("pull", "--json", str(busybox_image))  # no --insecure: configured
    assert plain["digest"] == busybox_image.digest
    with open(config_dir / "berth.toml", "a") as config:
        config.write('\n[policy]\ntrusted_registries = ["registry.site.example"]\n')
    refused = stores.berth("pull", "--insecure", busybox_image.by_digest)
    assert refused.returncode == 77, describe(refused)
    assert f"does not allow images from registry '{host}'" in refused.stderr
    assert "trusted_registries" in refused.stderr


def test_an_image_config_nested_100000_deep_is_refused_without_a_traceback(stores, registry, tmp_path):
    """Issue 12 #5: an image config of 100,000 nested arrays made `berth pull` die with a
    RecursionError traceback; it is image content refused now, naming the document, and nothing
    of the image stays in the store."""
    import hashlib

    from tests.harness.images import push_blob, push_manifest
    from tests.harness.registry import auth_headers

    name = "test/deep-config"
    config = b"[" * 100_000 + b"]" * 100_000
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    (tmp_path / "config").write_bytes(config)
    headers = auth_headers(registry, f"repository:{name}:pull,push")
    push_blob(registry, name, config_digest, tmp_path / "config", headers)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [],
    }).encode()
    push_manifest(registry, name, "1", manifest, "application/vnd.oci.image.manifest.v1+json", headers)
    reference = f"{registry.host}/{name}:1"
    result = stores.berth("pull", "--insecure", reference)
    assert result.returncode == 7, describe(result)
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr, describe(result)
    assert (f"error: image content refused: the image config of {reference} is nested more than 64 levels deep"
            in result.stderr), describe(result)
    assert "hint: the registry serves a malformed image" in result.stderr, describe(result)
    assert stores.index() == {}


def test_a_layer_declared_larger_than_the_store_s_free_space_is_refused_before_it_downloads(stores, registry,
                                                                                             busybox_image):
    """A registry declares a layer's size as it likes, and berth reads up to it: a manifest
    declaring an exabyte filled the store's file system before the pull failed (review). Now
    the pull stops before any layer comes, naming the image, the sizes, the store and who acts."""
    from tests.harness.images import fetch_manifest, push_manifest
    from tests.harness.registry import auth_headers

    data, media_type, _ = fetch_manifest(registry, busybox_image.name, busybox_image.tag)
    manifest = json.loads(data)
    manifest["layers"][0]["size"] = 1 << 60
    headers = auth_headers(registry, f"repository:{busybox_image.name}:pull,push")
    push_manifest(registry, busybox_image.name, "huge", json.dumps(manifest).encode(), media_type, headers)
    reference = f"{registry.host}/{busybox_image.name}:huge"
    result = stores.berth("pull", "--insecure", reference)
    assert result.returncode != 0 and "Traceback" not in result.stderr, describe(result)
    assert f"error: no room to pull {reference} into the user store " in result.stderr, describe(result)
    assert "as 1048576.0 TiB" in result.stderr and "hint: free space on the file system of" in result.stderr, \
        describe(result)
    assert "tell the registry's administrator or the image's maintainer" in result.stderr, describe(result)
    assert stores.index() == {} and stores.blobs() == set()


@pytest.mark.parametrize("fixture, compression", [
    ("busybox_image", "lz4"), ("busybox_v2s2_image", "lz4"), ("whiteout_image", "lz4"), ("hardlink_image", "lz4"),
    ("big_image", "lz4"), pytest.param("debian_image", "lz4", marks=pytest.mark.slow), ("busybox_image", "zstd"),
    pytest.param("debian_image", "zstd", marks=pytest.mark.slow),
])
def test_the_squashfs_estimate_stays_under_the_real_squashfs_of_the_test_images(stores, request, fixture,
                                                                                 compression):
    """The pull's free-space check counts the SquashFS as squashfs.estimate_bytes has it: an
    estimate above the real file would refuse pulls that fit, so it stays below for the test
    images (berth's default lz4, and zstd): plain and gzip layers, whiteouts, hard links, an
    uncompressed random layer, a Debian root file system."""
    from berth.image.squashfs import estimate_bytes

    image = request.getfixturevalue(fixture)
    stores.extra_env["BERTH_SQUASHFS_COMPRESSION"] = compression
    pulled = stores.json("pull", "--insecure", "--json", str(image))
    meta = json.loads((Path(pulled["squashfs"]).parent / "image.json").read_text())
    assert meta["compression"] == compression
    estimate = estimate_bytes([(layer["mediaType"], layer["size"]) for layer in meta["layers"]], compression)
    assert 0 < estimate <= meta["squashfs_bytes"] == Path(pulled["squashfs"]).stat().st_size, (estimate, meta)
