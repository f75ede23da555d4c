"""``sct_deepseg_epi train``: train (or fine-tune) an ensemble on labelled data and export it.

Examples::

    # the default model (see docs/training.md)
    sct_deepseg_epi train -data ../shared/data -o models/seg_sc_epi/0.1.0 -name seg_sc_epi -version 0.1.0 \\
        -val-image ../shared/data/epi/sct-example-2014/fmri.nii.gz \\
        -val-mask ../shared/data/epi/sct-example-2014/fmri_moco_mean_seg_modif.nii.gz

    # adapt the installed model to a lab's own labelled EPI (BIDS: *_bold + *_seg / *_mask labels)
    sct_deepseg_epi train -data my_bids/ -init-model seg_sc_epi -o my_model -epochs 4
"""
from __future__ import annotations

import json
import logging
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from ._parser import Parser, setup_logging

log = logging.getLogger("sct_deepseg_epi.train")


def get_parser() -> Parser:
    p = Parser("sct_deepseg_epi train", "Train (or fine-tune) an ensemble on labelled data and export it as a "
               "checksummed model folder (ONNX members + manifest.json + model card).")
    p.mandatory.add_argument("-data", metavar="<path>", required=True,
                             help="Labelled data: a BIDS folder or any tree of NIfTIs with *_seg*/*_mask* labels, "
                                  "a MANIFEST.tsv (path, role, sha256 columns; role train-source is used), or a "
                                  "sources .npz packed by -pack.")
    p.mandatory.add_argument("-o", metavar="<folder>", help="Output model folder (not needed with -pack).")
    o = p.optional
    o.add_argument("-name", default="custom_model", help="Model name in the manifest. Default: custom_model.")
    o.add_argument("-version", default="0.1.0", help="Model version (MAJOR.MINOR.PATCH). Default: 0.1.0.")
    o.add_argument("-init-model", metavar="<name|path>", default=None,
                   help="Fine-tune from an installed model (name or name@version) or a model folder "
                        "instead of starting from scratch; its architecture and input settings are kept.")
    o.add_argument("-members", type=int, default=3, help="Ensemble members (k-fold over subjects). Default: 3.")
    o.add_argument("-epochs", type=int, default=None, help="Epochs per member. Default: 8 (4 when fine-tuning).")
    o.add_argument("-n-sim", type=int, default=None, help="Simulated stacks in the training set. Default: 5000.")
    o.add_argument("-n-val", type=int, default=None,
                   help="Simulated stacks per member for the held-out simulated score. Default: 240.")
    o.add_argument("-patch", type=int, default=None, help="Training patch size (pixels on the model grid). Default: 96.")
    o.add_argument("-widths", default=None, help="U-Net widths per level, comma-separated. Default: 8,16,24,32.")
    o.add_argument("-spacing", type=float, default=None, help="In-plane model spacing in mm. Default: 1.0.")
    o.add_argument("-context", type=int, default=None, help="Neighbouring slices per side as channels. Default: 0 (2D).")
    o.add_argument("-lr", type=float, default=None, help="Peak learning rate. Default: 3e-3 (5e-4 when fine-tuning).")
    o.add_argument("-seed", type=int, default=0, help="Random seed (simulation, weights, batch order). Default: 0.")
    o.add_argument("-val-image", metavar="<file>", default=None, help="A real labelled EPI image (3D or 4D) to report.")
    o.add_argument("-val-mask", metavar="<file>", default=None, help="Its cord mask.")
    o.add_argument("-device", default="cpu", help="torch device: cpu, cuda. Default: cpu.")
    o.add_argument("-workers", type=int, default=2, help="Processes simulating the training set. Default: 2.")
    o.add_argument("-threads", type=int, default=2, help="torch CPU threads. Default: 2.")
    o.add_argument("-checkpoint", metavar="<file>", default=None,
                   help="Also save the trained torch weights and histories to this file (.pt).")
    o.add_argument("-from-checkpoint", metavar="<file>", default=None,
                   help="Skip training: export the weights of a -checkpoint file (e.g. trained on a GPU machine).")
    o.add_argument("-card-notes", metavar="<file.md>", default=None,
                   help="Markdown appended to the model card (measurements made outside training, say).")
    o.add_argument("-pack", metavar="<file.npz>", default=None,
                   help="Only load -data and pack it into one .npz (to train on another machine), then exit.")
    return p


def _resolve_init(ref: str) -> Path:
    """The folder of the model to fine-tune: a model folder, or an installed ``name[@version]`` (checksums verified)."""
    from ..api import load_model
    from ..errors import ModelError

    p = Path(ref)
    spec = load_model(p if p.is_dir() else ref, install=False)
    if spec.directory is None:
        raise ModelError(f"{ref}: the model has no local folder to fine-tune from")
    return spec.directory


def _check_outputs(args, init_folder: Path | None) -> None:
    """The model folder (its members, manifest and card), -checkpoint and -pack: none may be an input."""
    from ..write import check_folder, check_output, refuse_overwrite

    inputs = [p for p in (args.data, init_folder, args.val_image, args.val_mask, args.from_checkpoint,
                          args.card_notes) if p]
    if init_folder is not None:
        inputs += [init_folder / f.name for f in init_folder.iterdir()]
    if args.pack:
        check_output(args.pack, inputs, role="-pack file", suffixes=(".npz",))
        return
    out = Path(args.o)
    written = {"model folder": out, "manifest": out / "manifest.json", "model card": out / "README.md",
               **{f"member {i}": out / f"member{i}.onnx" for i in range(max(args.members, 1))}}
    refuse_overwrite(written, inputs)
    check_folder(out, inputs, role="model folder")
    if args.checkpoint:
        check_output(args.checkpoint, inputs, role="checkpoint", suffixes=None)


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.o and not args.pack:
        parser.error("the following arguments are required: -o")
    setup_logging(args.v)
    from .._optional import require

    init_folder = _resolve_init(args.init_model) if args.init_model else None
    _check_outputs(args, init_folder)  # before torch is loaded or any data read
    require("torch")
    require("onnx")
    import numpy as np

    from .. import __version__
    from ..errors import InputError
    from ..read import read_volume
    from ..registry.manifest import load_manifest
    from ..training import data as tdata
    from ..training.export import model_card, onnx_to_torch, write_model
    from ..training.fit import TrainConfig, base_spec, torch_predictor, train_ensemble
    from ..training.net import NetConfig, UNet, count_parameters
    from ..training.validate import robustness

    torch = require("torch")
    t_start = time.perf_counter()
    sources, pairs = tdata.load_sources(args.data)
    if args.pack:
        tdata.save_sources(sources, args.pack)
        print(f"packed {len(sources)} sources into {args.pack}")
        return 0

    cfg = TrainConfig(workers=args.workers, threads=args.threads, device=args.device, seed=args.seed,
                      members=args.members)
    init_states = None
    if init_folder is not None:
        folder = init_folder
        ispec = load_manifest(folder)
        tr_net = dict(ispec.extra.get("training", {}).get("config", {}).get("net", {}))
        tr_net.update(in_channels=ispec.in_channels, widths=tuple(tr_net.get("widths", NetConfig().widths)))
        net = NetConfig(**tr_net)
        init_states = [onnx_to_torch(p, net).state_dict() for p in ispec.member_paths()]
        cfg = replace(cfg, net=net, spacing_mm=ispec.spacing_mm[0], context_slices=ispec.context_slices,
                      epochs=4, lr=5e-4, freeze_bn=True, n_volumes=1000)
        log.info("fine-tuning %s (%d members) from %s", ispec.ref, len(init_states), folder)
    if args.widths:
        cfg = replace(cfg, net=replace(cfg.net, widths=tuple(int(w) for w in args.widths.split(","))))
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
        from ..training.validate import predict_volume
        from .. import metrics

        prob = predict_volume(torch_predictor([model], cfg.device), real[0].data, real[0].zooms, spec)
        return metrics.dice(prob >= spec.threshold, real[1].data > 0.5)

    if args.from_checkpoint:
        ck = torch.load(args.from_checkpoint, map_location="cpu", weights_only=False)
        cfg = ck["cfg"]
        spec = base_spec(cfg, args.name, args.version)
        models = []
        for sd in ck["states"]:
            m = UNet(cfg.net)
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
                         "history": r.history, "seconds": r.seconds} for r in results]
        train_seconds = time.perf_counter() - t_start
        train_device = f"{cfg.device} ({torch.cuda.get_device_name(0) if cfg.device.startswith('cuda') else platform.processor() or platform.machine()}, {cfg.threads} threads)"
        train_command = _command(argv)
        if args.checkpoint:
            torch.save({"cfg": cfg, "states": [m.state_dict() for m in models], "members": results_meta,
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
                "members": [{k: v for k, v in h.items()} for h in results_meta],
                "parameters_per_member": count_parameters(models[0]),
                "init_model": args.init_model}
    if args.from_checkpoint:
        training["export_command"] = _command(argv)
    provenance = {"package_version": __version__, "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "git_commit": _git_commit()}
    description = ("Spinal cord segmentation for axial gradient-echo EPI (BOLD fMRI): ensemble of small 2D U-Nets "
                   "trained on EPI simulated from anatomical T2*w/T2/MT/T1 volumes.")
    spec_final = spec
    path, diffs = write_model(models, Path(args.o), spec_final, name=args.name, version=args.version,
                              description=description, training=training, metrics=metrics_out,
                              provenance=provenance)
    card = model_card(name=args.name, version=args.version, spec=load_manifest(Path(args.o)), training=training,
                      metrics=metrics_out, provenance={**provenance, "parity_max_abs_diff": max(diffs)},
                      parity_diffs=diffs, sources=src_rows,
                      notes=Path(args.card_notes).read_text(encoding="utf-8") if args.card_notes else "")
    (Path(args.o) / "README.md").write_text(card, encoding="utf-8")
    print(f"ONNX/torch parity: max abs diff {max(diffs):.3g} (limit 1e-4)")
    print(f"wrote {path} ({len(models)} members)")
    return 0


# what produced checkpoints saved before commands were recorded in them (the default model's recipe)
_DEFAULT_COMMAND = ("sct_deepseg_epi train -data ../shared/data -o models/seg_sc_epi/0.1.0 -name seg_sc_epi "
                    "-version 0.1.0 -checkpoint seg_sc_epi.pt")


def _command(argv) -> str:
    return "sct_deepseg_epi train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def _rel(p: str) -> str:
    s = str(p)
    i = s.find("shared/data/")
    return s[i + len("shared/data/"):] if i >= 0 else Path(s).name


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
