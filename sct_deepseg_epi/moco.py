"""SCT's two motion corrections as ``fmri-pipeline`` drives them: flags, outputs, DL weights.

``sct_fmri_moco`` (ANTs, slice-wise) takes a mask that limits the registration metric and
writes ``BOLD_moco.nii.gz``, ``BOLD_moco_mean.nii.gz`` and ``moco_params.tsv``.

``sct_fmri_moco -dl`` (SCT 7.4) predicts in-plane translations slice by slice with a DenseNet
that sees only the image inside the mask (it normalises and zeroes everything outside it). It
requires ``-m``, refuses ``-g -x -param -bvalmin``, needs axial slices along the image's third
axis, and writes ``BOLD_mocoDL.nii.gz``, ``BOLD_mocoDL_mean.nii.gz``, ``moco_params_x.nii.gz``
and ``moco_params_y.nii.gz``. Its weights are read from ``data/moco-dl_models/fmri.ckpt`` in
SCT's install folder, which SCT derives from where its own package lies (no environment
variable), so :func:`sct_install_dir` asks the Python that runs ``sct_fmri_moco``.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

KINDS = ("ants", "dl")
MOCO_TOOL = "sct_fmri_moco"
DL_REFUSED = ("-g", "-x", "-param", "-bvalmin")  # sct_fmri_moco -dl stops on any of these
DL_WEIGHTS = ("data", "moco-dl_models", "fmri.ckpt")  # relative to SCT's install folder
DL_DOWNLOAD = "sct_download_data -d moco-dl_models"
_PROBE = "from spinalcordtoolbox.utils.sys import __sct_dir__; print(__sct_dir__)"


@dataclass(frozen=True)
class MocoOutputs:
    """What one kind of ``sct_fmri_moco`` writes into its output folder."""

    moco: Path
    mean: Path
    params: tuple[Path, ...]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown motion correction {kind!r} (choose from {', '.join(KINDS)})")
    return kind


def outputs(kind: str, folder: Path, stem: str) -> MocoOutputs:
    """SCT's names for the outputs of ``sct_fmri_moco -i <stem>.nii.gz -ofolder folder``."""
    if check_kind(kind) == "dl":
        return MocoOutputs(folder / f"{stem}_mocoDL.nii.gz", folder / f"{stem}_mocoDL_mean.nii.gz",
                           (folder / "moco_params_x.nii.gz", folder / "moco_params_y.nii.gz"))
    return MocoOutputs(folder / f"{stem}_moco.nii.gz", folder / f"{stem}_moco_mean.nii.gz", (folder / "moco_params.tsv",))


def command(kind: str, bold: Path, mask: Path, folder: Path, extra: Sequence[str] = ()) -> list[str]:
    """The ``sct_fmri_moco`` command line; ``extra`` are QC flags, which both kinds accept."""
    cmd = [MOCO_TOOL, "-i", str(bold), "-m", str(mask), "-ofolder", str(folder)]
    if check_kind(kind) == "dl":
        cmd.append("-dl")
    cmd += list(extra)
    refused = [a for a in cmd if a in DL_REFUSED]
    if kind == "dl" and refused:  # SCT's check_dl_args looks at the raw arguments the same way
        raise ValueError(f"sct_fmri_moco -dl refuses {', '.join(refused)}")
    return cmd


def sct_python(tool: str = MOCO_TOOL) -> list[str] | None:
    """The interpreter (with its arguments) named on the first line of SCT's ``tool`` script."""
    path = shutil.which(tool)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            first = f.readline(4096).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = shlex.split(first[2:])
    # only a Python is asked (a shell wrapper would be handed Python code)
    return words if any(Path(w).name.startswith("python") for w in words) else None


def sct_install_dir(tool: str = MOCO_TOOL) -> Path | None:
    """SCT's install folder as the Python running ``tool`` sees it (None if it cannot say)."""
    python = sct_python(tool)
    if python is None:
        return None
    try:
        proc = subprocess.run(python + ["-c", _PROBE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.strip().splitlines()
    return Path(lines[-1]) if proc.returncode == 0 and lines else None


def dl_weights_path(tool: str = MOCO_TOOL) -> Path | None:
    """Where ``sct_fmri_moco -dl`` reads its fMRI checkpoint; None if SCT cannot be asked."""
    root = sct_install_dir(tool)
    if root is None and os.environ.get("SCT_DIR"):
        root = Path(os.environ["SCT_DIR"])
    return root.joinpath(*DL_WEIGHTS) if root is not None else None


def missing_dl_weights(tool: str = MOCO_TOOL) -> str | None:
    """A one-line message when the DL weights are absent, else None.

    When SCT's folder cannot be found the check is left to SCT, whose own error names the
    same download command.
    """
    path = dl_weights_path(tool)
    if path is None:
        log.warning("could not ask SCT where its moco-dl weights are; %s will say if they are missing", tool)
        return None
    if path.is_file():
        return None
    return (f"deep-learning motion correction needs SCT's moco-dl weights, and {path} is missing: "
            f"run {DL_DOWNLOAD} (or use -moco ants)")
