"""Training orchestration: data -> configuration -> ensemble (trained, or from a checkpoint) -> checks -> model folder.

``sct_deepseg_epi train`` parses its flags and calls :func:`train`; the steps themselves
live in :mod:`.data`, :mod:`.fit`, :mod:`.validate` and :mod:`.export`.
Checkpoints are loaded with ``torch.load(weights_only=True)``: only tensors, plain
containers and this package's three configuration dataclasses can come out of one, so a
checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import __version__
from .._optional import require
from ..errors import InputError, ModelError
from ..read import read_volume
from ..registry.manifest import load_manifest
from . import data as tdata
from .export import model_card, onnx_to_torch, write_model
from .fit import TrainConfig, base_spec, torch_predictor, train_ensemble
from .net import NetConfig, UNet, count_parameters
from .simulate import SimConfig
from .validate import robustness

log = logging.getLogger("sct_deepseg_epi.train")


def load_checkpoint(path: str | Path) -> dict:
    """A ``-checkpoint`` file, unpickled safely: tensors, containers and the configuration dataclasses only."""
    torch = require("torch")
    try:
        with torch.serialization.safe_globals([TrainConfig, NetConfig, SimConfig]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises plain UnpicklingError/RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot load this checkpoint safely (weights_only): {first}") from None


def resolve_init(ref: str) -> Path:
    """The folder of the model to fine-tune: a model folder, or an installed ``name[@version]`` (checksums verified)."""
    from ..api import load_model

    p = Path(ref)
    spec = load_model(p if p.is_dir() else ref, install=False)
    if spec.directory is None:
        raise ModelError(f"{ref}: the model has no local folder to fine-tune from")
    return spec.directory


def configure(args: argparse.Namespace) -> tuple[TrainConfig, list | None]:
    """The training configuration the flags ask for, and the starting weights when fine-tuning."""
    cfg = TrainConfig(workers=args.workers, threads=args.threads, device=args.device, seed=args.seed,
                      members=args.members, loss=args.loss, precision=args.precision)
    init_states = None
    if args.init_model:
        folder = resolve_init(args.init_model)
        ispec = load_manifest(folder)
        tr_net = dict(ispec.extra.get("training", {}).get("config", {}).get("net", {}))
        tr_net.update(in_channels=ispec.in_channels, widths=tuple(tr_net.get("widths", NetConfig().widths)))
        net = NetConfig(**tr_net)
        # members assembled from different networks record their own (training.members[i].config.net)
        recs = ispec.extra.get("training", {}).get("members", [])
        nets = [NetConfig(**{**net.as_dict(), **r.get("config", {}).get("net", {}), "in_channels": ispec.in_channels,
                             "widths": tuple(r.get("config", {}).get("net", {}).get("widths", net.widths))})
                for r in recs] if len(recs) == len(ispec.members) else [net] * len(ispec.members)
        init_states = [(n, onnx_to_torch(p, n).state_dict()) for n, p in zip(nets, ispec.member_paths())]
        cfg = replace(cfg, net=net, spacing_mm=ispec.spacing_mm[0], context_slices=ispec.context_slices,
                      epochs=4, lr=5e-4, freeze_bn=True, n_volumes=1000)
        log.info("fine-tuning %s (%d members) from %s", ispec.ref, len(init_states), folder)
    if args.widths:
        cfg = replace(cfg, net=replace(cfg.net, widths=tuple(int(w) for w in args.widths.split(","))))
    if args.top_convs is not None:
        cfg = replace(cfg, net=replace(cfg.net, top_convs=args.top_convs))
    if args.spacing is not None:
        cfg = replace(cfg, spacing_mm=args.spacing)
    if args.context is not None:
        cfg = replace(cfg, context_slices=args.context)
    cfg = replace(cfg, net=replace(cfg.net, in_channels=2 * cfg.context_slices + 1))
    for flag, key in (("epochs", "epochs"), ("n_sim", "n_volumes"), ("n_val", "val_volumes"), ("patch", "patch"), ("lr", "lr")):
        if getattr(args, flag) is not None:
            cfg = replace(cfg, **{key: getattr(args, flag)})
    if cfg.patch % (2 ** cfg.net.levels):
        raise InputError(f"-patch {cfg.patch} must be a multiple of {2 ** cfg.net.levels}")

    return cfg, init_states


def train(args: argparse.Namespace, command: str) -> Path:
    """Train (or export from ``args.from_checkpoint``) the ensemble the parsed ``train`` flags describe."""
    torch = require("torch")
    t_start = time.perf_counter()
    sources, _ = tdata.load_sources(args.data)
    cfg, init_states = configure(args)
    spec = base_spec(cfg, args.name, args.version)
    real = None
    if args.val_image:
        if not args.val_mask:
            raise InputError("-val-image needs -val-mask")
        v, m = read_volume(args.val_image), read_volume(args.val_mask)
        if v.data.shape != m.data.shape:
            raise InputError(f"{args.val_mask}: not on the grid of {args.val_image}")
        real = (v, m)

    def real_dice(model) -> float:
        from .validate import predict_volume
        from .. import metrics

        prob = predict_volume(torch_predictor([model], cfg.device), real[0].data, real[0].zooms, spec)
        return metrics.dice(prob >= spec.threshold, real[1].data > 0.5)

    if args.from_checkpoint:
        ck = load_checkpoint(args.from_checkpoint)
        cfg = ck["cfg"]
        spec = base_spec(cfg, args.name, args.version)
        models = []
        for i, sd in enumerate(ck["states"]):
            m = UNet(ck["nets"][i] if ck.get("nets") else cfg.net)
            m.load_state_dict(sd)
            models.append(m.eval())
        results_meta = ck["members"]
        train_seconds = ck["seconds"]
        train_device = ck["device"]
        train_command = ck.get("command") or _DEFAULT_COMMAND
    else:
        log.info("training %d member(s) on %d source(s): %s", cfg.members, len(sources), json.dumps(cfg.as_dict()))
        results = train_ensemble(sources, cfg, real_dice if real else None, init_states)
        models = [r.model for r in results]
        results_meta = [{"fold": r.fold, "train_sources": r.train_sources, "heldout_sources": r.heldout_sources,
                         "history": r.history, "seconds": r.seconds, "net": r.model.cfg.as_dict()} for r in results]
        train_seconds = time.perf_counter() - t_start
        train_device = f"{cfg.device} ({torch.cuda.get_device_name(0) if cfg.device.startswith('cuda') else platform.processor() or platform.machine()}, {cfg.threads} threads)"
        train_command = command
        if args.checkpoint:
            torch.save({"cfg": cfg, "states": [m.state_dict() for m in models], "nets": [m.cfg for m in models],
                        "members": results_meta,
                        "seconds": train_seconds, "device": train_device, "command": train_command},
                       args.checkpoint)

    metrics_out: dict = {}
    held = [h["history"][-1].get("heldout_sim_dice") for h in results_meta if h["history"]]
    held = [h for h in held if h is not None]
    if held:
        metrics_out["heldout_sim_dice_per_member"] = [round(h, 4) for h in held]
        metrics_out["heldout_sim_dice_mean"] = float(np.mean(held))
    if real:
        ens = torch_predictor(models)
        rob = robustness(ens, real[0].data, real[1].data, real[0].zooms, spec)
        rob.update(series=str(args.val_image), edge_mm=4.0, shift_mm=3.0)
        metrics_out["real_epi"] = rob
        metrics_out["real_epi_dice"] = rob["full"]["dice"]
        print(f"real EPI: Dice {rob['full']['dice']:.4f} per slice "
              + " ".join(f"{d:.3f}" for d in rob["full"]["dice_per_slice"])
              + f"; cropped worst {rob['crop_worst_dice']:.4f}, shifted worst {rob['shift_worst_dice']:.4f}")

    folds = {}
    for i, h in enumerate(results_meta):
        for s in h["heldout_sources"]:
            folds[s] = i
    src_rows = [{"name": s.name, "image": _rel(s.meta.get("image", s.name)), "sha256": s.meta.get("sha256", ""),
                 "mask_sha256": s.meta.get("mask_sha256", ""), "fold": folds.get(s.name, "")} for s in sources]
    training = {"command": train_command, "config": cfg.as_dict(), "device": train_device, "seconds": round(train_seconds, 1),
                "notes": "simulation + training of all members", "sources": src_rows,
                "members": [dict(h) for h in results_meta],
                "parameters_per_member": count_parameters(models[0]),
                "init_model": args.init_model}
    if args.from_checkpoint:
        training["export_command"] = command
    provenance = {"package_version": __version__, "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "git_commit": _git_commit()}
    description = ("Spinal cord segmentation for axial gradient-echo EPI (BOLD fMRI): ensemble of small 2D U-Nets "
                   "trained on EPI simulated from anatomical T2*w/T2/MT/T1 volumes.")
    path, diffs = write_model(models, Path(args.o), spec, name=args.name, version=args.version,
                              description=description, training=training, metrics=metrics_out,
                              provenance=provenance)
    card = model_card(name=args.name, version=args.version, spec=load_manifest(Path(args.o)), training=training,
                      metrics=metrics_out, provenance={**provenance, "parity_max_abs_diff": max(diffs)},
                      parity_diffs=diffs, sources=src_rows,
                      notes=Path(args.card_notes).read_text(encoding="utf-8") if args.card_notes else "")
    (Path(args.o) / "README.md").write_text(card, encoding="utf-8")
    print(f"ONNX/torch parity: max abs diff {max(diffs):.3g} (limit 1e-4)")
    print(f"wrote {path} ({len(models)} members)")
    return path




# what produced checkpoints saved before commands were recorded in them (the default model's recipe)
_DEFAULT_COMMAND = ("sct_deepseg_epi train -data ../shared/data -o models/seg_sc_epi/0.1.0 -name seg_sc_epi "
                    "-version 0.1.0 -checkpoint seg_sc_epi.pt")


def _rel(p: str) -> str:
    s = str(p)
    i = s.find("shared/data/")
    return s[i + len("shared/data/"):] if i >= 0 else Path(s).name


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
