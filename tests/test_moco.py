"""SCT's deep-learning motion correction (``fmri-pipeline -moco dl``): flags, weights, the chain.

Without SCT, the pipeline runs the fake SCT tools of test_handoff.py; the question "where does
this SCT keep its moco-dl weights" is put to the stand-in's ``spinalcordtoolbox.utils.sys``
(tests/sct_standin), as it is put to the real one. The test marked ``sct`` runs the real SCT
7.4 on a private copy of its package, so that the checkpoint it writes lands in a scratch
folder and never in the user's SCT.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA, blob_image
from sct_deepseg_epi import handoff, moco
from sct_deepseg_epi.cli import main
from sct_deepseg_epi.errors import InputError
from sct_deepseg_epi.handoff import HandoffError
from sct_deepseg_epi.mocomask import cord_mask
from test_handoff import _calls, fake_sct, make_synthetic_template, pam50, series  # noqa: F401  (fixtures)

STANDIN = Path(__file__).resolve().parent / "sct_standin"
FAST_REG = "step=1,type=seg,algo=centermass:step=2,type=im,algo=rigid,metric=CC,iter=2,slicewise=1"


def test_command_flags_for_each_kind(tmp_path):
    bold, mask, folder = tmp_path / "fmri.nii.gz", tmp_path / "mask_fmri_cord.nii.gz", tmp_path / "out"
    dl = moco.command("dl", bold, mask, folder, ["-qc", "/q", "-qc-seg", "s.nii.gz"])
    assert dl == ["sct_fmri_moco", "-i", str(bold), "-m", str(mask), "-ofolder", str(folder), "-dl",
                  "-qc", "/q", "-qc-seg", "s.nii.gz"]
    assert not set(dl) & set(moco.DL_REFUSED)
    ants = moco.command("ants", bold, mask, folder)
    assert "-dl" not in ants and ants[:5] == ["sct_fmri_moco", "-i", str(bold), "-m", str(mask)]
    with pytest.raises(ValueError, match="-dl refuses -param, -x"):
        moco.command("dl", bold, mask, folder, ["-param", "poly=0", "-x", "linear"])
    with pytest.raises(ValueError, match="unknown motion correction 'fsl'"):
        moco.command("fsl", bold, mask, folder)
    names = moco.outputs("dl", folder, "fmri")
    assert (names.moco.name, names.mean.name) == ("fmri_mocoDL.nii.gz", "fmri_mocoDL_mean.nii.gz")
    assert [p.name for p in names.params] == ["moco_params_x.nii.gz", "moco_params_y.nii.gz"]
    assert [p.name for p in moco.outputs("ants", folder, "fmri").params] == ["moco_params.tsv"]


@pytest.fixture
def sct_root(fake_sct, model_root, tmp_path, monkeypatch) -> Path:
    """The fake SCT's install folder, as its ``spinalcordtoolbox.utils.sys`` reports it (no weights yet)."""
    root = tmp_path / "sct-install"
    (root / "data").mkdir(parents=True)
    monkeypatch.setenv("PYTHONPATH", str(STANDIN))
    monkeypatch.setenv("SCT_DIR", str(root))  # the stand-in's __sct_dir__ (after model_root clears it)
    return root


def _weights(root: Path) -> Path:
    path = root.joinpath(*moco.DL_WEIGHTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"checkpoint")
    return path


def test_weights_are_where_the_sct_running_the_tool_says(sct_root, monkeypatch):
    assert moco.sct_python() == [sys.executable]  # the fake tools' first line
    assert moco.dl_weights_path() == sct_root / "data" / "moco-dl_models" / "fmri.ckpt"
    # SCT_DIR unset: the answer still comes from SCT's own package (here the stand-in's folder)
    monkeypatch.delenv("SCT_DIR")
    assert moco.dl_weights_path() == STANDIN / "data" / "moco-dl_models" / "fmri.ckpt"
    # an SCT that cannot be asked (its Python cannot import spinalcordtoolbox): SCT_DIR, else no check
    monkeypatch.delenv("PYTHONPATH")
    assert moco.sct_install_dir() is None and moco.dl_weights_path() is None and moco.missing_dl_weights() is None
    monkeypatch.setenv("SCT_DIR", str(sct_root))
    assert moco.dl_weights_path() == sct_root / "data" / "moco-dl_models" / "fmri.ckpt"
    # a shell wrapper is not handed Python code
    wrapper = sct_root / "bin" / "sct_fmri_moco"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\nexit 0\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    assert moco.sct_python() is None and moco.dl_weights_path() == sct_root / "data" / "moco-dl_models" / "fmri.ckpt"


def test_dl_chain_hands_the_cord_mask_and_no_refused_flag(sct_root, fake_sct, pam50, series, tmp_path):
    _weights(sct_root)
    out = handoff.fmri_pipeline(series, model="tiny", template=pam50, moco="dl", margin_mm=3.0,
                                qc=tmp_path / "qc", param=FAST_REG)
    d = series.parent
    calls = [json.loads(line) for line in fake_sct.read_text().splitlines()]
    assert [c[0] for c in calls] == ["sct_maths", "sct_fmri_moco", "sct_register_multimodal", "sct_warp_template"]
    mc = calls[1]
    assert "-dl" in mc and mc[mc.index("-m") + 1] == str(d / "mask_fmri_cord.nii.gz")
    assert not set(mc) & set(moco.DL_REFUSED) and "-qc-seg" in mc
    # the mask handed over is the rule's cord mask of the temporal mean's segmentation
    seg = nib.load(str(out.mean_seg))
    mask = np.asarray(nib.load(str(out.mask)).dataobj)
    assert np.array_equal(mask, cord_mask(np.asarray(seg.dataobj), seg.affine, 3.0))
    # the rest of the chain runs on the DL outputs, SCT's names
    assert (out.moco.name, out.moco_mean.name, out.moco_mean_seg.name) == (
        "fmri_mocoDL.nii.gz", "fmri_mocoDL_mean.nii.gz", "fmri_mocoDL_mean_seg.nii.gz")
    assert out.moco_params == d / "moco_params_x.nii.gz" and out.moco_params_y == d / "moco_params_y.nii.gz"
    reg = calls[2]
    assert reg[reg.index("-d") + 1] == str(out.moco_mean) and reg[reg.index("-dseg") + 1] == str(out.moco_mean_seg)
    assert calls[3][calls[3].index("-d") + 1] == str(out.moco_mean) and out.levels.is_file()
    assert len(out.ran) == 7
    # then the ANTs chain in the same folder: its own mask and outputs, nothing of the DL run reused
    ants = handoff.fmri_pipeline(series, model="tiny", template=pam50, param=FAST_REG)
    assert ants.mask == d / "mask_fmri.nii.gz" and ants.skipped == ["temporal mean", "segmentation"]


def test_missing_weights_fail_in_one_line_before_any_step(sct_root, fake_sct, pam50, series, tmp_path, capsys):
    with pytest.raises(HandoffError) as err:
        handoff.fmri_pipeline(series, tmp_path / "new-folder", model="tiny", template=pam50, moco="dl")
    msg = str(err.value)
    assert "\n" not in msg and "run sct_download_data -d moco-dl_models" in msg
    assert str(sct_root / "data" / "moco-dl_models" / "fmri.ckpt") in msg
    assert _calls(fake_sct) == [] and not (tmp_path / "new-folder").exists()
    assert sorted(p.name for p in series.parent.iterdir()) == ["fmri.nii.gz"]
    # the command line: one line on stderr, exit 1
    assert main(["fmri-pipeline", "-i", str(series), "-moco", "dl", "-model", "tiny", "-template", str(pam50)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sct_download_data -d moco-dl_models" in lines[0]
    assert sorted(p.name for p in series.parent.iterdir()) == ["fmri.nii.gz"] and _calls(fake_sct) == []


def test_dl_refuses_slices_off_the_third_axis_before_any_step(sct_root, fake_sct, pam50, tmp_path, tiny_model):
    _weights(sct_root)
    img, _ = blob_image(n_volumes=3, axcodes="LSA")  # axial slices across the second voxel axis
    bold = tmp_path / "fmri.nii.gz"
    nib.save(img, str(bold))
    with pytest.raises(InputError, match=r"fmri.nii.gz: sct_fmri_moco -dl needs axial slices along the third "
                                         r"voxel axis, and this series is stored LSA"):
        handoff.fmri_pipeline(bold, model="tiny", template=pam50, moco="dl")
    assert _calls(fake_sct) == [] and sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gz") == ["fmri.nii.gz"]


def test_cli_flags(tmp_path, capsys):
    from sct_deepseg_epi.cli.fmri_pipeline import get_parser

    args = get_parser().parse_args(["-i", "b.nii.gz"])
    assert (args.moco, args.margin) == ("ants", 5.0)
    args = get_parser().parse_args(["-i", "b.nii.gz", "-moco", "dl", "-margin", "2.5"])
    assert (args.moco, args.margin) == ("dl", 2.5)
    with pytest.raises(SystemExit) as e:
        main(["fmri-pipeline", "-i", "b.nii.gz", "-moco", "fsl"])
    assert e.value.code == 2 and "invalid choice: 'fsl'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["fmri-pipeline", "-i", "b.nii.gz", "-moco", "dl", "-margin", "-1"])
    assert e.value.code == 2 and "-margin must be zero or a positive distance" in capsys.readouterr().err


def test_moco_mask_cli_kinds(tmp_path, capsys):
    img, disc = blob_image(n_volumes=3, axcodes="LPI")
    bold, seg = tmp_path / "fmri.nii.gz", tmp_path / "fmri_seg.nii.gz"
    nib.save(img, str(bold))
    nib.save(nib.Nifti1Image(disc, img.affine, img.header), str(seg))
    assert main(["moco-mask", "-i", str(bold), "-s", str(seg), "-kind", "cord", "-margin", "2"]) == 0
    cord = np.asarray(nib.load(str(tmp_path / "mask_fmri_cord.nii.gz")).dataobj)
    assert np.array_equal(cord, cord_mask(disc, img.affine, 2.0))
    assert "-m " + str(tmp_path / "mask_fmri_cord.nii.gz") + " -dl" in capsys.readouterr().err
    assert main(["moco-mask", "-i", str(bold), "-s", str(seg), "-kind", "cylinder"]) == 0
    cyl = np.asarray(nib.load(str(tmp_path / "mask_fmri.nii.gz")).dataobj)
    assert cyl.sum() > 3 * cord.sum()  # a 35 mm cylinder against the cord grown by 2 mm
    with pytest.raises(SystemExit) as e:
        main(["moco-mask", "-i", str(bold), "-s", str(seg), "-kind", "cord", "-margin", "-1"])
    assert e.value.code == 2


# --- with the real SCT 7.4 ------------------------------------------------------------------------

def _sct_package() -> Path | None:
    python = moco.sct_python()
    if python is None:
        return None
    r = subprocess.run(python + ["-c", "import os, spinalcordtoolbox as s; print(os.path.dirname(s.__file__))"],
                       capture_output=True, text=True, timeout=120)
    return Path(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None


@pytest.fixture
def scratch_sct(tmp_path, monkeypatch):
    """A private copy of the real SCT's package, first on PYTHONPATH for every SCT command.

    SCT takes its install folder (and so ``data/moco-dl_models``) from where its package lies,
    so with this copy it reads and writes under ``tmp_path/sct``, never in the user's SCT.
    """
    if shutil.which("sct_fmri_moco") is None or shutil.which("isct_antsRegistration") is None:
        pytest.skip("a real SCT with its ANTs programs is not on PATH")
    package = _sct_package()
    if package is None or not (package / "moco" / "dl" / "inference.py").is_file():
        pytest.skip("this SCT has no deep-learning motion correction (spinalcordtoolbox.moco.dl, SCT >= 7.4)")
    root = tmp_path / "sct"
    shutil.copytree(package, root / "spinalcordtoolbox", ignore=shutil.ignore_patterns("__pycache__"))
    if (package.parent / "bin").is_dir():  # SCT runs its ANTs programs from <install>/bin: the user's, read only
        (root / "bin").symlink_to(package.parent / "bin", target_is_directory=True)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    assert moco.sct_install_dir() == root  # every SCT command now runs the copy
    user_weights = package.parent.joinpath(*moco.DL_WEIGHTS)
    had = user_weights.exists()
    yield root
    assert user_weights.exists() == had  # the user's SCT was not touched


def write_initial_checkpoint(path: Path) -> None:
    """SCT's own ``moco.dl.model`` network at its initial weights, saved as ``moco_dl`` loads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import sys, torch; from spinalcordtoolbox.moco.dl.model import DenseRigidReg; torch.manual_seed(0); "
            "torch.save({'state_dict': DenseRigidReg().state_dict()}, sys.argv[1])")
    r = subprocess.run(moco.sct_python() + ["-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.sct
@pytest.mark.data
@pytest.mark.slow
def test_real_sct_dl_chain_on_the_sct_testing_series(scratch_sct, tmp_path, model_root, shared_data):
    from sct_deepseg_epi import api

    src = shared_data / "epi" / "sct-testing" / "fmri.nii.gz"
    bold = tmp_path / "sub-01" / "func" / "fmri.nii.gz"
    bold.parent.mkdir(parents=True)
    shutil.copyfile(src, bold)
    img = nib.load(str(bold))
    # without the weights: one line naming the download, before any step, nothing written
    with pytest.raises(HandoffError, match=r"^[^\n]*missing: run sct_download_data -d moco-dl_models"):
        handoff.fmri_pipeline(bold, tmp_path / "out-missing", moco="dl", template=tmp_path / "PAM50")
    assert not (tmp_path / "out-missing").exists()
    write_initial_checkpoint(scratch_sct.joinpath(*moco.DL_WEIGHTS))
    # SCT's download has no PAM50 here: a template of PAM50's layout around this subject
    mean = nib.Nifti1Image(np.asarray(img.dataobj).mean(-1), img.affine)
    pam50 = make_synthetic_template(tmp_path / "PAM50", img, api.segment(mean).mask)
    out = handoff.fmri_pipeline(bold, tmp_path / "out", moco="dl", template=pam50, param=FAST_REG)
    assert len(out.ran) == 7
    corrected = nib.load(str(out.moco))
    assert corrected.shape == img.shape and np.allclose(corrected.affine, img.affine, atol=1e-4)
    for params in (out.moco_params, out.moco_params_y):  # Tx and Ty in mm, one per slice and volume
        assert nib.load(str(params)).shape == (1, 1, img.shape[2], img.shape[3])
    assert nib.load(str(out.moco_mean)).shape == img.shape[:3]
    levels = nib.load(str(out.levels))
    assert levels.shape == img.shape[:3] and np.asarray(levels.dataobj).max() > 0
    text = out.log.read_text()
    line = next(ln for ln in text.splitlines() if "] $ sct_fmri_moco " in ln)
    assert " -dl" in line and f"-m {out.mask}" in line and not set(line.split()) & set(moco.DL_REFUSED)
    assert "Running DL-based motion correction" in text  # SCT's own message: the DL path ran
