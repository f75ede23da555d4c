"""Headers that promise more than the file holds, or a model grid too large to allocate: one line, no output."""
from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image
from hostile import one_line_error

from sct_deepseg_epi import preprocess
from sct_deepseg_epi.cli import main
from sct_deepseg_epi.errors import InputError


def _header_bytes(shape, dtype=np.float32) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), 1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir() if "_seg" in p.name or ".part" in p.name)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_30000_cubed_header_in_1kb_file(tiny_model, tmp_path, capsys, suffix):
    body = _header_bytes((30000, 30000, 30000)) + b"\0" * 600
    path = tmp_path / f"huge{suffix}"
    path.write_bytes(gzip.compress(body) if suffix.endswith(".gz") else body)
    assert path.stat().st_size < 1100
    assert main(["-i", str(path), "-model", "tiny"]) == 1
    line = one_line_error(capsys)
    assert str(path) in line and "30000x30000x30000" in line and ("truncated" in line or "can hold" in line)
    assert _outputs(tmp_path) == []


def test_data_offset_beyond_the_file(tiny_model, tmp_path, capsys):
    img, _ = blob_image()
    good = tmp_path / "good.nii"
    nib.save(img, str(good))
    raw = bytearray(good.read_bytes())
    raw[108:112] = struct.pack("<f", 1e9)  # vox_offset
    path = tmp_path / "offset.nii"
    path.write_bytes(bytes(raw))
    assert main(["-i", str(path), "-model", "tiny"]) == 1
    line = one_line_error(capsys)
    assert "offset.nii" in line and "1000000000-byte offset" in line


def test_truncated_nii_is_named_before_reading(tiny_model, tmp_path, capsys):
    img, _ = blob_image()
    good = tmp_path / "good.nii"
    nib.save(img, str(good))
    path = tmp_path / "cut.nii"
    path.write_bytes(good.read_bytes()[:2000])
    assert main(["-i", str(path), "-model", "tiny"]) == 1
    line = one_line_error(capsys)
    assert "cut.nii: the file is truncated" in line and "holds 2.0 kB" in line


def test_300mm_pixels_refused_before_resampling(tiny_model, tmp_path, capsys):
    """68x68x5 voxels of 300 mm: resampling to the 1 mm model grid would need 20400x20400x5 floats (8 GB)."""
    img, _ = blob_image(shape=(68, 68, 5), zooms=(300.0, 300.0, 4.0), centre=(34, 34))
    path = tmp_path / "wide.nii.gz"
    nib.save(img, str(path))
    assert main(["-i", str(path), "-model", "tiny"]) == 1
    line = one_line_error(capsys)
    assert "wide.nii.gz" in line and "20400x20400x5" in line and f"limit of {preprocess.MAX_GRID_AXIS} per axis" in line
    assert "pixel size" in line
    assert _outputs(tmp_path) == []


def test_model_grid_bound_keeps_real_images():
    check_model_grid = preprocess.check_model_grid
    assert check_model_grid((128, 128, 24), (1.5, 1.5, 4.0), (1.0, 1.0)) == (192, 192)
    assert check_model_grid((512, 512, 400), (0.5, 0.5, 1.0), (0.5, 0.5)) == (512, 512)
    with pytest.raises(InputError, match="in all"):
        check_model_grid((4000, 4000, 200), (1.0, 1.0, 1.0), (1.0, 1.0))  # each axis fits, the total does not
