"""Validation on a real labelled EPI volume, with robustness to cropped and shifted fields of view.

numpy only: the prediction is a callable ``(N, C, H, W) float32 -> (N, 1, H, W) probabilities``
(an ensemble of torch models while training, onnxruntime sessions after export), so the
same numbers can be computed before and after export. Images go through the engine's own
:func:`~sct_deepseg_epi.preprocess.prepare` / :func:`~sct_deepseg_epi.preprocess.restore`.
No postprocessing is applied: these are the network's raw thresholded masks.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from .. import metrics
from ..preprocess import prepare, restore
from ..registry.manifest import ModelSpec

Predict = Callable[[np.ndarray], np.ndarray]


def predict_volume(predict: Predict, vol: np.ndarray, zooms, spec: ModelSpec) -> np.ndarray:
    """RAS volume -> probability map on its grid (flip TTA along the declared axes, averaged)."""
    prep = prepare(vol, zooms, spec)
    x = prep.batch
    probs = predict(x)
    n = 1
    for ax in spec.tta_flip_axes:
        probs = probs + np.flip(predict(np.ascontiguousarray(np.flip(x, axis=2 + ax))), axis=2 + ax)
        n += 1
    return restore((probs / n)[:, 0], prep)


def _dice_summary(pred: np.ndarray, ref: np.ndarray, zooms) -> dict:
    per_slice = [metrics.dice(pred[:, :, k], ref[:, :, k]) for k in range(ref.shape[2])]
    with_cord = [k for k in range(ref.shape[2]) if ref[:, :, k].any()]
    detected = [k for k in with_cord if pred[:, :, k].any()]
    return {"dice": metrics.dice(pred, ref), "dice_per_slice": per_slice,
            "slices_with_cord": len(with_cord), "slices_detected": len(detected),
            "hd95_mm": metrics.hausdorff95(pred, ref, zooms), "rvd": metrics.relative_volume_difference(pred, ref)}


def robustness(predict: Predict, vol: np.ndarray, ref: np.ndarray, zooms, spec: ModelSpec,
               edge_mm: float = 4.0, shift_mm: float = 3.0) -> dict:
    """Dice on the full FOV, on FOVs cropped so the cord is ``edge_mm`` from each edge, and shifted.

    Cropping: for each of the four in-plane sides, the FOV is cut so the cord's outermost
    voxel lies ``edge_mm`` from that side. Shifting: the FOV is moved by ``shift_mm`` (rounded
    up to whole voxels) towards each side (the voxels leaving the FOV are dropped). The drop
    reported is full-FOV Dice minus the worst of the four.
    """
    thr = spec.threshold
    full = _dice_summary(predict_volume(predict, vol, zooms, spec) >= thr, ref > 0.5, zooms)
    ii, jj = np.nonzero(ref.any(axis=2))
    out = {"full": full, "crop": {}, "shift": {}}
    for ax, (lo, hi) in enumerate(((ii.min(), ii.max()), (jj.min(), jj.max()))):
        m = int(round(edge_mm / zooms[ax]))
        s = int(math.ceil(shift_mm / zooms[ax] - 1e-6))
        n = vol.shape[ax]
        cuts = {"crop": {f"{'xy'[ax]}-low": (max(0, lo - m), n), f"{'xy'[ax]}-high": (0, min(n, hi + 1 + m))},
                "shift": {f"{'xy'[ax]}-low": (s, n), f"{'xy'[ax]}-high": (0, n - s)}}
        for kind, sides in cuts.items():
            for side, (a, b) in sides.items():
                sl = [slice(None)] * 3
                sl[ax] = slice(a, b)
                v, r = vol[tuple(sl)], ref[tuple(sl)]
                pred = predict_volume(predict, v, zooms, spec) >= thr
                out[kind][side] = _dice_summary(pred, r > 0.5, zooms)
    for kind in ("crop", "shift"):
        worst = min(d["dice"] for d in out[kind].values())
        out[f"{kind}_worst_dice"] = worst
        out[f"{kind}_drop"] = full["dice"] - worst
    return out


# ---------------------------------------------------------------- held-out simulated set
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def heldout_config():
    """Simulation settings of the held-out set: whole EPI-like stacks (8-20 thick slices),
    half of them topped by C1-C2; otherwise the training ranges (coil fall-off, weak
    contrast, partial-volume end slices included)."""
    from .simulate import SimConfig

    return replace(SimConfig(), n_slices=(8, 20), top_prob=0.5, fov_mm=(80.0, 200.0))


def heldout_simulated(n: int = 16, seed: int = 2013, data: Path | str | None = None) -> list:
    """A fixed held-out set of simulated EPI stacks from subjects no model was trained on.

    Parameters: ``n`` stacks; ``seed`` (stack i depends only on ``(seed, i)``, so the same
    call always returns the same images); ``data`` the shared data folder (default
    ``../shared/data`` next to the repository; :class:`~sct_deepseg_epi.errors.InputError`
    when it is missing). The sources are the ``train-source`` pairs of the subjects in
    :data:`.data.HELDOUT_GROUPS` (errsm_18: sagittal T2w resliced axially and axial GRE;
    errsm_21: sagittal T2w), drawn in turn.

    Returns ``[(name, image, mask), ...]``: ``name`` like ``heldout03_errsm_18-gre``;
    ``image`` a float32 ``nibabel.Nifti1Image`` (X, Y, Z) of 8-20 thick axial slices
    (3-10 mm, in-plane 0.8-2.5 mm) with every artefact of the simulator; ``mask`` its
    binary cord mask (uint8, the partial-volume mask at >= 0.5) on the same grid. The
    affines are scanner-like: stored LAS or LPS (drawn per stack), voxel sizes from the
    simulation, origin a few cm from the isocentre, qform and sform code 1.
    """
    import nibabel as nib

    from ..errors import InputError
    from .data import HELDOUT_GROUPS, discover, load_source, unique_names
    from .simulate import simulate

    root = Path(data) if data is not None else SHARED_DATA
    if not (root / "MANIFEST.tsv").is_file():
        raise InputError(f"{root}: no MANIFEST.tsv (the held-out simulated set needs the shared data)")
    pairs = discover(root)
    names = unique_names(pairs)
    chosen = [(p, nm) for p, nm in zip(pairs, names) if p.group in HELDOUT_GROUPS]
    if not chosen:
        raise InputError(f"{root}: none of the held-out subjects {HELDOUT_GROUPS} is in the manifest")
    sources = [load_source(p, nm) for p, nm in chosen]
    cfg = heldout_config()
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        src = sources[i % len(sources)]
        sim = simulate(src, rng, cfg)
        img, msk = sim.image, (sim.mask >= 0.5).astype(np.uint8)
        zx, zy, zz = sim.zooms
        flip_y = bool(rng.random() < 0.5)  # LAS or LPS on disk, like scanners write EPI
        origin = np.array([zx * img.shape[0] / 2, -zy * img.shape[1] / 2, -zz * img.shape[2] / 2])
        origin += rng.normal(0, 20, 3)
        aff = np.diag([-zx, zy, zz, 1.0])
        aff[:3, 3] = origin
        img_d, msk_d = img[::-1], msk[::-1]  # RAS array -> stored L (x flipped)
        if flip_y:
            aff[1, 1] = -zy
            aff[1, 3] = origin[1] + zy * img.shape[1]
            img_d, msk_d = img_d[:, ::-1], msk_d[:, ::-1]
        name = f"heldout{i:02d}_{src.name.replace('/', '-')}"
        images = []
        for arr, dtype in ((img_d, np.float32), (msk_d, np.uint8)):
            im = nib.Nifti1Image(np.ascontiguousarray(arr, dtype=dtype), aff)
            im.set_qform(aff, code=1)
            im.set_sform(aff, code=1)
            images.append(im)
        out.append((name, images[0], images[1]))
    return out


def write_heldout(folder: Path | str, n: int = 16, seed: int = 2013, data: Path | str | None = None) -> list[str]:
    """Write :func:`heldout_simulated` as ``<name>.nii.gz`` + ``<name>_seg.nii.gz`` (for ``evaluate``)."""
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, img, msk in heldout_simulated(n, seed, data):
        nib.save(img, folder / f"{name}.nii.gz")
        nib.save(msk, folder / f"{name}_seg.nii.gz")
        names.append(name)
    return names
