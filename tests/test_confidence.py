"""Per-slice confidence report and its flag rules."""
from __future__ import annotations

import numpy as np

from sct_deepseg_epi.confidence import (RULES_VERSION, ConfidenceRules, flagged, sidecar_block, slice_axis, slice_report,
                                        summarise, to_native)

ZOOMS = (0.5, 2.0, 3.0)  # 1 mm2 per voxel


def volume(areas, prob=0.95, dis=0.02):
    """A mask with ``areas[k]`` voxels on slice k, and matching probability/disagreement maps."""
    m = np.zeros((len(areas), 400), bool)
    for k, a in enumerate(areas):
        m[k, :a] = True
    m = np.moveaxis(m.reshape(len(areas), 20, 20), 0, 2)
    p = np.where(m, prob, 0.0).astype(np.float32)
    d = np.where(m, dis, 0.0).astype(np.float32)
    return m, p, d


def test_clean_cord_raises_no_flag_and_reports_areas_and_means():
    m, p, d = volume([50, 52, 48, 51])
    rep = slice_report(m, p, d, ZOOMS)
    assert [r["slice"] for r in rep] == [0, 1, 2, 3]
    assert [r["area_mm2"] for r in rep] == [50.0, 52.0, 48.0, 51.0]
    assert rep[0]["mean_probability"] == 0.95 and rep[0]["mean_disagreement"] == 0.02
    assert flagged(rep) == []


def test_gap_between_cord_slices_is_flagged_but_not_the_empty_ends():
    m, p, d = volume([0, 50, 0, 50, 0])
    rep = slice_report(m, p, d, ZOOMS)
    assert flagged(rep) == [2]
    assert rep[2]["reasons"] == ["gap"] and rep[2]["mean_probability"] is None


def test_low_probability_and_disagreement():
    m, p, d = volume([50, 50, 50])
    p[:, :, 1] = np.where(m[:, :, 1], 0.6, 0)       # below 0.7
    d[:, :, 2] = np.where(m[:, :, 2], 0.2, 0)       # above 0.15
    rep = slice_report(m, p, d, ZOOMS)
    assert rep[1]["reasons"] == ["low_probability"]
    assert rep[2]["reasons"] == ["disagreement"]
    assert rep[0]["flag"] is False


def test_area_jump_against_the_neighbours_median():
    m, p, d = volume([50, 50, 80, 50, 50, 69])
    rep = slice_report(m, p, d, ZOOMS)
    assert "area_jump" in rep[2]["reasons"]          # +60 %
    assert not rep[5]["flag"]                        # +38 % of the median of its two neighbours below
    assert flagged(slice_report(m, p, d, ZOOMS, rules=ConfidenceRules(max_area_change=0.7))) == []


def test_weak_evidence_when_no_voxel_reaches_the_threshold_and_no_disagreement_map():
    m, p, _ = volume([50, 50, 50])
    p[:, :, 1] = np.where(m[:, :, 1], 0.45, 0)      # kept by z-following's lower threshold
    rep = slice_report(m, p, None, ZOOMS, threshold=0.5)
    assert flagged(rep) == [1] and rep[1]["reasons"] == ["low_probability", "weak_evidence"]
    assert rep[0]["mean_disagreement"] is None
    assert "weak_evidence" not in slice_report(m, p, None, ZOOMS, threshold=0.4)[1]["reasons"]


def test_native_order_follows_the_orientation():
    m, p, d = volume([0, 50, 50, 10])
    rep = slice_report(m, p, d, ZOOMS)
    ras = np.array([[0, 1], [1, 1], [2, 1]])       # RAS on disk: the same order
    assert to_native(rep, ras) == rep
    lpi = np.array([[0, -1], [1, -1], [2, -1]])    # I on disk: slice 0 is the top
    nat = to_native(rep, lpi)
    assert [r["slice"] for r in nat] == [0, 1, 2, 3] and [r["area_mm2"] for r in nat] == [10, 50, 50, 0]
    assert slice_axis(np.array([[2, -1], [0, 1], [1, 1]])) == (0, True)   # slices along the first axis


def test_series_summary_keeps_reasons_seen_in_a_tenth_of_the_volumes():
    m, p, d = volume([50, 50, 50])
    good = slice_report(m, p, d, ZOOMS)
    p2 = p.copy()
    p2[:, :, 2] = np.where(m[:, :, 2], 0.6, 0)
    bad = slice_report(m, p2, d, ZOOMS)
    one_in_ten = summarise([bad] + [good] * 9)
    assert one_in_ten[2]["flag"] and one_in_ten[2]["reasons"] == ["low_probability"]
    assert one_in_ten[2]["frames_flagged"] == 1 and not one_in_ten[0]["flag"]
    assert not summarise([bad] + [good] * 10)[2]["flag"]                 # 1 of 11: below a tenth
    block = sidecar_block([bad] + [good] * 9, np.array([[0, 1], [1, 1], [2, 1]]))
    assert block["slice_flags"]["flagged"] == [2] and block["slice_flags"]["volumes"] == 10
    assert block["slice_flags"]["version"] == RULES_VERSION and block["slice_flags"]["axis"] == 2
    assert summarise([good]) is good


def test_rules_are_versioned():
    d = ConfidenceRules().as_dict()
    assert d["version"] == RULES_VERSION and d["min_mean_probability"] == 0.7
