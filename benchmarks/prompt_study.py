#!/usr/bin/env python
"""Prompted correction, measured: one click per missed or wrong slice, on slices made hard.

    python benchmarks/prompt_study.py [-model seg_sc_epi] [-data ../shared/data] [-heldout 16] [-seed 1900] [-jitter 0] [-o table.md]

Images: the held-out simulated stacks (``sct_deepseg_epi.training.validate.heldout_simulated``)
and the two real validation series of ``benchmarks/validation.py`` (the temporal mean of
``sct-example-2014``, ``brightlab-nw``'s mean; the reference masks as there).

Slices made hard: a third of each image's reference cord slices (at least one; seeded, so
the same call gives the same images) get, on the RAS grid, in turn,

* ``dim``: the signal within 15 mm of the cord's centre scaled down to 15-35 % (2 mm soft
  edge), a local signal loss;
* ``ghost``: a ghost over the cord: the slice's own signal shifted 8-20 mm along the
  anterior-posterior (phase-encoding) axis, at 40-80 % of its intensity, added.

Then ``segment`` runs on the hard image (as a user would, through the API), per-slice Dice
against the reference is computed on the RAS grid, and every reference cord slice with Dice
< 0.7 (missed or wrong) gets one point on the cord at the reference mask's centroid (the
reference voxel nearest it; ``-jitter MM``: a reference voxel within MM of it, at random). ``segment`` runs again with those prompts. The table gives,
per image, the prompted slices' Dice before -> after, and for every other slice (the
untouched ones) how many changed at all and their mean Dice before -> after; then the
prompted slices by kind (``other``: a slice the hardening did not touch but whose
neighbours' did).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
BAD = 0.7  # per-slice Dice below this: a slice a user would click


def harden(data: np.ndarray, ref: np.ndarray, zooms, rng) -> tuple[np.ndarray, dict[int, str]]:
    """The image with a third of its cord slices made hard (module doc), and those slices' kinds."""
    cord = [int(k) for k in np.flatnonzero(ref.any(axis=(0, 1)))]
    hard = sorted(int(k) for k in rng.choice(cord, max(1, len(cord) // 3), replace=False))
    out = data.astype(np.float32).copy()
    x = np.arange(data.shape[0])[:, None] * zooms[0]
    y = np.arange(data.shape[1])[None, :] * zooms[1]
    kinds = {}
    for n, k in enumerate(hard):
        original = out[:, :, k].copy()
        if n % 2 == 0:
            ii, jj = np.nonzero(ref[:, :, k])
            d = np.hypot(x - ii.mean() * zooms[0], y - jj.mean() * zooms[1])
            gain = rng.uniform(0.15, 0.35)
            weight = np.clip((d - 15.0) / 2.0, 0, 1)  # 0 inside 15 mm, 1 beyond 17 mm
            out[:, :, k] = original * (gain + (1 - gain) * weight)
            kinds[k] = "dim"
        else:
            shift = int(round(rng.uniform(8, 20) / zooms[1])) * int(rng.choice([-1, 1]))
            out[:, :, k] = original + np.roll(original, shift, axis=1) * rng.uniform(0.4, 0.8)
            kinds[k] = "ghost"
    return out, kinds


def slice_dice(mask: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-slice Dice (1 where both are empty)."""
    inter = (mask & ref).sum((0, 1))
    tot = mask.sum((0, 1)) + ref.sum((0, 1))
    return np.where(tot > 0, 2 * inter / np.maximum(tot, 1), 1.0)


def centroid_point(ref2: np.ndarray, zooms=(1.0, 1.0), jitter_mm: float = 0.0, rng=None) -> tuple[int, int]:
    """The reference voxel nearest the reference's centroid on one slice; with ``jitter_mm``, a
    reference voxel drawn at random within that distance of the centroid (a user's less exact click)."""
    pts = np.argwhere(ref2)
    d = np.hypot(*((pts - pts.mean(0)) * np.asarray(zooms[:2])).T)
    near = np.flatnonzero(d <= jitter_mm) if jitter_mm > 0 else []
    pick = int(rng.choice(near)) if len(near) else int(np.argmin(d))
    return tuple(int(v) for v in pts[pick])  # type: ignore[return-value]


def images(data: Path, n_heldout: int):
    """(group, name, RAS image, RAS reference mask, Volume for the grid) of every image of the study."""
    from validation import REAL, heldout_images

    from sct_deepseg_epi.read import from_image, read_volume

    out = []
    for name, img, ref in REAL:
        vol = read_volume(data / img)
        out.append(("real EPI", name, vol, read_volume(data / ref).data > 0.5))
    for name, image, ref, _ in heldout_images(n_heldout, data) or []:
        out.append(("held-out simulated", name, from_image(image, name), ref))
    return out


def study(model: str, data: Path, n_heldout: int, threads: int, seed: int = 1900, jitter_mm: float = 0.0) -> list[dict]:
    import nibabel as nib

    import sct_deepseg_epi as sde
    from sct_deepseg_epi.api import load_model
    from sct_deepseg_epi.read import from_image

    spec = load_model(model)
    rows = []
    for i, (group, name, vol, ref) in enumerate(images(data, n_heldout)):
        rng = np.random.default_rng(seed + i)
        hard_ras, hard = harden(vol.data, ref, vol.zooms, rng)
        image = nib.Nifti1Image(vol.to_native(hard_ras), vol.image.affine)
        before = from_image(sde.segment(image, model=spec, threads=threads).mask, name).data > 0
        d0 = slice_dice(before, ref)
        bad = [k for k in range(ref.shape[2]) if ref[:, :, k].any() and d0[k] < BAD]
        row = {"group": group, "image": name, "slices": ref.shape[2], "hard": len(hard), "prompted": len(bad),
               "kinds": [hard.get(k, "other") for k in bad],
               "before": [float(d0[k]) for k in bad], "after": [], "untouched_changed": 0,
               "untouched_before": float(np.mean([d0[k] for k in range(ref.shape[2]) if k not in bad])),
               "untouched_after": float("nan"), "effects": Counter()}
        if bad:
            native = np.zeros(vol.data.shape, np.uint8)
            for k in bad:
                native[centroid_point(ref[:, :, k], vol.zooms, jitter_mm, rng) + (k,)] = 1
            labels = nib.Nifti1Image(vol.to_native(native), vol.image.affine)
            seg = sde.segment(image, model=spec, threads=threads, prompts=labels)
            after = from_image(seg.mask, name).data > 0
            d1 = slice_dice(after, ref)
            untouched = [k for k in range(ref.shape[2]) if k not in bad]
            row.update(after=[float(d1[k]) for k in bad],
                       untouched_changed=sum(bool((after[:, :, k] != before[:, :, k]).any()) for k in untouched),
                       untouched_after=float(np.mean([d1[k] for k in untouched])) if untouched else float("nan"),
                       effects=Counter(p["effect"] for p in seg.confidence.get("prompts", [])))
        else:
            row["untouched_after"] = row["untouched_before"]
        rows.append(row)
    return rows


def _fmt(v: list[float]) -> str:
    return f"{np.mean(v):.2f}" if v else "-"


def markdown(rows: list[dict], model: str, note: str = "") -> str:
    lines = [f"Model {model}{note}. Prompted: reference cord slices with Dice < {BAD} on the hard image, one point each.",
             "",
             "| image | slices | hard | prompted | prompted Dice before -> after (mean) | worst after "
             "| effects | untouched slices changed | untouched Dice before -> after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = ", ".join(f"{k} {n}" for k, n in sorted(r["effects"].items())) or "-"
        worst = f"{min(r['after']):.2f}" if r["after"] else "-"
        lines.append(f"| {r['image']} | {r['slices']} | {r['hard']} | {r['prompted']} | {_fmt(r['before'])} -> "
                     f"{_fmt(r['after'])} | {worst} | {eff} | {r['untouched_changed']} / {r['slices'] - r['prompted']} "
                     f"| {r['untouched_before']:.3f} -> {r['untouched_after']:.3f} |")
    lines += ["", "| set | images | prompted slices | Dice before -> after (mean) | prompted slices >= 0.7 after "
              "| untouched slices changed |", "|---|---|---|---|---|---|"]
    for group in dict.fromkeys(r["group"] for r in rows):
        sel = [r for r in rows if r["group"] == group]
        b = [v for r in sel for v in r["before"]]
        a = [v for r in sel for v in r["after"]]
        lines.append(f"| {group} | {len(sel)} | {len(a)} | {_fmt(b)} -> {_fmt(a)} | {sum(v >= BAD for v in a)} / {len(a)} "
                     f"| {sum(r['untouched_changed'] for r in sel)} / {sum(r['slices'] - r['prompted'] for r in sel)} |")
    lines += ["", "| prompted slice | n | Dice before -> after (mean) | >= 0.7 after | worst after |", "|---|---|---|---|---|"]
    for kind in ("dim", "ghost", "other"):
        pairs = [(b, a) for r in rows for b, a, k in zip(r["before"], r["after"], r["kinds"]) if k == kind]
        if pairs:
            b, a = zip(*pairs)
            lines.append(f"| {kind} | {len(a)} | {_fmt(list(b))} -> {_fmt(list(a))} | {sum(v >= BAD for v in a)} "
                         f"| {min(a):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from validation import add_data_options, data_folder, show

    p.add_argument("-model", default="seg_sc_epi", help="name[@version] or model folder (default seg_sc_epi)")
    p.add_argument("-heldout", type=int, default=16, help="held-out simulated stacks")
    p.add_argument("-seed", type=int, default=1900, help="hardening seed (image i uses seed + i)")
    p.add_argument("-jitter", type=float, default=0.0,
                   help="click a reference voxel within this many mm of the centroid, at random (default 0: the centroid)")
    add_data_options(p)
    a = p.parse_args(argv)
    data = data_folder(a, "measure")
    if data is None:
        return 2
    from sct_deepseg_epi.api import load_model

    note = f", seed {a.seed}, {a.heldout} held-out stacks" + (f", clicks within {a.jitter:g} mm of the centroid" if a.jitter else "")
    show(markdown(study(a.model, data, a.heldout, a.threads, a.seed, a.jitter), load_model(a.model).ref, note), a.o)
    return 0


if __name__ == "__main__":
    sys.exit(main())
