"""Per-slice confidence: which slices of a mask a user should look at first.

For every axial slice (the last axis of a RAS volume) the report gives the cord area in
mm2, the mean probability and the mean ensemble disagreement (standard deviation across
members) inside the mask, and a flag with its reasons. The rules (version
``RULES_VERSION``, thresholds in :class:`ConfidenceRules`) are:

``gap``
    the slice is empty while slices below and above it hold cord (the cord does not vanish);
``low_probability``
    mean probability inside the mask below ``min_mean_probability`` (0.7);
``disagreement``
    mean disagreement inside the mask above ``max_mean_disagreement`` (0.15);
``area_jump``
    the area differs from the median of the nearest non-empty slices (up to two each side)
    by more than ``max_area_change`` (40 %) of that median;
``weak_evidence``
    no voxel of the slice's mask reaches the binarisation threshold: the slice was kept by
    the z-following postprocessing's lower thresholds (:mod:`sct_deepseg_epi.zfollow`).

Slices are counted along the input file's own slice axis (the voxel axis closest to
inferior-superior; ``slice_flags.axis`` in the sidecar), from 0. For a series segmented
volume by volume (``-4d each``), each volume gets its report and the sidecar summarises
them per slice: the median area, the mean of the means, ``frames_flagged`` (in how many
volumes the slice was flagged) and the reasons found in at least a tenth of the volumes
(at least one); the slice is flagged when any such reason is left.

The thresholds were set on the real EPI series and simulated stacks (docs/postprocessing.md):
there, the flagged sixth of the slices has a mean per-slice Dice of 0.67 against 0.85 for
the others, and the real series (correct on every slice) raise no flag. numpy only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RULES_VERSION = "confidence-1"


@dataclass(frozen=True)
class ConfidenceRules:
    min_mean_probability: float = 0.7
    max_mean_disagreement: float = 0.15
    max_area_change: float = 0.4

    def as_dict(self) -> dict:
        return {"version": RULES_VERSION, **asdict(self)}


def neighbour_median(areas: dict[int, float], z: int) -> float:
    """Median area of the nearest slices with cord (keys of ``areas``): up to two on each side of ``z``."""
    below = sorted((k for k in areas if k < z), reverse=True)[:2]
    above = sorted(k for k in areas if k > z)[:2]
    near = [areas[k] for k in below + above]
    return float(np.median(near)) if near else float("nan")


def slice_report(mask: np.ndarray, probability: np.ndarray, disagreement: np.ndarray | None, zooms,
                 threshold: float = 0.5, rules: ConfidenceRules = ConfidenceRules()) -> list[dict]:
    """One dict per slice of a RAS volume (last axis): ``slice``, ``area_mm2``, ``mean_probability``,
    ``mean_disagreement``, ``flag`` and ``reasons`` (module doc). Means are None on empty slices;
    ``threshold`` is the binarisation threshold the mask was made with.
    """
    m = np.asarray(mask) > 0
    p = np.asarray(probability, dtype=np.float32)
    d = None if disagreement is None else np.asarray(disagreement, dtype=np.float32)
    n_z = m.shape[2]
    counts = m.reshape(-1, n_z).sum(0)
    areas = counts * float(zooms[0]) * float(zooms[1])
    has = np.flatnonzero(counts)
    cord_areas = {int(k): float(areas[k]) for k in has}
    rows = []
    for k in range(n_z):
        reasons = []
        mp = md = None
        if counts[k]:
            inside = p[:, :, k][m[:, :, k]]
            mp = float(inside.mean())
            md = None if d is None else float(d[:, :, k][m[:, :, k]].mean())
            if mp < rules.min_mean_probability:
                reasons.append("low_probability")
            if md is not None and md > rules.max_mean_disagreement:
                reasons.append("disagreement")
            ref = neighbour_median(cord_areas, k)
            if not np.isnan(ref) and abs(areas[k] - ref) > rules.max_area_change * ref:
                reasons.append("area_jump")
            if float(inside.max()) < threshold:
                reasons.append("weak_evidence")
        elif has.size and has[0] < k < has[-1]:
            reasons.append("gap")
        rows.append({"slice": k, "area_mm2": round(float(areas[k]), 2),
                     "mean_probability": None if mp is None else round(mp, 4),
                     "mean_disagreement": None if md is None else round(md, 4),
                     "flag": bool(reasons), "reasons": reasons})
    return rows


def flagged(report: list[dict]) -> list[int]:
    """The slice indices a user should check first."""
    return [r["slice"] for r in report if r["flag"]]


def slice_axis(to_ras: np.ndarray) -> tuple[int, bool]:
    """(the input's voxel axis that becomes RAS z, whether its order is reversed), from an orientation."""
    axis = int(np.flatnonzero(np.asarray(to_ras)[:, 0] == 2)[0])
    return axis, bool(to_ras[axis][1] < 0)


def to_native(report: list[dict], to_ras: np.ndarray) -> list[dict]:
    """A report on RAS slices, renumbered along the input's own slice axis."""
    _, reverse = slice_axis(to_ras)
    if not reverse:
        return report
    n = len(report)
    return [{**r, "slice": n - 1 - r["slice"]} for r in report[::-1]]


def summarise(reports: list[list[dict]], min_fraction: float = 0.1) -> list[dict]:
    """One report per slice from the reports of the volumes of a series (module doc)."""
    if len(reports) == 1:
        return reports[0]
    need = max(1, int(np.ceil(min_fraction * len(reports))))
    out = []
    for rows in zip(*reports):
        probs = [r["mean_probability"] for r in rows if r["mean_probability"] is not None]
        dis = [r["mean_disagreement"] for r in rows if r["mean_disagreement"] is not None]
        seen: dict[str, int] = {}
        for r in rows:
            for why in r["reasons"]:
                seen[why] = seen.get(why, 0) + 1
        reasons = [w for w, n in seen.items() if n >= need]
        out.append({"slice": rows[0]["slice"], "area_mm2": round(float(np.median([r["area_mm2"] for r in rows])), 2),
                    "mean_probability": round(float(np.mean(probs)), 4) if probs else None,
                    "mean_disagreement": round(float(np.mean(dis)), 4) if dis else None,
                    "frames_flagged": sum(r["flag"] for r in rows), "flag": bool(reasons), "reasons": reasons})
    return out


def sidecar_block(reports: list[list[dict]], to_ras: np.ndarray) -> dict:
    """The sidecar's ``slices`` (one entry per slice, summarised over volumes) and ``slice_flags``."""
    rows = summarise(reports)
    return {"slices": rows, "slice_flags": {**ConfidenceRules().as_dict(), "axis": slice_axis(to_ras)[0],
                                            "volumes": len(reports), "flagged": flagged(rows)}}
