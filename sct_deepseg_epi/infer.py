"""Stage 3, infer: the backend of slice models (``backend.kind == "slices"``).

:class:`SliceBackend` prepares a RAS volume on the model's in-plane grid, runs the
:class:`Ensemble` on it and restores the probabilities to the native grid. Each member
runs once per flip combination (test-time augmentation); probabilities, not logits, are
averaged so that members with different calibration weigh the same. ONNX Runtime
sessions are created once per process and reused for every volume.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .backend import Probabilities
from .errors import ModelError
from .options import DEVICES
from .preprocess import (Prepared, check_model_grid, model_grid_shape, model_volume, normalise, prepare_from,
                         resample_inplane, restore, roi_around, slice_stack)
from .registry.manifest import ModelSpec

if TYPE_CHECKING:
    from .read import Volume

log = logging.getLogger(__name__)
_SESSIONS: dict[tuple, object] = {}
_SHARED_ARENA = False
PIXELS_PER_CALL = 1 << 19  # input pixels per ONNX Runtime call on a GPU (about 60 MB of activations)
# On CPU: 2 slices of 128 x 128, or 1 with its flip: an 8-32 channel U-Net's activations then fit
# in a core's L2 cache. Measured: 105-125 ms of CPU per million pixels up to 130k pixels per call,
# 130-250 ms at 400-800k (docs/performance.md)
CPU_CALL_PIXELS = 1 << 15
ROI_MARGIN_MM = 12.0  # margin around the cord found first: covers motion and keeps CSF/tissue context


def _ort():
    import onnxruntime as ort  # imported on first use: ~0.2 s that -h does not need

    return ort


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may use (cgroup/affinity aware where possible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def bounded_threads(threads: int | None) -> int:
    """``-threads``, at most the CPUs available (with a warning); None: all of them.

    ONNX Runtime starts every thread it is given: 10000 threads take minutes to start and
    then fight over the cores. Fewer than 1 is refused where options are made.
    """
    cpus = default_threads()
    if threads is None:
        return cpus
    if threads > cpus:
        log.warning("-threads %d is more than the %d CPU(s) available to this process; using %d", threads, cpus, cpus)
        return cpus
    return int(threads)


def providers_for(device: str) -> list[str]:
    """ONNX Runtime providers for ``-device``; 'cuda' without a CUDA build is an error."""
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = _ort().get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ModelError("-device cuda: this onnxruntime has no CUDA provider (pip install 'sct_deepseg_epi[gpu]')")
    if device in ("cuda", "auto") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _register_shared_arena(ort) -> None:
    """Once per process: a CPU arena that the sessions asking for it share (see new_session)."""
    global _SHARED_ARENA
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # power-of-two growth: a few large regions that later passes fit into again. Growing by
        # what is asked fragments: 850 MB peak vs 685 MB over 40 passes of a realistic 3D U-Net
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 0}))
        _SHARED_ARENA = True


def new_session(path: Path, providers: Sequence[str], threads: int, *, shared_arena: bool = False):
    """An InferenceSession for one member file, set up for low memory and a fixed thread count.

    By default a session has no memory arena. ``shared_arena`` makes it use one
    process-wide arena: large networks whose sessions come and go (streamed nnU-Net folds)
    then reuse their activations' pages, hundreds of MB per pass, instead of fresh pages
    that the kernel must fault in and zero on every pass; the slice ensemble's members,
    whose calls run on several threads, share a few calls' worth of buffers.
    """
    ort = _ort()
    opts = ort.SessionOptions()
    # an arena keeps the largest call's buffers for the life of the process
    opts.enable_cpu_mem_arena = shared_arena
    if shared_arena:
        _register_shared_arena(ort)
        opts.add_session_config_entry("session.use_env_allocators", "1")
        # weights stay out of the arena, so that a released session gives them back
        opts.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as exc:  # ORT raises its own untyped errors for bad graphs
        raise ModelError(f"{path}: ONNX Runtime cannot load this model ({str(exc).splitlines()[0]})") from None


def get_session(path: Path, providers: Sequence[str], threads: int, *, shared_arena: bool = False):
    """The process-wide cached session for one member file."""
    key = (str(path), tuple(providers), threads, shared_arena)
    if key not in _SESSIONS:
        _SESSIONS[key] = new_session(path, providers, threads, shared_arena=shared_arena)
    return _SESSIONS[key]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # clipped so exp cannot overflow; float32 throughout (logaddexp is several times slower)
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))).astype(np.float32, copy=False)


def _foreground(out: np.ndarray, activation: str) -> np.ndarray:
    """Member output (N, K, H, W) -> foreground probability (N, H, W)."""
    if activation == "sigmoid":
        return _sigmoid(out[:, 0])
    e = np.exp(out - out.max(axis=1, keepdims=True))
    return (e[:, 1:].sum(axis=1) / e.sum(axis=1)).astype(np.float32)


def flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of the allowed flips, the identity first (as nnUNet mirrors)."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class Ensemble:
    """The ONNX members of one model, ready to run. Build once, call for every volume.

    On CPU, each ONNX Runtime call covers a few slices (about :data:`CPU_CALL_PIXELS`
    input pixels, flips included) and runs on one thread, and ``threads`` calls run side by
    side: a small U-Net's activations then stay in a core's cache, nothing is allocated
    anew per call, and the cores never wait for each other inside an operator. Results do
    not depend on how slices are grouped into calls, and each slice's members are summed in
    member order, so the output is the same bit for bit whatever the call size or thread count.
    """

    def __init__(self, spec: ModelSpec, *, device: str = "auto", threads: int | None = None, tta: bool = True):
        self.spec = spec
        self.providers = providers_for(device)
        self.threads = bounded_threads(threads)
        self.on_cpu = self.providers[0] == "CPUExecutionProvider"
        # CPU: parallel across calls, one thread each; GPU: ONNX Runtime's own threads, large calls
        session_threads = 1 if self.on_cpu else self.threads
        self.workers = self.threads if self.on_cpu else 1
        self.call_pixels = CPU_CALL_PIXELS if self.on_cpu else PIXELS_PER_CALL
        # one arena for all members: calls are small, so it stays at a few calls' activations, where
        # malloc's per-thread heaps grow (125 vs 200 MB after 12 volumes on 2 threads)
        self.sessions = [get_session(p, self.providers, session_threads, shared_arena=self.on_cpu)
                         for p in spec.member_paths()]
        self.flips = flip_sets(spec.tta_flip_axes) if tta else [()]
        self.provider = self.sessions[0].get_providers()[0]
        self._pool = None

    def _map(self, fn, items: list) -> Iterator:
        """``map(fn, items)`` in order, on ``workers`` threads (ONNX Runtime releases the GIL)."""
        if self.workers == 1 or len(items) == 1:
            return map(fn, items)
        if self._pool is None or self._pool[0] != os.getpid():  # a forked child has none of the threads
            from concurrent.futures import ThreadPoolExecutor

            self._pool = (os.getpid(), ThreadPoolExecutor(self.workers, thread_name_prefix="sct_deepseg_epi-infer"))
        return self._pool[1].map(fn, items)

    def _run_member(self, sess, batch: np.ndarray, flips: list[tuple[int, ...]],
                    known: np.ndarray | None = None) -> np.ndarray:
        """One member's flip-averaged probability for ``batch``; ``known``: its unflipped one, already computed."""
        todo = flips[1:] if known is not None else flips  # flips[0] is the identity
        n = batch.shape[0]
        prob = None
        if todo:  # all flips of a chunk go through the network in one call
            views = [np.flip(batch, axis=tuple(a + 2 for a in f)) if f else batch for f in todo]
            image = np.ascontiguousarray(views[0] if len(views) == 1 else np.concatenate(views))
            prob = _foreground(sess.run(["logits"], {"image": image})[0], self.spec.activation)
        acc = np.zeros((n,) + batch.shape[2:], np.float32)
        for i, f in enumerate(flips):
            if known is not None:
                p = known if i == 0 else prob[(i - 1) * n:i * n]
            else:
                p = prob[i * n:(i + 1) * n]
            acc += np.flip(p, axis=tuple(a + 1 for a in f)) if f else p
        return acc / len(flips)

    def slices_per_call(self, shape_hw: tuple[int, int], n_flips: int) -> int:
        return max(1, self.call_pixels // (shape_hw[0] * shape_hw[1] * n_flips))

    def predict(self, batch: np.ndarray, quick: bool = False, first: np.ndarray | None = None) -> Probabilities:
        """(Z, C, H, W) -> mean probability and member disagreement (std), each (Z, H, W).

        ``quick`` runs the first member alone without flips: a cheap pass to find the cord
        (its disagreement is not computed). ``first`` is that pass's probability for this
        same batch, when there is one: the first member's unflipped call is then not run again.
        """
        if batch.ndim != 4 or batch.shape[1] != self.spec.in_channels:
            raise ModelError(f"model {self.spec.ref} expects (Z, {self.spec.in_channels}, H, W) input, got {batch.shape}")
        sessions = self.sessions[:1] if quick else self.sessions
        flips = [()] if quick else self.flips
        z = batch.shape[0]
        chunk = self.slices_per_call(batch.shape[2:], len(flips))
        calls = [(s, m) for s in range(0, z, chunk) for m in range(len(sessions))]  # members in order per slice

        def run(call: tuple[int, int]) -> np.ndarray:
            s, m = call
            known = first[s:s + chunk] if first is not None and m == 0 and not quick else None
            return self._run_member(sessions[m], batch[s:s + chunk], flips, known)

        mean = np.zeros((z,) + batch.shape[2:], np.float32)
        sq = np.zeros_like(mean)
        for (s, _), p in zip(calls, self._map(run, calls)):
            mean[s:s + chunk] += p
            if not quick:
                sq[s:s + chunk] += p * p
        k = len(sessions)
        mean /= k
        if quick:
            return Probabilities(mean, sq)
        std = np.sqrt(np.maximum(sq / k - mean * mean, 0)).astype(np.float32)
        return Probabilities(mean, std)


class SliceBackend:
    """The slice-model backend: prepare -> ensemble -> restore, optionally on a region around the cord."""

    regional = True

    def __init__(self, spec: ModelSpec, *, device: str = "auto", threads: int | None = None, tta: bool = True,
                 localise_at: float = 0.5):
        self.spec = spec
        self.ensemble = Ensemble(spec, device=device, threads=threads, tta=tta)
        self.provider = self.ensemble.provider
        self.localise_at = localise_at  # the threshold at which the quick pass finds the cord

    def provenance(self) -> dict:
        """What the sidecar's ``model`` records about this kind of model, beyond its name and members."""
        return {}

    def localise(self, prep: Prepared) -> tuple[slice, slice] | None:
        """Region around every object a quick pass (one member, no flips) finds, or None.

        None (run the whole field) when nothing is found or the region would cover most of it.
        """
        return self._localise(prep)[0]

    def _localise(self, prep: Prepared) -> tuple[tuple[slice, slice] | None, np.ndarray]:
        """(:meth:`localise`'s region, the quick pass's probability on ``prep.batch``)."""
        quick = self.ensemble.predict(prep.batch, quick=True).probability
        (a0, a1), (b0, b1) = prep.pad
        found = quick[:, a0:quick.shape[1] - a1, b0:quick.shape[2] - b1] >= self.localise_at
        roi = roi_around(np.moveaxis(found, 0, 2), self.spec, prep.model_xy, ROI_MARGIN_MM)
        if roi is None or (roi[0].stop - roi[0].start) * (roi[1].stop - roi[1].start) > 0.6 * np.prod(prep.model_xy):
            return None, quick
        return roi, quick

    def predict(self, data_ras: np.ndarray, vol: Volume, *, region: tuple[slice, slice] | None = None,
                localise: bool = False, timings: dict[str, float]) -> Probabilities:
        t0 = time.perf_counter()
        grid = model_volume(data_ras, vol.zooms, self.spec, source=vol.source)
        prep = prepare_from(grid, self.spec, roi=region)
        t1 = time.perf_counter()
        first = None
        if region is None and localise:
            region, quick = self._localise(prep)
            if region is None:  # the whole field after all: the quick pass was the first member's identity call
                first = quick
            else:
                prep = prepare_from(grid, self.spec, roi=region)
        out = self.ensemble.predict(prep.batch, first=first)
        prob = np.clip(restore(out.probability, prep), 0, 1)
        dis = restore(out.disagreement, prep)
        t2 = time.perf_counter()
        timings["preprocess"] = timings.get("preprocess", 0.0) + t1 - t0
        timings["infer"] = timings.get("infer", 0.0) + t2 - t1
        return Probabilities(prob, dis)

    def region_around(self, mask_ras: np.ndarray, vol: Volume) -> tuple[slice, slice] | None:
        model_xy = model_grid_shape(mask_ras.shape[:2], vol.zooms[:2], self.spec.spacing_mm)
        return roi_around(mask_ras, self.spec, model_xy, ROI_MARGIN_MM)

    def predict_window(self, data_ras: np.ndarray, vol: Volume, z: int, centre: tuple[int, int],
                       size_mm: float) -> np.ndarray:
        """Slice ``z`` (and its context slices) run in a window of ``size_mm`` centred on voxel ``centre``
        and normalised on that window alone: (X, Y) on the native RAS grid, NaN outside the window."""
        spec = self.spec
        model_xy = check_model_grid(data_ras.shape, vol.zooms, spec.spacing_mm, vol.source)
        c = spec.context_slices
        idx = np.clip(np.arange(z - c, z + c + 1), 0, data_ras.shape[2] - 1)  # edge slices repeated, as slice_stack
        plane = resample_inplane(data_ras[:, :, idx], model_xy)
        win = []
        for axis in range(2):
            n = model_xy[axis]
            size = min(n, int(round(size_mm / spec.spacing_mm[axis])))  # padded to the size multiple below
            mid = (centre[axis] + 0.5) * n / data_ras.shape[axis]
            lo = min(max(0, int(np.floor(mid - size / 2))), n - size)
            win.append(slice(lo, lo + size))
        part = normalise(plane[win[0], win[1]], spec.normalisation)
        pad = tuple((0, (-part.shape[a]) % spec.size_multiple) for a in range(2))
        part = np.pad(part, pad + ((0, 0),), mode="constant", constant_values=float(part.min()))
        batch = slice_stack(part, c)[c:c + 1]  # the middle slice, with its neighbours as channels
        prep = Prepared(batch, (int(data_ras.shape[0]), int(data_ras.shape[1])), model_xy, pad, (win[0], win[1]))
        out = self.ensemble.predict(batch)
        prob = np.clip(restore(out.probability, prep)[:, :, 0], 0, 1)
        # where the window's edge blends with the zeros around it, the map is not the window's
        inside = restore(np.ones_like(out.probability), prep)[:, :, 0] > 0.999
        return np.where(inside, prob, np.nan).astype(np.float32)
