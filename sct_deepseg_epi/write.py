"""Stage 5, write: arrays on the input grid -> NIfTI files and a JSON sidecar, atomically.

Every file is written to a temporary name in the destination folder and renamed into
place, so a crash or an error never leaves a half-written output and an existing file is
only replaced by a complete one. Output headers are the input's own, with the data type
changed: the affine, the qform and sform matrices and their codes are kept exactly.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import nibabel as nib
import numpy as np

from .errors import InputError
from .read import has_nifti_suffix, strip_nifti_suffix


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


def check_output(path: Path | str, inputs: Iterable[Path | str] = ()) -> Path:
    """Refuse outputs that would overwrite an input or cannot be written, before any work is done."""
    out = Path(path)
    if not has_nifti_suffix(out):
        raise InputError(f"{out}: output must be a .nii or .nii.gz file name")
    for i in inputs:
        same = os.path.abspath(i) == os.path.abspath(out)
        if same or (Path(i).exists() and out.exists() and os.path.samefile(i, out)):
            raise InputError(f"{out}: the output path is the input image; choose another -o")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{out}: the output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{out}: the output folder {folder} is not writable")
    if out.is_dir():
        raise InputError(f"{out}: is a folder")
    return out


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: what open() would have given a new file or folder.

    mkstemp/mkdtemp create private (0600/0700) entries; outputs and installed models are
    given ordinary permissions before they are renamed into place.
    """
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it into place only on success."""
    final = Path(final)
    name = final.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else "".join(final.suffixes[-1:])
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{ext}", dir=final.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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


def save_nifti(img: nib.Nifti1Image, path: Path | str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


class FrameWriter:
    """Stream 3D frames into a 4D NIfTI one at a time, so a long series never sits in memory.

    NIfTI stores data in Fortran order with time slowest, so each frame is one contiguous
    block after the header. The file appears at ``path`` only when every frame is written
    and :meth:`commit` is called; :meth:`abort` (or an exception in a ``with`` block)
    removes the partial file.
    """

    def __init__(self, path: Path | str, ref: nib.Nifti1Image, shape: tuple[int, ...], dtype: np.dtype):
        self.path = Path(path)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        hdr = output_header(ref, self.shape, self.dtype)
        self.offset = max(int(hdr.get_data_offset()), 352)
        hdr.set_data_offset(self.offset)
        self._disk_dtype = self.dtype.newbyteorder(hdr.endianness)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent or ".")
        os.close(fd)
        self._tmp = Path(tmp)
        self._f = gzip.open(tmp, "wb", compresslevel=1) if str(path).endswith(".gz") else open(tmp, "wb")
        hdr.write_to(self._f)
        self._f.write(b"\0" * (self.offset - self._f.tell()))
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != self.shape[:3]:
            raise ValueError(f"frame of shape {frame.shape} does not fit {self.shape}")
        self._f.write(np.asarray(frame, dtype=self._disk_dtype).tobytes(order="F"))
        self.count += 1

    def commit(self) -> Path:
        self._f.close()
        if self.count != self.shape[3]:
            self.abort()
            raise ValueError(f"{self.path}: expected {self.shape[3]} frames, got {self.count}")
        os.chmod(self._tmp, umask_mode())
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "FrameWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()


def save_json(data: dict[str, Any], path: Path | str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path
