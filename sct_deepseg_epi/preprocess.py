"""Stage 2, preprocess: a RAS volume -> a batch of network inputs on the model grid, and the undo.

Only the axial plane is resampled (EPI slices are thick and few, and the model is 2D with
optional neighbouring slices as channels). Resampling is separable and linear: one small
matrix per axis, so going to the model grid and back are two cheap matrix products.
Training uses these same functions, so what the network sees at inference is exactly what
it saw while learning.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import InputError
from .registry.manifest import ModelSpec, Normalisation

# Bounds on the in-plane model grid, checked before anything is resampled. A model-grid axis
# of 4096 samples is 4 m at 1 mm: no spine image is that wide, so more means a wrong pixel size
# in the header (300 mm instead of 3 mm, say). The voxel bound keeps one float32 copy of the
# resampled volume at 1 GiB; preprocessing and inference hold a few such copies.
MAX_GRID_AXIS = 4096
MAX_GRID_VOXELS = 1 << 28


@lru_cache(maxsize=64)
def interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights mapping samples on one grid to another covering the same extent.

    Upsampling interpolates linearly between voxel centres; downsampling averages the area
    each output voxel covers, so thin structures are not aliased away. Rows sum to 1.
    """
    m = np.zeros((n_out, n_in), dtype=np.float32)
    if n_in == 1:
        m[:, 0] = 1.0
    elif n_out >= n_in:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).astype(np.float32)
        np.add.at(m, (np.arange(n_out), lo), 1 - frac)
        np.add.at(m, (np.arange(n_out), hi), frac)
    else:
        scale = n_in / n_out
        for j in range(n_out):
            a, b = j * scale, (j + 1) * scale
            for i in range(int(np.floor(a)), min(int(np.ceil(b)), n_in)):
                m[j, i] = (min(b, i + 1) - max(a, i)) / scale
    m.setflags(write=False)
    return m


def model_grid_shape(shape_xy: tuple[int, int], zooms_xy: tuple[float, float],
                     spacing_xy: tuple[float, float]) -> tuple[int, int]:
    """In-plane shape on the model grid: same field of view, spacing as close to the model's as fits."""
    return tuple(max(1, int(round(n * z / s))) for n, z, s in zip(shape_xy, zooms_xy, spacing_xy))  # type: ignore[return-value]


def check_grid(grid: tuple[int, ...], source: str, what: str) -> None:
    """Refuse a resampling target beyond MAX_GRID_AXIS per axis or MAX_GRID_VOXELS in all."""
    if max(grid) > MAX_GRID_AXIS or int(np.prod(grid, dtype=object)) > MAX_GRID_VOXELS:
        raise InputError(f"{source}: {what} needs {'x'.join(map(str, grid))} samples, beyond the limit of "
                         f"{MAX_GRID_AXIS} per axis and {MAX_GRID_VOXELS} in all (1 GiB per copy); "
                         "check the pixel size in the header")


def check_model_grid(shape: tuple[int, ...], zooms: tuple[float, ...], spacing_xy: tuple[float, float],
                     source: str = "<image>") -> tuple[int, int]:
    """The in-plane model grid of a (X, Y, Z) RAS volume, refused if implausibly large."""
    grid = model_grid_shape((int(shape[0]), int(shape[1])), (float(zooms[0]), float(zooms[1])), spacing_xy)
    fov = " x ".join(f"{n * z:g}" for n, z in zip(shape[:2], zooms[:2]))
    check_grid(grid + (int(shape[2]) if len(shape) > 2 else 1,), source,
               f"resampling {shape[0]}x{shape[1]} voxels of {zooms[0]:g} x {zooms[1]:g} mm (a {fov} mm field of view) "
               f"to the model's {spacing_xy[0]:g} mm grid")
    return grid


def resample_inplane(arr: np.ndarray, shape_xy: tuple[int, int]) -> np.ndarray:
    """Resample the first two axes of ``arr`` (X, Y, ...) to ``shape_xy``; other axes untouched."""
    nx, ny = arr.shape[:2]
    if (nx, ny) == tuple(shape_xy):
        return np.asarray(arr, dtype=np.float32)
    mx, my = interp_matrix(nx, shape_xy[0]), interp_matrix(ny, shape_xy[1])
    a = np.asarray(arr, dtype=np.float32)
    a = np.tensordot(mx, a, axes=(1, 0))  # (X', Y, ...)
    a = np.tensordot(my, a, axes=(1, 1))  # (Y', X', ...)
    return np.ascontiguousarray(np.swapaxes(a, 0, 1))


def normalise(arr: np.ndarray, norm: Normalisation) -> np.ndarray:
    """Intensity normalisation over the whole volume, as the manifest declares."""
    a = np.asarray(arr, dtype=np.float32)
    if norm.clip_percentiles is not None and norm.scheme != "none":
        lo, hi = np.percentile(a, norm.clip_percentiles)
        a = np.clip(a, lo, hi)
    if norm.scheme == "zscore":
        std = float(a.std())
        return ((a - float(a.mean())) / (std if std > 0 else 1.0)).astype(np.float32)
    if norm.scheme == "percentile":
        lo, hi = float(a.min()), float(a.max())
        return ((a - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32)
    return a


@dataclass(frozen=True)
class Prepared:
    """Network input for one volume plus what is needed to map outputs back.

    ``batch`` is (Z, C, H, W): one item per axial slice, C = neighbouring slices. With a
    region of interest, ``roi`` gives its slices on the model grid and ``batch`` covers
    only that region (normalised with the whole image's statistics).
    """

    batch: np.ndarray
    native_xy: tuple[int, int]
    model_xy: tuple[int, int]
    pad: tuple[tuple[int, int], tuple[int, int]]
    roi: tuple[slice, slice] | None = None


def _pad_amounts(n: int, multiple: int) -> tuple[int, int]:
    total = (-n) % multiple
    return total // 2, total - total // 2


def slice_stack(vol: np.ndarray, context: int) -> np.ndarray:
    """(H, W, Z) -> (Z, 2*context+1, H, W), edge slices repeated at the ends."""
    z = vol.shape[2]
    idx = np.clip(np.arange(z)[:, None] + np.arange(-context, context + 1)[None, :], 0, z - 1)
    return np.ascontiguousarray(np.moveaxis(vol, 2, 0)[idx])


def roi_around(mask_ras: np.ndarray, spec: ModelSpec, model_xy: tuple[int, int],
               margin_mm: float = 24.0) -> tuple[slice, slice] | None:
    """Model-grid region covering ``mask_ras`` (native RAS grid) plus a margin, or None if empty.

    The size is rounded up to the model's size multiple where the field of view allows,
    so no padding value ever sits next to the cord.
    """
    if not mask_ras.any():
        return None
    out = []
    for axis, (n_native, n_model, spacing) in enumerate(zip(mask_ras.shape[:2], model_xy, spec.spacing_mm)):
        hit = np.flatnonzero(mask_ras.any(axis=tuple(i for i in range(mask_ras.ndim) if i != axis)))
        scale = n_model / n_native
        lo = int(np.floor(hit[0] * scale - margin_mm / spacing))
        hi = int(np.ceil((hit[-1] + 1) * scale + margin_mm / spacing))
        size = min(n_model, hi - lo + (-(hi - lo)) % spec.size_multiple)
        lo = min(max(0, lo - (size - (hi - lo)) // 2), n_model - size)
        out.append(slice(lo, lo + size))
    return out[0], out[1]


@dataclass(frozen=True)
class ModelVolume:
    """A volume resampled in-plane to the model grid and normalised: what every region of it is cut from."""

    data: np.ndarray  # (X', Y', Z) on the model grid
    native_xy: tuple[int, int]
    model_xy: tuple[int, int]
    fill: float  # the padding value: the normalised image's minimum


def model_volume(vol_ras: np.ndarray, zooms: tuple[float, float, float], spec: ModelSpec,
                 model_xy: tuple[int, int] | None = None, source: str = "<image>") -> ModelVolume:
    """Resample in-plane to the model spacing and normalise over the whole image.

    The model grid is checked before anything is resampled (:func:`check_model_grid`);
    ``source`` names the image in that error.
    """
    native_xy = (int(vol_ras.shape[0]), int(vol_ras.shape[1]))
    if model_xy is None:
        model_xy = check_model_grid(vol_ras.shape, zooms, spec.spacing_mm, source)
    vol = normalise(resample_inplane(vol_ras, model_xy), spec.normalisation)
    return ModelVolume(vol, native_xy, tuple(model_xy), float(vol.min()))  # type: ignore[arg-type]


def prepare_from(grid: ModelVolume, spec: ModelSpec, roi: tuple[slice, slice] | None = None) -> Prepared:
    """Stack slices and pad to the size multiple, on the whole field or a region of it."""
    vol = grid.data if roi is None else grid.data[roi[0], roi[1]]
    pad = (_pad_amounts(vol.shape[0], spec.size_multiple), _pad_amounts(vol.shape[1], spec.size_multiple))
    vol = np.pad(vol, (pad[0], pad[1], (0, 0)), mode="constant", constant_values=grid.fill)
    return Prepared(slice_stack(vol, spec.context_slices), grid.native_xy, grid.model_xy, pad, roi)


def prepare(vol_ras: np.ndarray, zooms: tuple[float, float, float], spec: ModelSpec,
            model_xy: tuple[int, int] | None = None, roi: tuple[slice, slice] | None = None) -> Prepared:
    """Resample in-plane to the model spacing, normalise, stack slices, pad to the size multiple.

    ``roi`` (model-grid slices, see :func:`roi_around`) restricts the network input to a
    region after normalising the whole image, so intensities match a full-field run.
    """
    return prepare_from(model_volume(vol_ras, zooms, spec, model_xy), spec, roi)


def restore(maps: np.ndarray, prep: Prepared) -> np.ndarray:
    """Network-grid maps (Z, H, W) -> native RAS grid (X, Y, Z): unpad, un-crop, resample back.

    Outside a region of interest the maps are 0.
    """
    (a0, a1), (b0, b1) = prep.pad
    h, w = maps.shape[1:]
    cropped = maps[:, a0:h - a1, b0:w - b1]
    if prep.roi is not None:
        full = np.zeros((maps.shape[0],) + tuple(prep.model_xy), maps.dtype)
        full[:, prep.roi[0], prep.roi[1]] = cropped
        cropped = full
    return resample_inplane(np.moveaxis(cropped, 0, 2), prep.native_xy)
