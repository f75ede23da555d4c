"""Helpers for the robustness tests: hostile servers, tiny or read-only file systems, error checks.

Fixtures are imported by name into the test modules that use them (a second conftest.py
would shadow the top-level one that the tests import helpers from).

Full and read-only disks are real: as root, a tmpfs of a few hundred kB (or a read-only
one) is mounted for the test; elsewhere those tests skip with the reason, and the
RLIMIT_FSIZE tests (the kernel refuses to grow a file past the limit: EFBIG) still
exercise the same write-failure paths without privileges.
"""
from __future__ import annotations

import http.server
import io
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def one_line_error(capsys) -> str:
    """The single stderr line of a failed command; fails on a traceback or a second line."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("WARNING", "INFO"))]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(("error:", "sct_deepseg_epi")), err
    return err[0]


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, prefix + f.name)
    return buf.getvalue()


class Server:
    """A loopback (127.0.0.1) HTTP server: plain files, and bodies that trickle or hang on purpose."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.trickle: dict[str, float] = {}  # path -> seconds between single bytes
        self.hang: set[str] = set()          # send the headers, then nothing
        self.delay: dict[str, float] = {}    # path -> seconds to wait before answering
        self.hits: dict[str, int] = {}
        self._stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                body = outer.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.path in outer.delay:
                    time.sleep(outer.delay[self.path])
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
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
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

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


def _mount(path: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    """A real file system of 200 kB (tmpfs), or a skip where mounting needs privileges we lack."""
    d = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    if not _mount(d, "size=200k,mode=0777"):
        pytest.skip("mounting a 200 kB tmpfs needs root; the RLIMIT_FSIZE tests cover the write failures")
    yield d
    _umount(d)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody can write to: a read-only tmpfs as root (root ignores modes), else mode 0555."""
    d = tmp_path / f"ro-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    if os.geteuid() == 0:
        if not _mount(d, "ro,size=64k"):
            pytest.skip("cannot mount a read-only tmpfs here, and root ignores folder permissions")
        yield d
        _umount(d)
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


def fsize_limited(limit_bytes: int):
    """preexec_fn for a subprocess whose files cannot grow past ``limit_bytes`` (writes fail with EFBIG)."""
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return setup


def run_cli(args: list[str], env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """``python -m sct_deepseg_epi ARGS`` in a real subprocess."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sct_deepseg_epi", *args], capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=timeout, **kw)


def assert_one_line(proc: subprocess.CompletedProcess, rc: int = 1) -> str:
    err = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("WARNING", "INFO"))]
    assert proc.returncode == rc and len(err) == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    return err[0]
