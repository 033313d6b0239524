"""Job records: one directory per job under ``settings.jobs_dir``. The only place that computes
their paths.

::

    JOBS_DIR/
      7/                    one job (berth's own id; the scheduler's id is in native_id)
        spec.json           the JobSpec, written once at submission
        state.json          the JobResult, rewritten atomically by the job runner
        native_id           the scheduler's id (Slurm job id), written after submission
        runner.pid          the local job runner's pid (local backend)
        ctr/                all the job's container sees of the record, mounted at JOBS_DIR:
          script            the snapshot of the job script that runs (mode 0700)
          bin/, agent/      the step shims and their requests (berth.jobs.agent)
          started           created inside the container just before the script starts
        cancel              exists once `berth cancel` asked for the job to stop
        stdout, stderr      default output files
        slurm.out           Slurm's own output for the job (berth.jobs.slurm.SlurmOutput); an
        slurm-TASK.out      array's, one per task, are in its first task's record
        slurm*.out.carried  how much of it berth job-exec carried into the job's error file
      .slots/N.lock         flock files: the local backend's concurrency limit

Every write is atomic (temporary file in the same directory, fsync, ``os.replace``) so that a
reader never sees half a state file, and ids are allocated with ``mkdir`` (atomic on every
filesystem, NFS included) so two submissions never share one.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from berth.config.settings import Settings
from berth.errors import JobError, NotFound
from berth.fsutil import PRIVATE_FILE, ensure_private_dir, write_atomically
from berth.jobs.model import PHASE_STAGE_OUT, RUNNING, STAGING, JobResult, JobSpec
from berth.record import Record, replace
from berth.untrusted import parse_json

_MAX_ID_TRIES = 1000


class JobRecord(Record):
    """The record directory of one job."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.json"

    @property
    def container_dir(self) -> Path:
        """What the job's container sees of the record, mounted over the whole jobs directory
        (so that it sees neither the other jobs nor its own spec and state)."""
        return self.path / "ctr"

    @property
    def script(self) -> Path:
        return self.container_dir / "script"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def native_id_file(self) -> Path:
        return self.path / "native_id"

    @property
    def pid_file(self) -> Path:
        return self.path / "runner.pid"

    @property
    def started_file(self) -> Path:
        return self.container_dir / "started"

    @property
    def credential_files(self) -> tuple[Path, Path]:
        """``--s3-credentials-in-container``: the AWS credentials and config files, in the part of
        the record the container sees (the record directory is 0700: no other user reaches them)."""
        return self.container_dir / "s3-credentials", self.container_dir / "s3-config"

    def remove_credentials(self) -> None:
        """Remove the job's credential files: by its runner after the container, and by the
        status that finds the job ended (a runner killed with SIGKILL, or with its node, never
        removed them; secrets must not outlive the job)."""
        for path in self.credential_files:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a record being removed meanwhile; the next status tries again
                pass

    @property
    def cancel_file(self) -> Path:
        return self.path / "cancel"

    @property
    def default_output(self) -> Path:
        return self.path / "stdout"

    def scheduler_output(self, task: int | str | None = None) -> Path:
        """The file Slurm writes its own output to (berth.jobs.slurm.SlurmOutput): a plain
        job's ``slurm.out``; in an array's first record, task ``TASK``'s ``slurm-TASK.out``
        (``task="%a"``: sbatch's pattern for all of them)."""
        return self.path / ("slurm.out" if task is None else f"slurm-{task}.out")

    def read_spec(self) -> JobSpec:
        try:
            return JobSpec.from_dict(parse_json(self.spec_file.read_bytes(), what="spec.json"))
        except FileNotFoundError:
            raise NotFound(f"job {self.id} has no record (its spec.json is missing)") from None
        except (ValueError, TypeError) as exc:
            raise JobError(f"job {self.id}: its record {self.spec_file} is damaged ({exc})") from None

    def write_spec(self, spec: JobSpec) -> None:
        atomic_write(self.spec_file, json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")

    def read_result(self) -> JobResult | None:
        """The runner's last recorded result; ``running`` as soon as the script has started.

        The job's wrapper touches :attr:`started_file` just before it execs the script, and the
        runner records ``running`` only when it next looks (every 0.1 s, later on a loaded node):
        a reader in between would otherwise see ``staging`` for a script that already runs.
        """
        try:
            result = JobResult.from_dict(parse_json(self.state_file.read_bytes(), what="state.json"))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            # Atomic writes make this impossible unless someone edited the file by hand.
            return None
        if result.state == STAGING and result.phase != PHASE_STAGE_OUT and self.started_file.exists():
            result = replace(result, state=RUNNING)
        return result

    def write_result(self, result: JobResult) -> None:
        atomic_write(self.state_file, json.dumps(result.to_dict(), sort_keys=True) + "\n")

    def read_native_id(self) -> str | None:
        try:
            return self.native_id_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def write_native_id(self, native_id: str) -> None:
        atomic_write(self.native_id_file, native_id + "\n")

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def cancel_requested(self) -> bool:
        return self.cancel_file.exists()

    def request_cancel(self) -> None:
        atomic_write(self.cancel_file, "cancel\n")


def atomic_write(path: Path, text: str, mode: int = PRIVATE_FILE) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix
    (berth.fsutil). Containers may see parts of the jobs directory, so a hostile one may plant
    symbolic links in it: a linked directory is refused (JobError), a link planted as the
    entry is replaced, never followed."""
    try:
        write_atomically(path, text, mode=mode, nofollow_dir=True)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise JobError(f"{path.parent} is not a plain directory ({exc.strerror}): refusing to write into it",
                           hint="something replaced part of your jobs directory; remove it and resubmit") from None
        raise


def make_private_dir(path: Path) -> None:
    """``mkdir -m 700 path`` that accepts an existing real directory of ours and replaces a
    planted symbolic link or file (never following it)."""
    try:
        path.mkdir(mode=0o700)
        return
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
        return
    os.unlink(path)  # a link or a file: removing the name leaves its target alone
    path.mkdir(mode=0o700)


def open_regular_nofollow(path: Path, flags: int, mode: int = 0o600, *, replace_planted: bool = True) -> int:
    """Open ``path`` (create if ``flags`` has O_CREAT) refusing symbolic links, FIFOs, devices,
    hard links and other users' files, without ever blocking (a FIFO is opened non-blocking).
    Never truncates.

    ``replace_planted``: in a directory of yours, a planted name is removed and the file created
    afresh; where the name is not yours to remove (a job's output file in a shared directory),
    False refuses it: OSError with errno ELOOP (a symbolic link), EPERM (another user's file or
    a hard link), ENODEV (not a regular file: FIFO, device, socket) or EISDIR.
    """
    flags = (flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC) & ~os.O_TRUNC
    for _ in range(3):
        try:
            fd = os.open(path, flags, mode)
        except OSError as exc:
            if not replace_planted:
                # A link in a sticky directory gives EACCES with O_CREAT, a FIFO ENXIO: say
                # what is there rather than the errno (a file of ours: a real permission problem).
                try:
                    info = os.lstat(path)
                except OSError:
                    raise exc from None
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and info.st_nlink == 1:
                    raise
                raise _planted_error(path, info) from None
            if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise
        else:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == os.getuid():
                os.set_blocking(fd, True)
                return fd
            os.close(fd)
            if not replace_planted:
                raise _planted_error(path, info)
        if os.path.isdir(path) and not os.path.islink(path):
            raise OSError(errno.EISDIR, "is a directory", str(path))
        os.unlink(path)
    raise OSError(errno.EEXIST, "keeps being replaced", str(path))


def _planted_error(path: Path, info: os.stat_result) -> OSError:
    if stat.S_ISLNK(info.st_mode):
        return OSError(errno.ELOOP, "is a symbolic link", str(path))
    if stat.S_ISDIR(info.st_mode):
        return OSError(errno.EISDIR, "is a directory", str(path))
    if not stat.S_ISREG(info.st_mode):
        return OSError(errno.ENODEV, "is not a regular file (a FIFO, socket or device)", str(path))
    if info.st_uid != os.getuid():
        return OSError(errno.EPERM, f"belongs to another user (uid {info.st_uid})", str(path))
    return OSError(errno.EPERM, "has other hard links", str(path))


def jobs_dir(settings: Settings) -> Path:
    return Path(os.path.expanduser(str(settings.jobs_dir)))


def create_record(settings: Settings) -> JobRecord:
    """Allocate the next job id by creating its directory (mode 0700). Raises JobError."""
    root = jobs_dir(settings)
    try:
        ensure_private_dir(root)  # and the parents berth creates (~/.local/state): issue 12
    except OSError as exc:
        raise JobError(f"cannot create the jobs directory {root}: {exc.strerror}",
                       hint="check jobs_dir in `berth config show` (BERTH_JOBS_DIR moves it)") from None
    next_id = max((int(p.name) for p in _record_dirs(root)), default=0) + 1
    for candidate in range(next_id, next_id + _MAX_ID_TRIES):
        path = root / str(candidate)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            raise JobError(f"cannot create the job record {path}: {exc.strerror}") from None
        return JobRecord(path)
    raise JobError(f"could not allocate a job id in {root} after {_MAX_ID_TRIES} tries")


def remove_record(record: JobRecord) -> None:
    """Delete a record (a submission that failed: nothing half-written stays)."""
    import shutil

    shutil.rmtree(record.path, ignore_errors=True)


def _record_dirs(root: Path) -> list[Path]:
    try:
        # ASCII digits only: str.isdigit() takes '²', on which int() raises.
        return [p for p in root.iterdir() if p.name.isascii() and p.name.isdigit() and p.is_dir()]
    except FileNotFoundError:
        return []


def find_record(settings: Settings, job_id: str) -> JobRecord:
    """The record of ``job_id`` (berth's id, or a scheduler id recorded as native_id).

    Raises NotFound with the list command as a hint.
    """
    root = jobs_dir(settings)
    text = str(job_id).strip()
    if text.isdigit() and (root / text / "spec.json").exists():
        return JobRecord(root / text)
    array_id, _, task = text.partition("_")
    for record in list_records(settings):
        if record.read_native_id() == text:
            return record
        if task and array_id.isdigit() and task.isdigit() and int(record.id) >= int(array_id):
            try:
                spec = record.read_spec()
            except (NotFound, JobError):
                continue
            if spec.array_job_id == array_id and spec.array_task_id == int(task):
                return record
    raise NotFound(f"no job '{job_id}' among your jobs in {root}", hint="`berth jobs` lists them")


def list_records(settings: Settings) -> list[JobRecord]:
    """Every complete record (one with a spec), in id order."""
    root = jobs_dir(settings)
    records = [JobRecord(p) for p in _record_dirs(root) if (p / "spec.json").exists()]
    return sorted(records, key=lambda r: int(r.id))


def slots_dir(settings: Settings) -> Path:
    return jobs_dir(settings) / ".slots"
