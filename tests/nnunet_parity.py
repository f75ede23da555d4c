"""References for the parity tests of imported nnU-Net models: nnunetv2's nnUNetPredictor run
the two ways an nnU-Net model is run on a NIfTI file.

* :func:`nnunet_reference`: ``nnUNetv2_predict``'s way, nnU-Net's image reader on the file
  as stored (the ``nnunet`` convention).
* :func:`sct_reference`: ``sct_deepseg``'s way (the ``sct`` convention), written from the
  steps SCT documents for its nnU-Net models: reorient the image to the model's orientation
  (SCT's "LPI", nibabel's RAS), swap the x and z axes, call
  ``nnUNetPredictor.predict_single_npy_array`` with the spacing reversed the same way,
  swap back and reorient back to the file's orientation. No mirroring unless asked, as
  SCT's ``-test-time-aug`` is off by default.

Needs torch and nnunetv2; the targets are those of the nnU-Net issue: binary masks with
Dice >= 0.99, probabilities within 1e-3 on >= 99.9 % of voxels.
"""
from __future__ import annotations

from pathlib import Path
import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from nnunet_synthetic import synthetic_case


def rotation(degrees_x: float, degrees_z: float) -> np.ndarray:
    """A 3x3 rotation about x, then about z (an oblique acquisition)."""
    ax, az = np.radians(degrees_x), np.radians(degrees_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def save_oriented(arr_ras: np.ndarray, zooms, axcodes: str, path: Path, oblique: tuple[float, float] | None = None
                  ) -> Path:
    """Store a RAS array in another voxel order (e.g. LAS), with a matching affine, tilted if ``oblique``."""
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes))
    ras_aff = np.diag(list(zooms) + [1.0])
    ras_aff[:3, 3] = [-12.0, 7.0, 40.0]
    affine = ras_aff @ inv_ornt_aff(t, arr_ras.shape)
    if oblique is not None:
        tilt = np.eye(4)
        tilt[:3, :3] = rotation(*oblique)
        affine = tilt @ affine
    img = nib.Nifti1Image(apply_orientation(arr_ras, t).astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def case_image(tmp: Path, axcodes: str = "RAS", shape=(37, 33, 7), zooms=(1.1, 0.9, 4.4), seed=11,
               zero_band: bool = False, oblique: tuple[float, float] | None = None) -> Path:
    """A case unlike the training ones: other size and spacing (so resampling runs)."""
    img, _ = synthetic_case(shape, zooms, seed)
    if zero_band:
        img[:5] = 0  # crop-to-nonzero and the non-zero mask matter
    tag = f"{axcodes}_{seed}" + ("_oblique" if oblique else "")
    return save_oriented(img, zooms, axcodes, tmp / f"test_{tag}.nii.gz", oblique)


def predictor(folder: Path, mirroring: bool):
    """nnUNetPredictor with the settings SCT and nnUNetv2_predict share (step 0.5, Gaussian, CPU)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                           perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                           verbose_preprocessing=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(folder), use_folds=None)
    if counts_fold_0_twice(pred):
        average_folds_as_stock_nnunet_does(pred)
    return pred


def nnunet_reference(folder: Path, image: Path, reader: str, mirroring: bool = True):
    """nnUNetPredictor on ``image`` through nnU-Net's reader: (labels, probabilities (K, ...)) on the stored grid."""
    from nnunetv2.imageio import nibabel_reader_writer as nrw
    from nnunetv2.imageio import simpleitk_reader_writer as srw

    rw = {"SimpleITKIO": srw.SimpleITKIO, "NibabelIO": nrw.NibabelIO,
          "NibabelIOWithReorient": nrw.NibabelIOWithReorient}[reader]()
    pred = predictor(folder, mirroring)
    data, props = rw.read_images([str(image)])
    seg, probs = pred.predict_single_npy_array(data, props, None, None, True)
    seg, probs = seg.transpose(2, 1, 0), probs.transpose(0, 3, 2, 1)  # reader order (z, y, x) -> (x, y, z)
    if reader == "NibabelIOWithReorient":  # undo the reorientation to the closest canonical axes
        back = ornt_transform(axcodes2ornt("RAS"), io_orientation(nib.load(str(image)).affine))
        seg = apply_orientation(seg, back)
        probs = np.stack([apply_orientation(p, back) for p in probs])
    return seg, probs


def sct_reference(folder: Path, image: Path, mirroring: bool = False, orientation: str = "RAS", pred=None):
    """SCT's steps around nnUNetPredictor: (labels, probabilities (K, ...)) on the stored grid of ``image``."""
    img = nib.load(str(image))
    # the file's orientation is read from its affine, as SCT does (nibabel's axis codes of the best affine)
    stored = io_orientation(img.affine)
    to_model = ornt_transform(stored, axcodes2ornt(orientation))
    back = ornt_transform(axcodes2ornt(orientation), stored)
    data = apply_orientation(np.asarray(img.dataobj, np.float32), to_model)
    # the header's voxel sizes follow the axes: model axis to_model[i, 0] is stored axis i
    zooms = [0.0, 0.0, 0.0]
    for i, z in enumerate(img.header.get_zooms()[:3]):
        zooms[int(to_model[i, 0])] = float(z)
    pred = pred or predictor(folder, mirroring)
    seg, probs = pred.predict_single_npy_array(np.ascontiguousarray(data.transpose(2, 1, 0))[None],
                                               {"spacing": zooms[::-1]}, None, None, True)
    seg = apply_orientation(seg.transpose(2, 1, 0), back)
    probs = np.stack([apply_orientation(p.transpose(2, 1, 0), back) for p in probs])
    return seg, probs


def counts_fold_0_twice(pred) -> bool:
    """True for SCT's nnU-Net fork (nnunetv2-neuropoly 2.6), whose fold averaging adds the
    first fold's logits twice (an ``if`` where nnunetv2 has ``else``): its logits are
    (2 L0 + L1 + ... + Lk-1) / k. Found by running it, not by its version."""
    import torch

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


def average_folds_as_stock_nnunet_does(pred) -> None:
    """The reference is nnU-Net's own inference: the mean of the folds' logits."""
    def average(data, **_):  # the fork passes return_logits_per_fold=False
        total = None
        for params in pred.list_of_parameters:
            pred.network.load_state_dict(params)
            logits = pred.predict_sliding_window_return_logits(data).to("cpu")
            total = logits if total is None else total + logits
        return total / len(pred.list_of_parameters)

    pred.predict_logits_from_preprocessed_data = average


def parity(mask, prob_fg, ref_seg, ref_fg) -> tuple[float, float, float]:
    """(Dice of the binary masks, fraction of probabilities within 1e-3, max probability difference)."""
    a, b = mask > 0, ref_seg > 0
    dice = 2 * (a & b).sum() / max(1, a.sum() + b.sum())
    diff = np.abs(prob_fg - ref_fg)
    return float(dice), float((diff <= 1e-3).mean()), float(diff.max())


def check_parity(mask, prob_fg, ref_seg, ref_fg, what: str) -> tuple[float, float]:
    b = ref_seg > 0
    assert b.any() and (~b).any(), f"{what}: degenerate reference (all one class)"
    dice, within, worst = parity(mask, prob_fg, ref_seg, ref_fg)
    print(f"parity {what}: Dice {dice:.4f}, {within:.4%} within 1e-3, max diff {worst:.2g}")  # pytest -s
    assert dice >= 0.99, f"{what}: Dice {dice:.4f}"
    assert within >= 0.999, f"{what}: only {within:.4%} of probabilities within 1e-3 (max diff {worst:.3g})"
    return dice, within


def with_convention(model: Path, convention: str, dest: Path) -> Path:
    """A copy of an imported model folder whose manifest says ``convention`` (the members are linked)."""
    import json

    dest.mkdir(parents=True)
    for p in model.glob("*.onnx"):
        (dest / p.name).symlink_to(p)
    d = json.loads((model / "manifest.json").read_text())
    d["backend"]["convention"] = convention
    if convention != "sct":
        d["backend"].pop("orientation", None)
    (dest / "manifest.json").write_text(json.dumps(d, indent=2))
    return dest


def fg_probability(probs: np.ndarray) -> np.ndarray:
    return 1.0 - probs[0] if probs.shape[0] > 1 else probs[0]
