"""``-version`` / ``--version``: the package, the default model and ONNX Runtime; one version, in one place."""
from __future__ import annotations

import re
from pathlib import Path

import onnxruntime as ort
import pytest

import sct_deepseg_epi
from sct_deepseg_epi.cli import COMMANDS, main
from sct_deepseg_epi.registry import store

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv", [["-version"], ["--version"], ["-v", "2", "-version"], ["batch", "-version"],
                                  ["evaluate", "--version"]])
def test_version_prints_package_model_and_runtime(argv, capsys):
    """``-v`` used to swallow ``-version`` ("-v ersion": invalid choice, exit 2)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sct_deepseg_epi {sct_deepseg_epi.__version__}"
    assert out[1] == f"default model: {store.resolve(store.DEFAULT_MODEL).ref}"
    assert out[2].startswith(f"onnxruntime {ort.__version__} (providers: ")
    assert "CPUExecutionProvider" in out[2]


def test_v_keeps_its_meaning(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-v", "5"])
    assert exc.value.code == 2 and "argument -v: invalid choice: 5" in capsys.readouterr().err


def test_changelog_top_section_is_the_package_version():
    """The release is cut in CHANGELOG.md and __init__.py together (setup.cfg reads __version__)."""
    top = next(line for line in (REPO / "CHANGELOG.md").read_text().splitlines() if line.startswith("## "))
    m = re.fullmatch(r"## (\S+) - (\d{4}-\d{2}-\d{2})", top)
    assert m, f"the top section {top!r} is not '## VERSION - YYYY-MM-DD'"
    assert m.group(1) == sct_deepseg_epi.__version__
    assert "version = attr: sct_deepseg_epi.__version__" in (REPO / "setup.cfg").read_text()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_parser_builds_with_its_own_version_meaning(command):
    """``train`` and ``import-nnunet`` keep ``-version`` for the model they write; the others print the package's."""
    import importlib

    parser = importlib.import_module(COMMANDS[command][0], "sct_deepseg_epi.cli").get_parser()
    action = next(a for a in parser._actions if "-version" in a.option_strings)
    assert ("--version" in action.option_strings) == (command not in ("train", "import-nnunet"))
