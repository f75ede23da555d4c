"""QC reports are outputs like the mask: names that are never paths, no file written over that the run
did not create, no collision with SCT's ``index.html``, and nothing left (folder or lock) by a failed report."""
from __future__ import annotations

import json

import nibabel as nib
import pytest
from conftest import blob_image
from hostile import assert_one_line, fsize_limited, one_line_error, run_cli

from sct_deepseg_epi import qc
from sct_deepseg_epi.cli import main
from sct_deepseg_epi.errors import EpiSegError


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A scratch folder holding in.nii.gz, as the working directory.

    30 thin slices: the QC entry (a mosaic of every slice, ~60 kB) is then larger than the
    disagreement map (~39 kB), so a file size limit between the two fails the report, not the run.
    """
    d = tmp_path / "work"
    d.mkdir()
    nib.save(blob_image(shape=(20, 20, 30), centre=(10, 10), radius=3)[0], str(d / "in.nii.gz"))
    monkeypatch.chdir(d)
    return d


FILE_LIMIT = 45_000  # bytes: the run's maps fit, the QC entry and page do not


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "in.nii.gz")


def _usage_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("flag, value", [
    ("-qc-dataset", ".."), ("-qc-dataset", "/"), ("-qc-dataset", "a/b"), ("-qc-subject", ".."),
    ("-qc-dataset", "x\0y"), ("-qc-subject", "two\nlines"), ("-qc-dataset", "."), ("-qc-subject", ""),
])
def test_qc_names_are_names_not_paths(tiny_model, work, capsys, flag, value):
    """Row 1: `-qc-dataset ..` read every *.json of the QC folder as an entry (KeyError traceback) and left
    `.sct_deepseg_epi_qc/` and a json behind; now refused in one line at parse time, before any work."""
    (work / "qc").mkdir()
    (work / "qc" / "notes.json").write_text('{"mine": 1}')  # a user's file that `..` would have read
    with pytest.raises(SystemExit) as exc:
        main(["-i", "in.nii.gz", "-model", "tiny", "-qc", "qc", flag, value])
    assert exc.value.code == 2
    line = _usage_error(capsys)
    assert flag in line and "not a path" in line
    assert _tree(work) == ["qc", "qc/notes.json"]


def test_qc_never_writes_over_a_users_file(tiny_model, work, capsys):
    """Row 2: `-qc . -qc-dataset .. -qc-subject x` overwrote ./x_in.nii.gz.json, then a traceback."""
    mine = work / "x_in.nii.gz.json"
    mine.write_text("my notes")
    with pytest.raises(SystemExit) as exc:
        main(["-i", "in.nii.gz", "-model", "tiny", "-qc", ".", "-qc-dataset", "..", "-qc-subject", "x"])
    assert exc.value.code == 2 and "-qc-dataset" in _usage_error(capsys)
    assert mine.read_text() == "my notes" and _tree(work) == ["x_in.nii.gz.json"]


def test_qc_page_that_the_program_did_not_write_is_kept(tiny_model, work, capsys):
    """Row 2 (the family): an existing DATASET.html that is not a QC page of this program stays as it was."""
    (work / "qc").mkdir()
    page = work / "qc" / "ds.html"
    page.write_text("<html>my own page</html>")
    assert main(["-i", "in.nii.gz", "-model", "tiny", "-qc", "qc", "-qc-dataset", "ds"]) == 1
    assert "ds.html: exists and is not a QC page of sct_deepseg_epi" in one_line_error(capsys)
    assert page.read_text() == "<html>my own page</html>" and _tree(work) == ["qc", "qc/ds.html"]


def test_qc_entry_of_another_image_under_the_same_file_name_is_kept(tiny_model, work, capsys):
    """Two subjects whose names map to the same entry file ('a b' and 'a_b'): the second is refused, not
    silently put in place of the first one's section."""
    assert main(["-i", "in.nii.gz", "-model", "tiny", "-qc", "qc", "-qc-dataset", "ds", "-qc-subject", "a b",
                 "-v", "0"]) == 0
    entries = list((work / "qc" / ".sct_deepseg_epi_qc" / "ds").glob("*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["subject"] == "a b"
    before = entries[0].read_bytes()
    assert main(["-i", "in.nii.gz", "-o", "other.nii.gz", "-model", "tiny", "-qc", "qc", "-qc-dataset", "ds",
                 "-qc-subject", "a_b"]) == 1
    assert "is not this image's QC entry" in one_line_error(capsys)
    assert entries[0].read_bytes() == before and not (work / "other.nii.gz").exists()


def test_qc_page_never_replaces_scts_index(tiny_model, work, capsys):
    """Row 3: `-qc-dataset index` silently replaced qc/index.html (SCT's QC index)."""
    (work / "qc").mkdir()
    index = work / "qc" / "index.html"
    index.write_text("<html>SCT's QC report</html>")
    assert main(["-i", "in.nii.gz", "-model", "tiny", "-qc", "qc", "-qc-dataset", "index"]) == 1
    assert "SCT's QC report" in one_line_error(capsys)
    assert index.read_text() == "<html>SCT's QC report</html>" and _tree(work) == ["qc", "qc/index.html"]


def test_qc_page_named_index_by_the_folders_is_refused_too(tiny_model, tmp_path, capsys):
    """Row 3: the dataset name taken from the folders (.../index/sub-01/func/bold.nii.gz) cannot collide either."""
    func = tmp_path / "index" / "sub-01" / "func"
    func.mkdir(parents=True)
    nib.save(blob_image()[0], str(func / "bold.nii.gz"))
    assert main(["-i", str(func / "bold.nii.gz"), "-model", "tiny", "-qc", str(tmp_path / "qc")]) == 1
    assert "index.html" in one_line_error(capsys)
    assert not (tmp_path / "qc").exists() and sorted(p.name for p in func.iterdir()) == ["bold.nii.gz"]


def test_qc_library_refuses_paths_as_names(tmp_path):
    """Row 1, API: qc.html_report and qc.report check given names too (the CLI is not the only caller)."""
    nib.save(blob_image()[0], str(tmp_path / "in.nii.gz"))
    for bad in ("..", "../x", "a\nb"):
        with pytest.raises(EpiSegError, match="not a path"):
            qc.html_report(tmp_path / "in.nii.gz", tmp_path / "in.nii.gz", tmp_path / "qc", dataset=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]


@pytest.mark.parametrize("flag", ["-qc-dataset", "-qc-subject"])
def test_qc_names_of_300_characters_leave_nothing(tiny_model, work, capsys, flag):
    """Row 4: a 300-character name failed in one line but left qc/.sct_deepseg_epi_qc/... and a lock."""
    with pytest.raises(SystemExit) as exc:
        main(["-i", "in.nii.gz", "-model", "tiny", "-qc", "qc", flag, "n" * 300])
    assert exc.value.code == 2 and "longer than" in _usage_error(capsys)
    assert _tree(work) == []


def test_qc_name_too_long_from_the_folders_is_refused_before_any_work(tiny_model, tmp_path, capsys):
    """Row 4: a dataset folder whose name fits the file system but not the page's temporary name."""
    func = tmp_path / ("d" * 240) / "sub-01" / "func"
    func.mkdir(parents=True)
    nib.save(blob_image()[0], str(func / "bold.nii.gz"))
    assert main(["-i", str(func / "bold.nii.gz"), "-model", "tiny", "-qc", str(tmp_path / "qc")]) == 1
    assert "choose a shorter name" in one_line_error(capsys)
    assert not (tmp_path / "qc").exists() and sorted(p.name for p in func.iterdir()) == ["bold.nii.gz"]


def test_qc_on_a_full_disk_leaves_no_folder_or_lock(tiny_model, work, model_root):
    """Row 4: the report fails as its page is written (the kernel refuses files over 45 kB: EFBIG, what a
    full disk gives as ENOSPC); no mask, no QC folder, no entries folder, no lock is left."""
    proc = run_cli(["-i", str(work / "in.nii.gz"), "-model", "tiny", "-qc", str(work / "qc"), "-qc-dataset", "ds"],
                   env={"SCT_DEEPSEG_EPI_MODELS": str(model_root)}, preexec_fn=fsize_limited(FILE_LIMIT))
    line = assert_one_line(proc)
    assert "cannot write the QC report" in line and "no output was kept" in line and "File too large" in line
    assert _tree(work) == []


def test_qc_on_a_full_disk_keeps_an_existing_report(tiny_model, work, model_root):
    """Row 4: with a report already there, a failed one leaves the page, the entries and their folder as they were."""
    env = {"SCT_DEEPSEG_EPI_MODELS": str(model_root)}
    ok = run_cli(["-i", str(work / "in.nii.gz"), "-model", "tiny", "-qc", str(work / "qc"), "-qc-dataset", "ds",
                  "-v", "0"], env=env)
    assert ok.returncode == 0, ok.stderr
    before = {p: p.read_bytes() for p in (work / "qc").rglob("*") if p.is_file()}
    proc = run_cli(["-i", str(work / "in.nii.gz"), "-o", str(work / "b.nii.gz"), "-model", "tiny", "-qc",
                    str(work / "qc"), "-qc-dataset", "ds", "-qc-subject", "s2"], env=env,
                   preexec_fn=fsize_limited(FILE_LIMIT))
    assert_one_line(proc)
    assert {p: p.read_bytes() for p in (work / "qc").rglob("*") if p.is_file()} == before
    assert not (work / "b.nii.gz").exists()
