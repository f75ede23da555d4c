"""Checks on the real data in ../shared/data (skipped when that folder is absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sct_deepseg_epi.training.data import HELDOUT_GROUPS, discover, load_sources, unique_names
from train_fixtures import shared_data  # noqa: F401,E402  (fixture)

pytestmark = pytest.mark.data
MODEL = Path(__file__).resolve().parents[2] / "models" / "seg_sc_epi" / "0.1.0"


def manifest_labels(data: Path) -> list[str]:
    """Cord-mask files of the train-source rows of MANIFEST.tsv (what discover must pair), read independently."""
    rows = [line.split("\t") for line in (data / "MANIFEST.tsv").read_text().splitlines()[1:] if line.strip()]
    return [r[0] for r in rows if r[2] == "train-source" and ("_seg" in r[0] or "_mask" in r[0]) and "gmseg" not in r[0]]


def test_discover_shared_manifest(shared_data):
    pairs = discover(shared_data)
    names = [p.mask.name for p in pairs]
    labels = manifest_labels(shared_data)
    assert len(labels) >= 22  # the spine-generic subject included
    assert sorted(str(p.mask.relative_to(shared_data)) for p in pairs) == sorted(labels)
    assert not any("gmseg" in n for n in names)
    assert all(p.role == "train-source" and len(p.sha256) == 64 for p in pairs)
    # two subjects were scanned twice; the sct-errsm subjects hold 2 contrasts each (3 of them)
    assert len({p.group for p in pairs}) == len(labels) - 5
    # every label is paired with the image in its own folder (stems such as t2 repeat)
    assert all(p.image.parent == p.mask.parent for p in pairs)
    assert len(set(unique_names(pairs))) == len(pairs)
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


def test_heldout_subjects_are_not_training_sources(shared_data):
    sources, pairs = load_sources(shared_data, exclude_groups=HELDOUT_GROUPS)
    held = [f for f in manifest_labels(shared_data) if any(f"/{g}/" in f for g in HELDOUT_GROUPS)]
    assert len(held) == 3
    assert len(sources) == len(manifest_labels(shared_data)) - len(held)
    assert not any(p.group in HELDOUT_GROUPS for p in pairs)
    assert any("spine-generic" in str(p.image) for p in pairs)
    assert all(s.meta["group"] not in HELDOUT_GROUPS for s in sources)
    # the sagittal T2w (PSR on disk) is resliced axially: RAS, 1 mm, long along z
    t2 = next(s for s in sources if s.name == "errsm_11/t2")
    assert t2.zooms == pytest.approx((1.0, 1.0, 1.0)) and t2.image.shape[2] > 200
    assert set(np.unique(t2.mask)) == {0.0, 1.0}


def test_heldout_simulated_set_is_fixed_and_scanner_like(shared_data):
    import nibabel as nib

    from sct_deepseg_epi.read import from_image
    from sct_deepseg_epi.training.validate import heldout_simulated

    a = heldout_simulated(n=4, seed=3, data=shared_data)
    b = heldout_simulated(n=4, seed=3, data=shared_data)
    assert [x[0] for x in a] == [x[0] for x in b]
    assert {x[0].split("_", 1)[1] for x in a} == {"errsm_18-gre", "errsm_18-t2", "errsm_21-t2"}
    for (name, img, msk), (_, img2, msk2) in zip(a, b):
        np.testing.assert_array_equal(img.get_fdata(), img2.get_fdata())
        np.testing.assert_array_equal(img.affine, img2.affine)
        assert img.shape == msk.shape and 8 <= img.shape[2] <= 20
        assert nib.aff2axcodes(img.affine) in (("L", "A", "S"), ("L", "P", "S"))
        ras = from_image(msk, name).data > 0.5
        assert ras.any(axis=(0, 1)).all()  # the cord is on every slice
        assert set(np.unique(np.asarray(msk.dataobj))) <= {0, 1}
