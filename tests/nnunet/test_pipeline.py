"""The nnU-Net backend at run time, on tiny ONNX models in nnU-Net's layout (no torch, no nnunetv2).

Parity with nnunetv2 itself is in test_convert.py, where nnunetv2 is installed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, blob_image
from nnunet_fixtures import make_nnunet_folder

from sct_deepseg_epi import api
from sct_deepseg_epi.nnunet import pipeline
from sct_deepseg_epi.nnunet.pipeline import NnunetBackend


def _image(tmp: Path, axcodes: str = "RAS", n_volumes: int | None = None, seed: int = 3) -> Path:
    img, _ = blob_image(shape=(30, 28, 9), zooms=(0.9, 1.1, 3.0), axcodes=axcodes, radius=3.5, seed=seed,
                        n_volumes=n_volumes)
    p = tmp / f"blob_{axcodes}_{n_volumes}.nii.gz"
    nib.save(img, str(p))
    return p


def _mask(seg) -> np.ndarray:
    return np.asarray(seg.mask.dataobj)


@pytest.fixture
def model3d(tmp_path) -> Path:
    return make_nnunet_folder(tmp_path / "nn3d", ndim=3)


def test_the_backend_is_chosen_from_the_manifest_and_finds_the_cord(model3d, tmp_path):
    img, truth = blob_image(shape=(30, 28, 9), zooms=(0.9, 1.1, 3.0), radius=3.5, seed=3)
    seg = api.segment(img, model=str(model3d), threads=1)
    mask = _mask(seg)
    assert seg.provenance()["model"]["backend"] == "nnunet" and mask.dtype == np.uint8
    inside = mask[truth > 0].mean()
    assert inside > 0.9 and mask.sum() < 3 * truth.sum()
    prob = np.asarray(seg.probability.dataobj)
    assert 0 <= prob.min() and prob.max() <= 1 and np.asarray(seg.disagreement.dataobj).max() > 0  # 2 folds


def test_running_needs_neither_torch_nor_nnunetv2(model3d, tmp_path):
    image = _image(tmp_path)
    code = ("import sys; from sct_deepseg_epi import api; "
            f"s = api.segment({str(image)!r}, model={str(model3d)!r}, threads=1); "
            "bad = [m for m in ('torch', 'nnunetv2', 'skimage', 'scipy.ndimage') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad or not s.mask.get_fdata().any() else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_4d_each_runs_every_volume_whole_and_nothing_else(model3d, tmp_path, monkeypatch):
    image = _image(tmp_path, n_volumes=3)
    calls = []
    real = NnunetBackend.predict
    monkeypatch.setattr(NnunetBackend, "predict", lambda self, *a, **k: calls.append(k.get("region")) or real(self, *a, **k))
    seg = api.segment(image, model=str(model3d), threads=1, mode_4d="each")
    assert calls == [None, None, None]  # one whole-field pass per volume; no temporal-mean pass
    masks = _mask(seg)
    series = nib.load(str(image))
    assert masks.shape == series.shape
    for t in range(3):
        one = nib.Nifti1Image(np.asarray(series.dataobj)[..., t], series.affine)
        alone = _mask(api.segment(one, model=str(model3d), threads=1))
        assert alone.any() and np.array_equal(masks[..., t], alone)


def test_reoriented_reader_gives_the_same_mask_in_any_storage_order(tmp_path):
    model = make_nnunet_folder(tmp_path / "nn2d", ndim=2, reader="NibabelIOWithReorient")
    ras = _mask(api.segment(_image(tmp_path, "RAS"), model=str(model), threads=1))
    for axcodes in ("LPI", "PSR"):
        other = nib.load(str(_image(tmp_path, axcodes)))
        mask = np.asarray(api.segment(other, model=str(model), threads=1).mask.dataobj)
        back = nib.as_closest_canonical(nib.Nifti1Image(mask, other.affine))
        assert ras.any() and np.array_equal(np.asarray(back.dataobj), ras), axcodes


def test_threshold_cleaning_and_mirroring(model3d, tmp_path):
    image = _image(tmp_path)
    base = api.segment(image, model=str(model3d), threads=1)
    prob = np.asarray(base.probability.dataobj)
    low = _mask(api.segment(image, model=str(model3d), threads=1, threshold=0.3))
    assert np.array_equal(low, (prob >= 0.3).astype(np.uint8))  # another threshold: the probability decides
    one = _mask(api.segment(image, model=str(model3d), threads=1, largest=True, dilate=1))
    assert one.sum() > _mask(base).sum() and set(np.unique(one)) <= {0, 1}
    # imported nnU-Net models do not mirror unless asked, as in SCT
    assert base.provenance()["tta"] is False
    flat = api.segment(image, model=str(model3d), threads=1, tta=False)
    assert np.array_equal(np.asarray(flat.probability.dataobj), prob)
    mirrored = api.segment(image, model=str(model3d), threads=1, tta=True)
    assert mirrored.provenance()["tta"] is True
    assert not np.array_equal(np.asarray(mirrored.probability.dataobj), prob)  # mirroring changes the average


def test_large_models_stream_their_folds_with_the_same_result(model3d, tmp_path, monkeypatch):
    image = _image(tmp_path)
    kept = _mask(api.segment(image, model=str(model3d), threads=2))
    monkeypatch.setattr(pipeline, "KEEP_SESSIONS_MB", 0)
    streamed = api.segment(image, model=str(model3d), threads=3)  # another thread count: a new backend
    assert not pipeline.NnunetBackend(api.load_model(str(model3d)), threads=1).keep
    assert np.array_equal(_mask(streamed), kept)


def test_tta_defaults_to_the_models_kind(model3d, tiny_model):
    """-tta unset: this engine's models flip, imported nnU-Net models do not mirror (as in SCT)."""
    native, nnunet = api.load_model("tiny"), api.load_model(str(model3d))
    opts = api.Options()
    assert opts.tta is None and opts.tta_for(native) is True and opts.tta_for(nnunet) is False
    assert opts.settings(nnunet)["tta"] is False and opts.settings(native)["tta"] is True
    for choice in (True, False):
        o = api.Options(tta=choice)
        assert o.tta_for(native) is choice and o.tta_for(nnunet) is choice


def test_sct_view_reorients_reverses_and_comes_back():
    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)  # RAS (x, y, z)
    zooms = (1.0, 2.0, 3.0)
    view, spacing, back = pipeline.sct_view(arr, zooms)
    assert np.array_equal(view, arr.transpose(2, 1, 0)) and spacing == [3.0, 2.0, 1.0]
    # SCT's "AIL" (nibabel PSR): x runs posterior, y superior, z right
    view, spacing, back = pipeline.sct_view(arr, zooms, "PSR")
    assert view.shape == (5, 7, 6) and spacing == [1.0, 3.0, 2.0]
    # view[x, z, p] (nnU-Net's reversed PSR axes) = arr[x, last - p, z]: the model's first P voxel is the most anterior
    assert np.array_equal(view[:, :, 0], arr[:, -1, :]) and np.array_equal(view[:, 2, 1], arr[:, -2, 2])
    for orientation in ("RAS", "PSR", "LPI", "ILA"):
        view, _, back = pipeline.sct_view(arr, zooms, orientation)
        assert np.array_equal(back(view), arr), orientation
