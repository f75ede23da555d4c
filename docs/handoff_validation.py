"""Validate the hand-off of our cord mask to SCT's motion correction and registration.

Runs ``sct_fmri_moco`` on the real EPI series of ``../shared/data/epi/sct-example-2014``
(68 x 68 x 5 x 30, 0.96 x 0.96 x 16.8 mm) with four masks:

  a. our moco mask: a 35 mm cylinder on the centreline of our segmentation of the temporal mean
  b. the same construction from the hand-corrected segmentation (``fmri_moco_mean_seg_modif``)
  c. SCT's default centred mask (``sct_create_mask -p center -size 35mm -f cylinder``)
  d. no mask

and reports, for each: the motion parameters (``moco_params_x/y``), the temporal SNR inside
the cord (hand-corrected mask) and the Dice of a ``type=seg`` registration of the moco mean
onto itself shifted by a few voxels (the registration is driven by a segmentation of the
moco mean, ours when the model is installed, and scored with the hand-corrected mask moved
the same way). Finally it runs the whole ``fmri_pipeline`` on the series with a synthetic
template of PAM50's layout (the series' own mean, shifted, with one level per slice).

Usage (SCT with its ANTs programs on PATH, this package importable):

    bash ../shared/sct/install-sct.sh /tmp/sct --with-ants && source /tmp/sct/activate.sh
    python docs/handoff_validation.py [-o /tmp/handoff_validation] [-model seg_sc_epi]

Prints a Markdown report (recorded in docs/handoff_validation.md) and writes results.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "epi" / "sct-example-2014"
SHIFT = (3, -2)  # voxels, in-plane, for the registration check
REG_PARAM = ("step=1,type=seg,algo=centermass:"
             "step=2,type=seg,algo=bsplinesyn,metric=MeanSquares,iter=3,smooth=1,slicewise=0")


def sh(cmd: list[str], cwd: Path, log: Path) -> float:
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)} (see {log})")
    return time.perf_counter() - t


def load(p: Path) -> np.ndarray:
    return np.asarray(nib.load(str(p)).dataobj)


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def tsnr_in(series: Path, mask: np.ndarray) -> float:
    d = load(series).astype(np.float64)
    sd = d.std(axis=-1)
    t = np.divide(d.mean(axis=-1), sd, out=np.zeros_like(sd), where=sd > 0)
    return float(np.median(t[mask > 0]))


def motion(folder: Path) -> np.ndarray:
    """(n_volumes, 2) slice-averaged X, Y translations in mm from moco_params_x/y."""
    x = load(folder / "moco_params_x.nii.gz").reshape(-1, load(folder / "moco_params_x.nii.gz").shape[-1])
    y = load(folder / "moco_params_y.nii.gz").reshape(x.shape)
    return np.stack([x.mean(axis=0), y.mean(axis=0)], axis=1)


def shifted(src: Path, dst: Path, shift=SHIFT) -> Path:
    img = nib.load(str(src))
    d = np.asarray(img.dataobj)
    out = np.zeros_like(d)
    sx, sy = shift
    xs = slice(max(sx, 0), d.shape[0] + min(sx, 0)), slice(max(-sx, 0), d.shape[0] + min(-sx, 0))
    ys = slice(max(sy, 0), d.shape[1] + min(sy, 0)), slice(max(-sy, 0), d.shape[1] + min(-sy, 0))
    out[xs[0], ys[0]] = d[xs[1], ys[1]]
    nib.save(nib.Nifti1Image(out, img.affine, img.header), str(dst))
    return dst


def model_id(ref: str) -> str | None:
    """``name@version (member SHA-256 prefixes)`` of an installed model, None if it is not installed."""
    from sct_deepseg_epi.registry import store

    try:
        spec = store.resolve(ref)
    except Exception:  # noqa: BLE001
        return None
    if not store.is_complete(spec):
        return None
    return f"{spec.ref} (members {', '.join(m.sha256[:12] for m in spec.members)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", default="/tmp/handoff_validation", help="work folder (default /tmp/handoff_validation)")
    ap.add_argument("-model", default="seg_sc_epi", help="segmentation model (default seg_sc_epi)")
    ap.add_argument("-reuse", action="store_true", help="keep the work folder and reuse finished motion corrections")
    args = ap.parse_args()
    for tool in ("sct_fmri_moco", "sct_create_mask", "sct_register_multimodal", "sct_apply_transfo"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH: install SCT with ../shared/sct/install-sct.sh DEST --with-ants and source DEST/activate.sh")
    from sct_deepseg_epi import api, handoff

    work = Path(args.o)
    if work.exists() and not args.reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    fmri = work / "fmri.nii.gz"
    hand = work / "fmri_moco_mean_seg_modif.nii.gz"
    for src, dst in ((DATA / "fmri.nii.gz", fmri), (DATA / "fmri_moco_mean_seg_modif.nii.gz", hand)):
        if not dst.exists():
            shutil.copy2(src, dst)
    ref = load(hand) > 0
    model = model_id(args.model)
    have_model = model is not None
    results: dict = {"model": model, "shift_vox": SHIFT, "conditions": {}}

    # masks
    masks: dict[str, Path | None] = {}
    if have_model:
        mean = work / "fmri_mean.nii.gz"
        nib.save(nib.Nifti1Image(load(fmri).astype(np.float32).mean(-1), nib.load(str(fmri)).affine), str(mean))
        seg_a = api.run(mean, work / "fmri_mean_seg.nii.gz", model=args.model).mask
        results["dice_our_seg_vs_hand"] = dice(load(seg_a), ref)
        per_slice = [dice(load(seg_a)[..., z], ref[..., z]) for z in range(ref.shape[2])]
        results["dice_our_seg_vs_hand_per_slice"] = [round(v, 3) for v in per_slice]
        masks["a"] = handoff.moco_mask(fmri, seg_a, work / "mask_a.nii.gz")
    masks["b"] = work / "mask_b.nii.gz"
    if not masks["b"].exists():
        handoff.moco_mask(fmri, hand, masks["b"])
    masks["c"] = work / "mask_c.nii.gz"
    if not masks["c"].exists():
        sh(["sct_create_mask", "-i", str(fmri), "-p", "center", "-size", "35mm", "-f", "cylinder",
            "-o", str(masks["c"])], work, log)
    cb, _ = handoff.cord_centreline(ref, 2)
    fov_centre = (np.array(ref.shape[:2]) - 1) / 2
    results["cord_offset_from_fov_centre_mm"] = [round(float(v), 1) for v in np.linalg.norm((cb - fov_centre) * 0.956, axis=1)]
    masks["d"] = None
    if have_model:  # where our mask and the hand-made one are centred, slice by slice
        ca, _ = handoff.cord_centreline(load(masks["a"]), 2)
        results["mask_centre_distance_a_b_mm"] = [round(float(v), 2) for v in np.linalg.norm((ca - cb) * 0.956, axis=1)]

    raw_tsnr = tsnr_in(fmri, ref)
    results["tsnr_uncorrected"] = raw_tsnr
    for name, mask in masks.items():
        folder = work / name
        folder.mkdir(exist_ok=True)
        moco, moco_mean = folder / "fmri_moco.nii.gz", folder / "fmri_moco_mean.nii.gz"
        timing = folder / "moco_seconds.txt"
        if timing.exists() and (mask is None or mask.stat().st_mtime < timing.stat().st_mtime):
            seconds = float(timing.read_text())  # -reuse: this mask's motion correction is done already
        else:
            cmd = ["sct_fmri_moco", "-i", str(fmri), "-ofolder", str(folder)] + (["-m", str(mask)] if mask else [])
            seconds = sh(cmd, work, log)
            timing.write_text(f"{seconds:.1f}")
        xy = motion(folder)
        r = {"moco_seconds": round(seconds, 1), "tsnr_cord": tsnr_in(moco, ref),
             "mean_abs_x_mm": float(np.abs(xy[:, 0]).mean()), "mean_abs_y_mm": float(np.abs(xy[:, 1]).mean()),
             "max_disp_mm": float(np.linalg.norm(xy, axis=1).max()), "motion_xy": xy.round(4).tolist()}
        if mask is not None:
            r["mask_voxels"] = int(load(mask).sum())
        # registration of the moco mean onto itself, shifted
        drive = (api.run(moco_mean, folder / "fmri_moco_mean_seg.nii.gz", model=args.model).mask if have_model else hand)
        src, src_seg, src_ref = (shifted(moco_mean, folder / "mean_shifted.nii.gz"),
                                 shifted(drive, folder / "seg_shifted.nii.gz"), shifted(hand, folder / "hand_shifted.nii.gz"))
        warp = folder / "warp_shifted2mean.nii.gz"
        sh(["sct_register_multimodal", "-i", str(src), "-iseg", str(src_seg), "-d", str(moco_mean), "-dseg", str(drive),
            "-param", REG_PARAM, "-x", "nn", "-owarp", str(warp), "-ofolder", str(folder)], folder, log)
        for what, moved, target in (("driving_seg", src_seg, drive), ("hand_seg", src_ref, hand)):
            out = folder / f"{what}_reg.nii.gz"
            sh(["sct_apply_transfo", "-i", str(moved), "-d", str(moco_mean), "-w", str(warp), "-x", "nn", "-o", str(out)],
               folder, log)
            r[f"reg_dice_{what}"] = dice(load(out), load(target))
            r[f"shifted_dice_{what}"] = dice(load(moved), load(target))
        results["conditions"][name] = r
    xy_b = np.array(results["conditions"]["b"]["motion_xy"])
    for name, r in results["conditions"].items():
        if name != "b":  # how far each mask's motion estimate is from the hand-corrected mask's
            r["motion_rms_diff_vs_b_mm"] = float(np.sqrt(((np.array(r["motion_xy"]) - xy_b) ** 2).sum(axis=1).mean()))

    # the whole pipeline, with a synthetic template of PAM50's layout
    results["pipeline"] = run_pipeline(work, fmri, hand, args.model) if have_model else None
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


def run_pipeline(work: Path, fmri: Path, hand: Path, model: str) -> dict:
    """fmri_pipeline end to end on the real series, PAM50 replaced by a synthetic template."""
    from sct_deepseg_epi import handoff

    folder = work / "pipeline"
    folder.mkdir(exist_ok=True)
    tpl = folder / "PAM50" / "template"
    tpl.mkdir(parents=True, exist_ok=True)
    img = nib.load(str(fmri))
    mean = np.asarray(img.dataobj).astype(np.float32).mean(-1)
    cord = (load(hand) > 0).astype(np.float32)
    shift = (2, 1)
    for name, arr in (("t2s", mean), ("cord", cord), ("levels", cord * (1 + np.arange(cord.shape[2]))[None, None, :])):
        p = tpl / f"PAM50_{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32), img.affine), str(p))
        shifted(p, p, shift)
    (tpl / "info_label.txt").write_text("# Keyword=IndivLabels (Please DO NOT change this line)\n# ID, name, file\n"
                                        "0, T2*-weighted template, PAM50_t2s.nii.gz\n1, spinal cord, PAM50_cord.nii.gz\n"
                                        "2, vertebral levels, PAM50_levels.nii.gz\n")
    t = time.perf_counter()
    out = handoff.fmri_pipeline(fmri, folder, model=model, template=tpl.parent, force=True)
    seconds = time.perf_counter() - t
    levels = load(out.levels)
    target = load(out.moco_mean_seg) > 0
    return {"seconds": round(seconds, 1), "steps_run": out.ran,
            "dice_warped_template_cord_vs_moco_mean_seg": dice(levels > 0, target),
            "dice_warped_template_cord_vs_hand": dice(levels > 0, load(hand) > 0),
            "levels_per_slice": [sorted(set(np.unique(levels[..., z]).astype(int).tolist()) - {0}) for z in range(levels.shape[2])]}


def markdown(r: dict) -> str:
    lines = [f"model: {r['model'] or '(not installed: condition a skipped)'}; shift for the registration check: "
             f"{r['shift_vox']} voxels", ""]
    if "dice_our_seg_vs_hand" in r:
        lines.append(f"Our segmentation of the temporal mean vs the hand-corrected mask: Dice {r['dice_our_seg_vs_hand']:.3f} "
                     f"(per slice {r['dice_our_seg_vs_hand_per_slice']}); centre of mask a vs b per slice "
                     f"{r['mask_centre_distance_a_b_mm']} mm")
        lines.append("")
    lines.append(f"Cord centre (hand mask) from the centre of the field of view, per slice: "
                 f"{r['cord_offset_from_fov_centre_mm']} mm")
    lines.append("")
    lines.append(f"tSNR in the cord without motion correction: {r['tsnr_uncorrected']:.2f}")
    lines += ["", "| mask | voxels/slice | mean abs X (mm) | mean abs Y (mm) | max displacement (mm) | RMS diff of motion vs b (mm) "
              "| tSNR in cord | Dice after shift (hand mask) | Dice after type=seg registration (hand mask) | (driving seg) | moco time (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"a": "a. ours", "b": "b. hand-corrected seg", "c": "c. SCT centred", "d": "d. none"}
    for k, c in r["conditions"].items():
        vox = f"{c['mask_voxels'] / 5:.0f}" if "mask_voxels" in c else "-"
        diff = f"{c['motion_rms_diff_vs_b_mm']:.3f}" if "motion_rms_diff_vs_b_mm" in c else "-"
        lines.append(f"| {names[k]} | {vox} | {c['mean_abs_x_mm']:.3f} | {c['mean_abs_y_mm']:.3f} | {c['max_disp_mm']:.3f} | {diff} "
                     f"| {c['tsnr_cord']:.2f} | {c['shifted_dice_hand_seg']:.3f} | {c['reg_dice_hand_seg']:.3f} "
                     f"| {c['reg_dice_driving_seg']:.3f} | {c['moco_seconds']} |")
    p = r["pipeline"]
    if p is None:
        return "\n".join(lines + ["", "fmri_pipeline: not run (it segments with the model, which is not installed)"])
    lines += ["", f"fmri_pipeline with a synthetic PAM50-layout template: {p['seconds']} s, steps {p['steps_run']}; "
              f"warped template cord vs moco-mean segmentation Dice {p['dice_warped_template_cord_vs_moco_mean_seg']:.3f}, "
              f"vs hand mask {p['dice_warped_template_cord_vs_hand']:.3f}; levels per slice {p['levels_per_slice']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
