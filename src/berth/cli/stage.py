"""``berth stage in|out SRC:DEST...``: the transfers of ``--stage-in``/``--stage-out`` outside jobs
(docs/staging.md), with a progress bar on a terminal and ``--json`` for a summary."""

from __future__ import annotations

import os
import sys


def register(sub) -> None:
    p = sub.add_parser("stage", help="copy data between S3 (or https, or host paths) and this machine",
                       description="Stage data as jobs do with --stage-in/--stage-out: verified, "
                       "atomic, skipping files already present and identical.")
    verbs = p.add_subparsers(dest="direction", metavar="in|out")
    verbs.required = True
    for direction, text in (("in", "s3://BUCKET/KEY, s3://BUCKET/PREFIX/, https://URL or a host path, "
                                   "then ':' and a local path"),
                            ("out", "a local path or glob, then ':' and s3://BUCKET/PREFIX/ or a host directory")):
        q = verbs.add_parser(direction, help=f"stage {direction}: {text}",
                             description=f"SRC:DEST items: {text}.")
        q.add_argument("items", nargs="+", metavar="SRC:DEST")
        q.add_argument("--s3-profile", metavar="NAME", default=None,
                       help="S3 profile (~/.config/berth/s3.toml or ~/.aws files; default: 'default')")
        q.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
        q.set_defaults(handler=cmd_stage)


def cmd_stage(args, ctx) -> int:
    import signal

    from berth import proc
    from berth.cli.output import print_json
    from berth.cli.progress import StagingBar
    from berth.errors import BerthError
    from berth.staging.locations import parse_transfers
    from berth.staging.profiles import resolve_profile
    from berth.staging.transfer import stage_in, stage_out

    transfers = parse_transfers(args.items, args.direction)
    profile = resolve_profile(args.s3_profile, settings=ctx.settings)
    bar = StagingBar()
    notes: list[str] = []
    run = stage_in if args.direction == "in" else stage_out
    # A stop signal raises (as in a job's staging, berth.jobs.runner): the transfer's clean-up
    # removes its partial files. Its default action left them in DEST.
    early = proc.raise_on_stop()
    try:
        summary = run(transfers, profile, os.getcwd(), progress=bar, notes=notes)
    except proc.StopRequested as stop:
        bar.finish()
        print(f"berth: stage-{args.direction} stopped by {signal.Signals(stop.signum).name}; "
              "partial files were removed", file=sys.stderr)
        return proc.signal_status(stop.signum)
    except BerthError as error:
        bar.finish()
        partial = getattr(error, "summary", None)
        if args.json and partial is not None:
            print_json(partial.to_dict())
        raise
    finally:
        proc.restore_handlers(early)
    bar.finish()
    for note in notes:
        print(f"berth: note: {note}", file=sys.stderr)
    if args.json:
        print_json(summary.to_dict())
    else:
        for line in summary.lines():
            print(line)
    return 0
