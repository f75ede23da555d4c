#!/usr/bin/env python
"""Throughput of ``sct_deepseg_epi batch``: runs per minute for 1 job, 2 jobs and a Dask local cluster.

    python benchmarks/batch_benchmark.py [-runs 40] [-shape 64x64x12] [-volumes 8] [-model REF] [-quick]

Builds a synthetic BIDS dataset of EPI phantoms (sub-*/func/*_bold.nii.gz, int16, 4D, the
temporal mean is segmented: the batch default), then times :func:`batch.run_batch` end to
end for each configuration into a fresh derivatives folder: discovery, model check,
process or cluster start-up, segmentation, sidecars, summary. Throughput on this machine
is extrapolated to 400 runs (the size of the multi-site spinal cord EPI dataset).

Which model: ``seg_sc_epi`` when it is installed; otherwise a stand-in built here with
the training recipe's architecture (training/net.py UNet, NetConfig defaults), input
contract (training/fit.py base_spec: 1 mm in-plane, z-score, flip TTA) and ensemble size
(3 members), with random weights. Its cost per slice is the trained model's; its masks
are meaningless, so post-processing cost (connected components on whatever it marks) may
differ a little. Without torch, the 1x1-convolution test model is used and the numbers
measure the batch machinery only (said in the output).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def make_dataset(root: Path, n_runs: int, shape: tuple[int, int, int], n_volumes: int) -> Path:
    """``n_runs`` runs from 4 phantom subjects, each copy with its own noise (so every input differs)."""
    from sct_deepseg_epi.phantom import make_phantom

    import json

    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "batch benchmark", "BIDSVersion": "1.9.0"}))
    bases = [make_phantom(shape, n_volumes=n_volumes, zooms=(1.0, 1.0, 5.0), seed=s) for s in range(4)]
    rng = np.random.default_rng(0)
    for i in range(n_runs):
        ph = bases[i % len(bases)]
        data = np.asarray(ph.image.dataobj, dtype=np.float32)
        data = np.clip(data + rng.normal(0, 5, data.shape), 0, 32767).astype(np.int16)  # scanners store int16
        p = root / f"sub-{i + 1:03d}" / "func" / f"sub-{i + 1:03d}_task-rest_bold.nii.gz"
        p.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, ph.image.affine, ph.image.header), str(p))
    return root


def pick_model(requested: str | None, cache: Path) -> tuple[str, str]:
    """(model reference, one-line description of what it is and why it is fair)."""
    from sct_deepseg_epi import api
    from sct_deepseg_epi.errors import ModelError

    if requested and requested != "standin":
        spec = api.load_model(requested)
        return requested, f"{spec.ref} (as requested)"
    if requested != "standin":
        try:
            spec = api.load_model("seg_sc_epi", install=False)
        except ModelError:
            pass
        else:  # a private copy: the benchmark must not see a model folder being replaced while it runs
            copy = cache / spec.name / spec.version
            shutil.copytree(spec.directory, copy)
            api.load_model(str(copy))  # checksums of the copy
            return str(copy), f"{spec.ref}: the trained default model"
    os.environ["SCT_DEEPSEG_EPI_MODELS"] = str(cache)
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_model_folder

        make_model_folder(cache / "tiny" / "1.0.0")
        return "tiny", ("tiny@1.0.0: 1x1-convolution test model (no torch to build a stand-in); "
                        "these numbers measure the batch machinery, not inference")
    import torch

    from sct_deepseg_epi.training.export import write_model
    from sct_deepseg_epi.training.fit import TrainConfig, base_spec
    from sct_deepseg_epi.training.net import UNet, count_parameters, macs_per_pixel

    cfg = TrainConfig()
    torch.manual_seed(0)
    members = [UNet(cfg.net).eval() for _ in range(3)]
    spec = base_spec(cfg, "standin", "0.0.0")
    write_model(members, cache / "standin" / "0.0.0", spec, name="standin", version="0.0.0",
                description="random-weight stand-in for seg_sc_epi (benchmark only)", training=cfg.as_dict(),
                metrics={}, provenance={"note": "random weights"})
    return "standin", (f"stand-in for seg_sc_epi: 3 random-weight members of the training "
                       f"recipe's UNet {list(cfg.net.widths)}, {count_parameters(members[0]):,} parameters, "
                       f"{macs_per_pixel(cfg.net):,.0f} MAC/pixel, same input contract and flip TTA")


def time_config(label: str, ds: Path, work: Path, model: str, **kw) -> dict:
    """Wall time of one batch, and when its first run finished (start-up + one run)."""
    from sct_deepseg_epi import batch

    deriv = work / label.replace(" ", "_")
    first: list[float] = []
    t0 = time.perf_counter()
    res = batch.run_batch(ds, deriv, model=model, progress=lambda r, n, t: first.append(time.perf_counter() - t0), **kw)
    wall = time.perf_counter() - t0
    bad = res.failed
    if bad:
        raise SystemExit(f"{label}: {len(bad)} run(s) failed, e.g. {bad[0].run}: {bad[0].error}")
    shutil.rmtree(deriv)
    n = len(res.records)
    steady = (n - 1) / (wall - first[0]) * 60 if n > 1 and wall > first[0] else n / wall * 60
    return dict(label=label, n=n, wall=wall, first=first[0], rate=n / wall * 60, steady=steady,
                proj=(first[0] + 399 / steady * 60) / 60, jobs=kw.get("jobs", 1))


def worker_memory(tmp: Path, model: str, shape: tuple[int, int, int], volumes: tuple[int, ...]) -> None:
    """Peak memory of one batch worker on short and long series: it must not grow with the length."""
    import subprocess

    print(f"\nworker peak memory, 2 runs per batch, -jobs 2, {'x'.join(map(str, shape))}:")
    print(f"{'volumes':>8} {'-4d':>5} {'peak MiB':>9} {'wall s':>7}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n_vol in volumes:
        ds = make_dataset(tmp / f"mem{n_vol}", 2, shape, n_vol)
        for mode in ("mean", "each"):
            deriv = tmp / f"mem{n_vol}-{mode}"
            # the largest worker's peak: the batch process and the workers it reaped (Linux wait4 semantics)
            code = ("import resource, sys; from sct_deepseg_epi import batch; "
                    f"r = batch.run_batch({str(ds)!r}, {str(deriv)!r}, model={model!r}, jobs=2, "
                    f"options={{'mode_4d': {mode!r}}}); "
                    "assert not r.failed, r.failed; "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            peak = int(out.stdout.split()[-1]) / 1024
            print(f"{n_vol:>8} {mode:>5} {peak:>9.0f} {time.perf_counter() - t0:>7.1f}")
            shutil.rmtree(deriv)
        shutil.rmtree(ds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-runs", type=int, default=40, help="runs in the synthetic dataset (default 40)")
    p.add_argument("-shape", default="64x64x12", help="matrix of each run (default 64x64x12)")
    p.add_argument("-volumes", type=int, default=8, help="volumes per run (default 8)")
    p.add_argument("-model", default=None,
                   help="model reference (default: seg_sc_epi, else a stand-in; 'standin' forces the stand-in)")
    p.add_argument("-repeat", type=int, default=1, help="time each configuration this many times, keep the fastest")
    p.add_argument("-no-dask", action="store_true", help="skip the Dask local cluster")
    p.add_argument("-quick", action="store_true", help="8 runs: a smoke test, not a measurement")
    p.add_argument("-memory", action="store_true",
                   help="also measure a worker's peak memory on short and long (240-volume) series")
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split("x"))
    n_runs = 8 if args.quick else args.runs
    from sct_deepseg_epi import __version__, batch

    cores = batch.cpu_count()
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        tmp = Path(tmp)
        model, model_note = pick_model(args.model, tmp / "models")
        t0 = time.perf_counter()
        ds = make_dataset(tmp / "ds", n_runs, shape, args.volumes)
        print(f"sct_deepseg_epi {__version__}; {n_runs} runs of {args.shape} x {args.volumes} volumes "
              f"(int16 .nii.gz, made in {time.perf_counter() - t0:.0f} s); {cores} CPU(s); "
              f"load average {os.getloadavg()[0]:.1f} at start")
        print(f"model: {model_note}")
        configs = [("1 job", dict(jobs=1)), ("2 jobs", dict(jobs=2))]
        if not args.no_dask:
            try:
                import distributed  # noqa: F401

                configs.append(("dask local 2x1", dict(jobs=2, scheduler="local")))
            except ImportError:
                print("dask: not installed (pip install 'sct_deepseg_epi[dask]'); skipped")
        rows = []
        for label, kw in configs:
            threads = 1 if kw.get("scheduler") else batch.plan_threads(kw["jobs"])[0]
            best = min((time_config(label, ds, tmp, model, **kw) for _ in range(max(1, args.repeat))),
                       key=lambda r: r["wall"])
            rows.append({**best, "threads": threads})
        print()
        print(f"{'configuration':<16} {'workers x threads':>17} {'runs':>5} {'wall s':>7} {'runs/min':>9} "
              f"{'1st run s':>9} {'steady runs/min':>15} {'400 runs':>9}")
        for r in rows:
            wxt = f"{r['jobs']} x {r['threads']}"
            print(f"{r['label']:<16} {wxt:>17} {r['n']:>5} {r['wall']:>7.1f} {r['rate']:>9.0f} "
                  f"{r['first']:>9.1f} {r['steady']:>15.0f} {r['proj']:>5.1f} min")
        print(f"\nruns/min: runs / end-to-end wall time (discovery, model check, start-up of processes or cluster,"
              " segmentation, sidecars, summary). 1st run s: when the first run finished (start-up + one run)."
              " steady: the rate after that. 400 runs: 1st run + 399 at the steady rate, on this machine."
              f" Fastest of {args.repeat} repeat(s). On a shared machine the load average says how far to trust the figures:"
              f" {os.getloadavg()[0]:.1f} at the end.")
        if args.memory:
            worker_memory(tmp, model, shape, (args.volumes, 240))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
