"""Strict field reading for the JSON manifests: required or defaulted, typed, nothing unknown."""
from __future__ import annotations

from typing import Any

from ..errors import ModelError


def take(d: dict, key: str, where: str, kind: type | tuple, default: Any = ...) -> Any:
    """Pop ``key`` from ``d`` if it has the type ``kind``; ``default`` when absent (``...``: required)."""
    if key not in d:
        if default is ...:
            raise ModelError(f"{where}: missing required field '{key}'")
        return default
    value = d.pop(key)
    # bool is an int subclass: keep "true" out of numeric fields and 1 out of flags
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ModelError(f"{where}: field '{key}' must not be a boolean")
    if not isinstance(value, kind):
        raise ModelError(f"{where}: field '{key}' has the wrong type ({type(value).__name__})")
    return value


def no_leftovers(d: dict, where: str) -> None:
    """Refuse the fields that nothing took."""
    if d:
        raise ModelError(f"{where}: unknown field(s) {', '.join(sorted(d))}")
