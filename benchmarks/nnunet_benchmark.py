"""nnUNetPredictor vs this engine on the same nnU-Net model: speed, peak memory, identical masks.

The model is a realistic EPI plan made by nnU-Net's own planner on synthetic data of
128 x 128 x 24 voxels at 1 x 1 x 5 mm (3d_fullres: the planned U-Net, 32..320 features,
patch 24 x 128 x 128; or 2d), 5 folds of random weights, imported with ``import-nnunet``.
Each engine runs in its own subprocess (so its peak RSS is its own) on the same NIfTI,
end to end: read the file, preprocess, predict, export, write the mask. Model loading is
timed separately. Both are limited to the same number of CPU threads.

Two cases:

* ``-case nnunet`` (default): nnUNetPredictor on the file (nnU-Net's reader, as
  ``nnUNetv2_predict``) against the model imported with ``-convention nnunet``;
  warm and cold times, with or without mirroring.
* ``-case sct-las``: the same image stored LAS (the usual Siemens orientation), SCT's way
  against this engine's whole command, each with its default flags (no mirroring). SCT's
  way is what ``sct_deepseg`` does for an nnU-Net model, in a fresh process: import torch
  and nnunetv2, build the predictor from the trained folder, read the NIfTI, reorient to
  RAS, reverse the axes and the spacing, ``predict_single_npy_array``, back, write the mask
  (SCT's own imports and checks are left out, which favours it). This engine's side is
  ``python -m sct_deepseg_epi -i IMAGE -model MODEL -threads N`` with the model imported
  with the default ``-convention sct``. Wall time and peak RSS of each whole process.

    python benchmarks/nnunet_benchmark.py                       # 3d_fullres, 2 threads, 3 runs
    python benchmarks/nnunet_benchmark.py -config 2d -runs 5
    python benchmarks/nnunet_benchmark.py -config 2d -case sct-las -train-steps 40 -repeat 3
    python benchmarks/nnunet_benchmark.py -config 2d -case sct-las -train-steps 40 -input real_mean.nii.gz
    python benchmarks/nnunet_benchmark.py -workdir /tmp/nnbench  # reuse the built model

Needs the ``nnunet`` extra (torch + nnunetv2) for the reference and the import.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE, ZOOMS = (128, 128, 24), (1.0, 1.0, 5.0)


def build(workdir: Path, configuration: str, folds: int, convention: str = "nnunet", train_steps: int = 0
          ) -> tuple[Path, Path, Path]:
    """(nnU-Net trained folder, imported model folder, test image), built once per workdir.

    ``convention`` ``sct``: the model imported with SCT's convention and the image stored LAS.
    ``train_steps``: each fold fitted for that many steps on the synthetic cases (confident,
    cord-shaped outputs, as a trained model's) instead of random weights, whose many
    near-ties at p = 0.5 let float rounding flip a few voxels between any two runtimes.
    """
    import torch

    torch.set_num_threads(2)
    from sct_deepseg_epi.nnunet.convert import import_nnunet

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic-model builders
    from nnunet_parity import save_oriented
    from nnunet_synthetic import _save, plan_dataset, synthetic_case, write_trained

    fit = f"_fit{train_steps}" if train_steps else ""
    trained = workdir / f"trained{fit}" / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    # a model folder of an earlier version of this script has no convention: that means nnunet
    model = workdir / (f"model_{configuration}{fit}" + ("_sct" if convention == "sct" else ""))
    image = workdir / ("bold_mean_LAS.nii.gz" if convention == "sct" else "bold_mean.nii.gz")
    if not (trained / f"fold_{folds - 1}" / "checkpoint_final.pth").is_file():
        plans, dj, raw = plan_dataset(workdir / "nnunet", shape=SHAPE, zooms=ZOOMS, n_cases=3)
        # random weights, scaled at the output so that the masks are neither empty nor full; or fitted
        write_trained(trained.parent, plans, dj, configuration=configuration, folds=folds, features=None,
                      logit_scale=1.0 if train_steps else 4.0, train_steps=train_steps, raw=raw, seed=1 if fit else 0)
    if not (model / "manifest.json").is_file():
        import_nnunet(trained, model, overwrite=True, convention=convention)
    if not image.is_file():
        img, _ = synthetic_case(SHAPE, ZOOMS, seed=99)
        if convention == "sct":
            save_oriented(img, ZOOMS, "LAS", image)
        else:
            _save(img, ZOOMS, image)
    return trained, model, image


def sct_way(trained: Path, image: Path, out: Path, threads: int) -> None:
    """What sct_deepseg does with an nnU-Net model and its default flags (no test-time mirroring).

    SCT's steps: reorient the image to its "LPI" (nibabel's RAS), reverse the axes to
    nnU-Net's (z, y, x) and the voxel sizes with them, predict the array, reverse back,
    reorient back to the file's orientation, write a uint8 mask with the input's header.
    """
    import nibabel as nib
    import numpy as np
    import torch
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                           verbose_preprocessing=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(trained), use_folds=None)
    img = nib.load(str(image))
    stored = io_orientation(img.affine)
    to_ras = ornt_transform(stored, axcodes2ornt("RAS"))
    data = apply_orientation(np.asarray(img.dataobj, np.float32), to_ras)
    zooms = [0.0, 0.0, 0.0]
    for i, z in enumerate(img.header.get_zooms()[:3]):
        zooms[int(to_ras[i, 0])] = float(z)
    seg = pred.predict_single_npy_array(np.ascontiguousarray(data.transpose(2, 1, 0))[None], {"spacing": zooms[::-1]})
    seg = apply_orientation(np.asarray(seg).transpose(2, 1, 0), ornt_transform(axcodes2ornt("RAS"), stored))
    mask = nib.Nifti1Image(seg.astype(np.uint8), img.affine, img.header)
    mask.set_data_dtype(np.uint8)
    nib.save(mask, str(out))


def worker(engine: str, trained: Path, model: Path, image: Path, out: Path, mirror: bool, runs: int,
           threads: int) -> dict:
    """Runs inside the subprocess: load once, then ``runs`` end-to-end segmentations."""
    times, cpu = [], []

    def cpu_s() -> float:  # CPU time of this process: steadier than wall time on a shared machine
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    t0 = time.perf_counter()
    if engine == "nnunet":
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        torch.set_num_threads(threads)
        pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                               perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                               verbose_preprocessing=False, allow_tqdm=False)
        pred.initialize_from_trained_model_folder(str(trained), use_folds=None)
        load = time.perf_counter() - t0
        for _ in range(runs):
            t, c = time.perf_counter(), cpu_s()
            pred.predict_from_files_sequential([[str(image)]], [str(out.with_name(out.name[:-7]))],
                                               save_probabilities=False, overwrite=True)
            times.append(time.perf_counter() - t)
            cpu.append(cpu_s() - c)
    else:
        from sct_deepseg_epi import api
        from sct_deepseg_epi.backend import backend_for

        opts = api.Options(threads=threads, tta=mirror)
        spec = api.load_model(str(model))
        backend_for(spec, opts)  # sessions: part of loading
        load = time.perf_counter() - t0
        for _ in range(runs):
            out.unlink(missing_ok=True)
            t, c = time.perf_counter(), cpu_s()
            api.run(image, out, model=spec, options=opts)
            times.append(time.perf_counter() - t)
            cpu.append(cpu_s() - c)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"engine": engine, "mirror": mirror, "times": times, "cpu": cpu, "load_s": load, "max_rss_mb": rss_mb}


def run_worker(args, engine: str, mirror: bool, trained: Path, model: Path, image: Path, out: Path) -> dict:
    # nnU-Net caps torch's threads at nnUNet_def_n_proc while it predicts: it must be the same count
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               nnUNet_def_n_proc=str(args.threads))
    cmd = [sys.executable, __file__, "-worker", engine, "-mirror", str(int(mirror)), "-runs", str(args.runs),
           "-threads", str(args.threads), "-trained", str(trained), "-model", str(model), "-image", str(image),
           "-out", str(out)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{engine} worker failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # a fresh process's first image: interpreter, imports, model loading and one run (what one CLI call costs)
    res["cold_s"] = wall - sum(res["times"][1:])
    return res


def built(args, workdir: Path, convention: str) -> tuple[Path, Path, Path]:
    """:func:`build` in a subprocess: a process's peak RSS includes its parent's at fork time (Linux
    keeps the high-water mark across exec), so the parent of the timed processes stays small."""
    r = subprocess.run([sys.executable, __file__, "-worker", "build", "-config", args.config, "-folds",
                        str(args.folds), "-workdir", str(workdir), "-convention", convention,
                        "-train-steps", str(args.train_steps)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"building the model failed:\n{r.stderr[-3000:]}")
    return tuple(Path(p) for p in json.loads(r.stdout.strip().splitlines()[-1]))


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float, float]:
    """Run one whole command; (wall s, CPU s, peak RSS MB) of that process alone."""
    with open(log, "w") as f:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({p.returncode}):\n{log.read_text()[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def sct_las_case(args, workdir: Path) -> int:
    """LAS input, SCT's convention: SCT's way and this engine's command, whole processes, default flags."""
    import nibabel as nib
    import numpy as np

    trained, model, image = built(args, workdir, "sct")
    if args.input:  # another file, e.g. a real EPI mean as acquired
        image = Path(args.input).resolve()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               nnUNet_def_n_proc=str(args.threads))
    res = {e: {"wall": [], "cpu": [], "rss": []} for e in ("sct", "ours")}
    for rep in range(args.repeat):
        for engine in (("sct", "ours") if rep % 2 == 0 else ("ours", "sct")):  # turns, as above
            out = workdir / f"{engine}_las_seg.nii.gz"
            out.unlink(missing_ok=True)
            if engine == "sct":
                cmd = [sys.executable, __file__, "-worker", "sct", "-threads", str(args.threads), "-trained",
                       str(trained), "-image", str(image), "-out", str(out)]
            else:
                cmd = [sys.executable, "-m", "sct_deepseg_epi", "-i", str(image), "-model", str(model), "-o", str(out),
                       "-threads", str(args.threads)]
            wall, cpu, rss = timed(cmd, env, workdir / f"{engine}_las.log")
            r = res[engine]
            r["wall"].append(wall)
            r["cpu"].append(cpu)
            r["rss"].append(rss)
            r["mask"] = np.asarray(nib.load(str(out)).dataobj)
    a, b = res["sct"]["mask"], res["ours"]["mask"]
    diff = int((a != b).sum())
    fg = (a > 0).sum() + (b > 0).sum()
    dice = 2 * float(((a > 0) & (b > 0)).sum()) / fg if fg else 1.0
    weights = f"fitted {args.train_steps} steps" if args.train_steps else "random weights"
    what = (f"{image.name} {nib.load(str(image)).shape} stored {''.join(nib.aff2axcodes(nib.load(str(image)).affine))}"
            if args.input else f"image {SHAPE} at {ZOOMS} mm stored LAS")
    print(f"\nmodel: nnU-Net {args.config}, {args.folds} folds ({weights}), imported with -convention sct; {what}; "
          f"default flags (no mirroring); {args.threads} threads; {args.repeat} fresh "
          f"process(es) per side taking turns; medians of whole commands (start-up, imports, model, file in, "
          f"mask out)")
    print(f"{'side':<12} {'wall s':>7} {'min s':>6} {'CPU s':>7} {'peak RSS MB':>11} {'speed-up':>8} {'RSS':>5}  masks")
    s_wall, s_rss = statistics.median(res["sct"]["wall"]), max(res["sct"]["rss"])
    for e, label in (("sct", "SCT's way"), ("ours", "this engine")):
        r = res[e]
        wall, rss = statistics.median(r["wall"]), max(r["rss"])
        extra = (f"{s_wall / wall:7.2f}x {rss / s_rss:5.2f}  "
                 f"{'identical' if diff == 0 else f'{diff} voxels differ'} (Dice {dice:.4f}, cord "
                 f"{float((a > 0).mean()):.1%} of voxels)") if e == "ours" else f"{'':>8} {'':>5}"
        print(f"{label:<12} {wall:7.2f} {min(r['wall']):6.2f} {statistics.median(r['cpu']):7.2f} {rss:11.0f} {extra}")
    print("speed-up: SCT's way / this engine (wall); RSS: peak, this engine / SCT's way")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-config", default="3d_fullres", choices=("3d_fullres", "2d"))
    ap.add_argument("-folds", type=int, default=5)
    ap.add_argument("-runs", type=int, default=3, help="end-to-end runs per process")
    ap.add_argument("-repeat", type=int, default=1, help="fresh processes per engine, taking turns")
    ap.add_argument("-threads", type=int, default=2)
    ap.add_argument("-mirror", choices=("both", "0", "1"), default="both")
    ap.add_argument("-workdir", default=None)
    ap.add_argument("-train-steps", type=int, default=0,
                    help="fit each fold for N steps on the synthetic cases (default 0: random weights)")
    ap.add_argument("-input", default=None, help="sct-las: segment this NIfTI (e.g. a real EPI mean) instead of the "
                                                  "synthetic LAS image")
    ap.add_argument("-case", choices=("nnunet", "sct-las"), default="nnunet",
                    help="nnunet: nnUNetPredictor on the file vs the engine (warm and cold); sct-las: a LAS image, "
                         "SCT's way vs the engine's whole command, default flags")
    # internal: one engine in a subprocess
    ap.add_argument("-worker", choices=("nnunet", "ours", "sct", "build"), help=argparse.SUPPRESS)
    ap.add_argument("-convention", choices=("nnunet", "sct"), help=argparse.SUPPRESS)
    for k in ("trained", "model", "image", "out"):
        ap.add_argument(f"-{k}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "build":
        paths = build(Path(args.workdir), args.config, args.folds, args.convention, args.train_steps)
        print(json.dumps([str(p) for p in paths]))
        return 0
    if args.worker == "sct":
        sct_way(Path(args.trained), Path(args.image), Path(args.out), args.threads)
        return 0
    if args.worker:
        res = worker(args.worker, Path(args.trained), Path(args.model), Path(args.image), Path(args.out),
                     args.mirror == "1", args.runs, args.threads)
        print(json.dumps(res))
        return 0

    import nibabel as nib
    import numpy as np

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nnunet-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.case == "sct-las":
        return sct_las_case(args, workdir)
    trained, model, image = built(args, workdir, "nnunet")
    mirrors = {"both": (False, True), "0": (False,), "1": (True,)}[args.mirror]
    rows = []
    for mirror in mirrors:
        res = {e: {"times": [], "cpu": [], "cold": [], "max_rss_mb": 0.0} for e in ("nnunet", "ours")}
        for rep in range(args.repeat):
            # the two engines take turns (and turn order), so that a busy spell on a shared
            # machine does not land on one engine only
            for engine in (("nnunet", "ours") if rep % 2 == 0 else ("ours", "nnunet")):
                out = workdir / f"{engine}_m{int(mirror)}.nii.gz"
                one = run_worker(args, engine, mirror, trained, model, image, out)
                r = res[engine]
                r["times"] += one["times"]
                r["cpu"] += one["cpu"]
                r["cold"].append(one["cold_s"])
                r["max_rss_mb"] = max(r["max_rss_mb"], one["max_rss_mb"])
                r["mask"] = np.asarray(nib.load(str(out)).dataobj)
        for r in res.values():
            r["cold_s"] = statistics.median(r["cold"])
        a, b = res["nnunet"]["mask"], res["ours"]["mask"]
        diff = int((a != b).sum())
        fg = (a > 0).sum() + (b > 0).sum()
        dice = 2 * float(((a > 0) & (b > 0)).sum()) / fg if fg else 1.0
        rows.append((mirror, res, diff, dice, float((a > 0).mean())))

    print(f"\nmodel: nnU-Net {args.config}, {args.folds} folds, image {SHAPE} at {ZOOMS} mm, "
          f"{args.threads} threads, {args.repeat} fresh process(es) per engine taking turns, {args.runs} "
          f"end-to-end runs each (file in -> mask file out); medians")
    print(f"{'mirroring':<10} {'engine':<8} {'wall s':>7} {'min s':>6} {'CPU s':>7} {'cores':>5} {'cold s':>7} "
          f"{'peak RSS MB':>11} {'wall x':>7} {'CPU x':>6} {'cold x':>6} {'RSS':>5}  mask vs nnU-Net")
    for mirror, res, diff, dice, frac in rows:
        n, o = res["nnunet"], res["ours"]
        for e, r in (("nnunet", n), ("ours", o)):
            wall, cpu = statistics.median(r["times"]), statistics.median(r["cpu"])
            if e == "ours":
                ratios = (f"{statistics.median(n['times']) / wall:6.2f}x {statistics.median(n['cpu']) / cpu:5.2f}x "
                          f"{n['cold_s'] / r['cold_s']:5.2f}x {r['max_rss_mb'] / n['max_rss_mb']:5.2f}")
                same = (f"{'identical' if diff == 0 else f'{diff} voxels differ'} (Dice {dice:.4f}, "
                        f"cord {frac:.1%} of voxels)")
            else:
                ratios, same = f"{'':>7} {'':>6} {'':>6} {'':>5}", ""
            print(f"{'on' if mirror else 'off':<10} {e:<8} {wall:7.2f} {min(r['times']):6.2f} {cpu:7.2f} "
                  f"{cpu / wall:5.2f} {r['cold_s']:7.2f} {r['max_rss_mb']:11.0f} {ratios}  {same}")
    print("wall s / CPU s: median per end-to-end run with the model loaded; cold s: a fresh process's first image"
          " (start-up, imports, model loading, one run); cores: CPU s / wall s, the cores each engine kept busy;"
          " x: nnU-Net / ours; RSS: peak, ours / nnU-Net")
    return 0


if __name__ == "__main__":
    sys.exit(main())
