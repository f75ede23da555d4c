"""Import an nnU-Net v2 trained model: every fold to ONNX, plus a manifest with nnU-Net's recipe.

An nnU-Net model folder (``nnUNetTrainer__nnUNetPlans__<config>/``, alone or inside a zip
or a tree of such folders) holds ``plans.json``, ``dataset.json`` and
``fold_*/checkpoint_final.pth``. :func:`import_nnunet` rebuilds the network from the plans
with nnunetv2 (the ``nnunet`` extra: torch and nnunetv2 are needed here only), loads each
fold's weights with ``torch.load(weights_only=True)``, exports it to ONNX, checks that ONNX
Runtime gives the same logits as torch, and writes a model folder of this engine. The
engine then runs it without torch (:mod:`sct_deepseg_epi.nnunet.pipeline`).

Anything the engine cannot reproduce exactly is refused up front with a message naming the
feature: cascades, several input channels, other image readers, normalisation schemes or
resampling functions, and trainers that nnunetv2 does not ship.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._optional import require
from ..errors import ModelError
from ..registry import download
from ..registry.manifest import SCHEMA_VERSION, load_manifest, write_manifest
from ..registry.store import sha256_file
from ..outputs import check_folder, refuse_nesting
from .recipe import CONVENTIONS, IMAGE_READERS, NORMALISATIONS, axcodes_from_sct, valid_axcodes

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint_final.pth"
_RESAMPLING_FN = "resample_data_or_seg_to_shape"
_RESAMPLING_KEYS = {"is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold"}
_PARITY_TOL = 1e-3  # max |logit| difference between torch and ONNX Runtime on a random patch


@dataclass(frozen=True)
class TrainedFolder:
    """One nnU-Net training output folder and the folds found in it."""

    path: Path
    folds: tuple[str, ...]


def find_trained_folders(root: Path, checkpoint: str = CHECKPOINT) -> list[TrainedFolder]:
    """Every folder under ``root`` with plans.json, dataset.json and at least one fold checkpoint."""
    found = []
    for plans in sorted(Path(root).rglob("plans.json")):
        d = plans.parent
        if not (d / "dataset.json").is_file():
            continue
        folds = tuple(sorted(p.parent.name[len("fold_"):] for p in d.glob(f"fold_*/{checkpoint}")))
        if folds:
            found.append(TrainedFolder(d, folds))
    return found


def load_checkpoint(path: Path) -> dict:
    """``torch.load(weights_only=True)``, allowing the few plain numpy types nnU-Net's logs hold.

    A checkpoint that needs anything else (arbitrary classes) is refused rather than
    unpickled with code execution.
    """
    torch = require("torch", "nnunet")
    allowed: list = [np.dtype, np.float64, np.float32, np.int64]
    allowed += [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64)]
    # numpy 2 moved numpy.core to numpy._core (numpy 1.26 has an empty numpy._core package), and
    # a checkpoint names the scalar type as the numpy that wrote it did: allow both names
    numpy2 = int(np.__version__.split(".")[0]) >= 2
    scalar = importlib.import_module("numpy._core.multiarray" if numpy2 else "numpy.core.multiarray").scalar
    other = "numpy.core.multiarray.scalar" if numpy2 else "numpy._core.multiarray.scalar"
    allowed += [scalar, (scalar, other)]
    try:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except TypeError:  # a torch without (object, name) aliases
            with torch.serialization.safe_globals([a for a in allowed if not isinstance(a, tuple)]):
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises plain UnpicklingError/RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot load this checkpoint safely (weights_only): {first}") from None


def _refuse(feature: str, detail: str) -> ModelError:
    return ModelError(f"unsupported nnU-Net model: {feature} ({detail})")


def sct_orientation(plans: dict, dataset: dict) -> str:
    """The axes (nibabel codes) SCT reorients an image to before running this model.

    SCT reads the model's orientation from ``image_orientation`` in dataset.json (in SCT's
    notation, where "LPI" is nibabel's RAS), else uses "AIL" for its region-based lesion
    models (found by dataset name) and "LPI" for every other model.
    """
    code = dataset.get("image_orientation")
    if code is None:
        code = "AIL" if "RegionBasedLesionSeg" in str(plans.get("dataset_name", "")) else "LPI"
    codes = axcodes_from_sct(code) if isinstance(code, str) and set(code.upper()) <= set("LRAPSI") else ""
    if not valid_axcodes(codes):
        raise ModelError(f"dataset.json: image_orientation {code!r} is not an orientation such as LPI")
    return codes


def recipe_from_plans(plans: dict, dataset: dict, configuration: str, mirror_axes: Sequence[int] | None,
                      step_size: float = 0.5, convention: str = "sct") -> dict:
    """The manifest's ``nnunet`` section for one configuration of a plans file, or a refusal."""
    if convention not in CONVENTIONS:
        raise ModelError(f"convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise ModelError(f"plans.json has no configuration {configuration!r} (it has {', '.join(configs)})")
    # resolve inheritance the way nnU-Net does: child keys override the parent's
    cfg: dict[str, Any] = {}
    chain, name = [], configuration
    while name is not None:
        if name in chain:
            raise ModelError(f"plans.json: configurations inherit from each other in a loop ({name})")
        chain.append(name)
        name = configs[name].get("inherits_from")
    for name in reversed(chain):
        cfg.update({k: v for k, v in configs[name].items() if k != "inherits_from"})
    if cfg.get("previous_stage") or "cascade" in configuration:
        raise _refuse("cascade", f"configuration {configuration!r} needs the previous stage's segmentation as input")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in IMAGE_READERS:
        raise _refuse("image reader", f"{reader}; supported: {', '.join(IMAGE_READERS)}")
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if len(channels) != 1:
        raise _refuse("input channels", f"{len(channels)} input channels; only single-image models are supported")
    schemes = cfg.get("normalization_schemes", [])
    for s in schemes:
        if s not in NORMALISATIONS:
            raise _refuse("normalisation", f"{s}; supported: {', '.join(NORMALISATIONS)}")
    resampling = {}
    aniso = 3.0
    for key, out in (("resampling_fn_data", "data"), ("resampling_fn_probabilities", "probabilities")):
        fn = cfg.get(key)
        if fn != _RESAMPLING_FN:
            raise _refuse("resampling", f"{key} is {fn}; only {_RESAMPLING_FN} is supported")
        kw = dict(cfg.get(key + "_kwargs", {}))
        unknown = set(kw) - _RESAMPLING_KEYS
        if unknown:
            raise _refuse("resampling", f"{key}_kwargs has {', '.join(sorted(unknown))}")
        aniso = float(kw.get("separate_z_anisotropy_threshold", aniso))
        resampling[out] = {"order": int(kw.get("order", 3)), "order_z": int(kw.get("order_z", 0)),
                           "force_separate_z": kw.get("force_separate_z")}
    labels = dataset.get("labels", {})
    if any((isinstance(v, int) and v > 254) for v in labels.values()):
        raise _refuse("labels", "label values above 254")
    rco = dataset.get("regions_class_order")
    patch = [int(p) for p in cfg["patch_size"]]
    if mirror_axes is None:
        mirror_axes = []
    intensity = plans.get("foreground_intensity_properties_per_channel", {})
    use_mask = cfg.get("use_mask_for_norm", [False] * len(schemes))
    return {
        "configuration": configuration,
        "convention": convention,
        **({"orientation": sct_orientation(plans, dataset)} if convention == "sct" else {}),
        "image_reader": reader,
        "transpose_forward": [int(i) for i in plans["transpose_forward"]],
        "transpose_backward": [int(i) for i in plans["transpose_backward"]],
        "spacing": [float(s) for s in cfg["spacing"]],
        "patch_size": patch,
        "step_size": float(step_size),
        "mirror_axes": [int(a) for a in mirror_axes],
        "resampling": {**resampling, "anisotropy_threshold": aniso},
        "normalisation": [
            {"scheme": s, "use_mask": bool(use_mask[i]),
             "intensity": {k: float(v) for k, v in intensity.get(str(i), {}).items()
                           if k in ("mean", "std", "percentile_00_5", "percentile_99_5")}
             if s == "CTNormalization" else {}}
            for i, s in enumerate(schemes)],
        "labels": labels,
        "regions_class_order": list(rco) if rco is not None else None,
    }


def _build_network(plans: dict, dataset: dict, configuration: str, trainer_name: str):
    require("nnunetv2")
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    import nnunetv2

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dataset)
    n_out = pm.get_label_manager(dataset).num_segmentation_heads
    if trainer_name == "nnUNetTrainer":  # its build_network_architecture is exactly this; skip importing trainers
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        try:
            net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                         cm.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=False,
                                         deep_supervision=False)
            return net, n_in, n_out, list(cm.patch_size)
        except TypeError:  # an older nnunetv2 with another signature: ask the trainer class below
            pass
    trainer_cls = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"),
                                              trainer_name, "nnunetv2.training.nnUNetTrainer")
    if trainer_cls is None:
        raise _refuse("trainer", f"{trainer_name} is not a trainer that nnunetv2 ships; a custom trainer's network "
                      "cannot be rebuilt without running its code")
    try:
        net = trainer_cls.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
    except TypeError:  # trainers of nnunetv2 < 2.5 take the architecture fields one by one
        net = trainer_cls.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                     cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                                     enable_deep_supervision=False)
    return net, n_in, n_out, list(cm.patch_size)


def _probe(n_in: int, patch: list[int]) -> np.ndarray:
    """A seeded random input: two patches (proves the batch axis is dynamic) unless they are large."""
    n = 2 if int(np.prod(patch)) <= 64 ** 3 else 1
    return np.random.default_rng(0).normal(size=(n, n_in, *patch)).astype(np.float32)


def _export(net, n_in: int, patch: list[int], path: Path, opset: int) -> np.ndarray:
    """Export one fold; returns the torch logits on a seeded random patch for the parity check."""
    torch = require("torch", "nnunet")
    import warnings

    net.eval()
    x = torch.from_numpy(_probe(n_in, patch))
    with torch.no_grad():
        ref = net(x).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the TorchScript exporter: no onnxscript needed, and the graph ORT 1.16+ reads
            legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(net, x[:1], str(path), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=opset,
                              do_constant_folding=True, **legacy)
    return ref


def _parity(path: Path, n_in: int, patch: list[int], ref: np.ndarray) -> float:
    import onnxruntime as ort

    x = _probe(n_in, patch)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = sess.run(["logits"], {"image": x})[0]
    return float(np.abs(out - ref).max())


def _local_source(source: str | Path) -> Path | None:
    """The local path of a folder, archive or file:// URL; None for an http(s) URL."""
    s = str(source)
    if "://" in s and not s.startswith("file://"):
        return None
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def _resolve_source(source: str | Path, tmp: Path) -> Path:
    """A local folder to search: the source folder itself, or an extracted archive / download."""
    s = str(source)
    p = _local_source(source)
    if p is None:
        name = Path(s.split("?")[0]).name or "model.zip"
        archive = download.fetch([s], tmp / name)
    else:
        if p.is_dir():
            return p
        if not p.exists():
            raise ModelError(f"{p}: no such file or folder")
        archive = p
    dest = tmp / "extracted"
    dest.mkdir()
    try:
        download.extract(archive, dest)
    except download.DownloadError as exc:
        raise ModelError(str(exc)) from None
    return dest


def _default_name(dataset_name: str, configuration: str) -> str:
    base = re.sub(r"^dataset\d+_", "", dataset_name.lower())
    base = re.sub(r"[^a-z0-9_]+", "_", base).strip("_") or "model"
    name = f"nnunet_{base}_{configuration}".replace("__", "_")
    return name if name[0].isalpha() else "m_" + name


def import_nnunet(source: str | Path, output: str | Path, *, configuration: str | None = None,
                  folds: Sequence[str] | None = None, checkpoint: str = CHECKPOINT, name: str | None = None,
                  version: str = "1.0.0", step_size: float = 0.5, opset: int = 17,
                  overwrite: bool = False, convention: str = "sct") -> Path:
    """Convert an nnU-Net v2 model (folder, archive or URL) into a model folder at ``output``.

    ``convention``: ``sct`` runs the model on the axes SCT's ``sct_deepseg`` gives it (the
    image reoriented to RAS, or to the model's ``image_orientation``), ``nnunet`` on the
    axes nnU-Net's image reader gives it (``nnUNetv2_predict``). They differ for any image
    not stored in that orientation.

    Returns the folder. Raises ModelError for unsupported models (naming the feature),
    unreadable checkpoints or a failed torch/ONNX Runtime parity check.
    """
    out = Path(output)
    if convention not in CONVENTIONS:
        raise ModelError(f"convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    if "://" not in str(source):  # replacing -o must never remove the model it is made from
        refuse_nesting(out, [source], role="output model folder")
    check_folder(out, role="output model folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"{out}: exists and is not empty (use -overwrite 1 to replace it)")
    local = _local_source(source)
    if local is not None and not local.exists():  # named before any missing package
        raise ModelError(f"{local}: no such file or folder")
    require("torch", "nnunet")
    require("nnunetv2")
    with tempfile.TemporaryDirectory(prefix=".nnunet-import-") as t:
        tmp = Path(t)
        root = _resolve_source(source, tmp)
        trained = find_trained_folders(root, checkpoint)
        if configuration is not None:
            trained = [f for f in trained if f.path.name.endswith(f"__{configuration}")] or \
                [f for f in trained if configuration in json.loads((f.path / "plans.json").read_text())
                 .get("configurations", {})]
        if not trained:
            raise ModelError(f"{source}: no nnU-Net model here (a folder with plans.json, dataset.json and "
                             f"fold_*/{checkpoint})")
        if len(trained) > 1:
            raise ModelError(f"{source}: holds {len(trained)} models ({', '.join(f.path.name for f in trained)}); "
                             "choose one with -config")
        folder = trained[0]
        use_folds = list(folds) if folds else list(folder.folds)
        missing = [f for f in use_folds if f not in folder.folds]
        if missing:
            raise ModelError(f"{folder.path}: no fold(s) {', '.join(missing)} (found {', '.join(folder.folds)})")
        plans = json.loads((folder.path / "plans.json").read_text())
        dataset = json.loads((folder.path / "dataset.json").read_text())
        ckpt_paths = [folder.path / f"fold_{f}" / checkpoint for f in use_folds]
        first = load_checkpoint(ckpt_paths[0])
        trainer = first.get("trainer_name", "nnUNetTrainer")
        cfg_name = (first.get("init_args") or {}).get("configuration") or folder.path.name.rsplit("__", 1)[-1]
        mirror = first.get("inference_allowed_mirroring_axes")
        recipe = recipe_from_plans(plans, dataset, cfg_name, mirror, step_size, convention)
        net, n_in, n_out, patch = _build_network(plans, dataset, cfg_name, trainer)

        stage = Path(tempfile.mkdtemp(prefix=".import-", dir=str(out.parent if out.parent.exists() else tmp)))
        try:
            members, sources = [], []
            for i, (fold, path) in enumerate(zip(use_folds, ckpt_paths)):
                ck = first if i == 0 else load_checkpoint(path)
                if ck.get("trainer_name", trainer) != trainer:
                    raise ModelError(f"{path}: trained with {ck.get('trainer_name')}, fold {use_folds[0]} with {trainer}")
                try:
                    net.load_state_dict(ck["network_weights"])
                except (KeyError, RuntimeError) as exc:
                    raise ModelError(f"{path}: weights do not fit the network of the plans "
                                     f"({str(exc).splitlines()[0]})") from None
                onnx_path = stage / f"fold_{fold}.onnx"
                ref = _export(net, n_in, patch, onnx_path, opset)
                diff = _parity(onnx_path, n_in, patch, ref)
                if not diff <= _PARITY_TOL * max(1.0, float(np.abs(ref).max())):
                    raise ModelError(f"fold {fold}: ONNX Runtime differs from torch by {diff:.3g} (logits); "
                                     "refusing to write a model that does not match")
                log.info("fold %s: exported, max |torch - onnxruntime| = %.2g", fold, diff)
                members.append({"file": onnx_path.name, "sha256": sha256_file(onnx_path),
                                "size": onnx_path.stat().st_size})
                sources.append({"fold": fold, "checkpoint": f"fold_{fold}/{checkpoint}",
                                "sha256": sha256_file(path), "parity_max_abs_logit_diff": diff})
                del ck
            first = None
            manifest = _manifest(plans, dataset, recipe, cfg_name, trainer, members, sources, n_out,
                                 name or _default_name(plans.get("dataset_name", "model"), cfg_name), version,
                                 source)
            write_manifest(manifest, stage)
            load_manifest(stage)  # proves the folder is complete and valid before it appears
            if out.exists():
                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(stage), str(out))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return out


def _manifest(plans: dict, dataset: dict, recipe: dict, configuration: str, trainer: str, members: list,
              sources: list, n_out: int, name: str, version: str, source: str | Path) -> dict:
    import nnunetv2
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        nnunet_version = pkg_version("nnunetv2")
    except PackageNotFoundError:  # a copy without its dist-info (some environments vendor it)
        nnunet_version = getattr(nnunetv2, "__version__", "unknown")
    labels = ", ".join(f"{k}={v}" for k, v in dataset.get("labels", {}).items())
    return {
        "schema_version": SCHEMA_VERSION, "name": name, "version": version,
        "description": f"nnU-Net v2 {configuration} model imported from {plans.get('dataset_name', '?')} "
                       f"({len(members)} fold(s); labels {labels})",
        "license": "", "citation": "",
        "members": members,
        "backend": {"kind": "nnunet", **recipe},
        # nnU-Net returns its labels as they are; cleaning stays opt-in (-largest, -fill-holes)
        "postprocess": {"threshold": 0.5, "largest": False, "fill_holes": False, "remove_small": "0vox"},
        "provenance": {"source": {
            "kind": "nnunet", "from": str(source), "dataset_name": plans.get("dataset_name"),
            "plans_name": plans.get("plans_name"), "configuration": configuration, "trainer": trainer,
            "nnunetv2_version": nnunet_version, "num_outputs": n_out, "checkpoints": sources,
        }},
    }
