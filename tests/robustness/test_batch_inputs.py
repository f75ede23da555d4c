"""batch checks an input's file type before hashing it: a run whose input became a FIFO fails at once."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hostile import REPO
from test_batch import make_dataset


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_fifo_input_of_a_finished_run_does_not_hang(tiny_model, tmp_path):
    ds = make_dataset(tmp_path / "ds", runs=("sub-02/func/sub-02_task-rest_bold.nii.gz",))
    fifo = ds / "sub-01/func/sub-01_task-rest_bold.nii.gz"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    deriv = ds / "derivatives" / "sct_deepseg_epi" / "sub-01" / "func"
    deriv.mkdir(parents=True)
    (deriv / "sub-01_task-rest_desc-spinalcord_mask.json").write_text("{}")  # a finished run: its input is compared
    proc = subprocess.run([sys.executable, "-m", "sct_deepseg_epi", "batch", str(ds), "-model", "tiny"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr  # one run failed
    assert "sub-01/func/sub-01_task-rest_bold.nii.gz: is a named pipe (FIFO), not a regular file" in proc.stderr
    assert "1 done" in proc.stderr and "Traceback" not in proc.stderr
