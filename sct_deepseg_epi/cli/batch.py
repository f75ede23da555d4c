"""``sct_deepseg_epi batch BIDS_DIR [-o DERIV] [-jobs N] ...``: segment every BOLD run of a BIDS dataset."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ._parser import Parser, add_engine_flags, options_from_args, printable, setup_logging, yes_no

log = logging.getLogger("sct_deepseg_epi")

DESCRIPTION = """\
Segment the spinal cord in every BOLD run of a BIDS dataset (sub-*/[ses-*/]func/*_bold.nii[.gz],
3D or 4D) and write BIDS derivatives:

  DERIV/dataset_description.json       GeneratedBy: this tool, the model and its SHA-256s
  DERIV/sub-*/[ses-*/]func/<entities>_desc-spinalcord_mask.nii.gz  (+ .json sidecar)
  DERIV/summary.tsv                    run, status, error, cord volume, slices with cord, seconds

Reruns skip runs whose outputs match the input checksum, model and settings and still have
the checksums recorded when they were written (-overwrite 1 redoes them). A failed run is recorded and the others go on; the exit status is 1 if any
run failed. Two batches on the same dataset share the work safely (a lock per run).
"""


def _positive_or_all(text: str) -> int:
    v = int(text)
    if v == 0 or v < -1:
        raise argparse.ArgumentTypeError("must be a positive number, or -1 for every CPU")
    return v


def _threshold(text: str) -> float:
    v = float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError("must be in (0, 1); use -soft 1 for the probability map")
    return v


def get_parser() -> Parser:
    p = Parser("sct_deepseg_epi batch", DESCRIPTION)
    p.mandatory.add_argument("bids_dir", metavar="BIDS_DIR", help="The BIDS dataset (its root folder).")
    o = p.optional
    o.add_argument("-o", metavar="<folder>", default=None,
                   help="Derivatives folder. Default: BIDS_DIR/derivatives/sct_deepseg_epi.")
    o.add_argument("-participant-label", metavar="<label>", nargs="+", default=None,
                   help="Only these participants (01 or sub-01; several allowed).")
    o.add_argument("-session-label", metavar="<label>", nargs="+", default=None,
                   help="Only runs of these sessions (01 or ses-01; several allowed).")
    o.add_argument("-task-label", metavar="<label>", nargs="+", default=None,
                   help="Only runs of these tasks (rest or task-rest; several allowed).")
    o.add_argument("-jobs", metavar="<int>", type=_positive_or_all, default=1,
                   help="Runs segmented in parallel: worker processes here, or Dask workers with "
                        "-scheduler local. -1: one per CPU. Default: 1.")
    o.add_argument("-threads", metavar="<int>", type=int, default=None,
                   help="Inference threads per worker. Default: CPUs / jobs, so that jobs x threads "
                        "does not oversubscribe the machine.")
    o.add_argument("-scheduler", metavar="<address|local>", default=None,
                   help="Run on a Dask cluster: a scheduler address (tcp://host:8786) or 'local' "
                        "for a local cluster of -jobs workers. Needs: pip install 'sct_deepseg_epi[dask]'.")
    add_engine_flags(o, skip=("threads", "output", "prompts"), change={"threshold": {"type": _threshold}})
    o.add_argument("-soft", metavar="<0|1>", type=yes_no, default=False,
                   help="Also write the probability map (*_desc-spinalcord_probseg.nii.gz).")
    o.add_argument("-disagreement", metavar="<0|1>", type=yes_no, default=False,
                   help="Also write the ensemble disagreement (*_desc-spinalcord_disagreement.nii.gz).")
    o.add_argument("-overwrite", metavar="<0|1>", type=yes_no, nargs="?", const=True, default=False,
                   help="Redo runs whose outputs are up to date (default 0: skip them; "
                        "-overwrite alone means 1).")
    return p


class _Progress:
    """A tqdm bar on a terminal, one log line per run otherwise."""

    def __init__(self, verbosity: int):
        self.bar = None
        self.tty = sys.stderr.isatty() and verbosity >= 1

    def __call__(self, rec, n: int, total: int) -> None:
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", file=sys.stderr)
            self.bar.update(1)
            if rec.status == "failed":
                self.bar.write(f"FAILED {rec.run}: {rec.error}", file=sys.stderr)
            return
        extra = f": {rec.error}" if rec.error else (f" ({rec.note})" if rec.note else "")
        level = logging.WARNING if rec.status == "failed" else logging.INFO
        log.log(level, "[%d/%d] %s %s in %.1f s%s", n, total, rec.run, rec.status, rec.seconds, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.v)
    if args.threads is not None and args.threads < 1:
        parser.error("-threads must be at least 1")
    from .. import batch

    jobs = batch.cpu_count() if args.jobs == -1 else args.jobs
    options = options_from_args(args)
    progress = _Progress(args.v)
    try:
        result = batch.run_batch(args.bids_dir, args.o, model=args.model, options=options,
                                 participants=args.participant_label, tasks=args.task_label,
                                 sessions=args.session_label, jobs=jobs,
                                 threads=args.threads, soft=args.soft, disagreement=args.disagreement,
                                 overwrite=args.overwrite, scheduler=args.scheduler, progress=progress)
    except ImportError as exc:  # the dask extra is missing
        sys.stderr.write(f"error: {printable(exc)}\n")
        return 1
    finally:
        progress.close()
    counts = result.counts()
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    failed = result.failed
    log.info("%d run(s): %s; table: %s", len(result.records), summary, result.summary)
    if failed:
        sys.stderr.write(f"error: {len(failed)} of {len(result.records)} run(s) failed; see {printable(result.summary)}\n")
        return 1
    return 0
