"""Container Device Interface specs: vendors' device descriptions, read as hostile input.

What is read: every ``*.json``, ``*.yaml`` and ``*.yml`` file in the site's ``devices.cdi_dirs``
(``/etc/cdi`` then ``/var/run/cdi`` by default), only when a CDI device is asked for (or by
``berth doctor``). A later directory wins for a device both define (the CDI rule); two specs of
one directory that define the same device are a conflict, refused when that device is used.

What is accepted (CDI specification 0.3.0 to 0.8.0, github.com/cncf-tags/container-device-interface
SPEC.md): ``cdiVersion``, ``kind`` (``vendor.com/class``), ``annotations``, ``devices[]``
(``name``, ``annotations``, ``containerEdits``) and top-level ``containerEdits`` (applied with
any of the spec's devices): ``env`` (``KEY=VALUE``), ``deviceNodes`` (``path``, ``hostPath``,
``type``, ``major``, ``minor``, ``fileMode``, ``permissions``, ``uid``, ``gid``), ``mounts``
(``hostPath``, ``containerPath``, ``options``, ``type``), ``hooks`` (``hookName``, ``path``,
``args``, ``env``, ``timeout``). ``additionalGids``, ``intelRdt`` and ``netDevices`` are parsed
but refused when a device using them is asked for: berth cannot apply them unprivileged.
Unknown keys, wrong types, files over :data:`MAX_SPEC_BYTES`, nesting deeper than
:data:`MAX_DEPTH` and more than :data:`MAX_NODES` values are errors naming the file and key. A
spec that cannot be judged is refused whole, never half-applied; what the edits then do on the
host (which devices, which mount sources) is judged by berth.runtime.devices.edits.

YAML needs PyYAML (``pip install 'berth[yaml]'``), imported only for a YAML file that is not
also JSON; rootless containers cannot create device nodes, so ``fileMode``, ``uid`` and ``gid``
are checked for type and otherwise left to the host node (which is bind-mounted).
"""

from __future__ import annotations

import os
import re
import stat as stat_module
from collections.abc import Mapping
from typing import Any

from berth.config.settings import EnvOp
from berth.errors import ConfigError, UsageError
from berth.fsutil import writers_problem
from berth.namedtuple import NamedTuple
from berth.oci.names import is_env_name
from berth.runtime import spec
from berth.runtime.devices.edits import ContainerEdits, DeviceNode, Mount
from berth.untrusted import InvalidDocument, parse_json

SPEC_VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.5.1", "0.6.0", "0.7.0", "0.8.0")
MAX_SPEC_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_NODES = 100_000
MAX_DEVICES = 4096

# The CDI names' grammar (SPEC.md "CDI JSON Specification": kind and device names).
# Full matches only (re.fullmatch): '$' would accept a final newline.
_VENDOR = r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
_CLASS = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?"
_KIND = rf"{_VENDOR}/{_CLASS}"
_DEVICE = r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?"

_TOP_KEYS = ("cdiVersion", "kind", "annotations", "devices", "containerEdits")
_DEVICE_KEYS = ("name", "annotations", "containerEdits")
_EDIT_KEYS = ("env", "deviceNodes", "mounts", "hooks", "additionalGids", "intelRdt", "netDevices")
_UNSUPPORTED = ("additionalGids", "intelRdt", "netDevices")
_NODE_KEYS = ("path", "hostPath", "type", "major", "minor", "fileMode", "permissions", "uid", "gid")
_MOUNT_KEYS = ("hostPath", "containerPath", "options", "type")
_HOOK_KEYS = ("hookName", "path", "args", "env", "timeout")
_HINT = "fix or remove the spec (ask your site administrator; devices.cdi_dirs in docs/gpus.md)"


class CdiDevice(NamedTuple):
    """One device of one spec file: its own edits and the spec's common ones."""

    name: str  # fully qualified: vendor.com/class=name
    file: str
    edits: ContainerEdits
    unsupported: tuple[str, ...] = ()


class _Reader:
    """Validation helpers that name the file and key path in every error."""

    def __init__(self, file: str) -> None:
        self.file = file

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"CDI spec {self.file}: {path}: {problem}" if path else f"CDI spec {self.file}: {problem}",
                         hint=_HINT)

    def table(self, value: Any, path: str, keys: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"must be a mapping, not {_kind(value)}")
        for key in value:
            if key not in keys:
                raise self.error(_join(path, key), f"unknown key (known here: {', '.join(keys)})")
        for key in required:
            if key not in value:
                raise self.error(path, f"missing required key '{key}'")
        return value

    def string(self, value: Any, path: str, *, pattern: str | None = None, absolute: bool = False) -> str:
        if not isinstance(value, str) or not value or "\0" in value:
            raise self.error(path, f"must be a non-empty string, not {_kind(value)}")
        if pattern and not re.fullmatch(pattern, value):
            raise self.error(path, f"'{value[:80]}' is not valid here")
        if absolute and (not value.startswith("/") or ".." in value.split("/")):
            raise self.error(path, f"'{value[:80]}' must be an absolute path without '..'")
        return value

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(path, f"must be a list of strings, not {_kind(value)}")
        return tuple(self.string(item, f"{path}[{i}]") for i, item in enumerate(value))

    def items(self, table: dict, key: str, path: str) -> list:
        """``table[key]``, a list (empty when missing)."""
        value = table.get(key, [])
        if not isinstance(value, list):
            raise self.error(_join(path, key), f"must be a list, not {_kind(value)}")
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(path, f"must be an integer from {low} to {high}, not {value!r}"[:200])
        return value

    def annotations(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise self.error(path, f"must be a mapping of strings, not {_kind(value)}")
        for key, item in value.items():
            self.string(key, path)
            if not isinstance(item, str):
                raise self.error(_join(path, str(key)), "must be a string")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_shape(value: Any, reader: _Reader) -> None:
    """Depth and size limits over the whole document (YAML aliases count every time they are
    reached, so an alias bomb hits the budget instead of exhausting memory or time)."""
    budget = [MAX_NODES]
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            raise reader.error("", f"has more than {MAX_NODES} values")
        if depth > MAX_DEPTH:
            raise reader.error("", f"nests deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack += [(key, depth + 1) for key in item] + [(sub, depth + 1) for sub in item.values()]
        elif isinstance(item, list):
            stack += [(sub, depth + 1) for sub in item]
        elif not isinstance(item, (str, int, float, bool, type(None))):
            raise reader.error("", f"holds a {type(item).__name__}, which JSON and CDI do not have")


def parse_document(data: bytes, file: str) -> Any:
    """The spec file's document (JSON, else YAML) within the size and depth limits."""
    reader = _Reader(file)
    if len(data) > MAX_SPEC_BYTES:
        raise reader.error("", f"is larger than {MAX_SPEC_BYTES >> 10} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise reader.error("", "is not UTF-8 text") from None
    try:
        # Brackets nested deeper than the limit are refused before the recursive parser sees them.
        if text.count("[") + text.count("{") > MAX_NODES:
            raise reader.error("", f"has more than {MAX_NODES} values")
        document = parse_json(text, what="the spec", max_bytes=MAX_SPEC_BYTES, max_depth=MAX_DEPTH)
    except InvalidDocument as exc:
        if exc.reason == "depth":
            raise reader.error("", f"nests deeper than {MAX_DEPTH} levels") from None
        if exc.reason != "syntax" or file.endswith(".json"):
            raise reader.error("", exc.detail) from None
        document = _load_yaml(text, reader)
    _check_shape(document, reader)
    return document


def _load_yaml(text: str, reader: _Reader) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"CDI spec {reader.file} is YAML, and PyYAML is not installed",
                        hint="install it (pip install 'berth[yaml]'), or convert the spec to JSON") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader)
    except RecursionError:
        raise reader.error("", f"nests deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as exc:
        raise reader.error("", f"is neither JSON nor valid YAML ({str(exc).splitlines()[0]})") from None


def _edits(value: Any, path: str, reader: _Reader, origin: str) -> tuple[ContainerEdits, tuple[str, ...]]:
    table = reader.table(value, path, _EDIT_KEYS)
    env = []
    for i, entry in enumerate(reader.strings(table.get("env", []), _join(path, "env"))):
        name, equals, rest = entry.partition("=")
        if not equals or not is_env_name(name):
            raise reader.error(f"{_join(path, 'env')}[{i}]", f"'{entry[:80]}' is not KEY=VALUE")
        env.append(EnvOp(op="set", name=name, value=rest))
    nodes = []
    for i, raw in enumerate(reader.items(table, "deviceNodes", path)):
        where = f"{_join(path, 'deviceNodes')}[{i}]"
        node = reader.table(raw, where, _NODE_KEYS, ("path",))
        kind = node.get("type")
        if kind is not None and kind not in ("c", "b", "u", "p"):
            raise reader.error(_join(where, "type"), f"'{kind}' is not one of c, b, u, p")
        if kind == "p":
            raise reader.error(_join(where, "type"), "FIFOs cannot be passed into rootless containers")
        permissions = node.get("permissions", "rwm")
        if not isinstance(permissions, str) or not re.fullmatch(r"[rwm]{1,3}", permissions):
            raise reader.error(_join(where, "permissions"), f"{permissions!r} is not made of r, w, m")
        for key, high in (("major", (1 << 32) - 1), ("minor", (1 << 32) - 1), ("uid", (1 << 32) - 1),
                          ("gid", (1 << 32) - 1), ("fileMode", 0o7777)):
            if key in node:
                reader.integer(node[key], _join(where, key), 0, high)
        nodes.append(DeviceNode(
            path=reader.string(node["path"], _join(where, "path"), absolute=True),
            host_path=reader.string(node["hostPath"], _join(where, "hostPath"), absolute=True)
            if "hostPath" in node else None,
            type=kind, major=node.get("major"), minor=node.get("minor"),
            permissions=permissions.replace("m", ""),
        ))
    mounts = []
    for i, raw in enumerate(reader.items(table, "mounts", path)):
        where = f"{_join(path, 'mounts')}[{i}]"
        mount = reader.table(raw, where, _MOUNT_KEYS, ("hostPath", "containerPath"))
        options = reader.strings(mount.get("options", []), _join(where, "options"))
        kind = mount.get("type", "bind")
        if kind not in ("bind", "none"):
            raise reader.error(_join(where, "type"), f"'{kind}': berth applies bind mounts only")
        mounts.append(Mount(
            host_path=reader.string(mount["hostPath"], _join(where, "hostPath"), absolute=True),
            container_path=reader.string(mount["containerPath"], _join(where, "containerPath"), absolute=True),
            read_only="rw" not in options,
        ))
    hooks = []
    for i, raw in enumerate(reader.items(table, "hooks", path)):
        where = f"{_join(path, 'hooks')}[{i}]"
        hook = reader.table(raw, where, _HOOK_KEYS, ("hookName", "path"))
        name = reader.string(hook["hookName"], _join(where, "hookName"))
        if name not in spec.HOOK_NAMES:
            raise reader.error(_join(where, "hookName"), f"'{name}' is not one of {', '.join(spec.HOOK_NAMES)}")
        hook_env = reader.strings(hook.get("env", []), _join(where, "env"))
        for j, entry in enumerate(hook_env):
            if not is_env_name(entry.partition("=")[0]) or "=" not in entry:
                raise reader.error(f"{_join(where, 'env')}[{j}]", f"{entry[:80]!r} is not KEY=VALUE")
        hooks.append(spec.Hook(
            hook_name=name,
            path=reader.string(hook["path"], _join(where, "path"), absolute=True),
            args=reader.strings(hook.get("args", []), _join(where, "args")),
            env=hook_env,
            timeout_s=reader.integer(hook["timeout"], _join(where, "timeout"), 1, 3600) if "timeout" in hook else None,
        ))
    unsupported = tuple(key for key in _UNSUPPORTED if table.get(key))
    return ContainerEdits(origin, tuple(nodes), tuple(mounts), tuple(env), tuple(hooks)), unsupported


def parse_spec(document: Any, file: str) -> list[CdiDevice]:
    """The devices a parsed spec document defines (fully validated). Raises ConfigError."""
    reader = _Reader(file)
    table = reader.table(document, "", _TOP_KEYS, ("cdiVersion", "kind", "devices"))
    version = table["cdiVersion"]
    if version not in SPEC_VERSIONS:
        raise reader.error("cdiVersion", f"{str(version)[:20]!r} is not a CDI version berth reads "
                           f"({', '.join(SPEC_VERSIONS)})")
    kind = reader.string(table["kind"], "kind", pattern=_KIND)
    if "annotations" in table:
        reader.annotations(table["annotations"], "annotations")
    common, common_unsupported = (ContainerEdits(""), ())
    if "containerEdits" in table:
        common, common_unsupported = _edits(table["containerEdits"], "containerEdits", reader, "")
    devices = table["devices"]
    if not isinstance(devices, list) or not devices:
        raise reader.error("devices", "must be a non-empty list")
    if len(devices) > MAX_DEVICES:
        raise reader.error("devices", f"has more than {MAX_DEVICES} devices")
    found: list[CdiDevice] = []
    seen: set[str] = set()
    for i, raw in enumerate(devices):
        where = f"devices[{i}]"
        device = reader.table(raw, where, _DEVICE_KEYS, ("name", "containerEdits"))
        name = reader.string(device["name"], _join(where, "name"), pattern=_DEVICE)
        if name in seen:
            raise reader.error(_join(where, "name"), f"device '{name}' is defined twice")
        seen.add(name)
        if "annotations" in device:
            reader.annotations(device["annotations"], _join(where, "annotations"))
        qualified = f"{kind}={name}"
        origin = f"CDI device {qualified} ({file})"
        own, unsupported = _edits(device["containerEdits"], _join(where, "containerEdits"), reader, origin)
        edits = ContainerEdits(origin, own.device_nodes + common.device_nodes, own.mounts + common.mounts,
                               own.env + common.env, own.hooks + common.hooks)
        found.append(CdiDevice(qualified, file, edits, tuple(dict.fromkeys(unsupported + common_unsupported))))
    return found


class Registry(NamedTuple):
    """Every device of every readable spec, by qualified name, and the files that failed."""

    devices: Mapping[str, CdiDevice]
    conflicts: Mapping[str, tuple[str, ...]]
    errors: tuple[ConfigError, ...]


def spec_files(directories) -> list[tuple[int, str]]:
    """(directory rank, file) of every spec file, directories in order, names sorted."""
    files = []
    for rank, directory in enumerate(directories):
        try:
            names = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise ConfigError(f"cannot list the CDI directory {directory}: {exc.strerror}",
                            hint="ask your site administrator (devices.cdi_dirs)") from None
        files += [(rank, os.path.join(directory, name)) for name in names
                  if name.endswith((".json", ".yaml", ".yml")) and not name.startswith(".")]
    return files


def _read(file: str) -> bytes:
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"CDI spec {file}: cannot open it ({exc.strerror})", hint=_HINT) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat_module.S_ISREG(info.st_mode):
            raise ConfigError(f"CDI spec {file}: not a regular file", hint=_HINT)
        check_spec_writers(file, info, acl=handle.fileno())
        return handle.read(MAX_SPEC_BYTES + 1)


def check_spec_writers(file: str, info: os.stat_result, *, acl: int | str | None = None) -> None:
    """Refuse a spec that someone other than root or the caller wrote or can change: its hooks
    run programs (``/usr/bin/sh -c ...`` lies under any ``mount_allow``) as the caller on the
    host, so whoever can write the spec can run code as every user who asks for its devices.
    Group write is accepted for group root and the owner's private group only
    (:func:`writers_problem`). Raises ConfigError."""
    problem = writers_problem(info, acl=acl)
    if problem and problem.startswith("owned"):
        raise ConfigError(f"CDI spec {file}: {problem}: berth does not read specs other users wrote (their hooks "
                          "would run as you)", hint=_HINT)
    if problem:
        raise ConfigError(f"CDI spec {file}: {problem}: berth does not read a spec other users can change (its "
                          "hooks would run as you)", hint=f"chmod go-w {file} (ask your site administrator)")


def load_registry(directories) -> Registry:
    """Read every spec in ``directories``: a later directory wins; a same-directory clash and
    a broken file are recorded (raised when the device is asked for; shown by doctor)."""
    devices: dict[str, CdiDevice] = {}
    ranks: dict[str, int] = {}
    conflicts: dict[str, tuple[str, ...]] = {}
    errors: list[ConfigError] = []
    for rank, file in spec_files(directories):
        try:
            found = parse_spec(parse_document(_read(file), file), file)
        except ConfigError as exc:
            errors.append(exc)
            continue
        for device in found:
            if device.name in devices and ranks[device.name] == rank:
                conflicts[device.name] = (*conflicts.get(device.name, (devices[device.name].file,)), file)
            elif device.name in devices:
                conflicts.pop(device.name, None)
            devices[device.name] = device
            ranks[device.name] = rank
    return Registry(devices, conflicts, tuple(errors))


def check_name(text: str, *, what: str) -> tuple[str, str]:
    """Split ``vendor.com/class=name`` into (kind, name). Raises UsageError."""
    kind, _, name = text.partition("=")
    if not re.fullmatch(_KIND, kind) or not re.fullmatch(_DEVICE, name):
        raise UsageError(f"{what}: '{text}' is not a CDI device name",
                         hint="CDI names look like vendor.com/class=name, e.g. nvidia.com/gpu=0")
    return kind, name


def device_edits(settings, text: str, *, what: str, registry: Registry | None = None) -> ContainerEdits:
    """The edits of CDI device ``text`` (unjudged). Raises UsageError for an unknown device and
    ConfigError for a broken, conflicting or unsupported spec that could define it."""
    kind, _ = check_name(text, what=what)
    registry = registry or load_registry(settings.devices.cdi_dirs)
    # A broken file could be the one that defines this device: it is refused, not skipped.
    for error in registry.errors:
        raise ConfigError(f"{what}: {error.message}", hint=error.hint)
    if text in registry.conflicts:
        raise ConfigError(f"{what}: device {text} is defined by several specs of one directory: "
                        f"{', '.join(registry.conflicts[text])}", hint=_HINT)
    device = registry.devices.get(text)
    if device is None:
        same_kind = sorted(name for name in registry.devices if name.startswith(kind + "="))
        known = f"devices of kind {kind}: {', '.join(same_kind)}" if same_kind else \
            f"no spec in {', '.join(settings.devices.cdi_dirs)} defines kind {kind}"
        raise UsageError(f"{what}: unknown CDI device {text} ({known})",
                         hint="`berth doctor` lists the CDI devices of this node")
    if device.unsupported:
        raise ConfigError(f"{what}: {device.file}: berth cannot apply containerEdits "
                        f"{', '.join(device.unsupported)} in a rootless container", hint=_HINT)
    return device.edits._replace(origin=f"{what} ({device.file})")
