"""Shared fixtures: tiny ONNX models and small NIfTI images, all built in code."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def make_onnx(path: Path, weight: float, bias: float, in_channels: int = 1) -> Path:
    """A one-layer ONNX 'model': logits = weight * centre channel + bias (a 1x1 convolution).

    Run on z-scored images it marks voxels brighter than -bias/weight, which makes the
    expected mask computable by hand in tests.
    """
    import onnx
    from onnx import TensorProto, helper

    w = np.zeros((1, in_channels, 1, 1), np.float32)
    w[0, in_channels // 2] = weight
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "W", "B"], ["logits"], kernel_shape=[1, 1])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", in_channels, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.ravel()),
         helper.make_tensor("B", TensorProto.FLOAT, [1], [bias])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by older onnxruntime releases (SCT's)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_model_folder(folder: Path, name: str = "tiny", version: str = "1.0.0",
                      members=((8.0, -16.0), (8.0, -15.0), (8.0, -17.0)), **manifest) -> Path:
    """A complete model folder: members + manifest.json. Extra kwargs override manifest fields."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (w, b) in enumerate(members):
        p = make_onnx(folder / f"member{i}.onnx", w, b, 2 * manifest.get("context", 0) + 1)
        entries.append({"file": p.name, "sha256": sha256(p), "size": p.stat().st_size})
    d = {
        "schema_version": 1, "name": name, "version": version, "description": "test model",
        "license": "MIT", "citation": "none",
        "members": entries,
        "input": {"spacing_mm": [1.0, 1.0], "context_slices": manifest.pop("context", 0), "size_multiple": 8,
                  "normalisation": {"scheme": "zscore", "clip_percentiles": None}},
        "output": {"activation": "sigmoid", "threshold": 0.5},
        "tta": {"flip_axes": [0]},
        "postprocess": {"largest": True, "fill_holes": True, "remove_small": "0vox"},
        "training": {"note": "built by tests"},
    }
    d.update(manifest)
    (folder / "manifest.json").write_text(json.dumps(d, indent=2))
    return folder


def blob_image(shape=(40, 36, 6), zooms=(1.0, 1.0, 4.0), centre=(20, 18), radius=4.0, axcodes="RAS",
               n_volumes: int | None = None, seed: int = 0) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A noisy image with one bright disc per slice (in RAS), stored in ``axcodes``.

    Returns the image and the disc mask in the stored orientation.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    disc = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2)
    mask = np.repeat(disc[:, :, None], nz, axis=2).astype(np.uint8)
    base = 100 + 5 * rng.standard_normal(shape)
    data = np.where(mask > 0, 1000.0, base).astype(np.float32)
    if n_volumes:
        data = np.stack([data + rng.standard_normal(shape).astype(np.float32) for _ in range(n_volumes)], axis=-1)
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes))
    ras_aff = np.diag(list(zooms) + [1.0])
    ras_aff[:3, 3] = [-10.0, 5.0, 30.0]
    affine = ras_aff @ inv_ornt_aff(t, shape)
    img = nib.Nifti1Image(apply_orientation(data, t), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    return img, apply_orientation(mask, t)


@pytest.fixture
def model_root(tmp_path, monkeypatch) -> Path:
    """An empty private models cache (never the user's real one)."""
    root = tmp_path / "models-cache"
    root.mkdir()
    monkeypatch.setenv("SCT_DEEPSEG_EPI_MODELS", str(root))
    monkeypatch.delenv("SCT_DIR", raising=False)
    return root


@pytest.fixture
def tiny_model(model_root) -> Path:
    """The 'tiny@1.0.0' model installed in the private cache; returns its folder."""
    return make_model_folder(model_root / "tiny" / "1.0.0")


@pytest.fixture
def blob_file(tmp_path) -> tuple[Path, np.ndarray]:
    img, mask = blob_image(axcodes="LPI")
    p = tmp_path / "blob.nii.gz"
    nib.save(img, str(p))
    return p, mask


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the project as ../shared/data)")
    return SHARED_DATA
