#!/usr/bin/python3 -SI
"""Run a command and print the CPU time of its whole process tree: ``treecpu USER_S SYS_S WALL_S``.

This process makes itself the child subreaper (prctl PR_SET_CHILD_SUBREAPER), so every
descendant that its parent does not wait for — a detached FUSE daemon, a double-forked helper —
is reparented here and reaped here, and its CPU time lands in ``RUSAGE_CHILDREN`` with the
rest. The benchmarks (jobs_start.py, store_ops.py) run it on every node of a step around
``berth run`` and around a bare command: the difference is berth's CPU per node, which does not
depend on how many "nodes" share this machine's cores. The wrapper's own start-up is not counted.

Usage: ``treecpu.py COMMAND [ARG...]``; exits with the command's status. Standard library only,
no site packages (-SI): it runs as the unprivileged user inside Slurm steps.
"""

import ctypes
import os
import resource
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
ORPHANS_S = 10.0


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: treecpu.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"treecpu: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(sys.argv[1], sys.argv[1:])
        finally:
            os._exit(127)
    status = 0
    _, raw = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(raw)
    wall = time.perf_counter() - start
    # then every orphan of its tree (a FUSE daemon ends once its mount is gone); one still
    # running after ORPHANS_S is named and left alone, its CPU not counted
    deadline = time.monotonic() + ORPHANS_S
    while True:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if done == 0:
            if time.monotonic() > deadline:
                print("treecpu: a process of the tree is still running; its CPU is not counted", file=sys.stderr)
                break
            time.sleep(0.01)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"treecpu {usage.ru_utime:.4f} {usage.ru_stime:.4f} {wall:.4f}", flush=True)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
