"""Loading settings in the documented order, validating every key, remembering every source.

Order (DESIGN.md decision 7, docs/configuration.md): built-in defaults; the site file
``$BERTH_CONFIG_DIR/berth.toml`` (default ``/etc/berth``); its ``conf.d/*.toml`` drop-ins in
lexical order; the user's ``$XDG_CONFIG_HOME/berth/berth.toml``; ``BERTH_*`` environment
variables; command-line options (the ``options`` dict, dotted key -> value).

Scalars and plain lists: a later layer replaces an earlier one. Arrays of tables
(``[[policy.mounts]]``, ``[[policy.env]]``, ``[[policy.groups]]``, ``[[registries]]``)
accumulate across the site files, so a drop-in adds mounts without repeating the others.

Who may set what: every key has a scope. ``user`` keys may be set by any layer; ``site`` keys
only by the site file and drop-ins; ``pinnable`` keys by anyone unless the site lists them in
``pinned``. A user file, variable or option that sets what the site forces is a ConfigError
("only the site configuration may set X"). Two environment variables move site locations
wholesale and stay allowed: ``BERTH_CONFIG_DIR`` and ``BERTH_SITE_STORE`` (tests and staged
deployments use them; berth runs unprivileged, so they grant nothing the user could not do with
their own copy of berth).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from berth.config.settings import (
    DEFAULT_CONFIG_DIR,
    DeviceSettings,
    EnvOp,
    GroupPolicy,
    Mount,
    MpiSettings,
    RegistryPolicy,
    Settings,
    SitePolicy,
    default_paths,
    early_state_dir,
    home_directory,
    user_config_dir,
)
from berth.config.tomlfile import KeyLines, ParseCache, read_toml
from berth.config.units import parse_duration
from berth.errors import ConfigError, UsageError, did_you_mean
from berth.oci.names import is_env_name, is_registry_host
from berth.record import Record, fields

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing costs every `berth run` ~2.5 ms (issue 10)
    from typing import Any

USER = "user"
PINNABLE = "pinnable"
SITE = "site"

DOCS_HINT = "every key, its type and default: docs/configuration.md; `berth config show` prints the effective values"


class Key(Record):
    """One scalar or list setting: its dotted name, value kind, who may set it, env variable."""

    name: str
    kind: str
    scope: str
    env: str | None = None
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None


KEYS: tuple[Key, ...] = (
    Key("user_store", "path", USER, env="BERTH_USER_STORE"),
    Key("site_store", "path", SITE, env="BERTH_SITE_STORE"),
    Key("state_dir", "path", USER, env="BERTH_STATE_DIR"),
    Key("jobs_dir", "path", USER, env="BERTH_JOBS_DIR"),
    Key("runtime", "choice", PINNABLE, env="BERTH_RUNTIME", choices=("auto", "launcher", "runc", "crun")),
    Key("squashfs_compression", "choice", PINNABLE, env="BERTH_SQUASHFS_COMPRESSION",
        choices=("lz4", "zstd", "gzip", "xz", "lzo")),
    Key("pull_parallel", "int", PINNABLE, env="BERTH_PULL_PARALLEL", minimum=1, maximum=64),
    Key("pull_retries", "int", USER, env="BERTH_PULL_RETRIES", minimum=0, maximum=50),
    Key("registry_timeout_s", "int", USER, env="BERTH_REGISTRY_TIMEOUT", minimum=1, maximum=3600),
    Key("backend", "choice", PINNABLE, env="BERTH_BACKEND", choices=("local", "slurm")),
    Key("local_max_jobs", "int", PINNABLE, env="BERTH_LOCAL_MAX_JOBS", minimum=1, maximum=4096),
    Key("stage_to_local", "bool", SITE),
    Key("image_mount", "choice", SITE, choices=("shared", "per_container", "unpacked")),
    Key("image_mount_linger", "duration", PINNABLE, env="BERTH_IMAGE_MOUNT_LINGER", minimum=0, maximum=86400),
    Key("image_fuse", "choice", SITE, choices=("auto", "squashfuse_ll", "squashfuse")),
    Key("plan_cache", "bool", PINNABLE, env="BERTH_PLAN_CACHE"),
    Key("s3_endpoint", "url", USER, env="BERTH_S3_ENDPOINT"),
    Key("s3_ca_bundle", "path", USER, env="BERTH_S3_CA_BUNDLE"),
    Key("lock_timeout_s", "int", USER, env="BERTH_LOCK_TIMEOUT_S", minimum=0, maximum=7 * 86400),
    Key("pinned", "key_list", SITE),
    Key("policy.devices", "device_list", SITE),
    Key("policy.mount_allow", "path_list", SITE),
    Key("policy.mount_deny_sources", "path_list", SITE),
    Key("policy.mount_deny_destinations", "path_list", SITE),
    Key("policy.trusted_registries", "host_list", SITE),
    Key("policy.passthrough_env", "env_glob_list", SITE),
    Key("devices.cdi_dirs", "path_list", SITE),
    Key("devices.mount_allow", "path_list", SITE),
    Key("devices.dev_dir", "path", SITE),
    Key("devices.nvidia_proc_dir", "path", SITE),
    Key("devices.ld_cache", "path", SITE),
    Key("devices.gpu_libraries", "file_name_list", SITE),
    Key("devices.gpu_binaries", "file_name_list", SITE),
    Key("devices.bin_dirs", "path_list", SITE),
    Key("mpi.libraries", "file_name_list", SITE),
    Key("mpi.dependencies", "file_name_list", SITE),
    Key("mpi.devices", "device_list", SITE),
    Key("mpi.files", "path_list", SITE),
)
KEY_BY_NAME = {key.name: key for key in KEYS}
#: Arrays of tables; they accumulate across site files. All site-only.
ARRAY_KEYS = ("policy.mounts", "policy.env", "policy.groups", "registries")
#: ``[policy.namespaces]``: namespace -> what the site forces for it.
NAMESPACE_VALUES = {
    "network": ("none", "host"),
    "pid": ("private", "host"),
    "ipc": ("private", "host"),
    "uts": ("private", "host"),
    "cgroup": ("private", "host"),
}
PINNABLE_KEYS = tuple(key.name for key in KEYS if key.scope == PINNABLE)
ALL_KEYS = (*(key.name for key in KEYS), *ARRAY_KEYS, "policy.namespaces", "devices.groups")
#: Top-level tables whose keys are all site-only: ``[policy]``, ``[devices]`` and ``[mpi]``.
SITE_TABLES = ("policy", "devices", "mpi")

ENV_OPS = ("set", "prepend", "append", "unset")
# Patterns as strings, compiled on first use by re's own cache: most runs validate no file.
# Full matches only (re.fullmatch): '$' would accept a final newline (issue 12).
_ENV_GLOB = r"[A-Za-z0-9_*?\[\]]+"
_GROUP_NAME = r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?"
_FILE_NAME = r"[A-Za-z0-9_+][A-Za-z0-9_.+-]*\*?"
_DEVICE_GROUP = r"[a-z][a-z0-9_-]{0,31}"
_TOML_TYPES = {str: "a string", int: "an integer", float: "a float", bool: "a boolean",
               list: "an array", dict: "a table"}


def _toml_type(value: Any) -> str:
    return _TOML_TYPES.get(type(value), f"a {type(value).__name__}")


def _display(path: tuple[str | int, ...]) -> str:
    """("policy", "mounts", 0, "source") -> 'policy.mounts[0].source'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class _Origin(Record):
    """Where a value being validated comes from, for messages and provenance."""

    label: str  # "FILE" or "environment variable BERTH_X" or "option --x"
    layer: str  # "site" | "user" | "env" | "option"
    lines: KeyLines | None = None
    source: str = ""  # provenance prefix: FILE, "env BERTH_X", "option --x"

    def where(self, path: tuple[str | int, ...]) -> str:
        if self.lines is None:
            return self.label
        line = self.lines.line(path)
        return f"{self.label}:{line}" if line else self.label

    def provenance(self, path: tuple[str | int, ...]) -> str:
        return self.where(path) if self.lines is not None else self.source

    def error(self, path: tuple[str | int, ...], problem: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {_display(path)}: {problem}", hint=hint or DOCS_HINT)


# ---------------------------------------------------------------------------------------------
# Value checks: each returns the converted value or raises through origin.error.


def _expect(value: Any, kind: type, origin: _Origin, path, what: str) -> Any:
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise origin.error(path, f"must be {what}, not {_toml_type(value)} ({value!r})")
    return value


def _absolute_path(value: Any, origin: _Origin, path, *, home: str | None = None) -> str:
    _expect(value, str, origin, path, "an absolute path (a string)")
    text = value
    if home is not None and (text == "~" or text.startswith("~/")):
        text = home + text[1:]
    if not text.startswith("/"):
        raise origin.error(path, f"must be an absolute path, not '{value}'",
                           hint="write the full path, starting with '/'" + (" (or ~/ for your home)" if home else ""))
    if "\0" in text or ".." in PurePosixPath(text).parts:
        raise origin.error(path, f"'{value}' may not contain '..' or NUL characters")
    return os.path.normpath(text)


def _check_scalar(key: Key, value: Any, origin: _Origin, path, home: str) -> Any:
    if key.kind == "path":
        return Path(_absolute_path(value, origin, path, home=home))
    if key.kind == "int":
        _expect(value, int, origin, path, "an integer")
        if not key.minimum <= value <= key.maximum:
            raise origin.error(path, f"{value} is out of range: allowed {key.minimum} to {key.maximum}")
        return value
    if key.kind == "bool":
        return _expect(value, bool, origin, path, "a boolean (true or false)")
    if key.kind == "duration":  # seconds (an integer) or a duration string ("90s", "5m", "1h")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise origin.error(path, f"must be a duration (seconds, or a string such as \"5m\"), "
                               f"not {_toml_type(value)} ({value!r})")
        try:
            return parse_duration(str(value), option=_display(path), bare_unit="s",
                                  minimum_s=key.minimum, maximum_s=key.maximum)
        except UsageError as exc:  # "KEY 'VALUE': problem" -> "'VALUE': problem" after where and KEY
            raise origin.error(path, exc.message.removeprefix(_display(path) + " "), hint=exc.hint) from None
    if key.kind == "url":
        _expect(value, str, origin, path, "a URL (a string)")
        host = value.split("://", 1)[-1].split("/", 1)[0]
        if value and (not value.lower().startswith(("http://", "https://")) or not host):
            raise origin.error(path, f"'{value}' is not an http:// or https:// URL")
        if "@" in host:
            raise origin.error(path, "a URL in configuration may not carry a user name or password",
                               hint="S3 keys belong in each user's own profile (docs/staging.md), never in configuration")
        return value
    if key.kind == "choice":
        _expect(value, str, origin, path, "a string")
        if value not in key.choices:
            raise origin.error(path, f"'{value}' is not one of: {', '.join(key.choices)}")
        return value
    # Lists of strings.
    _expect(value, list, origin, path, "an array of strings")
    result = []
    for index, item in enumerate(value):
        item_path = (*path, index)
        if key.kind == "path_list":
            result.append(_absolute_path(item, origin, item_path))
            continue
        _expect(item, str, origin, item_path, "a string")
        if key.kind == "device_list":
            result.append(_device(item, origin, item_path))
        elif key.kind == "host_list":
            if not is_registry_host(item):
                raise origin.error(item_path, f"{item!r} is not a registry host (host or host:port)")
            result.append(item)
        elif key.kind == "env_glob_list":
            if not re.fullmatch(_ENV_GLOB, item):
                raise origin.error(item_path, f"'{item}' is not a variable name or glob (letters, digits, _, *, ?)")
            result.append(item)
        elif key.kind == "file_name_list":
            if not re.fullmatch(_FILE_NAME, item):
                raise origin.error(item_path, f"'{item}' is not a file name (letters, digits, '.', '_', '+', '-'; "
                                   "a trailing '*' matches versions)")
            result.append(item)
        elif key.kind == "key_list":
            if item not in PINNABLE_KEYS:
                raise origin.error(item_path, f"'{item}' cannot be pinned",
                                   hint=f"pinnable keys: {', '.join(PINNABLE_KEYS)} (the others are site-only or user-only)")
            result.append(item)
    return tuple(result)


def _device(value: str, origin: _Origin, path) -> str:
    checked = _absolute_path(value, origin, path)
    if not checked.startswith("/dev/"):
        raise origin.error(path, f"'{value}' is not a device path under /dev/")
    return checked


def _table(value: Any, origin: _Origin, path, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
    _expect(value, dict, origin, path, "a table")
    for name in value:
        if name not in allowed:
            raise _unknown(origin, (*path, name), allowed)
    for name in required:
        if name not in value:
            raise origin.error(path, f"missing required key '{name}'", hint=f"keys of this table: {', '.join(allowed)}")
    return value


def _mount(value: Any, origin: _Origin, path) -> Mount:
    table = _table(value, origin, path, ("source", "destination", "read_only", "optional"), ("source",))
    source = _absolute_path(table["source"], origin, (*path, "source"))
    destination = _absolute_path(table.get("destination", source), origin, (*path, "destination"))
    if destination == "/":
        raise origin.error((*path, "destination"), "cannot mount over the container's root directory '/'")
    read_only = _expect(table.get("read_only", True), bool, origin, (*path, "read_only"), "a boolean")
    optional = _expect(table.get("optional", False), bool, origin, (*path, "optional"), "a boolean")
    return Mount(source=source, destination=destination, read_only=read_only, optional=optional)


def _env_op(value: Any, origin: _Origin, path) -> EnvOp:
    table = _table(value, origin, path, ("op", "name", "value", "separator"), ("op", "name"))
    op = _expect(table["op"], str, origin, (*path, "op"), "a string")
    if op not in ENV_OPS:
        raise origin.error((*path, "op"), f"'{op}' is not one of: {', '.join(ENV_OPS)}")
    name = _expect(table["name"], str, origin, (*path, "name"), "a string")
    if not is_env_name(name):
        raise origin.error((*path, "name"), f"'{name}' is not a variable name (letters, digits, _; not starting with a digit)")
    if op == "unset":
        for extra in ("value", "separator"):
            if extra in table:
                raise origin.error((*path, extra), f"op 'unset' takes no '{extra}'")
        return EnvOp(op=op, name=name)
    if "value" not in table:
        raise origin.error(path, f"op '{op}' needs a 'value'")
    text = _expect(table["value"], str, origin, (*path, "value"), "a string")
    if "\0" in text:
        raise origin.error((*path, "value"), "may not contain NUL characters")
    separator = ":"
    if "separator" in table:
        if op == "set":
            raise origin.error((*path, "separator"), "op 'set' takes no 'separator' (only prepend and append join values)")
        separator = _expect(table["separator"], str, origin, (*path, "separator"), "a string")
    return EnvOp(op=op, name=name, value=text, separator=separator)


def _group(value: Any, origin: _Origin, path) -> GroupPolicy:
    table = _table(value, origin, path, ("group", "mounts", "devices", "env"), ("group",))
    group = _expect(table["group"], str, origin, (*path, "group"), "a string (a Unix group name)")
    if not re.fullmatch(_GROUP_NAME, group):
        raise origin.error((*path, "group"), f"'{group}' is not a Unix group name")
    mounts = _expect(table.get("mounts", []), list, origin, (*path, "mounts"), "an array of tables")
    env = _expect(table.get("env", []), list, origin, (*path, "env"), "an array of tables")
    devices = _check_scalar(Key("devices", "device_list", SITE), table.get("devices", []), origin, (*path, "devices"), "")
    return GroupPolicy(
        group=group,
        mounts=tuple(_mount(item, origin, (*path, "mounts", i)) for i, item in enumerate(mounts)),
        devices=devices,
        env=tuple(_env_op(item, origin, (*path, "env", i)) for i, item in enumerate(env)),
    )


def _registry(value: Any, origin: _Origin, path) -> RegistryPolicy:
    table = _table(value, origin, path, ("host", "insecure", "trusted"), ("host",))
    host = _expect(table["host"], str, origin, (*path, "host"), "a string")
    if not is_registry_host(host):
        raise origin.error((*path, "host"), f"{host!r} is not a registry host (host or host:port, as in image references)")
    return RegistryPolicy(
        host=host,
        insecure=_expect(table.get("insecure", False), bool, origin, (*path, "insecure"), "a boolean"),
        trusted=_expect(table.get("trusted", True), bool, origin, (*path, "trusted"), "a boolean"),
    )


_ARRAY_ITEM = {"policy.mounts": _mount, "policy.env": _env_op, "policy.groups": _group, "registries": _registry}


def _unknown(origin: _Origin, path, known) -> ConfigError:
    suggestion = did_you_mean(str(path[-1]), map(str, known))
    suggestion = f"{suggestion} " if suggestion else ""
    return origin.error(path, "unknown key", hint=f"{suggestion}known keys here: {', '.join(sorted(map(str, known)))}; {DOCS_HINT}")


# ---------------------------------------------------------------------------------------------


class _Layers:
    """The values being built, layer by layer, with their sources."""

    def __init__(self, defaults: dict[str, Any]) -> None:
        self.values: dict[str, Any] = dict(defaults)
        self.sources: dict[str, str] = {key: "default" for key in defaults}
        self.arrays: dict[str, list[tuple[Any, str]]] = {key: [] for key in ARRAY_KEYS}
        self.namespaces: dict[str, tuple[str, str]] = {}
        self.device_groups: dict[str, tuple[tuple[str, ...], str]] = {}

    def set(self, key: str, value: Any, source: str) -> None:
        self.values[key] = value
        self.sources[key] = source

    @property
    def pinned(self) -> tuple[str, ...]:
        return self.values.get("pinned", ())

    def check_site_only(self, key: Key, origin: _Origin, path) -> None:
        """Refuse a site-only key from a user layer (BERTH_SITE_STORE moves the store wholesale)."""
        if origin.layer == "site" or key.scope != SITE:
            return
        if origin.layer == "env" and key.env == "BERTH_SITE_STORE":
            return
        raise origin.error(path, f"only the site configuration may set {key.name}",
                           hint="site settings live in $BERTH_CONFIG_DIR/berth.toml and its conf.d/ drop-ins: "
                           "ask your site administrator")

    def check_pinned(self, key: Key, origin: _Origin, path, value: Any) -> None:
        """Refuse a user-layer value that differs from what the site pins (the same value is harmless)."""
        if origin.layer == "site" or key.name not in self.pinned or value == self.values.get(key.name):
            return
        raise origin.error(path, f"only the site configuration may set {key.name}: the site pins it to "
                           f"'{self.values.get(key.name)}' (pinned at {self.sources.get('pinned')})",
                           hint="remove this setting, or ask your site administrator")


def _apply_document(layers: _Layers, document: dict, origin: _Origin, home: str) -> None:
    """Validate one TOML document and fold it into ``layers``."""
    for name, value in document.items():
        if name in SITE_TABLES:
            _expect(value, dict, origin, (name,), f"a table ([{name}])")
            if origin.layer != "site":
                raise origin.error((name,), f"only the site configuration may set {name}",
                                   hint="site policy lives in $BERTH_CONFIG_DIR/berth.toml or conf.d/; ask your site administrator")
            for sub, subvalue in value.items():
                _apply_key(layers, f"{name}.{sub}", (name, sub), subvalue, origin, home)
        else:
            _apply_key(layers, name, (name,), value, origin, home)


def _apply_key(layers: _Layers, name: str, path, value: Any, origin: _Origin, home: str) -> None:
    if name in KEY_BY_NAME:
        key = KEY_BY_NAME[name]
        layers.check_site_only(key, origin, path)
        converted = _check_scalar(key, value, origin, path, home)
        layers.check_pinned(key, origin, path, converted)
        layers.set(name, converted, origin.provenance(path))
    elif name in ARRAY_KEYS:
        if origin.layer != "site":
            raise origin.error(path, f"only the site configuration may set {name}", hint="ask your site administrator")
        _expect(value, list, origin, path, f"an array of tables ([[{name}]])")
        parse = _ARRAY_ITEM[name]
        for index, item in enumerate(value):
            item_path = (*path, index)
            layers.arrays[name].append((parse(item, origin, item_path), origin.provenance(item_path)))
    elif name == "policy.namespaces":
        _expect(value, dict, origin, path, "a table ([policy.namespaces])")
        for namespace, mode in value.items():
            ns_path = (*path, namespace)
            if namespace not in NAMESPACE_VALUES:
                raise _unknown(origin, ns_path, NAMESPACE_VALUES)
            _expect(mode, str, origin, ns_path, "a string")
            if mode not in NAMESPACE_VALUES[namespace]:
                raise origin.error(ns_path, f"'{mode}' is not one of: {', '.join(NAMESPACE_VALUES[namespace])}")
            layers.namespaces[namespace] = (mode, origin.provenance(ns_path))
    elif name == "devices.groups":
        _expect(value, dict, origin, path, "a table ([devices.groups])")
        for group, devices in value.items():
            group_path = (*path, group)
            if not re.fullmatch(_DEVICE_GROUP, group):
                raise origin.error(group_path, f"'{group}' is not a device group name (lower-case letters, "
                                   "digits, '_', '-'; starting with a letter)")
            items = _expect(devices, list, origin, group_path, "an array of device paths")
            if not items:
                raise origin.error(group_path, "names no device")
            checked = tuple(_device(_expect(item, str, origin, (*group_path, i), "a string"), origin, (*group_path, i))
                            for i, item in enumerate(items))
            layers.device_groups[group] = (checked, origin.provenance(group_path))
    elif name.split(".", 1)[0] in SITE_TABLES:
        table = name.split(".", 1)[0]
        raise _unknown(origin, path, [k.removeprefix(table + ".") for k in ALL_KEYS if k.startswith(table + ".")])
    else:
        raise _unknown(origin, path, [k for k in ALL_KEYS if k.split(".", 1)[0] not in SITE_TABLES]
                       + list(SITE_TABLES))


def _env_value(key: Key, text: str, origin: _Origin, home: str) -> Any:
    """Convert an environment variable's text to the key's TOML-like value, then check it."""
    value: Any = text
    if key.kind == "int":
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{origin.label}: '{text}' is not an integer", hint=DOCS_HINT) from None
    elif key.kind == "bool":
        lowered = text.lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"{origin.label}: '{text}' is not a boolean (true/false, 1/0, yes/no)", hint=DOCS_HINT)
        value = lowered in ("1", "true", "yes")
    elif key.kind.endswith("_list"):
        value = [part for part in text.split(",") if part]
    return _check_scalar(key, value, origin, (key.name,), home)


def _defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    base = Settings()
    tables = {"policy": SitePolicy(), "devices": DeviceSettings(), "mpi": MpiSettings()}
    values: dict[str, Any] = {}
    for key in KEYS:
        table, _, sub = key.name.partition(".")
        values[key.name] = getattr(tables[table], sub) if sub else getattr(base, key.name)
    paths = default_paths(environ)
    for name in ("user_store", "jobs_dir", "state_dir"):
        values[name] = paths[name]
    return values


def user_config_file(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/berth/berth.toml`` (default ``~/.config/berth/berth.toml``)."""
    return user_config_dir(environ) / "berth.toml"


def config_files(config_dir: Path, environ: Mapping[str, str] | None = None) -> list[tuple[Path, str]]:
    """Every file the loader reads, in order, with its layer ("site" or "user")."""
    files = [(config_dir / "berth.toml", "site")]
    dropins = config_dir / "conf.d"
    try:
        names = sorted(entry.name for entry in os.scandir(dropins)
                       if entry.name.endswith(".toml") and not entry.name.startswith("."))
    except FileNotFoundError:
        names = []
    except PermissionError:
        raise ConfigError(f"cannot list {dropins}: permission denied",
                          hint="ask your site administrator to make it world-readable (chmod 0755)") from None
    except NotADirectoryError:
        raise ConfigError(f"{dropins} is not a directory", hint="conf.d must be a directory of *.toml drop-in files") from None
    files += [(dropins / name, "site") for name in names]
    files.append((user_config_file(environ), "user"))
    return files


def parse_cache_dir(environ: Mapping[str, str]) -> Path | None:
    """Where parsed configuration files are kept for the next command (berth.config.tomlfile
    judges it: used only when it is the caller's, mode 0700): the state directory as known
    before the settings that could move it are loaded (settings.early_state_dir:
    ``$BERTH_STATE_DIR``, else the default, node-local, as berth.runtime.state makes it).
    None (no cache) where BERTH_STATE_DIR is set to what only the settings judge."""
    return early_state_dir(environ)


def load_settings(options: dict | None = None, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Load settings in the documented order; see the module docstring.

    ``options`` maps dotted keys (``"runtime"``, ``"user_store"``) to values (strings are
    converted like environment variables; typed values are checked as TOML values); its source
    is shown as ``option --key-name``. ``environ`` defaults to ``os.environ``.

    Raises ConfigError naming the file, line and key of every unknown key, wrong type, bad
    value, or user-layer setting of a site-only key.
    """
    env = os.environ if environ is None else environ
    home = str(home_directory(env))
    layers = _Layers(_defaults(env))

    config_dir = DEFAULT_CONFIG_DIR
    config_dir_source = "default"
    if env.get("BERTH_CONFIG_DIR"):
        origin = _Origin("environment variable BERTH_CONFIG_DIR", "env", source="env BERTH_CONFIG_DIR")
        config_dir = Path(_absolute_path(env["BERTH_CONFIG_DIR"], origin, ("config_dir",), home=home))
        config_dir_source = origin.source
    if options and options.get("config_dir"):
        origin = _Origin("option --config-dir", "option", source="option --config-dir")
        config_dir = Path(_absolute_path(str(options["config_dir"]), origin, ("config_dir",), home=home))
        config_dir_source = origin.source

    cache_dir = parse_cache_dir(env)
    cache = ParseCache(cache_dir) if cache_dir is not None else None
    parsed_files = [(path, layer, read_toml(path, cache=cache)) for path, layer in config_files(config_dir, env)]
    if cache is not None:
        cache.save()  # before judging the values: a file with a bad value is still read from the cache
    for path, layer, parsed in parsed_files:
        if parsed is None:
            continue
        document, lines = parsed
        _apply_document(layers, document, _Origin(str(path), layer, lines), home)

    for key in KEYS:
        if key.env and env.get(key.env):
            origin = _Origin(f"environment variable {key.env}", "env", source=f"env {key.env}")
            converted = _env_value(key, env[key.env], origin, home)
            layers.check_site_only(key, origin, (key.name,))
            layers.check_pinned(key, origin, (key.name,), converted)
            layers.set(key.name, converted, origin.source)

    for name, value in (options or {}).items():
        if name == "config_dir" or value is None:
            continue
        flag = "--" + name.replace("_", "-").replace(".", "-")
        origin = _Origin(f"option {flag}", "option", source=f"option {flag}")
        if name not in KEY_BY_NAME:
            raise ConfigError(f"option {flag}: '{name}' is not a setting", hint=DOCS_HINT)
        key = KEY_BY_NAME[name]
        if isinstance(value, Path):
            value = str(value)
        converted = _env_value(key, value, origin, home) if isinstance(value, str) else \
            _check_scalar(key, list(value) if isinstance(value, tuple) else value, origin, (name,), home)
        layers.check_site_only(key, origin, (name,))
        layers.check_pinned(key, origin, (name,), converted)
        layers.set(name, converted, origin.source)

    return _build(layers, config_dir, config_dir_source)


def _build(layers: _Layers, config_dir: Path, config_dir_source: str) -> Settings:
    values = layers.values
    sources = dict(layers.sources)
    sources["config_dir"] = config_dir_source
    policy_values: dict[str, Any] = {}
    device_values: dict[str, Any] = {}
    mpi_values: dict[str, Any] = {}
    for key in KEYS:
        table, _, sub = key.name.partition(".")
        if table == "policy":
            policy_values[sub] = values[key.name]
        elif table == "devices":
            device_values[sub] = str(values[key.name]) if key.kind == "path" else values[key.name]
        elif table == "mpi":
            mpi_values[sub] = values[key.name]
    for name in ARRAY_KEYS:
        items = layers.arrays[name]
        for index, (_, source) in enumerate(items):
            sources[f"{name}[{index}]"] = source
        files = sorted({source.rsplit(":", 1)[0] for _, source in items})
        sources[name] = ", ".join(files) if files else "default"
    for namespace, (_, source) in layers.namespaces.items():
        sources[f"policy.namespaces.{namespace}"] = source
    for group, (_, source) in layers.device_groups.items():
        sources[f"devices.groups.{group}"] = source
    _check_duplicate_registries(layers)
    policy = SitePolicy(
        mounts=tuple(item for item, _ in layers.arrays["policy.mounts"]),
        env=tuple(item for item, _ in layers.arrays["policy.env"]),
        groups=tuple(item for item, _ in layers.arrays["policy.groups"]),
        forced_namespaces=tuple(sorted((ns, mode) for ns, (mode, _) in layers.namespaces.items())),
        **policy_values,
    )
    settings_values = {f.name: values[f.name] for f in fields(Settings) if f.name in values}
    devices = DeviceSettings(
        groups=tuple(sorted((group, paths) for group, (paths, _) in layers.device_groups.items())),
        **device_values,
    )
    return Settings(
        config_dir=config_dir,
        registries=tuple(item for item, _ in layers.arrays["registries"]),
        policy=policy,
        devices=devices,
        mpi=MpiSettings(**mpi_values),
        sources=sources,
        **settings_values,
    )


def _check_duplicate_registries(layers: _Layers) -> None:
    seen: dict[str, str] = {}
    for registry, source in layers.arrays["registries"]:
        if registry.host in seen:
            raise ConfigError(f"{source}: registries: host '{registry.host}' is already configured at {seen[registry.host]}",
                              hint="keep one [[registries]] entry per host")
        seen[registry.host] = source


def effective_values(settings: Settings) -> list[tuple[str, Any, str]]:
    """Every effective value as (dotted key, JSON-able value, source), in a stable order:
    what ``berth config show`` prints."""
    rows: list[tuple[str, Any, str]] = []
    sources = settings.sources

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        if isinstance(value, Record):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        return value

    rows.append(("config_dir", str(settings.config_dir), sources.get("config_dir", "default")))
    for key in KEYS:
        table, _, sub = key.name.partition(".")
        value = getattr(getattr(settings, table), sub) if sub else getattr(settings, key.name)
        rows.append((key.name, plain(value), sources.get(key.name, "default")))
    for namespace, mode in settings.policy.forced_namespaces:
        rows.append((f"policy.namespaces.{namespace}", mode, sources.get(f"policy.namespaces.{namespace}", "default")))
    for group, paths in settings.devices.groups:
        rows.append((f"devices.groups.{group}", list(paths), sources.get(f"devices.groups.{group}", "default")))
    arrays = {"policy.mounts": settings.policy.mounts, "policy.env": settings.policy.env,
              "policy.groups": settings.policy.groups, "registries": settings.registries}
    for name, items in arrays.items():
        if not items:
            rows.append((name, [], sources.get(name, "default")))
        for index, item in enumerate(items):
            rows.append((f"{name}[{index}]", plain(item), sources.get(f"{name}[{index}]", "default")))
    return rows
