"""The pull progress display: per-layer lines with bytes and rate, a total, redrawn in place
on a terminal; one plain line per finished layer otherwise."""

from __future__ import annotations

import io
import threading

from berth.cli.progress import TerminalProgress
from berth.oci.digest import Digest

LAYER = Digest.of(b"layer")
CONFIG = Digest.of(b"config")


def test_plain_stream_gets_one_line_per_event():
    out = io.StringIO()
    progress = TerminalProgress(out, tty=False)
    progress.resolved("example.org/app:1", Digest.of(b"m"), 1, 3 << 20)
    progress.blob_done(CONFIG, 100, True)
    progress.blob_started(LAYER, 3 << 20, 0)
    progress.blob_bytes(LAYER, 1 << 20)
    progress.blob_restarted(LAYER, "connection lost; resuming at byte 1048576")
    progress.blob_done(LAYER, 3 << 20, False)
    progress.phase("converting to squashfs")
    assert out.getvalue().splitlines() == [
        f"example.org/app:1 ({Digest.of(b'm').short}): 1 layers, 3.0 MiB",
        f"  {CONFIG.short}: already stored (100 B)",
        f"  {LAYER.short}: connection lost; resuming at byte 1048576",
        f"  {LAYER.short}: done (3.0 MiB)",
        "example.org/app:1: converting to squashfs",
    ]
    assert "\x1b" not in out.getvalue()


def test_terminal_redraws_layers_and_total_in_place():
    out = io.StringIO()
    progress = TerminalProgress(out, tty=True)
    progress.resolved("example.org/app:1", Digest.of(b"m"), 1, 2 << 20)
    progress.blob_started(LAYER, 2 << 20, 0)
    progress.blob_bytes(LAYER, 1 << 20)
    progress.blob_done(LAYER, 2 << 20, False)
    text = out.getvalue()
    last = text.rsplit("\x1b[2F", 1)[-1]  # the final redraw moves up over the 2 lines drawn
    lines = [line.removeprefix("\x1b[2K") for line in last.splitlines()]
    assert lines[0].split()[:5] == [LAYER.short, "done", "2.0", "MiB", "/"]
    assert lines[1].startswith("total  2.0 MiB / 2.0 MiB")
    assert lines[1].split()[7].endswith("/s")  # a rate, whatever its unit


def test_events_from_many_threads_are_counted_exactly():
    out = io.StringIO()
    progress = TerminalProgress(out, tty=True)
    progress.resolved("r", Digest.of(b"m"), 1, 8 * 1000)
    progress.blob_started(LAYER, 8 * 1000, 0)
    threads = [threading.Thread(target=lambda: [progress.blob_bytes(LAYER, 1) for _ in range(1000)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert progress.blobs[LAYER].done_bytes == 8000
