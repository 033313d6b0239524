"""Hostile layers: flattening writes nothing outside its sandbox, and the SquashFS it makes,
mounted with squashfuse as the unprivileged test user, gives no way out.

The layers try path traversal (``../../x``), absolute paths (``/etc/x``), writes through
symlinks (``a -> /tmp/decoy`` then ``a/pwned``), hard links to host files, device nodes, a
setuid-root shell, a sparse member claiming a terabyte, a member claiming 100 GiB, and a tar
bomb. Every name aimed at the host carries a random token, so the checks below cannot be
fooled by, or disturb, anything else running on the machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from berth.errors import ImageError
from berth.image.flatten import build_squashfs
from tests.unit.test_flatten_helpers import E, d, f, hard, layer_tar, read_tree, sym, write_layer

pytestmark = pytest.mark.security

BUSYBOX = Path("/bin/busybox")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with type, size, mode and mtime (symlinks not followed)."""
    seen = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            st = os.lstat(full)
            seen[os.path.relpath(full, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink)
    return seen


def host_state(token: str) -> dict:
    """What the hostile names aim at: anything in /tmp or /etc named with the token, and the
    identity of /etc/passwd and /etc/shadow (content and link count: a hard link would raise it)."""
    state = {"tmp": sorted(name for name in os.listdir("/tmp") if token in name),
             "etc": sorted(name for name in os.listdir("/etc") if token in name)}
    for name in ("/etc/passwd", "/etc/shadow"):
        st = os.stat(name)
        state[name] = (hashlib.sha256(Path(name).read_bytes()).hexdigest(), st.st_nlink, st.st_mode)
    return state


@pytest.fixture
def token():
    return "berth-hostile-" + uuid.uuid4().hex[:12]


@pytest.fixture
def decoy(token):
    """An empty host directory that a symlink in the image points at."""
    path = Path("/tmp") / f"{token}-decoy"
    path.mkdir(mode=0o777)
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hostile_layers(directory: Path, token: str, decoy: Path):
    lower = write_layer(directory, [
        d("bin"), d("dev"), d("etc"),
        f(f"../../../../../../tmp/{token}-traversal", "pwned"),
        f(f"/etc/{token}-absolute", "pwned"),
        f(f"/tmp/{token}-absolute", "pwned"),
        sym("escape", str(decoy)),
        f("escape/pwned", "pwned"),
        sym("up", "../../../../../../../tmp"),
        f(f"up/{token}-via-up", "pwned"),
        hard("passwd-link", "../../../../../../etc/passwd"),
        hard("shadow-link", "/etc/shadow"),
        E("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1, mode=0o666),
        E("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o666),
        f("bin/id", BUSYBOX.read_bytes(), mode=0o4755, uid=0, gid=0),  # setuid-root busybox
        f("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
    ])
    upper = write_layer(directory, [
        f("escape/again", "pwned"),  # through the lower layer's symlink
        f("../.wh.etc"),  # a whiteout aimed outside
        f(f".wh.../../tmp/{token}-wh"),
        f("file", "plain"),
        f("file/child", "under a regular file"),
    ])
    return [lower, upper]


def test_flattening_hostile_layers_as_root_writes_nothing_outside_the_sandbox(tmp_path, token, decoy):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    layers = hostile_layers(sandbox, token, decoy)
    before_sandbox, before_host = snapshot(sandbox), host_state(token)
    report = build_squashfs(layers, sandbox / "image.sqfs")
    after_sandbox = snapshot(sandbox)
    assert host_state(token) == before_host
    assert list(decoy.iterdir()) == []
    assert set(after_sandbox) - set(before_sandbox) == {"image.sqfs"}
    assert {path: after_sandbox[path] for path in before_sandbox} == before_sandbox
    tree = read_tree(sandbox / "image.sqfs")
    # Absolute names land inside the image; '..' names and writes through links do not exist.
    assert tree[f"etc/{token}-absolute"].data == b"pwned"
    assert not any("traversal" in path or "via-up" in path for path in tree)
    assert "escape/pwned" not in tree and tree["up"].kind == "symlink"
    # The upper layer's escape/again makes 'escape' a directory there (overlay semantics): the
    # lower symlink is hidden, so nothing of the image resolves through it.
    assert tree["escape"].kind == "dir" and tree["escape/again"].data == b"pwned"
    assert "passwd-link" not in tree and "shadow-link" not in tree
    assert "file/child" not in tree and tree["file"].data == b"plain"
    assert (tree["dev/mem"].kind, tree["dev/mem"].dev) == ("char", (1, 1))
    assert tree["bin/id"].mode == 0o4755 and tree["bin/id"].uid == 0
    neutralized = "\n".join(report.notes)
    for name in ("traversal", "escape/pwned", "via-up", "passwd-link", "shadow-link", "file/child", ".wh.etc",
                 f"{token}-wh"):
        assert name in neutralized, name


def test_hostile_image_mounted_by_the_test_user_gives_no_privilege(user, user_tmp, token, decoy):
    """Flatten as the unprivileged user, mount with squashfuse, try the setuid shell and the devices."""
    layers = hostile_layers(user_tmp, token, decoy)
    for layer in layers:
        os.chmod(layer.path, 0o644)
    image, mountpoint = user_tmp / "image.sqfs", user_tmp / "mnt"
    script = ("import sys; from pathlib import Path; from berth.image.flatten import Layer, build_squashfs;"
              "from berth.oci.digest import Digest;"
              "layers = [Layer(Path(p), 'application/vnd.oci.image.layer.v1.tar+gzip', Digest.parse(g))"
              " for p, g in zip(sys.argv[2::2], sys.argv[3::2])];"
              "print(len(build_squashfs(layers, Path(sys.argv[1])).notes))")
    argv = [sys.executable, "-c", script, str(image)]
    for layer in layers:
        argv += [str(layer.path), str(layer.digest)]
    before_host = host_state(token)
    built = user.run(argv)
    assert built.returncode == 0, built.stderr
    assert int(built.stdout) >= 8
    assert host_state(token) == before_host and list(decoy.iterdir()) == []
    user.run(["mkdir", str(mountpoint)], check=True)
    mounted = user.run(["squashfuse", str(image), str(mountpoint)])
    assert mounted.returncode == 0, mounted.stderr
    try:
        euid = user.run([str(mountpoint / "bin/id"), "-u"])
        mem = user.run([str(mountpoint / "bin/busybox"), "head", "-c", "1", str(mountpoint / "dev/mem")])
        sda = user.run([str(mountpoint / "bin/busybox"), "head", "-c", "1", str(mountpoint / "dev/sda")])
        write = user.run([str(mountpoint / "bin/busybox"), "touch", str(mountpoint / "escape/new")])
        options = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()
                       if line.split()[1] == str(mountpoint))
    finally:
        user.run(["fusermount3", "-u", "-z", str(mountpoint)])
    assert {"nosuid", "nodev"} <= set(options.split(","))
    assert euid.returncode == 0 and euid.stdout.strip() == str(user.uid)  # setuid bit ignored
    assert mem.returncode != 0 and "ermission denied" in mem.stderr
    assert sda.returncode != 0 and "ermission denied" in sda.stderr
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    assert list(decoy.iterdir()) == []


def test_huge_sparse_member_is_refused_and_leaves_nothing(tmp_path):
    sparse_map = b"1\n0\n10\n".ljust(512, b"\0")
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "huge",
           "GNU.sparse.realsize": str(1 << 40)}
    layer = write_layer(tmp_path, layer_tar([f("GNUSparseFile.0/huge", sparse_map + b"0123456789", pax=pax)]))
    before = snapshot(tmp_path)
    with pytest.raises(ImageError, match="sparse"):
        build_squashfs([layer], tmp_path / "image.sqfs")
    assert snapshot(tmp_path) == before


def test_member_claiming_more_than_the_default_limit_is_refused_before_reading_it(tmp_path):
    info = tarfile.TarInfo("bomb")
    info.size = 100 << 30  # 100 GiB, above the default 64 GiB limit; no data follows
    header = info.tobuf(tarfile.PAX_FORMAT)
    layer = write_layer(tmp_path, header + b"\0" * 4096, compression="none")
    before = snapshot(tmp_path)
    with pytest.raises(ImageError, match="larger than the limit of 68719476736 bytes"):
        build_squashfs([layer], tmp_path / "image.sqfs")
    assert snapshot(tmp_path) == before


def test_gzip_bomb_stops_at_the_content_limit(tmp_path):
    zeros = tmp_path / "zeros.tar"
    with tarfile.open(zeros, "w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("zeros")
        info.size = 512 << 20
        with open("/dev/zero", "rb") as source:
            archive.addfile(info, source)
    blob = tmp_path / "bomb.gz"
    subprocess.run(["pigz", "-9", "-k", str(zeros)], check=True)
    (tmp_path / "zeros.tar.gz").rename(blob)
    zeros.unlink()
    assert blob.stat().st_size < 2 << 20  # ~0.5 MiB expanding to 512 MiB
    from berth.image.flatten import Layer
    from berth.oci.digest import Digest
    layer = Layer(blob, "application/vnd.oci.image.layer.v1.tar+gzip", Digest("sha256", "b" * 64))
    with pytest.raises(ImageError, match="larger than the limit"):
        build_squashfs([layer], tmp_path / "image.sqfs", max_content_bytes=64 << 20)
    assert not (tmp_path / "image.sqfs").exists()


@pytest.mark.parametrize("compressor", [["xz", "-c", "--lzma2=preset=0,dict=1536MiB"],
                                        ["zstd", "-q", "-c", "--long=31"]], ids=["xz", "zstd"])
def test_a_layer_that_asks_its_decompressor_for_gigabytes_is_refused(tmp_path, compressor):
    """A layer names the window its decompressor must hold. A hostile registry's xz layer (a
    gzip media type does not stop it: the compression is sniffed) declaring a 1.5 GiB
    dictionary made ``xz -dc`` hold up to that much memory while it expanded a few hundred KB
    of zeros (measured: 1.2 GiB resident for a 183 KB blob); zstd refuses more than a 128 MiB
    window by default. Both are bounded the same way now; this layer itself is tiny."""
    data = layer_tar([f("etc/hostname", b"bomb\n")])
    # From a pipe the size is unknown, so the frame keeps the whole window it was made with.
    blob_bytes = subprocess.run(compressor, input=data, capture_output=True, check=True).stdout
    blob = tmp_path / "layer.blob"
    blob.write_bytes(blob_bytes)
    from berth.image.flatten import Layer
    from berth.oci.digest import Digest
    layer = Layer(blob, "application/vnd.oci.image.layer.v1.tar+gzip", Digest("sha256", hashlib.sha256(blob_bytes).hexdigest()))
    with pytest.raises(ImageError, match="cannot be decompressed") as caught:
        build_squashfs([layer], tmp_path / "image.sqfs")
    assert "memory" in str(caught.value).lower(), str(caught.value)
    assert caught.value.hint.startswith("the layer asks for more memory to decompress than berth allows")
    assert not (tmp_path / "image.sqfs").exists()


def test_tar_bomb_of_many_entries_is_refused(tmp_path):
    layer = write_layer(tmp_path, [f(f"d{i % 50}/f{i}") for i in range(20_000)])
    with pytest.raises(ImageError, match="more than 10000 entries"):
        build_squashfs([layer], tmp_path / "image.sqfs", max_entries=10_000)
    assert not (tmp_path / "image.sqfs").exists()


def test_pax_header_memory_bomb_is_refused_without_reading_it(tmp_path):
    info = tarfile.TarInfo("pax")
    info.type, info.size = tarfile.XHDTYPE, 8 << 30  # 8 GiB of "pax records" that never come
    layer = write_layer(tmp_path, info.tobuf(tarfile.GNU_FORMAT) + bytes(1 << 20), compression="gzip")
    with pytest.raises(ImageError, match="extension header of 8589934592 bytes"):
        build_squashfs([layer], tmp_path / "image.sqfs")
    assert not (tmp_path / "image.sqfs").exists()
