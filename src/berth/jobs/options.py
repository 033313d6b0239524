"""Submit options: one table for the command line and for ``#BERTH`` directive lines.

``berth submit`` takes sbatch's option names (STYLE.md: options users already know). The same
names may appear in the script as ``#BERTH --nodes=2`` lines, read like sbatch reads
``#SBATCH``: only in the leading comment block (up to the first command), one or more options
per line; the command line wins over directives. Values are checked here, once, so that a typo
in a directive is reported with its line number and nothing is submitted.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from berth.config.units import MEMORY_MAX_BYTES, parse_duration, parse_memory
from berth.errors import UsageError, did_you_mean

#: Upper bounds that catch typos (``--nodes=10000000``) before a scheduler sees them.
MAX_NODES = 100_000
MAX_TASKS = 10_000_000
MAX_CPUS_PER_TASK = 4096
MAX_GPUS = 64
MAX_MEMORY_BYTES = MEMORY_MAX_BYTES  # per node
MAX_TIME_LIMIT_S = 365 * 24 * 3600

DIRECTIVE_PREFIX = "#BERTH"


@dataclass(frozen=True)
class OptionSpec:
    """One submit option: its names, its key in the values dict, and whether it takes a value."""

    key: str
    names: tuple[str, ...]
    metavar: str | None
    help: str
    #: May be given several times (values collect in a list, in order).
    repeat: bool = False

    @property
    def flag(self) -> bool:
        return self.metavar is None


#: The submit options (besides --template/--image/--backend, which directives may set too).
SUBMIT_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("template", ("--template",), "NAME", "container template published by the site"),
    OptionSpec("image", ("--image",), "REF", "image to run (instead of a template)"),
    OptionSpec("backend", ("--backend",), "NAME", "local or slurm (default: the site's setting)"),
    OptionSpec("nodes", ("-N", "--nodes"), "N", "number of nodes (the script runs on the first)"),
    OptionSpec("ntasks", ("-n", "--ntasks"), "N", "number of tasks for steps inside the job"),
    OptionSpec("ntasks_per_node", ("--ntasks-per-node",), "N", "tasks per node"),
    OptionSpec("cpus_per_task", ("-c", "--cpus-per-task"), "N", "CPUs per task (default: the template's cpu)"),
    OptionSpec("mem", ("--mem",), "SIZE", "memory per node, e.g. 4G (default unit M, as sbatch)"),
    OptionSpec("gres", ("--gres",), "gpu:N", "generic resources: only gpu:N"),
    OptionSpec("gpus", ("--gpus",), "N", "GPUs per node (the same as --gres=gpu:N)"),
    OptionSpec("time", ("-t", "--time"), "TIME", "time limit: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]"),
    OptionSpec("job_name", ("-J", "--job-name"), "NAME", "job name (default: the script's name)"),
    OptionSpec("output", ("-o", "--output"), "PATH", "stdout file (%%j: job id, %%x: job name)"),
    OptionSpec("error", ("-e", "--error"), "PATH", "stderr file (default: with stdout)"),
    OptionSpec("partition", ("-p", "--partition"), "NAME", "scheduler partition / queue"),
    OptionSpec("exclusive", ("--exclusive",), None, "whole nodes for this job"),
    # Data staging (docs/staging.md).
    OptionSpec("stage_in", ("--stage-in",), "SRC:DEST", "copy s3://, https:// or host data into the job's "
               "directory before the container starts (repeatable)", repeat=True),
    OptionSpec("stage_out", ("--stage-out",), "SRC:DEST", "copy the job's files (path or glob) to s3:// or a host "
               "directory after the container exits (repeatable)", repeat=True),
    OptionSpec("stage_out_when", ("--stage-out-when",), "always|success", "stage out after any end of the "
               "script (default) or only after success"),
    OptionSpec("s3_profile", ("--s3-profile",), "NAME", "S3 profile for staging (default: 'default')"),
    OptionSpec("s3_credentials_in_container", ("--s3-credentials-in-container",), None,
               "give the container the profile's keys as a 0600 AWS credentials file"),
)

_BY_NAME = {name: spec for spec in SUBMIT_OPTIONS for name in spec.names}
#: Job and partition names; matched in full (issue 12: '$' accepts a final newline).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def parse_option_words(words: list[str], *, where: str) -> dict[str, str | bool]:
    """``["-N", "2", "--mem=4G", "--exclusive"]`` -> ``{"nodes": "2", ...}`` (raw strings).

    Accepts ``--long=value``, ``--long value``, ``-N2`` and ``-N 2``. Raises UsageError naming
    ``where`` (e.g. "job.sh line 3") for unknown options or missing values.
    """
    values: dict[str, str | bool] = {}
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        name, value = word, None
        if word.startswith("--") and "=" in word:
            name, value = word.split("=", 1)
        elif word.startswith("-") and not word.startswith("--") and len(word) > 2:
            name, value = word[:2], word[2:]
        spec = _BY_NAME.get(name)
        if spec is None:
            hint = (did_you_mean(name, (n for n in _BY_NAME if n.startswith("--")))
                    or "see `berth submit --help` for the options")
            raise UsageError(f"{where}: unknown option '{name}'", hint=hint)
        if spec.flag:
            if value is not None:
                raise UsageError(f"{where}: option {name} takes no value")
            values[spec.key] = True
            continue
        if value is None:
            if index >= len(words):
                raise UsageError(f"{where}: option {name} needs a value ({spec.metavar})")
            value = words[index]
            index += 1
        if spec.repeat:
            values.setdefault(spec.key, []).append(value)  # type: ignore[union-attr]
        else:
            values[spec.key] = value
    return values


def read_directives(script: Path, text: str) -> dict[str, str | bool]:
    """The ``#BERTH`` options of a script, from its leading comment block.

    Like sbatch, reading stops at the first line that is neither blank nor a comment. A line
    that starts with ``#BERTH`` but does not parse is an error naming the file and line.
    """
    values: dict[str, str | bool] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if number == 1 and stripped.startswith("#!"):
            continue
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        head = stripped.split(None, 1)[0]
        if head.upper() == DIRECTIVE_PREFIX and head != DIRECTIVE_PREFIX:
            raise UsageError(f"{script} line {number}: '{head}' must be written '{DIRECTIVE_PREFIX}'")
        if head != DIRECTIVE_PREFIX:
            if head.upper().startswith(DIRECTIVE_PREFIX):
                raise UsageError(f"{script} line {number}: unknown directive '{head}'",
                                 hint=f"directives are written '{DIRECTIVE_PREFIX} --option=value'")
            continue
        rest = stripped[len(DIRECTIVE_PREFIX):]
        try:
            words = shlex.split(rest, comments=True)
        except ValueError as exc:
            raise UsageError(f"{script} line {number}: {exc}") from None
        if not words:
            raise UsageError(f"{script} line {number}: '{DIRECTIVE_PREFIX}' without an option")
        values.update(parse_option_words(words, where=f"{script} line {number}"))
    return values


def positive_int(raw: str, option: str, limit: int) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{option} '{raw}': not a whole number") from None
    if value < 1:
        raise UsageError(f"{option} {value}: must be at least 1")
    if value > limit:
        raise UsageError(f"{option} {value}: more than berth accepts ({limit})",
                         hint="check the value for a typo")
    return value


def parse_time_s(raw: str, option: str = "--time") -> int:
    """``-t/--time`` -> seconds: sbatch's formats (a bare number is minutes) and the unit forms
    of every berth duration (config.units). Raises UsageError; zero and more than a year are refused."""
    return parse_duration(raw, option=option, bare_unit="min", maximum_s=MAX_TIME_LIMIT_S)


def parse_memory_bytes(raw: str, option: str = "--mem") -> int:
    """``--mem`` as sbatch reads it (no unit means M); units and bounds from config.units."""
    return parse_memory(raw, option=option, bare_unit="M")


def parse_gres_gpus(raw: str) -> int:
    """``gpu:N`` or ``gpu`` (one) -> N. Other generic resources are refused."""
    parts = raw.strip().split(":")
    if parts[0] != "gpu" or len(parts) > 3:
        raise UsageError(f"--gres '{raw}': berth knows only gpu:N", hint="for example --gres=gpu:2")
    if len(parts) == 1:
        return 1
    count = parts[-1]
    if not re.fullmatch(r"[0-9]{1,9}", count):
        raise UsageError(f"--gres '{raw}': the GPU count '{count}' is not a whole number")
    if int(count) > MAX_GPUS:
        raise UsageError(f"--gres '{raw}': more than {MAX_GPUS} GPUs per node", hint="check the value for a typo")
    return int(count)


def check_name(raw: str, option: str) -> str:
    if not _NAME.fullmatch(raw):
        raise UsageError(f"{option} {raw!r}: use letters, digits, '_', '.', '+', '-' (at most 128)")
    return raw
