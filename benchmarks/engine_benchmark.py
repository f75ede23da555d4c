#!/usr/bin/env python
"""Time the whole command (process start to mask on disk) against the floor and a peer.

    python benchmarks/engine_benchmark.py [-model seg_sc_epi] [-runs 5] [-quick] [-no-peer]

Each run is a fresh process, as a user or a batch script starts it; wall time is measured
around it, CPU time (user + system) and peak memory (max RSS) come from the kernel's
accounting of that child (os.wait4). A forked child starts with its parent's resident
pages counted, so this script keeps its own process small: images and the peer model are
made by helper subprocesses. The cases, run in turns (one run of each, then again) so
that a busy spell on a shared machine does not land on one case only:

- floor: a Python process that loads the 128x128x24 NIfTI with nibabel, thresholds it and
  saves a mask, the least any Python tool that reads and writes NIfTI can cost;
- ``sct_deepseg_epi -i`` on synthetic EPI phantoms at 1 x 1 x 5 mm (64x64x12, 128x128x24,
  256x256x48; larger matrices are not shrunk by resampling, the worst case), default flags;
- a 300-volume 128x128x24 series, ``-4d mean`` and ``-4d each``;
- peer: nnUNetPredictor running a 3d_fullres plan that nnU-Net's own planner makes for
  128x128x24 EPI at 1 x 1 x 5 mm (as SCT's EPI model is), one fold, mirroring on, random
  weights, on the same 128x128x24 image: the whole process (imports, model loading,
  prediction, writing), as SCT runs it. Needs the ``nnunet`` extra; ``-no-peer`` skips it.

Prints a table of medians and the ratios the targets are stated in.
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

HERE = Path(__file__).resolve().parent
FLOOR = """\
import sys
import nibabel as nib
import numpy as np
img = nib.load(sys.argv[1])
a = np.asarray(img.dataobj, dtype=np.float32)
nib.save(nib.Nifti1Image((a > np.percentile(a, 99)).astype(np.uint8), img.affine), sys.argv[2])
"""


def make_inputs(folder: Path, quick: bool, n_vol: int) -> list[tuple[str, Path, list[str]]]:
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


def build_peer(workdir: Path) -> Path:
    """The nnU-Net trained folder of the peer (3d_fullres, one fold), planned by nnU-Net itself."""
    sys.path.insert(0, str(HERE))
    from nnunet_benchmark import SHAPE, ZOOMS

    sys.path.insert(0, str(HERE.parent / "tests"))  # the synthetic-model builders
    import torch

    torch.set_num_threads(1)
    from nnunet_synthetic import plan_dataset, write_trained

    trained = workdir / "trained" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if not (trained / "fold_0" / "checkpoint_final.pth").is_file():
        plans, dj, _ = plan_dataset(workdir / "nnunet", shape=SHAPE, zooms=ZOOMS, n_cases=3)
        write_trained(workdir / "trained", plans, dj, configuration="3d_fullres", folds=1, features=None,
                      logit_scale=4.0)
    return trained


def run_once(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak MiB) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{err[-3000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-model", default="seg_sc_epi")
    ap.add_argument("-runs", type=int, default=5)
    ap.add_argument("-quick", action="store_true", help="small cases only (a 30-volume series), no 256x256x48")
    ap.add_argument("-volumes", type=int, default=None, help="volumes of the series (default 300, 30 with -quick)")
    ap.add_argument("-no-peer", action="store_true", help="skip the nnUNetPredictor peer")
    ap.add_argument("-peer-workdir", help="reuse (or keep) the peer's nnU-Net model here")
    ap.add_argument("-extra", nargs=argparse.REMAINDER, default=[], help="more flags for every run, e.g. -tta 0")
    ap.add_argument("-make-inputs", metavar="DIR", help=argparse.SUPPRESS)  # helper subprocesses
    ap.add_argument("-make-peer", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n_vol = args.volumes or (30 if args.quick else 300)
    if args.make_inputs:
        from sct_deepseg_epi.api import load_model

        spec = load_model(args.model)
        cases = make_inputs(Path(args.make_inputs), args.quick, n_vol)
        print(json.dumps({"model": f"{spec.ref}: {len(spec.members)} members, spacing {spec.spacing_mm} mm, "
                                   f"{sum(p.stat().st_size for p in spec.member_paths()) / 1e6:.1f} MB",
                          "cases": [(label, str(p), flags) for label, p, flags in cases]}))
        return 0
    if args.make_peer:
        print(json.dumps({"trained": str(build_peer(Path(args.make_peer)))}))
        return 0

    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        made = subprocess.run([sys.executable, __file__, "-model", args.model, "-make-inputs", tmp,
                               "-volumes", str(n_vol)] + (["-quick"] if args.quick else []),
                              capture_output=True, text=True, check=True)
        info = json.loads(made.stdout)
        cases = [(label, Path(p), flags) for label, p, flags in info["cases"]]
        ref = next(p for label, p, _ in cases if label.startswith("128x128x24 3D"))
        (Path(tmp) / "floor.py").write_text(FLOOR)
        runs: list[tuple[str, list[str], dict | None]] = [
            ("floor: nibabel load, threshold, save", [sys.executable, str(Path(tmp) / "floor.py"), str(ref),
                                                      str(Path(tmp) / "floor_seg.nii.gz")], None)]
        for label, path, flags in cases:
            runs.append((f"sct_deepseg_epi {label}",
                         [sys.executable, "-m", "sct_deepseg_epi", "-i", str(path), "-o",
                          str(Path(tmp) / "out_seg.nii.gz"), "-model", args.model, "-v", "0", *flags, *args.extra],
                         None))
        if not args.no_peer:
            peer_dir = Path(args.peer_workdir or Path(tmp) / "peer")
            peer_dir.mkdir(parents=True, exist_ok=True)
            made = subprocess.run([sys.executable, __file__, "-make-peer", str(peer_dir)], capture_output=True,
                                  text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if made.returncode != 0:
                raise SystemExit(f"could not build the nnU-Net peer (needs the nnunet extra):\n{made.stderr[-2000:]}")
            trained = json.loads(made.stdout.strip().splitlines()[-1])["trained"]
            # nnU-Net caps torch's threads at nnUNet_def_n_proc while it predicts: the same CPUs as ours
            env = dict(os.environ, OMP_NUM_THREADS=str(cpus), MKL_NUM_THREADS=str(cpus), nnUNet_def_n_proc=str(cpus))
            runs.append(("peer: nnUNetPredictor 3d_fullres 1 fold 128x128x24",
                         [sys.executable, str(HERE / "nnunet_benchmark.py"), "-worker", "nnunet", "-mirror", "1",
                          "-runs", "1", "-threads", str(cpus), "-trained", trained, "-model", trained,
                          "-image", str(ref), "-out", str(Path(tmp) / "peer_seg.nii.gz")], env))

        print(f"model {info['model']}; cpus {cpus}; {args.runs} runs per case, taking turns; "
              f"flags {' '.join(args.extra) or '(defaults)'}", flush=True)
        results: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in runs}
        for _ in range(args.runs):
            for label, cmd, env in runs:
                results[label].append(run_once(cmd, env))
        print(f"| {'case':<52} | {'median s':>8} | {'min s':>6} | {'max s':>6} | {'CPU s':>6} | {'peak MiB':>8} |")
        print(f"|{'-' * 54}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 10}|")
        med = {}
        for label, rs in results.items():
            secs = [r[0] for r in rs]
            med[label] = (statistics.median(secs), statistics.median(r[1] for r in rs),
                          statistics.median(r[2] for r in rs))
            print(f"| {label:<52} | {med[label][0]:>8.2f} | {min(secs):>6.2f} | {max(secs):>6.2f} | "
                  f"{med[label][1]:>6.2f} | {med[label][2]:>8.0f} |")
        floor = med[runs[0][0]]
        ours = med["sct_deepseg_epi 128x128x24 3D"]
        each = med[f"sct_deepseg_epi 128x128x{24}x{n_vol} -4d each"]
        print(f"\nsct_deepseg_epi 128x128x24 / floor: {ours[0] / floor[0]:.2f}x wall, {ours[1] / floor[1]:.2f}x CPU "
              "(target <= 2.5x, aim 2x)")
        if not args.no_peer:
            peer = med[runs[-1][0]]
            print(f"peer / sct_deepseg_epi 128x128x24: {peer[0] / ours[0]:.1f}x wall, {peer[1] / ours[1]:.1f}x CPU "
                  f"(target >= 15x); peak memory ours / peer {ours[2] / peer[2]:.2f} (target <= 0.33)")
        print(f"-4d each, {n_vol} volumes: {each[0]:.1f} s, {n_vol / each[0]:.1f} volumes/s, peak {each[2]:.0f} MiB"
              + (" (target < 30 s)" if n_vol == 300 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
