"""Training orchestration: checkpoints are read without running code."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sct_deepseg_epi.errors import ModelError  # noqa: E402
from sct_deepseg_epi.training.fit import TrainConfig  # noqa: E402
from sct_deepseg_epi.training.pipeline import load_checkpoint  # noqa: E402


class _Payload:
    def __reduce__(self):  # unpickling would call print(): a stand-in for arbitrary code
        return (print, ("code ran",))


def test_checkpoints_round_trip_with_their_configuration(tmp_path):
    ck = {"cfg": TrainConfig(epochs=2), "states": [{"w": torch.ones(2)}], "members": [], "seconds": 1.0,
          "device": "cpu", "command": "x"}
    torch.save(ck, tmp_path / "ck.pt")
    back = load_checkpoint(tmp_path / "ck.pt")
    assert back["cfg"] == TrainConfig(epochs=2) and torch.equal(back["states"][0]["w"], torch.ones(2))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    torch.save({"cfg": _Payload()}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="cannot load this checkpoint safely"):
        load_checkpoint(tmp_path / "bad.pt")
    assert "code ran" not in capsys.readouterr().out
