"""Pull progress for people: per-layer bytes and rate plus a total, redrawn on a terminal,
one line per finished layer otherwise. Written to stderr so stdout stays for results."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from berth.config.units import human_size
from berth.image.progress import PullProgress
from berth.oci.digest import Digest

_REDRAW_INTERVAL_S = 0.1


class _Blob:
    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.done_bytes = 0
        self.started = time.monotonic()
        self.state = "waiting"


class TerminalProgress(PullProgress):
    """Thread-safe renderer; ``tty`` selects in-place redraw (ANSI) or plain log lines."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.lock = threading.Lock()
        self.blobs: dict[Digest, _Blob] = {}
        self.reference = ""
        self.total_bytes = 0
        self.started = time.monotonic()
        self.lines_drawn = 0
        self.last_draw = 0.0
        #: Set once the block is final (a phase line follows it): no more redraws.
        self.frozen = False

    def resolved(self, reference, manifest_digest, layer_count, total_bytes) -> None:
        with self.lock:
            self.reference = reference
            self.total_bytes = total_bytes
            self.started = time.monotonic()
            if not self.tty:
                self._line(f"{reference} ({manifest_digest.short}): {layer_count} layers, "
                           f"{human_size(total_bytes)}")

    def blob_started(self, digest, size_bytes, offset) -> None:
        with self.lock:
            blob = self.blobs.setdefault(digest, _Blob(size_bytes))
            blob.state = "downloading" if offset == 0 else f"resuming at {human_size(offset)}"
            blob.done_bytes = offset
            self._draw()

    def blob_bytes(self, digest, count) -> None:
        with self.lock:
            blob = self.blobs.setdefault(digest, _Blob(0))
            blob.done_bytes += count
            self._draw()

    def blob_restarted(self, digest, reason) -> None:
        with self.lock:
            blob = self.blobs.setdefault(digest, _Blob(0))
            blob.state = "retrying"
            if not self.tty:
                self._line(f"  {digest.short}: {reason}")
            self._draw(force=True)

    def blob_done(self, digest, size_bytes, cached) -> None:
        with self.lock:
            blob = self.blobs.setdefault(digest, _Blob(size_bytes))
            blob.size_bytes = size_bytes
            blob.done_bytes = size_bytes
            blob.state = "already stored" if cached else "done"
            if not self.tty:
                self._line(f"  {digest.short}: {blob.state} ({human_size(size_bytes)})")
            self._draw(force=True)

    def phase(self, text) -> None:
        with self.lock:
            if self.tty:
                self._draw(force=True)
                # The byte counts are final: leave them on screen, below them the phase.
                self.frozen = True
                self._line(f"{text}...")
            else:
                self._line(f"{self.reference or 'image'}: {text}")

    def finish(self) -> None:
        with self.lock:
            self._draw(force=True)
            self.frozen = True

    # -- drawing (caller holds the lock) ------------------------------------------------------

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.tty or self.frozen or not self.blobs:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < _REDRAW_INTERVAL_S:
            return
        self.last_draw = now
        lines = []
        for digest, blob in self.blobs.items():
            elapsed = max(now - blob.started, 1e-3)
            rate = "" if blob.state in ("done", "already stored") else f"  {human_size(blob.done_bytes / elapsed)}/s"
            lines.append(f"{digest.short}  {blob.state:<14} {human_size(blob.done_bytes):>10} / "
                         f"{human_size(blob.size_bytes):<10}{rate}")
        done = sum(b.done_bytes for b in self.blobs.values())
        elapsed = max(now - self.started, 1e-3)
        lines.append(f"total  {human_size(done)} / {human_size(self.total_bytes)}  "
                     f"{human_size(done / elapsed)}/s  {elapsed:.1f} s")
        out = []
        if self.lines_drawn:
            out.append(f"\x1b[{self.lines_drawn}F")
        out.extend(f"\x1b[2K{line}\n" for line in lines)
        self.stream.write("".join(out))
        self.stream.flush()
        self.lines_drawn = len(lines)


class StagingBar:
    """``berth stage`` progress: one redrawn line (objects, bytes, rate) on a terminal, nothing
    otherwise (the summary follows). Implements berth.staging.transfer.Progress; thread-safe."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.lock = threading.Lock()
        self.objects_total = self.objects_done = self.skipped = 0
        self.bytes_total = self.bytes_done = 0
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.drawn = False

    def add_total(self, objects: int, size_bytes: int) -> None:
        with self.lock:
            self.objects_total += objects
            self.bytes_total += size_bytes
            self._draw(force=True)

    def advance(self, size_bytes: int) -> None:
        with self.lock:
            self.bytes_done += size_bytes
            self._draw()

    def object_done(self, skipped: bool = False) -> None:
        with self.lock:
            self.objects_done += 1
            self.skipped += skipped
            self._draw()

    def finish(self) -> None:
        with self.lock:
            self._draw(force=True)
            if self.drawn:
                self.stream.write("\n")
                self.stream.flush()
                self.drawn = False

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < _REDRAW_INTERVAL_S:
            return
        self.last_draw = now
        elapsed = max(now - self.started, 1e-3)
        width = 24
        fraction = self.bytes_done / self.bytes_total if self.bytes_total else \
            (self.objects_done / self.objects_total if self.objects_total else 0.0)
        filled = int(width * min(fraction, 1.0))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r\x1b[2K[{bar}] {self.objects_done}/{self.objects_total} objects "
                          f"({self.skipped} skipped)  {human_size(self.bytes_done)} / {human_size(self.bytes_total)}"
                          f"  {human_size(self.bytes_done / elapsed)}/s")
        self.stream.flush()
        self.drawn = True
