"""Segment every BOLD run of a BIDS dataset: a local worker pool or a Dask cluster over :func:`api.run`.

Each run is one task. A task takes the run's lock file, checks whether the outputs are
already up to date (same input checksum, model and settings), segments into a private
work folder, and publishes the images with ``os.replace`` before writing the sidecar
last: a crash never leaves a sidecar that vouches for missing or stale images, and two
batches on the same dataset never write the same run at once. A task never raises: a
failure becomes a :class:`Record` and the batch goes on.

Local workers are separate processes (``spawn``); each creates its ONNX Runtime sessions
once and runs them with ``threads`` intra-op threads, ``jobs x threads <= cores``. On a
Dask cluster each task sizes its threads from the worker it lands on.

This module imports nothing heavy at load time, so a worker's thread settings are in
place before numpy or ONNX Runtime start.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import bids
from .errors import EpiSegError, InputError
from .options import Options

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.tsv"
LOCK_NAME = ".sct_deepseg_epi.lock"
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_WORKER_THREADS: int | None = None  # set in each local worker process by _init_worker
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


# --- worker side -----------------------------------------------------------------------------

def cpu_count() -> int:
    """CPUs this process may use (affinity/cgroup aware on Linux): the engine's default thread count."""
    from .infer import default_threads

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


def _init_worker(threads: int, log_level: int) -> None:
    """Process-pool initializer: fix thread counts before numpy or ONNX Runtime load."""
    global _WORKER_THREADS
    _WORKER_THREADS = threads
    for var in _THREAD_ENV:
        os.environ[var] = str(threads)
    logging.getLogger("sct_deepseg_epi").setLevel(log_level)


def _dask_threads(plan: dict[str, int] | None = None) -> int | None:
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


def thread_plan(client: Any) -> dict[str, int]:
    """Worker address -> intra-op threads: each host's CPUs shared among its workers' task slots."""
    workers = client.scheduler_info().get("workers", {})
    cores = client.run(cpu_count)
    slots: dict[str, int] = {}
    for info in workers.values():
        slots[info.get("host")] = slots.get(info.get("host"), 0) + int(info.get("nthreads", 1))
    return {addr: max(1, int(cores.get(addr, 1)) // max(1, slots.get(info.get("host"), 1)))
            for addr, info in workers.items()}


def _process_on_dask(job: Job, plan: dict[str, int]) -> Record:
    if job.threads is None:
        job = _replace(job, threads=_dask_threads(plan))
    return process(job)


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


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def process(job: Job) -> Record:
    """Segment one run (or find it up to date). Never raises: failures come back as a Record."""
    t0 = time.perf_counter()
    rec = Record(job.run.rel)
    try:
        _process(job, rec)
    except EpiSegError as exc:
        rec.status, rec.error = "failed", _clean(exc)
    except MemoryError:
        rec.status, rec.error = "failed", "out of memory"
    except Exception as exc:  # one bad run must not stop the batch: record it, with the traceback in the log
        log.debug("%s failed:\n%s", job.run.rel, traceback.format_exc())
        rec.status, rec.error = "failed", _clean(f"{type(exc).__name__}: {exc}")
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
    from . import api
    from .registry.store import sha256_file as file_sha256
    from .write import save_json, sidecar_path

    out = job.outputs
    # leftovers of a process killed while writing this run; we hold its lock, so nobody else is
    for stale in [*out.folder.glob(f".{job.run.stem}.*.work"), *out.folder.glob(f".{job.run.stem}_desc-*.part*")]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if job.run.path.is_symlink() and not job.run.path.exists():
        raise InputError(f"{job.run.path}: a broken symbolic link (a DataLad/git-annex file whose content "
                         "is not fetched? run: datalad get)")
    extras = list(out.extras(job.soft, job.disagreement))
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
    threads = job.threads or _WORKER_THREADS or _dask_threads()
    options = job.options.replace(threads=threads)
    work = Path(tempfile.mkdtemp(prefix=f".{job.run.stem}.", suffix=".work", dir=out.folder))
    try:
        res = api.run(job.run.path, work / "mask.nii.gz", model=job.model, soft=job.soft,
                      disagreement=job.disagreement, options=options)
        input_sha = res.provenance["input"]["sha256"]
        volume, with_cord, n_slices, n_frames = mask_stats(res.mask)
        flagged = len(res.provenance["slice_flags"]["flagged"])
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
            "Batch": {"input_sha256": input_sha, **job.key, "cord_volume_mm3": volume,
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
        rec.note = _clean("; ".join(([rec.note] if rec.note else []) + warnings))


def _extra_sidecar(name: str, run: bids.Run) -> dict[str, Any]:
    what = {"soft": "Spinal cord probability (mean of the ensemble members), 0 to 1",
            "disagreement": "Ensemble disagreement: standard deviation of the members' cord probabilities"}
    return {"Description": what[name], "Sources": [bids.bids_uri(run)]}


# --- driver side -----------------------------------------------------------------------------

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
    from .write import atomic_path, save_json

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
    from . import __version__
    from .write import save_json

    path = deriv / "dataset_description.json"
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
    from . import api

    options = Options(**options) if isinstance(options, dict) else (options or Options())
    options = options.replace(threads=None)
    if options.output == "probability":
        raise InputError("-thr 0 (soft map as the main output) is not available in batch mode; use -soft 1")
    use_dask = scheduler is not None or client is not None
    if use_dask and client is None:
        _require_distributed()  # before anything is written
    found = bids.find_runs(bids_dir, participants, tasks, sessions)
    notes = list(found.notes)
    for n in notes:
        log.warning(n)
    deriv = Path(derivatives).expanduser().resolve() if derivatives else bids.default_derivatives(found.root)
    if deriv == found.root or (found.root in deriv.parents and deriv.relative_to(found.root).parts[0].startswith("sub-")):
        raise InputError(f"{deriv}: the derivatives folder must not be the dataset itself or one of its subjects")
    deriv = prepare_derivatives(deriv)
    spec = api.load_model(model)  # installs once here (under the lock) before any worker looks
    model_rec = bids.model_record(spec.name, spec.version, [(m.file, m.sha256) for m in spec.members])
    is_folder = isinstance(model, Path) or "/" in str(model) or str(model).startswith(".")
    worker_model = str(spec.directory) if is_folder else f"{spec.name}@{spec.version}"
    key = bids.resume_key(model_rec, {**options.settings(), "soft": soft, "disagreement": disagreement})

    from filelock import FileLock

    dataset_lock = FileLock(str(deriv / LOCK_NAME))
    with dataset_lock:
        description = _write_description(deriv, found.root, model_rec, found.description, notes)

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
    todo = [Job(r, bids.outputs_for(r, deriv), **template) for r in found.runs]
    done: dict[str, Record] = {}
    total = len(todo)

    def finished(rec: Record) -> None:
        done[rec.run] = rec
        if progress is not None:
            progress(rec, len(done), total)

    try:
        executor = _Dask(scheduler, client, jobs) if use_dask else _Serial() if jobs == 1 else _Pool(jobs, per_job)
        with executor:
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


# Executors: context managers with run_all(jobs, finished) -> the jobs another batch holds.
class _Serial:
    """Runs in this process, one after another (``-jobs 1``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run_all(self, jobs: list[Job], finished: Callable[[Record], None]) -> list[Job]:
        busy = []
        for j in jobs:
            rec = process(j)
            if rec.status == "busy":
                busy.append(j)
            else:
                finished(rec)
        return busy


class _Pool:
    """A spawn-based process pool that survives a worker dying (killed, out of memory)."""

    def __init__(self, jobs: int, threads: int):
        self.jobs, self.threads = jobs, threads
        self.pool = None

    def _new(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        level = logging.getLogger("sct_deepseg_epi").getEffectiveLevel()
        self.pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(self.threads, max(level, logging.ERROR)))

    def close(self, interrupted: bool = False, grace: float = 5.0):
        """Shut the pool down; after an interruption, workers get ``grace`` seconds, then SIGTERM."""
        if self.pool is None:
            return
        if not interrupted:
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:  # Ctrl-C reached the workers too; do not let one that ignores it hold the batch
            procs = list((getattr(self.pool, "_processes", None) or {}).values())
            self.pool.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + grace
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.terminate()
        self.pool = None

    def run_all(self, jobs: list[Job], finished: Callable[[Record], None]) -> list[Job]:
        from concurrent.futures.process import BrokenProcessPool

        queue = list(reversed(jobs))
        attempts: dict[str, int] = {}
        running: dict[Future, Job] = {}
        busy: list[Job] = []
        while queue or running:
            if self.pool is None:
                self._new()
            # at most `jobs` in flight: when a worker dies, the runs in flight are the suspects
            while queue and len(running) < self.jobs:
                j = queue.pop()
                running[self.pool.submit(process, j)] = j
            ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
            broken = False
            for fut in ready:
                j = running.pop(fut)
                try:
                    rec = fut.result()
                except BrokenProcessPool:
                    broken = True
                    attempts[j.run.rel] = attempts.get(j.run.rel, 0) + 1
                    if attempts[j.run.rel] >= 2:
                        finished(Record(j.run.rel, "failed", "the worker process died twice on this run "
                                                             "(killed, or out of memory?)"))
                    else:
                        queue.append(j)
                    continue
                except Exception as exc:  # pickling problems and the like
                    rec = Record(j.run.rel, "failed", _clean(f"{type(exc).__name__}: {exc}"))
                if rec.status == "busy":
                    busy.append(j)
                else:
                    finished(rec)
            if broken:
                log.warning("a worker process died; restarting the pool and retrying its runs once")
                for fut, j in list(running.items()):
                    running.pop(fut)
                    queue.append(j)
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None
        return busy

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(interrupted=exc_type is not None)
        return False


class _Dask:
    """Tasks on a Dask cluster: a scheduler address, ``'local'`` (a LocalCluster), or the caller's client."""

    def __init__(self, scheduler: str | None, client: Any, jobs: int):
        self.scheduler, self.client, self.jobs = scheduler, client, jobs
        self.own: list = []

    def __enter__(self):
        if self.client is None:
            distributed = _require_distributed()
            if self.scheduler == "local":
                try:
                    cluster = distributed.LocalCluster(n_workers=max(1, self.jobs), threads_per_worker=1,
                                                       processes=True, host="127.0.0.1", dashboard_address=None)
                except Exception as exc:  # Dask wraps every start-up failure in its own RuntimeError
                    raise InputError(f"cannot start a local Dask cluster ({_clean(exc)})") from None
                self.own.append(cluster)
                self.client = distributed.Client(cluster)
            else:
                try:  # the connect timeout is Dask's (distributed.comm.timeouts.connect, 30 s by default)
                    self.client = distributed.Client(self.scheduler)
                except (OSError, TimeoutError) as exc:
                    raise InputError(f"cannot reach the Dask scheduler at {self.scheduler} ({exc})") from None
            self.own.insert(0, self.client)
        return self

    def __exit__(self, *exc):
        for obj in self.own:
            obj.close()
        return False

    def run_all(self, jobs: list[Job], finished: Callable[[Record], None]) -> list[Job]:
        distributed = _require_distributed()
        try:
            plan = thread_plan(self.client)
        except Exception as exc:  # a scheduler that will not say: let each task decide
            log.debug("no thread plan from the Dask cluster: %s", exc)
            plan = {}
        futures = {self.client.submit(_process_on_dask, j, plan, pure=False,
                                      key=f"sct_deepseg_epi-{j.run.stem}-{os.urandom(4).hex()}"): j
                   for j in jobs}
        busy = []
        for fut in distributed.as_completed(list(futures)):
            j = futures[fut]
            try:
                rec = fut.result()
            except Exception as exc:  # KilledWorker, a worker that cannot import the package...
                rec = Record(j.run.rel, "failed", _clean(f"{type(exc).__name__}: {exc}"))
            if rec.status == "busy":
                busy.append(j)
            else:
                finished(rec)
        return busy


def _require_distributed():
    from ._optional import require

    return require("distributed")
