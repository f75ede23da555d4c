"""Install model archives: fetch (mirrors, retries, checksums), extract safely, rename atomically.

An archive (.zip or .tar.gz) holds one model folder: ``manifest.json`` and the member
files, at its top level or inside a single folder. Installation happens under a file lock
per model, into a hidden temporary folder next to the destination, and ends with an
``os.replace``: concurrent processes install once, and nobody ever reads a half-written
model.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence
from urllib.parse import unquote, urlparse

from ..errors import DownloadError, IntegrityError, ModelError
from .manifest import MANIFEST_NAME, ModelSpec, load_manifest
from ..write import umask_mode
from .store import cache_root, sha256_file, verify

log = logging.getLogger(__name__)
TIMEOUT = (10, 60)  # connect, read (seconds)
RETRIES = 3
BACKOFF = 1.0
CHUNK = 1 << 16
LOCK_TIMEOUT = 600.0  # seconds to wait for another process's install


def _progress(total: int | None, label: str):
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False)
    return None


def fetch(urls: Sequence[str], dest: Path, sha256: str | None = None, *, retries: int | None = None,
          backoff: float | None = None, timeout: tuple[float, float] | None = None) -> Path:
    """Download the first mirror that works to ``dest``, verifying ``sha256`` when given.

    Each mirror is tried ``retries`` times with exponential backoff on connection errors,
    timeouts and 5xx answers; 4xx answers and checksum mismatches move to the next mirror.
    """
    import requests

    retries = RETRIES if retries is None else retries
    backoff = BACKOFF if backoff is None else backoff
    timeout = TIMEOUT if timeout is None else timeout
    dest = Path(dest)
    errors: list[str] = []
    for url in urls:
        if url.startswith("file://") or "://" not in url:
            src = Path(unquote(urlparse(url).path)) if url.startswith("file://") else Path(url)
            try:
                shutil.copyfile(src, dest)
            except OSError as exc:
                errors.append(f"{url}: {exc.strerror or exc}")
                continue
            if sha256 and sha256_file(dest) != sha256:
                errors.append(f"{url}: SHA-256 mismatch")
                dest.unlink()
                continue
            return dest
        for attempt in range(retries):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                with requests.get(url, stream=True, timeout=timeout) as r:
                    if r.status_code >= 500:
                        errors.append(f"{url}: HTTP {r.status_code}")
                        continue
                    if r.status_code != 200:
                        errors.append(f"{url}: HTTP {r.status_code}")
                        break
                    total = int(r.headers.get("Content-Length") or 0) or None
                    bar = _progress(total, dest.name)
                    h = __import__("hashlib").sha256()
                    size = 0
                    with open(dest, "wb") as f:
                        for block in r.iter_content(CHUNK):
                            f.write(block)
                            h.update(block)
                            size += len(block)
                            if bar is not None:
                                bar.update(len(block))
                    if bar is not None:
                        bar.close()
                if total is not None and size != total:
                    errors.append(f"{url}: connection closed after {size} of {total} bytes")
                    continue
                if sha256 and h.hexdigest() != sha256:
                    errors.append(f"{url}: SHA-256 {h.hexdigest()[:12]}... does not match {sha256[:12]}...")
                    break
                return dest
            except requests.RequestException as exc:
                errors.append(f"{url}: {type(exc).__name__}")
    if dest.exists():
        dest.unlink()
    raise DownloadError("download failed from every mirror: " + "; ".join(errors or ["no URL given"]))


def _check_member_name(name: str, archive: Path) -> None:
    p = PurePosixPath(name)
    if name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
        raise DownloadError(f"{archive}: unsafe path {name!r} in archive; refusing to extract")


def extract(archive: Path, dest: Path) -> None:
    """Extract a .zip or .tar(.gz) into ``dest``, refusing absolute paths, '..' and links."""
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                _check_member_name(info.filename, archive)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DownloadError(f"{archive}: link {info.filename!r} in archive; refusing to extract")
            z.extractall(dest)
        return
    try:
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                _check_member_name(m.name, archive)
                if not (m.isfile() or m.isdir()):
                    raise DownloadError(f"{archive}: {m.name!r} is a link or special file; refusing to extract")
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = t.extractfile(m)
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except tarfile.TarError as exc:
        raise DownloadError(f"{archive}: not a zip or tar archive ({exc})") from None


def _model_folder(tree: Path, archive: Path) -> Path:
    if (tree / MANIFEST_NAME).is_file():
        return tree
    subs = [p for p in tree.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / MANIFEST_NAME).is_file():
        return subs[0]
    raise DownloadError(f"{archive}: no {MANIFEST_NAME} at the top of the archive or in its single folder")


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


def install_folder(folder: Path, root: Path | None = None, expect: tuple[str, str] | None = None) -> ModelSpec:
    """Copy a verified model folder into the cache as ``<root>/<name>/<version>`` (atomic)."""
    root = Path(root) if root else cache_root()
    spec = load_manifest(folder)
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


def _install_folder_locked(folder: Path, spec: ModelSpec, root: Path, expect: tuple[str, str] | None) -> ModelSpec:
    if expect and (spec.name, spec.version) != expect:
        raise DownloadError(f"{folder}: holds {spec.ref}, expected {expect[0]}@{expect[1]}")
    try:
        verify(spec)
    except IntegrityError as exc:
        raise DownloadError(f"refusing to install: {exc}") from None
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


def install_archive(archive: Path, root: Path | None = None, expect: tuple[str, str] | None = None) -> ModelSpec:
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=_tmp_parent(root)) as tmp:
        extract(Path(archive), Path(tmp))
        return install_folder(_model_folder(Path(tmp), Path(archive)), root, expect)


def _tmp_parent(root: Path | None) -> Path:
    r = Path(root) if root else cache_root()
    r.mkdir(parents=True, exist_ok=True)
    return r


def install_url(url: str, root: Path | None = None, sha256: str | None = None,
                expect: tuple[str, str] | None = None) -> ModelSpec:
    """Install a model archive from a URL (http(s)://, file:// or a local path)."""
    local = Path(url)
    if "://" not in url and local.is_dir():
        return install_folder(local, root, expect)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=_tmp_parent(root)) as tmp:
        name = Path(urlparse(url).path).name or "model.zip"
        archive = fetch([url], Path(tmp) / name, sha256)
        return install_archive(archive, root, expect)


def install_spec(spec: ModelSpec, root: Path | None = None) -> ModelSpec:
    """Install a model that a manifest describes, from its mirrors, once across processes.

    The lock is held through the download, so eight processes started together by a batch
    script download once; the others wait and then find the verified copy.
    """
    if not spec.mirrors:
        raise ModelError(f"model {spec.ref} lists no download mirrors")
    root = Path(root) if root else cache_root()
    shas = [m.sha256 for m in spec.members]
    with _lock(root, spec.name):
        existing = _installed_copy(root, spec.name, spec.version, shas)
        if existing is not None:
            return existing
        with tempfile.TemporaryDirectory(prefix=".download-", dir=_tmp_parent(root)) as tmp:
            archive = fetch(spec.mirrors, Path(tmp) / (spec.archive or f"{spec.name}-{spec.version}.zip"),
                            spec.archive_sha256)
            tree = Path(tmp) / "tree"
            extract(archive, tree)
            folder = _model_folder(tree, archive)
            got = load_manifest(folder)
            if [m.sha256 for m in got.members] != shas:
                raise IntegrityError(f"the archive for {spec.ref} holds other member files than its manifest declares")
            return _install_folder_locked(folder, got, root, (spec.name, spec.version))
