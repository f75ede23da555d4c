"""Manifest validation: strict, with errors naming the field."""
from __future__ import annotations

import json

import pytest
from conftest import make_model_folder
from nnunet_fixtures import make_nnunet_folder

from sct_deepseg_epi.errors import ModelError
from sct_deepseg_epi.registry.manifest import load_manifest, parse_size, spec_from_dict, spec_to_dict, write_manifest


def base():
    return {"schema_version": 1, "name": "m", "version": "1.2.3",
            "members": [{"file": "a.onnx", "sha256": "a" * 64}], "input": {"spacing_mm": [1, 1]}}


def test_minimal_manifest_gets_defaults():
    s = spec_from_dict(base())
    assert s.ref == "m@1.2.3" and s.threshold == 0.5 and s.in_channels == 1 and s.tta_flip_axes == (0,)


@pytest.mark.parametrize("change, message", [
    ({"schema_version": 3}, "schema_version 3"),
    ({"name": "Bad-Name"}, "name"),
    ({"version": "1.0"}, "MAJOR.MINOR.PATCH"),
    ({"members": []}, "at least one"),
    ({"members": [{"file": "../x.onnx", "sha256": "a" * 64}]}, "plain"),
    ({"members": [{"file": "a.onnx", "sha256": "xyz"}]}, "64 hex"),
    ({"input": {"spacing_mm": [1]}}, "spacing_mm"),
    ({"input": {"spacing_mm": [1, 1], "normalisation": {"scheme": "magic"}}}, "magic"),
    ({"output": {"threshold": 1.5}}, "threshold"),
    ({"tta": {"flip_axes": [2]}}, "flip_axes"),
    ({"postprocess": {"remove_small": "lots"}}, "remove_small"),
    ({"download": {"mirrors": ["ftp://x"]}}, "mirrors"),
    ({"colour": "blue"}, "unknown field"),
    ({"input": {"spacing_mm": [1, 1], "spacng": 2}}, "unknown field"),
    ({"postprocess": {"largest": 1}}, "wrong type"),
])
def test_invalid_manifests(change, message):
    d = base()
    d.update(change)
    with pytest.raises(ModelError, match=message):
        spec_from_dict(d)


def test_round_trip(tmp_path):
    d = base()
    d["training"] = {"epochs": 3}
    s = spec_from_dict(d)
    assert spec_from_dict(spec_to_dict(s)) == s
    write_manifest(s, tmp_path)
    assert load_manifest(tmp_path).extra["training"] == {"epochs": 3}


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ModelError, match="no model manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a readable JSON"):
        load_manifest(tmp_path)


def test_parse_size():
    assert parse_size("20") == (20.0, "vox") and parse_size("15mm3") == (15.0, "mm3")
    with pytest.raises(ValueError):
        parse_size("15 cm")


def test_fixture_model_is_valid(tmp_path):
    spec = load_manifest(make_model_folder(tmp_path / "m"))
    assert len(spec.members) == 3 and json.loads((tmp_path / "m" / "manifest.json").read_text())["name"] == "tiny"


def test_backend_is_a_tagged_union_and_schema_1_still_reads(tmp_path):
    from sct_deepseg_epi.registry import store
    from sct_deepseg_epi.registry.manifest import NnunetRecipe, SliceModel

    packaged = store.packaged_root() / "seg_sc_epi" / "0.1.0"
    raw = json.loads((packaged / "manifest.json").read_text())
    assert raw["schema_version"] == 1  # published as it is: its checksums are public
    spec = load_manifest(packaged)
    assert isinstance(spec.backend, SliceModel) and spec.backend.kind == "slices" and spec.nnunet is None
    assert spec.spacing_mm == (1.0, 1.0) and spec.tta_flip_axes == (0,) and spec.threshold == 0.5
    d = spec_to_dict(spec)
    assert d["schema_version"] == 2 and set(d) >= {"backend", "postprocess"} and not {"input", "output", "tta"} & set(d)
    assert spec_from_dict(d, directory=packaged) == spec
    # a schema 1 nnU-Net manifest: its dummy slice sections are dropped
    nn = load_manifest(make_nnunet_folder(tmp_path / "nn"))
    assert isinstance(nn.backend, NnunetRecipe) and nn.nnunet is nn.backend
    assert "input" not in spec_to_dict(nn) and spec_to_dict(nn)["backend"]["kind"] == "nnunet"
    with pytest.raises(ModelError, match="not a slice model"):
        nn.spacing_mm
    bad = spec_to_dict(spec)
    bad["backend"]["kind"] = "unet3d"
    with pytest.raises(ModelError, match="kind 'unet3d'"):
        spec_from_dict(bad)
    bad["backend"] = {"kind": "slices", "spacing_mm": [1, 1], "patch_size": [4]}
    with pytest.raises(ModelError, match="unknown field"):
        spec_from_dict(bad)
