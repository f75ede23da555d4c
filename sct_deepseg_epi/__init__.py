"""sct_deepseg_epi: spinal cord segmentation for gradient-echo EPI.

The public API is :func:`segment` and the records it returns; everything heavy is
imported on first use so that ``import sct_deepseg_epi`` and ``-h`` stay fast.
"""
from __future__ import annotations

__version__ = "1.0.0"  # the one place the version is set (setup.cfg reads it)

from .errors import DownloadError, EpiSegError, InputError, IntegrityError, ModelError

__all__ = ["__version__", "segment", "Segmentation", "EpiSegError", "InputError", "ModelError",
           "IntegrityError", "DownloadError"]


def __getattr__(name: str):
    if name in ("segment", "Segmentation"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'sct_deepseg_epi' has no attribute {name!r}")
