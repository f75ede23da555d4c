"""Time a model folder's ensemble in onnxruntime the way the engine runs it (numpy + onnxruntime only).

One "volume" is Z slices of H x W at a native spacing, taken to the model grid exactly as
:func:`~sct_deepseg_epi.preprocess.prepare` does (resampled, padded to the size multiple);
every member runs once on the slices
and once on their left-right flip (the default TTA), all on the CPU with a fixed number of
intra-op threads. Reports the median over repeats, after a warm-up run.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from ..registry.manifest import load_manifest


def time_ensemble(model_dir: Path | str, z: int = 24, native_xy: tuple[int, int] = (128, 128),
                  native_mm: tuple[float, float] = (1.0, 1.0), threads: int = 2, repeats: int = 5) -> dict:
    import onnxruntime as ort

    from ..preprocess import _pad_amounts, model_grid_shape

    spec = load_manifest(Path(model_dir))
    grid = model_grid_shape(native_xy, native_mm, spec.spacing_mm)
    hw = tuple(n + sum(_pad_amounts(n, spec.size_multiple)) for n in grid)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in spec.member_paths()]
    x = np.random.default_rng(0).normal(size=(z, spec.in_channels) + tuple(hw)).astype(np.float32)
    xf = np.ascontiguousarray(x[:, :, ::-1])
    passes = [(s, a) for s in sessions for a in [x] + ([xf] if spec.tta_flip_axes else [])]

    def once() -> float:
        t = time.perf_counter()
        for s, a in passes:
            s.run(["logits"], {"image": a})
        return time.perf_counter() - t

    once()
    times = [once() for _ in range(repeats)]
    return {"model": spec.ref, "passes": len(passes), "shape": [z, spec.in_channels, *hw], "threads": threads,
            "median_s": statistics.median(times), "min_s": min(times)}


if __name__ == "__main__":  # python -m sct_deepseg_epi.training.benchmark MODEL_DIR...
    import sys

    for d in sys.argv[1:]:
        print(d, time_ensemble(d))
