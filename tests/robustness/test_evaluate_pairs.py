"""``evaluate`` on pairs that do not share a grid, and on an empty reference: one line, valid JSON."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from hostile import one_line_error

from sct_deepseg_epi.cli import main


def _mask(shape=(20, 20, 5)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[8:12, 8:12] = 1
    return m


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("affine", [np.eye(4), np.diag([-1.0, -1.0, 1.0, 1.0])], ids=["ras", "lps"])
def test_2d_prediction_against_3d_reference_is_the_grid_line(tmp_path, capsys, affine):
    """A 2D file used to reach nibabel's orientation code: OrientationError traceback (LPS affine)."""
    ref = _save(tmp_path / "ref.nii.gz", _mask(), affine)
    pred = _save(tmp_path / "pred.nii.gz", _mask()[:, :, 2], affine)
    assert main(["evaluate", "-pred", str(pred), "-ref", str(ref)]) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"error: {pred}: grid (20, 20, 1)") and "differs from the reference" in line


def test_empty_reference_writes_valid_json(tmp_path, capsys):
    """Distances to an empty mask are undefined: null in the JSON (NaN is not JSON), nan in the TSV."""
    ref = _save(tmp_path / "ref.nii.gz", np.zeros((20, 20, 5), np.uint8))
    pred = _save(tmp_path / "pred.nii.gz", _mask())
    out = tmp_path / "m.json"
    assert main(["evaluate", "-pred", str(pred), "-ref", str(ref), "-o", str(out)]) == 0

    def refuse(token):
        raise AssertionError(f"{token} in {out}: not JSON")

    doc = json.loads(out.read_text(), parse_constant=refuse)  # strict: NaN/Infinity are refused
    vol = doc["volumes"][0]
    assert vol["dice"] == 0.0 and vol["hd95_mm"] is None and vol["msd_mm"] is None and vol["rvd"] is None
    assert all(s["hd95_mm"] is None for s in doc["slices"])
    tsv = tmp_path / "m.tsv"
    assert main(["evaluate", "-pred", str(pred), "-ref", str(ref), "-o", str(tsv)]) == 0
    header, first = tsv.read_text().splitlines()[:2]
    assert dict(zip(header.split("\t"), first.split("\t")))["hd95_mm"] == "nan"  # as documented


@pytest.mark.parametrize("move", ["shift", "rotate"])
def test_same_shape_but_other_place_is_refused(tmp_path, capsys, move):
    """Origins 5 mm apart (or axes swapped) used to be scored voxel by voxel: Dice 1.0, exit 0."""
    ref = _save(tmp_path / "ref.nii.gz", _mask())
    moved = np.eye(4)
    if move == "shift":
        moved[0, 3] = 5.0
    else:
        moved[:2, :2] = [[0, -1], [1, 0]]
    pred = _save(tmp_path / "pred.nii.gz", _mask(), moved)
    out = tmp_path / "m.tsv"
    assert main(["evaluate", "-pred", str(pred), "-ref", str(ref), "-o", str(out)]) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"error: {pred}: ") and "pairs must share a voxel grid" in line
    assert ("5 mm apart" in line) == (move == "shift")
    assert not out.exists()


def test_float_noise_in_the_affine_is_the_same_grid(tmp_path, capsys):
    """A qform/sform round trip moves an origin by far less than a micrometre: still the same grid."""
    ref = _save(tmp_path / "ref.nii.gz", _mask())
    noisy = np.eye(4)
    noisy[:3, 3] = 1e-5
    pred = _save(tmp_path / "pred.nii.gz", _mask(), noisy)
    assert main(["evaluate", "-pred", str(pred), "-ref", str(ref)]) == 0
