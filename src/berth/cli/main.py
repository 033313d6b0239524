"""`berth` entry point: builds the parser from the command modules and maps errors to exits.

Each module in COMMAND_MODULES has ``register(subparsers)``, which adds its commands with
``set_defaults(handler=FUNCTION)``; a handler is ``handler(args, ctx) -> int``. Handlers import
what they need lazily so that ``berth run`` starts fast (STYLE.md: no heavy imports on that path).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from berth import __version__
from berth.errors import BerthError

COMMAND_MODULES = (
    "berth.cli.images",
    "berth.cli.auth",
    "berth.cli.run",
    "berth.cli.config",
    "berth.cli.jobs",
)


class Context:
    """What every handler gets besides its arguments: settings (loaded once, lazily)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._settings = None

    @property
    def settings(self):
        if self._settings is None:
            from berth.config.load import load_settings

            self._settings = load_settings(options=getattr(self.args, "config_options", None))
        return self._settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="berth",
        description="Containers for HPC batch jobs: pull OCI images into SquashFS, run them "
        "unprivileged as yourself, submit container jobs to the local machine or Slurm.",
    )
    parser.add_argument("--version", action="version", version=f"berth {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def print_error(error: BerthError) -> None:
    print(f"berth: error: {error.message}", file=sys.stderr)
    if error.hint:
        print(f"berth: hint: {error.hint}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = Context(args)
    try:
        return int(args.handler(args, ctx) or 0)
    except BerthError as error:
        if args.debug or os.environ.get("BERTH_DEBUG"):
            import traceback

            traceback.print_exc()
        print_error(error)
        return getattr(args, "error_exit_code", None) or error.exit_code
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
