"""The command line: in-process main() calls and real subprocesses for exit codes and start-up."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, blob_image

from sct_deepseg_epi.cli import main


def test_segment_writes_default_names(tiny_model, blob_file, capsys):
    path, _ = blob_file
    assert main(["-i", str(path), "-model", "tiny", "-v", "0"]) == 0
    assert (path.parent / "blob_seg.nii.gz").is_file() and (path.parent / "blob_seg.json").is_file()


def test_flags_reach_the_engine(tiny_model, blob_file):
    path, _ = blob_file
    out = path.parent / "custom.nii.gz"
    assert main(["-i", str(path), "-o", str(out), "-model", "tiny@1.0.0", "-thr", "0.3", "-largest", "0",
                 "-fill-holes", "0", "-remove-small", "5mm3", "-tta", "0", "-device", "cpu", "-v", "0"]) == 0
    side = json.loads((path.parent / "custom.json").read_text())
    assert side["threshold"] == 0.3 and side["postprocess"] == {"method": "z", "largest": False, "fill_holes": False, "remove_small": "5mm3", "dilate": 0}
    assert side["tta"] is False


def test_list_models(tiny_model, capsys):
    assert main(["-list-models"]) == 0
    assert "tiny@1.0.0" in capsys.readouterr().out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_missing_file(tiny_model, tmp_path, capsys):
    assert main(["-i", str(tmp_path / "none.nii.gz"), "-model", "tiny"]) == 1
    assert "none.nii.gz: no such file" in one_line_error(capsys)


def test_unknown_model(tiny_model, blob_file, capsys):
    path, _ = blob_file
    assert main(["-i", str(path), "-model", "nope"]) == 1
    assert "unknown model 'nope'" in one_line_error(capsys)
    assert not (path.parent / "blob_seg.nii.gz").exists()


def test_unknown_version(tiny_model, blob_file, capsys):
    path, _ = blob_file
    assert main(["-i", str(path), "-model", "tiny@3.0.0"]) == 1
    assert "no version 3.0.0" in one_line_error(capsys)


def test_output_equal_to_input(tiny_model, blob_file, capsys):
    path, _ = blob_file
    assert main(["-i", str(path), "-o", str(path), "-model", "tiny"]) == 1
    assert "is the input" in one_line_error(capsys)


def test_unwritable_output_folder(tiny_model, blob_file, capsys):
    path, _ = blob_file
    assert main(["-i", str(path), "-o", "/proc/none/x_seg.nii.gz", "-model", "tiny"]) == 1
    assert "/proc/none" in one_line_error(capsys)


@pytest.mark.parametrize("kind", ["2d", "5d", "zeros", "garbage", "truncated"])
def test_bad_images(tiny_model, tmp_path, capsys, kind):
    p = tmp_path / f"{kind}.nii.gz"
    if kind == "2d":
        nib.save(nib.Nifti1Image(np.ones((10, 10), np.float32), np.eye(4)), str(p))
    elif kind == "5d":
        nib.save(nib.Nifti1Image(np.ones((6, 6, 3, 2, 2), np.float32), np.eye(4)), str(p))
    elif kind == "zeros":
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 3), np.float32), np.eye(4)), str(p))
    elif kind == "garbage":
        p.write_bytes(gzip.compress(os.urandom(500)))
    else:
        img, _ = blob_image()
        nib.save(img, str(p))
        p.write_bytes(p.read_bytes()[:200])
    assert main(["-i", str(p), "-model", "tiny"]) == 1
    assert str(p.name) in one_line_error(capsys)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([p.name, "models-cache"])


def test_nan_voxels_repaired_with_warning(tiny_model, tmp_path, capsys):
    img, _ = blob_image()
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = np.nan
    p = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(p))
    assert main(["-i", str(p), "-model", "tiny"]) == 0
    assert "NaN/Inf" in capsys.readouterr().err


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["-i"])
    assert e.value.code == 2 and "error" in one_line_error(capsys)


def test_bad_flag_values(capsys, blob_file):
    path, _ = blob_file
    for argv in (["-thr", "2"], ["-largest", "yes"], ["-remove-small", "big"], ["-4d", "median"]):
        with pytest.raises(SystemExit) as e:
            main(["-i", str(path), *argv])
        assert e.value.code == 2
        one_line_error(capsys)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sct_deepseg_epi", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, sct_deepseg_epi.cli as c\n"
            "try:\n    c.main(['-h'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'dask', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("[]"), out.stdout + out.stderr
    assert "-4d" in out.stdout and "commands" in out.stdout


def test_subprocess_error_has_no_traceback(tmp_path):
    r = run_cli("-i", str(tmp_path / "missing.nii.gz"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "missing.nii.gz" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_subprocess_segment(tiny_model, blob_file):
    path, mask = blob_file
    r = run_cli("-i", str(path), "-model", "tiny", env={"SCT_DEEPSEG_EPI_MODELS": str(tiny_model.parents[1])})
    assert r.returncode == 0, r.stderr
    out = np.asarray(nib.load(str(path.parent / "blob_seg.nii.gz")).dataobj)
    assert (out == mask).mean() > 0.99


def test_a_postprocess_option_reaches_flags_mask_and_sidecar(tiny_model, blob_file, tmp_path):
    path, _ = blob_file
    plain, grown = tmp_path / "plain_seg.nii.gz", tmp_path / "grown_seg.nii.gz"
    assert main(["-i", str(path), "-o", str(plain), "-model", "tiny", "-threads", "1"]) == 0
    assert main(["-i", str(path), "-o", str(grown), "-model", "tiny", "-threads", "1", "-dilate", "1"]) == 0
    a, b = (np.asarray(nib.load(str(p)).dataobj) for p in (plain, grown))
    assert b.sum() > a.sum() and np.all(b[a > 0] == 1)
    assert json.loads(grown.with_name("grown_seg.json").read_text())["postprocess"]["dilate"] == 1


def test_4d_each_progress_bar_on_a_terminal(tiny_model, tmp_path, capsys, monkeypatch):
    img, _ = blob_image(n_volumes=5)
    path = tmp_path / "bold.nii.gz"
    nib.save(img, str(path))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["-i", str(path), "-model", "tiny", "-4d", "each"]) == 0
    err = capsys.readouterr().err
    assert "5/5" in err and ("vol/s" in err or "s/vol" in err)  # volumes done and their rate
    assert "<" in err  # elapsed<remaining
    assert main(["-i", str(path), "-model", "tiny", "-4d", "each", "-v", "0"]) == 0
    assert "vol" not in capsys.readouterr().err  # quiet: no bar


def test_4d_each_no_bar_off_a_terminal(tiny_model, tmp_path, capsys):
    img, _ = blob_image(n_volumes=3)
    path = tmp_path / "bold.nii.gz"
    nib.save(img, str(path))
    assert main(["-i", str(path), "-model", "tiny", "-4d", "each"]) == 0
    assert "vol/s" not in capsys.readouterr().err and "s/vol" not in capsys.readouterr().err


def test_output_probability_is_the_soft_map_and_thr_0_its_alias(tiny_model, blob_file, tmp_path):
    path, _ = blob_file
    prob, alias = tmp_path / "prob_seg.nii.gz", tmp_path / "alias_seg.nii.gz"
    assert main(["-i", str(path), "-o", str(prob), "-model", "tiny", "-threads", "1", "-output", "probability"]) == 0
    assert main(["-i", str(path), "-o", str(alias), "-model", "tiny", "-threads", "1", "-thr", "0"]) == 0
    a, b = (nib.load(str(p)) for p in (prob, alias))
    assert a.get_data_dtype() == np.float32 and np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert len(np.unique(np.asarray(a.dataobj))) > 2  # a soft map, not a mask
    assert json.loads(prob.with_name("prob_seg.json").read_text())["output"] == "probability"


def test_batch_refuses_output_probability_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["batch", "/nonexistent", "-output", "probability"])
    assert exc.value.code == 2


def test_prompt_file_reaches_the_sidecar(tiny_model, blob_file):
    path, _ = blob_file
    img = nib.load(str(path))
    labels = path.parent / "points.nii.gz"
    data = np.zeros(img.shape, np.uint8)
    data[20, 17, 2] = 1
    nib.save(nib.Nifti1Image(data, img.affine), str(labels))
    assert main(["-i", str(path), "-model", "tiny", "-prompt", str(labels), "-v", "0"]) == 0
    side = json.loads((path.parent / "blob_seg.json").read_text())
    assert [(p["slice"], p["voxel"], p["value"]) for p in side["prompts"]] == [(2, [20, 17, 2], 1)]


@pytest.mark.parametrize("kind, message", [
    ("grid", "not on the input's grid"), ("values", "not 7"), ("4d", "must be 3D"), ("missing", "no such file"),
    ("output", "is the input"),
])
def test_bad_prompt_files_are_one_line_errors_and_leave_nothing(tiny_model, blob_file, capsys, kind, message):
    path, _ = blob_file
    img = nib.load(str(path))
    labels = path.parent / "points.nii.gz"
    shape = {"grid": (12, 12, 6), "4d": img.shape + (2,)}.get(kind, img.shape)
    data = np.zeros(shape, np.uint8)
    data[1, 1, 1] = 7 if kind == "values" else 1
    if kind != "missing":
        nib.save(nib.Nifti1Image(data, img.affine), str(labels))
    out = labels if kind == "output" else path.parent / "x_seg.nii.gz"
    before = sorted(p.name for p in path.parent.iterdir())
    assert main(["-i", str(path), "-o", str(out), "-model", "tiny", "-prompt", str(labels)]) == 1
    assert message in one_line_error(capsys)
    assert sorted(p.name for p in path.parent.iterdir()) == before
