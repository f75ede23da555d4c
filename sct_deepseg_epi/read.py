"""Stage 1, read and orient: a NIfTI path -> a validated Volume in canonical RAS orientation.

Orientation is read from the affine and undone exactly on the way out: reorienting to the
closest canonical axes is a lossless permutation/flip of the voxel array, so the mask written
at the end lands on the input's own grid without any interpolation.
"""
from __future__ import annotations

import logging
import stat
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from .errors import InputError

log = logging.getLogger(__name__)
_RAS = axcodes2ornt("RAS")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Reading errors that mean "this file is damaged", as opposed to programming errors: nibabel's
# header errors (an unknown datatype code, dim[0] out of range, a NaN intercept) derive from
# Exception directly, not from ValueError.
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError,
               nib.spatialimages.HeaderDataError, nib.spatialimages.HeaderTypeError,
               nib.spatialimages.ImageDataError)
# DEFLATE cannot compress better than about 1032:1, so a .nii.gz of N bytes holds at most this many
# times N bytes of header and voxels: a header promising more is lying, whatever the data.
GZIP_MAX_RATIO = 1032


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (nibabel's often span two), or its type name."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _size_text(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def has_nifti_suffix(path: Path | str) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(path: Path | str) -> str:
    s = str(path)
    for suf in (".nii.gz", ".nii"):
        if s.endswith(suf):
            return s[: -len(suf)]
    return s


@dataclass
class Volume:
    """An input image: the original NIfTI (for the output grid) and how to reorient it.

    ``data`` is the 3D image to segment in canonical RAS axes (float32). For a 4D series
    it is the temporal mean; the individual volumes stay on disk and are streamed by
    :meth:`iter_frames`, so a long series never sits in memory whole.
    """

    image: nib.Nifti1Image
    data: np.ndarray
    zooms: tuple[float, float, float]
    to_ras: np.ndarray
    from_ras: np.ndarray
    source: str
    n_frames: int = 1
    warnings: list[str] = field(default_factory=list)

    @property
    def is_4d(self) -> bool:
        return self.image.ndim == 4

    def iter_frames(self) -> Iterator[np.ndarray]:
        """Yield each 3D frame of the series in RAS, float32, one at a time."""
        if not self.is_4d:
            yield self.data
            return
        for t in range(self.n_frames):
            frame = _read(self.image, self.source, lambda p: p[..., t])
            yield self._clean(apply_orientation(frame, self.to_ras), f"volume {t}")

    def to_native(self, arr_ras: np.ndarray) -> np.ndarray:
        """Map a RAS array (3D, or 4D with time last) back to the input's axes."""
        return apply_orientation(arr_ras, self.from_ras)

    def _clean(self, arr: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(arr, dtype=np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            n = int(bad.sum())
            if n == arr.size:
                raise InputError(f"{self.source}: every voxel of {what} is NaN or infinite")
            msg = f"{self.source}: {n} NaN/Inf voxel(s) in {what} were set to 0"
            if msg not in self.warnings:
                self.warnings.append(msg)
                log.warning(msg)
            arr = np.where(bad, np.float32(0), arr)
        return arr


def _read(img: nib.Nifti1Image, source: str, take) -> np.ndarray:
    try:
        return np.asarray(take(img.dataobj))
    except READ_ERRORS as exc:
        raise InputError(f"{source}: the image data cannot be read; the file is truncated or damaged ({one_line(exc)})") from None


def check_regular_file(path: Path | str) -> None:
    """Refuse what is not a regular file before opening it: opening a FIFO would wait for a writer."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{p}: is a folder, not a NIfTI file")
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or socket"
        raise InputError(f"{p}: is {kind}, not a regular file")


_NIBABEL_LOG = threading.Lock()


@contextmanager
def _nibabel_messages() -> Iterator[list[str]]:
    """Collect what nibabel logs while it reads a header (its own handler would print it unnamed).

    nibabel fixes some headers as it loads them ("pixdim[1,2,3] should be non-zero; setting 0
    dims to 1") and prints that without the file's name; the caller names the file instead.
    """
    logger = logging.getLogger("nibabel.global")
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    with _NIBABEL_LOG:  # one reader at a time swaps the handlers (batch and Dask workers run threads)
        saved, propagate = logger.handlers[:], logger.propagate
        logger.handlers[:] = [Keep()]
        logger.propagate = False
        try:
            yield got
        finally:
            logger.handlers[:] = saved
            logger.propagate = propagate


def _header_warning(path: Path, message: str) -> str:
    if "pixdim" in message and "non-zero" in message:
        return f"{path}: a pixel size of 0 in the header is read as 1 mm; check the voxel size ({message})"
    if "pixdim" in message and "positive" in message:
        return f"{path}: a negative pixel size in the header is read as its absolute value ({message})"
    return f"{path}: the header was fixed while reading it ({message})"


def load_nifti(path: Path | str, warnings: list[str] | None = None) -> nib.Nifti1Image:
    """Open a NIfTI file lazily, with one-line errors for the usual ways this goes wrong.

    Header fixes nibabel makes on the way (a pixel size of 0 read as 1 mm) are logged as
    warnings naming the file, and appended to ``warnings`` (the sidecar's) when given.
    """
    p = Path(path)
    check_regular_file(p)
    if not has_nifti_suffix(p):
        raise InputError(f"{p}: not a NIfTI file (expected a .nii or .nii.gz name)")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: the file is empty")
    try:
        # keep_file_open: a 4D .nii.gz is then read front to back once, not re-decompressed per volume
        with _nibabel_messages() as fixes:
            img = nib.load(str(p), keep_file_open=True)
    except READ_ERRORS as exc:
        raise InputError(f"{p}: not a readable NIfTI image ({one_line(exc)})") from None
    for fix in dict.fromkeys(fixes):
        msg = _header_warning(p, one_line(fix))
        log.warning(msg)
        if warnings is not None:
            warnings.append(msg)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{p}: not a NIfTI image ({type(img).__name__})")
    check_data_size(img, p)
    return img


def check_data_size(img: nib.Nifti1Image, path: Path) -> None:
    """Refuse a header that promises more data than the file can hold, before anything is allocated.

    A damaged or hostile header (30000^3 voxels in a 1 kB file, a data offset of 1e9) would
    otherwise surface as a MemoryError or a read error deep inside the pipeline.
    """
    hdr = img.header
    shape = tuple(int(n) for n in hdr.get_data_shape())
    n_bytes = int(np.prod(shape, dtype=object)) * np.dtype(hdr.get_data_dtype()).itemsize
    # a loaded header's vox_offset reads 0; the data proxy keeps the real one
    offset = int(getattr(img.dataobj, "offset", hdr.get_data_offset()))
    need = offset + n_bytes
    size = path.stat().st_size
    what = f"{'x'.join(map(str, shape))} voxels of {hdr.get_data_dtype()} after a {offset}-byte offset"
    if str(path).endswith(".gz"):
        if need > size * GZIP_MAX_RATIO:
            raise InputError(f"{path}: the header declares {what} ({_size_text(need)}), more than a "
                             f"gzip file of {_size_text(size)} can hold; the header is wrong or the file is truncated")
    elif need > size:
        raise InputError(f"{path}: the file is truncated: the header declares {what} ({_size_text(need)}) "
                         f"but the file holds {_size_text(size)}")


def from_image(img: nib.Nifti1Image, source: str = "<image>") -> Volume:
    """Validate an in-memory NIfTI image and build its Volume (the temporal mean if 4D)."""
    shape = img.shape
    if len(shape) == 4 and shape[3] == 0:
        raise InputError(f"{source}: a 4D series of shape {tuple(shape)} holds no volume")
    if 0 in shape:
        raise InputError(f"{source}: an image of shape {tuple(shape)} holds no voxel")
    # trailing singleton axes (x, y, z, 1) carry no information; anything else beyond 4D is refused
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 1 or (len(shape) == 3 and sorted(shape)[:2] == [1, 1]):
        raise InputError(f"{source}: a {len(shape)}D image of shape {tuple(img.shape)}; a 3D volume or a 4D series is needed")
    if len(shape) > 4:
        raise InputError(f"{source}: a {len(shape)}D image of shape {tuple(img.shape)}; only 3D and 4D images are supported")
    if shape != img.shape:
        img = img.slicer[(slice(None),) * len(shape) + (0,) * (img.ndim - len(shape))]
    if np.dtype(img.get_data_dtype()).kind not in "biuf":
        raise InputError(f"{source}: unsupported voxel type {img.get_data_dtype()} (need real-valued scalars)")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{source}: the image affine is missing or degenerate; orientation cannot be read")
    ornt = io_orientation(affine)
    to_ras = ornt_transform(ornt, _RAS)
    from_ras = ornt_transform(_RAS, ornt)
    native_zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    zooms = [0.0, 0.0, 0.0]
    for i in range(3):
        zooms[int(to_ras[i, 0])] = float(native_zooms[i])

    vol = Volume(image=img, data=np.empty(0, np.float32), zooms=tuple(zooms), to_ras=to_ras,
                 from_ras=from_ras, source=source, n_frames=shape[3] if len(shape) == 4 else 1)
    if len(shape) == 3:
        vol.data = vol._clean(apply_orientation(_read(img, source, lambda p: p[...]), to_ras), "the image")
    else:
        acc = np.zeros(shape[:3], dtype=np.float64)
        for t in range(vol.n_frames):
            acc += vol._clean(_read(img, source, lambda p: p[..., t]), f"volume {t}")
        vol.data = apply_orientation((acc / vol.n_frames).astype(np.float32), to_ras)
    finite = vol.data
    if not np.any(finite):
        raise InputError(f"{source}: the image is empty (every voxel is 0)")
    if float(finite.max()) == float(finite.min()):
        raise InputError(f"{source}: the image is constant (every voxel is {float(finite.max()):g})")
    return vol


def read_volume(path: Path | str) -> Volume:
    """Stage 1: path -> validated, reoriented Volume (temporal mean for a 4D series)."""
    fixes: list[str] = []
    vol = from_image(load_nifti(path, fixes), str(path))
    vol.warnings[:0] = fixes
    return vol
