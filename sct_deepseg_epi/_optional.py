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


def require(module: str, extra: str | None = None) -> ModuleType:
    """Return ``module`` imported, or raise an ImportError (:class:`MissingExtra`) that says how to get it.

    ``extra``: the extra that the calling command needs (torch for ``import-nnunet`` comes
    with the 'nnunet' extra, which also brings nnunetv2; 'train' would not); default: the
    package's own extra.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = extra or _EXTRAS.get(top)
        hint = f"pip install 'sct_deepseg_epi[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtra(f"{module} is needed for this command but is not installed: {hint}") from exc
