"""Build real nnU-Net v2 model folders on tiny synthetic data, for tests and benchmarks.

nnU-Net's own fingerprint extractor and experiment planner write the plans; the network
is then shrunk (fewer features, a chosen patch) so that it runs in milliseconds, and each
fold's weights are random (seeded) or briefly fitted. Checkpoints are written by nnU-Net's
own trainer class, so their layout is what a real training run leaves. Needs nnunetv2 and
torch (the ``nnunet`` extra); never used at inference time.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np


def synthetic_case(shape: Sequence[int], zooms: Sequence[float], seed: int, radius_mm: float = 4.0,
                   background: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """An EPI-like volume (x, y, z): a bright cord-like tube in noisy tissue, and its mask."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = (np.arange(nx) - nx / 2) * zooms[0]
    y = (np.arange(ny) - ny / 2) * zooms[1]
    xx, yy = np.meshgrid(x, y, indexing="ij")
    img = np.empty(shape, np.float32)
    seg = np.zeros(shape, np.uint8)
    cx, cy = rng.uniform(-3, 3, 2)
    for k in range(nz):
        r2 = (xx - cx - 0.2 * k) ** 2 + (yy - cy) ** 2
        body = np.exp(-((xx / (0.45 * nx * zooms[0])) ** 2 + (yy / (0.45 * ny * zooms[1])) ** 2) ** 2)
        img[..., k] = 100 * body + 80 * (r2 < radius_mm ** 2) + rng.normal(0, 8, (nx, ny))
        seg[..., k] = r2 < radius_mm ** 2
    if background:
        img[:2] = 0  # a zero band, so cropping to the non-zero box has something to do
    return img, seg


def _save(arr: np.ndarray, zooms: Sequence[float], path: Path, axcodes: str = "RAS") -> None:
    aff = np.diag([*zooms, 1.0])
    img = nib.Nifti1Image(arr, aff)
    img.header.set_zooms(tuple(zooms))
    nib.save(img, str(path))


@contextlib.contextmanager
def nnunet_env(root: Path):
    """nnU-Net's three folders under ``root``, set in the environment for the duration."""
    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        (root / k).mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(root / k)
    # older nnU-Net releases (SCT's fork among them) read these once, into plain strings, when
    # a module is imported (``from nnunetv2.paths import nnUNet_raw``): modules imported for an
    # earlier root must see this one too. Newer ones hold objects that read the environment.
    patched = [(m, k, getattr(m, k)) for name, m in list(sys.modules.items())
               if name.startswith("nnunetv2") and m is not None for k in keys
               if isinstance(getattr(m, k, 0), (str, type(None)))]
    for m, k, _ in patched:
        setattr(m, k, str(root / k))
    try:
        yield
    finally:
        for m, k, v in patched:
            setattr(m, k, v)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plan_dataset(root: Path, *, dataset_id: int = 501, shape: Sequence[int] = (40, 36, 8),
                 zooms: Sequence[float] = (1.0, 1.0, 4.0), n_cases: int = 2, seed: int = 0,
                 labels: dict | None = None, regions_class_order: Sequence[int] | None = None,
                 channel_name: str = "EPI", background: float = 0.0) -> tuple[dict, dict, Path]:
    """Write a synthetic raw dataset and let nnU-Net fingerprint and plan it.

    Returns (plans, dataset.json, raw folder). The per-case fingerprints are nnU-Net's own
    (``DatasetFingerprintExtractor.analyze_case``); they are gathered in this process rather
    than in nnU-Net's spawned worker pool, which alone takes seconds to start.
    """
    root = Path(root)
    name = f"Dataset{dataset_id:03d}_Synth"
    with nnunet_env(root), contextlib.redirect_stdout(io.StringIO()):
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import \
            DatasetFingerprintExtractor
        from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

        raw = root / "nnUNet_raw" / name
        (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
        (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
        for i in range(n_cases):
            img, seg = synthetic_case(shape, zooms, seed + i, background=background)
            if labels and len(labels) > 2:  # a second structure: the cord's central half
                img2, seg2 = synthetic_case(shape, zooms, seed + i, radius_mm=2.0, background=background)
                seg = seg + seg2
            _save(img, zooms, raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
            _save(seg, zooms, raw / "labelsTr" / f"case_{i:03d}.nii.gz")
        dj = {"channel_names": {"0": channel_name}, "labels": labels or {"background": 0, "cord": 1},
              "numTraining": n_cases, "file_ending": ".nii.gz"}
        if regions_class_order is not None:
            dj["regions_class_order"] = list(regions_class_order)
        (raw / "dataset.json").write_text(json.dumps(dj))
        fe = DatasetFingerprintExtractor(dataset_id, 1)
        cases = list(fe.dataset.values())
        reader = determine_reader_writer_from_dataset_json(dj, cases[0]["images"][0])
        res = [DatasetFingerprintExtractor.analyze_case(c["images"], c["label"], reader, 2000) for c in cases]
        fg = np.concatenate([r[2][0] for r in res])
        q = np.percentile(fg, (0.5, 50.0, 99.5))
        fingerprint = {
            "spacings": [list(map(float, r[1])) for r in res],
            "shapes_after_crop": [list(map(int, r[0])) for r in res],
            "foreground_intensity_properties_per_channel": {"0": {
                "mean": float(fg.mean()), "median": float(q[1]), "std": float(fg.std()), "min": float(fg.min()),
                "max": float(fg.max()), "percentile_99_5": float(q[2]), "percentile_00_5": float(q[0])}},
            "median_relative_size_after_cropping": float(np.median([r[4] for r in res])),
        }
        pre = root / "nnUNet_preprocessed" / name
        pre.mkdir(parents=True, exist_ok=True)
        (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
        plan_experiments([dataset_id])
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
    return plans, dj, raw


def write_trained(out_root: Path, plans: dict, dataset_json: dict, *, configuration: str = "3d_fullres",
                  folds: int = 1, features: Sequence[int] | None = (4, 8, 16), patch_size: Sequence[int] | None = None,
                  reader: str | None = None, normalisation: str | None = None, use_mask_for_norm: bool = False,
                  seed: int = 0, logit_scale: float = 1.0, train_steps: int = 0, raw: Path | None = None) -> Path:
    """A trained-model folder ``out_root/nnUNetTrainer__nnUNetPlans__<configuration>`` from planned data.

    ``features`` sets the width of each stage (its length, the depth); ``patch_size`` (in
    nnU-Net's transposed order) replaces the planned one; ``reader``/``normalisation``
    override the plan's; each fold's weights are random (seeded), scaled at the output by
    ``logit_scale``, or fitted for ``train_steps`` steps on the cases in ``raw``.
    """
    import copy

    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans = copy.deepcopy(plans)
        if configuration not in plans["configurations"]:
            raise ValueError(f"nnU-Net did not plan {configuration!r} for this data "
                             f"(planned: {', '.join(plans['configurations'])})")
        cfg = plans["configurations"][configuration]
        _shrink(cfg, features, patch_size)
        if reader is not None:
            plans["image_reader_writer"] = reader
        if normalisation is not None:
            cfg["normalization_schemes"] = [normalisation]
        cfg["use_mask_for_norm"] = [bool(use_mask_for_norm)]
        out = Path(out_root) / f"nnUNetTrainer__nnUNetPlans__{configuration}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "plans.json").write_text(json.dumps(plans, indent=2))
        (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
        mirror_axes = tuple(range(len(cm.patch_size)))
        for fold in range(folds):
            torch.manual_seed(seed * 100 + fold)
            # what nnUNetTrainer.build_network_architecture does (importing the trainer costs seconds)
            net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                         cm.network_arch_init_kwargs_req_import, 1, n_out, allow_init=True,
                                         deep_supervision=True)
            if logit_scale != 1.0:
                with torch.no_grad():
                    for layer in net.decoder.seg_layers:
                        layer.weight.mul_(logit_scale)
            if train_steps:
                _fit(net, raw, pm, configuration, dataset_json, train_steps)
            opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
            # the keys and kinds of values nnUNetTrainer.save_checkpoint writes (numpy floats included)
            checkpoint = {
                "network_weights": net.state_dict(),
                "optimizer_state": opt.state_dict(),
                "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                            "train_losses": [0.1], "val_losses": [0.2], "lrs": [0.01],
                            "epoch_start_timestamps": [0.0], "epoch_end_timestamps": [1.0],
                            "dice_per_class_or_region": [[np.float64(0.5)]]},
                "_best_ema": np.float64(0.5),
                "current_epoch": 1,
                "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                              "dataset_json": dataset_json, "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": mirror_axes,
            }
            (out / f"fold_{fold}").mkdir(exist_ok=True)
            torch.save(checkpoint, out / f"fold_{fold}" / "checkpoint_final.pth")
    return out


def _shrink(cfg: dict, features: Sequence[int] | None, patch_size: Sequence[int] | None) -> None:
    """Make the planned U-Net tiny: ``len(features)`` stages of those widths, and the patch."""
    kw = cfg["architecture"]["arch_kwargs"]
    if features is None:  # the network as planned (realistic size)
        if patch_size is not None:
            cfg["patch_size"] = list(patch_size)
        return
    n = len(features)
    kw["n_stages"] = n
    kw["features_per_stage"] = list(features)
    for key in ("kernel_sizes", "strides"):
        kw[key] = kw[key][:n]
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kw:
            kw[key] = kw[key][:n]
    if "n_conv_per_stage_decoder" in kw:
        kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][:n - 1]
    if patch_size is not None:
        cfg["patch_size"] = list(patch_size)
    # the patch must be divisible by the total stride along every axis
    total = np.prod(np.asarray(kw["strides"]), axis=0)
    cfg["patch_size"] = [int(max(t, int(np.ceil(p / t)) * t)) for p, t in zip(cfg["patch_size"], total)]
    cfg["batch_size"] = 2


def _fit(net, raw: Path, plans_manager, configuration: str, dj: dict, steps: int) -> None:
    """A few Adam steps on whole preprocessed cases: enough for a confident, cord-shaped output."""
    import torch

    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    cm = plans_manager.get_configuration(configuration)
    pp = DefaultPreprocessor(verbose=False)
    xs, ys = [], []
    for img in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
        seg = raw / "labelsTr" / img.name.replace("_0000", "")
        d, s, _ = pp.run_case([str(img)], str(seg), plans_manager, cm, dj)
        xs.append(torch.from_numpy(np.ascontiguousarray(d)))
        ys.append(torch.from_numpy((s > 0).astype(np.int64)))
    net.train()
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    two_d = len(cm.patch_size) == 2
    ps = list(cm.patch_size)
    for step in range(steps):
        x, y = xs[step % len(xs)], ys[step % len(ys)]
        if two_d:
            z = step % x.shape[1]
            x, y = x[:, z], y[:, z]
        # a patch-sized window (padded if the case is smaller)
        pad = [max(0, p - n) for p, n in zip(ps, x.shape[1:])]
        if any(pad):
            spec = [v for p in reversed(pad) for v in (0, p)]
            x = torch.nn.functional.pad(x, spec)
            y = torch.nn.functional.pad(y, spec)
        sl = tuple(slice(0, p) for p in ps)
        xb, yb = x[(slice(None),) + sl][None], y[(slice(None),) + sl]
        out = net(xb)
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = torch.nn.functional.cross_entropy(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
