"""Inputs and flags, round 2: every nibabel header error is one line naming the file, header fixes are
warnings naming it, contradictory flags are usage errors (exit 2), control characters in names are escaped."""
from __future__ import annotations

import json
import struct

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image
from hostile import assert_one_line, one_line_error, run_cli

from sct_deepseg_epi.cli import main
from sct_deepseg_epi.cli.segment import get_parser


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in.nii.gz"
    nib.save(blob_image()[0], str(p))
    return p


def _raw_nifti(path, fields: dict) -> None:
    """A .nii file of the blob image whose header fields (offset -> (struct format, value)) are overwritten."""
    img = blob_image()[0]
    raw = bytearray(img.header.binaryblock)
    for offset, (fmt, value) in fields.items():
        raw[offset:offset + struct.calcsize(fmt)] = struct.pack("<" + fmt, value)
    path.write_bytes(bytes(raw) + b"\0" * 4 + np.asarray(img.dataobj, np.float32).tobytes(order="F"))


def _files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "models-cache")


@pytest.mark.parametrize("name, fields", [
    ("dim0_9", {40: ("h", 9)}),                       # dim[0] out of range: nibabel reads it as byte-swapped
    ("datatype_999", {70: ("h", 999)}),               # an unknown datatype code
    ("datatype_0", {70: ("h", 0)}),                   # DT_UNKNOWN
    ("nan_intercept", {112: ("f", 2.0), 116: ("f", float("nan"))}),  # a valid slope with a NaN intercept
])
def test_nibabel_header_errors_are_one_line_naming_the_file(tiny_model, tmp_path, capsys, name, fields):
    """Row 5: a HeaderDataError traceback that did not name the file."""
    path = tmp_path / f"{name}.nii"
    _raw_nifti(path, fields)
    assert main(["-i", str(path), "-model", "tiny"]) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"error: {path}: ") and "Traceback" not in line
    assert _files(tmp_path) == [path.name]


def test_pixel_size_zero_is_a_warning_naming_the_file(tiny_model, tmp_path, capsys):
    """Also: a pixel size of 0 (no sform) was read as 1 mm with nibabel's unnamed message; now a warning naming
    the file, kept in the sidecar."""
    img = blob_image()[0]
    img.set_sform(None, code=0)
    path = tmp_path / "pix0.nii"
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    path.write_bytes(bytes(raw))
    assert main(["-i", str(path), "-o", str(tmp_path / "m.nii.gz"), "-model", "tiny"]) == 0
    err = capsys.readouterr().err.splitlines()
    warning = [line for line in err if line.startswith("WARNING:")]
    assert warning == [f"WARNING: {path}: a pixel size of 0 in the header is read as 1 mm; check the voxel size "
                       "(pixdim[1,2,3] should be non-zero; setting 0 dims to 1)"], err
    assert all(line.startswith(("WARNING:", "INFO:")) for line in err), err  # nibabel's own line is gone
    assert json.loads((tmp_path / "m.json").read_text())["warnings"] == [warning[0].removeprefix("WARNING: ")]


def _usage(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_output_mask_with_thr_0_is_refused_at_parse_time(tiny_model, src, capsys):
    """Row 6: the explicit -output mask was overridden by -thr 0 and a float map written."""
    line = _usage(capsys, ["-i", str(src), "-model", "tiny", "-output", "mask", "-thr", "0"])
    assert "-output mask" in line and "-thr 0" in line
    assert _files(src.parent) == ["in.nii.gz"]


@pytest.mark.parametrize("main_output", [["-thr", "0"], ["-output", "probability"]])
def test_soft_with_the_soft_map_as_main_output_is_refused(tiny_model, src, capsys, main_output):
    """Row 7: -soft 1 was dropped silently when the main output was the soft map already."""
    line = _usage(capsys, ["-i", str(src), "-model", "tiny", "-soft", "1", *main_output])
    assert "-soft 1" in line
    assert _files(src.parent) == ["in.nii.gz"]


def test_soft_with_the_soft_map_as_main_output_is_refused_by_the_api(tiny_model, src):
    from sct_deepseg_epi import api
    from sct_deepseg_epi.errors import OptionError

    with pytest.raises(OptionError, match="soft"):
        api.run(src, model="tiny", soft=True, options=api.Options(output="probability"))
    assert _files(src.parent) == ["in.nii.gz"]


@pytest.mark.parametrize("argv", [["-dilate", "-1"], ["-threads", "0"], ["-threads", "-3"], ["-dilate", "1.5"]])
def test_usage_errors_exit_2(tiny_model, src, capsys, argv):
    """Also: -dilate -1 and -threads 0 exited 1 (an OptionError from Options); every usage error exits 2."""
    line = _usage(capsys, ["-i", str(src), "-model", "tiny", *argv])
    assert argv[0] in line
    assert _files(src.parent) == ["in.nii.gz"]


def test_options_refused_from_flags_are_usage_errors(capsys):
    """The family: any OptionError raised while the flags become Options is a usage error (exit 2)."""
    from sct_deepseg_epi.cli._parser import options_from_args

    parser = get_parser()
    args = parser.parse_args(["-i", "x.nii.gz"])
    args.device = "tpu"  # a value Options refuses, whatever parser let it through
    with pytest.raises(SystemExit) as exc:
        options_from_args(args, parser)
    assert exc.value.code == 2 and "tpu" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["missing\nline.nii.gz", "esc\x1b[31mred.nii.gz", "cr\rback.nii.gz",
                                  "sep\u2028line.nii.gz"])
def test_control_characters_in_names_are_escaped(tiny_model, tmp_path, name):
    """Row 22: `-i $'missing\\nline.nii.gz'` printed its error on two lines."""
    proc = run_cli(["-i", str(tmp_path / name), "-model", "tiny"], env={"SCT_DEEPSEG_EPI_MODELS": str(tiny_model.parent.parent)})
    line = assert_one_line(proc)
    assert "no such file" in line and "\x1b" not in proc.stderr and "\r" not in proc.stderr
    assert "\u2028" not in proc.stderr


def test_control_characters_in_usage_errors_and_warnings_are_escaped(tiny_model, tmp_path, capsys):
    """Row 22, the family: argparse's messages and the log's warnings too."""
    line = _usage(capsys, ["-i", "x.nii.gz", "-model", "tiny", "-qc", "qc", "-qc-dataset", "a\nb"])
    assert "\n" not in line
    img = blob_image()[0]
    path = tmp_path / "two\nlines.nii.gz"
    nib.save(nib.Nifti1Image(np.full(img.shape, np.nan, np.float32), img.affine), str(path))
    assert main(["-i", str(path), "-model", "tiny"]) == 1
    assert "two\\nlines.nii.gz" in one_line_error(capsys)


def test_help_names_the_output_of_a_nii_input(tiny_model, tmp_path):
    """Also: a .nii input gives IN_seg.nii, while -h said IN_seg.nii.gz."""
    help_text = " ".join(get_parser().format_help().split())
    assert "IN_seg.nii for a .nii input" in help_text
    src = tmp_path / "in.nii"
    nib.save(blob_image()[0], str(src))
    assert main(["-i", str(src), "-model", "tiny", "-v", "0"]) == 0
    assert (tmp_path / "in_seg.nii").is_file() and not (tmp_path / "in_seg.nii.gz").exists()


@pytest.mark.parametrize("argv", [
    ["train", "-data", "d", "-o", "m", "-members", "0"], ["train", "-data", "d", "-o", "m", "-epochs", "-1"],
    ["train", "-data", "d", "-o", "m", "-lr", "nan"], ["train", "-data", "d", "-o", "m", "-spacing", "0"],
    ["train", "-data", "d", "-o", "m", "-seed", "-1"],
    ["demo", "-o", "d", "-seed", "-1"],  # was a numpy ValueError traceback
    ["import-nnunet", "m.zip", "-o", "m", "-step", "0"], ["import-nnunet", "m.zip", "-o", "m", "-step", "1.5"],
    ["batch", "bids", "-dilate", "-1"],
])
def test_usage_errors_of_every_command_exit_2(tmp_path, monkeypatch, capsys, argv):
    """Also, the family in the other commands: a flag value out of range is refused by its parser (exit 2),
    before any file is looked at."""
    monkeypatch.chdir(tmp_path)
    line = _usage(capsys, argv)
    assert f"argument {argv[-2]}" in line
    assert list(tmp_path.iterdir()) == []
