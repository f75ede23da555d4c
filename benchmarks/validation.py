#!/usr/bin/env python
"""The validation table: every model x every postprocessing, on real EPI and simulated stacks.

    python benchmarks/validation.py [-model seg_sc_epi@0.1.0] [-model path/to/model] ...
        [-data ../shared/data] [-heldout 16] [-stress 1] [-o table.md]

The ensemble runs once per model and image (``segment``'s soft probability map); each
postprocessing is then applied to that same map on the RAS grid:

* ``3d-largest``: threshold, largest 26-connected 3D component, holes filled (0.1.0's default);
* ``no-largest``: threshold, holes filled;
* ``z-follow``: :mod:`sct_deepseg_epi.zfollow` (a chain of confident slices, a smooth
  centreline, hysteresis along z).

Images:

* real EPI: ``epi/sct-example-2014`` (temporal mean of ``fmri`` vs the hand-corrected
  ``fmri_moco_mean_seg_modif``) and ``epi/brightlab-nw`` (``func_mean`` vs
  ``func_mean_mask``, a warped template trimmed by hand: approximate);
* held-out simulated stacks from ``sct_deepseg_epi.training.validate.heldout_simulated``
  (subjects no model was trained on), when this version of the package has it;
* stress stacks (``-stress 1``): simulated here from the same held-out subjects
  (``anat/sct-errsm/errsm_18`` and ``errsm_21``, sagittal T2w) with 3 mm and 9.5 mm
  slices covering the top of the labelled cord, the top three slices dimmed and noisier
  (a coil's edge). Seeded: the same call gives the same stacks.

Metrics (:mod:`sct_deepseg_epi.metrics`, axial slices of the RAS grid): Dice of the volume,
mean per-slice Dice over the slices where the reference or the mask has cord, cord slices
missed (reference cord, empty mask), and slices with false positives (mask, no
reference cord). Prints markdown: one row per model x postprocessing x image, then a summary.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = (("sct-example-2014", "epi/sct-example-2014/fmri.nii.gz", "epi/sct-example-2014/fmri_moco_mean_seg_modif.nii.gz"),
        ("brightlab-nw (approx.)", "epi/brightlab-nw/func_mean.nii.gz", "epi/brightlab-nw/func_mean_mask.nii.gz"))
STRESS_SUBJECTS = ("errsm_18", "errsm_21")
POSTPROCESSING = ("3d-largest", "no-largest", "z-follow")


def apply(name: str, prob: np.ndarray, zooms, spec) -> np.ndarray:
    """One postprocessing of a RAS probability map, with the model's threshold."""
    from sct_deepseg_epi.postprocess import PostOptions, postprocess
    from sct_deepseg_epi.zfollow import ZFollowOptions, zfollow

    if name == "z-follow":
        return zfollow(prob, zooms, ZFollowOptions(threshold=spec.threshold)).mask
    opts = PostOptions(threshold=spec.threshold, largest=name == "3d-largest", fill_holes=True, remove_small="0vox")
    return postprocess(prob, opts, float(np.prod(zooms)))


def scores(mask: np.ndarray, ref: np.ndarray) -> dict:
    from sct_deepseg_epi import metrics

    det = metrics.detection(mask, ref)
    per = [metrics.dice(mask[:, :, k], ref[:, :, k]) for k in range(ref.shape[2])
           if mask[:, :, k].any() or ref[:, :, k].any()]
    cord = [metrics.dice(mask[:, :, k], ref[:, :, k]) for k in range(ref.shape[2]) if ref[:, :, k].any()]
    return {"dice": metrics.dice(mask, ref), "slice_dice": float(np.mean(per)) if per else float("nan"),
            "worst_slice": float(min(cord)) if cord else float("nan"),
            "missed": det["fn"], "fp_slices": det["fp"], "cord_slices": det["tp"] + det["fn"]}


def stress_images(data: Path):
    """(name, RAS image, RAS mask, zooms) of the stress stacks (module doc)."""
    from sct_deepseg_epi.read import read_volume
    from sct_deepseg_epi.training.simulate import SimConfig, Source, scale_intensity, simulate

    out = []
    for s, subject in enumerate(STRESS_SUBJECTS):
        img = data / "anat/sct-errsm" / subject / "t2.nii.gz"
        a, b = read_volume(img), read_volume(img.with_name("t2_seg-manual.nii.gz"))
        src = Source(subject, scale_intensity(a.data), (b.data > 0.5).astype(np.float32), a.zooms, {"scaled": True})
        for c, (thick, n, top_mm) in enumerate(((3.0, 24, 74.0), (9.5, 12, 118.0))):
            for rep in range(3):
                rng = np.random.default_rng(7000 + 100 * s + 10 * c + rep)
                nz = int(round(top_mm / src.zooms[2]))  # the stack ends at the top of the labelled cord
                top = Source(src.name, src.image[:, :, -nz:], src.mask[:, :, -nz:], src.zooms, src.meta)
                sim = simulate(top, rng, SimConfig(thickness_mm=(thick, thick), n_slices=(n, n), gap_fraction=(0, 0),
                                                   inplane_mm=(0.95, 1.05), snr=(8.0, 30.0)))
                image = sim.image.copy()
                level = float(np.median(image[sim.mask > 0.5]))
                for j, gain in enumerate((0.25, 0.4, 0.6)):  # dimmer and noisier towards the coil's edge
                    z = image.shape[2] - 1 - j
                    noise = rng.normal(0, 0.08 * level, (2,) + image.shape[:2])
                    image[:, :, z] = np.abs(image[:, :, z] * gain + noise[0] + 1j * noise[1])
                out.append((f"stress-{thick:g}mm-{subject}-{rep}", image.astype(np.float32), sim.mask > 0.5, sim.zooms))
    return out


def heldout_images(n: int, data: Path):
    """(name, image, RAS mask, zooms) from the package's held-out simulated set, or None without it."""
    try:
        from sct_deepseg_epi.training.validate import heldout_simulated
    except ImportError:
        return None
    from sct_deepseg_epi.read import from_image

    out = []
    for name, image, mask in heldout_simulated(n=n, data=data):
        if not hasattr(mask, "affine"):  # an array on the image's grid
            mask = type(image)(np.asarray(mask, np.float32), image.affine)
        out.append((name, image, from_image(mask, name).data > 0.5, None))
    return out


def evaluate(model: str, images, threads: int) -> list[dict]:
    """Rows of one model: the ensemble once per image, every postprocessing on its map."""
    import nibabel as nib

    import sct_deepseg_epi as sde
    from sct_deepseg_epi.api import load_model
    from sct_deepseg_epi.read import from_image, read_volume

    spec = load_model(model)
    rows = []
    for group, name, image, ref, zooms in images:
        if isinstance(image, np.ndarray):  # a simulated RAS stack
            image = nib.Nifti1Image(image, np.diag(list(zooms) + [1.0]))
        seg = sde.segment(image, model=spec, threads=threads)
        vol = from_image(seg.probability, name)
        if isinstance(ref, (str, Path)):
            ref = read_volume(ref).data > 0.5
        for post in POSTPROCESSING:
            mask = apply(post, vol.data, vol.zooms, spec)
            rows.append({"model": spec.ref, "post": post, "group": group, "image": name, **scores(mask, ref)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | postprocessing | image | Dice | per-slice Dice | missed / cord slices | FP slices |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['post']} | {r['image']} | {r['dice']:.3f} | {r['slice_dice']:.3f} "
                     f"| {r['missed']} / {r['cord_slices']} | {r['fp_slices']} |")
    lines += ["", "| model | postprocessing | set | n | Dice mean | worst | per-slice Dice | missed / cord slices | FP slices |",
              "|---|---|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["model"], r["post"], r["group"]) for r in rows)
    for model, post, group in keys:
        sel = [r for r in rows if (r["model"], r["post"], r["group"]) == (model, post, group)]
        d = np.array([r["dice"] for r in sel])
        lines.append(f"| {model} | {post} | {group} | {len(sel)} | {d.mean():.3f} | {d.min():.3f} "
                     f"| {np.nanmean([r['slice_dice'] for r in sel]):.3f} | {sum(r['missed'] for r in sel)} / "
                     f"{sum(r['cord_slices'] for r in sel)} | {sum(r['fp_slices'] for r in sel)} |")
    return "\n".join(lines)


def readme_table(rows: list[dict]) -> str:
    """The README's validation table: one row per model x postprocessing (3d-largest, z-follow)."""
    lines = ["| model, postprocessing | sct-example-2014 Dice (worst slice) | brightlab-nw Dice (worst slice) "
             "| real EPI missed slices | held-out Dice mean / worst, missed slices |", "|---|---|---|---|---|"]
    for model, post in dict.fromkeys((r["model"], r["post"]) for r in rows):
        if post == "no-largest":
            continue
        sel = [r for r in rows if (r["model"], r["post"]) == (model, post)]
        real = {r["image"]: r for r in sel if r["group"] == "real EPI"}
        held = [r for r in sel if r["group"] == "held-out simulated"]
        cells = [f"{r['dice']:.3f} ({r['worst_slice']:.3f})" if r else "-"
                 for r in (real.get("sct-example-2014"), real.get("brightlab-nw (approx.)"))]
        h = (f"{np.mean([r['dice'] for r in held]):.3f} / {min(r['dice'] for r in held):.3f}, "
             f"{sum(r['missed'] for r in held)}" if held else "-")
        lines.append(f"| {model.split('@')[-1]}, {'z' if post == 'z-follow' else '3d'} | {cells[0]} | {cells[1]} "
                     f"| {sum(r['missed'] for r in real.values())} | {h} |")
    return "\n".join(lines)


def add_data_options(p: argparse.ArgumentParser) -> None:
    """The options of every study on the shared data: -data, -threads, -o."""
    p.add_argument("-data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    p.add_argument("-threads", type=int, default=1)
    p.add_argument("-o", default=None, help="also write the markdown here")


def data_folder(a: argparse.Namespace, doing: str) -> Path | None:
    """The shared data folder of the parsed options (ONNX Runtime's threads set), or None with a line."""
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    data = Path(a.data)
    if not (data / "epi").is_dir():
        print(f"{data}: no shared data folder (epi/ missing); nothing to {doing}", file=sys.stderr)
        return None
    return data


def show(text: str, path: str | None) -> None:
    """Print the markdown, and write it to ``path`` too when given."""
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-model", action="append", help="name[@version] or model folder; repeat to compare (default seg_sc_epi)")
    p.add_argument("-heldout", type=int, default=16, help="held-out simulated stacks (0: none)")
    p.add_argument("-stress", type=int, choices=(0, 1), default=1, help="add the stress stacks (module doc)")
    p.add_argument("-readme", action="store_true", help="print only the README's table (real and held-out, no stress)")
    add_data_options(p)
    a = p.parse_args(argv)
    if a.readme:
        a.stress = 0
    data = data_folder(a, "validate")
    if data is None:
        return 2
    images = [("real EPI", name, str(data / img), str(data / ref), None) for name, img, ref in REAL]
    notes = []
    held = heldout_images(a.heldout, data) if a.heldout else []
    if held is None:
        notes.append("held-out simulated set: skipped (training.validate.heldout_simulated is not in this version)")
    else:
        images += [("held-out simulated", *h) for h in held]
    if a.stress:
        images += [("stress", *s) for s in stress_images(data)]
    rows = []
    for model in a.model or ["seg_sc_epi"]:
        rows += evaluate(model, images, a.threads)
    show(readme_table(rows) if a.readme else "\n".join(notes + ([""] if notes else []) + [markdown(rows)]), a.o)
    return 0


if __name__ == "__main__":
    sys.exit(main())
