"""``sct_deepseg_epi evaluate``: files and folders, printed and written metrics."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from sct_deepseg_epi.cli import main


def save(path, arr, zooms=(0.5, 0.5, 3.0), ornt="LAS"):
    aff = np.diag([-zooms[0] if ornt == "LAS" else zooms[0], zooms[1], zooms[2], 1.0])
    if ornt == "LAS":  # x runs right to left from the same rightmost voxel: the RAS grid, stored flipped
        aff[0, 3] = (arr.shape[0] - 1) * zooms[0]
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), aff), path)
    return path


@pytest.fixture
def masks():
    ref = np.zeros((6, 6, 3), np.uint8)
    ref[1:3, 1:3, 0] = 1          # 4 voxels on slice 0
    ref[1:3, 1:3, 1] = 1          # 4 voxels on slice 1 (missed below)
    pred = np.zeros_like(ref)
    pred[1:3, 1:4, 0] = 1         # 6 voxels on slice 0, 4 shared
    pred[4, 4, 2] = 1             # false positive on slice 2
    return pred, ref


def test_files_tsv(tmp_path, masks, capsys):
    pred, ref = masks
    p, r = save(tmp_path / "a_seg.nii.gz", pred), save(tmp_path / "a_ref.nii.gz", ref)
    out = tmp_path / "m.tsv"
    assert main(["evaluate", "-pred", str(p), "-ref", str(r), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MISSED" in text and "false positive" in text
    rows = list(csv.DictReader(open(out), delimiter="\t"))
    vol = rows[0]
    # volume: |P| = 7, |R| = 8, |P&R| = 4 -> Dice 8/15; RVD (7-8)/8; detection 1 of 2 slices
    assert float(vol["dice"]) == pytest.approx(8 / 15, abs=1e-4)
    assert float(vol["rvd"]) == pytest.approx(-1 / 8, abs=1e-4)
    assert float(vol["detection_rate"]) == pytest.approx(0.5)
    s0, s1, s2 = rows[1:4]
    assert float(s0["dice"]) == pytest.approx(0.8, abs=1e-4)   # 2*4 / (6+4)
    assert float(s1["dice"]) == 0.0 and s1["hd95_mm"] == "nan"  # missed: distance undefined
    assert float(s0["area_ref_mm2"]) == pytest.approx(1.0)     # 4 voxels of 0.25 mm2


def test_folders_matched_by_name_json(tmp_path, masks):
    pred, ref = masks
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    save(tmp_path / "p" / "sub-01_bold_seg.nii.gz", pred)
    save(tmp_path / "r" / "sub-01_bold_seg-manual.nii.gz", ref)
    save(tmp_path / "p" / "sub-02_bold_seg.nii.gz", ref)
    save(tmp_path / "r" / "sub-02_bold_seg-manual.nii.gz", ref)
    out = tmp_path / "m.json"
    assert main(["evaluate", "-pred", str(tmp_path / "p"), "-ref", str(tmp_path / "r"), "-o", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [round(v["dice"], 4) for v in d["volumes"]] == [round(8 / 15, 4), 1.0]
    assert len(d["slices"]) == 6


def test_grid_mismatch_is_one_line_error(tmp_path, masks, capsys):
    pred, ref = masks
    p = save(tmp_path / "a.nii.gz", pred)
    r = save(tmp_path / "b.nii.gz", ref[:5])
    assert main(["evaluate", "-pred", str(p), "-ref", str(r)]) == 1
    assert "differs from the reference" in capsys.readouterr().err


def test_orientation_is_handled(tmp_path, masks):
    # the same mask stored LAS and RAS (flipped data) must match perfectly
    _, ref = masks
    p = save(tmp_path / "las.nii.gz", ref, ornt="LAS")
    r = save(tmp_path / "ras.nii.gz", ref[::-1], ornt="RAS")
    out = tmp_path / "m.json"
    assert main(["evaluate", "-pred", str(p), "-ref", str(r), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["volumes"][0]["dice"] == 1.0


def test_folder_maps_beside_the_masks_are_not_predictions(tmp_path, masks):
    pred, ref = masks
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    save(tmp_path / "p" / "sub-01_bold_seg.nii.gz", pred)
    save(tmp_path / "p" / "sub-01_bold_seg_soft.nii.gz", ref)  # -soft 1 writes these beside the mask
    save(tmp_path / "p" / "sub-01_bold_seg_disagreement.nii.gz", ref)
    save(tmp_path / "r" / "sub-01_bold_seg-manual.nii.gz", ref)
    out = tmp_path / "m.json"
    assert main(["evaluate", "-pred", str(tmp_path / "p"), "-ref", str(tmp_path / "r"), "-o", str(out)]) == 0
    assert [round(v["dice"], 4) for v in json.loads(out.read_text())["volumes"]] == [round(8 / 15, 4)]
