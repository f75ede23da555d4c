"""The ``nnunet`` backend section of a manifest: how an imported nnU-Net v2 model must be run.

An nnU-Net model is not a 2D slice model: it has its own axis order, target spacing,
resampling rules, normalisation, patch size and sliding window. ``import-nnunet`` copies
those from the model's ``plans.json``/``dataset.json``/checkpoints into the manifest's
``backend`` section (``"kind": "nnunet"``), and the engine runs the model through
:mod:`sct_deepseg_epi.nnunet.pipeline`. Validation is as strict as the rest of the manifest: unknown keys
and unsupported features are errors that name the field.

``convention`` says which voxel axes the recipe starts from (see docs/nnunet.md):

* ``sct``: SCT's ``sct_deepseg`` way. The image is reoriented to ``orientation`` (nibabel
  axis codes; ``RAS`` is SCT's "LPI"), its axes reversed to (z, y, x) and its spacing with
  them; ``image_reader`` is not used. What ``import-nnunet`` writes by default.
* ``nnunet``: ``nnUNetv2_predict``'s way: the axes that the plans' ``image_reader`` gives
  for the file as stored. A manifest without the field means this: models imported
  before the field existed were made, and tested, with the reader's axes.

Example::

    "backend": {
      "kind": "nnunet", "configuration": "3d_fullres", "convention": "sct", "orientation": "RAS",
      "image_reader": "SimpleITKIO",
      "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
      "spacing": [5.0, 1.0, 1.0], "patch_size": [16, 128, 128], "step_size": 0.5,
      "mirror_axes": [0, 1, 2],
      "resampling": {"data": {"order": 3, "order_z": 0, "force_separate_z": null},
                     "probabilities": {"order": 1, "order_z": 0, "force_separate_z": null},
                     "anisotropy_threshold": 3},
      "normalisation": [{"scheme": "ZScoreNormalization", "use_mask": false}],
      "labels": {"background": 0, "sc": 1}, "regions_class_order": null
    }
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..errors import ModelError
from ..registry.fields import no_leftovers, take

IMAGE_READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
CONVENTIONS = ("sct", "nnunet")
# an old manifest has no convention: it was made with the reader's axes
LEGACY_CONVENTION = "nnunet"
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
NORMALISATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization")
_CT_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")


@dataclass(frozen=True)
class Resampling:
    order: int = 3
    order_z: int = 0
    force_separate_z: bool | None = None


@dataclass(frozen=True)
class ChannelNorm:
    scheme: str
    use_mask: bool = False
    intensity: tuple[tuple[str, float], ...] = ()  # CT statistics from the dataset fingerprint

    def get(self, key: str) -> float:
        return dict(self.intensity)[key]


@dataclass(frozen=True)
class NnunetRecipe:
    """nnU-Net's inference recipe, in nnU-Net's own (transposed, z-first) axis order."""

    kind: ClassVar[str] = "nnunet"
    # SCT runs nnU-Net models without test-time mirroring unless asked (-test-time-aug); so does -tta
    tta_default: ClassVar[bool] = False
    configuration: str
    image_reader: str
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    step_size: float
    mirror_axes: tuple[int, ...]
    resampling_data: Resampling
    resampling_probabilities: Resampling
    anisotropy_threshold: float
    normalisation: tuple[ChannelNorm, ...]
    labels: tuple[tuple[str, Any], ...]
    regions_class_order: tuple[int, ...] | None = None
    # nnU-Net blends tiles in float16 on every device; "float32" is exact maths, minutely different
    blend_precision: str = "float16"
    convention: str = LEGACY_CONVENTION
    orientation: str = "RAS"  # sct convention: the axes (nibabel codes) the image is reoriented to

    @property
    def has_regions(self) -> bool:
        return self.regions_class_order is not None

    @property
    def num_outputs(self) -> int:
        if self.has_regions:
            return len(self.regions_class_order)  # type: ignore[arg-type]
        return len({int(v) for k, v in self.labels if k != "ignore"})


def axcodes_from_sct(code: str) -> str:
    """SCT's orientation string (where each axis comes *from*, e.g. "LPI") as nibabel axis codes ("RAS")."""
    return "".join(_OPPOSITE[c] for c in code.upper())


def valid_axcodes(codes: str) -> bool:
    """Three nibabel axis codes, one per anatomical direction (e.g. RAS, PSR)."""
    groups = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    return (isinstance(codes, str) and len(codes) == 3 and set(codes) <= set(_OPPOSITE)
            and all(len(set(codes) & g) == 1 for g in groups))


def _numbers(v: list, where: str, key: str, kind=(int, float), positive: bool = True) -> list:
    if not all(isinstance(x, kind) and not isinstance(x, bool) and (x > 0 or not positive) for x in v):
        raise ModelError(f"{where}: '{key}' must hold {'positive ' if positive else ''}numbers")
    return v


def _resampling(d: dict, where: str) -> Resampling:
    order = take(d, "order", where, int, 3)
    order_z = take(d, "order_z", where, int, 0)
    force = take(d, "force_separate_z", where, (bool, type(None)), None)
    if order not in (0, 1, 3) or order_z not in (0, 1, 3):
        raise ModelError(f"{where}: resampling orders {order}/{order_z} are not supported (0, 1 or 3)")
    no_leftovers(d, where)
    return Resampling(order, order_z, force)


def recipe_from_dict(raw: Mapping[str, Any], where: str) -> NnunetRecipe:
    """Validate the ``nnunet`` section (a plain-JSON dict, consumed)."""
    d = dict(raw)
    w = f"{where}: nnunet"
    config = take(d, "configuration", w, str)
    convention = take(d, "convention", w, str, LEGACY_CONVENTION)
    if convention not in CONVENTIONS:
        raise ModelError(f"{w}: convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    orientation = take(d, "orientation", w, str, "RAS")
    if not valid_axcodes(orientation):
        raise ModelError(f"{w}: orientation {orientation!r} must be three nibabel axis codes such as RAS")
    if convention != "sct" and orientation != "RAS":
        raise ModelError(f"{w}: orientation is only for the sct convention (the nnunet convention uses the reader's axes)")
    reader = take(d, "image_reader", w, str)
    if reader not in IMAGE_READERS:
        raise ModelError(f"{w}: image reader {reader!r} is not supported (only {', '.join(IMAGE_READERS)})")
    tf = take(d, "transpose_forward", w, list)
    tb = take(d, "transpose_backward", w, list)
    for key, t in (("transpose_forward", tf), ("transpose_backward", tb)):
        if sorted(t) != [0, 1, 2]:
            raise ModelError(f"{w}: {key} must be a permutation of [0, 1, 2]")
    if [tf[i] for i in tb] != [0, 1, 2]:
        raise ModelError(f"{w}: transpose_backward must undo transpose_forward")
    spacing = _numbers(take(d, "spacing", w, list), w, "spacing")
    patch = _numbers(take(d, "patch_size", w, list), w, "patch_size", int)
    if len(patch) not in (2, 3) or len(spacing) != len(patch):
        raise ModelError(f"{w}: patch_size and spacing must both have 2 (2d) or 3 (3d) entries")
    step = float(take(d, "step_size", w, (int, float), 0.5))
    if not 0 < step <= 1:
        raise ModelError(f"{w}: step_size must be in (0, 1]")
    mirror = take(d, "mirror_axes", w, list, [])
    if any(not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < len(patch) for a in mirror) \
            or len(set(mirror)) != len(mirror):
        raise ModelError(f"{w}: mirror_axes must be distinct axes of the patch (0..{len(patch) - 1})")
    rs = take(d, "resampling", w, dict, {})
    wr = f"{w}.resampling"
    data_rs = _resampling(take(rs, "data", wr, dict, {}), f"{wr}.data")
    prob_rs = _resampling(take(rs, "probabilities", wr, dict, {"order": 1}), f"{wr}.probabilities")
    aniso = float(take(rs, "anisotropy_threshold", wr, (int, float), 3))
    no_leftovers(rs, wr)
    norms = []
    raw_norms = take(d, "normalisation", w, list)
    if len(raw_norms) != 1:
        raise ModelError(f"{w}: models with {len(raw_norms)} input channels are not supported (one image only)")
    for i, n in enumerate(raw_norms):
        wn = f"{w}.normalisation[{i}]"
        if not isinstance(n, dict):
            raise ModelError(f"{wn} must be an object")
        n = dict(n)
        scheme = take(n, "scheme", wn, str)
        if scheme not in NORMALISATIONS:
            raise ModelError(f"{wn}: normalisation {scheme!r} is not supported (only {', '.join(NORMALISATIONS)})")
        use_mask = take(n, "use_mask", wn, bool, False)
        inten = take(n, "intensity", wn, dict, {})
        if scheme == "CTNormalization":
            missing = [k for k in _CT_KEYS if k not in inten]
            if missing:
                raise ModelError(f"{wn}: CTNormalization needs intensity {', '.join(missing)}")
        _numbers(list(inten.values()), wn, "intensity", positive=False)
        no_leftovers(n, wn)
        norms.append(ChannelNorm(scheme, use_mask, tuple(sorted((str(k), float(v)) for k, v in inten.items()))))
    labels = take(d, "labels", w, dict)
    if labels.get("background") != 0:
        raise ModelError(f"{w}: labels must map 'background' to 0")
    for k, v in labels.items():
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or \
             (isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
        if not ok:
            raise ModelError(f"{w}: label {k!r} must be a label value or a list of them (a region)")
    rco = take(d, "regions_class_order", w, (list, type(None)), None)
    has_regions = any(isinstance(v, list) and len(v) > 1 for k, v in labels.items() if k != "ignore")
    if has_regions and rco is None:
        raise ModelError(f"{w}: region-based labels need regions_class_order")
    if rco is not None and not has_regions:
        raise ModelError(f"{w}: regions_class_order is only for region-based labels")
    if rco is not None:
        n_regions = sum(1 for k, v in labels.items() if k != "ignore" and v != 0 and v != [0])
        if len(rco) != n_regions or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in rco):
            raise ModelError(f"{w}: regions_class_order must give one positive label per region ({n_regions})")
    blend = take(d, "blend_precision", w, str, "float16")
    if blend not in ("float16", "float32"):
        raise ModelError(f"{w}: blend_precision must be float16 or float32")
    no_leftovers(d, w)
    return NnunetRecipe(
        configuration=config, image_reader=reader, transpose_forward=tuple(tf), transpose_backward=tuple(tb),
        spacing=tuple(float(s) for s in spacing), patch_size=tuple(patch), step_size=step,
        mirror_axes=tuple(mirror), resampling_data=data_rs, resampling_probabilities=prob_rs,
        anisotropy_threshold=aniso, normalisation=tuple(norms),
        labels=tuple((str(k), v if not isinstance(v, list) else tuple(v)) for k, v in labels.items()),
        regions_class_order=tuple(rco) if rco is not None else None, blend_precision=blend,
        convention=convention, orientation=orientation,
    )


def recipe_to_dict(r: NnunetRecipe) -> dict[str, Any]:
    """The JSON form of a recipe (inverse of :func:`recipe_from_dict`)."""
    def rs(x: Resampling) -> dict:
        return {"order": x.order, "order_z": x.order_z, "force_separate_z": x.force_separate_z}

    return {
        "configuration": r.configuration, "convention": r.convention,
        **({"orientation": r.orientation} if r.convention == "sct" else {}),
        "image_reader": r.image_reader,
        "transpose_forward": list(r.transpose_forward), "transpose_backward": list(r.transpose_backward),
        "spacing": list(r.spacing), "patch_size": list(r.patch_size), "step_size": r.step_size,
        "mirror_axes": list(r.mirror_axes),
        "resampling": {"data": rs(r.resampling_data), "probabilities": rs(r.resampling_probabilities),
                       "anisotropy_threshold": r.anisotropy_threshold},
        "normalisation": [{"scheme": n.scheme, "use_mask": n.use_mask, "intensity": dict(n.intensity)}
                          for n in r.normalisation],
        "labels": {k: list(v) if isinstance(v, tuple) else v for k, v in r.labels},
        "regions_class_order": list(r.regions_class_order) if r.regions_class_order is not None else None,
        "blend_precision": r.blend_precision,
    }
