"""The cord mask for ``sct_fmri_moco -dl``: every slice covered, grown in-plane by a margin in mm.

(The cylinder mask for the ANTs correction is tested in test_handoff.py.)
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from conftest import blob_image
from sct_deepseg_epi.errors import InputError
from sct_deepseg_epi.mocomask import cord_mask, dilate_in_plane, moco_mask


def _save(arr, affine, path):
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def test_dilation_is_a_disc_in_millimetres_within_each_slice():
    # 0.8 x 1.6 mm in-plane voxels, 4 mm slices; a 3.3 mm margin is 4 voxels across x, 2 along y
    affine = np.diag([-0.8, -1.6, 4.0, 1.0])
    seg = np.zeros((40, 30, 3), bool)
    seg[18:22, 14:17, 1] = True  # cord on the middle slice only
    grown = dilate_in_plane(seg, affine, 2, 3.3)
    edt = ndimage.distance_transform_edt(~seg[..., 1], sampling=(0.8, 1.6))
    assert np.array_equal(grown[..., 1], edt <= 3.3)  # the exact Euclidean margin in mm
    assert not grown[..., 0].any() and not grown[..., 2].any()  # never along the cord
    xs, ys = np.nonzero(grown[..., 1])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (18 - 4, 21 + 4, 14 - 2, 16 + 2)
    assert np.array_equal(dilate_in_plane(seg, affine, 2, 0.0), seg)
    with pytest.raises(InputError, match="margin must be zero or positive"):
        dilate_in_plane(seg, affine, 2, -1.0)


def test_cord_mask_covers_every_slice_moving_the_nearest_cord_to_the_interpolated_centre():
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    seg = np.zeros((30, 30, 6), np.uint8)
    seg[10:13, 10:14, 1] = 1  # centre (11, 11.5)
    seg[14:17, 12:16, 3] = 1  # centre (15, 13.5); slice 2 between them is missed
    seg[14:17, 12:16, 4] = 1
    m = cord_mask(seg, affine, margin_mm=0.0)
    assert m.dtype == np.uint8 and m.shape == seg.shape
    for z in (1, 3, 4):  # found slices: the cord exactly as segmented
        assert np.array_equal(m[..., z], seg[..., z])
    # slice 2: centre (13, 12.5) interpolated; nearest cord slice is 1 (tie with 3 goes to the lower),
    # whose cord is moved by (2, 1) voxels
    assert np.array_equal(m[..., 2], np.roll(np.roll(seg[..., 1], 2, 0), 1, 1))
    # beyond the ends: the nearest cord, unmoved
    assert np.array_equal(m[..., 0], seg[..., 1]) and np.array_equal(m[..., 5], seg[..., 4])
    grown = cord_mask(seg, affine, margin_mm=2.0)
    assert all(grown[..., z].sum() > m[..., z].sum() for z in range(6)) and np.all(grown >= m)


def test_cord_mask_follows_the_affine_not_the_axis_order():
    img, disc = blob_image(shape=(30, 28, 5), zooms=(0.8, 1.2, 5.0), radius=3.0)  # RAS
    disc[..., 2] = 0  # a missed slice
    ras = cord_mask(disc, img.affine, margin_mm=2.5)
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("SPL"))  # slices across the first voxel axis
    stored = apply_orientation(disc, t)
    affine = img.affine @ inv_ornt_aff(t, disc.shape)
    assert np.array_equal(cord_mask(stored, affine, margin_mm=2.5), apply_orientation(ras, t))


def test_moco_mask_cord_kind_file_name_grid_and_errors(tmp_path):
    img, disc = blob_image(n_volumes=3, axcodes="LPI")
    bold = tmp_path / "fmri.nii.gz"
    nib.save(img, str(bold))
    seg = _save(disc, img.affine, tmp_path / "fmri_seg.nii.gz")
    out = moco_mask(bold, seg, kind="cord", margin_mm=3.0)
    assert out == tmp_path / "mask_fmri_cord.nii.gz"  # never mistaken for the cylinder's mask_fmri.nii.gz
    written = nib.load(str(out))
    assert written.shape == img.shape[:3] and np.allclose(written.affine, img.affine)
    assert np.array_equal(np.asarray(written.dataobj), cord_mask(disc, img.affine, 3.0))
    with pytest.raises(InputError, match="unknown moco mask kind 'box'"):
        moco_mask(bold, seg, tmp_path / "m.nii.gz", kind="box")
    with pytest.raises(InputError, match="margin must be zero or positive"):
        moco_mask(bold, seg, tmp_path / "m.nii.gz", kind="cord", margin_mm=-2)
    assert not (tmp_path / "m.nii.gz").exists()
