"""``sct_deepseg_epi import-nnunet PATH_OR_URL -o MODEL_DIR``: an nnU-Net v2 model -> an ONNX model folder."""
from __future__ import annotations

import sys
from typing import Sequence

from ..options import fraction
from ._parser import Parser, printable, setup_logging, yes_no


def get_parser() -> Parser:
    p = Parser("sct_deepseg_epi import-nnunet",
               "Convert a trained nnU-Net v2 model (a nnUNetTrainer__<plans>__<config> folder, a zip of\n"
               "one, or its URL) into a model folder of this engine: every fold becomes an ONNX file\n"
               "and manifest.json records nnU-Net's inference recipe (axis order, spacing, resampling,\n"
               "normalisation, patch, sliding window, mirroring, labels) and the checkpoints' SHA-256.\n"
               "Needs the 'nnunet' extra (torch + nnunetv2) for the conversion only; the result runs\n"
               "with onnxruntime and numpy:  sct_deepseg_epi -i bold.nii.gz -model MODEL_DIR\n\n"
               "Example:\n"
               "  sct_deepseg_epi import-nnunet https://.../model_seg_sc_epi_nnunet.zip -o ~/models/epi_nnunet",
               version_flags=False)  # -version: the imported model's version
    p.mandatory.add_argument("source", metavar="PATH_OR_URL",
                             help="nnU-Net model folder, .zip/.tar.gz archive, or http(s):// URL of an archive.")
    p.mandatory.add_argument("-o", metavar="<folder>", required=True, help="Model folder to write.")
    p.optional.add_argument("-config", metavar="<name>", default=None,
                            help="Configuration to import when the source holds several (2d, 3d_fullres, ...).")
    p.optional.add_argument("-folds", metavar="<list>", default=None,
                            help="Comma-separated folds to import (default: every fold with a checkpoint).")
    p.optional.add_argument("-checkpoint", metavar="<file>", default="checkpoint_final.pth",
                            help="Checkpoint file name inside each fold folder (default: checkpoint_final.pth).")
    p.optional.add_argument("-name", metavar="<name>", default=None,
                            help="Model name for the manifest (default: derived from the dataset name).")
    p.optional.add_argument("-version", metavar="<X.Y.Z>", default="1.0.0", help="Model version (default: 1.0.0).")
    p.optional.add_argument("-step", metavar="<float>", type=fraction, default=0.5,
                            help="Sliding-window step as a fraction of the patch (nnU-Net's default: 0.5).")
    p.optional.add_argument("-convention", choices=("sct", "nnunet"), default="sct",
                            help="Which axes the model sees. sct (default): as SCT's sct_deepseg runs nnU-Net models, "
                                 "the image reoriented to RAS (SCT's LPI, or the model's dataset.json "
                                 "image_orientation) before nnU-Net's axis order; for SCT's models. nnunet: as "
                                 "nnUNetv2_predict, the axes nnU-Net's image reader gives the file as stored. The "
                                 "two give different masks on images stored in other orientations.")
    p.optional.add_argument("-overwrite", metavar="<0|1>", type=yes_no, default=False,
                            help="Replace an existing, non-empty output folder (default: 0).")
    return p


def convention_text(recipe) -> str:
    """How -list-models and import-nnunet name a model's orientation convention."""
    if recipe.convention == "sct":
        return f"convention sct (reoriented to {recipe.orientation})"
    return f"convention nnunet ({recipe.image_reader} axes)"


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.v)
    from ..nnunet.convert import import_nnunet
    from ..registry.manifest import load_manifest

    folds = [f.strip() for f in args.folds.split(",") if f.strip()] if args.folds else None
    try:
        out = import_nnunet(args.source, args.o, configuration=args.config, folds=folds, checkpoint=args.checkpoint,
                            name=args.name, version=args.version, step_size=args.step, overwrite=args.overwrite,
                            convention=args.convention)
    except ImportError as exc:  # the 'nnunet' extra is missing: the message says what to install
        sys.stderr.write(f"error: {printable(exc)}\n")
        return 1
    spec = load_manifest(out)
    recipe = spec.nnunet
    print(f"imported {spec.ref}: {len(spec.members)} fold(s), {recipe.configuration}, patch {list(recipe.patch_size)}, "
          f"spacing {list(recipe.spacing)}, labels {dict(recipe.labels)}, {convention_text(recipe)}")
    print(f"model folder: {out}")
    print(f"run it with:  sct_deepseg_epi -i IMAGE.nii.gz -model {out}")
    return 0
