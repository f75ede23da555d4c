"""``sct_deepseg_epi train``: train (or fine-tune) an ensemble on labelled data and export it.

Examples::

    # the default model (see docs/training.md)
    sct_deepseg_epi train -data ../shared/data -o models/seg_sc_epi/0.1.0 -name seg_sc_epi -version 0.1.0 \\
        -val-image ../shared/data/epi/sct-example-2014/fmri.nii.gz \\
        -val-mask ../shared/data/epi/sct-example-2014/fmri_moco_mean_seg_modif.nii.gz

    # adapt the installed model to a lab's own labelled EPI (BIDS: *_bold + *_seg / *_mask labels)
    sct_deepseg_epi train -data my_bids/ -init-model seg_sc_epi -o my_model -epochs 4
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..options import positive_number, whole_number
from ._parser import Parser, setup_logging


def get_parser() -> Parser:
    p = Parser("sct_deepseg_epi train", "Train (or fine-tune) an ensemble on labelled data and export it as a "
               "checksummed model folder (ONNX members + manifest.json + model card).",
               version_flags=False)  # -version: the trained model's version
    p.mandatory.add_argument("-data", metavar="<path>", required=True,
                             help="Labelled data: a BIDS folder or any tree of NIfTIs with *_seg*/*_mask* labels, "
                                  "a MANIFEST.tsv (path, role, sha256 columns; role train-source is used), or a "
                                  "sources .npz packed by -pack.")
    p.mandatory.add_argument("-o", metavar="<folder>", help="Output model folder (not needed with -pack).")
    o = p.optional
    o.add_argument("-name", default="custom_model", help="Model name in the manifest. Default: custom_model.")
    o.add_argument("-version", default="0.1.0", help="Model version (MAJOR.MINOR.PATCH). Default: 0.1.0.")
    o.add_argument("-init-model", metavar="<name|path>", default=None,
                   help="Fine-tune from an installed model (name or name@version) or a model folder "
                        "instead of starting from scratch; its architecture and input settings are kept.")
    o.add_argument("-members", type=whole_number(1), default=3, help="Ensemble members (k-fold over subjects). Default: 3.")
    o.add_argument("-epochs", type=whole_number(1), default=None, help="Epochs per member. Default: 8 (4 when fine-tuning).")
    o.add_argument("-n-sim", type=whole_number(0), default=None, help="Simulated stacks in the training set. Default: 5000.")
    o.add_argument("-n-val", type=whole_number(0), default=None,
                   help="Simulated stacks per member for the held-out simulated score. Default: 240.")
    o.add_argument("-patch", type=whole_number(1), default=None, help="Training patch size (pixels on the model grid). Default: 96.")
    o.add_argument("-widths", default=None, help="U-Net widths per level, comma-separated. Default: 8,16,24,32.")
    o.add_argument("-top-convs", type=int, choices=(1, 2), default=None,
                   help="3x3 convolutions per block at full resolution. Default: 1.")
    o.add_argument("-loss", choices=("dice_bce", "dice_bce_boundary"), default="dice_bce",
                   help="Training loss; dice_bce_boundary weights the BCE up on the cord's edge. Default: dice_bce.")
    o.add_argument("-precision", choices=("fp32", "bf16"), default="fp32",
                   help="Forward pass precision (bf16: autocast, much faster on CPUs with AMX/AVX-512 BF16 "
                        "and on GPUs; weights and export stay fp32). Default: fp32.")
    o.add_argument("-spacing", type=positive_number, default=None, help="In-plane model spacing in mm. Default: 1.0.")
    o.add_argument("-context", type=whole_number(0), default=None, help="Neighbouring slices per side as channels. Default: 0 (2D).")
    o.add_argument("-lr", type=positive_number, default=None, help="Peak learning rate. Default: 3e-3 (5e-4 when fine-tuning).")
    o.add_argument("-seed", type=whole_number(0), default=0, help="Random seed (simulation, weights, batch order). Default: 0.")
    o.add_argument("-val-image", metavar="<file>", default=None, help="A real labelled EPI image (3D or 4D) to report.")
    o.add_argument("-val-mask", metavar="<file>", default=None, help="Its cord mask.")
    o.add_argument("-device", default="cpu", help="torch device: cpu, cuda. Default: cpu.")
    o.add_argument("-workers", type=whole_number(1), default=2, help="Processes simulating the training set. Default: 2.")
    o.add_argument("-threads", type=whole_number(1), default=2, help="torch CPU threads. Default: 2.")
    o.add_argument("-checkpoint", metavar="<file>", default=None,
                   help="Also save the trained torch weights and histories to this file (.pt).")
    o.add_argument("-from-checkpoint", metavar="<file>", default=None,
                   help="Skip training: export the weights of a -checkpoint file (e.g. trained on a GPU machine).")
    o.add_argument("-card-notes", metavar="<file.md>", default=None,
                   help="Markdown appended to the model card (measurements made outside training, say).")
    o.add_argument("-pack", metavar="<file.npz>", default=None,
                   help="Only load -data and pack it into one .npz (to train on another machine), then exit.")
    return p


def _check_outputs(args) -> None:
    """The model folder (its members, manifest and card), -checkpoint and -pack: none may be an input.

    Checked before torch is imported or any data read, so it holds without the 'train' extra too.
    """
    from ..api import load_model
    from ..outputs import check_folder, check_output, refuse_overwrite

    init = None
    if args.init_model:  # the model to fine-tune: its folder, its members and manifest are inputs
        p = Path(args.init_model)
        init = load_model(p if p.is_dir() else args.init_model, install=False).directory
    inputs = [p for p in (args.data, init, args.val_image, args.val_mask, args.from_checkpoint, args.card_notes) if p]
    if init is not None:
        inputs += list(init.iterdir())
    if args.pack:
        check_output(args.pack, inputs, role="-pack file", suffixes=(".npz",))
        return
    out = Path(args.o)
    written = {"model folder": out, "manifest": out / "manifest.json", "model card": out / "README.md",
               **{f"member {i}": out / f"member{i}.onnx" for i in range(max(args.members, 1))},
               **({"checkpoint": Path(args.checkpoint)} if args.checkpoint else {})}
    refuse_overwrite(written, inputs)  # the checkpoint may not be a file of the model folder either
    check_folder(out, inputs, role="model folder")
    if args.checkpoint:
        check_output(args.checkpoint, inputs, role="checkpoint", suffixes=None)


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.o and not args.pack:
        parser.error("the following arguments are required: -o")
    setup_logging(args.v)
    from .._optional import require

    _check_outputs(args)
    require("torch")
    require("onnx")
    if args.pack:
        from ..training import data as tdata

        sources, _ = tdata.load_sources(args.data)
        tdata.save_sources(sources, args.pack)
        print(f"packed {len(sources)} sources into {args.pack}")
        return 0
    from ..training.pipeline import train

    train(args, "sct_deepseg_epi train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    return 0
