"""Where a run writes: every destination checked before any work, locked temporaries, one commit.

A run's outputs may not be its inputs (by path or file identity), existing folders, names
too long for the file system, or in folders it cannot write. Each file is written to a
temporary beside its destination, locked while its writer lives, so that a later run can
tell a killed writer's leftovers from a live one's; :class:`OutputSet` renames a run's
files together at the end, or removes them.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping

from .errors import InputError
from .read import NIFTI_SUFFIXES

# what a temporary name adds to the output's own: "." + name + ".XXXXXXXX.part" + ".nii.gz"
TEMP_NAME_EXTRA = 1 + 9 + 5 + 7


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def prove_writable(folder: Path | str) -> None:
    """Create and remove a file in ``folder``, or raise the OSError that says why not.

    ``os.access`` says yes to root on a read-only mount, and nothing can be created under /proc.
    """
    with signals_deferred():  # a signal in between would leave the probe behind
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)


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


def check_outputs(targets: Mapping[str, Path | str], inputs: Iterable[Path | str] = (), *,
                  new_folders: bool = False) -> dict[str, Path]:
    """Check every path a run will write, before any work is done.

    An output may not be an input, an existing folder, or too long a name for the file
    system once the temporary suffix is added; its folder must exist and be writable,
    which is proven by creating a file there (``os.access`` says yes to root on a
    read-only mount, and nothing can be created under /proc). ``new_folders``: a missing
    folder will be made by the run (a QC report's); its names are checked instead, and the
    folder it will be made in is proven writable.
    """
    outs = {role: Path(p) for role, p in targets.items()}
    for out in outs.values():  # first: a name too long makes every later stat() fail
        folder = out.parent if str(out.parent) else Path(".")
        limit = _name_max(_existing_ancestor(folder))
        n = len(os.fsencode(out.name))
        if n + TEMP_NAME_EXTRA > limit:
            raise InputError(f"{out}: the file name is {n} bytes; this file system allows {limit}, less "
                             f"{TEMP_NAME_EXTRA} for the temporary name it is written under: choose a shorter name")
        for part in folder.parts if new_folders else ():
            if len(os.fsencode(part)) > limit:
                raise InputError(f"{out}: the folder name {part[:40]}... is {len(os.fsencode(part))} bytes; "
                                 f"this file system allows {limit}: choose a shorter name")
    refuse_overwrite(outs, inputs)
    probed: set[str] = set()
    for role, out in outs.items():
        folder = out.parent if str(out.parent) else Path(".")
        if new_folders and _existing_ancestor(folder) != folder:
            key = os.path.realpath(folder)
            if key not in probed:
                check_folder(folder, role=f"folder of the {role}")
                probed.add(key)
            continue
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise InputError(f"{out}: the output folder {folder} {what}")
        if out.is_dir():
            raise InputError(f"{out}: is a folder; the {role} cannot be written there")
        key = os.path.realpath(folder)
        if key not in probed:
            try:
                prove_writable(folder)
            except OSError as exc:
                raise InputError(f"{out}: the output folder {folder} is not writable "
                                 f"({exc.strerror or exc})") from None
            probed.add(key)
    return outs


def _existing_ancestor(folder: Path) -> Path:
    """The nearest folder on the way up that exists (a name too long for the file system does not)."""
    f = folder
    while f != f.parent:
        try:
            if f.is_dir():
                break
        except OSError:
            pass
        f = f.parent
    return f


def make_folders(folder: Path | str, role: str = "output folder") -> list[Path]:
    """Create ``folder`` and its missing parents; returns those this call created, outermost first,
    for :func:`remove_folders` to undo after a failure.

    A level that cannot be made (read-only mount) is one line; the levels made before it are removed.
    """
    folder = Path(folder)
    missing = []
    f = folder
    while not f.exists() and f != f.parent:
        missing.append(f)
        f = f.parent
    made = []
    for f in reversed(missing):
        try:
            f.mkdir()
        except FileExistsError:
            continue  # made by another run at the same time: not ours to remove
        except OSError as exc:
            remove_folders(made)
            raise InputError(f"{folder}: the {role} cannot be created ({exc.strerror or exc})") from None
        made.append(f)
    return made


def remove_folders(made: Iterable[Path]) -> None:
    """Remove the folders a failed run created (innermost first), where they are still empty."""
    for f in reversed(list(made)):
        try:
            f.rmdir()
        except OSError:
            pass  # another run has put a file there since: it stays


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
        prove_writable(existing)
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
    return check_outputs({role: check_suffix(path, suffixes)}, inputs)[role]


def check_suffix(path: Path | str, suffixes: tuple[str, ...] | None = NIFTI_SUFFIXES) -> Path:
    """Refuse an output file name without one of ``suffixes`` (None: any name)."""
    out = Path(path)
    if suffixes and not str(out).endswith(suffixes):
        if suffixes == NIFTI_SUFFIXES:
            raise InputError(f"{out}: output must be a .nii or .nii.gz file name")
        raise InputError(f"{out}: output must end in {' or '.join(suffixes)}")
    return out


def write_error(path: Path | str, exc: OSError) -> InputError:
    """An OSError while writing ``path``, as the one-line error the CLI prints."""
    return InputError(f"{path}: cannot be written ({exc.strerror or exc})")


@contextmanager
def signals_deferred():
    """Hold Ctrl-C, SIGTERM and SIGHUP while a temporary is created and recorded by its owner.

    One handled in between would leave a file that no clean-up knows of; held, its handler runs
    as soon as the block ends, when the file is recorded and removed like the others. Python
    handlers run in the main thread whichever thread the kernel picks, so they are swapped
    here rather than the signals blocked. Signals that kill outright (no handler) are left
    alone: they leave temporaries as ``kill -9`` does, for the next run to remove.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread: they cannot interrupt this one
        return
    held: list[int] = []
    replaced = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and callable(signal.getsignal(sig)):
            replaced[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
        if held:
            replaced[held[0]](held[0], None)  # now: it raises (Ctrl-C, Terminated) with the file recorded


def locked_temp(final: Path) -> tuple[Path, int]:
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
            with signals_deferred():  # a signal lands before or after the temporary is recorded, not between
                self._temps[role] = locked_temp(self.targets[role])
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
