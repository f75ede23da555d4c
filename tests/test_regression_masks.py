"""Masks are byte-identical to those of the engine before its refactor into backends
(checksums recorded then, fixed here); soft and disagreement maps agree to float rounding.

Float maps are compared by (sum, sum of squares, index-weighted sum), not by checksum: their
last bits depend on how many threads OpenBLAS uses for the resampling products (one BLAS
thread reproduces the recorded checksums exactly; two do not), which says nothing about the
engine. Any real change of a map moves these sums far beyond the tolerance.
Record anew (only for an intended change of output): ``python tests/test_regression_masks.py``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA, blob_image
from nnunet_fixtures import make_nnunet_folder

# the checksums were recorded with this model; the default may move on to a newer version
PINNED = "seg_sc_epi@0.1.0"
EXPECTED: dict[str, dict[str, str]] = {  # mask checksums
    'demo_phantom': {'mask': '8b13aa431cbb93a9f9cffbfe12a2bd70'},
    'demo_options': {'mask': '3b755053def034f0e51c3d6b823e92c9'},
    'demo_soft_main': {},
    'sct_example_mean': {'mask': '46800b2923a18893cc45172c6753b0c9'},
    'sct_example_each': {'mask': '10734330d53b4122efd4c8e4871e40d1'},
    'brightlab_mean': {'mask': 'c319c89da89ba8c27e8ede6a74011aad'},
    'nnunet_3d': {'mask': '68ac151b74408bf03fb46b7941c93877'},
    'nnunet_2d_reorient': {'mask': 'ebf1749f2172eec1079cffdadfca41d9'},
    'nnunet_3d_options': {'mask': '479d719a3093259ed39825e38ca3a652'},
}

FLOAT_STATS: dict[str, dict[str, tuple[float, float, float]]] = {
    'demo_phantom': {'disagreement': (44.373855, 4.396847, 21.8282), 'soft': (571.17291, 481.60044, 281.613049)},
    'demo_options': {'disagreement': (56.144947, 7.510485, 27.875071), 'soft': (569.039647, 483.147177, 284.152225)},
    'demo_soft_main': {'soft_main': (571.17291, 481.60044, 281.613049), 'disagreement': (44.373855, 4.396847, 21.8282)},
    'sct_example_mean': {'disagreement': (25.847119, 2.743708, 15.538415), 'soft': (452.837293, 397.692314, 266.822461)},
    'sct_example_each': {'disagreement': (760.583308, 77.724772, 452.684946), 'soft': (13710.162854, 12041.297518, 8075.901845)},
    'brightlab_mean': {'disagreement': (320.96496, 64.752876, 142.064134), 'soft': (2206.474503, 1895.535173, 988.572728)},
    'nnunet_3d': {'disagreement': (235.803498, 11.594937, 111.635858), 'soft': (1259.129529, 544.99803, 545.72786)},
    'nnunet_2d_reorient': {'disagreement': (123.871099, 2.664567, 60.035174), 'soft': (1368.173127, 485.90976, 625.196184)},
    'nnunet_3d_options': {'disagreement': (283.47981, 28.779931, 134.995921), 'soft': (1268.041279, 543.547083, 551.823511)},
}


def digest(path: Path) -> str:
    a = np.asarray(nib.load(str(path)).dataobj)
    h = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def float_stats(path: Path) -> tuple[float, float, float]:
    a = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
    w = np.arange(a.size, dtype=np.float64).reshape(a.shape) / a.size
    return round(float(a.sum()), 6), round(float((a * a).sum()), 6), round(float((a * w).sum()), 6)


def _demo(tmp: Path) -> tuple[Path, dict, str]:
    from sct_deepseg_epi.phantom import make_phantom

    ph = make_phantom(seed=0)
    p = tmp / "phantom_bold.nii.gz"
    nib.save(ph.image, str(p))
    return p, {}, PINNED


def _blob(tmp: Path) -> Path:
    img, _ = blob_image(shape=(30, 28, 9), zooms=(0.9, 1.1, 3.0), axcodes="LPI", radius=3.5, seed=3)
    p = tmp / "blob.nii.gz"
    nib.save(img, str(p))
    return p


def _real(rel: str, mode_4d: str = "mean"):
    def make(tmp: Path):
        p = SHARED_DATA / rel
        if not p.is_file():
            pytest.skip(f"real data {p} is absent (../shared/data)")
        return p, {"mode_4d": mode_4d}, PINNED
    return make


def _nnunet(ndim: int, reader: str, **opts):
    def make(tmp: Path):
        model = make_nnunet_folder(tmp / f"nn{ndim}", ndim=ndim, reader=reader)
        return _blob(tmp), opts, str(model)
    return make


def _demo_with(**opts):
    def make(tmp: Path):
        return _demo(tmp)[0], opts, PINNED
    return make


CASES = {
    "demo_phantom": _demo,
    "demo_options": _demo_with(threshold=0.3, largest=False, fill_holes=False, remove_small="20mm3", tta=False,
                               localise=False),
    "demo_soft_main": _demo_with(threshold=0),
    "sct_example_mean": _real("epi/sct-example-2014/fmri.nii.gz"),
    "sct_example_each": _real("epi/sct-example-2014/fmri.nii.gz", "each"),
    "brightlab_mean": _real("epi/brightlab-nw/func_mean.nii.gz"),
    # recorded when nnU-Net models mirrored by default; they now mirror only when asked (-tta 1)
    "nnunet_3d": _nnunet(3, "SimpleITKIO", tta=True),
    "nnunet_2d_reorient": _nnunet(2, "NibabelIOWithReorient", tta=True),
    "nnunet_3d_options": _nnunet(3, "NibabelIO", threshold=0.3, largest=True, fill_holes=True, remove_small="3vox",
                                 tta=False),
}


def segment_case(name: str, tmp: Path) -> tuple[dict[str, str], dict[str, tuple[float, float, float]]]:
    """(mask checksum, float map statistics) of one case."""
    from sct_deepseg_epi import api

    src, opts, model = CASES[name](tmp)
    options = api.Options(threads=1, **{"method": "3d", **opts})  # the postprocessing of then
    # soft=True beside a main output that is the soft map already is refused (it was dropped unseen)
    res = api.run(src, tmp / "out_seg.nii.gz", model=model, soft=options.output != "probability", disagreement=True,
                  options=options)
    maps = {"disagreement": res.extra["disagreement"], **({"soft": res.extra["soft"]} if "soft" in res.extra else {})}
    if res.provenance["output"] == "probability":  # the main output is a float map, then
        return {}, {"soft_main": float_stats(res.mask), **{k: float_stats(p) for k, p in maps.items()}}
    return {"mask": digest(res.mask)}, {k: float_stats(p) for k, p in maps.items()}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.data] if n.startswith(("sct", "bright")) else [])
                                  for n in CASES])
def test_outputs_are_identical_to_before_the_refactor(name, tmp_path):
    masks, floats = segment_case(name, tmp_path)
    if "mask" in EXPECTED[name]:
        assert masks == {"mask": EXPECTED[name]["mask"]}, f"{name}: the mask changed"
    want = FLOAT_STATS[name]
    assert floats.keys() == want.keys()
    for k, stats in want.items():
        assert floats[k] == pytest.approx(stats, rel=1e-5, abs=1e-3), f"{name}: the {k} map changed"


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.data] if n.startswith(("sct", "bright")) else [])
                                  for n in ("demo_phantom", "demo_options", "sct_example_mean", "sct_example_each",
                                            "brightlab_mean")])
def test_following_the_cord_along_z_keeps_these_masks(name, tmp_path):
    """A clear cord on every slice: the z-following default changes nothing there."""
    from sct_deepseg_epi import api

    src, opts, model = CASES[name](tmp_path)
    res = api.run(src, tmp_path / "z_seg.nii.gz", model=model, options=api.Options(threads=1, **opts))
    assert res.provenance["postprocess"]["method"] == "z"
    assert digest(res.mask) == EXPECTED[name]["mask"], f"{name}: z-following changed the mask"


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.data] if n.startswith(("sct", "bright")) else [])
                                  for n in ("demo_phantom", "sct_example_each", "brightlab_mean")])
def test_no_prompts_and_an_empty_prompt_image_keep_these_masks(name, tmp_path):
    """Prompts change only the slices they are on: none, or a label image of zeros, change nothing."""
    from sct_deepseg_epi import api

    src, opts, model = CASES[name](tmp_path)
    ref = nib.load(str(src))
    empty = tmp_path / "no_points.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(ref.shape[:3], np.uint8), ref.affine), str(empty))
    for prompts in (None, empty):
        res = api.run(src, tmp_path / "p_seg.nii.gz", model=model,
                      options=api.Options(threads=1, prompts=prompts, **opts))
        assert digest(res.mask) == EXPECTED[name]["mask"], f"{name}: prompts={prompts} changed the mask"
        assert "prompts" not in res.provenance
        res.mask.unlink()


if __name__ == "__main__":
    import tempfile

    results = {}
    for n in CASES:
        with tempfile.TemporaryDirectory() as d:
            results[n] = segment_case(n, Path(d))
    print("EXPECTED: dict[str, dict[str, str]] = {  # mask checksums")
    for n, (masks, _) in results.items():
        print(f"    {n!r}: {masks!r},")
    print("}")
    print("FLOAT_STATS: dict[str, dict[str, tuple[float, float, float]]] = {")
    for n, (_, floats) in results.items():
        print(f"    {n!r}: {floats!r},")
    print("}")
