"""Stage 1: reading, validation and orientation."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image

from sct_deepseg_epi.errors import InputError
from sct_deepseg_epi.read import from_image, read_volume


@pytest.mark.parametrize("axcodes", ["RAS", "LPI", "LAS", "PSR", "ASL", "IRP"])
def test_any_orientation_maps_to_ras_and_back(axcodes):
    ras_img, ras_mask = blob_image(axcodes="RAS")
    img, mask = blob_image(axcodes=axcodes)
    vol = from_image(img)
    # same world content whatever the storage order
    assert np.allclose(vol.data, from_image(ras_img).data)
    assert vol.zooms == pytest.approx((1.0, 1.0, 4.0))
    # back to the stored axes exactly
    assert np.array_equal(vol.to_native((vol.data > 500).astype(np.uint8)), mask)


def test_4d_mean_and_frames(tmp_path):
    img, _ = blob_image(n_volumes=5, axcodes="LAS")
    p = tmp_path / "bold.nii.gz"
    nib.save(img, str(p))
    vol = read_volume(p)
    assert vol.is_4d and vol.n_frames == 5 and vol.data.shape == (40, 36, 6)
    frames = list(vol.iter_frames())
    assert len(frames) == 5
    assert np.allclose(np.mean(frames, axis=0), vol.data, atol=1e-3)


def test_trailing_singleton_4d_is_3d():
    img, _ = blob_image()
    img4 = nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine)
    vol = from_image(img4)
    assert not vol.is_4d and vol.data.shape == (40, 36, 6)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_not_nifti(tmp_path):
    p = tmp_path / "x.nii.gz"
    p.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(InputError, match=str(p.name)):
        read_volume(p)


def test_wrong_extension(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hello")
    with pytest.raises(InputError, match="not a NIfTI file"):
        read_volume(p)


def test_truncated_gz(tmp_path):
    img, _ = blob_image()
    p = tmp_path / "t.nii.gz"
    nib.save(img, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or damaged"):
        read_volume(p)


def test_2d_image_refused():
    img = nib.Nifti1Image(np.ones((20, 20), np.float32), np.eye(4))
    with pytest.raises(InputError, match="2D image"):
        from_image(img, "flat.nii")


def test_5d_image_refused():
    img = nib.Nifti1Image(np.random.rand(8, 8, 4, 2, 3).astype(np.float32), np.eye(4))
    with pytest.raises(InputError, match="5D image"):
        from_image(img, "five.nii")


def test_all_zero_refused():
    img = nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4))
    with pytest.raises(InputError, match="empty"):
        from_image(img, "zero.nii")


def test_nan_repaired_with_warning():
    img, _ = blob_image()
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = np.nan
    data[1, 0, 0] = np.inf
    vol = from_image(nib.Nifti1Image(data, img.affine), "nan.nii")
    assert np.isfinite(vol.data).all()
    assert vol.warnings and "2 NaN/Inf" in vol.warnings[0]


def test_all_nan_refused():
    img = nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4))
    with pytest.raises(InputError, match="NaN"):
        from_image(img, "nan.nii")


def test_degenerate_affine_refused(tmp_path):
    img = nib.Nifti1Image(np.random.rand(8, 8, 4).astype(np.float32), np.eye(4))
    p = tmp_path / "nogeom.nii"
    nib.save(img, str(p))
    raw = bytearray(p.read_bytes())
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1 ...
    raw[280:328] = np.zeros(12, "<f4").tobytes()     # ... with an all-zero sform matrix
    p.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="affine"):
        read_volume(p)


def test_real_epi_orientation(shared_data):
    vol = read_volume(shared_data / "epi" / "sct-example-2014" / "fmri.nii.gz")
    assert vol.is_4d and vol.n_frames == 30
    assert vol.zooms[2] == pytest.approx(16.8, abs=0.01)
