"""`berth` entry point: builds the parser from the command modules and maps errors to exits.

Each module in COMMAND_MODULES has ``register(subparsers)``, which adds its commands with
``set_defaults(handler=FUNCTION)``; a handler is ``handler(args, ctx) -> int``. Handlers import
what they need lazily so that ``berth run`` starts fast (STYLE.md: no heavy imports on that path).
"""

from __future__ import annotations

import gc
import os
import sys

from berth import __version__

# argparse and berth.errors are imported where they are used, not here: a Ctrl-C while the
# console script imports this module is outside main()'s handler, so that import is kept to
# what cannot be avoided. Annotations naming them are never evaluated.

COMMAND_MODULES = (
    "berth.cli.images",
    "berth.cli.auth",
    "berth.cli.run",
    "berth.cli.config",
    "berth.cli.jobs",
    "berth.cli.stage",
)

#: Which module registers each command, so that `berth run ...` imports and builds the parser
#: of one module instead of all of them (start-up time is a product feature; building every
#: subcommand's parser cost tens of milliseconds). tests/unit/test_cli_main.py keeps this in
#: step with what the modules register.
COMMANDS = {
    "pull": "berth.cli.images",
    "images": "berth.cli.images",
    "inspect": "berth.cli.images",
    "rmi": "berth.cli.images",
    "prune": "berth.cli.images",
    "push": "berth.cli.images",
    "import": "berth.cli.images",
    "export": "berth.cli.images",
    "store": "berth.cli.images",
    "login": "berth.cli.auth",
    "logout": "berth.cli.auth",
    "run": "berth.cli.run",
    "exec": "berth.cli.run",
    "ps": "berth.cli.run",
    "doctor": "berth.cli.run",
    "config": "berth.cli.config",
    "template": "berth.cli.config",
    "submit": "berth.cli.jobs",
    "status": "berth.cli.jobs",
    "jobs": "berth.cli.jobs",
    "logs": "berth.cli.jobs",
    "cancel": "berth.cli.jobs",
    "srun": "berth.cli.jobs",
    "job-exec": "berth.cli.jobs",
    "stage": "berth.cli.stage",
}


class Context:
    """What every handler gets besides its arguments: settings (loaded once, lazily), and for
    `berth run` the plan cache's look-up (berth.cli.fastrun; None when not looked up)."""

    def __init__(self, args: argparse.Namespace, plan_lookup=None) -> None:
        self.args = args
        self.plan_lookup = plan_lookup
        self._settings = None

    @property
    def settings(self):
        if self._settings is None:
            from berth.config.load import load_settings

            self._settings = load_settings(options=getattr(self.args, "config_options", None))
        return self._settings


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES, only: str | None = None) -> argparse.ArgumentParser:
    """The parser with the commands of ``modules`` (all of them by default); with ``only``, a
    command of theirs, the other commands' parsers are not built (see _OnlyCommand)."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(
        prog="berth",
        description="Containers for HPC batch jobs: pull OCI images into SquashFS, run them "
        "unprivileged as yourself, submit container jobs to the local machine or Slurm.",
    )
    parser.add_argument("--version", action="version", version=f"berth {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).register(sub if only is None else _OnlyCommand(sub, only))
    return parser


class _OnlyCommand:
    """The subparsers action as a command module's ``register()`` sees it when one command is
    being run: only that command's parser is built. Building a parser costs ~0.1 ms per option
    (argparse's action registry, gettext look-ups): `berth run` does not need exec's, ps's and
    doctor's, nor a job step's `berth job-exec` submit's (issue 10, start-up)."""

    def __init__(self, sub, command: str) -> None:
        self._sub = sub
        self._command = command

    def add_parser(self, name: str, **kwargs):
        if name == self._command:
            return self._sub.add_parser(name, **kwargs)
        return _UNUSED


class _Unused:
    """Stands for a parser that is not built: takes every call and attribute, does nothing."""

    def __getattr__(self, name: str):
        return self._take

    def _take(self, *args, **kwargs) -> _Unused:
        return self


_UNUSED = _Unused()


def modules_for(argv: list[str]) -> tuple[str, ...]:
    """The command modules needed to parse ``argv``: only the named command's module when the
    first non-option word is a known command, none for ``--version`` before it, else all (for
    --help, typos, no command)."""
    word = _first_word(argv)
    if word == "--version":
        return ()  # argparse prints the version and exits before any command is parsed
    module = COMMANDS.get(word or "")
    return (module,) if module else COMMAND_MODULES


def command_for(argv: list[str]) -> str | None:
    """The known command ``argv`` runs, when it names one before any --help or --version."""
    word = _first_word(argv)
    return word if word in COMMANDS else None


def _first_word(argv: list[str]) -> str | None:
    """The first non-option word of ``argv``, or "--help"/"--version" when one comes first."""
    for word in argv:
        if word in ("-h", "--help"):
            return "--help"
        if word == "--version":
            return word
        if not word.startswith("-"):
            return word
    return None


def print_error(error: BerthError) -> None:
    from berth.cli.output import printable  # messages quote input and programs: no terminal escapes

    print(f"berth: error: {printable(error.message, newlines=True)}", file=sys.stderr)
    if error.hint:
        print(f"berth: hint: {printable(error.hint, newlines=True)}", file=sys.stderr)


def console() -> None:
    """The ``berth`` console script: ``main()``, then exit without the interpreter's teardown
    when nothing is left for it to do.

    Tearing down the interpreter of a `berth run` (freeing every module and object) costs ~10 ms
    on every container start (issue 10, target 3; bench/RESULTS.md). It is skipped only when it
    has nothing to do but free memory: stdout and stderr flushed, no atexit callback registered,
    no thread but this one alive, no profiler or tracer (``python -m cProfile`` writes its
    report after the script). Otherwise, or when a flush fails (a full disk: Python's own exit
    reports it), the interpreter exits as usual. Tests call ``main()``, never this.
    """
    # The cyclic garbage collector is off while berth imports its modules and builds the parser
    # (turned on again by _main once the arguments are parsed): start-up creates some 100,000
    # objects that live as long as the process, and collecting over them ran ~20 times, ~2 ms
    # of every `berth run` (issue 10, target 3; bench/RESULTS.md).
    gc.disable()
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    if _nothing_to_tear_down():
        os._exit(code)
    sys.exit(code)


def _nothing_to_tear_down() -> bool:
    import atexit

    if sys.getprofile() is not None or sys.gettrace() is not None:
        return False

    count = getattr(atexit, "_ncallbacks", None)
    if count is None or count() != 0:
        return False
    threading = sys.modules.get("threading")
    return threading is None or threading.active_count() == 1


def main(argv: list[str] | None = None, *, plan_cache: bool | None = None) -> int:
    """Run berth with ``argv`` (default sys.argv[1:]) and return the exit status. ``plan_cache``:
    a `berth run` may run a cached plan, and keep its own (berth.cli.fastrun); by default only
    when ``argv`` is sys.argv's (the console script), not for tests that pass their own."""
    try:
        return _main(argv, argv is None if plan_cache is None else plan_cache)
    except KeyboardInterrupt:
        # Ctrl-C while the command's modules are still being imported (before _main's own
        # handler): a message, never a traceback (issue 8, scenario 3b found it).
        print("berth: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None, plan_cache: bool = False) -> int:
    from berth.errors import BerthError

    if argv is None:
        argv = sys.argv[1:]
    lookup = None
    if plan_cache and (argv[:1] == ["run"] or argv[:2] == ["--debug", "run"]):
        from berth.cli import fastrun

        lookup = fastrun.look_up(argv)
    if lookup is not None and lookup.entry is not None:
        args = fastrun.HitArgs(lookup)  # no parser, no image look-up: the plan is made
    else:
        parser = build_parser(modules_for(argv), only=command_for(argv))
        args = parser.parse_args(argv)
    _collect_from_now_on()
    ctx = Context(args, lookup)
    try:
        code = int(args.handler(args, ctx) or 0)
        sys.stdout.flush()  # a full disk under `> file` is reported here, not at interpreter exit
        return code
    except BerthError as error:
        return _report(args, error)
    except KeyboardInterrupt:
        print("berth: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a traceback.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except OSError as error:
        # Library code maps the failures it expects (StoreError for a full store, ...); any other
        # OSError still becomes a message naming the file, never a traceback (issue 9).
        from berth.errors import from_os_error

        try:
            sys.stdout.flush()
        except OSError:  # stdout itself failed (`> /dev/full`): drop what cannot be written
            sys.stdout = open(os.devnull, "w")
        return _report(args, from_os_error(error))


def _collect_from_now_on() -> None:
    """Turn the cyclic garbage collector on again when console() turned it off for the start-up.
    What exists now (modules, the parser) lives as long as the process: it is moved out of every
    later collection (gc.freeze), which then looks only at what the command itself creates. A
    command that runs for hours (the job runner, a pull) collects as it always did."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _report(args: argparse.Namespace, error: BerthError) -> int:
    """Print ``error`` (and the traceback under --debug) and return the exit code."""
    if args.debug or os.environ.get("BERTH_DEBUG"):
        import traceback

        traceback.print_exc()
    print_error(error)
    return getattr(args, "error_exit_code", None) or error.exit_code
