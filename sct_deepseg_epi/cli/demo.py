"""``sct_deepseg_epi demo [-o DIR]``: a synthetic EPI series, segmented, scored against its truth."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..options import whole_number
from ._parser import Parser, setup_logging


def get_parser() -> Parser:
    p = Parser("sct_deepseg_epi demo",
               "Build a seeded digital phantom of an axial cervical-cord EPI series (4D NIfTI),\n"
               "segment its temporal mean with the default model and print the Dice against the\n"
               "phantom's own truth.")
    p.optional.add_argument("-o", metavar="<folder>", default="sct_deepseg_epi_demo",
                            help="Folder for the phantom, its truth and the mask (default: ./sct_deepseg_epi_demo).")
    p.optional.add_argument("-model", metavar="<name[@version]>", default="seg_sc_epi", help="Model to use.")
    p.optional.add_argument("-seed", metavar="<int>", type=whole_number(0), default=0, help="Phantom random seed.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.v)
    import nibabel as nib

    from .. import api
    from ..errors import InputError
    from ..metrics import dice
    from ..phantom import make_phantom
    from ..outputs import OutputSet, check_outputs
    from ..write import save_nifti

    out = Path(args.o)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; -o takes a folder for the phantom, its truth and the mask")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    bold, truth = out / "phantom_bold.nii.gz", out / "phantom_truth.nii.gz"
    try:
        # every file of the demo checked before the phantom is built; none kept if a step fails
        phantom_files = OutputSet({"phantom": bold, "truth": truth})
        check_outputs(api.run_targets(bold))
        ph = make_phantom(seed=args.seed)
        with phantom_files:
            save_nifti(ph.image, bold, tmp=phantom_files.temp("phantom"))
            save_nifti(ph.truth, truth, tmp=phantom_files.temp("truth"))
        phantom_files.commit()
        try:
            result = api.run(bold, model=args.model)
        except BaseException:
            phantom_files.discard()
            raise
    except BaseException:
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    pred = np.asarray(nib.load(str(result.mask)).dataobj)
    d = dice(pred, np.asarray(ph.truth.dataobj))
    print(f"phantom: {bold} {ph.image.shape}")
    print(f"mask:    {result.mask}")
    print(f"Dice vs phantom truth: {d:.3f}  ({result.provenance['timings_s']['total']:.2f} s, "
          f"model {result.provenance['model']['name']}@{result.provenance['model']['version']})")
    return 0
