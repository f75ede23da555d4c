"""QC reports: the standalone page (content, one page per dataset, rendering in
headless Chromium when installed), the -qc flag, and SCT's report where SCT is importable."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_image
from sct_deepseg_epi import qc
from sct_deepseg_epi.cli import main


@pytest.fixture
def segmented(tmp_path):
    """A 4D series in BIDS-like folders, its mask (LPI storage) with one empty slice, and a disagreement map."""
    img, disc = blob_image(shape=(30, 28, 5), zooms=(1.0, 1.0, 4.0), axcodes="LPI", n_volumes=3, radius=3.0)
    d = tmp_path / "ds" / "sub-01" / "func"
    d.mkdir(parents=True)
    bold = d / "bold.nii.gz"
    nib.save(img, str(bold))
    mask = disc.copy()
    mask[:, :, 0] = 0  # stored z=0 is the most superior slice in LPI
    nib.save(nib.Nifti1Image(mask, img.affine), str(d / "bold_seg.nii.gz"))
    nib.save(nib.Nifti1Image(mask * np.float32(0.1), img.affine), str(d / "bold_seg_disagreement.nii.gz"))
    return bold, d / "bold_seg.nii.gz", d / "bold_seg_disagreement.nii.gz", mask


def test_html_page_per_dataset_with_mosaic_and_metrics(segmented, tmp_path):
    bold, seg, dis, mask = segmented
    page = qc.html_report(bold, seg, tmp_path / "qc", dis, command=["sct_deepseg_epi", "-i", str(bold)])
    assert page == tmp_path / "qc" / "ds.html"  # dataset and subject from the folders, as SCT does
    text = page.read_text()
    assert "sub-01" in text and "bold.nii.gz" in text
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(imgs) == 5 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert not re.search(r'(src|href)="(?!data:|#)', text)  # self-contained: nothing outside the page
    assert "cord in 4 of 5 slices" in text and "z=4 &middot; no cord" in text  # RAS z=4 is stored z=0 (LPI)
    assert f"{mask[..., 2].sum():g} mm&sup2;" in text  # 1 x 1 mm voxels
    assert "mean disagreement in the mask 0.1" in text
    assert page.stat().st_mode & 0o044  # readable by others, like any report


def test_entries_accumulate_and_rerun_replaces(segmented, tmp_path):
    bold, seg, dis, _ = segmented
    other = bold.parent.parent.parent / "sub-02" / "func"
    other.mkdir(parents=True)
    for p in (bold, seg):
        shutil.copy(p, other / p.name)
    folder = tmp_path / "qc"
    qc.html_report(bold, seg, folder, dis)
    qc.html_report(other / bold.name, other / seg.name, folder)
    page = qc.html_report(bold, seg, folder, dis)  # again: replaces sub-01's section
    text = page.read_text()
    assert text.count("<h2 ") == 2 and "sub-02" in text
    assert qc.html_report(bold, seg, folder, dataset="other").name == "other.html"


def test_4d_mask_gives_one_mosaic_per_volume(segmented, tmp_path, monkeypatch):
    bold, _, _, mask = segmented
    seg4 = np.repeat(mask[..., None], 3, axis=-1)
    seg4[..., 2:, 2] = 0  # the last volume has cord in one slice only (stored z=0 is empty already)
    img = nib.load(str(bold))
    nib.save(nib.Nifti1Image(seg4, img.affine), str(tmp_path / "seg4.nii.gz"))
    monkeypatch.setattr(qc, "MAX_VOLUMES", 2)
    entry = qc.build_entry(bold, tmp_path / "seg4.nii.gz")
    assert entry["n_volumes"] == 3 and entry["volumes_shown"] == [0, 2]
    assert [v["label"] for v in entry["volumes"]] == ["volume 0", "volume 2"]
    assert entry["slices_with_cord"] == [4, 4, 1]


def test_qc_refuses_a_mask_on_another_grid(segmented, tmp_path):
    bold, _, _, _ = segmented
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(tmp_path / "small.nii.gz"))
    with pytest.raises(qc.InputError, match="not on the grid"):
        qc.html_report(bold, tmp_path / "small.nii.gz", tmp_path / "qc")


def test_cli_qc_flag_writes_report_and_disagreement(tiny_model, segmented, tmp_path, monkeypatch):
    monkeypatch.setattr(qc, "sct_available", lambda: False)
    bold, _, _, _ = segmented
    out = tmp_path / "out_seg.nii.gz"
    assert main(["-i", str(bold), "-o", str(out), "-model", "tiny", "-qc", str(tmp_path / "qc"),
                 "-qc-dataset", "study", "-qc-subject", "s1", "-v", "0"]) == 0
    assert (tmp_path / "out_seg_disagreement.nii.gz").is_file()
    text = (tmp_path / "qc" / "study.html").read_text()
    assert "s1" in text and "model tiny@1.0.0" in text and "-qc-subject s1" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium (Debian package) is not installed")
def test_page_renders_in_headless_chromium(segmented, tmp_path):
    bold, seg, dis, _ = segmented
    page = qc.html_report(bold, seg, tmp_path / "qc", dis)
    shot = tmp_path / "shot.png"
    r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=900,700",
                        f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-500:]
    png = shot.read_bytes()
    w, h = struct.unpack(">II", png[16:24])
    assert (w, h) == (900, 700)
    assert len(png) > 20_000  # a rendered page with images, not a blank one (~1-3 kB)


@pytest.mark.sct
@pytest.mark.skipif(not qc.sct_available(), reason="SCT (spinalcordtoolbox.reports.qc2) is not importable")
def test_sct_report_lands_in_sct_index(segmented, tmp_path):
    bold, seg, _, _ = segmented
    index = qc.report(bold, seg, tmp_path / "qc", command=["sct_deepseg", "seg_sc_epi", "-i", str(bold)])
    assert index == (tmp_path / "qc" / "index.html").resolve() or index == tmp_path / "qc" / "index.html"
    entries = list((tmp_path / "qc" / "_json").glob("qc_*.json"))
    assert len(entries) == 1
    import json

    e = json.loads(entries[0].read_text())
    assert e["command"] == "sct_deepseg" and e["inputFile"] == "bold.nii.gz" and e["subject"] == "sub-01"
    assert Path(tmp_path / "qc" / e["backgroundImage"]).is_file() and Path(tmp_path / "qc" / e["overlayImage"]).is_file()


def test_flagged_slices_from_the_sidecar_are_marked_in_the_pages_order(segmented, tmp_path):
    import json

    bold, seg, dis, _ = segmented
    rows = [{"slice": k, "flag": k == 1, "reasons": ["area_jump", "weak_evidence"] if k == 1 else []} for k in range(5)]
    (seg.parent / "bold_seg.json").write_text(json.dumps({"model": {"name": "m", "version": "1.0.0"}, "slices": rows}))
    entry = qc.build_entry(bold, seg, dis)
    assert entry["flagged"] == [3]  # stored slice 1 of an LPI file is RAS z=3
    page = qc.html_report(bold, seg, tmp_path / "qc", dis).read_text()
    assert page.count('<figure class="flag">') == 1
    assert "check: area jump, weak evidence (file slice 1)" in page and "1 slice(s) to check first: z=3" in page
    (seg.parent / "bold_seg.json").write_text(json.dumps({"model": {"name": "m", "version": "1.0.0"}}))
    assert qc.build_entry(bold, seg, dis)["flagged"] == []  # a sidecar from before: nothing marked


def test_cli_qc_marks_a_slice_without_cord_between_cord_slices(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(qc, "sct_available", lambda: False)
    img, _ = blob_image(shape=(30, 28, 5), zooms=(1.0, 1.0, 4.0), radius=3.0)
    data = np.asarray(img.dataobj).copy()
    data[:, :, 2] = 100.0
    p = tmp_path / "gap.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(p))
    assert main(["-i", str(p), "-model", "tiny", "-qc", str(tmp_path / "qc"), "-qc-dataset", "d", "-v", "0"]) == 0
    text = (tmp_path / "qc" / "d.html").read_text()
    assert text.count('<figure class="flag">') == 1 and "check: gap" in text


def test_cli_qc_marks_the_prompted_slices(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(qc, "sct_available", lambda: False)
    img, _ = blob_image(shape=(30, 28, 5), zooms=(1.0, 1.0, 4.0), radius=3.0, axcodes="LPI")
    data = np.asarray(img.dataobj).copy()
    data[:, :, 2] *= 0.1  # the cord is missed on this slice without a point
    p = tmp_path / "dim.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(p))
    labels = np.zeros(data.shape, np.uint8)
    labels[9, 9, 2] = 1  # the disc: RAS (20, 18), stored LPI
    nib.save(nib.Nifti1Image(labels, img.affine), str(tmp_path / "points.nii.gz"))
    assert main(["-i", str(p), "-model", "tiny", "-prompt", str(tmp_path / "points.nii.gz"), "-qc",
                 str(tmp_path / "qc"), "-qc-dataset", "d", "-v", "0"]) == 0
    text = (tmp_path / "qc" / "d.html").read_text()
    assert text.count('<figure class="prompt">') == 1 and "point: cord (rerun+outline)" in text
    assert qc.build_entry(p, tmp_path / "dim_seg.nii.gz")["prompted"] == [2]  # stored slice 2 of 5 in LPI: z=2
