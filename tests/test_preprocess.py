"""Stage 2: resampling matrices, normalisation, slice stacking, and the round trip."""
from __future__ import annotations

import numpy as np
import pytest

from sct_deepseg_epi.preprocess import (interp_matrix, model_grid_shape, normalise, prepare, resample_inplane, restore,
                                        roi_around, slice_stack)
from sct_deepseg_epi.registry.manifest import Normalisation, spec_from_dict


def spec(**inp):
    return spec_from_dict({"schema_version": 1, "name": "t", "version": "0.0.1",
                           "members": [{"file": "a.onnx", "sha256": "0" * 64}],
                           "input": {"spacing_mm": [1.0, 1.0], "size_multiple": 8, **inp}})


def test_interp_matrix_rows_sum_to_one():
    for n_in, n_out in [(4, 2), (2, 4), (68, 65), (65, 68), (1, 5), (5, 1), (7, 7)]:
        m = interp_matrix(n_in, n_out)
        assert m.shape == (n_out, n_in)
        assert np.allclose(m.sum(axis=1), 1)


def test_downsampling_averages_area():
    # 4 -> 2: each output voxel is the mean of the two input voxels it covers
    assert np.allclose(interp_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])


def test_upsampling_is_linear_between_centres():
    # 2 -> 4: centres at 0.25 and 0.75 of the way; ends clamp
    assert np.allclose(interp_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])


def test_model_grid_keeps_field_of_view():
    assert model_grid_shape((68, 68), (0.956, 0.956), (1.0, 1.0)) == (65, 65)
    assert model_grid_shape((128, 64), (0.5, 2.0), (1.0, 1.0)) == (64, 128)


def test_resample_constant_is_constant():
    a = np.full((10, 12, 3), 7.0, np.float32)
    assert np.allclose(resample_inplane(a, (17, 5)), 7.0)


def test_normalise_schemes():
    a = np.arange(100, dtype=np.float32).reshape(10, 10)
    z = normalise(a, Normalisation("zscore", None))
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-5
    p = normalise(a, Normalisation("percentile", (0.0, 100.0)))
    assert p.min() == 0 and p.max() == 1
    clipped = normalise(a, Normalisation("percentile", (10.0, 90.0)))
    assert (clipped[:1] == 0).all() and (clipped[-1] == 1).all()


def test_slice_stack_repeats_edges():
    v = np.stack([np.full((2, 2), k, np.float32) for k in range(4)], axis=2)
    s = slice_stack(v, 1)
    assert s.shape == (4, 3, 2, 2)
    assert s[0, :, 0, 0].tolist() == [0, 0, 1] and s[3, :, 0, 0].tolist() == [2, 3, 3]


def test_prepare_pads_to_multiple_and_restore_inverts():
    rng = np.random.default_rng(0)
    vol = rng.random((30, 22, 5)).astype(np.float32)
    prep = prepare(vol, (1.0, 1.0, 3.0), spec(normalisation={"scheme": "none"}))
    assert prep.batch.shape[0] == 5 and prep.batch.shape[2] % 8 == 0 and prep.batch.shape[3] % 8 == 0
    back = restore(prep.batch[:, 0], prep)
    assert back.shape == vol.shape and np.allclose(back, vol, atol=1e-5)


def test_prepare_context_channels():
    vol = np.random.default_rng(1).random((16, 16, 4)).astype(np.float32)
    assert prepare(vol, (1.0, 1.0, 3.0), spec(context_slices=1)).batch.shape == (4, 3, 16, 16)


@pytest.mark.parametrize("zoom", [0.5, 2.0])
def test_restore_round_trip_of_smooth_map(zoom):
    x = np.linspace(0, 1, 40)
    vol = np.repeat((x[:, None] * x[None, :])[:, :, None], 2, axis=2).astype(np.float32)
    prep = prepare(vol, (zoom, zoom, 3.0), spec(normalisation={"scheme": "none"}))
    back = restore(prep.batch[:, 0], prep)
    assert np.abs(back - vol).max() < 0.06


def test_roi_around_covers_mask_with_margin_and_multiple():
    s = spec()
    mask = np.zeros((100, 80, 3), bool)
    mask[40:50, 30:38, 1] = True
    roi = roi_around(mask, s, (100, 80), margin_mm=10)
    assert roi[0].start <= 30 and roi[0].stop >= 60 and roi[1].start <= 20 and roi[1].stop >= 48
    assert (roi[0].stop - roi[0].start) % 8 == 0 and (roi[1].stop - roi[1].start) % 8 == 0
    assert roi_around(np.zeros_like(mask), s, (100, 80)) is None


def test_roi_at_the_edge_stays_inside_the_field():
    mask = np.zeros((50, 50, 1), bool)
    mask[0:3, 47:50] = True
    roi = roi_around(mask, spec(), (50, 50), margin_mm=10)
    assert roi[0].start == 0 and roi[1].stop == 50


def test_roi_prepare_matches_full_field_inside():
    rng = np.random.default_rng(2)
    vol = rng.random((64, 64, 3)).astype(np.float32)
    s = spec()
    full = prepare(vol, (1.0, 1.0, 3.0), s)
    roi = (slice(16, 40), slice(8, 32))
    part = prepare(vol, (1.0, 1.0, 3.0), s, roi=roi)
    # same normalised intensities where they overlap: statistics come from the whole image
    assert np.allclose(part.batch[:, 0], full.batch[:, 0, 16:40, 8:32])
    back = restore(part.batch[:, 0], part)
    assert back.shape == vol.shape and (back[:16] == 0).all()
