"""``sct_deepseg_epi evaluate -pred P -ref R``: compare predicted masks with reference masks.

P and R are two NIfTI files, or two folders (files matched by name: ``X_seg.nii.gz`` in P
goes with ``X_seg.nii.gz``, ``X_seg-manual.nii.gz`` or ``X.nii.gz`` style names in R that
share the stem before ``_seg``/``_mask``). Each pair must share its voxel grid. Metrics are
computed per volume and per axial slice (images are put in RAS first, so slices are
axial whatever the file's axis order); see :mod:`sct_deepseg_epi.metrics` for the
definitions and the empty-mask conventions.
"""
from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

from ._parser import Parser, setup_logging

_DERIVED = ("_soft", "_disagreement")
_SUFFIX_RE = re.compile(r"_(seg|mask|pred|label)([-_][A-Za-z0-9]+)*$", re.IGNORECASE)


def get_parser() -> Parser:
    p = Parser("sct_deepseg_epi evaluate", "Compare predicted masks with reference masks.\n\n" + __doc__.split("\n\n")[1])
    p.mandatory.add_argument("-pred", metavar="<file|folder>", required=True, help="Predicted mask(s).")
    p.mandatory.add_argument("-ref", metavar="<file|folder>", required=True, help="Reference mask(s).")
    p.optional.add_argument("-o", metavar="<file>", default=None,
                            help="Write the metrics: .tsv (one row per volume and per slice) or .json.")
    p.optional.add_argument("-per-slice", metavar="<0|1>", type=int, choices=(0, 1), default=1,
                            help="Also print the per-slice rows (default 1).")
    return p


def _stem(path: Path) -> str:
    from ..read import strip_nifti_suffix

    return Path(strip_nifti_suffix(path)).name


def _key(path: Path) -> str:
    return _SUFFIX_RE.sub("", _stem(path))


def match_pairs(pred: Path, ref: Path) -> list[tuple[Path, Path]]:
    """(pred, ref) file pairs from two files or two folders."""
    from ..errors import InputError
    from ..read import has_nifti_suffix

    for p in (pred, ref):
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
    if pred.is_file() and ref.is_file():
        return [(pred, ref)]
    if pred.is_dir() != ref.is_dir():
        raise InputError(f"-pred {pred} and -ref {ref} must both be files or both be folders")
    # the maps written beside a mask (-soft, -disagreement) are not predictions of their own
    preds = sorted(f for f in pred.rglob("*") if f.is_file() and has_nifti_suffix(f)
                   and not _stem(f).endswith(_DERIVED))
    refs = sorted(f for f in ref.rglob("*") if f.is_file() and has_nifti_suffix(f))
    by_stem = {_stem(r): r for r in refs}
    by_key: dict[str, list[Path]] = {}
    for r in refs:
        by_key.setdefault(_key(r), []).append(r)
    pairs = []
    for f in preds:
        r = by_stem.get(_stem(f))
        if r is None and len(by_key.get(_key(f), [])) == 1:
            r = by_key[_key(f)][0]
        if r is not None:
            pairs.append((f, r))
    if not pairs:
        raise InputError(f"no prediction in {pred} matches a reference in {ref} by name")
    return pairs


def _open(path: Path):
    """The image as a 3D or 4D NIfTI: a 2D file is one axial slice (nibabel cannot orient 2D data)."""
    import nibabel as nib
    import numpy as np

    from ..errors import InputError
    from ..read import READ_ERRORS, load_nifti, one_line

    img = load_nifti(path)
    try:
        if img.ndim == 2:
            img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None], img.affine, img.header)
    except READ_ERRORS as exc:
        raise InputError(f"{path}: the image data cannot be read; the file is truncated or damaged "
                         f"({one_line(exc)})") from None
    return img


def _load(path: Path, img):
    import nibabel as nib
    import numpy as np

    from ..errors import InputError
    from ..read import READ_ERRORS, one_line

    try:
        img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
    except READ_ERRORS as exc:  # a truncated mask: one line, not nibabel's EOFError
        raise InputError(f"{path}: the image data cannot be read; the file is truncated or damaged "
                         f"({one_line(exc)})") from None
    except nib.orientations.OrientationError as exc:
        raise InputError(f"{path}: its affine gives no orientation ({one_line(exc)})") from None
    return data, img  # the oriented image: its affine and zooms are in RAS axis order


def check_same_grid(pred: Path, ref: Path, pimg, rimg) -> None:
    """Refuse a pair whose voxels are not the same points in space: metrics compare voxel by voxel.

    ``pimg`` and ``rimg`` are in RAS axis order, so the same grid stored in another axis order passes."""
    import numpy as np

    from ..errors import InputError

    sp, sr = pimg.shape[:3], rimg.shape[:3]
    zp = tuple(float(z) for z in pimg.header.get_zooms()[:3])
    zr = tuple(float(z) for z in rimg.header.get_zooms()[:3])
    if sp != sr or not np.allclose(zp, zr, atol=1e-3):
        raise InputError(f"{pred}: grid {sp} @ {zp} differs from the reference {ref}: {sr} @ {zr}")
    # same shape and voxel size but shifted or rotated (1 um of float slack): scoring would be wrong
    if not np.allclose(pimg.affine, rimg.affine, atol=1e-3):
        far = float(np.linalg.norm(pimg.affine[:3, 3] - rimg.affine[:3, 3]))
        how = f"origins {far:.3g} mm apart" if far > 1e-3 else "axes oriented differently"
        raise InputError(f"{pred}: grid {sp} @ {zp} lies elsewhere than the reference {ref}'s ({how}); "
                         "pairs must share a voxel grid (resample one onto the other first)")


def evaluate_pair(pred: Path, ref: Path) -> tuple[dict, list[dict]]:
    """Volume row and slice rows for one pair (4D: every frame against a 3D or 4D reference)."""
    from .. import metrics

    p, pimg = _load(pred, _open(pred))
    r, rimg = _load(ref, _open(ref))
    check_same_grid(pred, ref, pimg, rimg)
    zp = tuple(float(z) for z in pimg.header.get_zooms()[:3])
    p = p > 0.5
    r = r > 0.5
    frames = range(p.shape[3]) if p.ndim == 4 else [None]
    vol_rows, slice_rows = [], []
    for t in frames:
        pt = p[..., t] if t is not None else p
        rt = r[..., t] if (t is not None and r.ndim == 4) else r
        name = str(pred) if t is None else f"{pred}[t={t}]"
        row = {"pred": name, "ref": str(ref), "slice": "all", **metrics.volume_metrics(pt, rt, zp)}
        vol_rows.append(row)
        slice_rows += [{"pred": name, "ref": str(ref), **s} for s in metrics.slice_metrics(pt, rt, zp)]
    return vol_rows, slice_rows


def _undefined_as_null(rows: list[dict]) -> list[dict]:
    """Undefined metrics (nan: a distance to an empty mask) as JSON null: NaN is not JSON."""
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logging(args.v)
    pairs = match_pairs(Path(args.pred), Path(args.ref))
    if args.o:  # before any metric is computed: not an input, a known format, a folder that takes it
        from ..outputs import check_output

        check_output(args.o, [f for pair in pairs for f in pair], role="metrics table",
                     suffixes=(".tsv", ".txt", ".csv", ".json"))
    volumes, slices = [], []
    for pred, ref in pairs:
        v, s = evaluate_pair(pred, ref)
        volumes += v
        slices += s
    cols = ["dice", "hd95_mm", "msd_mm", "rvd", "detection_rate"]
    out = sys.stdout
    out.write("pred\t" + "\t".join(cols) + "\n")
    for row in volumes:
        out.write(f"{row['pred']}\t" + "\t".join(_fmt(row[c]) for c in cols) + "\n")
        if args.per_slice:
            for s in (s for s in slices if s["pred"] == row["pred"]):
                out.write(f"  slice {s['slice']}\t" + "\t".join(_fmt(s.get(c, "")) for c in cols[:4])
                          + f"\t{'detected' if s['detected'] else 'MISSED' if s['area_ref_mm2'] else 'false positive'}\n")
    if len(volumes) > 1:
        import numpy as np

        mean = {c: float(np.nanmean([r[c] for r in volumes])) for c in cols}
        out.write("mean\t" + "\t".join(_fmt(mean[c]) for c in cols) + "\n")
    if args.o:
        from ..outputs import write_error
        from ..write import atomic_path

        o = Path(args.o)
        try:
            with atomic_path(o) as tmp:
                if o.suffix == ".json":
                    doc = {"volumes": _undefined_as_null(volumes), "slices": _undefined_as_null(slices)}
                    tmp.write_text(json.dumps(doc, indent=1, default=str, allow_nan=False) + "\n")
                else:
                    keys = ["pred", "ref", "slice"] + sorted({k for r in volumes + slices for k in r}
                                                            - {"pred", "ref", "slice"})
                    with open(tmp, "w", newline="") as fh:
                        w = csv.DictWriter(fh, keys, delimiter="," if o.suffix == ".csv" else "\t", restval="")
                        w.writeheader()
                        for r in volumes + slices:
                            w.writerow({k: _fmt(v) for k, v in r.items()})
        except OSError as exc:
            raise write_error(o, exc) from None
        out.write(f"wrote {o}\n")
    return 0
