"""Export trained members to ONNX, check parity with torch, write the model folder.

A model folder holds one ``*.onnx`` file per ensemble member (input ``image`` (N, C, H, W),
output ``logits`` (N, 1, H, W), N/H/W dynamic, opset 17), ``manifest.json`` with their
SHA-256 (written through :func:`~sct_deepseg_epi.registry.manifest.write_manifest`, so
it is validated) and a ``README.md`` model card.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .._optional import require
from ..errors import ModelError
from ..registry.store import sha256_file
from ..registry.manifest import SCHEMA_VERSION, ModelSpec, load_manifest, spec_to_dict, write_manifest
from .net import NetConfig, UNet, fold_batchnorm

torch = require("torch")
log = logging.getLogger(__name__)
OPSET = 17
PARITY_TOL = 1e-4
IR_VERSION = 8  # the lowest IR that carries opset 17


def export_onnx(model, path: Path, in_channels: int, multiple: int) -> None:
    """Fold BatchNorm and write ``model`` as an ONNX file with dynamic N, H, W."""
    fused = fold_batchnorm(model).eval()
    x = torch.zeros(1, in_channels, 2 * multiple, 2 * multiple)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (x,), str(path), input_names=["image"], output_names=["logits"],
                          opset_version=OPSET, dynamo=False, do_constant_folding=True,
                          dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}})
    onnx = require("onnx")
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION  # readable by onnxruntime >= 1.16 (SCT's environment pins an older one)
    proto.producer_name = "sct_deepseg_epi.training"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def parity(model, path: Path, in_channels: int, multiple: int, seed: int = 0) -> float:
    """Max |torch - onnxruntime| logits on random inputs of two shapes; ModelError above 1e-4."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    model = model.eval()
    for shape in ((3, in_channels, 2 * multiple, 3 * multiple), (1, in_channels, 5 * multiple, 4 * multiple)):
        x = rng.normal(size=shape).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        out = sess.run(["logits"], {"image": x})[0]
        if out.shape != ref.shape:
            raise ModelError(f"{path}: ONNX output shape {out.shape} != torch {ref.shape}")
        worst = max(worst, float(np.abs(out - ref).max()))
    if not worst <= PARITY_TOL:
        raise ModelError(f"{path}: ONNX/torch parity failed: max abs diff {worst:.3g} > {PARITY_TOL:g}")
    return worst


def write_model(models: list, out_dir: Path, spec: ModelSpec, *, name: str, version: str, description: str,
                training: dict, metrics: dict, provenance: dict, license: str = "MIT", citation: str = "",
                card: str | None = None) -> tuple[Path, list[float]]:
    """Export every member, check parity, write manifest.json (+ model card). Returns the manifest path and diffs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    members, diffs = [], []
    c, mult = spec.in_channels, spec.size_multiple
    for i, m in enumerate(models):
        f = out_dir / f"member{i}.onnx"
        export_onnx(m, f, c, mult)
        d = parity(m, f, c, mult, seed=i)
        diffs.append(d)
        log.info("member %d: ONNX/torch parity max abs diff %.3g", i, d)
        members.append({"file": f.name, "sha256": sha256_file(f), "size": f.stat().st_size})
    d = spec_to_dict(spec)
    d.update(schema_version=SCHEMA_VERSION, name=name, version=version, description=description,
             license=license, citation=citation, members=members,
             training=training, metrics=metrics, provenance={**provenance, "parity_max_abs_diff": max(diffs)})
    path = write_manifest(d, out_dir)
    load_manifest(out_dir)  # re-read: proves the folder is loadable
    if card is not None:
        (out_dir / "README.md").write_text(card, encoding="utf-8")
    return path, diffs


def onnx_to_torch(path: Path, cfg: NetConfig):
    """Rebuild a trainable UNet (BatchNorm as identity) from an exported member, for fine-tuning.

    The exported graph is BatchNorm-folded; each folded convolution's bias becomes the
    following BatchNorm's shift, with unit scale and identity running statistics.
    """
    onnx = require("onnx")
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    fused = fold_batchnorm(UNet(cfg))
    sd = fused.state_dict()
    missing = [k for k in sd if k not in inits]
    if missing:
        raise ModelError(f"{path}: not a model of this architecture ({len(missing)} weights missing, e.g. {missing[0]})")
    fused.load_state_dict({k: torch.from_numpy(np.array(inits[k])) for k in sd})
    model = UNet(cfg)
    fused_seqs = list(fused.down) + list(fused.dec)
    for seq, fseq in zip(list(model.down) + list(model.dec), fused_seqs):
        convs = [m for m in seq if isinstance(m, torch.nn.Conv2d)]
        bns = [m for m in seq if isinstance(m, torch.nn.BatchNorm2d)]
        fconvs = [m for m in fseq if isinstance(m, torch.nn.Conv2d)]
        for conv, bn, fconv in zip(convs, bns, fconvs):
            conv.weight.data.copy_(fconv.weight.data)
            bn.weight.data.fill_(1.0)
            bn.bias.data.copy_(fconv.bias.data)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    for up, fup in zip(model.up, fused.up):
        up.load_state_dict(fup.state_dict())
    model.head.load_state_dict(fused.head.state_dict())
    return model.eval()


def model_card(*, name: str, version: str, spec: ModelSpec, training: dict, metrics: dict,
               provenance: dict, parity_diffs: list[float], sources: list[dict], notes: str = "") -> str:
    """The model's README.md: what it is, what it was trained on, how well it does."""
    L = [f"# {name} {version}", "", spec.description or "", ""]
    L += ["## Contract", "",
          f"- {len(parity_diffs)} ensemble members (`member*.onnx`, opset {OPSET}): input `image` (N, C={spec.in_channels}, H, W),"
          f" output `logits` (N, 1, H, W); H, W multiples of {spec.size_multiple}; a slice is `vol_ras[:, :, k]`"
          " (H = left-right, W = posterior-anterior).",
          f"- in-plane spacing {spec.spacing_mm[0]:g} x {spec.spacing_mm[1]:g} mm, {spec.context_slices} neighbouring slices"
          f" per side, z-score normalisation after clipping to percentiles {list(spec.normalisation.clip_percentiles or [])};"
          f" sigmoid, threshold {spec.threshold:g}; flip TTA along axes {list(spec.tta_flip_axes)}.",
          "- ONNX/torch parity (max abs logit difference on random inputs): "
          + ", ".join(f"{d:.2e}" for d in parity_diffs) + ".", ""]
    net = training.get("config", {}).get("net", {})
    rows = [m for m in training.get("members", []) if "row" in m]
    nets = [m["net"] for m in training.get("members", []) if "net" in m]
    if not rows and len({json.dumps(n, sort_keys=True) for n in nets}) > 1:  # fine-tuned from such an ensemble
        rows = [{"row": f"member {i}", "config": {**training.get("config", {}), "net": n}, "parameters": "-"}
                for i, n in enumerate(nets)]
    if rows:  # members of different architectures (assembled from study rows)
        L += ["## Architecture", "", "2D U-Nets, BatchNorm folded into the convolutions, ReLU, max-pooling,"
              " transposed-convolution upsampling; one member each:", "",
              "| member | widths | convs at full resolution | loss | epochs | parameters |", "|---|---|---|---|---|---|"]
        L += [f"| {i} ({m['row']}) | {m['config']['net']['widths']} | {m['config']['net']['top_convs']} |"
              f" {m['config'].get('loss', 'dice_bce')} | {m['config']['epochs']} | {m['parameters']} |"
              for i, m in enumerate(rows)]
        L += [""]
    else:
        L += ["## Architecture", "", f"2D U-Net, widths {net.get('widths')}, {net.get('top_convs')} conv(s) per full-resolution block,"
          " BatchNorm folded into the convolutions, ReLU, max-pooling, transposed-convolution upsampling,"
          f" {training.get('parameters_per_member', '?')} parameters per member.", ""]
    L += ["## Training data", "", "Anatomical volumes with manual cord masks (turned into EPI-like images by the simulator),"
          " read at training time from `../shared/data` (never shipped):", "",
          "| source | image SHA-256 | mask SHA-256 | fold held out |", "|---|---|---|---|"]
    for s in sources:
        L.append(f"| `{s.get('image', s['name'])}` | `{s.get('sha256', '')}` | `{s.get('mask_sha256', '')}` | {s.get('fold', '')} |")
    L += ["", "## Simulation settings", "", "Drawn uniformly per simulated stack (see docs/simulation.md):", "",
          "| setting | value |", "|---|---|"]
    L += [f"| `{k}` | {v} |" for k, v in training.get("config", {}).get("sim", {}).items()]
    L += [""]
    cfg = {k: v for k, v in training.get("config", {}).items() if k not in ("sim", "net")}
    L += ["## Training", "", f"- command: `{training.get('command', '')}`",
          f"- configuration: `{json.dumps(cfg)}`",
          f"- device: {training.get('device', '')}; wall time {training.get('seconds', 0) / 60:.1f} min"
          f" ({training.get('notes', '')})", ""]
    L += ["## Validation", ""]
    for k, v in metrics.items():
        if isinstance(v, (int, float, str)):
            L.append(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}")
    real = metrics.get("real_epi", {})
    if real:
        full = real["full"]
        L += ["", f"Real EPI validation series ({real.get('series', '')}); prediction on the plain temporal mean,"
              " reference drawn on the motion-corrected mean; raw thresholded ensemble output, no postprocessing.", "",
              "| slice | Dice |", "|---|---|"]
        L += [f"| {k} | {d:.3f} |" for k, d in enumerate(full["dice_per_slice"])]
        L += ["", f"- Dice (volume) {full['dice']:.3f}; HD95 {full['hd95_mm']:.2f} mm; slices with cord detected"
              f" {full['slices_detected']}/{full['slices_with_cord']}",
              f"- cord {real.get('edge_mm')} mm from the FOV edge (each side, worst): Dice {real['crop_worst_dice']:.3f}"
              f" (drop {real['crop_drop']:.3f})",
              f"- FOV shifted by {real.get('shift_mm')} mm (each direction, worst): Dice {real['shift_worst_dice']:.3f}"
              f" (drop {real['shift_drop']:.3f})", ""]
    per_member = [h["history"][-1] for h in training.get("members", []) if h.get("history")]
    if per_member:
        L += ["Held-out simulated Dice per member (stacks simulated from the subjects that member never saw,"
              " mean per-patch Dice at 0.5 on the model grid): "
              + ", ".join(f"{r.get('heldout_sim_dice', float('nan')):.3f}" for r in per_member) + ".", ""]
    if notes:
        L += [notes.rstrip(), ""]
    L += ["## Provenance", "", "```json", json.dumps(provenance, indent=1), "```", ""]
    return "\n".join(L)
