"""The Python API end to end with a tiny real ONNX ensemble."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image

from sct_deepseg_epi import api, segment
from sct_deepseg_epi.errors import InputError, ModelError
from sct_deepseg_epi.metrics import dice
from sct_deepseg_epi.phantom import make_phantom


@pytest.mark.parametrize("axcodes", ["RAS", "LPI", "PSR"])
def test_segment_finds_the_blob_in_any_orientation(tiny_model, axcodes):
    img, mask = blob_image(axcodes=axcodes)
    seg = segment(img, model="tiny")
    out = np.asarray(seg.mask.dataobj)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert dice(out, mask) > 0.95
    assert np.array_equal(seg.mask.affine, img.affine)
    assert seg.probability.get_data_dtype() == np.float32 and seg.disagreement.shape == img.shape


def test_anisotropic_voxels_resampled_and_back(tiny_model):
    img, mask = blob_image(shape=(80, 40, 4), zooms=(0.5, 1.0, 5.0), centre=(40, 20), radius=6)
    seg = segment(img, model="tiny")
    assert dice(np.asarray(seg.mask.dataobj), mask) > 0.9


def test_4d_mean_gives_3d_and_each_gives_4d(tiny_model):
    img, mask = blob_image(n_volumes=3)
    mean = segment(img, model="tiny")
    each = segment(img, model="tiny", mode_4d="each")
    assert mean.mask.shape == img.shape[:3] and each.mask.shape == img.shape
    assert dice(np.asarray(each.mask.dataobj)[..., 1], mask) > 0.95


def test_options_override_manifest(model_root):
    from conftest import make_model_folder

    make_model_folder(model_root / "soft" / "1.0.0", name="soft", members=((1.0, 0.0),))
    ramp = np.repeat(np.linspace(0, 1, 32)[:, None, None], 32, axis=1).repeat(3, axis=2) * np.ones((1, 32, 3))
    img = nib.Nifti1Image(ramp.astype(np.float32), np.eye(4))  # probability = sigmoid(z-score): 0.15..0.85
    n = {t: int(np.asarray(segment(img, model="soft", threshold=t).mask.dataobj).sum()) for t in (0.5, 0.7)}
    assert n[0.5] == 16 * 32 * 3 and 0 < n[0.7] < n[0.5]


def test_no_cord_gives_empty_mask_and_warning(tiny_model):
    rng = np.random.default_rng(0)
    img = nib.Nifti1Image((100 + rng.uniform(0, 1, (20, 20, 3))).astype(np.float32), np.eye(4))  # nothing stands out
    seg = segment(img, model="tiny")
    assert not np.asarray(seg.mask.dataobj).any()
    assert any("no spinal cord" in w for w in seg.warnings)


def test_run_writes_mask_sidecar_and_extras(tiny_model, blob_file):
    path, mask = blob_file
    res = api.run(path, soft=True, disagreement=True, model="tiny")
    assert res.mask == path.parent / "blob_seg.nii.gz"
    side = json.loads(res.sidecar.read_text())
    assert side["model"]["name"] == "tiny" and len(side["model"]["members"]) == 3
    assert side["input"]["sha256"] and side["threshold"] == 0.5 and side["cord_voxels"] == int(mask.sum())
    assert set(res.extra) == {"soft", "disagreement"}
    soft = nib.load(str(res.extra["soft"]))
    assert soft.get_data_dtype() == np.float32 and float(np.asarray(soft.dataobj).max()) <= 1.0


def test_output_probability_writes_soft_map_and_threshold_zero_is_its_alias(tiny_model, blob_file, tmp_path):
    path, _ = blob_file
    res = api.run(path, tmp_path / "p_seg.nii.gz", model="tiny", options=api.Options(output="probability"))
    img = nib.load(str(res.mask))
    side = json.loads(res.sidecar.read_text())
    assert img.get_data_dtype() == np.float32 and side["output"] == "probability" and side["threshold"] == 0.5
    assert 0 < np.asarray(img.dataobj).max() <= 1 and side["cord_voxels"] > 0
    alias = api.run(path, tmp_path / "a_seg.nii.gz", model="tiny", options=api.Options(threshold=0))
    assert np.array_equal(np.asarray(nib.load(str(alias.mask)).dataobj), np.asarray(img.dataobj))


@pytest.mark.parametrize("bad, message", [
    ({"threshold": 1.0}, "threshold"), ({"threshold": -0.1}, "threshold"), ({"output": "labels"}, "output"),
    ({"mode_4d": "median"}, "-4d"), ({"device": "tpu"}, "device"), ({"threads": 0}, "threads"),
    ({"remove_small": "big"}, "remove_small"),
])
def test_bad_options_are_refused_where_they_are_made(bad, message):
    from sct_deepseg_epi.errors import OptionError

    with pytest.raises(OptionError, match=message):
        api.Options(**bad)
    with pytest.raises(TypeError):
        api.Options(0.5)  # keyword-only


def test_options_resolve_over_the_manifest_and_reach_the_sidecar(tiny_model, blob_file, tmp_path):
    path, _ = blob_file
    opts = api.Options(largest=False, remove_small="3mm3")
    post = opts.post(api.load_model("tiny"))
    assert (post.threshold, post.largest, post.fill_holes, post.remove_small) == (0.5, False, True, "3mm3")
    side = api.run(path, tmp_path / "o_seg.nii.gz", model="tiny", options=opts).provenance
    assert side["postprocess"] == {"method": "z", "largest": False, "fill_holes": True, "remove_small": "3mm3",
                                   "dilate": 0}
    assert side["model"]["backend"] == "slices"


def test_run_4d_each_streams(tiny_model, tmp_path):
    img, mask = blob_image(n_volumes=4, axcodes="LAS")
    p = tmp_path / "bold.nii.gz"
    nib.save(img, str(p))
    res = api.run(p, model="tiny", disagreement=True, options=api.Options(mode_4d="each"))
    out = nib.load(str(res.mask))
    assert out.shape == img.shape and out.get_data_dtype() == np.uint8
    assert dice(np.asarray(out.dataobj)[..., 3], mask) > 0.95
    assert nib.load(str(res.extra["disagreement"])).shape == img.shape


def test_run_refuses_output_equal_to_input(tiny_model, blob_file):
    path, _ = blob_file
    before = path.read_bytes()
    with pytest.raises(InputError, match="is the input"):
        api.run(path, path, model="tiny")
    assert path.read_bytes() == before


def test_failed_run_leaves_no_output(tiny_model, blob_file):
    path, _ = blob_file
    with pytest.raises(ModelError):
        api.run(path, model="nope")
    assert sorted(p.name for p in path.parent.iterdir()) == ["blob.nii.gz", "models-cache"]


def test_phantom_is_realistic_enough():
    ph = make_phantom(shape=(48, 48, 6), n_volumes=3, seed=3)
    truth = np.asarray(ph.truth.dataobj)
    assert ph.image.shape == (48, 48, 6, 3) and truth.sum(axis=(0, 1)).min() > 20
    data = np.asarray(ph.image.dataobj)
    # the CSF ring is brighter than the cord it surrounds, as in T2*-weighted EPI
    assert data[..., 0][truth > 0].mean() < np.percentile(data, 99)


def test_localised_run_matches_whole_field(tiny_model):
    # a large field with the cord-like blob off centre: the quick pass narrows the ensemble to a region
    img, mask = blob_image(shape=(120, 110, 4), centre=(90, 30), radius=5)
    fast = segment(img, model="tiny")
    full = segment(img, model="tiny", localise=False)
    assert np.array_equal(np.asarray(fast.mask.dataobj), np.asarray(full.mask.dataobj))
    assert dice(np.asarray(fast.mask.dataobj), mask) > 0.95
    assert fast.provenance()["localise"] is True


def test_localise_finds_roi(tiny_model):
    from sct_deepseg_epi.backend import backend_for
    from sct_deepseg_epi.preprocess import prepare
    from sct_deepseg_epi.read import from_image

    img, _ = blob_image(shape=(120, 110, 4), centre=(90, 30), radius=5, axcodes="RAS")
    vol = from_image(img)
    backend = backend_for(api.load_model("tiny"), api.Options(device="cpu"))
    roi = backend.localise(prepare(vol.data, vol.zooms, backend.spec))
    assert roi is not None and roi[0].start <= 85 <= 95 <= roi[0].stop and roi[1].start <= 25 <= 35 <= roi[1].stop
    assert (roi[0].stop - roi[0].start) < 120


def _curved_cord(tmp_path, axcodes="LPI"):
    """Bright discs whose thick slices do not touch in 3D (8 mm steps, radius 3 mm), one slice blanked."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    shape, zooms = (48, 40, 6), (1.0, 1.0, 9.5)
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    data = (100 + 5 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
    for k in range(shape[2]):
        if k != 2:  # RAS slice 2: no cord visible
            data[:, :, k][(xx - (4 + 8 * k)) ** 2 + (yy - 20) ** 2 <= 9] = 1000
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes))
    img = nib.Nifti1Image(apply_orientation(data, t), np.diag(list(zooms) + [1.0]) @ inv_ornt_aff(t, shape))
    p = tmp_path / f"curved_{axcodes}.nii.gz"
    nib.save(img, str(p))
    return p


def test_default_follows_the_cord_along_z_and_3d_is_the_old_behaviour(tiny_model, tmp_path):
    p = _curved_cord(tmp_path, "RAS")
    z = np.asarray(segment(p, model="tiny").mask.dataobj)
    old = np.asarray(segment(p, model="tiny", method="3d").mask.dataobj)
    assert [int(k) for k in np.flatnonzero(z.any(axis=(0, 1)))] == [0, 1, 3, 4, 5]
    assert int(old.any(axis=(0, 1)).sum()) == 1  # the largest 3D object is one slice


def test_sidecar_lists_per_slice_confidence_in_the_files_slice_order(tiny_model, tmp_path):
    p = _curved_cord(tmp_path, "LPI")  # stored inferior-first: RAS slice 2 is the file's slice 3
    res = api.run(p, model="tiny")
    side = json.loads(res.sidecar.read_text())
    assert [s["slice"] for s in side["slices"]] == list(range(6))
    assert side["slices"][3]["area_mm2"] == 0 and side["slices"][3]["reasons"] == ["gap"]
    assert side["slice_flags"]["flagged"] == [3] and side["slice_flags"]["axis"] == 2
    assert side["slice_flags"]["version"] == "confidence-1" and side["slice_flags"]["volumes"] == 1
    assert side["slices"][0]["mean_probability"] > 0.9 and side["slices"][0]["area_mm2"] > 20
    assert segment(p, model="tiny").provenance()["slice_flags"]["flagged"] == [3]


def test_4d_each_sidecar_summarises_the_volumes(tiny_model, tmp_path):
    img, _ = blob_image(n_volumes=3, axcodes="LAS")
    p = tmp_path / "bold.nii.gz"
    nib.save(img, str(p))
    side = json.loads(api.run(p, model="tiny", options=api.Options(mode_4d="each")).sidecar.read_text())
    assert side["slice_flags"]["volumes"] == 3 and len(side["slices"]) == img.shape[2]
    assert all(s["frames_flagged"] == 0 and not s["flag"] for s in side["slices"])
