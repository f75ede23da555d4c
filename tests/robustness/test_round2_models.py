"""Models, round 2: an invalid manifest in an archive is named by its URL, ``-model md`` finds ./md,
import-nnunet's hints, the scratch folder of a killed download, and the backend's own sidecar fields."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_model_folder
from hostile import REPO, one_line_error, server, zip_folder  # noqa: F401  (server is a fixture)

from sct_deepseg_epi import api, backend
from sct_deepseg_epi.cli import main
from sct_deepseg_epi.infer import SliceBackend

_MEMBER = {"file": "../evil.onnx", "sha256": "0" * 64}


def _v2(manifest: dict, **backend) -> dict:
    """The schema 2 form of a test manifest, with ``backend`` fields changed."""
    from sct_deepseg_epi.registry.manifest import upgrade_v1

    d = upgrade_v1(manifest, "test")
    d["backend"].update(backend)
    return d


@pytest.mark.parametrize("name, change", [
    ("bad_json", lambda m: "{not json"),
    ("unknown_key", lambda m: {**m, "surprise": 1}),
    ("schema_3", lambda m: {**m, "schema_version": 3}),
    ("member_traversal", lambda m: {**m, "members": [_MEMBER]}),
    ("name_traversal", lambda m: {**m, "name": "../../x"}),
    ("version_traversal", lambda m: {**m, "version": "../1.0.0"}),
    ("threshold_5", lambda m: {**m, "output": {**m["output"], "threshold": 5}}),
    ("kind_evil", lambda m: _v2(m, kind="evil")),
    ("backend_in_schema_1", lambda m: {**m, "backend": {"kind": "evil"}}),  # was silently replaced
])
def test_invalid_manifest_in_an_archive_names_the_url(server, model_root, tmp_path, capsys, name, change):
    """Row 8: the message named the deleted temporary `.extract-XXXX/manifest.json`."""
    folder = make_model_folder(tmp_path / "src" / "tiny-2.0.0", version="2.0.0")
    manifest = json.loads((folder / "manifest.json").read_text())
    new = change(manifest)
    (folder / "manifest.json").write_text(new if isinstance(new, str) else json.dumps(new))
    server.files["/bad.zip"] = zip_folder(folder, "tiny-2.0.0/")
    url = server.url + "/bad.zip"
    assert main(["-custom-url", url]) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"error: {url}: tiny-2.0.0/manifest.json"), line
    assert ".extract-" not in line and ".download-" not in line and str(model_root) not in line
    assert not any(p.name.startswith((".extract-", ".download-")) for p in model_root.iterdir())


def test_model_folder_named_without_a_slash_is_used(tiny_model, tmp_path, monkeypatch, capsys):
    """Row 9: `-model md` where ./md is a model folder said "unknown model 'md'"."""
    import shutil

    import nibabel as nib
    from conftest import blob_image

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_model, work / "md")
    nib.save(blob_image()[0], str(work / "in.nii.gz"))
    monkeypatch.chdir(work)
    assert main(["-i", "in.nii.gz", "-model", "md", "-v", "0"]) == 0
    side = json.loads((work / "in_seg.json").read_text())
    assert side["model"]["name"] == "tiny"
    assert main(["-i", "in.nii.gz", "-model", "nothere"]) == 1  # neither a model nor a folder: as before
    assert "unknown model 'nothere'" in one_line_error(capsys)


def _without_torch(argv: list[str], cwd) -> subprocess.CompletedProcess:
    code = ("import sys; sys.modules['torch'] = None\n"  # what an install without torch sees
            "from sct_deepseg_epi.cli import main\n"
            f"sys.exit(main({argv!r}))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_import_nnunet_without_torch_names_the_nnunet_extra(tmp_path):
    """Row 10: the hint said `[train]`, an extra without nnunetv2."""
    (tmp_path / "garbage.zip").write_bytes(b"not an archive")
    proc = _without_torch(["import-nnunet", "garbage.zip", "-o", "out"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("error: torch is needed for this command but is not installed: "
                                   "pip install 'sct_deepseg_epi[nnunet]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.zip"]


def test_import_nnunet_names_a_missing_source_first(tmp_path):
    """Row 11: `import-nnunet nope.zip` said "torch is needed" before saying nope.zip does not exist."""
    proc = _without_torch(["import-nnunet", "nope.zip", "-o", "out"], tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: nope.zip: no such file or folder", proc.stderr
    proc = _without_torch(["import-nnunet", "file://" + str(tmp_path / "nope.zip"), "-o", "out"], tmp_path)
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope.zip'}: no such file or folder", proc.stderr


def _scratch(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".download-", ".extract-")))


def test_kill_9_mid_download_scratch_is_removed_by_the_next_install(server, model_root, tmp_path):
    """Also: after kill -9 mid-download the .download-* folder outlived the next successful install (swept only
    after about an hour); now the next install removes it, since no live process holds its lock."""
    server.files["/m.zip"] = zip_folder(make_model_folder(tmp_path / "src" / "tiny-2.0.0", version="2.0.0"),
                                        "tiny-2.0.0/")
    server.hang.add("/m.zip")  # headers, then nothing: the download is in progress until killed
    url = server.url + "/m.zip"
    env = {**os.environ, "SCT_DEEPSEG_EPI_MODELS": str(model_root), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "sct_deepseg_epi", "-custom-url", url], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # a ceiling, not a speed: the event is the request arriving
        while server.hits.get("/m.zip", 0) == 0 or not _scratch(model_root):
            if p.poll() is not None:
                pytest.fail(f"the install ended before downloading: {p.stderr.read()[-500:]}")
            if time.monotonic() > deadline:
                pytest.fail("the download never started")
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()
    stale = _scratch(model_root)
    assert len(stale) == 1 and stale[0].startswith(".download-")  # what kill -9 leaves
    server.hang.discard("/m.zip")
    proc = subprocess.run([sys.executable, "-m", "sct_deepseg_epi", "-custom-url", url, "-v", "0"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _scratch(model_root) == [] and (model_root / "tiny" / "2.0.0" / "manifest.json").is_file()


class TaggedBackend(SliceBackend):
    """A slice backend that adds its own field to the sidecar's model record."""

    def provenance(self) -> dict:
        return {"tag": "from the backend"}


def test_the_backend_contributes_its_own_provenance_fields(tiny_model, tmp_path, monkeypatch):
    """Also: api.provenance read spec.nnunet (the one place api still branched on the kind of model)."""
    import inspect

    import nibabel as nib
    from conftest import blob_image

    monkeypatch.setitem(backend.KINDS, "slices", (__name__, "TaggedBackend"))
    monkeypatch.setattr(backend, "_CACHE", {})
    src = tmp_path / "in.nii.gz"
    nib.save(blob_image()[0], str(src))
    res = api.run(src, model="tiny")
    assert res.provenance["model"]["tag"] == "from the backend"
    assert json.loads(res.sidecar.read_text())["model"]["tag"] == "from the backend"
    assert api.segment(src, model="tiny").provenance()["model"]["tag"] == "from the backend"
    assert "nnunet" not in inspect.getsource(api)  # api knows no kind of model by name
