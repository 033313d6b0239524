"""The one option table (berth.jobs.options.SLURM_OPTIONS) against the installed Slurm's own
lists: the OPTIONS sections of the sbatch and srun man pages (every option with its grammar:
flag, value, optional value) and what `sbatch --help` / `srun --help` print.

Slurm builds its getopt tables at run time, so the man pages shipped with the same
slurm-client package are the complete machine-readable source; --help omits some options and
misstates two grammars (listed below with the reason)."""

from __future__ import annotations

import gzip
import re
import shutil
import string
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from berth.jobs.options import FLAG, OPTIONAL, SLURM_OPTIONS, VALUE

MAN = Path("/usr/share/man/man1")

#: Where `--help` misstates the grammar that the man page states and getopt applies (see
#: test_table_matches_the_grammar_getopt_applies).
HELP_ERRATA = {
    ("sbatch", "container"): "printed as a flag, requires a path",
    ("srun", "container"): "printed as a flag, requires a path",
    ("srun", "kill-on-bad-exit"): "printed as a flag; -K[0|1] takes an optional value",
    ("sbatch", "no-kill"): "printed as a flag; -k[off] takes an optional value",
    ("srun", "no-kill"): "printed as a flag; -k[off] takes an optional value",
    ("sbatch", "export"): "printed as [=names]; requires a value",
    ("sbatch", "get-user-env"): "printed as a flag; takes an optional value",
    ("sbatch", "wrap"): "printed as [=command string]; requires a value",
    ("srun", "bcast"): "printed with '='; the value is optional",
    ("srun", "resv-ports"): "printed as a flag; takes an optional count",
    ("srun", "overlap"): "printed as a flag; getopt allows a value",
}
#: Where the man page misstates what getopt applies.
MAN_ERRATA = {("srun", "overlap"): "documented as a flag; getopt allows --overlap=VALUE"}
#: Names `srun --usage` shows that srun's getopt does not accept (and a typo of --slurmd-debug).
USAGE_ERRATA = {"mpi-combine", "ctrl-comm-ifhn", "slurmd_debug"}


def man_options(command: str) -> dict[str, tuple[str | None, str]]:
    """{long name: (short letter, grammar)} from the OPTIONS section of ``command``'s man page."""
    path = MAN / f"{command}.1.gz"
    if not path.exists():
        pytest.skip(f"{path} is missing: install slurm-client (scripts/install-system-packages.sh)")
    lines = gzip.open(path, "rt").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(".SH") and "OPTIONS" in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(".SH"))
    found: dict[str, tuple[str | None, str]] = {}
    for index in range(start, end - 1):
        head = lines[index + 1]
        if lines[index].strip() != ".TP" or not head.startswith(r"\fB\-"):
            continue
        plain = re.sub(r"\\f[BIRP]", "", head).replace("\\-", "-")
        match = re.match(r"^(?:-(\w), )?--([\w-]+)(.*)$", plain)
        assert match, f"unexpected option heading in {path}: {plain}"
        short, name, rest = match.groups()
        grammar = OPTIONAL if rest.startswith("[=") else VALUE if rest.startswith("=") else FLAG
        found.setdefault(name, (short, grammar))  # later headings of a name are its sub-cases
    return found


def slurm_env(tmp_path: Path) -> dict[str, str]:
    """sbatch/srun need a slurm.conf to parse options and print help, not a running cluster
    (short timeouts: an option that makes them try to submit gives up at once)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nMessageTimeout=1\nSlurmctldTimeout=1\n"
                    "TCPTimeout=1\nNodeName=n1 CPUs=1\nPartitionName=p Nodes=n1\n")
    return {"PATH": "/usr/bin:/bin", "SLURM_CONF": str(conf)}


def table(command: str) -> dict[str, tuple[str | None, str]]:
    return {o.name: (o.short, getattr(o, command)) for o in SLURM_OPTIONS if getattr(o, command) is not None}


#: Names getopt accepts that the man pages do not document (found by the getopt test below).
UNDOCUMENTED = {
    "sbatch": {"cluster", "context", "ntasks-per-tres", "tasks-per-node"},
    "srun": {"cluster", "context", "ntasks-per-tres", "tasks-per-node", "cpu_bind", "pack-group",
             "debugger-test", "interactive", "whole"},
}


@pytest.mark.parametrize("command", ["sbatch", "srun"])
def test_table_matches_the_man_page(command):
    documented = man_options(command)
    ours = table(command)
    assert set(ours) - set(documented) == UNDOCUMENTED[command]
    assert set(documented) - set(ours) == set()
    wrong = {name: (ours[name], documented[name]) for name in documented
             if ours[name] != documented[name] and (command, name) not in MAN_ERRATA}
    assert wrong == {}


@pytest.mark.parametrize("command", ["sbatch", "srun"])
def test_table_matches_help_and_usage(command, tmp_path):
    """`--help` and `--usage` of the installed Slurm: every option they name is in the table with
    the same short letter and grammar, except the errata above. (sbatch/srun need a slurm.conf
    to print help, not a running cluster.)"""
    if shutil.which(command) is None:
        pytest.skip(f"{command} is missing: install slurm-client")
    env = slurm_env(tmp_path)
    text = subprocess.run([command, "--help"], env=env, capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([command, "--usage"], env=env, capture_output=True, text=True, check=True).stdout
    ours = table(command)
    checked, differ = 0, {}
    for line in text.splitlines():
        match = re.match(r"^ {2,6}(?:-(\w),?\s+)?--([\w-]+)(\[=|=)?", line)
        if not match:
            continue
        short, name, equals = match.groups()
        grammar = {None: FLAG, "=": VALUE, "[=": OPTIONAL}[equals]
        assert name in ours, f"{command} --help names --{name}, which the table lacks"
        if (command, name) not in HELP_ERRATA and ours[name] != (short, grammar) \
                and not (short is None and ours[name][1] == grammar):
            differ[name] = (ours[name], (short, grammar))
        checked += 1
    assert differ == {}
    assert checked > 80
    named = set(re.findall(r"--([a-z][\w-]*)", usage)) - USAGE_ERRATA
    assert named - set(ours) == set()


def _first_error(command: str, argv: list[str], env: dict[str, str]) -> str:
    """The first line sbatch/srun print for ``argv`` with no script or command: getopt's
    complaint if it has one; otherwise the options parsed (and nothing is submitted: sbatch
    finds an empty script on /dev/null, srun no command)."""
    result = subprocess.run([command, *argv], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=20)
    return (result.stderr.splitlines() or [""])[0]


@pytest.mark.parametrize("command", ["sbatch", "srun"])
def test_table_matches_the_grammar_getopt_applies(command, tmp_path):
    """Slurm's real option table, asked of the installed binaries: glibc's getopt_long lists
    every long name that starts with an ambiguous prefix (``--a``), names the one a unique
    prefix stands for, and says whether a name or letter requires, refuses or merely allows
    a value. The table must agree on every name and every letter."""
    if shutil.which(command) is None:
        pytest.skip(f"{command} is missing: install slurm-client")
    env = slurm_env(tmp_path)
    ours = table(command)
    with ThreadPoolExecutor(8) as pool:  # some 500 runs of ~10 ms, mostly start-up
        def ask(argvs):
            return dict(zip(argvs, pool.map(lambda argv: _first_error(command, list(argv), env), argvs)))

        prefixes = ask([(f"--{letter}",) for letter in string.ascii_lowercase])
        names: set[str] = set()
        for (word,), error in prefixes.items():
            if "is ambiguous; possibilities:" in error:
                names |= set(re.findall(r"'--([^']+)'", error.split("possibilities:", 1)[1]))
            elif "unrecognized option" not in error:
                # exactly one name starts with the letter: ours must have exactly one too
                unique = [name for name in ours if name.startswith(word[2:])]
                assert len(unique) == 1, (word, error, unique)
                names.add(unique[0])
        assert names == set(ours)
        answers = ask([(f"--{name}",) for name in names] + [(f"--{name}=1",) for name in names])
        letters = ask([(f"-{letter}",) for letter in string.ascii_letters])
    wrong = {}
    for name in sorted(names):
        if "requires an argument" in answers[(f"--{name}",)]:
            grammar = VALUE
        elif "doesn't allow an argument" in answers[(f"--{name}=1",)]:
            grammar = FLAG
        else:
            grammar = OPTIONAL
        if ours[name][1] != grammar:
            wrong[name] = (ours[name][1], grammar)
    assert wrong == {}
    shorts = {short: grammar for short, grammar in ours.values() if short}
    found = {word[1]: VALUE if "requires an argument" in error else "flag or optional"
             for (word,), error in letters.items() if "invalid option" not in error}
    assert found == {letter: VALUE if grammar == VALUE else "flag or optional" for letter, grammar in shorts.items()}
