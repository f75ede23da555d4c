"""The models folder: unwritable or full (one line), never shadowing a packaged model, one download
for concurrent installs, and -install repairing a damaged install."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_model_folder
from hostile import (fsize_limited, one_line_error, readonly_dir, run_cli, server, small_fs,  # noqa: F401
                     zip_folder, assert_one_line)

from sct_deepseg_epi.cli import main
from sct_deepseg_epi.registry import download, fetch, store
from sct_deepseg_epi.registry.manifest import load_manifest


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(fetch, "BACKOFF", 0.01)


def big_model(folder: Path, nbytes: int = 300_000) -> Path:
    """A model folder whose member is ``nbytes`` of incompressible data (installs never parse ONNX)."""
    make_model_folder(folder, version="2.0.0", members=((8.0, -16.0),))
    member = folder / "member0.onnx"
    member.write_bytes(os.urandom(nbytes))
    d = json.loads((folder / "manifest.json").read_text())
    d["members"] = [{"file": "member0.onnx", "sha256": hashlib.sha256(member.read_bytes()).hexdigest(), "size": nbytes}]
    (folder / "manifest.json").write_text(json.dumps(d))
    return folder


def remote_manifest(folder: Path, pkg: Path, mirror: str, archive: bytes) -> Path:
    """A packaged-style manifest (members listed, files on a mirror)."""
    d = json.loads((folder / "manifest.json").read_text())
    d["download"] = {"archive": "tiny-2.0.0.zip", "sha256": hashlib.sha256(archive).hexdigest(), "mirrors": [mirror]}
    dest = pkg / "tiny" / "2.0.0"
    dest.mkdir(parents=True)
    (dest / "manifest.json").write_text(json.dumps(d))
    return dest


@pytest.fixture
def small_archive(tmp_path) -> tuple[bytes, Path]:
    folder = make_model_folder(tmp_path / "src" / "tiny-2.0.0", version="2.0.0")
    return zip_folder(folder, "tiny-2.0.0/"), folder


@pytest.fixture
def big_archive(tmp_path) -> tuple[bytes, Path]:
    folder = big_model(tmp_path / "big" / "tiny-2.0.0")
    return zip_folder(folder, "tiny-2.0.0/"), folder


# ----------------------------------------------------------------- 7: unwritable, plain file, full disk

@pytest.mark.parametrize("how", ["custom-url", "install"])
def test_read_only_models_folder(server, small_archive, readonly_dir, tmp_path, monkeypatch, capsys, how):
    data, folder = small_archive
    server.files["/m.zip"] = data
    monkeypatch.setenv("SCT_DEEPSEG_EPI_MODELS", str(readonly_dir / "models"))
    args = (["-custom-url", server.url + "/m.zip"] if how == "custom-url" else
            ["-install", "-model", str(remote_manifest(folder, tmp_path / "pkg", server.url + "/m.zip", data))])
    assert main(args) == 1
    line = one_line_error(capsys)
    assert str(readonly_dir / "models") in line and ("Read-only file system" in line or "Permission denied" in line)
    assert "SCT_DEEPSEG_EPI_MODELS" in line and server.hits.get("/m.zip", 0) == 0


@pytest.mark.parametrize("how", ["custom-url", "install"])
def test_models_folder_is_a_plain_file(server, small_archive, tmp_path, monkeypatch, capsys, how):
    data, folder = small_archive
    server.files["/m.zip"] = data
    plain = tmp_path / "models"
    plain.write_text("not a folder")
    monkeypatch.setenv("SCT_DEEPSEG_EPI_MODELS", str(plain))
    args = (["-custom-url", server.url + "/m.zip"] if how == "custom-url" else
            ["-install", "-model", str(remote_manifest(folder, tmp_path / "pkg", server.url + "/m.zip", data))])
    assert main(args) == 1
    assert f"{plain}: the models folder is a file, not a folder" in one_line_error(capsys)
    assert plain.read_text() == "not a folder"


@pytest.mark.parametrize("how", ["custom-url", "install", "local-archive"])
def test_full_models_disk(server, big_archive, small_fs, tmp_path, monkeypatch, capsys, how):
    """A 300 kB model onto a 200 kB file system: ENOSPC while downloading or copying."""
    data, folder = big_archive
    server.files["/m.zip"] = data
    (tmp_path / "m.zip").write_bytes(data)
    monkeypatch.setenv("SCT_DEEPSEG_EPI_MODELS", str(small_fs))
    args = {"custom-url": ["-custom-url", server.url + "/m.zip"],
            "local-archive": ["-custom-url", str(tmp_path / "m.zip")],
            "install": ["-install", "-model", str(remote_manifest(folder, tmp_path / "pkg", server.url + "/m.zip", data))]}
    assert main(args[how]) == 1
    line = one_line_error(capsys)
    assert "No space left on device" in line and str(small_fs) in line
    assert [p.name for p in small_fs.iterdir() if not p.name.endswith(".lock") and not p.name.startswith(".url-")] == []


def test_file_size_limit_while_installing(server, big_archive, model_root):
    """Without root: RLIMIT_FSIZE makes the kernel refuse to grow the download (EFBIG), the same write path."""
    data, _ = big_archive
    server.files["/m.zip"] = data
    proc = run_cli(["-custom-url", server.url + "/m.zip"], {"SCT_DEEPSEG_EPI_MODELS": str(model_root)},
                   preexec_fn=fsize_limited(100_000))
    assert "File too large" in assert_one_line(proc)
    assert not (model_root / "tiny" / "2.0.0").exists()


# ----------------------------------------------------------------- 12: packaged models cannot be shadowed

def _impostor(tmp_path: Path) -> Path:
    folder = make_model_folder(tmp_path / "impostor", name="seg_sc_epi", version="0.1.0")
    return folder


def test_custom_url_cannot_reuse_a_packaged_name_and_version(model_root, tmp_path, capsys):
    folder = _impostor(tmp_path)
    assert main(["-custom-url", str(folder)]) == 1
    line = one_line_error(capsys)
    assert "seg_sc_epi@0.1.0" in line and "other weights than the packaged" in line and "another name or version" in line
    assert not (model_root / "seg_sc_epi").exists()
    (tmp_path / "a.zip").write_bytes(zip_folder(folder))
    assert main(["-custom-url", str(tmp_path / "a.zip")]) == 1
    assert "refusing to shadow" in one_line_error(capsys)


def test_existing_impostor_in_cache_is_ignored(model_root, tmp_path, caplog):
    """A cache entry written before this check existed does not replace the packaged model."""
    shutil.copytree(_impostor(tmp_path), model_root / "seg_sc_epi" / "0.1.0")
    spec = store.resolve("seg_sc_epi@0.1.0")
    assert spec.directory == store.packaged_root() / "seg_sc_epi" / "0.1.0"
    assert "reuses the packaged model's name and version" in caplog.text


def test_same_weights_under_packaged_name_still_install(model_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store.packaged_root() / "seg_sc_epi" / "0.1.0", copy)
    spec = download.install_url(str(copy))
    assert spec.ref == "seg_sc_epi@0.1.0"


# ----------------------------------------------------------------- 13: lock before downloading

def test_concurrent_custom_url_downloads_once(server, small_archive, model_root):
    """Four processes started together: the first downloads, the others wait for its lock and reuse it."""
    import subprocess
    import sys

    from hostile import REPO

    data, _ = small_archive
    server.files["/m.zip"] = data
    server.delay["/m.zip"] = 1.5  # the first download is still running when the others ask
    env = {**os.environ, "SCT_DEEPSEG_EPI_MODELS": str(model_root)}
    procs = [subprocess.Popen([sys.executable, "-m", "sct_deepseg_epi", "-custom-url", server.url + "/m.zip", "-v", "0"],
                              cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errs
    assert server.hits["/m.zip"] == 1
    store.verify(store.resolve("tiny@2.0.0"))


def test_later_custom_url_downloads_again(server, small_archive, model_root):
    """Only installs made while a process waited are reused: the URL may serve a new archive later."""
    data, _ = small_archive
    server.files["/m.zip"] = data
    download.install_url(server.url + "/m.zip")
    download.install_url(server.url + "/m.zip")
    assert server.hits["/m.zip"] == 2


# ----------------------------------------------------------------- 14: -install repairs, missing members named

@pytest.fixture
def registry_model(server, small_archive, model_root, tmp_path, monkeypatch):
    """tiny@2.0.0 listed in the 'packaged' registry with a mirror, and installed in the cache."""
    data, folder = small_archive
    server.files["/m.zip"] = data
    pkg = tmp_path / "pkg"
    remote_manifest(folder, pkg, server.url + "/m.zip", data)
    monkeypatch.setattr(store, "packaged_root", lambda: pkg)
    spec = download.install_spec(load_manifest(pkg / "tiny" / "2.0.0"))
    return spec.directory


def test_install_repairs_a_deleted_member(registry_model, blob_file, capsys):
    (registry_model / "member1.onnx").unlink()
    path, _ = blob_file
    assert main(["-i", str(path), "-model", "tiny@2.0.0", "-v", "0"]) == 0  # run: reinstalled from the mirror
    (registry_model / "member1.onnx").unlink()
    capsys.readouterr()
    assert main(["-install", "-model", "tiny@2.0.0", "-v", "0"]) == 0
    store.verify(load_manifest(registry_model))


def test_missing_member_names_the_file_and_a_command_that_works(registry_model, capsys):
    from sct_deepseg_epi import api
    from sct_deepseg_epi.errors import ModelError

    (registry_model / "member1.onnx").unlink()
    with pytest.raises(ModelError) as info:
        api.load_model("tiny@2.0.0", install=False)
    msg = str(info.value)
    assert str(registry_model / "member1.onnx") in msg and "run: sct_deepseg_epi -install -model tiny@2.0.0" in msg
    assert main(["-install", "-model", "tiny@2.0.0", "-v", "0"]) == 0  # the command it names repairs the model
    store.verify(load_manifest(registry_model))


def test_model_folder_with_missing_member_names_it(tmp_path, model_root, blob_file, capsys):
    folder = make_model_folder(tmp_path / "mymodel")
    (folder / "member2.onnx").unlink()
    path, _ = blob_file
    assert main(["-i", str(path), "-model", str(folder)]) == 1
    line = one_line_error(capsys)
    assert f"{folder / 'member2.onnx'}: member file of model tiny@1.0.0 is missing" in line
    assert "-install" not in line
