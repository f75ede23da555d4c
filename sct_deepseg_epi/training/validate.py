"""Validation on a real labelled EPI volume, with robustness to cropped and shifted fields of view.

numpy only: the prediction is a callable ``(N, C, H, W) float32 -> (N, 1, H, W) probabilities``
(an ensemble of torch models while training, onnxruntime sessions after export), so the
same numbers can be computed before and after export. Images go through the engine's own
:func:`~sct_deepseg_epi.preprocess.prepare` / :func:`~sct_deepseg_epi.preprocess.restore`.
No postprocessing is applied: these are the network's raw thresholded masks.
"""
from __future__ import annotations

import math
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
