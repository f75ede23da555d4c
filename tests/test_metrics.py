"""Metrics against hand-computed cases (sct_deepseg_epi.metrics, numpy only)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sct_deepseg_epi import metrics


def grid(*coords, shape=(6, 6, 1)):
    m = np.zeros(shape, bool)
    for c in coords:
        m[c] = True
    return m


def test_dice_half_overlap():
    pred = np.zeros((4, 4, 1), bool)
    ref = np.zeros((4, 4, 1), bool)
    pred[0:2, 0:2] = True  # 4 voxels
    ref[0:2, 1:3] = True   # 4 voxels, 2 shared -> 2*2 / (4+4)
    assert metrics.dice(pred, ref) == pytest.approx(0.5)


def test_dice_empty_conventions():
    empty = np.zeros((3, 3, 2), bool)
    one = empty.copy()
    one[1, 1, 0] = True
    assert metrics.dice(empty, empty) == 1.0   # both empty: correct negative
    assert metrics.dice(one, empty) == 0.0     # false positive only
    assert metrics.dice(empty, one) == 0.0     # missed


def test_distances_two_points_anisotropic():
    # single voxels 3 apart along x with 2 mm voxels along x: every surface distance is 6 mm
    pred = grid((0, 0, 0))
    ref = grid((3, 0, 0))
    z = (2.0, 1.0, 1.0)
    assert metrics.hausdorff95(pred, ref, z) == pytest.approx(6.0)
    assert metrics.mean_surface_distance(pred, ref, z) == pytest.approx(6.0)


def test_distances_segment_one_longer():
    # pred: x = 0..2 on one row, ref: x = 0..3; every voxel is a surface voxel.
    # pred -> ref: 0, 0, 0; ref -> pred: 0, 0, 0, 1 (the extra voxel) => pooled [0]*6 + [1]
    pred = grid((0, 0, 0), (1, 0, 0), (2, 0, 0))
    ref = grid((0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0))
    z = (1.0, 1.0, 1.0)
    assert metrics.mean_surface_distance(pred, ref, z) == pytest.approx(1 / 7)
    # numpy's linear 95th percentile of 7 sorted values: index 5.7 between 0 and 1 -> 0.7
    assert metrics.hausdorff95(pred, ref, z) == pytest.approx(0.7)


def test_surface_excludes_interior():
    m = np.zeros((5, 5, 1), bool)
    m[1:4, 1:4] = True  # 3x3 square: the centre voxel has all 4 in-plane neighbours inside
    s = metrics.surface(m)
    assert s.sum() == 8 and not s[2, 2, 0]


def test_distance_empty_conventions():
    empty = np.zeros((3, 3, 1), bool)
    one = grid((1, 1, 0), shape=(3, 3, 1))
    assert metrics.hausdorff95(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(metrics.hausdorff95(one, empty, (1, 1, 1)))
    assert math.isnan(metrics.mean_surface_distance(empty, one, (1, 1, 1)))


def test_relative_volume_difference():
    pred = np.zeros((4, 4, 1), bool)
    ref = np.zeros((4, 4, 1), bool)
    pred[0:2, 0:3] = True  # 6
    ref[0:2, 0:2] = True   # 4 -> (6 - 4) / 4
    assert metrics.relative_volume_difference(pred, ref) == pytest.approx(0.5)
    assert metrics.relative_volume_difference(ref * 0, ref * 0) == 0.0
    assert math.isnan(metrics.relative_volume_difference(pred, ref * 0))


def test_detection_per_slice():
    ref = np.zeros((3, 3, 4), bool)
    pred = np.zeros((3, 3, 4), bool)
    ref[1, 1, [0, 1, 2]] = True   # cord on slices 0, 1, 2
    pred[1, 1, [0, 2, 3]] = True  # found on 0 and 2, missed 1, false positive on 3
    d = metrics.detection(pred, ref)
    assert (d["tp"], d["fn"], d["fp"], d["tn"]) == (2, 1, 1, 0)
    assert d["rate"] == pytest.approx(2 / 3)


def test_volume_and_slice_metrics_rows():
    ref = np.zeros((4, 4, 2), bool)
    ref[1:3, 1:3, 0] = True
    pred = ref.copy()
    v = metrics.volume_metrics(pred, ref, (0.5, 0.5, 3.0))
    assert v["dice"] == 1.0 and v["hd95_mm"] == 0.0 and v["vol_ref_mm3"] == pytest.approx(4 * 0.75)
    rows = metrics.slice_metrics(pred, ref, (0.5, 0.5, 3.0))
    assert [r["dice"] for r in rows] == [1.0, 1.0]          # slice 1: both empty
    assert [r["detected"] for r in rows] == [True, True]    # slice 1: correctly nothing
    assert rows[0]["area_ref_mm2"] == pytest.approx(1.0)


def test_soft_inputs_are_thresholded_at_half():
    ref = np.array([[[0.6], [0.4]]])
    assert metrics.dice(ref, np.array([[[1.0], [0.0]]])) == 1.0
