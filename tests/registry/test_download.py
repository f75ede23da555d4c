"""Downloads over real HTTP on 127.0.0.1: mirrors, retries, checksums, safe extraction, locking."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import make_model_folder
from loopback import server, zip_folder  # noqa: F401 (server is a fixture)

from sct_deepseg_epi.errors import DownloadError, IntegrityError, ModelError
from sct_deepseg_epi.registry import download, fetch, store
from sct_deepseg_epi.registry.manifest import load_manifest


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(fetch, "BACKOFF", 0.01)




@pytest.fixture
def archive(tmp_path) -> tuple[bytes, Path]:
    folder = make_model_folder(tmp_path / "src" / "tiny-2.0.0", version="2.0.0")
    return zip_folder(folder, "tiny-2.0.0/"), folder


def remote_manifest(folder: Path, root: Path, mirrors: list[str], sha: str) -> None:
    """A packaged-style manifest (members listed, files absent) pointing at mirrors."""
    d = json.loads((folder / "manifest.json").read_text())
    d["download"] = {"archive": "tiny-2.0.0.zip", "sha256": sha, "mirrors": mirrors}
    dest = root / "tiny" / "2.0.0"
    dest.mkdir(parents=True)
    (dest / "manifest.json").write_text(json.dumps(d))


def test_fetch_verifies_checksum(server, tmp_path):
    server.files["/a.bin"] = b"hello"
    good = hashlib.sha256(b"hello").hexdigest()
    assert fetch.fetch([server.url + "/a.bin"], tmp_path / "a", good).read_bytes() == b"hello"
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch.fetch([server.url + "/a.bin"], tmp_path / "b", "0" * 64)
    assert not (tmp_path / "b").exists()


def test_fetch_retries_5xx_then_succeeds(server, tmp_path):
    server.files["/a.bin"] = b"data"
    server.fail["/a.bin"] = [503, 500]
    fetch.fetch([server.url + "/a.bin"], tmp_path / "a")
    assert server.hits["/a.bin"] == 3


def test_fetch_falls_back_to_next_mirror(server, tmp_path):
    server.files["/b.bin"] = b"data"
    out = fetch.fetch([server.url + "/missing.bin", server.url + "/b.bin"], tmp_path / "x")
    assert out.read_bytes() == b"data" and server.hits["/missing.bin"] == 1  # 404 is not retried


def test_fetch_detects_truncation(server, tmp_path):
    server.files["/t.bin"] = b"x" * 1000
    server.truncate.add("/t.bin")
    with pytest.raises(DownloadError):
        fetch.fetch([server.url + "/t.bin"], tmp_path / "t", retries=2)


def test_fetch_unreachable_host(tmp_path):
    with pytest.raises(DownloadError, match="every mirror"):
        fetch.fetch(["http://127.0.0.1:9/none.zip"], tmp_path / "n", retries=1, limits=fetch.Limits(stall=1))


def test_install_from_mirrors(server, archive, model_root, tmp_path):
    data, folder = archive
    server.files["/tiny.zip"] = data
    pkg = tmp_path / "pkg"
    remote_manifest(folder, pkg, [server.url + "/gone.zip", server.url + "/tiny.zip"], hashlib.sha256(data).hexdigest())
    spec = download.install_spec(load_manifest(pkg / "tiny" / "2.0.0"))
    assert spec.directory == model_root / "tiny" / "2.0.0"
    store.verify(spec)
    # installed once: a second call finds it and does not download again
    download.install_spec(load_manifest(pkg / "tiny" / "2.0.0"))
    assert server.hits["/tiny.zip"] == 1


def test_install_url_and_custom_archive(server, archive, model_root):
    data, _ = archive
    server.files["/custom.zip"] = data
    spec = download.install_url(server.url + "/custom.zip")
    assert spec.ref == "tiny@2.0.0" and store.resolve("tiny").version == "2.0.0"


def test_install_refuses_archive_with_bad_member(server, archive, model_root, tmp_path):
    _, folder = archive
    (folder / "member0.onnx").write_bytes(b"tampered")
    server.files["/bad.zip"] = zip_folder(folder)
    with pytest.raises(DownloadError, match="refusing to install"):
        download.install_url(server.url + "/bad.zip")
    assert not (model_root / "tiny").exists() or not any((model_root / "tiny").iterdir())


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_zip_path_traversal_refused(tmp_path, name):
    p = tmp_path / "evil.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(name, "x")
    with pytest.raises(DownloadError, match="unsafe path"):
        download.extract(p, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_tar_links_refused(tmp_path):
    p = tmp_path / "evil.tar.gz"
    with tarfile.open(p, "w:gz") as t:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        t.addfile(info)
    with pytest.raises(DownloadError, match="link"):
        download.extract(p, tmp_path / "out")


def test_tar_archive_installs(archive, model_root, tmp_path):
    _, folder = archive
    p = tmp_path / "m.tar.gz"
    with tarfile.open(p, "w:gz") as t:
        t.add(folder, arcname="model")
    assert download.install_archive(p).ref == "tiny@2.0.0"


def _install_worker(args):
    url, pkg, root = args
    import os

    os.environ["SCT_DEEPSEG_EPI_MODELS"] = root
    from sct_deepseg_epi.registry import download as d
    from sct_deepseg_epi.registry.manifest import load_manifest as lm

    return str(d.install_spec(lm(Path(pkg))).directory)


def test_eight_processes_install_once(server, archive, model_root, tmp_path):
    data, folder = archive
    server.files["/tiny.zip"] = data
    pkg = tmp_path / "pkg"
    remote_manifest(folder, pkg, [server.url + "/tiny.zip"], hashlib.sha256(data).hexdigest())
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        dirs = pool.map(_install_worker, [(server.url, str(pkg / "tiny" / "2.0.0"), str(model_root))] * 8)
    assert len(set(dirs)) == 1 and server.hits["/tiny.zip"] == 1
    store.verify(load_manifest(Path(dirs[0])))
    leftovers = [p.name for p in (model_root / "tiny").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_offline_with_nothing_installed_says_what_to_run(model_root, archive, tmp_path):
    from sct_deepseg_epi import api

    _, folder = archive
    pkg = tmp_path / "pkg"
    remote_manifest(folder, pkg, ["http://127.0.0.1:9/tiny.zip"], "0" * 64)
    with pytest.raises(ModelError, match="sct_deepseg_epi -install -model tiny@2.0.0"):
        api.load_model(load_manifest(pkg / "tiny" / "2.0.0"))


def test_damaged_cache_copy_is_reinstalled(server, archive, model_root, tmp_path, monkeypatch):
    from sct_deepseg_epi import api

    data, folder = archive
    server.files["/tiny.zip"] = data
    pkg = tmp_path / "pkg"
    remote_manifest(folder, pkg, [server.url + "/tiny.zip"], hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(store, "packaged_root", lambda: pkg)  # the registry entry lists the mirror
    download.install_spec(load_manifest(pkg / "tiny" / "2.0.0"))
    spec = store.resolve("tiny")
    assert spec.directory == model_root / "tiny" / "2.0.0"
    victim = spec.directory / "member0.onnx"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityError):
        api.load_model(spec, install=False)  # refused, never silently used
    fixed = api.load_model(spec, install=True)  # reinstalled from the mirror
    store.verify(fixed)
    assert server.hits["/tiny.zip"] == 2


def test_lock_timeout_is_a_clear_error(model_root, monkeypatch):
    from filelock import FileLock

    monkeypatch.setattr(download, "LOCK_TIMEOUT", 0.2)
    holder = FileLock(str(model_root / ".tiny.lock"))
    holder.acquire()
    try:
        with pytest.raises(DownloadError, match="install lock"):
            with download._lock(model_root, "tiny"):
                pass
    finally:
        holder.release()
