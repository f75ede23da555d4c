"""``sct_deepseg_epi fmri-pipeline -i BOLD``: motion correction and PAM50 registration with SCT's tools."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from ..options import report_name
from ._parser import Parser, setup_logging

log = logging.getLogger("sct_deepseg_epi")

DESCRIPTION = """\
Run the fMRI pipeline of SCT with this package's cord masks:

  1. sct_maths -mean t                 temporal mean         BOLD_mean.nii.gz
  2. sct_deepseg_epi                   cord segmentation     BOLD_mean_seg.nii.gz
  3. sct_deepseg_epi moco-mask         moco mask (cylinder)  mask_BOLD.nii.gz
  4. sct_fmri_moco -m                  motion correction     BOLD_moco.nii.gz, BOLD_moco_mean.nii.gz, moco_params.tsv
  5. sct_deepseg_epi                   cord of the moco mean BOLD_moco_mean_seg.nii.gz
  6. sct_register_multimodal           PAM50 -> moco mean    warp_template2fmri.nii.gz, warp_fmri2template.nii.gz
     (type=seg steps, then a refinement on the image; -initwarp/-initwarpinv start from the subject's
     anatomical registration, e.g. warp_template2t2s.nii.gz and warp_t2s2template.nii.gz)
  7. sct_warp_template -a 0            template levels       label/template/PAM50_levels.nii.gz

With -moco dl, step 3 writes the cord mask (mask_BOLD_cord.nii.gz: the cord on every slice,
grown in-plane by -margin mm) and step 4 runs sct_fmri_moco -dl (SCT's DenseNet; its weights
come from sct_download_data -d moco-dl_models, checked before any step), which writes
BOLD_mocoDL.nii.gz, BOLD_mocoDL_mean.nii.gz, moco_params_x.nii.gz and moco_params_y.nii.gz;
the later steps run on BOLD_mocoDL_mean.nii.gz.

A step is skipped when its outputs are newer than its inputs (-f 1 reruns everything). Every
command and its output is logged in fmri_pipeline.log in the output folder. Needs SCT on PATH.
"""


def get_parser() -> Parser:
    from ..handoff import DEFAULT_CORD_MARGIN_MM, DEFAULT_DIAMETER_MM, DEFAULT_REG_PARAM

    p = Parser("sct_deepseg_epi fmri-pipeline", DESCRIPTION)
    p.mandatory.add_argument("-i", metavar="<file>", required=True, help="fMRI series (4D NIfTI).")
    o = p.optional
    o.add_argument("-ofolder", metavar="<folder>", help="Output folder (default: the input's folder).")
    o.add_argument("-s", metavar="<file>", help="Cord mask of the temporal mean to use instead of segmenting it.")
    o.add_argument("-model", metavar="<name[@version]>", default="seg_sc_epi", help="Segmentation model (default: seg_sc_epi).")
    o.add_argument("-moco", choices=("ants", "dl"), default="ants",
                   help="Motion correction: ants (sct_fmri_moco with a cylinder mask) or dl (sct_fmri_moco -dl "
                        "with a cord mask; needs sct_download_data -d moco-dl_models). Default: ants.")
    o.add_argument("-size", metavar="<mm>", type=float, default=DEFAULT_DIAMETER_MM,
                   help=f"-moco ants: diameter of the moco mask cylinder in mm (default: {DEFAULT_DIAMETER_MM:g}).")
    o.add_argument("-margin", metavar="<mm>", type=float, default=DEFAULT_CORD_MARGIN_MM,
                   help=f"-moco dl: in-plane growth of the cord mask in mm (default: {DEFAULT_CORD_MARGIN_MM:g}).")
    o.add_argument("-template", metavar="<folder>", help="PAM50 folder (default: $SCT_DIR/data/PAM50).")
    o.add_argument("-initwarp", "-t2-warp", dest="initwarp", metavar="<file>",
                   help="Template->anatomy warp of this subject from its T2/T2* registration "
                        "(e.g. warp_template2t2s.nii.gz); -t2-warp is the same flag.")
    o.add_argument("-initwarpinv", "-t2-warpinv", dest="initwarpinv", metavar="<file>",
                   help="Anatomy->template warp (e.g. warp_t2s2template.nii.gz); -t2-warpinv is the same flag.")
    o.add_argument("-param", metavar="<steps>", default=DEFAULT_REG_PARAM,
                   help=f"sct_register_multimodal -param for the template registration (default: {DEFAULT_REG_PARAM}).")
    o.add_argument("-qc", metavar="<folder>", help="SCT QC report folder for the SCT steps.")
    o.add_argument("-qc-dataset", metavar="<str>", type=report_name("-qc-dataset"),
                   help="Dataset name for the QC report (a name, not a path).")
    o.add_argument("-qc-subject", metavar="<str>", type=report_name("-qc-subject"),
                   help="Subject name for the QC report (a name, not a path).")
    o.add_argument("-f", metavar="<0|1>", type=int, choices=(0, 1), default=0, help="1: rerun steps that are up to date.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.v)
    if (args.initwarp is None) != (args.initwarpinv is None):
        parser.error("-initwarp and -initwarpinv go together")
    if not args.margin >= 0:
        parser.error(f"-margin must be zero or a positive distance in mm, not {args.margin:g}")
    from ..handoff import fmri_pipeline

    out = fmri_pipeline(args.i, args.ofolder, seg=args.s, model=args.model, template=args.template,
                        initwarp=args.initwarp, initwarpinv=args.initwarpinv, diameter_mm=args.size,
                        param=args.param, moco=args.moco, margin_mm=args.margin, qc=args.qc, qc_dataset=args.qc_dataset, qc_subject=args.qc_subject,
                        force=bool(args.f))
    log.info("motion-corrected series: %s", out.moco)
    log.info("PAM50 levels on the moco mean: %s", out.levels)
    log.info("log of every command: %s", out.log)
    return 0
