"""The batch driver: find the runs, plan threads, hand jobs to an executor, keep the summary."""
from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .. import bids
from ..errors import InputError
from ..options import Options
from .executors import Dask, Pool, Serial, require_distributed
from .worker import COLUMNS, Job, Record, plan_threads

log = logging.getLogger("sct_deepseg_epi.batch")

SUMMARY_NAME = "summary.tsv"
LOCK_NAME = ".sct_deepseg_epi.lock"
DESCRIPTION_NAME = "dataset_description.json"


@dataclass
class BatchResult:
    records: list[Record]
    derivatives: Path
    summary: Path
    description: Path
    notes: list[str]

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r.status != "done" and r.status != "skipped"]

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for r in self.records:
            c[r.status] = c.get(r.status, 0) + 1
        return c


def prepare_derivatives(deriv: Path) -> Path:
    """Create the derivatives folder and prove it is writable, or raise InputError saying what to do.

    The check writes and removes a probe file rather than trusting ``os.access``, which
    says yes to root on read-only mounts.
    """
    deriv = Path(deriv).expanduser()
    hint = "pass -o with a writable folder (e.g. on scratch)"
    try:
        deriv.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{deriv}: cannot create the derivatives folder ({exc.strerror or exc}); {hint}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=deriv)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{deriv}: the derivatives folder is not writable ({exc.strerror or exc}); {hint}") from None
    return deriv.resolve()


def check_derivatives(deriv: Path) -> None:
    """What a batch may not write in ``deriv``, refused before any work and before anything is written.

    The files of the whole batch (summary, its sidecar, the dataset description) may not be
    folders, and a ``dataset_description.json`` there must be one this tool wrote: ``-o`` pointing
    at another dataset (the raw data's parent, another pipeline's derivatives) would replace its own.
    """
    for name in (SUMMARY_NAME, Path(SUMMARY_NAME).with_suffix(".json").name, DESCRIPTION_NAME):
        p = deriv / name
        if p.exists() and not p.is_file():
            raise InputError(f"{p}: is {'a folder' if p.is_dir() else 'not a regular file'}; "
                             f"the batch writes its {name} there")
    desc = deriv / DESCRIPTION_NAME
    if desc.is_file() and not _ours(desc):
        raise InputError(f"{desc}: the description of another dataset; this batch would replace it "
                         "(pass -o with a folder of its own, e.g. DATASET/derivatives/sct_deepseg_epi)")


def _ours(desc: Path) -> bool:
    """Whether ``desc`` is a dataset description this tool wrote (GeneratedBy names it)."""
    try:
        doc = json.loads(desc.read_text(encoding="utf-8"))
        return any(g.get("Name") == bids.PIPELINE for g in doc["GeneratedBy"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {row["run"]: row for row in csv.DictReader(f, delimiter="\t") if row.get("run")}
    except (OSError, csv.Error, KeyError, UnicodeDecodeError):
        log.warning("%s: unreadable; starting a new summary", path)
        return {}


def write_summary(records: Iterable[Record], deriv: Path) -> Path:
    """Merge ``records`` into ``<deriv>/summary.tsv`` (one row per run, latest outcome wins)."""
    from ..write import atomic_path, save_json

    path = deriv / SUMMARY_NAME
    rows = read_summary(path)
    for r in records:
        d = asdict(r)
        rows[r.run] = {k: ("n/a" if d[k] is None else str(d[k])) for k in COLUMNS}
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS), delimiter="\t", lineterminator="\n", extrasaction="ignore")
            w.writeheader()
            for run in sorted(rows):
                w.writerow({k: rows[run].get(k, "n/a") for k in COLUMNS})
    save_json({k: {"Description": v} for k, v in COLUMNS.items()}, path.with_suffix(".json"))
    return path


def _write_description(deriv: Path, source: Path, model: dict[str, Any], src_desc: dict | None,
                       notes: list[str]) -> Path:
    from .. import __version__
    from ..write import save_json

    path = deriv / DESCRIPTION_NAME
    check_derivatives(deriv)  # again under the dataset lock: another program may have written one since
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            old_model = old["GeneratedBy"][0].get("Model")
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            old_model = None
        if old_model and old_model != model:
            notes.append(f"{deriv}: earlier outputs came from model {old_model.get('Name')} "
                         f"{old_model.get('Version')}; runs not redone now keep those masks")
    return save_json(bids.dataset_description(source, deriv, model, __version__, src_desc), path)


def run_batch(bids_dir: str | Path, derivatives: str | Path | None = None, *,
              model: str | Path = "seg_sc_epi", options: Options | dict[str, Any] | None = None,
              participants: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
              sessions: Sequence[str] | None = None,
              jobs: int = 1, threads: int | None = None, soft: bool = False, disagreement: bool = False,
              overwrite: bool = False, scheduler: str | None = None, client: Any = None,
              lock_wait: float = 6 * 3600.0,
              progress: Callable[[Record, int, int], None] | None = None) -> BatchResult:
    """Segment every BOLD run of ``bids_dir`` into BIDS derivatives; see the module docstring.

    ``options`` is an :class:`~sct_deepseg_epi.options.Options` (or a dict of its fields);
    its ``threads`` are replaced by ``threads``. ``scheduler`` is a Dask scheduler address, or ``'local'`` for a
    LocalCluster of ``jobs`` workers; ``client`` an existing ``distributed.Client``. Without
    either, ``jobs`` local processes (1: this process) do the work.

    ``progress(record, n_done, n_total)`` is called as each run finishes. Raises
    InputError for an unusable dataset or derivatives folder; failed runs are not errors
    but records (see :attr:`BatchResult.failed`).
    """
    from .. import api

    options = Options(**options) if isinstance(options, dict) else (options or Options())
    options = options.replace(threads=None)
    if options.output == "probability":
        raise InputError("-thr 0 (soft map as the main output) is not available in batch mode; use -soft 1")
    use_dask = scheduler is not None or client is not None
    if use_dask and client is None:
        require_distributed()  # before anything is written
    found = bids.find_runs(bids_dir, participants, tasks, sessions)
    notes = list(found.notes)
    for n in notes:
        log.warning(n)
    deriv = Path(derivatives).expanduser().resolve() if derivatives else bids.default_derivatives(found.root)
    if deriv == found.root or (found.root in deriv.parents and deriv.relative_to(found.root).parts[0].startswith("sub-")):
        raise InputError(f"{deriv}: the derivatives folder must not be the dataset itself or one of its subjects")
    check_derivatives(deriv)  # nothing is written before these checks, the model and the scheduler answer
    spec = api.load_model(model)  # installs once here (under the lock) before any worker looks
    model_rec = bids.model_record(spec.name, spec.version, [(m.file, m.sha256) for m in spec.members])
    is_folder = isinstance(model, Path) or "/" in str(model) or str(model).startswith(".")
    worker_model = str(spec.directory) if is_folder else f"{spec.name}@{spec.version}"
    key = bids.resume_key(model_rec, {**options.settings(spec), "soft": soft, "disagreement": disagreement})

    if use_dask:
        per_job = threads
    else:
        jobs = max(1, min(jobs, len(found.runs)))
        per_job, warn = plan_threads(jobs, threads)
        if warn:
            notes.append(warn)
            log.warning(warn)
    template = dict(model=worker_model, options=options, threads=per_job, soft=soft, disagreement=disagreement,
                    overwrite=overwrite, key=key)
    done: dict[str, Record] = {}
    total = len(found.runs)

    def finished(rec: Record) -> None:
        done[rec.run] = rec
        if progress is not None:
            progress(rec, len(done), total)

    from filelock import FileLock

    executor = Dask(scheduler, client, jobs) if use_dask else Serial() if jobs == 1 else Pool(jobs, per_job)
    with executor:  # connects to a Dask scheduler: one that does not answer stops the batch here
        deriv = prepare_derivatives(deriv)
        todo = [Job(r, bids.outputs_for(r, deriv), **template) for r in found.runs]
        dataset_lock = FileLock(str(deriv / LOCK_NAME))
        with dataset_lock:
            description = _write_description(deriv, found.root, model_rec, found.description, notes)
        try:
            # pass 1 skips runs that another batch holds; pass 2 waits for them (usually to find them done)
            busy = executor.run_all(todo, finished)
            if busy:
                log.info("%d run(s) are held by another batch; waiting for them", len(busy))
                busy = executor.run_all([_replace(j, lock_wait=lock_wait) for j in busy], finished)
            for j in busy:
                finished(Record(j.run.rel, "failed", f"still locked by another process after {lock_wait:.0f} s "
                                                     f"({j.outputs.lock})"))
        finally:
            summary = deriv / SUMMARY_NAME
            if done:  # also after an interruption: what was finished is recorded
                with dataset_lock:
                    write_summary([done[r.rel] for r in found.runs if r.rel in done], deriv)
    records = [done[r.rel] for r in found.runs]
    return BatchResult(records, deriv, summary, description, notes)
