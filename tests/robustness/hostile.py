"""Helpers for the robustness tests: hostile servers, tiny or read-only file systems, error checks.

Fixtures are imported by name into the test modules that use them (a second conftest.py
would shadow the top-level one that the tests import helpers from).

Full and read-only disks are real: as root, a tmpfs of a few hundred kB (or a read-only
one) is mounted for the test; elsewhere those tests skip with the reason, and the
RLIMIT_FSIZE tests (the kernel refuses to grow a file past the limit: EFBIG) still
exercise the same write-failure paths without privileges.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from loopback import Server, server, zip_folder  # noqa: F401 (re-exported for the test modules)

REPO = Path(__file__).resolve().parents[2]


def one_line_error(capsys) -> str:
    """The single stderr line of a failed command; fails on a traceback or a second line."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("WARNING", "INFO"))]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(("error:", "sct_deepseg_epi")), err
    return err[0]


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


def run_cli(args: list[str], env: dict | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """``python -m sct_deepseg_epi ARGS`` in a real subprocess."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sct_deepseg_epi", *args], capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=timeout, **kw)


def assert_one_line(proc: subprocess.CompletedProcess, rc: int = 1) -> str:
    err = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("WARNING", "INFO"))]
    assert proc.returncode == rc and len(err) == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    return err[0]
