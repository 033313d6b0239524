"""`berth exec` and `berth ps`: the caller's running containers on this node."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from berth import proc
from berth.errors import RuntimeFailure
from berth.fsutil import PRIVATE_FILE, write_atomically
from berth.runtime import ocirt, spec, state
from berth.runtime.options import check_env_entry
from berth.untrusted import parse_json


def list_running(settings, *, warn=None) -> list[dict]:
    """The caller's live containers: id, name, image, command, started (epoch s), pid, status.
    The stale clean-up before it tells ``warn`` of a mount it could not unmount.

    ``pid`` is the container's init as the runtime reports it (None while it starts).
    """
    state_dir = state.resolve_state_dir(settings)
    state.cleanup_stale(state_dir, warn=warn)
    records = []
    for info in state.list_containers(state_dir):
        pid, status = None, "starting"
        runtime = ocirt.recorded_program(info["runtime"])
        root = Path(info["state_path"]) / "runc"
        if runtime is not None and (root / info["id"]).exists():
            result = proc.run([runtime, "--root", str(root), "state", info["id"]], check=False, timeout=10)
            if result.returncode == 0:
                try:
                    data = parse_json(result.stdout, what="runc state")
                    pid, status = data.get("pid"), data.get("status", "unknown")
                except ValueError:
                    pass
        records.append({
            "id": info["id"], "name": info.get("name"), "image": info.get("image"),
            "command": info.get("command", []), "started": info.get("started"), "pid": pid,
            "status": status, "berth_pid": info.get("pid"),
        })
    return records


def exec_in_container(settings, key: str, command: list[str], *, tty: bool = False,
                      env: tuple[str, ...] = (), workdir: str | None = None, pmi_fd: int | None = None) -> int:
    """Run ``command`` in the running container ``key`` (name or id) as the same identity.

    Joins the container's namespaces through the runtime's ``exec`` with berth-init in front,
    so the command gets the caller's uid/gid exactly as the container's main process did.
    ``pmi_fd``: Slurm's PMI socket of the task, passed in as fd 3 (berth.runtime.pmix).
    Returns the shell-style status; raises NotFound, RuntimeFailure.
    """
    if not command:
        raise RuntimeFailure("berth exec needs a command to run")
    for entry in env:
        check_env_entry(entry, what="-e")
    info = state.find_container(state.resolve_state_dir(settings), key)
    runtime = ocirt.recorded_program(info["runtime"])  # never a program info.json names by path
    root = Path(info["state_path"]) / "runc"
    if runtime is None or not (root / info["id"]).exists():
        raise RuntimeFailure(f"container {key} is not running yet (or is stopping)", hint="try again in a moment")
    env = tuple(entry if "=" in entry else f"{entry}={os.environ.get(entry, '')}" for entry in env)
    argv = [runtime, "--root", str(root), "exec"]
    if pmi_fd is not None:
        argv += ["--preserve-fds", "1"]
    process_file = _data_limited_process(info, runtime, command, tty=tty, env=env, workdir=workdir)
    if process_file is not None:
        argv += ["--process", str(process_file), info["id"]]
    else:
        if tty:
            argv.append("--tty")
        if workdir:
            argv += ["--cwd", workdir]
        for entry in env:
            argv += ["--env", entry]
        argv.append(info["id"])
        argv += list(spec.process_args(info["uid"], info["gid"], command, remap_root=info["remap_root"]))
    # The runtime forwards the signals it receives to the exec'd process: pass ours on to it
    # (it runs in its own session, so a terminal's Ctrl-C reaches it only through us).
    try:
        child = proc.start(argv, stdin=None, new_session=True,
                           move_fds={3: pmi_fd} if pmi_fd is not None else None)
        return proc.wait_forwarding(child)
    finally:
        if process_file is not None:
            process_file.unlink(missing_ok=True)


def _data_limited_process(info: dict, runtime: str, command: list[str], *, tty: bool, env: tuple[str, ...],
                          workdir: str | None) -> Path | None:
    """runc applies the process's rlimits to its own Go init before that execs the command, and a
    data limit (``--memory`` without cgroup delegation) of tens of MiB kills it there
    ("pthread_create failed"). For such a container, write the exec'd process for
    ``runc exec --process`` without RLIMIT_DATA, and let berth-init set it (-d) for the command
    alone, as berth-launcher does for run and exec alike. None: plain flags will do."""
    if os.path.basename(runtime) == "berth-launcher":
        return None
    state_path = Path(info["state_path"])
    try:
        process = parse_json((state_path / "bundle" / "config.json").read_bytes(),
                             what="the container's config.json")["process"]
    except (OSError, KeyError, TypeError):
        return None
    rlimits = process.get("rlimits") or []
    data = [limit for limit in rlimits if limit.get("type") == "RLIMIT_DATA"]
    if not data:
        return None
    process = {**process, "terminal": tty, "env": [*process.get("env", []), *env],
               "rlimits": [limit for limit in rlimits if limit.get("type") != "RLIMIT_DATA"],
               "args": list(spec.process_args(info["uid"], info["gid"], command, remap_root=info["remap_root"],
                                              data_limit=int(data[0]["hard"])))}
    if workdir:
        process["cwd"] = workdir
    path = state_path / f"exec-{os.getpid()}.json"
    write_atomically(path, json.dumps(process), mode=PRIVATE_FILE)
    return path


def format_started(epoch_s: float | None) -> str:
    if not epoch_s:
        return ""
    age = max(0, time.time() - epoch_s)
    if age < 120:
        return f"{age:.0f} s ago"
    if age < 7200:
        return f"{age / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch_s))

