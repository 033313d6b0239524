"""The caller's identity inside the container: passwd/group files and identity variables.

DESIGN.md decision 6: the command runs with the caller's uid and gid and finds its own entry
in /etc/passwd and /etc/group, without rebuilding the image. berth writes new files made of
the image's own entries plus the caller's and bind-mounts them over the image's.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Mapping

from berth.config.settings import home_directory
from berth.namedtuple import NamedTuple

#: An image's passwd/group larger than this is not read (hostile image); the caller's entry
#: is still written.
MAX_DATABASE_BYTES = 4 << 20


class Caller(NamedTuple):
    """Who runs the container, from the host's databases (and ``$HOME``)."""

    name: str
    uid: int
    gid: int
    group_name: str
    #: The home (berth.config.settings.home_directory): mounted, HOME and the passwd entry inside.
    home: str
    shell: str
    gecos: str = ""
    #: The passwd entry's directory, when there is one (the site's own word: never judged).
    passwd_home: str | None = None

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> "Caller":
        environ = os.environ if environ is None else environ
        uid, gid = os.getuid(), os.getgid()
        try:
            entry = pwd.getpwuid(uid)
            name, passwd_home, shell, gecos = entry.pw_name, entry.pw_dir, entry.pw_shell, entry.pw_gecos
        except KeyError:
            name, passwd_home, shell, gecos = f"u{uid}", None, "/bin/sh", ""
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = f"g{gid}"
        return cls(name, uid, gid, group_name, str(home_directory(environ, passwd_home)), shell,
                   gecos.replace(":", " "), passwd_home)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def passwd_text(image_passwd: str, caller: Caller, *, as_root: bool, shell_exists) -> str:
    """The image's passwd entries plus the caller's, replacing any entry with its name or uid.

    ``as_root`` (--remap-root): the caller is uid 0 inside, so the image's root entry stays and
    the caller's name is not added. ``shell_exists(path) -> bool`` tells whether the caller's
    login shell exists in the image (else /bin/sh).
    """
    kept = []
    for line in _lines(image_passwd):
        fields = line.split(":")
        if as_root:
            kept.append(line)
            continue
        if len(fields) >= 3 and (fields[0] == caller.name or fields[2] == str(caller.uid)):
            continue
        kept.append(line)
    if as_root:
        if not any(line.split(":")[2:3] == ["0"] for line in kept):
            kept.insert(0, "root:x:0:0:root:/root:/bin/sh")
    else:
        shell = caller.shell if caller.shell and shell_exists(caller.shell) else "/bin/sh"
        kept.append(f"{caller.name}:x:{caller.uid}:{caller.gid}:{caller.gecos}:{caller.home}:{shell}")
    return "\n".join(kept) + "\n"


def group_text(image_group: str, caller: Caller, *, as_root: bool) -> str:
    """The image's group entries plus the caller's primary group (same replacement rules)."""
    kept = []
    for line in _lines(image_group):
        fields = line.split(":")
        if not as_root and len(fields) >= 3 and (fields[0] == caller.group_name or fields[2] == str(caller.gid)):
            continue
        kept.append(line)
    if as_root:
        if not any(line.split(":")[2:3] == ["0"] for line in kept):
            kept.insert(0, "root:x:0:")
    else:
        kept.append(f"{caller.group_name}:x:{caller.gid}:{caller.name}")
    return "\n".join(kept) + "\n"


def read_image_file(host_path: str) -> str:
    """Read a small text file of the image ('' when missing, unreadable or absurdly large)."""
    # O_NONBLOCK and a regular-file check: a hostile image may make /etc/passwd a FIFO.
    try:
        fd = os.open(host_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        data = os.read(fd, MAX_DATABASE_BYTES + 1)
    except OSError:
        return ""
    finally:
        os.close(fd)
    if len(data) > MAX_DATABASE_BYTES:
        return ""
    return data.decode("utf-8", "replace")


def identity_env(caller: Caller, *, as_root: bool, home_in_container: str) -> dict[str, str]:
    """HOME, USER, LOGNAME as a login would set them."""
    name = "root" if as_root else caller.name
    return {"HOME": home_in_container, "USER": name, "LOGNAME": name}
