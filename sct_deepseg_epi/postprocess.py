"""Stage 4, postprocess: a backend's probabilities on the native RAS grid -> a clean mask.

The same for every backend (:func:`finish`): threshold (or the model's own labels at its
threshold), then the cleaning steps that :class:`~sct_deepseg_epi.options.PostOptions` turns on.

Connected components and hole filling come from :mod:`sct_deepseg_epi.ndimage` (numpy
only, held to scipy.ndimage by the tests); cord masks are small, so this costs milliseconds.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from . import ndimage
from .ndimage import label
from .errors import OptionError
from .options import PostOptions, parse_size

if TYPE_CHECKING:
    from .backend import Probabilities


def keep_largest(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (the first one on a tie)."""
    labels, n = label(mask)
    if n <= 1:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def remove_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_voxels``."""
    if min_voxels <= 0:
        return np.asarray(mask, bool)
    labels, n = label(mask)
    if n == 0:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice in the axial plane (axes 0, 1 of a RAS volume)."""
    return ndimage.fill_holes(mask, axes=(0, 1))


def dilate(mask: np.ndarray, voxels: int) -> np.ndarray:
    """Grow a mask by ``voxels`` in each axial slice (axes 0, 1), one 8-connected ring at a time."""
    out = np.asarray(mask, dtype=bool)
    for _ in range(voxels):
        grown = out.copy()
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                src = (slice(max(0, -dx), out.shape[0] - max(0, dx)), slice(max(0, -dy), out.shape[1] - max(0, dy)))
                dst = (slice(max(0, dx), out.shape[0] - max(0, -dx)), slice(max(0, dy), out.shape[1] - max(0, -dy)))
                grown[dst] |= out[src]
        out = grown
    return out


def clean(mask: np.ndarray, opts: PostOptions, voxel_mm3: float) -> np.ndarray:
    """The cleaning steps, in order: small objects, largest object, holes, dilation (the input if none runs)."""
    value, unit = parse_size(opts.remove_small)
    if value > 0:
        mask = remove_small(mask, value / voxel_mm3 if unit == "mm3" else value)
    if opts.largest:
        mask = keep_largest(mask)
    if opts.fill_holes:
        mask = fill_holes(mask)
    if opts.dilate:
        mask = dilate(mask, opts.dilate)
    return mask


def postprocess(prob: np.ndarray, opts: PostOptions, voxel_mm3: float) -> np.ndarray:
    """Threshold and clean a probability volume (X, Y, Z) on the native RAS grid."""
    return clean(prob >= opts.threshold, opts, voxel_mm3)


def finish(probs: Probabilities, opts: PostOptions, zooms, labels_at: float, *, prompts: Sequence = (),
           rerun: Callable | None = None, effects: list[str] | None = None) -> np.ndarray:
    """The uint8 mask of a backend's output on the RAS grid with voxel sizes ``zooms``.

    A model with its own label map (nnU-Net's argmax) keeps it at its own threshold
    ``labels_at``; otherwise, and at any other threshold, ``probability >= threshold``.
    ``method="z"`` then follows the cord along z (:mod:`.zfollow`), which decides the
    objects kept and fills holes itself, before the remaining steps. Cleaning keeps label
    values; voxels added (holes, weaker slices) take label 1.

    ``prompts`` (points on the cord or not, :mod:`.prompts`) and ``rerun`` (the backend's
    :meth:`~sct_deepseg_epi.backend.Backend.predict_window` for this volume) go to z-following,
    which alone knows what to do with them (``method="3d"`` refuses them); ``effects``, a
    list, receives what each prompt did.
    """
    if prompts and opts.method != "z":
        raise OptionError("prompts need the z-following postprocessing (-postprocess z), not -postprocess "
                          f"{opts.method}")
    voxel_mm3 = float(np.prod(zooms[:3]))
    if probs.labels is not None and opts.threshold == labels_at:
        labels = probs.labels
    else:
        labels = (probs.probability >= opts.threshold).astype(np.uint8)
    fg = labels > 0
    if opts.method == "z":
        from .zfollow import zfollow, zfollow_options

        followed = zfollow(probs.probability, zooms, zfollow_options(opts.threshold, opts.fill_holes),
                           prompts=prompts, rerun=rerun)
        if effects is not None:
            effects[:] = followed.prompts
        kept = clean(followed.mask, replace(opts, largest=False, fill_holes=False), voxel_mm3)
    else:
        kept = clean(fg, opts, voxel_mm3)
    if kept is not fg:
        labels = np.where(kept, np.where(fg, labels, 1), 0)
    return labels.astype(np.uint8, copy=False)
