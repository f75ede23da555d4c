"""Install model archives: fetch (:mod:`.fetch`), extract safely, rename atomically.

An archive (.zip or .tar.gz) holds one model folder: ``manifest.json`` and the member
files, at its top level or inside a single folder. Installation happens under a file lock
per model, into a hidden temporary folder next to the destination, and ends with an
``os.replace``: concurrent processes install once, and nobody ever reads a half-written
model. A models folder that cannot take the model is a one-line :class:`CacheError`.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlparse

from ..errors import DownloadError, IntegrityError, ModelError
from ..outputs import prove_writable, umask_mode
from ..read import one_line
from .fetch import SHA_RE, check_url, fetch
from .manifest import MANIFEST_NAME, ModelSpec, load_manifest
from .store import cache_root, packaged_copy, verify

log = logging.getLogger(__name__)
LOCK_TIMEOUT = 600.0  # seconds to wait for another process's install
_T = TypeVar("_T")


class CacheError(DownloadError):
    """The models folder cannot take the model (read-only, not a folder, full): no download helps."""


def _cache_errors(fn: Callable[..., _T]) -> Callable[..., _T]:
    """An OSError while installing (read-only or full models folder...) becomes one line naming the path."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            where = exc.filename or kwargs.get("root") or cache_root()
            raise CacheError(f"{where}: cannot install the model there ({exc.strerror or one_line(exc)}); "
                                f"free some space or set SCT_DEEPSEG_EPI_MODELS to a writable folder") from None
    return wrapper


def writable_root(root: Path | None) -> Path:
    """The models folder, created if needed and proven writable, or a one-line DownloadError."""
    r = Path(root) if root else cache_root()
    hint = "; set SCT_DEEPSEG_EPI_MODELS to a writable folder"
    if r.exists() and not r.is_dir():
        raise CacheError(f"{r}: the models folder is a file, not a folder{hint}")
    try:
        r.mkdir(parents=True, exist_ok=True)
        prove_writable(r)
    except OSError as exc:
        raise CacheError(f"{r}: the models folder cannot be written ({exc.strerror or one_line(exc)}){hint}") from None
    return r


def _check_member_name(name: str, archive: Path | str) -> None:
    p = PurePosixPath(name)
    if name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
        raise DownloadError(f"{archive}: unsafe path {name!r} in archive; refusing to extract")


# what a damaged archive raises while it is read (a truncated zip: BadZipFile, zlib.error, EOFError)
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, ValueError)


def extract(archive: Path, dest: Path, label: str | None = None) -> None:
    """Extract a .zip or .tar(.gz) into ``dest``, refusing absolute paths, '..' and links.

    Errors name ``label`` (the URL the user gave) rather than a temporary file.
    """
    archive = Path(archive)
    name = label or str(archive)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    _check_member_name(info.filename, name)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise DownloadError(f"{name}: link {info.filename!r} in archive; refusing to extract")
                z.extractall(dest)
            return
        if not tarfile.is_tarfile(archive):
            raise DownloadError(f"{name}: not a zip or tar archive")
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                _check_member_name(m.name, name)
                if not (m.isfile() or m.isdir()):
                    raise DownloadError(f"{name}: {m.name!r} is a link or special file; refusing to extract")
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = t.extractfile(m)
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except _ARCHIVE_ERRORS as exc:
        raise DownloadError(f"{name}: the archive is damaged or truncated ({one_line(exc)})") from None


def _model_folder(tree: Path, label: Path | str) -> Path:
    if (tree / MANIFEST_NAME).is_file():
        return tree
    subs = [p for p in tree.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / MANIFEST_NAME).is_file():
        return subs[0]
    raise DownloadError(f"{label}: no {MANIFEST_NAME} at the top of the archive or in its single folder")


@contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    """Hold the per-model install lock; waiting past LOCK_TIMEOUT is a DownloadError."""
    from filelock import FileLock, Timeout

    root.mkdir(parents=True, exist_ok=True)
    path = root / f".{name}.lock"
    lock = FileLock(str(path), timeout=LOCK_TIMEOUT)
    try:
        lock.acquire()
    except Timeout:
        raise DownloadError(f"{path}: another process has held the install lock for {LOCK_TIMEOUT:.0f} s; "
                            "if no install is running, delete this file") from None
    try:
        yield
    finally:
        lock.release()


@_cache_errors
def install_folder(folder: Path, root: Path | None = None, expect: tuple[str, str] | None = None) -> ModelSpec:
    """Copy a verified model folder into the cache as ``<root>/<name>/<version>`` (atomic)."""
    spec = load_manifest(folder)
    root = writable_root(root)
    with _lock(root, spec.name):
        return _install_folder_locked(folder, spec, root, expect)


def _installed_copy(root: Path, name: str, version: str, shas: list[str] | None = None) -> ModelSpec | None:
    """The intact installed copy of name@version (matching ``shas`` if given), else None."""
    final = root / name / version
    if not final.is_dir():
        return None
    try:
        existing = load_manifest(final)
        verify(existing)
    except ModelError as exc:
        log.warning("installed copy of %s@%s is damaged and will be replaced: %s", name, version, exc)
        return None
    if shas is not None and [m.sha256 for m in existing.members] != shas:
        return None
    return existing


def _refuse_shadowing(spec: ModelSpec, label: Path | str) -> None:
    """A packaged name@version is one set of weights: a different archive must use another name or version."""
    packaged = packaged_copy(spec.name, spec.version)
    if packaged is not None and [m.sha256 for m in packaged.members] != [m.sha256 for m in spec.members]:
        raise DownloadError(f"{label}: holds {spec.ref} with other weights than the packaged {spec.ref}; "
                            "refusing to shadow it: give the model another name or version in its manifest.json")


def _install_folder_locked(folder: Path, spec: ModelSpec, root: Path, expect: tuple[str, str] | None,
                           label: Path | str | None = None) -> ModelSpec:
    label = label or folder
    if expect and (spec.name, spec.version) != expect:
        raise DownloadError(f"{label}: holds {spec.ref}, expected {expect[0]}@{expect[1]}")
    _refuse_shadowing(spec, label)
    try:
        verify(spec)
    except IntegrityError as exc:
        raise DownloadError(f"refusing to install {label}: {exc}") from None
    existing = _installed_copy(root, spec.name, spec.version, [m.sha256 for m in spec.members])
    if existing is not None:
        return existing
    final = root / spec.name / spec.version
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.version}.", dir=final.parent))
    try:
        for f in [MANIFEST_NAME, *(m.file for m in spec.members), "README.md"]:
            if (folder / f).is_file():
                shutil.copyfile(folder / f, staging / f)
        verify(load_manifest(staging))
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-{spec.version}.", dir=final.parent))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.chmod(staging, umask_mode(0o777))  # mkdtemp's 0700 would hide a shared (SCT) install
        for f in staging.iterdir():
            os.chmod(f, umask_mode())
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    installed = load_manifest(final)
    log.info("installed model %s into %s", installed.ref, final)
    return installed


@_cache_errors
def install_archive(archive: Path, root: Path | None = None, expect: tuple[str, str] | None = None,
                    label: str | None = None) -> ModelSpec:
    root = writable_root(root)
    label = label or str(archive)
    with _temporary(root, ".extract-") as tmp, _named_by(label, tmp):
        extract(Path(archive), tmp, label)
        folder = _model_folder(tmp, label)
        spec = load_manifest(folder)
        with _lock(root, spec.name):
            return _install_folder_locked(folder, spec, root, expect, label)


@contextmanager
def _named_by(label: str, tmp: Path) -> Iterator[None]:
    """Errors about files of an archive name the archive (its URL), not the scratch folder it was
    extracted to, which is gone by the time the message is read: ``URL: tiny/manifest.json: ...``."""
    try:
        yield
    except ModelError as exc:
        text = str(exc)
        scratch = f"{tmp}{os.sep}"
        if scratch not in text:
            raise
        raise type(exc)(text.replace(scratch, f"{label}: ")) from None


@contextmanager
def _temporary(root: Path, prefix: str) -> Iterator[Path]:
    """A scratch folder in the models folder (same file system: the install is a rename), always removed.

    Its owner holds a lock on the folder itself while it lives, so the scratch folders of
    processes that were killed (``kill -9``) are swept by the next install at once.
    """
    _sweep(root)
    for _ in range(5):
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        fd = os.open(tmp, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                break
        except FileNotFoundError:
            pass  # swept between mkdtemp and the lock: make another
        os.close(fd)
    else:
        raise CacheError(f"{root}: its scratch folders keep being removed by another process")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def _sweep(root: Path) -> None:
    """Remove scratch folders that no live process holds locked: their owner was killed.

    The lock is taken (without waiting) before removing, so a live install keeps its folder.
    """
    for pattern in (".download-*", ".extract-*"):
        for d in root.glob(pattern):
            try:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass  # its owner is alive
            finally:
                os.close(fd)


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


@_cache_errors
def install_url(url: str, root: Path | None = None, sha256: str | None = None,
                expect: tuple[str, str] | None = None) -> ModelSpec:
    """Install a model archive from a URL (http(s)://, file:// or a local path).

    The URL's lock is taken before downloading: processes started together download once,
    and those that waited find what the first one installed (recorded in ``.url-KEY.json``).
    """
    local = Path(url)
    if "://" not in url and local.is_dir():
        return install_folder(local, root, expect)
    check_url(url)
    if sha256 is not None and not SHA_RE.match(sha256):
        raise DownloadError(f"{url}: the SHA-256 must be 64 hexadecimal digits")
    root = writable_root(root)
    key = _url_key(url)
    waited_from = time.time()
    with _lock(root, f"url-{key}"):
        done = _installed_by_other(root / f".url-{key}.json", url, sha256, waited_from)
        if done is not None:
            log.info("%s was installed by another process while this one waited", url)
            return done
        with _temporary(root, ".download-") as tmp:
            name = Path(urlparse(url).path).name or "model.zip"
            archive = fetch([url], tmp / name, sha256)
            spec = install_archive(archive, root, expect, label=url)
        record = {"url": url, "sha256": sha256, "model": spec.ref, "time": time.time()}
        _write_record(root / f".url-{key}.json", record)
        return spec


def _installed_by_other(path: Path, url: str, sha256: str | None, since: float) -> ModelSpec | None:
    """The model another process installed from ``url`` while this one waited for the lock, if intact."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("url") != url or (sha256 is not None and rec.get("sha256") != sha256):
        return None
    if sha256 is None and float(rec.get("time", 0)) < since:
        return None  # installed before this run started: the URL may now serve something else
    name, _, version = str(rec.get("model", "")).partition("@")
    return _installed_copy(path.parent, name, version) if name and version else None


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


@_cache_errors
def install_spec(spec: ModelSpec, root: Path | None = None) -> ModelSpec:
    """Install a model that a manifest describes, from its mirrors, once across processes.

    The lock is held through the download, so eight processes started together by a batch
    script download once; the others wait and then find the verified copy.
    """
    if not spec.mirrors:
        raise ModelError(f"model {spec.ref} lists no download mirrors")
    root = writable_root(root)
    shas = [m.sha256 for m in spec.members]
    with _lock(root, spec.name):
        existing = _installed_copy(root, spec.name, spec.version, shas)
        if existing is not None:
            return existing
        label = spec.mirrors[0] if len(spec.mirrors) == 1 else f"the archive of {spec.ref}"
        with _temporary(root, ".download-") as tmp, _named_by(label, tmp / "tree"):
            archive = fetch(spec.mirrors, tmp / (spec.archive or f"{spec.name}-{spec.version}.zip"),
                            spec.archive_sha256)
            tree = tmp / "tree"
            extract(archive, tree, label)
            folder = _model_folder(tree, label)
            got = load_manifest(folder)
            if [m.sha256 for m in got.members] != shas:
                raise IntegrityError(f"the archive for {spec.ref} holds other member files than its manifest declares")
            return _install_folder_locked(folder, got, root, (spec.name, spec.version), label)
