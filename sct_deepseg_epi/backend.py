"""The seam between the engine and a kind of model, chosen once per model.

    spec.backend.kind ──backend_for──▶ Backend.predict(volume) ──▶ Probabilities
                                        (slices: infer.SliceBackend;
                                         nnunet: nnunet.pipeline.NnunetBackend)

A backend turns one 3D RAS array into a foreground probability, the disagreement of its
members and, when the model has its own label map (nnU-Net's argmax), those labels, all
on the input's native RAS grid. Everything else (reading, postprocessing, timing,
writing, the sidecar, to which a backend adds its own fields) is the same for every backend
and lives in :mod:`api`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from .options import Options
    from .read import Volume
    from .registry.manifest import ModelSpec

# manifest ``backend.kind`` -> the class that runs it (imported on first use)
KINDS = {"slices": ("sct_deepseg_epi.infer", "SliceBackend"),
         "nnunet": ("sct_deepseg_epi.nnunet.pipeline", "NnunetBackend")}


@dataclass
class Probabilities:
    """A backend's output, on the native RAS grid (or on the model grid for the raw ensemble)."""

    probability: np.ndarray         # float32, 0..1: the ensemble mean
    disagreement: np.ndarray        # float32: std of the members' probabilities
    labels: np.ndarray | None = None  # uint8 label map of the model at its own threshold, if it has one


class Backend(Protocol):
    spec: ModelSpec
    provider: str
    # predict() can run on a region: -4d each then reuses the region of the mean's cord
    regional: bool

    def predict(self, data_ras: np.ndarray, vol: Volume, *, region: Any = None, localise: bool = False,
                timings: dict[str, float]) -> Probabilities:
        """One 3D RAS array of ``vol`` -> probabilities; ``localise``: find a region with a quick pass first."""

    def provenance(self) -> dict[str, Any]:
        """Fields this kind of model adds to the sidecar's ``model`` record (an nnU-Net model: its convention)."""

    def region_around(self, mask_ras: np.ndarray, vol: Volume) -> Any:
        """The region to run the volumes of a series on, from the mask of its mean (None: everything)."""

    def predict_window(self, data_ras: np.ndarray, vol: Volume, z: int, centre: tuple[int, int],
                       size_mm: float) -> np.ndarray | None:
        """The members' probability on RAS slice ``z`` in a window of ``size_mm`` centred on voxel ``centre`` and
        normalised on that window: (X, Y), NaN outside it; None when this kind of model cannot (a prompt says so)."""


_CACHE: dict[tuple, Backend] = {}


def backend_for(spec: ModelSpec, options: Options) -> Backend:
    """The backend of ``spec`` set up for ``options`` (one per model and settings, kept for the process)."""
    post = options.post(spec)
    tta = options.tta_for(spec)
    key = (spec.ref, str(spec.directory), options.device, options.threads, tta, post.threshold)
    if key not in _CACHE:
        module, name = KINDS[spec.backend.kind]
        cls = getattr(importlib.import_module(module), name)
        _CACHE[key] = cls(spec, device=options.device, threads=options.threads, tta=tta,
                          localise_at=post.threshold)
    return _CACHE[key]
