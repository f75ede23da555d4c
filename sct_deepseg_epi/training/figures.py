"""Tiny greyscale/RGB PNG writer and mosaics for the simulation docs (numpy + zlib only)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def write_png(path: Path | str, img: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as an 8-bit PNG."""
    a = np.asarray(img, dtype=np.uint8)
    color = 2 if a.ndim == 3 else 0
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def to_display(slice_xy: np.ndarray, size: int = 128, mask: np.ndarray | None = None) -> np.ndarray:
    """A RAS slice (X, Y) -> radiological-style display (anterior up, patient left on the right), RGB uint8.

    ``mask`` (same shape) is drawn as a red outline.
    """
    from ..preprocess import resample_inplane

    a = np.asarray(slice_xy, dtype=np.float32)
    lo, hi = np.percentile(a, (1, 99.5))
    g = np.clip((a - lo) / (hi - lo if hi > lo else 1), 0, 1)
    scale = size / max(a.shape)
    shape = (max(1, int(round(a.shape[0] * scale))), max(1, int(round(a.shape[1] * scale))))
    g = resample_inplane(g[..., None], shape)[..., 0]
    rgb = np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mask is not None:
        m = resample_inplane(np.asarray(mask, np.float32)[..., None], shape)[..., 0] > 0.5
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = (255, 40, 40)
    # display: rows = anterior (top) to posterior, columns = patient right to left (radiological)
    return np.ascontiguousarray(np.transpose(rgb, (1, 0, 2))[::-1])


def mosaic(tiles: list[np.ndarray], cols: int, size: int = 128, pad: int = 2) -> np.ndarray:
    """Place RGB tiles (each at most size x size) on a black grid."""
    rows = (len(tiles) + cols - 1) // cols
    out = np.zeros((rows * (size + pad) + pad, cols * (size + pad) + pad, 3), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        y0, x0 = pad + r * (size + pad), pad + c * (size + pad)
        h, w = t.shape[:2]
        oy, ox = (size - h) // 2, (size - w) // 2
        out[y0 + oy:y0 + oy + h, x0 + ox:x0 + ox + w] = t
    return out
