"""Imported nnU-Net v2 models against nnunetv2's own nnUNetPredictor, through nnU-Net's readers.

Models are planned by nnU-Net's own experiment planner on tiny synthetic EPI-like data
(the networks are then shrunk so that they run in milliseconds); the same NIfTI goes
through nnUNetPredictor and through this engine. The models here are imported with the
``nnunet`` convention (the reader's axes); test_conventions.py holds SCT's. Targets:
binary masks with Dice >= 0.99 and probabilities within 1e-3 on >= 99.9 % of voxels.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nnunetv2")
torch = pytest.importorskip("torch")

from sct_deepseg_epi import api  # noqa: E402
from sct_deepseg_epi.nnunet.convert import import_nnunet, recipe_from_plans  # noqa: E402
from nnunet_parity import case_image as _test_image, check_parity, nnunet_reference  # noqa: E402
from nnunet_synthetic import plan_dataset, write_trained  # noqa: E402
from sct_deepseg_epi.errors import ModelError  # noqa: E402
from sct_deepseg_epi.registry.manifest import load_manifest, spec_from_dict, spec_to_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ZOOMS = (1.0, 1.0, 4.0)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One synthetic dataset planned by nnU-Net (2d and 3d_fullres plans)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nnunet")
    plans, dj, raw = plan_dataset(root, shape=(40, 36, 8), zooms=ZOOMS)
    assert {"2d", "3d_fullres"} <= set(plans["configurations"])
    return root, plans, dj, raw


def ours(model: Path, image: Path, tta: bool | None = None):
    seg = api.segment(image, model=str(model), threads=1, tta=tta)
    return np.asarray(seg.mask.dataobj), np.asarray(seg.probability.dataobj), seg


# ------------------------------------------------------------------------------------------ parity

def test_3d_fullres_one_fold_matches_nnunet(planned, tmp_path):
    root, plans, dj, raw = planned
    folder = write_trained(tmp_path / "trained", plans, dj, configuration="3d_fullres", folds=1,
                           patch_size=[4, 24, 24], train_steps=12, raw=raw)
    model = import_nnunet(folder, tmp_path / "model", convention="nnunet")
    spec = load_manifest(model)
    assert spec.nnunet.configuration == "3d_fullres" and spec.nnunet.patch_size == (4, 24, 24)
    assert spec.nnunet.convention == "nnunet"
    assert spec.extra["provenance"]["source"]["kind"] == "nnunet"
    image = _test_image(tmp_path)
    ref_seg, ref_probs = nnunet_reference(folder, image, "SimpleITKIO")
    mask, prob, seg = ours(model, image, tta=True)
    check_parity(mask, prob, ref_seg, ref_probs[1], "3d_fullres")
    assert np.array_equal(mask, ref_seg.astype(np.uint8)) or (mask != ref_seg).mean() < 1e-3
    assert seg.mask.shape == nib.load(str(image)).shape


def test_2d_five_folds_reoriented_image_matches_nnunet(planned, tmp_path):
    root, plans, dj, raw = planned
    folder = write_trained(tmp_path / "trained", plans, dj, configuration="2d", folds=5,
                           patch_size=[24, 24], reader="NibabelIOWithReorient", train_steps=10, raw=raw)
    model = import_nnunet(folder, tmp_path / "model", convention="nnunet")
    assert len(load_manifest(model).members) == 5
    image = _test_image(tmp_path, axcodes="LPS")
    ref_seg, ref_probs = nnunet_reference(folder, image, "NibabelIOWithReorient")
    mask, prob, seg = ours(model, image, tta=True)
    check_parity(mask, prob, ref_seg, ref_probs[1], "2d x5 LPS")
    dis = np.asarray(seg.disagreement.dataobj)
    assert dis.max() > 0  # five different folds disagree somewhere


@pytest.mark.parametrize("scheme,use_mask,reader", [
    ("CTNormalization", False, "SimpleITKIO"),
    ("ZScoreNormalization", True, "NibabelIO"),
    ("RescaleTo01Normalization", False, "SimpleITKIO"),
    ("NoNormalization", False, "SimpleITKIO"),
])
def test_normalisations_readers_and_cropping_match_nnunet(planned, tmp_path, scheme, use_mask, reader):
    root, plans, dj, raw = planned
    folder = write_trained(tmp_path / "trained", plans, dj, configuration="2d", folds=1, patch_size=[24, 24],
                           normalisation=scheme, use_mask_for_norm=use_mask, reader=reader, logit_scale=8.0)
    model = import_nnunet(folder, tmp_path / "model", convention="nnunet")
    image = _test_image(tmp_path, axcodes="LAS", zero_band=True)
    ref_seg, ref_probs = nnunet_reference(folder, image, reader, mirroring=False)
    mask, prob, _ = ours(model, image, tta=False)
    check_parity(mask, prob, ref_seg, ref_probs[1], scheme)


@pytest.mark.slow
def test_3d_five_folds_without_mirroring_matches_nnunet(planned, tmp_path):
    root, plans, dj, raw = planned
    folder = write_trained(tmp_path / "trained", plans, dj, configuration="3d_fullres", folds=5,
                           patch_size=[4, 24, 24], logit_scale=8.0)
    model = import_nnunet(folder, tmp_path / "model", convention="nnunet")
    image = _test_image(tmp_path, axcodes="LPI", seed=12)
    for tta in (False, True):
        ref_seg, ref_probs = nnunet_reference(folder, image, "SimpleITKIO", mirroring=tta)
        mask, prob, _ = ours(model, image, tta=tta)
        check_parity(mask, prob, ref_seg, ref_probs[1], f"3d x5 tta={tta}")


@pytest.mark.slow
def test_region_based_model_matches_nnunet(tmp_path):
    plans, dj, raw = plan_dataset(tmp_path / "nn", dataset_id=502, shape=(40, 36, 8), zooms=ZOOMS,
                                  labels={"background": 0, "cord": [1, 2], "centre": 2}, regions_class_order=[1, 2])
    folder = write_trained(tmp_path / "trained", plans, dj, configuration="2d", folds=2, patch_size=[24, 24],
                           logit_scale=8.0)
    model = import_nnunet(folder, tmp_path / "model", convention="nnunet")
    spec = load_manifest(model)
    assert spec.nnunet.has_regions and spec.backend.kind == "nnunet"
    image = _test_image(tmp_path)
    ref_seg, ref_probs = nnunet_reference(folder, image, "SimpleITKIO")
    mask, prob, _ = ours(model, image, tta=True)
    check_parity(mask, prob, ref_seg, ref_probs.max(axis=0), "regions")
    assert (mask == ref_seg).mean() >= 0.999  # the label values too, not only foreground


# ------------------------------------------------------------------------------ import mechanics

def test_zip_url_manifest_and_cli(planned, tmp_path, model_root, capsys):
    root, plans, dj, raw = planned
    folder = write_trained(tmp_path / "Dataset501_Synth", plans, dj, configuration="2d", folds=2,
                           patch_size=[24, 24], logit_scale=4.0)
    archive = tmp_path / "model_seg_sc_epi_nnunet.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in folder.rglob("*"):
            z.write(p, p.relative_to(tmp_path))
    from sct_deepseg_epi.cli import main

    installed = model_root / "epi_nnunet" / "1.0.0"
    assert main(["import-nnunet", archive.as_uri(), "-o", str(installed), "-name", "epi_nnunet",
                 "-convention", "nnunet"]) == 0
    assert "convention nnunet (SimpleITKIO axes)" in capsys.readouterr().out
    spec = load_manifest(installed)
    assert spec.name == "epi_nnunet" and [m.file for m in spec.members] == ["fold_0.onnx", "fold_1.onnx"]
    assert spec.nnunet.convention == "nnunet"
    # -list-models says which convention an imported model follows
    assert main(["-list-models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("epi_nnunet@1.0.0"))
    assert "nnU-Net 2d, convention nnunet" in line
    src = spec.extra["provenance"]["source"]
    assert src["kind"] == "nnunet" and len(src["checkpoints"]) == 2
    assert all(len(c["sha256"]) == 64 for c in src["checkpoints"])
    # the manifest round-trips and stays strict
    d = spec_to_dict(spec)
    assert spec_to_dict(spec_from_dict(d)) == d
    bad = json.loads(json.dumps(d))
    assert d["schema_version"] == 2 and d["backend"]["kind"] == "nnunet" and "input" not in d and "tta" not in d
    bad["backend"]["tile_overlap"] = 0.5
    with pytest.raises(ModelError, match="tile_overlap"):
        spec_from_dict(bad)
    # the convention: strict, and a manifest from before the field means nnU-Net's reader axes
    for key, value, match in (("convention", "itk", "convention"), ("orientation", "LPS", "only for the sct")):
        bad = json.loads(json.dumps(d))
        bad["backend"][key] = value
        with pytest.raises(ModelError, match=match):
            spec_from_dict(bad)
    old = json.loads(json.dumps(d))
    del old["backend"]["convention"]
    assert spec_from_dict(old).nnunet.convention == "nnunet"
    assert spec_to_dict(spec_from_dict(old))["backend"]["convention"] == "nnunet"
    sct = json.loads(json.dumps(d))
    sct["backend"].update(convention="sct", orientation="PSR")
    assert spec_from_dict(sct).nnunet.orientation == "PSR"
    sct["backend"]["orientation"] = "RRS"
    with pytest.raises(ModelError, match="axis codes"):
        spec_from_dict(sct)
    # an existing output is not overwritten by accident
    assert main(["import-nnunet", str(archive), "-o", str(installed)]) == 1
    # the segment command runs it like any model; the sidecar records the convention and the flips
    image = _test_image(tmp_path)
    out = tmp_path / "seg.nii.gz"
    assert main(["-i", str(image), "-model", "epi_nnunet", "-o", str(out)]) == 0
    assert nib.load(str(out)).shape == nib.load(str(image)).shape
    side = json.loads((tmp_path / "seg.json").read_text())
    assert side["model"]["convention"] == "nnunet" and side["tta"] is False  # no mirroring unless -tta 1
    assert main(["-i", str(image), "-model", "epi_nnunet", "-o", str(out), "-tta", "1"]) == 0
    assert json.loads((tmp_path / "seg.json").read_text())["tta"] is True


# ------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change,feature", [
    (lambda p, d: p["configurations"].update(
        {"3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}), "cascade"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(normalization_schemes=["MyFancyNormalization"]),
     "normalisation"),
    (lambda p, d: p.update(image_reader_writer="Tiff3DIO"), "image reader"),
    (lambda p, d: d["channel_names"].update({"1": "T2w"}), "input channels"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(resampling_fn_data="resample_torch_fornnunet"),
     "resampling"),
])
def test_unsupported_models_are_refused_naming_the_feature(planned, change, feature):
    root, plans, dj, raw = planned
    p, d = json.loads(json.dumps(plans)), json.loads(json.dumps(dj))
    change(p, d)
    config = "3d_cascade_fullres" if feature == "cascade" else "3d_fullres"
    with pytest.raises(ModelError, match=f"unsupported nnU-Net model: {feature}"):
        recipe_from_plans(p, d, config, (0, 1, 2))


def test_refusal_through_the_command_line(planned, tmp_path, capsys):
    root, plans, dj, raw = planned
    p = json.loads(json.dumps(plans))
    p["image_reader_writer"] = "Tiff3DIO"
    folder = write_trained(tmp_path / "trained", p, dj, configuration="2d", folds=1, patch_size=[24, 24])
    from sct_deepseg_epi.cli import main

    assert main(["import-nnunet", str(folder), "-o", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "image reader" in err and "Tiff3DIO" in err
    assert not (tmp_path / "m").exists()


def test_no_model_in_source_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no nnU-Net model here"):
        import_nnunet(tmp_path / "empty", tmp_path / "m")


class _RunsCode:
    def __reduce__(self):  # unpickling would call print(): a stand-in for arbitrary code
        return (print, ("this checkpoint ran code",))


def test_checkpoints_load_without_running_code(tmp_path, capsys):
    from sct_deepseg_epi.nnunet.convert import load_checkpoint

    torch.save({"x": _RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="cannot load this checkpoint safely"):
        load_checkpoint(tmp_path / "evil.pth")
    assert "ran code" not in capsys.readouterr().out
    # numpy floats in training logs load, also when written under numpy 1 (numpy.core.multiarray)
    torch.save({"logging": [np.float64(0.5)], "w": torch.zeros(2)}, tmp_path / "np2.pth")
    with zipfile.ZipFile(tmp_path / "np2.pth") as zin, zipfile.ZipFile(tmp_path / "np1.pth", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)
    for name in ("np2.pth", "np1.pth"):
        assert load_checkpoint(tmp_path / name)["logging"] == [0.5]


def test_the_sct_convention_takes_the_models_orientation_as_sct_does(planned):
    root, plans, dj, raw = planned
    p, d = json.loads(json.dumps(plans)), json.loads(json.dumps(dj))
    assert recipe_from_plans(p, d, "2d", (0, 1))["orientation"] == "RAS"  # SCT's "LPI"
    assert "orientation" not in recipe_from_plans(p, d, "2d", (0, 1), convention="nnunet")
    d["image_orientation"] = "AIL"  # SCT's notation in dataset.json: nibabel's PSR
    assert recipe_from_plans(p, d, "2d", (0, 1))["orientation"] == "PSR"
    p["dataset_name"] = "Dataset901_RegionBasedLesionSeg"
    assert recipe_from_plans(p, dj, "2d", (0, 1))["orientation"] == "PSR"
    d["image_orientation"] = "LPL"
    with pytest.raises(ModelError, match="image_orientation 'LPL'"):
        recipe_from_plans(p, d, "2d", (0, 1))
    with pytest.raises(ModelError, match="convention 'itk'"):
        recipe_from_plans(p, dj, "2d", (0, 1), convention="itk")
