"""Stage 4: connected components, hole filling, small-object removal."""
from __future__ import annotations

import numpy as np

from sct_deepseg_epi.postprocess import PostOptions, fill_holes, keep_largest, label, postprocess, remove_small


def test_label_counts_26_connected_components():
    a = np.zeros((6, 6, 2), bool)
    a[0:2, 0:2, 0] = True          # 4 voxels
    a[2, 2, 1] = True              # touches the first block only by a corner: same object (26-conn)
    a[4:6, 4:6, 0] = True          # separate object, 4 voxels
    labels, n = label(a)
    assert n == 2
    assert labels[0, 0, 0] == labels[2, 2, 1] == 1 and labels[5, 5, 0] == 2


def test_label_faces_only():
    a = np.zeros((3, 3), bool)
    a[0, 0] = a[1, 1] = True       # diagonal neighbours: one object with 8-conn, two with 4-conn
    assert label(a, full=True)[1] == 1
    assert label(a, full=False)[1] == 2


def test_label_long_snake_converges():
    a = np.zeros((40, 40), bool)
    a[::2, :] = True
    a[1::4, -1] = True
    a[3::4, 0] = True              # one long serpentine path
    assert label(a)[1] == 1


def test_keep_largest():
    a = np.zeros((8, 8, 1), bool)
    a[0:3, 0:3] = True             # 9 voxels
    a[5:7, 5:7] = True             # 4 voxels
    out = keep_largest(a)
    assert out.sum() == 9 and out[0, 0, 0] and not out[5, 5, 0]


def test_fill_holes_per_slice():
    a = np.zeros((7, 7, 2), bool)
    a[1:6, 1:6, 0] = True
    a[3, 3, 0] = False             # a hole: filled
    a[0:3, 0:3, 1] = True
    a[0, 0, 1] = False             # a notch open to the border: not a hole
    out = fill_holes(a)
    assert out[3, 3, 0] and not out[0, 0, 1]


def test_remove_small():
    a = np.zeros((8, 8, 1), bool)
    a[0:3, 0:3] = True             # 9
    a[6, 6] = True                 # 1
    assert remove_small(a, 2).sum() == 9
    assert remove_small(a, 10).sum() == 0


def test_postprocess_mm3_units():
    prob = np.zeros((8, 8, 1), np.float32)
    prob[0:2, 0:2] = 0.9           # 4 voxels of 2 mm3 = 8 mm3
    keep = postprocess(prob, PostOptions(remove_small="8mm3", largest=False), voxel_mm3=2.0)
    drop = postprocess(prob, PostOptions(remove_small="9mm3", largest=False), voxel_mm3=2.0)
    assert keep.sum() == 4 and drop.sum() == 0


def test_empty_stays_empty():
    assert not postprocess(np.zeros((4, 4, 2), np.float32), PostOptions(), 1.0).any()


def test_dilate_grows_each_axial_slice_by_whole_rings():
    from sct_deepseg_epi.postprocess import dilate

    m = np.zeros((9, 9, 3), bool)
    m[4, 4, 1] = True
    assert dilate(m, 0).sum() == 1
    one, two = dilate(m, 1), dilate(m, 2)
    assert one[:, :, 1].sum() == 9 and two[:, :, 1].sum() == 25 and not one[:, :, [0, 2]].any()
    assert postprocess(m.astype(np.float32), PostOptions(dilate=1, largest=False), 1.0).sum() == 9
