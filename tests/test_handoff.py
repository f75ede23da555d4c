"""Hand-off to SCT: the moco mask, and the fMRI pipeline's orchestration.

The pipeline tests run against small fake SCT tools (Python scripts put first on PATH) that
write files of the right names and shapes, so the orchestration (skipping, logging, naming,
errors, clean-up) is tested without SCT. A test marked ``sct`` runs the real tools on a
synthetic series with a synthetic template of PAM50's layout.
"""
from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_image, make_model_folder
from sct_deepseg_epi import handoff
from sct_deepseg_epi.errors import EpiSegError, InputError
from sct_deepseg_epi.handoff import HandoffError, moco_mask


def _save(arr, affine, path, code=1):
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    nib.save(img, str(path))
    return path


def test_moco_mask_is_a_disc_around_the_cord_with_missing_slices_interpolated(tmp_path):
    # LPI storage, 0.8 x 1.6 mm in-plane voxels: the disc must be round in millimetres
    shape = (60, 40, 5)
    affine = np.diag([-0.8, -1.6, -4.0, 1.0])
    bold = _save(np.random.default_rng(0).random(shape + (3,), dtype=np.float32), affine, tmp_path / "fmri.nii.gz")
    seg = np.zeros(shape, np.uint8)
    centres = {0: (20, 20), 1: (24, 20), 3: (32, 24), 4: (32, 24)}  # slice 2 has no cord
    for z, (cx, cy) in centres.items():
        seg[cx - 1:cx + 2, cy - 1:cy + 2, z] = 1
    seg_path = _save(seg, affine, tmp_path / "fmri_seg.nii.gz")
    out = moco_mask(bold, seg_path, diameter_mm=10.0)
    assert out == tmp_path / "mask_fmri.nii.gz"  # sct_create_mask's name
    mask = np.asarray(nib.load(str(out)).dataobj)
    assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    for z in range(5):
        xs, ys = np.nonzero(mask[..., z])
        cx, cy = xs.mean(), ys.mean()
        expect = centres.get(z, (28, 22))  # slice 2: halfway between slices 1 and 3
        assert abs(cx - expect[0]) < 0.5 and abs(cy - expect[1]) < 0.5
        # radius 5 mm: 6.25 voxels across x (0.8 mm), 3.1 along y (1.6 mm)
        assert xs.max() - xs.min() in (12, 13) and ys.max() - ys.min() in (6, 7)
        area = mask[..., z].sum() * 0.8 * 1.6
        assert abs(area - np.pi * 25) / (np.pi * 25) < 0.1


def test_moco_mask_from_a_4d_mask_and_edge_slices(tmp_path):
    img, disc = blob_image(n_volumes=3)
    bold = tmp_path / "bold.nii.gz"
    nib.save(img, str(bold))
    seg4 = np.repeat(disc[..., None], 4, axis=-1)
    seg4[..., 0, :] = 0  # first slice without cord: takes the nearest centre
    seg_img = nib.Nifti1Image(seg4, img.affine, img.header)
    nib.save(seg_img, str(tmp_path / "seg4d.nii.gz"))
    out = moco_mask(bold, tmp_path / "seg4d.nii.gz", tmp_path / "m.nii.gz", diameter_mm=6)
    mask = np.asarray(nib.load(str(out)).dataobj)
    assert mask.shape == disc.shape
    assert np.array_equal(mask[..., 0], mask[..., 1])


def test_moco_mask_refuses_another_grid_and_an_empty_mask(tmp_path):
    img, disc = blob_image(n_volumes=2)
    bold = tmp_path / "bold.nii.gz"
    nib.save(img, str(bold))
    other = _save(disc[::2], np.diag([2.0, 1.0, 4.0, 1.0]), tmp_path / "other_seg.nii.gz")
    with pytest.raises(InputError, match=r"other_seg.nii.gz: its grid .* differs from that of .*bold.nii.gz"):
        moco_mask(bold, other)
    empty = _save(np.zeros_like(disc), img.affine, tmp_path / "empty_seg.nii.gz")
    with pytest.raises(InputError, match=r"empty_seg.nii.gz: the segmentation is empty \(no cord found\)"):
        moco_mask(bold, empty)
    assert not (tmp_path / "mask_bold.nii.gz").exists()


# --- the pipeline, with fake SCT tools ---------------------------------------------------------

FAKE = r'''
import os, sys, json
from pathlib import Path
import numpy as np, nibabel as nib
name = Path(sys.argv[0]).name
argv = sys.argv[1:]
with open(os.environ["FAKE_SCT_CALLS"], "a") as f:
    f.write(json.dumps([name] + argv) + "\n")
def arg(flag, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default
def save(arr, ref, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), ref.affine), str(path))
if os.environ.get("FAKE_SCT_FAIL") == name:
    if name == "sct_fmri_moco":
        Path(arg("-ofolder"), "moco_params.tsv").write_text("partial")
    print("... lots of output ...\nERROR: fake failure in " + name + "\nmore lines")
    sys.exit(1)
if name == "sct_maths":
    img = nib.load(arg("-i")); save(np.asarray(img.dataobj).mean(-1), img, arg("-o"))
elif name == "sct_fmri_moco" and "-dl" in argv:  # SCT 7.4's rules and outputs for -dl
    refused = [a for a in ("-g", "-x", "-param", "-bvalmin") if a in argv]
    if "-m" not in argv or refused:
        print("sct_fmri_moco: error: -dl needs -m and refuses " + " ".join(refused)); sys.exit(2)
    img = nib.load(arg("-i")); data = np.asarray(img.dataobj); stem = Path(arg("-i")).name[:-7]
    out = Path(arg("-ofolder")); d, t = data.shape[2], data.shape[3]
    save(data, img, out / f"{stem}_mocoDL.nii.gz"); save(data.mean(-1), img, out / f"{stem}_mocoDL_mean.nii.gz")
    for axis in "xy":
        nib.save(nib.Nifti1Image(np.zeros((1, 1, d, t), np.float32), img.affine), str(out / f"moco_params_{axis}.nii.gz"))
elif name == "sct_fmri_moco":
    img = nib.load(arg("-i")); data = np.asarray(img.dataobj); stem = Path(arg("-i")).name[:-7]
    out = Path(arg("-ofolder"))
    save(data, img, out / f"{stem}_moco.nii.gz"); save(data.mean(-1), img, out / f"{stem}_moco_mean.nii.gz")
    (out / "moco_params.tsv").write_text("X\tY\n0\t0\n")
elif name == "sct_register_multimodal":
    dest = nib.load(arg("-d"))
    for flag in ("-o", "-owarp", "-owarpinv"):
        save(np.zeros(dest.shape), dest, arg(flag))
elif name == "sct_warp_template":
    dest = nib.load(arg("-d")); save(np.ones(dest.shape), dest, Path(arg("-ofolder"), "template", "PAM50_levels.nii.gz"))
'''


@pytest.fixture
def fake_sct(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fake-sct-bin"
    bin_dir.mkdir()
    for tool in handoff.SCT_TOOLS:
        p = bin_dir / tool
        p.write_text(f"#!{sys.executable}\n{FAKE}")
        p.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SCT_CALLS", str(calls))
    monkeypatch.delenv("FAKE_SCT_FAIL", raising=False)
    return calls


@pytest.fixture
def pam50(tmp_path) -> Path:
    """A template folder with PAM50's layout (contents irrelevant to the fakes)."""
    t = tmp_path / "PAM50" / "template"
    t.mkdir(parents=True)
    img, disc = blob_image()
    for name in ("t2s", "cord", "levels"):
        nib.save(img if name == "t2s" else nib.Nifti1Image(disc, img.affine), str(t / f"PAM50_{name}.nii.gz"))
    (t / "info_label.txt").write_text("# Keyword=IndivLabels\n0, T2*, PAM50_t2s.nii.gz\n")
    return t.parent


@pytest.fixture
def series(tmp_path, model_root):
    make_model_folder(model_root / "tiny" / "1.0.0")
    img, _ = blob_image(n_volumes=4)
    d = tmp_path / "sub-01" / "func"
    d.mkdir(parents=True)
    nib.save(img, str(d / "fmri.nii.gz"))
    return d / "fmri.nii.gz"


def _calls(path: Path) -> list[str]:
    import json

    return [json.loads(line)[0] for line in path.read_text().splitlines()] if path.exists() else []


def test_pipeline_runs_steps_in_order_with_sct_names_and_skips_when_up_to_date(fake_sct, pam50, series):
    out = handoff.fmri_pipeline(series, model="tiny", template=pam50)
    d = series.parent
    assert _calls(fake_sct) == ["sct_maths", "sct_fmri_moco", "sct_register_multimodal", "sct_warp_template"]
    for p, name in ((out.mean, "fmri_mean.nii.gz"), (out.mean_seg, "fmri_mean_seg.nii.gz"), (out.mask, "mask_fmri.nii.gz"),
                    (out.moco, "fmri_moco.nii.gz"), (out.moco_mean_seg, "fmri_moco_mean_seg.nii.gz"),
                    (out.warp_template2fmri, "warp_template2fmri.nii.gz"), (out.levels, "label/template/PAM50_levels.nii.gz")):
        assert p == d / name and p.is_file()
    assert len(out.ran) == 7 and out.skipped == []
    text = out.log.read_text()
    assert "$ sct_fmri_moco -i " in text and f"-m {d / 'mask_fmri.nii.gz'}" in text
    assert "$ sct_deepseg_epi -i " in text and "no -initwarp/-initwarpinv" in text
    # second run: everything up to date
    again = handoff.fmri_pipeline(series, model="tiny", template=pam50)
    assert again.ran == [] and len(again.skipped) == 7 and len(_calls(fake_sct)) == 4
    # a newer moco mask reruns what depends on it, not what comes before
    time.sleep(0.01)
    os.utime(out.mask)
    third = handoff.fmri_pipeline(series, model="tiny", template=pam50)
    assert third.ran == ["motion correction", "segmentation of the moco mean", "template registration", "warp template"]


def test_pipeline_passes_initial_warps_and_qc(fake_sct, pam50, series, tmp_path):
    w1, w2 = tmp_path / "warp_template2t2s.nii.gz", tmp_path / "warp_t2s2template.nii.gz"
    for w in (w1, w2):
        w.write_bytes(b"x")
    handoff.fmri_pipeline(series, tmp_path / "out", model="tiny", template=pam50, initwarp=w1, initwarpinv=w2,
                          qc=tmp_path / "qc", qc_subject="sub-01")
    import json

    calls = [json.loads(line) for line in fake_sct.read_text().splitlines()]
    reg = next(c for c in calls if c[0] == "sct_register_multimodal")
    assert reg[reg.index("-initwarp") + 1] == str(w1) and reg[reg.index("-initwarpinv") + 1] == str(w2)
    assert reg[reg.index("-param") + 1].startswith("step=1,type=seg")
    moco = next(c for c in calls if c[0] == "sct_fmri_moco")
    assert "-qc-seg" in moco and moco[moco.index("-qc-subject") + 1] == "sub-01"
    assert (tmp_path / "out" / "fmri_moco.nii.gz").is_file()


def test_pipeline_without_sct_stops_at_once(series, pam50, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(HandoffError, match="sct_maths is not on PATH"):
        handoff.fmri_pipeline(series, model="tiny", template=pam50)
    assert sorted(p.name for p in series.parent.iterdir()) == ["fmri.nii.gz"]


def test_pipeline_missing_template_stops_before_any_step(fake_sct, series, tmp_path):
    with pytest.raises(HandoffError, match=r"PAM50 template is incomplete: .*PAM50_t2s.nii.gz is missing"):
        handoff.fmri_pipeline(series, model="tiny", template=tmp_path / "nowhere")
    assert _calls(fake_sct) == []


def test_a_failing_sct_command_names_step_command_and_message(fake_sct, pam50, series, monkeypatch):
    monkeypatch.setenv("FAKE_SCT_FAIL", "sct_fmri_moco")
    with pytest.raises(HandoffError) as err:
        handoff.fmri_pipeline(series, model="tiny", template=pam50)
    msg = str(err.value)
    assert "step 'motion correction' failed" in msg and "`sct_fmri_moco -i " in msg
    assert "exited with status 1: ERROR: fake failure in sct_fmri_moco" in msg
    d = series.parent
    for name in ("fmri_mean.nii.gz", "fmri_mean_seg.nii.gz", "mask_fmri.nii.gz"):  # earlier outputs intact
        assert (d / name).is_file()
    assert not (d / "moco_params.tsv").exists()  # the failed step's partial output is gone
    assert "[exit status 1]" in (d / "fmri_pipeline.log").read_text()
    # fixed: the rerun starts at the failed step
    monkeypatch.delenv("FAKE_SCT_FAIL")
    out = handoff.fmri_pipeline(series, model="tiny", template=pam50)
    assert out.skipped == ["temporal mean", "segmentation", "moco mask"]


def test_pipeline_bad_segmentations(fake_sct, pam50, series, tmp_path):
    img = nib.load(str(series))
    empty = _save(np.zeros(img.shape[:3], np.uint8), img.affine, tmp_path / "empty_seg.nii.gz")
    with pytest.raises(HandoffError, match=r"step 'moco mask': .*empty_seg.nii.gz: the segmentation is empty"):
        handoff.fmri_pipeline(series, seg=empty, model="tiny", template=pam50)
    assert (series.parent / "fmri_mean.nii.gz").is_file()
    other = _save(np.ones((8, 8, 3), np.uint8), np.eye(4), tmp_path / "small_seg.nii.gz")
    with pytest.raises(InputError, match="small_seg.nii.gz: its grid"):
        handoff.fmri_pipeline(series, seg=other, model="tiny", template=pam50)
    with pytest.raises(InputError, match="needs a 4D series"):
        handoff.fmri_pipeline(series.parent / "fmri_mean.nii.gz", model="tiny", template=pam50)
    assert issubclass(HandoffError, EpiSegError)


def test_no_cord_found_by_the_model_stops_before_motion_correction(fake_sct, pam50, tmp_path, model_root):
    make_model_folder(model_root / "blind" / "1.0.0", name="blind", members=((8.0, -400.0),))  # never fires
    img, _ = blob_image(n_volumes=3)
    bold = tmp_path / "fmri.nii.gz"
    nib.save(img, str(bold))
    with pytest.raises(HandoffError, match=r"step 'segmentation': no spinal cord found in fmri_mean.nii.gz"):
        handoff.fmri_pipeline(bold, model="blind", template=pam50)
    assert not (tmp_path / "fmri_mean_seg.nii.gz").exists() and _calls(fake_sct) == ["sct_maths"]


# --- with the real SCT --------------------------------------------------------------------------

@pytest.mark.sct
@pytest.mark.skipif(shutil.which("sct_fmri_moco") is None or shutil.which("isct_antsRegistration") is None,
                    reason="a real SCT with its ANTs programs is not on PATH")
def test_real_sct_pipeline_with_a_synthetic_template(tmp_path, model_root):
    from sct_deepseg_epi.phantom import make_phantom

    make_model_folder(model_root / "tiny" / "1.0.0")
    ph = make_phantom(shape=(40, 40, 4), n_volumes=4, seed=1)
    bold = tmp_path / "fmri.nii.gz"
    nib.save(ph.image, str(bold))
    seg = tmp_path / "truth_seg.nii.gz"
    nib.save(ph.truth, str(seg))
    pam50 = make_synthetic_template(tmp_path / "PAM50", ph.image, ph.truth)
    out = handoff.fmri_pipeline(bold, seg=seg, model="tiny", template=pam50,
                                param="step=1,type=seg,algo=centermass:step=2,type=im,algo=rigid,metric=CC,iter=2,slicewise=1")
    levels = np.asarray(nib.load(str(out.levels)).dataobj)
    assert levels.shape == ph.image.shape[:3] and levels.max() > 0


def make_synthetic_template(folder: Path, image: nib.Nifti1Image, cord: nib.Nifti1Image) -> Path:
    """PAM50's layout (template/PAM50_{t2s,cord,levels}.nii.gz + info_label.txt) around a subject.

    The 'template' is the subject's own mean on a finer grid shifted by a few millimetres,
    with levels numbered along the slices, so a registration has something to find.
    """
    from scipy import ndimage  # SCT's environment has scipy

    t = folder / "template"
    t.mkdir(parents=True, exist_ok=True)
    mean = np.asarray(image.dataobj).mean(-1)
    shift = (2, -1, 0)
    aff = image.affine.copy()
    t2s = ndimage.shift(mean, shift, order=1)
    c = ndimage.shift(np.asarray(cord.dataobj).astype(float), shift, order=0)
    levels = (c > 0) * (1 + np.arange(c.shape[2]))[None, None, :]
    for name, arr in (("t2s", t2s), ("cord", c), ("levels", levels)):
        img = nib.Nifti1Image(arr.astype(np.float32), aff)
        img.set_qform(aff, 1)
        img.set_sform(aff, 1)
        nib.save(img, str(t / f"PAM50_{name}.nii.gz"))
    (t / "info_label.txt").write_text(textwrap.dedent("""\
        # Keyword=IndivLabels (Please DO NOT change this line)
        # ID, name, file
        0, T2*-weighted template, PAM50_t2s.nii.gz
        1, spinal cord, PAM50_cord.nii.gz
        2, vertebral levels, PAM50_levels.nii.gz
        """))
    return folder


def test_command_message_is_the_exception_of_a_traceback_not_sct_s_closing_line():
    end = "\x1b[0mTotal runtime; 0.098 seconds.\x1b[0m"
    out = f"lots\nTraceback (most recent call last):\n  File \"x.py\", line 1\nFileNotFoundError: [Errno 2] bin/isct_x\n{end}\n"
    assert handoff._command_message(out) == "FileNotFoundError: [Errno 2] bin/isct_x"
    # sct_fmri_moco -dl without weights: the message starts on the line after the exception's name
    out = ("Traceback (most recent call last):\nFileNotFoundError: \n[moco-dl] MocoDL models not found. "
           f"Please install them using: sct_download_data -d moco-dl_models.\n{end}\n")
    assert handoff._command_message(out) == ("FileNotFoundError: [moco-dl] MocoDL models not found. Please install "
                                             "them using: sct_download_data -d moco-dl_models.")
    assert handoff._command_message(f"Traceback (most recent call last):\nKeyboardInterrupt\n{end}") == "KeyboardInterrupt"
    assert handoff._command_message("a\nERROR: bad input\nb") == "ERROR: bad input"


def test_a_refused_output_is_refused_before_the_model_is_loaded(fake_sct, pam50, series, monkeypatch):
    from sct_deepseg_epi import api

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("model loaded (or downloaded) first"))
    seg = series.parent / "mask_fmri_cord.nii.gz"  # -s is where -moco dl writes its cord mask
    img = nib.load(str(series))
    _save((np.asarray(img.dataobj)[..., 0] > 0).astype(np.uint8), img.affine, seg)
    with pytest.raises(InputError, match="the mask path is the input"):
        handoff.fmri_pipeline(series, seg=seg, model="not-installed", template=pam50, moco="dl")
    assert _calls(fake_sct) == [] and sorted(p.name for p in series.parent.iterdir()) == [
        "fmri.nii.gz", "mask_fmri_cord.nii.gz"]
