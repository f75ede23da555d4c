"""Downloads end in bounded time: an overall deadline, a stall timeout and a minimum rate, set by
environment variables; nothing is left behind in the models folder.

The slow servers run on 127.0.0.1; the commands run as real subprocesses with a hard timeout,
so a regression fails the test instead of hanging it.
"""
from __future__ import annotations

import os
import time

import pytest
from conftest import make_model_folder
from hostile import assert_one_line, run_cli, server, zip_folder  # noqa: F401  (server is a fixture)

from sct_deepseg_epi.errors import DownloadError
from sct_deepseg_epi.registry import fetch


@pytest.fixture
def body(tmp_path) -> bytes:
    return zip_folder(make_model_folder(tmp_path / "src" / "tiny-2.0.0", version="2.0.0"), "tiny-2.0.0/")


def _env(model_root, **limits) -> dict:
    env = {"SCT_DEEPSEG_EPI_MODELS": str(model_root)}
    env.update({f"SCT_DEEPSEG_EPI_DOWNLOAD_{k.upper()}": str(v) for k, v in limits.items()})
    return env


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".download-", ".extract-")))


def test_trickling_server_stops_at_the_deadline(server, model_root, body):
    """One byte every 0.2 s: every read succeeds, so only an overall deadline ends it."""
    server.files["/slow.zip"] = body
    server.trickle["/slow.zip"] = 0.2
    t0 = time.monotonic()
    proc = run_cli(["-custom-url", server.url + "/slow.zip"], _env(model_root, timeout=1, min_rate=0), timeout=30)
    elapsed = time.monotonic() - t0
    line = assert_one_line(proc)
    assert "1 s download deadline" in line and "SCT_DEEPSEG_EPI_DOWNLOAD_TIMEOUT" in line
    assert elapsed < 10
    assert server.hits["/slow.zip"] == 1  # a server that was too slow is not asked again
    assert _leftovers(model_root) == []


def test_server_below_minimum_rate_is_dropped(server, model_root, body):
    server.files["/slow.zip"] = body
    server.trickle["/slow.zip"] = 0.02  # about 50 bytes/s
    t0 = time.monotonic()
    proc = run_cli(["-custom-url", server.url + "/slow.zip"],
                   _env(model_root, min_rate=1000, rate_window=1), timeout=30)
    line = assert_one_line(proc)
    assert "below the minimum of 1000" in line and "SCT_DEEPSEG_EPI_DOWNLOAD_MIN_RATE" in line
    assert time.monotonic() - t0 < 10
    assert _leftovers(model_root) == []


def test_hanging_server_is_bounded(server, model_root, body):
    """Headers, then silence: each attempt waits one stall timeout, all of them one deadline."""
    server.files["/hang.zip"] = body
    server.hang.add("/hang.zip")
    t0 = time.monotonic()
    proc = run_cli(["-custom-url", server.url + "/hang.zip"], _env(model_root, stall=0.3, timeout=1), timeout=30)
    line = assert_one_line(proc)
    assert "/hang.zip" in line
    assert time.monotonic() - t0 < 10
    assert _leftovers(model_root) == []


def test_fast_server_is_unaffected_by_tight_limits(server, model_root, body):
    server.files["/m.zip"] = body
    proc = run_cli(["-custom-url", server.url + "/m.zip", "-v", "0"],
                   _env(model_root, timeout=5, stall=1, min_rate=1000, rate_window=0.001), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (model_root / "tiny" / "2.0.0" / "manifest.json").is_file()


def test_limits_from_environment(monkeypatch):
    assert fetch.Limits.from_env() == fetch.Limits(1800.0, 30.0, 10000.0, 30.0)
    monkeypatch.setenv("SCT_DEEPSEG_EPI_DOWNLOAD_TIMEOUT", "60")
    monkeypatch.setenv("SCT_DEEPSEG_EPI_DOWNLOAD_MIN_RATE", "0")
    assert fetch.Limits.from_env() == fetch.Limits(60.0, 30.0, 0.0, 30.0)
    monkeypatch.setenv("SCT_DEEPSEG_EPI_DOWNLOAD_STALL", "soon")
    with pytest.raises(DownloadError, match="SCT_DEEPSEG_EPI_DOWNLOAD_STALL='soon': expected a positive number"):
        fetch.Limits.from_env()


def test_orphaned_scratch_folders_are_swept(server, model_root, body):
    """A killed process leaves its .download-* folder; the next install removes it once no live owner
    holds its lock, however recent it is."""
    import fcntl

    server.files["/m.zip"] = body
    old = model_root / ".download-killed"
    (old / "x").mkdir(parents=True)
    fresh = model_root / ".download-live"  # another process's download in progress: kept
    fresh.mkdir()
    fd = os.open(fresh, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a live install holds on its scratch folder
    try:
        proc = run_cli(["-custom-url", server.url + "/m.zip", "-v", "0"], _env(model_root), timeout=30)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert not old.exists() and fresh.is_dir()
