"""Pairing images with labels, and training inputs made exactly like the engine's (numpy only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sct_deepseg_epi.errors import InputError
from sct_deepseg_epi.preprocess import prepare
from sct_deepseg_epi.training.data import (crop_patch, discover, is_label, load_source, pair_files, prepared_pair,
                                           unique_names)
from sct_deepseg_epi.training.simulate import SimConfig, simulate
from train_fixtures import tiny_bids  # noqa: F401,E402  (fixture)


def test_label_names():
    assert is_label("sub-01_T2starw_seg-manual.nii.gz")
    assert is_label("t2s_seg.nii.gz") and is_label("sub-01_bold_mask.nii.gz")
    assert not is_label("sub-01_T2starw_gmseg-manual.nii.gz")  # grey matter, not cord
    assert not is_label("sub-01_T2starw.nii.gz") and not is_label("segment.nii.gz")


def test_pair_files_longest_prefix_and_derivatives():
    files = [Path(p) for p in (
        "raw/sub-01/anat/sub-01_T2starw.nii.gz",
        "raw/sub-01/anat/sub-01_T2starw_run-1.nii.gz",
        "derivatives/labels/sub-01/anat/sub-01_T2starw_run-1_seg-manual.nii.gz",
        "derivatives/labels/sub-01/anat/sub-01_T2starw_run-1_gmseg-manual.nii.gz",
        "x/t2s.nii.gz", "x/t2s_seg.nii.gz", "x/orphan_seg.nii.gz")]
    pairs = pair_files(files)
    assert [(p.image.name, p.mask.name) for p in pairs] == [
        ("sub-01_T2starw_run-1.nii.gz", "sub-01_T2starw_run-1_seg-manual.nii.gz"),
        ("t2s.nii.gz", "t2s_seg.nii.gz")]
    assert pairs[0].group == "sub-01"


def test_pair_files_prefers_the_labels_own_subject_folder():
    # the same stem in several folders: each label goes with the image next to it
    files = [Path(p) for p in (
        "anat/other/t2.nii.gz", "anat/other/t2_seg-manual.nii.gz",
        "anat/set/errsm_11/t2.nii.gz", "anat/set/errsm_11/t2_seg-manual.nii.gz",
        "anat/set/errsm_18/gre.nii.gz", "anat/set/errsm_18/gre_seg.nii.gz",
        "anat/set/errsm_18/t2.nii.gz", "anat/set/errsm_18/t2_seg-manual.nii.gz")]
    pairs = pair_files(files)
    assert [(str(p.image.parent), p.mask.parent == p.image.parent) for p in pairs] == [
        ("anat/other", True), ("anat/set/errsm_11", True), ("anat/set/errsm_18", True), ("anat/set/errsm_18", True)]
    # contrasts of one subject folder form one fold group; names stay unique
    assert [p.group for p in pairs] == ["other/t2", "errsm_11", "errsm_18", "errsm_18"]
    assert unique_names(pairs) == ["other/t2", "errsm_11/t2", "errsm_18/gre", "errsm_18/t2"]


def test_discover_bids(tiny_bids):
    pairs = discover(tiny_bids)
    assert [p.group for p in pairs] == ["sub-01", "sub-02", "sub-03"]
    src = load_source(pairs[0])
    assert src.image.shape == src.mask.shape and set(np.unique(src.mask)) <= {0.0, 1.0}
    assert src.zooms == pytest.approx((1.0, 1.0, 3.0))


def test_discover_nothing(tmp_path):
    with pytest.raises(InputError, match="no image/label pairs"):
        discover(tmp_path)


def test_prepared_pair_is_the_engines_prepare(tiny_bids):
    from sct_deepseg_epi.registry.manifest import spec_from_dict

    spec = spec_from_dict({"schema_version": 1, "name": "t", "version": "0.0.1",
                           "members": [{"file": "a.onnx", "sha256": "0" * 64}],
                           "input": {"spacing_mm": [1.0, 1.0], "context_slices": 1, "size_multiple": 8}})
    sim = simulate(load_source(discover(tiny_bids)[0]), np.random.default_rng(0), SimConfig())
    x, y = prepared_pair(sim, spec)
    np.testing.assert_array_equal(x, prepare(sim.image, sim.zooms, spec).batch)
    assert x.shape[1] == 3 and y.shape == (x.shape[0], 1) + x.shape[2:]
    assert x.shape[2] % 8 == 0 and x.shape[3] % 8 == 0
    xp, yp = crop_patch(x[0], y[0], 32, np.random.default_rng(0))
    assert xp.shape == (3, 32, 32) and yp.shape == (1, 32, 32)
    if y[0].max() > 0.5:
        assert yp.max() > 0.5  # the window keeps the cord


def test_numpy_parts_and_clis_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "import sct_deepseg_epi.metrics, sct_deepseg_epi.cli.train, sct_deepseg_epi.cli.evaluate\n"
            "import sct_deepseg_epi.training.simulate, sct_deepseg_epi.training.data\n"
            "import sct_deepseg_epi.training.validate, sct_deepseg_epi.training.benchmark\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
