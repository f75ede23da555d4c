"""SCT-style argument parsing: single-dash flags, MANDATORY/OPTIONAL/MISC groups, one-line errors."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 2, like SCT's."""

    def __init__(self, prog: str, description: str, **kw):
        super().__init__(prog=prog, description=description, add_help=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        self.mandatory = self.add_argument_group("MANDATORY ARGUMENTS")
        self.optional = self.add_argument_group("OPTIONAL ARGUMENTS")
        self.misc = self.add_argument_group("MISC ARGUMENTS")
        self.misc.add_argument("-h", "-help", "--help", action="help", help="Show this help message and exit.")
        self.misc.add_argument("-v", metavar="<int>", type=int, choices=(0, 1, 2), default=1,
                               help="Verbosity: 0 = errors only, 1 = normal (default), 2 = debug.")

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} -h)\n")
        raise SystemExit(2)


def yes_no(text: str) -> bool:
    """Parse SCT's 0|1 flags."""
    if text in ("0", "1"):
        return text == "1"
    raise argparse.ArgumentTypeError(f"expected 0 or 1, not {text!r}")


def add_engine_flags(group) -> None:
    """Flags that choose the model and how it runs, shared by the commands that segment."""
    group.add_argument("-model", metavar="<name[@version]>", default="seg_sc_epi",
                       help="Model to use (default: seg_sc_epi, latest version). A model folder also works.")
    group.add_argument("-4d", dest="mode_4d", choices=("mean", "each"), default="mean",
                       help="4D input: segment the temporal mean (mean, 3D mask) or every volume (each, 4D mask).")
    group.add_argument("-tta", metavar="<0|1>", type=yes_no, default=True,
                       help="Flip test-time augmentation (default 1; 0 is faster).")
    group.add_argument("-device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="Where to run (default: auto; cuda needs onnxruntime-gpu).")


def setup_logging(verbosity: int) -> None:
    level = {0: logging.ERROR, 1: logging.INFO, 2: logging.DEBUG}[verbosity]
    root = logging.getLogger("sct_deepseg_epi")
    root.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity < 2
                                           else "%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
