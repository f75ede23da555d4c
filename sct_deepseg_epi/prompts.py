"""Prompts: points a user placed on the image, 1 on the cord, 2 on something that is not cord.

A prompt file is a label image on the input's own grid, as ``sct_label_utils -create-viewer``
or FSLeyes' edit mode write it: 0 everywhere except the points. It is read with the input's
reader (:func:`~sct_deepseg_epi.read.load_nifti`) and turned to RAS with the input's own
orientation, so a point lands on the same voxel whatever the file's axes. Touching voxels of
one value on one slice (a brush stroke) count as one point, at the voxel nearest their centre.

What a point does is decided in the z-following postprocessing (:mod:`.zfollow`, "Prompts").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation

from .confidence import slice_axis
from .errors import InputError
from .ndimage import label
from .read import READ_ERRORS, Volume, load_nifti, one_line

CORD, NOT_CORD = 1, 2
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
