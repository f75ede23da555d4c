"""Run an imported nnU-Net v2 model with ONNX Runtime and numpy only (no torch, no nnunetv2).

The steps and their order are nnU-Net's own inference recipe, read from the manifest's
``backend`` section (``kind: nnunet``, see :mod:`sct_deepseg_epi.nnunet.recipe`):

    image axes (the model's convention: SCT's reorientation, or nnU-Net's reader) -> transpose -> crop to the non-zero box
    -> normalise -> resample to the target spacing -> sliding window (Gaussian blend,
    mirroring) per fold -> mean of the folds' logits -> resample back -> softmax/sigmoid
    -> labels -> uncrop -> transpose back

Each step records what it changed so the way back is exact. :class:`NnunetBackend` is
this kind's backend (see :mod:`sct_deepseg_epi.backend`): it always runs on the whole field.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from ..backend import Probabilities
from ..errors import ModelError
from ..infer import bounded_threads, flip_sets, get_session, new_session, providers_for
from ..ndimage import bbox, fill_holes
from ..preprocess import check_grid
from ..registry.manifest import ModelSpec
from .recipe import ChannelNorm, NnunetRecipe
from .resampling import new_shape_for, resample
from .tiling import gaussian_weights, pad_amounts, tile_starts

# voxels of network input per ONNX call: small tiles are batched (4 x 128^2), large 3D tiles run one by one;
# bigger batches are no faster on a CPU and only raise peak memory
_BATCH_VOXELS = 1 << 16


# ---------------------------------------------------------------------------- axes and spacing

def reader_view(data_ras: np.ndarray, zooms_ras: Sequence[float], to_ras: np.ndarray, from_ras: np.ndarray,
                reader: str) -> tuple[np.ndarray, list[float], callable]:
    """The array and spacing nnU-Net's image reader would produce, and the way back to RAS.

    SimpleITKIO and NibabelIO give the stored voxel array with its axes reversed (z, y, x);
    NibabelIOWithReorient first reorients to the closest canonical (RAS) axes.
    """
    if reader == "NibabelIOWithReorient":
        return np.ascontiguousarray(data_ras.transpose(2, 1, 0)), [float(z) for z in zooms_ras[::-1]], \
            lambda a: a.transpose(2, 1, 0)
    if reader in ("SimpleITKIO", "NibabelIO"):
        native = apply_orientation(data_ras, from_ras)
        native_zooms = [float(zooms_ras[int(to_ras[i, 0])]) for i in range(3)]
        return np.ascontiguousarray(native.transpose(2, 1, 0)), native_zooms[::-1], \
            lambda a: apply_orientation(a.transpose(2, 1, 0), to_ras)
    raise ModelError(f"image reader {reader!r} is not supported")


def sct_view(data_ras: np.ndarray, zooms_ras: Sequence[float], orientation: str = "RAS"
             ) -> tuple[np.ndarray, list[float], callable]:
    """The array and spacing SCT's ``sct_deepseg`` hands nnU-Net, and the way back to RAS.

    SCT reorients the image to the model's orientation (its "LPI", nibabel's RAS, unless
    the model says otherwise), then reverses the axes, and the spacing with them, to
    nnU-Net's (z, y, x); the prediction comes back the same way in reverse.
    """
    to_model = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(orientation))
    to_ras = ornt_transform(axcodes2ornt(orientation), axcodes2ornt("RAS"))
    model = apply_orientation(data_ras, to_model)
    zooms = [float(zooms_ras[int(to_ras[i, 0])]) for i in range(3)]
    return np.ascontiguousarray(model.transpose(2, 1, 0)), zooms[::-1], \
        lambda a: apply_orientation(a.transpose(2, 1, 0), to_ras)


def model_view(data_ras: np.ndarray, vol, recipe: NnunetRecipe) -> tuple[np.ndarray, list[float], callable]:
    """The (z, y, x) array the recipe starts from under the model's convention, its spacing, the way back."""
    if recipe.convention == "sct":
        return sct_view(data_ras, vol.zooms, recipe.orientation)
    return reader_view(data_ras, vol.zooms, vol.to_ras, vol.from_ras, recipe.image_reader)


# ---------------------------------------------------------------------------- crop and normalise

def nonzero_box(arr: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the non-zero voxels (the whole array if there are none)."""
    nz = arr != 0
    return bbox(nz) if nz.any() else tuple(slice(0, n) for n in arr.shape)


def filled_nonzero(arr: np.ndarray) -> np.ndarray:
    """Non-zero voxels with enclosed zero regions filled (face connectivity), as nnU-Net's mask."""
    return fill_holes(arr != 0)


def normalise(img: np.ndarray, norm: ChannelNorm, mask: np.ndarray | None) -> np.ndarray:
    """One channel, nnU-Net's schemes: ZScore (optionally within the non-zero mask), CT, none, 0-1."""
    a = np.asarray(img, np.float32).copy()
    eps = 1e-8
    if norm.scheme == "ZScoreNormalization":
        if norm.use_mask and mask is not None:
            v = a[mask]
            a[mask] = (v - v.mean()) / max(float(v.std()), eps)
        else:
            a -= a.mean()
            a /= max(float(a.std()), eps)
    elif norm.scheme == "CTNormalization":
        np.clip(a, norm.get("percentile_00_5"), norm.get("percentile_99_5"), out=a)
        a -= np.float32(norm.get("mean"))
        a /= np.float32(max(norm.get("std"), eps))
    elif norm.scheme == "RescaleTo01Normalization":
        a -= a.min()
        a /= max(float(a.max()), eps)
    elif norm.scheme != "NoNormalization":
        raise ModelError(f"normalisation {norm.scheme!r} is not supported")
    return a


# ---------------------------------------------------------------------------- network

def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(np.float32(0), -x)).astype(np.float32)


def _half(a: np.ndarray) -> np.ndarray:
    """Round float32 values to float16 precision (kept as float32 for the arithmetic)."""
    return a.astype(np.float16).astype(np.float32)


def sliding_window(sessions: Iterable, data: np.ndarray, patch: tuple[int, ...], step: float,
                   mirrors: Sequence[tuple[int, ...]], n_out: int, half: bool = True) -> list[np.ndarray]:
    """Logits of each member over ``data`` (C, Z, Y, X): Gaussian-blended tiles, mirrored views averaged.

    A 2D patch slides in-plane over every slice z. Returns one (n_out, Z, Y, X) array per member.
    With ``half`` the blend is rounded as nnU-Net's float16 accumulators round it (weights,
    running sums and the final division), which is what makes its tile borders, where the
    Gaussian weights underflow, reproducible; otherwise everything stays in float32.
    """
    pads = pad_amounts(data.shape, patch)
    padded = np.pad(data, pads, mode="constant", constant_values=0) if any(sum(p) for p in pads) else data
    shape = padded.shape[1:]
    two_d = len(patch) == 2
    starts = tile_starts(shape[1:] if two_d else shape, patch, step)
    tiles = []
    for pos in itertools.product(*starts):
        box = tuple(slice(s, s + t) for s, t in zip(pos, patch))
        if two_d:
            tiles.extend((z,) + box for z in range(shape[0]))
        else:
            tiles.append(box)
    g = gaussian_weights(tuple(patch), dtype="float16" if half else "float32").astype(np.float32)
    weight = np.zeros(shape, np.float32)
    for box in tiles:
        weight[box] = _half(weight[box] + g) if half else weight[box] + g
    per_call = max(1, _BATCH_VOXELS // int(np.prod(patch)))  # network inputs per ONNX call
    batch = max(1, per_call // len(mirrors))                   # tiles per chunk
    groups = [list(mirrors)] if per_call >= len(mirrors) else [[m] for m in mirrors]
    outs = []
    for sess in sessions:
        acc = np.zeros((n_out, *shape), np.float32)
        for i in range(0, len(tiles), batch):
            chunk = tiles[i:i + batch]
            x = np.stack([padded[(slice(None),) + box] for box in chunk])  # (B, C, *patch)
            b = len(chunk)
            pred = np.zeros((b, n_out, *patch), np.float32)
            for group in groups:
                views = [np.flip(x, axis=tuple(a + 2 for a in m)) if m else x for m in group]
                y = sess.run(["logits"], {"image": np.ascontiguousarray(np.concatenate(views), np.float32)})[0]
                for k, m in enumerate(group):
                    part = y[k * b:(k + 1) * b]
                    pred += np.flip(part, axis=tuple(a + 2 for a in m)) if m else part
            if len(mirrors) > 1:
                pred /= len(mirrors)
            pred *= g
            for box, p in zip(chunk, pred):
                sl = (slice(None),) + box
                acc[sl] = _half(acc[sl] + p) if half else acc[sl] + p
        acc /= weight
        if half:
            acc = _half(acc)
        crop = (slice(None),) + tuple(slice(lo, n - hi) for (lo, hi), n in zip(pads[1:], padded.shape[1:]))
        outs.append(acc[crop])
        del sess  # a streamed member is freed before the next one loads
    return outs


# ---------------------------------------------------------------------------- whole volume

@dataclass
class NnunetResult:
    """Outputs on nnU-Net's reader grid (before transposing back), (Z, Y, X) each."""

    labels: np.ndarray
    probability: np.ndarray      # foreground probability (1 - background, or the widest region)
    disagreement: np.ndarray     # std of the foreground probability across folds


def _foreground(probs: np.ndarray, regions: bool) -> np.ndarray:
    if regions:
        return probs.max(axis=0)
    return 1.0 - probs[0] if probs.shape[0] > 1 else probs[0]


def _nonlin(logits: np.ndarray, regions: bool) -> np.ndarray:
    return sigmoid(logits) if regions else softmax(logits, axis=0).astype(np.float32)


def predict_reader_array(sessions: Iterable, arr: np.ndarray, spacing: Sequence[float], recipe: NnunetRecipe,
                         mirror: bool = True, timings: dict[str, float] | None = None,
                         source: str = "<image>") -> NnunetResult:
    """Run the recipe on a (Z, Y, X) array as nnU-Net's reader gives it, with that reader's spacing."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    tf, tb = recipe.transpose_forward, recipe.transpose_backward
    data = np.asarray(arr, np.float32).transpose(tf)
    spacing_t = [float(spacing[i]) for i in tf]
    full_shape = data.shape
    box = nonzero_box(data)
    data = data[box]
    cropped_shape = data.shape
    target = list(recipe.spacing)
    if len(target) < 3:
        target = [spacing_t[0]] + target
    new_shape = new_shape_for(cropped_shape, spacing_t, target)
    check_grid(tuple(new_shape), source, f"resampling to the model's {'x'.join(f'{t:g}' for t in target)} mm grid")
    norm = recipe.normalisation[0]
    mask = filled_nonzero(data) if norm.use_mask and norm.scheme == "ZScoreNormalization" else None
    data = normalise(data, norm, mask)[None]
    data = resample(data, new_shape, spacing_t, target, recipe.resampling_data, recipe.anisotropy_threshold)
    t1 = time.perf_counter()
    mirrors = flip_sets(recipe.mirror_axes) if mirror else [()]
    regions = recipe.has_regions
    half = recipe.blend_precision == "float16"
    per_fold = sliding_window(sessions, data, recipe.patch_size, recipe.step_size, mirrors, recipe.num_outputs,
                              half=half)
    t2 = time.perf_counter()
    logits = per_fold[0].copy()
    for f in per_fold[1:]:
        logits += f
        if half:
            logits = _half(logits)
    logits /= len(per_fold)
    if half:
        logits = _half(logits)
    s = np.zeros(logits.shape[1:], np.float32)
    s2 = np.zeros_like(s)
    if len(per_fold) > 1:
        for f in per_fold:
            p = _foreground(_nonlin(f, regions), regions)
            s += p
            s2 += p * p
        s /= len(per_fold)
        std = np.sqrt(np.maximum(s2 / len(per_fold) - s * s, 0))[None]
    else:
        std = np.zeros_like(s)[None]
    del per_fold
    rule = recipe.resampling_probabilities
    both = resample(np.concatenate([logits, std]), cropped_shape, target, spacing_t, rule,
                    recipe.anisotropy_threshold)
    logits, std = both[:-1], both[-1]
    if half:
        logits = _half(logits)  # nnU-Net's resampling writes back into its float16 array
    probs = _nonlin(logits, regions)
    if regions:
        seg = np.zeros(cropped_shape, np.uint8)
        for i, c in enumerate(recipe.regions_class_order):  # type: ignore[arg-type]
            seg[probs[i] > 0.5] = c
    else:  # argmax of the logits, as nnU-Net's file export takes it (no softmax rounding ties)
        seg = logits.argmax(axis=0).astype(np.uint8)
    full_probs = np.zeros((probs.shape[0], *full_shape), np.float32)
    if not regions:
        full_probs[0] = 1.0
    full_probs[(slice(None),) + box] = probs
    full_seg = np.zeros(full_shape, np.uint8)
    full_seg[box] = seg
    full_std = np.zeros(full_shape, np.float32)
    full_std[box] = std
    fg = _foreground(full_probs, regions)
    t3 = time.perf_counter()
    for k, v in (("preprocess", t1 - t0), ("infer", t2 - t1), ("postprocess", t3 - t2)):
        timings[k] = timings.get(k, 0.0) + v
    return NnunetResult(full_seg.transpose(tb), fg.transpose(tb), full_std.transpose(tb))


# members up to this total size stay loaded between volumes (fast batches); larger models
# (a realistic 5-fold 3D U-Net is ~600 MB) load one fold at a time, which halves peak memory
# for ~0.5 s per fold and volume
KEEP_SESSIONS_MB = 256


class NnunetBackend:
    """The backend of imported nnU-Net models: the ONNX folds driven by the recipe in the manifest."""

    regional = False  # nnU-Net's recipe always runs on the whole field

    def __init__(self, spec: ModelSpec, *, device: str = "auto", threads: int | None = None, tta: bool = False,
                 localise_at: float = 0.5):
        if spec.nnunet is None:
            raise ModelError(f"model {spec.ref} is not an imported nnU-Net model")
        self.spec = spec
        self.recipe = spec.nnunet
        self.providers = providers_for(device)
        self.threads = bounded_threads(threads)
        self.tta = tta
        self.paths = spec.member_paths()
        size_mb = sum(p.stat().st_size for p in self.paths) / 2 ** 20
        self.keep = size_mb <= KEEP_SESSIONS_MB
        self._kept = ([get_session(p, self.providers, self.threads, shared_arena=True) for p in self.paths]
                      if self.keep else None)
        self.provider = (self._kept[0].get_providers()[0] if self._kept else self.providers[0])

    def provenance(self) -> dict:
        """The sidecar records the orientation convention: sct and nnunet give different masks."""
        return {"convention": self.recipe.convention}

    def sessions(self):
        """The members' sessions, in order; large models are loaded one at a time and released."""
        if self._kept is not None:
            yield from self._kept
            return
        for p in self.paths:
            yield new_session(p, self.providers, self.threads, shared_arena=True)

    def predict(self, data_ras: np.ndarray, vol, *, region=None, localise: bool = False,
                timings: dict[str, float]) -> Probabilities:
        """nnU-Net's labels, foreground probability and disagreement on the RAS grid of ``vol``."""
        arr, spacing, back = model_view(data_ras, vol, self.recipe)
        res = predict_reader_array(self.sessions(), arr, spacing, self.recipe, mirror=self.tta, timings=timings,
                                   source=vol.source)
        return Probabilities(np.clip(back(res.probability), 0, 1).astype(np.float32),
                             back(res.disagreement).astype(np.float32), back(res.labels).astype(np.uint8))

    def region_around(self, mask_ras: np.ndarray, vol) -> None:
        return None

    def predict_window(self, data_ras: np.ndarray, vol, z: int, centre: tuple[int, int], size_mm: float) -> None:
        """nnU-Net's recipe runs on the whole field (3D patches, its own normalisation): no window re-run."""
        return None
