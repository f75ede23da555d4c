"""-threads is bounded to the CPUs available (with a warning) and refused below 1."""
from __future__ import annotations

import logging
import os

import pytest
from hostile import one_line_error, run_cli

from sct_deepseg_epi import infer
from sct_deepseg_epi.cli import main


def test_ten_thousand_threads_are_bounded(tiny_model, blob_file):
    """ONNX Runtime starts every thread it is given: 10000 used to run for minutes."""
    path, _ = blob_file
    proc = run_cli(["-i", str(path), "-model", "tiny", "-threads", "10000"],
                   {"SCT_DEEPSEG_EPI_MODELS": os.environ["SCT_DEEPSEG_EPI_MODELS"]}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cpus = infer.default_threads()
    assert f"-threads 10000 is more than the {cpus} CPU(s) available to this process; using {cpus}" in proc.stderr


def test_bounded_threads(caplog):
    cpus = infer.default_threads()
    assert infer.bounded_threads(None) == cpus and infer.bounded_threads(1) == 1
    with caplog.at_level(logging.WARNING, logger="sct_deepseg_epi"):
        assert infer.bounded_threads(cpus + 5) == cpus
    assert "more than the" in caplog.text


@pytest.mark.parametrize("value", ["-5", "0"])
def test_fewer_than_one_thread_refused(tiny_model, blob_file, capsys, value):
    path, _ = blob_file
    with pytest.raises(SystemExit) as exc:  # a usage error (exit 2), refused by the flag's parser
        main(["-i", str(path), "-model", "tiny", "-threads", value])
    assert exc.value.code == 2
    assert f"argument -threads: must be at least 1, not {value}" in one_line_error(capsys)
    assert not (path.parent / "blob_seg.nii.gz").exists()
