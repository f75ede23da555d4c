"""Masks, soft maps and disagreement maps are byte-identical to those of the engine before
its refactor into backends (checksums recorded then, fixed here).

The soft and disagreement checksums are compared only on the ONNX Runtime they were
recorded with (another release may round a float differently); masks always are.
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

RECORDED_ORT = "1.32.0"
EXPECTED: dict[str, dict[str, str]] = {
    'demo_phantom': {'mask': '8b13aa431cbb93a9f9cffbfe12a2bd70', 'disagreement': '9df9dc46b96b0ea84b12cfdeb2da6e1e', 'soft': 'ef96e2eb4b404f1f48d0afbb2bc4f130'},
    'demo_options': {'mask': '3b755053def034f0e51c3d6b823e92c9', 'disagreement': '5c28432ece6d1d302579da4a3c4fec8f', 'soft': '1a0a79e5fd1f97f565c8aa8f0bd2e8cc'},
    'demo_soft_main': {'soft_main': 'ef96e2eb4b404f1f48d0afbb2bc4f130', 'disagreement': '9df9dc46b96b0ea84b12cfdeb2da6e1e'},
    'sct_example_mean': {'mask': '46800b2923a18893cc45172c6753b0c9', 'disagreement': '34878c7291802df9220acd4d4374e006', 'soft': '322fdf80de8d6d1bf8a1276683d02dbc'},
    'sct_example_each': {'mask': '10734330d53b4122efd4c8e4871e40d1', 'disagreement': '35d10f5d8fe899b0ed439080bb3ab3f9', 'soft': '41859246828d19b8557b17b5670d0536'},
    'brightlab_mean': {'mask': 'c319c89da89ba8c27e8ede6a74011aad', 'disagreement': '617e6471d4603ba50343a06c4a4b7cb0', 'soft': '4e54b33fedc05a06a361551341498f0a'},
    'nnunet_3d': {'mask': '68ac151b74408bf03fb46b7941c93877', 'disagreement': 'bc5c49af7ab25e7ac9c7721170bd9db3', 'soft': '5449d303ba0e6fd4f6c7aed45827c753'},
    'nnunet_2d_reorient': {'mask': 'ebf1749f2172eec1079cffdadfca41d9', 'disagreement': '0c3ac53e49fcafe99dd2aa744857a4a8', 'soft': '949f69707cc3320ee1921c40ffcf91d2'},
    'nnunet_3d_options': {'mask': '479d719a3093259ed39825e38ca3a652', 'disagreement': '4d59a07aecc025c11586bf389656eab1', 'soft': '38c9d093640bc472821ea23d75159cb5'},
}


def digest(path: Path) -> str:
    a = np.asarray(nib.load(str(path)).dataobj)
    h = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def _demo(tmp: Path) -> tuple[Path, dict, str]:
    from sct_deepseg_epi.phantom import make_phantom

    ph = make_phantom(seed=0)
    p = tmp / "phantom_bold.nii.gz"
    nib.save(ph.image, str(p))
    return p, {}, "seg_sc_epi"


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
        return p, {"mode_4d": mode_4d}, "seg_sc_epi"
    return make


def _nnunet(ndim: int, reader: str, **opts):
    def make(tmp: Path):
        model = make_nnunet_folder(tmp / f"nn{ndim}", ndim=ndim, reader=reader)
        return _blob(tmp), opts, str(model)
    return make


def _demo_with(**opts):
    def make(tmp: Path):
        return _demo(tmp)[0], opts, "seg_sc_epi"
    return make


CASES = {
    "demo_phantom": _demo,
    "demo_options": _demo_with(threshold=0.3, largest=False, fill_holes=False, remove_small="20mm3", tta=False,
                               localise=False),
    "demo_soft_main": _demo_with(threshold=0),
    "sct_example_mean": _real("epi/sct-example-2014/fmri.nii.gz"),
    "sct_example_each": _real("epi/sct-example-2014/fmri.nii.gz", "each"),
    "brightlab_mean": _real("epi/brightlab-nw/func_mean.nii.gz"),
    "nnunet_3d": _nnunet(3, "SimpleITKIO"),
    "nnunet_2d_reorient": _nnunet(2, "NibabelIOWithReorient"),
    "nnunet_3d_options": _nnunet(3, "NibabelIO", threshold=0.3, largest=True, fill_holes=True, remove_small="3vox",
                                 tta=False),
}


def segment_case(name: str, tmp: Path) -> dict[str, str]:
    from sct_deepseg_epi import api

    src, opts, model = CASES[name](tmp)
    res = api.run(src, tmp / "out_seg.nii.gz", model=model, soft=True, disagreement=True,
                  options=api.Options(threads=1, **{"method": "3d", **opts}))  # the postprocessing of then
    main = "soft_main" if res.provenance["output"] == "probability" else "mask"  # a float map, then
    return {main: digest(res.mask), "disagreement": digest(res.extra["disagreement"]),
            **({"soft": digest(res.extra["soft"])} if "soft" in res.extra else {})}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.data] if n.startswith(("sct", "bright")) else [])
                                  for n in CASES])
def test_outputs_are_byte_identical_to_before_the_refactor(name, tmp_path):
    import onnxruntime

    got = segment_case(name, tmp_path)
    want = EXPECTED[name]
    assert got.keys() == want.keys()
    if "mask" in want:
        assert got["mask"] == want["mask"], f"{name}: the mask changed"
    if onnxruntime.__version__ == RECORDED_ORT:
        assert got == want, f"{name}: a probability or disagreement map changed"


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


if __name__ == "__main__":
    import tempfile

    import onnxruntime

    print(f'RECORDED_ORT = "{onnxruntime.__version__}"')
    print("EXPECTED = {")
    for n in CASES:
        with tempfile.TemporaryDirectory() as d:
            print(f"    {n!r}: {segment_case(n, Path(d))!r},")
    print("}")
