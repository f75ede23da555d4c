"""Training loop: simulated EPI patches -> an ensemble of small U-Nets (torch).

Ensemble = k-fold over subjects: member k never sees the subjects of fold k, whose
simulated stacks are its held-out validation set (so the simulated score is on unseen
anatomy). With fewer subject groups than members, every member sees all sources and
members differ by seed only. Everything is seeded: the simulated set is a pure function
of (seed, sample index) and each member's weights and batch order of (seed, member).

The real EPI series, when given, is scored after every epoch and at the end. It is a
yardstick only: nothing (no epoch, no threshold) is selected on it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .._optional import require
from ..registry.manifest import SCHEMA_VERSION, ModelSpec, spec_from_dict
from .data import build_set
from .net import NetConfig, UNet
from .simulate import SimConfig, Source

torch = require("torch")
log = logging.getLogger(__name__)


LOSSES = ("dice_bce", "dice_bce_boundary")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run (stored in the manifest's ``training`` section)."""

    members: int = 3
    n_volumes: int = 5000          # simulated stacks; each gives up to 2 training slices
    val_volumes: int = 240         # simulated stacks from held-out subjects, per member
    patch: int = 96
    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    spacing_mm: float = 1.0
    context_slices: int = 0
    net: NetConfig = NetConfig()
    sim: SimConfig = SimConfig()
    workers: int = 2
    threads: int = 2
    device: str = "cpu"
    freeze_bn: bool = False        # fine-tuning: keep BatchNorm statistics as they are
    loss: str = "dice_bce"         # or "dice_bce_boundary": BCE weighted up on the cord's edge
    precision: str = "fp32"        # or "bf16": autocast forward (weights, optimiser, export stay fp32)

    def __post_init__(self):
        if self.loss not in LOSSES or self.precision not in PRECISIONS:
            raise ValueError(f"loss must be one of {LOSSES} and precision one of {PRECISIONS}")

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("net", "sim", "workers", "threads", "device")}
        d["net"] = self.net.as_dict()
        d["sim"] = self.sim.as_dict()
        return d


def base_spec(cfg: TrainConfig, name: str = "model", version: str = "0.0.0") -> ModelSpec:
    """The input/output contract of the model being trained (members filled in at export)."""
    return spec_from_dict({
        "schema_version": SCHEMA_VERSION, "name": name, "version": version,
        "members": [{"file": "placeholder.onnx", "sha256": "0" * 64}],
        "backend": {"kind": "slices", "spacing_mm": [cfg.spacing_mm, cfg.spacing_mm],
                    "context_slices": cfg.context_slices, "size_multiple": 2 ** cfg.net.levels,
                    "normalisation": {"scheme": "zscore", "clip_percentiles": [0.5, 99.5]},
                    "activation": "sigmoid", "flip_axes": [0]},
        "postprocess": {"threshold": 0.5},
    }, where="training")


def fold_of_groups(groups: list[str], k: int) -> dict[str, int]:
    """Subject group -> fold, round-robin over the sorted unique groups (deterministic)."""
    uniq = sorted(set(groups))
    return {g: i % k for i, g in enumerate(uniq)}


def edge_weight(target, gain: float = 4.0):
    """1 + ``gain`` on pixels within one pixel of the cord's edge (where the soft target is
    neither 0 nor 1 or a 3x3 neighbourhood crosses it): the boundary is where Dice is lost
    on thick, blurred EPI slices, and where plain BCE is dominated by easy background."""
    f = torch.nn.functional
    hi = f.max_pool2d(target, 3, stride=1, padding=1)
    lo = -f.max_pool2d(-target, 3, stride=1, padding=1)
    return 1.0 + gain * ((hi - lo) > 0.05).float()


def loss_fn(logits, target, kind: str = "dice_bce"):
    """BCE (soft targets) + soft Dice over the batch; ``dice_bce_boundary`` weights the BCE by
    :func:`edge_weight` (normalised, so the term keeps its scale)."""
    logits = logits.float()
    if kind == "dice_bce_boundary":
        w = edge_weight(target)
        bce = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).sum() / w.sum()
    else:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def _dice_np(prob: np.ndarray, target: np.ndarray) -> float:
    """Mean per-patch Dice at 0.5 (patches with empty target and empty prediction count 1)."""
    p, t = prob >= 0.5, target >= 0.5
    inter = (p & t).reshape(len(p), -1).sum(1)
    s = p.reshape(len(p), -1).sum(1) + t.reshape(len(t), -1).sum(1)
    return float(np.mean(np.where(s > 0, 2 * inter / np.maximum(s, 1), 1.0)))


def torch_predictor(models: list, device: str = "cpu", batch: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """(N, C, H, W) -> mean sigmoid over ``models`` (eval mode), numpy in and out."""
    def predict(x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), 1) + x.shape[2:], np.float32)
        with torch.no_grad():
            for m in models:
                m.eval()
                for i in range(0, len(x), batch):
                    t = torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32)).to(device)
                    out[i:i + batch] += torch.sigmoid(m(t)).float().cpu().numpy()
        return out / len(models)
    return predict


@dataclass
class MemberResult:
    model: object
    fold: int | None
    train_sources: list[str]
    heldout_sources: list[str]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train_member(k: int, x: np.ndarray, y: np.ndarray, xv: np.ndarray | None, yv: np.ndarray | None,
                 cfg: TrainConfig, init: tuple[NetConfig, dict] | None = None,
                 real_val: Callable[[object], float] | None = None) -> tuple[object, list[dict]]:
    """Train one member on (x, y) float16/uint8 arrays; returns the model and per-epoch history."""
    torch.manual_seed(cfg.seed * 1000 + k)
    rng = np.random.default_rng([cfg.seed, 7, k])
    dev = torch.device(cfg.device)
    # a fine-tuned member keeps its own network (an ensemble's members may differ in width)
    model = UNet(init[0] if init is not None else NetConfig(**{**cfg.net.as_dict(), "widths": tuple(cfg.net.widths)}))
    if init is not None:
        model.load_state_dict(init[1])
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(x) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, min(200, total // 20))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    history = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        if cfg.freeze_bn:
            for mod in model.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.eval()
        order = torch.from_numpy(rng.permutation(len(x)))
        running = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb = xt[idx].to(dev, non_blocking=True).float()
            yb = yt[idx].to(dev, non_blocking=True).float() / 255.0
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = model(xb)
            loss = loss_fn(out, yb, cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        rec = {"epoch": epoch + 1, "loss": running / steps_per_epoch, "seconds": time.perf_counter() - t0}
        if xv is not None and len(xv):
            pv = torch_predictor([model], cfg.device)(xv.astype(np.float32))
            rec["heldout_sim_dice"] = _dice_np(pv, yv.astype(np.float32) / 255.0)
        if real_val is not None:
            rec["real_epi_dice"] = real_val(model)
        history.append(rec)
        log.info("member %d epoch %d/%d: %s", k, epoch + 1, cfg.epochs,
                 ", ".join(f"{a}={b:.4f}" if isinstance(b, float) else f"{a}={b}" for a, b in rec.items() if a != "epoch"))
    model.eval()
    return model.cpu(), history


def train_ensemble(sources: list[Source], cfg: TrainConfig, real_val: Callable[[object], float] | None = None,
                   init_states: list[tuple[NetConfig, dict]] | None = None) -> list[MemberResult]:
    """Simulate the training set once, then train ``cfg.members`` members (k-fold over subjects)."""
    torch.set_num_threads(cfg.threads)
    spec = base_spec(cfg)
    groups = [s.meta.get("group", s.name) for s in sources]
    n_groups = len(set(groups))
    use_folds = cfg.members > 1 and n_groups >= cfg.members
    fold = fold_of_groups(groups, cfg.members) if use_folds else {}
    t0 = time.perf_counter()
    x, y, sid = build_set(sources, cfg.n_volumes, cfg.seed, spec, cfg.patch, cfg.sim, workers=cfg.workers)
    log.info("simulated %d stacks -> %d patches in %.0f s", cfg.n_volumes, len(x), time.perf_counter() - t0)
    results = []
    for k in range(cfg.members):
        t1 = time.perf_counter()
        if use_folds:
            held = [i for i, g in enumerate(groups) if fold[g] == k]
            train = [i for i in range(len(sources)) if i not in held]
            keep = ~np.isin(sid, held)
            # held-out simulated set: fresh stacks from held-out subjects only, own seed
            xv, yv, _ = build_set([sources[i] for i in held], cfg.val_volumes, cfg.seed + 10_000 + k, spec,
                                  cfg.patch, cfg.sim, workers=cfg.workers)
        else:
            held, train = [], list(range(len(sources)))
            keep = np.ones(len(x), bool)
            xv, yv, _ = build_set(sources, cfg.val_volumes, cfg.seed + 10_000 + k, spec, cfg.patch, cfg.sim,
                                  workers=cfg.workers)
        init = init_states[k % len(init_states)] if init_states else None
        model, hist = train_member(k, x[keep], y[keep], xv, yv, cfg, init, real_val)
        results.append(MemberResult(model, k if use_folds else None, [sources[i].name for i in train],
                                    [sources[i].name for i in held], hist, time.perf_counter() - t1))
    return results
