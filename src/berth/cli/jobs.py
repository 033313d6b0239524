"""CLI commands for batch jobs: submit, status, logs, cancel, jobs, srun, and the hidden
``job-exec`` that runs on the job's first node (see berth.jobs.runner)."""

from __future__ import annotations

import argparse
import datetime
import sys
import time

def register(sub) -> None:
    """Add this module's commands to the top-level subparsers."""
    p = sub.add_parser(
        "submit", prefix_chars="+", add_help=False,
        help="submit a batch job that runs its script in a container (sbatch's options)",
        description="berth submit [OPTIONS] SCRIPT [ARGS]",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("status", help="show a job's state (or all your jobs)")
    p.add_argument("job", nargs="?", metavar="JOB", help="job id (berth's or the scheduler's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--backend", help="only jobs of this backend (without JOB)")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("jobs", help="list your jobs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--backend", help="only jobs of this backend")
    p.set_defaults(handler=cmd_jobs)

    p = sub.add_parser("logs", help="print a job's output")
    p.add_argument("job", metavar="JOB")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the job ends")
    p.set_defaults(handler=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a job (SIGTERM, SIGKILL after the stop timeout)")
    p.add_argument("job", metavar="JOB")
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser(
        "srun", prefix_chars="+", add_help=False,
        help="inside a job: run a step on the job's nodes, one container per task, in the job's image",
        description="berth srun [--image REF] [SRUN OPTIONS] [--] COMMAND [ARGS]",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(handler=cmd_srun)

    # Hidden (no help): what the batch script runs on the job's first node.
    p = sub.add_parser("job-exec")
    p.add_argument("--backend", required=True)
    p.add_argument("record")
    p.set_defaults(handler=cmd_job_exec)


def submit_help() -> str:
    """`berth submit --help`, from the option tables (berth.jobs.options)."""
    from berth.jobs.options import BERTH_OPTIONS, INTERPRETED, REFUSED, SLURM_OPTIONS

    shorts = {option.name: option.short for option in SLURM_OPTIONS}
    lines = [
        "usage: berth submit [OPTIONS] SCRIPT [ARGS]",
        "",
        "Submit SCRIPT as a batch job: it runs inside the container of --template (or --image) on",
        "the first node, as you, in the current directory. Options are sbatch's, with sbatch's",
        "grammar; they may also come from '#BERTH' and '#SBATCH' lines at the top of the script",
        "(command line over #BERTH over #SBATCH). See docs/jobs.md, 'from sbatch to berth'.",
        "",
        "berth's options:",
    ]
    for own in BERTH_OPTIONS:
        left = f"--{own.name}" + (f" {own.metavar}" if own.metavar else "")
        lines.append(f"      {left:<20} {own.help}")
    lines += ["", "sbatch options berth interprets (checked against the template):"]
    for name, (_, text) in INTERPRETED.items():
        short = f"-{shorts[name]}, " if shorts.get(name) else "    "
        lines.append(f"  {short}--{name:<18} {text}")
    lines += ["", "refused (they would take over berth's job): "
              + ", ".join(f"--{name}" for name in REFUSED if name not in ("help", "usage", "version")),
              "", "Every other sbatch option (`sbatch --help`) passes to Slurm unchanged; the local",
              "backend names the ones it ignores."]
    return "\n".join(lines)


def cmd_submit(args, ctx) -> int:
    from berth.cli.output import print_json
    from berth.errors import UsageError
    from berth.jobs.api import SubmitRequest, submit
    from berth.jobs.options import parse_options

    argv = list(args.argv)
    options, index = parse_options(argv)
    if any(option.known and option.name in ("help", "usage") for option in options):
        print(submit_help())
        return 0
    if index >= len(argv):
        raise UsageError("berth submit: no job script given", hint="berth submit [OPTIONS] SCRIPT [ARGS]")
    as_json = any(option.known and option.name == "json" for option in options)
    options = [option for option in options if not (option.known and option.name == "json")]
    submitted = submit(ctx.settings, SubmitRequest(script=argv[index], args=tuple(argv[index + 1:]),
                                                   options=tuple(options)))
    for note in submitted.notes:
        print(f"berth: note: {note}", file=sys.stderr)
    if as_json:
        shown = {"id": submitted.spec.id, "backend": submitted.spec.backend,
                 "native_id": submitted.native_id, "output": submitted.spec.output}
        if submitted.spec.array_job_id:  # a job array: its id, and each task's record id and label
            shown["tasks"] = [{"id": s.id, "job": s.label, "output": s.output} for s in submitted.specs]
        print_json(shown)
    else:
        print(submitted.spec.id)
    return 0


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _state_word(status) -> str:
    result = status.result
    if result.state == "failed" and result.phase:
        return f"failed ({result.phase})"
    return result.state


def _exit_word(status) -> str:
    result = status.result
    if result.signal is not None:
        return f"signal {result.signal}"
    return "" if result.exit_code is None else str(result.exit_code)


def _print_table(statuses) -> None:
    from berth.cli.output import print_table

    print_table(
        ["JOB", "BACKEND", "SCHED ID", "NAME", "STATE", "EXIT", "IMAGE", "SUBMITTED"],
        [[s.spec.label, s.spec.backend, s.native_id or "", s.spec.name, _state_word(s), _exit_word(s),
          s.spec.template or s.spec.image, _when(s.spec.submitted_at)] for s in statuses],
    )


def cmd_status(args, ctx) -> int:
    from berth.cli.output import print_json
    from berth.jobs.api import status

    if args.job is None:
        return cmd_jobs(args, ctx)
    current = status(ctx.settings, args.job)
    if args.json:
        print_json(current.to_dict())
        return 0
    result = current.result
    rows = [
        ("job", current.spec.label), ("name", current.spec.name), ("backend", current.spec.backend),
        ("scheduler id", current.native_id), ("state", _state_word(current)),
        ("exit", _exit_word(current)), ("message", result.message),
        ("image", current.spec.image), ("template", current.spec.template), ("node", result.node),
        ("submitted", _when(current.spec.submitted_at)), ("started", _when(result.started_at)),
        ("ended", _when(result.ended_at)), ("output", current.spec.output), ("error", current.spec.error),
    ]
    from berth.cli.output import printable

    for key, value in rows:
        if value not in (None, ""):
            print(f"{key + ':':14}{printable(str(value))}")  # a record's name is one line, whatever it holds
    return 0


def cmd_jobs(args, ctx) -> int:
    from berth.cli.output import print_json
    from berth.jobs.api import list_jobs

    warnings: list[str] = []
    statuses = list_jobs(ctx.settings, args.backend, warnings)
    for warning in warnings:
        print(f"berth: warning: {warning}", file=sys.stderr)
    if args.json:
        print_json([s.to_dict() for s in statuses])
    else:
        _print_table(statuses)
    return 0


def cmd_logs(args, ctx) -> int:
    from berth.jobs.api import log_paths, read_log_tail, scheduler_messages, status

    current = status(ctx.settings, args.job)
    output, error = log_paths(current.spec)
    offsets = {output: 0, error: 0}
    while True:
        for path, stream in ((output, sys.stdout), (error, sys.stderr)):
            if path is None:
                continue
            data, offsets[path] = read_log_tail(path, offsets[path])
            if data:
                stream.flush()
                stream.buffer.write(data)
                stream.buffer.flush()
        if not args.follow or current.result.final:
            break
        time.sleep(0.5)
        current = status(ctx.settings, args.job)
    if args.follow:
        # One last read: output written between the last read and the final state.
        for path, stream in ((output, sys.stdout), (error, sys.stderr)):
            if path is not None:
                data, _ = read_log_tail(path, offsets[path])
                if data:
                    stream.buffer.write(data)
                    stream.buffer.flush()
    # The scheduler's own words that are in neither file (Slurm's, when berth's runner on the
    # node could not carry them into the error file: docs/jobs.md, "Output files").
    messages = scheduler_messages(ctx.settings, current.spec)
    if messages:
        sys.stdout.flush()
        sys.stderr.buffer.write(messages)
        sys.stderr.buffer.flush()
    return 0


def cmd_cancel(args, ctx) -> int:
    from berth.jobs.api import cancel

    current = cancel(ctx.settings, args.job)
    print(f"job {current.spec.id}: cancel requested ({current.result.state})", file=sys.stderr)
    return 0


def split_srun_argv(argv: list[str], default_scope: str = "task",
                    default_mpi: str | None = None) -> tuple[str | None, list[str], list[str], str, str | None]:
    """``[--image REF] [--scope task|node] [--container-mpi host|none] [srun options] [--]
    COMMAND...`` -> (image, srun options, command, scope, mpi).

    srun's options are read with srun's own grammar (berth.jobs.options.SLURM_OPTIONS): ``-A
    proj`` is one option, ``-K`` takes no following word (its value is optional, so attached
    only). They reach srun spelled in full (``--account=proj``); berth's ``--image`` (or
    ``--container-image``), ``--scope`` and ``--container-mpi`` (``berth run --mpi``: srun's own
    ``--mpi`` names the PMI plugin) may appear among them."""
    from berth.errors import UsageError
    from berth.jobs.options import VALUE, parse_options

    own = {"image": VALUE, "container-image": VALUE, "scope": VALUE, "container-mpi": VALUE}
    options, end = parse_options(argv, command="srun", where="berth srun", berth=False, extra=own)
    image, scope, mpi = None, default_scope, default_mpi
    for option in options:
        if option.known and option.name == "scope":
            if option.value not in ("task", "node"):
                raise UsageError(f"berth srun --scope {option.value!r}: use task or node",
                                 hint="task: a container per task (default); node: the tasks of a node share one")
            scope = option.value
        elif option.known and option.name == "container-mpi":
            if option.value not in ("host", "none"):
                raise UsageError(f"berth srun --container-mpi {option.value!r}: use host or none",
                                 hint="host: the site's MPI replaces the image's (docs/mpi.md); none: the image's own")
            mpi = option.value
        elif option.known and option.name in own:
            image = option.value
    words = [option.spelled for option in options if not (option.known and option.name in own)]
    command = argv[end:]
    if not command:
        raise UsageError("berth srun: no command given", hint="berth srun [SRUN OPTIONS] [--] COMMAND [ARGS]")
    return image, words, command, scope, mpi


def cmd_srun(args, ctx) -> int:
    import os

    from berth import proc
    from berth.errors import UsageError

    if args.argv[:1] in (["-h"], ["--help"]):
        print("usage: berth srun [--image REF] [--scope task|node] [--container-mpi host|none] [SRUN OPTIONS]\n"
              "                  [--] COMMAND [ARGS]\n\n"
              "Inside a berth job: run COMMAND as a job step on the allocated nodes, one container\n"
              "per task (--scope node: one per node, shared by its tasks), in the job's image\n"
              "(BERTH_JOB_IMAGE) unless --image says otherwise; --container-mpi host: the site's MPI\n"
              "replaces the image's (berth run --mpi host).\n"
              "Equivalent to: srun [SRUN OPTIONS] berth run [--scope node] [--mpi host] IMAGE COMMAND [ARGS]")
        return 0
    # The job's --scope and --container-mpi (or its template's) are the defaults; these options win.
    job_scope = os.environ.get("BERTH_JOB_SCOPE", "task")
    job_mpi = os.environ.get("BERTH_JOB_MPI")
    image, options, command, scope, mpi = split_srun_argv(
        args.argv, job_scope if job_scope in ("task", "node") else "task", job_mpi if job_mpi in ("host", "none") else None)
    image = image or os.environ.get("BERTH_JOB_IMAGE")
    if not image:
        raise UsageError("berth srun: no image: not inside a berth job (BERTH_JOB_IMAGE is unset)",
                         hint="give --image REF, or run it from a job submitted with berth submit")
    berth = proc.berth_argv()  # -P: never the job's directory on its module path
    argv = ["srun", *options, *berth, "run", *(["--scope", scope] if scope != "task" else []),
            *(["--mpi", mpi] if mpi else []), image, *command]
    # srun replaces berth: it owns the terminal's signals (one Ctrl-C: status, two: cancel).
    sys.stdout.flush()
    sys.stderr.flush()
    proc.replace_with(argv, env=proc.child_env())
    return 1  # not reached


def cmd_job_exec(args, ctx) -> int:
    from berth.jobs.api import run_job

    return run_job(ctx.settings, args.record, args.backend)
