"""Import heavy optional packages on first use, naming the extra that provides them."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import EpiSegError

_EXTRAS = {
    "torch": "train",
    "onnx": "train",
    "dask": "dask",
    "distributed": "dask",
    "nnunetv2": "nnunet",
}


class MissingExtra(ImportError, EpiSegError):
    """An optional package is not installed: an ImportError, and a one-line error on the command line."""


def require(module: str) -> ModuleType:
    """Return ``module`` imported, or raise an ImportError (:class:`MissingExtra`) that says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRAS.get(top)
        hint = f"pip install 'sct_deepseg_epi[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtra(f"{module} is needed for this command but is not installed: {hint}") from exc
