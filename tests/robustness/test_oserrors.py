"""Any OSError while writing is one line naming the output and the OS reason, and leaves no file behind;
output paths and name lengths are checked before inference."""
from __future__ import annotations

import os

import nibabel as nib
import pytest
from conftest import blob_image
from hostile import assert_one_line, fsize_limited, one_line_error, run_cli, small_fs  # noqa: F401

from sct_deepseg_epi.cli import main


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in.nii.gz"
    nib.save(blob_image()[0], str(p))
    return p


@pytest.fixture
def series(tmp_path):
    p = tmp_path / "bold.nii.gz"
    nib.save(blob_image(n_volumes=20)[0], str(p))
    return p


def test_output_under_proc(tiny_model, src, capsys):
    assert main(["-i", str(src), "-o", "/proc/x.nii.gz", "-model", "tiny"]) == 1
    line = one_line_error(capsys)
    assert line.startswith("error: /proc/x.nii.gz: the output folder /proc is not writable (")


@pytest.mark.parametrize("length", [247, 300])
def test_output_name_too_long(tiny_model, src, capsys, length):
    name = "m" * (length - len(".nii.gz")) + ".nii.gz"
    assert main(["-i", str(src), "-o", str(src.parent / name), "-model", "nope"]) == 1  # before the model is loaded
    line = one_line_error(capsys)
    assert f"the file name is {length} bytes" in line and "choose a shorter name" in line
    assert [p.name for p in src.parent.iterdir() if p.name.startswith(("mmm", ".mmm"))] == []


def test_long_name_that_fits_still_works(tiny_model, src):
    name = "m" * 200 + ".nii.gz"
    assert main(["-i", str(src), "-o", str(src.parent / name), "-model", "tiny", "-v", "0"]) == 0
    assert (src.parent / name).is_file()


def _fill(folder, leave: int) -> None:
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("each", [False, True])
def test_full_disk(tiny_model, src, series, small_fs, capsys, each):
    """200 kB tmpfs, filled to the last few kB: ENOSPC while the maps are written (or gzip flushes)."""
    _fill(small_fs, 6000)
    args = ["-i", str(series), "-4d", "each"] if each else ["-i", str(src)]
    assert main([*args, "-o", str(small_fs / "out.nii.gz"), "-soft", "1", "-disagreement", "1", "-model", "tiny"]) == 1
    line = one_line_error(capsys)
    assert str(small_fs / "out") in line and "No space left on device" in line
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]  # no output, no .part file


def test_file_size_limit_while_streaming(tiny_model, series, tmp_path):
    """Without root: RLIMIT_FSIZE (EFBIG) in the middle of a -4d each stream; nothing is left."""
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(["-i", str(series), "-4d", "each", "-soft", "1", "-o", str(out / "m.nii"), "-model", "tiny"],
                   {"SCT_DEEPSEG_EPI_MODELS": str(tiny_model.parents[1])}, preexec_fn=fsize_limited(60_000))
    line = assert_one_line(proc)
    assert str(out / "m") in line and "File too large" in line
    assert list(out.iterdir()) == []
