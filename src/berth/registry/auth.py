"""Registry credentials: where they come from, and berth's own auth file.

Credentials are looked up, first match wins, in (docs/contracts.md, issue 2):

1. ``$REGISTRY_AUTH_FILE`` (the containers-auth.json file podman, skopeo and buildah use);
2. berth's own file ``$XDG_CONFIG_HOME/berth/auth.json`` (default ``~/.config/berth/auth.json``),
   written by ``berth login``;
3. ``~/.docker/config.json`` (``$DOCKER_CONFIG/config.json`` when set).

All three share docker's format: ``{"auths": {"HOST": {"auth": base64("USER:PASSWORD")}}}``
(``username``/``password`` fields are accepted too). Keys may be ``host:port``, a URL such as
``https://index.docker.io/v1/`` or a host with a path; they are normalized with :func:`normalize_host`.
Docker's external credential helpers (``credsStore``/``credHelpers``) are not run: berth runs no
programs from a user's configuration while pulling.

A file someone other than the caller or root can change (:func:`refused_auth_file`) is not
read: it is skipped with a warning and named by authentication errors, and the other files
are used (docs/security.md, "credentials files and their modes").
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from berth.config.settings import home_directory, user_config_dir
from berth.errors import ConfigError, UsageError
from berth.fsutil import writers_problem
from berth.oci.names import is_registry_host
from berth.record import Record, field
from berth.untrusted import parse_json, read_named_file

#: Every name Docker Hub's registry goes by; credentials stored under any of them apply to all.
DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_KEY = "docker.io"
AUTH_FILE_MODE = 0o600
#: Auth files hold a few entries; one larger than this is no auth file (a link to /dev/zero).
MAX_AUTH_FILE_BYTES = 1 << 20
def normalize_host(name: str) -> str:
    """``https://Host:5000/v2/`` → ``host:5000``; every Docker Hub alias → ``docker.io``.

    Raises UsageError for an empty name or one with user information (``user@host``).
    """
    text = name.strip()
    for prefix in ("https://", "http://"):
        if text.lower().startswith(prefix):
            text = text[len(prefix):]
            break
    text = text.split("/", 1)[0].lower()
    if not is_registry_host(text):
        raise UsageError(
            f"{name!r} is not a registry host",
            hint="give the registry as HOST or HOST:PORT, for example 127.0.0.1:5000 or docker.io",
        )
    if text in DOCKER_HUB_NAMES:
        return DOCKER_HUB_KEY
    return text


class Entry(Record):
    """One host's credentials and the file they were read from (for error messages)."""

    username: str
    password: str
    source: str


class IgnoredFile(Record):
    """A credentials file berth did not read because someone other than the caller or root can
    change it (:func:`refused_auth_file`), or because the caller cannot read it (another
    user's private file, such as one ``sudo berth login`` leaves): ``problem`` says which
    (:func:`berth.fsutil.writers_problem`'s reason, or "not readable by you ..."), ``fix`` the
    command that makes the file usable, ``reason`` why berth goes on without it."""

    path: str
    problem: str
    fix: str
    reason: str = "berth does not use credentials another user can change"

    def warning(self) -> str:
        """What ``berth pull`` says (no credential is ever part of it)."""
        return (f"registry credentials file {self.path} is {self.problem}: {self.reason}, and goes on without this "
                f"file; {self.fix}")

    def note(self) -> str:
        """What an authentication error adds."""
        return f"registry credentials file {self.path} was ignored: it is {self.problem} ({self.fix})"


class Credentials(Record):
    """Credentials per registry host, merged from the auth files (first file wins per host).

    ``searched`` lists every file looked at, so that an authentication error can say where
    berth looked when it found nothing.
    """

    entries: Mapping[str, Entry] = field(default_factory=dict)
    searched: tuple[str, ...] = ()
    #: Hosts that docker's config sends to a credential helper berth does not run.
    helper_hosts: frozenset[str] = frozenset()
    #: What the CLI should say though credentials were loaded: files whose secrets other users
    #: may read (:func:`check_auth_file_mode`), files ignored (:attr:`ignored`).
    warnings: tuple[str, ...] = ()
    #: Files the rule refused (:func:`refused_auth_file`): not read, named by authentication errors.
    ignored: tuple[IgnoredFile, ...] = ()

    def for_host(self, host: str) -> tuple[str, str] | None:
        """``(username, password)`` for ``host`` (a registry or API host name), or None."""
        entry = self.entry(host)
        return (entry.username, entry.password) if entry else None

    def entry(self, host: str) -> Entry | None:
        try:
            key = normalize_host(host)
        except UsageError:
            return None
        return self.entries.get(key)

    def source_for(self, host: str) -> str | None:
        """The file the credentials for ``host`` come from, or None when there are none."""
        entry = self.entry(host)
        return entry.source if entry else None

    @classmethod
    def from_pairs(cls, pairs: Mapping[str, tuple[str, str]], source: str = "arguments") -> "Credentials":
        """Credentials given directly (``berth login`` validating before it saves)."""
        return cls({normalize_host(h): Entry(u, p, source) for h, (u, p) in pairs.items()}, (source,))


def berth_auth_file(environ: Mapping[str, str] | None = None) -> Path:
    """berth's own auth file: ``$XDG_CONFIG_HOME/berth/auth.json``."""
    return user_config_dir(environ) / "auth.json"


def docker_config_file(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    return home_directory(env) / ".docker" / "config.json"


def auth_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The auth files in lookup order (missing ones included; the loader skips them)."""
    env = os.environ if environ is None else environ
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    files.append(berth_auth_file(env))
    files.append(docker_config_file(env))
    return files


def refused_auth_file(path: Path, info: os.stat_result, uid: int | None = None, *,
                      acl: int | str | None = None) -> IgnoredFile | None:
    """The rule for a registry credentials file (docs/security.md, as ssh judges its own files):
    refused when someone other than the caller (``uid``, default this process's user) or root
    can change it, by the one rule CDI specs are judged by (:func:`berth.fsutil.writers_problem`:
    another owner, write for others, or for a group other than root or the owner's private
    group): someone else could put credentials of their choosing there (pushes to their
    account) or take them out. A refused file is not read, and berth goes on without it (a
    public image needs no credentials); the returned IgnoredFile says why and the fix.
    ``acl``: the file's descriptor or path, for its access ACL (writers_problem)."""
    uid = os.getuid() if uid is None else uid
    problem = writers_problem(info, uid, acl=acl)
    if problem is None:
        return None
    if problem.startswith("writable through its access ACL") and info.st_uid == uid:
        fix = f"run: setfacl -b {path}; chmod 600 {path}"
    elif info.st_uid == uid:
        fix = f"run: chmod 600 {path}"
    elif info.st_uid == 0:
        fix = f"ask an administrator to run: chmod go-w {path}, or move it away"
    else:
        fix = _chown_fix(path, uid)
    return IgnoredFile(str(path), problem, fix)


def unreadable_auth_file(path: Path) -> IgnoredFile:
    """The IgnoredFile for a credentials file the caller may not read (EACCES): another user's
    private file, one ``sudo berth login`` leaves in a home directory (root's, 0600), or the
    caller's own with no read bit. It failed every pull, public images too; it is now passed
    over like a refused one, named once (review 11)."""
    uid = os.getuid()
    try:
        info = os.stat(path)
    except OSError as exc:
        return IgnoredFile(str(path), f"not readable by you ({exc.strerror})", _chown_fix(path, uid),
                           reason="berth cannot read it")
    refused = refused_auth_file(path, info, uid, acl=str(path))  # another user's: said as for a readable one
    if refused is not None:
        return refused
    problem = f"not readable by you (owned by uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})"
    fix = f"run: chmod 600 {path}" if info.st_uid == uid else _chown_fix(path, uid)
    return IgnoredFile(str(path), problem, fix, reason="berth cannot read it")


def _chown_fix(path: Path, uid: int) -> str:
    """The fix for a credentials file that is not the caller's (``uid``)."""
    return (f"if it is yours, an administrator can run: chown {_user_name(uid)} {path}; otherwise move it away "
            "(berth login writes your own)")


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_auth_file_mode(path: Path, info: os.stat_result) -> str | None:
    """A warning when group or others may read the credentials file ``info`` describes (one
    :func:`refused_auth_file` accepts): docker's and podman's files are read that way, and
    refusing them would break working setups. None when it is private."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o044:
        return (f"registry credentials file {path} can be read by other users (mode {mode:04o}): "
                f"run: chmod 600 {path}")
    return None


class _Refused(Exception):
    """Raised by read_auth_file's judge to stop before reading a refused file."""


def read_auth_file(path: Path, warnings: list[str] | None = None,
                   ignored: list[IgnoredFile] | None = None) -> dict | None:
    """The parsed JSON object of an auth file; None when it does not exist.

    Raises ConfigError naming the file when it cannot be read or is not a JSON object: silently
    ignoring a broken file would turn into a confusing "authentication required" later. With
    ``warnings`` (a list), the file is judged by its descriptor (not the path again) before
    its contents are read: one :func:`refused_auth_file` refuses, or one the caller may not
    read (:func:`unreadable_auth_file`), is not read (None is returned) and is added to
    ``ignored`` with its warning; one others may read is used with a warning
    (:func:`check_auth_file_mode`).
    """
    def judge(info: os.stat_result, fd: int) -> None:
        refused = refused_auth_file(path, info, acl=fd)
        if refused is not None:
            warnings.append(refused.warning())
            if ignored is not None:
                ignored.append(refused)
            raise _Refused
        warning = check_auth_file_mode(path, info)
        if warning:
            warnings.append(warning)

    try:
        data = read_named_file(path, what=f"registry credentials file {path}", max_bytes=MAX_AUTH_FILE_BYTES,
                               error=ConfigError, hint="replace it with a plain file, or remove it",
                               judge=judge if warnings is not None else None)
    except _Refused:
        return None
    except OSError as exc:
        # Not readable by the caller (another user's private file, such as one ``sudo berth
        # login`` left in a home directory): passed over and named, as a refused one is.
        if exc.errno == errno.EACCES and warnings is not None:
            unreadable = unreadable_auth_file(path)
            warnings.append(unreadable.warning())
            if ignored is not None:
                ignored.append(unreadable)
            return None
        raise ConfigError(
            f"cannot read registry credentials file {path}: {exc.strerror or exc}",
            hint="fix its permissions, or move it away if it is not yours",
        ) from None
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"registry credentials file {path} is not UTF-8 text", hint="fix or remove the file") from None
    if not text.strip():
        return {}
    data = parse_json(text, what=f"registry credentials file {path}", error=ConfigError,
                      hint="fix or remove the file (it holds {\"auths\": {\"HOST\": {\"auth\": \"BASE64\"}}})")
    if not isinstance(data, dict):
        raise ConfigError(f"registry credentials file {path} does not hold a JSON object",
                          hint="fix or remove the file")
    return data


def _decode_entry(path: Path, key: str, value: object) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        raise ConfigError(f"registry credentials file {path}: entry '{key}' is not an object",
                          hint="fix or remove that entry")
    auth = value.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(
                f"registry credentials file {path}: the 'auth' of '{key}' is not base64 of USER:PASSWORD",
                hint=f"log in again (berth login {key}) or fix that entry",
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise ConfigError(
                f"registry credentials file {path}: the 'auth' of '{key}' is not base64 of USER:PASSWORD",
                hint=f"log in again (berth login {key}) or fix that entry",
            )
        return username, password
    username, password = value.get("username"), value.get("password")
    if isinstance(username, str) and username and isinstance(password, str):
        return username, password
    # An empty entry (docker writes these when a credential helper holds the secret).
    return None


def load_credentials(environ: Mapping[str, str] | None = None) -> Credentials:
    """Read every auth file (see the module docstring) into one Credentials object.

    ``environ`` defaults to ``os.environ``; it decides ``HOME``, ``XDG_CONFIG_HOME``,
    ``REGISTRY_AUTH_FILE`` and ``DOCKER_CONFIG``. Raises ConfigError for a file that exists but
    cannot be read or parsed. A file someone else can change is not read: it is named in
    ``ignored`` and ``warnings``, and the others are used (a public image needs no credentials,
    and an authentication error names the file). Never contacts a registry.
    """
    entries: dict[str, Entry] = {}
    helper_hosts: set[str] = set()
    warnings: list[str] = []
    ignored: list[IgnoredFile] = []
    files = auth_files(environ)
    for path in files:
        data = read_auth_file(path, warnings, ignored)
        if not data:
            continue
        auths = data.get("auths", {})
        if not isinstance(auths, dict):
            raise ConfigError(f"registry credentials file {path}: 'auths' is not an object",
                              hint="fix or remove the file")
        for key, value in auths.items():
            try:
                host = normalize_host(key)
            except UsageError:
                continue
            pair = _decode_entry(path, key, value)
            if pair is not None and host not in entries:
                entries[host] = Entry(pair[0], pair[1], str(path))
        helpers = data.get("credHelpers")
        if isinstance(helpers, dict):
            for key in helpers:
                try:
                    helper_hosts.add(normalize_host(key))
                except UsageError:
                    continue
        if isinstance(data.get("credsStore"), str) and data["credsStore"]:
            helper_hosts.update(normalize_host(k) for k in auths if _safe_host(k))
    return Credentials(entries, tuple(str(p) for p in files), frozenset(helper_hosts - set(entries)),
                       tuple(warnings), tuple(ignored))


def _safe_host(key: str) -> bool:
    try:
        normalize_host(key)
    except UsageError:
        return False
    return True


def encode_auth(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode("utf-8")).decode("ascii")


def _write_atomically(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` with mode 0600 (in a 0700 directory), atomically.

    Raises ConfigError naming the file when it cannot be written (the old content stays).
    """
    from berth.fsutil import make_private_dirs, write_atomically

    try:
        make_private_dirs(path.parent)
        write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=AUTH_FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot write registry credentials file {path}: {exc.strerror or exc}",
                          hint="check that the directory is writable by you") from None


def _load_for_update(path: Path) -> tuple[dict, IgnoredFile | None]:
    """The auth file ``path`` to add to, judged as a pull judges it: one the rule refuses, or
    the caller cannot read, is not read and its entries are not carried over (returned as the
    IgnoredFile): written back as the caller's own 0600 file, entries someone else planted
    there would be trusted from then on (review 11)."""
    ignored: list[IgnoredFile] = []
    data = read_auth_file(path, [], ignored) or {}
    if ignored:
        return {"auths": {}}, ignored[0]
    auths = data.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"registry credentials file {path}: 'auths' is not an object",
                          hint="fix or remove the file")
    return data, None


def save_login(host: str, username: str, password: str, path: Path) -> tuple[str, IgnoredFile | None]:
    """Store credentials for ``host`` in the auth file ``path`` (berth's own, normally).

    Keeps every other entry and key of the file; the file is replaced atomically with mode
    0600 (the directory is created 0700). Returns the normalized host key written, and the
    existing file when it was passed over (:func:`_load_for_update`: its entries are gone, the
    caller says so). Raises ConfigError when the existing file is broken (it is left
    untouched) and UsageError for a username containing ':' (it could not be decoded again).
    """
    if ":" in username:
        raise UsageError(f"username '{username}' contains ':'", hint="registry usernames cannot contain ':'")
    key = normalize_host(host)
    data, passed_over = _load_for_update(path)
    auths = data["auths"]
    for alias in [k for k in auths if _safe_host(k) and normalize_host(k) == key]:
        del auths[alias]
    auths[key] = {"auth": encode_auth(username, password)}
    _write_atomically(path, data)
    return key, passed_over


def remove_login(host: str, path: Path) -> bool:
    """Remove ``host``'s credentials from ``path``; False when there were none there. Raises
    ConfigError for a file a pull passes over (:func:`_load_for_update`): written back as the
    caller's own, the rest of what someone else put there would be trusted."""
    key = normalize_host(host)
    data, passed_over = _load_for_update(path)
    if passed_over is not None:
        raise ConfigError(f"registry credentials file {path} is {passed_over.problem}: berth does not edit it, and "
                          "pulls do not use it", hint=passed_over.fix)
    auths = data["auths"]
    aliases = [k for k in auths if _safe_host(k) and normalize_host(k) == key]
    if not aliases:
        return False
    for alias in aliases:
        del auths[alias]
    _write_atomically(path, data)
    return True
