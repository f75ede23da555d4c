#!/usr/bin/env python
"""Time the whole command (process start to mask on disk) and its peak memory (max RSS).

    python benchmarks/engine_benchmark.py [-model seg_sc_epi] [-runs 5] [-quick]

Each run is a fresh ``python -m sct_deepseg_epi`` process, as a user or a batch script
starts it; max RSS comes from the kernel's accounting of that child (os.wait4). A forked
child starts with its parent's resident pages counted, so this script keeps its own process
small: the images are made, and the model is described, by a helper subprocess. Images are
synthetic EPI phantoms at 1 x 1 x 5 mm (so larger matrices are not shrunk by resampling,
the worst case). Prints a table of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def make_inputs(folder: Path, quick: bool) -> list[tuple[str, Path, list[str]]]:
    import nibabel as nib
    import numpy as np

    from sct_deepseg_epi.phantom import make_phantom

    cases = []
    sizes = [(64, 64, 12), (128, 128, 24)] + ([] if quick else [(256, 256, 48)])
    for shape in sizes:
        ph = make_phantom(shape, n_volumes=1, zooms=(1.0, 1.0, 5.0), seed=1)
        p = folder / f"vol_{'x'.join(map(str, shape))}.nii.gz"
        nib.save(ph.image, str(p))
        cases.append((f"{'x'.join(map(str, shape))} 3D", p, []))
    n_vol = 30 if quick else 300
    ph = make_phantom((128, 128, 24), n_volumes=4, zooms=(1.0, 1.0, 5.0), seed=2)
    base = np.asarray(ph.image.dataobj, dtype=np.float32)
    rng = np.random.default_rng(0)
    series = np.empty(base.shape[:3] + (n_vol,), np.int16)  # scanners store int16
    for t in range(n_vol):
        series[..., t] = np.clip(base[..., t % 4] + rng.normal(0, 8, base.shape[:3]), 0, 32767)
    p = folder / f"bold_128x128x24x{n_vol}.nii.gz"
    nib.save(nib.Nifti1Image(series, ph.image.affine, ph.image.header), str(p))
    cases.append((f"128x128x24x{n_vol} -4d mean", p, ["-4d", "mean"]))
    cases.append((f"128x128x24x{n_vol} -4d each", p, ["-4d", "each"]))
    return cases


def run_once(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak MiB) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{err}")
    return elapsed, usage.ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-model", default="seg_sc_epi")
    ap.add_argument("-runs", type=int, default=5)
    ap.add_argument("-quick", action="store_true", help="small cases only (a 30-volume series)")
    ap.add_argument("-extra", nargs=argparse.REMAINDER, default=[], help="more flags for every run, e.g. -tta 0")
    ap.add_argument("-make-inputs", metavar="DIR", help=argparse.SUPPRESS)  # the helper subprocess
    args = ap.parse_args(argv)
    if args.make_inputs:
        from sct_deepseg_epi.api import load_model

        spec = load_model(args.model)
        cases = make_inputs(Path(args.make_inputs), args.quick)
        print(json.dumps({"model": f"{spec.ref}: {len(spec.members)} members, spacing {spec.spacing_mm} mm, "
                                   f"{sum(p.stat().st_size for p in spec.member_paths()) / 1e6:.1f} MB",
                          "cases": [(label, str(p), flags) for label, p, flags in cases]}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        made = subprocess.run([sys.executable, __file__, "-model", args.model, "-make-inputs", tmp]
                              + (["-quick"] if args.quick else []), capture_output=True, text=True, check=True)
        info = json.loads(made.stdout)
        cases = [(label, Path(p), flags) for label, p, flags in info["cases"]]
        print(f"model {info['model']}; cpus {os.cpu_count()}; {args.runs} runs per case; "
              f"flags {' '.join(args.extra) or '(defaults)'}")
        print(f"| {'case':<28} | {'median s':>8} | {'min s':>6} | {'max s':>6} | {'peak MiB':>8} |")
        print(f"|{'-' * 30}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 10}|")
        for label, path, flags in cases:
            cmd = [sys.executable, "-m", "sct_deepseg_epi", "-i", str(path), "-o", str(Path(tmp) / "out_seg.nii.gz"),
                   "-model", args.model, "-v", "0", *flags, *args.extra]
            results = [run_once(cmd) for _ in range(args.runs)]
            secs = [r[0] for r in results]
            mem = statistics.median(r[1] for r in results)
            print(f"| {label:<28} | {statistics.median(secs):>8.2f} | {min(secs):>6.2f} | {max(secs):>6.2f} | {mem:>8.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
