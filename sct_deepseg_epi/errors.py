"""Exceptions raised by the library.

The library raises; only :mod:`sct_deepseg_epi.cli` turns these into a one-line
message and an exit code. Every message names the file or model concerned.
"""
from __future__ import annotations


class EpiSegError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(EpiSegError):
    """An input image or an output path cannot be used."""


class ModelError(EpiSegError):
    """A model is unknown, not installed, or its manifest is invalid."""


class IntegrityError(ModelError):
    """A model file does not match the checksum its manifest declares."""


class DownloadError(ModelError):
    """A model archive could not be fetched or unpacked."""


class OptionError(EpiSegError):
    """An option value out of range or of the wrong kind (raised where the options are made)."""
