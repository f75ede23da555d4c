"""Command-line entry point: ``sct_deepseg_epi [COMMAND] ...``.

Without a command name the arguments go to segmentation (SCT's ``-i IN`` style); a
command name as the first argument picks a sub-tool. Each sub-tool is a module with
``get_parser()`` and ``main(argv)``; only the chosen one is imported, so ``-h`` is fast.
Library errors (EpiSegError) become one line on stderr and exit status 1.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

# command name -> module (relative to this package) and one-line summary
COMMANDS: dict[str, tuple[str, str]] = {
    "segment": (".segment", "segment a 3D or 4D EPI image (the default command)"),
    "demo": (".demo", "build a synthetic EPI phantom, segment it and print the Dice"),
    "train": (".train", "train or fine-tune a model on labelled data and export it"),
    "evaluate": (".evaluate", "compare predicted masks with reference masks"),
    "batch": (".batch", "segment every BOLD run of a BIDS dataset"),
    "import-nnunet": (".import_nnunet", "convert an nnUNet v2 model to an ONNX model of this engine"),
    "moco-mask": (".moco_mask", "build the cylinder mask that sct_fmri_moco -m expects"),
    "fmri-pipeline": (".fmri_pipeline", "mean -> segmentation -> moco -> PAM50 registration with SCT"),
}


def commands_epilog() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "commands (sct_deepseg_epi COMMAND -h for each):\n" + "\n".join(lines)


def call(main_fn: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Call a command's main(), turning library errors into one line and exit 1."""
    from ..errors import EpiSegError

    try:
        return int(main_fn(argv) or 0)
    except EpiSegError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def run(module: str, argv: list[str]) -> int:
    """Run one command module's main() through :func:`call`."""
    return call(importlib.import_module(module, __name__).main, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return run(COMMANDS[args[0]][0], args[1:])
    return run(COMMANDS["segment"][0], args)
