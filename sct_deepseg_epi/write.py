"""Stage 5, write: arrays on the input grid -> NIfTI files and a JSON sidecar, atomically.

Every file is written to a temporary name in the destination folder and renamed into
place, so a crash or an error never leaves a half-written output and an existing file is
only replaced by a complete one; the files of one run are renamed together
(:class:`~sct_deepseg_epi.outputs.OutputSet`). Output headers are the input's own, with
the data type changed: the affine, the qform and sform matrices and their codes are kept
exactly.
"""
from __future__ import annotations

import gzip
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

from .outputs import locked_temp, signals_deferred, umask_mode, write_error
from .read import strip_nifti_suffix


def default_output(input_path: Path | str, suffix: str = "_seg") -> Path:
    """SCT's naming: ``bold.nii.gz`` -> ``bold_seg.nii.gz`` in the same folder."""
    p = str(input_path)
    ext = ".nii.gz" if p.endswith(".nii.gz") else ".nii"
    return Path(strip_nifti_suffix(p) + suffix + ext)


def sidecar_path(nifti_path: Path | str) -> Path:
    return Path(strip_nifti_suffix(nifti_path) + ".json")


def derived_path(nifti_path: Path | str, suffix: str) -> Path:
    """``x_seg.nii.gz`` + ``_soft`` -> ``x_seg_soft.nii.gz``."""
    p = str(nifti_path)
    ext = ".nii.gz" if p.endswith(".nii.gz") else ".nii"
    return Path(strip_nifti_suffix(p) + suffix + ext)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it into place only on success."""
    final = Path(final)
    tmp = fd = None
    try:
        with signals_deferred():  # a signal lands before the temporary exists or once it is known here
            tmp, fd = locked_temp(final)
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, final)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def output_header(ref: nib.Nifti1Image, shape: tuple[int, ...], dtype: np.dtype) -> nib.Nifti1Header:
    """The reference header for new data: same geometry and codes, new shape and type."""
    hdr = ref.header.copy()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)  # labels and probabilities are stored unscaled
    hdr.set_qform(ref.header.get_qform(), int(ref.header["qform_code"]))
    hdr.set_sform(ref.header.get_sform(), int(ref.header["sform_code"]))
    if isinstance(hdr, nib.Nifti1Header):
        hdr["cal_min"], hdr["cal_max"] = 0, 0
    return hdr


def like(arr: np.ndarray, ref: nib.Nifti1Image) -> nib.Nifti1Image:
    """An in-memory image of ``arr`` on the grid of ``ref`` (same header geometry)."""
    hdr = output_header(ref, arr.shape, arr.dtype)
    img = type(ref)(arr, None, header=hdr)
    # nibabel rebuilds the affine from the header; copy the codes again so nothing is reinterpreted
    img.set_qform(ref.header.get_qform(), int(ref.header["qform_code"]))
    img.set_sform(ref.header.get_sform(), int(ref.header["sform_code"]))
    return img


def save_nifti(img: nib.Nifti1Image, path: Path | str, tmp: Path | None = None) -> Path:
    """Write ``img`` to ``path`` atomically, or to ``tmp`` (an :class:`OutputSet` temporary) as is."""
    path = Path(path)
    try:
        if tmp is not None:
            nib.save(img, str(tmp))
        else:
            with atomic_path(path) as t:
                nib.save(img, str(t))
    except OSError as exc:
        raise write_error(path, exc) from None
    return path


class FrameWriter:
    """Stream 3D frames into a 4D NIfTI one at a time, so a long series never sits in memory.

    NIfTI stores data in Fortran order with time slowest, so each frame is one contiguous
    block after the header. The frames go to a locked temporary: ``tmp`` from an
    :class:`OutputSet` (which renames it with the run's other files), else one of its own
    that :meth:`commit` renames to ``path``. :meth:`abort` (or an exception in a ``with``
    block) removes it, even when closing the file fails on a full disk. Write errors are
    one line naming ``path``.
    """

    def __init__(self, path: Path | str, ref: nib.Nifti1Image, shape: tuple[int, ...], dtype: np.dtype,
                 tmp: Path | None = None):
        self.path = Path(path)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        hdr = output_header(ref, self.shape, self.dtype)
        self.offset = max(int(hdr.get_data_offset()), 352)
        hdr.set_data_offset(self.offset)
        self._disk_dtype = self.dtype.newbyteorder(hdr.endianness)
        self._own_fd = None
        self._tmp = None if tmp is None else Path(tmp)
        self.count = 0
        self._raw = self._f = None
        try:
            if self._tmp is None:
                with signals_deferred():  # a signal lands before the temporary exists or once it is recorded
                    tmp, self._own_fd = locked_temp(self.path)
                    self._tmp = Path(tmp)
            self._raw = open(self._tmp, "wb")
            self._f = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=1) if str(path).endswith(".gz") \
                else self._raw
            hdr.write_to(self._f)
            self._f.write(b"\0" * (self.offset - self._f.tell()))
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None
        except BaseException:  # Ctrl-C or a signal while the header is written
            self.abort()
            raise

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != self.shape[:3]:
            raise ValueError(f"frame of shape {frame.shape} does not fit {self.shape}")
        try:
            self._f.write(np.asarray(frame, dtype=self._disk_dtype).tobytes(order="F"))
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self.count += 1

    def finish(self) -> Path:
        """Close the temporary once every frame is in it (the data reaches the disk here)."""
        try:
            self._close()
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None
        if self.count != self.shape[3]:
            self.abort()
            raise ValueError(f"{self.path}: expected {self.shape[3]} frames, got {self.count}")
        return self._tmp

    def commit(self) -> Path:
        self.finish()
        if self._own_fd is None:
            return self._tmp  # the OutputSet renames it
        try:
            os.chmod(self._tmp, umask_mode())
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None
        self._release()
        return self.path

    def _close(self) -> None:
        f, raw, self._f, self._raw = self._f, self._raw, None, None
        try:
            if f is not None and f is not raw:
                f.close()  # gzip flushes here: a full disk fails here
        finally:
            if raw is not None:
                raw.close()

    def abort(self) -> None:
        try:
            self._close()
        except OSError:
            pass  # the file goes anyway
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self._own_fd is not None:
            os.close(self._own_fd)
            self._own_fd = None

    def __enter__(self) -> "FrameWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()


def save_json(data: dict[str, Any], path: Path | str, tmp: Path | None = None) -> Path:
    """Write ``data`` as JSON to ``path`` atomically, or to ``tmp`` (an :class:`OutputSet` temporary)."""
    path = Path(path)
    text = json.dumps(data, indent=2, default=str) + "\n"
    try:
        if tmp is not None:
            tmp.write_text(text, encoding="utf-8")
        else:
            with atomic_path(path) as t:
                t.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise write_error(path, exc) from None
    return path
