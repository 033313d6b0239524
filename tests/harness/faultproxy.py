"""A fault-injecting HTTP proxy in front of the real test registry (issue 8, reliability).

It is the counting proxy (tests/harness/countingproxy.py: every request recorded) plus these
faults, each injected into a manifest or blob GET:

==============  ===================================================================================
``5xx``         a burst of ``burst`` consecutive 500/502/503/504 answers (no registry contact)
``429``         429 Too Many Requests with ``Retry-After: 1``
``reset``       the body up to a random byte offset, then a TCP reset (SO_LINGER 0) - blobs only
``truncate``    a correct ``Content-Length``, the body up to a random offset, then a clean close
``corrupt``     the whole body with one byte at a random offset flipped (wrong bytes)
``drip``        the body in 1 KiB pieces every 10 ms for ``drip_s`` seconds, then the rest at speed
``stall``       the body up to a random offset, then silence for ``stall_s`` (longer than the
                client's timeout), then a close
``redirect``    307 to a "blob store" on a loopback port where nothing listens
``429-hour``    429 with ``Retry-After: 3600``, longer than berth waits (only from ``queue``: a
                campaign's pull would end on it, as berth.retry says it must)
``trickle``     the body up to a random offset, then one byte every ``trickle_every_s`` for
                ``trickle_s`` (never silent for a read timeout), then a close (only from ``queue``)
==============  ===================================================================================

Body faults apply to blob GETs only (manifests are small and read whole). Which requests get a
fault: ``queue`` (the next eligible requests get these kinds in order; deterministic tests),
else with ``probability`` a kind drawn from ``kinds`` by a seeded ``random.Random`` (campaigns).
``injected`` logs ``(kind, path)`` for every fault sent. Loopback only; nothing of berth imports it.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from tests.harness.countingproxy import CHUNK, CountingProxy

STATUS_FAULTS = ("5xx", "429", "redirect")
BODY_FAULTS = ("reset", "truncate", "corrupt", "drip", "stall")
FAULT_KINDS = STATUS_FAULTS + BODY_FAULTS
#: Status faults only ``queue`` injects, never a campaign's random draw.
QUEUED_FAULTS = ("429-hour", "trickle")


def dead_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class FaultProxy(CountingProxy):
    seed: int = 0
    probability: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    queue: list[str] = field(default_factory=list)
    burst: int = 3
    stall_s: float = 4.0
    drip_s: float = 1.0
    trickle_s: float = 120.0
    trickle_every_s: float = 0.25
    injected: list[tuple[str, str]] = field(default_factory=list)
    _burst_left: int = 0
    _rng: random.Random | None = None
    _dead_port: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._dead_port = dead_port()

    def faults(self, kind: str | None = None) -> list[tuple[str, str]]:
        with self.lock:
            return [f for f in self.injected if kind is None or f[0] == kind]

    # -- choosing ------------------------------------------------------------------------------

    def _choose(self, handler: BaseHTTPRequestHandler, is_blob_get: bool) -> str | None:
        eligible = handler.command == "GET" and ("/manifests/" in handler.path or is_blob_get)
        if not eligible:
            return None
        with self.lock:
            if self._burst_left > 0:
                self._burst_left -= 1
                return "5xx"
            allowed = FAULT_KINDS + QUEUED_FAULTS if is_blob_get else STATUS_FAULTS + ("429-hour",)
            if self.queue:
                if self.queue[0] not in allowed:
                    return None
                kind = self.queue.pop(0)
            elif self.probability and self._rng.random() < self.probability:
                choices = [k for k in self.kinds if k in allowed]
                if not choices:
                    return None
                kind = self._rng.choice(choices)
            else:
                return None
            if kind == "5xx":
                self._burst_left = self.burst - 1
            return kind

    def _log(self, kind: str, path: str) -> None:
        with self.lock:
            self.injected.append((kind, path))

    # -- hooks of CountingProxy ----------------------------------------------------------------

    def intercept(self, handler: BaseHTTPRequestHandler, is_blob_get: bool) -> bool:
        kind = self._choose(handler, is_blob_get)
        handler._berth_fault = kind  # read by send_body for the body faults
        if kind not in STATUS_FAULTS + ("429-hour",):
            return False
        self._log(kind, handler.path)
        if kind == "5xx":
            status = self._rng.choice((500, 502, 503, 504))
            body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}'
            self._answer(handler, status, body, {"Content-Type": "application/json"})
        elif kind == "429":
            body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"injected fault"}]}'
            self._answer(handler, 429, body, {"Content-Type": "application/json", "Retry-After": "1"})
        elif kind == "429-hour":
            body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"injected fault"}]}'
            self._answer(handler, 429, body, {"Content-Type": "application/json", "Retry-After": "3600"})
        else:
            location = f"http://127.0.0.1:{self._dead_port}/blobstore{handler.path}"
            self._answer(handler, 307, b"", {"Location": location})
        return True

    def send_body(self, handler: BaseHTTPRequestHandler, response, is_blob_get: bool, length: int) -> None:
        kind = getattr(handler, "_berth_fault", None)
        if kind not in BODY_FAULTS + ("trickle",) or length <= 0 or response.status not in (200, 206):
            super().send_body(handler, response, is_blob_get, length)
            return
        self._log(kind, handler.path)
        with self.lock:
            offset = self._rng.randrange(0, length)
        sent = 0
        drip_until = time.monotonic() + self.drip_s
        while True:
            if kind == "drip" and time.monotonic() < drip_until:
                chunk = response.read(1024)
                time.sleep(0.01)
            else:
                chunk = response.read(CHUNK)
            if not chunk:
                break
            if kind in ("reset", "truncate", "stall", "trickle") and sent + len(chunk) > offset:
                handler.wfile.write(chunk[: offset - sent])
                handler.wfile.flush()
                if kind == "trickle":
                    until = time.monotonic() + self.trickle_s
                    rest = chunk[offset - sent:]
                    while rest and time.monotonic() < until:
                        time.sleep(self.trickle_every_s)
                        try:
                            handler.wfile.write(rest[:1])
                            handler.wfile.flush()
                        except OSError:
                            return  # the client gave up
                        rest = rest[1:]
                elif kind == "stall":
                    time.sleep(self.stall_s)
                elif kind == "reset":
                    _reset(handler.connection)
                return
            if kind == "corrupt" and sent <= offset < sent + len(chunk):
                data = bytearray(chunk)
                data[offset - sent] ^= 0xFF
                chunk = bytes(data)
            handler.wfile.write(chunk)
            sent += len(chunk)

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body)


def _reset(connection: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER with a zero timeout)."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The handler's rfile/wfile keep the socket object open; close the descriptor itself.
        os.close(connection.detach())
    except OSError:
        pass

