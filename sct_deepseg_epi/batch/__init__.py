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

Three modules, one idea each: :mod:`.worker` (one run, in whichever process it lands),
:mod:`.driver` (:func:`run_batch`: the dataset, the plan, the summary) and :mod:`.executors`
(where the jobs run: this process, a local pool, a Dask cluster). Nothing here imports
anything heavy at load time, so a worker's thread settings are in place before numpy or
ONNX Runtime start.
"""
from __future__ import annotations

from .driver import LOCK_NAME, SUMMARY_NAME, BatchResult, prepare_derivatives, read_summary, run_batch, write_summary
from .executors import thread_plan
from .worker import COLUMNS, Job, Record, cpu_count, mask_stats, plan_threads, process

__all__ = ["run_batch", "BatchResult", "Record", "Job", "COLUMNS", "SUMMARY_NAME", "LOCK_NAME", "cpu_count",
           "plan_threads", "thread_plan", "mask_stats", "process", "prepare_derivatives", "read_summary",
           "write_summary"]
