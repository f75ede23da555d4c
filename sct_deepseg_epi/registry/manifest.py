"""Model manifests: the declarative description of a model, validated into a frozen ModelSpec.

A manifest is ``manifest.json`` in a model folder. It says everything the engine needs
to run the model: the ensemble members and their SHA-256, a ``backend`` section (a tagged
union on ``kind``: ``slices``, this engine's 2D models with their spacing, normalisation
and test-time flips; ``nnunet``, an imported nnU-Net v2 recipe), postprocessing defaults
(threshold included), download mirrors and provenance. Code never branches on a model's
name; it reads these fields. Unknown keys are errors so that a typo cannot silently fall
back to a default. Schema 1 manifests (the published 0.1.0 model's) are read through
:func:`upgrade_v1`.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Union

from ..errors import ModelError
from ..options import PostOptions, parse_size  # noqa: F401 (parse_size: re-exported)
from .fields import no_leftovers, take
from ..nnunet.recipe import NnunetRecipe, recipe_from_dict, recipe_to_dict

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
NORMALISATION_SCHEMES = ("zscore", "percentile", "none")
ACTIVATIONS = ("sigmoid", "softmax")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
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
class SliceModel:
    """``backend.kind == "slices"``: 2D members run slice by slice on an in-plane grid (this engine's own models)."""

    kind: ClassVar[str] = "slices"
    tta_default: ClassVar[bool] = True  # the flips of flip_axes, unless -tta 0
    spacing_mm: tuple[float, float]
    context_slices: int = 0
    size_multiple: int = 16
    normalisation: Normalisation = Normalisation()
    activation: str = "sigmoid"
    flip_axes: tuple[int, ...] = (0,)

    @property
    def in_channels(self) -> int:
        return 2 * self.context_slices + 1


# the other kind is NnunetRecipe (``backend.kind == "nnunet"``): a model imported from nnU-Net v2
BackendSpec = Union[SliceModel, NnunetRecipe]


@dataclass(frozen=True)
class ModelSpec:
    """A validated model manifest. ``directory`` is where its member files are (None if remote)."""

    name: str
    version: str
    description: str
    members: tuple[Member, ...]
    backend: BackendSpec
    postprocess: PostOptions = PostOptions()
    license: str = ""
    citation: str = ""
    archive: str | None = None
    archive_sha256: str | None = None
    mirrors: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    directory: Path | None = None

    @property
    def ref(self) -> str:
        """``name@version``, the form the CLI's ``-model`` takes."""
        return f"{self.name}@{self.version}"

    @property
    def threshold(self) -> float:
        return self.postprocess.threshold

    @property
    def slices(self) -> SliceModel:
        """The slice-model section; an error for another kind of backend."""
        if not isinstance(self.backend, SliceModel):
            raise ModelError(f"model {self.ref} is not a slice model (backend {self.backend.kind})")
        return self.backend

    @property
    def nnunet(self) -> NnunetRecipe | None:
        return self.backend if isinstance(self.backend, NnunetRecipe) else None

    # the slice model's fields, read by preprocessing, training and export
    spacing_mm = property(lambda self: self.slices.spacing_mm)
    context_slices = property(lambda self: self.slices.context_slices)
    size_multiple = property(lambda self: self.slices.size_multiple)
    normalisation = property(lambda self: self.slices.normalisation)
    activation = property(lambda self: self.slices.activation)
    tta_flip_axes = property(lambda self: self.slices.flip_axes)
    in_channels = property(lambda self: self.slices.in_channels)

    def member_paths(self) -> list[Path]:
        if self.directory is None:
            raise ModelError(f"model {self.ref} has no local folder; install it first")
        return [self.directory / m.file for m in self.members]


def upgrade_v1(d: dict, where: str) -> dict:
    """A schema 1 manifest (top-level ``input``/``output``/``tta``, optional ``nnunet``) in the schema 2 layout.

    Schema 1 gave every model the slice model's sections, dummies for an imported nnU-Net
    model; those are dropped. Published 0.1.0 manifests stay schema 1 (their checksums are public).
    """
    d = dict(d)
    if "backend" in d:  # would be replaced below without a word
        raise ModelError(f"{where}: unknown field 'backend' in a schema 1 manifest (a schema {SCHEMA_VERSION} section)")
    out = take(d, "output", where, dict, {})
    pp = dict(take(d, "postprocess", where, dict, {}))
    if "threshold" in out:
        pp["threshold"] = out.pop("threshold")
    activation = out.pop("activation", "sigmoid")
    no_leftovers(out, f"{where}: output")
    inp = take(d, "input", where, dict)
    tta = take(d, "tta", where, dict, {})
    nn = take(d, "nnunet", where, dict, None)
    if nn is not None:
        backend = {"kind": "nnunet", **nn}
    else:
        backend = {"kind": "slices", **inp, "activation": activation, "flip_axes": tta.pop("flip_axes", [0])}
        no_leftovers(tta, f"{where}: tta")
    d.update(schema_version=SCHEMA_VERSION, backend=backend, postprocess=pp)
    return d


def _slice_model(b: dict, w: str) -> SliceModel:
    spacing = take(b, "spacing_mm", w, list)
    if len(spacing) != 2 or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing):
        raise ModelError(f"{w}: spacing_mm must be two positive numbers (in-plane x, y)")
    context = take(b, "context_slices", w, int, 0)
    multiple = take(b, "size_multiple", w, int, 16)
    if context < 0 or multiple < 1:
        raise ModelError(f"{w}: context_slices must be >= 0 and size_multiple >= 1")
    norm_raw = take(b, "normalisation", w, dict, {})
    wn = f"{w}.normalisation"
    scheme = take(norm_raw, "scheme", wn, str, "zscore")
    if scheme not in NORMALISATION_SCHEMES:
        raise ModelError(f"{wn}: scheme {scheme!r} is not one of {', '.join(NORMALISATION_SCHEMES)}")
    clip = take(norm_raw, "clip_percentiles", wn, (list, type(None)), [0.5, 99.5])
    if clip is not None and (len(clip) != 2 or not 0 <= clip[0] < clip[1] <= 100):
        raise ModelError(f"{wn}: clip_percentiles must be [low, high] with 0 <= low < high <= 100")
    no_leftovers(norm_raw, wn)
    activation = take(b, "activation", w, str, "sigmoid")
    if activation not in ACTIVATIONS:
        raise ModelError(f"{w}: activation must be one of {', '.join(ACTIVATIONS)}")
    flips = take(b, "flip_axes", w, list, [0])
    if any(a not in (0, 1) for a in flips) or len(set(flips)) != len(flips):
        raise ModelError(f"{w}: flip_axes may hold 0 (left-right) and 1 (anterior-posterior)")
    no_leftovers(b, w)
    return SliceModel((float(spacing[0]), float(spacing[1])), context, multiple,
                      Normalisation(scheme, tuple(clip) if clip else None), activation, tuple(flips))


def _backend(raw: dict, where: str) -> BackendSpec:
    b = dict(raw)
    w = f"{where}: backend"
    kind = take(b, "kind", w, str)
    if kind == "slices":
        return _slice_model(b, w)
    if kind == "nnunet":
        return recipe_from_dict(b, where)
    raise ModelError(f"{w}: kind {kind!r} is not one of slices, nnunet")


def _postprocess(raw: dict, where: str, backend_kind: str) -> PostOptions:
    """The model's postprocessing defaults: any PostOptions field, typed as its default.

    An imported nnU-Net model returns nnU-Net's own labels unless its manifest says
    otherwise: no z-following (``method`` "3d" with its cleaning steps off).
    """
    pp, w, kw = dict(raw), f"{where}: postprocess", {}
    if backend_kind == "nnunet":
        kw["method"] = "3d"
    for f in fields(PostOptions):
        kind = (int, float) if isinstance(f.default, float) else (str, int) if isinstance(f.default, str) else type(f.default)
        if f.name in pp:
            value = take(pp, f.name, w, kind)
            kw[f.name] = float(value) if isinstance(f.default, float) else str(value) if isinstance(f.default, str) else value
    no_leftovers(pp, w)
    try:
        post = PostOptions(**kw)
    except ValueError as exc:
        raise ModelError(f"{w}: {exc}") from None
    if not 0 < post.threshold < 1:
        raise ModelError(f"{w}: threshold must be strictly between 0 and 1")
    return post


def spec_from_dict(raw: Mapping[str, Any], *, where: str = "manifest", directory: Path | None = None) -> ModelSpec:
    """Validate a manifest dictionary (schema 1 or 2). Raises ModelError naming ``where`` and the bad field."""
    d = json.loads(json.dumps(raw))  # deep copy, and proof that it is plain JSON
    if not isinstance(d, dict):
        raise ModelError(f"{where}: a manifest must be a JSON object")
    schema = take(d, "schema_version", where, int)
    if schema == 1:
        d = upgrade_v1(d, where)
        d.pop("schema_version")
    elif schema != SCHEMA_VERSION:
        raise ModelError(f"{where}: schema_version {schema} is not supported (this version reads 1 and {SCHEMA_VERSION})")
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

    backend = _backend(take(d, "backend", where, dict), where)
    post = _postprocess(take(d, "postprocess", where, dict, {}), where, backend.kind)

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

    extra = {k: d.pop(k) for k in _FREEFORM if k in d}
    for k in ("license", "citation"):
        if k in d and not isinstance(d[k], str):
            raise ModelError(f"{where}: field '{k}' must be a string")
    lic, cit = d.pop("license", ""), d.pop("citation", "")
    no_leftovers(d, where)
    return ModelSpec(
        name=name, version=version, description=description, members=tuple(members), backend=backend,
        postprocess=post, license=lic, citation=cit, archive=archive,
        archive_sha256=archive_sha.lower() if archive_sha else None,
        mirrors=tuple(mirrors), extra=MappingProxyType(extra), directory=directory,
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


def backend_to_dict(b: BackendSpec) -> dict[str, Any]:
    if isinstance(b, NnunetRecipe):
        return {"kind": "nnunet", **recipe_to_dict(b)}
    n = b.normalisation
    return {"kind": "slices", "spacing_mm": list(b.spacing_mm), "context_slices": b.context_slices,
            "size_multiple": b.size_multiple,
            "normalisation": {"scheme": n.scheme, "clip_percentiles": list(n.clip_percentiles) if n.clip_percentiles else None},
            "activation": b.activation, "flip_axes": list(b.flip_axes)}


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """The schema 2 manifest dictionary of ``spec`` (inverse of :func:`spec_from_dict`)."""
    d: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "name": spec.name, "version": spec.version,
        "description": spec.description, "license": spec.license, "citation": spec.citation,
        "members": [{"file": m.file, "sha256": m.sha256, **({"size": m.size} if m.size is not None else {})}
                    for m in spec.members],
        "backend": backend_to_dict(spec.backend),
        "postprocess": asdict(spec.postprocess),
        "download": {"archive": spec.archive, "sha256": spec.archive_sha256, "mirrors": list(spec.mirrors)},
    }
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
