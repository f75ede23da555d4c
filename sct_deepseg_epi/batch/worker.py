"""The per-run worker: lock a run, skip it if up to date, segment it, publish its files.

A task never raises: a failure becomes a :class:`Record` and the batch goes on. This
module imports nothing heavy at load time, so a worker's thread settings are in place
before numpy or ONNX Runtime start.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import bids
from ..errors import EpiSegError, InputError
from ..options import Options

log = logging.getLogger("sct_deepseg_epi.batch")

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_WORKER_THREADS: int | None = None  # set in each local worker process by init_worker
# columns of the summary TSV and their descriptions (written to summary.json, BIDS style)
COLUMNS = {
    "run": "Source image, relative to the BIDS dataset root",
    "status": "done (segmented now), skipped (outputs were up to date) or failed",
    "error": "Why the run failed (empty otherwise)",
    "cord_volume_mm3": "Spinal cord volume in the mask, mm3 (mean over volumes for a 4D mask)",
    "slices_with_cord": "Number of axial slices holding cord",
    "n_slices": "Number of axial slices in the image",
    "flagged_slices": "Number of axial slices flagged for checking (reasons per slice: the mask's sidecar, 'slices')",
    "seconds": "Wall time spent on the run by this batch, s",
    "note": "Warnings (e.g. empty mask) or why an existing output was reused or redone",
}


@dataclass
class Record:
    """The outcome of one run: one row of the summary table."""

    run: str
    status: str = "failed"         # done | skipped | failed  (busy: held by another batch, retried)
    error: str = ""
    cord_volume_mm3: float | None = None
    slices_with_cord: int | None = None
    n_slices: int | None = None
    flagged_slices: int | None = None
    seconds: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Job:
    """Everything a worker needs for one run (picklable, small)."""

    run: bids.Run
    outputs: bids.Outputs
    model: str                       # a model reference or folder the worker resolves itself
    options: Options                 # threads: decided by the worker (below)
    threads: int | None              # intra-op threads; None: decided by the worker
    soft: bool = False
    disagreement: bool = False
    overwrite: bool = False
    key: dict[str, Any] = field(default_factory=dict)  # the resume key (model + settings)
    lock_wait: float = 0.0           # seconds to wait for a run held by another batch


def cpu_count() -> int:
    """CPUs this process may use (affinity/cgroup aware on Linux): the engine's default thread count."""
    from ..infer import default_threads

    return default_threads()


def plan_threads(jobs: int, threads: int | None = None, cores: int | None = None) -> tuple[int, str | None]:
    """Intra-op threads per worker so that ``jobs x threads <= cores``; and a warning if the user oversubscribes."""
    cores = cores or cpu_count()
    if threads is None:
        return max(1, cores // max(1, jobs)), None
    if jobs * threads > cores:
        return threads, (f"-jobs {jobs} x -threads {threads} = {jobs * threads} threads on {cores} CPU(s): "
                         "oversubscribed, expect it to be slower")
    return threads, None


def init_worker(threads: int, log_level: int) -> None:
    """Process-pool initializer: fix thread counts before numpy or ONNX Runtime load."""
    global _WORKER_THREADS
    _WORKER_THREADS = threads
    for var in _THREAD_ENV:
        os.environ[var] = str(threads)
    logging.getLogger("sct_deepseg_epi").setLevel(log_level)


def dask_threads(plan: dict[str, int] | None = None) -> int | None:
    """Threads per task on the Dask worker running this task (None outside Dask).

    ``plan`` maps worker addresses to threads, computed by the client so that all the
    workers on one host together use that host's CPUs once; a worker that joined later
    falls back to its CPUs divided by its own concurrent tasks.
    """
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):
        return None
    if plan and w.address in plan:
        return plan[w.address]
    nthreads = getattr(getattr(w, "state", w), "nthreads", 1)  # Worker.nthreads before distributed 2022.8
    return max(1, cpu_count() // max(1, int(nthreads)))


def mask_stats(path: Path) -> tuple[float, int, int, int]:
    """Cord volume (mm3, mean over volumes for 4D), axial slices with cord, axial slices, volumes."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(path))
    codes = nib.aff2axcodes(img.affine)
    si = next((i for i, c in enumerate(codes) if c in "SI"), 2)
    vox = float(np.prod(img.header.get_zooms()[:3]))
    n_frames = img.shape[3] if len(img.shape) == 4 else 1
    other = tuple(i for i in range(3) if i != si)
    count, with_cord = 0, np.zeros(img.shape[si], bool)
    for t in range(n_frames):  # one volume at a time: a long 4D mask never sits in memory whole
        frame = np.asarray(img.dataobj[..., t] if n_frames > 1 else img.dataobj) > 0
        count += int(np.count_nonzero(frame))
        with_cord |= frame.any(axis=other)
    return round(count * vox / n_frames, 2), int(with_cord.sum()), int(img.shape[si]), n_frames


def clean(text: str) -> str:
    return " ".join(str(text).split())


def process(job: Job) -> Record:
    """Segment one run (or find it up to date). Never raises: failures come back as a Record."""
    t0 = time.perf_counter()
    rec = Record(job.run.rel)
    try:
        _process(job, rec)
    except EpiSegError as exc:
        rec.status, rec.error = "failed", clean(exc)
    except MemoryError:
        rec.status, rec.error = "failed", "out of memory"
    except Exception as exc:  # one bad run must not stop the batch: record it, with the traceback in the log
        log.debug("%s failed:\n%s", job.run.rel, traceback.format_exc())
        rec.status, rec.error = "failed", clean(f"{type(exc).__name__}: {exc}")
    rec.error = rec.error.replace(str(job.run.path), job.run.rel)
    rec.seconds = round(time.perf_counter() - t0, 3)
    return rec


def _process(job: Job, rec: Record) -> None:
    from filelock import FileLock, Timeout

    out = job.outputs
    try:
        out.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out.folder}: cannot create the output folder ({exc.strerror or exc})") from None
    lock = FileLock(str(out.lock))
    try:
        lock.acquire(timeout=job.lock_wait)
    except Timeout:
        rec.status = "busy"
        rec.note = "being segmented by another batch"
        return
    try:
        _segment_locked(job, rec)
    finally:
        lock.release()


def _segment_locked(job: Job, rec: Record) -> None:
    from .. import api
    from ..outputs import check_outputs
    from ..read import check_regular_file
    from ..registry.store import sha256_file as file_sha256
    from ..write import save_json, sidecar_path

    out = job.outputs
    # leftovers of a process killed while writing this run; we hold its lock, so nobody else is
    for stale in [*out.folder.glob(f".{job.run.stem}.*.work"), *out.folder.glob(f".{job.run.stem}_desc-*.part*")]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if job.run.path.is_symlink() and not job.run.path.exists():
        raise InputError(f"{job.run.path}: a broken symbolic link (a DataLad/git-annex file whose content "
                         "is not fetched? run: datalad get)")
    extras = list(out.extras(job.soft, job.disagreement))
    check_regular_file(job.run.path)  # before hashing: reading a FIFO would wait forever
    # the checks (and words) of `segment`: a folder where the mask goes is one line, before any work
    check_outputs({"mask": out.mask, **{name: getattr(out, name) for name in extras},
                   "sidecar": out.sidecar}, [job.run.path])
    input_sha = None
    if not job.overwrite and out.sidecar.is_file():  # hash the input only when there is a result to compare
        try:
            input_sha = file_sha256(job.run.path)
        except OSError as exc:
            raise InputError(f"{job.run.path}: cannot be read ({exc.strerror or exc})") from None
        ok, why = bids.is_up_to_date(out, input_sha, job.key, extras)
        if ok:
            side = json.loads(out.sidecar.read_text(encoding="utf-8"))["Batch"]
            rec.status, rec.note = "skipped", "outputs up to date"
            rec.cord_volume_mm3, rec.slices_with_cord, rec.n_slices, rec.flagged_slices = (
                side.get("cord_volume_mm3"), side.get("slices_with_cord"), side.get("n_slices"),
                side.get("flagged_slices"))
            return
        rec.note = f"redone: {why}"
    threads = job.threads or _WORKER_THREADS or dask_threads()
    options = job.options.replace(threads=threads)
    work = Path(tempfile.mkdtemp(prefix=f".{job.run.stem}.", suffix=".work", dir=out.folder))
    try:
        res = api.run(job.run.path, work / "mask.nii.gz", model=job.model, soft=job.soft,
                      disagreement=job.disagreement, options=options, input_sha256=input_sha)
        input_sha = res.provenance["input"]["sha256"]
        volume, with_cord, n_slices, n_frames = mask_stats(res.mask)
        flagged = len(res.provenance["slice_flags"]["flagged"])
        # what "up to date" is checked against on a rerun: a damaged or replaced output is redone
        written = {"mask": file_sha256(res.mask), **{k: file_sha256(v) for k, v in res.extra.items()}}
        # retire the old sidecar first: until the new one exists, nothing vouches for these files
        out.sidecar.unlink(missing_ok=True)
        for name in ("soft", "disagreement"):
            target: Path = getattr(out, name)
            if name in res.extra:
                os.replace(res.extra[name], target)
                save_json(_extra_sidecar(name, job.run), sidecar_path(target))
            else:  # a map from an earlier run with other settings would no longer match the mask
                target.unlink(missing_ok=True)
                sidecar_path(target).unlink(missing_ok=True)
        os.replace(res.mask, out.mask)
        prov = dict(res.provenance)
        prov["outputs"] = {"mask": out.mask.name, **{k: getattr(out, k).name for k in res.extra}}
        prov["input"] = {"path": job.run.rel, "sha256": input_sha}
        side = {
            "Description": "Spinal cord mask (1 = cord) on the grid of the source BOLD image"
                           + (f" (one mask per volume, {n_frames})" if n_frames > 1 else ""),
            "Sources": [bids.bids_uri(job.run)],
            **prov,
            "Batch": {"input_sha256": input_sha, "outputs_sha256": written, **job.key, "cord_volume_mm3": volume,
                      "slices_with_cord": with_cord, "n_slices": n_slices, "flagged_slices": flagged},
        }
        save_json(side, out.sidecar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec.status = "done"
    rec.cord_volume_mm3, rec.slices_with_cord, rec.n_slices = volume, with_cord, n_slices
    rec.flagged_slices = flagged
    warnings = [w.replace(str(job.run.path), job.run.rel) for w in res.provenance.get("warnings", [])]
    if warnings:
        rec.note = clean("; ".join(([rec.note] if rec.note else []) + warnings))


def _extra_sidecar(name: str, run: bids.Run) -> dict[str, Any]:
    what = {"soft": "Spinal cord probability (mean of the ensemble members), 0 to 1",
            "disagreement": "Ensemble disagreement: standard deviation of the members' cord probabilities"}
    return {"Description": what[name], "Sources": [bids.bids_uri(run)]}
