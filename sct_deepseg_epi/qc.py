"""Quality-control reports for a segmentation.

Inside the Spinal Cord Toolbox (``spinalcordtoolbox`` importable), :func:`report` adds an
entry to SCT's own QC report (``FOLDER/index.html``), next to the entries of SCT's other
steps. Standalone it writes one self-contained HTML page per dataset (``FOLDER/DATASET.html``:
no scripts, no external files, images inline as PNG) with one section per segmented image:

- an axial mosaic of every slice, cropped around the cord: the image with the mask outline,
  and under it the ensemble disagreement (the spread of the members' probabilities);
  one mosaic per volume for a 4D mask (``-4d each``), up to :data:`MAX_VOLUMES`;
- the cord area per slice (table and bar chart), and which slices have no cord.

Running it again for the same image replaces that image's section. PNGs are written with
numpy and zlib, so the report needs no plotting library.
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation

from .errors import InputError
from .prompts import sidecar_points
from .read import load_nifti, read_volume, strip_nifti_suffix
from .write import atomic_path, like, save_nifti, sidecar_path

CROP_MM = 32.0        # width of each slice's crop around the cord
PIXELS_PER_MM = 4.0   # display scale (nearest neighbour: each voxel stays a visible block)
MAX_VOLUMES = 8       # mosaics shown for a 4D mask (evenly spaced volumes)
DISAGREEMENT_FULL = 0.25  # std of member probabilities shown at full colour
ENTRIES = ".sct_deepseg_epi_qc"

# --- PNG ----------------------------------------------------------------------------------------

def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as a PNG (8-bit RGB, no filter) with zlib."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# --- images -------------------------------------------------------------------------------------

def _window(tile: np.ndarray) -> np.ndarray:
    """Grey levels 0..1 between the 1st and 99th percentiles of the tile."""
    lo, hi = np.percentile(tile, [1, 99]) if tile.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((tile - lo) / (hi - lo), 0, 1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask that touch a pixel outside it (4-neighbourhood)."""
    m = mask.astype(bool)
    p = np.pad(m, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def _crop(a: np.ndarray, cx: int, cy: int, hx: int, hy: int) -> np.ndarray:
    """``a[cx-hx:cx+hx+1, cy-hy:cy+hy+1]``, padded with zeros outside the image."""
    p = np.pad(a, ((hx, hx), (hy, hy)))
    return p[cx:cx + 2 * hx + 1, cy:cy + 2 * hy + 1]


def _display(a: np.ndarray, fx: int, fy: int) -> np.ndarray:
    """RAS (x, y) -> screen rows/columns: anterior up, patient's right on the left; upscaled."""
    return np.repeat(np.repeat(a[::-1, ::-1].T, fy, axis=0), fx, axis=1)


PROMPT_COLOURS = {1: (0.2, 1.0, 0.3), 2: (1.0, 0.3, 1.0)}  # a point on the cord: green; not cord: magenta


def _mark(top: np.ndarray, ix: int, iy: int, shape: tuple[int, int], fx: int, fy: int, colour) -> None:
    """A cross on the display tile at crop voxel (ix, iy) (as :func:`_display` places it)."""
    if not (0 <= ix < shape[0] and 0 <= iy < shape[1]):
        return
    r = (shape[1] - 1 - iy) * fy + fy // 2
    c = (shape[0] - 1 - ix) * fx + fx // 2
    arm = 2 * max(fx, fy)
    top[max(0, r - arm):r + arm + 1, max(0, c - 1):c + 2] = colour
    top[max(0, r - 1):r + 2, max(0, c - arm):c + arm + 1] = colour


def slice_tile(image: np.ndarray, mask: np.ndarray, disagreement: np.ndarray | None, centre: tuple[float, float],
               zooms: tuple[float, float], points: Sequence[tuple[int, int, int]] = ()) -> np.ndarray:
    """One axial slice (RAS x, y) as an RGB tile: image + red mask outline, and under it the disagreement.

    ``points``: prompts on this slice, (x, y, value), drawn as crosses (:data:`PROMPT_COLOURS`)."""
    hx = int(np.ceil(CROP_MM / 2 / zooms[0]))
    hy = int(np.ceil(CROP_MM / 2 / zooms[1]))
    fx = max(1, int(round(PIXELS_PER_MM * zooms[0])))
    fy = max(1, int(round(PIXELS_PER_MM * zooms[1])))
    cx, cy = int(round(centre[0])), int(round(centre[1]))
    img = _display(_crop(image, cx, cy, hx, hy), fx, fy)
    m = _display(_crop(mask, cx, cy, hx, hy), fx, fy) > 0
    grey = _window(img)
    top = np.repeat(grey[..., None], 3, axis=2)
    top[_outline(m)] = (1.0, 0.15, 0.15)
    for x, y, value in points:
        _mark(top, x - cx + hx, y - cy + hy, (2 * hx + 1, 2 * hy + 1), fx, fy, PROMPT_COLOURS.get(value, (1, 1, 1)))
    rows = [top]
    if disagreement is not None:
        d = np.clip(_display(_crop(disagreement, cx, cy, hx, hy), fx, fy) / DISAGREEMENT_FULL, 0, 1)[..., None]
        heat = np.concatenate([np.ones_like(d), 0.85 * (1 - d) + 0.1, 0.1 * (1 - d)], axis=2)  # yellow -> red
        alpha = np.clip(d * 1.5, 0, 0.9)
        bottom = (1 - alpha) * (0.6 * np.repeat(grey[..., None], 3, axis=2)) + alpha * heat
        bottom[_outline(m)] = (0.3, 0.8, 1.0)
        rows += [np.ones((3, top.shape[1], 3)), bottom]
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


# --- the entry for one image --------------------------------------------------------------------

@dataclass
class _Ras:
    """Reorients arrays on the input's grid like the input's Volume (to RAS)."""

    to_ras: np.ndarray

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        return apply_orientation(np.asarray(arr), self.to_ras)


def _as_image(x) -> nib.Nifti1Image:
    return x if isinstance(x, nib.spatialimages.SpatialImage) else load_nifti(x)


def _volume_entries(frames, masks, disagreements, zooms, marks: dict[int, list[dict]] | None = None) -> list[dict]:
    from .handoff import cord_centreline

    volumes = []
    for (label, image), mask, dis in zip(frames, masks, disagreements):
        nz = mask.shape[2]
        found = mask.reshape(-1, nz).any(axis=0)
        if found.any():
            centres, _ = cord_centreline(mask, axis=2)
        else:
            centres = np.tile([[mask.shape[0] / 2, mask.shape[1] / 2]], (nz, 1))
        area = mask.reshape(-1, nz).sum(axis=0) * zooms[0] * zooms[1]
        slices = []
        for z in range(nz):
            here = (marks or {}).get(z, [])
            tile = slice_tile(image[..., z], mask[..., z], None if dis is None else dis[..., z], tuple(centres[z]),
                              zooms[:2], [(p["x"], p["y"], p["value"]) for p in here])
            slices.append({"z": z, "area_mm2": round(float(area[z]), 2), "cord": bool(found[z]),
                           "png": base64.b64encode(png_bytes(tile)).decode("ascii"), "prompts": here})
        volumes.append({"label": label, "slices": slices,
                        "mean_disagreement": None if dis is None or not mask.any()
                        else round(float(dis[mask > 0].mean()), 4)})
    return volumes


def build_entry(image: str | Path, mask, disagreement=None, *, dataset: str | None = None,
                subject: str | None = None, command: Sequence[str] | None = None) -> dict:
    """Everything the report shows for one segmented image, as a JSON-able dict."""
    image = Path(image)
    vol = read_volume(image)
    mask_img = _as_image(mask)
    if mask_img.shape[:3] != vol.image.shape[:3]:
        raise InputError(f"QC: the mask {mask_img.shape[:3]} is not on the grid of {image} {vol.image.shape[:3]}")
    dis_img = None if disagreement is None else _as_image(disagreement)
    ras = _Ras(vol.to_ras)
    mask_data = np.asarray(mask_img.dataobj) > 0
    dis_data = None if dis_img is None else np.asarray(dis_img.dataobj, dtype=np.float32)
    n_t = mask_data.shape[3] if mask_data.ndim == 4 else 1
    if n_t == 1:
        frames = [("temporal mean" if vol.is_4d else "volume", vol.data)]
        masks = [ras(mask_data.reshape(mask_data.shape[:3]))]
        diss = [None if dis_data is None else ras(dis_data.reshape(dis_data.shape[:3]))]
        shown = [0]
    else:
        shown = sorted(set(np.linspace(0, n_t - 1, min(n_t, MAX_VOLUMES)).round().astype(int).tolist()))
        data = {t: f for t, f in enumerate(vol.iter_frames()) if t in shown}
        frames = [(f"volume {t}", data[t]) for t in shown]
        masks = [ras(mask_data[..., t]) for t in shown]
        diss = [None if dis_data is None else ras(dis_data[..., t] if dis_data.ndim == 4 else dis_data) for t in shown]
    sidecar = sidecar_path(mask) if isinstance(mask, (str, Path)) else None
    model, side = None, {}
    if sidecar is not None and sidecar.is_file():
        try:
            side = json.loads(sidecar.read_text())
            model = f"{side['model']['name']}@{side['model']['version']}"
        except (ValueError, KeyError, TypeError):
            model = None
    marks = sidecar_points(side, vol)
    volumes = _volume_entries(frames, masks, diss, vol.zooms, marks)
    per_volume = [ras(mask_data[..., t]) for t in range(n_t)] if n_t > 1 else masks
    with_cord = [int(m.reshape(-1, m.shape[2]).any(axis=0).sum()) for m in per_volume]
    n_slices = per_volume[0].shape[2]
    flags = _flags_by_z(side, vol, n_slices)
    for v in volumes:
        for sl in v["slices"]:
            sl["flag"] = flags.get(sl["z"])
    resolved = image.resolve()
    return {
        "key": f"{subject or resolved.parent.parent.name}/{image.name}",
        "dataset": dataset or resolved.parent.parent.parent.name or "dataset",
        "subject": subject or resolved.parent.parent.name or "subject",
        "input": str(image),
        "mask": str(mask) if isinstance(mask, (str, Path)) else "(in memory)",
        "model": model,
        "command": " ".join(command) if command else None,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "voxel_mm": [round(float(z), 3) for z in vol.zooms],
        "n_slices": n_slices,
        "n_volumes": n_t,
        "volumes_shown": shown,
        "slices_with_cord": with_cord,
        "cord_volume_mm3": round(float(np.mean([m.sum() for m in per_volume]) * np.prod(vol.zooms)), 1),
        "flagged": sorted(flags),
        "prompted": sorted(marks),
        "volumes": volumes,
    }


def _flags_by_z(side: dict, vol, n_slices: int) -> dict[int, dict]:
    """The sidecar's flagged slices keyed by RAS z (the page's order): {z: {"slice", "reasons"}}."""
    from .confidence import slice_axis

    rows = side.get("slices") if isinstance(side, dict) else None
    if not isinstance(rows, list) or len(rows) != n_slices:
        return {}
    reverse = slice_axis(vol.to_ras)[1]
    out = {}
    for r in rows:
        if isinstance(r, dict) and r.get("flag"):
            k = int(r["slice"])
            out[n_slices - 1 - k if reverse else k] = {"slice": k, "reasons": list(r.get("reasons", []))}
    return out


# --- the standalone page ------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;background:#111;color:#ddd}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 6px;border-top:1px solid #444;padding-top:14px}
h3{font-size:14px;margin:14px 0 6px;color:#aaa} a{color:#7cf} .meta{color:#999;font-size:13px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #444;padding:3px 7px;text-align:right}
th{background:#222} td.l,th.l{text-align:left} .warn{color:#fb4} .ok{color:#7d7}
.mosaic{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;text-align:center;font-size:12px}
figure img{display:block;image-rendering:pixelated;border:2px solid #3a3} figure.nocord img{border-color:#a33}
figure.flag img{border:3px dashed #fb4} figure.flag figcaption{color:#fb4}
figure.prompt img{border:3px solid #3d5} figure.prompt figcaption{color:#3d5}
.legend{font-size:12px;color:#aaa;margin:4px 0} .sw{display:inline-block;width:10px;height:10px;margin:0 3px 0 10px}
svg text{fill:#aaa;font-size:10px}
"""


def _area_chart(areas: list[float]) -> str:
    w, h, top = 22, 80, max(max(areas), 1e-6)
    bars = []
    for i, a in enumerate(areas):
        bh = h * a / top
        colour = "#5a5" if a > 0 else "#a33"
        bars.append(f'<rect x="{i * w + 2}" y="{h - bh + 4:.1f}" width="{w - 4}" height="{max(bh, 1):.1f}" fill="{colour}"/>'
                    f'<text x="{i * w + w / 2}" y="{h + 16}" text-anchor="middle">{i}</text>')
    return (f'<svg width="{len(areas) * w + 4}" height="{h + 22}" role="img" aria-label="cord area per slice">'
            + "".join(bars) + "</svg>")


def _entry_html(e: dict, anchor: str) -> str:
    esc = html.escape
    gaps = [i for i, n in enumerate(e["slices_with_cord"]) if n < e["n_slices"]]
    status = ('<span class="ok">cord in every slice</span>' if not gaps else
              f'<span class="warn">slices without cord in {len(gaps)} of {e["n_volumes"]} volume(s)</span>')
    if max(e["slices_with_cord"]) == 0:
        status = '<span class="warn">no cord found</span>'
    if e.get("flagged"):
        status += (f' &middot; <span class="warn">{len(e["flagged"])} slice(s) to check first: z='
                   + ", ".join(map(str, e["flagged"])) + "</span>")
    out = [f'<h2 id="{anchor}">{esc(e["subject"])} &middot; {esc(Path(e["input"]).name)}</h2>',
           f'<div class="meta">mask {esc(e["mask"])}' + (f' &middot; model {esc(e["model"])}' if e["model"] else "")
           + f' &middot; {esc(e["date"])}<br>voxel {" x ".join(map(str, e["voxel_mm"]))} mm &middot; '
           f'{e["n_slices"]} slices &middot; {e["n_volumes"]} volume(s) &middot; cord volume {e["cord_volume_mm3"]} mm&sup3; '
           f'&middot; {status}'
           + (f'<br>command: <code>{esc(e["command"])}</code>' if e["command"] else "") + "</div>"]
    for v in e["volumes"]:
        areas = [s["area_mm2"] for s in v["slices"]]
        n_cord = sum(s["cord"] for s in v["slices"])
        dis = "" if v["mean_disagreement"] is None else f' &middot; mean disagreement in the mask {v["mean_disagreement"]}'
        out.append(f'<h3>{esc(v["label"])}: cord in {n_cord} of {len(areas)} slices{dis}</h3>')
        out.append('<div class="legend">each slice: the image with the mask outline (red); under it, the ensemble '
                   'disagreement from <span class="sw" style="background:#fd2"></span>low to <span class="sw" '
                   'style="background:#f31"></span>high, with the outline in blue. Anterior up, patient\'s right on '
                   'the left; a red frame marks a slice without cord, a dashed orange frame a slice to check '
                   '(reasons under it; the mask\'s sidecar lists them per slice), a green frame a slice corrected by '
                   'points (-prompt: a green cross on the cord, a magenta one on what is not cord).</div>'
                   '<div class="mosaic">')
        for s in v["slices"]:
            flag = s.get("flag")
            cls = ' class="flag"' if flag else "" if s["cord"] else ' class="nocord"'
            cap = f'z={s["z"]} &middot; {s["area_mm2"]:g} mm&sup2;' if s["cord"] else f'z={s["z"]} &middot; no cord'
            if flag:
                cap += "<br>check: " + esc(", ".join(flag["reasons"]).replace("_", " ")) + (
                    f' (file slice {flag["slice"]})' if flag["slice"] != s["z"] else "")
            for pt in s.get("prompts", []):
                cap += "<br>point: " + ("cord" if pt["value"] == 1 else "not cord") + f' ({esc(pt["effect"])})'
            if s.get("prompts"):
                cls = ' class="prompt"'  # corrected by the user: their points say more than the flags
            out.append(f'<figure{cls}><img alt="slice {s["z"]}" src="data:image/png;base64,{s["png"]}">'
                       f"<figcaption>{cap}</figcaption></figure>")
        out.append("</div>")
        out.append('<h3>cord area per slice (mm&sup2;)</h3>' + _area_chart(areas))
        out.append('<table><tr><th class="l">slice</th>' + "".join(f"<th>{s['z']}</th>" for s in v["slices"])
                   + '</tr><tr><td class="l">area</td>' + "".join(f"<td>{a:g}</td>" for a in areas) + "</tr></table>")
    return "\n".join(out)


def render_page(dataset: str, entries: list[dict]) -> str:
    """The self-contained HTML page of one dataset."""
    from . import __version__

    esc = html.escape
    entries = sorted(entries, key=lambda e: (e["subject"], e["input"]))
    rows = []
    for i, e in enumerate(entries):
        n_cord = min(e["slices_with_cord"])
        cls = "ok" if n_cord == e["n_slices"] else "warn"
        n_flag = len(e.get("flagged", []))
        rows.append(f'<tr><td class="l"><a href="#e{i}">{esc(e["subject"])}</a></td><td class="l">{esc(Path(e["input"]).name)}</td>'
                    f'<td class="{cls}">{n_cord}/{e["n_slices"]}</td><td class="{"warn" if n_flag else "ok"}">{n_flag}</td>'
                    f'<td>{e["cord_volume_mm3"]}</td><td class="l">{esc(e["date"])}</td></tr>')
    body = "\n".join(_entry_html(e, f"e{i}") for i, e in enumerate(entries))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>QC {esc(dataset)} - sct_deepseg_epi</title><style>{_CSS}</style></head><body>\n"
            f"<h1>Spinal cord segmentation QC: {esc(dataset)}</h1>"
            f'<div class="meta">sct_deepseg_epi {esc(__version__)} &middot; {len(entries)} image(s)</div>\n'
            '<table><tr><th class="l">subject</th><th class="l">image</th><th>slices with cord (min over volumes)</th>'
            '<th>slices to check</th>'
            f'<th>cord volume (mm&sup3;)</th><th class="l">date</th></tr>{"".join(rows)}</table>\n{body}\n</body></html>\n')


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def html_report(image: str | Path, mask, folder: str | Path, disagreement=None, *, dataset: str | None = None,
                subject: str | None = None, command: Sequence[str] | None = None) -> Path:
    """Add (or replace) this image's section in ``FOLDER/DATASET.html``; returns the page's path."""
    from filelock import FileLock

    folder = Path(folder)
    entry = build_entry(image, mask, disagreement, dataset=dataset, subject=subject, command=command)
    store = folder / ENTRIES / _safe(entry["dataset"])
    store.mkdir(parents=True, exist_ok=True)
    page = folder / f"{_safe(entry['dataset'])}.html"
    with FileLock(str(store) + ".lock"):
        with atomic_path(store / f"{_safe(entry['key'])}.json") as tmp:
            tmp.write_text(json.dumps(entry), encoding="utf-8")
        entries = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(store.glob("*.json"))]
        with atomic_path(page) as tmp:
            tmp.write_text(render_page(entry["dataset"], entries), encoding="utf-8")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # a page to share, not a private temporary file
    return page


# --- SCT's report -------------------------------------------------------------------------------

def sct_available() -> bool:
    try:
        from spinalcordtoolbox.reports import qc2  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means: no usable SCT here
        return False
    return hasattr(qc2, "create_qc_entry") and hasattr(qc2, "sct_deepseg_axial")


def sct_report(image: str | Path, mask, folder: str | Path, *, dataset: str | None = None,
               subject: str | None = None, command: Sequence[str] | None = None) -> Path:
    """Add an entry to SCT's QC report in ``folder``; returns SCT's ``index.html``.

    SCT's axial deepseg view of a 3D image is used: for a 4D series, its temporal mean (and,
    for a 4D mask, the voxels that are cord in at least half the volumes) are written to a
    temporary folder first; the entry is filed under the real input's name.
    """
    from spinalcordtoolbox.reports import qc2

    image = Path(image).resolve()
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    command = list(command or ["sct_deepseg_epi"])
    name = command[0].split()[0]
    mask_img = _as_image(mask)
    with tempfile.TemporaryDirectory(prefix="sct_deepseg_epi_qc_") as tmp:
        vol = read_volume(image)
        ref = vol.image if vol.image.ndim == 3 else vol.image.slicer[..., 0]
        fname_in = str(image)
        if vol.is_4d:
            fname_in = str(save_nifti(like(vol.to_native(vol.data).astype(np.float32), ref),
                                      Path(tmp) / f"{Path(strip_nifti_suffix(image.name)).name}_mean.nii.gz"))
        m = np.asarray(mask_img.dataobj) > 0
        if m.ndim == 4:
            m = m.mean(axis=-1) >= 0.5
        fname_seg = str(save_nifti(like(m.reshape(ref.shape).astype(np.uint8), ref), Path(tmp) / "seg.nii.gz"))
        with qc2.create_qc_entry(path_input=image, path_qc=folder, command=name,
                                 cmdline=" ".join(command), plane="Axial", dataset=dataset,
                                 subject=subject) as imgs:
            qc2.sct_deepseg_axial(imgs, fname_in, fname_seg, None, "human", None, radius=(15, 15))
    return folder / "index.html"


def report(image: str | Path, mask, folder: str | Path, *, disagreement=None, dataset: str | None = None,
           subject: str | None = None, command: Sequence[str] | None = None, backend: str = "auto") -> Path:
    """Write the QC report of one segmentation; returns the page to open.

    ``image``: the segmented EPI (3D or 4D); ``mask`` and ``disagreement``: paths or images on
    its grid (the disagreement is shown only by the standalone page). ``backend``: ``'sct'``,
    ``'html'`` or ``'auto'`` (SCT's report when SCT is importable).
    """
    if backend not in ("auto", "sct", "html"):
        raise ValueError(f"backend must be 'auto', 'sct' or 'html', not {backend!r}")
    if backend == "sct" or (backend == "auto" and sct_available()):
        return sct_report(image, mask, folder, dataset=dataset, subject=subject, command=command)
    return html_report(image, mask, folder, disagreement, dataset=dataset, subject=subject, command=command)
