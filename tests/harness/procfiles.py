"""What a process has open, from /proc: for tests that must wait until a berth process writes
a file they cannot see by name (staging's unnamed temporary files, O_TMPFILE)."""

from __future__ import annotations

import os


def bytes_written_in(pid: int, directory: os.PathLike | str) -> int | None:
    """The size of the largest file process ``pid`` has open in ``directory`` (named or not:
    an unnamed one reads ``DIRECTORY/#INODE (deleted)``), None when it has none open there."""
    prefix = f"{os.fspath(directory)}/"
    sizes = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                sizes.append(os.stat(f"/proc/{pid}/fd/{fd}").st_size)
        except OSError:
            continue
    return max(sizes) if sizes else None
