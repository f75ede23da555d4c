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

**Prompts** (:mod:`.prompts`; without any, nothing above changes). A point *not cord*
zeroes the soft map's component under it (at ``min(threshold, p)``, ``p`` the map at the
point) before anything else, and removes the mask's component under it at the end. A point
*on the cord* where the map is below ``threshold`` first has the members run again on that
slice in a window centred on it, normalised on that window (``rerun``: a slice with local
signal loss is often only mis-normalised); that window's map replaces the slice's there.
Where the point then lies in a component of ``p >= threshold``, that component is the only
candidate of its slice and must be in the chain (its evidence is raised far above any
other's). Otherwise, after everything else, the slice's mask becomes the component grown
from the point (its maximum within ``PROMPT_SEED_MM``) by the hysteresis ladder of step 5,
bounded by ``max_area_ratio`` times the neighbours' median area. Each point's effect is
reported: ``chain``, ``grown`` or ``none`` (nothing to grow), after ``rerun+`` when the
window was run (``norerun+`` when the model cannot: nnU-Net's recipe runs on the whole
field), and ``removed`` or ``nothing_under`` for a point not on the cord.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .confidence import neighbour_median
from .ndimage import label
from .postprocess import fill_holes

RULES_VERSION = "zfollow-1"
PROMPT_SEED_MM = 3.0  # a point's seed: the map's maximum this close to it (a click is rarely on the peak)
FORCED = 1000.0       # the chain evidence of a prompted component: more than any chain can gain otherwise
# a prompted slice's re-run windows, smallest first: a small one normalises a local signal loss away
# (the network sees the cord's own contrast again), a larger one keeps the context that a ghost needs
PROMPT_WINDOWS_MM = (24.0, 32.0, 48.0)
PROMPT_AGREE = 0.7  # an outline this close (Dice) to the neighbours' cord placed at the point is the cord


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
        comp = _component_at(prob2, peak, t, ref_area, zooms, o)
        if comp is None:
            continue
        area = comp.sum() * zooms[0] * zooms[1]
        if np.isnan(ref_area) or area >= o.min_area_ratio * ref_area:
            if area >= o.min_area_mm2 or m >= o.threshold:
                return comp, m
    return None


def _component_at(prob2: np.ndarray, peak: tuple, t: float, ref_area: float, zooms,
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


def _seed(prob2: np.ndarray, xy: tuple[int, int], zooms) -> tuple[int, int]:
    """The map's maximum within PROMPT_SEED_MM of a point (the point itself on a tie)."""
    nx, ny = prob2.shape
    gx = ((np.arange(nx) - xy[0]) * zooms[0]) ** 2
    gy = ((np.arange(ny) - xy[1]) * zooms[1]) ** 2
    near = np.where(gx[:, None] + gy[None, :] <= PROMPT_SEED_MM ** 2, prob2, -1.0)
    near[xy] += 1e-6
    return np.unravel_index(int(np.argmax(near)), near.shape)  # type: ignore[return-value]


def _grow(prob2: np.ndarray, xy: tuple[int, int], ref_area: float, zooms, o: ZFollowOptions) -> np.ndarray | None:
    """A prompted slice's cord: grown from the point down step 5's ladder (at most to ``floor``)."""
    seed = _seed(prob2, xy, zooms)
    m = float(prob2[seed])
    if m < o.floor:
        return None
    ladder = [o.threshold] if m >= o.threshold else []
    ladder += sorted({max(o.floor, o.relative ** i * min(m, o.threshold)) for i in range(1, o.ladder + 1)}, reverse=True)
    for t in ladder:
        comp = _component_at(prob2, seed, t, ref_area, zooms, o)
        if comp is not None and (np.isnan(ref_area) or comp.sum() * zooms[0] * zooms[1] >= o.min_area_ratio * ref_area):
            return comp
    return None


def _neighbour_shape(mask: np.ndarray, k: int, xy: tuple[int, int]) -> np.ndarray | None:
    """The nearest slice's cord (the one below on a tie), moved so that its centroid lies on the point."""
    has = np.flatnonzero(mask.any(axis=(0, 1)))
    has = has[has != k]
    if has.size == 0:
        return None
    src = mask[:, :, int(has[np.argmin(np.abs(has - k) + 0.1 * (has > k))])]
    ii, jj = np.nonzero(src)
    dx, dy = int(round(xy[0] - ii.mean())), int(round(xy[1] - jj.mean()))
    ii, jj = ii + dx, jj + dy
    ok = (ii >= 0) & (ii < mask.shape[0]) & (jj >= 0) & (jj < mask.shape[1])
    out = np.zeros(mask.shape[:2], bool)
    out[ii[ok], jj[ok]] = True
    return out


def _prompt_maps(prob: np.ndarray, prompts, zooms, o: ZFollowOptions, rerun) -> tuple[np.ndarray, list[str], dict]:
    """The soft map with the prompts' changes (windows' maximum on clicked slices, components under
    'not cord' zeroed), each prompt's effect so far, and each cord point's candidate maps."""
    prob = prob.copy()
    effects = [""] * len(prompts)
    maps: dict[int, list[np.ndarray]] = {}
    for n, p in enumerate(prompts):
        x, y, k = p.ras
        if p.cord:
            maps[n] = [prob[:, :, k].copy()]
            wins = [rerun(k, (x, y), size) for size in PROMPT_WINDOWS_MM] if rerun is not None else [None]
            if any(w is None for w in wins):
                effects[n] = "norerun+"  # the model cannot: the slice's own map is all there is
                continue
            maps[n] += [np.where(np.isfinite(w), w, prob[:, :, k]) for w in wins]
            # the chain sees the windows' maximum: each size rescues what another misses
            prob[:, :, k] = np.fmax.reduce(np.stack(maps[n][1:]))
            maps[n].append(prob[:, :, k].copy())
            effects[n] = "rerun+"
    for n, p in enumerate(prompts):
        x, y, k = p.ras
        if not p.cord:
            v = float(prob[x, y, k])
            effects[n] = "nothing_under"
            if v >= o.floor:
                lab, _ = label(prob[:, :, k] >= min(o.threshold, v), full=True)
                prob[:, :, k][lab == lab[x, y]] = 0
                effects[n] = "removed"
    return prob, effects, maps


def zfollow(prob: np.ndarray, zooms, opts: ZFollowOptions = ZFollowOptions(), *, prompts: Sequence = (),
            rerun: Callable[[int, tuple[int, int], float], np.ndarray | None] | None = None) -> ZFollowResult:
    """Mask a probability volume (X, Y, Z), z the slice axis, following the cord along z (module doc).

    ``prompts``: :class:`~sct_deepseg_epi.prompts.Point` s (their ``ras`` voxel and ``cord``);
    ``rerun(z, (x, y), size_mm)``: the members' map of slice z in a window of that size centred
    on voxel (x, y), NaN outside the window, or None when the model cannot do that.
    """
    if not prompts:
        return _follow(prob, zooms, opts)
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
    return _apply_prompts(res, prompts, tuple(float(v) for v in zooms[:3]), opts)


def _follow(prob: np.ndarray, zooms, opts: ZFollowOptions, prompts: Sequence = (), rerun=None) -> ZFollowResult:
    """:func:`zfollow`'s one pass, the prompts' changes included."""
    prob = np.asarray(prob, dtype=np.float32)
    zooms = tuple(float(v) for v in zooms[:3])
    n_z = prob.shape[2]
    effects: list[str] = []
    maps: dict[int, list[np.ndarray]] = {}
    if prompts:
        prob, effects, maps = _prompt_maps(prob, prompts, zooms, opts, rerun)
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


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


def _signed_distance(m: np.ndarray, zooms) -> np.ndarray:
    """Distance (mm) from each pixel centre to the mask's edge: negative inside, positive outside."""
    pts = np.argwhere(np.ones(m.shape, bool)) * np.asarray(zooms[:2])
    inside, outside = pts[m.ravel()], pts[~m.ravel()]
    out = np.empty(m.size)
    for sel, other, sign in ((m.ravel(), outside, -1.0), (~m.ravel(), inside, 1.0)):
        d = np.sqrt(((pts[sel][:, None, :] - other[None, :, :]) ** 2).sum(-1)).min(1) if other.size else 1e3
        out[sel] = sign * d
    return out.reshape(m.shape)


def _blend(outline: np.ndarray, prior: np.ndarray, xy: tuple[int, int], zooms) -> np.ndarray:
    """An outline pulled halfway towards the neighbours' shape: the mean of their signed distances < 0,
    the component at the point (the outline itself when that misses the point). blend(m, m) is m."""
    both = np.argwhere(outline | prior)
    lo = np.maximum(both.min(0) - 2, 0)
    hi = np.minimum(both.max(0) + 3, outline.shape)
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))  # small: the distances are computed pixel to pixel
    inside = np.zeros(outline.shape, bool)
    inside[box] = _signed_distance(outline[box], zooms) + _signed_distance(prior[box], zooms) < 0
    lab, _ = label(inside, full=True)
    return lab == lab[xy] if lab[xy] else outline


def _apply_prompts(res: ZFollowResult, prompts, zooms, o: ZFollowOptions) -> ZFollowResult:
    """The clicked slices' last word, once the others are final: the outline at a cord point or the
    neighbours' shape; 'not cord' removed."""
    mask, effects, maps = res.mask, res.prompts, res.maps
    clicked = sorted({p.ras[2] for p in prompts})
    # what the slices without a point hold: the clicked ones' neighbours, whatever the order of the points
    around = mask.copy()
    around[:, :, clicked] = False
    pix = zooms[0] * zooms[1]
    areas = {int(z): float(around[:, :, z].sum() * pix) for z in np.flatnonzero(around.any(axis=(0, 1)))}
    for n, p in enumerate(prompts):
        x, y, k = p.ras
        if not p.cord:
            continue
        ref = neighbour_median(areas, k)
        prior = _neighbour_shape(around, k, (x, y))
        # the outline on the windows' maximum (the map the chain saw: maps[n][-1]) first, then the others
        outlines = [c for c in (_grow(m, (x, y), ref, zooms, o) for m in maps[n][::-1]) if c is not None]
        if prior is None:
            comp, how = (outlines[0], "outline") if outlines else (None, "none")
        else:
            # an outline close to the neighbours' cord placed at the point (the windows' maximum's if it is,
            # else the closest), pulled towards that shape; none: the network sees something else there
            # (a ghost, the signal loss) and the neighbours' shape is the better guess
            agree = [_dice(c, prior) for c in outlines]
            if agree and agree[0] >= PROMPT_AGREE:
                comp, how = _blend(outlines[0], prior, (x, y), zooms), "outline"
            elif agree and max(agree) >= PROMPT_AGREE:
                comp, how = _blend(outlines[int(np.argmax(agree))], prior, (x, y), zooms), "outline"
            else:
                comp, how = prior, "shape"
        effects[n] += how
        if comp is None:
            continue
        mask[:, :, k] = fill_holes(comp[:, :, None])[:, :, 0] if o.fill_holes else comp
        res.kind[k] = "prompt"
    for p in prompts:
        x, y, k = p.ras
        if not p.cord and mask[x, y, k]:
            sl, _ = label(mask[:, :, k], full=True)
            mask[:, :, k] &= sl != sl[x, y]
    res.maps = {}
    return res
