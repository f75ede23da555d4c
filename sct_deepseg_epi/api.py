"""The Python API: :func:`segment` runs the five stages; :func:`run` also writes the files.

    read -> preprocess -> infer -> postprocess -> write

This is the only module that knows the whole chain. It raises EpiSegError subclasses and
never prints; the CLI turns them into one line.
"""
from __future__ import annotations

import logging
import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal

import nibabel as nib
import numpy as np

from . import __version__
from .errors import IntegrityError, ModelError
from .infer import Ensemble
from .postprocess import PostOptions, postprocess
from .preprocess import Prepared, check_model_grid, model_grid_shape, prepare, restore, roi_around
from .read import Volume, from_image, read_volume
from .registry import download, store
from .registry.manifest import ModelSpec, load_manifest
from .write import FrameWriter, check_output, default_output, derived_path, like, save_json, save_nifti, sidecar_path

log = logging.getLogger(__name__)
Mode4D = Literal["mean", "each"]
_ENSEMBLES: dict[tuple, Ensemble] = {}
ROI_MARGIN_MM = 12.0  # margin around the cord found first: covers motion and keeps CSF/tissue context


def load_model(model: str | Path | ModelSpec = store.DEFAULT_MODEL, *, install: bool = True) -> ModelSpec:
    """Find a model (``name[@version]``, a model folder, or a spec) and verify its files.

    A model that is not on disk is downloaded from its mirrors when ``install`` is true;
    a damaged copy in the cache is reinstalled, a damaged packaged copy is refused.
    """
    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, Path) or (isinstance(model, str) and ("/" in model or model.startswith("."))):
        spec = load_manifest(Path(model))
    else:
        spec = store.resolve(model)
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
    try:
        return download.install_spec(spec)
    except download.CacheError:
        raise  # the models folder is the problem, not the network
    except download.DownloadError as exc:
        raise ModelError(f"model {spec.ref} is not installed and could not be downloaded ({exc}); "
                         f"when online run: sct_deepseg_epi -install -model {spec.ref}") from None


def get_ensemble(spec: ModelSpec, device: str = "auto", threads: int | None = None, tta: bool = True) -> Ensemble:
    key = (spec.ref, str(spec.directory), device, threads, tta)
    if key not in _ENSEMBLES and spec.nnunet is not None:  # an imported nnU-Net model: its own recipe
        from .nnunet_pipeline import NnunetRunner

        _ENSEMBLES[key] = NnunetRunner(spec, device=device, threads=threads, tta=tta)  # type: ignore[assignment]
    if key not in _ENSEMBLES:
        _ENSEMBLES[key] = Ensemble(spec, device=device, threads=threads, tta=tta)
    return _ENSEMBLES[key]


@dataclass(frozen=True)
class Options:
    """What the user chose; ``None`` means the model manifest's default."""

    threshold: float | None = None
    largest: bool | None = None
    fill_holes: bool | None = None
    remove_small: str | None = None
    mode_4d: Mode4D = "mean"
    device: str = "auto"
    threads: int | None = None
    tta: bool = True
    localise: bool = True  # quick first pass, then the ensemble on a region around the cord

    def post(self, spec: ModelSpec) -> PostOptions:
        p = spec.postprocess
        return PostOptions(
            threshold=spec.threshold if self.threshold is None else self.threshold,
            largest=p.largest if self.largest is None else self.largest,
            fill_holes=p.fill_holes if self.fill_holes is None else self.fill_holes,
            remove_small=p.remove_small if self.remove_small is None else self.remove_small,
        )


@dataclass
class Frame:
    """One segmented 3D volume on the input's own axes."""

    mask: np.ndarray          # uint8
    probability: np.ndarray   # float32, ensemble mean
    disagreement: np.ndarray  # float32, std across members


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

    def provenance(self) -> dict[str, Any]:
        return provenance(self.model, self.options, self.provider, self.source, self.timings,
                          self.warnings, np.asarray(self.mask.dataobj))


def _localise(prep: Prepared, ens: Ensemble, threshold: float) -> tuple[slice, slice] | None:
    """Region around every object a quick pass (one member, no flips) finds, or None.

    None (run the whole field) when nothing is found or the region would cover most of it.
    """
    quick = ens.predict(prep.batch, quick=True).probability
    (a0, a1), (b0, b1) = prep.pad
    found = quick[:, a0:quick.shape[1] - a1, b0:quick.shape[2] - b1] >= threshold
    roi = roi_around(np.moveaxis(found, 0, 2), ens.spec, prep.model_xy, ROI_MARGIN_MM)
    if roi is None or (roi[0].stop - roi[0].start) * (roi[1].stop - roi[1].start) > 0.6 * np.prod(prep.model_xy):
        return None
    return roi


def _segment_ras(data_ras: np.ndarray, vol: Volume, ens: Ensemble, post: PostOptions,
                 timings: dict[str, float], roi: tuple[slice, slice] | None = None,
                 localise: bool = False) -> tuple[np.ndarray, ...]:
    """One 3D RAS array -> (mask, probability, disagreement) on the native RAS grid.

    ``roi`` restricts the ensemble to a region; ``localise`` finds one with a quick pass.
    """
    if ens.spec.nnunet is not None:  # an imported nnU-Net model: nnU-Net's own recipe, whole field
        return ens.segment(data_ras, vol, post, timings)
    t0 = time.perf_counter()
    prep = prepare(data_ras, vol.zooms, ens.spec, roi=roi)
    t1 = time.perf_counter()
    if roi is None and localise:
        roi = _localise(prep, ens, post.threshold)
        if roi is not None:
            prep = prepare(data_ras, vol.zooms, ens.spec, roi=roi)
    out = ens.predict(prep.batch)
    t2 = time.perf_counter()
    prob = np.clip(restore(out.probability, prep), 0, 1)
    dis = restore(out.disagreement, prep)
    mask = postprocess(prob, post, float(np.prod(vol.zooms)))
    t3 = time.perf_counter()
    for k, v in (("preprocess", t1 - t0), ("infer", t2 - t1), ("postprocess", t3 - t2)):
        timings[k] = timings.get(k, 0.0) + v
    return mask, prob, dis


def _frame(vol: Volume, mask: np.ndarray, prob: np.ndarray, dis: np.ndarray) -> Frame:
    return Frame(vol.to_native(mask).astype(np.uint8), vol.to_native(prob).astype(np.float32),
                 vol.to_native(dis).astype(np.float32))


def iter_frames(vol: Volume, spec: ModelSpec, options: Options, timings: dict[str, float] | None = None) -> Iterator[Frame]:
    """Segment a Volume: one Frame for a 3D image or ``-4d mean``, one per volume for ``-4d each``.

    With ``-4d each`` the temporal mean is segmented first and every volume is then run on
    a region around that cord (plus a margin of ROI_MARGIN_MM for motion), normalised with
    its whole-image statistics: the cord stays inside, and each volume costs a fraction of
    a full-field pass. Without a cord in the mean, volumes are run on the full field.
    """
    timings = {} if timings is None else timings
    if spec.nnunet is None:
        check_model_grid(vol.data.shape, vol.zooms, spec.spacing_mm, vol.source)  # before any allocation
    ens = get_ensemble(spec, options.device, options.threads, options.tta)
    post = options.post(spec)
    if vol.is_4d and options.mode_4d == "each":
        roi = None
        if spec.nnunet is None:  # nnU-Net's recipe always runs on the whole field
            mean_mask, _, _ = _segment_ras(vol.data, vol, ens, post, timings, localise=options.localise)
            model_xy = model_grid_shape(vol.data.shape[:2], vol.zooms[:2], spec.spacing_mm)
            roi = roi_around(mean_mask, spec, model_xy, ROI_MARGIN_MM)
        for frame in vol.iter_frames():
            yield _frame(vol, *_segment_ras(frame, vol, ens, post, timings, roi))
    else:
        yield _frame(vol, *_segment_ras(vol.data, vol, ens, post, timings, localise=options.localise))


def _as_volume(image: str | Path | nib.Nifti1Image) -> Volume:
    if isinstance(image, (str, Path)):
        return read_volume(image)
    return from_image(image, getattr(image, "get_filename", lambda: None)() or "<image>")


def segment(image: str | Path | nib.Nifti1Image, *, model: str | Path | ModelSpec = store.DEFAULT_MODEL,
            threshold: float | None = None, largest: bool | None = None, fill_holes: bool | None = None,
            remove_small: str | None = None, mode_4d: Mode4D = "mean", device: str = "auto",
            threads: int | None = None, tta: bool = True, localise: bool = True) -> Segmentation:
    """Segment the spinal cord in a 3D or 4D EPI image.

    Parameters mirror the command line; ``None`` takes the model's default. For 4D input,
    ``mode_4d='mean'`` segments the temporal mean (3D result) and ``'each'`` every volume
    (4D result, held in memory: use :func:`run` to stream long series to disk).

    Returns a :class:`Segmentation` whose ``mask`` (uint8), ``probability`` and
    ``disagreement`` (float32) images lie on the input's own grid.

    Raises InputError for unusable images and ModelError for unknown or damaged models.
    """
    options = Options(threshold, largest, fill_holes, remove_small, mode_4d, device, threads, tta, localise)
    _check_options(options)
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
                       get_ensemble(spec, device, threads, tta).provider, options, vol.source, timings,
                       list(vol.warnings))
    _warn_if_empty(seg.warnings, vol.source, arrays[0])
    return seg


def _check_options(o: Options) -> None:
    if o.threshold is not None and not 0 <= o.threshold < 1:
        raise ModelError(f"threshold {o.threshold} must be in [0, 1) (0 writes the soft probability map)")
    if o.mode_4d not in ("mean", "each"):
        raise ModelError(f"-4d must be 'mean' or 'each', not {o.mode_4d!r}")


def _warn_if_empty(warnings: list[str], source: str, mask: np.ndarray) -> None:
    if not np.any(mask):
        msg = f"{source}: no spinal cord found; the mask is empty"
        warnings.append(msg)
        log.warning(msg)


def provenance(spec: ModelSpec, options: Options, provider: str, source: str, timings: dict[str, float],
               warnings: list[str], mask: np.ndarray | None = None, input_sha256: str | None = None) -> dict[str, Any]:
    """The JSON sidecar: what produced a mask, from what, how, and how long it took."""
    post = options.post(spec)
    d: dict[str, Any] = {
        "GeneratedBy": [{"Name": "sct_deepseg_epi", "Version": __version__}],
        "model": {"name": spec.name, "version": spec.version,
                  "members": [{"file": m.file, "sha256": m.sha256} for m in spec.members]},
        "provider": provider,
        "threshold": post.threshold,
        "postprocess": {"largest": post.largest, "fill_holes": post.fill_holes, "remove_small": post.remove_small},
        "tta": options.tta,
        "localise": options.localise,
        "mode_4d": options.mode_4d,
        "input": {"path": source, "sha256": input_sha256},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "warnings": list(warnings),
    }
    if mask is not None:
        m = np.asarray(mask) > 0
        d["cord_voxels"] = int(m.sum())
    return d


@dataclass
class RunResult:
    """Files written by :func:`run`."""

    mask: Path
    sidecar: Path
    extra: dict[str, Path]
    provenance: dict[str, Any]


def run(input_path: str | Path, output: str | Path | None = None, *, model: str | Path | ModelSpec = store.DEFAULT_MODEL,
        soft: bool = False, disagreement: bool = False, options: Options = Options()) -> RunResult:
    """Segment a file and write ``*_seg.nii.gz`` (+ sidecar, optional soft/disagreement maps).

    ``options.threshold == 0`` writes the soft probability map as the main output, as in
    SCT. A 4D ``-4d each`` series is streamed frame by frame, so memory stays at a few
    volumes whatever the series length. No output appears unless everything succeeded.
    """
    _check_options(options)
    t0 = time.perf_counter()
    out = check_output(output or default_output(input_path), [input_path])
    vol = read_volume(input_path)
    timings: dict[str, float] = {"read": time.perf_counter() - t0}
    spec = load_model(model)
    soft_main = options.threshold == 0
    if soft_main:
        options = replace(options, threshold=0.5)  # the mask still drives warnings and counts
    each = vol.is_4d and options.mode_4d == "each"
    shape = vol.image.shape[:3] + ((vol.n_frames,) if each else ())
    targets = {"mask": out}
    if soft and not soft_main:
        targets["soft"] = derived_path(out, "_soft")
    if disagreement:
        targets["disagreement"] = derived_path(out, "_disagreement")
    dtypes = {"mask": np.float32 if soft_main else np.uint8, "soft": np.float32, "disagreement": np.float32}
    fields = {"mask": "probability" if soft_main else "mask", "soft": "probability", "disagreement": "disagreement"}
    frames = iter_frames(vol, spec, options, timings)
    n_cord = 0
    with ExitStack() as stack:
        if each:
            writers = {k: stack.enter_context(FrameWriter(p, vol.image, shape, dtypes[k])) for k, p in targets.items()}
            for frame in frames:
                n_cord += int(np.count_nonzero(frame.mask))
                for k, w in writers.items():
                    w.write(getattr(frame, fields[k]))
            t1 = time.perf_counter()
            for w in writers.values():
                w.commit()
        else:
            frame = next(frames)
            n_cord = int(np.count_nonzero(frame.mask))
            t1 = time.perf_counter()
            for k, p in targets.items():
                save_nifti(like(getattr(frame, fields[k]).astype(dtypes[k]), vol.image), p)
    timings["write"] = time.perf_counter() - t1
    warnings = list(vol.warnings)
    if n_cord == 0:
        _warn_if_empty(warnings, vol.source, np.zeros(1))
    ens = get_ensemble(spec, options.device, options.threads, options.tta)
    prov = provenance(spec, replace(options, threshold=0 if soft_main else options.threshold), ens.provider,
                      str(input_path), timings, warnings, input_sha256=store.sha256_file(input_path))
    prov["cord_voxels"] = n_cord
    prov["outputs"] = {k: Path(p).name for k, p in targets.items()}
    timings["total"] = time.perf_counter() - t0
    prov["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    side = save_json(prov, sidecar_path(out))
    return RunResult(out, side, {k: v for k, v in targets.items() if k != "mask"}, prov)
