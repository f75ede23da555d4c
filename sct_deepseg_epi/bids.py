"""BIDS datasets: find the BOLD runs, name their derivatives, and decide what a rerun may skip.

Only the layout that BIDS fixes is used: ``sub-<label>/[ses-<label>/]func/<entities>_bold.nii[.gz]``
under the dataset root. Nothing is imported beyond the standard library, and nothing is
written here except by :func:`write_json`; :mod:`sct_deepseg_epi.batch` drives the work.

Derivative names keep every source entity and add ``desc-spinalcord``::

    sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.nii.gz
    -> <deriv>/sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_desc-spinalcord_mask.nii.gz   (+ .json)
       ..._desc-spinalcord_probseg.nii.gz        soft map (-soft 1)
       ..._desc-spinalcord_disagreement.nii.gz   ensemble std (-disagreement 1)
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError


PIPELINE = "sct_deepseg_epi"
DESC = "spinalcord"
BIDS_VERSION = "1.9.0"
_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")
_BOLD_EXTS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Run:
    """One BOLD run of the dataset."""

    path: Path                          # absolute path of the image
    rel: str                            # path relative to the dataset root, POSIX style
    entities: tuple[tuple[str, str], ...]  # in file-name order, 'sub' first

    @property
    def subject(self) -> str:
        return dict(self.entities)["sub"]

    @property
    def session(self) -> str | None:
        return dict(self.entities).get("ses")

    @property
    def task(self) -> str | None:
        return dict(self.entities).get("task")

    @property
    def stem(self) -> str:
        """``sub-01_task-rest_run-1`` (the entities, without the ``bold`` suffix)."""
        return "_".join(f"{k}-{v}" for k, v in self.entities)

    @property
    def folder(self) -> str:
        """``sub-01/ses-1/func`` relative to the dataset root."""
        return self.rel.rsplit("/", 1)[0]


@dataclass(frozen=True)
class Outputs:
    """Where one run's derivatives go."""

    folder: Path
    mask: Path
    sidecar: Path
    soft: Path
    disagreement: Path
    lock: Path

    def extras(self, soft: bool, disagreement: bool) -> dict[str, Path]:
        out = {}
        if soft:
            out["soft"] = self.soft
        if disagreement:
            out["disagreement"] = self.disagreement
        return out


@dataclass
class Discovery:
    """What :func:`find_runs` found, and what it had to say about the dataset."""

    root: Path
    runs: list[Run]
    notes: list[str] = field(default_factory=list)   # skipped folders and files, one line each
    description: dict[str, Any] | None = None        # the dataset's dataset_description.json


def parse_bold_name(name: str) -> tuple[tuple[str, str], ...]:
    """``sub-01_task-rest_run-1_bold.nii.gz`` -> (('sub','01'), ('task','rest'), ('run','1')).

    Raises ValueError for names that are not ``<key>-<label>_..._bold.nii[.gz]``.
    """
    ext = next((e for e in _BOLD_EXTS if name.endswith(e)), None)
    if ext is None:
        raise ValueError(f"{name}: not a .nii or .nii.gz file")
    parts = name[: -len(ext)].split("_")
    if len(parts) < 2 or parts[-1] != "bold":
        raise ValueError(f"{name}: the suffix is not '_bold'")
    entities = []
    for part in parts[:-1]:
        m = _ENTITY.match(part)
        if not m:
            raise ValueError(f"{name}: '{part}' is not a BIDS key-label entity")
        entities.append((m.group(1), m.group(2)))
    keys = [k for k, _ in entities]
    if not keys or keys[0] != "sub":
        raise ValueError(f"{name}: the name does not start with sub-<label>")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name}: an entity is repeated")
    return tuple(entities)


def _labels(values: Iterable[str] | None, prefix: str) -> set[str] | None:
    """``['sub-01', '02']`` -> {'01', '02'} (the prefix is optional on the command line)."""
    if not values:
        return None
    return {v[len(prefix) + 1:] if v.startswith(prefix + "-") else v for v in values}


def read_description(root: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The dataset's own ``dataset_description.json`` and a note when it is missing or unreadable."""
    p = root / "dataset_description.json"
    if not p.is_file():
        return None, (f"{root}: no dataset_description.json; not a valid BIDS dataset, "
                      "continuing with the sub-*/[ses-*/]func/*_bold.nii[.gz] layout")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return None, f"{p}: unreadable ({exc}); continuing without it"
    return d, None


def find_runs(root: str | Path, participants: Iterable[str] | None = None,
              tasks: Iterable[str] | None = None, sessions: Iterable[str] | None = None) -> Discovery:
    """Every BOLD run of a BIDS dataset, sorted, optionally limited to some participants, sessions and tasks.

    Raises InputError when ``root`` is not a folder, holds no ``sub-*`` folder, a requested
    participant does not exist, or nothing matches. Subject folders without ``func/`` and
    files with malformed names are skipped and listed in ``notes``.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"{root}: no such dataset folder")
    desc, note = read_description(root)
    notes = [note] if note else []
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not subjects:
        raise InputError(f"{root}: no sub-* folders; is this a BIDS dataset?")
    wanted = _labels(participants, "sub")
    if wanted is not None:
        have = {p.name[4:] for p in subjects}
        missing = sorted(wanted - have)
        if missing:
            raise InputError(f"{root}: no participant(s) {', '.join(missing)} "
                             f"(the dataset has {len(have)}: {', '.join(sorted(have)[:10])}{'...' if len(have) > 10 else ''})")
        subjects = [p for p in subjects if p.name[4:] in wanted]
    want_tasks = _labels(tasks, "task")
    want_ses = _labels(sessions, "ses")
    runs: list[Run] = []
    for sub in subjects:
        func_dirs = [sub / "func"] + sorted(s / "func" for s in sub.glob("ses-*") if s.is_dir())
        func_dirs = [f for f in func_dirs if f.is_dir()]
        if not func_dirs:
            notes.append(f"{sub.name}: no func/ folder; skipped")
            continue
        found = 0
        for func in func_dirs:
            for f in sorted(func.iterdir()):
                name = f.name
                if name.startswith(".") or not name.endswith(tuple("_bold" + e for e in _BOLD_EXTS)):
                    continue
                rel = f.relative_to(root).as_posix()
                try:
                    ents = parse_bold_name(name)
                except ValueError as exc:
                    notes.append(f"{rel}: skipped ({exc})")
                    continue
                e = dict(ents)
                ses_dir = func.parent.name[4:] if func.parent != sub else None
                if e["sub"] != sub.name[4:] or e.get("ses") != ses_dir:
                    notes.append(f"{rel}: skipped (its entities do not match its folder)")
                    continue
                found += 1
                if want_tasks is not None and e.get("task") not in want_tasks:
                    continue
                if want_ses is not None and e.get("ses") not in want_ses:
                    continue
                runs.append(Run(f, rel, ents))
        if not found:
            notes.append(f"{sub.name}: no *_bold.nii[.gz] in func/; skipped")
    if not runs:
        what = "".join(f" for {k}(s) {', '.join(sorted(v))}" for k, v in (("session", want_ses), ("task", want_tasks)) if v)
        raise InputError(f"{root}: no BOLD runs found{what} (looked for sub-*/[ses-*/]func/*_bold.nii[.gz])")
    return Discovery(root, runs, notes, desc)


def default_derivatives(root: str | Path) -> Path:
    return Path(root) / "derivatives" / PIPELINE


def outputs_for(run: Run, deriv: str | Path) -> Outputs:
    """The derivative file names of ``run`` under the derivatives folder ``deriv``."""
    folder = Path(deriv) / run.folder
    base = folder / f"{run.stem}_desc-{DESC}"
    return Outputs(folder=folder, mask=Path(f"{base}_mask.nii.gz"), sidecar=Path(f"{base}_mask.json"),
                   soft=Path(f"{base}_probseg.nii.gz"), disagreement=Path(f"{base}_disagreement.nii.gz"),
                   lock=folder / f".{run.stem}_desc-{DESC}.lock")


def bids_uri(run: Run) -> str:
    """The BIDS URI of the source image (``bids:raw:<path>``; ``raw`` is set in DatasetLinks)."""
    return f"bids:raw:{run.rel}"


def model_record(name: str, version: str, members: Iterable[tuple[str, str]]) -> dict[str, Any]:
    return {"Name": name, "Version": version, "Members": [{"File": f, "SHA256": s} for f, s in members]}


def dataset_description(source: Path, deriv: Path, model: dict[str, Any], version: str,
                        source_description: dict[str, Any] | None) -> dict[str, Any]:
    """The derivative dataset's ``dataset_description.json`` (BIDS 1.9 derivative)."""
    src_name = (source_description or {}).get("Name")
    source, deriv = Path(source).resolve(), Path(deriv).resolve()
    # a relative link survives moving the whole dataset when the derivatives sit inside it
    raw = os.path.relpath(source, deriv) if source in deriv.parents else source.as_uri()
    src: dict[str, Any] = {"URL": source.as_uri()}
    doi = (source_description or {}).get("DatasetDOI")
    if doi:
        src["DOI"] = doi
    return {
        "Name": f"Spinal cord masks of {src_name}" if src_name else "Spinal cord masks",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": PIPELINE,
            "Version": version,
            "Description": "Spinal cord segmentation of gradient-echo EPI (BOLD) runs with an ONNX model "
                           f"ensemble: {model['Name']} {model['Version']}",
            "Model": model,
        }],
        "SourceDatasets": [src],
        "DatasetLinks": {"raw": raw},
    }


# --- resume records --------------------------------------------------------------------------

def resume_key(model: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """What must match for an existing output to be reused: the model (with checksums) and settings."""
    return {"model": model, "settings": settings}


def is_up_to_date(out: Outputs, input_sha256: str, key: dict[str, Any], extras: Iterable[str]) -> tuple[bool, str]:
    """Whether ``out`` holds a complete result for this input, model and settings; and why not.

    The sidecar is written last, so its presence means the images before it were complete;
    the images must still have the SHA-256 it records for them (``outputs_sha256``).
    """
    if not out.sidecar.is_file():
        return False, "no sidecar"
    if not out.mask.is_file():
        return False, "mask missing"
    try:
        side = json.loads(out.sidecar.read_text(encoding="utf-8"))
        rec = side["Batch"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, "sidecar unreadable"
    if rec.get("input_sha256") != input_sha256:
        return False, "input changed"
    if rec.get("model") != key["model"]:
        return False, "model changed"
    if rec.get("settings") != key["settings"]:
        return False, "settings changed"
    for name in extras:
        if not getattr(out, name).is_file():
            return False, f"{name} map missing"
    # the files themselves: a mask replaced or damaged since the sidecar vouched for it is redone
    sums = rec.get("outputs_sha256")
    if not isinstance(sums, dict):
        return False, "no output checksums in the sidecar"
    from .registry.store import sha256_file

    for name in ("mask", *extras):
        try:
            same = sha256_file(getattr(out, name)) == sums.get(name)
        except OSError:
            same = False
        if not same:
            return False, f"{name} changed since it was written"
    return True, "up to date"
