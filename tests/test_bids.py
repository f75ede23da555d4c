"""BIDS discovery, derivative names and resume records (no images are read here)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sct_deepseg_epi import bids
from sct_deepseg_epi.errors import InputError


def touch(root: Path, rel: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    touch(root, "sub-01/func/sub-01_task-rest_bold.nii.gz")
    touch(root, "sub-01/func/sub-01_task-rest_bold.json")           # sidecar: not a run
    touch(root, "sub-01/func/sub-01_task-motor_run-2_bold.nii")      # uncompressed is fine
    touch(root, "sub-01/func/sub-01_task-rest_sbref.nii.gz")         # not BOLD
    touch(root, "sub-02/ses-1/func/sub-02_ses-1_task-rest_bold.nii.gz")
    touch(root, "sub-02/ses-2/func/sub-02_ses-2_task-rest_echo-1_bold.nii.gz")
    touch(root, "sub-02/ses-2/func/.sub-02_ses-2_task-rest_bold.nii.gz")  # hidden: ignored
    touch(root, "sub-03/anat/sub-03_T2w.nii.gz")                    # no func/
    touch(root, "sub-04/func/sub-04_task rest_bold.nii.gz")          # malformed name
    touch(root, "sub-05/func/sub-99_task-rest_bold.nii.gz")          # entities disagree with folder
    touch(root, "derivatives/x/sub-01/func/sub-01_task-rest_bold.nii.gz")  # not a subject
    (root / "dataset_description.json").write_text(json.dumps({"Name": "Demo", "BIDSVersion": "1.9.0"}))
    return root


def test_parse_bold_name():
    assert bids.parse_bold_name("sub-01_ses-a_task-rest_run-1_bold.nii.gz") == (
        ("sub", "01"), ("ses", "a"), ("task", "rest"), ("run", "1"))
    assert bids.parse_bold_name("sub-01_bold.nii") == (("sub", "01"),)
    for bad in ("sub-01_task-rest_sbref.nii.gz", "task-rest_sub-01_bold.nii.gz", "sub-01_task_bold.nii.gz",
                "sub-01_sub-02_bold.nii.gz", "sub-01_bold.mgz", "bold.nii.gz"):
        with pytest.raises(ValueError):
            bids.parse_bold_name(bad)


def test_find_runs_layout_and_notes(dataset):
    found = bids.find_runs(dataset)
    assert [r.rel for r in found.runs] == [
        "sub-01/func/sub-01_task-motor_run-2_bold.nii",
        "sub-01/func/sub-01_task-rest_bold.nii.gz",
        "sub-02/ses-1/func/sub-02_ses-1_task-rest_bold.nii.gz",
        "sub-02/ses-2/func/sub-02_ses-2_task-rest_echo-1_bold.nii.gz",
    ]
    r = found.runs[3]
    assert (r.subject, r.session, r.task, r.stem, r.folder) == (
        "02", "2", "rest", "sub-02_ses-2_task-rest_echo-1", "sub-02/ses-2/func")
    assert r.path == dataset.resolve() / r.rel
    assert found.description == {"Name": "Demo", "BIDSVersion": "1.9.0"}
    notes = "\n".join(found.notes)
    assert "sub-03: no func/ folder; skipped" in notes
    assert "sub-04/func/sub-04_task rest_bold.nii.gz: skipped" in notes
    assert "sub-05/func/sub-99_task-rest_bold.nii.gz: skipped (its entities do not match its folder)" in notes


def test_filters_accept_both_spellings(dataset):
    found = bids.find_runs(dataset, participants=["sub-02"], tasks=["rest"])
    assert [r.subject for r in found.runs] == ["02", "02"]
    found = bids.find_runs(dataset, sessions=["ses-2"])
    assert [r.rel for r in found.runs] == ["sub-02/ses-2/func/sub-02_ses-2_task-rest_echo-1_bold.nii.gz"]
    with pytest.raises(InputError, match="no BOLD runs found for session\\(s\\) 3"):
        bids.find_runs(dataset, sessions=["3"])
    found = bids.find_runs(dataset, participants=["01", "02"], tasks=["task-motor"])
    assert [r.rel for r in found.runs] == ["sub-01/func/sub-01_task-motor_run-2_bold.nii"]


def test_unknown_participant_or_task_is_refused(dataset):
    with pytest.raises(InputError, match="no participant.*07"):
        bids.find_runs(dataset, participants=["07"])
    with pytest.raises(InputError, match="no BOLD runs found for task"):
        bids.find_runs(dataset, tasks=["nback"])


def test_missing_description_is_a_note_not_an_error(dataset):
    (dataset / "dataset_description.json").unlink()
    found = bids.find_runs(dataset)
    assert len(found.runs) == 4 and found.description is None
    assert "no dataset_description.json" in found.notes[0]
    (dataset / "dataset_description.json").write_text("{not json")
    assert "unreadable" in bids.find_runs(dataset).notes[0]


def test_not_a_dataset(tmp_path):
    with pytest.raises(InputError, match="no such dataset folder"):
        bids.find_runs(tmp_path / "absent")
    with pytest.raises(InputError, match="no sub-\\* folders"):
        bids.find_runs(tmp_path)
    touch(tmp_path, "sub-01/anat/sub-01_T2w.nii.gz")
    with pytest.raises(InputError, match="no BOLD runs found"):
        bids.find_runs(tmp_path)


def test_derivative_names(dataset, tmp_path):
    run = bids.find_runs(dataset, participants=["02"]).runs[0]
    out = bids.outputs_for(run, tmp_path / "d")
    base = tmp_path / "d/sub-02/ses-1/func/sub-02_ses-1_task-rest_desc-spinalcord"
    assert out.mask == Path(f"{base}_mask.nii.gz")
    assert out.sidecar == Path(f"{base}_mask.json")
    assert out.soft == Path(f"{base}_probseg.nii.gz")
    assert out.disagreement == Path(f"{base}_disagreement.nii.gz")
    assert out.lock.parent == out.folder and out.lock.name.startswith(".")
    assert out.extras(True, False) == {"soft": out.soft}
    assert bids.bids_uri(run) == "bids:raw:sub-02/ses-1/func/sub-02_ses-1_task-rest_bold.nii.gz"
    # an uncompressed source still gets a compressed mask
    run = bids.find_runs(dataset, tasks=["motor"]).runs[0]
    assert bids.outputs_for(run, tmp_path).mask.name == "sub-01_task-motor_run-2_desc-spinalcord_mask.nii.gz"


def test_dataset_description_links(tmp_path):
    model = bids.model_record("m", "1.0.0", [("a.onnx", "ab" * 32)])
    src = tmp_path / "ds"
    d = bids.dataset_description(src, bids.default_derivatives(src), model, "9.9", {"Name": "Demo", "DatasetDOI": "doi:1"})
    assert d["DatasetType"] == "derivative" and d["Name"] == "Spinal cord masks of Demo"
    gen = d["GeneratedBy"][0]
    assert (gen["Name"], gen["Version"]) == ("sct_deepseg_epi", "9.9")
    assert gen["Model"]["Members"] == [{"File": "a.onnx", "SHA256": "ab" * 32}]
    assert d["DatasetLinks"]["raw"] == "../.."           # relative inside the dataset
    assert d["SourceDatasets"][0]["DOI"] == "doi:1"
    d = bids.dataset_description(src, tmp_path / "elsewhere", model, "9.9", None)
    assert d["DatasetLinks"]["raw"] == src.resolve().as_uri()  # absolute outside it


def test_is_up_to_date_reasons(tmp_path):
    run = bids.Run(tmp_path / "x_bold.nii.gz", "sub-01/func/sub-01_bold.nii.gz", (("sub", "01"),))
    out = bids.outputs_for(run, tmp_path)
    key = bids.resume_key({"Name": "m", "Version": "1"}, {"threshold": None})
    assert bids.is_up_to_date(out, "abc", key, []) == (False, "no sidecar")
    out.folder.mkdir(parents=True)
    out.sidecar.write_text(json.dumps({"Batch": {"input_sha256": "abc", **key}}))
    assert bids.is_up_to_date(out, "abc", key, []) == (False, "mask missing")
    out.mask.write_bytes(b"m")
    assert bids.is_up_to_date(out, "abc", key, []) == (False, "no output checksums in the sidecar")
    sums = {"mask": hashlib.sha256(b"m").hexdigest()}
    out.sidecar.write_text(json.dumps({"Batch": {"input_sha256": "abc", "outputs_sha256": sums, **key}}))
    assert bids.is_up_to_date(out, "abc", key, []) == (True, "up to date")
    assert bids.is_up_to_date(out, "abd", key, []) == (False, "input changed")
    assert bids.is_up_to_date(out, "abc", bids.resume_key({"Name": "m", "Version": "2"}, {"threshold": None}), [])[1] == "model changed"
    assert bids.is_up_to_date(out, "abc", bids.resume_key(key["model"], {"threshold": 0.3}), [])[1] == "settings changed"
    assert bids.is_up_to_date(out, "abc", key, ["soft"]) == (False, "soft map missing")
    out.sidecar.write_text("{")
    assert bids.is_up_to_date(out, "abc", key, []) == (False, "sidecar unreadable")
