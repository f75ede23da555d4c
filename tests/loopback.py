"""A loopback (127.0.0.1) HTTP server for download tests, and a zip helper.

It serves in-memory files, counts requests, and misbehaves on purpose where a test asks:
status codes answered first, truncated bodies, bodies that trickle or hang, late answers.
"""
from __future__ import annotations

import http.server
import io
import threading
import time
import zipfile
from pathlib import Path

import pytest


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, prefix + f.name)
    return buf.getvalue()


class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, list[int]] = {}  # path -> status codes to answer first
        self.truncate: set[str] = set()       # send half of the body
        self.trickle: dict[str, float] = {}   # path -> seconds between single bytes
        self.hang: set[str] = set()           # send the headers, then nothing
        self.delay: dict[str, float] = {}     # path -> seconds to wait before answering
        self.hits: dict[str, int] = {}
        self._stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                pending = outer.fail.get(self.path)
                body = outer.files.get(self.path)
                if pending or body is None:
                    self.send_response(pending.pop(0) if pending else 404)
                    self.end_headers()
                    return
                if self.path in outer.delay:
                    time.sleep(outer.delay[self.path])
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self._body(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _body(self, body: bytes) -> None:
                if self.path in outer.hang:
                    self.wfile.flush()
                    outer._stop.wait(60)
                elif self.path in outer.trickle:
                    for b in body:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        if outer._stop.wait(outer.trickle[self.path]):
                            return
                else:
                    self.wfile.write(body[: len(body) // 2] if self.path in outer.truncate else body)

            def log_message(self, *args):
                pass

        class Httpd(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.httpd = Httpd(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()
