"""Submit options: one table of Slurm's options for the command line, ``#BERTH`` and ``#SBATCH``
lines, and ``berth srun``.

``berth submit`` takes sbatch's options (STYLE.md: options users already know), read with
sbatch's own grammar (:data:`SLURM_OPTIONS`, from Slurm's man pages). A few are berth's
(:data:`BERTH_OPTIONS`: --template, --image, --backend), some sbatch options berth interprets
itself (:data:`INTERPRETED`: resources it checks against the template, output paths it
resolves), a few it refuses because they would take over its own job (:data:`REFUSED`), and
every other one passes to sbatch unchanged. Options come from three places, the later winning:
``#SBATCH`` lines, ``#BERTH`` lines (both read as sbatch reads ``#SBATCH``: only in the leading
comment block, up to the first command), then the command line. Values are checked here, once,
so that a typo in a directive is reported with its line number and nothing is submitted.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from berth.config.units import MEMORY_MAX_BYTES, parse_duration, parse_memory
from berth.errors import UsageError, did_you_mean
from berth.record import Record

#: Upper bounds that catch typos (``--nodes=10000000``) before a scheduler sees them.
MAX_NODES = 100_000
MAX_TASKS = 10_000_000
MAX_CPUS_PER_TASK = 4096
MAX_GPUS = 64
MAX_MEMORY_BYTES = MEMORY_MAX_BYTES  # per node
MAX_TIME_LIMIT_S = 365 * 24 * 3600

DIRECTIVE_PREFIX = "#BERTH"


FLAG, VALUE, OPTIONAL = "flag", "value", "optional"


class SlurmOption(Record):
    """One option of Slurm's sbatch/srun and its grammar in each: FLAG (no value), VALUE
    (``--name=V``, ``--name V``, ``-XV``, ``-X V``), OPTIONAL (only attached: ``--name=V``,
    ``-XV``; a following word is never its value, as getopt_long reads it); None: the command
    has no such option."""

    name: str
    short: str | None
    sbatch: str | None
    srun: str | None
    #: An undocumented other name that getopt also accepts (``--tasks-per-node``): it is read
    #: as the option it stands for, so it cannot slip past what berth interprets or refuses.
    alias_of: str | None = None


#: Every option of sbatch and srun in Slurm 22.05, with its grammar: the OPTIONS sections of
#: their man pages and the undocumented names getopt accepts (listed by getopt itself when asked for an ambiguous
#: prefix). tests/unit/test_jobs_options.py compares this table with the installed Slurm: its
#: man pages, --help, and the grammar its getopt applies to every name and letter. The one table
#: for `berth submit`, #BERTH and #SBATCH lines and `berth srun`.
SLURM_OPTIONS: tuple[SlurmOption, ...] = tuple(SlurmOption(*row) for row in (
    ('accel-bind', None, None, VALUE),
    ('account', 'A', VALUE, VALUE),
    ('acctg-freq', None, VALUE, VALUE),
    ('array', 'a', VALUE, None),
    ('batch', None, VALUE, None),
    ('bb', None, VALUE, VALUE),
    ('bbf', None, VALUE, VALUE),
    ('bcast', None, None, OPTIONAL),
    ('bcast-exclude', None, None, VALUE),
    ('begin', 'b', VALUE, VALUE),
    ('chdir', 'D', VALUE, VALUE),
    ('cluster-constraint', None, VALUE, VALUE),
    ('clusters', 'M', VALUE, VALUE),
    ('comment', None, VALUE, VALUE),
    ('compress', None, None, OPTIONAL),
    ('constraint', 'C', VALUE, VALUE),
    ('container', None, VALUE, VALUE),
    ('contiguous', None, FLAG, FLAG),
    ('core-spec', 'S', VALUE, VALUE),
    ('cores-per-socket', None, VALUE, VALUE),
    ('cpu-bind', None, None, VALUE),
    ('cpu-freq', None, VALUE, VALUE),
    ('cpus-per-gpu', None, VALUE, VALUE),
    ('cpus-per-task', 'c', VALUE, VALUE),
    ('deadline', None, VALUE, VALUE),
    ('delay-boot', None, VALUE, VALUE),
    ('dependency', 'd', VALUE, VALUE),
    ('disable-status', 'X', None, FLAG),
    ('distribution', 'm', VALUE, VALUE),
    ('epilog', None, None, VALUE),
    ('error', 'e', VALUE, VALUE),
    ('exact', None, None, FLAG),
    ('exclude', 'x', VALUE, VALUE),
    ('exclusive', None, OPTIONAL, OPTIONAL),
    ('export', None, VALUE, VALUE),
    ('export-file', None, VALUE, None),
    ('extra-node-info', 'B', VALUE, VALUE),
    ('get-user-env', None, OPTIONAL, None),
    ('gid', None, VALUE, VALUE),
    ('gpu-bind', None, VALUE, VALUE),
    ('gpu-freq', None, VALUE, VALUE),
    ('gpus', 'G', VALUE, VALUE),
    ('gpus-per-node', None, VALUE, VALUE),
    ('gpus-per-socket', None, VALUE, VALUE),
    ('gpus-per-task', None, VALUE, VALUE),
    ('gres', None, VALUE, VALUE),
    ('gres-flags', None, VALUE, VALUE),
    ('help', 'h', FLAG, FLAG),
    ('het-group', None, None, VALUE),
    ('hint', None, VALUE, VALUE),
    ('hold', 'H', FLAG, FLAG),
    ('ignore-pbs', None, FLAG, None),
    ('immediate', 'I', None, OPTIONAL),
    ('input', 'i', VALUE, VALUE),
    ('job-name', 'J', VALUE, VALUE),
    ('jobid', None, None, VALUE),
    ('kill-on-bad-exit', 'K', None, OPTIONAL),
    ('kill-on-invalid-dep', None, VALUE, None),
    ('label', 'l', None, FLAG),
    ('licenses', 'L', VALUE, VALUE),
    ('mail-type', None, VALUE, VALUE),
    ('mail-user', None, VALUE, VALUE),
    ('mcs-label', None, VALUE, VALUE),
    ('mem', None, VALUE, VALUE),
    ('mem-bind', None, VALUE, VALUE),
    ('mem-per-cpu', None, VALUE, VALUE),
    ('mem-per-gpu', None, VALUE, VALUE),
    ('mincpus', None, VALUE, VALUE),
    ('mpi', None, None, VALUE),
    ('msg-timeout', None, None, VALUE),
    ('multi-prog', None, None, FLAG),
    ('network', None, VALUE, VALUE),
    ('nice', None, OPTIONAL, OPTIONAL),
    ('no-allocate', 'Z', None, FLAG),
    ('no-kill', 'k', OPTIONAL, OPTIONAL),
    ('no-requeue', None, FLAG, None),
    ('nodefile', 'F', VALUE, VALUE),
    ('nodelist', 'w', VALUE, VALUE),
    ('nodes', 'N', VALUE, VALUE),
    ('ntasks', 'n', VALUE, VALUE),
    ('ntasks-per-core', None, VALUE, VALUE),
    ('ntasks-per-gpu', None, VALUE, VALUE),
    ('ntasks-per-node', None, VALUE, VALUE),
    ('ntasks-per-socket', None, VALUE, VALUE),
    ('open-mode', None, VALUE, VALUE),
    ('output', 'o', VALUE, VALUE),
    ('overcommit', 'O', FLAG, FLAG),
    ('overlap', None, None, OPTIONAL),  # the man page says a flag; getopt allows a value
    ('oversubscribe', 's', FLAG, FLAG),
    ('parsable', None, FLAG, None),
    ('partition', 'p', VALUE, VALUE),
    ('power', None, VALUE, VALUE),
    ('prefer', None, VALUE, VALUE),
    ('preserve-env', 'E', None, FLAG),
    ('priority', None, VALUE, VALUE),
    ('profile', None, VALUE, VALUE),
    ('prolog', None, None, VALUE),
    ('propagate', None, OPTIONAL, OPTIONAL),
    ('pty', None, None, FLAG),
    ('qos', 'q', VALUE, VALUE),
    ('quiet', 'Q', FLAG, FLAG),
    ('quit-on-interrupt', None, None, FLAG),
    ('reboot', None, FLAG, FLAG),
    ('relative', 'r', None, VALUE),
    ('requeue', None, FLAG, None),
    ('reservation', None, VALUE, VALUE),
    ('resv-ports', None, None, OPTIONAL),
    ('send-libs', None, None, OPTIONAL),
    ('signal', None, VALUE, VALUE),
    ('slurmd-debug', None, None, VALUE),
    ('sockets-per-node', None, VALUE, VALUE),
    ('spread-job', None, FLAG, FLAG),
    ('switches', None, VALUE, VALUE),
    ('task-epilog', None, None, VALUE),
    ('task-prolog', None, None, VALUE),
    ('test-only', None, FLAG, FLAG),
    ('thread-spec', None, VALUE, VALUE),
    ('threads', 'T', None, VALUE),
    ('threads-per-core', None, VALUE, VALUE),
    ('time', 't', VALUE, VALUE),
    ('time-min', None, VALUE, VALUE),
    ('tmp', None, VALUE, VALUE),
    ('uid', None, VALUE, VALUE),
    ('unbuffered', 'u', None, FLAG),
    ('usage', None, FLAG, FLAG),
    ('use-min-nodes', None, FLAG, FLAG),
    ('verbose', 'v', FLAG, FLAG),
    ('version', 'V', FLAG, FLAG),
    ('wait', 'W', FLAG, VALUE),
    ('wait-all-nodes', None, VALUE, None),
    ('wckey', None, VALUE, VALUE),
    ('wrap', None, VALUE, None),
    ('x11', None, None, OPTIONAL),
    # undocumented names getopt accepts
    ('cluster', None, VALUE, VALUE, 'clusters'),
    ('context', None, VALUE, VALUE),
    ('ntasks-per-tres', None, VALUE, VALUE, 'ntasks-per-gpu'),
    ('tasks-per-node', None, VALUE, VALUE, 'ntasks-per-node'),
    ('cpu_bind', None, None, VALUE, 'cpu-bind'),
    ('pack-group', None, None, VALUE, 'het-group'),
    ('debugger-test', None, None, FLAG),
    ('interactive', None, None, FLAG),
    ('whole', None, None, FLAG),
))


class BerthOption(Record):
    """An option of ``berth submit`` that is berth's, not sbatch's (never passed to Slurm)."""

    name: str
    arg: str
    metavar: str | None
    help: str
    #: May also be written as a ``#BERTH`` line (``--json`` only makes sense on the command line).
    directive: bool = True
    #: May be given several times: the values collect in a list, in order (from the place of
    #: highest precedence that gives any).
    repeat: bool = False

    @property
    def key(self) -> str:
        """Its key in the values dict (``stage-in`` -> ``stage_in``)."""
        return self.name.replace("-", "_")


BERTH_OPTIONS: tuple[BerthOption, ...] = (
    BerthOption("template", VALUE, "NAME", "container template published by the site"),
    BerthOption("image", VALUE, "REF", "image to run (instead of a template)"),
    BerthOption("backend", VALUE, "NAME", "local or slurm (default: the site's setting)"),
    BerthOption("json", FLAG, None, "print the submitted job as JSON", directive=False),
    BerthOption("scope", VALUE, "task|node", "containers of the job's `berth srun` steps: one per task "
                "(default) or one per node, shared by its tasks (docs/mpi.md)"),
    BerthOption("container-mpi", VALUE, "host|none", "host: the site's MPI replaces the image's in the job's "
                "containers (berth run --mpi host, after an ABI check; docs/mpi.md)"),
    # Data staging (docs/staging.md).
    BerthOption("stage-in", VALUE, "SRC:DEST", "copy s3://, https:// or host data into the job's "
                "directory before the container starts (repeatable)", repeat=True),
    BerthOption("stage-out", VALUE, "SRC:DEST", "copy the job's files (path or glob) to s3:// or a host "
                "directory after the container exits (repeatable)", repeat=True),
    BerthOption("stage-out-when", VALUE, "always|success", "stage out after any end of the "
                "script (default) or only after success"),
    BerthOption("s3-profile", VALUE, "NAME", "S3 profile for staging (default: 'default')"),
    BerthOption("s3-credentials-in-container", FLAG, None,
                "give the container the profile's keys as a 0600 AWS credentials file"),
)

#: sbatch options berth interprets itself: long name -> (key in the values dict, help). Their
#: values are checked (template ceilings, paths) and berth writes them to sbatch itself.
INTERPRETED: dict[str, tuple[str, str]] = {
    "nodes": ("nodes", "number of nodes (the script runs on the first)"),
    "ntasks": ("ntasks", "number of tasks for steps inside the job"),
    "ntasks-per-node": ("ntasks_per_node", "tasks per node"),
    "cpus-per-task": ("cpus_per_task", "CPUs per task (default and ceiling: the template's cpu)"),
    "mem": ("mem", "memory per node, e.g. 4G (no unit: M, as sbatch; ceiling: the template's memsz)"),
    "gres": ("gres", "generic resources; gpu:N per node (ceiling: the template's gpu)"),
    "gpus": ("gpus", "GPUs of the job, split evenly over its nodes (on one node: --gres=gpu:N)"),
    "time": ("time", "time limit: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]"),
    "job-name": ("job_name", "job name (default: the script's name)"),
    "output": ("output", "stdout file (%j: job id, %x: job name, %u: user)"),
    "error": ("error", "stderr file (default: with stdout)"),
    "partition": ("partition", "scheduler partition"),
    "exclusive": ("exclusive", "whole nodes for this job (refused with a template)"),
    "chdir": ("chdir", "the job's working directory (default: the current directory)"),
    "comment": ("comment", "free text; berth adds its own record tag in front"),
    "array": ("array", "a job array: task ids 1-10, 1,3,5 or 0-9:3, %N: at most N at once"),
}

#: sbatch options berth checks against the template and then passes on unchanged.
CHECKED = ("gpus-per-node", "gpus-per-task", "gpus-per-socket", "mem-per-cpu", "mem-per-gpu",
           "mincpus", "cpus-per-gpu", "export", "dependency")

#: sbatch options that would take over what berth does for the job: long name -> why refused.
REFUSED: dict[str, str] = {
    "wrap": "berth runs your script in the container: give the script itself, not --wrap",
    "parsable": "berth reads sbatch's answer itself and prints the job id",
    "wait": "berth submit does not wait: follow the job with `berth logs -f ID`",
    "test-only": "berth submit submits: try the options with sbatch --test-only directly",
    "uid": "berth runs jobs as you",
    "gid": "berth runs jobs as you",
    "container": "berth starts the container itself (--template or --image)",
    "export-file": "berth cannot check that file for its own variables: use --export",
    "help": "see `berth submit --help`",
    "usage": "see `berth submit --help`",
    "version": "see `berth --version` and `sbatch --version`",
}

#: Job and partition names; matched in full (issue 12: '$' accepts a final newline).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


class ParsedOption(Record):
    """One option as parsed: its long name (canonical), its value (None: a flag, or an optional
    value not given), and where it came from (``command line``, ``job.sh line 3``).
    ``known`` is False for an option of no table (passed to sbatch, which judges it)."""

    name: str
    value: str | None
    where: str
    known: bool = True

    @property
    def display(self) -> str:
        """``--name`` (or ``-X`` for an unknown short option)."""
        return self.name if self.name.startswith("-") else f"--{self.name}"

    @property
    def spelled(self) -> str:
        """The option as sbatch receives it: ``--name=value`` or ``--name`` (``-Xvalue``)."""
        if self.name.startswith("-"):
            return self.name + (self.value or "")
        return self.display if self.value is None else f"{self.display}={self.value}"


def _grammar(command: str, berth: bool, extra: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(long name -> grammar, short letter -> long name) for ``command`` (sbatch or srun), with
    berth's submit options (``berth``) and ``extra`` long options."""
    longs: dict[str, str] = {}
    shorts: dict[str, str] = {}
    for option in SLURM_OPTIONS:
        grammar = getattr(option, command)
        if grammar is not None:
            longs[option.name] = grammar
            if option.short:
                shorts[option.short] = option.name
    if berth:
        for own in BERTH_OPTIONS:
            longs[own.name] = own.arg
    longs.update(extra or {})
    return longs, shorts


def parse_options(words: list[str], *, command: str = "sbatch", where: str = "command line",
                  berth: bool = True, extra: dict[str, str] | None = None) -> tuple[list[ParsedOption], int]:
    """Read options from ``words`` as Slurm's getopt_long does (``+``: stop at the first word
    that is not an option; ``--`` ends the options and is consumed). Returns the options and
    the index of the first operand (the script, or srun's command).

    Long options may be abbreviated to a unique prefix, as getopt_long allows (so
    ``--wra=...`` is ``--wrap``); short flags may be grouped (``-Hv``). An option of no table
    is kept with ``known=False`` (sbatch judges it): ``--new=V`` and ``--new`` keep their word,
    and its value, if any, must be attached. Raises UsageError for a missing value, a value
    given to a flag, or an ambiguous abbreviation, naming ``where``.
    """
    longs, shorts = _grammar(command, berth, extra)
    parsed: list[ParsedOption] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word == "--":
            return parsed, index + 1
        if not word.startswith("-") or word == "-":
            break
        index += 1
        if word.startswith("--"):
            typed, has_value, value = word[2:].partition("=")
            name = _resolve_long(typed, longs, where)
            name = _ALIASES.get(name, name) if name else name
            if name is None:
                parsed.append(ParsedOption(typed, value if has_value else None, where, known=False))
                continue
            grammar = longs[name]
            if grammar == FLAG and has_value:
                raise UsageError(f"{where}: option --{name} takes no value")
            if grammar == VALUE and not has_value:
                if index >= len(words):
                    raise UsageError(f"{where}: option --{name} needs a value")
                value, has_value = words[index], True
                index += 1
            parsed.append(ParsedOption(name, value if has_value else None, where))
            continue
        letters = word[1:]
        position = 0
        while position < len(letters):
            letter = letters[position]
            position += 1
            name = shorts.get(letter)
            if name is None:
                parsed.append(ParsedOption(f"-{letter}", letters[position:] or None, where, known=False))
                break
            grammar = longs[name]
            if grammar == FLAG:
                parsed.append(ParsedOption(name, None, where))
                continue
            attached = letters[position:]
            if grammar == VALUE and not attached:
                if index >= len(words):
                    raise UsageError(f"{where}: option -{letter} (--{name}) needs a value")
                attached = words[index]
                index += 1
            parsed.append(ParsedOption(name, attached or None, where))
            break
    return parsed, index


_ALIASES = {option.name: option.alias_of for option in SLURM_OPTIONS if option.alias_of}


def _resolve_long(typed: str, longs: dict[str, str], where: str) -> str | None:
    if typed in longs:
        return typed
    candidates = sorted(name for name in longs if name.startswith(typed)) if typed else []
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        shown = ", ".join(f"--{name}" for name in candidates[:6])
        raise UsageError(f"{where}: option --{typed} is ambiguous ({shown})", hint="write the option in full")
    return None


def suggest(name: str, command: str = "sbatch") -> str:
    """A hint for an unknown option: the closest known name, if one is close."""
    longs, _ = _grammar(command, True)
    return (did_you_mean(f"--{name.lstrip('-')}", (f"--{n}" for n in sorted(longs)))
            or "see `berth submit --help` and `sbatch --help` for the options")


#: Where each directive prefix's options may come from, in increasing precedence.
SBATCH_PREFIX = "#SBATCH"


def read_directives(script: Path, text: str) -> tuple[list[ParsedOption], list[ParsedOption]]:
    """The ``#SBATCH`` and the ``#BERTH`` options of a script, from its leading comment block.

    As sbatch reads ``#SBATCH``: only lines that start with the prefix (no leading blanks), in
    the comment block before the first command; shell-style quotes; ``#`` starts a comment.
    ``#BERTH`` lines may carry berth's own options too (--template, --image, --backend);
    ``#SBATCH`` lines only sbatch's. A line that does not parse is an error naming the file and
    line. Returns (sbatch options, berth options), each in file order.
    """
    found: dict[str, list[ParsedOption]] = {SBATCH_PREFIX: [], DIRECTIVE_PREFIX: []}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if number == 1 and stripped.startswith("#!"):
            continue
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        where = f"{script} line {number}"
        head = stripped.split(None, 1)[0]
        if head.upper() == DIRECTIVE_PREFIX and head != DIRECTIVE_PREFIX:
            raise UsageError(f"{where}: '{head}' must be written '{DIRECTIVE_PREFIX}'")
        if head.upper().startswith(DIRECTIVE_PREFIX) and head != DIRECTIVE_PREFIX:
            raise UsageError(f"{where}: unknown directive '{head}'",
                             hint=f"directives are written '{DIRECTIVE_PREFIX} --option=value'")
        if head == DIRECTIVE_PREFIX:
            prefix = DIRECTIVE_PREFIX
        elif line.startswith(SBATCH_PREFIX):
            prefix = SBATCH_PREFIX
        else:
            continue
        rest = stripped[len(prefix):] if prefix == DIRECTIVE_PREFIX else line[len(prefix):]
        try:
            words = shlex.split(rest, comments=True)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if not words:
            if prefix == DIRECTIVE_PREFIX:
                raise UsageError(f"{where}: '{DIRECTIVE_PREFIX}' without an option")
            continue
        if prefix == SBATCH_PREFIX and words[0] in ("hetjob", "packjob", ":"):
            raise UsageError(f"{where}: heterogeneous jobs ('{words[0]}') are not supported by berth")
        options, end = parse_options(words, where=where, berth=prefix == DIRECTIVE_PREFIX)
        if end < len(words):
            raise UsageError(f"{where}: '{words[end]}' is not an option",
                             hint=f"write '{prefix} --option=value'")
        for option in options:
            if prefix == SBATCH_PREFIX and not option.known and option.name in {o.name for o in BERTH_OPTIONS}:
                raise UsageError(f"{where}: --{option.name} is berth's option, not sbatch's",
                                 hint=f"write it on a '{DIRECTIVE_PREFIX}' line")
            own = next((o for o in BERTH_OPTIONS if o.name == option.name), None)
            if own is not None and not own.directive:
                raise UsageError(f"{where}: --{option.name} belongs on the command line, not in a directive")
        found[prefix].extend(options)
    return found[SBATCH_PREFIX], found[DIRECTIVE_PREFIX]


#: Precedence levels, lowest first: where an option may be written.
SOURCES = ("#SBATCH", "#BERTH", "command line")


class MergedOptions(Record):
    """The options of one submission after precedence: ``values`` holds berth's options and
    the interpreted sbatch options by key (raw strings; True for flags), ``passthrough`` the
    sbatch options that go to Slurm unchanged (including ones no table knows: ``known``
    False), ``where`` says where each value in ``values`` came from."""

    values: dict
    passthrough: tuple[ParsedOption, ...]
    where: dict


def merge_options(*levels: list[ParsedOption]) -> MergedOptions:
    """Merge option lists given lowest precedence first (#SBATCH, #BERTH, command line); within
    one list the later option wins, as in sbatch. Raises UsageError for a refused option, and
    for --template and --image given at the same level (at different levels the higher one
    wins: a directive's image gives way to a command-line template)."""
    own = {option.name: option for option in BERTH_OPTIONS}
    chosen: dict[str, tuple[int, ParsedOption]] = {}
    repeated: dict[str, tuple[int, list[ParsedOption]]] = {}
    for level, options in enumerate(levels):
        for option in options:
            if option.known and option.name in REFUSED:
                raise UsageError(f"{option.where}: --{option.name} cannot be used with berth submit",
                                 hint=REFUSED[option.name])
            if option.known and option.name in own and own[option.name].repeat:
                if repeated.get(option.name, (level, []))[0] != level:
                    repeated[option.name] = (level, [])  # a higher place replaces the whole list
                repeated.setdefault(option.name, (level, []))[1].append(option)
                continue
            chosen.pop(option.name, None)  # re-insert: the last one decides the position too
            chosen[option.name] = (level, option)
    what = [(level, option) for level, option in chosen.values()]
    image = chosen.get("image")
    template = chosen.get("template")
    if image and template:
        if image[0] == template[0]:
            raise UsageError("--template and --image exclude each other: a template names its image",
                             hint=f"--template from {template[1].where}, --image from {image[1].where}")
        loser = "image" if template[0] > image[0] else "template"
        what = [(level, option) for level, option in what if option.name != loser]
    values: dict = {}
    where: dict = {}
    passthrough: list[ParsedOption] = []
    for name, (_, options) in repeated.items():
        values[own[name].key] = [option.value for option in options]
        where[own[name].key] = options[-1].where
    for _, option in what:
        if option.known and option.name in own:
            key = own[option.name].key
        elif option.known and option.name in INTERPRETED and not (option.name == "exclusive" and option.value):
            key = INTERPRETED[option.name][0]
        else:
            passthrough.append(option)
            continue
        values[key] = True if option.value is None else option.value
        where[key] = option.where
    return MergedOptions(values, tuple(passthrough), where)


#: Dependency types the local backend implements (Slurm implements all of its own).
LOCAL_DEPENDENCY_TYPES = ("afterok", "afterany", "afternotok", "singleton")


def parse_dependency(raw: str, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``afterok:12:13,afterany:14`` or ``singleton`` -> ((type, ids), ...), all of which must
    hold (sbatch's ','; its '?' "any of" and ``+time`` are Slurm's only). Raises UsageError."""
    if "?" in raw or "+" in raw:
        raise UsageError(f"{where}: --dependency={raw}: '?' and '+time' need Slurm",
                         hint="the local backend takes TYPE:ID[:ID...] joined by ','")
    parts = []
    for item in raw.split(","):
        kind, _, rest = item.partition(":")
        ids = tuple(rest.split(":")) if rest else ()
        if kind not in LOCAL_DEPENDENCY_TYPES:
            raise UsageError(f"{where}: --dependency={raw}: '{kind}' is not one of "
                             f"{', '.join(LOCAL_DEPENDENCY_TYPES)} on the local backend")
        if (kind == "singleton") != (not ids) or not all(re.fullmatch(r"[0-9]{1,12}", i) for i in ids):
            raise UsageError(f"{where}: --dependency={raw}: write {kind}" + ("" if kind == "singleton"
                             else ":JOB[:JOB...] with berth job ids"))
        parts.append((kind, ids))
    return tuple(parts)


#: Most tasks in one array (Slurm's default MaxArraySize is 1001: ids 0-1000).
MAX_ARRAY_TASKS = 1001


def parse_array(raw: str, where: str = "--array") -> tuple[tuple[int, ...], int | None]:
    """sbatch's ``--array``: ``1-10``, ``1,3,5``, ``0-9:3`` (a step), joined by ``,``, then
    ``%N`` (at most N tasks at once) -> (sorted task ids, N or None). Raises UsageError."""
    text, _, limit_text = raw.partition("%")
    limit = None
    if limit_text:
        if not re.fullmatch(r"[0-9]{1,6}", limit_text) or int(limit_text) < 1:
            raise UsageError(f"{where}={raw}: '%{limit_text}' is not a positive number of tasks at once")
        limit = int(limit_text)
    tasks: set[int] = set()
    for item in text.split(","):
        match = re.fullmatch(r"([0-9]{1,7})(?:-([0-9]{1,7})(?::([0-9]{1,7}))?)?", item)
        if not match:
            raise UsageError(f"{where}={raw}: '{item}' is not N, N-M or N-M:STEP",
                             hint="for example --array=1-100%10 or --array=1,3,5")
        first, last, step = int(match.group(1)), int(match.group(2) or match.group(1)), int(match.group(3) or 1)
        if last < first or step < 1:
            raise UsageError(f"{where}={raw}: '{item}' is an empty range")
        tasks.update(range(first, last + 1, step))
        if max(tasks) >= MAX_ARRAY_TASKS:
            raise UsageError(f"{where}={raw}: task ids go up to {MAX_ARRAY_TASKS - 1}",
                             hint="as Slurm's default MaxArraySize allows")
    return tuple(sorted(tasks)), limit


def gpu_count(raw: str, option: str) -> int:
    """``[type:]N`` (sbatch's --gpus* values) -> N. Raises UsageError."""
    count = raw.strip().rsplit(":", 1)[-1]
    if not re.fullmatch(r"[0-9]{1,9}", count):
        raise UsageError(f"{option} '{raw}': the GPU count '{count}' is not a whole number",
                         hint="write [type:]N, e.g. 2 or a100:2")
    if int(count) > MAX_GPUS * MAX_NODES:
        raise UsageError(f"{option} '{raw}': more GPUs than berth accepts", hint="check the value for a typo")
    return int(count)


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
