"""The figure of docs/nnunet.md: one LAS image segmented under the two nnU-Net conventions.

A tiny nnU-Net model (planned by nnU-Net's own planner, 2d, one fold, fitted for a few
hundred steps) is trained on synthetic EPI-like cases to label the patient's *right*
half of the cord, a lateral label of the kind SCT's rootlet and grey-matter models have. It is
imported once (``sct`` convention, the default) and run on a test case stored LAS, the
usual Siemens orientation, under each convention:

* ``sct``: the image is reoriented to RAS first, as in training: the right half is labelled;
* ``nnunet``: the file's own axes, as nnU-Net's reader gives them: left and right are
  swapped for the model, which labels the wrong half.

Rows of the PNG, each a few axial slices (anterior up, patient's right on the left, as
SCT's QC shows them): the truth, the ``sct`` convention, the ``nnunet`` convention.

    python docs/nnunet_conventions_figure.py [-o docs/img/nnunet_conventions.png]

Needs the ``nnunet`` extra (torch, nnunetv2) to build the model; prints the Dice of each row.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE, ZOOMS = (48, 44, 10), (1.0, 1.0, 4.0)


def right_half(seg: np.ndarray) -> np.ndarray:
    """The voxels of a RAS mask on the patient's right of its centre, slice by slice (RAS: x grows to the right)."""
    out = np.zeros_like(seg)
    x = np.arange(seg.shape[0])[:, None]
    for k in range(seg.shape[2]):
        s = seg[..., k] > 0
        if s.any():
            cx = (x * s).sum() / s.sum()
            out[..., k] = s & (x > cx)
    return out


def build(work: Path) -> tuple[Path, Path]:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "tests"))
    from nnunet_synthetic import plan_dataset, write_trained

    from sct_deepseg_epi.nnunet.convert import import_nnunet

    plans, dj, raw = plan_dataset(work / "nn", dataset_id=504, shape=SHAPE, zooms=ZOOMS, n_cases=3,
                                  labels={"background": 0, "right": 1})
    for p in sorted((raw / "labelsTr").glob("*.nii.gz")):  # the same cases, labelled right half only
        img = nib.load(str(p))
        nib.save(nib.Nifti1Image(right_half(np.asarray(img.dataobj)), img.affine, img.header), str(p))
    trained = write_trained(work / "trained", plans, dj, configuration="2d", folds=1, features=(8, 16, 32),
                            train_steps=300, raw=raw)
    return trained, import_nnunet(trained, work / "model")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", default=str(REPO / "docs" / "img" / "nnunet_conventions.png"))
    ap.add_argument("-workdir", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from nnunet_parity import save_oriented, with_convention
    from nnunet_synthetic import synthetic_case

    from sct_deepseg_epi import api, qc_tiles

    work = Path(args.workdir or tempfile.mkdtemp(prefix="nnunet-conventions-"))
    work.mkdir(parents=True, exist_ok=True)
    _, model = build(work) if not (work / "model" / "manifest.json").is_file() else (None, work / "model")
    conv = {"sct": model, "nnunet": with_convention(model, "nnunet", work / "model_nnunet")
            if not (work / "model_nnunet").exists() else work / "model_nnunet"}
    img_ras, seg_ras = synthetic_case(SHAPE, ZOOMS, seed=77)
    truth_ras = right_half(seg_ras)
    image = save_oriented(img_ras, ZOOMS, "LAS", work / "bold_mean_LAS.nii.gz")
    assert "".join(nib.aff2axcodes(nib.load(str(image)).affine)) == "LAS"
    rows = [("truth (right half)", truth_ras)]
    for name, folder in conv.items():
        seg = api.segment(image, model=str(folder), threads=1)
        mask = np.asarray(seg.mask.dataobj)
        rows.append((f"{name} convention", nib.as_closest_canonical(nib.Nifti1Image(mask, seg.mask.affine))
                     .get_fdata().astype(np.uint8)))
    slices = [2, 5, 8]
    tiles = []
    for label, m in rows:
        a, b = m > 0, truth_ras > 0
        print(f"{label:<22} Dice vs truth {2 * (a & b).sum() / max(1, a.sum() + b.sum()):.3f}")
        cx, cy = np.argwhere(seg_ras[..., slices[1]] > 0).mean(axis=0)
        row = [qc_tiles.slice_tile(img_ras[..., z], m[..., z], None, (cx, cy), ZOOMS[:2]) for z in slices]
        gap = np.full((row[0].shape[0], 6, 3), 255, np.uint8)
        tiles.append(np.concatenate([t for r in row for t in (r, gap)][:-1], axis=1))
    sep = np.full((6, tiles[0].shape[1], 3), 255, np.uint8)
    png = np.concatenate([t for r in tiles for t in (r, sep)][:-1], axis=0)
    out = Path(args.o)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(qc_tiles.png_bytes(png))
    print(f"wrote {out} ({png.shape[1]} x {png.shape[0]} px); rows: " + json.dumps([r[0] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
