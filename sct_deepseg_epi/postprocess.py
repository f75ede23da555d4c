"""Stage 4, postprocess: probabilities on the native RAS grid -> a clean binary mask.

Connected components are computed with numpy alone (label propagation with pointer
jumping on the mask's bounding box), which keeps scipy out of the inference dependencies;
cord masks are small, so this costs milliseconds.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .registry.manifest import parse_size


@dataclass(frozen=True)
class PostOptions:
    threshold: float = 0.5
    largest: bool = True
    fill_holes: bool = True
    remove_small: str = "0vox"


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i))) for i in range(mask.ndim)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)


def label(mask: np.ndarray, full: bool = True) -> tuple[np.ndarray, int]:
    """Connected components of a boolean array; ``full`` = 26/8-connectivity, else faces only.

    Returns (labels, n) with labels 1..n in order of first voxel, 0 for background.
    """
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, np.int32)
    if not mask.any():
        return labels, 0
    box = _bbox(mask)
    m = np.pad(mask[box], 1)  # zero border: np.roll then never wraps foreground around
    lab = np.where(m, np.arange(1, m.size + 1, dtype=np.int64).reshape(m.shape), 0)
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=m.ndim)
               if any(o) and (full or sum(map(abs, o)) == 1)]
    axes = tuple(range(m.ndim))
    fg = np.flatnonzero(m)
    while True:
        cur = lab.copy()
        for o in offsets:
            np.maximum(cur, np.roll(lab, o, axis=axes), out=cur)
        cur[~m] = 0
        flat = cur.ravel()
        # pointer jumping: a label is a voxel index of the same component whose label is >= it
        for _ in range(4):
            flat[fg] = flat[flat[fg] - 1]
        if np.array_equal(cur, lab):
            break
        lab = cur
    _, inv = np.unique(lab.ravel()[fg], return_inverse=True)
    # renumber by first occurrence so labels are stable and 1..n
    order = np.argsort(np.unique(inv, return_index=True)[1])
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    out = np.zeros(m.shape, np.int32)
    out.ravel()[fg] = rank[inv] + 1
    labels[box] = out[tuple(slice(1, -1) for _ in range(m.ndim))]
    return labels, int(order.size)


def keep_largest(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (the first one on a tie)."""
    labels, n = label(mask)
    if n <= 1:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def remove_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_voxels``."""
    if min_voxels <= 0:
        return np.asarray(mask, bool)
    labels, n = label(mask)
    if n == 0:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice in the axial plane (axes 0, 1 of a RAS volume)."""
    mask = np.asarray(mask, dtype=bool)
    out = mask.copy()
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        sl = mask[:, :, k]
        box = _bbox(sl)
        bg = ~np.pad(sl[box], 1)
        lab, _ = label(bg, full=False)
        holes = (lab != lab[0, 0]) & bg  # everything not connected to the outer border
        out[box[0], box[1], k] |= holes[1:-1, 1:-1]
    return out


def postprocess(prob: np.ndarray, opts: PostOptions, voxel_mm3: float) -> np.ndarray:
    """Threshold and clean a probability volume (X, Y, Z) on the native RAS grid."""
    mask = prob >= opts.threshold
    value, unit = parse_size(opts.remove_small)
    if value > 0:
        mask = remove_small(mask, value / voxel_mm3 if unit == "mm3" else value)
    if opts.largest:
        mask = keep_largest(mask)
    if opts.fill_holes:
        mask = fill_holes(mask)
    return mask
