"""Hand-off of the cord mask to SCT's motion correction and PAM50 normalisation.

Functions take paths and return paths, so a lab can call them from its own pipeline:

- :func:`moco_mask` (from :mod:`sct_deepseg_epi.mocomask`) builds the mask ``sct_fmri_moco -m``
  wants: a cylinder around the cord for the ANTs correction, or the cord itself grown by a
  margin for ``-dl``.
- :func:`fmri_pipeline` runs, with SCT's tools: temporal mean -> segmentation -> moco mask
  -> ``sct_fmri_moco`` (ANTs, or ``-dl``) -> segmentation of the motion-corrected mean -> registration of the
  PAM50 template onto it (``sct_register_multimodal``: ``type=seg`` steps then a refinement
  on the image, optionally initialised with anatomical warps) -> ``sct_warp_template``.
  A step is skipped when its outputs are newer than its inputs; every command is logged in
  ``fmri_pipeline.log`` next to the outputs, which follow SCT's names.

Errors are :class:`HandoffError` (an EpiSegError) naming the step and, for an SCT command,
the command line and the command's own message. A failed step removes what it wrote, so a
re-run never mistakes a partial output for a finished one; earlier outputs stay.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib

from . import moco as sct_moco
from .errors import EpiSegError, InputError
from .mocomask import (DEFAULT_CORD_MARGIN_MM, DEFAULT_DIAMETER_MM, MASK_KINDS, check_same_grid,  # noqa: F401
                       cord_centreline, cord_mask, cylinder, default_mask_path, dilate_in_plane, moco_mask,
                       slice_axis)
from .outputs import check_folder, check_outputs, make_folders, refuse_nesting, refuse_overwrite, remove_folders
from .read import load_nifti, strip_nifti_suffix

log = logging.getLogger(__name__)

# PAM50 -> moco mean: align the cords slice by slice, deform along the cord, then refine on the image
DEFAULT_REG_PARAM = ("step=1,type=seg,algo=centermass:"
                     "step=2,type=seg,algo=bsplinesyn,metric=MeanSquares,iter=3,smooth=1,slicewise=0:"
                     "step=3,type=im,algo=syn,metric=CC,iter=3,slicewise=0")
SCT_TOOLS = ("sct_maths", "sct_fmri_moco", "sct_register_multimodal", "sct_warp_template")
LOG_NAME = "fmri_pipeline.log"


class HandoffError(EpiSegError):
    """A hand-off step failed; the message names the step (and the command and its message)."""


# --- the pipeline -----------------------------------------------------------------------------

@dataclass
class PipelineOutputs:
    """Paths written by :func:`fmri_pipeline` (SCT's names, in the output folder)."""

    mean: Path
    mean_seg: Path
    mask: Path
    moco: Path
    moco_mean: Path
    moco_params: Path
    moco_mean_seg: Path
    warp_template2fmri: Path
    warp_fmri2template: Path
    template_reg: Path
    levels: Path
    log: Path
    moco_params_y: Path | None = None  # -moco dl: moco_params is moco_params_x.nii.gz, this the y shifts
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def find_template(template: Path | str | None = None) -> Path:
    """The PAM50 folder: ``template`` if given, else ``$SCT_DIR/data/PAM50``."""
    if template is not None:
        return Path(template)
    from .registry.store import sct_dir

    root = sct_dir() or (Path(os.environ["SCT_DIR"]) if os.environ.get("SCT_DIR") else None)
    if root is None and shutil.which("sct_maths"):
        root = Path(shutil.which("sct_maths")).resolve().parent.parent  # $SCT_DIR/bin/sct_maths
    return (root or Path(".")) / "data" / "PAM50"


def check_sct(tools: Sequence[str] = SCT_TOOLS) -> None:
    """Raise HandoffError at once, naming the first SCT tool that is not on PATH."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise HandoffError(f"fmri-pipeline needs the Spinal Cord Toolbox: {tool} is not on PATH "
                               "(install SCT, https://spinalcordtoolbox.com, or activate its environment)")


def _newer(outputs: Sequence[Path], inputs: Sequence[Path]) -> bool:
    if not all(p.exists() for p in outputs):
        return False
    newest_input = max((p.stat().st_mtime_ns for p in inputs if p.exists()), default=0)
    return min(p.stat().st_mtime_ns for p in outputs) >= newest_input


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:|$)")


def _command_message(output: str) -> str:
    """The line of a command's output that explains its failure (SCT prints a lot before it)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    if not lines:
        return "no output"
    if any(ln.startswith("Traceback") for ln in lines):
        # the exception and its message; SCT's launcher prints "Total runtime" after it, and a
        # message that starts with a newline (moco_dl's missing weights) is on the next line
        exc = [i for i, ln in enumerate(lines) if _EXCEPTION_LINE.match(ln)]
        if not exc:
            return lines[-1]
        i = exc[-1]
        head = lines[i]
        if head.endswith(":") and i + 1 < len(lines) and "Total runtime" not in lines[i + 1]:
            head = f"{head} {lines[i + 1]}"
        return head
    errors = [ln for ln in lines if "error" in ln.lower()]
    return errors[-1] if errors else lines[-1]


class _Steps:
    """Runs steps in order: skip if up to date, log, and clean up after a failure."""

    def __init__(self, folder: Path, force: bool, run_command: Callable[..., subprocess.CompletedProcess]):
        self.folder = folder
        self.force = force
        self.run_command = run_command
        self.log_path = folder / LOG_NAME
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def note(self, text: str) -> None:
        log.info("%s", text)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}\n")

    def step(self, name: str, inputs: Sequence[Path], outputs: Sequence[Path], action: Callable[[], None]) -> None:
        if not self.force and _newer(outputs, inputs):
            self.note(f"step '{name}': up to date, skipped ({', '.join(p.name for p in outputs)})")
            self.skipped.append(name)
            return
        self.note(f"step '{name}': running")
        start = time.time() - 1.0
        try:
            action()
        except BaseException as exc:
            for p in outputs:  # a partial output must not pass for a finished one next time
                if p.exists() and p.stat().st_mtime >= start:
                    p.unlink()
            if isinstance(exc, EpiSegError) and not isinstance(exc, HandoffError):
                raise HandoffError(f"step '{name}': {exc}") from None
            raise
        missing = [p.name for p in outputs if not p.exists()]
        if missing:
            raise HandoffError(f"step '{name}' finished but did not write {', '.join(missing)}")
        self.ran.append(name)

    def sct(self, name: str, cmd: list[str]) -> None:
        line = shlex.join(cmd)
        self.note(f"$ {line}")
        proc = self.run_command(cmd, cwd=self.folder)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(proc.stdout or "")
            f.write(f"[exit status {proc.returncode}]\n")
        if proc.returncode != 0:
            raise HandoffError(f"step '{name}' failed: `{line}` exited with status {proc.returncode}: "
                               f"{_command_message(proc.stdout or '')} (full output in {self.log_path})")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def fmri_pipeline(bold: Path | str, ofolder: Path | str | None = None, *, seg: Path | str | None = None,
                  model: str | Path = "seg_sc_epi", options=None, template: Path | str | None = None,
                  initwarp: Path | str | None = None, initwarpinv: Path | str | None = None,
                  diameter_mm: float = DEFAULT_DIAMETER_MM, param: str = DEFAULT_REG_PARAM,
                  moco: str = "ants", margin_mm: float = DEFAULT_CORD_MARGIN_MM,
                  qc: Path | str | None = None, qc_dataset: str | None = None, qc_subject: str | None = None,
                  force: bool = False,
                  run_command: Callable[..., subprocess.CompletedProcess] = _run) -> PipelineOutputs:
    """Motion-correct an fMRI series and register PAM50 to it, with SCT's tools and our masks.

    ``seg``: a cord mask of the series' temporal mean to use instead of segmenting it.
    ``options``: :class:`sct_deepseg_epi.api.Options` for both segmentations.
    ``template``: the PAM50 folder (default ``$SCT_DIR/data/PAM50``); ``initwarp`` and
    ``initwarpinv``: the subject's template->anatomy and anatomy->template warps, which
    initialise the registration (strongly advised: without them the template is placed by
    the image headers alone). ``qc``: a folder for SCT's QC report of each step.
    ``moco``: ``"ants"`` (``sct_fmri_moco`` with the cylinder mask of ``diameter_mm``) or
    ``"dl"`` (``sct_fmri_moco -dl`` with the cord mask grown by ``margin_mm``, see
    :func:`cord_mask`; SCT's outputs are then ``*_mocoDL*`` and ``moco_params_{x,y}.nii.gz``).
    ``force``: run every step even when its outputs are up to date.

    Raises, before any step runs: HandoffError for a missing SCT tool, template file or
    (``moco="dl"``) DL weights, InputError for an unusable input, ModelError for a model that cannot be loaded; then
    HandoffError naming the step that failed.
    """
    from . import api

    if moco not in sct_moco.KINDS:
        raise InputError(f"unknown motion correction {moco!r} (choose from {', '.join(sct_moco.KINDS)})")
    if moco == "dl" and not margin_mm >= 0:
        raise InputError(f"the cord mask margin must be zero or positive, not {margin_mm} mm")
    check_sct()
    if moco == "dl":
        missing = sct_moco.missing_dl_weights()
        if missing:
            raise HandoffError(missing)
    bold = Path(bold).resolve()
    if not bold.is_file():
        raise InputError(f"{bold}: no such file")
    img = load_nifti(bold)
    if img.ndim != 4 or img.shape[3] < 2:
        raise InputError(f"{bold}: motion correction needs a 4D series (shape {img.shape})")
    if moco == "dl" and nib.aff2axcodes(img.affine)[2] not in ("S", "I"):
        raise InputError(f"{bold}: sct_fmri_moco -dl needs axial slices along the third voxel axis, and this "
                         f"series is stored {''.join(nib.aff2axcodes(img.affine))} (reorient it with "
                         "sct_image -setorient, or use -moco ants)")
    folder = Path(ofolder).resolve() if ofolder is not None else bold.parent
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: the output folder is a file")
    pam50 = find_template(template)
    tpl = {k: pam50 / "template" / f"PAM50_{k}.nii.gz" for k in ("t2s", "cord", "levels")}
    for path in list(tpl.values()) + [pam50 / "template" / "info_label.txt"]:
        if not path.is_file():
            raise HandoffError(f"the PAM50 template is incomplete: {path} is missing (run sct_download_data -d PAM50, "
                               "or give the template folder with -template)")
    warps = [Path(w).resolve() for w in (initwarp, initwarpinv) if w is not None]
    if (initwarp is None) != (initwarpinv is None):
        raise InputError("-initwarp and -initwarpinv go together (template->anatomy and anatomy->template warps)")
    for w in warps:
        if not w.is_file():
            raise InputError(f"{w}: no such file")
    if seg is not None:
        seg = Path(seg).resolve()
        check_same_grid(load_nifti(seg), str(seg), img, str(bold))
    stem = Path(strip_nifti_suffix(bold.name)).name
    mask_kind = "cord" if moco == "dl" else "cylinder"
    moco_out = sct_moco.outputs(moco, folder, stem)
    out = PipelineOutputs(
        mean=folder / f"{stem}_mean.nii.gz", mean_seg=seg or folder / f"{stem}_mean_seg.nii.gz",
        mask=default_mask_path(folder / bold.name, mask_kind), moco=moco_out.moco,
        moco_mean=moco_out.mean, moco_params=moco_out.params[0],
        moco_params_y=moco_out.params[1] if len(moco_out.params) > 1 else None,
        moco_mean_seg=folder / f"{strip_nifti_suffix(moco_out.mean.name)}_seg.nii.gz",
        warp_template2fmri=folder / "warp_template2fmri.nii.gz", warp_fmri2template=folder / "warp_fmri2template.nii.gz",
        template_reg=folder / "PAM50_t2s_reg.nii.gz", levels=folder / "label" / "template" / "PAM50_levels.nii.gz",
        log=folder / LOG_NAME)
    # every file a step writes, against every input, before the folder is made or a step runs
    written = {f.name: getattr(out, f.name) for f in fields(out)
               if isinstance(getattr(out, f.name), Path) and not (f.name == "mean_seg" and seg is not None)}
    inputs = [bold, seg, *warps, *tpl.values()]
    refuse_overwrite(written, inputs)
    # sct_warp_template writes a whole copy of the template under label/
    refuse_nesting(folder / "label", inputs, role="template copy (label/)")
    if qc:
        check_folder(qc, inputs, role="QC folder")
    check_folder(folder, inputs)  # a read-only or file ancestor: one line, before any folder is made
    made = make_folders(folder)
    try:
        check_outputs({k: v for k, v in written.items() if k != "levels"})
        # an unknown model stops here, before any step; after the checks, so that a refused
        # output costs no model download
        spec = api.load_model(model)
    except BaseException:
        remove_folders(made)  # a failed check leaves no new folder behind, at any level
        raise
    model_file = spec.directory / "manifest.json"  # a new model version makes the segmentations stale
    options = options or api.Options()
    steps = _Steps(folder, force, run_command)
    qc_args = ["-qc", str(Path(qc).resolve())] if qc else []
    qc_args += (["-qc-dataset", qc_dataset] if qc and qc_dataset else []) + (["-qc-subject", qc_subject] if qc and qc_subject else [])
    steps.note(f"fmri-pipeline: {bold} -> {folder}")

    def segment(src: Path, dst: Path) -> Callable[[], None]:
        def action():
            steps.note(f"$ sct_deepseg_epi -i {src} -o {dst} -model {spec.ref}")
            if api.run(src, dst, model=spec, options=options).provenance["cord_voxels"] == 0:
                raise InputError(f"no spinal cord found in {src.name}; check the image (or give a corrected "
                                 "mask of the temporal mean with -s)")
        return action

    steps.step("temporal mean", [bold], [out.mean],
               lambda: steps.sct("temporal mean", ["sct_maths", "-i", str(bold), "-mean", "t", "-o", str(out.mean)]))
    if seg is None:
        steps.step("segmentation", [out.mean, model_file], [out.mean_seg], segment(out.mean, out.mean_seg))
    steps.step("moco mask", [bold, out.mean_seg], [out.mask],
               lambda: moco_mask(bold, out.mean_seg, out.mask, diameter_mm, kind=mask_kind, margin_mm=margin_mm))
    moco_qc = qc_args + (["-qc-seg", str(out.mean_seg)] if qc else [])
    moco_cmd = sct_moco.command(moco, bold, out.mask, folder, moco_qc)
    steps.step("motion correction", [bold, out.mask], [out.moco, out.moco_mean, *moco_out.params],
               lambda: steps.sct("motion correction", moco_cmd))
    steps.step("segmentation of the moco mean", [out.moco_mean, model_file], [out.moco_mean_seg],
               segment(out.moco_mean, out.moco_mean_seg))
    reg_cmd = ["sct_register_multimodal", "-i", str(tpl["t2s"]), "-iseg", str(tpl["cord"]), "-d", str(out.moco_mean),
               "-dseg", str(out.moco_mean_seg), "-param", param, "-o", str(out.template_reg),
               "-owarp", str(out.warp_template2fmri), "-owarpinv", str(out.warp_fmri2template), "-ofolder", str(folder)]
    if warps:
        reg_cmd += ["-initwarp", str(warps[0]), "-initwarpinv", str(warps[1])]
    else:
        steps.note("no -initwarp/-initwarpinv: the template starts where the image headers put it")
    steps.step("template registration", [out.moco_mean, out.moco_mean_seg, tpl["t2s"], tpl["cord"], *warps],
               [out.template_reg, out.warp_template2fmri, out.warp_fmri2template],
               lambda: steps.sct("template registration", reg_cmd + qc_args))
    steps.step("warp template", [out.moco_mean, out.warp_template2fmri], [out.levels],
               lambda: steps.sct("warp template", ["sct_warp_template", "-d", str(out.moco_mean), "-w",
                                                   str(out.warp_template2fmri), "-a", "0", "-t", str(pam50),
                                                   "-ofolder", str(folder / "label")] + qc_args))
    out.ran, out.skipped = steps.ran, steps.skipped
    steps.note(f"fmri-pipeline done: ran {len(out.ran)} step(s), {len(out.skipped)} up to date")
    return out
