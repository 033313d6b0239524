"""Helpers for the store/pull integration tests: berth as the test user with its own user and
site stores, a counting proxy in front of the session registry, squashfs listings.

Import the fixtures into a test module (``from tests.harness.storetest import stores, proxy``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.countingproxy import CountingProxy
from tests.harness.ocilayout import Layer
from tests.harness.users import User, berth_executable, describe


@dataclass
class Stores:
    """A user store and a site store (both owned by the test user unless a test changes it)."""

    user: User
    user_store: Path
    site_store: Path
    extra_env: dict

    @property
    def env(self) -> dict[str, str]:
        return {"BERTH_USER_STORE": str(self.user_store), "BERTH_SITE_STORE": str(self.site_store),
                **self.extra_env}

    def berth(self, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return self.user.berth(*args, env=self.env, timeout=timeout, **kwargs)

    def ok(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        result = self.berth(*args, **kwargs)
        assert result.returncode == 0, describe(result)
        return result

    def json(self, *args: str) -> object:
        return json.loads(self.ok(*args).stdout)

    def popen(self, *args: str) -> subprocess.Popen:
        """Start berth as the test user with no intermediate process (setpriv execs), so that
        ``kill -9`` of the returned pid hits berth itself."""
        env = self.user.base_env(**self.env)
        argv = [str(berth_executable()), *args]
        if os.getuid() == 0 and self.user.uid != 0:
            argv = ["setpriv", f"--reuid={self.user.uid}", f"--regid={self.user.gid}", "--init-groups",
                    "env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]
            env = None
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd="/")

    def root_berth(self, *args: str) -> subprocess.CompletedProcess:
        """berth as the invoking user (root in CI: the site administrator)."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
               **self.env}
        return subprocess.run([str(berth_executable()), *args], env=env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)

    # -- what is on disk -------------------------------------------------------------------------

    def blobs(self, store: Path | None = None) -> set[str]:
        root = (store or self.user_store) / "blobs" / "sha256"
        return {f"sha256:{p.name}" for p in root.iterdir()} if root.is_dir() else set()

    def tmp_entries(self, store: Path | None = None) -> list[str]:
        root = (store or self.user_store) / "tmp"
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []

    def image_dirs(self, store: Path | None = None) -> list[str]:
        root = (store or self.user_store) / "images"
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []

    def index(self, store: Path | None = None) -> dict[str, str]:
        path = (store or self.user_store) / "index.json"
        return json.loads(path.read_text())["references"] if path.exists() else {}

    def referenced_blobs(self, store: Path | None = None) -> set[str]:
        """Manifest, config and layer digests of every image the index names."""
        root = store or self.user_store
        used: set[str] = set()
        for digest in set(self.index(root).values()):
            image = root / "images" / digest.replace(":", "-")
            manifest = json.loads((image / "manifest.json").read_text())
            meta = json.loads((image / "image.json").read_text())
            used |= {digest, manifest["config"]["digest"], *(l["digest"] for l in manifest["layers"])}
            if meta.get("index_digest"):
                used.add(meta["index_digest"])
        return used


def squashfs_listing(path: Path) -> list[str]:
    """Paths inside a SquashFS file, sorted (read with squashfs-tools-ng's sqfs2tar, the same
    implementation that wrote it; tests/integration/test_squashfs_readers.py checks the others)."""
    dump = subprocess.run(["sqfs2tar", str(path)], capture_output=True, check=True,
                          stdin=subprocess.DEVNULL)
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(dump.stdout)) as archive:
        return sorted(member.name.rstrip("/").removeprefix("./") for member in archive.getmembers()
                      if member.name.strip("./"))


def squashfs_cat(path: Path, inner: str) -> str:
    result = subprocess.run(["rdsquashfs", "-c", "/" + inner.lstrip("/"), str(path)], capture_output=True,
                            text=True, check=True, stdin=subprocess.DEVNULL)
    return result.stdout


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


BIG_BYTES = 24 << 20


def _big_layer_tar() -> Path:
    """A deterministic tar holding 24 MiB of incompressible data (cached with the test images)."""
    path = images.cache_dir() / "berth-store-crash-big-v1.tar"
    if not path.exists():
        data = random.Random(20261122).randbytes(BIG_BYTES)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        with tarfile.open(staging, "w") as archive:
            info = tarfile.TarInfo("data/big.bin")
            info.size = len(data)
            info.mode = 0o644
            directory = tarfile.TarInfo("data")
            directory.type = tarfile.DIRTYPE
            directory.mode = 0o755
            archive.addfile(directory)
            archive.addfile(info, io.BytesIO(data))
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    return path


@pytest.fixture(scope="session")
def big_image(registry):
    """busybox + an uncompressed layer of 24 MiB of random data (slow to download through a
    throttled proxy, long enough to convert that a kill lands inside)."""
    spec = images.busybox_spec(extra_layers=(Layer(tar_path=str(_big_layer_tar()), tar_key="crash-big-v1"),))
    spec = dataclasses.replace(spec, compression="none")
    return images.push_pushed_image(registry, "test/crash-big", "1", spec, "oci")


@pytest.fixture
def stores(user) -> Stores:
    base = user.tempdir(prefix="berth-stores-")
    user_store, site_store = base / "user", base / "site"
    for path in (user_store, site_store):
        path.mkdir()
        if os.getuid() == 0:
            shutil.chown(path, user.uid, user.gid)
    yield Stores(user, user_store, site_store, {})
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def proxy(registry) -> CountingProxy:
    """A counting, fault-injecting proxy in front of the session registry (same images)."""
    started = CountingProxy(registry.host).start()
    yield started
    started.stop()


def via(proxy: CountingProxy, image_reference: str) -> str:
    """The same image reference, through the proxy (host part replaced)."""
    _host, _, rest = image_reference.partition("/")
    return f"{proxy.host}/{rest}"
