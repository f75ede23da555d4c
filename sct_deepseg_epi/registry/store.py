"""Where models live, which ones exist, and whether their files are intact.

Two places hold models: the package itself (the default model ships inside it and needs
no network) and a cache folder that downloads install into. The cache is SCT's
``data/deepseg_models`` when running inside SCT, else a per-user cache;
``SCT_DEEPSEG_EPI_MODELS`` overrides both. Each model is ``<root>/<name>/<version>/``
holding ``manifest.json`` and the member files; a version folder only ever appears by an
atomic rename of a complete, verified copy.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import IntegrityError, ModelError
from .manifest import MANIFEST_NAME, ModelSpec, load_manifest

ENV_MODELS = "SCT_DEEPSEG_EPI_MODELS"
DEFAULT_MODEL = "seg_sc_epi"
_VERIFIED: dict[tuple, bool] = {}
log = logging.getLogger(__name__)


def packaged_root() -> Path:
    """The ``models/`` folder shipped with the package."""
    try:
        from importlib.resources import files

        return Path(str(files("sct_deepseg_epi.models")))
    except ModuleNotFoundError:
        # running from a source checkout without installing: models/ sits beside the package
        return Path(__file__).resolve().parents[2] / "models"


def sct_dir() -> Path | None:
    """SCT's install folder when this Python is SCT's own (or SCT_DIR says so)."""
    env = os.environ.get("SCT_DIR")
    if env and Path(env, "data").is_dir():
        return Path(env)
    prefix = Path(sys.prefix)
    # SCT installs its venv at $SCT_DIR/python/envs/venv_sct
    if prefix.name == "venv_sct" and prefix.parent.name == "envs":
        return prefix.parents[2]
    return None


def cache_root() -> Path:
    """Folder that installed (downloaded) models go to."""
    env = os.environ.get(ENV_MODELS)
    if env:
        return Path(env).expanduser()
    sct = sct_dir()
    if sct is not None:
        return sct / "data" / "deepseg_models" / "sct_deepseg_epi"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sct_deepseg_epi" / "models"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``'name'`` or ``'name@1.2.3'`` -> (name, version or None)."""
    name, _, version = ref.partition("@")
    if not name:
        raise ModelError(f"model reference {ref!r} has no name")
    return name, version or None


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _scan(root: Path) -> dict[tuple[str, str], Path]:
    found: dict[tuple[str, str], Path] = {}
    if not root.is_dir():
        return found
    for manifest in sorted(root.glob(f"*/*/{MANIFEST_NAME}")):
        folder = manifest.parent
        if folder.name.startswith("."):
            continue  # temporary install folders
        found[(folder.parent.name, folder.name)] = folder
    return found


def available() -> list[ModelSpec]:
    """Every known model version: packaged ones and installed ones (installed wins).

    An installed copy wins only if it holds the packaged weights (the packaged manifest may
    list files that live on a mirror): a cache entry that reuses a packaged name@version for
    other weights is ignored, with a warning, so it can never silently replace the model.
    """
    packaged = _scan(packaged_root())
    folders = dict(packaged)
    for key, folder in _scan(cache_root()).items():
        if key in packaged and _member_shas(folder) != _member_shas(packaged[key]):
            log.warning("%s: ignored; it reuses the packaged model's name and version %s@%s for other weights",
                        folder, *key)
            continue
        folders[key] = folder
    specs = []
    for (name, version), folder in sorted(folders.items(), key=lambda kv: (kv[0][0], _version_key(kv[0][1]))):
        spec = load_manifest(folder)
        if (spec.name, spec.version) != (name, version):
            raise ModelError(f"{folder}: manifest says {spec.ref} but the folder is {name}/{version}")
        specs.append(spec)
    return specs


def _member_shas(folder: Path) -> list[str] | None:
    try:
        return [m.sha256 for m in load_manifest(folder).members]
    except ModelError:
        return None


def packaged_copy(name: str, version: str) -> ModelSpec | None:
    """The manifest shipped with the package for name@version, if there is one."""
    folder = _scan(packaged_root()).get((name, version))
    return None if folder is None else load_manifest(folder)


def is_complete(spec: ModelSpec) -> bool:
    """True if every member file is present (checksums are checked separately)."""
    return spec.directory is not None and all(p.is_file() for p in spec.member_paths())


def resolve(ref: str) -> ModelSpec:
    """The spec for ``name[@version]``: the highest version when none is given.

    Complete copies are preferred: a packaged manifest whose files live only on a mirror
    resolves to the installed copy in the cache if there is one.
    """
    name, version = parse_ref(ref)
    specs = available()
    same = [s for s in specs if s.name == name]
    if not same:
        names = sorted({s.name for s in specs})
        listing = ", ".join(names) if names else "none are installed"
        raise ModelError(f"unknown model '{name}' (known models: {listing}; see -list-models)")
    if version is not None:
        same = [s for s in same if s.version == version]
        if not same:
            known = ", ".join(s.version for s in available() if s.name == name)
            raise ModelError(f"model '{name}' has no version {version} (known versions: {known})")
    best_version = max(_version_key(s.version) for s in same)
    candidates = [s for s in same if _version_key(s.version) == best_version]
    complete = [s for s in candidates if is_complete(s)]
    # the cache copy comes later in available(), so it wins over a packaged remote-only manifest
    return (complete or candidates)[-1]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify(spec: ModelSpec) -> None:
    """Raise IntegrityError unless every member file exists and matches its SHA-256.

    Results are remembered per process for unchanged files (same size and mtime). Several
    files are hashed in parallel threads (hashlib releases the GIL): a 5-fold nnU-Net model
    is 600 MB.
    """
    todo = []
    for member, path in zip(spec.members, spec.member_paths()):
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IntegrityError(f"{path}: member file of model {spec.ref} is missing") from None
        key = (str(path), st.st_size, st.st_mtime_ns, member.sha256)
        if _VERIFIED.get(key):
            continue
        if member.size is not None and st.st_size != member.size:
            raise IntegrityError(f"{path}: size {st.st_size} differs from the manifest's {member.size}; "
                                 f"the model {spec.ref} is corrupt or was modified")
        todo.append((member, path, key))
    if len(todo) > 1:
        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
            digests = list(pool.map(sha256_file, [path for _, path, _ in todo]))
    else:
        digests = [sha256_file(path) for _, path, _ in todo]
    for (member, path, key), digest in zip(todo, digests):
        if digest != member.sha256:
            raise IntegrityError(f"{path}: SHA-256 {digest[:12]}... does not match the manifest's "
                                 f"{member.sha256[:12]}...; the model {spec.ref} is corrupt or was modified")
        _VERIFIED[key] = True


def with_mirrors(spec: ModelSpec) -> ModelSpec:
    """The spec itself if it lists mirrors, else the packaged manifest of the same version that does.

    An installed copy carries the manifest from its archive, which need not list where it came
    from; the packaged registry entry does, so a damaged copy can be fetched again.
    """
    if spec.mirrors:
        return spec
    packaged = packaged_copy(spec.name, spec.version)
    if packaged is not None:
        if packaged.mirrors and [m.sha256 for m in packaged.members] == [m.sha256 for m in spec.members]:
            return packaged
    return spec


def in_cache(spec: ModelSpec) -> bool:
    root = cache_root().resolve()
    return spec.directory is not None and root in spec.directory.resolve().parents
