"""A run that fails leaves no output: destinations are checked before any work, files are written to
temporaries and renamed together, and a QC report that fails afterwards takes the run's files with it."""
from __future__ import annotations

import nibabel as nib
import pytest
from conftest import blob_image
from hostile import one_line_error, readonly_dir  # noqa: F401  (fixture)

from sct_deepseg_epi.cli import main


def _files(folder):
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in ("in.nii.gz", "models-cache") and not p.name.startswith("ro-"))


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in.nii.gz"
    nib.save(blob_image()[0], str(p))
    return p


def test_folder_named_like_the_sidecar(tiny_model, src, capsys):
    (src.parent / "side.json").mkdir()
    assert main(["-i", str(src), "-o", str(src.parent / "side.nii.gz"), "-model", "tiny"]) == 1
    assert "side.json: is a folder; the sidecar cannot be written there" in one_line_error(capsys)
    assert _files(src.parent) == ["side.json"]


def test_folder_named_like_the_soft_map(tiny_model, src, capsys):
    (src.parent / "m_soft.nii.gz").mkdir()
    assert main(["-i", str(src), "-o", str(src.parent / "m.nii.gz"), "-soft", "1", "-model", "tiny"]) == 1
    assert "m_soft.nii.gz: is a folder" in one_line_error(capsys)
    assert _files(src.parent) == ["m_soft.nii.gz"]


def test_qc_into_a_read_only_folder(tiny_model, src, readonly_dir, capsys):
    assert main(["-i", str(src), "-model", "tiny", "-qc", str(readonly_dir / "qc")]) == 1
    line = one_line_error(capsys)
    assert "QC folder" in line and ("Read-only file system" in line or "Permission denied" in line)
    assert _files(src.parent) == []  # no mask, sidecar or disagreement map


def test_qc_page_named_like_a_folder_is_refused_before_any_work(tiny_model, src, capsys):
    qc = src.parent / "qc"
    (qc / "ds.html").mkdir(parents=True)  # the page cannot replace a folder: checked like the mask
    assert main(["-i", str(src), "-model", "tiny", "-qc", str(qc), "-qc-dataset", "ds"]) == 1
    assert "ds.html: is a folder" in one_line_error(capsys)
    assert _files(src.parent) == ["qc"] and sorted(p.name for p in qc.iterdir()) == ["ds.html"]


def test_qc_failing_after_the_run_removes_its_files(tiny_model, src, capsys, monkeypatch):
    import errno

    from sct_deepseg_epi import qc as qc_module

    def full_disk(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qc_module, "render_page", full_disk)  # the report fails at its very end
    assert main(["-i", str(src), "-model", "tiny", "-qc", str(src.parent / "qc"), "-qc-dataset", "ds"]) == 1
    line = one_line_error(capsys)
    assert "cannot write the QC report" in line and "no output was kept" in line
    assert _files(src.parent) == []  # nor the QC folder the run made


def test_qc_that_works_keeps_everything(tiny_model, src):
    assert main(["-i", str(src), "-model", "tiny", "-qc", str(src.parent / "qc"), "-v", "0"]) == 0
    assert _files(src.parent) == ["in_seg.json", "in_seg.nii.gz", "in_seg_disagreement.nii.gz", "qc"]


def test_demo_into_a_read_only_folder(readonly_dir, capsys):
    assert main(["demo", "-o", str(readonly_dir)]) == 1
    assert "not writable" in one_line_error(capsys)


def test_demo_that_fails_leaves_no_phantom(model_root, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "-model", "nope"]) == 1
    assert "unknown model 'nope'" in one_line_error(capsys)
    assert not out.exists()
