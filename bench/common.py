"""Shared pieces of berth's benchmarks: the unprivileged user, a local registry, cached images,
timing statistics and table printing.

Nothing here is imported by berth; the benchmarks are run as root (they start servers and build
images) and run every tool that is meant to run unprivileged as the user ``berthtest``.
Images and caches live under ``$BERTH_BENCH_CACHE`` (default /var/cache/berth-bench), never in
the repository.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("BERTH_BENCH_CACHE", "/var/cache/berth-bench"))
VENV = Path(os.environ.get("BERTH_VENV") or REPO / ".venv")
BERTH = VENV / "bin" / "berth"
#: berth's Python console script, which the command `berth` (the compiled front end, issue 10)
#: execs for all it does not run itself: what `python -X importtime` and cProfile can run.
BERTH_PY = VENV / "bin" / "berth-py" if (VENV / "bin" / "berth-py").exists() else BERTH
BENCH_USER = os.environ.get("BERTH_BENCH_USER", "berthtest")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def log(message: str) -> None:
    """Progress to stderr (stdout carries the tables)."""
    print(f"[{datetime.datetime.now(datetime.UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the user


@dataclass(frozen=True)
class BenchUser:
    name: str
    uid: int
    gid: int
    home: Path

    @classmethod
    def lookup(cls, name: str = BENCH_USER) -> BenchUser:
        entry = pwd.getpwnam(name)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            # no virtualenv here: anchors such as ch-image run "env python3" and need Debian's.
            "PATH": SYSTEM_PATH,
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": f"/tmp/berth-bench-xdg-{self.uid}",
        }
        env.update(extra)
        return env

    def argv(self, argv: Sequence[str], env: dict | None = None) -> list[str]:
        """``argv`` wrapped to run as this user with a clean environment (we are root)."""
        full_env = self.env(**(env or {}))
        Path(full_env["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)
        os.chown(full_env["XDG_RUNTIME_DIR"], self.uid, self.gid)
        return ["runuser", "-u", self.name, "--", "env", "-i", *[f"{k}={v}" for k, v in full_env.items()], *argv]

    def run(self, argv: Sequence[str], *, env: dict | None = None, check: bool = True,
            timeout: float = 1800, cwd: str = "/", capture: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return run(self.argv(argv, env), check=check, timeout=timeout, cwd=cwd, capture=capture, **kwargs)

    def tempdir(self, prefix: str, parent: Path = Path("/tmp")) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        os.chmod(path, 0o755)
        os.chown(path, self.uid, self.gid)
        return path

    def chown_tree(self, path: Path) -> None:
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(path)], check=True)

    def unpack(self, image: "BenchImage", rootfs: Path) -> Path:
        """``image``'s layers extracted in order by this user into the new directory ``rootfs``
        (the plain-directory anchor the benchmarks compare berth with)."""
        rootfs.mkdir()
        self.chown_tree(rootfs)
        for layer in image.layers:
            self.run(["tar", "-C", str(rootfs), "-xzf", str(layer.path)])
        return rootfs


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 1800, cwd: str = "/",
        capture: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its stderr tail so the benchmark log says why."""
    result = subprocess.run(list(argv), check=False, stdin=subprocess.DEVNULL, capture_output=capture, text=True,
                            timeout=timeout, cwd=cwd, **kwargs)
    if check and result.returncode != 0:
        tail = (result.stderr or "")[-2000:] if capture else ""
        raise RuntimeError(f"command failed (exit {result.returncode}): {' '.join(map(str, argv))[:400]}\n{tail}")
    return result


def error_line(text: str) -> str:
    """The most telling line of a failure message: the last 'error:' line, else the last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    return ((errors or lines or ["?"])[-1])[:300]


def timed(argv: Sequence[str], **kwargs) -> float:
    """Wall-clock seconds of one run of ``argv`` (raises when it fails)."""
    start = time.perf_counter()
    run(argv, **kwargs)
    return time.perf_counter() - start


def rm_tree(path: Path) -> None:
    """Remove a tree that an unprivileged tool may have left read-only (umoci, ch-image)."""
    if not path.exists() and not path.is_symlink():
        return
    subprocess.run(["chmod", "-R", "u+rwX", str(path)], stderr=subprocess.DEVNULL, check=False)
    shutil.rmtree(path, ignore_errors=True)


def drop_caches() -> bool:
    """Drop the page, dentry and inode caches (root only); False when not allowed here."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- statistics, tables


@dataclass
class Sample:
    """Repeated measurements of one thing, in seconds."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def cell(self, unit: str = "s") -> str:
        if not self.values:
            return "—"
        scale, fmt = (1000.0, "{:.1f}") if unit == "ms" else (1.0, "{:.2f}")
        return (f"{fmt.format(self.median * scale)} ({fmt.format(self.low * scale)}–"
                f"{fmt.format(self.high * scale)})")


def ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "—"
    return f"{numerator / denominator:.2f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    cpus = os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    load = os.getloadavg()
    return (f"{cpus} cores, {memory_gib:.0f} GiB, Debian {debian}, kernel {platform.release()}; "
            f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def other_activity() -> str:
    """A one-line summary of what else was busy on the machine (tests of other engineers)."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu", "--no-headers"], check=False,
                         capture_output=True, text=True).stdout.splitlines()
    ours = {os.getpid(), os.getppid()}  # this benchmark and run_all.py
    busy = [" ".join(line.split()[1:]) for line in out[:8]
            if line.strip() and int(line.split()[0]) not in ours and float(line.split()[1]) >= 5.0]
    return ", ".join(busy) if busy else "nothing above 5% CPU"


def report_header(title: str, command: str) -> str:
    now = datetime.datetime.now(datetime.UTC)
    return "\n".join([
        f"### {title}",
        "",
        f"- command: `{command}`",
        f"- date: {now:%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_description()}",
        f"- busy processes at start: {other_activity()}",
        f"- berth: {berth_version()} (git {git_head()})",
        "",
    ])


def report_footer() -> str:
    """What the machine looked like when the benchmark ended (others' work shows here)."""
    load = os.getloadavg()
    return (f"\n- at the end: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
            f"busy processes: {other_activity()}\n")


def emit_report(sections: Sequence[str], output: Path | None) -> str:
    """Join a benchmark's report sections, add the footer, print it and write it to ``output``
    when given (run_all.py collects these files into RESULTS.md)."""
    report = "\n".join(sections).rstrip() + "\n" + report_footer()
    print(report)
    if output:
        output.write_text(report)
    return report


def git_head() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() or "?"


def berth_version() -> str:
    if not BERTH.exists():
        return "not installed"
    result = subprocess.run([str(BERTH), "--version"], capture_output=True, text=True, check=False)
    return (result.stdout or result.stderr).strip() or f"exit {result.returncode}"


# --------------------------------------------------------------------------- berth availability


def berth_subcommand_missing(user: BenchUser, subcommand: str) -> str | None:
    """None when ``berth SUBCOMMAND --help`` works, else the reason it does not."""
    if not BERTH.exists():
        return f"{BERTH} does not exist (run scripts/setup-venv.sh)"
    result = user.run([str(BERTH), subcommand, "--help"], check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return f"`berth {subcommand} --help` exits {result.returncode}: {lines[-1] if lines else ''}"
    return None


def berth_help_has(user: BenchUser, subcommand: str, option: str) -> bool:
    result = user.run([str(BERTH), subcommand, "--help"], check=False)
    return option in result.stdout


# --------------------------------------------------------------------------- registry


#: The registry answers 404 unless the Accept header names the stored manifest's type.
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Registry:
    """Debian's docker-registry on 127.0.0.1, storage kept under the cache (images survive runs).

    ``tls=True`` serves HTTPS with a self-signed certificate (for Charliecloud's ch-image, which
    only speaks HTTPS); both flavours can share one storage directory.
    """

    def __init__(self, storage: Path, *, tls: bool = False) -> None:
        self.storage = storage
        self.tls = tls
        self.workdir = Path(tempfile.mkdtemp(prefix="berth-bench-registry-"))
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = self.workdir / "registry.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.storage.mkdir(parents=True, exist_ok=True)
        tls_block = ""
        if self.tls:
            cert, key = self.workdir / "cert.pem", self.workdir / "key.pem"
            run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                 "-keyout", str(key), "-out", str(cert)])
            tls_block = f"  tls:\n    certificate: {cert}\n    key: {key}\n"
        config = self.workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n{tls_block}"
        )
        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(config)],
                                        stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL)
        log_file.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("registry did not start within 15 s")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def has(self, name: str, tag: str, digest: str | None = None) -> bool:
        """Whether NAME:TAG is there (and, with ``digest``, is that manifest)."""
        if self.tls:
            raise NotImplementedError("check through the plain-HTTP registry")
        accept = ", ".join(MANIFEST_TYPES)
        request = urllib.request.Request(f"http://{self.host}/v2/{name}/manifests/{tag}", method="HEAD",
                                         headers={"Accept": accept})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                found = response.headers.get("Docker-Content-Digest")
                return response.status == 200 and (digest is None or found == digest)
        except urllib.error.HTTPError:
            return False

    def blob_gets(self) -> int:
        """How many blob downloads the registry has answered so far (from its access log)."""
        text = self.log_path.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if '"GET /v2/' in line and "/blobs/sha256:" in line)

    def push_layout(self, layout: Path, tag: str, name: str) -> None:
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
             f"docker://{self.host}/{name}:{tag}"])


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class LayerBlob:
    path: Path  # the .tar.gz blob
    digest: str  # sha256:… of the compressed blob
    diff_id: str  # sha256:… of the uncompressed tar
    size: int  # compressed bytes
    tar_bytes: int  # uncompressed bytes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _cached_layer(out: Path) -> LayerBlob | None:
    meta = out.with_suffix(".json")
    if not (out.exists() and meta.exists()):
        return None
    data = json.loads(meta.read_text())
    return LayerBlob(out, data["digest"], data["diff_id"], data["size"], data["tar_bytes"])


def make_layer(root: Path, members: Sequence[str], out: Path, excludes: Sequence[str] = ()) -> LayerBlob:
    """A gzip tar layer of ``members`` (paths relative to ``root``), built once and cached at
    ``out`` with its digests in ``out.json``."""
    cached = _cached_layer(out)
    if cached is not None:
        return cached
    out.parent.mkdir(parents=True, exist_ok=True)
    tar_path = out.with_suffix(".tmp.tar")
    run(["tar", "--numeric-owner", "--sort=name", "--xattrs", "-C", str(root),
         *[f"--exclude={pattern}" for pattern in excludes], "-cf", str(tar_path), *members])
    diff_id = sha256_file(tar_path)
    tar_bytes = tar_path.stat().st_size
    with open(str(out) + ".tmp", "wb") as handle:
        run(["pigz", "-6", "-n", "-c", str(tar_path)], stdout=handle, capture=False)
    os.replace(str(out) + ".tmp", out)
    tar_path.unlink()
    digest = sha256_file(out)
    out.with_suffix(".json").write_text(json.dumps(
        {"digest": digest, "diff_id": diff_id, "size": out.stat().st_size, "tar_bytes": tar_bytes}))
    return LayerBlob(out, digest, diff_id, out.stat().st_size, tar_bytes)


def write_oci_layout(layout: Path, tag: str, layers: Sequence[LayerBlob], *, env: Sequence[str] = (),
                     cmd: Sequence[str] = ("/bin/sh",)) -> None:
    """An OCI image layout (image-spec v1.0) holding one manifest with ``layers``."""
    rm_tree(layout)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    for layer in layers:
        target = blobs / layer.digest.split(":", 1)[1]
        if not target.exists():
            os.link(layer.path, target)
    config = {
        "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *env],
                   "Cmd": list(cmd)},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "berth bench"} for _ in layers],
    }
    config_descriptor = put(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_descriptor},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.digest,
                    "size": layer.size} for layer in layers],
    }
    manifest_descriptor = put(json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_descriptor,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout / "index.json").write_text(json.dumps(index))


def debootstrap_rootfs(name: str, include: Sequence[str] = ()) -> Path:
    """A debootstrap minbase bookworm root filesystem, built once and cached."""
    root = CACHE / "rootfs" / name
    if root.exists():
        return root
    tmp = root.with_name(name + ".tmp")
    rm_tree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    extra = [f"--include={','.join(include)}"] if include else []
    log(f"debootstrap {name} (a few minutes, once)")
    run(["debootstrap", "--variant=minbase", *extra, "bookworm", str(tmp), DEBIAN_MIRROR], timeout=3600)
    os.replace(tmp, root)
    return root


def rootfs_layer(name: str, root: Path) -> LayerBlob:
    """One layer of a whole root filesystem with /dev, /proc and /sys empty (as real images
    have them: no device nodes in layers)."""
    return make_layer(root, ["."], CACHE / "layers" / f"{name}-rootfs.tar.gz",
                      excludes=["./dev/*", "./proc/*", "./sys/*"])


@dataclass(frozen=True)
class BenchImage:
    name: str  # repository name in the registry
    tag: str
    layers: tuple[LayerBlob, ...]
    layout: Path  # OCI layout directory (cached)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def tar_bytes(self) -> int:
        return sum(layer.tar_bytes for layer in self.layers)

    @property
    def manifest_digest(self) -> str:
        return json.loads((self.layout / "index.json").read_text())["manifests"][0]["digest"]

    def ref(self, registry: Registry) -> str:
        return f"{registry.host}/{self.name}:{self.tag}"


def _image(name: str, layers: Sequence[LayerBlob], **config) -> BenchImage:
    layout = CACHE / "layouts" / name
    stamp = layout / ".berth-bench-layers"
    wanted = ",".join(layer.digest for layer in layers)
    if not (stamp.exists() and stamp.read_text() == wanted):
        write_oci_layout(layout, "bench", layers, **config)
        stamp.write_text(wanted)
    return BenchImage(f"bench/{name}", "bench", tuple(layers), layout)


def debian_image() -> BenchImage:
    """(a) debootstrap --variant=minbase bookworm as a single-layer OCI image."""
    root = debootstrap_rootfs("debian")
    return _image("debian", [rootfs_layer("debian", root)])


def _copy_tree(source: str, staging: Path, dest: str) -> None:
    target = staging / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", source, str(target)])


def multi_image() -> BenchImage:
    """(b) 300+ MB in five layers: the debian base, then copies of host trees, with deletions.

    Layer 2: /usr/lib/python3.11 at /opt/python3.11. Layer 3: /usr/share/doc at /opt/doc.
    Layer 4: /usr/share/perl and /usr/share/i18n, plus whiteouts deleting the base's
    /usr/share/zoneinfo and layer 2's /opt/python3.11/email, and an opaque /opt/doc/python3.11
    directory. Layer 5: /usr/share/vim at /opt/vim and a whiteout of /opt/doc/bash.
    """
    base = rootfs_layer("debian", debootstrap_rootfs("debian"))
    layers = [base]
    staging_root = CACHE / "staging" / "multi"
    specs = [
        ("multi-2", [("/usr/lib/python3.11", "/opt/python3.11")], [], []),
        ("multi-3", [("/usr/share/doc", "/opt/doc")], [], []),
        ("multi-4", [("/usr/share/perl", "/opt/perl"), ("/usr/share/i18n", "/opt/i18n")],
         ["usr/share/.wh.zoneinfo", "opt/python3.11/.wh.email"], ["opt/doc/python3.11"]),
        ("multi-5", [("/usr/share/vim", "/opt/vim")], ["opt/doc/.wh.bash"], []),
    ]
    for name, copies, whiteouts, opaque in specs:
        out = CACHE / "layers" / f"{name}.tar.gz"
        cached = _cached_layer(out)
        if cached is None:
            staging = staging_root / name
            rm_tree(staging)
            staging.mkdir(parents=True)
            for source, dest in copies:
                if Path(source).exists():
                    _copy_tree(source, staging, dest)
            for whiteout in whiteouts:
                path = staging / whiteout
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            for directory in opaque:
                path = staging / directory
                path.mkdir(parents=True, exist_ok=True)
                (path / ".wh..wh..opq").touch()
                (path / "README.after-opaque").write_text("this directory was replaced by an opaque layer\n")
            layers.append(make_layer(staging, ["."], out))
            rm_tree(staging)
        else:
            layers.append(cached)
    return _image("multi", layers)


def storm_tree(root: Path, modules: int) -> None:
    """``modules`` tiny modules in 30 subpackages of package ``storm`` plus ``storm.all``
    importing every one, compiled to .pyc (as images ship them)."""
    package = root / "storm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    per_package = max(1, modules // 30)
    names = []
    for index in range(modules):
        sub = package / f"sub{index // per_package:02d}"
        if not sub.exists():
            sub.mkdir()
            (sub / "__init__.py").write_text("")
        (sub / f"mod{index:05d}.py").write_text(
            f'"""module {index}"""\nVALUE = {index}\n\n\ndef value():\n    return VALUE * 2\n')
        names.append(f"storm.{sub.name}.mod{index:05d}")
    (package / "all.py").write_text("".join(f"import {name}\n" for name in names) + f"COUNT = {modules}\n")


def python_image(modules: int = 3000) -> tuple[BenchImage, Path]:
    """A debootstrap minbase image with python3-minimal plus a layer holding the import-storm
    package under /opt/storm; also returns the rootfs of that image unpacked on disk."""
    root = debootstrap_rootfs("python", include=["python3-minimal"])
    base = rootfs_layer("python", root)
    out = CACHE / "layers" / f"storm-{modules}.tar.gz"
    staging = CACHE / "staging" / f"storm-{modules}"
    if not out.exists() or not (staging / "opt" / "storm" / "storm" / "all.py").exists():
        rm_tree(staging)
        storm_tree(staging / "opt" / "storm", modules)
        # byte-compile with the image's own python (same as the host's on Debian 12), so .pyc
        # files are in the layer and nothing is written at import time.
        run(["/usr/bin/python3", "-m", "compileall", "-q", str(staging / "opt" / "storm")])
        out.unlink(missing_ok=True)
    layer = make_layer(staging, ["./opt"], out)
    image = _image(f"python-storm{modules}", [base, layer], env=["PYTHONDONTWRITEBYTECODE=1"])
    return image, staging


def ensure_pushed(registry: Registry, images: Sequence[BenchImage]) -> None:
    for image in images:
        if not registry.has(image.name, image.tag, image.manifest_digest):
            log(f"pushing {image.name}:{image.tag} ({image.compressed_bytes / 1e6:.0f} MB compressed)")
            registry.push_layout(image.layout, image.tag, image.name)


def registry_storage() -> Path:
    return CACHE / "registry-storage"


def berth_config_dir(user: BenchUser, registry_hosts: Sequence[str], parent: Path) -> Path:
    """A site configuration directory marking the bench registries insecure (plain HTTP)."""
    config_dir = parent / "berth-config"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "berth.toml").write_text("".join(
        f'[[registries]]\nhost = "{host}"\ninsecure = true\n\n' for host in registry_hosts))
    user.chown_tree(config_dir)
    return config_dir


def berth_env(config_dir: Path, store: Path, state: Path | None = None) -> dict[str, str]:
    env = {"BERTH_CONFIG_DIR": str(config_dir), "BERTH_USER_STORE": str(store),
           "PATH": f"{VENV / 'bin'}:{SYSTEM_PATH}"}
    if state is not None:
        env["BERTH_STATE_DIR"] = str(state)
    return env


def ensure_cache_readable() -> None:
    """The unprivileged user reads cached layouts and rootfs trees."""
    CACHE.mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE, 0o755)


# --------------------------------------------------------------------------- kernel exec trace


@dataclass(frozen=True)
class ExecEvent:
    time_s: float  # trace clock (seconds since boot)
    kind: str  # "exec", "exit" or (system-wide traces) "fork"
    name: str  # exec: the file executed; exit, fork: the task's comm
    pid: int  # fork: the new task's
    parent_pid: int = 0  # fork: the forking task's


class ExecTrace:
    """Exec and exit events of this process's descendants, from the kernel's sched tracepoints
    (a private tracefs instance: no ptrace, so setuid helpers such as fusermount3 keep working
    and the traced programs run at full speed). Root only; mounts tracefs on a temporary
    directory when it is not mounted, and removes what it made on exit."""

    def __init__(self, *, system_wide: bool = False) -> None:
        self.mountpoint: Path | None = None
        self.instance: Path | None = None
        #: Every process of the machine, forks too (processes that are not this one's
        #: descendants: a Slurm step's, started by slurmd); the caller picks out its own by
        #: the fork tree (:func:`descendants`).
        self.system_wide = system_wide
        self.events = ("sched_process_exec", "sched_process_exit") + (("sched_process_fork",) if system_wide else ())

    @staticmethod
    def available() -> str | None:
        if os.getuid() != 0:
            return "needs root (tracefs)"
        return None

    def __enter__(self) -> Self:
        tracefs = Path("/sys/kernel/tracing")
        if not (tracefs / "instances").exists():
            self.mountpoint = Path(tempfile.mkdtemp(prefix="berth-bench-tracefs-"))
            run(["mount", "-t", "tracefs", "nodev", str(self.mountpoint)])
            tracefs = self.mountpoint
        self.instance = tracefs / "instances" / f"berth-bench-{os.getpid()}"
        self.instance.mkdir()
        (self.instance / "tracing_on").write_text("0\n")
        if self.system_wide:
            (self.instance / "buffer_size_kb").write_text("8192\n")
        else:
            (self.instance / "set_event_pid").write_text(f"{os.getpid()}\n")
            (self.instance / "options" / "event-fork").write_text("1\n")
        for event in self.events:
            (self.instance / "events" / "sched" / event / "enable").write_text("1\n")
        return self

    def start(self) -> None:
        assert self.instance is not None
        (self.instance / "trace").write_text("")
        if not self.system_wide:
            (self.instance / "set_event_pid").write_text(f"{os.getpid()}\n")
        (self.instance / "tracing_on").write_text("1\n")

    def stop(self) -> list[ExecEvent]:
        assert self.instance is not None
        (self.instance / "tracing_on").write_text("0\n")
        events = []
        for line in (self.instance / "trace").read_text(errors="replace").splitlines():
            if line.startswith("#"):
                continue
            match = re.search(
                r"\s(\d+\.\d+): sched_process_(exec|exit): (?:filename=(\S+) pid=(\d+)|comm=(.*?) pid=(\d+))", line)
            if match:
                stamp, kind, filename, exec_pid, comm, exit_pid = match.groups()
                events.append(ExecEvent(float(stamp), kind, filename or comm, int(exec_pid or exit_pid)))
                continue
            match = re.search(r"\s(\d+\.\d+): sched_process_fork: comm=(.*?) pid=(\d+) child_comm=.*? child_pid=(\d+)",
                              line)
            if match:
                stamp, comm, parent, child = match.groups()
                events.append(ExecEvent(float(stamp), "fork", comm, int(child), int(parent)))
        return events

    def __exit__(self, *exc) -> None:
        if self.instance is not None and self.instance.exists():
            (self.instance / "tracing_on").write_text("0\n")
            for event in self.events:
                (self.instance / "events" / "sched" / event / "enable").write_text("0\n")
            self.instance.rmdir()
        if self.mountpoint is not None:
            subprocess.run(["umount", str(self.mountpoint)], check=False)
            self.mountpoint.rmdir()


def descendants(events: Sequence[ExecEvent], roots: Iterable[int]) -> set[int]:
    """The pids of ``roots`` and of every task forked from them in a system-wide trace."""
    found = set(roots)
    for event in events:
        if event.kind == "fork" and event.parent_pid in found:
            found.add(event.pid)
    return found


def exec_marks(events: Sequence[ExecEvent], marks: Sequence[tuple[str, object]]) -> dict[str, float] | None:
    """The time of each mark: the first event after the previous mark that the mark's predicate
    accepts (``predicate(event) -> bool``). None when a mark is missing."""
    found: dict[str, float] = {}
    index = 0
    for name, predicate in marks:
        while index < len(events) and not predicate(events[index]):  # type: ignore[operator]
            index += 1
        if index == len(events):
            return None
        found[name] = events[index].time_s
        index += 1
    return found


def is_exec(*basenames: str):
    return lambda event: event.kind == "exec" and os.path.basename(event.name) in basenames


def is_exit(*comms: str):
    return lambda event: event.kind == "exit" and event.name in comms
