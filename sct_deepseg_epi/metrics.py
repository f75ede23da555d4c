"""Segmentation metrics (numpy only): Dice, 95% Hausdorff, mean surface distance, volume difference.

Conventions follow MetricsReloaded (Maier-Hein et al., 2024) for empty masks:

* Dice: both reference and prediction empty -> 1.0 (a correct "nothing here");
  exactly one empty -> 0.0.
* Distances (HD95, MSD): both empty -> 0.0; exactly one empty -> ``nan`` (undefined: there
  is no surface to measure from), reported as such rather than as an arbitrary penalty.
* Relative volume difference ``(|P| - |R|) / |R|``: reference empty -> ``nan`` unless the
  prediction is empty too (0.0).

Distances are in mm: voxel spacing comes from the image affine (``zooms``). Surfaces are the
mask voxels with at least one 6-neighbour (4 in 2D) outside the mask; the distance from a
surface voxel to the other surface is the Euclidean distance between voxel centres. The
symmetric HD95 is the 95th percentile of the pooled directed distances in both directions,
and MSD their mean (the "average symmetric surface distance").
"""
from __future__ import annotations


import numpy as np


def _b(a) -> np.ndarray:
    return np.asarray(a) > 0.5 if np.asarray(a).dtype.kind == "f" else np.asarray(a).astype(bool)


def dice(pred, ref) -> float:
    """Dice similarity coefficient 2|P&R| / (|P| + |R|); 1.0 when both are empty."""
    p, r = _b(pred), _b(ref)
    s = int(p.sum()) + int(r.sum())
    if s == 0:
        return 1.0
    return 2.0 * int((p & r).sum()) / s


def relative_volume_difference(pred, ref) -> float:
    """(|P| - |R|) / |R|; 0 when both are empty, nan when only the reference is."""
    p, r = int(_b(pred).sum()), int(_b(ref).sum())
    if r == 0:
        return 0.0 if p == 0 else float("nan")
    return (p - r) / r


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the image border counts as outside)."""
    m = _b(mask)
    inner = m.copy()
    for ax in range(m.ndim):
        if m.shape[ax] == 1:
            continue  # a single-slice axis has no neighbours along it (2D mask in 3D form)
        padded = np.pad(m, [(1, 1) if a == ax else (0, 0) for a in range(m.ndim)])
        sl_lo = [slice(None)] * m.ndim
        sl_hi = [slice(None)] * m.ndim
        sl_lo[ax] = slice(0, -2)
        sl_hi[ax] = slice(2, None)
        inner &= padded[tuple(sl_lo)] & padded[tuple(sl_hi)]
    return m & ~inner


def _directed(a_pts: np.ndarray, b_pts: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each point of a, the distance to the closest point of b (brute force, chunked)."""
    out = np.empty(len(a_pts))
    for i in range(0, len(a_pts), chunk):
        d = ((a_pts[i:i + chunk, None, :] - b_pts[None, :, :]) ** 2).sum(axis=2)
        out[i:i + chunk] = np.sqrt(d.min(axis=1))
    return out


def surface_distances(pred, ref, zooms) -> tuple[np.ndarray, np.ndarray] | None:
    """Directed surface distances pred->ref and ref->pred in mm; None if either mask is empty."""
    p, r = _b(pred), _b(ref)
    if not p.any() or not r.any():
        return None
    z = np.asarray(zooms, dtype=np.float64)[: p.ndim]
    sp = np.argwhere(surface(p)) * z
    sr = np.argwhere(surface(r)) * z
    return _directed(sp, sr), _directed(sr, sp)


def _empty_distance(pred, ref) -> float:
    return 0.0 if not _b(pred).any() and not _b(ref).any() else float("nan")


def hausdorff95(pred, ref, zooms) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (0 if both empty, nan if one is)."""
    d = surface_distances(pred, ref, zooms)
    if d is None:
        return _empty_distance(pred, ref)
    return float(np.percentile(np.concatenate(d), 95))


def mean_surface_distance(pred, ref, zooms) -> float:
    """Average symmetric surface distance in mm (0 if both empty, nan if one is)."""
    d = surface_distances(pred, ref, zooms)
    if d is None:
        return _empty_distance(pred, ref)
    return float(np.concatenate(d).mean())


def detection(pred, ref, axis: int = 2) -> dict:
    """Slice-wise detection along ``axis``: a slice is positive when its mask is not empty.

    Returns counts of true/false positives/negatives and the detection rate (recall over
    the reference's non-empty slices; nan when the reference has none).
    """
    p = np.moveaxis(_b(pred), axis, 0).reshape(np.shape(pred)[axis], -1).any(axis=1)
    r = np.moveaxis(_b(ref), axis, 0).reshape(np.shape(ref)[axis], -1).any(axis=1)
    tp, fp = int((p & r).sum()), int((p & ~r).sum())
    fn, tn = int((~p & r).sum()), int((~p & ~r).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "rate": tp / (tp + fn) if tp + fn else float("nan")}


def volume_metrics(pred, ref, zooms) -> dict:
    """All per-volume metrics of one prediction against one reference (same grid)."""
    det = detection(pred, ref)
    vox = float(np.prod(zooms[:3]))
    return {"dice": dice(pred, ref), "hd95_mm": hausdorff95(pred, ref, zooms),
            "msd_mm": mean_surface_distance(pred, ref, zooms),
            "rvd": relative_volume_difference(pred, ref),
            "vol_pred_mm3": float(_b(pred).sum()) * vox, "vol_ref_mm3": float(_b(ref).sum()) * vox,
            "detection_rate": det["rate"], "slices_fp": det["fp"], "slices_fn": det["fn"]}


def slice_metrics(pred, ref, zooms) -> list[dict]:
    """Per axial slice (last axis) metrics; distances in the slice plane only."""
    rows = []
    for k in range(np.shape(ref)[2]):
        p, r = _b(pred)[:, :, k], _b(ref)[:, :, k]
        rows.append({"slice": k, "dice": dice(p, r), "hd95_mm": hausdorff95(p, r, zooms[:2]),
                     "msd_mm": mean_surface_distance(p, r, zooms[:2]), "rvd": relative_volume_difference(p, r),
                     "area_pred_mm2": float(p.sum()) * zooms[0] * zooms[1],
                     "area_ref_mm2": float(r.sum()) * zooms[0] * zooms[1],
                     "detected": bool(p.any()) if r.any() else (not p.any())})
    return rows
