"""Host MPI injection (``--mpi host``): the site's MPICH-ABI MPI replaces the image's (issue 13,
DESIGN.md direction 15; the Sarus/Shifter "MPI hook").

The site names its MPI in ``[mpi]`` (berth.config.settings.MpiSettings): the MPICH-ABI
libraries and the libraries they need, as sonames of the host's ld.so cache, plus fabric
devices and configuration files. Like the GPU driver's files, they become container edits
(berth.runtime.devices.edits, judged by the one ``apply_edits``): each library bind-mounted
read-only at ``/dev/.berth-mpi/lib/NAME`` and ``LD_LIBRARY_PATH`` prepended with that
directory, so nothing is written into the image; the devices as device nodes; the files at
their own path. Then, with the image at hand (:func:`image_binds`), the image's own MPI
libraries are found and **checked against the host's** before anything runs, and the host's
libraries are also bind-mounted over the image's files, so that a program whose ``RPATH``
names the image's MPI directory (``mpicc`` adds one for MPICH installed under ``/opt``) or
that clears ``LD_LIBRARY_PATH`` loads the host's MPI all the same.

Compatibility (what is decided, and how versions are read):

- The MPICH ABI (MPICH ABI Compatibility Initiative: MPICH >= 3.1, Intel MPI >= 5, Cray MPT,
  MVAPICH2 >= 2.0, ...) is the soname major 12 of three libraries, each known under two names:
  C ``libmpi.so.12`` (``libmpich.so.12`` as MPICH itself and Debian name it), C++
  ``libmpicxx.so.12`` / ``libmpichcxx.so.12``, Fortran ``libmpifort.so.12`` /
  ``libmpichfort.so.12``. A program linked against either name gets the host library under
  both.
- Sonames are read from the libraries' ELF ``DT_SONAME`` (berth.runtime.devices.elf), not from
  file names: an image's ``libmpi.so.12`` that is really Open MPI's ``libmpi.so.40`` is Open MPI.
- The ABI version is the libtool version in the name of the file the soname resolves to:
  ``libmpich.so.12.2.2`` is 12.2.2. Within major 12, the second number counts the interfaces
  added (MPICH 3.x: 12.1, 4.0: 12.2, 4.1: 12.3), so the host's must be at least the image's:
  a program built against a newer MPICH may call functions an older host library lacks. The
  third number (bug-fix releases) does not decide. A library whose file is named only by its
  soname has no readable version; the check then rests on the soname, and berth says so. (The
  product version, MPICH's ``MPICH_VERSION`` string, is not compared: Intel MPI, Cray MPICH and
  MVAPICH count their own releases, while the libtool version is the ABI's.)
- The image's MPI is looked for as the loader would: in the directories of the container's
  ``LD_LIBRARY_PATH``, the image's own ``/etc/ld.so.cache``, then the standard library
  directories. Image paths are hostile: every path (the cache's entries, links) is resolved
  inside the image root (berth.runtime.rootfs.resolve_in_root), files are opened without
  following a last link and must be regular ELF files, and the container paths that the host
  libraries are mounted over are judged like every mount destination.

Refused (UsageError naming both sides): an image without the MPICH ABI's C library (no MPI, or
another ABI such as Open MPI's ``libmpi.so.40``), and a host ABI older than the image's.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
from collections.abc import Sequence

from berth.config.settings import EnvOp
from berth.errors import ConfigError, UsageError
from berth.namedtuple import NamedTuple
from berth.runtime import policy, rootfs, spec
from berth.runtime.devices import elf
from berth.runtime.devices.edits import MPI_DIR, ContainerEdits, Mount, existing_devices
from berth.untrusted import read_regular_file

ABI_MAJOR = 12
#: The MPICH ABI's libraries by role, each under its two names (module docstring).
FAMILY = {
    "C": ("libmpi.so.12", "libmpich.so.12"),
    "C++": ("libmpicxx.so.12", "libmpichcxx.so.12"),
    "Fortran": ("libmpifort.so.12", "libmpichfort.so.12"),
}
#: Other MPIs' C libraries, to name what an image has instead (Open MPI: libmpi.so.40).
_OTHER_MPI = re.compile(r"libmpi(ch)?\.so\.\d+")
#: Where the loader looks after its cache (glibc's trusted directories, multiarch first).
STANDARD_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                     "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib")
#: Container paths an image's library may never be bound over (berth mounts them itself).
KERNEL_FILESYSTEMS = ("/proc", "/sys", "/dev")
#: The largest image ld.so cache berth reads (Debian's is ~30 KiB).
MAX_IMAGE_CACHE_BYTES = 4 << 20
_ADMIN = "ask your site administrator ([mpi] in docs/mpi.md)"
_WITHOUT = "or run the image's own MPI: leave out --mpi host"


class Library(NamedTuple):
    """One MPI library: its ``DT_SONAME``, the file (host: real path; image: container path
    resolved in-root) and the ABI version from the file's name (None: not in the name)."""

    soname: str
    path: str
    version: tuple[int, ...] | None

    def describe(self) -> str:
        name = posixpath.basename(self.path)
        return name if name.startswith(self.soname) else f"{name} (soname {self.soname})"

    def version_text(self) -> str:
        return ".".join(map(str, self.version)) if self.version else "unknown"


def role_of(soname: str) -> str | None:
    return next((role for role, names in FAMILY.items() if soname in names), None)


def file_version(soname: str, path: str) -> tuple[int, ...] | None:
    """``libmpich.so.12.2.2`` of soname ``libmpich.so.12`` -> (12, 2, 2); None when the file
    name does not extend the soname with numbers."""
    name = posixpath.basename(path)
    stem = soname.rsplit(".so.", 1)[0] + ".so."
    if name == soname or not name.startswith(soname) or not re.fullmatch(r"\d+(\.\d+){0,3}", name[len(stem):]):
        return None
    return tuple(int(part) for part in name[len(stem):].split("."))


class HostMpi(NamedTuple):
    """The site's MPI on this node: its family libraries by role, and the edits that inject it."""

    family: tuple[tuple[str, Library], ...]
    edits: ContainerEdits

    @property
    def c_library(self) -> Library:
        return dict(self.family)["C"]


def host_mpi(settings, *, what: str = "--mpi host") -> HostMpi:
    """The site's MPI (``[mpi]``) found on this node, and its container edits (unjudged).
    Raises UsageError when the site names none, ConfigError when a named library is missing
    from the ld.so cache or the family has no C library."""
    from berth.runtime.devices import ldcache

    config = settings.mpi
    if not config.libraries:
        raise UsageError(f"{what}: this site names no host MPI (mpi.libraries is empty)",
                         hint=f"{_ADMIN}, {_WITHOUT}")
    cache = ldcache.read(settings.devices.ld_cache)
    found: list[tuple[str, str]] = []
    for group in (config.libraries, config.dependencies):
        for name in group:
            matches = ldcache.find(cache, [name])
            if not matches:
                raise ConfigError(f"{what}: the site's MPI library {name} is not in the ld.so cache "
                                  f"{settings.devices.ld_cache} of this node", hint=_ADMIN)
            found += matches
    family: dict[str, Library] = {}
    for name, path in ldcache.find(cache, config.libraries):
        real = os.path.realpath(path)
        soname = elf.soname(real) or name
        role = role_of(soname)
        if role is None:
            raise ConfigError(f"{what}: the site's MPI library {name} ({real}) has soname {soname}, which is "
                              f"not one of the MPICH ABI's ({', '.join(n for names in FAMILY.values() for n in names)})",
                              hint=f"{_ADMIN}: list MPICH-ABI libraries in mpi.libraries, others in mpi.dependencies")
        family.setdefault(role, Library(soname, real, file_version(soname, real)))
    if "C" not in family:
        raise ConfigError(f"{what}: mpi.libraries names no MPICH-ABI C library ({' or '.join(FAMILY['C'])})",
                          hint=_ADMIN)
    lib_dir = f"{MPI_DIR}/lib"
    mounts: list[Mount] = []
    for role, library in family.items():
        mounts += [Mount(library.path, f"{lib_dir}/{alias}") for alias in FAMILY[role]]
    family_paths = {library.path for library in family.values()}
    for name, path in found:
        if os.path.realpath(path) not in family_paths:
            mounts.append(Mount(path, f"{lib_dir}/{name}"))
    for path in config.files:
        if os.path.exists(path):
            mounts.append(Mount(path, path))
    nodes = existing_devices(settings, config.devices)
    edits = ContainerEdits(f"{what} (the site's MPI, [mpi])", tuple(nodes), tuple(mounts),
                           (EnvOp("prepend", "LD_LIBRARY_PATH", lib_dir),))
    return HostMpi(tuple(family.items()), edits)


# --------------------------------------------------------------------------------------------
# The image's side.


def _image_cache(root: str) -> dict[str, str]:
    """The image's ld.so cache (soname -> container path), {} when missing or unreadable."""
    from berth.runtime.devices import ldcache

    resolved, exists = rootfs.resolve_in_root(root, "/etc/ld.so.cache")
    if not exists:
        return {}
    data = read_regular_file(os.path.join(root, resolved.lstrip("/")), MAX_IMAGE_CACHE_BYTES)
    if data is None:
        return {}
    try:
        return ldcache.parse(data, "the image's /etc/ld.so.cache")
    except ConfigError:
        return {}


def _image_library(root: str, path: str) -> Library | None:
    """The library at container ``path`` (links followed in-root), or None (missing, not ELF)."""
    resolved, exists = rootfs.resolve_in_root(root, path)
    if not exists:
        return None
    soname = elf.soname(os.path.join(root, resolved.lstrip("/")))
    if soname is None:
        return None
    return Library(soname, resolved, file_version(soname, resolved))


def image_mpi(root: str, library_path: Sequence[str] = ()) -> tuple[dict[str, Library], Library | None]:
    """The image's MPICH-ABI libraries by role, and another MPI's C library when it has no
    MPICH-ABI one (for the message). ``library_path``: the container's LD_LIBRARY_PATH dirs."""
    cache = _image_cache(root)
    directories = [d for d in library_path if d.startswith("/") and not d.startswith(MPI_DIR)]
    family: dict[str, Library] = {}
    other: Library | None = None

    def candidates(name: str) -> list[str]:
        paths = [posixpath.join(d, name) for d in directories]
        if name in cache:
            paths.append(cache[name])
        return paths + [posixpath.join(d, name) for d in STANDARD_LIB_DIRS]

    for role, names in FAMILY.items():
        for name in names:
            library = next((lib for lib in map(lambda p: _image_library(root, p), candidates(name)) if lib), None)
            if library is None:
                continue
            if role_of(library.soname) == role:
                family.setdefault(role, library)
            elif other is None:
                other = library
    if "C" not in family and other is None:
        for name in sorted(n for n in cache if _OTHER_MPI.fullmatch(n)):
            other = _image_library(root, cache[name])
            if other:
                break
        if other is None:
            for directory in STANDARD_LIB_DIRS:
                # The directory's links are resolved in-root first: the image's /usr/lib64 ->
                # /some/host/dir must not make berth list a host directory.
                resolved, exists = rootfs.resolve_in_root(root, directory)
                if not exists:
                    continue
                matches = sorted(glob.glob(os.path.join(glob.escape(os.path.join(root, resolved.lstrip("/"))),
                                                        "libmpi.so.[0-9]*")))
                for match in matches:
                    other = _image_library(root, posixpath.join(resolved, os.path.basename(match)))
                    if other:
                        break
                if other:
                    break
    return family, other


def check(host: HostMpi, image: dict[str, Library], other: Library | None, *, image_name: str,
          what: str = "--mpi host") -> list[str]:
    """Refuse (UsageError naming both sides) what does not fit; return notes for the user."""
    mine = host.c_library
    site = f"the site's MPI {mine.describe()} (MPICH ABI {mine.version_text()})"
    theirs = image.get("C")
    if theirs is None:
        if other is not None:
            raise UsageError(f"{what}: image {image_name} has {other.describe()} at {other.path}, another MPI's ABI "
                             f"(soname {other.soname}), not the MPICH ABI (libmpi.so.{ABI_MAJOR}) of {site}",
                             hint="use an image built with an MPICH-ABI MPI (MPICH, Intel MPI, Cray MPICH, "
                                  f"MVAPICH), {_WITHOUT}")
        raise UsageError(f"{what}: image {image_name} has no MPI library ({' or '.join(FAMILY['C'])} in its "
                         f"LD_LIBRARY_PATH, ld.so cache or {', '.join(STANDARD_LIB_DIRS[:2])}, ...): nothing to "
                         f"replace with {site}", hint=f"build the image with an MPICH-ABI MPI, {_WITHOUT}")
    notes = []
    for role, library in image.items():
        host_library = dict(host.family).get(role)
        if host_library is None:
            notes.append(f"{what}: the site's MPI has no {role} library: the image's {library.path} stays")
            continue
        if library.version is None or host_library.version is None:
            notes.append(f"{what}: the ABI version of {'the image' if library.version is None else 'the host'}'s "
                         f"{role} library is not in its file name; the soname {library.soname} alone decides")
            continue
        if host_library.version[1:2] < library.version[1:2]:
            raise UsageError(f"{what}: {site} is older than image {image_name}'s {library.describe()} "
                             f"(MPICH ABI {library.version_text()}): programs built against the image's MPI may "
                             f"call functions the host's lacks",
                             hint=f"ask your site administrator for a newer host MPI, {_WITHOUT}")
    return notes


def image_binds(request_mounts: Sequence[spec.BindMount], host: HostMpi, image: dict[str, Library], *,
                deny, what: str = "--mpi host") -> list[spec.BindMount]:
    """Binds of the host's family libraries over the image's own files (module docstring),
    copied from the judged mounts at MPI_DIR (same source and identity); destinations judged."""
    by_destination = {m.destination: m for m in request_mounts}
    binds = []
    for role, library in image.items():
        judged = by_destination.get(f"{MPI_DIR}/lib/{FAMILY[role][0]}")
        if judged is None:
            continue
        # Never onto the kernel filesystems berth mounts itself, whatever the site's deny list says.
        destination = policy.check_destination(library.path, what=f"{what}: the image's {library.path}",
                                               deny=(*deny, *KERNEL_FILESYSTEMS))
        binds.append(judged._replace(destination=destination))
    return binds
