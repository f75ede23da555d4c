"""The QC page's pictures: PNG encoding (read back with a decoder written here), the mask
outline, and prompts drawn where the display puts their voxel."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from sct_deepseg_epi import qc_tiles


def decode_png(data: bytes) -> np.ndarray:
    """A minimal decoder for the 8-bit RGB, unfiltered PNGs that qc_tiles writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        if tag == b"IHDR":
            size = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour = size[:4]
    assert (depth, colour) == (8, 2)
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].reshape(h, w, 3)


def test_png_roundtrip():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(qc_tiles.png_bytes(rgb)), rgb)
    with pytest.raises(ValueError):
        qc_tiles.png_bytes(np.zeros((4, 4)))


def test_slice_tile_draws_the_outline_in_red():
    img = np.zeros((20, 20), np.float32)
    mask = np.zeros((20, 20), np.uint8)
    mask[8:12, 8:12] = 1
    img[mask > 0] = 100
    tile = qc_tiles.slice_tile(img, mask, None, (10, 10), (1.0, 1.0))
    red = (tile[..., 0] == 255) & (tile[..., 1] < 60)
    ys, xs = np.nonzero(red)
    # a 4 x 4 voxel square at 4 px per mm: a 16 x 16 px outline, hollow inside
    assert ys.max() - ys.min() == 15 and xs.max() - xs.min() == 15 and red.sum() == 4 * 15
    with_dis = qc_tiles.slice_tile(img, mask, np.full((20, 20), 0.2, np.float32), (10, 10), (1.0, 1.0))
    assert with_dis.shape[0] > tile.shape[0] and with_dis.shape[1] == tile.shape[1]


def test_slice_tile_marks_points_where_the_display_puts_their_voxel():
    img = np.zeros((20, 20), np.float32)
    img[3, 15] = 100  # a bright voxel: where the display puts (x=3, y=15), the point must be too
    mask = np.zeros((20, 20), np.uint8)
    tile = qc_tiles.slice_tile(img, mask, None, (10, 10), (1.0, 1.0), points=[(3, 15, 1), (12, 5, 2)])
    bright = np.argwhere(qc_tiles.slice_tile(img, mask, None, (10, 10), (1.0, 1.0)).sum(-1) == 765).mean(0)
    green = np.argwhere((tile[..., 1] == 255) & (tile[..., 0] < 60))
    magenta = np.argwhere((tile[..., 0] == 255) & (tile[..., 1] < 90) & (tile[..., 2] == 255))
    assert np.abs(green.mean(0) - bright).max() <= 1 and len(magenta) > 0
    assert magenta.mean(0)[1] < green.mean(0)[1]  # x=12 lies left of x=3: the patient's right is on the left
