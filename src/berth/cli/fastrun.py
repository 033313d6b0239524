"""`berth run ...` from a cached plan (berth.runtime.plancache; issue 10, target 3).

The console script hands a command line that starts with ``run`` here before it builds any
parser: :func:`look_up` computes the run's key and looks for a kept plan whose dependencies are
all unchanged, and loads the settings (from the parse cache) to know that plan_cache is on and
the entry's settings are theirs. On a hit, :func:`run_hit` executes it through the same
lifecycle as a run that plans (berth.runtime.container.run_cached); on a miss, or on any doubt,
the command goes the usual way (argparse, settings, planning), and :func:`keeper` lets it keep
its plan for the next identical run. This module imports only what a look-up needs.
"""

from __future__ import annotations

import os
import sys


class Lookup:
    """The result of a look-up: ``entry`` (a hit) or ``reason`` (why not), and where a plan
    made now would be kept (``directory``, ``key``; None when it cannot be)."""

    def __init__(self, directory, key: str | None, entry: dict | None, reason: str) -> None:
        self.directory = directory
        self.key = key
        self.entry = entry
        self.reason = reason


def look_up(argv: list[str], environ=None) -> Lookup:
    """The cached plan for ``berth`` + ``argv`` in ``environ`` (default os.environ), if any."""
    from berth.runtime import plancache

    environ = os.environ if environ is None else environ
    directory = plancache.cache_directory(environ)
    if directory is None:
        return Lookup(None, None, None, "no private state directory to keep plans in")
    key = plancache.run_key(argv, environ)
    if key is None:
        return Lookup(None, None, None, "the working directory cannot be read")
    if not os.path.lexists(directory / key):
        return Lookup(directory, key, None, "no entry")
    # The settings as they are now decide, before the entry is read at all, whether a kept
    # plan runs: with plan_cache off none does, whoever wrote it (a container
    # that could write the state directory could have: docs/security.md); plans are kept only
    # in the state directory the settings name (a state_dir set in berth.toml moves the state
    # but not this directory, found before settings: no plan is used or kept then); and the
    # entry's settings must be theirs. Their files' parses come from the parse cache
    # (berth.config.tomlfile): ~1 ms with the imports.
    from berth.config.load import load_settings
    from berth.errors import BerthError

    try:
        settings = load_settings(environ=environ)
    except BerthError:
        return Lookup(directory, key, None, "the settings do not load")
    if not settings.plan_cache:
        return Lookup(None, None, None, "the setting plan_cache is off")
    if os.path.realpath(settings.state_dir) != os.path.realpath(directory.parent):
        return Lookup(None, None, None, f"state_dir is not where plans are kept ({directory.parent})")
    try:
        entry, why = plancache.load_entry(directory, key)
        if entry is None:
            return Lookup(directory, key, None, why)
        changed = plancache.changed_dependency(entry)
        if changed is not None:
            return Lookup(directory, key, None, f"{changed} changed")
        differs = plancache.settings_differ(entry, settings)
    except Exception as exc:  # an entry is data a container may have written: any surprise is a miss
        return Lookup(directory, key, None, f"the entry is not well-formed ({type(exc).__name__})")
    if differs:
        return Lookup(directory, key, None, f"the setting {differs} is not the entry's")
    return Lookup(directory, key, entry, "")


class HitArgs:
    """What berth.cli.main's error handling reads of the arguments, for a run from a cached plan."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup
        self.debug = bool(lookup.entry["run"]["debug"])
        self.error_exit_code = 125
        self.handler = run_hit


def run_hit(args: HitArgs, ctx) -> int:
    """Run the cached plan of ``args.lookup`` (a handler, like berth.cli.run.run_command)."""
    del ctx
    from berth.cli.run import _logger
    from berth.runtime.container import run_cached

    log = _logger(args.debug)
    log(f"plan cache: hit ({args.lookup.key[:12]}): running the plan kept by an identical run", debug=True)
    return run_cached(args.lookup.entry, log=log)


def keeper(lookup: Lookup | None, environ=None, *, image_argument: str = "", debug: bool = False):
    """A berth.runtime.plancache.Keeper for a run that missed, or None when its plan cannot be
    kept (no look-up: berth.cli.main.main called without the cache, as tests do)."""
    if lookup is None or lookup.key is None:
        return None
    from berth.runtime.plancache import Keeper

    return Keeper(lookup.directory, lookup.key, os.environ if environ is None else environ,
                  image_argument=image_argument, debug=debug)


def say_miss(lookup: Lookup | None, debug: bool) -> None:
    if lookup is not None and debug:
        reason = lookup.reason
        if not reason.isprintable():  # it may name a path of the plan
            from berth.cli.output import printable

            reason = printable(reason)
        print(f"berth: plan cache: miss: {reason}", file=sys.stderr, flush=True)
