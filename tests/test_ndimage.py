"""The numpy image algorithms against their scipy.ndimage twins, on many random shapes and masks."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from sct_deepseg_epi import ndimage

ndi = pytest.importorskip("scipy.ndimage")
RNG_SEEDS = range(40)


def _random_mask(rng, ndim: int) -> np.ndarray:
    shape = tuple(int(n) for n in rng.integers(1, 13 if ndim < 4 else 6, size=ndim))
    density = rng.choice([0.05, 0.3, 0.5, 0.7, 0.95])
    return rng.random(shape) < density


def _structure(ndim: int, full: bool, axes) -> np.ndarray:
    s = ndi.generate_binary_structure(ndim, ndim if full else 1)
    for ax in set(range(ndim)) - set(axes):  # no neighbours across the other axes
        keep = [slice(None)] * ndim
        for end in (0, 2):
            keep[ax] = end
            s[tuple(keep)] = False
    return s


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("full", [True, False])
def test_label_is_scipy_label(ndim, full):
    for seed in RNG_SEEDS:
        rng = np.random.default_rng(seed * 10 + ndim)
        mask = _random_mask(rng, ndim)
        axes_options = [None] + [c for r in range(1, ndim) for c in itertools.combinations(range(ndim), r)]
        for axes in axes_options:
            ours, n = ndimage.label(mask, full=full, axes=axes)
            ref, n_ref = ndi.label(mask, structure=_structure(ndim, full, range(ndim) if axes is None else axes))
            assert n == n_ref and np.array_equal(ours, ref), (seed, mask.shape, axes)


@pytest.mark.parametrize("ndim", [2, 3])
def test_fill_holes_is_scipy_binary_fill_holes(ndim):
    for seed in RNG_SEEDS:
        rng = np.random.default_rng(seed)
        mask = _random_mask(rng, ndim)
        assert np.array_equal(ndimage.fill_holes(mask), ndi.binary_fill_holes(mask)), (seed, mask.shape)
        if ndim == 3:  # per axial slice, as postprocessing fills
            ref = np.stack([ndi.binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], axis=2)
            assert np.array_equal(ndimage.fill_holes(mask, axes=(0, 1)), ref), (seed, mask.shape)


def test_fill_holes_fills_a_ring():
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    assert ndimage.fill_holes(ring)[3, 3] and ndimage.fill_holes(ring).sum() == 25


@pytest.mark.parametrize("order", [0, 1, 3])
def test_resize_is_scipy_zoom_in_grid_mode(order):
    for seed in RNG_SEEDS:
        rng = np.random.default_rng(seed)
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(n) for n in rng.integers(1, 25, size=ndim))
        new = tuple(int(n) for n in rng.integers(1, 25, size=ndim))
        a = rng.normal(size=shape).astype(np.float32)
        zoom = [n / s for n, s in zip(new, shape)]
        ref = ndi.zoom(a.astype(np.float64), zoom, order=order, mode="nearest", grid_mode=True)
        if order == 3:
            ref = np.clip(ref, a.min(), a.max())
        assert ref.shape == new
        assert np.abs(ndimage.resize(a, new, order) - ref).max() < 1e-5, (seed, shape, new)


@pytest.mark.parametrize("order", [1, 3])
def test_resize_is_skimage_resize(order):
    skt = pytest.importorskip("skimage.transform")
    for seed in RNG_SEEDS:
        rng = np.random.default_rng(100 + seed)
        shape = tuple(int(n) for n in rng.integers(2, 30, size=3))
        new = tuple(int(n) for n in rng.integers(2, 30, size=3))
        a = rng.normal(size=shape)
        ref = skt.resize(a, new, order, mode="edge", anti_aliasing=False)
        assert np.abs(ndimage.resize(a, new, order) - ref).max() < 1e-5, (seed, shape, new)


def test_nearest_index_rounds_half_up():
    # 24 -> 12: source coordinates 0.5, 2.5, ... go up, as scipy's order-0 map_coordinates does
    assert ndimage.nearest_index(24, 12).tolist() == list(range(1, 24, 2))
    assert ndimage.nearest_index(5, 15).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_resize_matrices_preserve_constants():
    for order in (0, 1, 3):
        m = ndimage.resize_matrix(17, 31, order)
        assert np.allclose(m.sum(axis=1), 1, atol=1e-5)


def test_resize_is_identity_at_the_same_shape():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert np.array_equal(ndimage.resize(a, a.shape, 3), a)
