#!/usr/bin/env python
"""Where the time of one segmentation goes: imports, stages, ONNX Runtime calls and nodes.

    python benchmarks/profile_engine.py [-i IMAGE] [-model seg_sc_epi] [-repeat 5] [-threads N]

Without ``-i`` a 128x128x24 synthetic EPI phantom (1 x 1 x 5 mm) is made. Every figure is
given as wall time and as CPU time (all threads of the process): on a machine that other
work shares, CPU time is the steadier measure of what the engine costs. Prints

- imports: self time per top-level package, from ``python -X importtime`` of the whole
  command in a fresh process;
- stages: wall and CPU seconds of each stage of one in-process run (median of -repeat,
  after one warm-up run that builds the sessions);
- calls: every ONNX Runtime call of the last run (input shape, pixels, wall, CPU);
- nodes: ONNX Runtime's own profiler, summed per operator type and the slowest nodes;
- with ``-study``: one member alone, milliseconds per million input pixels for several call
  sizes, arena on and off, graph optimisation with and without the NCHWc layout
  (``ORT_ENABLE_ALL`` vs ``ORT_ENABLE_EXTENDED``), and for a 128x128x24 pass the two ways to
  use 2 cores: ONNX Runtime's intra-op threads on large calls, or small calls side by side.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_phantom(path: Path) -> None:
    import nibabel as nib

    from sct_deepseg_epi.phantom import make_phantom

    nib.save(make_phantom((128, 128, 24), n_volumes=1, zooms=(1.0, 1.0, 5.0), seed=1).image, str(path))


def import_costs(image: Path, out: Path, model: str, mode_4d: str) -> list[tuple[str, float]]:
    """Self import time (s) per top-level package of the whole command, in a fresh process."""
    cmd = [sys.executable, "-X", "importtime", "-m", "sct_deepseg_epi", "-i", str(image), "-o", str(out),
           "-model", model, "-v", "0", "-4d", mode_4d]
    err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    per: dict[str, float] = collections.defaultdict(float)
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line.split("|")
        per[parts[2].strip().split(".")[0]] += int(parts[0].split(":")[1]) / 1e6
    return sorted(per.items(), key=lambda kv: -kv[1])


class Clock:
    """Wall and CPU (process, all threads) seconds per label."""

    def __init__(self):
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)

    def wrap(self, label: str, fn):
        def timed(*a, **kw):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.wall[label] += time.perf_counter() - t0
                self.cpu[label] += time.process_time() - c0
        return timed


def study(member: Path, cpus: int) -> None:
    """Per-call cost of one member under the settings the engine could choose."""
    import numpy as np
    import onnxruntime as ort
    from concurrent.futures import ThreadPoolExecutor

    def session(level, threads: int, arena: bool):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.enable_cpu_mem_arena = arena
        so.graph_optimization_level = level
        so.log_severity_level = 3
        return ort.InferenceSession(str(member), so, providers=["CPUExecutionProvider"])

    def best(fn, n: int) -> tuple[float, float]:
        fn()
        walls, cpus_ = [], []
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - t0)
            cpus_.append(time.process_time() - c0)
        return statistics.median(walls), statistics.median(cpus_)

    rng = np.random.default_rng(0)
    levels = {"ALL (NCHWc)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    print("\n## one member, 1 thread: CPU ms per million input pixels (median of 15 calls)")
    shapes = [(1, 128, 128), (2, 128, 128), (8, 128, 128), (24, 128, 128), (48, 128, 128), (20, 40, 40),
              (48, 40, 40), (1, 256, 256), (4, 256, 256)]
    print(f"  {'call (N, H, W)':<16} {'pixels':>8} " + " ".join(f"{f'{lv} arena {a}':>22}" for lv in levels
                                                                  for a in ("off", "on")))
    sessions = {(lv, a): session(level, 1, a == "on") for lv, level in levels.items() for a in ("off", "on")}
    for n, h, w in shapes:
        x = rng.standard_normal((n, 1, h, w)).astype(np.float32)
        row = []
        for key, sess in sessions.items():
            _, c = best(lambda: sess.run(None, {"image": x}), 15)
            row.append(c * 1e9 / (n * h * w))
        print(f"  {str((n, h, w)):<16} {n * h * w:>8} " + " ".join(f"{v:>22.0f}" for v in row))
    if cpus < 2:
        return
    x = rng.standard_normal((24, 1, 128, 128)).astype(np.float32)
    print(f"\n## a 128x128x24 pass of one member on {cpus} cores (median of 9; wall and CPU ms)")
    for threads, per_call, workers in ((1, 24, 1), (cpus, 24, 1), (cpus, 2, 1), (1, 2, cpus)):
        sess = session(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads, True)
        parts = [x[i:i + per_call] for i in range(0, 24, per_call)]
        pool = ThreadPoolExecutor(workers) if workers > 1 else None

        def one_pass():
            run = lambda p: sess.run(None, {"image": p})  # noqa: E731
            list(pool.map(run, parts) if pool else map(run, parts))

        wall, c = best(one_pass, 9)
        print(f"  intra-op threads {threads}, {per_call:>2} slices per call, {workers} call(s) at a time: "
              f"wall {wall * 1e3:6.1f}  CPU {c * 1e3:6.1f}")
        if pool:
            pool.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", type=Path, help="image to segment (default: a 128x128x24 phantom)")
    ap.add_argument("-model", default="seg_sc_epi")
    ap.add_argument("-repeat", type=int, default=5)
    ap.add_argument("-threads", type=int, default=None)
    ap.add_argument("-4d", dest="mode_4d", choices=("mean", "each"), default="mean", help="for a 4D -i")
    ap.add_argument("-study", action="store_true", help="also compare call sizes, arena, layouts and threading")
    ap.add_argument("-top", type=int, default=10, help="slowest nodes to list")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="profile_engine_"))
    image = args.i or tmp / "phantom_128x128x24.nii.gz"
    if args.i is None:
        make_phantom(image)

    print(f"image {image}; model {args.model}; cpus {len(os.sched_getaffinity(0))}")
    print("\n## imports (self time per top-level package, one fresh process of the whole command)")
    costs = import_costs(image, tmp / "imp_seg.nii.gz", args.model, args.mode_4d)
    for name, s in costs[:8]:
        print(f"  {name:<24} {s * 1e3:7.1f} ms")
    print(f"  {'all':<24} {sum(s for _, s in costs) * 1e3:7.1f} ms")

    import onnxruntime as ort

    profile_dir = tmp / "ort"
    profile_dir.mkdir()
    plain_session = ort.InferenceSession

    class ProfiledSession(plain_session):
        """Every session the engine makes writes ONNX Runtime's profile."""

        def __init__(self, path, sess_options=None, *a, **kw):
            sess_options = sess_options or ort.SessionOptions()
            sess_options.enable_profiling = True
            sess_options.profile_file_prefix = str(profile_dir / Path(str(path)).stem)
            super().__init__(path, sess_options, *a, **kw)

    ort.InferenceSession = ProfiledSession

    from sct_deepseg_epi import api, infer, postprocess, preprocess, write
    from sct_deepseg_epi.options import Options

    options = Options(threads=args.threads, mode_4d=args.mode_4d)
    clock = Clock()
    calls: list[tuple[tuple, float, float]] = []
    plain_run = plain_session.run

    def run(self, names, feeds, *a, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        out = plain_run(self, names, feeds, *a, **kw)
        calls.append((feeds["image"].shape, time.perf_counter() - t0, time.process_time() - c0))
        return out

    ProfiledSession.run = run
    for name in ("prepare", "model_volume", "prepare_from"):  # whichever this version of the engine calls
        if hasattr(infer, name):
            setattr(infer, name, clock.wrap("preprocess", getattr(preprocess, name)))
    infer.restore = clock.wrap("restore", preprocess.restore)
    quick = "_localise" if hasattr(infer.SliceBackend, "_localise") else "localise"
    setattr(infer.SliceBackend, quick, clock.wrap("quick pass", getattr(infer.SliceBackend, quick)))
    infer.Ensemble.predict = clock.wrap("ensemble (all calls)", infer.Ensemble.predict)
    api.finish = clock.wrap("postprocess", postprocess.finish)
    api.read_volume = clock.wrap("read", api.read_volume)
    api.save_nifti = clock.wrap("write", write.save_nifti)
    write.FrameWriter.write = clock.wrap("write", write.FrameWriter.write)

    out = tmp / "out_seg.nii.gz"
    api.run(image, out, model=args.model, options=options)  # warm-up: sessions
    per_run: list[tuple[dict, dict]] = []
    for _ in range(args.repeat):
        clock.wall.clear()
        clock.cpu.clear()
        calls.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        api.run(image, out, model=args.model, options=options)
        clock.wall["run (in process)"] = time.perf_counter() - t0
        clock.cpu["run (in process)"] = time.process_time() - c0
        per_run.append((dict(clock.wall), dict(clock.cpu)))
    print(f"\n## stages (median of {args.repeat} in-process runs; the ensemble line includes the quick pass)")
    print(f"  {'stage':<24} {'wall ms':>8} {'cpu ms':>8}")
    for label in per_run[-1][0]:
        w = statistics.median(r[0].get(label, 0.0) for r in per_run)
        c = statistics.median(r[1].get(label, 0.0) for r in per_run)
        print(f"  {label:<24} {w * 1e3:8.1f} {c * 1e3:8.1f}")

    print(f"\n## ONNX Runtime calls of the last run ({len(calls)}; CPU time is the process's, so calls that ran"
          " side by side count each other's: exact with -threads 1)")
    for shape, w, c in calls[:40]:
        px = shape[0] * shape[2] * shape[3]
        print(f"  {str(tuple(shape)):<20} {px:>8} px  wall {w * 1e3:7.2f} ms  cpu {c * 1e3:7.2f} ms")
    if len(calls) > 40:
        print(f"  ... {len(calls) - 40} more")
    total_px = sum(s[0] * s[2] * s[3] for s, _, _ in calls)
    cpu = sum(c for _, _, c in calls)
    print(f"  total {total_px} px, cpu {cpu * 1e3:.1f} ms ({cpu * 1e3 / max(total_px, 1) * 1e6:.0f} ms per Mpx)")

    infer._SESSIONS.clear()
    from sct_deepseg_epi import backend

    backend._CACHE.clear()
    import gc

    gc.collect()
    by_op: dict[str, float] = collections.defaultdict(float)
    by_node: dict[str, list[float]] = collections.defaultdict(list)
    n_runs = 0
    for f in profile_dir.glob("*.json"):
        for e in json.loads(f.read_text()):
            if e.get("cat") == "Session" and e.get("name") == "model_run":
                n_runs += 1
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                by_op[e["args"]["op_name"]] += e["dur"] / 1e6
                by_node[e["name"][:-len("_kernel_time")]].append(e["dur"] / 1e6)
    total = sum(by_op.values())
    print(f"\n## ONNX Runtime profiler, all {n_runs} calls of {args.repeat + 1} runs (kernel time, summed over threads' waits)")
    for op, s in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:<24} {s * 1e3:8.1f} ms  {100 * s / total:5.1f} %")
    print("  slowest nodes (total ms over all calls):")
    for name, d in sorted(by_node.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
        print(f"    {name:<56} {sum(d) * 1e3:8.1f}")
    if args.study:
        from sct_deepseg_epi.api import load_model

        ort.InferenceSession = plain_session
        study(load_model(args.model).member_paths()[0], len(os.sched_getaffinity(0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
