"""Image algorithms in numpy alone, each the twin of a ``scipy.ndimage`` function.

    label(mask, full, axes)    scipy.ndimage.label with generate_binary_structure(ndim, ndim if full
                               else 1), the structure's neighbours limited to ``axes``; the same labels
    fill_holes(mask, axes)     scipy.ndimage.binary_fill_holes (face connectivity), within ``axes``
    resize(arr, shape, order)  scipy.ndimage.zoom(arr, shape / arr.shape, order, mode="nearest",
                               grid_mode=True), clipped to the input's range for order 3: what
                               skimage.transform.resize(order, mode="edge", anti_aliasing=False) gives

Why not scipy itself: importing ``scipy.ndimage`` costs 0.3-0.5 s per process on the machines
this runs on, about as much as numpy and nibabel together, for masks that take milliseconds.
The tests (``tests/test_ndimage.py``) hold each function to its scipy twin on many random
shapes, so the two cannot drift apart.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Sequence

import numpy as np


def bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every true voxel of a non-empty mask."""
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
    """Connected components of a boolean array: ``scipy.ndimage.label``.

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
    box = bbox(mask)
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


def fill_holes(mask: np.ndarray, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Fill the background regions that do not reach the border: ``scipy.ndimage.binary_fill_holes``.

    Background connects through faces, along ``axes`` only (``(0, 1)``: each axial slice of
    a volume on its own; default: all axes).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    axes = tuple(range(mask.ndim)) if axes is None else tuple(axes)
    box = bbox(mask)
    # one voxel of background around the box along ``axes``, so that the outside is one component each
    widths = [(1, 1) if i in axes else (0, 0) for i in range(mask.ndim)]
    bg = ~np.pad(mask[box], widths)
    lab, _ = label(bg, full=False, axes=axes)
    border = [lab[(slice(None),) * i + (end,)].ravel() for i in axes for end in (0, -1)]
    holes = bg & ~np.isin(lab, np.unique(np.concatenate(border)))
    out = mask.copy()
    out[box] |= holes[tuple(slice(1, -1) if i in axes else slice(None) for i in range(mask.ndim))]
    return out


_PAD = 12  # scipy pre-pads by 12 edge samples before the spline prefilter for 'nearest' mode


def _coords(n_in: int, n_out: int) -> np.ndarray:
    """Source coordinate of each output sample, pixel-area aligned (``grid_mode=True``)."""
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def _bspline3(t: np.ndarray) -> np.ndarray:
    a = np.abs(t)
    return np.where(a < 1, 2.0 / 3.0 - a * a + 0.5 * a ** 3, np.where(a < 2, (2 - a) ** 3 / 6.0, 0.0))


def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    m = n_in + 2 * _PAD
    # edge padding as a matrix (m, n_in)
    pad = np.zeros((m, n_in))
    pad[np.arange(m), np.clip(np.arange(m) - _PAD, 0, n_in - 1)] = 1.0
    # cubic B-spline coefficients: solve (c[i-1] + 4 c[i] + c[i+1]) / 6 = f[i] with mirror ends
    t = np.zeros((m, m))
    idx = np.arange(m)
    t[idx, idx] = 4.0 / 6.0
    t[idx[1:], idx[:-1]] = 1.0 / 6.0
    t[idx[:-1], idx[1:]] = 1.0 / 6.0
    if m > 1:
        t[0, 1] = 2.0 / 6.0
        t[-1, -2] = 2.0 / 6.0
    coef = np.linalg.solve(t, pad)  # (m, n_in)
    x = np.clip(_coords(n_in, n_out), -0.5, n_in - 0.5) + _PAD
    base = np.floor(x).astype(int)
    out = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        j = np.clip(base + k, 0, m - 1)
        out += _bspline3(x - (base + k))[:, None] * coef[j]
    return out


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    x = np.clip(_coords(n_in, n_out), 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    f = x - lo
    out = np.zeros((n_out, n_in))
    np.add.at(out, (np.arange(n_out), lo), 1 - f)
    np.add.at(out, (np.arange(n_out), hi), f)
    return out


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output sample for order-0 resizing (ties round up, as scipy does)."""
    return np.clip(np.floor(_coords(n_in, n_out) + 0.5), 0, n_in - 1).astype(np.intp)


@lru_cache(maxsize=128)
def resize_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix resizing one axis with a B-spline of ``order`` 0, 1 or 3."""
    if order == 0:
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), nearest_index(n_in, n_out)] = 1.0
    elif order == 1:
        m = _linear_matrix(n_in, n_out)
    elif order == 3:
        m = _cubic_matrix(n_in, n_out) if n_in > 1 else np.ones((n_out, 1))
    else:
        raise ValueError(f"spline order {order} is not supported (0, 1 or 3)")
    m = m.astype(np.float32)
    m.setflags(write=False)
    return m


def resize_axis(arr: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Resize one axis with a B-spline of ``order`` (0, 1 or 3); the other axes untouched."""
    n_in = arr.shape[axis]
    if n_in == n_out:
        return arr
    if order == 0:
        return np.take(arr, nearest_index(n_in, n_out), axis=axis)
    m = resize_matrix(n_in, n_out, order)
    return np.moveaxis(np.tensordot(m, arr, axes=(1, axis)), 0, axis)


def resize(arr: np.ndarray, shape: Sequence[int], order: int, axes_orders: Sequence[int] | None = None,
           clip: bool = True) -> np.ndarray:
    """Resize ``arr`` to ``shape``, one axis at a time; like skimage's resize with mode='edge'.

    ``axes_orders`` gives a spline order per axis (default: ``order`` everywhere). With
    ``clip`` the result is clipped to the input's range, as skimage does for order > 1.
    """
    a = np.asarray(arr, dtype=np.float32)
    orders = list(axes_orders) if axes_orders is not None else [order] * a.ndim
    if tuple(a.shape) == tuple(shape):
        return a
    lo, hi = (float(a.min()), float(a.max())) if clip and max(orders) > 1 else (None, None)
    for ax, (n, o) in enumerate(zip(shape, orders)):
        a = resize_axis(a, ax, int(n), o)
    if lo is not None:
        np.clip(a, lo, hi, out=a)
    return np.ascontiguousarray(a, dtype=np.float32)
