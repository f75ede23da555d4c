"""The pictures of the QC page: one axial slice as an RGB tile, and PNG encoding.

A tile is the slice cropped around the cord (:data:`CROP_MM`), upscaled by nearest neighbour
(:data:`PIXELS_PER_MM`) with anterior up and the patient's right on the left, the mask outline
in red and prompts as crosses; under it, the ensemble disagreement as a heat map. PNGs are
written with numpy and zlib only, so no plotting library is needed.
"""
from __future__ import annotations

import struct
import zlib
from typing import Sequence

import numpy as np

CROP_MM = 32.0        # width of each slice's crop around the cord
PIXELS_PER_MM = 4.0   # display scale (nearest neighbour: each voxel stays a visible block)
DISAGREEMENT_FULL = 0.25  # std of member probabilities shown at full colour

# --- PNG ----------------------------------------------------------------------------------------

def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as a PNG (8-bit RGB, no filter) with zlib."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# --- images -------------------------------------------------------------------------------------

def _window(tile: np.ndarray) -> np.ndarray:
    """Grey levels 0..1 between the 1st and 99th percentiles of the tile."""
    lo, hi = np.percentile(tile, [1, 99]) if tile.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((tile - lo) / (hi - lo), 0, 1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask that touch a pixel outside it (4-neighbourhood)."""
    m = mask.astype(bool)
    p = np.pad(m, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def _crop(a: np.ndarray, cx: int, cy: int, hx: int, hy: int) -> np.ndarray:
    """``a[cx-hx:cx+hx+1, cy-hy:cy+hy+1]``, padded with zeros outside the image."""
    p = np.pad(a, ((hx, hx), (hy, hy)))
    return p[cx:cx + 2 * hx + 1, cy:cy + 2 * hy + 1]


def _display(a: np.ndarray, fx: int, fy: int) -> np.ndarray:
    """RAS (x, y) -> screen rows/columns: anterior up, patient's right on the left; upscaled."""
    return np.repeat(np.repeat(a[::-1, ::-1].T, fy, axis=0), fx, axis=1)


PROMPT_COLOURS = {1: (0.2, 1.0, 0.3), 2: (1.0, 0.3, 1.0)}  # a point on the cord: green; not cord: magenta


def _mark(top: np.ndarray, ix: int, iy: int, shape: tuple[int, int], fx: int, fy: int, colour) -> None:
    """A cross on the display tile at crop voxel (ix, iy) (as :func:`_display` places it)."""
    if not (0 <= ix < shape[0] and 0 <= iy < shape[1]):
        return
    r = (shape[1] - 1 - iy) * fy + fy // 2
    c = (shape[0] - 1 - ix) * fx + fx // 2
    arm = 2 * max(fx, fy)
    top[max(0, r - arm):r + arm + 1, max(0, c - 1):c + 2] = colour
    top[max(0, r - 1):r + 2, max(0, c - arm):c + arm + 1] = colour


def slice_tile(image: np.ndarray, mask: np.ndarray, disagreement: np.ndarray | None, centre: tuple[float, float],
               zooms: tuple[float, float], points: Sequence[tuple[int, int, int]] = ()) -> np.ndarray:
    """One axial slice (RAS x, y) as an RGB tile: image + red mask outline, and under it the disagreement.

    ``points``: prompts on this slice, (x, y, value), drawn as crosses (:data:`PROMPT_COLOURS`)."""
    hx = int(np.ceil(CROP_MM / 2 / zooms[0]))
    hy = int(np.ceil(CROP_MM / 2 / zooms[1]))
    fx = max(1, int(round(PIXELS_PER_MM * zooms[0])))
    fy = max(1, int(round(PIXELS_PER_MM * zooms[1])))
    cx, cy = int(round(centre[0])), int(round(centre[1]))
    img = _display(_crop(image, cx, cy, hx, hy), fx, fy)
    m = _display(_crop(mask, cx, cy, hx, hy), fx, fy) > 0
    grey = _window(img)
    top = np.repeat(grey[..., None], 3, axis=2)
    top[_outline(m)] = (1.0, 0.15, 0.15)
    for x, y, value in points:
        _mark(top, x - cx + hx, y - cy + hy, (2 * hx + 1, 2 * hy + 1), fx, fy, PROMPT_COLOURS.get(value, (1, 1, 1)))
    rows = [top]
    if disagreement is not None:
        d = np.clip(_display(_crop(disagreement, cx, cy, hx, hy), fx, fy) / DISAGREEMENT_FULL, 0, 1)[..., None]
        heat = np.concatenate([np.ones_like(d), 0.85 * (1 - d) + 0.1, 0.1 * (1 - d)], axis=2)  # yellow -> red
        alpha = np.clip(d * 1.5, 0, 0.9)
        bottom = (1 - alpha) * (0.6 * np.repeat(grey[..., None], 3, axis=2)) + alpha * heat
        bottom[_outline(m)] = (0.3, 0.8, 1.0)
        rows += [np.ones((3, top.shape[1], 3)), bottom]
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
