"""``sct_deepseg_epi moco-mask -i BOLD -s SEG``: the mask that ``sct_fmri_moco -m`` expects."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from ._parser import Parser, setup_logging

log = logging.getLogger("sct_deepseg_epi")

DESCRIPTION = """\
Build the mask for SCT's motion correction (sct_fmri_moco -m), on the fMRI's own 3D grid.

-kind cylinder (default, for sct_fmri_moco): in every axial slice, a disc of the given diameter
centred on the spinal cord segmentation; slices where the cord was not found take a centre
interpolated from their neighbours. Writes mask_BOLD.nii.gz beside the input (the name
sct_create_mask gives).

-kind cord (for sct_fmri_moco -dl): the cord itself on every slice (a slice without cord takes
the nearest slice's cord, moved to its interpolated centre), grown in the axial plane by
-margin mm. Writes mask_BOLD_cord.nii.gz beside the input.

Example:
  sct_deepseg_epi -i fmri.nii.gz                        # -> fmri_seg.nii.gz (temporal mean)
  sct_deepseg_epi moco-mask -i fmri.nii.gz -s fmri_seg.nii.gz
  sct_fmri_moco -i fmri.nii.gz -m mask_fmri.nii.gz
  sct_deepseg_epi moco-mask -i fmri.nii.gz -s fmri_seg.nii.gz -kind cord
  sct_fmri_moco -i fmri.nii.gz -m mask_fmri_cord.nii.gz -dl
"""


def get_parser() -> Parser:
    p = Parser("sct_deepseg_epi moco-mask", DESCRIPTION)
    p.mandatory.add_argument("-i", metavar="<file>", required=True, help="fMRI series (4D) or one of its volumes (3D).")
    p.mandatory.add_argument("-s", metavar="<file>", required=True,
                             help="Spinal cord segmentation on the fMRI's grid (e.g. from sct_deepseg_epi).")
    p.optional.add_argument("-o", metavar="<file>",
                            help="Output mask (default: mask_BOLD.nii.gz, or mask_BOLD_cord.nii.gz, beside the input).")
    p.optional.add_argument("-kind", choices=("cylinder", "cord"), default="cylinder",
                            help="cylinder: for sct_fmri_moco (default); cord: for sct_fmri_moco -dl.")
    p.optional.add_argument("-size", metavar="<mm>", type=float, default=35.0,
                            help="-kind cylinder: diameter of the cylinder in mm (default: 35, as in SCT's fMRI tutorial).")
    p.optional.add_argument("-margin", metavar="<mm>", type=float, default=5.0,
                            help="-kind cord: in-plane growth of the cord in mm (default: 5).")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.v)
    if not args.size > 0:
        parser.error(f"-size must be a positive diameter in mm, not {args.size:g}")
    if not args.margin >= 0:
        parser.error(f"-margin must be zero or a positive distance in mm, not {args.margin:g}")
    from ..mocomask import moco_mask

    out = moco_mask(args.i, args.s, args.o, diameter_mm=args.size, kind=args.kind, margin_mm=args.margin)
    dl = " -dl" if args.kind == "cord" else ""
    log.info("wrote %s (use: sct_fmri_moco -i %s -m %s%s)", out, args.i, out, dl)
    return 0
