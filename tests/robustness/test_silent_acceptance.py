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
