"""Training data: labelled image/mask pairs from a manifest or a BIDS folder, and training patches.

Pairs are found by name: a label is a NIfTI whose name has a ``_seg`` or ``_mask`` part
(``sub-01_T2starw_seg-manual.nii.gz``, ``t2s_seg.nii.gz``); grey-matter labels
(``_gmseg``) are skipped. Its image is the NIfTI in the same collection whose name,
without the suffix, is the longest prefix of the label's name. In BIDS the label may
sit under ``derivatives/labels`` while the image is in the raw tree; names still match.

numpy only: the patches made here are what :mod:`.fit` feeds the network, built with the
engine's own :func:`~sct_deepseg_epi.preprocess.prepare`, so training and inference see
the same inputs.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..preprocess import prepare, resample_inplane
from ..read import has_nifti_suffix, read_volume, strip_nifti_suffix
from ..registry.manifest import ModelSpec
from ..registry.store import sha256_file
from .simulate import SimConfig, Simulated, Source, scale_intensity, simulate

# Subjects of ../shared/data kept out of training from model 0.2.0 on: the held-out simulated
# set (validate.heldout_simulated) is drawn from them only. Two sct-errsm subjects that no
# model has seen: errsm_18 (sagittal T2w + axial GRE from the cervicomedullary junction) and
# errsm_21 (sagittal T2w, brainstem to upper thoracic cord).
HELDOUT_GROUPS = ("errsm_18", "errsm_21")

_LABEL_RE = re.compile(r"_(seg|mask)(?=[-_.]|$)", re.IGNORECASE)
_SKIP_RE = re.compile(r"(gmseg|_gm[-_.]|_wm[-_.]|lesion)", re.IGNORECASE)
_EPI_RE = re.compile(r"(bold|epi|fmri)", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    """A labelled volume: image path, mask path, a group (subject) for folds, and whether it is EPI."""

    image: Path
    mask: Path
    group: str
    role: str = "train-source"
    sha256: str = ""

    @property
    def name(self) -> str:
        return Path(strip_nifti_suffix(self.image)).name


def is_label(path: Path | str) -> bool:
    name = Path(path).name
    return bool(_LABEL_RE.search(name)) and not _SKIP_RE.search(name)


_SUBJECT_DIR_RE = re.compile(r"^[A-Za-z]+_\d+$")  # a subject folder without BIDS names, e.g. errsm_18


def _subject(path: Path) -> str:
    """The subject a file belongs to (one fold group): BIDS ``sub-X`` (sessions merged), else a
    ``name_NN`` subject folder (all its contrasts together), else the file itself."""
    m = re.search(r"sub-([A-Za-z0-9]+?)(?:Ses\d+)?(?=[_/.]|$)", path.name)
    if m:
        return "sub-" + m.group(1)
    if _SUBJECT_DIR_RE.match(path.parent.name):
        return path.parent.name
    return f"{path.parent.name}/{Path(strip_nifti_suffix(path)).name}"


def _shared_folders(a: Path, b: Path) -> int:
    """How many innermost folder names two paths share (BIDS derivatives mirror the raw tree)."""
    n = 0
    for x, y in zip(reversed(a.parent.parts), reversed(b.parent.parts)):
        if x != y:
            break
        n += 1
    return n


def pair_files(files: list[Path], roles: dict[Path, str] | None = None,
               sums: dict[Path, str] | None = None) -> list[Pair]:
    """Match each label file to its image (longest name prefix); sorted, deterministic."""
    labels = sorted(f for f in files if is_label(f))
    images = [f for f in files if not _LABEL_RE.search(f.name) and not _SKIP_RE.search(f.name)]
    stems = {f: Path(strip_nifti_suffix(f)).name for f in images}
    pairs = []
    for lab in labels:
        lstem = Path(strip_nifti_suffix(lab)).name
        cands = [f for f in images if lstem.startswith(stems[f] + "_")]
        if not cands:
            continue
        # the longest prefix wins; then the image whose folders match the label's (same subject
        # folder: errsm_18/t2_seg-manual goes with errsm_18/t2, not another subject's t2); then
        # the shortest path (raw tree before derivatives)
        img = sorted(cands, key=lambda f: (-len(stems[f]), -_shared_folders(f, lab), len(str(f)), str(f)))[0]
        role = (roles or {}).get(img, "train-source")
        pairs.append(Pair(img, lab, _subject(img), role, (sums or {}).get(img, "")))
    return pairs


def unique_names(pairs: list[Pair]) -> list[str]:
    """Source names: the image's stem, prefixed by its folder where stems repeat or the folder
    is a subject (``errsm_18/t2``, ``sct-testing/t2``)."""
    stems = [p.name for p in pairs]
    return [f"{p.image.parent.name}/{n}" if stems.count(n) > 1 or _SUBJECT_DIR_RE.match(p.image.parent.name) else n
            for p, n in zip(pairs, stems)]


def discover(source: Path | str, roles: tuple[str, ...] = ("train-source",)) -> list[Pair]:
    """Pairs from a folder (BIDS or any tree of NIfTIs) or a MANIFEST.tsv (``path`` + ``role`` columns)."""
    src = Path(source)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if src.is_dir() and (src / "MANIFEST.tsv").is_file():
        src = src / "MANIFEST.tsv"
    if src.is_file():
        root = src.parent
        try:
            with open(src, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{src}: not a readable TSV manifest ({exc})") from None
        if not rows or "path" not in rows[0]:
            raise InputError(f"{src}: a manifest needs a 'path' column (and optionally 'role', 'sha256')")
        files = [root / r["path"] for r in rows]
        role_of = {root / r["path"]: r.get("role") or "train-source" for r in rows}
        sums = {root / r["path"]: r.get("sha256") or "" for r in rows}
        pairs = [p for p in pair_files(files, role_of, sums) if p.role in roles]
    else:
        files = sorted(p for p in src.rglob("*") if p.is_file() and has_nifti_suffix(p))
        pairs = pair_files(files)
    if not pairs:
        raise InputError(f"{source}: no image/label pairs found (labels are named *_seg* or *_mask*)")
    return pairs


def load_source(pair: Pair, name: str | None = None) -> Source:
    """Read a pair into RAS arrays (the temporal mean for 4D EPI); the mask must share the grid.

    Orientation comes from the affine (:func:`~sct_deepseg_epi.read.read_volume`), so a
    sagittal volume (PSR, say) is resliced axially by the lossless reorientation to RAS.
    Float masks (0/1 stored as float) are binarised at 0.5.
    """
    img = read_volume(pair.image)
    msk = read_volume(pair.mask)
    if msk.data.shape != img.data.shape:
        raise InputError(f"{pair.mask}: the mask does not share the grid of {pair.image}")
    is_epi = img.is_4d or bool(_EPI_RE.search(pair.image.name))
    return Source(name or pair.name, scale_intensity(img.data), (msk.data > 0.5).astype(np.float32), img.zooms,
                  {"scaled": True, "epi": is_epi, "group": pair.group, "image": str(pair.image), "mask": str(pair.mask)})


def epi_light_config(src: Source, base: SimConfig) -> SimConfig:
    """Augmentation for sources that already are EPI: keep their resolution, add little artefact."""
    r = float(np.mean(src.zooms[:2]))
    return SimConfig(**{**base.__dict__, "inplane_mm": (r, r), "thickness_mm": (src.zooms[2], src.zooms[2]),
                        "gap_fraction": (0.0, 0.0), "distortion_mm": (0.0, 1.0), "ghost_phase_rad": (0.0, 0.1),
                        "t2star_decay": (0.0, 0.2), "dropout_prob": 0.1, "snr": (40.0, 200.0), "gamma": (0.8, 1.25),
                        # real EPI already has its own ends, coil fall-off and contrast
                        "top_prob": 0.0, "end_pv_prob": 0.0, "weak_contrast_prob": 0.0, "z_falloff_prob": 0.0})


# ---------------------------------------------------------------- network inputs
def prepared_pair(sim: Simulated, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """Simulated stack -> (inputs (Z, C, H, W), targets (Z, 1, H, W)) exactly as the engine prepares images."""
    prep = prepare(sim.image, sim.zooms, spec)
    m = resample_inplane(sim.mask, prep.model_xy)
    m = np.pad(m, (prep.pad[0], prep.pad[1], (0, 0)), mode="constant")
    return prep.batch, np.moveaxis(m, 2, 0)[:, None].astype(np.float32)


def crop_patch(x: np.ndarray, y: np.ndarray, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (C, H, W) / (1, H, W) slice -> a patch x patch window holding the cord (padding with x.min())."""
    c, h, w = x.shape
    fill = float(x.min())
    ph, pw = max(0, patch - h), max(0, patch - w)
    if ph or pw:
        a, b = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
        x = np.pad(x, ((0, 0), (a, ph - a), (b, pw - b)), constant_values=fill)
        y = np.pad(y, ((0, 0), (a, ph - a), (b, pw - b)))
        h, w = x.shape[1:]
    cord = np.argwhere(y[0] > 0.5)
    if len(cord):
        ci, cj = cord.mean(axis=0)
        m = 6
        lo_i = int(np.clip(ci - patch + m, 0, h - patch)); hi_i = int(np.clip(ci - m, 0, h - patch))
        lo_j = int(np.clip(cj - patch + m, 0, w - patch)); hi_j = int(np.clip(cj - m, 0, w - patch))
        i0 = int(rng.integers(min(lo_i, hi_i), max(lo_i, hi_i) + 1))
        j0 = int(rng.integers(min(lo_j, hi_j), max(lo_j, hi_j) + 1))
    else:
        i0, j0 = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
    return x[:, i0:i0 + patch, j0:j0 + patch], y[:, i0:i0 + patch, j0:j0 + patch]


def make_samples(sources: list[Source], index: int, seed: int, spec: ModelSpec, patch: int,
                 cfg: SimConfig = SimConfig(), per_volume: int = 2) -> tuple[np.ndarray, np.ndarray, int]:
    """Simulated sample ``index`` (deterministic in ``seed`` and ``index``): up to ``per_volume`` patches.

    Returns inputs (k, C, P, P) float32, targets (k, 1, P, P) float32 and the source index.
    """
    rng = np.random.default_rng([seed, index])
    si = int(rng.integers(0, len(sources)))
    src = sources[si]
    scfg = epi_light_config(src, cfg) if src.meta.get("epi") else cfg
    sim = simulate(src, rng, scfg)
    xb, yb = prepared_pair(sim, spec)
    order = rng.permutation(len(xb))[:per_volume]
    xs, ys = zip(*(crop_patch(xb[k], yb[k], patch, rng) for k in order))
    return np.stack(xs), np.stack(ys), si


_JOB: dict = {}  # what forked workers read (sources are large: never pickled per task)


def _worker(index: int):
    j = _JOB
    return make_samples(j["sources"], index, j["seed"], j["spec"], j["patch"], j["cfg"], j["per_volume"])


def build_set(sources: list[Source], n_volumes: int, seed: int, spec: ModelSpec, patch: int,
              cfg: SimConfig = SimConfig(), per_volume: int = 2, workers: int = 1):
    """Simulate ``n_volumes`` stacks -> inputs (N, C, P, P) float16, targets (N, 1, P, P) uint8 (x255), source ids.

    Sample i depends only on (seed, i), so the set is the same for any number of workers.
    """
    _JOB.update(sources=sources, seed=seed, spec=spec, patch=patch, cfg=cfg, per_volume=per_volume)
    try:
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as pool:
                results = pool.map(_worker, range(n_volumes), chunksize=8)
        else:
            results = [_worker(i) for i in range(n_volumes)]
    finally:
        _JOB.clear()
    x = np.concatenate([r[0] for r in results]).astype(np.float16)
    y = np.round(np.concatenate([r[1] for r in results]) * 255).astype(np.uint8)
    sid = np.concatenate([np.full(len(r[0]), r[2], np.int16) for r in results])
    return x, y, sid


def save_sources(sources: list[Source], path: Path | str) -> None:
    """Pack loaded sources (RAS arrays, masks, zooms, provenance) into one compressed .npz cache."""
    import json

    arrays = {}
    meta = []
    for i, s in enumerate(sources):
        arrays[f"image{i}"] = s.image.astype(np.float32)
        arrays[f"mask{i}"] = s.mask.astype(np.uint8)
        meta.append({"name": s.name, "zooms": list(s.zooms), "meta": s.meta})
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)


def load_sources_npz(path: Path | str) -> list[Source]:
    """Inverse of :func:`save_sources`."""
    import json

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return [Source(m["name"], z[f"image{i}"], z[f"mask{i}"].astype(np.float32), tuple(m["zooms"]), m["meta"])
                for i, m in enumerate(meta)]


def load_sources(data: Path | str, roles: tuple[str, ...] = ("train-source",),
                 exclude_groups: tuple[str, ...] = ()) -> tuple[list[Source], list[Pair]]:
    """Sources from a folder / manifest (see :func:`discover`) or a packed ``.npz`` cache.

    ``exclude_groups`` drops whole subjects (e.g. those kept for a held-out simulated set).
    """
    if str(data).endswith(".npz"):
        return [s for s in load_sources_npz(data) if s.meta.get("group") not in exclude_groups], []
    pairs = discover(data, roles)
    names = unique_names(pairs)
    keep = [i for i, p in enumerate(pairs) if p.group not in exclude_groups]
    pairs, names = [pairs[i] for i in keep], [names[i] for i in keep]
    sources = []
    for p, n in zip(pairs, names):
        s = load_source(p, n)
        s.meta["sha256"] = p.sha256 or sha256_file(p.image)
        s.meta["mask_sha256"] = sha256_file(p.mask)
        sources.append(s)
    return sources, pairs
