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
    the slice was kept only by the z-following postprocessing's lower threshold
    (``hysteresis`` or ``bridge``, see :mod:`sct_deepseg_epi.zfollow`).

The thresholds were set on the real EPI series and simulated stacks (docs/postprocessing.md):
there, the flagged sixth of the slices has a mean per-slice Dice of 0.66 against 0.84 for
the others, and the real series (correct on every slice) raise no flag. numpy only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

RULES_VERSION = "confidence-1"


@dataclass(frozen=True)
class ConfidenceRules:
    min_mean_probability: float = 0.7
    max_mean_disagreement: float = 0.15
    max_area_change: float = 0.4

    def as_dict(self) -> dict:
        return {"version": RULES_VERSION, **asdict(self)}


def _neighbour_median(areas: np.ndarray, k: int) -> float:
    below = [a for a in areas[:k][::-1] if a > 0][:2]
    above = [a for a in areas[k + 1:] if a > 0][:2]
    near = below + above
    return float(np.median(near)) if near else float("nan")


def slice_report(mask: np.ndarray, probability: np.ndarray, disagreement: np.ndarray | None, zooms,
                 kind: Sequence[str] | None = None, rules: ConfidenceRules = ConfidenceRules()) -> list[dict]:
    """One dict per slice: ``slice``, ``area_mm2``, ``mean_probability``, ``mean_disagreement``,
    ``flag`` and ``reasons`` (module doc). Means are None on empty slices; ``kind`` is what the
    z-following postprocessing kept each slice for, when it ran.
    """
    m = np.asarray(mask) > 0
    p = np.asarray(probability, dtype=np.float32)
    d = None if disagreement is None else np.asarray(disagreement, dtype=np.float32)
    n_z = m.shape[2]
    counts = m.reshape(-1, n_z).sum(0)
    areas = counts * float(zooms[0]) * float(zooms[1])
    has = np.flatnonzero(counts)
    rows = []
    for k in range(n_z):
        reasons = []
        mp = md = None
        if counts[k]:
            sel = m[:, :, k]
            mp = float(p[:, :, k][sel].mean())
            md = None if d is None else float(d[:, :, k][sel].mean())
            if mp < rules.min_mean_probability:
                reasons.append("low_probability")
            if md is not None and md > rules.max_mean_disagreement:
                reasons.append("disagreement")
            ref = _neighbour_median(areas, k)
            if not np.isnan(ref) and abs(areas[k] - ref) > rules.max_area_change * ref:
                reasons.append("area_jump")
            if kind is not None and kind[k] in ("hysteresis", "bridge"):
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
