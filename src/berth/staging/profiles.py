"""S3 endpoints and credentials: where they come from, and the rules for files holding secrets.

A profile is resolved on the machine that transfers (the login node for ``berth stage``, the
job's first node for a job) from the user's own files and environment; only its *name* is ever
recorded. Sources, first match wins for each value:

1. credentials: with ``--s3-profile NAME`` that profile (berth's file, else the AWS files; an
   unknown name is an error). Without it: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
   (``AWS_SESSION_TOKEN``), else profile ``$AWS_PROFILE`` or ``default`` from berth's file, else
   from ``~/.aws/credentials`` / ``~/.aws/config``; none at all: anonymous requests.
2. endpoint: the profile's ``endpoint`` (berth) or ``endpoint_url`` (AWS config), else
   ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else the site's ``s3_endpoint``, else AWS.
3. region, addressing style, CA bundle likewise (``AWS_REGION``/``AWS_DEFAULT_REGION``,
   ``AWS_CA_BUNDLE``, site ``s3_ca_bundle``).

berth's file is ``$XDG_CONFIG_HOME/berth/s3.toml`` (default ``~/.config/berth/s3.toml``), one
table per profile::

    [default]
    endpoint = "https://s3.example.org"
    region = "us-east-1"
    access_key = "AKIA..."
    secret_key = "..."
    addressing_style = "path"        # path | virtual | auto
    ca_bundle = "/etc/ssl/site-ca.pem"
    multipart_threshold = "64M"      # sizes as config/units.py reads them
    multipart_chunksize = "16M"
    max_concurrency = 16
    timeout_s = 60

A file that holds a secret (berth's file always; ``~/.aws/credentials``; ``~/.aws/config`` when it
holds a secret key) is read only if it is a regular file owned by the caller and readable by
the owner alone: a shared cluster is not a laptop, so a group- or world-readable one is refused
with the exact ``chmod`` to run. The file is checked on the open descriptor (no check-then-open
race) and its text parsed from the same read.
"""

from __future__ import annotations

import configparser
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from berth.config.settings import home_directory, user_config_dir
from berth.errors import ConfigError
from berth.record import Record, field

DEFAULT_PROFILE = "default"
DEFAULT_MULTIPART_THRESHOLD = 8 << 20
DEFAULT_MULTIPART_CHUNKSIZE = 8 << 20
DEFAULT_MAX_CONCURRENCY = 16
DEFAULT_TIMEOUT_S = 60
ADDRESSING_STYLES = ("path", "virtual", "auto")
_PROFILE_KEYS = ("endpoint", "region", "access_key", "secret_key", "session_token", "addressing_style",
                 "ca_bundle", "multipart_threshold", "multipart_chunksize", "max_concurrency", "timeout_s")
_PROFILE_DOC = "profile keys and sources: docs/staging.md"


class S3Profile(Record):
    """Everything needed to talk to one S3 service. ``repr`` never shows the secrets."""

    name: str
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    addressing_style: str = "auto"
    ca_bundle: str | None = None
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    timeout_s: int = DEFAULT_TIMEOUT_S
    #: Where the credentials came from (a file or "environment"), for messages: never the keys.
    credentials_source: str = "none (anonymous)"

    @property
    def anonymous(self) -> bool:
        return not (self.access_key and self.secret_key)

    def describe(self) -> str:
        return f"profile '{self.name}' (credentials from {self.credentials_source}, " \
               f"endpoint {self.endpoint or 'AWS default'})"


def berth_profiles_file(environ: Mapping[str, str]) -> Path:
    return user_config_dir(environ) / "s3.toml"


def aws_files(environ: Mapping[str, str]) -> tuple[Path, Path]:
    home = home_directory(environ)
    credentials = Path(environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")
    config = Path(environ.get("AWS_CONFIG_FILE") or home / ".aws" / "config")
    return credentials, config


def read_secret_file(path: Path, *, uid: int | None = None) -> str | None:
    """The text of ``path`` if it is private to ``uid`` (the caller); None if it does not exist.

    Raises ConfigError when it is not a regular file, belongs to someone else, or can be read
    by group or others; the hint says the exact command that fixes it.
    """
    uid = os.getuid() if uid is None else uid
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied", hint=f"it must be your own file: chmod 600 {path}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path} is not a regular file", hint="credentials must be in a plain file")
        if info.st_uid != uid:
            raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to you (uid {uid}): berth does not "
                              "read credentials from another user's file",
                              hint=f"keep your own copy: cp {path} ~/.config/berth/s3.toml, then chmod 600 it")
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise ConfigError(f"{path} holds secrets but is readable by others (mode {mode:04o}): "
                              "berth refuses to use it",
                              hint=f"run: chmod 600 {path}")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > 1 << 20:
                raise ConfigError(f"{path} is larger than 1 MiB: not a credentials file")
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None


def _parse_berth_file(path: Path, text: str) -> dict[str, dict]:
    import tomllib

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}", hint=_PROFILE_DOC) from None
    for name, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{name}' must be a table ([{name}]) of profile keys", hint=_PROFILE_DOC)
        for key, value in table.items():
            if key not in _PROFILE_KEYS:
                raise ConfigError(f"{path}: [{name}] {key}: unknown key",
                                  hint=f"known keys: {', '.join(_PROFILE_KEYS)}; {_PROFILE_DOC}")
            # timeout_s is a duration as everywhere in berth: seconds, or a string such as "2m".
            expected = {"max_concurrency": int, "timeout_s": (int, str)}.get(key, str)
            if not isinstance(value, expected) or isinstance(value, bool):
                kind = {int: "an integer", str: "a string"}.get(expected, "a duration (seconds, or a string "
                                                                          "such as \"2m\")")
                # Never echo the value: it may be a secret.
                raise ConfigError(f"{path}: [{name}] {key}: must be {kind}", hint=_PROFILE_DOC)
    return document


def _aws_ini(path: Path, text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        # The exception text can quote a line of the file (a secret): name the file only.
        raise ConfigError(f"{path} is not a valid AWS INI file ({type(exc).__name__})",
                          hint="see the AWS CLI documentation for its format") from None
    return parser


def _ini_has_secret(text: str) -> bool:
    return "aws_secret_access_key" in text or "aws_session_token" in text


def _read_aws_config(path: Path) -> configparser.RawConfigParser | None:
    """~/.aws/config is often shared (no secrets): check its mode only when it holds one."""
    from berth.untrusted import read_named_file

    try:
        # Without blocking, a plain file only: a FIFO planted there made every staging wait.
        data = read_named_file(path, what=str(path), max_bytes=1 << 20, error=ConfigError,
                               hint="replace it with a plain file, or remove it")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    if _ini_has_secret(text):
        text = read_secret_file(path) or ""
    return _aws_ini(path, text)


def _aws_config_section(parser: configparser.RawConfigParser | None, name: str) -> dict[str, str] | None:
    if parser is None:
        return None
    section = "default" if name == DEFAULT_PROFILE else f"profile {name}"
    for candidate in (section, name):
        if parser.has_section(candidate):
            values = dict(parser.items(candidate))
            # "s3 =" sub-section: indented "addressing_style = path" lines.
            nested = values.get("s3", "")
            for line in nested.splitlines():
                key, _, value = line.partition("=")
                if key.strip():
                    values[f"s3.{key.strip()}"] = value.strip()
            return values
    return None


def _duration(value: int | str, key: str, where: str) -> int:
    """A profile's duration in whole seconds, 1 s to 1 h, in berth's one grammar (config.units:
    ``60``, ``"90s"``, ``"2m"``), as berth.toml's duration keys read it."""
    from berth.config.units import parse_duration
    from berth.errors import UsageError

    try:
        return parse_duration(str(value), option=f"{where}: {key}", bare_unit="s", minimum_s=1, maximum_s=3600)
    except UsageError as exc:
        raise ConfigError(exc.message, hint=exc.hint or _PROFILE_DOC) from None


def _size(value: str, key: str, where: str) -> int:
    from berth.config.units import parse_size
    from berth.errors import UsageError

    try:
        # S3 parts are at least 5 MiB and at most 5 GiB.
        return parse_size(value, option=f"{where}: {key}", bare_unit=None, minimum_bytes=5 << 20,
                          maximum_bytes=5 << 30)
    except UsageError as exc:
        raise ConfigError(exc.message, hint=exc.hint or _PROFILE_DOC) from None


def resolve_profile(name: str | None, *, settings=None, environ: Mapping[str, str] | None = None) -> S3Profile:
    """The profile ``name`` (None: the default rules above). Raises ConfigError for an unknown
    profile, a bad key or value, or a secret file that others could read."""
    env = os.environ if environ is None else environ
    explicit = name is not None
    name = name or env.get("BERTH_S3_PROFILE") or env.get("AWS_PROFILE") or DEFAULT_PROFILE
    berth_path = berth_profiles_file(env)
    credentials_path, config_path = aws_files(env)

    berth_text = read_secret_file(berth_path)
    berth_profiles = _parse_berth_file(berth_path, berth_text) if berth_text is not None else {}
    table = berth_profiles.get(name)
    values: dict = {}
    source = "none (anonymous)"
    where = str(berth_path)
    if table is not None:
        values = dict(table)
        if values.get("access_key") or values.get("secret_key"):
            source = str(berth_path)
    else:
        aws_config = _read_aws_config(config_path)
        config_section = _aws_config_section(aws_config, name) or {}
        credentials_text = read_secret_file(credentials_path)
        credentials = _aws_ini(credentials_path, credentials_text) if credentials_text is not None else None
        credentials_section = dict(credentials.items(name)) if credentials is not None and \
            credentials.has_section(name) else {}
        found = bool(config_section) or bool(credentials_section)
        if explicit and not found:
            known = sorted(set(berth_profiles) | set(credentials.sections() if credentials else ()))
            raise ConfigError(f"unknown S3 profile '{name}'",
                              hint=f"profiles are tables in {berth_path} (or sections of {credentials_path}); "
                                   + (f"known: {', '.join(known)}" if known else "none is defined yet"))
        where = str(config_path)
        merged = {**config_section, **credentials_section}
        values = {
            "endpoint": merged.get("endpoint_url") or merged.get("s3.endpoint_url"),
            "region": merged.get("region"),
            "access_key": merged.get("aws_access_key_id"),
            "secret_key": merged.get("aws_secret_access_key"),
            "session_token": merged.get("aws_session_token"),
            "addressing_style": merged.get("s3.addressing_style"),
            "ca_bundle": merged.get("ca_bundle"),
        }
        if values["access_key"] or values["secret_key"]:
            source = str(credentials_path if credentials_section.get("aws_secret_access_key") else config_path)
        values = {k: v for k, v in values.items() if v}

    if not explicit and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        values["access_key"] = env["AWS_ACCESS_KEY_ID"]
        values["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        values["session_token"] = env.get("AWS_SESSION_TOKEN") or None
        source = "environment (AWS_ACCESS_KEY_ID)"
    if bool(values.get("access_key")) != bool(values.get("secret_key")):
        raise ConfigError(f"S3 profile '{name}' ({source if source != 'none (anonymous)' else where}) has "
                          + ("an access key without a secret key" if values.get("access_key")
                             else "a secret key without an access key"),
                          hint="set both access_key and secret_key (aws_access_key_id and aws_secret_access_key)")

    endpoint = values.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") \
        or (getattr(settings, "s3_endpoint", "") or None)
    if endpoint is not None:
        _check_endpoint(endpoint, name)
    region = values.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    style = values.get("addressing_style") or "auto"
    if style not in ADDRESSING_STYLES:
        raise ConfigError(f"S3 profile '{name}': addressing_style '{style}' is not one of: "
                          f"{', '.join(ADDRESSING_STYLES)}", hint=_PROFILE_DOC)
    ca_bundle = values.get("ca_bundle") or env.get("AWS_CA_BUNDLE") or \
        (str(getattr(settings, "s3_ca_bundle", "") or "") or None)
    if ca_bundle is not None and not os.path.isfile(ca_bundle):
        raise ConfigError(f"S3 profile '{name}': ca_bundle {ca_bundle} is not a file", hint=_PROFILE_DOC)
    threshold = _size(values["multipart_threshold"], "multipart_threshold", where) \
        if "multipart_threshold" in values else DEFAULT_MULTIPART_THRESHOLD
    chunksize = _size(values["multipart_chunksize"], "multipart_chunksize", where) \
        if "multipart_chunksize" in values else DEFAULT_MULTIPART_CHUNKSIZE
    concurrency = values.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)
    timeout_s = _duration(values["timeout_s"], "timeout_s", where) if "timeout_s" in values else DEFAULT_TIMEOUT_S
    if not 1 <= concurrency <= 256:
        raise ConfigError(f"S3 profile '{name}': max_concurrency {concurrency} is out of range (1 to 256)")
    return S3Profile(
        name=name, endpoint=endpoint, region=region, access_key=values.get("access_key"),
        secret_key=values.get("secret_key"), session_token=values.get("session_token"),
        addressing_style=style, ca_bundle=ca_bundle, multipart_threshold=threshold,
        multipart_chunksize=chunksize, max_concurrency=concurrency, timeout_s=timeout_s,
        credentials_source=source,
    )


def _check_endpoint(endpoint: str, name: str) -> None:
    lowered = endpoint.lower()
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    if not lowered.startswith(("http://", "https://")) or not host:
        raise ConfigError(f"S3 profile '{name}': endpoint '{endpoint}' is not an http:// or https:// URL",
                          hint=_PROFILE_DOC)
    if "@" in host:
        raise ConfigError(f"S3 profile '{name}': the endpoint URL carries a user name or password",
                          hint="put keys in access_key and secret_key, never in the URL")


def credentials_file_text(profile: S3Profile) -> str:
    """An AWS shared-credentials file for ``--s3-credentials-in-container`` (written 0600)."""
    lines = ["[default]"]
    if not profile.anonymous:
        lines += [f"aws_access_key_id = {profile.access_key}", f"aws_secret_access_key = {profile.secret_key}"]
        if profile.session_token:
            lines.append(f"aws_session_token = {profile.session_token}")
    return "\n".join(lines) + "\n"
