"""Sub-commands fail with one line, never a traceback: evaluate on a damaged mask, demo -o onto a file."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image
from hostile import one_line_error

from sct_deepseg_epi.cli import main


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_evaluate_truncated_pred(tmp_path, capsys, suffix):
    _, mask = blob_image()
    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(ref))
    whole = tmp_path / f"whole{suffix}"
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(whole))
    pred = tmp_path / f"pred{suffix}"
    raw = gzip.decompress(whole.read_bytes()) if suffix == ".nii.gz" else whole.read_bytes()
    cut = raw[: len(raw) // 2]
    pred.write_bytes(gzip.compress(cut)[:-12] if suffix == ".nii.gz" else cut)  # gzip without its end: EOFError
    assert main(["evaluate", "-pred", str(pred), "-ref", str(ref)]) == 1
    line = one_line_error(capsys)
    assert str(pred) in line and "truncated" in line


def test_demo_output_is_an_existing_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert main(["demo", "-o", str(target)]) == 1
    assert f"{target}: is a file; -o takes a folder" in one_line_error(capsys)
    assert target.read_text() == "keep me"


def test_demo_output_under_a_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert main(["demo", "-o", str(target / "sub")]) == 1
    assert "cannot create the output folder" in one_line_error(capsys)


def test_train_without_torch_is_one_line(tmp_path):
    """``import-nnunet`` already said it in one line; ``train`` ended in an ImportError traceback."""
    import subprocess
    import sys

    from hostile import REPO

    code = ("import sys; sys.modules['torch'] = None\n"  # what an install without the 'train' extra sees
            "from sct_deepseg_epi.cli import main\n"
            f"sys.exit(main(['train', '-data', {str(tmp_path)!r}, '-o', {str(tmp_path / 'model')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("error: torch is needed for this command but is not installed: "
                                   "pip install 'sct_deepseg_epi[train]'")
