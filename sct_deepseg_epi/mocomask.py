"""The masks handed to ``sct_fmri_moco -m``: a cylinder around the cord (ANTs), or the cord (``-dl``).

Functions take arrays or paths; :func:`moco_mask` writes the file. ``sct_deepseg_epi.handoff``
re-exports them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from .errors import InputError
from .outputs import check_output
from .read import load_nifti, strip_nifti_suffix
from .write import like, save_nifti

log = logging.getLogger(__name__)

DEFAULT_DIAMETER_MM = 35.0  # SCT's fMRI tutorial: sct_create_mask -size 35mm -f cylinder
# cord mask for -dl: the cord grown by the CSF ring around it (2-3 mm) plus the cord's motion
# between volumes (up to 2-3 mm); docs/sct.md says why
DEFAULT_CORD_MARGIN_MM = 5.0
MASK_KINDS = ("cylinder", "cord")


def _grid(img: nib.Nifti1Image) -> tuple[tuple[int, ...], np.ndarray]:
    return tuple(img.shape[:3]), img.affine


def check_same_grid(seg_img: nib.Nifti1Image, seg_name: str, ref_img: nib.Nifti1Image, ref_name: str) -> None:
    """Raise InputError unless the segmentation lies on the 3D grid of the reference image."""
    (s_shape, s_aff), (r_shape, r_aff) = _grid(seg_img), _grid(ref_img)
    if s_shape != r_shape or not np.allclose(s_aff, r_aff, atol=1e-3):
        s_zooms = tuple(round(float(z), 3) for z in np.sqrt((s_aff[:3, :3] ** 2).sum(0)))
        r_zooms = tuple(round(float(z), 3) for z in np.sqrt((r_aff[:3, :3] ** 2).sum(0)))
        raise InputError(f"{seg_name}: its grid (shape {s_shape}, voxels {s_zooms} mm) differs from that of "
                         f"{ref_name} (shape {r_shape}, voxels {r_zooms} mm); use a segmentation of this image "
                         f"(sct_deepseg_epi -i {ref_name}) or bring it onto this grid first "
                         f"(sct_register_multimodal -identity 1 -x nn)")


def slice_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the superior-inferior direction (axial slices are across it)."""
    ornt = io_orientation(affine)
    return int(np.flatnonzero(ornt[:, 0] == 2)[0])


def cord_centreline(seg: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice in-plane centre of a 3D mask (voxel indices), slices without cord interpolated.

    Returns ``(centres, found)``: an (n_slices, 2) array of in-plane indices (the two other
    axes in increasing order) and a boolean array of the slices where the cord was present.
    Beyond the first and last cord slices the nearest centre is kept.
    """
    m = np.moveaxis(np.asarray(seg) > 0, axis, -1)
    n = m.shape[-1]
    found = m.reshape(-1, n).any(axis=0)
    if not found.any():
        raise InputError("the segmentation is empty (no cord found), so there is no centreline to centre on")
    centres = np.zeros((n, 2))
    for z in np.flatnonzero(found):
        idx = np.argwhere(m[..., z])
        centres[z] = idx.mean(axis=0)
    zs = np.flatnonzero(found)
    for k in range(2):
        centres[:, k] = np.interp(np.arange(n), zs, centres[zs, k])
    return centres, found


def cylinder(shape: tuple[int, int, int], affine: np.ndarray, centres: np.ndarray, axis: int,
             diameter_mm: float) -> np.ndarray:
    """A uint8 mask: in each slice, the disc of ``diameter_mm`` around that slice's centre.

    Distances are measured in millimetres through the affine, so anisotropic or oblique
    in-plane voxels give a round disc.
    """
    if not diameter_mm > 0:
        raise InputError(f"the cylinder diameter must be positive, not {diameter_mm} mm")
    in_plane = [k for k in range(3) if k != axis]
    va, vb = affine[:3, in_plane[0]], affine[:3, in_plane[1]]
    na, nb = shape[in_plane[0]], shape[in_plane[1]]
    ia, ib = np.meshgrid(np.arange(na, dtype=float), np.arange(nb, dtype=float), indexing="ij")
    out = np.zeros((na, nb, shape[axis]), np.uint8)
    r2 = (diameter_mm / 2.0) ** 2
    for z, (ca, cb) in enumerate(centres):
        da, db = ia - ca, ib - cb
        d2 = sum((da * va[k] + db * vb[k]) ** 2 for k in range(3))
        out[..., z] = d2 <= r2
    return np.moveaxis(out, -1, axis)


def dilate_in_plane(mask: np.ndarray, affine: np.ndarray, axis: int, margin_mm: float) -> np.ndarray:
    """Grow a 3D mask within each slice across ``axis`` by ``margin_mm`` (a disc in millimetres).

    A voxel joins the mask when a mask voxel of the same slice lies within ``margin_mm`` of it,
    distances taken through the affine so that anisotropic or oblique voxels give a round margin.
    """
    if not margin_mm >= 0:
        raise InputError(f"the cord mask margin must be zero or positive, not {margin_mm} mm")
    m = np.moveaxis(np.asarray(mask) > 0, axis, -1)
    if margin_mm == 0:
        return np.moveaxis(m, -1, axis).copy()
    in_plane = [k for k in range(3) if k != axis]
    va, vb = affine[:3, in_plane[0]], affine[:3, in_plane[1]]
    ra = int(np.ceil(margin_mm / np.linalg.norm(va)))
    rb = int(np.ceil(margin_mm / np.linalg.norm(vb)))
    na, nb = m.shape[:2]
    padded = np.pad(m, ((ra, ra), (rb, rb), (0, 0)))
    out = np.zeros_like(m)
    r2 = margin_mm ** 2 * (1 + 1e-9)  # a voxel exactly at the margin is in
    for a in range(-ra, ra + 1):
        for b in range(-rb, rb + 1):
            if float(((a * va + b * vb) ** 2).sum()) <= r2:
                out |= padded[ra + a:ra + a + na, rb + b:rb + b + nb]
    return np.moveaxis(out, -1, axis)


def _shift2d(plane: np.ndarray, da: int, db: int) -> np.ndarray:
    """``plane`` moved by (da, db) voxels; what leaves the plane is dropped, nothing wraps."""
    out = np.zeros_like(plane)
    na, nb = plane.shape
    src = plane[max(0, -da):na - max(0, da), max(0, -db):nb - max(0, db)]
    out[max(0, da):max(0, da) + src.shape[0], max(0, db):max(0, db) + src.shape[1]] = src
    return out


def cord_mask(seg: np.ndarray, affine: np.ndarray, margin_mm: float = DEFAULT_CORD_MARGIN_MM) -> np.ndarray:
    """The mask for ``sct_fmri_moco -dl``: the cord on every slice, grown in-plane by ``margin_mm``.

    1. A slice where the segmentation has no cord takes the cord of the nearest slice that has
       one, moved to that slice's interpolated centre (:func:`cord_centreline`): an axial series
       crosses the cord on every slice, and the DL correction sees nothing of a slice whose
       mask is empty, so it could not correct it.
    2. Every slice is grown in its own plane by ``margin_mm`` (:func:`dilate_in_plane`), never
       along the cord: the network finds the shift from the cord's edge against the CSF, and
       in each volume the cord sits where the motion put it, not where the temporal mean shows it.
    Returns a uint8 array of the segmentation's 3D shape.
    """
    axis = slice_axis(affine)
    centres, found = cord_centreline(seg, axis)
    m = np.moveaxis(np.asarray(seg) > 0, axis, -1).copy()
    zs = np.flatnonzero(found)
    for z in np.flatnonzero(~found):
        src = zs[np.argmin(np.abs(zs - z))]
        da, db = np.rint(centres[z] - centres[src]).astype(int)
        m[..., z] = _shift2d(m[..., src], int(da), int(db))
    return dilate_in_plane(np.moveaxis(m, -1, axis), affine, axis, margin_mm).astype(np.uint8)


def default_mask_path(bold: Path | str, kind: str = "cylinder") -> Path:
    """SCT's name for a mask made from ``fmri.nii.gz``: ``mask_fmri.nii.gz`` beside it.

    The cord mask is ``mask_fmri_cord.nii.gz``, so that one never passes for the other when a
    run changes from one motion correction to the other.
    """
    p = Path(bold)
    suffix = "_cord" if kind == "cord" else ""
    return p.parent / f"mask_{Path(strip_nifti_suffix(p.name)).name}{suffix}.nii.gz"


def moco_mask(bold: Path | str, seg: Path | str, out: Path | str | None = None,
              diameter_mm: float = DEFAULT_DIAMETER_MM, *, kind: str = "cylinder",
              margin_mm: float = DEFAULT_CORD_MARGIN_MM) -> Path:
    """Write the mask for ``sct_fmri_moco -m`` and return its path.

    ``kind="cylinder"`` (ANTs): a disc of ``diameter_mm`` per slice around the cord's centre.
    ``kind="cord"`` (``-dl``): :func:`cord_mask` with ``margin_mm``.
    ``bold`` is the fMRI series (3D or 4D) and ``seg`` a cord mask on its 3D grid (a 4D mask,
    from ``-4d each``, is reduced to the voxels that are cord in at least half the volumes).
    The default output is ``mask_<bold>.nii.gz`` beside ``bold``, as ``sct_create_mask`` names
    it (``mask_<bold>_cord.nii.gz`` for the cord mask).
    Raises InputError for a mask on another grid or an empty mask.
    """
    if kind not in MASK_KINDS:
        raise InputError(f"unknown moco mask kind {kind!r} (choose from {', '.join(MASK_KINDS)})")
    if kind == "cord" and not margin_mm >= 0:
        raise InputError(f"the cord mask margin must be zero or positive, not {margin_mm} mm")
    out = check_output(out if out is not None else default_mask_path(bold, kind), [bold, seg], role="moco mask")
    bold_img, seg_img = load_nifti(bold), load_nifti(seg)
    check_same_grid(seg_img, str(seg), bold_img, str(bold))
    data = np.asarray(seg_img.dataobj)
    if data.ndim == 4:
        data = (data > 0).mean(axis=-1) >= 0.5
    data = data.reshape(seg_img.shape[:3]) > 0
    axis = slice_axis(seg_img.affine)
    try:
        centres, found = cord_centreline(data, axis)
    except InputError as exc:
        raise InputError(f"{seg}: {exc}") from None
    if kind == "cord":
        mask = cord_mask(data, seg_img.affine, margin_mm)
    else:
        mask = cylinder(seg_img.shape[:3], seg_img.affine, centres, axis, diameter_mm)
    ref = seg_img if seg_img.ndim == 3 else seg_img.slicer[..., 0]
    save_nifti(like(mask, ref), out)
    n_missing = int((~found).sum())
    if n_missing:
        log.info("%s: %d of %d slices had no cord; their centre was interpolated", seg, n_missing, found.size)
    return out
