"""The container's environment, composed in the documented order (issue 3).

1. the image's ``Env``;
2. host variables matching ``settings.policy.passthrough_env`` globs (scheduler, MPI, GPU,
   locale) — nothing else of the caller's environment leaks in;
3. identity: HOME, USER, LOGNAME (and TERM with ``-t`` when none is set);
4. site policy operations (set/prepend/append/unset), then those of the caller's groups;
5. ``--env-file`` files, then ``-e`` options, in command-line order (issue 3's order: an
   explicit request of the user comes last).

Pure apart from :func:`read_env_file`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence

from berth.errors import RuntimeFailure, UsageError
from berth.runtime.options import check_env_entry
from berth.runtime.spec import DEFAULT_PATH

#: Limits on an image's Env: execve fails beyond ~2 MiB of strings (ARG_MAX) and 128 KiB per
#: string (MAX_ARG_STRLEN); refuse earlier with a clear message.
MAX_ENTRY_BYTES = 128 * 1024
MAX_ENV_BYTES = 1024 * 1024
MAX_ENTRIES = 4096


def check_image_env(env: Sequence, image_name: str) -> list[str]:
    """Validate an image config's Env list; raises RuntimeFailure for a hostile one."""
    if not isinstance(env, (list, tuple)):
        raise RuntimeFailure(f"image {image_name}: config Env is not a list",
                             hint="the image is broken; ask its author")
    total = 0
    out = []
    if len(env) > MAX_ENTRIES:
        raise RuntimeFailure(f"image {image_name}: config Env has {len(env)} entries (at most {MAX_ENTRIES})",
                             hint="the image is broken or hostile; ask its author")
    for entry in env:
        if not isinstance(entry, str) or "=" not in entry or "\0" in entry or not entry.partition("=")[0]:
            raise RuntimeFailure(f"image {image_name}: config Env entry {str(entry)[:60]!r} is not KEY=VALUE",
                                 hint="the image is broken; ask its author")
        size = len(entry.encode("utf-8", "replace"))
        if size > MAX_ENTRY_BYTES:
            raise RuntimeFailure(f"image {image_name}: config Env entry {entry[:40]!r}... is {size} bytes "
                                 f"(at most {MAX_ENTRY_BYTES})", hint="the image is broken or hostile; ask its author")
        total += size
        out.append(entry)
    if total > MAX_ENV_BYTES:
        raise RuntimeFailure(f"image {image_name}: config Env totals {total} bytes (at most {MAX_ENV_BYTES})",
                             hint="the image is broken or hostile; ask its author")
    return out


def read_env_file(path: str) -> list[str]:
    """``KEY=VALUE`` lines of an --env-file (blank lines and ``#`` comments skipped)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(MAX_ENV_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"--env-file {path}: cannot read it ({exc.strerror})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        check_env_entry(line, what=f"--env-file {path} line {number}", show=False)
        entries.append(line)
    return entries


def apply_op(env: dict[str, str], op) -> None:
    """Apply one berth.config.settings.EnvOp to ``env`` in place."""
    if op.op == "set":
        env[op.name] = op.value
    elif op.op == "unset":
        env.pop(op.name, None)
    elif op.op == "prepend":
        env[op.name] = op.value + (op.separator + env[op.name] if env.get(op.name) else "")
    elif op.op == "append":
        env[op.name] = (env[op.name] + op.separator if env.get(op.name) else "") + op.value
    else:
        raise RuntimeFailure(f"site policy env operation '{op.op}' for {op.name} is unknown",
                             hint="ask your site administrator: use set, prepend, append or unset")


def glob_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A test of a variable name against shell-style ``patterns``, true exactly when
    ``fnmatch.fnmatchcase`` matches one of them. Exact names and ``PREFIX*`` patterns (all of
    the default passthrough list) are a set and one ``str.startswith``; only others go through
    fnmatch. Every container start tests each host variable (a Slurm step has a hundred or
    more) against each pattern: ~1.5 ms with fnmatch for every one (issue 10, start-up)."""
    exact: set[str] = set()
    prefixes: list[str] = []
    globs: list[str] = []
    for pattern in patterns:
        head = pattern[:-1] if pattern.endswith("*") else pattern
        if any(special in head for special in "*?["):
            globs.append(pattern)
        elif pattern.endswith("*"):
            prefixes.append(head)
        else:
            exact.add(pattern)
    starts = tuple(prefixes)

    def matches(name: str) -> bool:
        return name in exact or name.startswith(starts) or any(fnmatch.fnmatchcase(name, glob) for glob in globs)

    return matches


def compose_env(
    image_env: Iterable[str],
    *,
    host_env: Mapping[str, str],
    passthrough: Sequence[str],
    identity: Mapping[str, str],
    site_ops: Sequence = (),
    user_entries: Sequence[str] = (),
    tty: bool = False,
) -> list[str]:
    """The final ``KEY=VALUE`` list, in the order described in the module docstring."""
    env: dict[str, str] = {}
    for entry in image_env:
        key, _, value = entry.partition("=")
        env[key] = value
    passes = glob_matcher(passthrough)
    for key, value in host_env.items():
        if passes(key):
            env[key] = value
    env.update(identity)
    if "PATH" not in env:
        env["PATH"] = DEFAULT_PATH
    if tty and "TERM" not in env:
        env["TERM"] = "xterm"
    for op in site_ops:
        apply_op(env, op)
    for entry in user_entries:
        key, sep, value = entry.partition("=")
        if sep:
            env[key] = value
        elif key in host_env:
            env[key] = host_env[key]
    return [f"{key}={value}" for key, value in env.items()]
