"""What the CLI calls: submit, status, cancel, list, logs, and the job runner entry point.

Submission validates everything before anything is written where a scheduler could see it:
options (command line over ``#BERTH`` over ``#SBATCH`` lines), the script (exists, readable, ``#!``), the
template and its limits, the image (present in a store, or pullable when named with --image),
site policy for the container options, and the backend's own checks. A failure at any point
removes the half-made record, so a rejected submission leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import os
import shutil
import time
from pathlib import Path

from berth import proc
from berth.config.settings import Settings
from berth.errors import BerthError, JobError, NotFound, PolicyError, UsageError
from berth.jobs import model, options as opts
from berth.jobs.backend import BACKENDS, get_backend
from berth.jobs.model import JobSpec, JobStatus, Resources
from berth.jobs.records import (JobRecord, create_record, find_record, list_records, make_private_dir,
                                 remove_record)
from berth.record import Record, replace

#: Largest script berth snapshots (a job script, not a data file).
MAX_SCRIPT_BYTES = 4 << 20


class SubmitRequest(Record):
    """What the user typed: the options of the command line (``options.parse_options``), the
    script and its arguments."""

    script: str
    args: tuple[str, ...] = ()
    options: tuple[opts.ParsedOption, ...] = ()
    workdir: str | None = None


class Submitted(Record):
    spec: JobSpec
    native_id: str | None
    notes: tuple[str, ...]
    #: Every task of a job array (``spec`` is the first); just ``spec`` otherwise.
    specs: tuple[JobSpec, ...] = ()


def read_script(path_text: str) -> tuple[Path, str]:
    """The script's absolute path and text. Raises UsageError naming the file."""
    path = Path(path_text).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    if not path.exists():
        raise UsageError(f"job script {path_text} does not exist")
    if path.is_dir():
        raise UsageError(f"job script {path_text} is a directory")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SCRIPT_BYTES + 1)
    except PermissionError:
        raise UsageError(f"job script {path_text} is not readable (permission denied)") from None
    except OSError as exc:
        raise UsageError(f"job script {path_text} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_SCRIPT_BYTES:
        raise UsageError(f"job script {path_text} is larger than {MAX_SCRIPT_BYTES >> 20} MiB",
                         hint="a job script starts programs; keep data in files it reads")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"job script {path_text} is not text (a binary cannot carry #BERTH lines)",
                         hint="wrap the program in a shell script: #!/bin/sh, then exec PROGRAM") from None
    if not text.startswith("#!"):
        raise UsageError(f"job script {path_text} does not start with '#!'",
                         hint="the first line names the interpreter inside the container, e.g. #!/bin/sh")
    return path, text


def build_resources(values: dict) -> Resources:
    """Raw option strings -> Resources. Raises UsageError naming the option."""
    def integer(key: str, option: str, limit: int) -> int | None:
        raw = values.get(key)
        return None if raw is None else opts.positive_int(raw, option, limit)

    nodes = integer("nodes", "--nodes", opts.MAX_NODES)
    ntasks = integer("ntasks", "--ntasks", opts.MAX_TASKS)
    per_node = integer("ntasks_per_node", "--ntasks-per-node", opts.MAX_TASKS)
    cpus = integer("cpus_per_task", "--cpus-per-task", opts.MAX_CPUS_PER_TASK)
    memory = None if values.get("mem") is None else opts.parse_memory_bytes(values["mem"])
    gpus = None if values.get("gres") is None else opts.parse_gres_gpus(values["gres"])
    if values.get("gpus") is not None:
        # sbatch's -G/--gpus counts the job's GPUs; berth requests them per node (--gres).
        total = opts.gpu_count(values["gpus"], "--gpus")
        if total < 1 or total % (nodes or 1):
            raise UsageError(f"--gpus {values['gpus']}: not a positive multiple of the {nodes or 1} node(s)",
                             hint="ask for GPUs per node with --gpus-per-node or --gres=gpu:N")
        count = total // (nodes or 1)
        if count > opts.MAX_GPUS:
            raise UsageError(f"--gpus {values['gpus']}: more than {opts.MAX_GPUS} GPUs per node",
                             hint="check the value for a typo")
        if gpus is not None and gpus != count:
            raise UsageError(f"--gpus {count} and --gres gpu:{gpus} ask for different numbers of GPUs",
                             hint="give one of them")
        gpus = count
    time_s = None if values.get("time") is None else opts.parse_time_s(values["time"])
    partition = None if values.get("partition") is None else opts.check_name(values["partition"], "--partition")
    if nodes is not None and ntasks is not None and ntasks < nodes:
        raise UsageError(f"--ntasks {ntasks} is less than --nodes {nodes}: every node needs a task")
    return Resources(nodes=nodes, ntasks=ntasks, ntasks_per_node=per_node, cpus_per_task=cpus,
                     memory_bytes=memory, gpus=gpus, time_limit_s=time_s, partition=partition,
                     exclusive=bool(values.get("exclusive")))


def apply_template(resources: Resources, template, passthrough=()) -> Resources:
    """The template's resources become the request unless the user asks for less; asking
    for more is a PolicyError naming the resource and the template's limit. The sbatch options
    that also ask for GPUs, memory or CPUs (``--gpus*``, ``--mem-per-cpu``, ``--mem-per-gpu``,
    ``--mincpus``, ``--cpus-per-gpu``), passed on unchanged, are held to the same ceilings: the
    template's ``cpu`` is per task (per node: times the tasks per node), ``memsz`` and ``gpu`` per
    node; the per-GPU ones count the GPUs asked for wherever they stand. ``--exclusive`` (whole
    nodes: every CPU of them) is refused."""
    from berth.config.units import format_size

    cpus, memory, gpus = resources.cpus_per_task, resources.memory_bytes, resources.gpus
    if cpus is not None and cpus > template.cpu:
        raise PolicyError(f"--cpus-per-task {cpus} exceeds template '{template.name}' (cpu={template.cpu})",
                          hint=f"ask for at most {template.cpu}, or ask your site administrator for a larger template")
    if memory is not None and memory > template.memsz_bytes:
        raise PolicyError(f"--mem {format_size(memory)} exceeds template '{template.name}' "
                          f"(memsz={format_size(template.memsz_bytes)})",
                          hint="ask for less, or ask your site administrator for a larger template")
    if gpus is not None and gpus > template.gpu:
        raise PolicyError(f"--gres gpu:{gpus} exceeds template '{template.name}' (gpu={template.gpu})",
                          hint="ask for fewer GPUs, or ask your site administrator for a GPU template")
    tasks_per_node = resources.ntasks_per_node or 1
    given = [option for option in passthrough if option.known and option.value is not None]
    for option in given:  # first: the per-GPU options below count the GPUs these give
        if option.name.startswith("gpus"):
            count = opts.gpu_count(option.value, f"--{option.name}")
            per_node = {"gpus": count / (resources.nodes or 1), "gpus-per-task": count * tasks_per_node}.get(
                option.name, count)
            if per_node > template.gpu:
                raise PolicyError(f"{option.where}: --{option.name}={option.value} exceeds template "
                                  f"'{template.name}' (gpu={template.gpu} per node)",
                                  hint="ask for fewer GPUs, or ask your site administrator for a GPU template")
            gpus = int(per_node) if gpus is None else gpus
    if resources.exclusive:
        raise PolicyError(f"--exclusive gives the job whole nodes, more CPUs than template '{template.name}' "
                          f"allows (cpu={template.cpu} per task)",
                          hint="leave --exclusive out (the template's resources are the job's), "
                               "or ask your site administrator for a larger template")
    cpus_per_node = (cpus or template.cpu) * tasks_per_node
    gpus_per_node = gpus if gpus is not None else template.gpu
    for option in given:
        if option.name in ("mem-per-cpu", "mem-per-gpu"):
            per = opts.parse_memory_bytes(option.value, f"--{option.name}")
            count = cpus_per_node if option.name == "mem-per-cpu" else gpus_per_node or 1
            if per * count > template.memsz_bytes:
                raise PolicyError(f"{option.where}: --{option.name}={option.value} gives {format_size(per * count)} "
                                  f"per node, more than template '{template.name}' allows "
                                  f"(memsz={format_size(template.memsz_bytes)})",
                                  hint="ask for less, or ask your site administrator for a larger template")
        elif option.name in ("mincpus", "cpus-per-gpu"):  # --exclusive (every CPU of a node): above
            count = opts.positive_int(option.value, f"--{option.name}", opts.MAX_CPUS_PER_TASK)
            if option.name == "cpus-per-gpu":
                count *= gpus_per_node
            if count > cpus_per_node:
                raise PolicyError(f"{option.where}: --{option.name}={option.value} gives {count} CPUs per node, "
                                  f"more than template '{template.name}' allows (cpu={template.cpu} per task, "
                                  f"{cpus_per_node} per node)",
                                  hint="ask for fewer CPUs, or ask your site administrator for a larger template")
    return replace(
        resources,
        cpus_per_task=cpus if cpus is not None else template.cpu,
        memory_bytes=memory if memory is not None else template.memsz_bytes,
        gpus=gpus if gpus is not None else (template.gpu or None),
    )


def _expand_path(pattern: str, spec_id: str, name: str, workdir: str, array_id: str = "",
                 task: int | None = None) -> str:
    """sbatch's filename pattern: %j job id, %x name, %u user; in an array %A the array's id
    and %a the task id (berth's ids); %% a percent sign."""
    values = {"j": spec_id, "x": name, "u": getpass.getuser(), "A": array_id or spec_id,
              "a": "" if task is None else str(task), "%": "%"}
    import re

    text = re.sub(r"%([jxuAa%])", lambda match: values[match.group(1)], pattern)
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else Path(workdir) / path)


def _prepare_output(settings: Settings, path: str, option: str, *, own: bool) -> bool:
    """Create (or check) a job's output file at submission, as the job will write it.

    Paths users control are hostile (issue 12): in a shared directory another user may have
    planted a symbolic link, their own file or a FIFO at the name. The file is opened without
    following links and without blocking, and refused unless it is a regular file of yours;
    once it exists and is yours, nobody else can swap it in a sticky directory before the job
    writes it (the job's runner opens it again the same way: the local backend's, and
    berth.jobs.slurm.SlurmOutput on the node). A path inside berth's jobs directory is
    refused (``own``: the record's default output). Returns True when this call created the
    file. Raises UsageError naming the option."""
    from berth.jobs.records import jobs_dir, open_regular_nofollow

    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: the directory {parent} does not exist")
    spool = os.path.realpath(jobs_dir(settings))
    real_parent = os.path.realpath(parent)
    if not own and (real_parent == spool or real_parent.startswith(spool + os.sep)):
        raise UsageError(f"{option} {path}: inside berth's jobs directory {spool}",
                         hint="berth keeps its job records there: choose a file elsewhere")
    existed = os.path.lexists(path)
    try:
        fd = open_regular_nofollow(Path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644,
                                   replace_planted=False)
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise UsageError(f"{option} {path}: not writable by you",
                             hint="choose a file in a directory you can write") from None
        raise UsageError(f"{option} {path}: refused: it {exc.strerror}",
                         hint="berth writes job output only to a regular file of yours; choose another "
                              "name (another user may have put this one there)") from None
    os.close(fd)
    return not existed


def submit(settings: Settings, request: SubmitRequest) -> Submitted:
    """Validate and submit a job. Raises UsageError, PolicyError, NotFound or JobError; on any
    error nothing stays submitted or recorded."""
    opts.merge_options(list(request.options))  # a refused option is named before the script is read
    script_path, text = read_script(request.script)
    sbatch_lines, berth_lines = opts.read_directives(script_path, text)
    merged = opts.merge_options(sbatch_lines, berth_lines, list(request.options))
    values = merged.values
    backend_name = values.get("backend") or settings.backend
    if backend_name not in BACKENDS:
        raise UsageError(f"--backend '{backend_name}': unknown backend", hint=f"use one of: {', '.join(BACKENDS)}")
    unknown = [option for option in merged.passthrough if not option.known]
    if unknown and backend_name != "slurm":
        first = unknown[0]
        raise UsageError(f"{first.where}: unknown option '{first.display}'",
                         hint=opts.suggest(first.name))
    resources = build_resources(values)
    name = opts.check_name(values["job_name"], "--job-name") if values.get("job_name") else _default_name(script_path)
    workdir = _workdir(values.get("chdir"), request.workdir)

    template = None
    boot_s, stop_s, custom = model.DEFAULT_BOOT_TIMEOUT_S, model.DEFAULT_STOP_TIMEOUT_S, ""
    if values.get("template"):
        from berth.config.templates import load_template

        template = load_template(settings, values["template"])
        resources = apply_template(resources, template, merged.passthrough)
        image = template.pinned_reference
        boot_s, stop_s, custom = template.boot_timeout_s, template.stop_timeout_s, template.custom
    elif values.get("image"):
        image = values["image"]
    else:
        raise UsageError("no image for the job: give --template NAME or --image REF "
                         "(or a #BERTH --template line in the script)",
                         hint="`berth template list` shows the site's templates")
    resources = _memory_from_passthrough(resources, merged.passthrough)
    _check_image(settings, image, template)
    staging = _staging_request(settings, values)
    scope = _scope(values.get("scope"), custom)
    mpi = _mpi(values.get("container_mpi"), custom)

    backend = get_backend(settings, backend_name)
    tasks, limit = opts.parse_array(values["array"]) if values.get("array") else ((None,), None)
    records: list[JobRecord] = []
    created: list[str] = []
    try:
        dependency = _local_dependency(settings, merged.passthrough) if backend_name == "local" else ""
        scheduler_options = _scheduler_options(settings, [option for option in merged.passthrough if not (
            dependency and option.known and option.name == "dependency")], values)
        specs = []
        for task in tasks:
            record = create_record(settings)
            records.append(record)
            array_id = records[0].id if task is not None else ""
            default = (str(record.default_output) if task is None
                       else _expand_path("berth-%A_%a.out", record.id, name, workdir, array_id, task))
            output = _expand_path(values["output"], record.id, name, workdir, array_id, task) \
                if values.get("output") else default
            error = _expand_path(values["error"], record.id, name, workdir, array_id, task) \
                if values.get("error") else None
            for path, option in ((output, "--output"), (error, "--error")):
                if path is not None and _prepare_output(settings, path, option,
                                                        own=path == str(record.default_output)):
                    created.append(path)
            make_private_dir(record.container_dir)
            shutil.copyfile(script_path, record.script)
            os.chmod(record.script, 0o700)
            spec = JobSpec(
                id=record.id, backend=backend_name, name=name, script=str(record.script),
                script_source=str(script_path), args=tuple(request.args), workdir=workdir, image=image,
                template=template.name if template else None, resources=resources, output=output, error=error,
                boot_timeout_s=boot_s, stop_timeout_s=stop_s, custom=custom, user=getpass.getuser(),
                submitted_at=time.time(), scheduler_options=scheduler_options, **staging,
                comment=str(values.get("comment") or ""), dependency=dependency,
                array_job_id=array_id, array_task_id=task, array_limit=limit,
                array_spec=str(values.get("array") or ""), scope=scope, mpi=mpi,
            )
            if task is None or task == tasks[0]:
                _check_container_options(settings, spec, record)
                notes = list(backend.check(spec))
            specs.append(spec)
        from berth.runtime.policy import root_warning

        warning = root_warning(os.getuid(), os.environ)
        if warning:
            notes.append(warning)
        for record, spec in zip(records, specs):
            record.write_spec(spec)
        if tasks[0] is None:
            native_ids = [backend.submit(records[0], specs[0])]
        else:
            native_ids = backend.submit_array(list(zip(records, specs)))
        for record, native_id in zip(records, native_ids):
            if native_id is not None:
                record.write_native_id(native_id)
    except BaseException:
        for record in records:
            remove_record(record)
        for path in created:  # output files this submission created (sbatch refused the job)
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    _forget_ended_credentials(settings)
    return Submitted(specs[0], native_ids[0], tuple(notes), tuple(specs))


STAGE_OUT_WHEN = ("always", "success")


def _staging_request(settings: Settings, values: dict) -> dict:
    """The JobSpec's staging fields from the options. SRC:DEST items are parsed now and the S3
    profile resolved now (unknown name, unreadable or non-private file: refused before anything
    is submitted); only the profile's name is recorded, the node resolves it again."""
    from berth.staging.locations import S3Location, parse_transfers

    stage_in = tuple(values.get("stage_in") or ())
    stage_out = tuple(values.get("stage_out") or ())
    transfers = parse_transfers(stage_in, "in") + parse_transfers(stage_out, "out")
    when = values.get("stage_out_when") or "always"
    if when not in STAGE_OUT_WHEN:
        raise UsageError(f"--stage-out-when '{when}': use always or success",
                         hint="always (default) keeps failed jobs' logs and checkpoints too")
    in_container = bool(values.get("s3_credentials_in_container"))
    uses_s3 = any(isinstance(loc, S3Location) for t in transfers for loc in (t.source, t.destination))
    if uses_s3 or in_container:
        from berth.staging.profiles import resolve_profile

        profile = resolve_profile(values.get("s3_profile"), settings=settings)
        if in_container and profile.anonymous:
            raise UsageError(f"--s3-credentials-in-container: S3 profile '{profile.name}' has no keys to give",
                             hint="set access_key and secret_key in the profile (docs/staging.md)")
    return {"stage_in": stage_in, "stage_out": stage_out, "stage_out_when": when,
            "s3_profile": values.get("s3_profile"), "s3_credentials_in_container": in_container}


def _scope(given: str | None, custom: str) -> str:
    """The job's step scope: --scope, else the template's ``custom`` --scope, else "task"."""
    if given is None:
        if "--scope" not in custom:
            return "task"
        from berth.runtime.options import parse_custom

        return parse_custom(custom).scope
    if given not in ("task", "node"):
        raise UsageError(f"--scope '{given}': use task or node",
                         hint="task: a container per task of a berth srun step (default); node: one per node")
    return given


def _mpi(given: str | None, custom: str) -> str:
    """The job's ``--mpi``: --container-mpi, else the template's ``custom`` --mpi, else ""."""
    if given is None:
        if "--mpi" not in custom:
            return ""
        from berth.runtime.options import parse_custom

        return parse_custom(custom).mpi or ""
    if given not in ("host", "none"):
        raise UsageError(f"--container-mpi '{given}': use host or none",
                         hint="host: the site's MPI replaces the image's (docs/mpi.md); none: the image's own")
    return given


def _workdir(chdir: str | None, given: str | None) -> str:
    """The job's working directory: -D/--chdir (relative to the current directory), else the
    current directory. Raises UsageError when it is not a directory."""
    base = given or os.getcwd()
    if chdir is None or chdir is True:
        return os.path.realpath(base)
    path = os.path.realpath(os.path.join(base, os.path.expanduser(chdir)))
    if not os.path.isdir(path):
        raise UsageError(f"--chdir {chdir}: not a directory")
    return path


#: Variables berth's own runner needs in the batch job's environment (--export must keep them).
def _berth_variables() -> list[str]:
    return sorted(name for name in os.environ if name.startswith("BERTH_") or name == "XDG_CONFIG_HOME")


def _scheduler_options(settings: Settings, passthrough, values: dict) -> tuple[str, ...]:
    """The sbatch options berth passes on unchanged, as sbatch receives them (``--name=value``),
    after the checks that keep berth's own settings berth's: --export may not set berth's
    variables (and keeps them when it exports a list), --dependency may name berth job ids."""
    words = []
    for option in passthrough:
        if option.known and option.name == "export" and option.value is not None:
            words.append(f"--export={_checked_export(option)}")
        elif option.known and option.name == "dependency" and option.value is not None:
            words.append(f"--dependency={_native_dependency(settings, option)}")
        else:
            words.append(option.spelled)
    return tuple(words)


def _checked_export(option) -> str:
    items = [item for item in option.value.split(",") if item]
    for item in items:
        variable = item.partition("=")[0]
        if variable.startswith("BERTH_") or variable == "XDG_CONFIG_HOME":
            raise UsageError(f"{option.where}: --export={option.value}: {variable} is berth's own variable",
                             hint="berth passes its variables to the job itself; leave them out of --export")
    upper = [item.upper() for item in items]
    if "ALL" in upper:
        return option.value
    kept = [item for item in items if item.upper() != "NONE"] + _berth_variables()
    return ",".join(kept) if kept else "NONE"


def _local_dependency(settings: Settings, passthrough) -> str:
    """--dependency for the local backend: its types and berth ids checked now (every id a
    local job of yours), returned as given; the runner waits on it (berth.jobs.local)."""
    option = next((o for o in passthrough if o.known and o.name == "dependency" and o.value), None)
    if option is None:
        return ""
    for _, ids in opts.parse_dependency(option.value, option.where):
        for job in ids:
            try:
                spec = find_record(settings, job).read_spec()
            except NotFound:
                raise UsageError(f"{option.where}: --dependency names job {job}, which is not one of your jobs",
                                 hint="`berth jobs` lists them") from None
            if spec.backend != "local":
                raise UsageError(f"{option.where}: --dependency names job {job}, a {spec.backend} job",
                                 hint="a local job can depend on local jobs only")
    return option.value


def _native_dependency(settings: Settings, option) -> str:
    """--dependency=TYPE:ID[:ID...][,|?...]: a berth job id of a Slurm job becomes its Slurm id;
    other ids pass as they are (Slurm's own ids; sbatch judges them)."""
    import re

    def native(match):
        word = match.group(0)
        try:
            record = find_record(settings, word)
        except NotFound:
            return word
        spec = record.read_spec()
        found = record.read_native_id()
        if spec.backend != "slurm" or found is None:
            raise UsageError(f"{option.where}: --dependency names job {word}, which is not a Slurm job")
        return found

    # ids follow a ':' (afterok:12:13), optionally with +time (after:12+5)
    return re.sub(r"(?<=:)\d+", native, option.value)


def _memory_from_passthrough(resources: Resources, passthrough) -> Resources:
    """--mem-per-cpu and --mem-per-gpu replace --mem (Slurm refuses both): the per-node memory
    berth records (and limits the local job to) is their product with the CPUs or GPUs."""
    for option in passthrough:
        if option.known and option.name in ("mem-per-cpu", "mem-per-gpu") and option.value:
            per = opts.parse_memory_bytes(option.value, f"--{option.name}")
            count = (resources.cpus_per_task or 1) * (resources.ntasks_per_node or 1) \
                if option.name == "mem-per-cpu" else (resources.gpus or 1)
            return replace(resources, memory_bytes=per * count)
    return resources


def _default_name(script: Path) -> str:
    # ASCII only, as check_name demands of -J (str.isalnum() alone accepts any script's letters).
    name = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "_.+-" else "_" for ch in script.name)[:128]
    return name if name and name[0].isascii() and name[0].isalnum() else f"job{name}"[:128]


def _check_image(settings: Settings, image: str, template) -> None:
    """A template's image must be in a store (the admin pinned it there); an --image is found
    or pulled at run time, but its reference must parse."""
    from berth.image.api import find_image, parse_reference

    parse_reference(image)
    if template is not None and find_image(settings, image) is None:
        raise NotFound(f"template '{template.name}' names image {image}, which is in no store",
                       hint="ask your site administrator: `berth template refresh "
                            f"{template.name}` pulls it into the site store")


def _check_container_options(settings: Settings, spec: JobSpec, record: JobRecord) -> None:
    """Site policy for the container the script will run in (custom options, mounts)."""
    from berth.jobs.runner import build_run_options
    from berth.runtime.policy import check_options

    options = build_run_options(settings, spec, record, limit_resources=False)
    check_options(settings, options)


def status(settings: Settings, job_id: str) -> JobStatus:
    record = find_record(settings, job_id)
    spec = record.read_spec()
    return _forget_credentials([record], [get_backend(settings, spec.backend).status(record, spec)])[0]


def _forget_credentials(records: list[JobRecord], found: list[JobStatus]) -> list[JobStatus]:
    """Remove the credential files of the jobs among ``found`` that ended: their runner removes
    them, but one killed with SIGKILL (or with its node) never did (docs/staging.md)."""
    by_id = {record.id: record for record in records}
    for current in found:
        if current.result.final and current.spec.id in by_id:
            by_id[current.spec.id].remove_credentials()
    return found


def _forget_ended_credentials(settings: Settings) -> None:
    """At submit: the credential files left by the user's ended jobs (only jobs that still have
    one are asked about; a scheduler that cannot be asked is left for the next time)."""
    groups: dict[str, list] = {}
    for record in list_records(settings):
        if not any(path.exists() for path in record.credential_files):
            continue
        with contextlib.suppress(BerthError):
            spec = record.read_spec()
            groups.setdefault(spec.backend, []).append((record, spec))
    for name, items in groups.items():
        with contextlib.suppress(BerthError):
            _forget_credentials([record for record, _ in items], get_backend(settings, name).statuses(items))


def list_jobs(settings: Settings, backend_name: str | None = None,
              warnings: list[str] | None = None) -> list[JobStatus]:
    """The caller's jobs (all backends, or one), oldest first, one scheduler query per backend.

    A scheduler that cannot be asked (Slurm unreachable from this machine) does not hide the
    other jobs: its jobs show their last recorded state, and a line is added to ``warnings``."""
    groups: dict[str, list] = {}
    for record in list_records(settings):
        try:
            spec = record.read_spec()
        except BerthError:
            continue
        if backend_name is None or spec.backend == backend_name:
            groups.setdefault(spec.backend, []).append((record, spec))
    found: list[JobStatus] = []
    for name, items in groups.items():
        try:
            found.extend(_forget_credentials([record for record, _ in items],
                                             get_backend(settings, name).statuses(items)))
        except BerthError as error:
            if warnings is not None:
                warnings.append(f"{name} jobs show their last recorded state: {error.message}")
            for record, spec in items:
                result = record.read_result() or model.JobResult(model.PENDING)
                found.append(JobStatus(spec, result, record.read_native_id(), "unknown"))
    return sorted(found, key=lambda s: int(s.spec.id))


def cancel(settings: Settings, job_id: str) -> JobStatus:
    """Cancel a job; an array's id (``7``) cancels every task of it not ended yet, ``7_3`` one
    task (as scancel does). Returns the status of the job (of the first task for an array)."""
    record = find_record(settings, job_id)
    spec = record.read_spec()
    backend = get_backend(settings, spec.backend)
    if spec.array_job_id == spec.id and "_" not in str(job_id):
        tasks = [(r, r.read_spec()) for r in list_records(settings)]
        tasks = [(r, s) for r, s in tasks if s.array_job_id == spec.array_job_id]
        live = [(r, s) for r, s in tasks if not backend.status(r, s).result.final]
        if not live:
            raise JobError(f"job array {spec.id} already ended")
        for task_record, task_spec in live:
            with contextlib.suppress(JobError):  # a task that ended meanwhile
                backend.cancel(task_record, task_spec)
        return backend.status(record, spec)
    backend.cancel(record, spec)
    return backend.status(record, spec)


def log_paths(spec: JobSpec) -> tuple[Path, Path | None]:
    return Path(spec.output), Path(spec.error) if spec.error else None


def scheduler_messages(settings: Settings, spec: JobSpec) -> bytes:
    """What the scheduler wrote for the job that is in neither of its files: for a Slurm job,
    Slurm's own output that berth's runner did not carry into the error file (it never
    started, was killed, or Slurm wrote after it ended; berth.jobs.slurm.SlurmOutput)."""
    if spec.backend != "slurm":
        return b""
    from berth.jobs.slurm import uncarried_output

    return uncarried_output(find_record(settings, spec.id), spec)


def run_job(settings: Settings, record_path: str, backend_name: str) -> int:
    """``berth job-exec``: run the job of the record at ``record_path`` on this node.

    Local backend: wait for a concurrency slot (pending), enforce the time limit, limit CPUs
    and memory; Slurm: the scheduler does those. Returns the job's shell-style status.
    """
    from berth.jobs.records import JobRecord
    from berth.jobs.runner import Supervisor

    record = JobRecord(Path(record_path))
    spec = record.read_spec()
    if spec.backend != backend_name:
        raise JobError(f"job {spec.id} was submitted to the {spec.backend} backend, not {backend_name}")
    output = None
    if backend_name == "local":
        import signal

        from berth.jobs.local import acquire_slot

        signal.signal(signal.SIGTERM, lambda *_: record.request_cancel())
        if spec.dependency:
            from berth.jobs.local import wait_for_dependencies

            never = wait_for_dependencies(settings, record, spec)
            if never is not None:
                record.write_result(model.JobResult(model.CANCELLED, ended_at=time.time(), message=never))
                return proc.signal_status(signal.SIGTERM)
        array_slot = None
        if spec.array_limit:
            array_slot = acquire_slot(settings, record, spec.array_limit, array_id=spec.array_job_id)
            if array_slot is None:
                record.write_result(model.JobResult(model.CANCELLED, ended_at=time.time(),
                                                    message="the job was cancelled while pending"))
                return proc.signal_status(signal.SIGTERM)
        slot = acquire_slot(settings, record, settings.local_max_jobs)
        if slot is None or record.cancel_requested():
            record.write_result(model.JobResult(model.CANCELLED, ended_at=time.time(),
                                                message="the job was cancelled while pending"))
            return proc.signal_status(signal.SIGTERM)
        node = os.uname().nodename
    else:
        from berth.jobs.slurm import SlurmOutput

        node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
        slot = None
        output = SlurmOutput(record, spec)
        try:
            output.take()
        except JobError as error:
            # Said in the record and on stderr, which is still Slurm's own file (`berth logs`).
            record.write_result(model.JobResult(model.FAILED, ended_at=time.time(), node=node,
                                                message=error.message))
            raise
    try:
        supervisor = Supervisor(settings, record, limit_resources=backend_name == "local",
                                enforce_time_limit=backend_name == "local", node=node)
        result = supervisor.run()
    finally:
        if slot is not None:
            slot.close()
        if backend_name == "local" and array_slot is not None:
            array_slot.close()
        if output is not None:
            output.carry()  # Slurm's words on a cancel or the time limit (*** JOB N ... CANCELLED ***)
    if result.state == model.COMPLETED:
        return 0
    if result.exit_code is not None:
        return result.exit_code
    if result.signal is not None:
        return proc.signal_status(result.signal)
    return 1


def read_log_tail(path: Path, offset: int) -> tuple[bytes, int]:
    """New bytes of ``path`` from ``offset`` (for ``berth logs -f``)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)

