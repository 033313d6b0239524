"""Host MPI injection (berth.runtime.devices.mpi, .elf): sonames, ABI versions, the image's MPI
found in-root, and every refusal, on libraries compiled here with gcc (issue 13)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from berth.config.settings import DeviceSettings, MpiSettings, Settings
from berth.errors import ConfigError, PolicyError, UsageError
from berth.runtime.devices import elf, mpi

SOURCE = "int MPI_Get_library_version(char *v, int *n) { v[0] = 0; *n = 0; return 0; }\n"


def _library(path: Path, soname: str | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.parent / ".lib.c"
    source.write_text(SOURCE)
    subprocess.run(["gcc", "-shared", "-fPIC", *(["-Wl,-soname," + soname] if soname else []), "-o", str(path),
                    str(source)], check=True, capture_output=True)
    source.unlink()
    return path


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A host 'MPI' in its own ld.so cache: libmpich.so.12.2.2 (+cxx), a dependency, an Open MPI."""
    root = tmp_path_factory.mktemp("host")
    lib = root / "lib"
    _library(lib / "libmpich.so.12.2.2", "libmpich.so.12")
    _library(lib / "libmpichcxx.so.12.2.2", "libmpichcxx.so.12")
    _library(lib / "libfabric.so.1.18.0", "libfabric.so.1")
    _library(lib / "libmpi.so.40.30.4", "libmpi.so.40")
    (root / "ld.so.conf").write_text(f"{lib}\n")
    subprocess.run(["ldconfig", "-C", str(root / "ld.so.cache"), "-f", str(root / "ld.so.conf")], check=True,
                   capture_output=True)
    return root


def _settings(host: Path, **mpi_values) -> Settings:
    values = {"libraries": ("libmpich.so.12", "libmpichcxx.so.12"), "dependencies": ("libfabric.so.1",)}
    values.update(mpi_values)
    return Settings(devices=DeviceSettings(ld_cache=str(host / "ld.so.cache"), mount_allow=(str(host),)),
                    mpi=MpiSettings(**values))


def test_soname_is_read_from_the_elf_headers(host, tmp_path):
    assert elf.soname(str(host / "lib" / "libmpich.so.12.2.2")) == "libmpich.so.12"
    assert elf.soname(str(_library(tmp_path / "libnone.so", None))) is None
    (tmp_path / "text").write_text("not an ELF file\n")
    (tmp_path / "link").symlink_to(host / "lib" / "libmpich.so.12.2.2")
    os.mkfifo(tmp_path / "fifo")
    for name in ("text", "link", "fifo", "missing"):
        assert elf.soname(str(tmp_path / name)) is None, name


def test_a_malformed_elf_gives_none_not_an_exception(host, tmp_path):
    data = (host / "lib" / "libmpich.so.12.2.2").read_bytes()
    cases = {"truncated": data[:200], "header only": data[:64],
             "huge section table": data[:60] + (0xFFFF).to_bytes(2, "little") + data[62:],
             "section table past the end": data[:40] + (1 << 40).to_bytes(8, "little") + data[48:]}
    for name, content in cases.items():
        (tmp_path / "bad").write_bytes(content)
        assert elf.soname(str(tmp_path / "bad")) is None, name


def test_versions_come_from_the_file_name_of_the_soname():
    assert mpi.file_version("libmpich.so.12", "/usr/lib/libmpich.so.12.2.2") == (12, 2, 2)
    assert mpi.file_version("libmpi.so.12", "/opt/mpich/lib/libmpi.so.12.3.0") == (12, 3, 0)
    assert mpi.file_version("libmpi.so.12", "/lib/libmpi.so.12") is None  # only the soname: unknown
    assert mpi.file_version("libmpi.so.12", "/lib/libmpi.so.12.x") is None
    assert mpi.file_version("libmpi.so.12", "/lib/other.so.12.1.0") is None
    assert mpi.role_of("libmpich.so.12") == "C" and mpi.role_of("libmpifort.so.12") == "Fortran"
    assert mpi.role_of("libmpi.so.40") is None


def test_the_sites_mpi_becomes_edits_under_both_names(host):
    found = mpi.host_mpi(_settings(host))
    assert found.c_library == mpi.Library("libmpich.so.12", str(host / "lib" / "libmpich.so.12.2.2"), (12, 2, 2))
    mounts = {m.container_path: m.host_path for m in found.edits.mounts}
    lib = "/dev/.berth-mpi/lib"
    assert mounts == {
        f"{lib}/libmpi.so.12": str(host / "lib" / "libmpich.so.12.2.2"),
        f"{lib}/libmpich.so.12": str(host / "lib" / "libmpich.so.12.2.2"),
        f"{lib}/libmpicxx.so.12": str(host / "lib" / "libmpichcxx.so.12.2.2"),
        f"{lib}/libmpichcxx.so.12": str(host / "lib" / "libmpichcxx.so.12.2.2"),
        f"{lib}/libfabric.so.1": str(host / "lib" / "libfabric.so.1"),
    }
    assert [(op.op, op.name, op.value) for op in found.edits.env] == [("prepend", "LD_LIBRARY_PATH", lib)]
    # The one judge of edits takes them (sources under devices.mount_allow).
    from berth.runtime.devices.edits import apply_edits

    applied = apply_edits(_settings(host), [found.edits])
    assert {b.destination for b in applied.mounts} == set(mounts)


def test_site_configuration_mistakes_are_refused(host):
    with pytest.raises(UsageError, match=r"this site names no host MPI \(mpi.libraries is empty\)"):
        mpi.host_mpi(_settings(host, libraries=()))
    with pytest.raises(ConfigError, match="the site's MPI library libnot-here.so.7 is not in the ld.so cache"):
        mpi.host_mpi(_settings(host, dependencies=("libnot-here.so.7",)))
    with pytest.raises(ConfigError, match="has soname libmpi.so.40, which is not one of the MPICH ABI's"):
        mpi.host_mpi(_settings(host, libraries=("libmpi.so.40",)))
    with pytest.raises(ConfigError, match="names no MPICH-ABI C library"):
        mpi.host_mpi(_settings(host, libraries=("libmpichcxx.so.12",)))
    with pytest.raises(PolicyError, match="not under an allowed place"):
        from berth.runtime.devices.edits import apply_edits

        settings = _settings(host)
        apply_edits(Settings(devices=DeviceSettings(ld_cache=settings.devices.ld_cache)),
                    [mpi.host_mpi(settings).edits])


def _image(root: Path, files: dict[str, str | None], links: dict[str, str] = {}) -> Path:  # noqa: B006
    for name, soname in files.items():
        _library(root / name.lstrip("/"), soname)
    for name, target in links.items():
        (root / name.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / name.lstrip("/")).symlink_to(target)
    return root


def test_the_images_mpi_is_found_in_its_standard_directories_and_library_path(tmp_path):
    root = _image(tmp_path / "img", {"/usr/lib/x86_64-linux-gnu/libmpich.so.12.2.1": "libmpich.so.12",
                                     "/opt/mpich/lib/libmpi.so.12.3.0": "libmpi.so.12"},
                  {"/usr/lib/x86_64-linux-gnu/libmpich.so.12": "libmpich.so.12.2.1",
                   "/opt/mpich/lib/libmpi.so.12": "/opt/mpich/lib/libmpi.so.12.3.0"})
    family, other = mpi.image_mpi(str(root))
    assert family == {"C": mpi.Library("libmpich.so.12", "/usr/lib/x86_64-linux-gnu/libmpich.so.12.2.1", (12, 2, 1))}
    assert other is None
    # LD_LIBRARY_PATH comes first, as for the loader (berth's own directory is skipped).
    family, _ = mpi.image_mpi(str(root), ["/dev/.berth-mpi/lib", "/opt/mpich/lib"])
    assert family["C"] == mpi.Library("libmpi.so.12", "/opt/mpich/lib/libmpi.so.12.3.0", (12, 3, 0))


def test_image_links_are_followed_inside_the_image_only(tmp_path, host):
    """A link to an absolute host path lands in the image root: the host's library is not the
    image's, and a link out with '..' stops at the image's root."""
    root = _image(tmp_path / "img", {}, {
        "/usr/lib/x86_64-linux-gnu/libmpich.so.12": str(host / "lib" / "libmpich.so.12.2.2"),
        "/usr/lib/libmpi.so.12": "../../../../../../../" + str(host / "lib" / "libmpich.so.12.2.2")})
    assert mpi.image_mpi(str(root)) == ({}, None)


def test_an_image_directory_linked_to_a_host_path_is_listed_in_root(tmp_path, host, monkeypatch):
    """The image's /usr/lib64 -> HOST/lib (absolute) is the image's HOST/lib: berth lists that
    directory of the image, never the host's, and finds the other MPI the image has there."""
    hostlib = str(host / "lib")
    root = _image(tmp_path / "img", {hostlib + "/libmpi.so.40.1.0": "libmpi.so.40"}, {"/usr/lib64": hostlib})
    listed = []
    real_glob = mpi.glob.glob
    monkeypatch.setattr(mpi.glob, "glob", lambda pattern: listed.append(pattern) or real_glob(pattern))
    family, other = mpi.image_mpi(str(root))
    assert family == {}
    assert other == mpi.Library("libmpi.so.40", hostlib + "/libmpi.so.40.1.0", (40, 1, 0))
    outside = [p for p in listed if not os.path.realpath(os.path.dirname(p)).startswith(str(root) + "/")]
    assert listed and outside == []


def _ld_cache(entries: dict[str, str]) -> bytes:
    """A glibc-ld.so.cache1.1 file (dl-cache.h) for x86-64 with ``entries`` soname -> path."""
    import struct

    strings = b""
    offsets = []
    base = 48 + 24 * len(entries)
    for name, path in entries.items():
        offsets.append((base + len(strings), base + len(strings) + len(name) + 1))
        strings += name.encode() + b"\0" + path.encode() + b"\0"
    header = struct.pack("<20sIIB3xI12x", b"glibc-ld.so.cache1.1", len(entries), len(strings), 0, 0)
    table = b"".join(struct.pack("<iIIIQ", 0x0303, key, value, 0, 0) for key, value in offsets)
    return header + table + strings


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the cache's entries are written for x86-64")
def test_the_images_own_ld_cache_is_read_in_root(tmp_path, host):
    root = _image(tmp_path / "img", {"/opt/m/lib/libmpich.so.12.1.0": "libmpich.so.12"})
    (root / "etc").mkdir()
    (root / "etc" / "ld.so.cache").write_bytes(_ld_cache({"libmpich.so.12": "/opt/m/lib/libmpich.so.12.1.0"}))
    family, _ = mpi.image_mpi(str(root))
    assert family == {"C": mpi.Library("libmpich.so.12", "/opt/m/lib/libmpich.so.12.1.0", (12, 1, 0))}
    # A cache entry naming a host file (with '..' to climb out) is resolved inside the image.
    host_file = str(host / "lib" / "libmpich.so.12.2.2")
    (root / "etc" / "ld.so.cache").write_bytes(_ld_cache({"libmpich.so.12": "/../../../.." + host_file}))
    assert mpi.image_mpi(str(root)) == ({}, None)
    (root / "etc" / "ld.so.cache").write_bytes(b"garbage")
    assert mpi.image_mpi(str(root)) == ({}, None)
    (root / "etc" / "ld.so.cache").unlink()
    (root / "etc" / "ld.so.cache").symlink_to("/etc/ld.so.cache")  # the host's: read in-root (missing)
    assert mpi.image_mpi(str(root)) == ({}, None)


def test_refusals_name_both_sides(host, tmp_path):
    site = mpi.host_mpi(_settings(host))
    openmpi = _image(tmp_path / "ompi", {"/usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4": "libmpi.so.40"},
                     {"/usr/lib/x86_64-linux-gnu/libmpi.so.40": "libmpi.so.40.30.4"})
    family, other = mpi.image_mpi(str(openmpi))
    with pytest.raises(UsageError) as refused:
        mpi.check(site, family, other, image_name="ompi:4")
    assert refused.value.message == (
        "--mpi host: image ompi:4 has libmpi.so.40.30.4 at /usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4, another "
        "MPI's ABI (soname libmpi.so.40), not the MPICH ABI (libmpi.so.12) of the site's MPI libmpich.so.12.2.2 "
        "(MPICH ABI 12.2.2)")
    # An Open MPI library named like MPICH's is still Open MPI (its ELF soname decides).
    disguised = _image(tmp_path / "disguised", {"/usr/lib/libmpi.so.12": "libmpi.so.40"})
    with pytest.raises(UsageError, match="another MPI's ABI \\(soname libmpi.so.40\\)"):
        mpi.check(site, *mpi.image_mpi(str(disguised)), image_name="x")
    with pytest.raises(UsageError, match="image empty has no MPI library"):
        mpi.check(site, {}, None, image_name="empty")
    newer = _image(tmp_path / "newer", {"/usr/lib/libmpi.so.12.3.0": "libmpi.so.12"},
                   {"/usr/lib/libmpi.so.12": "libmpi.so.12.3.0"})
    with pytest.raises(UsageError) as refused:
        mpi.check(site, *mpi.image_mpi(str(newer)), image_name="new:1")
    assert refused.value.message.startswith(
        "--mpi host: the site's MPI libmpich.so.12.2.2 (MPICH ABI 12.2.2) is older than image new:1's "
        "libmpi.so.12.3.0 (MPICH ABI 12.3.0)")


def test_compatible_images_pass_with_notes_where_a_version_is_unknown(host, tmp_path):
    site = mpi.host_mpi(_settings(host))
    older = _image(tmp_path / "older", {"/usr/lib/libmpi.so.12.1.9": "libmpi.so.12",
                                        "/usr/lib/libmpifort.so.12.1.9": "libmpifort.so.12"},
                   {"/usr/lib/libmpi.so.12": "libmpi.so.12.1.9", "/usr/lib/libmpifort.so.12": "libmpifort.so.12.1.9"})
    notes = mpi.check(site, *mpi.image_mpi(str(older)), image_name="old")
    assert notes == ["--mpi host: the site's MPI has no Fortran library: the image's /usr/lib/libmpifort.so.12.1.9 "
                     "stays"]
    same_minor = _image(tmp_path / "same", {"/usr/lib/libmpich.so.12.2.9": "libmpich.so.12"},
                        {"/usr/lib/libmpich.so.12": "libmpich.so.12.2.9"})
    assert mpi.check(site, *mpi.image_mpi(str(same_minor)), image_name="s") == []
    unknown = _image(tmp_path / "unknown", {"/usr/lib/libmpich.so.12": "libmpich.so.12"})
    assert mpi.check(site, *mpi.image_mpi(str(unknown)), image_name="u") == [
        "--mpi host: the ABI version of the image's C library is not in its file name; the soname libmpich.so.12 "
        "alone decides"]


def test_host_libraries_are_bound_over_the_images_files_judged_like_any_destination(host, tmp_path):
    from berth.runtime.devices.edits import apply_edits

    settings = _settings(host)
    site = mpi.host_mpi(settings)
    judged = apply_edits(settings, [site.edits]).mounts
    image = {"C": mpi.Library("libmpich.so.12", "/usr/lib/libmpich.so.12.2.1", (12, 2, 1))}
    binds = mpi.image_binds(judged, site, image, deny=("/etc/passwd",))
    c_bind = next(b for b in judged if b.destination.endswith("/libmpi.so.12"))
    assert binds == [c_bind._replace(destination="/usr/lib/libmpich.so.12.2.1")]
    assert binds[0].identity == c_bind.identity and binds[0].read_only
    with pytest.raises(PolicyError, match="mounting over /etc/passwd"):
        mpi.image_binds(judged, site, {"C": image["C"]._replace(path="/etc/passwd")}, deny=("/etc/passwd",))
    # An image's library file under /proc, /sys or /dev (its own files there) is refused even
    # where the site denies nothing: berth mounts those filesystems itself.
    for path in ("/proc/libmpi.so.12", "/sys/x/libmpi.so.12", "/dev/shm/libmpi.so.12"):
        with pytest.raises(PolicyError, match="not allowed"):
            mpi.image_binds(judged, site, {"C": image["C"]._replace(path=path)}, deny=())


def test_doctor_names_the_sites_mpi_or_why_it_cannot_be_injected(host):
    from berth.runtime.doctor import check_mpi

    check = check_mpi(_settings(host))
    assert check.ok and check.detail == ("C libmpich.so.12.2.2 (MPICH ABI 12.2.2), C++ libmpichcxx.so.12.2.2 "
                                         "(MPICH ABI 12.2.2); 3 libraries injected, 0 device(s)")
    assert check_mpi(Settings()).detail == "none configured ([mpi] libraries): --mpi host is refused"
    broken = check_mpi(_settings(host, dependencies=("libnot-here.so.7",)))
    assert not broken.ok and "libnot-here.so.7 is not in the ld.so cache" in broken.detail
