"""nnU-Net's resampling rules over :mod:`sct_deepseg_epi.ndimage`'s spline resizes.

nnU-Net resizes images with ``skimage.transform.resize(order=3, mode='edge',
anti_aliasing=False)``, its probability maps with ``order=1``, and the thick-slice axis of
anisotropic data on its own with nearest neighbour (``order_z=0``). The rules below decide
the target shape, whether an axis is resampled on its own, and with which orders.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..ndimage import resize, resize_axis
from .recipe import Resampling

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
            out = resize_axis(out, ax, tmp_shape[ax], orders[ax])
        if order > 1:  # skimage clips every 2D resize to that slice's own range
            lo = a.min(axis=tuple(inplane), keepdims=True)
            hi = a.max(axis=tuple(inplane), keepdims=True)
            out = np.clip(out, lo, hi)
        a = out
    if a.shape[axis] != shape[axis]:
        a = resize_axis(a, axis, shape[axis], order_z)
    return np.ascontiguousarray(a, dtype=np.float32)


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Shape after resampling, rounded as nnU-Net rounds it (Python's round)."""
    return tuple(int(round(s / t * n)) for s, t, n in zip(spacing, target, shape))


def separate_z(force: bool | None, current: Sequence[float], new: Sequence[float],
               threshold: float) -> int | None:
    """The thick-slice axis to resample on its own, or None (nnU-Net's rule)."""
    def lowres(sp):
        sp = np.asarray(sp, float)
        return list(np.where(sp.max() / sp == 1)[0])

    def aniso(sp):
        return float(np.max(sp) / np.min(sp)) > threshold

    if force is not None:
        axes = lowres(current) if force else None
    elif aniso(current):
        axes = lowres(current)
    elif aniso(new):
        axes = lowres(new)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return int(axes[0])


def resample(arr: np.ndarray, shape: Sequence[int], current: Sequence[float], new: Sequence[float],
             rule: Resampling, threshold: float) -> np.ndarray:
    """Resample a (C, Z, Y, X) array to ``shape`` following one of the plan's resampling rules."""
    if tuple(arr.shape[1:]) == tuple(shape):
        return arr
    axis = separate_z(rule.force_separate_z, current, new, threshold)
    out = np.empty((arr.shape[0], *shape), np.float32)
    for c in range(arr.shape[0]):
        if axis is not None:
            out[c] = resize_separate_z(arr[c], shape, axis, rule.order, rule.order_z)
        else:
            out[c] = resize(arr[c], shape, rule.order)
    return out
