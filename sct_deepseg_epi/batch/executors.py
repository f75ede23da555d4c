"""Executors: where the jobs run. Each is a context manager with ``run_all(jobs, finished)``,
which returns the jobs that another batch holds (to be retried with a wait)."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import replace as _replace
from typing import Any, Callable

from ..errors import InputError
from .worker import Job, Record, clean, cpu_count, dask_threads, init_worker, process

log = logging.getLogger("sct_deepseg_epi.batch")


def settle(job: Job, result: Callable[[], Record], busy: list[Job], finished: Callable[[Record], None]) -> None:
    """Record a finished job: its Record, a failure if getting it raised, or a retry later if it was busy."""
    try:
        rec = result()
    except Exception as exc:  # pickling problems, KilledWorker, a worker that cannot import the package...
        rec = Record(job.run.rel, "failed", clean(f"{type(exc).__name__}: {exc}"))
    if rec.status == "busy":
        busy.append(job)
    else:
        finished(rec)


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
        job = _replace(job, threads=dask_threads(plan))
    return process(job)


class Serial:
    """Runs in this process, one after another (``-jobs 1``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run_all(self, jobs: list[Job], finished: Callable[[Record], None]) -> list[Job]:
        busy: list[Job] = []
        for j in jobs:
            settle(j, lambda: process(j), busy, finished)
        return busy


class Pool:
    """A spawn-based process pool that survives a worker dying (killed, out of memory)."""

    def __init__(self, jobs: int, threads: int):
        self.jobs, self.threads = jobs, threads
        self.pool = None

    def _new(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        level = logging.getLogger("sct_deepseg_epi").getEffectiveLevel()
        self.pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=init_worker, initargs=(self.threads, max(level, logging.ERROR)))

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
                if isinstance(fut.exception(), BrokenProcessPool):
                    broken = True
                    attempts[j.run.rel] = attempts.get(j.run.rel, 0) + 1
                    if attempts[j.run.rel] >= 2:
                        finished(Record(j.run.rel, "failed", "the worker process died twice on this run "
                                                             "(killed, or out of memory?)"))
                    else:
                        queue.append(j)
                    continue
                settle(j, fut.result, busy, finished)
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


class Dask:
    """Tasks on a Dask cluster: a scheduler address, ``'local'`` (a LocalCluster), or the caller's client."""

    def __init__(self, scheduler: str | None, client: Any, jobs: int):
        self.scheduler, self.client, self.jobs = scheduler, client, jobs
        self.own: list = []

    def __enter__(self):
        if self.client is None:
            distributed = require_distributed()
            if self.scheduler == "local":
                try:
                    cluster = distributed.LocalCluster(n_workers=max(1, self.jobs), threads_per_worker=1,
                                                       processes=True, host="127.0.0.1", dashboard_address=None)
                except Exception as exc:  # Dask wraps every start-up failure in its own RuntimeError
                    raise InputError(f"cannot start a local Dask cluster ({clean(exc)})") from None
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
        distributed = require_distributed()
        try:
            plan = thread_plan(self.client)
        except Exception as exc:  # a scheduler that will not say: let each task decide
            log.debug("no thread plan from the Dask cluster: %s", exc)
            plan = {}
        futures = {self.client.submit(_process_on_dask, j, plan, pure=False,
                                      key=f"sct_deepseg_epi-{j.run.stem}-{os.urandom(4).hex()}"): j
                   for j in jobs}
        busy: list[Job] = []
        for fut in distributed.as_completed(list(futures)):
            settle(futures[fut], fut.result, busy, finished)
        return busy


def require_distributed():
    from .._optional import require

    return require("distributed")
