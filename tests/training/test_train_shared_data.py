"""Checks on the real data in ../shared/data (skipped when that folder is absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sct_deepseg_epi.training.data import discover
from train_fixtures import shared_data  # noqa: F401,E402  (fixture)

pytestmark = pytest.mark.data
MODEL = Path(__file__).resolve().parents[2] / "models" / "seg_sc_epi" / "0.1.0"


def test_discover_shared_manifest(shared_data):
    pairs = discover(shared_data)
    names = [p.mask.name for p in pairs]
    assert len(pairs) == 13 and not any("gmseg" in n for n in names)
    assert all(p.role == "train-source" and len(p.sha256) == 64 for p in pairs)
    assert len({p.group for p in pairs}) == 11  # two subjects were scanned twice
    assert not any("epi/" in str(p.image) for p in pairs)  # the validation series is not trained on


def test_shipped_model_on_real_epi_series(shared_data):
    """The default model on the real series: Dice >= 0.85 on the temporal mean, cord found on every slice."""
    ort = pytest.importorskip("onnxruntime")
    from sct_deepseg_epi import metrics
    from sct_deepseg_epi.read import read_volume
    from sct_deepseg_epi.registry.manifest import load_manifest
    from sct_deepseg_epi.training.validate import predict_volume

    spec = load_manifest(MODEL)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in spec.member_paths()]

    def predict(x):
        logits = np.mean([1 / (1 + np.exp(-s.run(["logits"], {"image": x})[0])) for s in sessions], axis=0)
        return logits

    epi = shared_data / "epi" / "sct-example-2014"
    vol, ref = read_volume(epi / "fmri.nii.gz"), read_volume(epi / "fmri_moco_mean_seg_modif.nii.gz")
    pred = predict_volume(predict, vol.data, vol.zooms, spec) >= spec.threshold
    assert metrics.dice(pred, ref.data > 0.5) >= 0.85
    assert metrics.detection(pred, ref.data > 0.5)["rate"] == 1.0
