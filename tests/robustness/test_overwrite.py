"""No sub-command may overwrite one of its inputs: every path a run will write (mask, sidecar, soft and
disagreement maps, QC, metrics, moco mask, pipeline files, model folders) is checked against every input
before any work is done."""
from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image, make_model_folder
from hostile import one_line_error
from test_handoff import fake_sct, pam50, series  # noqa: F401  (fixtures: fake SCT tools, PAM50)

from sct_deepseg_epi.cli import main


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def image(tmp_path):
    img, mask = blob_image()
    return img, mask


@pytest.mark.parametrize("name, flags", [("x_soft.nii.gz", ["-soft", "1"]),
                                          ("y_disagreement.nii.gz", ["-disagreement", "1"]),
                                          ("z_disagreement.nii.gz", ["-qc", "QC"])])
def test_derived_map_would_overwrite_the_input(tiny_model, tmp_path, capsys, image, name, flags):
    """``-i x_soft.nii.gz -o x.nii.gz -soft 1`` used to replace the input by the soft map."""
    src = tmp_path / name
    nib.save(image[0], str(src))
    before = digest(src)
    out = tmp_path / name.replace("_soft", "").replace("_disagreement", "")
    flags = [str(tmp_path / f) if f == "QC" else f for f in flags]
    assert main(["-i", str(src), "-o", str(out), "-model", "nope", *flags]) == 1  # refused before the model is looked up
    line = one_line_error(capsys)
    assert f"{src}: the" in line and "path is the input" in line
    assert digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "models-cache") == [name]


def test_output_reaching_the_input_through_a_symlink(tiny_model, tmp_path, capsys, image):
    src = tmp_path / "in.nii.gz"
    nib.save(image[0], str(src))
    before = digest(src)
    (tmp_path / "out_soft.nii.gz").symlink_to(src)
    assert main(["-i", str(src), "-o", str(tmp_path / "out.nii.gz"), "-soft", "1", "-model", "tiny"]) == 1
    assert "is the input" in one_line_error(capsys)
    assert digest(src) == before and not (tmp_path / "out.nii.gz").exists()


@pytest.fixture
def bold_and_seg(tmp_path):
    img, mask = blob_image(n_volumes=3)
    bold, seg = tmp_path / "bold.nii.gz", tmp_path / "in_seg.nii.gz"
    nib.save(img, str(bold))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), str(seg))
    return bold, seg


@pytest.mark.parametrize("which", ["bold", "seg"])
def test_moco_mask_output_is_an_input(bold_and_seg, capsys, which):
    bold, seg = bold_and_seg
    target = bold if which == "bold" else seg
    before = digest(target)
    assert main(["moco-mask", "-i", str(bold), "-s", str(seg), "-o", str(target)]) == 1
    line = one_line_error(capsys)
    assert f"{target}: the moco mask path is the input" in line
    assert digest(target) == before


def test_evaluate_metrics_through_a_symlink_to_the_prediction(tmp_path, capsys):
    _, mask = blob_image()
    pred, ref = tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz"
    for p in (pred, ref):
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(p))
    before = digest(pred)
    (tmp_path / "metrics.tsv").symlink_to(pred)
    assert main(["evaluate", "-pred", str(pred), "-ref", str(ref), "-o", str(tmp_path / "metrics.tsv")]) == 1
    assert "the metrics table path is the input" in one_line_error(capsys)
    assert digest(pred) == before


def test_fmri_pipeline_seg_named_like_its_moco_mask(fake_sct, pam50, series, capsys):
    """``-s mask_fmri.nii.gz`` in the output folder: step 3 would have overwritten it."""
    seg = series.parent / "mask_fmri.nii.gz"
    img = nib.load(str(series))
    nib.save(nib.Nifti1Image(np.asarray(blob_image()[1], np.uint8), img.affine), str(seg))
    before = digest(seg)
    assert main(["fmri-pipeline", "-i", str(series), "-s", str(seg), "-model", "tiny", "-template", str(pam50)]) == 1
    assert "the mask path is the input" in one_line_error(capsys)
    assert digest(seg) == before
    assert not fake_sct.exists()  # no SCT step ran


def test_fmri_pipeline_warp_in_the_output_folder(fake_sct, pam50, series, capsys):
    w1, w2 = series.parent / "warp_template2fmri.nii.gz", series.parent / "warp_t2s2template.nii.gz"
    for w in (w1, w2):
        w.write_bytes(b"warp")
    assert main(["fmri-pipeline", "-i", str(series), "-initwarp", str(w1), "-initwarpinv", str(w2),
                 "-model", "tiny", "-template", str(pam50)]) == 1
    assert "warp_template2fmri path is the input" in one_line_error(capsys)
    assert w1.read_bytes() == b"warp" and not fake_sct.exists()


def test_fmri_pipeline_template_inside_its_label_copy(fake_sct, pam50, series, tmp_path, capsys):
    """sct_warp_template writes the whole template under OFOLDER/label: the template may not live there."""
    out = pam50.parent / "out"
    (out / "label").mkdir(parents=True)
    moved = out / "label" / "PAM50"
    pam50.rename(moved)
    before = digest(moved / "template" / "PAM50_t2s.nii.gz")
    assert main(["fmri-pipeline", "-i", str(series), "-ofolder", str(out), "-model", "tiny",
                 "-template", str(moved)]) == 1
    assert "template copy (label/)" in one_line_error(capsys)
    assert digest(moved / "template" / "PAM50_t2s.nii.gz") == before and not fake_sct.exists()


def test_fmri_pipeline_qc_folder_is_an_input(fake_sct, pam50, series, capsys):
    assert main(["fmri-pipeline", "-i", str(series), "-model", "tiny", "-template", str(pam50),
                 "-qc", str(series)]) == 1
    assert "QC folder" in one_line_error(capsys)
    assert not fake_sct.exists()


def test_fmri_pipeline_failed_check_leaves_no_new_folder(fake_sct, pam50, series, capsys):
    out = series.parent / "derivatives"
    long_stem = "f" * 240
    long_input = series.parent / f"{long_stem}.nii.gz"
    series.rename(long_input)
    assert main(["fmri-pipeline", "-i", str(long_input), "-ofolder", str(out), "-model", "tiny",
                 "-template", str(pam50)]) == 1
    assert "file name is" in one_line_error(capsys)
    assert not out.exists() and not fake_sct.exists()


def test_train_checkpoint_inside_the_model_folder(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["train", "-data", str(tmp_path), "-o", str(out), "-checkpoint", str(out / "member0.onnx")]) == 1
    assert "would be written twice" in one_line_error(capsys)
    assert not out.exists()


def test_train_output_is_the_model_it_fine_tunes(tmp_path, model_root, capsys):
    folder = make_model_folder(tmp_path / "mine", name="mine")
    before = {p.name: digest(p) for p in folder.iterdir()}
    assert main(["train", "-data", str(tmp_path), "-init-model", str(folder), "-o", str(folder)]) == 1
    assert "path is the input" in one_line_error(capsys)
    assert {p.name: digest(p) for p in folder.iterdir()} == before


def test_train_checkpoint_is_the_validation_image(tmp_path, capsys):
    img, mask = blob_image()
    val = tmp_path / "val.nii.gz"
    nib.save(img, str(val))
    before = digest(val)
    assert main(["train", "-data", str(tmp_path), "-o", str(tmp_path / "model"), "-val-image", str(val),
                 "-val-mask", str(val), "-checkpoint", str(val)]) == 1
    assert "the checkpoint path is the input" in one_line_error(capsys)
    assert digest(val) == before and not (tmp_path / "model").exists()


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_import_nnunet_output_overlapping_its_source(tmp_path, capsys, where):
    """With -overwrite 1 the old output folder is removed: that must never be the source."""
    src = tmp_path / "Dataset101_Cord" / "nnUNetTrainer__nnUNetPlans__2d"
    (src / "fold_0").mkdir(parents=True)
    (src / "plans.json").write_text("{}")
    out = {"same": src, "parent": src.parent, "inside": src / "onnx"}[where]
    assert main(["import-nnunet", str(src), "-o", str(out), "-overwrite", "1"]) == 1
    assert "overlaps the input" in one_line_error(capsys)
    assert (src / "plans.json").read_text() == "{}" and (src / "fold_0").is_dir()
