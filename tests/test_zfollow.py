"""Postprocessing that follows the cord along z, on synthetic probability volumes."""
from __future__ import annotations

import numpy as np
import pytest

from sct_deepseg_epi.postprocess import PostOptions, postprocess
from sct_deepseg_epi.zfollow import ZFollowOptions, zfollow

ZOOMS = (0.97, 0.97, 3.0)


def disc(shape, zooms, centre_mm, radius_mm, peak):
    """A soft disc: ``peak`` at the centre, peak/2 on the circle of ``radius_mm`` (like a network's output)."""
    x = np.arange(shape[0])[:, None] * zooms[0] - centre_mm[0]
    y = np.arange(shape[1])[None, :] * zooms[1] - centre_mm[1]
    d = np.hypot(x, y)
    return (peak / (1 + np.exp((d - radius_mm) / 0.4))).astype(np.float32)


def cord(n_z=20, zooms=ZOOMS, shape=(64, 64), peaks=None, centres=None, radius=3.5):
    """A cord along z: one soft disc per slice (centre 31 mm, or ``centres``), peak 1 unless given."""
    prob = np.zeros(shape + (n_z,), np.float32)
    for k in range(n_z):
        c = centres[k] if centres is not None else (31.0, 31.0)
        prob[:, :, k] = disc(shape, zooms, c, radius, 1.0 if peaks is None else peaks[k])
    return prob


def slices_with_mask(mask):
    return [int(k) for k in np.flatnonzero(mask.any(axis=(0, 1)))]


def area(mask, k):
    return int(mask[:, :, k].sum())


def test_clear_cord_keeps_exactly_the_confident_component():
    prob = cord()
    out = zfollow(prob, ZOOMS)
    assert slices_with_mask(out.mask) == list(range(20))
    assert out.kind == ["chain"] * 20
    np.testing.assert_array_equal(out.mask, prob >= 0.5)  # a filled disc: nothing added, nothing removed


def test_one_weak_slice_is_kept_with_a_sensible_area():
    peaks = [1.0] * 20
    peaks[9] = 0.45                                  # the network found the cord but with a dip
    prob = cord(peaks=peaks)
    old = postprocess(prob, PostOptions(), float(np.prod(ZOOMS)))
    assert 9 not in slices_with_mask(old)            # what 3D thresholding loses
    out = zfollow(prob, ZOOMS)
    assert slices_with_mask(out.mask) == list(range(20))
    assert out.kind[9] == "hysteresis"
    # the half-maximum contour of the weak slice: the same disc as its neighbours
    assert 0.8 * area(out.mask, 8) <= area(out.mask, 9) <= 1.2 * area(out.mask, 8)


def test_thick_slices_of_a_curved_cord_need_not_overlap_in_3d():
    zooms = (1.0, 1.0, 9.5)
    # 6 mm between consecutive centres, radius 2.5 mm: neighbouring discs share no voxel
    centres = [(14.0 + 6.0 * k, 32.0) for k in range(8)]
    prob = cord(n_z=8, zooms=zooms, centres=centres, radius=2.5)
    a, b = prob[:, :, 3] >= 0.5, prob[:, :, 4] >= 0.5
    assert not (a & b).any()
    old = postprocess(prob, PostOptions(), float(np.prod(zooms)))
    assert len(slices_with_mask(old)) == 1           # 3D largest keeps one slice
    out = zfollow(prob, zooms)
    assert slices_with_mask(out.mask) == list(range(8))


def test_bright_ghost_off_the_cord_is_removed():
    prob = cord()
    ghost = disc((64, 64), ZOOMS, (31.0, 2.0), 4.0, 1.0)  # 29 mm away, larger than the cord
    for k in range(6, 12):                           # a ghost on several slices, bigger than the cord
        prob[:, :, k] = np.maximum(prob[:, :, k], ghost)
    out = zfollow(prob, ZOOMS)
    assert slices_with_mask(out.mask) == list(range(20))
    assert not out.mask[:, :8, :].any()
    np.testing.assert_array_equal(out.mask, cord() >= 0.5)


def test_a_speck_in_the_brainstem_is_removed():
    prob = cord()
    prob[5:7, 5:7, 18] = 0.95                        # off the cord's path, small
    prob[30:32, 30:32, 19] = 0.0
    out = zfollow(prob, ZOOMS)
    assert not out.mask[:10, :10, :].any()
    assert slices_with_mask(out.mask) == list(range(20))


def test_a_speck_on_the_path_above_the_cords_end_is_removed():
    prob = cord(peaks=[1.0] * 14 + [0.0] * 6)
    prob[31:34, 31:34, 17] = 0.9                     # 9 voxels on the centreline, three slices above the end
    out = zfollow(prob, ZOOMS)
    assert slices_with_mask(out.mask) == list(range(14))


def test_empty_slices_below_the_cords_end_stay_empty():
    rng = np.random.default_rng(0)
    prob = cord(peaks=[0.0] * 5 + [1.0] * 15)
    prob[:, :, :5] = rng.uniform(0, 0.08, size=(64, 64, 5))   # background noise
    prob[31:34, 31:34, 4] = 0.3                      # a weak flicker on the path, a fifth of the cord's area
    out = zfollow(prob, ZOOMS)
    assert slices_with_mask(out.mask) == list(range(5, 20))


def test_no_cord_gives_an_empty_mask():
    rng = np.random.default_rng(1)
    prob = rng.uniform(0, 0.3, size=(48, 48, 12)).astype(np.float32)
    out = zfollow(prob, ZOOMS)
    assert not out.mask.any()
    assert out.kind == [""] * 12
    assert not zfollow(np.zeros((8, 8, 3), np.float32), ZOOMS).mask.any()


@pytest.mark.parametrize("top", [[0.3], [0.6, 0.35, 0.2]])
def test_weak_slices_at_the_top_of_the_stack_are_kept(top):
    zooms = (1.0, 1.0, 9.5)
    peaks = [1.0] * (10 - len(top)) + top            # upper cervical cord near the coil's edge
    prob = cord(n_z=10, zooms=zooms, peaks=peaks, radius=4.5)
    out = zfollow(prob, zooms)
    assert slices_with_mask(out.mask) == list(range(10))
    assert all(k in ("chain", "hysteresis") for k in out.kind)


def test_a_very_weak_slice_between_cord_slices_is_bridged():
    peaks = [1.0] * 20
    peaks[12] = 0.08                                 # below the evidence threshold, but between cord slices
    out = zfollow(cord(peaks=peaks), ZOOMS)
    assert out.kind[12] == "bridge"
    assert slices_with_mask(out.mask) == list(range(20))


def test_a_weak_slice_merged_with_its_surroundings_is_trimmed_to_a_sensible_area():
    peaks = [1.0] * 20
    peaks[10] = 0.4
    prob = cord(peaks=peaks)
    prob[:, :, 10] = np.maximum(prob[:, :, 10], 0.25)   # a plateau around the weak cord
    out = zfollow(prob, ZOOMS)
    assert 0 < area(out.mask, 10) <= 2.0 * area(out.mask, 9)


def test_holes_are_filled_slice_by_slice():
    prob = cord()
    prob[31, 32, 5] = 0.1
    out = zfollow(prob, ZOOMS)
    assert out.mask[31, 32, 5]
    assert not zfollow(prob, ZOOMS, ZFollowOptions(fill_holes=False)).mask[31, 32, 5]


def test_threshold_option_is_the_confident_threshold():
    prob = cord(peaks=[0.7] * 20)
    assert slices_with_mask(zfollow(prob, ZOOMS).mask) == list(range(20))
    assert all(k == "chain" for k in zfollow(prob, ZOOMS).kind)
    assert all(k != "chain" for k in zfollow(prob, ZOOMS, ZFollowOptions(threshold=0.8)).kind)


def test_options_at_a_low_threshold_keep_their_order_and_bad_orders_are_refused():
    from sct_deepseg_epi.zfollow import zfollow_options

    o = zfollow_options(0.1)
    assert (o.threshold, o.low, o.floor) == (0.1, 0.1, 0.05)
    assert zfollow_options(0.03).floor == 0.03
    with pytest.raises(ValueError, match="floor <= low <= threshold"):
        ZFollowOptions(threshold=0.5, low=0.6)


def test_finish_follows_z_by_default_keeps_labels_and_3d_is_the_old_path():
    from sct_deepseg_epi.backend import Probabilities
    from sct_deepseg_epi.postprocess import finish

    peaks = [1.0] * 20
    peaks[9] = 0.45
    prob = cord(peaks=peaks)
    prob[5:8, 5:8, 3] = 0.9                          # a speck off the cord
    labels = (prob >= 0.5).astype(np.uint8) * 2      # a model's own label value
    probs = Probabilities(prob, np.zeros_like(prob), labels)
    z = finish(probs, PostOptions(), ZOOMS, labels_at=0.5)
    assert set(np.unique(z)) == {0, 1, 2} and (z[:, :, 9] == 1).any()   # the weak slice: added voxels take 1
    assert not z[5:8, 5:8, 3].any()
    old = finish(probs, PostOptions(method="3d"), ZOOMS, labels_at=0.5)
    np.testing.assert_array_equal(old > 0, postprocess(prob, PostOptions(method="3d"), float(np.prod(ZOOMS))))
    with pytest.raises(ValueError, match="method"):
        PostOptions(method="2d")


class Click:
    """A prompt as zfollow sees it: a RAS voxel and whether it is on the cord."""

    def __init__(self, x, y, z, cord=True):
        self.ras, self.cord = (x, y, z), cord


def test_a_click_where_the_map_is_empty_reruns_the_slice_and_takes_its_outline():
    prob = cord()
    prob[:, :, 9] = 0                                    # the network missed slice 9 entirely
    calls = []

    def rerun(z, centre, size_mm):
        calls.append((z, centre, size_mm))
        win = disc(prob.shape[:2], ZOOMS, (31.0, 31.0), 3.5, 1.0)
        win[:5] = np.nan                                 # outside the window
        return win

    base = zfollow(prob, ZOOMS)
    assert not base.mask[:, :, 9].any()
    out = zfollow(prob, ZOOMS, prompts=[Click(32, 32, 9)], rerun=rerun)
    assert [c[2] for c in calls] == [24.0, 32.0, 48.0] and {c[:2] for c in calls} == {(9, (32, 32))}
    assert out.prompts == ["rerun+outline"] and out.kind[9] == "prompt"
    np.testing.assert_array_equal(out.mask[:, :, 9], out.mask[:, :, 8])  # the same disc as its neighbours
    others = [k for k in range(20) if k != 9]
    np.testing.assert_array_equal(out.mask[:, :, others], base.mask[:, :, others])


def test_without_a_rerun_nor_evidence_a_click_takes_the_neighbours_shape_at_the_point():
    prob = cord()
    prob[:, :, 9] = 0
    out = zfollow(prob, ZOOMS, prompts=[Click(34, 32, 9)])   # 3 voxels off the neighbours' centre
    assert out.prompts == ["norerun+shape"]
    np.testing.assert_array_equal(out.mask[:, :, 9], np.roll(out.mask[:, :, 8], 2, axis=0))


def test_a_click_on_a_ghost_free_slice_reroutes_a_chain_that_followed_a_ghost():
    # the cord is confident on slices 0-5 and 14 only, weak elsewhere; a ghost 20 mm away is confident on
    # slices 4-19, a longer chain than the cord's. A click on the cord's component at slice 14 forces the
    # chain through it: the slices above then follow the cord, not the ghost
    peaks = [1.0] * 6 + [0.3] * 8 + [1.0] + [0.3] * 5
    prob = cord(peaks=peaks)
    for k in range(4, 20):
        prob[:, :, k] = np.maximum(prob[:, :, k], disc(prob.shape[:2], ZOOMS, (31.0, 51.0), 3.5, 1.0))
    base = zfollow(prob, ZOOMS)
    assert base.mask[32, 53, 17] and not base.mask[32, 32, 17]  # the ghost's chain won
    out = zfollow(prob, ZOOMS, prompts=[Click(32, 32, 14)])
    assert out.prompts == ["norerun+outline"] and out.mask[32, 32, 14]
    assert out.mask[32, 32, 17] and not out.mask[32, 53, 17]      # re-routed: the other slices follow the cord


def test_no_prompts_is_the_plain_call():
    prob = cord(peaks=[1.0] * 9 + [0.45] + [1.0] * 10)
    a, b = zfollow(prob, ZOOMS), zfollow(prob, ZOOMS, prompts=())
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.kind == b.kind and b.prompts == []


def test_clicks_that_only_add_chain_members_leave_the_other_slices_as_they_were():
    # slices 0-1 missed, slice 2 a small disc: without clicks a speck on the chain, kept by hysteresis at a
    # lower threshold (larger); clicks on 0 and 1 whose windows show small discs make slice 2 a chain
    # member at the confident threshold. The chain's route is the same, so slice 2 keeps its mask
    prob = cord()
    prob[:, :, :2] = 0
    prob[:, :, 2] = disc(prob.shape[:2], ZOOMS, (31.0, 31.0), 2.0, 1.0)

    def rerun(z, centre, size_mm):
        return disc(prob.shape[:2], ZOOMS, (31.0, 31.0), 2.0, 1.0)

    base = zfollow(prob, ZOOMS)
    assert base.kind[2] == "hysteresis"
    out = zfollow(prob, ZOOMS, prompts=[Click(32, 32, 0), Click(32, 32, 1)], rerun=rerun)
    assert out.prompts == ["rerun+outline"] * 2 and out.mask[:, :, :2].any(axis=(0, 1)).all()
    np.testing.assert_array_equal(out.mask[:, :, 2:], base.mask[:, :, 2:])
    assert out.kind[2:] == base.kind[2:]


def test_two_cord_points_on_one_slice_keep_both_objects():
    prob = cord()
    prob[:, :, 9] = 0
    twin = np.maximum(disc(prob.shape[:2], ZOOMS, (20.0, 31.0), 3.5, 1.0), disc(prob.shape[:2], ZOOMS, (42.0, 31.0), 3.5, 1.0))
    out = zfollow(prob, ZOOMS, prompts=[Click(21, 32, 9), Click(43, 32, 9)], rerun=lambda z, c, s: twin)
    assert out.mask[21, 32, 9] and out.mask[43, 32, 9] and out.prompts == ["rerun+outline"] * 2
