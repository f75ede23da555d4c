"""Inputs that used to be accepted silently are refused with one line."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from hostile import one_line_error

from sct_deepseg_epi.cli import main


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_4d_series_with_no_volume(tiny_model, tmp_path, capsys, suffix):
    path = tmp_path / f"empty4d{suffix}"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 5, 0), np.float32), np.diag([2.0, 2.0, 4.0, 1.0])), str(path))
    assert main(["-i", str(path), "-model", "tiny"]) == 1
    assert f"{path}: a 4D series of shape (20, 20, 5, 0) holds no volume" in one_line_error(capsys)
    assert not (tmp_path / f"empty4d_seg{suffix}").exists()


def test_input_with_list_models_refused(tiny_model, blob_file, capsys):
    """-list-models used to list and exit, silently ignoring -i."""
    path, _ = blob_file
    with pytest.raises(SystemExit) as info:
        main(["-i", str(path), "-list-models"])
    assert info.value.code == 2
    err = capsys.readouterr()
    assert "-list-models lists the models and exits; it cannot be combined with -i" in err.err
    assert len(err.err.strip().splitlines()) == 1 and "tiny@1.0.0" not in err.out


def test_fifo_input_refused_without_blocking(tiny_model, tmp_path, capsys):
    import os

    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    assert main(["-i", str(fifo), "-model", "tiny"]) == 1
    assert f"{fifo}: is a named pipe (FIFO), not a regular file" in capsys.readouterr().err
