"""``fmri-pipeline -ofolder``: every check before a folder is made, no level of a new path left
behind, and a folder that cannot be made is one line."""
from __future__ import annotations

from hostile import one_line_error, readonly_dir  # noqa: F401 (fixture)
from test_handoff import fake_sct, pam50, series  # noqa: F401 (fixtures: fake SCT tools, PAM50)

from sct_deepseg_epi.cli import main


def test_failed_name_check_leaves_no_level_of_a_new_path(fake_sct, pam50, series, tmp_path, capsys):
    """``-ofolder a/b/c`` with a 242-byte input name: ``a/`` and ``a/b/`` used to stay."""
    long_input = series.parent / ("f" * 235 + ".nii.gz")  # 242 bytes: its outputs' names are too long
    series.rename(long_input)
    root = tmp_path / "a"
    assert main(["fmri-pipeline", "-i", str(long_input), "-ofolder", str(root / "b" / "c"), "-model", "tiny",
                 "-template", str(pam50)]) == 1
    assert "file name is" in one_line_error(capsys)
    assert not root.exists() and not fake_sct.exists()


def test_existing_levels_are_kept(fake_sct, pam50, series, tmp_path, capsys):
    """Only the folders this run made are removed: an existing ``a/`` (and what it holds) stays."""
    long_input = series.parent / ("f" * 235 + ".nii.gz")
    series.rename(long_input)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    assert main(["fmri-pipeline", "-i", str(long_input), "-ofolder", str(tmp_path / "a" / "b" / "c"),
                 "-model", "tiny", "-template", str(pam50)]) == 1
    one_line_error(capsys)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.txt"]


def test_read_only_output_folder_is_one_line(fake_sct, pam50, series, readonly_dir, capsys):
    """``-ofolder ro/out`` on a read-only mount used to end in an OSError traceback."""
    out = readonly_dir / "out"
    assert main(["fmri-pipeline", "-i", str(series), "-ofolder", str(out), "-model", "tiny",
                 "-template", str(pam50)]) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"error: {out}: ") and "not writable" in line
    assert not out.exists() and not fake_sct.exists()
