"""The compiled form of a kept run plan, for the compiled front end ``berth`` (issue 10,
target 3; DESIGN.md direction 13: "Python plans, a small compiled program executes").

Python stays the only planner and the definer of every protocol. When berth.runtime.plancache's
Keeper keeps a plan that the front end can execute (below), it also writes this form of it, so
that the next identical ``berth run`` is executed by the front end (src/berth/runtime/init/
berth-front.c) without starting Python at all: the same state directory, container directory,
info.json, shared image mount protocol, bundle, berth-launcher and teardown as
berth.runtime.container's lifecycle. On anything else the front end execs ``berth-py`` (the
Python console script beside it) with argv and environment untouched.

**Key** (:func:`key_material`, :func:`compiled_key`): sha256 of one canonical byte string,
computed the same way by both sides (tests/unit/test_compiledplan.py runs the front end's
``--print-key`` on the same inputs): every field is ``LENGTH:BYTES``, in this order: the format,
the front end's real path, uid, euid, gid, egid, the supplementary groups, umask, argv (without
argv[0]), the whole environment as ``NAME=VALUE`` byte strings sorted bytewise, the working
directory (path, device, inode) and uname's five fields. A file is ``STATE/plans/c-KEY``, beside
Python's own entries (named ``c-KEY``: pruned with them, never read as one of them).

**Format** (:func:`render`): a bounded list of records ``TAG LENGTH\\n BYTES\\n``; no JSON or
marshal to parse in C. The dependencies are Python's own entry's, plus the front end and
berth-py, each ``D LENGTH\\n FLAG PATH\\0FINGERPRINT`` with the fingerprint as text
(:func:`fingerprint_text`), compared as bytes with the front end's own lstat. config.json and
info.json are rendered by Python with placeholders the front end fills with the container's id,
directory and image root (JSON-escaped; the front end refuses paths that would need escaping).

**What the front end runs** (:func:`compilable` says why not): a plan Python would keep, run with
``image_mount = "shared"``, no ``stage_to_local``, no overlay, no ``--name``, no identity file
naming the container, a container with its own pid namespace (in the host's, berth must end what
the container leaves behind: berth.runtime.supervise.adopt_orphans). Everything else the
entry's trust rules (private directory, the caller's regular file, not a link, at most
plancache.MAX_ENTRY_BYTES) are checked by the front end as berth.runtime.plancache.load_entry
checks them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from berth.runtime.plancache import COMPILED_PREFIX as PREFIX

FORMAT = b"berth-compiled 1"
KEY_FORMAT = b"berth-front-key 1"
#: The front end's name in the scripts directory, and the Python console script it execs.
FRONT = "berth"
PYTHON_ENTRY = "berth-py"
#: Placeholders in the rendered info.json (strings, so that json.dumps escapes them as \u0001X).
INFO_ID, INFO_STARTED, INFO_PID = "\x01I", "\x01S", "\x01P"


def front_end(argv0: str | None = None) -> str | None:
    """The compiled front end's real path when this process is the console script berth-py
    beside it (as the front end execs it), else None (``python -m berth``: no front end)."""
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    if os.path.basename(argv0) != PYTHON_ENTRY:
        return None
    path = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(argv0)), FRONT))
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def _field(value) -> bytes:
    if isinstance(value, int):
        value = str(value).encode()
    elif isinstance(value, str):
        value = os.fsencode(value)
    return b"%d:%s" % (len(value), value)


def key_material(front: str, argv: list[bytes], environ: dict[bytes, bytes]) -> bytes | None:
    """The canonical bytes the key hashes (module docstring); None when the working directory
    cannot be read."""
    try:
        cwd = os.getcwd()
        where = os.stat(cwd)
    except OSError:
        return None
    umask = os.umask(0o077)
    os.umask(umask)
    groups = os.getgroups()
    fields = [KEY_FORMAT, front, os.getuid(), os.geteuid(), os.getgid(), os.getegid(), len(groups), *groups,
              umask, len(argv), *argv]
    pairs = sorted(name + b"=" + value for name, value in environ.items())
    fields += [len(pairs), *pairs, cwd, where.st_dev, where.st_ino, *os.uname()]
    return b"".join(_field(value) for value in fields)


def compiled_key(front: str, argv: list[bytes], environ: dict[bytes, bytes]) -> str | None:
    from berth.runtime.plancache import _sha256

    material = key_material(front, argv, environ)
    if material is None:
        return None
    digest = _sha256()
    digest.update(material)
    return digest.hexdigest()


def fingerprint_text(value: tuple | None) -> str:
    """A plancache.fingerprint as the front end writes its own: ``-`` (absent), ``e ERRNO``, or
    the numbers separated by spaces."""
    if value is None:
        return "-"
    if value[0] == "error":
        return f"e {value[1]}"
    return " ".join(str(number) for number in value)


def _record(tag: bytes, value) -> bytes:
    if isinstance(value, str):
        value = os.fsencode(value)
    elif isinstance(value, int):
        value = str(value).encode()
    return b"%s %d\n%s\n" % (tag, len(value), value)


def compilable(settings, options, plan, info_template: str, config_template: str) -> str | None:
    """Why the front end cannot run this kept plan, or None."""
    from berth.runtime.supervise import in_host_pid_namespace

    checks = (
        (settings.image_mount != "shared", f"image_mount = {settings.image_mount}"),
        (bool(settings.stage_to_local), "stage_to_local"),
        (bool(plan["overlay"]), "an overlay"),
        (options.name is not None, "--name"),
        # berth is then the subreaper that ends what the container leaves behind
        # (supervise.adopt_orphans), which the front end is not.
        (in_host_pid_namespace(plan["config"]), "the host's pid namespace"),
        (any("\0" in text for item in plan["identity_files"] for text in item), "an identity file names the container"),
        (info_template.count("\\u0001") != 4 or "\\\\u0001" in info_template, "info.json's placeholders"),
        ("\\\\u0000" in config_template
         or config_template.count("\\u0000") != config_template.count("\\u0000C") + config_template.count("\\u0000I"),
         "config.json's placeholders"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    return None


def render(key: str, front: str, fingerprints: list, *, state_dir: str, image_key: str, settings, run: dict,
           plan: dict, launcher: str, info_template: str, config_template: str) -> bytes:
    """The compiled entry's bytes (module docstring)."""
    out = [FORMAT + b"\n", _record(b"key", key), _record(b"uid", os.getuid()), _record(b"front", front)]
    for path, contents, value in fingerprints:
        out.append(_record(b"D", os.fsencode(("c " if contents else "i ") + path) + b"\0"
                           + fingerprint_text(value).encode()))
    stop_ms = int(round(float(run["stop_timeout_s"]) * 1000))
    out += [_record(b"state_dir", state_dir), _record(b"image_key", image_key),
            _record(b"linger_s", int(settings.image_mount_linger)),
            _record(b"lock_timeout_s", int(settings.lock_timeout_s)), _record(b"stop_timeout_ms", stop_ms),
            _record(b"debug", 1 if run["debug"] else 0), _record(b"launcher", launcher)]
    for name, text, _target in plan["identity_files"]:
        out.append(_record(b"identity", os.fsencode(name) + b"\0" + text.encode("utf-8", "surrogateescape")))
    out += [_record(b"info", info_template), _record(b"config", config_template), b"end 0\n\n"]
    return b"".join(out)


def info_template(run: dict, image_mount: str) -> str:
    """info.json as berth.runtime.container._run writes it for a shared mount run by
    berth-launcher, with the id, start time and pid as placeholders."""
    info = {
        "id": INFO_ID, "name": INFO_ID, "image": run["image_name"], "command": list(run["argv"]),
        "started": INFO_STARTED, "pid": INFO_PID, "runtime": "berth-launcher", "uid": run["uid"],
        "gid": run["gid"], "remap_root": bool(run["remap_root"]), "daemon_pids": [], "cpu_set": [],
        "image_mount": image_mount,
    }
    return json.dumps(info, sort_keys=True)


def twin_name(front: str) -> str | None:
    """The name of this run's compiled entry (``c-KEY``, the key of this process's argv and
    environment as the front end computes it), or None when the working directory cannot be
    read."""
    key = compiled_key(front, [os.fsencode(arg) for arg in sys.argv[1:]], dict(os.environb))
    return None if key is None else PREFIX + key


def keep(directory: Path, front: str, name: str, fingerprints: list, *, state_dir: str, settings, options, image,
         entry: dict, extra_dependencies) -> str | None:
    """Write the compiled form ``name`` (:func:`twin_name`) of the kept ``entry``
    (plancache.Keeper) into ``directory``, or say why not. Raises OSError."""
    from berth.fsutil import PRIVATE_FILE, write_atomically
    from berth.runtime import imagemount
    from berth.runtime.ocirt import launcher_path
    from berth.runtime.plancache import fingerprint

    plan, run = entry["plan"], entry["run"]
    image_key = imagemount.image_key(Path(image.squashfs), getattr(image, "digest", None),
                                     imagemount.mount_scope(os.environ))
    info = info_template(run, str(imagemount.images_dir(Path(state_dir)) / image_key))
    config = json.dumps(plan["config"])
    why = compilable(settings, options, plan, info, config)
    if why:
        return why
    known = {path for path, _, _ in fingerprints}
    fingerprints = list(fingerprints) + [(path, True, fingerprint(path, True))
                                         for path in extra_dependencies if path not in known]
    data = render(name[len(PREFIX):], front, fingerprints, state_dir=state_dir, image_key=image_key, settings=settings, run=run,
                  plan=plan, launcher=launcher_path(), info_template=info, config_template=config)
    write_atomically(directory / name, data, mode=PRIVATE_FILE, nofollow_dir=True, durable=False)
    return None
