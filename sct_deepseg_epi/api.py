"""The Python API: :func:`segment` runs the stages; :func:`run` also writes the files.

    read -> backend.predict (preprocess -> infer, per kind of model) -> postprocess -> write

This is the only module that knows the whole chain, and it is the same for every kind of
model: :func:`~sct_deepseg_epi.backend.backend_for` picks the backend once per model.
It raises EpiSegError subclasses and never prints; the CLI turns them into one line.
"""
from __future__ import annotations

import logging
import platform
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import nibabel as nib
import numpy as np

from . import __version__
from .backend import Backend, backend_for
from .confidence import sidecar_block, slice_report, to_native
from .errors import IntegrityError, ModelError, OptionError
from .options import Options
from .outputs import OutputSet, check_suffix
from .postprocess import PostOptions, finish
from .prompts import Point, read_prompts
from .read import Volume, from_image, read_volume
from .registry import store
from .registry.manifest import ModelSpec, load_manifest
from .write import FrameWriter, default_output, derived_path, like, save_json, save_nifti, sidecar_path

log = logging.getLogger(__name__)


def load_model(model: str | Path | ModelSpec = store.DEFAULT_MODEL, *, install: bool = True) -> ModelSpec:
    """Find a model (``name[@version]``, a model folder, or a spec) and verify its files.

    A bare name that is no known model but an existing folder (``md`` for ``./md``) is that folder.

    A model that is not on disk is downloaded from its mirrors when ``install`` is true;
    a damaged copy in the cache is reinstalled, a damaged packaged copy is refused.
    """
    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, Path) or (isinstance(model, str) and ("/" in model or model.startswith("."))):
        spec = load_manifest(Path(model))
    else:
        try:
            spec = store.resolve(model)
        except ModelError:
            if not Path(model).is_dir():
                raise
            spec = load_manifest(Path(model))  # a model folder named without a slash: -model md for ./md
    if not store.is_complete(spec) or spec.directory is None:
        source = store.with_mirrors(spec)  # an installed copy's own manifest may not say where it came from
        if not install or not source.mirrors:
            raise ModelError(_not_installed(spec, source))
        log.info("model %s is not installed; downloading it", spec.ref)
        spec = _install_or_explain(source)
    try:
        store.verify(spec)
    except IntegrityError:
        source = store.with_mirrors(spec)
        if not (install and source.mirrors and store.in_cache(spec)):
            raise
        log.warning("model %s is damaged; reinstalling it", spec.ref)
        spec = _install_or_explain(source)
        store.verify(spec)
    return spec


def _not_installed(spec: ModelSpec, source: ModelSpec) -> str:
    """Why a model cannot run, naming the missing member file and a command that repairs it."""
    missing = [p for p in spec.member_paths() if not p.is_file()] if spec.directory is not None else []
    if not missing:
        return (f"model {spec.ref} is not installed; run: sct_deepseg_epi -install -model {spec.ref}"
                " (or -custom-url URL for an archive you have)")
    what = f"{missing[0]}: member file of model {spec.ref} is missing" + (
        f" ({len(missing)} of {len(spec.members)} are)" if len(missing) > 1 else "")
    if source.mirrors:
        return f"{what}; run: sct_deepseg_epi -install -model {spec.ref}"
    if store.in_cache(spec):
        return f"{what}; install it again from its archive with: sct_deepseg_epi -custom-url URL"
    return f"{what}; the model folder {spec.directory} is incomplete"


def _install_or_explain(spec: ModelSpec) -> ModelSpec:
    from .registry import download  # archives and HTTP: only when a model must be installed

    try:
        return download.install_spec(spec)
    except download.CacheError:
        raise  # the models folder is the problem, not the network
    except download.DownloadError as exc:
        raise ModelError(f"model {spec.ref} is not installed and could not be downloaded ({exc}); "
                         f"when online run: sct_deepseg_epi -install -model {spec.ref}") from None


@dataclass
class Frame:
    """One segmented 3D volume on the input's own axes."""

    mask: np.ndarray          # uint8
    probability: np.ndarray   # float32, ensemble mean
    disagreement: np.ndarray  # float32, std across members
    slices: list[dict] = field(default_factory=list)  # per-slice confidence (confidence.py), input's order
    prompts: list[dict] = field(default_factory=list)  # each point and what it did (prompts.Point.record)


@dataclass
class Segmentation:
    """The result of :func:`segment`: images on the input grid plus provenance."""

    mask: nib.Nifti1Image
    probability: nib.Nifti1Image
    disagreement: nib.Nifti1Image
    model: ModelSpec
    provider: str
    options: Options
    source: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    confidence: dict[str, Any] = field(default_factory=dict)  # the sidecar's slices and slice_flags

    def provenance(self) -> dict[str, Any]:
        return provenance(self.model, self.options, self.provider, self.source, self.timings, self.warnings,
                          int(np.count_nonzero(np.asarray(self.mask.dataobj))), confidence=self.confidence,
                          backend=backend_for(self.model, self.options))


def _segment_ras(data_ras: np.ndarray, vol: Volume, backend: Backend, post: PostOptions,
                 timings: dict[str, float], region: Any = None, localise: bool = False,
                 points: Sequence[Point] = ()) -> tuple[np.ndarray, Frame]:
    """One 3D RAS array -> (its mask on the RAS grid, its Frame on the input's own axes)."""
    probs = backend.predict(data_ras, vol, region=region, localise=localise, timings=timings)
    t0 = time.perf_counter()
    rerun = partial(backend.predict_window, data_ras, vol) if points else None
    effects: list[str] = []
    mask = finish(probs, post, vol.zooms, backend.spec.threshold, prompts=points, rerun=rerun, effects=effects)
    report = slice_report(mask, probs.probability, probs.disagreement, vol.zooms, post.threshold)
    timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - t0
    return mask, Frame(vol.to_native(mask), vol.to_native(probs.probability).astype(np.float32),
                       vol.to_native(probs.disagreement).astype(np.float32), to_native(report, vol.to_ras),
                       [p.record(e) for p, e in zip(points, effects)])


def iter_frames(vol: Volume, spec: ModelSpec, options: Options, timings: dict[str, float] | None = None) -> Iterator[Frame]:
    """Segment a Volume: one Frame for a 3D image or ``-4d mean``, one per volume for ``-4d each``.

    With ``-4d each`` and a backend that can run on a region, the temporal mean is
    segmented first and every volume is then run on a region around that cord (plus a
    margin for motion), normalised with its whole-image statistics: the cord stays inside,
    and each volume costs a fraction of a full-field pass. Without a cord in the mean,
    volumes are run on the full field.
    """
    timings = {} if timings is None else timings
    post = options.post(spec)
    points = read_prompts(options.prompts, vol)
    if points and post.method != "z":
        raise OptionError(f"-prompt: points need the z-following postprocessing (-postprocess z), "
                          f"not -postprocess {post.method}")
    backend = backend_for(spec, options)
    if not (vol.is_4d and options.mode_4d == "each"):
        yield _segment_ras(vol.data, vol, backend, post, timings, localise=options.localise, points=points)[1]
        return
    region = None
    if backend.regional:
        mean_mask, _ = _segment_ras(vol.data, vol, backend, post, timings, localise=options.localise, points=points)
        region = backend.region_around(mean_mask, vol)
    for frame in vol.iter_frames():
        yield _segment_ras(frame, vol, backend, post, timings, region, points=points)[1]


def prompt_block(records: list[list[dict]]) -> dict[str, Any]:
    """The sidecar's ``prompts`` from each volume's (:attr:`Frame.prompts`): one row per point, its most
    frequent effect and, when the volumes of a series differ, ``effects`` with their counts."""
    if not records or not records[0]:
        return {}
    rows = []
    for same_point in zip(*records):
        seen = [r["effect"] for r in same_point]
        counts = {e: seen.count(e) for e in dict.fromkeys(seen)}
        row = {**same_point[0], "effect": max(counts, key=counts.get)}
        if len(counts) > 1:
            row["effects"] = counts
        rows.append(row)
    return {"prompts": rows}


def _as_volume(image: str | Path | nib.Nifti1Image) -> Volume:
    if isinstance(image, (str, Path)):
        return read_volume(image)
    return from_image(image, getattr(image, "get_filename", lambda: None)() or "<image>")


def _options(options: Options | None, changes: dict[str, Any]) -> Options:
    return (options or Options()).replace(**changes) if changes else (options or Options())


def segment(image: str | Path | nib.Nifti1Image, *, model: str | Path | ModelSpec = store.DEFAULT_MODEL,
            options: Options | None = None, **choices) -> Segmentation:
    """Segment the spinal cord in a 3D or 4D EPI image.

    ``options`` (or its fields as keywords: ``threshold=0.3, mode_4d="each"``...) are the
    :class:`~sct_deepseg_epi.options.Options`; ``None`` fields take the model's default.
    For 4D input, ``mode_4d='mean'`` segments the temporal mean (3D result) and ``'each'``
    every volume (4D result, held in memory: use :func:`run` to stream long series to disk).

    Returns a :class:`Segmentation` whose ``mask`` (uint8), ``probability`` and
    ``disagreement`` (float32) images lie on the input's own grid.

    Raises InputError for unusable images, ModelError for unknown or damaged models and
    OptionError for bad option values.
    """
    options = _options(options, choices)
    t0 = time.perf_counter()
    vol = _as_volume(image)
    timings = {"read": time.perf_counter() - t0}
    spec = load_model(model)
    frames = list(iter_frames(vol, spec, options, timings))
    ref = vol.image
    if len(frames) == 1:
        arrays = (frames[0].mask, frames[0].probability, frames[0].disagreement)
    else:
        arrays = tuple(np.stack([getattr(f, k) for f in frames], axis=-1) for k in ("mask", "probability", "disagreement"))
    seg = Segmentation(like(arrays[0], ref), like(arrays[1], ref), like(arrays[2], ref), spec,
                       backend_for(spec, options).provider, options, vol.source, timings, list(vol.warnings),
                       {**sidecar_block([f.slices for f in frames], vol.to_ras),
                        **prompt_block([f.prompts for f in frames])})
    _warn_if_empty(seg.warnings, vol.source, int(np.count_nonzero(arrays[0])))
    return seg


def _warn_if_empty(warnings: list[str], source: str, cord_voxels: int) -> None:
    if cord_voxels == 0:
        msg = f"{source}: no spinal cord found; the mask is empty"
        warnings.append(msg)
        log.warning(msg)


def provenance(spec: ModelSpec, options: Options, provider: str, source: str, timings: dict[str, float],
               warnings: list[str], cord_voxels: int, input_sha256: str | None = None,
               outputs: dict[str, str] | None = None, confidence: dict[str, Any] | None = None,
               backend: Backend | None = None) -> dict[str, Any]:
    """The JSON sidecar, built in this one place: what produced a mask, from what, how, how long it took.

    ``backend`` (the one that ran) adds its kind's own fields to the ``model`` record.
    """
    post = asdict(options.post(spec))
    d: dict[str, Any] = {
        "GeneratedBy": [{"Name": "sct_deepseg_epi", "Version": __version__}],
        "model": {"name": spec.name, "version": spec.version, "backend": spec.backend.kind,
                  **(backend.provenance() if backend is not None else {}),
                  "members": [{"file": m.file, "sha256": m.sha256} for m in spec.members]},
        "provider": provider,
        "output": options.output,
        "threshold": post.pop("threshold"),
        "postprocess": post,
        "tta": options.tta_for(spec),
        "localise": options.localise,
        "mode_4d": options.mode_4d,
        "input": {"path": source, "sha256": input_sha256},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "warnings": list(warnings),
        "cord_voxels": cord_voxels,
    }
    if outputs is not None:
        d["outputs"] = outputs
    d.update(confidence or {})
    return d


@dataclass
class RunResult:
    """Files written by :func:`run`."""

    mask: Path
    sidecar: Path
    extra: dict[str, Path]
    provenance: dict[str, Any]


# output name -> (Frame field, dtype); with output="probability" the main file holds the soft map
_MAPS = {"mask": ("mask", np.uint8), "soft": ("probability", np.float32), "disagreement": ("disagreement", np.float32)}


def run_targets(input_path: str | Path, output: str | Path | None = None, *, soft: bool = False,
                disagreement: bool = False, options: Options | None = None) -> dict[str, Path]:
    """Every file :func:`run` would write, by role (mask, soft, disagreement, sidecar).

    Only the names: :func:`~sct_deepseg_epi.outputs.check_outputs` checks them against the inputs.
    """
    out = check_suffix(output or default_output(input_path))
    targets = {"mask": out}
    if soft and (options or Options()).output == "probability":  # refused rather than dropped unseen
        raise OptionError("soft=True writes the soft map beside the mask, but output='probability' "
                          "(threshold 0) makes it the main output already")
    if soft:
        targets["soft"] = derived_path(out, "_soft")
    if disagreement:
        targets["disagreement"] = derived_path(out, "_disagreement")
    targets["sidecar"] = sidecar_path(out)
    return targets


def run(input_path: str | Path, output: str | Path | None = None, *, model: str | Path | ModelSpec = store.DEFAULT_MODEL,
        soft: bool = False, disagreement: bool = False, options: Options | None = None,
        then: Callable[[RunResult], Any] | None = None, progress: Callable[[int, int], None] | None = None,
        input_sha256: str | None = None, **choices) -> RunResult:
    """Segment a file and write ``*_seg.nii.gz`` (+ sidecar, optional soft/disagreement maps).

    ``options.output == "probability"`` writes the soft probability map as the main
    output, as SCT's ``-thr 0`` does. A 4D ``-4d each`` series is streamed frame by frame,
    so memory stays at a few volumes whatever the series length.

    Every path the run will write is checked against the input before any work; the files
    are written to temporaries and renamed together at the end, so no output appears unless
    everything succeeded. ``then`` (a QC report, say) runs after the renames; if it fails,
    the run's files are removed again and its error raised. ``progress(done, total)`` is
    called after each volume of a ``-4d each`` series. ``input_sha256``: the input's checksum
    for the sidecar, when the caller has already computed it (else the file is hashed).
    """
    options = _options(options, choices)
    t0 = time.perf_counter()
    targets = run_targets(input_path, output, soft=soft, disagreement=disagreement, options=options)
    out = targets["mask"]
    # a prompt file is an input too: no output may overwrite it
    outputs = OutputSet(targets, [input_path] + ([options.prompts] if isinstance(options.prompts, (str, Path)) else []))
    maps_to_write = [k for k in targets if k != "sidecar"]
    with outputs:
        vol = read_volume(input_path)
        timings: dict[str, float] = {"read": time.perf_counter() - t0}
        spec = load_model(model)
        each = vol.is_4d and options.mode_4d == "each"
        shape = vol.image.shape[:3] + ((vol.n_frames,) if each else ())
        maps = dict(_MAPS, mask=_MAPS["soft"]) if options.output == "probability" else _MAPS
        frames = iter_frames(vol, spec, options, timings)
        n_cord = 0
        reports = []
        prompted = []
        with ExitStack() as stack:
            if each:
                writers = {k: stack.enter_context(FrameWriter(targets[k], vol.image, shape, maps[k][1],
                                                              tmp=outputs.temp(k))) for k in maps_to_write}
                for done, frame in enumerate(frames, 1):
                    n_cord += int(np.count_nonzero(frame.mask))
                    reports.append(frame.slices)
                    prompted.append(frame.prompts)
                    for k, w in writers.items():
                        w.write(getattr(frame, maps[k][0]))
                    if progress is not None:
                        progress(done, vol.n_frames)
                t1 = time.perf_counter()
                for w in writers.values():
                    w.finish()
            else:
                frame = next(frames)
                n_cord = int(np.count_nonzero(frame.mask))
                reports.append(frame.slices)
                prompted.append(frame.prompts)
                t1 = time.perf_counter()
                for k in maps_to_write:
                    save_nifti(like(getattr(frame, maps[k][0]).astype(maps[k][1]), vol.image), targets[k],
                               tmp=outputs.temp(k))
        timings["write"] = time.perf_counter() - t1
        warnings = list(vol.warnings)
        _warn_if_empty(warnings, vol.source, n_cord)
        timings["total"] = time.perf_counter() - t0
        backend = backend_for(spec, options)
        prov = provenance(spec, options, backend.provider, str(input_path), timings, warnings,
                          n_cord, input_sha256=input_sha256 or store.sha256_file(input_path),
                          outputs={k: Path(targets[k]).name for k in maps_to_write},
                          confidence={**sidecar_block(reports, vol.to_ras), **prompt_block(prompted)},
                          backend=backend)
        save_json(prov, targets["sidecar"], tmp=outputs.temp("sidecar"))
    outputs.commit()
    result = RunResult(out, targets["sidecar"], {k: targets[k] for k in maps_to_write if k != "mask"}, prov)
    if then is not None:
        try:
            then(result)
        except BaseException:
            outputs.discard()
            raise
    return result
