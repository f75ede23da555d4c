"""The recipe knobs of the capacity study: boundary-weighted loss, bf16 autocast, two top convolutions."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from sct_deepseg_epi.cli import main as cli_main  # noqa: E402
from sct_deepseg_epi.registry.manifest import load_manifest  # noqa: E402
from sct_deepseg_epi.training.fit import TrainConfig, edge_weight, loss_fn  # noqa: E402
from train_fixtures import tiny_bids  # noqa: F401,E402  (fixture)


def test_edge_weight_marks_only_the_boundary():
    t = torch.zeros(1, 1, 16, 16)
    t[..., 5:11, 5:11] = 1.0
    w = edge_weight(t, gain=4.0)
    assert w[0, 0, 8, 8] == 1.0 and w[0, 0, 0, 0] == 1.0      # deep inside, far outside
    assert w[0, 0, 5, 8] == 5.0 and w[0, 0, 4, 8] == 5.0      # either side of the edge
    assert int((w > 1).sum()) == 8 * 8 - 4 * 4


def test_boundary_loss_punishes_edge_errors_more():
    t = torch.zeros(1, 1, 16, 16)
    t[..., 5:11, 5:11] = 1.0
    good = torch.where(t > 0, 6.0, -6.0)
    edge_wrong, far_wrong = good.clone(), good.clone()
    edge_wrong[..., 4, 5:11] = 6.0    # one row grown past the edge
    far_wrong[..., 0, 0:6] = 6.0      # the same number of pixels wrong, far from the cord
    plain = [float(loss_fn(x, t)) for x in (edge_wrong, far_wrong)]
    bound = [float(loss_fn(x, t, "dice_bce_boundary")) for x in (edge_wrong, far_wrong)]
    assert plain[0] == pytest.approx(plain[1], rel=1e-6)
    assert bound[0] > 1.5 * bound[1]


def test_unknown_loss_or_precision_refused():
    with pytest.raises(ValueError):
        TrainConfig(loss="focal")
    with pytest.raises(ValueError):
        TrainConfig(precision="fp8")


def test_bf16_boundary_top2_trains_and_exports_fp32(tiny_bids, tmp_path):
    out = tmp_path / "m"
    rc = cli_main(["train", "-data", str(tiny_bids), "-o", str(out), "-name", "tiny_epi", "-version", "0.0.1",
                   "-members", "1", "-n-sim", "8", "-n-val", "2", "-epochs", "1", "-patch", "32", "-workers", "1",
                   "-threads", "1", "-widths", "8,12,16", "-top-convs", "2", "-loss", "dice_bce_boundary",
                   "-precision", "bf16"])
    assert rc == 0
    spec = load_manifest(out)
    cfg = spec.extra["training"]["config"]
    assert cfg["loss"] == "dice_bce_boundary" and cfg["precision"] == "bf16" and cfg["net"]["top_convs"] == 2
    assert spec.extra["provenance"]["parity_max_abs_diff"] <= 1e-4   # the exported graph is fp32
    import onnx

    graph = onnx.load(str(spec.member_paths()[0])).graph
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in graph.initializer)
    assert np.isfinite(spec.extra["training"]["members"][0]["history"][-1]["loss"])
