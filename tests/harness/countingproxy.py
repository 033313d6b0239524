"""A small HTTP proxy in front of a test registry that counts requests and injects faults.

The registry's access log is off (tests/harness/registry.py), and counting is more reliable
here anyway: every request berth sends is recorded as ``(method, path, range)``. Faults for the
resume and kill tests:

- ``cut_blobs``: the next N blob GETs whose body is longer than the given count send that many
  body bytes, then drop the connection;
- ``ignore_range``: forward blob GETs without their Range header (the registry sends it all);
- ``blob_delay_s``: sleep this long per 64 KiB of blob body (slow downloads to kill into).

Listens on 127.0.0.1 only; ``stop()`` shuts it down. Nothing here is imported by berth.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "host"}
_CHUNK = 64 * 1024


@dataclass
class CountingProxy:
    upstream: str
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    cut_blobs: list[int] = field(default_factory=list)
    ignore_range: bool = False
    blob_delay_s: float = 0.0
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

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
                is_blob_get = self.command == "GET" and "/blobs/sha256:" in self.path
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range")))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if is_blob_get and proxy.ignore_range:
                    headers.pop("Range", None)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    cut = None
                    with proxy.lock:
                        length = int(response.getheader("Content-Length") or 0)
                        if is_blob_get and proxy.cut_blobs and length > proxy.cut_blobs[0]:
                            cut = proxy.cut_blobs.pop(0)
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP:
                            self.send_header(key, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    sent = 0
                    while self.command != "HEAD":
                        chunk = response.read(_CHUNK)
                        if not chunk:
                            break
                        if cut is not None and sent + len(chunk) > cut:
                            self.wfile.write(chunk[: cut - sent])
                            self.wfile.flush()
                            self.close_connection = True
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        if is_blob_get and proxy.blob_delay_s:
                            time.sleep(proxy.blob_delay_s)
                finally:
                    connection.close()
                    self.close_connection = True

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
