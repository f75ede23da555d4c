"""Import heavy optional packages on first use, naming the extra that provides them."""
from __future__ import annotations

import importlib
from types import ModuleType

_EXTRAS = {
    "torch": "train",
    "onnx": "train",
    "dask": "dask",
    "distributed": "dask",
    "nnunetv2": "nnunet",
}


def require(module: str) -> ModuleType:
    """Return ``module`` imported, or raise an ImportError that says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRAS.get(top)
        hint = f"pip install 'sct_deepseg_epi[{extra}]'" if extra else f"pip install {top}"
        raise ImportError(f"{module} is needed for this command but is not installed: {hint}") from exc
