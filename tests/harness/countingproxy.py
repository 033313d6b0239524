"""A small HTTP proxy in front of a test registry that counts requests and injects faults.

The registry's access log is off (tests/harness/registry.py), and counting is more reliable
here anyway: every request berth sends is recorded as ``(method, path, range)``. Faults for the
resume and kill tests:

- ``cut_blobs``: the next N blob GETs whose body is longer than the given count send that many
  body bytes, then drop the connection;
- ``ignore_range``: forward blob GETs without their Range header (the registry sends it all);
- ``blob_delay_s``: sleep this long per 64 KiB of blob body (slow downloads to kill into).

tests/harness/faultproxy.py extends it (the hooks ``intercept`` and ``send_body``) with the
fault kinds of the reliability campaign. Listens on 127.0.0.1 only; ``stop()`` shuts it down.
Nothing here is imported by berth.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "host"}
CHUNK = 64 * 1024


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client (or an injected fault) dropping the connection is not news


@dataclass
class CountingProxy:
    upstream: str
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    cut_blobs: list[int] = field(default_factory=list)
    ignore_range: bool = False
    blob_delay_s: float = 0.0
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The port to listen on (0: any); kept across stop() and start() so references stay valid.
    port: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_gets(self, digest: str | None = None) -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.requests if r[0] == "GET" and "/blobs/" in r[1]
                    and (digest is None or r[1].endswith(digest))]

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()

    def start(self) -> "CountingProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - quiet
                pass

            def _forward(self) -> None:
                try:
                    proxy.handle(self)
                finally:
                    self.close_connection = True

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        self.server = _QuietServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- one request ---------------------------------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        is_blob_get = handler.command == "GET" and "/blobs/sha256:" in handler.path
        with self.lock:
            self.requests.append((handler.command, handler.path, handler.headers.get("Range")))
        if self.intercept(handler, is_blob_get):
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        if is_blob_get and self.ignore_range:
            headers.pop("Range", None)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        connection = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            handler.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    handler.send_header(key, value)
            handler.send_header("Connection", "close")
            handler.end_headers()
            if handler.command != "HEAD":
                self.send_body(handler, response, is_blob_get, int(response.getheader("Content-Length") or 0))
        finally:
            connection.close()

    def intercept(self, handler: BaseHTTPRequestHandler, is_blob_get: bool) -> bool:
        """Answer the request without the registry (True), or let it through (False)."""
        return False

    def send_body(self, handler: BaseHTTPRequestHandler, response, is_blob_get: bool, length: int) -> None:
        """Copy the registry's response body to the client (headers are sent already)."""
        cut = None
        with self.lock:
            if is_blob_get and self.cut_blobs and length > self.cut_blobs[0]:
                cut = self.cut_blobs.pop(0)
        sent = 0
        while chunk := response.read(CHUNK):
            if cut is not None and sent + len(chunk) > cut:
                handler.wfile.write(chunk[: cut - sent])
                handler.wfile.flush()
                return
            handler.wfile.write(chunk)
            sent += len(chunk)
            if is_blob_get and self.blob_delay_s:
                time.sleep(self.blob_delay_s)
