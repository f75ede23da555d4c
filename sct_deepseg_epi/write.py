"""Stage 5, write: arrays on the input grid -> NIfTI files and a JSON sidecar, atomically.

Every file is written to a temporary name in the destination folder and renamed into
place, so a crash or an error never leaves a half-written output and an existing file is
only replaced by a complete one. The files of one run form an :class:`OutputSet`: every
destination is checked against every input before any work, all are written to
temporaries, and they are renamed together at the end. Output headers are the input's
own, with the data type changed: the affine, the qform and sform matrices and their codes
are kept exactly.
"""
from __future__ import annotations

import fcntl
import gzip
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import nibabel as nib
import numpy as np

from .errors import InputError
from .read import NIFTI_SUFFIXES, strip_nifti_suffix


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


# what a temporary name adds to the output's own: "." + name + ".XXXXXXXX.part" + ".nii.gz"
TEMP_NAME_EXTRA = 1 + 9 + 5 + 7


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def refuse_overwrite(targets: Mapping[str, Path | str], inputs: Iterable[Path | str]) -> None:
    """Refuse any output that is one of the inputs (or another output), by path or by file identity."""
    ins = [Path(i) for i in inputs if i is not None]
    seen: dict[str, str] = {}
    for role, path in targets.items():
        out = Path(path)
        real = os.path.realpath(out)
        if real in seen:
            raise InputError(f"{out}: would be written twice, as the {seen[real]} and the {role}; choose another -o")
        seen[real] = role
        for i in ins:
            if os.path.realpath(i) == real or (i.exists() and out.exists() and os.path.samefile(i, out)):
                raise InputError(f"{out}: the {role} path is the input {i}; choose another -o")


def check_outputs(targets: Mapping[str, Path | str], inputs: Iterable[Path | str] = ()) -> dict[str, Path]:
    """Check every path a run will write, before any work is done.

    An output may not be an input, an existing folder, or too long a name for the file
    system once the temporary suffix is added; its folder must exist and be writable,
    which is proven by creating a file there (``os.access`` says yes to root on a
    read-only mount, and nothing can be created under /proc).
    """
    outs = {role: Path(p) for role, p in targets.items()}
    for out in outs.values():  # first: a name too long makes every later stat() fail
        folder = out.parent if str(out.parent) else Path(".")
        limit = _name_max(folder) if folder.is_dir() else 255
        n = len(os.fsencode(out.name))
        if n + TEMP_NAME_EXTRA > limit:
            raise InputError(f"{out}: the file name is {n} bytes; this file system allows {limit}, less "
                             f"{TEMP_NAME_EXTRA} for the temporary name it is written under: choose a shorter name")
    refuse_overwrite(outs, inputs)
    probed: set[str] = set()
    for role, out in outs.items():
        folder = out.parent if str(out.parent) else Path(".")
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise InputError(f"{out}: the output folder {folder} {what}")
        if out.is_dir():
            raise InputError(f"{out}: is a folder; the {role} cannot be written there")
        key = os.path.realpath(folder)
        if key not in probed:
            try:
                fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                raise InputError(f"{out}: the output folder {folder} is not writable "
                                 f"({exc.strerror or exc})") from None
            probed.add(key)
    return outs


def check_folder(folder: Path | str, inputs: Iterable[Path | str] = (), *, role: str = "output folder") -> Path:
    """Check a folder a run will write into (created if missing): not an input, and writable."""
    f = Path(folder)
    for i in inputs:
        if i is not None and os.path.realpath(i) == os.path.realpath(f):
            raise InputError(f"{f}: the {role} is the input {i}; choose another folder")
    if f.exists() and not f.is_dir():
        raise InputError(f"{f}: the {role} is a file, not a folder")
    existing = f
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{f}: the {role} cannot be created: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{f}: the {role} is not writable ({exc.strerror or exc})") from None
    return f


def refuse_nesting(folder: Path | str, inputs: Iterable[Path | str], role: str = "output folder") -> None:
    """Refuse an output folder that is an input, holds an input, or lies inside an input folder.

    For outputs that replace a whole folder (an imported model): removing the old folder
    would take the input with it.
    """
    f = os.path.realpath(folder)
    for i in inputs:
        if i is None:
            continue
        r = os.path.realpath(i)
        if r == f or r.startswith(f + os.sep) or f.startswith(r + os.sep):
            raise InputError(f"{folder}: the {role} overlaps the input {i}; choose a folder outside it")


def check_output(path: Path | str, inputs: Iterable[Path | str] = (), *, role: str = "output",
                 suffixes: tuple[str, ...] | None = NIFTI_SUFFIXES) -> Path:
    """Refuse an output that would overwrite an input or cannot be written, before any work is done."""
    out = Path(path)
    if suffixes and not str(out).endswith(suffixes):
        if suffixes == NIFTI_SUFFIXES:
            raise InputError(f"{out}: output must be a .nii or .nii.gz file name")
        raise InputError(f"{out}: output must end in {' or '.join(suffixes)}")
    return check_outputs({role: out}, inputs)[role]


def write_error(path: Path | str, exc: OSError) -> InputError:
    """An OSError while writing ``path``, as the one-line error the CLI prints."""
    return InputError(f"{path}: cannot be written ({exc.strerror or exc})")


def _temp_for(final: Path) -> tuple[Path, int]:
    """A temporary next to ``final``, locked while its writer lives (see :func:`remove_stale_parts`).

    The lock is taken with a blocking call and the name checked again afterwards: a
    cleaner that found the new file unlocked in between has removed it, and another is made.
    """
    name = final.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else "".join(final.suffixes[-1:])
    for _ in range(5):
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{ext}", dir=final.parent or ".")
        except OSError as exc:
            raise write_error(final, exc) from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return Path(tmp), fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise InputError(f"{final}: its temporary files keep being removed by another process")


def remove_stale_parts(final: Path | str) -> list[Path]:
    """Remove temporaries of ``final`` left by a writer that was killed (kill -9, power loss).

    A live writer holds a lock on its temporary until it is renamed, so only unlocked ones
    are removed, under their lock: a concurrent run writing the same output keeps its file.
    """
    final = Path(final)
    removed = []
    folder = final.parent if str(final.parent) else Path(".")
    for part in folder.glob(f".{_glob_escape(final.name)}.*.part*"):
        try:
            fd = os.open(part, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            part.unlink(missing_ok=True)
            removed.append(part)
        except OSError:
            pass  # its writer is alive
        finally:
            os.close(fd)
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


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
    tmp, fd = _temp_for(final)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


class OutputSet:
    """The files of one run, written as a unit.

    Made before any work: every destination is checked against every input
    (:func:`check_outputs`) and stale temporaries of killed runs are removed. Each file is
    then written to a locked temporary beside its destination (:meth:`temp`);
    :meth:`commit` renames them all into place at the end. On any failure before that,
    :meth:`abort` removes the temporaries; a rename that fails halfway removes what was
    already renamed; :meth:`discard` removes the committed files when a later step of the
    same run (a QC report) fails. A failed run therefore leaves no output.
    """

    def __init__(self, targets: Mapping[str, Path | str], inputs: Iterable[Path | str] = ()):
        self.targets = check_outputs(targets, inputs)
        for final in self.targets.values():
            remove_stale_parts(final)
        self._temps: dict[str, tuple[Path, int]] = {}
        self.committed: list[Path] = []

    def temp(self, role: str) -> Path:
        if role not in self._temps:
            self._temps[role] = _temp_for(self.targets[role])
        return self._temps[role][0]

    def commit(self) -> dict[str, Path]:
        try:
            for role, (tmp, _) in self._temps.items():
                final = self.targets[role]
                try:
                    os.chmod(tmp, umask_mode())
                    os.replace(tmp, final)
                except OSError as exc:
                    raise write_error(final, exc) from None
                self.committed.append(final)
        except BaseException:
            self.discard()
            self.abort()
            raise
        self._release()
        return {role: self.targets[role] for role in self._temps}

    def abort(self) -> None:
        for tmp, _ in self._temps.values():
            tmp.unlink(missing_ok=True)
        self._release()

    def discard(self) -> None:
        for final in self.committed:
            final.unlink(missing_ok=True)
        self.committed = []

    def _release(self) -> None:
        for _, fd in self._temps.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._temps = {}

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()


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
        if tmp is None:
            tmp, self._own_fd = _temp_for(self.path)
        self._tmp = Path(tmp)
        self.count = 0
        self._raw = self._f = None
        try:
            self._raw = open(self._tmp, "wb")
            self._f = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=1) if str(path).endswith(".gz") \
                else self._raw
            hdr.write_to(self._f)
            self._f.write(b"\0" * (self.offset - self._f.tell()))
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

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
