"""Every error is one line: nibabel's two-line messages, damaged archives (named by URL), bad URLs."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image, make_model_folder
from hostile import one_line_error, server, zip_folder  # noqa: F401  (server is a fixture)

from sct_deepseg_epi.cli import main


def test_short_data_in_complete_gzip_is_one_line(tiny_model, tmp_path, capsys):
    """A .nii.gz whose stream ends early but cleanly: nibabel says 'Expected ... bytes' over two lines."""
    img, _ = blob_image()
    good = tmp_path / "good.nii"
    nib.save(img, str(good))
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(good.read_bytes()[:3000]))
    assert main(["-i", str(path), "-model", "tiny"]) == 1
    line = one_line_error(capsys)
    assert "short.nii.gz" in line and "truncated or damaged" in line and "Expected" in line


def test_offset_past_gzip_data_is_one_line(tiny_model, tmp_path, capsys):
    img, _ = blob_image()
    hdr = img.header.copy()
    raw = bytearray(hdr.binaryblock)
    raw[108:112] = np.float32(1e9).tobytes()
    path = tmp_path / "offset.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw) + b"\0" * 4 + np.asarray(img.dataobj).tobytes(order="F")))
    assert main(["-i", str(path), "-model", "tiny"]) == 1
    assert "offset.nii.gz" in one_line_error(capsys)


@pytest.fixture
def model_zip(tmp_path) -> bytes:
    return zip_folder(make_model_folder(tmp_path / "src" / "tiny-2.0.0", version="2.0.0"), "tiny-2.0.0/")


def test_not_an_archive_names_the_url(server, model_root, capsys):
    server.files["/model.zip"] = b"<html>this is a web page, not a model</html>\n" * 20
    url = server.url + "/model.zip"
    assert main(["-custom-url", url]) == 1
    line = one_line_error(capsys)
    assert url in line and "not a zip or tar archive" in line and ".download-" not in line


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_truncated_archive_names_the_url(server, model_root, model_zip, tmp_path, capsys, kind):
    if kind == "zip":
        body = model_zip[: len(model_zip) * 2 // 3]
    else:
        import io
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            t.add(tmp_path / "src" / "tiny-2.0.0", arcname="tiny-2.0.0")
        body = buf.getvalue()[: len(buf.getvalue()) * 2 // 3]
    server.files[f"/m.{kind}"] = body
    url = f"{server.url}/m.{kind}"
    assert main(["-custom-url", url]) == 1
    line = one_line_error(capsys)
    assert url in line and ".download-" not in line and ".extract-" not in line
    assert not list(model_root.glob(".download-*")) and not list(model_root.glob(".extract-*"))


@pytest.mark.parametrize("fragment", ["#sha256=abc", "#sha256=" + "g" * 64, "#sha256=", "#md5=" + "0" * 32])
def test_malformed_checksum_refused_before_download(server, model_root, model_zip, capsys, fragment):
    server.files["/m.zip"] = model_zip
    url = server.url + "/m.zip"
    assert main(["-custom-url", url + fragment]) == 1
    line = one_line_error(capsys)
    assert "64 hexadecimal digits" in line or "the only one understood is #sha256=HEX" in line
    assert server.hits.get("/m.zip", 0) == 0  # nothing was fetched


def test_malformed_checksum_message(server, model_root, capsys):
    assert main(["-custom-url", server.url + "/m.zip#sha256=abc"]) == 1
    assert "64 hexadecimal digits" in one_line_error(capsys)


def test_valid_uppercase_checksum_still_accepted(server, model_root, model_zip):
    import hashlib

    server.files["/m.zip"] = model_zip
    assert main(["-custom-url", server.url + "/m.zip#sha256=" + hashlib.sha256(model_zip).hexdigest().upper(),
                 "-v", "0"]) == 0


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/model.zip", "gopher://127.0.0.1/m.zip"])
def test_unsupported_scheme_refused_at_once(model_root, capsys, monkeypatch, url):
    import requests

    from sct_deepseg_epi.registry import fetch

    calls: list = []  # no attempt and no backoff: counted, not timed (a loaded machine is slow)
    monkeypatch.setattr(fetch.time, "sleep", lambda s: calls.append(("sleep", s)))
    monkeypatch.setattr(requests, "get", lambda *a, **k: calls.append(("get", a)))
    assert main(["-custom-url", url]) == 1
    assert calls == []
    line = one_line_error(capsys)
    assert url in line and "unsupported URL scheme" in line
