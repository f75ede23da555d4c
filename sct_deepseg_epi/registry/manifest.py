"""Model manifests: the declarative description of a model, validated into a frozen ModelSpec.

A manifest is ``manifest.json`` in a model folder. It says everything the engine needs
to run the model: the ensemble members and their SHA-256, the input spacing and
normalisation, test-time flips, threshold, postprocessing defaults, download mirrors
and provenance. Code never branches on a model's name; it reads these fields.
Unknown keys are errors so that a typo cannot silently fall back to a default.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import ModelError
from .fields import no_leftovers, take
from .nnunet_recipe import NnunetRecipe, recipe_from_dict, recipe_to_dict

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
NORMALISATION_SCHEMES = ("zscore", "percentile", "none")
ACTIVATIONS = ("sigmoid", "softmax")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(vox|mm3)?$")
# Free-form provenance sections: carried into sidecars and model cards, never read by the engine.
_FREEFORM = ("training", "metrics", "provenance")


@dataclass(frozen=True)
class Member:
    """One ensemble member: an ONNX file and its checksum."""

    file: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class Normalisation:
    scheme: str = "zscore"
    clip_percentiles: tuple[float, float] | None = (0.5, 99.5)


@dataclass(frozen=True)
class Postprocess:
    largest: bool = True
    fill_holes: bool = True
    remove_small: str = "0vox"


@dataclass(frozen=True)
class ModelSpec:
    """A validated model manifest. ``directory`` is where its member files are (None if remote)."""

    name: str
    version: str
    description: str
    members: tuple[Member, ...]
    spacing_mm: tuple[float, float]
    context_slices: int = 0
    size_multiple: int = 16
    normalisation: Normalisation = Normalisation()
    activation: str = "sigmoid"
    threshold: float = 0.5
    tta_flip_axes: tuple[int, ...] = (0,)
    postprocess: Postprocess = Postprocess()
    license: str = ""
    citation: str = ""
    archive: str | None = None
    archive_sha256: str | None = None
    mirrors: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    directory: Path | None = None
    # set for models imported from nnU-Net v2: they run through nnunet_pipeline, not the slice path
    nnunet: NnunetRecipe | None = None

    @property
    def ref(self) -> str:
        """``name@version``, the form the CLI's ``-model`` takes."""
        return f"{self.name}@{self.version}"

    @property
    def in_channels(self) -> int:
        return 2 * self.context_slices + 1

    def member_paths(self) -> list[Path]:
        if self.directory is None:
            raise ModelError(f"model {self.ref} has no local folder; install it first")
        return [self.directory / m.file for m in self.members]


def parse_size(text: str) -> tuple[float, str]:
    """Parse ``-remove-small`` values: ``'20'``, ``'20vox'`` or ``'15mm3'`` -> (value, unit)."""
    m = _SIZE_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"size must look like 20, 20vox or 15mm3, not {text!r}")
    return float(m.group(1)), m.group(2) or "vox"


def spec_from_dict(raw: Mapping[str, Any], *, where: str = "manifest", directory: Path | None = None) -> ModelSpec:
    """Validate a manifest dictionary. Raises ModelError naming ``where`` and the bad field."""
    d = json.loads(json.dumps(raw))  # deep copy, and proof that it is plain JSON
    if not isinstance(d, dict):
        raise ModelError(f"{where}: a manifest must be a JSON object")
    schema = take(d, "schema_version", where, int)
    if schema != SCHEMA_VERSION:
        raise ModelError(f"{where}: schema_version {schema} is not supported (this version reads {SCHEMA_VERSION})")
    name = take(d, "name", where, str)
    version = take(d, "version", where, str)
    if not _NAME_RE.match(name):
        raise ModelError(f"{where}: name {name!r} must be lower-case letters, digits and '_'")
    if not _VERSION_RE.match(version):
        raise ModelError(f"{where}: version {version!r} must be MAJOR.MINOR.PATCH")
    description = take(d, "description", where, str, "")

    members = []
    raw_members = take(d, "members", where, list)
    if not raw_members:
        raise ModelError(f"{where}: 'members' must list at least one ONNX file")
    for i, m in enumerate(raw_members):
        w = f"{where}: members[{i}]"
        if not isinstance(m, dict):
            raise ModelError(f"{w} must be an object")
        f = take(m, "file", w, str)
        if "/" in f or "\\" in f or f.startswith(".") or not f.endswith(".onnx"):
            raise ModelError(f"{w}: file {f!r} must be a plain '*.onnx' name inside the model folder")
        sha = take(m, "sha256", w, str).lower()
        if not _SHA_RE.match(sha):
            raise ModelError(f"{w}: sha256 must be 64 hex digits")
        size = take(m, "size", w, int, None)
        no_leftovers(m, w)
        members.append(Member(f, sha, size))
    if len({m.file for m in members}) != len(members):
        raise ModelError(f"{where}: member file names must be unique")

    inp = take(d, "input", where, dict)
    w = f"{where}: input"
    spacing = take(inp, "spacing_mm", w, list)
    if len(spacing) != 2 or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing):
        raise ModelError(f"{w}: spacing_mm must be two positive numbers (in-plane x, y)")
    context = take(inp, "context_slices", w, int, 0)
    multiple = take(inp, "size_multiple", w, int, 16)
    if context < 0 or multiple < 1:
        raise ModelError(f"{w}: context_slices must be >= 0 and size_multiple >= 1")
    norm_raw = take(inp, "normalisation", w, dict, {})
    wn = f"{w}.normalisation"
    scheme = take(norm_raw, "scheme", wn, str, "zscore")
    if scheme not in NORMALISATION_SCHEMES:
        raise ModelError(f"{wn}: scheme {scheme!r} is not one of {', '.join(NORMALISATION_SCHEMES)}")
    clip = take(norm_raw, "clip_percentiles", wn, (list, type(None)), [0.5, 99.5])
    if clip is not None and (len(clip) != 2 or not 0 <= clip[0] < clip[1] <= 100):
        raise ModelError(f"{wn}: clip_percentiles must be [low, high] with 0 <= low < high <= 100")
    no_leftovers(norm_raw, wn)
    no_leftovers(inp, w)

    out = take(d, "output", where, dict, {})
    wo = f"{where}: output"
    activation = take(out, "activation", wo, str, "sigmoid")
    if activation not in ACTIVATIONS:
        raise ModelError(f"{wo}: activation must be one of {', '.join(ACTIVATIONS)}")
    threshold = float(take(out, "threshold", wo, (int, float), 0.5))
    if not 0 < threshold < 1:
        raise ModelError(f"{wo}: threshold must be strictly between 0 and 1")
    no_leftovers(out, wo)

    tta = take(d, "tta", where, dict, {})
    flips = take(tta, "flip_axes", f"{where}: tta", list, [0])
    if any(a not in (0, 1) for a in flips) or len(set(flips)) != len(flips):
        raise ModelError(f"{where}: tta.flip_axes may hold 0 (left-right) and 1 (anterior-posterior)")
    no_leftovers(tta, f"{where}: tta")

    pp = take(d, "postprocess", where, dict, {})
    wp = f"{where}: postprocess"
    post = Postprocess(
        largest=take(pp, "largest", wp, bool, True),
        fill_holes=take(pp, "fill_holes", wp, bool, True),
        remove_small=str(take(pp, "remove_small", wp, (str, int), "0vox")),
    )
    try:
        parse_size(post.remove_small)
    except ValueError as exc:
        raise ModelError(f"{wp}: remove_small: {exc}") from None
    no_leftovers(pp, wp)

    dl = take(d, "download", where, dict, {})
    wd = f"{where}: download"
    archive = take(dl, "archive", wd, (str, type(None)), None)
    archive_sha = take(dl, "sha256", wd, (str, type(None)), None)
    if archive_sha is not None and not _SHA_RE.match(archive_sha.lower()):
        raise ModelError(f"{wd}: sha256 must be 64 hex digits")
    mirrors = take(dl, "mirrors", wd, list, [])
    if not all(isinstance(u, str) and u.startswith(("https://", "http://", "file://")) for u in mirrors):
        raise ModelError(f"{wd}: mirrors must be http(s):// or file:// URLs")
    no_leftovers(dl, wd)

    nn_raw = take(d, "nnunet", where, dict, None)
    nnunet = recipe_from_dict(nn_raw, where) if nn_raw is not None else None
    extra = {k: d.pop(k) for k in _FREEFORM if k in d}
    for k in ("license", "citation"):
        if k in d and not isinstance(d[k], str):
            raise ModelError(f"{where}: field '{k}' must be a string")
    lic, cit = d.pop("license", ""), d.pop("citation", "")
    no_leftovers(d, where)
    return ModelSpec(
        name=name, version=version, description=description, members=tuple(members),
        spacing_mm=(float(spacing[0]), float(spacing[1])), context_slices=context,
        size_multiple=multiple, normalisation=Normalisation(scheme, tuple(clip) if clip else None),
        activation=activation, threshold=threshold, tta_flip_axes=tuple(flips), postprocess=post,
        license=lic, citation=cit, archive=archive, archive_sha256=archive_sha.lower() if archive_sha else None,
        mirrors=tuple(mirrors), extra=MappingProxyType(extra), directory=directory, nnunet=nnunet,
    )


def load_manifest(folder: Path) -> ModelSpec:
    """Read and validate ``folder/manifest.json``; the spec's ``directory`` is ``folder``."""
    path = Path(folder) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no model manifest here") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable JSON manifest ({exc})") from None
    return spec_from_dict(raw, where=str(path), directory=Path(folder))


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """The manifest dictionary of ``spec`` (inverse of :func:`spec_from_dict`)."""
    d: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "name": spec.name, "version": spec.version,
        "description": spec.description, "license": spec.license, "citation": spec.citation,
        "members": [{"file": m.file, "sha256": m.sha256, **({"size": m.size} if m.size is not None else {})}
                    for m in spec.members],
        "input": {"spacing_mm": list(spec.spacing_mm), "context_slices": spec.context_slices,
                  "size_multiple": spec.size_multiple,
                  "normalisation": {"scheme": spec.normalisation.scheme,
                                    "clip_percentiles": list(spec.normalisation.clip_percentiles)
                                    if spec.normalisation.clip_percentiles else None}},
        "output": {"activation": spec.activation, "threshold": spec.threshold},
        "tta": {"flip_axes": list(spec.tta_flip_axes)},
        "postprocess": {"largest": spec.postprocess.largest, "fill_holes": spec.postprocess.fill_holes,
                        "remove_small": spec.postprocess.remove_small},
        "download": {"archive": spec.archive, "sha256": spec.archive_sha256, "mirrors": list(spec.mirrors)},
    }
    if spec.nnunet is not None:
        d["nnunet"] = recipe_to_dict(spec.nnunet)
    d.update({k: v for k, v in spec.extra.items()})
    return json.loads(json.dumps(d))


def write_manifest(spec_or_dict: ModelSpec | Mapping[str, Any], folder: Path) -> Path:
    """Validate and write ``folder/manifest.json`` (atomically)."""
    d = spec_to_dict(spec_or_dict) if isinstance(spec_or_dict, ModelSpec) else dict(spec_or_dict)
    spec_from_dict(d, where=str(folder))
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
