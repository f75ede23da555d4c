"""PNG files and mosaics for the simulation docs (numpy + zlib only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_png(path: Path | str, img: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as an 8-bit PNG."""
    from ..qc_tiles import png_bytes

    a = np.asarray(img, dtype=np.uint8)
    Path(path).write_bytes(png_bytes(a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2)))


def to_display(slice_xy: np.ndarray, size: int = 128, mask: np.ndarray | None = None) -> np.ndarray:
    """A RAS slice (X, Y) -> radiological-style display (anterior up, patient left on the right), RGB uint8.

    ``mask`` (same shape) is drawn as a red outline.
    """
    from ..preprocess import resample_inplane

    a = np.asarray(slice_xy, dtype=np.float32)
    lo, hi = np.percentile(a, (1, 99.5))
    g = np.clip((a - lo) / (hi - lo if hi > lo else 1), 0, 1)
    scale = size / max(a.shape)
    shape = (max(1, int(round(a.shape[0] * scale))), max(1, int(round(a.shape[1] * scale))))
    g = resample_inplane(g[..., None], shape)[..., 0]
    rgb = np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mask is not None:
        m = resample_inplane(np.asarray(mask, np.float32)[..., None], shape)[..., 0] > 0.5
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = (255, 40, 40)
    # display: rows = anterior (top) to posterior, columns = patient right to left (radiological)
    return np.ascontiguousarray(np.transpose(rgb, (1, 0, 2))[::-1])


def mosaic(tiles: list[np.ndarray], cols: int, size: int = 128, pad: int = 2) -> np.ndarray:
    """Place RGB tiles (each at most size x size) on a black grid."""
    rows = (len(tiles) + cols - 1) // cols
    out = np.zeros((rows * (size + pad) + pad, cols * (size + pad) + pad, 3), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        y0, x0 = pad + r * (size + pad), pad + c * (size + pad)
        h, w = t.shape[:2]
        oy, ox = (size - h) // 2, (size - w) // 2
        out[y0 + oy:y0 + oy + h, x0 + ox:x0 + ox + w] = t
    return out


def doc_figures(data_dir: Path | str, out_dir: Path | str, model_dir: Path | str | None = None, size: int = 112) -> list[Path]:
    """The pictures of docs/simulation.md: the real EPI series, simulated samples, one artefact at a time."""
    from dataclasses import replace

    from ..read import read_volume
    from .data import load_sources
    from .simulate import SimConfig, simulate

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    epi = data_dir / "epi" / "sct-example-2014"
    vol, ref = read_volume(epi / "fmri.nii.gz"), read_volume(epi / "fmri_moco_mean_seg_modif.nii.gz")
    tiles = [to_display(vol.data[:, :, k], size, ref.data[:, :, k]) for k in range(vol.data.shape[2])]
    p = out_dir / "real_epi.png"
    write_png(p, mosaic(tiles, 5, size))
    written.append(p)

    sources, _ = load_sources(data_dir)
    tiles = []
    for i in range(15):
        rng = np.random.default_rng([2024, i])
        sim = simulate(sources[i % len(sources)], rng)
        k = int(rng.integers(0, sim.image.shape[2]))
        tiles.append(to_display(sim.image[:, :, k], size, sim.mask[:, :, k]))
    p = out_dir / "simulated.png"
    write_png(p, mosaic(tiles, 5, size))
    written.append(p)

    # one artefact at a time on the same slice of one T2*w source (outline = simulated mask)
    src = next(s for s in sources if "T2starw" in s.name)
    quiet = replace(SimConfig(), inplane_mm=(1.0, 1.0), thickness_mm=(5.0, 5.0), gap_fraction=(0, 0), n_slices=(1, 1),
                    fov_mm=(90, 90), edge_prob=0.0, rotation_deg=0.0, flip_lr_prob=0.0, pe_ap_prob=1.0,
                    distortion_mm=(0, 0), ghost_phase_rad=(0, 0), t2star_decay=(0, 0), dropout_prob=0.0,
                    bias_strength=(0, 0), slice_gain=0.0, snr=(1000, 1000), gamma=(1, 1), cord_contrast=(1, 1))
    steps = [("clean", {}), ("2.5 mm in-plane", {"inplane_mm": (2.5, 2.5)}),
             ("N/2 ghost", {"ghost_phase_rad": (0.6, 0.6)}), ("distortion + pile-up", {"distortion_mm": (4.0, 4.0)}),
             ("dropout", {"dropout_prob": 1.0, "dropout_depth": (0.9, 0.9)}), ("T2* blur (PE)", {"t2star_decay": (1.5, 1.5)}),
             ("bias field", {"bias_strength": (0.7, 0.7)}), ("SNR 5 (Rician)", {"snr": (5.0, 5.0)}),
             ("edge of FOV", {"edge_prob": 1.0, "edge_mm": (4.0, 4.0)}), ("all, random", None)]
    tiles = []
    for _, change in steps:
        cfg = SimConfig() if change is None else replace(quiet, **change)
        sim = simulate(src, np.random.default_rng(3), cfg)
        tiles.append(to_display(sim.image[:, :, 0], size, sim.mask[:, :, 0]))
    p = out_dir / "artefacts.png"
    write_png(p, mosaic(tiles, 5, size))
    written.append(p)
    return written


if __name__ == "__main__":  # python -m sct_deepseg_epi.training.figures ../shared/data docs/img
    import sys

    for f in doc_figures(sys.argv[1], sys.argv[2]):
        print(f, f.stat().st_size)
