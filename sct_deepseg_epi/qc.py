"""Quality-control reports for a segmentation.

Inside the Spinal Cord Toolbox (``spinalcordtoolbox`` importable), :func:`report` adds an
entry to SCT's own QC report (``FOLDER/index.html``), next to the entries of SCT's other
steps. Standalone it writes one self-contained HTML page per dataset (``FOLDER/DATASET.html``:
no scripts, no external files, images inline as PNG) with one section per segmented image:

- an axial mosaic of every slice, cropped around the cord: the image with the mask outline,
  and under it the ensemble disagreement (the spread of the members' probabilities);
  one mosaic per volume for a 4D mask (``-4d each``), up to :data:`MAX_VOLUMES`;
- the cord area per slice (table and bar chart), and which slices have no cord.

Running it again for the same image replaces that image's section. The slice pictures are
made in :mod:`~sct_deepseg_epi.qc_tiles` (numpy and zlib, no plotting library) and the
page's HTML in :mod:`~sct_deepseg_epi.qc_page`.

The page and the image's entry (``FOLDER/.sct_deepseg_epi_qc/DATASET/``) are outputs like the
mask: checked before any work, written together, never over a file this program did not write
(nor over SCT's ``index.html``); dataset and subject names are names, never paths.
"""
from __future__ import annotations

import base64
import datetime
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation

from .errors import InputError
from .options import check_report_name
from .outputs import OutputSet, check_outputs, make_folders, remove_folders
from .prompts import sidecar_points
from .qc_page import PAGE_MARK, entry_html, render_page
from .qc_tiles import png_bytes, slice_tile
from .read import load_nifti, one_line, read_volume, strip_nifti_suffix
from .write import like, save_nifti, sidecar_path

log = logging.getLogger(__name__)

MAX_VOLUMES = 8       # mosaics shown for a 4D mask (evenly spaced volumes)
ENTRIES = ".sct_deepseg_epi_qc"

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
    from .mocomask import cord_centreline

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
    dataset, subject, key = report_names(image, dataset, subject)
    return {
        "key": key,
        "dataset": dataset,
        "subject": subject,
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


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def report_names(image: str | Path, dataset: str | None = None, subject: str | None = None) -> tuple[str, str, str]:
    """(dataset, subject, entry key) of ``image``'s section: the names given, else its folders' (as SCT).

    Given names are checked (:func:`~sct_deepseg_epi.options.check_report_name`): names, never paths.
    """
    for value, flag in ((dataset, "-qc-dataset"), (subject, "-qc-subject")):
        if value is not None:
            check_report_name(value, flag)
    resolved = Path(image).resolve()
    subject = subject or resolved.parent.parent.name or "subject"
    dataset = dataset or resolved.parent.parent.parent.name or "dataset"
    return dataset, subject, f"{subject}/{Path(image).name}"


def _entry_name(key: str) -> str:
    """The entry's file name; a long key is shortened and made unique with its hash."""
    name = _safe(key)
    if len(name.encode()) > 120:
        name = f"{name[:100]}-{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
    return name + ".json"


def report_targets(image: str | Path, folder: str | Path, *, dataset: str | None = None,
                   subject: str | None = None) -> dict[str, Path]:
    """The files the standalone page writes for ``image``: ``FOLDER/DATASET.html`` and the image's entry.

    Refused before any work: a page named like SCT's QC index (``index.html``), and any
    existing file at either path that this program did not write (a user's page, another
    image's entry under the same file name). The caller checks the paths themselves with
    :func:`~sct_deepseg_epi.outputs.check_outputs`, like every other output.
    """
    dataset, _, key = report_names(image, dataset, subject)
    folder = Path(folder)
    page = folder / f"{_safe(dataset)}.html"
    if _safe(dataset).lower() == "index":
        raise InputError(f"{page}: index.html is the page of SCT's QC report in the same folder; "
                         "choose another -qc-dataset")
    entry = folder / ENTRIES / _safe(dataset) / _entry_name(key)
    _refuse_foreign(page, lambda head: PAGE_MARK in head or _OLD_PAGE_MARK in head, "page")
    _refuse_foreign(entry, lambda head: _is_entry_of(head, key), "entry")
    return {"QC page": page, "QC entry": entry}


_OLD_PAGE_MARK = b" - sct_deepseg_epi</title>"  # the pages of earlier versions


def _is_entry_of(text: bytes, key: str) -> bool:
    try:
        return json.loads(text).get("key") == key
    except (ValueError, AttributeError):
        return False


def _refuse_foreign(path: Path, ours, what: str) -> None:
    """Refuse to replace a file that exists and is not this program's QC page or this image's entry."""
    try:
        with open(path, "rb") as f:
            head = f.read() if what == "entry" else f.read(4096)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        return  # check_outputs says it is a folder
    except OSError as exc:
        raise InputError(f"{path}: cannot be read to check what it is ({exc.strerror or exc})") from None
    if not ours(head):
        whose = "this image's QC entry" if what == "entry" else "a QC page of sct_deepseg_epi"
        raise InputError(f"{path}: exists and is not {whose}; it is left alone: choose another "
                         "-qc folder or -qc-dataset")


def _read_entries(store: Path, skip: Path) -> list[dict]:
    """The other entries of a dataset; one that cannot be read or shown is left out with a warning."""
    entries = []
    for p in sorted(store.glob("*.json")):
        if p.name == skip.name or p.name.startswith("."):  # this image's (being replaced), temporaries
            continue
        try:
            e = json.loads(p.read_text(encoding="utf-8"))
            entry_html(e, "check")
            entries.append(e)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            log.warning("%s: not a readable QC entry, left out of the page (%s)", p, one_line(exc))
    return entries


def _lock_folder(folder: Path) -> int:
    """Lock ``folder`` itself (no lock file to leave behind); it is made again if a failed run removed it."""
    for _ in range(5):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(folder)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise InputError(f"{folder}: keeps being removed by another process")


def html_report(image: str | Path, mask, folder: str | Path, disagreement=None, *, dataset: str | None = None,
                subject: str | None = None, command: Sequence[str] | None = None) -> Path:
    """Add (or replace) this image's section in ``FOLDER/DATASET.html``; returns the page's path.

    The page and the image's entry are checked like every output (:func:`report_targets`,
    :class:`~sct_deepseg_epi.outputs.OutputSet`) and renamed into place together; a report
    that fails leaves no file, and no folder it made.
    """
    inputs = [p for p in (image, mask, disagreement) if isinstance(p, (str, Path))]
    targets = report_targets(image, folder, dataset=dataset, subject=subject)
    check_outputs(targets, inputs, new_folders=True)
    entry = build_entry(image, mask, disagreement, dataset=dataset, subject=subject, command=command)
    page, entry_path = targets["QC page"], targets["QC entry"]
    made = make_folders(entry_path.parent)
    fd = None
    try:
        fd = _lock_folder(entry_path.parent)
        # checked again under the lock: another run may have written these files meanwhile
        outputs = OutputSet(report_targets(image, folder, dataset=dataset, subject=subject), inputs)
        with outputs:
            outputs.temp("QC entry").write_text(json.dumps(entry), encoding="utf-8")
            entries = _read_entries(entry_path.parent, entry_path) + [entry]
            outputs.temp("QC page").write_text(render_page(entry["dataset"], entries), encoding="utf-8")
        outputs.commit()  # the page is shared like any report: ordinary permissions, not mkstemp's 0600
    except BaseException:
        if fd is not None:
            remove_folders(made[-1:])  # the entries folder, while it is locked
        remove_folders(made)
        raise
    finally:
        if fd is not None:
            os.close(fd)
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

    for value, flag in ((dataset, "-qc-dataset"), (subject, "-qc-subject")):
        if value is not None:
            check_report_name(value, flag)
    image = Path(image).resolve()
    folder = Path(folder).resolve()
    made = make_folders(folder)
    try:
        return _sct_report(image, mask, folder, dataset, subject, command)
    except BaseException:
        remove_folders(made)  # SCT's files stay where SCT put them; a folder made for nothing goes
        raise


def _sct_report(image: Path, mask, folder: Path, dataset: str | None, subject: str | None,
                command: Sequence[str] | None) -> Path:
    from spinalcordtoolbox.reports import qc2

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
