"""The EPI simulator: partial volume, determinism, artefacts (numpy only, no torch needed)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sct_deepseg_epi.training.simulate import (SimConfig, Source, area_downsample2, box_blur, kspace_acquire,
                                               labelled_range, simulate, thick_slice_weights, thick_slices,
                                               weaken_contrast, z_falloff)
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
                  gap_fraction=(0, 0), edge_prob=0.0, fov_mm=(30, 30), anatomy_scale=(1.0, 1.0),
                  end_pv_prob=0.0)
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


def test_stack_stays_in_labelled_range_and_top_pins_it(make_source):
    # cord labelled on source slices 4..11 only (2 mm each): stacks never leave [8, 24) mm
    src = make_source(shape=(40, 40, 16), zooms=(1.0, 1.0, 2.0))
    src.mask[:, :, :4] = 0
    src.mask[:, :, 12:] = 0
    assert labelled_range(src.mask, src.zooms[2]) == (8.0, 24.0)
    cfg = replace(SimConfig(), thickness_mm=(4.0, 4.0), gap_fraction=(0, 0), n_slices=(1, 1), top_prob=1.0,
                  end_pv_prob=0.0)
    for s in range(5):
        _, mask, _, p = thick_slices(src, np.random.default_rng(s), cfg)
        assert p["top_of_cord"] and mask.max() == pytest.approx(1.0)
    # pinned to the top: the slab ends within half a slab of the labelled top, so it covers
    # part of source slice 11 (made the only bright one) and nothing above it
    bright = replace(src, image=src.image.copy())
    bright.image[:, :, 11] += 100.0
    bright.image[:, :, 12:] += 1000.0
    for s in range(5):
        img, _, _, _ = thick_slices(src, np.random.default_rng(s), cfg)
        img2, _, _, _ = thick_slices(bright, np.random.default_rng(s), cfg)
        assert 1.0 < (img2 - img).max() < 100.0 + 1e-3


def test_end_slices_get_wider_slabs():
    # a wider end slab mixes in more source slices: its weights cover more of them
    w = thick_slice_weights(10, 1.0, np.array([2.0, 7.0]), 2.0, np.array([0.0, 6.0]), np.array([3.0, 8.0]))
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert (w[0] > 0).sum() == 3 and (w[1] > 0).sum() == 2


def test_z_falloff_lowers_the_chosen_end():
    cfg = replace(SimConfig(), z_falloff_prob=1.0, z_falloff_depth=(0.6, 0.6), z_falloff_mm=(10.0, 10.0))
    seen = set()
    for s in range(20):
        g, p = z_falloff(8, 5.0, 5.0, np.random.default_rng(s), cfg)
        end = p["z_falloff"][0]
        seen.add(end)
        assert g.min() >= 0.4 - 1e-6 and g.max() <= 1.0
        if end == "top":
            assert g[-1] < g[0] and np.all(np.diff(g) <= 0)
        elif end == "bottom":
            assert g[0] < g[-1] and np.all(np.diff(g) >= 0)
        else:
            assert g[0] < g[3] and g[-1] < g[4]
    assert seen == {"top", "bottom", "both"}
    g, p = z_falloff(8, 5.0, 5.0, np.random.default_rng(0), replace(cfg, z_falloff_prob=0.0))
    assert p["z_falloff"] is None and np.all(g == 1)


def test_weak_contrast_flattens_cord_and_csf(make_source):
    src = make_source()
    img = src.image.copy()
    cord = src.mask > 0.5
    ring = (box_blur(src.mask[:, :, 0], 3) > 0.01)[..., None] & ~cord
    out, n = weaken_contrast(img, src.mask, src.zooms, np.random.default_rng(0),
                             replace(SimConfig(), weak_contrast_prob=1.0, weak_contrast=(0.9, 0.9)))
    assert n == img.shape[2]
    before = abs(img[ring[..., :1].repeat(img.shape[2], 2)].mean() - img[cord].mean())
    after = abs(out[ring[..., :1].repeat(img.shape[2], 2)].mean() - out[cord].mean())
    assert after < 0.5 * before
    far = box_blur(src.mask[:, :, 0], 8) == 0  # far from the cord nothing changes
    np.testing.assert_array_equal(out[far], img[far])


def test_box_blur_is_a_window_mean():
    a = np.zeros((7, 7), np.float32)
    a[3, 3] = 9.0
    b = box_blur(a, 1)
    assert b[3, 3] == pytest.approx(1.0) and b[2, 2] == pytest.approx(1.0) and b[1, 1] == 0
    assert box_blur(np.ones((5, 6), np.float32), 2) == pytest.approx(np.ones((5, 6)))


def test_simulate_records_new_draws(make_source):
    sim = simulate(make_source(), np.random.default_rng(3))
    for k in ("top_of_cord", "end_pv", "weak_contrast_slices", "z_falloff", "anatomy_scale"):
        assert k in sim.params
