"""CLI commands: run, exec, ps, doctor (issue 3).

`berth run` is on the start-up path of every container: this module imports nothing heavy at
module level, and the handlers import only the runtime modules they need (no urllib3, no
tarfile, no registry client when the image is already in a store).
"""

from __future__ import annotations

import os
import sys


def register(sub) -> None:
    """Add this module's commands to the top-level subparsers."""
    import argparse  # here: a run from a cached plan (berth.cli.fastrun) logs through _logger

    from berth.runtime.options import add_run_arguments

    run = sub.add_parser(
        "run", help="run a command in a new container, as yourself",
        description="Run IMAGE's entrypoint/command (or COMMAND) in a new unprivileged container, as "
        "yourself, and exit with its status (128+N when killed by signal N; 125 when berth itself fails). "
        "IMAGE is a reference in a store (pulled when missing) or a path to a SquashFS file.",
    )
    add_run_arguments(run)
    run.add_argument("image", metavar="IMAGE")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    run.set_defaults(handler=run_command, error_exit_code=125)

    execute = sub.add_parser("exec", help="run a command in one of your running containers",
                             description="Run COMMAND in the running container NAME (or id), with the "
                             "same identity, namespaces and mounts.")
    execute.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    execute.add_argument("-i", "--interactive", action="store_true", help="accepted for docker compatibility")
    execute.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]")
    execute.add_argument("-w", "--workdir", metavar="DIR")
    execute.add_argument("container", metavar="CONTAINER")
    execute.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    execute.set_defaults(handler=exec_command, error_exit_code=125)

    ps = sub.add_parser("ps", help="list your running containers on this node")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.set_defaults(handler=ps_command)

    doctor = sub.add_parser("doctor", help="check that this node can run containers for you, and say how to fix it")
    doctor.add_argument("--cleanup", action="store_true",
                        help="also remove what berths that died left behind (containers, mounts, state)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(handler=doctor_command)


def _strip_dashes(command: list[str]) -> list[str]:
    return command[1:] if command and command[0] == "--" else command


def _logger(show_debug: bool):
    """Notes from the runtime go to stderr; debug ones only with --debug. Printable: they name
    paths and values from the environment, the image and kept plans."""

    def log(message: str, *, debug: bool = False) -> None:
        if debug and not show_debug:
            return
        if not message.isprintable():  # rare: cli.output (and typing) stay unimported on a run
            from berth.cli.output import printable

            message = printable(message)
        print(f"berth: {message}", file=sys.stderr, flush=True)

    return log


def resolve_image(settings, reference: str, pull: str):
    """IMAGE as a SquashFS file or a reference (berth.runtime.container.names_local_image):
    a path runs the file as is, and an explicit path (``/``, ``./``, ``../``) that is not a
    file is NotFound; anything else goes through the store (berth.image.api)."""
    from berth.runtime.container import PATH_PREFIXES, names_local_image

    if names_local_image(reference):
        from pathlib import Path

        path = Path(reference)
        if path.is_file():
            from berth.runtime.container import LocalImage

            return LocalImage(squashfs=path.resolve(), reference=str(path))
        if reference.startswith(PATH_PREFIXES):
            from berth.errors import NotFound

            raise NotFound(f"no SquashFS file at {reference}",
                           hint="IMAGE starting with /, ./ or ../ is a path; give an image reference "
                                "(berth images lists yours) or the path of an existing SquashFS file")
    from berth.image import api

    if pull == "always":
        return api.pull(settings, reference)
    if pull == "missing":
        found = api.find_image(settings, reference)
        if found is not None:
            return found
        role = step_pull_role(os.environ)
        if role is not None:
            action, step = role
            if action == "wait":
                return api.wait_for_image(settings, reference, step=step)
            return api.pull_for_step(settings, reference, step=step)
    return api.get_image(settings, reference, pull_missing=pull == "missing")


def _plain_id(word: str) -> bool:
    """A Slurm job or step id as berth uses it in a file name: 1-32 ASCII letters, digits, _."""
    return 0 < len(word) <= 32 and all(ch.isascii() and (ch.isalnum() or ch == "_") for ch in word)


def step_pull_role(environ) -> tuple[str, str] | None:
    """Inside a Slurm step of several nodes, every node would pull a missing image at once:
    as many registry pulls and as many waiters on the store's lock on the shared filesystem
    as nodes (docs/scale.md). So the step's node 0 pulls (``("pull", "JOB.STEP")``) and the
    others wait for the image to appear (``("wait", "JOB.STEP")``). None outside a step of
    several nodes, or where Slurm's numbers are missing: this process pulls as usual."""
    job, step = environ.get("SLURM_JOB_ID", ""), environ.get("SLURM_STEP_ID", "")
    nodes, node = environ.get("SLURM_STEP_NUM_NODES", ""), environ.get("SLURM_NODEID", "")
    if not (_plain_id(job) and _plain_id(step) and nodes.isdigit() and node.isdigit()):
        return None
    if int(nodes) <= 1:
        return None
    return ("pull" if int(node) == 0 else "wait", f"{job}.{step}")


def run_command(args, ctx) -> int:
    from contextlib import nullcontext

    from berth.cli import fastrun
    from berth.runtime.container import run_container
    from berth.runtime.options import options_from_namespace
    from berth.runtime.policy import root_warning

    options = options_from_namespace(args)
    debug = options.debug or args.debug
    lookup = getattr(ctx, "plan_lookup", None)
    fastrun.say_miss(lookup, debug)
    # A run that missed the plan cache keeps its plan when it may (berth.runtime.plancache):
    # what settings, the image look-up and the planning read is recorded from here on.
    keeper = fastrun.keeper(lookup, image_argument=args.image, debug=debug) if options.scope != "node" else None
    log = keeper.log(_logger(debug)) if keeper else _logger(debug)
    with keeper.recorder if keeper else nullcontext():
        settings = ctx.settings
        warning = root_warning(os.getuid(), os.environ)
        if warning:
            print(f"berth: {warning}", file=sys.stderr, flush=True)
        image = resolve_image(settings, args.image, options.pull)
        if options.scope == "node":
            from berth.runtime.nodescope import run_in_node_container

            return run_in_node_container(settings, image, _strip_dashes(args.command) or None, options, log=log)
        return run_container(settings, image, _strip_dashes(args.command) or None, options, log=log,
                             keep_plan=keeper)


def exec_command(args, ctx) -> int:
    from berth.runtime.manage import exec_in_container

    return exec_in_container(ctx.settings, args.container, _strip_dashes(args.command), tty=args.tty,
                             env=tuple(args.env), workdir=args.workdir)


def ps_command(args, ctx) -> int:
    from berth.cli.output import printable
    from berth.runtime.manage import format_started, list_running

    warnings: list[str] = []
    records = list_running(ctx.settings, warn=warnings.append)
    for warning in warnings:
        print(f"berth: warning: {printable(warning)}", file=sys.stderr)
    if args.json:
        from berth.cli.output import print_json

        print_json(records)
        return 0
    from berth.cli.output import print_table

    rows = [(r["id"], r["name"], r["image"], " ".join(r["command"])[:40], format_started(r["started"]),
             r["pid"] or "", r["status"]) for r in records]
    print_table(("ID", "NAME", "IMAGE", "COMMAND", "STARTED", "PID", "STATUS"), rows)
    return 0


def doctor_command(args, ctx) -> int:
    from berth.runtime import doctor

    from berth.cli.output import printable

    cleaned, images, failures = doctor.cleanup(ctx.settings) if args.cleanup else ([], [], [])
    for failure in failures:
        print(f"berth: warning: {printable(failure)}", file=sys.stderr)
    plans = 0
    if args.cleanup:
        from berth.runtime.plancache import forget_all

        plans = forget_all(os.environ)
    checks = doctor.run_checks(ctx.settings)
    failed = [c for c in checks if not c.ok and c.required]
    if args.json:
        from berth.cli.output import print_json

        print_json({"ok": not failed, "checks": [c.as_dict() for c in checks], "cleaned": cleaned,
                    "images_unmounted": [image for image in images if not image["failure"]],
                    "unmount_failures": failures, "plans_removed": plans})
        return 1 if failed else 0
    for check in checks:
        mark = "OK  " if check.ok else ("FAIL" if check.required else "WARN")
        print(f"{mark} {check.name}: {check.detail}")
        if not check.ok and check.fix:
            print(f"     fix: {check.fix}")
    if args.cleanup:
        for entry in cleaned:
            print(f"cleaned up container {entry['id']} ({len(entry['unmounted'])} mount(s))")
        for entry in (image for image in images if not image["failure"]):
            why = "lingering, not in use" if entry.get("lingering") else "its containers are gone"
            print(f"unmounted the shared image mount {entry['unmounted']} ({why})")
        if plans:
            print(f"removed {plans} cached run plans")
        if not cleaned and not images and not plans and not failures:
            print("nothing to clean up")
    if failed:
        print(f"{len(failed)} problem(s) keep berth from running containers here")
    else:
        print("berth can run containers here")
    return 1 if failed else 0
