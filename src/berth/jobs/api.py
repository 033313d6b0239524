"""What the CLI calls: submit, status, cancel, list, logs, and the job runner entry point.

Submission validates everything before anything is written where a scheduler could see it:
options (command line over ``#BERTH`` directives), the script (exists, readable, ``#!``), the
template and its limits, the image (present in a store, or pullable when named with --image),
site policy for the container options, and the backend's own checks. A failure at any point
removes the half-made record, so a rejected submission leaves nothing behind.
"""

from __future__ import annotations

import getpass
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from berth import proc
from berth.config.settings import Settings
from berth.errors import BerthError, JobError, NotFound, PolicyError, UsageError
from berth.jobs import model, options as opts
from berth.jobs.backend import BACKENDS, get_backend
from berth.jobs.model import JobSpec, JobStatus, Resources
from berth.jobs.records import (JobRecord, create_record, find_record, list_records, make_private_dir,
                                 remove_record)

#: Largest script berth snapshots (a job script, not a data file).
MAX_SCRIPT_BYTES = 4 << 20


@dataclass(frozen=True)
class SubmitRequest:
    """What the user typed: raw option strings by key (see ``options.SUBMIT_OPTIONS``)."""

    script: str
    args: tuple[str, ...] = ()
    values: dict = field(default_factory=dict)
    workdir: str | None = None


@dataclass(frozen=True)
class Submitted:
    spec: JobSpec
    native_id: str | None
    notes: tuple[str, ...]


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
        count = opts.positive_int(values["gpus"], "--gpus", opts.MAX_GPUS)
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


def apply_template(resources: Resources, template) -> Resources:
    """The template's resources become the request unless the user asks for less; asking
    for more is a PolicyError naming the resource and the template's limit."""
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
    return replace(
        resources,
        cpus_per_task=cpus if cpus is not None else template.cpu,
        memory_bytes=memory if memory is not None else template.memsz_bytes,
        gpus=gpus if gpus is not None else (template.gpu or None),
    )


def _expand_path(pattern: str, spec_id: str, name: str, workdir: str) -> str:
    text = pattern.replace("%j", spec_id).replace("%x", name).replace("%u", getpass.getuser())
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else Path(workdir) / path)


def _check_output(path: str, option: str) -> None:
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: the directory {parent} does not exist")
    target = path if os.path.exists(path) else parent
    if not os.access(target, os.W_OK):
        raise UsageError(f"{option} {path}: not writable by you", hint="choose a file in a directory you can write")


def submit(settings: Settings, request: SubmitRequest) -> Submitted:
    """Validate and submit a job. Raises UsageError, PolicyError, NotFound or JobError; on any
    error nothing stays submitted or recorded."""
    script_path, text = read_script(request.script)
    directives = opts.read_directives(script_path, text)
    values = {**directives, **{k: v for k, v in request.values.items() if v is not None and v is not False}}
    if values.get("template") and values.get("image"):
        given = [key for key in ("template", "image") if request.values.get(key)]
        if len(given) != 1:  # both on the command line, or both in directives
            raise UsageError("--template and --image exclude each other: a template names its image")
        # One from a directive, one from the command line: the command line wins.
        values.pop("image" if given == ["template"] else "template")
    backend_name = values.get("backend") or settings.backend
    if backend_name not in BACKENDS:
        raise UsageError(f"--backend '{backend_name}': unknown backend", hint=f"use one of: {', '.join(BACKENDS)}")
    resources = build_resources(values)
    name = opts.check_name(values["job_name"], "--job-name") if values.get("job_name") else _default_name(script_path)
    workdir = os.path.realpath(request.workdir or os.getcwd())

    template = None
    boot_s, stop_s, custom = model.DEFAULT_BOOT_TIMEOUT_S, model.DEFAULT_STOP_TIMEOUT_S, ""
    if values.get("template"):
        from berth.config.templates import load_template

        template = load_template(settings, values["template"])
        resources = apply_template(resources, template)
        image = template.pinned_reference
        boot_s, stop_s, custom = template.boot_timeout_s, template.stop_timeout_s, template.custom
    elif values.get("image"):
        image = values["image"]
    else:
        raise UsageError("no image for the job: give --template NAME or --image REF "
                         "(or a #BERTH --template line in the script)",
                         hint="`berth template list` shows the site's templates")
    _check_image(settings, image, template)
    staging = _staging_request(settings, values)

    backend = get_backend(settings, backend_name)
    record = create_record(settings)
    try:
        output = _expand_path(values["output"], record.id, name, workdir) if values.get("output") \
            else str(record.default_output)
        error = _expand_path(values["error"], record.id, name, workdir) if values.get("error") else None
        for path, option in ((output, "--output"), (error, "--error")):
            if path is not None:
                _check_output(path, option)
        make_private_dir(record.container_dir)
        shutil.copyfile(script_path, record.script)
        os.chmod(record.script, 0o700)
        spec = JobSpec(
            id=record.id, backend=backend_name, name=name, script=str(record.script),
            script_source=str(script_path), args=tuple(request.args), workdir=workdir, image=image,
            template=template.name if template else None, resources=resources, output=output, error=error,
            boot_timeout_s=boot_s, stop_timeout_s=stop_s, custom=custom, user=getpass.getuser(),
            submitted_at=time.time(), **staging,
        )
        _check_container_options(settings, spec, record)
        notes = list(backend.check(spec))
        from berth.runtime.policy import root_warning

        warning = root_warning(os.getuid(), os.environ)
        if warning:
            notes.append(warning)
        record.write_spec(spec)
        native_id = backend.submit(record, spec)
        if native_id is not None:
            record.write_native_id(native_id)
    except BaseException:
        remove_record(record)
        raise
    return Submitted(spec, native_id, tuple(notes))


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
    return get_backend(settings, spec.backend).status(record, spec)


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
            found.extend(get_backend(settings, name).statuses(items))
        except BerthError as error:
            if warnings is not None:
                warnings.append(f"{name} jobs show their last recorded state: {error.message}")
            for record, spec in items:
                result = record.read_result() or model.JobResult(model.PENDING)
                found.append(JobStatus(spec, result, record.read_native_id(), "unknown"))
    return sorted(found, key=lambda s: int(s.spec.id))


def cancel(settings: Settings, job_id: str) -> JobStatus:
    record = find_record(settings, job_id)
    spec = record.read_spec()
    backend = get_backend(settings, spec.backend)
    backend.cancel(record, spec)
    return backend.status(record, spec)


def log_paths(spec: JobSpec) -> tuple[Path, Path | None]:
    return Path(spec.output), Path(spec.error) if spec.error else None


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
    if backend_name == "local":
        import signal

        from berth.jobs.local import acquire_slot

        signal.signal(signal.SIGTERM, lambda *_: record.request_cancel())
        slot = acquire_slot(settings, record, settings.local_max_jobs)
        if slot is None or record.cancel_requested():
            record.write_result(model.JobResult(model.CANCELLED, ended_at=time.time(),
                                                message="the job was cancelled while pending"))
            return proc.signal_status(signal.SIGTERM)
        node = os.uname().nodename
    else:
        node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
        slot = None
    try:
        supervisor = Supervisor(settings, record, limit_resources=backend_name == "local",
                                enforce_time_limit=backend_name == "local", node=node)
        result = supervisor.run()
    finally:
        if slot is not None:
            slot.close()
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

