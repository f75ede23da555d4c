"""nnU-Net's sliding-window and resampling rules (numpy only), checked against hand values and,
when installed, against nnunetv2 itself (the spline resizes: tests/test_ndimage.py)."""
from __future__ import annotations

import numpy as np
import pytest

from sct_deepseg_epi.nnunet.resampling import resize_separate_z
from sct_deepseg_epi.nnunet.tiling import gaussian_weights, pad_amounts, tile_starts


def test_tile_starts_worked_example():
    # 110 voxels, tiles of 64, step 0.5: 46 voxels to travel in steps of at most 32 -> 2 steps of 23
    assert tile_starts([110], [64], 0.5) == [[0, 23, 46]]
    # an image exactly one tile wide has one tile; one voxel more needs a second, shifted by 1
    assert tile_starts([64, 65], [64, 64], 0.5) == [[0], [0, 1]]
    # step 1: no overlap unless the size forces it (100 = 2 tiles of 64 overlapping by 28)
    assert tile_starts([128, 100], [64, 64], 1.0) == [[0, 64], [0, 36]]


def test_tile_starts_refuses_bad_input():
    with pytest.raises(ValueError, match="pad it first"):
        tile_starts([10], [16], 0.5)
    with pytest.raises(ValueError, match="step"):
        tile_starts([10], [8], 0)


def test_pad_amounts_centre_the_content():
    # 3 voxels short: 1 before, 2 after; a leading channel axis is never padded
    assert pad_amounts((2, 29, 40), (32, 32)) == [(0, 0), (1, 2), (0, 0)]


def test_gaussian_weights_shape_peak_and_no_zeros():
    w = gaussian_weights((8, 20, 21))
    assert w.shape == (8, 20, 21) and w.dtype == np.float32
    assert w.max() == pytest.approx(10.0)
    assert w[4, 10, 10] == pytest.approx(10.0)  # the peak is at size // 2
    assert (w > 0).all()
    assert not w.flags.writeable
    # float16, as nnU-Net keeps it: the corners underflow and are lifted to the smallest weight
    h = gaussian_weights((32, 32, 32), dtype="float16")
    assert h.dtype == np.float16 and (h > 0).all() and h.min() == h[0, 0, 0]


# ---------------------------------------------------------------- against the libraries themselves

@pytest.mark.parametrize("order,order_z", [(3, 0), (1, 0)])
def test_separate_z_matches_nnunet(order, order_z):
    res = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")
    a = np.random.default_rng(1).normal(size=(1, 7, 30, 26)).astype(np.float32)
    new = (11, 41, 19)
    ref = res.resample_data_or_seg(a, new, is_seg=False, axis=0, order=order, do_separate_z=True, order_z=order_z)
    assert np.abs(resize_separate_z(a[0], new, 0, order, order_z) - ref[0]).max() < 1e-5


def test_tile_starts_and_gaussian_match_nnunet():
    sw = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    import torch

    for size in ([40, 77, 65], [24, 128, 128], [8, 32, 41]):
        for step in (0.5, 0.33, 1.0):
            patch = [8, 32, 40]
            assert tile_starts(size, patch, step) == sw.compute_steps_for_sliding_window(size, patch, step)
    for patch in ((8, 40, 40), (16, 24), (5, 7, 9)):
        for dt, tdt in (("float32", torch.float32), ("float16", torch.float16)):
            ref = sw.compute_gaussian(patch, 1 / 8, 10, dtype=tdt, device=torch.device("cpu")).float().numpy()
            assert np.abs(gaussian_weights(patch, dtype=dt).astype(np.float32) - ref).max() <= 1e-5 * 10
