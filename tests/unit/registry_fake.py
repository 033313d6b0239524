"""A tiny scripted HTTP server for the registry client's unit tests (in-process, loopback).

Each test installs a ``handler(request) -> Reply`` function; every request is recorded with its
method, path and headers so tests can check exactly what the client sent. A ``Reply`` with
``drop_after`` closes the connection after that many body bytes (a lost connection).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None
    #: After this many body bytes, the rest one byte every ``trickle_every_s`` (a stalled body
    #: that is never silent for a read timeout); stops when the client hangs up.
    trickle_after: int | None = None
    trickle_every_s: float = 0.05
    #: Header values that appear several times (WWW-Authenticate).
    multi_headers: list[tuple[str, str]] = field(default_factory=list)


class FakeServer:
    """Serves on 127.0.0.1:PORT until :meth:`stop`; ``host`` is ``127.0.0.1:PORT``."""

    def __init__(self, handler: Callable[[Request], Reply] | None = None) -> None:
        self.handler = handler or (lambda request: Reply(404))
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A client hanging up mid-reply is what some tests do on purpose: no tracebacks.
        self._server.handle_error = lambda request, client_address: None
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(self.command, self.path, dict(self.headers.items()), body)
                with server._lock:
                    server.requests.append(request)
                reply = server.handler(request)
                self.send_response(reply.status)
                headers = {"Content-Length": str(len(reply.body)), **reply.headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                for key, value in reply.multi_headers:
                    self.send_header(key, value)
                if reply.drop_after is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if reply.trickle_after is not None:
                    import time

                    self.wfile.write(reply.body[: reply.trickle_after])
                    self.wfile.flush()
                    for n in range(reply.trickle_after, len(reply.body)):
                        time.sleep(reply.trickle_every_s)
                        try:
                            self.wfile.write(reply.body[n:n + 1])
                            self.wfile.flush()
                        except OSError:
                            self.close_connection = True
                            return
                    return
                if reply.drop_after is not None:
                    self.wfile.write(reply.body[: reply.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(reply.body)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        return Handler
