"""The two orientation conventions of imported nnU-Net models, on images stored in several orientations.

* ``sct`` (import-nnunet's default) against SCT's steps around nnUNetPredictor
  (:func:`nnunet_parity.sct_reference`) and, where a real SCT is installed, against SCT's
  own nnU-Net inference function;
* ``nnunet`` against nnUNetPredictor on the axes nnU-Net's reader gives the file.

Both with each side's default flags (no mirroring, as SCT) unless a case says otherwise.
Targets: binary masks with Dice >= 0.99, probabilities within 1e-3 on >= 99.9 % of voxels.
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

pytest.importorskip("nnunetv2")
torch = pytest.importorskip("torch")

from sct_deepseg_epi import api  # noqa: E402
from sct_deepseg_epi.nnunet.convert import import_nnunet  # noqa: E402
from sct_deepseg_epi.registry.manifest import load_manifest  # noqa: E402
from nnunet_parity import (case_image, check_parity, fg_probability, nnunet_reference, parity,  # noqa: E402
                           sct_reference, with_convention)
from nnunet_synthetic import plan_dataset, write_trained  # noqa: E402

ZOOMS = (1.0, 1.0, 4.0)
OBLIQUE = (15.0, 30.0)  # degrees about x, then z


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(trained folder, imported model folder) per configuration: 2d with 5 folds, 3d_fullres with 1."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("conventions")
    plans, dj, raw = plan_dataset(root / "nn", dataset_id=503, shape=(40, 36, 8), zooms=ZOOMS,
                                  labels={"background": 0, "sc": 1})
    out = {}
    for config, folds, patch, steps in (("2d", 5, [24, 24], 10), ("3d_fullres", 1, [4, 24, 24], 12)):
        trained = write_trained(root / f"trained_{config}", plans, dj, configuration=config, folds=folds,
                                patch_size=patch, train_steps=steps, raw=raw)
        out[config] = (trained, import_nnunet(trained, root / f"model_{config}"))
    return out


def _ours(model: Path, image: Path, tta: bool | None = None):
    seg = api.segment(image, model=str(model), threads=1, tta=tta)
    return np.asarray(seg.mask.dataobj), np.asarray(seg.probability.dataobj), seg


def _image(tmp: Path, orientation: str) -> Path:
    if orientation == "oblique":
        return case_image(tmp, "LAS", oblique=OBLIQUE)
    return case_image(tmp, orientation)


def test_import_defaults_to_the_sct_convention(models):
    for config, (_, model) in models.items():
        spec = load_manifest(model)
        assert spec.nnunet.convention == "sct" and spec.nnunet.orientation == "RAS", config
        assert json.loads((model / "manifest.json").read_text())["backend"]["convention"] == "sct"


@pytest.mark.parametrize("config,orientation,tta", [
    ("2d", "LAS", None), ("2d", "PSR", None), ("2d", "oblique", None), ("2d", "LAS", True),
    ("3d_fullres", "LAS", None), ("3d_fullres", "RAS", None), ("3d_fullres", "PSR", None),
    ("3d_fullres", "oblique", True),
])
def test_sct_convention_matches_scts_steps(models, tmp_path, config, orientation, tta):
    trained, model = models[config]
    image = _image(tmp_path, orientation)
    ref_seg, ref_probs = sct_reference(trained, image, mirroring=bool(tta))
    mask, prob, seg = _ours(model, image, tta)
    assert seg.provenance()["tta"] is bool(tta) and seg.provenance()["model"]["convention"] == "sct"
    assert mask.shape == nib.load(str(image)).shape
    check_parity(mask, prob, ref_seg, fg_probability(ref_probs), f"sct {config} {orientation} tta={tta}")


@pytest.mark.slow
@pytest.mark.parametrize("config,folds,orientation", [("2d", 1, "PSR"), ("3d_fullres", 5, "LPI")])
def test_sct_convention_other_fold_counts(models, tmp_path, config, folds, orientation):
    """The other fold counts of each configuration, random weights (no training: cheap)."""
    trained = models[config][0]
    plans = json.loads((trained / "plans.json").read_text())
    dj = json.loads((trained / "dataset.json").read_text())
    patch = [24, 24] if config == "2d" else [4, 24, 24]
    trained = write_trained(tmp_path / "trained", plans, dj, configuration=config, folds=folds, patch_size=patch,
                            logit_scale=8.0, seed=3)
    model = import_nnunet(trained, tmp_path / "model")
    image = case_image(tmp_path, orientation, oblique=OBLIQUE, seed=12)
    ref_seg, ref_probs = sct_reference(trained, image)
    mask, prob, _ = _ours(model, image)
    check_parity(mask, prob, ref_seg, fg_probability(ref_probs), f"sct {config} x{folds} {orientation} oblique")


@pytest.mark.parametrize("config,orientation", [
    ("2d", "LAS"), ("2d", "oblique"), ("3d_fullres", "PSR"), ("3d_fullres", "LAS"),
])
def test_nnunet_convention_matches_nnunets_reader(models, tmp_path, config, orientation):
    trained, model = models[config]
    model = with_convention(model, "nnunet", tmp_path / "nnunet_model")
    image = _image(tmp_path, orientation)
    ref_seg, ref_probs = nnunet_reference(trained, image, "SimpleITKIO", mirroring=False)
    mask, prob, seg = _ours(model, image)
    assert seg.provenance()["model"]["convention"] == "nnunet"
    check_parity(mask, prob, ref_seg, fg_probability(ref_probs), f"nnunet {config} {orientation}")


def test_a_model_orientation_other_than_ras(models, tmp_path):
    """dataset.json's image_orientation (SCT's "AIL" = PSR here): SCT reorients to it instead."""
    trained, model = models["2d"]
    model = with_convention(model, "sct", tmp_path / "psr_model")
    d = json.loads((model / "manifest.json").read_text())
    d["backend"]["orientation"] = "PSR"
    (model / "manifest.json").write_text(json.dumps(d))
    image = _image(tmp_path, "LAS")
    ref_seg, ref_probs = sct_reference(trained, image, orientation="PSR")
    mask, prob, _ = _ours(model, image)
    check_parity(mask, prob, ref_seg, fg_probability(ref_probs), "sct 2d LAS -> PSR")


def test_the_conventions_differ_on_a_las_image_and_agree_on_a_ras_one(models, tmp_path):
    """The parity tests can tell the conventions apart: on LAS, each fails the other's reference."""
    trained, model = models["2d"]
    las = _image(tmp_path, "LAS")
    sct_seg, sct_probs = sct_reference(trained, las)
    nn_seg, nn_probs = nnunet_reference(trained, las, "SimpleITKIO", mirroring=False)
    mask, prob, _ = _ours(model, las)
    dice, within, _ = parity(mask, prob, nn_seg, fg_probability(nn_probs))
    print(f"sct convention vs nnU-Net's reader on LAS: Dice {dice:.4f}, {within:.2%} within 1e-3")
    assert within < 0.999 or dice < 0.99, (dice, within)
    ras = _image(tmp_path, "RAS")
    a, _ = sct_reference(trained, ras)
    b, _ = nnunet_reference(trained, ras, "SimpleITKIO", mirroring=False)
    assert np.array_equal(a, b)  # a RAS file: the reader's axes are SCT's


# ------------------------------------------------------------------------------- against a real SCT

def _sct_python() -> str | None:
    """The Python of an installed SCT (the one next to sct_deepseg, or $SCT_PYTHON)."""
    candidates = [os.environ.get("SCT_PYTHON")]
    exe = shutil.which("sct_deepseg")
    if exe:
        candidates.append(str(Path(exe).resolve().parent / "python"))
    candidates.append("/tmp/sct/venv/bin/python")  # the development machines' install-sct.sh default
    for c in candidates:
        if c and Path(c).is_file():
            r = subprocess.run([c, "-c", "import spinalcordtoolbox.deepseg.inference"], capture_output=True,
                               timeout=300)
            if r.returncode == 0:
                return c
    return None


# SCT's own functions: its predictor factory and its nnU-Net inference, as sct_deepseg calls them
_SCT_RUN = """
import sys, tempfile, torch
from spinalcordtoolbox.deepseg.nnunet import create_nnunet_from_plans
from spinalcordtoolbox.deepseg.inference import segment_nnunet
torch.set_num_threads(1)
pred = create_nnunet_from_plans(sys.argv[1], torch.device("cpu"))
with tempfile.TemporaryDirectory() as tmp:
    fnames, targets = segment_nnunet(sys.argv[2], tmp, pred, torch.device("cpu"))
    import shutil; shutil.copy(fnames[0], sys.argv[3])
"""


@pytest.mark.sct
def test_sct_convention_matches_a_real_sct(models, tmp_path):
    python = _sct_python()
    if python is None:
        pytest.skip("no SCT installation with spinalcordtoolbox.deepseg.inference (set SCT_PYTHON)")
    trained, model = models["3d_fullres"]  # one fold: SCT's fork weighs fold 0 twice, which only a 1-fold model
    image = _image(tmp_path, "LAS")        # leaves unchanged (see docs/nnunet.md)
    out = tmp_path / "sct_seg.nii.gz"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([python, "-c", _SCT_RUN, str(trained.parent), str(image), str(out)], capture_output=True,
                       text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    sct_mask = np.asarray(nib.load(str(out)).dataobj)
    mask, prob, _ = _ours(model, image)
    assert sct_mask.shape == mask.shape
    a, b = mask > 0, sct_mask > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    print(f"real SCT, 3d_fullres LAS: Dice {dice:.4f}, {int((a != b).sum())} voxels differ")
    assert b.any() and (~b).any() and dice >= 0.99
