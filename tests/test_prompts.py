"""Prompts: reading label images on the input's grid, and a click fixing a slice end to end (tiny real ensemble)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from sct_deepseg_epi import api, segment
from sct_deepseg_epi.errors import InputError, OptionError
from sct_deepseg_epi.prompts import native_labels, read_prompts
from sct_deepseg_epi.read import from_image


def labels_like(img: nib.Nifti1Image, points: dict[tuple[int, int, int], int], dtype=np.uint8) -> nib.Nifti1Image:
    """A label image on ``img``'s grid holding ``points`` (native voxel -> value)."""
    data = np.zeros(img.shape[:3], dtype)
    for ijk, v in points.items():
        data[ijk] = v
    return nib.Nifti1Image(data, img.affine)


def to_native(axcodes: str):
    """RAS array -> the array stored in ``axcodes`` (as blob_image stores its data)."""
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes))
    return lambda a: apply_orientation(a, t)


@pytest.mark.parametrize("axcodes", ["RAS", "LPI", "PSR"])
def test_points_land_on_the_same_voxel_whatever_the_files_axes(axcodes):
    img, _ = blob_image(axcodes=axcodes)
    vol = from_image(img)
    ras = np.zeros(vol.data.shape, np.uint8)
    ras[20, 18, 4] = 1   # on the blob, RAS slice 4
    ras[5, 30, 1] = 2
    native = to_native(axcodes)(ras)
    points = read_prompts(nib.Nifti1Image(native, img.affine), vol)
    assert sorted((p.ras, p.cord) for p in points) == [((5, 30, 1), False), ((20, 18, 4), True)]
    for p in points:
        assert native[p.voxel] == (1 if p.cord else 2)
        assert np.allclose(p.mm, nib.affines.apply_affine(img.affine, p.voxel))
    assert np.array_equal(native_labels(points, vol), native)


def test_a_brush_stroke_is_one_point_and_an_empty_image_none():
    img, _ = blob_image()
    vol = from_image(img)
    stroke = {(19, 18, 2): 1, (20, 18, 2): 1, (21, 18, 2): 1, (20, 19, 2): 1}  # touching voxels of one slice
    points = read_prompts(labels_like(img, {**stroke, (20, 18, 3): 1}), vol)
    assert [p.voxel for p in points] == [(20, 18, 2), (20, 18, 3)]  # the stroke's voxel nearest its centre
    assert read_prompts(labels_like(img, {}), vol) == []
    assert read_prompts(None, vol) == []


def test_voxel_points_from_python():
    img, _ = blob_image(axcodes="LPI")
    vol = from_image(img)
    (p,) = read_prompts([(3, 4, 5, 1)], vol)
    assert p.voxel == (3, 4, 5) and p.slice == 5 and p.cord
    assert p.ras == (40 - 1 - 3, 36 - 1 - 4, 6 - 1 - 5)  # L->R, P->A, I->S flip all three axes


@pytest.mark.parametrize("make, message", [
    (lambda img: nib.Nifti1Image(np.zeros((40, 36, 5), np.uint8), img.affine), "not on the input's grid"),
    (lambda img: nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine @ np.diag([1, 1, 1.5, 1])),
     "not on the input's grid"),
    (lambda img: labels_like(img, {(1, 1, 1): 3}), "not 3"),
    (lambda img: labels_like(img, {(1, 1, 1): 0.5}, np.float32), "not 0.5"),
    (lambda img: nib.Nifti1Image(np.zeros(img.shape + (2,), np.uint8), img.affine), "must be 3D"),
])
def test_bad_prompt_images_are_refused_in_one_line(make, message):
    img, _ = blob_image()
    with pytest.raises(InputError, match=message) as err:
        read_prompts(make(img), from_image(img))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("points, message", [
    ([(40, 0, 0, 1)], "outside the image"), ([(0, 0, -1, 1)], "outside the image"),
    ([(1, 1, 1, 3)], "1 marks cord"), ([(1, 1, 1)], "is \\(i, j, k, value\\)"),
])
def test_bad_python_points_are_refused(points, message):
    img, _ = blob_image()
    with pytest.raises(InputError, match=message):
        read_prompts(points, from_image(img))


def dimmed_blob(axcodes: str = "LPI", slice_ras: int = 3):
    """The blob image with one RAS slice at a tenth of its signal: the tiny models (z-score > 2) miss it
    there on the whole image's statistics, and find it again on a window's."""
    img, mask = blob_image(axcodes=axcodes)
    ras = from_image(img).data
    ras[:, :, slice_ras] *= 0.1
    return nib.Nifti1Image(to_native(axcodes)(ras), img.affine), mask


def test_a_click_on_a_missed_slice_brings_it_back_and_nothing_else_moves(tiny_model, tmp_path):
    img, mask = dimmed_blob()
    before = np.asarray(segment(img, model="tiny").mask.dataobj)
    k = 6 - 1 - 3  # RAS slice 3 is stored slice 2 in LPI
    assert not before[:, :, k].any() and before[:, :, k + 1].any()
    click = labels_like(img, {(19, 17, k): 1})
    seg = segment(img, model="tiny", prompts=click)
    after = np.asarray(seg.mask.dataobj)
    assert np.array_equal(after[:, :, k], mask[:, :, k])  # the window's map: exactly the disc
    others = [z for z in range(6) if z != k]
    assert np.array_equal(after[:, :, others], before[:, :, others])
    (rec,) = seg.confidence["prompts"]
    assert rec == {"slice": k, "value": 1, "voxel": [19, 17, k],
                   "mm": [round(float(v), 2) for v in nib.affines.apply_affine(img.affine, (19, 17, k))],
                   "effect": "rerun+outline"}


def test_a_not_cord_click_removes_the_object_under_it(tiny_model):
    img, mask = blob_image(shape=(40, 36, 6), axcodes="RAS")
    data = np.asarray(img.dataobj).copy()
    data[26, 17:20, 2] = 1000.0  # a bright speck 6 mm from the cord's centre, on slice 2: kept with it
    img = nib.Nifti1Image(data, img.affine)
    before = np.asarray(segment(img, model="tiny").mask.dataobj)
    assert before[26, 18, 2]
    seg = segment(img, model="tiny", prompts=[(26, 18, 2, 2)])
    after = np.asarray(seg.mask.dataobj)
    assert not after[26, 17:20, 2].any() and seg.confidence["prompts"][0]["effect"] == "removed"
    # the cord itself stays, and so do the slices without a point
    assert after[20, 18, 2] and np.array_equal(np.delete(after, 2, axis=2), np.delete(before, 2, axis=2))


def test_run_records_the_prompts_and_refuses_3d_postprocessing(tiny_model, tmp_path):
    img, _ = dimmed_blob(axcodes="RAS")
    src = tmp_path / "dim.nii.gz"
    nib.save(img, str(src))
    labels = tmp_path / "dim_points.nii.gz"
    nib.save(labels_like(img, {(20, 18, 3): 1, (2, 2, 0): 2}), str(labels))
    res = api.run(src, model="tiny", options=api.Options(prompts=str(labels)))
    side = json.loads(res.sidecar.read_text())
    assert [(r["slice"], r["value"], r["effect"]) for r in side["prompts"]] == [(0, 2, "nothing_under"),
                                                                                 (3, 1, "rerun+outline")]
    assert np.asarray(nib.load(str(res.mask)).dataobj)[20, 18, 3] == 1
    with pytest.raises(OptionError, match="-postprocess z"):
        api.run(src, tmp_path / "o_seg.nii.gz", model="tiny", options=api.Options(prompts=str(labels), method="3d"))
    assert not (tmp_path / "o_seg.nii.gz").exists()


def test_each_volume_of_a_series_takes_the_points(tiny_model, tmp_path):
    img, mask = blob_image(n_volumes=3)
    data = np.asarray(img.dataobj).copy()
    data[:, :, 3] *= 0.1
    img = nib.Nifti1Image(data, img.affine)
    seg = segment(img, model="tiny", mode_4d="each", prompts=[(20, 18, 3, 1)])
    out = np.asarray(seg.mask.dataobj)
    assert out.shape == img.shape and all(np.array_equal(out[:, :, 3, t], mask[:, :, 3]) for t in range(3))
    assert seg.confidence["prompts"][0]["effect"] == "rerun+outline"


def test_an_nnunet_model_cannot_rerun_a_window_and_says_so(model_root, tmp_path):
    from nnunet_fixtures import make_nnunet_folder

    img, _ = blob_image(shape=(30, 28, 9), zooms=(0.9, 1.1, 3.0), radius=3.5, seed=3)
    model = make_nnunet_folder(tmp_path / "nn", ndim=2, reader="NibabelIO")
    seg = segment(img, model=str(model), prompts=[(15, 14, 4, 1)], method="z")
    assert seg.confidence["prompts"][0]["effect"].startswith("norerun+")
