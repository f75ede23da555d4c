"""Prompts: points a user placed on the image, 1 on the cord, 2 on something that is not cord.

A prompt file is a label image on the input's own grid, as ``sct_label_utils -create-viewer``
or FSLeyes' edit mode write it: 0 everywhere except the points. It is read with the input's
reader (:func:`~sct_deepseg_epi.read.load_nifti`) and turned to RAS with the input's own
orientation, so a point lands on the same voxel whatever the file's axes. Touching voxels of
one value on one slice (a brush stroke) count as one point, at the voxel nearest their centre.

What a point does is part of the z-following postprocessing (:mod:`.zfollow`, "Prompts"),
which calls :func:`prompt_maps` before it looks for candidates and :func:`apply_prompts` at
the end. Each point's effect, in the sidecar: for a point on the cord, ``rerun+`` (the
members ran again on windows around it; ``norerun+``: the model cannot, nnU-Net's recipe
runs on the whole field) then ``outline`` (the network's outline at the point, pulled towards
the neighbours' cord), ``shape`` (the neighbours' cord placed at the point: the network's
outlines there disagree with it) or ``none`` (no cord anywhere to take a shape from, nothing
grown); for a point not cord, ``removed`` or ``nothing_under``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation

from .confidence import neighbour_median, slice_axis
from .errors import InputError
from .metrics import dice
from .ndimage import label
from .postprocess import fill_holes
from .read import READ_ERRORS, Volume, load_nifti, one_line
from .zfollow import ZFollowOptions, ZFollowResult, component_at

CORD, NOT_CORD = 1, 2
PROMPT_SEED_MM = 3.0  # a point's seed: the map's maximum this close to it (a click is rarely on the peak)
# a prompted slice's re-run windows, smallest first: a small one normalises a local signal loss away
# (the network sees the cord's own contrast again), a larger one keeps the context that a ghost needs
PROMPT_WINDOWS_MM = (24.0, 32.0, 48.0)
PROMPT_AGREE = 0.7  # an outline this close (Dice) to the neighbours' cord placed at the point is the cord
# what segment(prompts=...) takes: a label file, a label image, or (i, j, k, value) voxel points
PromptSource = Union[str, Path, nib.Nifti1Image, Sequence[Sequence[int]]]


@dataclass(frozen=True)
class Point:
    """One prompt: its voxel on the RAS grid (``ras``) and on the input's own (``voxel``, ``mm``)."""

    ras: tuple[int, int, int]
    cord: bool
    voxel: tuple[int, int, int]
    mm: tuple[float, float, float]
    slice: int  # along the input's own slice axis, as the sidecar's ``slices`` count them

    def record(self, effect: str) -> dict[str, Any]:
        return {"slice": self.slice, "value": CORD if self.cord else NOT_CORD, "voxel": list(self.voxel),
                "mm": [round(v, 2) for v in self.mm], "effect": effect}


def _to_ras_index(ijk: Sequence[int], shape: Sequence[int], to_ras: np.ndarray) -> tuple[int, int, int]:
    """A voxel index on the input's axes -> its index on the RAS grid (as apply_orientation moves it)."""
    out = [0, 0, 0]
    for axis in range(3):
        new, flip = int(to_ras[axis, 0]), to_ras[axis, 1] < 0
        out[new] = int(shape[axis] - 1 - ijk[axis] if flip else ijk[axis])
    return out[0], out[1], out[2]


def _points(voxels: list[tuple[tuple[int, int, int], int]], vol: Volume) -> list[Point]:
    shape = vol.image.shape[:3]
    axis = slice_axis(vol.to_ras)[0]
    out = []
    for ijk, value in voxels:
        mm = tuple(float(v) for v in nib.affines.apply_affine(vol.image.affine, ijk))
        out.append(Point(_to_ras_index(ijk, shape, vol.to_ras), value == CORD, tuple(int(v) for v in ijk),
                         mm, int(ijk[axis])))  # type: ignore[arg-type]
    return out


def _label_points(data: np.ndarray, vol: Volume) -> list[tuple[tuple[int, int, int], int]]:
    """One (voxel, value) per stroke: touching voxels of one value on one slice of the input's own axes."""
    axis = slice_axis(vol.to_ras)[0]
    out = []
    for value in (CORD, NOT_CORD):
        moved = np.moveaxis(data == value, axis, 2)
        lab, n = label(moved, full=True, axes=(0, 1))
        for c in range(1, n + 1):
            pts = np.argwhere(lab == c)
            centre = pts.mean(0)
            best = pts[int(np.argmin(((pts - centre) ** 2).sum(1)))]
            ijk = list(best[:2])
            ijk.insert(axis, best[2])
            out.append((tuple(int(v) for v in ijk), value))
    return sorted(out)


def _check_grid(img: nib.Nifti1Image, vol: Volume, source: str) -> np.ndarray:
    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"{source}: a prompt image must be 3D (one label per voxel), not of shape {tuple(img.shape)}")
    ref = vol.image
    if shape != ref.shape[:3] or not np.allclose(img.affine, ref.affine, atol=1e-3):
        raise InputError(f"{source}: the prompt image is not on the input's grid (shape {tuple(shape)} vs "
                         f"{tuple(ref.shape[:3])}, or another affine); place the points on {vol.source} itself")
    try:
        data = np.asarray(img.dataobj, dtype=np.float64).reshape(shape)
    except READ_ERRORS as exc:
        raise InputError(f"{source}: the prompt image cannot be read ({one_line(exc)})") from None
    bad = ~np.isin(data, (0, CORD, NOT_CORD))
    if bad.any():
        vals = ", ".join(f"{v:g}" for v in np.unique(data[bad])[:5])
        raise InputError(f"{source}: a prompt image holds 1 (cord) and 2 (not cord) on a background of 0, "
                         f"not {vals}")
    return data


def read_prompts(prompts: PromptSource | None, vol: Volume) -> list[Point]:
    """The points of a prompt file, image or list of ``(i, j, k, value)`` on ``vol``'s grid; [] for None.

    Raises InputError (one line) for a label image on another grid or with more than 3
    dimensions, values other than 0, 1 and 2, or a point outside the image.
    """
    if prompts is None:
        return []
    if isinstance(prompts, (str, Path)):
        return _points(_label_points(_check_grid(load_nifti(prompts), vol, str(prompts)), vol), vol)
    if isinstance(prompts, nib.spatialimages.SpatialImage):
        source = getattr(prompts, "get_filename", lambda: None)() or "<prompt image>"
        return _points(_label_points(_check_grid(prompts, vol, source), vol), vol)
    voxels = []
    shape = vol.image.shape[:3]
    for p in prompts:
        if len(p) != 4:
            raise InputError(f"<prompts>: a point is (i, j, k, value), not {tuple(p)!r}")
        ijk, value = tuple(int(v) for v in p[:3]), p[3]
        if value not in (CORD, NOT_CORD):
            raise InputError(f"<prompts>: point {ijk} has value {value!r}; 1 marks cord, 2 not cord")
        if any(not 0 <= i < n for i, n in zip(ijk, shape)):
            raise InputError(f"<prompts>: point {ijk} is outside the image of shape {tuple(shape)}")
        voxels.append((ijk, int(value)))
    return _points(voxels, vol)


def ras_label_image(points: Sequence[Point], shape: tuple[int, int, int]) -> np.ndarray:
    """The points as a uint8 label volume on the RAS grid (for the QC page)."""
    out = np.zeros(shape, np.uint8)
    for p in points:
        out[p.ras] = CORD if p.cord else NOT_CORD
    return out


def native_labels(points: Sequence[Point], vol: Volume) -> np.ndarray:
    """The points on the input's own grid (a check that reading and writing agree)."""
    return apply_orientation(ras_label_image(points, vol.data.shape[:3]), vol.from_ras)


def sidecar_points(side: dict, vol: Volume) -> dict[int, list[dict]]:
    """A sidecar's ``prompts`` keyed by RAS z: {z: [{"x", "y", "value", "effect", "slice"}]} (RAS x, y)."""
    rows = side.get("prompts") if isinstance(side, dict) else None
    out: dict[int, list[dict]] = {}
    for r in rows if isinstance(rows, list) else []:
        try:
            x, y, z = _to_ras_index([int(v) for v in r["voxel"]], vol.image.shape[:3], vol.to_ras)
            item = {"x": x, "y": y, "value": int(r["value"]), "effect": str(r.get("effect", "")), "slice": int(r["slice"])}
        except (KeyError, TypeError, ValueError, IndexError):
            continue  # a sidecar edited by hand: show what can be read
        if all(0 <= v < n for v, n in zip((x, y, z), vol.data.shape)):
            out.setdefault(z, []).append(item)
    return out


# --- what the points do, in z-following (zfollow.py calls these) ---------------------------------

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
        comp = component_at(prob2, seed, t, ref_area, zooms, o)
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


def prompt_maps(prob: np.ndarray, prompts, zooms, o: ZFollowOptions, rerun) -> tuple[np.ndarray, list[str], dict]:
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


def apply_prompts(res: ZFollowResult, prompts, zooms, o: ZFollowOptions) -> ZFollowResult:
    """The clicked slices' last word, once the others are final: the outline at a cord point or the
    neighbours' shape; 'not cord' removed."""
    mask, effects, maps = res.mask, res.prompts, res.maps
    clicked = sorted({p.ras[2] for p in prompts})
    # what the slices without a point hold: the clicked ones' neighbours, whatever the order of the points
    around = mask.copy()
    around[:, :, clicked] = False
    pix = zooms[0] * zooms[1]
    areas = {int(z): float(around[:, :, z].sum() * pix) for z in np.flatnonzero(around.any(axis=(0, 1)))}
    decided: set[int] = set()  # several points on one slice: the union of what each finds
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
            agree = [dice(c, prior) for c in outlines]
            if agree and agree[0] >= PROMPT_AGREE:
                comp, how = _blend(outlines[0], prior, (x, y), zooms), "outline"
            elif agree and max(agree) >= PROMPT_AGREE:
                comp, how = _blend(outlines[int(np.argmax(agree))], prior, (x, y), zooms), "outline"
            else:
                comp, how = prior, "shape"
        effects[n] += how
        if comp is None:
            continue
        comp = fill_holes(comp[:, :, None])[:, :, 0] if o.fill_holes else comp
        mask[:, :, k] = (mask[:, :, k] | comp) if k in decided else comp
        decided.add(k)
        res.kind[k] = "prompt"
    for p in prompts:
        x, y, k = p.ras
        if not p.cord and mask[x, y, k]:
            sl, _ = label(mask[:, :, k], full=True)
            mask[:, :, k] &= sl != sl[x, y]
    res.maps = {}
    return res
