"""Signals during a long ``-4d each`` run: SIGTERM and SIGHUP clean up like Ctrl-C; after kill -9 the
next run to the same output removes the stale temporaries. Real subprocesses, real signals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image, make_model_folder
from hostile import REPO

from sct_deepseg_epi import outputs, write


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 120-volume series (about 0.6 s of -4d each with the tiny model), a short one, and the model's cache."""
    d = tmp_path_factory.mktemp("signals")
    make_model_folder(d / "models" / "tiny" / "1.0.0")
    img, _ = blob_image(shape=(64, 64, 12), n_volumes=120)
    nib.save(img, str(d / "long.nii"))
    nib.save(blob_image(n_volumes=3)[0], str(d / "short.nii.gz"))
    return d


def _start(setup, out, name="long.nii"):
    cmd = [sys.executable, "-m", "sct_deepseg_epi", "-i", str(setup / name), "-o", str(out / "m.nii.gz"),
           "-4d", "each", "-soft", "1", "-roi", "0", "-model", "tiny", "-threads", "1"]
    env = {**os.environ, "SCT_DEEPSEG_EPI_MODELS": str(setup / "models"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def _parts(out):
    return sorted(p.name for p in out.iterdir() if ".part" in p.name)


def _wait_for_parts(p, out, n=2, timeout=60.0):
    """Stop the writer (SIGSTOP) once frames are streaming into its temporaries, so the signal lands mid-stream."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = [out / name for name in _parts(out)]
        try:
            streaming = len(parts) >= n and max(x.stat().st_size for x in parts) > 64 * 1024
        except FileNotFoundError:
            streaming = False
        if streaming:
            p.send_signal(signal.SIGSTOP)
            return
        if p.poll() is not None:
            pytest.fail(f"the run ended before writing (rc {p.returncode}): {p.stderr.read()[-500:]}")
        time.sleep(0.005)
    p.kill()
    pytest.fail("no temporary file appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminate_and_hangup_clean_up(setup, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    p = _start(setup, out)
    _wait_for_parts(p, out)
    p.send_signal(sig)
    p.send_signal(signal.SIGCONT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"interrupted by {signal.Signals(sig).name}" and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_rerun_after_kill_9_removes_stale_parts(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = _start(setup, out)
    _wait_for_parts(p, out)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    stale = _parts(out)
    assert len(stale) == 2  # what kill -9 leaves: nothing can run in the killed process
    p = _start(setup, out, "short.nii.gz")  # another input, the same output
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 0, err
    assert sorted(x.name for x in out.iterdir()) == ["m.json", "m.nii.gz", "m_soft.nii.gz"]


def test_a_live_writers_temporary_is_kept(tmp_path):
    """Two runs writing one output at once: the second does not remove the first one's file."""
    img, _ = blob_image(n_volumes=2)
    final = tmp_path / "m.nii.gz"
    with write.FrameWriter(final, img, img.shape, np.uint8) as w:
        assert outputs.remove_stale_parts(final) == []
        w.write(np.zeros(img.shape[:3], np.uint8))
        w.write(np.ones(img.shape[:3], np.uint8))
        w.commit()
    assert list(tmp_path.iterdir()) == [final]


def test_a_signal_wrapped_by_a_library_is_still_an_interruption(capsys):
    """A SIGTERM that lands while onnxruntime is imported comes out as 'ImportError: initialization failed'."""
    from sct_deepseg_epi.cli import Terminated, call

    def main_fn(argv):
        try:
            raise Terminated(signal.SIGTERM)
        except Terminated as exc:
            raise ImportError("initialization failed") from exc

    assert call(main_fn, []) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "interrupted by SIGTERM\n"
