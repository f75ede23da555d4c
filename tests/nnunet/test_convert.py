"""Imported nnU-Net v2 models against nnunetv2's own nnUNetPredictor.

Models are planned by nnU-Net's own experiment planner on tiny synthetic EPI-like data
(the networks are then shrunk so that they run in milliseconds); the same NIfTI goes
through nnUNetPredictor and through this engine. Targets (issue 6): binary masks with
Dice >= 0.99 and probabilities within 1e-3 on >= 99.9 % of voxels.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

pytest.importorskip("nnunetv2")
torch = pytest.importorskip("torch")

from sct_deepseg_epi import api  # noqa: E402
from sct_deepseg_epi.nnunet.convert import import_nnunet, recipe_from_plans  # noqa: E402
from nnunet_synthetic import plan_dataset, synthetic_case, write_trained  # noqa: E402
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


def _save_oriented(arr_ras: np.ndarray, zooms, axcodes: str, path: Path) -> Path:
    """Store a RAS array in another voxel order (e.g. LPS), with a matching affine."""
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes))
    ras_aff = np.diag(list(zooms) + [1.0])
    ras_aff[:3, 3] = [-12.0, 7.0, 40.0]
    affine = ras_aff @ inv_ornt_aff(t, arr_ras.shape)
    img = nib.Nifti1Image(apply_orientation(arr_ras, t).astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _test_image(tmp: Path, axcodes: str = "RAS", shape=(37, 33, 7), zooms=(1.1, 0.9, 4.4), seed=11,
                zero_band: bool = False) -> Path:
    """A case unlike the training ones: other size and spacing (so resampling runs)."""
    img, _ = synthetic_case(shape, zooms, seed)
    if zero_band:
        img[:5] = 0  # crop-to-nonzero and the non-zero mask matter
    return _save_oriented(img, zooms, axcodes, tmp / f"test_{axcodes}_{seed}.nii.gz")


def nnunet_reference(folder: Path, image: Path, reader: str, mirroring: bool = True):
    """nnUNetPredictor on ``image``: (labels, probabilities (K, ...)) on the stored voxel grid."""
    from nnunetv2.imageio import nibabel_reader_writer as nrw
    from nnunetv2.imageio import simpleitk_reader_writer as srw
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    rw = {"SimpleITKIO": srw.SimpleITKIO, "NibabelIO": nrw.NibabelIO,
          "NibabelIOWithReorient": nrw.NibabelIOWithReorient}[reader]()
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                           perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                           verbose_preprocessing=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(folder), use_folds=None)
    if _counts_fold_0_twice(pred):
        _average_folds_as_stock_nnunet_does(pred)
    data, props = rw.read_images([str(image)])
    seg, probs = pred.predict_single_npy_array(data, props, None, None, True)
    seg, probs = seg.transpose(2, 1, 0), probs.transpose(0, 3, 2, 1)  # reader order (z, y, x) -> (x, y, z)
    if reader == "NibabelIOWithReorient":  # undo the reorientation to the closest canonical axes
        back = ornt_transform(axcodes2ornt("RAS"), io_orientation(nib.load(str(image)).affine))
        seg = apply_orientation(seg, back)
        probs = np.stack([apply_orientation(p, back) for p in probs])
    return seg, probs


def _counts_fold_0_twice(pred) -> bool:
    """True for SCT's nnU-Net fork (nnunetv2-neuropoly 2.6), whose fold averaging adds the
    first fold's logits twice (an ``if`` where nnunetv2 has ``else``): its logits are
    (2 L0 + L1 + ... + Lk-1) / k. Found by running it, not by its version."""
    patch = tuple(pred.configuration_manager.patch_size)
    x = torch.zeros((1,) + ((1,) if len(patch) == 2 else ()) + patch)  # (c, z, y, x): a 2d model slides over z
    x[(0,) + tuple(n // 2 for n in x.shape[1:])] = 1.0
    one = pred.predict_sliding_window_return_logits(x)
    params = pred.list_of_parameters
    pred.list_of_parameters = params[:1]
    try:
        averaged = pred.predict_logits_from_preprocessed_data(x)
    finally:
        pred.list_of_parameters = params
    return not torch.allclose(averaged, one, atol=1e-3) and torch.allclose(averaged, 2 * one, atol=1e-3)


def _average_folds_as_stock_nnunet_does(pred) -> None:
    """The reference is nnU-Net's own inference: the mean of the folds' logits."""
    def average(data, **_):  # the fork passes return_logits_per_fold=False
        total = None
        for params in pred.list_of_parameters:
            pred.network.load_state_dict(params)
            logits = pred.predict_sliding_window_return_logits(data).to("cpu")
            total = logits if total is None else total + logits
        return total / len(pred.list_of_parameters)

    pred.predict_logits_from_preprocessed_data = average


def ours(model: Path, image: Path, tta: bool = True):
    seg = api.segment(image, model=str(model), threads=1, tta=tta)
    return np.asarray(seg.mask.dataobj), np.asarray(seg.probability.dataobj), seg


def check_parity(mask, prob_fg, ref_seg, ref_fg, what: str):
    a, b = mask > 0, ref_seg > 0
    assert b.any() and (~b).any(), f"{what}: degenerate reference (all one class)"
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    diff = np.abs(prob_fg - ref_fg)
    within = float((diff <= 1e-3).mean())
    print(f"parity {what}: Dice {dice:.4f}, {within:.4%} within 1e-3, max diff {diff.max():.2g}")  # pytest -s
    assert dice >= 0.99, f"{what}: Dice {dice:.4f}"
    assert within >= 0.999, f"{what}: only {within:.4%} of probabilities within 1e-3 (max diff {diff.max():.3g})"
    return dice, within


# ------------------------------------------------------------------------------------------ parity

def test_3d_fullres_one_fold_matches_nnunet(planned, tmp_path):
    root, plans, dj, raw = planned
    folder = write_trained(tmp_path / "trained", plans, dj, configuration="3d_fullres", folds=1,
                           patch_size=[4, 24, 24], train_steps=12, raw=raw)
    model = import_nnunet(folder, tmp_path / "model")
    spec = load_manifest(model)
    assert spec.nnunet.configuration == "3d_fullres" and spec.nnunet.patch_size == (4, 24, 24)
    assert spec.extra["provenance"]["source"]["kind"] == "nnunet"
    image = _test_image(tmp_path)
    ref_seg, ref_probs = nnunet_reference(folder, image, "SimpleITKIO")
    mask, prob, seg = ours(model, image)
    check_parity(mask, prob, ref_seg, ref_probs[1], "3d_fullres")
    assert np.array_equal(mask, ref_seg.astype(np.uint8)) or (mask != ref_seg).mean() < 1e-3
    assert seg.mask.shape == nib.load(str(image)).shape


def test_2d_five_folds_reoriented_image_matches_nnunet(planned, tmp_path):
    root, plans, dj, raw = planned
    folder = write_trained(tmp_path / "trained", plans, dj, configuration="2d", folds=5,
                           patch_size=[24, 24], reader="NibabelIOWithReorient", train_steps=10, raw=raw)
    model = import_nnunet(folder, tmp_path / "model")
    assert len(load_manifest(model).members) == 5
    image = _test_image(tmp_path, axcodes="LPS")
    ref_seg, ref_probs = nnunet_reference(folder, image, "NibabelIOWithReorient")
    mask, prob, seg = ours(model, image)
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
    model = import_nnunet(folder, tmp_path / "model")
    image = _test_image(tmp_path, axcodes="LAS", zero_band=True)
    ref_seg, ref_probs = nnunet_reference(folder, image, reader, mirroring=False)
    mask, prob, _ = ours(model, image, tta=False)
    check_parity(mask, prob, ref_seg, ref_probs[1], scheme)


@pytest.mark.slow
def test_3d_five_folds_without_mirroring_matches_nnunet(planned, tmp_path):
    root, plans, dj, raw = planned
    folder = write_trained(tmp_path / "trained", plans, dj, configuration="3d_fullres", folds=5,
                           patch_size=[4, 24, 24], logit_scale=8.0)
    model = import_nnunet(folder, tmp_path / "model")
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
    model = import_nnunet(folder, tmp_path / "model")
    spec = load_manifest(model)
    assert spec.nnunet.has_regions and spec.backend.kind == "nnunet"
    image = _test_image(tmp_path)
    ref_seg, ref_probs = nnunet_reference(folder, image, "SimpleITKIO")
    mask, prob, _ = ours(model, image)
    check_parity(mask, prob, ref_seg, ref_probs.max(axis=0), "regions")
    assert (mask == ref_seg).mean() >= 0.999  # the label values too, not only foreground


# ------------------------------------------------------------------------------ import mechanics

def test_zip_url_manifest_and_cli(planned, tmp_path):
    root, plans, dj, raw = planned
    folder = write_trained(tmp_path / "Dataset501_Synth", plans, dj, configuration="2d", folds=2,
                           patch_size=[24, 24], logit_scale=4.0)
    archive = tmp_path / "model_seg_sc_epi_nnunet.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in folder.rglob("*"):
            z.write(p, p.relative_to(tmp_path))
    from sct_deepseg_epi.cli import main

    assert main(["import-nnunet", archive.as_uri(), "-o", str(tmp_path / "m"), "-name", "epi_nnunet"]) == 0
    spec = load_manifest(tmp_path / "m")
    assert spec.name == "epi_nnunet" and [m.file for m in spec.members] == ["fold_0.onnx", "fold_1.onnx"]
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
    # an existing output is not overwritten by accident
    assert main(["import-nnunet", str(archive), "-o", str(tmp_path / "m")]) == 1
    # the segment command runs it like any model
    image = _test_image(tmp_path)
    out = tmp_path / "seg.nii.gz"
    assert main(["-i", str(image), "-model", str(tmp_path / "m"), "-o", str(out)]) == 0
    assert nib.load(str(out)).shape == nib.load(str(image)).shape


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
