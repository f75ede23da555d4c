"""Spline resizing as separable matrices, numpy only: what nnU-Net's resampling computes.

nnU-Net resizes images with ``skimage.transform.resize(order=3, mode='edge',
anti_aliasing=False)`` (cubic B-spline through ``scipy.ndimage.zoom`` with pixel-area
alignment, edge padding and the output clipped to the input's range), its probability
maps with ``order=1``, and the thick-slice axis of anisotropic data with nearest
neighbour (``order_z=0``). Each of these is linear along one axis at a time, so each
axis becomes one small cached ``(n_out, n_in)`` matrix and a resize is a few matrix
products: fast, and free of scipy at run time.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

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


def _apply(arr: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
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
        a = _apply(a, ax, int(n), o)
    if lo is not None:
        np.clip(a, lo, hi, out=a)
    return np.ascontiguousarray(a, dtype=np.float32)


def resize_separate_z(arr: np.ndarray, shape: Sequence[int], axis: int, order: int, order_z: int) -> np.ndarray:
    """nnU-Net's anisotropic resize: each slice across ``axis`` in 2D with ``order`` (clipped to that
    slice's range), then along ``axis`` with ``order_z``."""
    a = np.asarray(arr, dtype=np.float32)
    shape = [int(s) for s in shape]
    inplane = [i for i in range(a.ndim) if i != axis]
    if [a.shape[i] for i in inplane] != [shape[i] for i in inplane]:
        orders = [order if i != axis else 0 for i in range(a.ndim)]
        tmp_shape = list(shape)
        tmp_shape[axis] = a.shape[axis]
        out = a
        for ax in inplane:
            out = _apply(out, ax, tmp_shape[ax], orders[ax])
        if order > 1:  # skimage clips every 2D resize to that slice's own range
            lo = a.min(axis=tuple(inplane), keepdims=True)
            hi = a.max(axis=tuple(inplane), keepdims=True)
            out = np.clip(out, lo, hi)
        a = out
    if a.shape[axis] != shape[axis]:
        a = _apply(a, axis, shape[axis], order_z)
    return np.ascontiguousarray(a, dtype=np.float32)
