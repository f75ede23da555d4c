"""Stage 4, postprocess: a backend's probabilities on the native RAS grid -> a clean mask.

The same for every backend (:func:`finish`): threshold (or the model's own labels at its
threshold), then the cleaning steps that :class:`~sct_deepseg_epi.options.PostOptions` turns on.

Connected components are computed with numpy alone (a vectorised union-find over the
mask's bounding box), which keeps scipy out of the inference dependencies; cord masks are
small, so this costs milliseconds.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .options import PostOptions, parse_size

if TYPE_CHECKING:
    from .backend import Probabilities


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i))) for i in range(mask.ndim)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)


def _neighbour_offsets(ndim: int, full: bool, axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Half of the neighbourhood (each pair of neighbours once), restricted to ``axes``."""
    out = []
    for o in itertools.product((-1, 0, 1), repeat=ndim):
        if not any(o) or any(o[i] for i in range(ndim) if i not in axes):
            continue
        if not full and sum(map(abs, o)) != 1:
            continue
        if o > tuple(-x for x in o):  # keep one of o and -o
            out.append(o)
    return out


def label(mask: np.ndarray, full: bool = True, axes: tuple[int, ...] | None = None) -> tuple[np.ndarray, int]:
    """Connected components of a boolean array.

    ``full``: 26/8-connectivity, else faces only; ``axes``: connect along these axes only
    (``(0, 1)`` labels each axial slice of a volume on its own). Returns (labels, n) with
    labels 1..n numbered in raster order of each component's first voxel, 0 for background.

    Union-find on the graph of neighbouring foreground voxels, vectorised: every edge
    hooks the larger root onto the smaller, then paths are compressed, until each edge
    joins two voxels of the same root. The root of a component is its first voxel.
    """
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, np.int32)
    if not mask.any():
        return labels, 0
    axes = tuple(range(mask.ndim)) if axes is None else tuple(axes)
    box = _bbox(mask)
    m = mask[box]
    fg = np.flatnonzero(m)
    index = np.full(m.shape, -1, np.int64)
    index.ravel()[fg] = np.arange(fg.size)
    a_parts, b_parts = [], []
    for o in _neighbour_offsets(m.ndim, full, axes):
        src = tuple(slice(max(0, -d), m.shape[i] - max(0, d)) for i, d in enumerate(o))
        dst = tuple(slice(max(0, d), m.shape[i] - max(0, -d)) for i, d in enumerate(o))
        ia, ib = index[src], index[dst]
        both = (ia >= 0) & (ib >= 0)
        a_parts.append(ia[both])
        b_parts.append(ib[both])
    a = np.concatenate(a_parts) if a_parts else np.zeros(0, np.int64)
    b = np.concatenate(b_parts) if b_parts else np.zeros(0, np.int64)
    parent = np.arange(fg.size)
    while a.size:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            break
        lo, hi = np.minimum(pa[differ], pb[differ]), np.maximum(pa[differ], pb[differ])
        np.minimum.at(parent, hi, lo)
        while True:  # path compression until every voxel points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    roots, inv = np.unique(parent, return_inverse=True)
    out = np.zeros(m.shape, np.int32)
    out.ravel()[fg] = inv.ravel() + 1
    labels[box] = out
    return labels, int(roots.size)


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
    if not mask.any():
        return mask.copy()
    box = _bbox(mask)
    # one voxel of background around each slice's box, so the outside is one component
    bg = ~np.pad(mask[box], ((1, 1), (1, 1), (0, 0)))
    lab, _ = label(bg, full=False, axes=(0, 1))
    outside = np.unique(np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(), lab[:, -1].ravel()]))
    holes = bg & ~np.isin(lab, outside)
    out = mask.copy()
    out[box] |= holes[1:-1, 1:-1]
    return out


def dilate(mask: np.ndarray, voxels: int) -> np.ndarray:
    """Grow a mask by ``voxels`` in each axial slice (axes 0, 1), one 8-connected ring at a time."""
    out = np.asarray(mask, dtype=bool)
    for _ in range(voxels):
        grown = out.copy()
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                src = (slice(max(0, -dx), out.shape[0] - max(0, dx)), slice(max(0, -dy), out.shape[1] - max(0, dy)))
                dst = (slice(max(0, dx), out.shape[0] - max(0, -dx)), slice(max(0, dy), out.shape[1] - max(0, -dy)))
                grown[dst] |= out[src]
        out = grown
    return out


def clean(mask: np.ndarray, opts: PostOptions, voxel_mm3: float) -> np.ndarray:
    """The cleaning steps, in order: small objects, largest object, holes, dilation (the input if none runs)."""
    value, unit = parse_size(opts.remove_small)
    if value > 0:
        mask = remove_small(mask, value / voxel_mm3 if unit == "mm3" else value)
    if opts.largest:
        mask = keep_largest(mask)
    if opts.fill_holes:
        mask = fill_holes(mask)
    if opts.dilate:
        mask = dilate(mask, opts.dilate)
    return mask


def postprocess(prob: np.ndarray, opts: PostOptions, voxel_mm3: float) -> np.ndarray:
    """Threshold and clean a probability volume (X, Y, Z) on the native RAS grid."""
    return clean(prob >= opts.threshold, opts, voxel_mm3)


def finish(probs: Probabilities, opts: PostOptions, zooms, labels_at: float) -> np.ndarray:
    """The uint8 mask of a backend's output on the RAS grid with voxel sizes ``zooms``.

    A model with its own label map (nnU-Net's argmax) keeps it at its own threshold
    ``labels_at``; otherwise, and at any other threshold, ``probability >= threshold``.
    ``method="z"`` then follows the cord along z (:mod:`.zfollow`), which decides the
    objects kept and fills holes itself, before the remaining steps. Cleaning keeps label
    values; voxels added (holes, weaker slices) take label 1.
    """
    voxel_mm3 = float(np.prod(zooms[:3]))
    if probs.labels is not None and opts.threshold == labels_at:
        labels = probs.labels
    else:
        labels = (probs.probability >= opts.threshold).astype(np.uint8)
    fg = labels > 0
    if opts.method == "z":
        from .zfollow import zfollow, zfollow_options

        followed = zfollow(probs.probability, zooms, zfollow_options(opts.threshold, opts.fill_holes)).mask
        kept = clean(followed, replace(opts, largest=False, fill_holes=False), voxel_mm3)
    else:
        kept = clean(fg, opts, voxel_mm3)
    if kept is not fg:
        labels = np.where(kept, np.where(fg, labels, 1), 0)
    return labels.astype(np.uint8, copy=False)
