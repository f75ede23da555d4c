"""``sct_deepseg_epi -i IN [-o OUT] ...``: segment the spinal cord in a 3D or 4D EPI image."""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from ..options import report_name
from ._parser import Parser, add_engine_flags, options_from_args, setup_logging, yes_no

log = logging.getLogger("sct_deepseg_epi")

DESCRIPTION = """\
Spinal cord segmentation for gradient-echo EPI (BOLD fMRI), with an ONNX ensemble.
Writes IN_seg.nii.gz next to the input (IN_seg.nii for a .nii input; a uint8 mask on the
input's own grid) and a JSON sidecar saying what produced it. 4D series: the temporal mean
by default (-4d mean), or every volume (-4d each, 4D mask).
"""


def get_parser(prog: str = "sct_deepseg_epi", description: str = DESCRIPTION, epilog: str | None = None) -> Parser:
    """The segmentation parser; ``sct_deepseg seg_sc_epi`` (the SCT task) reuses it under its own name."""
    from . import commands_epilog

    p = Parser(prog, description, epilog=commands_epilog() if epilog is None else epilog)
    p.mandatory.add_argument("-i", metavar="<file>", help="Input EPI image, 3D or 4D (.nii or .nii.gz).")
    o = p.optional
    o.add_argument("-o", metavar="<file>",
                   help="Output mask. Default: IN_seg.nii.gz next to the input (IN_seg.nii for a .nii input).")
    add_engine_flags(o, change={"threshold": {"help": "Binarisation threshold on the ensemble probability "
                                                      "(default: the model's). 0 writes the soft probability map "
                                                      "instead of a mask (as in SCT): an alias of -output "
                                                      "probability."}})
    o.add_argument("-soft", metavar="<0|1>", type=yes_no, default=False,
                   help="Also write the soft probability map as IN_seg_soft.nii.gz, beside the mask (not with "
                        "-thr 0 / -output probability, whose main output is that map already).")
    o.add_argument("-disagreement", metavar="<0|1>", type=yes_no, default=False,
                   help="Also write the ensemble disagreement (std of members) as IN_seg_disagreement.nii.gz.")
    o.add_argument("-qc", metavar="<folder>",
                   help="Write a QC report into this folder: inside SCT, an entry of SCT's QC report; else an HTML "
                        "page per dataset, which shows the ensemble disagreement (IN_seg_disagreement.nii.gz is then "
                        "written too).")
    o.add_argument("-qc-dataset", metavar="<str>", type=report_name("-qc-dataset"),
                   help="Dataset name shown in the QC report (a name, not a path; default: the input's "
                        "dataset folder). The standalone report is the page DATASET.html.")
    o.add_argument("-qc-subject", metavar="<str>", type=report_name("-qc-subject"),
                   help="Subject name shown in the QC report (a name, not a path; default: the input's "
                        "subject folder).")
    m = p.misc
    m.add_argument("-install", action="store_true", help="Install the model given by -model (download) and exit.")
    m.add_argument("-custom-url", metavar="<url>",
                   help="Install a model archive (.zip/.tar.gz) from a URL, file:// URL or local path "
                        "(append #sha256=HEX to check it); with -i, segment with that model.")
    m.add_argument("-list-models", action="store_true", help="List known models and whether they are installed.")
    return p


def _list_models() -> int:
    from ..registry import store

    for spec in store.available():
        state = "installed" if store.is_complete(spec) else "not installed"
        kind = ""
        if spec.nnunet is not None:
            from .import_nnunet import convention_text

            kind = f"[nnU-Net {spec.nnunet.configuration}, {convention_text(spec.nnunet)}] "
        print(f"{spec.ref:<24} {state:<14} {kind}{spec.description}")
    print(f"models folder: {store.cache_root()}")
    return 0


class _VolumeBar:
    """``-4d each`` on a terminal: a bar of volumes done, their rate and the time left (as batch shows runs)."""

    def __init__(self, verbosity: int):
        self.bar = None
        self.tty = sys.stderr.isatty() and verbosity >= 1

    def __call__(self, done: int, total: int) -> None:
        if not self.tty:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="vol", desc="volumes", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Sequence[str] | None = None, parser: Parser | None = None) -> int:
    parser = parser or get_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.v)
    if args.list_models:
        if args.i is not None:
            parser.error("-list-models lists the models and exits; it cannot be combined with -i")
        return _list_models()
    from .. import api

    options = options_from_args(args, parser) if args.i is not None else None
    if options is not None and args.soft and options.output == "probability":
        parser.error("-soft 1 writes the soft map beside the mask, but -thr 0 / -output probability makes "
                     "the soft map the main output already; drop -soft 1 or choose a threshold")
    disagreement = args.disagreement
    backend = None
    if args.i is not None:
        from ..outputs import check_folder, check_outputs

        qc_targets = {}
        if args.qc:
            from .. import qc

            backend = "sct" if qc.sct_available() else "html"
            disagreement = disagreement or backend == "html"
            check_folder(args.qc, [args.i], role="QC folder")
            if backend == "html":
                qc_targets = qc.report_targets(args.i, args.qc, dataset=args.qc_dataset, subject=args.qc_subject)
        # every file the run will write, QC page and entry included, checked before a model is
        # installed or an image read
        inputs = [args.i] + ([args.prompts] if args.prompts else [])
        targets = api.run_targets(args.i, args.o, soft=args.soft, disagreement=disagreement, options=options)
        check_outputs(targets, inputs)
        if qc_targets:  # in a folder the report makes if needed
            check_outputs({**targets, **qc_targets}, inputs, new_folders=True)
    model = args.model
    if args.custom_url:
        from ..registry import download
        from ..registry.fetch import split_checksum

        url, sha = split_checksum(args.custom_url)
        spec = download.install_url(url, sha256=sha)
        log.info("installed %s into %s", spec.ref, spec.directory)
        model = spec.directory
    elif args.install:
        spec = api.load_model(model, install=True)
        log.info("model %s is installed in %s", spec.ref, spec.directory)
    if args.i is None:
        if args.custom_url or args.install:
            return 0
        parser.error("the following argument is required: -i")

    def qc_report(result) -> None:
        from ..errors import InputError

        try:
            report = qc.report(args.i, result.mask, args.qc, disagreement=result.extra.get("disagreement"),
                               dataset=args.qc_dataset, subject=args.qc_subject, backend=backend,
                               command=[parser.prog] + list(sys.argv[1:] if argv is None else argv))
        except OSError as exc:
            raise InputError(f"{exc.filename or args.qc}: cannot write the QC report ({exc.strerror or exc}); "
                             "no output was kept") from None
        log.info("QC report: %s", report)

    bar = _VolumeBar(args.v)
    try:
        result = api.run(args.i, args.o, model=model, soft=args.soft, disagreement=disagreement, options=options,
                         then=qc_report if backend else None, progress=bar)
    finally:
        bar.close()
    log.info("wrote %s (%d cord voxels, %.2f s)", result.mask, result.provenance["cord_voxels"],
             result.provenance["timings_s"]["total"])
    return 0
