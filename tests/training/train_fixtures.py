"""Fixtures for the training tests: tiny synthetic neck volumes with a cord mask, built in code.

Not a conftest.py: tests/conftest.py is imported by name elsewhere, so a second module called
"conftest" would shadow it. Test modules import the fixtures they use from here.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def synthetic_neck(shape=(48, 40, 8), zooms=(1.0, 1.0, 3.0), centre=(24.0, 16.0), seed=0):
    """A T2*w-like axial stack: tissue, a bright CSF ring, a grey cord (the mask), some noise."""
    rng = np.random.default_rng(seed)
    x = (np.arange(shape[0]) + 0.5) * zooms[0]
    y = (np.arange(shape[1]) + 0.5) * zooms[1]
    X, Y = np.meshgrid(x, y, indexing="ij")
    img = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    for k in range(shape[2]):
        cx, cy = centre[0] + 0.3 * k, centre[1]
        r = np.hypot((X - cx) / 1.2, Y - cy)
        sl = 300 + 0 * X
        sl = np.where(r < 7.5, 900, sl)   # CSF
        sl = np.where(r < 4.5, 450, sl)   # cord
        img[:, :, k] = sl + rng.normal(0, 20, X.shape)
        mask[:, :, k] = r < 4.5
    return img, mask, zooms


def save_pair(folder: Path, stem: str, img, mask, zooms, label_suffix="_seg-manual") -> tuple[Path, Path]:
    aff = np.diag([-zooms[0], zooms[1], zooms[2], 1.0])  # LAS, like most of the real data
    folder.mkdir(parents=True, exist_ok=True)
    ip, mp = folder / f"{stem}.nii.gz", folder / f"{stem}{label_suffix}.nii.gz"
    nib.save(nib.Nifti1Image(img[::-1].copy(), aff), ip)  # stored LAS: flip x so RAS data are `img`
    nib.save(nib.Nifti1Image(mask[::-1].copy(), aff), mp)
    return ip, mp


@pytest.fixture(scope="module")
def tiny_bids(tmp_path_factory) -> Path:
    """Three subjects (so 3-fold ensembles have a held-out subject each); labels under derivatives/."""
    root = tmp_path_factory.mktemp("tiny") / "bids"
    for i, sub in enumerate(("sub-01", "sub-02", "sub-03")):
        img, mask, z = synthetic_neck(centre=(20.0 + 3 * i, 15.0 + 2 * i), seed=i)
        ip, mp = save_pair(root / sub / "anat", f"{sub}_T2starw", img, mask, z)
        lab = root / "derivatives" / "labels" / sub / "anat"
        lab.mkdir(parents=True)
        mp.rename(lab / mp.name)
    return root


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "MANIFEST.tsv").is_file():
        pytest.skip(f"the shared real data folder is absent ({SHARED_DATA.resolve()})")
    return SHARED_DATA.resolve()


@pytest.fixture
def neck():
    """The synthetic_neck builder, as a fixture (tests here are not a package)."""
    return synthetic_neck
