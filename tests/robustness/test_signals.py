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


# a ceiling on each wait, only for a run that hangs: never reached on a slow or loaded machine
CEILING_S = 600.0
OUTPUTS = ("m.nii.gz", "m_soft.nii.gz", "m.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 120-volume series (about 1 s of -4d each with the tiny model), a short one, and the model's cache."""
    d = tmp_path_factory.mktemp("signals")
    make_model_folder(d / "models" / "tiny" / "1.0.0")
    _series(d, 120)
    nib.save(blob_image(n_volumes=3)[0], str(d / "short.nii.gz"))
    return d


def _series(setup, volumes: int) -> str:
    name = "long.nii" if volumes == 120 else f"long{volumes}.nii"
    if not (setup / name).exists():
        img, _ = blob_image(shape=(64, 64, 12), n_volumes=volumes)
        nib.save(img, str(setup / name))
    return name


def _start(setup, out, name="long.nii"):
    cmd = [sys.executable, "-m", "sct_deepseg_epi", "-i", str(setup / name), "-o", str(out / "m.nii.gz"),
           "-4d", "each", "-soft", "1", "-roi", "0", "-model", "tiny", "-threads", "1"]
    env = {**os.environ, "SCT_DEEPSEG_EPI_MODELS": str(setup / "models"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def _default_signals() -> None:
    """The child starts with the default actions: a test run under ``nohup`` (SIGHUP ignored, which
    the command rightly respects) or with other inherited dispositions still tests the handlers."""
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def _parts(out):
    return sorted(p.name for p in out.iterdir() if ".part" in p.name)


def _stopped(pid: int) -> bool:
    """Whether the kernel has stopped ``pid`` (state T in /proc): SIGSTOP is delivered asynchronously."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except FileNotFoundError:
        return False


def _stop_mid_stream(p, out, n=2) -> bool:
    """Stop the writer (SIGSTOP) while frames stream into its temporaries; False if it got past them first.

    Whether the stop landed mid-stream is checked once the process is stopped, not assumed: on a loaded
    machine this test may look only after the writer has finished or begun renaming its files.
    """
    deadline = time.monotonic() + CEILING_S
    while time.monotonic() < deadline:
        parts = [out / name for name in _parts(out)]
        try:
            streaming = len(parts) >= n and max(x.stat().st_size for x in parts) > 64 * 1024
        except FileNotFoundError:
            streaming = False
        if streaming or p.poll() is not None:
            break
        time.sleep(0.005)
    else:
        p.kill()
        pytest.fail("no temporary file appeared")
    if p.poll() is not None:
        return False
    p.send_signal(signal.SIGSTOP)
    while not _stopped(p.pid) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return p.poll() is None and len(_parts(out)) == n and not any((out / o).exists() for o in OUTPUTS)


def _start_and_stop_mid_stream(setup, out):
    """A writer stopped mid-stream: the 120-volume run, or longer ones if this machine looked too late."""
    for volumes in (120, 480, 1920):
        p = _start(setup, out, _series(setup, volumes))
        if _stop_mid_stream(p, out):
            return p
        p.kill()
        p.communicate(timeout=CEILING_S)
        for leftover in out.iterdir():
            leftover.unlink()
    pytest.fail("the writer finished before it could be stopped, even with 1920 volumes")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminate_and_hangup_clean_up(setup, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    p = _start_and_stop_mid_stream(setup, out)
    p.send_signal(sig)
    p.send_signal(signal.SIGCONT)
    err = p.communicate(timeout=CEILING_S)[1]
    assert p.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"interrupted by {signal.Signals(sig).name}" and "Traceback" not in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_before_the_handler_is_installed_leaves_nothing(setup, tmp_path, sig):
    """Sent as the process starts, before Python has run the command (default action: the process dies),
    or just after the handler is in place: either way nothing is left. Nothing is created before it is."""
    out = tmp_path / "out"
    out.mkdir()
    p = _start(setup, out)
    p.send_signal(sig)
    err = p.communicate(timeout=CEILING_S)[1]
    assert p.returncode in (-sig, 128 + sig), (p.returncode, err)
    assert list(out.iterdir()) == []


def test_rerun_after_kill_9_removes_stale_parts(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = _start_and_stop_mid_stream(setup, out)
    p.send_signal(signal.SIGKILL)
    p.wait(CEILING_S)
    stale = _parts(out)
    assert len(stale) == 2  # what kill -9 leaves: nothing can run in the killed process
    p = _start(setup, out, "short.nii.gz")  # another input, the same output
    err = p.communicate(timeout=CEILING_S)[1]
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


@pytest.mark.parametrize("writer", ["output set", "atomic path", "frame writer"])
def test_a_signal_as_a_temporary_is_created_leaves_nothing(tmp_path, monkeypatch, writer):
    """SIGTERM right after the kernel made a temporary, before its writer had recorded it: that file used to
    stay (no clean-up knew of it). The signal is now held until the temporary is recorded, then removed."""
    from sct_deepseg_epi.cli import Terminated, handle_signals, restore_signals

    real = outputs.tempfile.mkstemp

    def mkstemp_then_signal(*a, **kw):
        made = real(*a, **kw)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered now, unless held
        return made

    img, _ = blob_image(n_volumes=2)
    final = tmp_path / "m.nii.gz"
    replaced = handle_signals()
    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp_then_signal)
    try:
        with pytest.raises(Terminated):
            if writer == "output set":
                with outputs.OutputSet({"mask": final}) as out:
                    out.temp("mask")
            elif writer == "atomic path":
                with write.atomic_path(final) as tmp:
                    tmp.write_text("never")
            else:
                with write.FrameWriter(final, img, img.shape, np.uint8) as w:
                    w.write(np.zeros(img.shape[:3], np.uint8))
    finally:
        monkeypatch.undo()
        restore_signals(replaced)
    assert list(tmp_path.iterdir()) == []
