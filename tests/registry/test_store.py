"""The model store: resolution of name[@version], verification, cache location."""
from __future__ import annotations

import pytest
from conftest import make_model_folder

from sct_deepseg_epi.errors import IntegrityError, ModelError
from sct_deepseg_epi.registry import store


def test_cache_root_env_override(model_root):
    assert store.cache_root() == model_root


def test_cache_root_inside_sct(tmp_path, monkeypatch):
    monkeypatch.delenv("SCT_DEEPSEG_EPI_MODELS", raising=False)
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("SCT_DIR", str(tmp_path))
    assert store.cache_root() == tmp_path / "data" / "deepseg_models" / "sct_deepseg_epi"


def test_resolve_latest_and_pinned(model_root):
    make_model_folder(model_root / "tiny" / "1.0.0")
    make_model_folder(model_root / "tiny" / "1.10.0", version="1.10.0")
    make_model_folder(model_root / "tiny" / "1.2.0", version="1.2.0")
    assert store.resolve("tiny").version == "1.10.0"  # numeric, not string, ordering
    assert store.resolve("tiny@1.2.0").version == "1.2.0"


def test_unknown_model_and_version(tiny_model):
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        store.resolve("nope")
    with pytest.raises(ModelError, match="no version 9.9.9"):
        store.resolve("tiny@9.9.9")


def test_folder_must_match_manifest(model_root):
    make_model_folder(model_root / "tiny" / "2.0.0")  # manifest says 1.0.0
    with pytest.raises(ModelError, match="folder is tiny/2.0.0"):
        store.available()


def test_verify_detects_tampering(tiny_model):
    spec = store.resolve("tiny")
    store.verify(spec)
    member = tiny_model / "member1.onnx"
    data = bytearray(member.read_bytes())
    data[-1] ^= 0xFF
    member.write_bytes(bytes(data))  # same size, different content
    with pytest.raises(IntegrityError, match="member1.onnx"):
        store.verify(spec)


def test_verify_detects_missing_member(tiny_model):
    (tiny_model / "member2.onnx").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.verify(store.resolve("tiny"))


def test_packaged_root_exists():
    assert store.packaged_root().is_dir()
