"""Sliding-window maths, pure numpy: where the tiles start and how their predictions are blended.

These follow nnU-Net v2's inference recipe (``sliding_window_prediction.py``), rewritten
from its description so that imported nnU-Net models run without torch or scipy:

* tiles overlap by ``1 - step`` of the patch; the first starts at 0 and the last ends at
  the image border, the ones between are spread evenly (so the real step is at most
  ``step * patch``);
* each tile's prediction is weighted by a Gaussian centred on the patch (sigma = patch / 8)
  so that the less reliable tile borders count less; weights are never exactly zero.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np


def tile_starts(image_size: Sequence[int], tile_size: Sequence[int], step: float) -> list[list[int]]:
    """Start index of every tile along each axis.

    ``image_size`` must be at least ``tile_size`` on every axis (pad first).

    >>> tile_starts([110], [64], 0.5)   # 3 tiles: 46 voxels to cover in steps of at most 32
    [[0, 23, 46]]
    >>> tile_starts([64, 70], [64, 64], 0.5)
    [[0], [0, 6]]
    """
    if len(image_size) != len(tile_size):
        raise ValueError(f"image size {tuple(image_size)} and tile size {tuple(tile_size)} differ in length")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], not {step}")
    starts = []
    for n, t in zip(image_size, tile_size):
        if n < t:
            raise ValueError(f"image size {tuple(image_size)} is smaller than the tile {tuple(tile_size)}; pad it first")
        count = int(math.ceil((n - t) / (t * step))) + 1
        last = n - t
        stride = last / (count - 1) if count > 1 else 0.0
        # numpy's round (half to even) on purpose: the same tile grid as nnU-Net
        starts.append([int(np.round(stride * i)) for i in range(count)])
    return starts


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The normalised, truncated 1D Gaussian that scipy.ndimage.gaussian_filter uses."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * x * x / (sigma * sigma))
    return k / k.sum()


@lru_cache(maxsize=8)
def gaussian_weights(tile_size: tuple[int, ...], sigma_scale: float = 1.0 / 8, peak: float = 10.0,
                     dtype: str = "float32") -> np.ndarray:
    """Blend weights for one tile: a Gaussian with sigma = tile * ``sigma_scale``, maximum ``peak``.

    It equals a unit impulse at the tile centre (``size // 2``) blurred with a truncated
    Gaussian, stored as ``dtype`` (nnU-Net keeps it in float16). Weights that are 0 in that
    type (beyond the truncation radius, or underflowed) get the smallest non-zero weight so
    that no voxel is divided by zero. The array is read-only and cached.
    """
    w = np.ones((), np.float64)
    for n in tile_size:
        sigma = n * sigma_scale
        k = gaussian_kernel1d(sigma)
        r = (k.size - 1) // 2
        c = n // 2
        line = np.zeros(n, np.float64)
        lo, hi = max(0, c - r), min(n, c + r + 1)
        line[lo:hi] = k[lo - c + r:hi - c + r]
        w = np.multiply.outer(w, line)
    w = (w / (w.max() / peak)).astype(dtype)
    zero = w == 0
    if zero.any():
        w[zero] = w[~zero].min()
    w.setflags(write=False)
    return w


def pad_amounts(shape: Sequence[int], min_shape: Sequence[int]) -> list[tuple[int, int]]:
    """Padding (before, after) that brings the last ``len(min_shape)`` axes up to ``min_shape``.

    The content stays centred; an odd amount puts the extra voxel after it.
    """
    lead = len(shape) - len(min_shape)
    out = [(0, 0)] * lead
    for n, m in zip(shape[lead:], min_shape):
        d = max(0, m - n)
        out.append((d // 2, d - d // 2))
    return out
