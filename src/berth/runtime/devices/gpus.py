"""The GPU generator: the allocated GPUs and the host driver's files as container edits.

``--gpus all|N|device=LIST`` (LIST: indexes or UUIDs, comma-separated; a list with a comma or a
UUID needs no ``device=``) chooses among the GPUs *allocated* to the caller:

- inside a Slurm job or step, ``SLURM_STEP_GPUS`` else ``SLURM_JOB_GPUS`` (the host's GPU
  indexes); a Slurm job without them has no GPU;
- elsewhere, ``CUDA_VISIBLE_DEVICES`` (``ROCR_VISIBLE_DEVICES`` for AMD) when set, else every
  GPU of the node. Outside Slurm, GPUs are also taken through a per-user ledger (one flock per
  GPU, held for the container's life), so two of the caller's containers or local jobs never
  share one.

Indexes in LIST count within the allocation, as CUDA counts them in the job. Asking for more
than is allocated (or free) is an error that says so.

NVIDIA (/dev/nvidiaN; index N, the device minor — Slurm's gres.conf names files the same way):
the selected /dev/nvidiaN plus nvidiactl, nvidia-uvm, nvidia-uvm-tools and nvidia-modeset when
present; the site's driver libraries resolved through the host's ld.so cache and its driver
binaries, bind-mounted read-only under :data:`~berth.runtime.devices.edits.GPU_DIR` (``lib``,
``bin``), with ``LD_LIBRARY_PATH`` and ``PATH`` prepended — nothing is written into the image,
and the host driver's libraries win over any stub an image carries (they must match the
kernel module). ``CUDA_VISIBLE_DEVICES`` and ``NVIDIA_VISIBLE_DEVICES`` are renumbered 0..n-1:
CUDA inside sees only the selected nodes. AMD ROCm (/dev/kfd, /dev/dri/renderD128+i for GPU i):
kfd and the selected render nodes, ``ROCR_VISIBLE_DEVICES`` renumbered; ROCm's user space lives
in the image.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

from berth.config.settings import EnvOp
from berth.errors import ConfigError, PolicyError, UsageError
from berth.namedtuple import NamedTuple
from berth.runtime.devices.edits import GPU_DIR, ContainerEdits, DeviceNode, Mount

NVIDIA_CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
AMD_RENDER_BASE = 128
MAX_GPUS = 64
LEDGER_POLL_S = 0.25
_UUID = r"(GPU|MIG)-[A-Za-z0-9-]{1,80}"


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²', which int() refuses."""
    return text.isascii() and text.isdigit()


class Gpu(NamedTuple):
    vendor: str  # "nvidia" | "amd"
    index: int
    node: str  # container path, e.g. /dev/nvidia2 (the host's is under devices.dev_dir)
    uuid: str | None = None
    model: str | None = None
    bus: str | None = None


class GpuRequest(NamedTuple):
    """``all``; a count; or explicit indexes/UUIDs."""

    text: str
    count: int | None = None
    ids: tuple[str, ...] = ()

    @property
    def all(self) -> bool:
        return self.count is None and not self.ids


def parse_request(text: str, *, what: str = "--gpus") -> GpuRequest:
    """Parse ``all``, ``N``, ``device=LIST`` or ``A,B`` / ``GPU-UUID``. Raises UsageError."""
    value = text
    if value == "all":
        return GpuRequest(value)
    if _digits(value) and "," not in value:
        # (Thousands of digits: int() refuses past 4300 with a ValueError, a traceback.)
        count = int(value) if len(value) <= 6 else MAX_GPUS + 1
        if not 1 <= count <= MAX_GPUS:
            shown = text if len(text) <= 20 else text[:20] + "..."
            raise UsageError(f"{what} {shown}: ask for 1 to {MAX_GPUS} GPUs", hint="or --gpus all")
        return GpuRequest(value, count=count)
    listed = value.removeprefix("device=")
    ids = tuple(listed.split(",")) if listed else ()
    if not ids or not (listed != value or "," in value or all(re.fullmatch(_UUID, i) for i in ids)):
        raise UsageError(f"{what} {text!r} is not all, a count or a list of GPUs",
                         hint="for example --gpus all, --gpus 2, --gpus 0,1 or --gpus device=1 (one GPU by index)")
    for item in ids:
        if not (_digits(item) or re.fullmatch(_UUID, item)):
            raise UsageError(f"{what} {text[:100]!r}: {item[:100]!r} is neither a GPU index nor a GPU UUID")
        if _digits(item) and len(item) > 6:
            raise UsageError(f"{what}: the GPU index {item[:20]}... is past any node's GPUs (at most {MAX_GPUS})",
                             hint="indexes count within your allocation, from 0")
    if len(set(ids)) != len(ids):
        raise UsageError(f"{what} {text!r} names a GPU twice")
    return GpuRequest(value, ids=ids)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")[:65536]
    except OSError:
        return None


def driver_version(settings) -> str | None:
    """The NVIDIA kernel module's version (``/proc/driver/nvidia/version``), or None."""
    text = _read(Path(settings.devices.nvidia_proc_dir) / "version") or ""
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def nvidia_gpus(settings) -> list[Gpu]:
    """The node's NVIDIA GPUs: /dev/nvidiaN nodes, with model and UUID from the driver's
    /proc information files when present."""
    dev_dir = Path(settings.devices.dev_dir)
    try:
        names = os.listdir(dev_dir)
    except OSError:
        return []
    info: dict[int, dict[str, str]] = {}
    gpus_dir = Path(settings.devices.nvidia_proc_dir) / "gpus"
    try:
        buses = sorted(os.listdir(gpus_dir))
    except OSError:
        buses = []
    for bus in buses:
        fields = {}
        for line in (_read(gpus_dir / bus / "information") or "").splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if _digits(fields.get("Device Minor", "")):
            info[int(fields["Device Minor"])] = {**fields, "bus": bus}
    gpus = []
    for name in names:
        match = re.fullmatch(r"nvidia(\d{1,3})", name)
        if match:
            index = int(match.group(1))
            fields = info.get(index, {})
            gpus.append(Gpu("nvidia", index, f"/dev/{name}", fields.get("GPU UUID"), fields.get("Model"),
                            fields.get("bus")))
    return sorted(gpus)


def amd_gpus(settings) -> list[Gpu]:
    """The node's AMD GPUs when /dev/kfd exists: /dev/dri/renderD128+i is GPU i."""
    dev_dir = Path(settings.devices.dev_dir)
    if not os.path.exists(dev_dir / "kfd"):
        return []
    try:
        names = os.listdir(dev_dir / "dri")
    except OSError:
        return []
    gpus = []
    for name in names:
        match = re.fullmatch(r"renderD(\d{3})", name)
        if match and int(match.group(1)) >= AMD_RENDER_BASE:
            index = int(match.group(1)) - AMD_RENDER_BASE
            gpus.append(Gpu("amd", index, f"/dev/dri/{name}"))
    return sorted(gpus)


def node_gpus(settings) -> list[Gpu]:
    return nvidia_gpus(settings) or amd_gpus(settings)


def _id_list(text: str) -> list[str]:
    """``0,1``, ``0-2,5`` or UUIDs -> items; ``NoDevFiles``/``-1``/empty: none."""
    items: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part or part in ("NoDevFiles", "-1", "none"):
            continue
        match = re.fullmatch(r"([0-9]{1,6})-([0-9]{1,6})", part)
        if match and int(match.group(1)) <= int(match.group(2)) < int(match.group(1)) + MAX_GPUS:
            items += [str(i) for i in range(int(match.group(1)), int(match.group(2)) + 1)]
        else:
            items.append(part)
    return items


def _by_id(gpus: Sequence[Gpu], item: str, *, source: str) -> Gpu:
    for gpu in gpus:
        if item == str(gpu.index) or (gpu.uuid and item == gpu.uuid):
            return gpu
    raise UsageError(f"{source} names GPU {item}, which this node does not have "
                     f"(GPUs here: {', '.join(str(g.index) for g in gpus) or 'none'})",
                     hint="run `berth doctor` on this node to see its GPUs")


class Allocation(NamedTuple):
    gpus: tuple[Gpu, ...]
    source: str  # what decided: "SLURM_JOB_GPUS=0,1", "this node (no allocation)", ...
    ledger: bool  # outside a scheduler: take them through the per-user ledger


def allocation(gpus: Sequence[Gpu], environ: Mapping[str, str]) -> Allocation:
    """The GPUs allocated to the caller (module docstring), in allocation order."""
    vendor_variable = "ROCR_VISIBLE_DEVICES" if gpus and gpus[0].vendor == "amd" else "CUDA_VISIBLE_DEVICES"
    if environ.get("SLURM_JOB_ID"):
        for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
            if name in environ:
                source = f"{name}={environ[name]}"
                return Allocation(tuple(_by_id(gpus, i, source=source) for i in _id_list(environ[name])), source, False)
        return Allocation((), f"Slurm job {environ['SLURM_JOB_ID']} (no SLURM_JOB_GPUS: no GPU allocated)", False)
    if vendor_variable in environ:
        source = f"{vendor_variable}={environ[vendor_variable]}"
        return Allocation(tuple(_by_id(gpus, i, source=source) for i in _id_list(environ[vendor_variable])),
                          source, True)
    return Allocation(tuple(gpus), "every GPU of this node: no scheduler allocation", True)


def select(request: GpuRequest, allocated: Allocation, *, what: str | None = None) -> list[Gpu]:
    """The GPUs ``request`` asks for, from the allocation (the ledger then decides which of a
    count are free). Raises UsageError when it asks for more than is allocated."""
    what = what or f"--gpus {request.text}"
    gpus = list(allocated.gpus)
    if request.all:
        if not gpus:
            raise UsageError(f"{what}: no GPU is allocated to you here ({allocated.source})",
                             hint="ask the scheduler for GPUs (berth submit --gpus N, sbatch --gres=gpu:N)")
        return gpus
    if request.count is not None:
        if request.count > len(gpus):
            raise UsageError(f"{what}: only {len(gpus)} GPU(s) are allocated to you here "
                             f"({allocated.source})", hint=f"ask for at most {len(gpus)}, or ask the scheduler "
                             "for more (berth submit --gpus N, sbatch --gres=gpu:N)")
        return gpus
    chosen = []
    for item in request.ids:
        if _digits(item):
            if int(item) >= len(gpus):
                raise UsageError(f"{what}: index {item} is past the {len(gpus)} GPU(s) allocated "
                                 f"to you here ({allocated.source})",
                                 hint="indexes count within your allocation, from 0")
            chosen.append(gpus[int(item)])
        else:
            match = [g for g in gpus if g.uuid == item]
            if not match:
                raise UsageError(f"{what}: GPU {item} is not allocated to you here ({allocated.source})")
            chosen.append(match[0])
    return chosen


class Ledger:
    """The caller's GPUs in use on this node: one lock file per GPU under the state directory,
    held (flock) for the container's life, so the kernel frees a GPU however berth ends."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / "gpus"

    def _path(self, gpu: Gpu) -> Path:
        return self.directory / f"{gpu.vendor}{gpu.index}.lock"

    def take(self, stack: ExitStack, candidates: Sequence[Gpu], count: int, *, what: str,
             wait_s: float = 0.0, log=None) -> list[Gpu]:
        """Lock ``count`` of ``candidates`` (in order) for as long as ``stack`` lives. When
        fewer are free, retry for ``wait_s`` seconds (local jobs queue for their GPUs), then
        raise PolicyError."""
        import time

        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._take(stack, candidates, count, what=what)
            except PolicyError:
                if time.monotonic() >= deadline:
                    raise
                if log is not None:
                    log(f"{what}: waiting for GPUs that other berth containers of yours use")
                    log = None
                time.sleep(LEDGER_POLL_S)

    def _take(self, stack: ExitStack, candidates: Sequence[Gpu], count: int, *, what: str) -> list[Gpu]:
        from berth.fsutil import ensure_private_dir
        from berth.locks import file_lock

        ensure_private_dir(self.directory)
        taken: list[Gpu] = []
        busy: list[Gpu] = []
        held = ExitStack()
        for gpu in candidates:
            if len(taken) == count:
                break
            lock = ExitStack()
            if lock.enter_context(file_lock(self._path(gpu), timeout_s=0)):
                held.push(lock.pop_all())
                taken.append(gpu)
            else:
                lock.close()
                busy.append(gpu)
        if len(taken) == count:
            stack.push(held.pop_all())
        else:
            held.close()
            raise PolicyError(f"{what}: GPU(s) {', '.join(str(g.index) for g in busy)} are in use by another of "
                              f"your berth containers on this node ({len(taken)} of {count} free)",
                              hint="wait for it to end, or ask for fewer GPUs")
        return taken

    def busy(self, gpus: Sequence[Gpu]) -> list[Gpu]:
        from berth.locks import locked

        return [gpu for gpu, held in zip(gpus, locked([self._path(gpu) for gpu in gpus])) if held]


def driver_files(settings) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(libraries, binaries, notes): (name, host path) of the site's driver libraries found in
    the ld.so cache and of its driver binaries found in ``devices.bin_dirs``."""
    from berth.runtime.devices import ldcache

    notes = []
    try:
        libraries = ldcache.find(ldcache.read(settings.devices.ld_cache), settings.devices.gpu_libraries)
    except ConfigError as exc:
        libraries = []
        notes.append(exc.message)
    binaries = []
    for name in settings.devices.gpu_binaries:
        for directory in settings.devices.bin_dirs:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                binaries.append((name, path))
                break
    return libraries, binaries, notes


def nvidia_edits(settings, selected: Sequence[Gpu], *, what: str) -> tuple[ContainerEdits, list[str]]:
    """The edits for NVIDIA GPUs ``selected`` (module docstring) and notes for the user."""
    dev_dir = Path(settings.devices.dev_dir)
    nodes = [DeviceNode(gpu.node) for gpu in selected]
    nodes += [DeviceNode(f"/dev/{name}") for name in NVIDIA_CONTROL_NODES if os.path.exists(dev_dir / name)]
    libraries, binaries, notes = driver_files(settings)
    if not any(name == "libcuda.so.1" for name, _ in libraries):
        notes.append(f"libcuda.so.1 is not in the ld.so cache {settings.devices.ld_cache}: CUDA programs "
                     "will not find the driver (is the NVIDIA driver installed on this node?)")
    mounts = [Mount(path, f"{GPU_DIR}/lib/{name}") for name, path in libraries]
    mounts += [Mount(path, f"{GPU_DIR}/bin/{name}") for name, path in binaries]
    visible = ",".join(str(i) for i in range(len(selected)))
    env = [EnvOp("set", "CUDA_VISIBLE_DEVICES", visible), EnvOp("set", "NVIDIA_VISIBLE_DEVICES", visible)]
    if libraries:
        env.append(EnvOp("prepend", "LD_LIBRARY_PATH", f"{GPU_DIR}/lib"))
    if binaries:
        env.append(EnvOp("prepend", "PATH", f"{GPU_DIR}/bin"))
    return ContainerEdits(what, tuple(nodes), tuple(mounts), tuple(env)), notes


def amd_edits(settings, selected: Sequence[Gpu], *, what: str) -> ContainerEdits:
    del settings
    nodes = [DeviceNode("/dev/kfd"), *(DeviceNode(gpu.node) for gpu in selected)]
    visible = ",".join(str(i) for i in range(len(selected)))
    return ContainerEdits(what, tuple(nodes), env=(EnvOp("set", "ROCR_VISIBLE_DEVICES", visible),))


def gpu_edits(settings, text: str, environ: Mapping[str, str], stack: ExitStack, *,
              what: str | None = None, wait_s: float = 0.0, log=None) -> tuple[ContainerEdits, list[str]]:
    """Everything ``--gpus TEXT`` gives a container: select from the allocation, take the GPUs
    through the ledger when no scheduler allocated them (held until ``stack`` closes; waiting
    up to ``wait_s`` for busy ones), and generate the edits. Returns (edits, notes). Raises
    UsageError or PolicyError."""
    what = what or f"--gpus {text}"
    request = parse_request(text)
    gpus = node_gpus(settings)
    if not gpus:
        raise UsageError(f"{what}: this node has no GPU (no /dev/nvidiaN, no /dev/kfd with render nodes under "
                         f"{settings.devices.dev_dir})", hint="run it on a GPU node; `berth doctor` tells why a GPU is not seen")
    allocated = allocation(gpus, environ)
    selected = select(request, allocated, what=what)
    if allocated.ledger:
        count = request.count if request.count is not None else len(selected)
        from berth.runtime.state import resolve_state_dir

        selected = Ledger(resolve_state_dir(settings)).take(stack, selected, count, what=what, wait_s=wait_s, log=log)
    elif request.count is not None:
        selected = selected[:request.count]
    selected = sorted(selected)
    if selected[0].vendor == "amd":
        return amd_edits(settings, selected, what=what), []
    return nvidia_edits(settings, selected, what=what)
