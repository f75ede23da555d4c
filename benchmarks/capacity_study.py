#!/usr/bin/env python
"""The capacity and recipe study: which U-Net and training recipe the default model should use.

    python benchmarks/capacity_study.py [-data ../shared/data] [-o work_tmp/study]
        [-row NAME ...] [-n-sim 5000] [-precision bf16] [-runs 3] [-table docs/capacity_study.md]

Every row trains ONE member with the recipe of the default model (simulated stacks from
every train-source subject except the held-out ones, seed 0), changing one thing: widths
and depth, convolutions at full resolution, epochs, loss. One member per row keeps the
study affordable on a CPU and compares like with like; ``-assemble`` then builds a model
folder from the chosen rows' members, scored again with ``benchmarks/validation.py``. The
simulated training set is built once and cached.

For each row (z-follow postprocessing, the model's threshold 0.5):

* held-out simulated stacks (``training.validate.heldout_simulated``, 16 stacks of subjects
  no row trained on): Dice mean / worst, cord slices missed;
* the two real EPI series (``benchmarks/validation.py``'s ``REAL``): Dice and the worst slice;
* the whole command on the 128x128x24 phantom of ``benchmarks/engine_benchmark.py``, with
  the member repeated three times (the cost of a 3-member ensemble of that network):
  median wall seconds, the ratio to the process floor measured in the same turns, peak MiB.

Results are kept per row under ``-o`` (``ROW/result.json``), so an interrupted study resumes
and a finished row is not trained again. Prints the markdown table (and writes ``-table``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

# name -> changes to the default recipe (TrainConfig / NetConfig fields); "0.2.0 arch" is the baseline
ROWS = {
    "w8 top1 (0.2.0 net)": {},
    "w16 top2": {"widths": (16, 32, 48, 64), "top_convs": 2},
    "w16 top2 boundary": {"widths": (16, 32, 48, 64), "top_convs": 2, "loss": "dice_bce_boundary"},
    "w32 top2": {"widths": (32, 64, 96, 128), "top_convs": 2},
    "w16 top2 16ep": {"widths": (16, 32, 48, 64), "top_convs": 2, "epochs": 16},
    "w24 top2": {"widths": (24, 48, 72, 96), "top_convs": 2},
    "w8 top1 16ep": {"epochs": 16},
    "w32x5 top2": {"widths": (32, 64, 96, 128, 160), "top_convs": 2},
}


def _np():
    import numpy

    return numpy


def slug(name: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def row_config(base, changes: dict):
    from sct_deepseg_epi.training.net import NetConfig

    net = {k: changes[k] for k in ("widths", "top_convs") if k in changes}
    rest = {k: v for k, v in changes.items() if k not in net}
    return replace(base, net=replace(base.net if net == {} else NetConfig(**{**base.net.as_dict(), **net}), in_channels=1),
                   **rest)


def training_set(data: Path, cache: Path, cfg):
    """The simulated patches every row trains on (built once, cached as .npz)."""
    from sct_deepseg_epi.training.data import HELDOUT_GROUPS, build_set, load_sources
    from sct_deepseg_epi.training.fit import base_spec

    f = cache / f"trainset-{cfg.n_volumes}-seed{cfg.seed}.npz"
    if f.exists():
        z = _np().load(f)
        return z["x"], z["y"], json.loads(str(z["sources"]))
    sources, _ = load_sources(data, exclude_groups=HELDOUT_GROUPS)
    t0 = time.perf_counter()
    x, y, _ = build_set(sources, cfg.n_volumes, cfg.seed, base_spec(cfg), cfg.patch, cfg.sim, workers=cfg.workers)
    names = [s.name for s in sources]
    print(f"simulated {cfg.n_volumes} stacks from {len(sources)} sources -> {len(x)} patches "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    tmp = f.with_suffix(".tmp.npz")
    _np().savez(tmp, x=x, y=y, sources=json.dumps(names))
    os.replace(tmp, f)
    return x, y, names


def train_row(name: str, cfg, x, y, sources: list[str], folder: Path) -> dict:
    """Train one member, export it three times over (the ensemble's cost), return training facts."""
    import torch

    from sct_deepseg_epi import __version__
    from sct_deepseg_epi.training.export import write_model
    from sct_deepseg_epi.training.fit import base_spec, train_member
    from sct_deepseg_epi.training.net import count_parameters

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    model, hist = train_member(0, x, y, None, None, cfg)
    seconds = time.perf_counter() - t0
    spec = base_spec(cfg, slug(name), "0.0.0")
    training = {"config": cfg.as_dict(), "sources": sources, "history": hist, "seconds": round(seconds, 1),
                "device": f"cpu, {cfg.threads} threads", "notes": f"capacity study row {name!r}: one member, repeated 3x"}
    write_model([model] * 3, folder, spec, name=slug(name), version="0.0.0",
                description=f"capacity study row {name}", training=training, metrics={},
                provenance={"package_version": __version__, "torch": torch.__version__})
    return {"train_seconds": round(seconds, 1), "parameters": count_parameters(model),
            "final_loss": round(hist[-1]["loss"], 4)}


def accuracy(folder: Path, data: Path) -> dict:
    """Held-out simulated and real-EPI scores of a model folder (z-follow postprocessing)."""
    import validation as v

    images = [("real", n, str(data / i), str(data / r), None) for n, i, r in v.REAL]
    images += [("held-out", *h) for h in v.heldout_images(16, data)]
    rows = [r for r in v.evaluate(str(folder), images, threads=1) if r["post"] == "z-follow"]
    held = [r for r in rows if r["group"] == "held-out"]
    out = {"heldout_mean": float(_np().mean([r["dice"] for r in held])), "heldout_worst": float(min(r["dice"] for r in held)),
           "heldout_missed": int(sum(r["missed"] for r in held)),
           "heldout_cord_slices": int(sum(r["cord_slices"] for r in held))}
    for r in rows:
        if r["group"] == "real":
            out[r["image"]] = {"dice": r["dice"], "slice_dice": r["slice_dice"], "missed": r["missed"]}
            out[f"{r['image']} worst slice"] = r["worst_slice"]
    return out


def speed(folders: dict[str, Path], runs: int) -> dict[str, dict]:
    """Run :func:`timed` in a small fresh process (a forked child's peak RSS counts its parent's
    pages, and this one holds torch and the training set)."""
    import subprocess

    arg = json.dumps({k: str(v) for k, v in folders.items()})
    res = subprocess.run([sys.executable, __file__, "-speed-only", arg, "-runs", str(runs)],
                         check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(res.stdout)


def timed(folders: dict[str, Path], runs: int) -> dict[str, dict]:
    """Whole command on the 128x128x24 phantom per model folder, floor in the same turns."""
    import subprocess

    import engine_benchmark as eb

    exe = str(Path(sys.executable).with_name("sct_deepseg_epi"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import engine_benchmark as eb; "
                        "from pathlib import Path; eb.make_inputs(Path(sys.argv[2]), True, 2)", str(HERE), str(tmp)],
                       check=True)
        img = tmp / "vol_128x128x24.nii.gz"
        floor_py = tmp / "floor.py"
        floor_py.write_text(eb.FLOOR)
        times: dict[str, list] = {k: [] for k in ["floor", *folders]}
        for _ in range(runs):
            times["floor"].append(eb.run_once([sys.executable, str(floor_py), str(img), str(tmp / "f.nii.gz")]))
            for k, f in folders.items():
                times[k].append(eb.run_once([exe, "-i", str(img), "-o", str(tmp / "m.nii.gz"), "-model", str(f)]))
    floor = statistics.median(t[0] for t in times["floor"])
    return {k: {"seconds": statistics.median(t[0] for t in v), "floor_ratio": statistics.median(t[0] for t in v) / floor,
                "peak_mib": max(t[2] for t in v)} for k, v in times.items() if k != "floor"}


def assemble(rows: list[str], study: Path, data: Path, out: Path, *, name: str, version: str,
             notes: str, command: str) -> Path:
    """One model folder from the first member of several study rows (members may differ in
    width, depth and loss: the engine runs each member's own graph; the input contract must
    be the same). Each member keeps its row's training record; the sources are hashed here."""
    import shutil

    import torch

    from sct_deepseg_epi import __version__
    from sct_deepseg_epi.registry.manifest import SCHEMA_VERSION, load_manifest, spec_to_dict, write_manifest
    from sct_deepseg_epi.registry.store import sha256_file
    from sct_deepseg_epi.training.data import HELDOUT_GROUPS, discover
    from sct_deepseg_epi.training.export import model_card

    specs = [load_manifest(study / slug(r) / "model") for r in rows]
    contract = [spec_to_dict(sp)["backend"] for sp in specs]
    if any(c != contract[0] for c in contract):
        raise SystemExit("assemble: the rows' input contracts differ; they cannot share one ensemble")
    out.mkdir(parents=True, exist_ok=False)
    members, recs, diffs = [], [], []
    for i, (row, sp) in enumerate(zip(rows, specs)):
        f = out / f"member{i}.onnx"
        shutil.copyfile(sp.member_paths()[0], f)
        members.append({"file": f.name, "sha256": sha256_file(f), "size": f.stat().st_size})
        tr = sp.extra["training"]
        res = json.loads((study / slug(row) / "result.json").read_text())
        recs.append({"row": row, "config": tr["config"], "parameters": res["parameters"], "history": tr["history"],
                     "seconds": tr["seconds"], "study_scores": res["accuracy"], "train_sources": tr["sources"],
                     "heldout_sources": [], "fold": None})
        diffs.append(sp.extra["provenance"]["parity_max_abs_diff"])
    pairs = [p for p in discover(data) if p.group not in HELDOUT_GROUPS]
    src_rows = [{"name": p.name, "image": str(p.image.relative_to(data)), "sha256": p.sha256,
                 "mask_sha256": sha256_file(p.mask), "fold": "all"} for p in pairs]
    first = specs[0].extra["training"]
    training = {"command": command, "config": first["config"], "device": first["device"],
                "seconds": round(sum(r["seconds"] for r in recs), 1),
                "notes": "members are study rows (benchmarks/capacity_study.py), each trained once on every source",
                "sources": src_rows, "members": recs,
                "parameters_per_member": [r["parameters"] for r in recs], "init_model": None}
    provenance = {"package_version": __version__, "torch": torch.__version__,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parity_max_abs_diff": max(diffs)}
    d = spec_to_dict(specs[0])
    d.update(schema_version=SCHEMA_VERSION, name=name, version=version, members=members, training=training,
             metrics={"study_rows": {r["row"]: r["study_scores"] for r in recs}}, provenance=provenance,
             description=("Spinal cord segmentation for axial gradient-echo EPI (BOLD fMRI): ensemble of 2D U-Nets of "
                          "different widths and losses, trained on EPI simulated from anatomical T2*w/T2/MT/T1 volumes."))
    write_manifest(d, out)
    spec = load_manifest(out)
    (out / "README.md").write_text(model_card(name=name, version=version, spec=spec, training=training, metrics={},
                                              provenance=provenance, parity_diffs=diffs, sources=src_rows, notes=notes),
                                   encoding="utf-8")
    return out


def markdown(results: dict[str, dict]) -> str:
    lines = ["| row | parameters | train s (wall, 2 shared cores) | held-out Dice mean / worst, missed | sct-example Dice (worst slice) "
             "| brightlab-nw Dice (worst slice) | 128x128x24 s, x floor, peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a, s = r.get("accuracy", {}), r.get("speed", {})
        real = " | ".join(f"{a[k]['dice']:.3f} ({a[k + ' worst slice']:.3f})" if k in a else "-"
                          for k in ("sct-example-2014", "brightlab-nw (approx.)"))
        sp = f"{s['seconds']:.2f}, {s['floor_ratio']:.2f}x, {s['peak_mib']:.0f}" if s else "-"
        held = (f"{a['heldout_mean']:.3f} / {a['heldout_worst']:.3f}, {a['heldout_missed']} of {a['heldout_cord_slices']}"
                if a else "-")
        lines.append(f"| {name} | {r.get('parameters', '-')} | {r.get('train_seconds', '-')} | {held} | {real} | {sp} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("-o", default=str(REPO / "work_tmp" / "study"), help="study folder (cache, row models, results)")
    p.add_argument("-row", action="append", choices=list(ROWS), help="rows to run (default: all, in order)")
    p.add_argument("-reference", action="append", default=[],
                   help="also score an existing model (name[@version] or folder) in the same table")
    p.add_argument("-n-sim", type=int, default=5000)
    p.add_argument("-precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("-threads", type=int, default=2)
    p.add_argument("-runs", type=int, default=3, help="timed runs per row (0: no timing)")
    p.add_argument("-table", default=None, help="also write the markdown table here")
    p.add_argument("-assemble", action="append", choices=list(ROWS),
                   help="with -model-out: write a model folder whose members are these rows' members, then stop")
    p.add_argument("-model-out", default=None)
    p.add_argument("-name", default="seg_sc_epi")
    p.add_argument("-version", default="0.0.0")
    p.add_argument("-card-notes", default=None)
    p.add_argument("-speed-only", default=None, help=argparse.SUPPRESS)  # internal: JSON {row: folder}
    a = p.parse_args(argv)
    if a.assemble:
        notes = Path(a.card_notes).read_text(encoding="utf-8") if a.card_notes else ""
        cmd = "python benchmarks/capacity_study.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        print(assemble(a.assemble, Path(a.o), Path(a.data), Path(a.model_out), name=a.name, version=a.version,
                       notes=notes, command=cmd))
        return 0
    if a.speed_only:
        print(json.dumps(timed({k: Path(v) for k, v in json.loads(a.speed_only).items()}, a.runs)))
        return 0
    data, out = Path(a.data), Path(a.o)
    if not (data / "epi").is_dir():
        print(f"{data}: no shared data folder (epi/ missing); nothing to study", file=sys.stderr)
        return 2
    from sct_deepseg_epi.training.fit import TrainConfig

    out.mkdir(parents=True, exist_ok=True)
    base = TrainConfig(members=1, n_volumes=a.n_sim, precision=a.precision, threads=a.threads, workers=2)
    results: dict[str, dict] = {}
    x = y = sources = None
    for name in a.row or list(ROWS):
        folder = out / slug(name)
        rfile = folder / "result.json"
        if rfile.exists():
            results[name] = json.loads(rfile.read_text())
            continue
        if x is None:
            x, y, sources = training_set(data, out, base)
        cfg = row_config(base, ROWS[name])
        print(f"row {name}: training ({json.dumps(cfg.net.as_dict())}, loss {cfg.loss}, {cfg.epochs} epochs)",
              file=sys.stderr, flush=True)
        r = train_row(name, cfg, x, y, sources, folder / "model")
        r["accuracy"] = accuracy(folder / "model", data)
        r["config"] = ROWS[name]
        results[name] = r
        rfile.write_text(json.dumps(r, indent=1, default=list))
        print(markdown({name: r}).splitlines()[-1], file=sys.stderr, flush=True)
    for ref in a.reference:
        from sct_deepseg_epi.api import load_model

        spec = load_model(ref)
        results[f"{spec.ref} (shipped, {len(spec.member_paths())} members)"] = {
            "accuracy": accuracy(spec.directory, data), "folder": str(spec.directory)}
    if a.runs:
        folders = {k: Path(r.get("folder") or out / slug(k) / "model") for k, r in results.items()}
        for k, s in speed(folders, a.runs).items():
            results[k]["speed"] = s
    text = markdown(results)
    print(text)
    if a.table:
        Path(a.table).write_text(
            "# Capacity and recipe study\n\nOne member per row (module doc of `benchmarks/capacity_study.py`; "
            "discussion in `docs/training.md`); the speed column times each row's network as a 3-member ensemble, "
            "the shipped models as they are. Regenerated by\n\n    python benchmarks/capacity_study.py "
            + shlex.join(sys.argv[1:] if argv is None else argv) + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
