"""Container templates (NQSV model): site configuration, one TOML file per template.

A template names an image (pinned by manifest digest when it was created), the resources a job
of that template gets (``cpu``, ``memsz``, ``gpu``), the time limits of the container's life
(``boot_timeout``: staging plus start-up on a node; ``stop_timeout``: grace between SIGTERM and
SIGKILL) and extra ``berth run`` options (``custom``). Files live in
``settings.templates_dir`` (``$BERTH_CONFIG_DIR/templates.d/NAME.toml``).

Admins edit templates with ``berth template``: the NQSV ``key=value`` words are parsed by
``parse_assignments``; every change is a read-modify-write under an exclusive ``flock`` on
``templates.d/.lock`` and each file is replaced atomically (temporary file, fsync, rename), so
concurrent admins never lose a change and readers never see half a file. Readers take no lock.

This module never pulls images (config sits below image in the layers): the CLI pulls into
the site store and passes the digest to ``create_template`` / ``update_template``.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from berth.config.settings import Settings
from berth.config.tomlfile import KeyLines, read_toml, toml_value
from berth.config.units import STOP_TIMEOUT_MAX_S, format_size, parse_duration, parse_memory
from berth.errors import ConfigError, NotFound, PermissionDenied, UsageError, did_you_mean
from berth.fsutil import PUBLIC_FILE, write_atomically
from berth.locks import acquire, open_lock_file
from berth.oci.digest import Digest, InvalidDigest
from berth.oci.reference import InvalidReference, Reference
from berth.record import Record, asdict, fields, replace

#: A template name (it becomes a file name); matched in full (issue 12: no final newline).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LOCK_NAME = ".lock"

#: Limits that keep a typo (memsz=4T for 4G, cpu=640) from becoming a template; stated in errors.
CPU_MAX = 4096
GPU_MAX = 64
BOOT_TIMEOUT_MAX_S = 24 * 3600
TEXT_MAX_CHARS = 4096

DEFAULT_BOOT_TIMEOUT_S = 300
DEFAULT_STOP_TIMEOUT_S = 30

#: NQSV words accepted by ``berth template create/modify``.
ASSIGNMENT_KEYS = ("image", "cpu", "memsz", "gpu", "boot_timeout", "stop_timeout", "custom", "comment")
REQUIRED_KEYS = ("image", "cpu", "memsz")


class Template(Record):
    """One container template (docs/contracts.md "berth.config.templates")."""

    name: str
    #: The image reference as the admin gave it (a tag is re-resolved only by `template refresh`).
    image: str
    #: Manifest digest ("sha256:…") pinned when the template was created or refreshed.
    image_digest: str | None
    cpu: int
    memsz_bytes: int
    gpu: int = 0
    boot_timeout_s: int = DEFAULT_BOOT_TIMEOUT_S
    stop_timeout_s: int = DEFAULT_STOP_TIMEOUT_S
    #: Extra `berth run` options, shell-quoted, validated against site policy when set.
    custom: str = ""
    comment: str = ""
    #: Who changed the template last, and when (UTC, ISO 8601); informational.
    updated_by: str = ""
    updated_at: str = ""

    @property
    def pinned_reference(self) -> str:
        """What jobs run: ``image`` with the pinned digest (``name@sha256:…``), else ``image``."""
        if not self.image_digest:
            return self.image
        reference = Reference.parse(self.image)
        return str(reference.with_digest(Digest.parse(self.image_digest)))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["memsz"] = format_size(self.memsz_bytes)
        data["pinned_reference"] = self.pinned_reference
        return data


# --- validation -------------------------------------------------------------------------------


def is_template_name(name: str) -> bool:
    """True for 1 to 64 letters, digits, '_', '.', '-', starting with a letter or digit."""
    return NAME_PATTERN.fullmatch(name) is not None and not name.endswith(".toml")


def check_name(name: str) -> str:
    """Raise UsageError unless ``name`` is a template name (it becomes a file name)."""
    if not is_template_name(name):
        raise UsageError(
            f"invalid template name {name!r}",
            hint="use 1 to 64 letters, digits, '_', '.', '-', starting with a letter or digit",
        )
    return name


def _int_in(key: str, value: int, low: int, high: int, unit: str = "") -> int:
    if not low <= value <= high:
        raise ValueError(f"{key}={value}{unit} is out of range: allowed {low} to {high}{unit}")
    return value


def _text(key: str, value: str) -> str:
    if len(value) > TEXT_MAX_CHARS:
        raise ValueError(f"{key} is {len(value)} characters long: at most {TEXT_MAX_CHARS}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{key} may not contain control characters (newlines, tabs, escapes)")
    return value


def _check_image(value: str) -> str:
    try:
        Reference.parse(value)
    except InvalidReference as exc:
        raise ValueError(str(exc)) from None
    return value


def _check_custom(value: str) -> str:
    _text("custom", value)
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"custom is not valid shell-quoted options: {exc} in {value!r}") from None
    return value


def _parse_int(key: str, text: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]{1,18}", text.strip()):  # int() refuses past 4300 digits: a traceback
        raise ValueError(f"{key}={text[:40]}: expected a whole number (of at most 18 digits)")
    return int(text)


def _parse_value(key: str, text: str) -> tuple[str, Any]:
    """One NQSV word's value -> (Template field, checked value).

    Raises ValueError, or UsageError naming the key for sizes and durations (config.units)."""
    if key == "image":
        return "image", _check_image(text)
    if key == "cpu":
        return "cpu", _int_in("cpu", _parse_int("cpu", text), 1, CPU_MAX)
    if key == "gpu":
        return "gpu", _int_in("gpu", _parse_int("gpu", text), 0, GPU_MAX)
    if key == "memsz":
        return "memsz_bytes", parse_memory(text, option="memsz", bare_unit=None)
    if key in ("boot_timeout", "stop_timeout"):
        high = BOOT_TIMEOUT_MAX_S if key == "boot_timeout" else STOP_TIMEOUT_MAX_S
        return f"{key}_s", parse_duration(text, option=key, bare_unit="s", maximum_s=high)
    if key == "custom":
        return "custom", _check_custom(text)
    if key == "comment":
        return "comment", _text("comment", text)
    raise ValueError(f"unknown key '{key}'")


def parse_assignments(words: list[str], *, require: bool) -> dict[str, Any]:
    """Parse NQSV ``key=value`` words into Template field values.

    ``require`` (create) demands image, cpu and memsz. Raises UsageError naming the offending
    word for: no ``=``, unknown or repeated key, empty value (except custom/comment), bad value.
    """
    changes: dict[str, Any] = {}
    seen: set[str] = set()
    for word in words:
        key, sep, text = word.partition("=")
        if not sep or not key:
            raise UsageError(f"malformed argument '{word}': expected key=value",
                             hint=f"keys: {', '.join(ASSIGNMENT_KEYS)}; quote values with spaces: custom=\"--env A=1\"")
        if key not in ASSIGNMENT_KEYS:
            suggestion = did_you_mean(key, ASSIGNMENT_KEYS)
            raise UsageError(f"unknown key '{key}' in '{word}'",
                             hint=f"{suggestion + ' ' if suggestion else ''}template keys: {', '.join(ASSIGNMENT_KEYS)}")
        if key in seen:
            raise UsageError(f"key '{key}' given twice", hint="give each key once")
        seen.add(key)
        if not text.strip() and key not in ("custom", "comment"):
            raise UsageError(f"'{word}' has no value", hint=f"write {key}=VALUE")
        try:
            field, value = _parse_value(key, text)
        except ValueError as exc:
            raise UsageError(f"bad value in '{word}': {exc}") from None
        except UsageError as exc:  # a size or duration: the message names the key already
            raise UsageError(f"bad value in '{word}': {exc.message}", hint=exc.hint) from None
        changes[field] = value
    if require:
        missing = [key for key in REQUIRED_KEYS if key not in seen]
        if missing:
            raise UsageError(f"missing required key{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
                             hint="berth template create NAME image=REF cpu=N memsz=SIZE [gpu=N] "
                             "[boot_timeout=S] [stop_timeout=S] [custom=\"OPTIONS\"] [comment=\"TEXT\"]")
    if not words:
        raise UsageError("nothing to change: give key=value words", hint=f"template keys: {', '.join(ASSIGNMENT_KEYS)}")
    return changes


# --- files ------------------------------------------------------------------------------------


def template_path(settings: Settings, name: str) -> Path:
    return settings.templates_dir / f"{check_name(name)}.toml"


#: File keys -> (Template field, how to check the TOML value). NQSV names are accepted as
#: aliases so that an admin may write ``memsz = "4G"`` by hand.
_FILE_KEYS = {
    "image": "image", "image_digest": "image_digest", "cpu": "cpu", "memsz_bytes": "memsz_bytes",
    "memsz": "memsz_bytes", "gpu": "gpu", "boot_timeout_s": "boot_timeout_s", "boot_timeout": "boot_timeout_s",
    "stop_timeout_s": "stop_timeout_s", "stop_timeout": "stop_timeout_s", "custom": "custom",
    "comment": "comment", "updated_by": "updated_by", "updated_at": "updated_at",
}


def _file_value(field: str, key: str, value: Any) -> Any:
    """Check one value read from a template file. Raises ValueError."""
    if field in ("updated_by", "updated_at", "image_digest", "image", "custom", "comment") or key == "memsz":
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {_kind(value)}")
        if field in ("updated_by", "updated_at"):
            return _text(key, value)
        if field == "image_digest":
            try:
                return str(Digest.parse(value))
            except InvalidDigest as exc:
                raise ValueError(str(exc)) from None
        return _parse_value(key, value)[1]
    if key in ("boot_timeout", "stop_timeout") and isinstance(value, str):
        return _parse_value(key, value)[1]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {_kind(value)}")
    if key == "memsz_bytes":
        return parse_memory(str(value), option="memsz_bytes", bare_unit="B")
    return _parse_value(key.removesuffix("_s"), str(value))[1]


def _kind(value: Any) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean", float: "a float",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def read_template_file(path: Path, name: str) -> Template:
    """Load and validate one template file. Raises NotFound, ConfigError (file:line: key)."""
    parsed = read_toml(path)
    if parsed is None:
        raise NotFound(f"no template named '{name}'", hint="`berth template list` shows the templates of this site")
    document, lines = parsed
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in document.items():
        where = _where(path, lines, key)
        if key not in _FILE_KEYS:
            suggestion = did_you_mean(key, _FILE_KEYS)
            raise ConfigError(f"{where}: template '{name}': unknown key '{key}'",
                              hint=f"{suggestion + ' ' if suggestion else ''}template file keys: "
                              f"{', '.join(sorted(_FILE_KEYS))}")
        field = _FILE_KEYS[key]
        if field in given:
            raise ConfigError(f"{where}: template '{name}': '{key}' repeats '{given[field]}'", hint="keep one of them")
        given[field] = key
        try:
            values[field] = _file_value(field, key, value)
        except ValueError as exc:
            raise ConfigError(f"{where}: template '{name}': {key}: {exc}",
                              hint="fix the file, or rewrite it with `berth template modify`") from None
        except UsageError as exc:  # a size or duration: the message names the key already
            raise ConfigError(f"{where}: template '{name}': {exc.message}",
                              hint=f"{exc.hint}; fix the file, or rewrite it with `berth template modify`") from None
    for required in ("image", "cpu", "memsz_bytes"):
        if required not in values:
            raise ConfigError(f"{path}: template '{name}' has no '{required}'",
                              hint="fix the file, or re-create it with `berth template create`")
    values.setdefault("image_digest", None)
    return Template(name=name, **values)


def _where(path: Path, lines: KeyLines, key: str) -> str:
    line = lines.line((key,))
    return f"{path}:{line}" if line else str(path)


def render_template(template: Template) -> str:
    """The TOML text berth writes for ``template`` (stable order, a human size as comment)."""
    out = [
        f"# berth container template '{template.name}': managed by `berth template`;",
        "# hand edits are validated when read (docs/configuration.md, \"Templates\").",
    ]
    for key in ("image", "image_digest", "cpu", "memsz_bytes", "gpu", "boot_timeout_s", "stop_timeout_s",
                "custom", "comment", "updated_by", "updated_at"):
        value = getattr(template, key)
        if value is None:
            continue
        line = f"{key} = {toml_value(value)}"
        if key == "memsz_bytes":
            line += f"  # {format_size(value)}"
        out.append(line)
    return "\n".join(out) + "\n"


def load_template(settings: Settings, name: str) -> Template:
    """The template ``name``. Raises UsageError (bad name), NotFound, ConfigError (bad file)."""
    return read_template_file(template_path(settings, name), name)


def list_templates(settings: Settings) -> list[Template]:
    """Every template, sorted by name; a missing templates directory means none.

    A broken file raises ConfigError (``berth config check`` reports them all at once).
    """
    directory = settings.templates_dir
    try:
        names = sorted(entry.name[: -len(".toml")] for entry in os.scandir(directory)
                       if entry.name.endswith(".toml") and not entry.name.startswith("."))
    except FileNotFoundError:
        return []
    except PermissionError:
        raise ConfigError(f"cannot list templates in {directory}: permission denied",
                          hint="ask your site administrator to make it world-readable (chmod 0755)") from None
    return [read_template_file(directory / f"{name}.toml", name) for name in names if is_template_name(name)]


# --- writers ----------------------------------------------------------------------------------


def check_can_edit(settings: Settings) -> None:
    """Raise PermissionDenied unless the caller can write the templates directory, or create
    it (and a missing site directory) in its nearest existing ancestor."""
    target = settings.templates_dir
    while not target.exists() and target.parent != target:
        target = target.parent
    if not (target.is_dir() and os.access(target, os.W_OK | os.X_OK)):
        raise PermissionDenied(
            f"cannot change templates: {target} is not writable by you",
            hint="templates are site configuration: ask your site administrator",
        )


@contextmanager
def templates_lock(settings: Settings) -> Iterator[None]:
    """Hold the exclusive lock of the templates directory (created if missing, mode 0755).

    The lock file is 0600: only the administrators who write templates can hold it, readers
    never need it (files are replaced atomically). The wait is bounded (``lock_timeout_s``)."""
    check_can_edit(settings)
    directory = settings.templates_dir
    path = directory / LOCK_NAME
    try:
        _make_readable_dirs(directory)
        fd = open_lock_file(path)
    except PermissionError:
        raise PermissionDenied(f"cannot change templates: {directory} is not writable by you",
                               hint="templates are site configuration: ask your site administrator") from None
    except OSError as exc:
        raise ConfigError(f"cannot open the templates lock {path}: {exc.strerror or exc}",
                          hint="it must be a regular file: remove whatever is there") from None
    try:
        acquire(fd, path, timeout_s=settings.lock_timeout_s, purpose="template changes")
        yield
    finally:
        os.close(fd)


def _make_readable_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents as 0755 whatever the admin's umask: every user
    must read templates."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        path.chmod(0o755)


def _stamp(template: Template) -> Template:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid())
    return replace(template, updated_by=who, updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _validate(template: Template) -> Template:
    """Check a whole template the way a file is checked on load (round trip through the reader)."""
    check_name(template.name)
    for key, field in (("image", "image"), ("cpu", "cpu"), ("gpu", "gpu"), ("custom", "custom"),
                       ("comment", "comment")):
        _parse_value(key, str(getattr(template, field)))
    _parse_value("memsz", f"{template.memsz_bytes}B")
    _parse_value("boot_timeout", str(template.boot_timeout_s))
    _parse_value("stop_timeout", str(template.stop_timeout_s))
    if template.image_digest is not None:
        Digest.parse(template.image_digest)
    return template


def create_template(settings: Settings, template: Template) -> Template:
    """Write a new template. Raises PermissionDenied, ConfigError when ``name`` exists."""
    try:
        _validate(template)
    except (ValueError, InvalidDigest) as exc:
        raise UsageError(f"template '{template.name}': {exc}") from None
    with templates_lock(settings):
        path = template_path(settings, template.name)
        if path.exists():
            raise ConfigError(f"template '{template.name}' already exists ({path})",
                              hint=f"change it with `berth template modify {template.name} key=value...`, "
                              "or delete it first")
        stamped = _stamp(template)
        write_atomically(path, render_template(stamped), mode=PUBLIC_FILE)
        return stamped


def update_template(settings: Settings, name: str, changes: Mapping[str, Any], *,
                    expect_image: str | None = None) -> Template:
    """Apply ``changes`` (Template field -> value) to the current file under the lock.

    Changing ``image`` requires ``image_digest`` in the same changes (the caller pulled it).
    ``expect_image``: refuse (ConfigError) if the template's image changed meanwhile (used by
    refresh, which pulled the old image). Raises NotFound, PermissionDenied, UsageError.
    """
    if "image" in changes and "image_digest" not in changes:
        raise UsageError("changing a template's image needs the new image's digest",
                         hint="berth template modify pulls the image and pins its digest")
    unknown = set(changes) - {item.name for item in fields(Template)} | ({"name"} & set(changes))
    if unknown:
        raise UsageError(f"cannot change template field(s): {', '.join(sorted(unknown))}")
    with templates_lock(settings):
        current = load_template(settings, name)
        if expect_image is not None and current.image != expect_image:
            raise ConfigError(f"template '{name}' changed while its image was pulled: it now names {current.image}",
                              hint=f"run `berth template refresh {name}` again")
        updated = replace(current, **dict(changes))
        try:
            _validate(updated)
        except (ValueError, InvalidDigest) as exc:
            raise UsageError(f"template '{name}': {exc}") from None
        updated = _stamp(updated)
        write_atomically(template_path(settings, name), render_template(updated), mode=PUBLIC_FILE)
        return updated


def delete_template(settings: Settings, name: str) -> None:
    """Remove a template. Raises NotFound, PermissionDenied."""
    with templates_lock(settings):
        path = template_path(settings, name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(f"no template named '{name}'",
                           hint="`berth template list` shows the templates of this site") from None
