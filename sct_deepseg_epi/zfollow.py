"""Postprocessing that follows the cord along z: probability (X, Y, Z) on the native RAS grid -> mask.

EPI is acquired slice by slice with thick slices, so the network's map is 2D-slice-wise:
keeping the largest 3D component drops every slice whose probability dips below the
threshold, and with a curved cord and thick slices consecutive slices' masks need not
even touch in 3D. This module decides slice by slice, guided by a centreline:

1. **Candidates.** Per axial slice, the in-plane (8-connected) components of
   ``p >= threshold`` with an area of at least ``min_area_mm2``.
2. **Chain.** Dynamic programming picks one chain of candidates along z, at most one per
   slice, maximising the summed evidence (``min(1, area / full_area_mm2)`` per candidate)
   minus ``gap_cost`` per skipped slice; two consecutive members may be at most
   ``tolerance_mm + slope * dz`` apart in-plane (``dz`` in mm, counted up to
   ``max_gap_mm``). Ghosts, specks and brain blobs off the cord's path lose to the cord's
   longer chain. Members whose area is below ``min_area_ratio`` times the median of their
   chain neighbours (two each side) are dropped from the chain.
3. **Centreline.** At every slice, a local linear fit (Gaussian weights in z, sigma
   ``max(15 mm, 2 dz)``) through the chain members' centroids; members more than
   ``tolerance_mm`` off the first fit are dropped and it is fitted again.
4. **Confident slices** (chain members) keep every ``p >= threshold`` component whose
   centroid lies within ``tolerance_mm`` of the centreline.
5. **Hysteresis along z.** Every other slice is tried, with the centreline as its guide:
   first those between the chain's ends, then outwards from each end, slice by slice. Let
   ``m`` be the largest probability within ``tolerance_mm`` of the centreline (beyond the
   chain's ends the radius grows by a fifth of the distance, up to twice, and each kept
   slice recentres the search for the next). The slice's mask is the component of
   ``p >= t`` holding that maximum, for the first ``t`` of the ladder ``threshold`` (when
   ``m >= threshold``), ``relative * min(m, threshold)``, ``relative**2 * min(m, threshold)``
   (never below ``floor``: the half-maximum contour of a weak response, then a quarter)
   whose component has at least ``min_area_ratio`` times the median area of the nearest
   kept slices (two each side) and at least ``min_area_mm2``; above ``max_area_ratio``
   times that median, ``t`` is raised until it fits. Evidence needed: ``m >= low``
   outwards (so noise below the cord's end stays empty: it is weak *and* small), and only
   ``m >= floor`` between two kept slices, where the cord cannot vanish ("bridge"); outwards,
   one failed slice is bridged when the slice after it passes, and the search stops at
   the second. A slice is never dropped because 3D connectivity broke.
6. Holes are filled slice by slice.

The result keeps no voxel off the centreline, so nothing depends on 3D connectivity.
numpy only (scipy's import costs more than the whole postprocessing).

**Prompts** (points from the user, :mod:`.prompts`; without any, nothing above runs
differently). Before the candidates are found: a point *on the cord* has the members run again
on its slice in windows centred on it and normalised on each window (``rerun``; a slice with
local signal loss is often only mis-normalised), and the windows' maximum replaces the slice's
map there; a point *not cord* zeroes the map's component under it. A point on the cord that
then lies in a component of ``p >= threshold`` makes that component the only candidate of its
slice, with an evidence (``FORCED``) no chain can outweigh: the chain goes through it. The
slices without a point then keep the result of the run without points, unless the points
re-routed the chain (a member of that run is no longer one: the chain had followed a ghost).
Last, each clicked slice is decided alone, from its final neighbours
(:func:`.prompts.apply_prompts`): the outline grown from the point, if it agrees with the
neighbours' cord placed at the point, pulled halfway towards that shape; else that shape.
A point not cord removes the mask's component under it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .confidence import neighbour_median
from .ndimage import label
from .postprocess import fill_holes

RULES_VERSION = "zfollow-1"
FORCED = 1000.0       # the chain evidence of a prompted component: more than any chain can gain otherwise


@dataclass(frozen=True)
class ZFollowOptions:
    threshold: float = 0.5       # confident voxels (the model's threshold)
    low: float = 0.10            # the evidence a slice next to confident ones needs near the centreline
    relative: float = 0.5        # weak slices: voxels >= relative * the slice's maximum near the centreline
    floor: float = 0.05          # never threshold a weak slice below this
    ladder: int = 2              # weak slices try relative**1 .. relative**ladder times their maximum
    min_area_mm2: float = 4.0    # smaller confident components are not cord candidates
    full_area_mm2: float = 20.0  # a candidate this large counts as full evidence
    gap_cost: float = 0.5        # chain score lost per slice skipped
    tolerance_mm: float = 6.0    # in-plane distance from the centreline that still counts as "on it"
    slope: float = 0.7           # allowed centroid shift per mm along z (about 35 degrees)
    max_gap_mm: float = 30.0     # the slope allowance stops growing beyond this z distance
    min_area_ratio: float = 0.35  # a kept slice's area vs its kept neighbours' median
    max_area_ratio: float = 2.0
    fill_holes: bool = True

    def __post_init__(self):
        if not 0 < self.floor <= self.low <= self.threshold < 1:
            raise ValueError(f"z-follow thresholds must satisfy 0 < floor <= low <= threshold < 1, "
                             f"not {self.floor}, {self.low}, {self.threshold}")


def zfollow_options(threshold: float, fill_holes: bool = True) -> ZFollowOptions:
    """The defaults at another confident threshold: the lower thresholds never exceed it."""
    d = ZFollowOptions()
    low = min(d.low, threshold)
    return ZFollowOptions(threshold=threshold, low=low, floor=min(d.floor, low), fill_holes=fill_holes)


@dataclass
class ZFollowResult:
    """The mask plus what each slice was kept for: 'chain', 'hysteresis', 'bridge', 'prompt' (grown from a
    point) or '' (empty)."""

    mask: np.ndarray
    kind: list[str]
    centreline_mm: np.ndarray  # (Z, 2) in-plane centre per slice (nan where there is no chain)
    prompts: list[str] = field(default_factory=list)  # each prompt's effect, in the order given
    route: dict[int, tuple] = field(default_factory=dict, repr=False)  # chain member per slice: (area, cx, cy)
    maps: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)  # a cord point's candidate maps


def _components(prob: np.ndarray, t: float, zooms) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """In-plane components of ``prob >= t`` with per-component z, area and centroid (mm)."""
    lab, n = label(prob >= t, full=True, axes=(0, 1))
    if n == 0:
        return lab, {k: np.zeros(0) for k in ("z", "area", "cx", "cy")}
    idx = np.flatnonzero(lab)
    lv = lab.ravel()[idx]
    x, y, z = np.unravel_index(idx, lab.shape)
    cnt = np.bincount(lv, minlength=n + 1)[1:].astype(float)
    zc = np.zeros(n + 1, np.int64)
    zc[lv] = z
    stats = {"z": zc[1:], "area": cnt * zooms[0] * zooms[1], "cx": np.bincount(lv, x, n + 1)[1:] / cnt * zooms[0],
             "cy": np.bincount(lv, y, n + 1)[1:] / cnt * zooms[1]}
    return lab, stats


def _chain(st: dict[str, np.ndarray], dz: float, o: ZFollowOptions, bonus: np.ndarray | None = None) -> list[int]:
    """Indices (into ``st``) of the best chain of candidates along z, by dynamic programming."""
    order = np.argsort(st["z"], kind="stable")
    z, cx, cy = st["z"][order], st["cx"][order], st["cy"][order]
    ev = np.minimum(1.0, st["area"][order] / o.full_area_mm2)
    if bonus is not None:
        ev = ev + bonus[order]
    score = ev.copy()
    prev = np.full(len(order), -1)
    for j in range(len(order)):
        earlier = np.flatnonzero(z < z[j])
        if earlier.size == 0:
            continue
        dzmm = np.minimum((z[j] - z[earlier]) * dz, o.max_gap_mm)
        allow = o.tolerance_mm + o.slope * dzmm
        dist = np.hypot(cx[earlier] - cx[j], cy[earlier] - cy[j])
        # a small pull towards straight paths breaks ties between equally long chains
        val = score[earlier] - o.gap_cost * (z[j] - z[earlier] - 1) - 0.1 * dist / allow
        val[dist > allow] = -np.inf
        k = int(np.argmax(val))
        if val[k] > 0:
            score[j] = ev[j] + val[k]
            prev[j] = earlier[k]
    j = int(np.argmax(score))
    out = []
    while j >= 0:
        out.append(int(order[j]))
        j = int(prev[j])
    return out[::-1]


def _fit_centreline(zs: np.ndarray, pts: np.ndarray, n_z: int, dz: float, o: ZFollowOptions) -> np.ndarray:
    """Local weighted linear fit of the members' centroids, evaluated at every slice: (n_z, 2)."""
    sigma = max(15.0, 2 * dz)
    out = np.empty((n_z, 2))
    for k in range(n_z):
        w = np.exp(-0.5 * ((zs - k) * dz / sigma) ** 2) + 1e-12
        zm = (w * zs).sum() / w.sum()
        pm = (w[:, None] * pts).sum(0) / w.sum()
        var = (w * (zs - zm) ** 2).sum()
        if var < 1e-9:
            out[k] = pm
            continue
        b = (w[:, None] * (zs - zm)[:, None] * (pts - pm)).sum(0) / var
        b = np.clip(b, -o.slope * dz, o.slope * dz)  # per slice
        out[k] = pm + b * (k - zm)
    return out


def _hysteresis(prob2: np.ndarray, centre: np.ndarray, radius: float, ref_area: float, zooms,
                o: ZFollowOptions, low: float) -> tuple[np.ndarray, float] | None:
    """One slice's mask around ``centre`` (mm) with a slice-relative threshold, or None."""
    nx, ny = prob2.shape
    gx = (np.arange(nx) * zooms[0] - centre[0]) ** 2
    gy = (np.arange(ny) * zooms[1] - centre[1]) ** 2
    disc = (gx[:, None] + gy[None, :]) <= radius ** 2
    if not disc.any():
        return None
    near = np.where(disc, prob2, -1.0)
    peak = np.unravel_index(int(np.argmax(near)), near.shape)
    m = float(prob2[peak])
    if m < low:
        return None
    # a ladder of thresholds, from the confident one down to the floor: the first whose
    # component has a sensible area wins
    ladder = [o.threshold] if m >= o.threshold else []
    ladder += sorted({max(o.floor, o.relative ** i * min(m, o.threshold)) for i in range(1, o.ladder + 1)}, reverse=True)
    for t in ladder:
        comp = component_at(prob2, peak, t, ref_area, zooms, o)
        if comp is None:
            continue
        area = comp.sum() * zooms[0] * zooms[1]
        if np.isnan(ref_area) or area >= o.min_area_ratio * ref_area:
            if area >= o.min_area_mm2 or m >= o.threshold:
                return comp, m
    return None


def component_at(prob2: np.ndarray, peak: tuple, t: float, ref_area: float, zooms,
                  o: ZFollowOptions) -> np.ndarray | None:
    """The component of ``prob2 >= t`` holding ``peak``, with ``t`` raised until its area is allowed."""
    pix = zooms[0] * zooms[1]
    for _ in range(8):
        lab, _ = label(prob2 >= t, full=True)
        comp = lab == lab[peak]
        if np.isnan(ref_area) or comp.sum() * pix <= o.max_area_ratio * ref_area:
            return comp
        # merged with its surroundings: the threshold that leaves the allowed area
        vals = np.sort(prob2[comp])[::-1]
        t = float(vals[min(len(vals) - 1, int(o.max_area_ratio * ref_area / pix))]) + 1e-6
        if t > prob2[peak]:
            return None
    return None


def zfollow(prob: np.ndarray, zooms, opts: ZFollowOptions = ZFollowOptions(), *, prompts: Sequence = (),
            rerun: Callable[[int, tuple[int, int], float], np.ndarray | None] | None = None) -> ZFollowResult:
    """Mask a probability volume (X, Y, Z), z the slice axis, following the cord along z (module doc).

    ``prompts``: :class:`~sct_deepseg_epi.prompts.Point` s (their ``ras`` voxel and ``cord``);
    ``rerun(z, (x, y), size_mm)``: the members' map of slice z in a window of that size centred
    on voxel (x, y), NaN outside the window, or None when the model cannot do that.
    """
    if not prompts:
        return _follow(prob, zooms, opts)
    from .prompts import apply_prompts

    base = _follow(prob, zooms, opts)
    res = _follow(prob, zooms, opts, prompts, rerun)
    # a prompt changes its own slice; others only when it re-routes the chain, i.e. when a member of
    # the chain without prompts is no longer one (a ghost's chain, say): a member added is not enough
    mine = {p.ras[2] for p in prompts}
    others = [k for k in range(len(res.kind)) if k not in mine]
    if all(res.route.get(k) == v for k, v in base.route.items() if k not in mine):
        res.mask[:, :, others] = base.mask[:, :, others]
        for k in others:
            res.kind[k] = base.kind[k]
        res.centreline_mm = base.centreline_mm
    return apply_prompts(res, prompts, tuple(float(v) for v in zooms[:3]), opts)


def _follow(prob: np.ndarray, zooms, opts: ZFollowOptions, prompts: Sequence = (), rerun=None) -> ZFollowResult:
    """:func:`zfollow`'s one pass, the prompts' changes included."""
    prob = np.asarray(prob, dtype=np.float32)
    zooms = tuple(float(v) for v in zooms[:3])
    n_z = prob.shape[2]
    effects: list[str] = []
    maps: dict[int, list[np.ndarray]] = {}
    if prompts:
        from .prompts import prompt_maps

        prob, effects, maps = prompt_maps(prob, prompts, zooms, opts, rerun)
    mask = np.zeros(prob.shape, bool)
    kind = [""] * n_z
    lab, st = _components(prob, opts.threshold, zooms)
    # prompted components: the only candidate of their slice, and (nearly) certain chain members
    forced = {int(lab[p.ras]) - 1 for p in prompts if p.cord and lab[p.ras]}
    forced_z = {int(st["z"][i]) for i in forced}
    keep = (st["area"] >= opts.min_area_mm2) | np.isin(np.arange(st["z"].size), list(forced))
    if forced:
        keep &= ~np.isin(st["z"], list(forced_z)) | np.isin(np.arange(st["z"].size), list(forced))
    cand = np.flatnonzero(keep)
    if cand.size == 0:
        return ZFollowResult(mask, kind, np.full((n_z, 2), np.nan), effects, maps=maps)
    sub = {k: v[cand] for k, v in st.items()}
    bonus = np.where(np.isin(cand, list(forced)), FORCED, 0.0) if forced else None
    members = [int(cand[i]) for i in _chain(sub, zooms[2], opts, bonus)]
    # members much smaller than their chain neighbours are specks on the path, not cord
    areas = {int(st["z"][i]): float(st["area"][i]) for i in members}
    members = [i for i in members if i in forced or not areas[int(st["z"][i])] <
               opts.min_area_ratio * neighbour_median(areas, int(st["z"][i]))] or members
    zs = st["z"][members].astype(float)
    pts = np.stack([st["cx"][members], st["cy"][members]], 1)
    line = _fit_centreline(zs, pts, n_z, zooms[2], opts)
    off = np.hypot(*(pts - line[zs.astype(int)]).T)
    if (off <= opts.tolerance_mm).any() and (off > opts.tolerance_mm).any():
        members = [i for i, d in zip(members, off) if d <= opts.tolerance_mm or i in forced]
        zs = st["z"][members].astype(float)
        line = _fit_centreline(zs, np.stack([st["cx"][members], st["cy"][members]], 1), n_z, zooms[2], opts)
    chain_z = {int(st["z"][i]) for i in members}
    kept_area: dict[int, float] = {}
    pix = zooms[0] * zooms[1]
    for k in sorted(chain_z):
        if k in forced_z:
            ids = [i + 1 for i in members if i in forced and int(st["z"][i]) == k]
        else:
            near = (st["z"] == k) & (np.hypot(st["cx"] - line[k, 0], st["cy"] - line[k, 1]) <= opts.tolerance_mm)
            ids = np.flatnonzero(near) + 1
        mask[:, :, k] = np.isin(lab[:, :, k], ids)
        kind[k] = "chain"
        kept_area[k] = float(mask[:, :, k].sum() * pix)
    z0, z1 = min(chain_z), max(chain_z)

    def attempt(k: int, beyond_mm: float, shift: np.ndarray, bridge: bool) -> np.ndarray | None:
        """Keep slice k if it passes; returns the offset of its centroid from the centreline."""
        radius = opts.tolerance_mm * min(2.0, 1.0 + 0.2 * beyond_mm / opts.tolerance_mm)
        got = _hysteresis(prob[:, :, k], line[k] + shift, radius, neighbour_median(kept_area, k), zooms, opts,
                          opts.floor if bridge else opts.low)
        if got is None:
            return None
        comp, m = got
        mask[:, :, k] = comp
        kind[k] = "bridge" if m < opts.low else "hysteresis"
        kept_area[k] = float(comp.sum() * pix)
        ii, jj = np.nonzero(comp)
        return np.array([ii.mean() * zooms[0], jj.mean() * zooms[1]]) - line[k]

    # between chain members the cord cannot vanish: any evidence above the floor will do
    for k in range(z0 + 1, z1):
        if k not in chain_z:
            attempt(k, 0.0, np.zeros(2), bridge=True)
    # outwards, each kept slice recentres the search for the next; one failed slice may be
    # bridged when the slice after it passes
    for step, end in ((1, z1), (-1, z0)):
        shift, k = np.zeros(2), end + step
        while 0 <= k < n_z:
            got = attempt(k, abs(k - end) * zooms[2], shift, bridge=False)
            if got is None:
                nxt = k + step
                if not 0 <= nxt < n_z:
                    break
                got = attempt(nxt, abs(nxt - end) * zooms[2], shift, bridge=False)
                if got is None:
                    break
                attempt(k, abs(k - end) * zooms[2], shift, bridge=True)
                k = nxt
            shift = got
            k += step
    if opts.fill_holes:
        mask = fill_holes(mask)
    route = {int(st["z"][i]): (float(st["area"][i]), float(st["cx"][i]), float(st["cy"][i])) for i in members}
    return ZFollowResult(mask, kind, line, effects, route=route, maps=maps)
