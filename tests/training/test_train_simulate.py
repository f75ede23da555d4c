"""The EPI simulator: partial volume, determinism, artefacts (numpy only, no torch needed)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sct_deepseg_epi.training.simulate import (SimConfig, Source, area_downsample2, kspace_acquire, simulate,
                                               thick_slice_weights)
from train_fixtures import neck  # noqa: F401,E402  (fixture)


@pytest.fixture
def make_source(neck):
    def make(**kw):
        img, mask, z = neck(**kw)
        return Source("synthetic", img, mask.astype(np.float32), z)
    return make


def test_thick_slice_weights_overlap():
    # source slabs of 2 mm: [0,2) [2,4) [4,6) [6,8); output slab centred at 3 mm, 4 mm thick = [1, 5):
    # overlaps 1, 2, 1, 0 mm -> normalised .25 .5 .25 0
    w = thick_slice_weights(4, 2.0, np.array([3.0]), 4.0)
    np.testing.assert_allclose(w, [[0.25, 0.5, 0.25, 0.0]])


def test_thick_slice_partial_volume_of_mask():
    # a mask present in one of the two source slices covered -> 0.5 in the thick slice
    w = thick_slice_weights(2, 3.0, np.array([3.0]), 6.0)
    mask = np.zeros((2, 2, 2), np.float32)
    mask[..., 0] = 1
    assert np.tensordot(mask, w, axes=(2, 1))[0, 0, 0] == pytest.approx(0.5)


def test_area_downsample_preserves_mean():
    a = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    d = area_downsample2(a)
    assert d.shape == (2, 2, 1) and d.mean() == pytest.approx(a.mean())
    assert d[0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)


def test_simulate_is_deterministic_and_in_range(make_source):
    src = make_source()
    a = simulate(src, np.random.default_rng(5))
    b = simulate(src, np.random.default_rng(5))
    c = simulate(src, np.random.default_rng(6))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.params == b.params and a.params != c.params
    cfg = SimConfig()
    assert cfg.inplane_mm[0] <= a.zooms[0] <= cfg.inplane_mm[1]
    assert a.zooms[2] >= src.zooms[2]
    assert a.image.shape == a.mask.shape and a.image.dtype == np.float32
    assert 0 <= a.mask.min() and a.mask.max() <= 1 and a.image.min() >= 0
    assert a.image.shape[0] % 2 == 0 and a.image.shape[1] % 2 == 0


def test_simulated_mask_area_matches_cord(make_source):
    # no distortion, fine resolution: the cord area (mm2) survives the whole chain
    src = make_source()
    cfg = replace(SimConfig(), distortion_mm=(0, 0), inplane_mm=(1.0, 1.0), thickness_mm=(3.0, 3.0),
                  gap_fraction=(0, 0), edge_prob=0.0, fov_mm=(30, 30))
    sim = simulate(src, np.random.default_rng(1), cfg)
    area = sim.mask[:, :, 0].sum() * sim.zooms[0] * sim.zooms[1]
    true = src.mask[:, :, 0].sum() * src.zooms[0] * src.zooms[1]
    assert area == pytest.approx(true, rel=0.15)


def test_edge_placement_puts_cord_near_fov_edge(make_source):
    src = make_source(shape=(80, 80, 6), centre=(40.0, 40.0))
    cfg = replace(SimConfig(), edge_prob=1.0, edge_mm=(3.0, 3.0), rotation_deg=0.0, distortion_mm=(0, 0),
                  inplane_mm=(1.0, 1.0), fov_mm=(60, 60))
    dists = []
    for s in range(6):
        sim = simulate(src, np.random.default_rng(s), cfg)
        ii, jj = np.nonzero(sim.mask.max(axis=2) > 0.5)
        nx, ny = sim.mask.shape[:2]
        dists.append(min(ii.mean(), nx - 1 - ii.mean(), jj.mean(), ny - 1 - jj.mean()) * sim.zooms[0])
    assert max(dists) < 5.0  # the cord centre is within a few mm of one edge in every sample


def test_nyquist_ghost_lands_half_a_fov_away():
    img = np.zeros((64, 64, 1))
    img[28:36, 4:12] = 1.0  # a block near the low PE edge
    cfg = replace(SimConfig(), t2star_decay=(0, 0), ghost_phase_rad=(0.6, 0.6))
    out, p = kspace_acquire(img, (32, 32), 1, np.random.default_rng(0), cfg)
    mag = np.abs(out[..., 0])
    # object around PE rows 2..6 of 32; its ghost appears shifted by N/2 = 16 rows along PE
    assert mag[14:18, 18:22].mean() > 0.1 * mag[14:18, 2:6].mean()
    clean, _ = kspace_acquire(img, (32, 32), 1, np.random.default_rng(0), replace(cfg, ghost_phase_rad=(0, 0)))
    assert np.abs(clean[..., 0])[14:18, 18:22].mean() < 0.02 * mag[14:18, 2:6].mean()
