"""``sct_deepseg_epi moco-mask``: in-process main() calls through the dispatcher."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image

from sct_deepseg_epi.cli import main


@pytest.fixture
def bold_and_seg(tmp_path):
    img, disc = blob_image(n_volumes=3, axcodes="LPI")
    bold, seg = tmp_path / "fmri.nii.gz", tmp_path / "fmri_seg.nii.gz"
    nib.save(img, str(bold))
    nib.save(nib.Nifti1Image(disc, img.affine, img.header), str(seg))
    return bold, seg


def test_writes_sct_named_mask(bold_and_seg, capsys):
    bold, seg = bold_and_seg
    assert main(["moco-mask", "-i", str(bold), "-s", str(seg)]) == 0
    out = bold.parent / "mask_fmri.nii.gz"
    mask = nib.load(str(out))
    assert mask.shape == nib.load(str(bold)).shape[:3] and np.allclose(mask.affine, nib.load(str(bold)).affine)
    assert "sct_fmri_moco -i" in capsys.readouterr().err


def test_size_sets_the_diameter(bold_and_seg, tmp_path):
    bold, seg = bold_and_seg
    small, big = tmp_path / "small.nii.gz", tmp_path / "big.nii.gz"
    assert main(["moco-mask", "-i", str(bold), "-s", str(seg), "-o", str(small), "-size", "10", "-v", "0"]) == 0
    assert main(["moco-mask", "-i", str(bold), "-s", str(seg), "-o", str(big), "-size", "20", "-v", "0"]) == 0
    n_small = np.asarray(nib.load(str(small)).dataobj).sum()
    n_big = np.asarray(nib.load(str(big)).dataobj).sum()
    assert 3.5 < n_big / n_small < 4.5  # area grows with the square of the diameter


def test_bad_input_is_one_line_and_exit_1(bold_and_seg, tmp_path, capsys):
    bold, _ = bold_and_seg
    empty = tmp_path / "empty.nii.gz"
    img = nib.load(str(bold))
    nib.save(nib.Nifti1Image(np.zeros(img.shape[:3], np.uint8), img.affine), str(empty))
    assert main(["moco-mask", "-i", str(bold), "-s", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "empty" in err and err.count("\n") == 1
    assert main(["moco-mask", "-i", str(bold), "-s", str(tmp_path / "nope.nii.gz")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_usage_errors_exit_2(bold_and_seg, capsys):
    bold, seg = bold_and_seg
    with pytest.raises(SystemExit) as e:
        main(["moco-mask", "-i", str(bold)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["moco-mask", "-i", str(bold), "-s", str(seg), "-size", "-3"])
    assert e.value.code == 2 and "-size must be a positive diameter" in capsys.readouterr().err


def test_fmri_pipeline_without_sct_names_the_tool(bold_and_seg, monkeypatch, tmp_path, capsys):
    bold, _ = bold_and_seg
    monkeypatch.setenv("PATH", str(tmp_path / "no-sct"))
    assert main(["fmri-pipeline", "-i", str(bold)]) == 1
    assert "sct_maths is not on PATH" in capsys.readouterr().err
