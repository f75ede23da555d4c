"""Tiny imported-nnU-Net model folders built with ``onnx.helper`` alone (no torch, no nnunetv2).

Each fold is a real ONNX graph in nnU-Net's layout: ``image`` (N, 1, *patch) -> ``logits``
(N, K, *patch), a seeded 3x3(x3) convolution, so that tile borders, mirroring and fold
averaging all change the output. The manifest's ``nnunet`` section is what import-nnunet
writes for such a model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sct_deepseg_epi.registry.store import sha256_file


def make_fold(path: Path, seed: int, ndim: int = 3, n_out: int = 2) -> Path:
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    k = (3,) * ndim
    w = (rng.standard_normal((n_out, 1, *k)) * 0.3).astype(np.float32)
    w[1:, 0][(slice(None),) + (1,) * ndim] += 2.0  # the centre voxel drives foreground: bright = cord
    b = np.array([0.5] + [-1.0] * (n_out - 1), np.float32)
    dims = ["N", 1] + [f"d{i}" for i in range(ndim)]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "W", "B"], ["logits"], kernel_shape=list(k), pads=[1] * (2 * ndim))],
        "tiny_nnunet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out] + dims[2:])],
        [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.ravel()),
         helper.make_tensor("B", TensorProto.FLOAT, [n_out], b)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def recipe(ndim: int = 3, reader: str = "SimpleITKIO", use_mask: bool = False) -> dict:
    """An ``nnunet`` manifest section for a z-first model of 4 mm slices and 1 mm pixels."""
    spacing = [4.0, 1.0, 1.0] if ndim == 3 else [1.0, 1.0]
    patch = [4, 16, 16] if ndim == 3 else [16, 16]
    return {
        "configuration": "3d_fullres" if ndim == 3 else "2d", "image_reader": reader,
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "spacing": spacing, "patch_size": patch, "step_size": 0.5, "mirror_axes": list(range(ndim)),
        "resampling": {"data": {"order": 3, "order_z": 0, "force_separate_z": None},
                       "probabilities": {"order": 1, "order_z": 0, "force_separate_z": None},
                       "anisotropy_threshold": 3},
        "normalisation": [{"scheme": "ZScoreNormalization", "use_mask": use_mask, "intensity": {}}],
        "labels": {"background": 0, "sc": 1}, "regions_class_order": None, "blend_precision": "float16",
    }


def make_nnunet_folder(folder: Path, *, ndim: int = 3, folds: int = 2, name: str = "tiny_nnunet",
                       version: str = "1.0.0", **recipe_kw) -> Path:
    """A complete imported-nnU-Net model folder (members + manifest.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for f in range(folds):
        p = make_fold(folder / f"fold_{f}.onnx", seed=100 + f, ndim=ndim)
        members.append({"file": p.name, "sha256": sha256_file(p),
                        "size": p.stat().st_size})
    d = {
        "schema_version": 1, "name": name, "version": version, "description": "tiny nnU-Net-layout test model",
        "license": "", "citation": "", "members": members,
        "input": {"spacing_mm": [1.0, 1.0], "context_slices": 0, "size_multiple": 1,
                  "normalisation": {"scheme": "none", "clip_percentiles": None}},
        "output": {"activation": "softmax", "threshold": 0.5},
        "tta": {"flip_axes": []},
        "postprocess": {"largest": False, "fill_holes": False, "remove_small": "0vox"},
        "nnunet": recipe(ndim, **recipe_kw),
    }
    (folder / "manifest.json").write_text(json.dumps(d, indent=2))
    return folder
