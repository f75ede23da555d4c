"""Stage 5: headers kept exactly, atomic files, streamed 4D output."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image

from sct_deepseg_epi.errors import InputError
from sct_deepseg_epi.outputs import check_output, make_folders
from sct_deepseg_epi.write import FrameWriter, atomic_path, default_output, like, save_nifti


def test_default_output_naming(tmp_path):
    assert default_output(tmp_path / "bold.nii.gz") == tmp_path / "bold_seg.nii.gz"
    assert default_output(tmp_path / "a.b.nii") == tmp_path / "a.b_seg.nii"


def test_header_geometry_kept_exactly(tmp_path):
    img, mask = blob_image(axcodes="LPI")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine @ np.diag([1, 1, 1, 1]), code=4)
    out = save_nifti(like(mask.astype(np.uint8), img), tmp_path / "m.nii.gz")
    back = nib.load(str(out))
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                "srow_x", "srow_y", "srow_z", "pixdim"):
        assert np.array_equal(back.header[key], img.header[key]), key
    assert np.array_equal(back.affine, img.affine)
    assert back.get_data_dtype() == np.uint8


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "x.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_frame_writer_streams_4d(tmp_path):
    img, _ = blob_image(n_volumes=3)
    frames = [np.full(img.shape[:3], t, np.uint8) for t in range(3)]
    with FrameWriter(tmp_path / "m.nii.gz", img, img.shape, np.uint8) as w:
        for f in frames:
            w.write(f)
        w.commit()
    back = nib.load(str(tmp_path / "m.nii.gz"))
    assert back.shape == img.shape and np.array_equal(np.asarray(back.dataobj)[..., 2], frames[2])
    assert np.array_equal(back.affine, img.affine) and back.header["sform_code"] == img.header["sform_code"]


def test_frame_writer_aborts_on_error(tmp_path):
    img, _ = blob_image(n_volumes=3)
    with pytest.raises(RuntimeError):
        with FrameWriter(tmp_path / "m.nii.gz", img, img.shape, np.uint8) as w:
            w.write(np.zeros(img.shape[:3], np.uint8))
            raise RuntimeError("worker died")
    assert os.listdir(tmp_path) == []


def test_check_output_refuses_input(tmp_path):
    p = tmp_path / "in.nii.gz"
    p.write_bytes(b"x")
    with pytest.raises(InputError, match="is the input"):
        check_output(p, [p])


def test_check_output_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_output(tmp_path / "nope" / "m.nii.gz")


def test_check_output_unwritable_folder(tmp_path):
    # root ignores permission bits, so a folder that is really a file is the portable case
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError):
        check_output(blocker / "m.nii.gz")


def test_make_folders_that_fail_midway_remove_the_levels_they_made(tmp_path):
    """A level that cannot be made (a name too long for the file system) is one line, and the
    levels made before it are gone; an existing folder stays."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(InputError, match="the output folder cannot be created"):
        make_folders(tmp_path / "kept" / "a" / "b" / ("x" * 300) / "c")
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
    assert make_folders(tmp_path / "kept" / "a" / "b") == [tmp_path / "kept" / "a", tmp_path / "kept" / "a" / "b"]


def test_outputs_get_ordinary_permissions(tmp_path):
    img, mask = blob_image()
    old = os.umask(0o022)
    try:
        out = save_nifti(like(mask.astype(np.uint8), img), tmp_path / "m.nii.gz")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
