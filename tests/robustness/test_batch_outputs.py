"""``batch`` never writes over what is not its own, checks its outputs before any work, writes nothing
before a Dask scheduler answers, and redoes a run whose outputs no longer match their checksums."""
from __future__ import annotations

import hashlib
import json

import nibabel as nib
import pytest
from hostile import one_line_error
from test_batch import make_dataset, summary_rows

from sct_deepseg_epi.cli import main

RUN = "sub-01/func/sub-01_task-rest_bold.nii.gz"
MASK = "sub-01/func/sub-01_task-rest_desc-spinalcord_mask.nii.gz"


def _tree(folder) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256: what a refused batch must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_foreign_dataset_description_is_never_overwritten(tiny_model, tmp_path, capsys):
    """``batch outer/sourcedata/raw -o outer`` used to replace the outer dataset's own description."""
    outer = tmp_path / "outer"
    ds = make_dataset(outer / "sourcedata" / "raw", runs=(RUN,), n_volumes=2)
    (outer / "dataset_description.json").write_text(json.dumps({"Name": "Outer study", "BIDSVersion": "1.9.0"}))
    before = _tree(outer)
    assert main(["batch", str(ds), "-o", str(outer), "-model", "tiny"]) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"error: {outer / 'dataset_description.json'}: the description of another dataset")
    assert _tree(outer) == before  # no mask, summary or lock either


def test_our_own_description_is_rewritten(tiny_model, tmp_path, capsys):
    """A description this tool wrote (a rerun, another -o run earlier) is its own to update."""
    ds = make_dataset(tmp_path / "ds", runs=(RUN,), n_volumes=2)
    out = tmp_path / "deriv"
    assert main(["batch", str(ds), "-o", str(out), "-model", "tiny", "-v", "0"]) == 0
    assert main(["batch", str(ds), "-o", str(out), "-model", "tiny", "-v", "0", "-overwrite", "1"]) == 0


def test_a_summary_path_that_is_a_folder_is_refused_before_any_work(tiny_model, tmp_path, capsys):
    """Every run used to be segmented, then an IsADirectoryError traceback and no summary."""
    ds = make_dataset(tmp_path / "ds", runs=(RUN,), n_volumes=2)
    deriv = ds / "derivatives" / "sct_deepseg_epi"
    (deriv / "summary.tsv").mkdir(parents=True)
    assert main(["batch", str(ds), "-model", "tiny"]) == 1
    assert one_line_error(capsys) == (f"error: {deriv / 'summary.tsv'}: is a folder; "
                                      "the batch writes its summary.tsv there")
    assert _tree(deriv) == {}  # no run segmented, no description, no lock


def test_a_damaged_mask_is_redone(tiny_model, tmp_path, capsys):
    """A mask replaced by garbage bytes used to be "skipped (outputs up to date)" and kept."""
    ds = make_dataset(tmp_path / "ds", runs=(RUN,), n_volumes=2)
    deriv = ds / "derivatives" / "sct_deepseg_epi"
    assert main(["batch", str(ds), "-model", "tiny", "-v", "0"]) == 0
    good = (deriv / MASK).read_bytes()
    (deriv / MASK).write_bytes(b"\x00garbage" * 64)
    assert main(["batch", str(ds), "-model", "tiny", "-v", "0"]) == 0
    row = summary_rows(deriv)[RUN]
    assert (row["status"], row["note"]) == ("done", "redone: mask changed since it was written")
    assert (deriv / MASK).read_bytes() == good and nib.load(str(deriv / MASK)).shape[:3] == (40, 36, 6)
    assert main(["batch", str(ds), "-model", "tiny", "-v", "0"]) == 0  # and now it is up to date
    assert summary_rows(deriv)[RUN]["status"] == "skipped"


def test_an_unreachable_scheduler_writes_nothing(tiny_model, tmp_path, capsys):
    """``dataset_description.json`` and the dataset lock used to be written before connecting."""
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    ds = make_dataset(tmp_path / "ds", runs=(RUN,), n_volumes=2)
    before = _tree(ds)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["batch", str(ds), "-model", "tiny", "-scheduler", "tcp://127.0.0.1:1"]) == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in one_line_error(capsys)
    assert not (ds / "derivatives").exists() and _tree(ds) == before


def test_a_mask_path_that_is_a_folder_gets_the_segment_message(tiny_model, tmp_path, capsys):
    """The summary used to show a raw IsADirectoryError naming the run's temporary work folder."""
    ds = make_dataset(tmp_path / "ds", runs=(RUN,), n_volumes=2)
    mask = ds / "derivatives" / "sct_deepseg_epi" / MASK
    mask.mkdir(parents=True)
    assert main(["-i", str(ds / RUN), "-o", str(mask), "-model", "tiny"]) == 1
    segment_line = one_line_error(capsys)
    assert main(["batch", str(ds), "-model", "tiny", "-v", "0"]) == 1
    capsys.readouterr()
    row = summary_rows(ds / "derivatives" / "sct_deepseg_epi")[RUN]
    assert row["status"] == "failed" and f"error: {row['error']}" == segment_line
    assert ".work" not in row["error"] and mask.is_dir()
