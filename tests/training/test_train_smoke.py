"""The whole training loop on tiny data: simulate, train a few steps, export, parity, manifest, run.

Needs torch and onnx (the ``train`` extra); skipped without them. Runs on the CPU in seconds.
"""
from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from sct_deepseg_epi.cli import main as cli_main  # noqa: E402
from sct_deepseg_epi.registry.manifest import load_manifest  # noqa: E402
from train_fixtures import tiny_bids  # noqa: F401,E402  (fixture)

TINY = ["-n-sim", "12", "-n-val", "3", "-epochs", "1", "-patch", "32", "-workers", "1", "-threads", "2"]


@pytest.fixture(scope="module")
def trained(tiny_bids, tmp_path_factory):
    """One 3-member model trained for a few steps, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "model"
    rc = cli_main(["train", "-data", str(tiny_bids), "-o", str(out), "-name", "tiny_epi", "-version", "0.0.1",
                   "-members", "3", "-seed", "3", "-checkpoint", str(tmp / "ck.pt"), *TINY])
    assert rc == 0
    return out, tmp / "ck.pt"


def test_train_export_and_run(trained, tiny_bids, tmp_path, capsys):
    out, ck = trained
    spec = load_manifest(out)  # validated, SHA-256 present
    assert spec.name == "tiny_epi" and len(spec.members) == 3 and spec.context_slices == 0
    tr = spec.extra["training"]
    assert [m["heldout_sources"] for m in tr["members"]] == [["sub-01_T2starw"], ["sub-02_T2starw"], ["sub-03_T2starw"]]
    assert spec.extra["provenance"]["parity_max_abs_diff"] <= 1e-4
    assert (out / "README.md").read_text().startswith("# tiny_epi 0.0.1")
    import hashlib

    for m, p in zip(spec.members, spec.member_paths()):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == m.sha256
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["logits"]
        y = sess.run(["logits"], {"image": np.zeros((2, 1, 24, 40), np.float32)})[0]
        assert y.shape == (2, 1, 24, 40) and y.dtype == np.float32

    # the engine runs it end to end on a real-looking file
    from sct_deepseg_epi import segment

    img = next(tiny_bids.glob("sub-01/anat/*_T2starw.nii.gz"))
    seg = segment(str(img), model=out)
    assert np.asarray(seg.mask.dataobj).shape == (48, 40, 8)

    # exporting the checkpoint again gives the same members (deterministic export), and says so
    out2 = tmp_path / "again"
    assert cli_main(["train", "-data", str(tiny_bids), "-o", str(out2), "-name", "tiny_epi", "-version", "0.0.1",
                     "-from-checkpoint", str(ck)]) == 0
    assert "parity: max abs diff" in capsys.readouterr().out
    assert [m.sha256 for m in load_manifest(out2).members] == [m.sha256 for m in spec.members]


def test_training_is_deterministic(tiny_bids, tmp_path):
    from sct_deepseg_epi.training.data import load_sources
    from sct_deepseg_epi.training.fit import TrainConfig, train_ensemble

    sources, _ = load_sources(tiny_bids)
    cfg = TrainConfig(members=1, n_volumes=6, val_volumes=2, epochs=1, patch=32, workers=1, seed=1)
    a = train_ensemble(sources, cfg)[0].model.state_dict()
    b = train_ensemble(sources, cfg)[0].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tune_from_model_folder(trained, tiny_bids, tmp_path):
    base = trained[0]
    tuned = tmp_path / "tuned"
    assert cli_main(["train", "-data", str(tiny_bids), "-o", str(tuned), "-init-model", str(base),
                     "-members", "1", *TINY]) == 0
    tr = load_manifest(tuned).extra["training"]
    assert tr["init_model"] == str(base) and tr["config"]["freeze_bn"] is True


def test_onnx_round_trip_to_torch(tmp_path):
    from sct_deepseg_epi.training.export import export_onnx, onnx_to_torch, parity
    from sct_deepseg_epi.training.net import NetConfig, UNet

    torch.manual_seed(0)
    m = UNet(NetConfig())
    for mod in m.modules():  # non-trivial BatchNorm statistics, so folding is really tested
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
    m.eval()
    export_onnx(m, tmp_path / "m.onnx", 1, 8)
    assert parity(m, tmp_path / "m.onnx", 1, 8) <= 1e-4
    back = onnx_to_torch(tmp_path / "m.onnx", NetConfig())
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        assert float((back(x) - m(x)).abs().max()) < 1e-4


def test_fine_tune_the_shipped_model_by_name(tiny_bids, tmp_path):
    out = tmp_path / "adapted"
    assert cli_main(["train", "-data", str(tiny_bids), "-o", str(out), "-init-model", "seg_sc_epi",
                     "-members", "3", *TINY]) == 0
    spec = load_manifest(out)
    # each member keeps the network of the shipped member it starts from (0.3.0's differ in width)
    from sct_deepseg_epi.api import load_model

    shipped = [m["config"]["net"]["widths"] for m in load_model("seg_sc_epi").extra["training"]["members"]]
    assert [m["net"]["widths"] for m in spec.extra["training"]["members"]] == shipped
    assert len(set(map(tuple, shipped))) > 1
    assert spec.spacing_mm == (1.0, 1.0) and len(spec.members) == 3
